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
        self.secrets.iter().map(|s| s.name.clone()).collect()
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
}
