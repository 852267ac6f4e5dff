//! The `gcs` kind: objects in a Google Cloud Storage bucket. Only the client is built here;
//! listing, state, scale-out and decoding are the shared file-source layer's ([`super::objects`]).

use std::sync::Arc;

use object_store::gcp::GoogleCloudStorageBuilder;
use obsrv_crds::{GcsSourceSpec, runtime::env};

use super::{
    SourceFactory,
    objects::{self, Store},
};
use crate::{
    config::Secrets,
    error::{Error, Result},
};

/// The `gcs` kind.
pub fn factory() -> SourceFactory {
    let kind = &obsrv_crds::source::object::GCS;
    objects::factory(kind, |s| s.gcs.as_ref(), |s| &s.objects, store)
}

/// The bucket's client: a service-account key from the Secret, else the pod's identity
/// (`GOOGLE_APPLICATION_CREDENTIALS`, or the metadata server: GKE Workload Identity).
pub fn store(spec: &GcsSourceSpec, secrets: &Secrets) -> Result<Store> {
    let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&spec.bucket);
    if let Some(ep) = &spec.endpoint {
        b = b.with_base_url(ep.trim_end_matches('/'));
    }
    if let Some(key) = secrets.get(env::SOURCE_SERVICE_ACCOUNT) {
        // Checked here so a wrong key names the Secret's field rather than failing at each read.
        let v: serde_json::Value = serde_json::from_str(key).map_err(|e| {
            Error::Config(format!(
                "gcs credentials: the Secret's key is not a service-account JSON: {e}"
            ))
        })?;
        if v.get("private_key").is_none() || v.get("client_email").is_none() {
            return Err(Error::Config(
                "gcs credentials: the service-account JSON has no private_key or client_email"
                    .into(),
            ));
        }
        b = b.with_service_account_key(key);
    }
    let client = b
        .build()
        .map_err(|e| Error::Config(format!("gcs source: {e}")))?;
    Ok(Store {
        client: Arc::new(client),
        url: format!("gs://{}", spec.bucket),
        name: spec.bucket.clone(),
    })
}
