//! Your own connector image: built on the obsrv-connector SDK (a Rust crate that implements the
//! source trait and calls the runtime's `run`), or any image keeping the contract of
//! `docs/custom-connectors.md`. The operator runs it exactly like the shared image.

use kube::KubeSchema;
use schemars::Schema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};

pub static CUSTOM: SourceKind = SourceKind {
    name: "custom",
    category: Category::Application,
    parallelism: Parallelism::Single,
    default_poll_interval: "30s",
    spec: |s| s.custom.as_ref().map(|s| s as &dyn KindSpec),
};

/// A connector image of your own, with its free-form config.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CustomSourceSpec {
    /// The image to run (e.g. `registry.example/my-connector:1.2.0`).
    #[x_kube(validation = Rule::new("self.size() > 0").message("custom.image must name an image"))]
    pub image: String,
    /// Free-form JSON object handed to the image as `spec.source.custom.config` of its config file.
    /// Never put secret values here: list Secrets in `secrets` instead.
    #[serde(default = "empty_object")]
    #[schemars(schema_with = "config_schema")]
    pub config: serde_json::Value,
    /// How many replicas may read at once (1 unless the connector splits its work).
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1").message("custom.maxParallelism must be at least 1"))]
    pub max_parallelism: i32,
    /// Secrets mounted as files at `/var/run/secrets/obsrv/<name>/<key>` (the SDK reads them with
    /// `OpenContext::secret`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretMount>,
    /// How long the connector waits between polls once caught up (Go duration; the SDK's runner
    /// uses it). Defaults to 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(crate::connector::DURATION_RULE).message("pollInterval must be a duration such as 30s, 5m or 1h"))]
    pub poll_interval: Option<String>,
    /// What the image speaks: `native` (built on the obsrv-connector SDK), `airbyte` (an Airbyte
    /// source) or `singer` (a Singer tap). For `airbyte` and `singer` the operator copies the
    /// runtime into the pod and the runtime drives the image's program; `config` is the program's
    /// own config, where `{"secretKeyRef": {"name": ..., "key": ...}}` stands for a Secret value.
    #[serde(default)]
    pub protocol: Protocol,
    /// The program to run and its leading arguments (`airbyte`/`singer`), e.g. `["tap-postgres"]`.
    /// Defaults, for `airbyte`, to the image's `$AIRBYTE_ENTRYPOINT`; a Singer tap must name it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The streams to sync (`airbyte`/`singer`); empty = every stream the program discovers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamSelection>,
}

/// The protocol a custom connector image speaks.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// The obsrv-connector SDK (`docs/custom-connectors.md`): the image is the runtime.
    #[default]
    Native,
    /// The Airbyte protocol (spec, check, discover, read) on stdout.
    Airbyte,
    /// The Singer spec (a tap's `--config`, `--catalog`, `--state`) on stdout.
    Singer,
}

/// One stream of a marketplace connector to sync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamSelection {
    /// The stream's name as the program's discover reports it (Singer: its `tap_stream_id`).
    pub name: String,
    /// `incremental` (default, when the stream supports it) or `fullRefresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_mode: Option<SyncMode>,
    /// The cursor (Airbyte) or replication key (Singer) when the program does not define one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_field: Option<String>,
}

/// How a stream is read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SyncMode {
    Incremental,
    FullRefresh,
}

/// The Secrets `config` refers to with `{"secretKeyRef": {"name": ..., "key": ...}}`, as
/// `(name, key)` pairs, in order of appearance.
pub fn secret_refs(config: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some((name, key)) = secret_ref(v) {
                    out.push((name.to_string(), key.to_string()));
                    return;
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, &mut out);
    out
}

/// `(name, key)` when `v` is exactly `{"secretKeyRef": {"name": ..., "key": ...}}`.
pub fn secret_ref(v: &serde_json::Value) -> Option<(&str, &str)> {
    let m = v.as_object().filter(|m| m.len() == 1)?;
    let r = m.get("secretKeyRef")?;
    Some((r.get("name")?.as_str()?, r.get("key")?.as_str()?))
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn one() -> i32 {
    1
}

/// Any JSON object, kept as written (the API server must not prune it).
fn config_schema(_: &mut schemars::SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "Free-form JSON object handed to the image."
    })
}

/// One Secret mounted into a custom connector's pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretMount {
    /// The Secret's name, in the Connector's namespace.
    pub name: String,
}

/// Where a custom connector's Secrets are mounted: `<SECRETS_DIR>/<secretName>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/secrets/obsrv";

impl KindSpec for CustomSourceSpec {
    fn mounted_secrets(&self) -> Vec<String> {
        let mut names: Vec<String> = self.secrets.iter().map(|s| s.name.clone()).collect();
        for (name, _) in secret_refs(&self.config) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    fn validate(&self) -> Result<(), String> {
        if self.image.trim().is_empty() {
            return Err("image must name an image".into());
        }
        if !self.config.is_object() {
            return Err("config must be a JSON object".into());
        }
        if self.max_parallelism < 1 {
            return Err("maxParallelism must be at least 1".into());
        }
        if let Some(i) = self.secrets.iter().position(|s| s.name.trim().is_empty()) {
            return Err(format!("secrets[{i}].name must not be empty"));
        }
        match self.protocol {
            Protocol::Native if !self.command.is_empty() || !self.streams.is_empty() => {
                return Err(
                    "command and streams are for protocol airbyte or singer; a native image reads its own config"
                        .into(),
                );
            }
            Protocol::Singer if self.command.is_empty() => {
                return Err("command must name the tap's program for protocol singer (e.g. [\"tap-postgres\"])".into());
            }
            _ => {}
        }
        if let Some(i) = self.command.iter().position(|c| c.trim().is_empty()) {
            return Err(format!("command[{i}] must not be empty"));
        }
        if let Some(i) = self.streams.iter().position(|s| s.name.trim().is_empty()) {
            return Err(format!("streams[{i}].name must not be empty"));
        }
        Ok(())
    }

    fn poll_interval(&self) -> Option<&str> {
        self.poll_interval.as_deref()
    }

    fn parallelism(&self) -> Option<Parallelism> {
        Some(match self.max_parallelism {
            n if n <= 1 => Parallelism::Single,
            n => Parallelism::AtMost(n),
        })
    }

    fn image(&self) -> Option<&str> {
        Some(&self.image)
    }

    fn injects_runtime(&self) -> bool {
        self.protocol != Protocol::Native
    }
}
