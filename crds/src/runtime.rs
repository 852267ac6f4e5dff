//! The contract between the operator and the connector pods it runs: the rendered config file, the
//! environment variables that carry Secret values, ports and paths.

use serde::{Deserialize, Serialize};

use crate::connector::{ConnectorSpec, CredentialsRef, SecretKeyRef, Tls};

/// Key of the runtime config in the connector's ConfigMap, and file name under [`CONFIG_DIR`].
pub const CONFIG_FILE: &str = "connector.yaml";
/// Key of the desired state (`Running`, `Paused`, `Stopped`) in the connector's ConfigMap, and file
/// name under [`CONFIG_DIR`]. Kept out of [`CONFIG_FILE`] so pausing and resuming change a file the
/// running pods watch instead of rolling them (the pod template carries the checksum of
/// [`CONFIG_FILE`] only, whose `spec.state` is always `Running`).
pub const STATE_FILE: &str = "state";
/// Where the ConfigMap is mounted in connector pods.
pub const CONFIG_DIR: &str = "/etc/obsrv-connector";
/// The connector's HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.
pub const HTTP_PORT: u16 = 8080;
/// Environment variable naming a directory of Secret files `<dir>/<secretName>/<key>`.
pub const SECRETS_DIR_ENV: &str = "OBSRV_SECRETS_DIR";
/// Environment variable overriding the HTTP listen address (e.g. `127.0.0.5:8080`).
pub const LISTEN_ENV: &str = "OBSRV_LISTEN";

/// What a connector process runs: the Connector's spec (sink merged with the operator's defaults)
/// plus its identity. Never holds a secret value: those arrive as [`SecretEnv`] variables.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub spec: ConnectorSpec,
}

impl RuntimeConfig {
    /// `<namespace>/<name>`.
    pub fn instance_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One Secret value delivered to a connector process as an environment variable.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretEnv {
    pub env: &'static str,
    pub secret_name: String,
    pub key: String,
}

pub mod env {
    pub const SOURCE_USERNAME: &str = "OBSRV_SOURCE_USERNAME";
    pub const SOURCE_PASSWORD: &str = "OBSRV_SOURCE_PASSWORD";
    pub const SOURCE_TLS_CA: &str = "OBSRV_SOURCE_TLS_CA";
    pub const SOURCE_ACCESS_KEY_ID: &str = "OBSRV_SOURCE_ACCESS_KEY_ID";
    pub const SOURCE_SECRET_ACCESS_KEY: &str = "OBSRV_SOURCE_SECRET_ACCESS_KEY";
    pub const SINK_USERNAME: &str = "OBSRV_SINK_USERNAME";
    pub const SINK_PASSWORD: &str = "OBSRV_SINK_PASSWORD";
    pub const SINK_TLS_CA: &str = "OBSRV_SINK_TLS_CA";
}

/// The username and password of `c`, carried by `user` and `pass`.
pub fn credentials_env(
    out: &mut Vec<SecretEnv>,
    c: &CredentialsRef,
    user: &'static str,
    pass: &'static str,
) {
    out.push(SecretEnv {
        env: user,
        secret_name: c.secret_name.clone(),
        key: c.username_key.clone(),
    });
    out.push(SecretEnv {
        env: pass,
        secret_name: c.secret_name.clone(),
        key: c.password_key.clone(),
    });
}

/// The CA bundle of `tls`, when it names one, carried by `env`.
pub fn tls_ca_env(out: &mut Vec<SecretEnv>, tls: Option<&Tls>, env: &'static str) {
    if let Some(SecretKeyRef { secret_name, key }) = tls.and_then(|t| t.ca.as_ref()) {
        out.push(SecretEnv {
            env,
            secret_name: secret_name.clone(),
            key: key.clone(),
        });
    }
}

/// Every Secret value a connector with this spec needs, and the variable that carries it.
/// The operator turns these into `secretKeyRef` env; the runtime reads them back.
pub fn secret_env(spec: &ConnectorSpec) -> Vec<SecretEnv> {
    let mut out = Vec::new();
    if let Ok(source) = spec.source.resolve() {
        source.spec.secrets(&mut out);
    }
    if let Some(k) = spec.sink.as_ref().and_then(|s| s.kafka.as_ref()) {
        if let Some(sasl) = &k.sasl {
            credentials_env(
                &mut out,
                &sasl.credentials,
                env::SINK_USERNAME,
                env::SINK_PASSWORD,
            );
        }
        tls_ca_env(&mut out, k.tls.as_ref(), env::SINK_TLS_CA);
    }
    out
}

/// Names of the Secrets a spec references, sorted and deduplicated.
pub fn referenced_secrets(spec: &ConnectorSpec) -> Vec<String> {
    let mut names: Vec<String> = secret_env(spec)
        .into_iter()
        .map(|s| s.secret_name)
        .collect();
    if let Ok(source) = spec.source.resolve() {
        names.extend(source.spec.mounted_secrets());
    }
    for e in spec.template.iter().flat_map(|t| t.env.iter()) {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            names.push(r.name.clone());
        }
    }
    names.sort();
    names.dedup();
    names
}
