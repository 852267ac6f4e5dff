//! NATS: a JetStream durable pull consumer (at least once), or core NATS subjects (at most once).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::messages::{MessageFormat, broker_secrets};
use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{CredentialsRef, DURATION_RULE, Tls};
use crate::runtime::SecretEnv;

pub static NATS: SourceKind = SourceKind {
    name: "nats",
    category: Category::Stream,
    // Replicas pull from one durable consumer (JetStream) or share a queue group (core).
    parallelism: Parallelism::Unbounded,
    default_poll_interval: "100ms",
    spec: |s| s.nats.as_ref().map(|s| s as &dyn KindSpec),
};

/// How messages are read.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NatsMode {
    /// A durable pull consumer on `stream`: each message is acknowledged once the sink has its
    /// record, and redelivered after `ackWait` when it was not (at least once).
    #[default]
    JetStream,
    /// A plain subscription to `subject` in a queue group: AT MOST ONCE. Messages published while
    /// no replica is connected, and those in flight when a replica crashes, are lost.
    Core,
}

/// Where a consumer created by the connector starts.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NatsDeliver {
    /// Every message the stream holds.
    #[default]
    All,
    /// Only messages published after the consumer is created.
    New,
}

/// NATS: a JetStream stream read through a durable pull consumer (at least once), or core NATS
/// subjects (`mode: core`, at most once). Replicas share the consumer (or queue group).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.mode) && self.mode == 'core' ? has(self.subject) : has(self.stream)").message("nats needs `stream` (mode jetStream) or `subject` (mode core)"))]
pub struct NatsSourceSpec {
    /// Server URLs (`nats://host:4222`, `tls://host:4222`); the client fails over among them.
    #[x_kube(validation = Rule::new("self.size() > 0").message("servers must list at least one URL"))]
    pub servers: Vec<String>,
    #[serde(default)]
    pub mode: NatsMode,
    /// The JetStream stream (mode jetStream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The durable consumer (mode jetStream), created as an explicit-ack pull consumer when it
    /// does not exist; also the queue group (mode core). Default `obsrv-<namespace>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Subject filter (`orders.>`). Mode jetStream: the filter of a created consumer (every
    /// subject of the stream when absent); an existing consumer must have the same filter.
    /// Mode core: the subject subscribed to (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Where a consumer created by the connector starts: `all` (default) or `new`.
    #[serde(default)]
    pub deliver: NatsDeliver,
    /// How long the server waits for an acknowledgement before redelivering (a consumer created
    /// by the connector). A crashed replica's messages come again after this long.
    #[serde(default = "default_ack_wait")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("ackWait must be a duration such as 30s"))]
    pub ack_wait: String,
    /// Messages a replica holds unacknowledged (its pull batch), 1..100000; default 10000.
    /// Memory is about prefetch x message size; a small window limits the rate, as a message is
    /// acknowledged only once the ingest topic has it.
    #[serde(default = "default_prefetch")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("prefetch must be between 1 and 100000"))]
    pub prefetch: i32,
    /// User and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsRef>,
    /// Any mode but `disable` requires TLS; `verify-full` also checks the server's certificate
    /// and name (against `ca`, or the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(flatten)]
    pub format: MessageFormat,
}

fn default_ack_wait() -> String {
    "30s".into()
}

fn default_prefetch() -> i32 {
    super::messages::DEFAULT_PREFETCH
}

impl KindSpec for NatsSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        broker_secrets(out, self.credentials.as_ref(), self.tls.as_ref());
    }

    fn validate(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("servers must list at least one URL".into());
        }
        if let Some(i) = self.servers.iter().position(|s| s.trim().is_empty()) {
            return Err(format!("servers[{i}] must not be empty"));
        }
        let empty = |o: &Option<String>| o.as_deref().is_none_or(|s| s.trim().is_empty());
        match self.mode {
            NatsMode::JetStream if empty(&self.stream) => {
                return Err("stream must name a JetStream stream (mode jetStream)".into());
            }
            NatsMode::Core if empty(&self.subject) => {
                return Err("subject must name the subject to subscribe to (mode core)".into());
            }
            _ => {}
        }
        if !(1..=100_000).contains(&self.prefetch) {
            return Err("prefetch must be between 1 and 100000".into());
        }
        Ok(())
    }
}
