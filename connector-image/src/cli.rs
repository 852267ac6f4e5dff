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
    config::{Secrets, SinkSettings, default_sink},
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
    about = "Pulls records from a source into Obsrv's ingest topic",
    long_about = "Pulls records from a source into Obsrv's ingest topic.\n\nIn a cluster the operator \
runs `run` in every connector pod with the config it renders; locally, point `-f` at a Connector \
manifest (the Secret it references may sit in the same file) and at a broker."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read the source and write to the sink until SIGTERM (serves /healthz /readyz /metrics /status).
    #[command(
        after_help = "Example:\n  obsrv-connector run -f examples/local/postgres.yaml --sink-bootstrap-servers localhost:9092"
    )]
    Run(RunArgs),
    /// Check the config, connect to source and sink, say what is wrong; exit non-zero on failure.
    #[command(
        after_help = "Example:\n  obsrv-connector check -f examples/local/postgres.yaml --sink-bootstrap-servers localhost:9092"
    )]
    Check(Common),
    /// Release what the source holds (a replication slot); with --delete-state also delete the
    /// connector's positions. Run by the operator when a Connector is deleted.
    #[command(
        after_help = "Example:\n  obsrv-connector cleanup -f examples/local/postgres.yaml --sink-bootstrap-servers localhost:9092 --delete-state"
    )]
    Cleanup(CleanupArgs),
}

#[derive(Args)]
struct CleanupArgs {
    #[command(flatten)]
    common: Common,
    /// Also delete the connector's positions (`deletionPolicy: Delete`): every record of it in the
    /// state topic and the consumer group its Kafka source read with, so a connector of the same
    /// name starts from the beginning. Without it they are kept.
    #[arg(long)]
    delete_state: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// HTTP address for /healthz, /readyz, /metrics and /status.
    #[arg(long, env = LISTEN_ENV, default_value_t = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT)))]
    listen: SocketAddr,
}

#[derive(Args)]
struct Common {
    /// A Connector manifest (YAML; may also hold the Secrets it references) or the runtime config
    /// the operator renders.
    #[arg(short = 'f', long = "file", env = "OBSRV_CONFIG", default_value_t = format!("{CONFIG_DIR}/{CONFIG_FILE}"))]
    file: String,
    /// Which Connector of the file to use, when it holds several.
    #[arg(long)]
    name: Option<String>,
    /// Directory of Secret values as files `<dir>/<secretName>/<key>`, for Secrets that are not in
    /// the file (environment variables win over both).
    #[arg(long, env = SECRETS_DIR_ENV)]
    secrets_dir: Option<PathBuf>,
    /// Kafka bootstrap servers of the sink (Obsrv's ingest cluster). Needed when the manifest sets
    /// no spec.sink.kafka.bootstrapServers (in a cluster the operator writes its default into the
    /// config).
    #[arg(long, env = "OBSRV_SINK_BOOTSTRAP_SERVERS")]
    sink_bootstrap_servers: Option<String>,
    /// Ingest topic, unless the manifest sets spec.sink.kafka.topic.
    #[arg(long, env = "OBSRV_SINK_TOPIC", default_value = "ingest")]
    sink_topic: String,
    /// Topic of records that cannot be ingested, unless the manifest sets one.
    #[arg(
        long,
        env = "OBSRV_SINK_FAILED_TOPIC",
        default_value = "connectors.failed"
    )]
    sink_failed_topic: String,
    /// Compacted topic holding source positions, unless the manifest sets one.
    #[arg(
        long,
        env = "OBSRV_SINK_STATE_TOPIC",
        default_value = "connectors.state"
    )]
    sink_state_topic: String,
    /// Largest record the sink takes (bytes); larger ones go to the failed topic.
    #[arg(
        long,
        env = "OBSRV_SINK_MAX_MESSAGE_BYTES",
        default_value_t = 1_048_576,
        value_parser = clap::value_parser!(i32).range(1024..)
    )]
    sink_max_message_bytes: i32,
    /// Compression of records written to the sink.
    #[arg(long, env = "OBSRV_SINK_COMPRESSION", default_value = "zstd", value_parser = clap::builder::TypedValueParser::try_map(clap::builder::PossibleValuesParser::new(Compression::NAMES), |s| s.parse::<Compression>()))]
    sink_compression: Compression,
    /// Log format on stderr.
    #[arg(long, env = "OBSRV_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

/// Writes a line to stdout; a closed stdout (`| head`) is not an error worth a panic.
fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

struct Loaded {
    config: RuntimeConfig,
    sink: SinkSettings,
    /// Where Secret values come from; read when needed (and again after a rotation).
    secrets_dir: Option<PathBuf>,
    file_secrets: crate::manifest::FileSecrets,
    checksum: String,
    /// The operator's state file beside the config (`Running`/`Paused`), when there is one.
    state_file: Option<PathBuf>,
}

/// Reads and checks everything a run needs: the file (manifest or runtime config), the spec as
/// the operator would check it, the sink settings and every Secret value.
fn load(c: &Common) -> Result<Loaded, Error> {
    let text = std::fs::read_to_string(&c.file)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", c.file)))?;
    let manifest = crate::manifest::parse(&text, c.name.as_deref())?;
    let config = manifest.config;
    obsrv_crds::validate::validate_spec(&config.spec).map_err(|e| Error::Config(e.to_string()))?;
    let defaults = default_sink(
        c.sink_bootstrap_servers.clone(),
        c.sink_topic.clone(),
        c.sink_failed_topic.clone(),
        c.sink_state_topic.clone(),
        c.sink_max_message_bytes,
        c.sink_compression,
    );
    let sink = SinkSettings::resolve(&config.spec, &defaults)?;
    let checksum = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let state_file = std::path::Path::new(&c.file)
        .parent()
        .map(|d| d.join(obsrv_crds::runtime::STATE_FILE))
        .filter(|p| p.is_file());
    Ok(Loaded {
        config,
        sink,
        secrets_dir: c.secrets_dir.clone(),
        file_secrets: manifest.secrets,
        checksum,
        state_file,
    })
}

impl Loaded {
    fn secrets(&self) -> Result<Secrets, Error> {
        Secrets::load(
            &self.config.spec,
            self.secrets_dir.as_ref(),
            self.file_secrets.clone(),
        )
    }
}

fn init_logs(format: &str) {
    use std::io::IsTerminal;
    // librdkafka logs every failed connection attempt (a dozen lines while a broker is down); the
    // runtime's own errors name the broker and the cause once. To see librdkafka's lines:
    // RUST_LOG=info,librdkafka=debug,rdkafka::client=debug.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        "info,rdkafka=warn,rdkafka::client=off,librdkafka=off,sqlx=warn".into()
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
        Command::Run(r) => &r.common,
        Command::Check(c) => c,
        Command::Cleanup(c) => &c.common,
    };
    init_logs(&c.log_format);
    let loaded = load(c);
    match cli.command {
        Command::Run(r) => match loaded {
            Ok(l) => run_cmd(registry, r.listen, l).await,
            Err(e) => {
                eprintln!("obsrv-connector: {e}");
                ExitCode::from(2)
            }
        },
        Command::Check(_) => match loaded {
            Ok(l) => check_cmd(&registry, l).await,
            Err(e) => {
                say(format_args!("config: {} - {e}", e.reason()));
                ExitCode::from(2)
            }
        },
        Command::Cleanup(c) => {
            let l = match loaded {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("obsrv-connector: {e}");
                    return ExitCode::from(2);
                }
            };
            cleanup_cmd(&registry, l, c.delete_state).await
        }
    }
}

/// Releases what the source holds (a replication slot) through the kind's cleanup hook; kinds
/// without one hold nothing. Without `delete_state` positions stay (state topic, consumer group)
/// so a re-created connector resumes; with it (`deletionPolicy: Delete`) they are deleted too.
/// Each step prints one line (`cleanup:`, `group:`, `state:`) saying what it removed; every step
/// runs even when an earlier one failed, and any failure makes the exit status non-zero (the
/// Job retries, and every step is idempotent).
async fn cleanup_cmd(registry: &Registry, l: Loaded, delete_state: bool) -> ExitCode {
    let secrets = match l.secrets() {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cleanup: {} - {e}", e.reason()));
            return ExitCode::FAILURE;
        }
    };
    let factory = match registry.for_config(&l.config) {
        Ok(f) => f,
        Err(e) => {
            say(format_args!("cleanup: {} - {e}", e.reason()));
            return ExitCode::FAILURE;
        }
    };
    let kind = factory.kind;
    let ctx = crate::source::CleanupContext {
        config: Arc::new(l.config),
        secrets: Arc::new(secrets),
    };
    let mut ok = true;
    match factory.cleanup(ctx.clone()).await {
        Ok(done) => say(format_args!("cleanup: {done}")),
        Err(e) => {
            ok = false;
            say(format_args!("cleanup: {} - {e}", e.reason()));
        }
    }
    if !delete_state {
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match factory.delete_positions(ctx.clone()).await {
        None => {}
        Some(Ok(done)) => say(format_args!("group: {done}")),
        Some(Err(e)) => {
            ok = false;
            say(format_args!("group: {} - {e}", e.reason()));
        }
    }
    match delete_state_records(&l.sink, &ctx.secrets, &ctx.config, kind).await {
        Ok(done) => say(format_args!("state: {done}")),
        Err(e) => {
            ok = false;
            say(format_args!("state: {} - {e}", e.reason()));
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Tombstones every record of the connector in the state topic; says how many, under which keys.
async fn delete_state_records(
    sink: &SinkSettings,
    secrets: &crate::config::Secrets,
    config: &RuntimeConfig,
    kind: &str,
) -> Result<String, Error> {
    let instance = config.instance_id();
    let ctx = Context::new(&config.spec.dataset, &instance, kind);
    let sink = crate::sink::open(sink.clone(), secrets, ctx, None)?;
    let Some(store) = sink.positions(&instance, kind) else {
        return Ok("the sink keeps no positions: nothing to delete".into());
    };
    let keys = store.delete_all(&instance).await?;
    if keys.is_empty() {
        return Ok(format!(
            "no records of {instance} in topic {}: nothing to delete",
            store.topic()
        ));
    }
    Ok(format!(
        "deleted {} record(s) of {instance} from topic {} (keys: {})",
        keys.len(),
        store.topic(),
        keys.join(", ")
    ))
}

async fn run_cmd(registry: Registry, listen: SocketAddr, l: Loaded) -> ExitCode {
    let shared = Shared::new(Some(l.checksum.clone()));
    if let Err(e) = serve(listen, shared.clone()).await {
        eprintln!("obsrv-connector: cannot listen on {listen}: {e}");
        return ExitCode::from(2);
    }
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping");
        let _ = tx.send(true);
    });
    tracing::info!(connector = %l.config.instance_id(), dataset = %l.config.spec.dataset, "starting");
    let desired = crate::runner::desired_state(l.state_file.clone(), l.config.spec.state);
    let mut stop = rx;
    let mut backoff = crate::runner::Backoff::default();
    loop {
        // Read the Secrets at each start: a missing one is reported and retried (in a pod its
        // volume fills in once the Secret exists), a rotated one is read anew.
        let secrets = match l.secrets() {
            Ok(s) => s,
            Err(e) if e.is_retryable() => {
                shared.error(&e);
                tokio::select! {
                    _ = crate::runner::stopped(&mut stop) => return ExitCode::SUCCESS,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
            Err(e) => {
                eprintln!("obsrv-connector: {e}");
                return ExitCode::from(2);
            }
        };
        backoff.reset();
        let ended = run(Runtime {
            registry: registry.clone(),
            desired: desired.clone(),
            config: l.config.clone(),
            sink: l.sink.clone(),
            secrets,
            shared: shared.clone(),
            stop: stop.clone(),
        })
        .await;
        match ended {
            Ok(crate::runner::Ended::SecretsRotated) => continue,
            Ok(crate::runner::Ended::Stopped) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(reason = e.reason(), error = %e, "stopped with an error");
                return ExitCode::FAILURE;
            }
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
    say(format_args!(
        "config: ok ({} reading {kind} into dataset {})",
        l.config.instance_id(),
        l.config.spec.dataset
    ));
    let secrets = match l.secrets() {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("secrets: {} - {e}", e.reason()));
            return ExitCode::FAILURE;
        }
    };
    let sink = match crate::sink::open(l.sink.clone(), &secrets, ctx, None) {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("sink: {} - {e}", e.reason()));
            return ExitCode::FAILURE;
        }
    };
    let config = Arc::new(l.config);
    let secrets = Arc::new(secrets);
    match open_source(registry, &config, &secrets, &sink, None).await {
        Ok(s) => {
            let details = s.describe();
            if details.is_empty() {
                say(format_args!("source: ok ({kind})"));
            } else {
                say(format_args!("source: ok ({details})"));
            }
        }
        Err(e) => {
            ok = false;
            say(format_args!("source: {} - {e}", e.reason()));
        }
    }
    match sink.check().await {
        Ok(details) => say(format_args!("sink: ok ({details})")),
        Err(e) => {
            ok = false;
            say(format_args!("sink: {} - {e}", e.reason()));
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_says_what_it_does_and_every_command_shows_an_example() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_after_help()
                    .is_some_and(|h| h.to_string().starts_with("Example:")),
                "{} has no example",
                sub.get_name()
            );
            for a in sub.get_arguments() {
                assert!(
                    a.get_help().is_some(),
                    "{} --{} has no description",
                    sub.get_name(),
                    a.get_id()
                );
            }
        }
    }
}
