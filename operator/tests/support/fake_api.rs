//! A small in-memory Kubernetes API for reconcile tests: a tower service behind `kube::Client` that
//! stores objects as JSON and answers get/list/create/replace/delete and apply/merge/JSON patches,
//! including the status subresource, finalizers with `deletionTimestamp`, generations and
//! owner-reference garbage collection. Every call is recorded (verb, group, resource) so tests can
//! check it against the RBAC the operator declares.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// `(group/resource, namespace, name)`.
type Key = (String, String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub verb: String,
    pub group: String,
    /// Plural, with `/status` for the subresource.
    pub resource: String,
    pub name: Option<String>,
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    key: Key,
    type_: &'static str,
    object: Value,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Default)]
pub struct FakeApi {
    objects: Mutex<BTreeMap<Key, Value>>,
    changes: Mutex<Vec<Change>>,
    changed: tokio::sync::Notify,
    calls: Mutex<Vec<Call>>,
    rv: AtomicU64,
    uid: AtomicU64,
}

struct Target {
    group: String,
    version: String,
    resource: String,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse(uri: &http::Uri) -> Option<Target> {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] => (ns.to_string(), rest),
        rest => (String::new(), rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, s] => (r.to_string(), Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let query = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    Some(Target {
        group,
        version,
        resource,
        namespace,
        name,
        sub,
        query,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "connectors" => "Connector",
        "deployments" => "Deployment",
        "configmaps" => "ConfigMap",
        "services" => "Service",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "pods" => "Pod",
        "secrets" => "Secret",
        "jobs" => "Job",
        "events" => "Event",
        "leases" => "Lease",
        _ => "Unknown",
    }
}

fn status_response(code: u16, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    });
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string().into_bytes()))
        .expect("valid response")
}

fn ok(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .body(Body::from(v.to_string().into_bytes()))
        .expect("valid response")
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
            None => true,
        })
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

impl FakeApi {
    pub fn new() -> Arc<FakeApi> {
        Arc::new(FakeApi::default())
    }

    /// A kube client talking to this fake.
    pub fn client(self: &Arc<Self>) -> Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let api = api.clone();
            async move {
                let resp = match parse(req.uri()) {
                    Some(t)
                        if req.method() == Method::GET
                            && t.name.is_none()
                            && t.query
                                .get("watch")
                                .is_some_and(|w| w == "true" || w == "1") =>
                    {
                        api.watch(t)
                    }
                    _ => api
                        .handle(req)
                        .await
                        .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        Client::new(svc, "default")
    }

    fn record(&self, type_: &'static str, key: &Key, object: &Value) {
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        self.changes.lock().expect("lock").push(Change {
            rv,
            key: key.clone(),
            type_,
            object: object.clone(),
        });
        self.changed.notify_waiters();
    }

    /// A watch: every change after the requested resourceVersion, then new ones as they happen.
    fn watch(self: &Arc<Self>, t: Target) -> Response<UnsyncBoxBody<Bytes, BoxError>> {
        self.calls.lock().expect("lock").push(Call {
            verb: "watch".into(),
            group: t.group.clone(),
            resource: t.resource.clone(),
            name: None,
        });
        let prefix = format!("{}/{}", t.group, t.resource);
        let selector = t.query.get("labelSelector").cloned().unwrap_or_default();
        let since: u64 = t
            .query
            .get("resourceVersion")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let api = self.clone();
        let ns = t.namespace.clone();
        let stream = futures::stream::unfold(since, move |last| {
            let api = api.clone();
            let prefix = prefix.clone();
            let selector = selector.clone();
            let ns = ns.clone();
            async move {
                loop {
                    let notified = api.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let next: Vec<Change> = api
                        .changes
                        .lock()
                        .expect("lock")
                        .iter()
                        .filter(|c| {
                            c.rv > last && c.key.0 == prefix && (ns.is_empty() || c.key.1 == ns)
                        })
                        .filter(|c| labels_match(&c.object, &selector))
                        .cloned()
                        .collect();
                    if !next.is_empty() {
                        let last = next.iter().map(|c| c.rv).max().unwrap_or(last);
                        let mut out = Vec::new();
                        for c in next {
                            out.extend(
                                json!({"type": c.type_, "object": c.object})
                                    .to_string()
                                    .into_bytes(),
                            );
                            out.push(b'\n');
                        }
                        return Some((
                            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(out))),
                            last,
                        ));
                    }
                    notified.await;
                }
            }
        });
        let body = StreamBody::new(stream.boxed())
            .map_err(|e: Infallible| -> BoxError { match e {} })
            .boxed_unsync();
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(body)
            .expect("valid response")
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().expect("lock").clear();
    }

    /// Calls with this verb on this resource since the last `clear_calls`.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource)
            .count()
    }

    fn next_rv(&self) -> String {
        (self.rv.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    fn key(group: &str, resource: &str, ns: &str, name: &str) -> Key {
        (
            format!("{group}/{resource}"),
            ns.to_string(),
            name.to_string(),
        )
    }

    pub fn get(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .lock()
            .expect("lock")
            .get(&Self::key(group, resource, ns, name))
            .cloned()
    }

    pub fn list(&self, group: &str, resource: &str, ns: &str) -> Vec<Value> {
        let prefix = format!("{group}/{resource}");
        self.objects
            .lock()
            .expect("lock")
            .iter()
            .filter(|((r, n, _), _)| *r == prefix && n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Stores an object as a client would create it (uid, generation 1, resourceVersion).
    pub fn create(&self, group: &str, resource: &str, ns: &str, mut obj: Value) -> Value {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let uid = format!("uid-{}", self.uid.fetch_add(1, Ordering::SeqCst) + 1);
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = json!(uid);
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        let key = Self::key(group, resource, ns, &name);
        self.objects
            .lock()
            .expect("lock")
            .insert(key.clone(), obj.clone());
        self.record("ADDED", &key, &obj);
        obj
    }

    /// Changes an object as another client would (e.g. `kubectl edit`, a kubelet updating status).
    pub fn edit(
        &self,
        group: &str,
        resource: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) {
        let mut objects = self.objects.lock().expect("lock");
        let Some(obj) = objects.get_mut(&Self::key(group, resource, ns, name)) else {
            panic!("no {group}/{resource} {ns}/{name} to edit");
        };
        let before = spec_part(obj);
        f(obj);
        if spec_part(obj) != before {
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        let changed = obj.clone();
        drop(objects);
        self.record("MODIFIED", &Self::key(group, resource, ns, name), &changed);
    }

    /// Deletes as the API server would: with finalizers only marks it, then GCs owned objects.
    pub fn delete(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let mut objects = self.objects.lock().expect("lock");
        let key = Self::key(group, resource, ns, name);
        let obj = objects.get_mut(&key)?;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:10:00Z");
                let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                obj["metadata"]["generation"] = json!(g + 1);
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                let changed = obj.clone();
                drop(objects);
                self.record("MODIFIED", &key, &changed);
                return Some(changed);
            }
            return Some(obj.clone());
        }
        let mut removed = objects.remove(&key)?;
        Self::collect_garbage(&mut objects, &removed);
        drop(objects);
        removed["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.record("DELETED", &key, &removed);
        Some(removed)
    }

    fn collect_garbage(objects: &mut BTreeMap<Key, Value>, owner: &Value) {
        let uid = owner["metadata"]["uid"].clone();
        objects.retain(|_, v| {
            !v["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|o| o.iter().any(|r| r["uid"] == uid))
        });
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let Some(t) = parse(&parts.uri) else {
            return status_response(404, "NotFound", format!("no route {}", parts.uri));
        };
        let body = match body.collect_bytes().await {
            Ok(b) => b,
            Err(e) => return status_response(400, "BadRequest", e.to_string()),
        };
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let watch = t
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1");
        let verb = match (&parts.method, &t.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if watch => "watch",
            (&Method::GET, None) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let resource = match &t.sub {
            Some(s) => format!("{}/{s}", t.resource),
            None => t.resource.clone(),
        };
        self.calls.lock().expect("lock").push(Call {
            verb: verb.into(),
            group: t.group.clone(),
            resource,
            name: t.name.clone(),
        });
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return status_response(400, "BadRequest", format!("body is not JSON: {e}"));
                }
            }
        };
        match verb {
            "get" => self.do_get(&t),
            "list" => self.do_list(&t),
            "create" => self.do_create(&t, body),
            "update" => self.do_update(&t, body),
            "patch" => self.do_patch(&t, &content_type, body),
            "delete" => match self.delete(
                &t.group,
                &t.resource,
                &t.namespace,
                t.name.as_deref().unwrap_or_default(),
            ) {
                Some(v) => ok(200, &v),
                None => status_response(404, "NotFound", format!("{} not found", t.resource)),
            },
            _ => status_response(
                405,
                "MethodNotAllowed",
                format!("{} not supported", parts.method),
            ),
        }
    }

    fn do_get(&self, t: &Target) -> Response<Body> {
        let name = t.name.as_deref().unwrap_or_default();
        match self.get(&t.group, &t.resource, &t.namespace, name) {
            Some(v) => ok(200, &v),
            None => status_response(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", t.resource),
            ),
        }
    }

    fn do_list(&self, t: &Target) -> Response<Body> {
        let selector = t.query.get("labelSelector").cloned().unwrap_or_default();
        let items: Vec<Value> = self
            .list(&t.group, &t.resource, &t.namespace)
            .into_iter()
            .filter(|o| labels_match(o, &selector))
            .collect();
        let api_version = if t.group.is_empty() {
            t.version.clone()
        } else {
            format!("{}/{}", t.group, t.version)
        };
        ok(
            200,
            &json!({
                "apiVersion": api_version,
                "kind": format!("{}List", kind_of(&t.resource)),
                "metadata": {"resourceVersion": self.rv.load(Ordering::SeqCst).to_string()},
                "items": items,
            }),
        )
    }

    fn do_create(&self, t: &Target, mut body: Value) -> Response<Body> {
        if body["metadata"]["name"].is_null() {
            let prefix = body["metadata"]["generateName"]
                .as_str()
                .unwrap_or("obj-")
                .to_string();
            body["metadata"]["name"] =
                json!(format!("{prefix}{}", self.rv.load(Ordering::SeqCst) + 1));
        }
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if self
            .get(&t.group, &t.resource, &t.namespace, &name)
            .is_some()
        {
            return status_response(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", t.resource),
            );
        }
        let created = self.create(&t.group, &t.resource, &t.namespace, body);
        ok(201, &created)
    }

    fn do_update(&self, t: &Target, body: Value) -> Response<Body> {
        let name = t.name.clone().unwrap_or_default();
        let Some(live) = self.get(&t.group, &t.resource, &t.namespace, &name) else {
            return status_response(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", t.resource),
            );
        };
        if body["metadata"]["resourceVersion"] != live["metadata"]["resourceVersion"] {
            return status_response(409, "Conflict", "the object has been modified".into());
        }
        self.edit(&t.group, &t.resource, &t.namespace, &name, |o| {
            let meta = o["metadata"].clone();
            *o = body;
            o["metadata"] = meta;
        });
        self.do_get(t)
    }

    fn do_patch(&self, t: &Target, content_type: &str, body: Value) -> Response<Body> {
        let name = t.name.clone().unwrap_or_default();
        let live = self.get(&t.group, &t.resource, &t.namespace, &name);
        let status_only = t.sub.as_deref() == Some("status");
        if content_type.starts_with("application/apply-patch") {
            let Some(_) = live else {
                if status_only {
                    return status_response(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", t.resource),
                    );
                }
                let mut obj = body;
                obj["metadata"]["name"] = json!(name);
                let created = self.create(&t.group, &t.resource, &t.namespace, obj);
                return ok(201, &created);
            };
            self.edit(&t.group, &t.resource, &t.namespace, &name, |o| {
                if status_only {
                    o["status"] = body["status"].clone();
                    return;
                }
                // The operator is the only field manager: its applied fields replace the live ones;
                // server-set metadata and status stay.
                let mut next = body.clone();
                for k in [
                    "uid",
                    "generation",
                    "creationTimestamp",
                    "resourceVersion",
                    "deletionTimestamp",
                    "namespace",
                ] {
                    if !o["metadata"][k].is_null() {
                        next["metadata"][k] = o["metadata"][k].clone();
                    }
                }
                if next["metadata"]["finalizers"].is_null()
                    && !o["metadata"]["finalizers"].is_null()
                {
                    next["metadata"]["finalizers"] = o["metadata"]["finalizers"].clone();
                }
                if !o["status"].is_null() {
                    next["status"] = o["status"].clone();
                }
                *o = next;
            });
            return self.do_get(t);
        }
        let Some(mut obj) = live else {
            return status_response(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", t.resource),
            );
        };
        if content_type.starts_with("application/json-patch") {
            let mut patch: json_patch::Patch = match serde_json::from_value(body) {
                Ok(p) => p,
                Err(e) => return status_response(400, "BadRequest", e.to_string()),
            };
            // Like the API server, a `test` for null passes on a missing field.
            patch.0.retain(|op| match op {
                json_patch::PatchOperation::Test(t) if t.value.is_null() => {
                    !obj.pointer(t.path.as_str()).is_none_or(Value::is_null)
                }
                _ => true,
            });
            if let Err(e) = json_patch::patch(&mut obj, &patch) {
                return status_response(422, "Invalid", e.to_string());
            }
        } else {
            merge(&mut obj, &body);
        }
        self.edit(&t.group, &t.resource, &t.namespace, &name, |o| {
            let meta_rv = o["metadata"]["resourceVersion"].clone();
            *o = obj;
            o["metadata"]["resourceVersion"] = meta_rv;
        });
        // A deleted object whose last finalizer was removed goes away.
        if let Some(v) = self.get(&t.group, &t.resource, &t.namespace, &name)
            && !v["metadata"]["deletionTimestamp"].is_null()
            && v["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        {
            let key = Self::key(&t.group, &t.resource, &t.namespace, &name);
            let mut objects = self.objects.lock().expect("lock");
            if let Some(mut removed) = objects.remove(&key) {
                Self::collect_garbage(&mut objects, &removed);
                drop(objects);
                removed["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.record("DELETED", &key, &removed);
                return ok(200, &removed);
            }
        }
        self.do_get(t)
    }
}
