//! The `s3` kind: objects in an S3-compatible bucket (AWS S3, MinIO with `endpoint` and
//! `forcePathStyle`). Only the client is built here; listing, state, scale-out and decoding are the
//! shared file-source layer's ([`super::objects`]).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use obsrv_crds::{S3SourceSpec, runtime::env};

use super::{
    OpenContext, SourceFactory,
    objects::{ObjectSource, Store},
};
use crate::{
    config::Secrets,
    error::{Error, Result},
};

/// The `s3` kind. Positions are kept per shard by the file-source layer itself.
pub fn factory() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::object::S3.name, open).keeping_own_positions()
}

async fn open(ctx: OpenContext) -> Result<ObjectSource> {
    let spec = ctx
        .config
        .spec
        .source
        .s3
        .as_ref()
        .ok_or_else(|| Error::Config("the spec names another source kind".into()))?;
    ObjectSource::open(&ctx, store(spec, &ctx.secrets)?, &spec.objects).await
}

/// The bucket's client: access keys from the Secret, else the pod's identity (IRSA web identity,
/// ECS/EC2 roles, `AWS_*` variables) as the AWS SDKs find it.
pub fn store(spec: &S3SourceSpec, secrets: &Secrets) -> Result<Store> {
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
    let client = b
        .build()
        .map_err(|e| Error::Config(format!("s3 source: {e}")))?;
    Ok(Store {
        client: Arc::new(client),
        url: format!("s3://{}", spec.bucket),
        name: spec.bucket.clone(),
    })
}
