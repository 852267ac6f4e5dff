//! MQTT 5: topic filters subscribed with QoS 1 in a persistent session; shared subscriptions
//! (`$share/<group>/...`) when replicas share the work.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::messages::{MessageFormat, broker_secrets};
use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{CredentialsRef, DURATION_RULE, Tls};
use crate::runtime::SecretEnv;

pub static MQTT: SourceKind = SourceKind {
    name: "mqtt",
    category: Category::Stream,
    // One persistent session unless the spec names a share group (see `parallelism`).
    parallelism: Parallelism::Single,
    default_poll_interval: "100ms",
    spec: |s| s.mqtt.as_ref().map(|s| s as &dyn KindSpec),
};

/// MQTT 5 topics, subscribed with QoS 1 in a persistent session (clean start off): a message is
/// acknowledged (PUBACK) only after the sink has its record, and the broker redelivers what was not
/// acknowledged when the session resumes. Publish with QoS 1 or 2: QoS 0 messages are at most once.
/// MQTT has no lag a client can read: status says it is unknown.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MqttSourceSpec {
    #[x_kube(validation = Rule::new("self.size() > 0").message("host must not be empty"))]
    pub host: String,
    /// Default 1883, or 8883 with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,
    /// Topic filters (`+` and `#` wildcards), subscribed with QoS 1.
    #[x_kube(validation = Rule::new("self.size() > 0").message("topics must list at least one topic filter"))]
    pub topics: Vec<String>,
    /// Client id of the persistent session; default `obsrv-<namespace>-<name>`. With
    /// `shareGroup`, each replica appends its pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Replicas share the subscriptions (`$share/<shareGroup>/<filter>`) and the connector may
    /// scale out; each replica keeps its own session, named after its pod. Without it the
    /// connector runs exactly one replica with one session that outlives pod replacements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0 && !self.contains('/') && !self.contains('+') && !self.contains('#')").message("shareGroup must be a non-empty name without '/', '+' or '#'"))]
    pub share_group: Option<String>,
    /// How long the broker keeps the session (and queues messages for it) while the connector
    /// is disconnected. Messages published to a session that expired are lost.
    #[serde(default = "default_session_expiry")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("sessionExpiry must be a duration such as 24h"))]
    pub session_expiry: String,
    /// Messages a replica holds unacknowledged (MQTT receive maximum, 1..65535; default 10000).
    /// Memory is about prefetch x message size; a small window limits the rate, as a message is
    /// acknowledged only once the ingest topic has it.
    #[serde(default = "default_prefetch")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("prefetch must be between 1 and 65535"))]
    pub prefetch: i32,
    /// Username and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsRef>,
    /// MQTTS. Any mode but `disable` encrypts; `verify-full` also checks the broker's certificate
    /// and name (against `ca`, or the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(flatten)]
    pub format: MessageFormat,
}

fn default_session_expiry() -> String {
    "24h".into()
}

fn default_prefetch() -> i32 {
    super::messages::DEFAULT_PREFETCH
}

impl KindSpec for MqttSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        broker_secrets(out, self.credentials.as_ref(), self.tls.as_ref());
    }

    fn validate(&self) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err("host must not be empty".into());
        }
        if self.topics.is_empty() {
            return Err("topics must list at least one topic filter".into());
        }
        for (i, t) in self.topics.iter().enumerate() {
            if let Err(e) = check_filter(t) {
                return Err(format!("topics[{i}] {e}"));
            }
        }
        if let Some(g) = &self.share_group
            && (g.is_empty() || g.contains(['/', '+', '#']))
        {
            return Err("shareGroup must be a non-empty name without '/', '+' or '#'".into());
        }
        if !(1..=65535).contains(&self.prefetch) {
            return Err("prefetch must be between 1 and 65535".into());
        }
        Ok(())
    }

    /// A share group lets replicas split the messages; without one, one session reads them all.
    fn parallelism(&self) -> Option<Parallelism> {
        Some(match self.share_group {
            Some(_) => Parallelism::Unbounded,
            None => Parallelism::Single,
        })
    }
}

/// An MQTT topic filter: not empty, `#` only as the last level, wildcards only as whole levels,
/// and not itself a shared subscription (use `shareGroup`).
pub fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("must not be empty".into());
    }
    if f.starts_with("$share/") {
        return Err(format!(
            "{f:?} is a shared subscription: name the filter and set shareGroup instead"
        ));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!("{f:?}: '#' must be the whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{f:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        for ok in ["sensors/#", "sensors/+/temp", "#", "+", "a/b/c"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "sensors/#/x", "sensors/te#", "a+/b", "$share/g/a"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }
}
