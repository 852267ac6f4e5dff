//! The control plane's API server without a socket, for tests of a client (the operator's
//! reconcile tests and its cold-start bench): the same router and store behind a `kube::Client`
//! as a tower service, every call recorded, and direct access to the stored objects for the test
//! to play the other actors (a kubelet, the Deployment controller, a user).
//!
//! Unlike [`super::ControlPlane`], garbage collection runs before the response of the request that
//! removed an owner, not on a timer: a test sees the owned objects gone as soon as its call
//! returns.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{Request, Response};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::calls::{Call, CallLog};
use super::error::ApiResult;
use super::server::{self, App};
use super::store::{DeleteOptions, Store, WriteOptions};

/// An API server in this process. Cheap to clone (shared state).
#[derive(Clone)]
pub struct InProcessApi {
    app: Arc<App>,
    calls: Arc<CallLog>,
}

impl Default for InProcessApi {
    fn default() -> Self {
        InProcessApi::new()
    }
}

impl InProcessApi {
    /// An empty cluster (the `default` and `kube-*` namespaces, the built-in kinds). Pods are
    /// deleted at once: no kubelet runs here.
    pub fn new() -> InProcessApi {
        let calls = Arc::new(CallLog::default());
        let app = Arc::new(App {
            store: Store::new(10_000, false),
            address: "in-process".into(),
            logs: std::env::temp_dir(),
            calls: Some(calls.clone()),
        });
        InProcessApi { app, calls }
    }

    /// A client whose requests this API serves (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        kube::Client::new(
            Service {
                router: server::router(self.app.clone()),
                store: self.app.store.clone(),
            },
            "default",
        )
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.app.store
    }

    /// Every API call the clients made, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.calls()
    }

    pub fn clear_calls(&self) {
        self.calls.clear()
    }

    /// Calls with this verb on this resource (`connectors/status` for a subresource) since the
    /// last [`InProcessApi::clear_calls`].
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.calls.count(verb, resource)
    }

    /// Creates a namespace (no error when it exists).
    pub fn namespace(&self, name: &str) {
        let _ = self.try_create(
            "",
            "namespaces",
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        );
    }

    /// Creates an object as a client's POST would (validated, defaulted; a CRD starts serving its
    /// kind). Panics when the API refuses it: a test's own objects are meant to be valid.
    pub fn create(&self, group: &str, plural: &str, ns: &str, obj: Value) -> Value {
        self.try_create(group, plural, ns, obj)
            .unwrap_or_else(|e| panic!("creating {group}/{plural} in {ns:?}: {e}"))
    }

    /// [`InProcessApi::create`] that returns the API's refusal.
    pub fn try_create(&self, group: &str, plural: &str, ns: &str, obj: Value) -> ApiResult<Value> {
        let rt = self.resource(group, plural);
        self.store().create(&rt, ns, obj, &WriteOptions::default())
    }

    /// Writes an object as stored data, around validation and subresource rules
    /// ([`Store::put`]): a pod's status as a kubelet reports it, a spec no schema would accept.
    pub fn put(&self, group: &str, plural: &str, ns: &str, obj: Value) -> Value {
        let rt = self.resource(group, plural);
        self.store().put(&rt, ns, obj)
    }

    /// Changes a stored object with `f` and [`InProcessApi::put`]s it. Panics when it does not exist.
    pub fn edit(
        &self,
        group: &str,
        plural: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) {
        let mut obj = self
            .get(group, plural, ns, name)
            .unwrap_or_else(|| panic!("no {group}/{plural} {ns}/{name} to edit"));
        f(&mut obj);
        self.put(group, plural, ns, obj);
    }

    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = self.resource(group, plural);
        self.store().get(&rt, ns, name).ok()
    }

    /// Objects of a resource in one namespace.
    pub fn list(&self, group: &str, plural: &str, ns: &str) -> Vec<Value> {
        let rt = self.resource(group, plural);
        self.store().list(&rt, Some(ns), &Default::default()).0
    }

    /// Deletes as a client's DELETE would: an object with finalizers is only marked; what it owned
    /// is garbage-collected before this returns. The object as the API returned it, if it existed.
    pub fn delete(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = self.resource(group, plural);
        let out = self
            .store()
            .delete(&rt, ns, name, &DeleteOptions::default())
            .ok();
        collect_garbage(self.store());
        out
    }

    fn resource(&self, group: &str, plural: &str) -> Arc<super::registry::ResourceType> {
        self.store()
            .resource(group, plural)
            .unwrap_or_else(|| panic!("the API does not serve {group}/{plural}"))
    }
}

/// Runs the garbage collector until nothing is left to collect, when an object was removed.
fn collect_garbage(store: &Store) {
    if store.take_removed() {
        while store.collect_garbage() > 0 {}
        store.take_removed();
    }
}

/// The router, with garbage collection after each request that removed something.
#[derive(Clone)]
struct Service {
    router: axum::Router,
    store: Arc<Store>,
}

impl tower::Service<Request<kube::client::Body>> for Service {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let router = self.router.clone();
        let store = self.store.clone();
        Box::pin(async move {
            let resp = tower::ServiceExt::oneshot(router, req.map(Body::new)).await;
            collect_garbage(&store);
            resp
        })
    }
}
