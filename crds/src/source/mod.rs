//! Source kinds as components. Each kind is one module holding its typed spec (the CRD field) and
//! its [`SourceKind`] descriptor: category, parallelism rule, default poll interval, the Secret
//! values it reads, its checks and whether deleting it needs a cleanup. [`SOURCE_KINDS`] lists
//! them; everything else (the operator, the runtime's registry, the CRD's "exactly one" rule) asks
//! the registry instead of matching on a kind.
//!
//! Adding a kind: a module here with its spec type and descriptor, a field on [`SourceSpec`], one line
//! in [`SOURCE_KINDS`] (see `docs/adding-a-source.md`).

pub mod cdc;
pub mod custom;
pub mod kafka;
pub mod messages;
pub mod mqtt;
pub mod nats;
pub mod object;
pub mod rabbitmq;
pub mod sql;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::runtime::SecretEnv;

pub use cdc::{BinlogCdcSourceSpec, PostgresCdcSourceSpec, SnapshotMode};
pub use custom::{CustomSourceSpec, SECRETS_DIR, SecretMount};
pub use kafka::{KafkaSourceSpec, OffsetReset};
pub use messages::{MessageFormat, NonJson};
pub use mqtt::MqttSourceSpec;
pub use nats::{NatsDeliver, NatsMode, NatsSourceSpec};
pub use object::{
    AzureAuth, AzureBlobSourceSpec, AzureCredentials, CsvOptions, GcsCredentials, GcsSourceSpec,
    ObjectCompression, ObjectFormat, ObjectSelection, S3Credentials, S3SourceSpec,
};
pub use rabbitmq::{RabbitmqBinding, RabbitmqSourceSpec};
pub use sql::{CursorSpec, SqlSourceSpec, TableSpec};

/// The source of a Connector. Exactly one field is set (a CEL rule built from [`SOURCE_KINDS`]
/// says so in the CRD).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Postgres tables read incrementally by a cursor column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SqlSourceSpec>,
    /// MySQL tables read incrementally by a cursor column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<SqlSourceSpec>,
    /// MariaDB tables read incrementally by a cursor column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mariadb: Option<SqlSourceSpec>,
    /// Kafka topics consumed with a consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSourceSpec>,
    /// Objects in an S3-compatible bucket (AWS S3, MinIO, ...): JSON, JSON lines, CSV or
    /// Parquet, optionally gzip/zstd/snappy-compressed. Processed objects are tracked in state;
    /// nothing is ever written to the source bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3SourceSpec>,
    /// Blobs in an Azure Blob Storage container, read like `s3` objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_blob: Option<AzureBlobSourceSpec>,
    /// Objects in a Google Cloud Storage bucket, read like `s3` objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<GcsSourceSpec>,
    /// Every change of Postgres tables as it commits (logical replication, `pgoutput`), after
    /// an initial snapshot that resumes where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_cdc: Option<PostgresCdcSourceSpec>,
    /// Every change of MySQL tables as it commits (the binary log, GTID positions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_cdc: Option<BinlogCdcSourceSpec>,
    /// Every change of MariaDB tables as it commits (the binary log, MariaDB GTID positions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mariadb_cdc: Option<BinlogCdcSourceSpec>,
    /// A RabbitMQ queue (AMQP 0-9-1), shared by replicas as competing consumers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitmqSourceSpec>,
    /// NATS: a JetStream durable pull consumer (at least once), or core subjects (at most once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSourceSpec>,
    /// MQTT 5 topics with QoS 1 in a persistent session; shared subscriptions to scale out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSourceSpec>,
    /// Your own connector image (built on the obsrv-connector SDK, or any image that keeps the
    /// contract in docs/custom-connectors.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomSourceSpec>,
}

/// What kind of place a source reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Database,
    Stream,
    File,
    Application,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Database => "database",
            Category::Stream => "stream",
            Category::File => "file",
            Category::Application => "application",
        }
    }
}

/// How many replicas can read a source at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallelism {
    /// One reader (a table cursor, a change stream): the operator runs one replica and never a
    /// second beside it, not even during a rollout.
    Single,
    /// As many as the source has partitions; the running connector reports how many.
    Partitions,
    /// At most this many (stated in the spec).
    AtMost(i32),
    /// Any number: replicas share the work.
    Unbounded,
}

impl Parallelism {
    /// The most replicas that can share the work, when known from the spec alone.
    pub fn limit(self) -> Option<i32> {
        match self {
            Parallelism::Single => Some(1),
            Parallelism::AtMost(n) => Some(n.max(1)),
            Parallelism::Partitions | Parallelism::Unbounded => None,
        }
    }
}

/// The typed spec of one source kind: what the operator and the runtime need from it without
/// knowing which kind it is.
pub trait KindSpec: std::fmt::Debug + Send + Sync {
    /// Every Secret value this source reads, and the environment variable that carries it.
    fn secrets(&self, _out: &mut Vec<SecretEnv>) {}

    /// Names of whole Secrets mounted as files (custom connectors), beside [`KindSpec::secrets`].
    fn mounted_secrets(&self) -> Vec<String> {
        Vec::new()
    }

    /// Checks the schema cannot express. Errors name the field below `spec.source.<kind>`
    /// (e.g. `tables[0].cursor.column must not be empty`).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// How long to wait between polls once caught up (a Go duration), when the spec says.
    fn poll_interval(&self) -> Option<&str> {
        None
    }

    /// The kind's parallelism, when the spec refines it (custom connectors' `maxParallelism`).
    fn parallelism(&self) -> Option<Parallelism> {
        None
    }

    /// The image this source runs in, when not the shared connector image (custom connectors).
    fn image(&self) -> Option<&str> {
        None
    }

    /// Whether that image lacks the runtime, which the operator then copies into the pod (a
    /// marketplace connector: an Airbyte source or a Singer tap driven by `obsrv-connector`).
    fn injects_runtime(&self) -> bool {
        false
    }

    /// Whether deleting the Connector must first release something held on the source side
    /// (a replication slot), through a cleanup Job of the connector image.
    fn needs_cleanup(&self) -> bool {
        false
    }
}

/// A source kind: its name (the field of [`SourceSpec`], the `obsrv.io/source` label, the envelope's
/// `obsrv_meta.source.connector`) and what is the same for every spec of the kind.
pub struct SourceKind {
    pub name: &'static str,
    pub category: Category,
    pub parallelism: Parallelism,
    /// Used when the spec sets no poll interval.
    pub default_poll_interval: &'static str,
    /// The kind's field of a [`SourceSpec`].
    pub spec: fn(&SourceSpec) -> Option<&dyn KindSpec>,
}

impl std::fmt::Debug for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for SourceKind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every source kind, once.
pub static SOURCE_KINDS: &[&SourceKind] = &[
    &sql::POSTGRES,
    &sql::MYSQL,
    &sql::MARIADB,
    &kafka::KAFKA,
    &object::S3,
    &object::AZURE_BLOB,
    &object::GCS,
    &rabbitmq::RABBITMQ,
    &nats::NATS,
    &mqtt::MQTT,
    &custom::CUSTOM,
    &cdc::POSTGRES_CDC,
    &cdc::MYSQL_CDC,
    &cdc::MARIADB_CDC,
];

/// The kind named `name`.
pub fn source_kind(name: &str) -> Option<&'static SourceKind> {
    SOURCE_KINDS.iter().copied().find(|k| k.name == name)
}

/// The names of every kind, for messages: `postgres, mysql, ...`.
pub fn kind_names() -> String {
    SOURCE_KINDS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CEL rule on `spec.source`: exactly one kind is set.
pub fn exactly_one_rule() -> (String, String) {
    let has: Vec<String> = SOURCE_KINDS
        .iter()
        .map(|k| format!("has(self.{})", k.name))
        .collect();
    (
        format!("[{}].filter(x, x).size() == 1", has.join(", ")),
        format!(
            "spec.source must set exactly one source kind ({})",
            kind_names()
        ),
    )
}

/// A source resolved to its one kind.
#[derive(Clone, Copy, Debug)]
pub struct ResolvedSource<'a> {
    pub kind: &'static SourceKind,
    pub spec: &'a dyn KindSpec,
}

impl ResolvedSource<'_> {
    /// The parallelism of this spec: the kind's rule, refined by the spec.
    pub fn parallelism(&self) -> Parallelism {
        self.spec.parallelism().unwrap_or(self.kind.parallelism)
    }

    /// The poll interval of this spec (a Go duration).
    pub fn poll_interval(&self) -> &str {
        self.spec
            .poll_interval()
            .unwrap_or(self.kind.default_poll_interval)
    }
}

/// Why a [`SourceSpec`] does not name exactly one kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("spec.source sets no source kind: set one of {0}")]
    None(String),
    #[error("spec.source sets {0} source kinds ({1}): set exactly one")]
    Several(usize, String),
}

impl SourceSpec {
    /// The one configured source, or why there is not exactly one.
    pub fn resolve(&self) -> Result<ResolvedSource<'_>, SourceError> {
        let found: Vec<ResolvedSource<'_>> = SOURCE_KINDS
            .iter()
            .filter_map(|kind| (kind.spec)(self).map(|spec| ResolvedSource { kind, spec }))
            .collect();
        match found.as_slice() {
            [] => Err(SourceError::None(kind_names())),
            [one] => Ok(*one),
            several => Err(SourceError::Several(
                several.len(),
                several
                    .iter()
                    .map(|s| s.kind.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_and_is_a_field_of_source() {
        let mut names: Vec<&str> = SOURCE_KINDS.iter().map(|k| k.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a kind is listed twice: {names:?}");
        // The schema's properties are the serde field names: one per kind, and no other.
        let schema = serde_json::to_value(schemars::schema_for!(SourceSpec)).unwrap();
        let mut fields: Vec<String> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        fields.sort();
        assert_eq!(fields, names, "SourceSpec's fields and SOURCE_KINDS differ");
    }

    #[test]
    fn each_kind_reads_its_own_field() {
        for kind in SOURCE_KINDS {
            let one: SourceSpec =
                serde_json::from_value(serde_json::json!({ kind.name: example(kind.name) }))
                    .unwrap_or_else(|e| panic!("{}: {e}", kind.name));
            let r = one.resolve().unwrap();
            assert_eq!(r.kind.name, kind.name);
        }
    }

    fn example(kind: &str) -> serde_json::Value {
        match kind {
            "postgres" | "mysql" | "mariadb" => serde_json::json!({
                "host": "h", "database": "d", "credentials": {"secretName": "s"},
                "tables": [{"name": "t", "cursor": {"column": "c"}}]}),
            "kafka" => serde_json::json!({"bootstrapServers": "b:9092", "topics": ["t"]}),
            "s3" | "gcs" => serde_json::json!({"bucket": "b", "format": "json"}),
            "azureBlob" => serde_json::json!({"account": "a", "container": "c", "format": "csv"}),
            "custom" => serde_json::json!({"image": "registry.example/mine:1"}),
            "postgresCdc" | "mysqlCdc" | "mariadbCdc" => serde_json::json!({
                "host": "h", "database": "d", "credentials": {"secretName": "s"},
                "tables": ["public.t"]}),
            "rabbitmq" => serde_json::json!({"host": "h", "queue": "q"}),
            "nats" => serde_json::json!({"servers": ["nats://h:4222"], "stream": "s"}),
            "mqtt" => serde_json::json!({"host": "h", "topics": ["t/#"]}),
            other => panic!("add an example spec for the new kind {other}"),
        }
    }

    #[test]
    fn none_or_several_kinds_are_refused_by_name() {
        let e = SourceSpec::default().resolve().unwrap_err();
        assert!(e.to_string().contains("postgres, mysql"), "{e}");
        let two: SourceSpec = serde_json::from_value(serde_json::json!({
            "kafka": example("kafka"), "s3": example("s3")}))
        .unwrap();
        assert_eq!(
            two.resolve().unwrap_err(),
            SourceError::Several(2, "kafka, s3".into())
        );
    }
}
