//! `obsrv-connector`: run a Connector's pipeline, check its source and sink, or clean up.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
use obsrv_connector::{
    config::{Secrets, SinkSettings, default_sink, parse_config},
    envelope::Context,
    error::Error,
    http::{Shared, serve},
    runner::{Runtime, open_source, run},
    sink::Sink,
};
use obsrv_crds::{
    Compression, SourceRef,
    runtime::{CONFIG_DIR, CONFIG_FILE, HTTP_PORT, LISTEN_ENV, RuntimeConfig},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

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
    /// Release what the source holds (nothing for the current sources).
    Cleanup(Common),
    /// Source -> broker benchmark against the machine's bounds: Postgres (COPY out, raw produce)
    /// or Kafka (raw consume+produce pipe).
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchSource {
    Postgres,
    Kafka,
}

#[derive(Args)]
struct BenchArgs {
    /// What to benchmark: a Postgres table or a Kafka topic relayed to the ingest topic.
    #[arg(long, value_enum, default_value = "postgres")]
    source: BenchSource,
    /// Rows (Postgres) or records (Kafka) to load.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// The connector's batchSize (rows per query; Postgres only).
    #[arg(long, default_value_t = 10_000)]
    batch_size: usize,
    /// An existing Postgres (`postgres://user:password@host:port/db`); a throwaway one otherwise.
    #[arg(long)]
    postgres_url: Option<String>,
    /// An existing broker; a throwaway nisshi otherwise.
    #[arg(long)]
    bootstrap: Option<String>,
}

#[derive(Args)]
struct Common {
    /// A Connector manifest or the operator's runtime config.
    #[arg(short = 'f', long = "file", env = "OBSRV_CONFIG", default_value_t = format!("{CONFIG_DIR}/{CONFIG_FILE}"))]
    file: String,
    /// Secret values as files `<dir>/<secretName>/<key>` (env vars take precedence).
    #[arg(long, env = "OBSRV_SECRETS_DIR")]
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let c = match &cli.command {
        Command::Run(c) | Command::Check(c) | Command::Cleanup(c) => c,
        Command::Bench(b) => {
            init_logs("text");
            let report = match b.source {
                BenchSource::Postgres => obsrv_connector::bench::run(
                    b.rows,
                    b.batch_size,
                    b.postgres_url.clone(),
                    b.bootstrap.clone(),
                )
                .await
                .map(|f| f.report()),
                BenchSource::Kafka => {
                    obsrv_connector::bench_kafka::run(b.rows, b.bootstrap.clone())
                        .await
                        .map(|f| f.report())
                }
            };
            return match report {
                Ok(r) => {
                    println!("{r}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("obsrv-connector bench: {e}");
                    ExitCode::FAILURE
                }
            };
        }
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
        Command::Run(c) => run_cmd(c, loaded).await,
        Command::Check(_) => check_cmd(loaded).await,
        Command::Bench(_) => ExitCode::SUCCESS,
        Command::Cleanup(_) => {
            // Postgres/MySQL/MariaDB keyset reads, Kafka groups and S3 listing hold nothing on the
            // source; positions stay in the state topic so a re-created connector can resume.
            let kind = loaded
                .config
                .spec
                .source
                .resolve()
                .map(|s| s.kind().to_string())
                .unwrap_or_default();
            println!("cleanup: nothing held on the {kind} source");
            ExitCode::SUCCESS
        }
    }
}

async fn run_cmd(c: Common, l: Loaded) -> ExitCode {
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn check_cmd(l: Loaded) -> ExitCode {
    let mut ok = true;
    let kind = match l.config.spec.source.resolve() {
        Ok(SourceRef::S3(_)) | Err(_) => None,
        Ok(s) => Some(s.kind()),
    };
    match open_source(&l.config, &l.secrets, None).await {
        Ok(_) => println!(
            "source: ok ({})",
            kind.map(|k| k.to_string()).unwrap_or_default()
        ),
        Err(e) => {
            ok = false;
            println!("source: {} - {e}", e.reason());
        }
    }
    let ctx = Context::new(
        &l.config.spec.dataset,
        &l.config.instance_id(),
        kind.unwrap_or(obsrv_crds::SourceKind::Postgres),
    );
    let sink = Sink::new(l.sink.clone(), &l.secrets, ctx, None);
    match sink {
        Ok(s) => match s.check().await {
            Ok(()) => println!(
                "sink: ok ({} topic {})",
                l.sink.bootstrap_servers, l.sink.topic
            ),
            Err(e) => {
                ok = false;
                println!("sink: {} - {e}", e.reason());
            }
        },
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
