//! Object stores: files in a bucket, read in key order, decoded by format.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{DURATION_RULE, default_poll_interval};
use crate::runtime::{SecretEnv, env};

pub static S3: SourceKind = SourceKind {
    name: "s3",
    category: Category::File,
    parallelism: Parallelism::Single,
    default_poll_interval: "30s",
    spec: |s| s.s3.as_ref().map(|s| s as &dyn KindSpec),
};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ObjectFormat {
    /// One JSON document (an object, or an array of objects) per file.
    Json,
    /// One JSON object per line.
    JsonLines,
    /// CSV with a header row.
    Csv,
    Parquet,
}

/// Objects in an S3-compatible bucket (S3, MinIO, ...), read in key order. Processed objects are
/// tracked in state; nothing is ever written to the source bucket. Past 256 KiB of remembered keys
/// the lowest are kept as "done through key K": an object written later with a key sorting before K
/// is not read, so keys should sort by time (date-partitioned prefixes do).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3SourceSpec {
    /// Endpoint URL for S3-compatible stores; AWS when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[x_kube(validation = Rule::new("self.size() > 0").message("bucket must not be empty"))]
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    pub format: ObjectFormat,
    /// Access key id / secret access key; the pod's identity (IRSA, ...) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Path-style addressing (MinIO and most S3-compatible stores).
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("pollInterval must be a duration such as 30s, 5m or 1h"))]
    pub poll_interval: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    pub secret_name: String,
    #[serde(default = "default_access_key_key")]
    pub access_key_id_key: String,
    #[serde(default = "default_secret_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_key() -> String {
    "accessKeyId".into()
}
fn default_secret_key_key() -> String {
    "secretAccessKey".into()
}

impl KindSpec for S3SourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        if let Some(c) = &self.credentials {
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

    fn validate(&self) -> Result<(), String> {
        if self.bucket.trim().is_empty() {
            return Err("bucket must not be empty".into());
        }
        if let Some(ep) = &self.endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            return Err(format!(
                "endpoint must be a URL starting with http:// or https:// (got {ep:?})"
            ));
        }
        Ok(())
    }

    fn poll_interval(&self) -> Option<&str> {
        Some(&self.poll_interval)
    }
}
