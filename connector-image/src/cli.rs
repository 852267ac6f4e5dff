//! The command line of a connector binary: `run`, `check` and `cleanup` of a Connector manifest
//! or the operator's rendered config. The shared image's `obsrv-connector` and every custom
//! connector built on the SDK run the same [`main`], each with its own [`Registry`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Args, Parser, Subcommand};
use obsrv_crds::{
    Compression,
    runtime::{CONFIG_DIR, CONFIG_FILE, HTTP_PORT, LISTEN_ENV, RuntimeConfig, SECRETS_DIR_ENV},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    config::{Secrets, SinkSettings, default_sink, parse_config},
    envelope::Context,
    error::Error,
    http::{Shared, serve},
    runner::{Runtime, open_source, run},
    source::Registry,
};

#[derive(Parser)]
#[command(
    name = "obsrv-connector",
    version,
    about = "Pulls records from a source into Obsrv's ingest topic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read the source and write to the sink until SIGTERM.
    Run(Common),
    /// Connect to source and sink, say what is wrong, exit non-zero on failure.
    Check(Common),
    /// Release what the source holds (a CDC replication slot; nothing for most kinds).
    Cleanup(Common),
}

#[derive(Args)]
struct Common {
    /// A Connector manifest or the operator's runtime config.
    #[arg(short = 'f', long = "file", env = "OBSRV_CONFIG", default_value_t = format!("{CONFIG_DIR}/{CONFIG_FILE}"))]
    file: String,
    /// Secret values as files `<dir>/<secretName>/<key>` (env vars take precedence).
    #[arg(long, env = SECRETS_DIR_ENV)]
    secrets_dir: Option<PathBuf>,
    /// HTTP listen address (/healthz /readyz /metrics /status).
    #[arg(long, env = LISTEN_ENV, default_value_t = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT)))]
    listen: SocketAddr,
    /// Sink defaults (the operator merges its own into the config; these serve local runs).
    #[arg(long, env = "OBSRV_SINK_BOOTSTRAP_SERVERS")]
    sink_bootstrap_servers: Option<String>,
    #[arg(long, env = "OBSRV_SINK_TOPIC", default_value = "ingest")]
    sink_topic: String,
    #[arg(
        long,
        env = "OBSRV_SINK_FAILED_TOPIC",
        default_value = "connectors.failed"
    )]
    sink_failed_topic: String,
    #[arg(
        long,
        env = "OBSRV_SINK_STATE_TOPIC",
        default_value = "connectors.state"
    )]
    sink_state_topic: String,
    #[arg(
        long,
        env = "OBSRV_SINK_MAX_MESSAGE_BYTES",
        default_value_t = 1_048_576
    )]
    sink_max_message_bytes: i32,
    #[arg(long, env = "OBSRV_SINK_COMPRESSION", default_value = "zstd", value_parser = parse_compression)]
    sink_compression: Compression,
    /// json or text.
    #[arg(long, env = "OBSRV_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown compression {s}: none, gzip, snappy, lz4, zstd"))
}

struct Loaded {
    config: RuntimeConfig,
    sink: SinkSettings,
    secrets: Secrets,
    checksum: String,
}

fn load(c: &Common) -> Result<Loaded, Error> {
    let text = std::fs::read_to_string(&c.file)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", c.file)))?;
    let config = parse_config(&text)?;
    let defaults = default_sink(
        c.sink_bootstrap_servers.clone(),
        c.sink_topic.clone(),
        c.sink_failed_topic.clone(),
        c.sink_state_topic.clone(),
        c.sink_max_message_bytes,
        c.sink_compression,
    );
    let sink = SinkSettings::resolve(&config.spec, &defaults)?;
    let secrets = Secrets::load(&config.spec, c.secrets_dir.as_ref())?;
    let checksum = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Loaded {
        config,
        sink,
        secrets,
        checksum,
    })
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "text" {
        b.init();
    } else {
        b.json().init();
    }
}

/// Runs a connector binary: parses the command line, then runs, checks or cleans up the
/// Connector with the source kinds of `registry`.
///
/// ```no_run
/// // A custom connector's whole main (see examples/custom-connector):
/// # use obsrv_connector::source::{Batch, OpenContext, Registry, Source};
/// # struct Mine;
/// # impl Source for Mine { async fn next_batch(&mut self) -> obsrv_connector::Result<Option<Batch>> { Ok(None) } }
/// # async fn open(_: OpenContext) -> obsrv_connector::Result<Mine> { Ok(Mine) }
/// fn main() -> std::process::ExitCode {
///     obsrv_connector::cli::main(Registry::custom(open))
/// }
/// ```
pub fn main(registry: Registry) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("obsrv-connector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(main_async(registry, Cli::parse()))
}

async fn main_async(registry: Registry, cli: Cli) -> ExitCode {
    let c = match &cli.command {
        Command::Run(c) | Command::Check(c) | Command::Cleanup(c) => c,
    };
    init_logs(&c.log_format);
    let loaded = match load(c) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("obsrv-connector: {} ({})", e, e.reason());
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run(c) => run_cmd(registry, c, loaded).await,
        Command::Check(_) => check_cmd(&registry, loaded).await,
        Command::Cleanup(_) => cleanup_cmd(&registry, loaded).await,
    }
}

/// Releases what the source holds (a replication slot) through the kind's cleanup hook.
async fn cleanup_cmd(registry: &Registry, l: Loaded) -> ExitCode {
    let ctx = crate::source::CleanupContext {
        config: Arc::new(l.config),
        secrets: Arc::new(l.secrets),
    };
    let res = match registry.for_config(&ctx.config) {
        Ok(f) => f.cleanup(ctx.clone()).await,
        Err(e) => Err(e),
    };
    match res {
        Ok(done) => {
            println!("cleanup: {done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("cleanup: {} - {e}", e.reason());
            ExitCode::FAILURE
        }
    }
}

async fn run_cmd(registry: Registry, c: Common, l: Loaded) -> ExitCode {
    let shared = Shared::new(Some(l.checksum.clone()));
    if let Err(e) = serve(c.listen, shared.clone()).await {
        eprintln!("obsrv-connector: cannot listen on {}: {e}", c.listen);
        return ExitCode::from(2);
    }
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping");
        let _ = tx.send(true);
    });
    tracing::info!(connector = %l.config.instance_id(), dataset = %l.config.spec.dataset, "starting");
    match run(Runtime {
        registry,
        config: l.config,
        sink: l.sink,
        secrets: l.secrets,
        shared,
        stop: rx,
    })
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = e.reason(), error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn check_cmd(registry: &Registry, l: Loaded) -> ExitCode {
    let mut ok = true;
    let kind = l
        .config
        .spec
        .source
        .resolve()
        .map(|s| s.kind.name)
        .unwrap_or("unknown");
    let ctx = Context::new(&l.config.spec.dataset, &l.config.instance_id(), kind);
    let sink = match crate::sink::open(l.sink.clone(), &l.secrets, ctx, None) {
        Ok(s) => s,
        Err(e) => {
            println!("sink: {} - {e}", e.reason());
            return ExitCode::FAILURE;
        }
    };
    let config = Arc::new(l.config);
    let secrets = Arc::new(l.secrets);
    match open_source(registry, &config, &secrets, &sink, None).await {
        Ok(s) => {
            let details = s.describe();
            if details.is_empty() {
                println!("source: ok ({kind})");
            } else {
                println!("source: ok ({details})");
            }
        }
        Err(e) => {
            ok = false;
            println!("source: {} - {e}", e.reason());
        }
    }
    match sink.check().await {
        Ok(details) => println!("sink: ok ({details})"),
        Err(e) => {
            ok = false;
            println!("sink: {} - {e}", e.reason());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
