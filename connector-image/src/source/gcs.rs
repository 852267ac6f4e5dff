//! The `gcs` kind: objects in a Google Cloud Storage bucket. Only the client is built here;
//! listing, state, scale-out and decoding are the shared file-source layer's ([`super::objects`]).

use object_store::gcp::GoogleCloudStorageBuilder;
use obsrv_crds::{GcsSourceSpec, runtime::env};

use super::{SourceFactory, objects};
use crate::config::Secrets;
use crate::error::{Error, Result};

/// The bucket's client: a service-account key from the Secret, else the pod's identity
/// (`GOOGLE_APPLICATION_CREDENTIALS`, or the metadata server: GKE Workload Identity).
pub fn store(spec: &GcsSourceSpec, secrets: &Secrets) -> Result<objects::Store> {
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
    let url = format!("gs://{}", spec.bucket);
    objects::Store::new("gcs", b.build(), url, &spec.bucket)
}

/// The `gcs` kind.
pub fn factory() -> SourceFactory {
    let kind = &obsrv_crds::source::object::GCS;
    objects::factory(kind, |s| s.gcs.as_ref(), |s| &s.objects, store)
}
