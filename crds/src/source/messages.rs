//! What the message-broker kinds (`rabbitmq`, `nats`, `mqtt`) share: how a message becomes an event.

use serde::{Deserialize, Serialize};

use crate::connector::{CredentialsRef, Tls};
use crate::runtime::{SecretEnv, credentials_env, env, tls_ca_env};

/// The broker kinds' default `prefetch`: messages a replica holds unacknowledged. A message is
/// acknowledged only after the ingest topic has it (one producer linger, ~20 ms, later), so a
/// replica reads at most about `prefetch` messages per linger: 1,000 held NATS to ~42k msgs/s,
/// 10,000 keeps up with the broker. Memory grows with it times the message size.
pub const DEFAULT_PREFETCH: i32 = 10_000;

/// The Secret values every broker kind reads: its optional username/password and TLS CA.
pub fn broker_secrets(
    out: &mut Vec<SecretEnv>,
    credentials: Option<&CredentialsRef>,
    tls: Option<&Tls>,
) {
    if let Some(c) = credentials {
        credentials_env(out, c, env::SOURCE_USERNAME, env::SOURCE_PASSWORD);
    }
    tls_ca_env(out, tls, env::SOURCE_TLS_CA);
}

/// What happens to a message whose payload is not a JSON object.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NonJson {
    /// To the failed topic (error code CE_1000), like any unparseable input.
    #[default]
    FailedTopic,
    /// Ingested as the event `{"data_base64": "<the payload, base64>"}` (the CloudEvents name for
    /// binary data in JSON).
    Base64,
}

/// How broker messages become events (the same fields for every broker kind).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct MessageFormat {
    /// Payloads that are not a JSON object: `failedTopic` (default) or `base64`.
    #[serde(default)]
    pub non_json: NonJson,
    /// Copy the message's headers and properties (routing key, subject or topic, ...) into the
    /// envelope as `obsrv_meta.source.message`; the event itself is unchanged.
    #[serde(default)]
    pub metadata: bool,
}

impl MessageFormat {
    pub fn is_default(&self) -> bool {
        *self == MessageFormat::default()
    }
}
