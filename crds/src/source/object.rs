//! Object stores: files in a bucket or container (S3 and S3-compatible stores such as MinIO, Azure
//! Blob Storage, Google Cloud Storage), selected by prefix, glob and modification time, decoded by
//! format. The three kinds share [`ObjectSelection`] (flattened into each spec) and differ only in
//! where the store is and how to sign in.

use chrono::{DateTime, Utc};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{DURATION_RULE, default_poll_interval};
use crate::runtime::{SecretEnv, env};

/// Replicas share a file source's objects by a stable hash of each key (see
/// `docs/sources/files.md`): any number can run, and the running connector reports how many can
/// have work at once.
pub static S3: SourceKind = SourceKind {
    name: "s3",
    category: Category::File,
    parallelism: Parallelism::Unbounded,
    default_poll_interval: "30s",
    spec: |s| s.s3.as_ref().map(|s| s as &dyn KindSpec),
};

pub static AZURE_BLOB: SourceKind = SourceKind {
    name: "azureBlob",
    category: Category::File,
    parallelism: Parallelism::Unbounded,
    default_poll_interval: "30s",
    spec: |s| s.azure_blob.as_ref().map(|s| s as &dyn KindSpec),
};

pub static GCS: SourceKind = SourceKind {
    name: "gcs",
    category: Category::File,
    parallelism: Parallelism::Unbounded,
    default_poll_interval: "30s",
    spec: |s| s.gcs.as_ref().map(|s| s as &dyn KindSpec),
};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ObjectFormat {
    /// One JSON document (an object, or an array of objects) per file, up to 16 MiB.
    Json,
    /// One JSON object per line.
    JsonLines,
    /// CSV: one record per row, values as strings (see `csv` for header, delimiter and quote).
    Csv,
    /// Parquet: one record per row, typed values (timestamps as ISO-8601, decimals as strings).
    Parquet,
}

/// How objects are compressed (whole-file compression, on top of the format).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ObjectCompression {
    /// By the key's extension (`.gz`, `.zst`, `.sz`/`.snappy`), else by the first bytes of the
    /// object (gzip, zstd and snappy-framed magic numbers), else uncompressed.
    #[default]
    Auto,
    None,
    Gzip,
    Zstd,
    /// Snappy's framing format (`.sz`, what `snzip` and `python-snappy -c` write).
    Snappy,
}

/// CSV dialect.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CsvOptions {
    /// The first row names the columns. Without a header, columns are `col1`, `col2`, ...
    #[serde(default = "yes")]
    pub header: bool,
    /// Field separator, one ASCII character (`,` when unset; `\t` for TSV).
    #[serde(default = "comma")]
    #[x_kube(validation = Rule::new("self.size() == 1").message("csv.delimiter must be one character"))]
    pub delimiter: String,
    /// Quote character, one ASCII character (`"` when unset); doubled inside a quoted field.
    #[serde(default = "double_quote")]
    #[x_kube(validation = Rule::new("self.size() == 1").message("csv.quote must be one character"))]
    pub quote: String,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            header: true,
            delimiter: comma(),
            quote: double_quote(),
        }
    }
}

fn yes() -> bool {
    true
}
fn comma() -> String {
    ",".into()
}
fn double_quote() -> String {
    "\"".into()
}

/// Which objects a file source reads and how it decodes them: the same fields for every store.
/// Objects are tracked by key in the state topic once read; nothing is ever written to the store.
/// Past 256 KiB of remembered keys the lowest are kept as "done through key K": an object written
/// later with a key sorting before K is not read, so keys should sort by time (date-partitioned
/// prefixes do).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSelection {
    /// Only keys starting with this (e.g. `landing/2026/`).
    #[serde(default)]
    pub prefix: String,
    /// Only keys matching this glob, relative to `prefix`: `*` and `?` stay within one path
    /// segment, `**` crosses segments (e.g. `*.jsonl`, `**/*.csv.gz`). Every key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
    pub format: ObjectFormat,
    /// CSV header, delimiter and quote (format `csv` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvOptions>,
    /// Whole-file compression; `auto` (the default) detects gzip, zstd and snappy.
    #[serde(default)]
    pub compression: ObjectCompression,
    /// Start point: only objects last modified at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_after: Option<DateTime<Utc>>,
    /// How often to list the store for new objects once everything listed is read.
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("pollInterval must be a duration such as 30s, 5m or 1h"))]
    pub poll_interval: String,
}

impl ObjectSelection {
    /// What every store's spec checks: its bucket (`field`) named, `endpoint` a URL, the selection.
    fn validate_store(
        &self,
        field: &str,
        name: &str,
        endpoint: Option<&String>,
    ) -> Result<(), String> {
        if name.trim().is_empty() {
            return Err(format!("{field} must not be empty"));
        }
        http_url("endpoint", endpoint)?;
        self.validate()
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.csv {
            for (field, v) in [("csv.delimiter", &c.delimiter), ("csv.quote", &c.quote)] {
                if v.len() != 1 || !v.is_ascii() {
                    return Err(format!("{field} must be one ASCII character (got {v:?})"));
                }
            }
            if c.delimiter == c.quote {
                return Err("csv.delimiter and csv.quote must differ".into());
            }
        }
        if let Some(g) = &self.glob
            && g.trim().is_empty()
        {
            return Err("glob must not be empty when set".into());
        }
        Ok(())
    }
}

fn http_url(field: &str, url: Option<&String>) -> Result<(), String> {
    match url {
        Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => Err(format!(
            "{field} must be a URL starting with http:// or https:// (got {u:?})"
        )),
        _ => Ok(()),
    }
}

/// Objects in an S3-compatible bucket (AWS S3, MinIO, ...). Without `credentials` the pod's own
/// identity signs requests (IRSA web identity, ECS/EC2 roles, `AWS_*` environment).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3SourceSpec {
    /// Endpoint URL for S3-compatible stores (MinIO: `http://minio.ns.svc:9000`); AWS when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[x_kube(validation = Rule::new("self.size() > 0").message("bucket must not be empty"))]
    pub bucket: String,
    #[serde(flatten)]
    pub objects: ObjectSelection,
    /// Access key id / secret access key; the pod's identity (IRSA, ...) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Path-style addressing (MinIO and most S3-compatible stores).
    #[serde(default)]
    pub force_path_style: bool,
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
        let endpoint = self.endpoint.as_ref();
        self.objects
            .validate_store("bucket", &self.bucket, endpoint)
    }

    fn poll_interval(&self) -> Option<&str> {
        Some(&self.objects.poll_interval)
    }
}

/// Blobs in an Azure Blob Storage container. Without `credentials` the pod's identity signs
/// requests (Azure Workload Identity's `AZURE_CLIENT_ID`/`AZURE_TENANT_ID`/
/// `AZURE_FEDERATED_TOKEN_FILE`, or the managed identity of the node).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureBlobSourceSpec {
    /// Storage account name; may be left out when a connection string names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[x_kube(validation = Rule::new("self.size() > 0").message("container must not be empty"))]
    pub container: String,
    /// Blob service URL including the account when it is not `https://<account>.blob.core.windows.net`
    /// (Azurite: `http://azurite:10000/devstoreaccount1`; sovereign clouds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(flatten)]
    pub objects: ObjectSelection,
    /// A shared key, a SAS token or a connection string from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<AzureCredentials>,
}

/// How an Azure Blob source signs in, and the Secret key holding it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum AzureAuth {
    /// The storage account's access key (shared key).
    #[default]
    SharedKey,
    /// A SAS token (account or container SAS with read and list permissions), with or without
    /// its leading `?`.
    SasToken,
    /// A connection string (`AccountName=...;AccountKey=...` or `...;SharedAccessSignature=...`,
    /// optionally `BlobEndpoint=...`).
    ConnectionString,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureCredentials {
    pub secret_name: String,
    #[serde(default)]
    pub auth: AzureAuth,
    /// The Secret's key; `accountKey`, `sasToken` or `connectionString` by `auth` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl AzureCredentials {
    /// The Secret key this credential is read from.
    pub fn secret_key(&self) -> String {
        self.key.clone().unwrap_or_else(|| {
            match self.auth {
                AzureAuth::SharedKey => "accountKey",
                AzureAuth::SasToken => "sasToken",
                AzureAuth::ConnectionString => "connectionString",
            }
            .into()
        })
    }

    /// The environment variable carrying it into the pod.
    pub fn env(&self) -> &'static str {
        match self.auth {
            AzureAuth::SharedKey => env::SOURCE_ACCOUNT_KEY,
            AzureAuth::SasToken => env::SOURCE_SAS_TOKEN,
            AzureAuth::ConnectionString => env::SOURCE_CONNECTION_STRING,
        }
    }
}

impl KindSpec for AzureBlobSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        if let Some(c) = &self.credentials {
            out.push(SecretEnv {
                env: c.env(),
                secret_name: c.secret_name.clone(),
                key: c.secret_key(),
            });
        }
    }

    fn validate(&self) -> Result<(), String> {
        let from_connection_string = self
            .credentials
            .as_ref()
            .is_some_and(|c| c.auth == AzureAuth::ConnectionString);
        if self.account.as_deref().is_none_or(str::is_empty) && !from_connection_string {
            return Err(
                "account must be set (only a connection string can name the account instead)"
                    .into(),
            );
        }
        let endpoint = self.endpoint.as_ref();
        self.objects
            .validate_store("container", &self.container, endpoint)
    }

    fn poll_interval(&self) -> Option<&str> {
        Some(&self.objects.poll_interval)
    }
}

/// Objects in a Google Cloud Storage bucket. Without `credentials` the pod's identity signs
/// requests (GKE Workload Identity through the metadata server, or `GOOGLE_APPLICATION_CREDENTIALS`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GcsSourceSpec {
    #[x_kube(validation = Rule::new("self.size() > 0").message("bucket must not be empty"))]
    pub bucket: String,
    /// Base URL of the storage API when not `https://storage.googleapis.com` (emulators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(flatten)]
    pub objects: ObjectSelection,
    /// A service-account key (the JSON file Google issues) from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<GcsCredentials>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsCredentials {
    pub secret_name: String,
    /// The Secret's key holding the service-account JSON.
    #[serde(default = "default_service_account_key")]
    pub key: String,
}

fn default_service_account_key() -> String {
    "serviceAccount.json".into()
}

impl KindSpec for GcsSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        if let Some(c) = &self.credentials {
            out.push(SecretEnv {
                env: env::SOURCE_SERVICE_ACCOUNT,
                secret_name: c.secret_name.clone(),
                key: c.key.clone(),
            });
        }
    }

    fn validate(&self) -> Result<(), String> {
        let endpoint = self.endpoint.as_ref();
        self.objects
            .validate_store("bucket", &self.bucket, endpoint)
    }

    fn poll_interval(&self) -> Option<&str> {
        Some(&self.objects.poll_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_fields_sit_beside_each_stores_own() {
        let s: GcsSourceSpec = serde_json::from_value(serde_json::json!({
            "bucket": "b", "prefix": "in/", "glob": "*.csv.gz", "format": "csv",
            "csv": {"delimiter": ";"}, "modifiedAfter": "2026-01-01T00:00:00Z"}))
        .unwrap();
        assert_eq!(s.objects.prefix, "in/");
        assert_eq!(s.objects.compression, ObjectCompression::Auto);
        let csv = s.objects.csv.clone().unwrap();
        assert!(csv.header && csv.quote == "\"" && csv.delimiter == ";");
        assert_eq!(s.objects.poll_interval, "30s");
        assert!(s.validate().is_ok());
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["glob"], "*.csv.gz", "flattened on the way out too");
    }

    #[test]
    fn azure_needs_an_account_unless_a_connection_string_names_it() {
        let mut a: AzureBlobSourceSpec = serde_json::from_value(serde_json::json!({
            "container": "c", "format": "jsonLines"}))
        .unwrap();
        assert!(a.validate().unwrap_err().contains("account"));
        a.credentials = Some(AzureCredentials {
            secret_name: "s".into(),
            auth: AzureAuth::ConnectionString,
            key: None,
        });
        assert!(a.validate().is_ok());
        let mut out = Vec::new();
        a.secrets(&mut out);
        assert_eq!(out[0].env, env::SOURCE_CONNECTION_STRING);
        assert_eq!(out[0].key, "connectionString");
        let bad: S3SourceSpec = serde_json::from_value(serde_json::json!({
            "bucket": "b", "format": "csv", "csv": {"delimiter": ";;"}}))
        .unwrap();
        assert!(bad.validate().unwrap_err().contains("csv.delimiter"));
    }
}
