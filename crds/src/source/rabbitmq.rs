//! RabbitMQ (AMQP 0-9-1): a queue read by competing consumers, each message acknowledged once the
//! sink has its record.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::messages::{MessageFormat, broker_secrets};
use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{CredentialsRef, Tls};
use crate::runtime::SecretEnv;

pub static RABBITMQ: SourceKind = SourceKind {
    name: "rabbitmq",
    category: Category::Stream,
    // Replicas are competing consumers of one queue.
    parallelism: Parallelism::Unbounded,
    default_poll_interval: "100ms",
    spec: |s| s.rabbitmq.as_ref().map(|s| s as &dyn KindSpec),
};

/// A RabbitMQ queue (AMQP 0-9-1). Each message is acknowledged to the broker only after the sink
/// has its record; unacknowledged messages go back to the queue when a replica stops or crashes.
/// Replicas share the queue as competing consumers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqSourceSpec {
    #[x_kube(validation = Rule::new("self.size() > 0").message("host must not be empty"))]
    pub host: String,
    /// Default 5672, or 5671 with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,
    /// Virtual host (default `/`).
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// The queue to read. It must exist unless `declare` is set.
    #[x_kube(validation = Rule::new("self.size() > 0").message("queue must not be empty"))]
    pub queue: String,
    /// Declare the queue (durable, classic) when it does not exist. Create quorum queues yourself.
    #[serde(default)]
    pub declare: bool,
    /// Bindings made at start (idempotent): the queue receives what these exchanges route to it.
    /// The exchanges must exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<RabbitmqBinding>,
    /// Messages a replica holds unacknowledged (AMQP prefetch, 1..65535; default 10000). Bounds
    /// memory (about prefetch x message size) and the work a crash hands back to the queue; a
    /// small window limits the rate, as a message is acknowledged only once the ingest topic
    /// has it.
    #[serde(default = "default_prefetch")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("prefetch must be between 1 and 65535"))]
    pub prefetch: i32,
    /// Username and password; RabbitMQ's `guest` (local connections only) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsRef>,
    /// AMQPS. Any mode but `disable` encrypts; `verify-full` also checks the broker's certificate
    /// and name (against `ca`, or the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(flatten)]
    pub format: MessageFormat,
}

/// A binding of the queue to an exchange.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqBinding {
    pub exchange: String,
    /// Routing keys (topic patterns for topic exchanges); one binding with the empty key when
    /// none (fanout and headers exchanges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing_keys: Vec<String>,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_prefetch() -> i32 {
    super::messages::DEFAULT_PREFETCH
}

impl KindSpec for RabbitmqSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        broker_secrets(out, self.credentials.as_ref(), self.tls.as_ref());
    }

    fn validate(&self) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err("host must not be empty".into());
        }
        if self.queue.trim().is_empty() {
            return Err("queue must not be empty".into());
        }
        if !(1..=65535).contains(&self.prefetch) {
            return Err("prefetch must be between 1 and 65535".into());
        }
        if let Some(i) = self.bindings.iter().position(|b| b.exchange.is_empty()) {
            return Err(format!(
                "bindings[{i}].exchange must name an exchange (the default exchange cannot be bound)"
            ));
        }
        Ok(())
    }
}
