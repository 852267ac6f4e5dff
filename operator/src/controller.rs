//! Wiring: watch Connectors (spec, finalizer and annotation changes only) and their owned objects,
//! and run the reconciler until shutdown. Secrets are not watched (nor read): pods mount them and
//! follow their rotations themselves.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Client;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::reflector;
use kube::runtime::utils::Predicate;
use kube::runtime::{Controller, WatchStreamExt, controller, predicates, watcher};
use obsrv_crds::{Connector, labels};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::reconcile::Context;
use crate::unreadable;

/// Reconciles running at once per watched scope.
pub const RECONCILE_CONCURRENCY: u16 = 32;

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs one controller per watched namespace (or one for all) until `shutdown` flips to true.
pub async fn run(ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let namespaces = ctx.config.watched_namespaces();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let runs = scopes
        .into_iter()
        .map(|ns| run_scope(ctx.clone(), ns, shutdown.clone()));
    futures::future::join_all(runs).await;
}

async fn run_scope(ctx: Arc<Context>, ns: Option<String>, mut shutdown: watch::Receiver<bool>) {
    info!(
        namespace = ns.as_deref().unwrap_or("*"),
        "watching Connectors"
    );
    let client = ctx.client.clone();
    let ns = ns.as_deref();
    let (reader, writer) = reflector::store::<DeserializeGuard<Connector>>();
    // Only spec (generation) and finalizer changes trigger: status writes, ours included, do not.
    // DeserializeGuard: one unreadable Connector is reported instead of breaking the whole watch.
    let connectors = watcher(
        api::<DeserializeGuard<Connector>>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::finalizers)
            // A new obsrv.io/retry value retries a Connector whose restart budget ran out.
            .combine(predicates::annotations),
        Default::default(),
    );
    let owned =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    Controller::for_stream(connectors, reader)
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned)
        // Bounded parallel reconciles: each polls its pods, so this also bounds outbound load.
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .graceful_shutdown_on(stop)
        .run(unreadable::reconcile, unreadable::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                // A Connector deleted while queued: nothing to do.
                Err(controller::Error::ObjectNotFound(obj)) => {
                    debug!(object = %obj, "already gone")
                }
                Err(e) => warn!(error = %e, "controller error"),
                Ok(_) => {}
            }
        })
        .await;
}
