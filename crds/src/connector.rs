//! `Connector` spec: what users write.
//!
//! The source is one typed field per kind of [`SourceSpec`] (see [`crate::source`]); a CEL rule built
//! from the kind registry requires exactly one to be set.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::source::SourceSpec;
use crate::status::ConnectorStatus;

/// Go-style duration: one or more `<number><unit>` groups, units ns, us, ms, s, m, h.
pub const DURATION_RULE: &str = "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')";

/// A Connector pulls data from one source into one Obsrv dataset.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "obsrv.io",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    shortname = "conn",
    category = "obsrv",
    status = "ConnectorStatus",
    derive = "PartialEq",
    doc = "A Connector pulls data from one source (a database, stream or object store) into an Obsrv dataset.",
    scale(
        spec_replicas_path = ".spec.scaling.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Dataset", type_ = "string", json_path = ".spec.dataset"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceKind"),
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicasSummary"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag.records"),
    printcolumn(
        name = "LagSeconds",
        type_ = "number",
        json_path = ".status.lag.seconds",
        priority = 1
    ),
    printcolumn(
        name = "LagBytes",
        type_ = "integer",
        json_path = ".status.lag.bytes",
        priority = 1
    ),
    printcolumn(
        name = "Records",
        type_ = "integer",
        json_path = ".status.totals.recordsIngested",
        priority = 1
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.image) && has(self.source.custom))").message("spec.image overrides the shared image of a built-in source kind; a custom source names its image in spec.source.custom.image"))]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// Obsrv dataset id the records feed. Immutable.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.dataset must not be empty"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.dataset is immutable: create a new Connector to feed another dataset"))]
    pub dataset: String,
    /// Running reads; Paused keeps pods but stops reading; Stopped scales to zero.
    #[serde(default)]
    pub state: DesiredState,
    /// Where the data comes from: exactly one kind.
    pub source: SourceSpec,
    /// Where records go. Fields left out take the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkSpec>,
    /// Delivery guarantee towards the ingest topic. `atLeastOnce` (default): positions are
    /// committed once the sink acknowledged every record before them; after a crash the records
    /// since the last commit come again, with the same event ids. `exactlyOnce`: records and the
    /// position go out together in Kafka transactions (each committed after at most 250 ms or
    /// 32 MiB), so read_committed consumers see every record once, even across kill -9; they see
    /// a record only when its transaction commits.
    #[serde(default)]
    pub delivery: Delivery,
    /// Fixed replicas or lag-driven autoscaling.
    #[serde(default)]
    pub scaling: Scaling,
    /// For batch sources: when to run. Without it the connector polls continuously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Runs this image instead of the operator's shared connector image (a build of your own,
    /// on the obsrv-connector SDK). A custom source names its image in `source.custom.image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pod-level overrides for this connector's Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodOverrides>,
    /// What deleting the Connector does with the positions it keeps outside the cluster. Retain
    /// (default) keeps them: its records in the state topic and its Kafka source's consumer group
    /// offsets stay, so a Connector re-created with the same name resumes where this one stopped.
    /// Delete removes them before the Connector goes (a cleanup Job), so a re-created Connector
    /// reads everything again from the start. A CDC replication slot is dropped either way.
    #[serde(default, skip_serializing_if = "DeletionPolicy::is_retain")]
    #[schemars(extend("default" = "Retain"))]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a Connector does with its positions (`spec.deletionPolicy`).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Keep the state records and consumer group offsets.
    #[default]
    Retain,
    /// Remove the state records and consumer group offsets.
    Delete,
}

impl DeletionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionPolicy::Retain => "Retain",
            DeletionPolicy::Delete => "Delete",
        }
    }

    /// Retain, the default: left out of serialized specs, so the runtime config of a Connector
    /// written before the field existed stays byte-identical (no pod roll on upgrade).
    pub fn is_retain(&self) -> bool {
        *self == DeletionPolicy::Retain
    }
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DesiredState {
    #[default]
    Running,
    Paused,
    Stopped,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "Running",
            DesiredState::Paused => "Paused",
            DesiredState::Stopped => "Stopped",
        }
    }

    /// Parses `Running`, `Paused` or `Stopped` (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<DesiredState> {
        [
            DesiredState::Running,
            DesiredState::Paused,
            DesiredState::Stopped,
        ]
        .into_iter()
        .find(|d| d.as_str() == s.trim())
    }
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// A reference to a username/password pair in a Secret of the Connector's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsRef {
    pub secret_name: String,
    #[serde(default = "default_username_key")]
    pub username_key: String,
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// A reference to one key of a Secret in the Connector's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub secret_name: String,
    pub key: String,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM CA bundle used to verify the server (verify-full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretKeyRef>,
}

pub fn default_poll_interval() -> String {
    "30s".into()
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka's `sasl.mechanism` expects.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sasl {
    #[serde(default)]
    pub mechanism: SaslMechanism,
    pub credentials: CredentialsRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SinkSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSinkSpec>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    #[default]
    Zstd,
}

impl Compression {
    /// Every value, as written in specs and flags.
    pub const NAMES: [&'static str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "unknown compression {s:?}: one of {}",
                Compression::NAMES.join(", ")
            )
        })
    }
}

/// The Kafka cluster Obsrv ingests from. Every field is optional in a Connector: what is left out
/// comes from the operator's defaults (see [`KafkaSinkSpec::merged_over`]).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSinkSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    /// Obsrv's ingest topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Where records that cannot be ingested go, with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_topic: Option<String>,
    /// Compacted topic holding source positions (not used by Kafka sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1024").message("maxMessageBytes must be at least 1024"))]
    pub max_message_bytes: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger_ms: Option<i32>,
    /// Producer batch size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_bytes: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<Sasl>,
}

impl KafkaSinkSpec {
    /// `self`'s fields where set, `defaults`' otherwise.
    pub fn merged_over(&self, defaults: &KafkaSinkSpec) -> KafkaSinkSpec {
        KafkaSinkSpec {
            bootstrap_servers: self
                .bootstrap_servers
                .clone()
                .or_else(|| defaults.bootstrap_servers.clone()),
            topic: self.topic.clone().or_else(|| defaults.topic.clone()),
            failed_topic: self
                .failed_topic
                .clone()
                .or_else(|| defaults.failed_topic.clone()),
            state_topic: self
                .state_topic
                .clone()
                .or_else(|| defaults.state_topic.clone()),
            max_message_bytes: self.max_message_bytes.or(defaults.max_message_bytes),
            compression: self.compression.or(defaults.compression),
            linger_ms: self.linger_ms.or(defaults.linger_ms),
            batch_bytes: self.batch_bytes.or(defaults.batch_bytes),
            tls: self.tls.clone().or_else(|| defaults.tls.clone()),
            sasl: self.sasl.clone().or_else(|| defaults.sasl.clone()),
        }
    }
}

/// Replicas: fixed (`replicas`, also written through `/scale`) or driven by lag (`autoscale`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscale.minReplicas must not exceed autoscale.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct Autoscale {
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscale.minReplicas must be at least 1"))]
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// Lag (records) one replica is expected to absorb; desired = ceil(lag / target).
    #[serde(default = "default_target_lag")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscale.targetLagRecords must be at least 1"))]
    pub target_lag_records: i64,
    /// How long the lag must stay low before scaling down (Go duration).
    #[serde(default = "default_scale_down_delay")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("scaleDownDelay must be a duration such as 5m"))]
    pub scale_down_delay: String,
}

fn one() -> i32 {
    1
}
fn default_target_lag() -> i64 {
    10_000
}
fn default_scale_down_delay() -> String {
    "5m".into()
}

/// When a batch source runs: a cron expression or once.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.cron) != (has(self.once) && self.once)").message("schedule must set either cron or once: true"))]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Standard 5-field cron expression in UTC (e.g. `0 * * * *`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.split(' ').size() == 5").message("schedule.cron must have 5 fields (minute hour day month weekday)"))]
    pub cron: Option<String>,
    /// Read everything once, then idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once: Option<bool>,
}

/// Pod-level overrides for a connector's Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra environment (e.g. `RUST_LOG`); may use `valueFrom.secretKeyRef`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

impl Connector {
    /// `<namespace>/<name>`: the connector instance id used in envelopes and state keys.
    pub fn instance_id(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}
