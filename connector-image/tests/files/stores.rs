//! The object stores of the file-source matrix: each one starts its test server, creates buckets,
//! uploads objects and writes the `spec.source` of a Connector reading them. Every scenario runs
//! against each store through this one interface.

use anyhow::Result;
use obsrv_e2e::services::{S3, azurite::Azurite, gcs::Gcs, unique_name};
use serde_json::{Value, json};

/// The Secret every store's credentials live in.
pub const SECRET: &str = "store-creds";

/// A store under test.
pub enum Store {
    /// S3 the MinIO way: `endpoint` + path-style addressing, access keys.
    S3(S3),
    /// Azure Blob (Azurite) with a read+list SAS token: the least a reader needs.
    Azure(Azurite),
    /// GCS (fake-gcs-server) with a service-account key.
    Gcs(Gcs, String),
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    S3,
    Azure,
    Gcs,
}

impl Store {
    pub async fn start(kind: Kind) -> Result<Store> {
        Ok(match kind {
            Kind::S3 => Store::S3(S3::start().await?),
            Kind::Azure => Store::Azure(Azurite::start().await?),
            Kind::Gcs => {
                let g = Gcs::start().await?;
                let key = g.service_account_json()?;
                Store::Gcs(g, key)
            }
        })
    }

    /// The kind's name: the field of `spec.source` and `obsrv_meta.source.connector`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::S3(_) => "s3",
            Store::Azure(_) => "azureBlob",
            Store::Gcs(..) => "gcs",
        }
    }

    /// A new, empty bucket (container).
    pub async fn bucket(&self) -> Result<String> {
        let name = unique_name("bucket").replace('_', "-");
        match self {
            Store::S3(s) => s.create_bucket(&name).await?,
            Store::Azure(a) => a.create_container(&name).await?,
            Store::Gcs(g, _) => g.create_bucket(&name).await?,
        }
        Ok(name)
    }

    pub async fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) -> Result<()> {
        let body: Vec<u8> = body.into();
        match self {
            Store::S3(s) => s.put_object(bucket, key, body).await,
            Store::Azure(a) => a.put_blob(bucket, key, body).await,
            Store::Gcs(g, _) => g.put_object(bucket, key, body).await,
        }
    }

    /// The URL the connector names an object by in failed records.
    pub fn url(&self, bucket: &str, key: &str) -> String {
        match self {
            Store::S3(_) => format!("s3://{bucket}/{key}"),
            Store::Azure(a) => format!("az://{}/{bucket}/{key}", a.account()),
            Store::Gcs(..) => format!("gs://{bucket}/{key}"),
        }
    }

    /// `spec.source` reading `bucket` with the selection fields of `objects` (format, prefix, ...).
    pub fn source(&self, bucket: &str, objects: Value) -> Value {
        let creds = json!({"secretName": SECRET});
        let mut own = match self {
            Store::S3(s) => json!({
                "endpoint": s.endpoint(), "region": s.region(), "bucket": bucket,
                "forcePathStyle": true, "credentials": creds,
            }),
            Store::Azure(a) => json!({
                "account": a.account(), "container": bucket, "endpoint": a.endpoint(),
                "credentials": {"secretName": SECRET, "auth": "sasToken"},
            }),
            Store::Gcs(g, _) => json!({
                "bucket": bucket, "endpoint": g.endpoint(), "credentials": creds,
            }),
        };
        let own_map = own.as_object_mut().expect("an object");
        own_map.insert("pollInterval".into(), "200ms".into());
        for (k, v) in objects.as_object().cloned().unwrap_or_default() {
            own_map.insert(k, v);
        }
        json!({ self.kind(): own })
    }

    /// The Secret's keys and values, as the Harness writes them.
    pub fn secrets(&self) -> Vec<(&'static str, &'static str, String)> {
        match self {
            Store::S3(s) => vec![
                (SECRET, "accessKeyId", s.access_key().to_string()),
                (SECRET, "secretAccessKey", s.secret_key().to_string()),
            ],
            Store::Azure(a) => vec![(
                SECRET,
                "sasToken",
                a.sas_token("rl").expect("an account SAS"),
            )],
            Store::Gcs(_, key) => vec![(SECRET, "serviceAccount.json", key.clone())],
        }
    }
}

/// A Connector manifest (`NAME` for the Harness to replace) with `source` and `extra` spec fields.
pub fn manifest(source: Value, extra: Value) -> String {
    let mut spec = json!({"dataset": "files", "source": source});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    serde_yaml::to_string(&json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "NAME", "namespace": "tests"},
        "spec": spec,
    }))
    .expect("YAML")
}
