//! The contract between the operator and the connector pods it runs: the rendered config file, the
//! environment variables that carry Secret values, ports and paths.

use serde::{Deserialize, Serialize};

use crate::connector::{ConnectorSpec, CredentialsRef, SecretKeyRef, Source, Tls};

/// Key of the runtime config in the connector's ConfigMap, and file name under [`CONFIG_DIR`].
pub const CONFIG_FILE: &str = "connector.yaml";
/// Where the ConfigMap is mounted in connector pods.
pub const CONFIG_DIR: &str = "/etc/obsrv-connector";
/// The connector's HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.
pub const HTTP_PORT: u16 = 8080;
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

fn credentials(
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

fn tls_ca(out: &mut Vec<SecretEnv>, tls: Option<&Tls>, env: &'static str) {
    if let Some(SecretKeyRef { secret_name, key }) = tls.and_then(|t| t.ca.as_ref()) {
        out.push(SecretEnv {
            env,
            secret_name: secret_name.clone(),
            key: key.clone(),
        });
    }
}

fn source_secrets(out: &mut Vec<SecretEnv>, source: &Source) {
    for sql in [&source.postgres, &source.mysql, &source.mariadb]
        .into_iter()
        .flatten()
    {
        credentials(
            out,
            &sql.credentials,
            env::SOURCE_USERNAME,
            env::SOURCE_PASSWORD,
        );
        tls_ca(out, sql.tls.as_ref(), env::SOURCE_TLS_CA);
    }
    if let Some(k) = &source.kafka {
        if let Some(sasl) = &k.sasl {
            credentials(
                out,
                &sasl.credentials,
                env::SOURCE_USERNAME,
                env::SOURCE_PASSWORD,
            );
        }
        tls_ca(out, k.tls.as_ref(), env::SOURCE_TLS_CA);
    }
    if let Some(c) = source.s3.as_ref().and_then(|s| s.credentials.as_ref()) {
        out.push(SecretEnv {
            env: env::SOURCE_ACCESS_KEY_ID,
            secret_name: c.secret_name.clone(),
            key: c.access_key_id_key.clone(),
        });
        out.push(SecretEnv {
            env: env::SOURCE_SECRET_ACCESS_KEY,
            secret_name: c.secret_name.clone(),
            key: c.secret_access_key_key.clone(),
        });
    }
}

/// Every Secret value a connector with this spec needs, and the variable that carries it.
/// The operator turns these into `secretKeyRef` env; the runtime reads them back.
pub fn secret_env(spec: &ConnectorSpec) -> Vec<SecretEnv> {
    let mut out = Vec::new();
    source_secrets(&mut out, &spec.source);
    if let Some(k) = spec.sink.as_ref().and_then(|s| s.kafka.as_ref()) {
        if let Some(sasl) = &k.sasl {
            credentials(
                &mut out,
                &sasl.credentials,
                env::SINK_USERNAME,
                env::SINK_PASSWORD,
            );
        }
        tls_ca(&mut out, k.tls.as_ref(), env::SINK_TLS_CA);
    }
    out
}

/// Names of the Secrets a spec references, sorted and deduplicated.
pub fn referenced_secrets(spec: &ConnectorSpec) -> Vec<String> {
    let mut names: Vec<String> = secret_env(spec)
        .into_iter()
        .map(|s| s.secret_name)
        .collect();
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
