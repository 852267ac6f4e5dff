//! The connector's throughput and memory against this machine's bounds, one source at a time:
//!
//! ```sh
//! cargo bench -p obsrv-connector --bench connector -- --source postgres --rows 1000000
//! cargo bench -p obsrv-connector --bench connector -- --source postgres --shape events --delivery exactly-once --runs 5
//! cargo bench -p obsrv-connector --bench connector -- --source postgres-cdc --rows 1000000
//! cargo bench -p obsrv-connector --bench connector -- --source mariadb-cdc --rows 1000000
//! cargo bench -p obsrv-connector --bench connector -- --source kafka --rows 500000
//! cargo bench -p obsrv-connector --bench connector -- --source rabbitmq --rows 200000  # also nats, mqtt
//! cargo bench -p obsrv-connector --bench connector -- --source airbyte --rows 100000
//! ```
//!
//! Each source's bench measures the fastest known way to move the same records (its bound) and
//! the release `obsrv-connector` binary doing it as its own process, in the same run, and prints
//! both with their ratio and the connector's peak resident memory. Services come from the test
//! support (`obsrv_e2e::services`): a throwaway broker (or `--bootstrap` / `KAFKA_BOOTSTRAP`), and
//! whatever the source needs (Postgres, or `--postgres-url` / `POSTGRES_URL`).
//!
//! Adding a source: a module here with a `pub const BENCH: SourceBench` and one line in
//! [`SOURCES`]. The module gets a [`Bench`] (options, the sink the connector writes to) and uses
//! [`connector`] (spawn the connector on a manifest, `/status`, peak RSS, CPU) and [`broker`]
//! (topics, raw produce and consume) for what every bench needs.

pub mod broker;
pub mod cdc;
pub mod connector;
pub mod kafka;
pub mod mariadb_cdc;
pub mod marketplace;
pub mod postgres;
pub mod postgres_cdc;
pub mod streams;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, builder::PossibleValuesParser};
use futures::future::LocalBoxFuture;
use obsrv_connector::config::SinkSettings;
use obsrv_crds::Delivery;
use obsrv_e2e::services::Broker;

/// Every benchmarked source, by its `--source` name.
pub static SOURCES: &[SourceBench] = &[
    postgres::BENCH,
    postgres_cdc::BENCH,
    mariadb_cdc::BENCH,
    kafka::BENCH,
    streams::RABBITMQ,
    streams::NATS,
    streams::MQTT,
    marketplace::BENCH,
];

/// One source's bench.
pub struct SourceBench {
    /// Its `--source` value (the source kind's name).
    pub name: &'static str,
    /// Runs it and returns the report to print.
    pub run: fn(&Bench) -> LocalBoxFuture<'_, Result<String>>,
}

/// What a source's bench gets.
pub struct Bench {
    /// Rows (or records, messages, objects' rows) to move.
    pub rows: usize,
    /// The connector's batchSize, where the source has one.
    pub batch_size: usize,
    /// Table shapes to load (Postgres).
    pub shapes: Vec<String>,
    /// The deliveries to run the connector with (Postgres, Kafka).
    pub deliveries: Vec<Delivery>,
    /// How many times to measure everything (the report gives medians).
    pub runs: usize,
    /// An existing Postgres to use as it is; otherwise one from the test support.
    pub postgres_url: Option<String>,
    /// The connector's sink: the broker and the ingest, failed and state topics (the ingest topic
    /// exists). Raw-produce bounds use the same settings, so both produce alike.
    pub sink: SinkSettings,
    /// Unique to this run (topic, group and Connector names).
    pub id: u32,
}

impl Bench {
    /// `bench-<what>-<id>`: a topic, group or Connector name of this run.
    pub fn name(&self, what: &str) -> String {
        format!("bench-{what}-{}", self.id)
    }
}

/// A source -> ingest topic run of the connector against the machine's bound for the same work
/// (`cargo bench -p obsrv-connector --bench connector -- --source <name> ...`).
#[derive(Parser, Debug)]
#[command(name = "connector bench")]
pub struct Args {
    /// The source to benchmark.
    #[arg(long, default_value = "postgres", value_parser = PossibleValuesParser::new(SOURCES.iter().map(|s| s.name)))]
    pub source: String,
    /// Rows (Postgres) or records (Kafka) to load.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// The connector's batchSize (rows per query; Postgres only). The CRD's default.
    #[arg(long, default_value_t = 5_000)]
    pub batch_size: usize,
    /// Table shapes (Postgres): `orders` (7 columns, a small jsonb) and `events` (6 columns, a
    /// ~200-byte jsonb payload).
    #[arg(long, value_delimiter = ',', default_value = "orders,events", value_parser = PossibleValuesParser::new(["orders", "events"]))]
    pub shape: Vec<String>,
    /// Deliveries to run the connector with (Postgres, Kafka).
    #[arg(long, value_delimiter = ',', default_value = "at-least-once,exactly-once", value_parser = PossibleValuesParser::new(["at-least-once", "exactly-once"]))]
    pub delivery: Vec<String>,
    /// How many times to measure the bounds and the connector; the report gives the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub runs: u16,
    /// An existing Postgres (`postgres://user:password@host:port/db`); a throwaway one otherwise.
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// An existing broker; a throwaway nisshi otherwise.
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// Passed by `cargo bench`; nothing to do with it.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// A delivery as the manifest spells it.
pub fn delivery_name(d: Delivery) -> &'static str {
    match d {
        Delivery::AtLeastOnce => "atLeastOnce",
        Delivery::ExactlyOnce => "exactlyOnce",
    }
}

/// Runs the bench `args` names: starts the broker unless one is given, creates the ingest topic
/// and hands over to the source. Returns the report.
pub async fn run(args: Args) -> Result<String> {
    let source = SOURCES
        .iter()
        .find(|s| s.name == args.source)
        .expect("clap checked --source");
    let (_broker, bootstrap) = match args.bootstrap {
        Some(b) => (None, b),
        None => {
            let b = Broker::start().await?;
            let bootstrap = b.bootstrap().to_string();
            (Some(b), bootstrap)
        }
    };
    let id = std::process::id();
    let mut bench = Bench {
        rows: args.rows,
        batch_size: args.batch_size,
        shapes: args.shape,
        deliveries: args
            .delivery
            .iter()
            .map(|d| match d.as_str() {
                "exactly-once" => Delivery::ExactlyOnce,
                _ => Delivery::AtLeastOnce,
            })
            .collect(),
        runs: args.runs.into(),
        postgres_url: args.postgres_url,
        sink: broker::sink_settings(&bootstrap),
        id,
    };
    bench.sink.topic = bench.name("ingest");
    bench.sink.failed_topic = bench.name("failed");
    bench.sink.state_topic = bench.name("state");
    broker::create_topics(&bench.sink, &[(&bench.sink.topic, 1)]).await?;
    (source.run)(&bench).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("connector bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
