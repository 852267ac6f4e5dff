//! Operator configuration: flags, each also an environment variable (set by the Helm chart).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use obsrv_crds::{Compression, KafkaSinkSpec};

/// Default connector image: the one released with this operator.
pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/obsrv/obsrv-connector:", env!("CARGO_PKG_VERSION"));

#[derive(Parser, Debug, Clone)]
#[command(
    name = "obsrv-operator",
    version,
    about = "Runs Obsrv Connectors on Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the controller (the default).
    #[command(
        after_help = "Example:\n  obsrv-operator run --sink-bootstrap-servers kafka.obsrv.svc:9092 --namespaces shop,web"
    )]
    Run,
    /// Print every API verb and resource the operator uses, as JSON policy rules.
    #[command(after_help = "Example:\n  obsrv-operator print-rbac | jq '.[].resources'")]
    PrintRbac,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Connector image every Connector runs unless it sets spec.image or is a custom source.
    #[arg(long, env = "OBSRV_CONNECTOR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub connector_image: String,
    /// Kafka bootstrap servers of Obsrv's ingest cluster, for Connectors that set no
    /// spec.sink.kafka.bootstrapServers (without it, such Connectors report NoSinkBootstrap).
    #[arg(long, env = "OBSRV_SINK_BOOTSTRAP_SERVERS")]
    pub sink_bootstrap_servers: Option<String>,
    /// Ingest topic, unless a Connector sets spec.sink.kafka.topic.
    #[arg(long, env = "OBSRV_SINK_TOPIC", default_value = "ingest")]
    pub sink_topic: String,
    /// Topic of records that cannot be ingested, unless a Connector sets one.
    #[arg(
        long,
        env = "OBSRV_SINK_FAILED_TOPIC",
        default_value = "connectors.failed"
    )]
    pub sink_failed_topic: String,
    /// Compacted topic of source positions, unless a Connector sets one.
    #[arg(
        long,
        env = "OBSRV_SINK_STATE_TOPIC",
        default_value = "connectors.state"
    )]
    pub sink_state_topic: String,
    /// Largest record the sink takes (bytes); larger ones go to the failed topic.
    #[arg(
        long,
        env = "OBSRV_SINK_MAX_MESSAGE_BYTES",
        default_value_t = 1_048_576,
        value_parser = clap::value_parser!(i32).range(1024..)
    )]
    pub sink_max_message_bytes: i32,
    /// Compression of records written to the sink.
    #[arg(long, env = "OBSRV_SINK_COMPRESSION", default_value = "zstd", value_parser = clap::builder::TypedValueParser::try_map(clap::builder::PossibleValuesParser::new(Compression::NAMES), |s| s.parse::<Compression>()))]
    pub sink_compression: Compression,
    /// Namespaces to watch, comma-separated; all when empty.
    #[arg(
        long,
        env = "OBSRV_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub namespaces: Vec<String>,
    /// How often connector pods' /status is polled (Go-style duration).
    #[arg(long, env = "OBSRV_STATUS_POLL_INTERVAL", default_value = "15s", value_parser = parse_duration_arg)]
    pub status_poll_interval: Duration,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "OBSRV_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    pub admin_addr: SocketAddr,
    /// Elect a leader on a coordination.k8s.io Lease, so several operator replicas can run (only
    /// the leader writes).
    #[arg(long, env = "OBSRV_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "OBSRV_LEASE_NAME", default_value = "obsrv-operator")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease (default: the pod's namespace, POD_NAMESPACE).
    #[arg(long, env = "OBSRV_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "OBSRV_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Longest a cleanup Job may run before the finalizer gives up and reports it.
    #[arg(long, env = "OBSRV_CLEANUP_TIMEOUT", default_value = "5m", value_parser = parse_duration_arg)]
    pub cleanup_timeout: Duration,
}

impl Config {
    /// The sink settings a Connector's `spec.sink.kafka` is merged over.
    pub fn sink_defaults(&self) -> KafkaSinkSpec {
        KafkaSinkSpec {
            bootstrap_servers: self
                .sink_bootstrap_servers
                .clone()
                .filter(|s| !s.is_empty()),
            topic: Some(self.sink_topic.clone()),
            failed_topic: Some(self.sink_failed_topic.clone()),
            state_topic: Some(self.sink_state_topic.clone()),
            max_message_bytes: Some(self.sink_max_message_bytes),
            compression: Some(self.sink_compression),
            ..KafkaSinkSpec::default()
        }
    }

    /// Watched namespaces; empty means all.
    pub fn watched_namespaces(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Namespace of the leader-election Lease.
    pub fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into())
    }

    /// A configuration with every default, for tests and embedding.
    pub fn defaults() -> Config {
        Cli::parse_from(["obsrv-operator"]).config
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::validate::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_says_what_it_does_and_every_command_shows_an_example() {
        use clap::CommandFactory;
        let cli = Cli::command();
        cli.clone().debug_assert();
        for a in cli.get_arguments() {
            assert!(
                a.get_help().is_some(),
                "--{} has no description",
                a.get_id()
            );
        }
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_after_help()
                    .is_some_and(|h| h.to_string().starts_with("Example:")),
                "{} has no example",
                sub.get_name()
            );
        }
    }

    #[test]
    fn flags_parse_as_the_chart_sets_them() {
        let cli = Cli::try_parse_from([
            "obsrv-operator",
            "--connector-image=img:1",
            "--sink-bootstrap-servers=kafka:9092",
            "--sink-compression=lz4",
            "--namespaces=a, b,,c",
            "--status-poll-interval=30s",
            "--admin-addr=127.0.0.1:9000",
            "--leader-election=true",
            "--lease-namespace=ops",
            "--log-format=text",
            "--cleanup-timeout=2m",
        ])
        .expect("flags parse");
        let c = cli.config;
        assert_eq!(c.connector_image, "img:1");
        assert_eq!(c.watched_namespaces(), vec!["a", "b", "c"]);
        assert_eq!(c.status_poll_interval, Duration::from_secs(30));
        assert!(c.leader_election);
        assert_eq!(c.lease_namespace(), "ops");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.cleanup_timeout, Duration::from_secs(120));
        let sink = c.sink_defaults();
        assert_eq!(sink.bootstrap_servers.as_deref(), Some("kafka:9092"));
        assert_eq!(sink.compression, Some(Compression::Lz4));
        assert_eq!(sink.topic.as_deref(), Some("ingest"));
        assert!(Cli::try_parse_from(["obsrv-operator", "--status-poll-interval=soon"]).is_err());
        assert!(Cli::try_parse_from(["obsrv-operator", "--sink-compression=brotli"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["obsrv-operator", "print-rbac"]).map(|c| c.command),
            Ok(Some(Command::PrintRbac))
        ));
    }
}
