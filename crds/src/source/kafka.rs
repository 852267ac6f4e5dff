//! Kafka topics consumed with a consumer group; offsets live in the group.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{Sasl, Tls};
use crate::runtime::{SecretEnv, credentials_env, env, tls_ca_env};

pub static KAFKA: SourceKind = SourceKind {
    name: "kafka",
    category: Category::Stream,
    parallelism: Parallelism::Partitions,
    default_poll_interval: "200ms",
    spec: |s| s.kafka.as_ref().map(|s| s as &dyn KindSpec),
};

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

/// Kafka topics consumed with a consumer group; offsets live in the group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSourceSpec {
    #[x_kube(validation = Rule::new("self.size() > 0").message("bootstrapServers must not be empty"))]
    pub bootstrap_servers: String,
    #[x_kube(validation = Rule::new("self.size() > 0").message("topics must list at least one topic"))]
    pub topics: Vec<String>,
    /// Consumer group; defaults to `obsrv-connector.<namespace>.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
    #[serde(default)]
    pub offset_reset: OffsetReset,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<Sasl>,
}

impl KindSpec for KafkaSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        if let Some(sasl) = &self.sasl {
            credentials_env(
                out,
                &sasl.credentials,
                env::SOURCE_USERNAME,
                env::SOURCE_PASSWORD,
            );
        }
        tls_ca_env(out, self.tls.as_ref(), env::SOURCE_TLS_CA);
    }

    fn validate(&self) -> Result<(), String> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err("bootstrapServers must not be empty".into());
        }
        if self.topics.is_empty() {
            return Err("topics must list at least one topic".into());
        }
        if let Some(i) = self.topics.iter().position(|t| t.trim().is_empty()) {
            return Err(format!("topics[{i}] must not be empty"));
        }
        Ok(())
    }
}
