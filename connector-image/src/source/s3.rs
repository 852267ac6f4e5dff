//! The `s3` kind: objects in an S3-compatible bucket (AWS S3, MinIO with `endpoint` and
//! `forcePathStyle`). Only the client is built here; listing, state, scale-out and decoding are the
//! shared file-source layer's ([`super::objects`]).

use object_store::aws::AmazonS3Builder;
use obsrv_crds::{S3SourceSpec, runtime::env};

use super::{SourceFactory, objects};
use crate::config::Secrets;
use crate::error::Result;

/// The bucket's client: access keys from the Secret, else the pod's identity (IRSA web identity,
/// ECS/EC2 roles, `AWS_*` variables) as the AWS SDKs find it.
pub fn store(spec: &S3SourceSpec, secrets: &Secrets) -> Result<objects::Store> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&spec.bucket)
        .with_region(&spec.region)
        .with_virtual_hosted_style_request(!spec.force_path_style);
    if let Some(ep) = &spec.endpoint {
        b = b
            .with_endpoint(ep)
            .with_allow_http(ep.starts_with("http://"));
    }
    if let (Some(k), Some(s)) = (
        secrets.get(env::SOURCE_ACCESS_KEY_ID),
        secrets.get(env::SOURCE_SECRET_ACCESS_KEY),
    ) {
        b = b.with_access_key_id(k).with_secret_access_key(s);
    }
    let url = format!("s3://{}", spec.bucket);
    objects::Store::new("s3", b.build(), url, &spec.bucket)
}

/// The `s3` kind.
pub fn factory() -> SourceFactory {
    let kind = &obsrv_crds::source::object::S3;
    objects::factory(kind, |s| s.s3.as_ref(), |s| &s.objects, store)
}
