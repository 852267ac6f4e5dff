//! The in-memory object store and the API semantics on top of it: resource versions, watch history,
//! generation, status and scale subresources, finalizers, validation, CRD registration.
//!
//! Every write happens under one lock, so a read-modify-write (patch, apply, scale) is atomic and
//! resource versions are a single increasing counter, as with etcd.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::error::{ApiError, ApiResult, Cause};
use super::patch::{self, ApplyRequest};
use super::registry::{Registry, ResKey, ResourceType, from_crd};
use obsrv_crds::schema::{self, UnknownFields};

/// `spec.nodeName` of pods the local kubelet runs.
pub const NODE_NAME: &str = "obsrv-local";

/// One change to the store, as watchers see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub key: ResKey,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub namespace: String,
    pub object: Value,
    /// The object before the change (to tell watchers with a selector that it left their view).
    pub old: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    Scale,
}

/// PATCH body types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// Options of a write request.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub field_manager: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub unknown_fields: UnknownFields,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            field_manager: None,
            force: false,
            dry_run: false,
            unknown_fields: UnknownFields::Prune,
        }
    }
}

/// `DeleteOptions` that matter here.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    /// `Orphan` strips owner references from dependents; anything else lets the garbage collector
    /// delete them in the background (`Foreground` is treated as `Background`).
    pub propagation: Option<String>,
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    pub labels: Vec<LabelRequirement>,
    pub fields: Vec<(String, bool, String)>,
}

#[derive(Clone, Debug)]
pub enum LabelRequirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> ApiResult<Self> {
        let mut s = Selectors::default();
        if let Some(l) = labels.filter(|l| !l.trim().is_empty()) {
            s.labels = parse_label_selector(l)?;
        }
        for term in fields
            .into_iter()
            .flat_map(|f| f.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (k, neg, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, false, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector {term:?}"
                )));
            };
            s.fields
                .push((k.trim().to_string(), neg, v.trim().to_string()));
        }
        Ok(s)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelRequirement::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, neg, want)| {
                let got = path.split('.').try_fold(obj, |v, k| v.get(k));
                let got = match got {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                };
                (got == *want) != *neg
            })
    }
}

/// Parses a label selector (`a=b,c!=d,e in (x,y),f notin (z),g,!h`).
pub fn parse_label_selector(s: &str) -> ApiResult<Vec<LabelRequirement>> {
    let bad = || {
        ApiError::BadRequest(format!(
            "unable to parse requirement: invalid label selector {s:?}"
        ))
    };
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    terms.push(cur);
    let mut out = Vec::new();
    for t in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let set = |rest: &str| -> ApiResult<Vec<String>> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        if let Some((k, rest)) = t.split_once(" notin ") {
            out.push(LabelRequirement::NotIn(k.trim().into(), set(rest)?));
        } else if let Some((k, rest)) = t.split_once(" in ") {
            out.push(LabelRequirement::In(k.trim().into(), set(rest)?));
        } else if let Some((k, v)) = t.split_once("!=") {
            out.push(LabelRequirement::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            out.push(LabelRequirement::Eq(k.trim().into(), v.trim().into()));
        } else if let Some(k) = t.strip_prefix('!') {
            out.push(LabelRequirement::NotExists(k.trim().into()));
        } else if t.chars().all(|c| c.is_alphanumeric() || "-_./".contains(c)) {
            out.push(LabelRequirement::Exists(t.into()));
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug)]
pub enum WatchFrom {
    /// No resourceVersion (or "0"): synthetic ADDED events for what exists, then changes.
    Now,
    /// Changes after this resourceVersion; 410 Gone when the history no longer reaches back to it.
    Version(u64),
}

/// What a new watch starts with.
pub struct WatchStart {
    /// Objects sent as ADDED first (for [`WatchFrom::Now`]).
    pub initial: Vec<Value>,
    /// Changes since the requested version that happened before the watch subscribed.
    pub backlog: Vec<Arc<Change>>,
    pub receiver: broadcast::Receiver<Arc<Change>>,
    pub current_rv: u64,
}

type Objects = BTreeMap<(String, String), Value>;

struct State {
    rv: u64,
    registry: Registry,
    objects: HashMap<ResKey, Objects>,
    history: VecDeque<Arc<Change>>,
    history_cap: usize,
    /// Highest resource version whose change fell out of the history.
    compacted: u64,
}

/// The API's storage and write semantics. Cheap to share (`Arc`).
pub struct Store {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    /// When set, pods bound to the local kubelet are deleted gracefully (the kubelet stops the process,
    /// then removes the pod).
    graceful_pods: bool,
    /// Set when an object is removed: the garbage collector has work.
    removed: std::sync::atomic::AtomicBool,
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    let mut b = [0u8; 16];
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&random_u64(i as u64).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Random bits from the standard library's randomly keyed hasher (no extra dependency).
pub fn random_u64(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Five lowercase alphanumerics, as `generateName` appends.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64(7);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// The object without `metadata` and `status`: what a generation bump is about.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Equal apart from the fields every write touches.
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        let m = meta_mut(&mut v);
        m.remove("resourceVersion");
        if let Some(Value::Array(fields)) = m.get_mut("managedFields") {
            for f in fields {
                if let Value::Object(f) = f {
                    f.remove("time");
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a `.a.b.c` path.
pub fn get_dotted<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches('.')
        .split('.')
        .try_fold(obj, |v, k| v.get(k))
}

/// Writes a `.a.b.c` path, creating objects on the way.
pub fn set_dotted(obj: &mut Value, path: &str, value: Value) {
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut node = obj;
    for (i, p) in parts.iter().enumerate() {
        if !node.is_object() {
            *node = json!({});
        }
        let Value::Object(m) = node else { return };
        if i == parts.len() - 1 {
            m.insert(p.to_string(), value);
            return;
        }
        node = m.entry(p.to_string()).or_insert_with(|| json!({}));
    }
}

fn dns_subdomain_error(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        format!(
            "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    })
}

impl Store {
    pub fn new(history_cap: usize, graceful_pods: bool) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        let mut objects: HashMap<ResKey, Objects> = HashMap::new();
        let ns_key = ResKey {
            group: String::new(),
            plural: "namespaces".into(),
        };
        let ts = now();
        for (i, ns) in ["default", "kube-system", "kube-public", "kube-node-lease"]
            .iter()
            .enumerate()
        {
            let obj = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": new_uid(), "resourceVersion": (i + 1).to_string(), "creationTimestamp": ts,
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            objects
                .entry(ns_key.clone())
                .or_default()
                .insert((String::new(), ns.to_string()), obj);
        }
        Arc::new(Store {
            state: Mutex::new(State {
                rv: 4,
                registry: Registry::with_builtins(),
                objects,
                history: VecDeque::new(),
                history_cap: history_cap.max(1),
                compacted: 4,
            }),
            changes,
            graceful_pods,
            removed: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (writes are single assignments).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.lock().registry.get(group, version, plural)
    }

    /// The served resource `plural` of `group` (`""` for the core group), at its one version.
    pub fn resource(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.lock().registry.by_key(&ResKey {
            group: group.into(),
            plural: plural.into(),
        })
    }

    /// Whether an object was removed since the last call: garbage collection has work.
    pub fn take_removed(&self) -> bool {
        self.removed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Subscribes to every change (controllers use this to wake up).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Forgets the watch history, so any watch from an older resourceVersion gets 410 Gone
    /// (what etcd compaction does).
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.compacted = st.rv;
    }

    fn record(
        &self,
        st: &mut State,
        key: &ResKey,
        kind: &'static str,
        object: Value,
        old: Option<Value>,
    ) {
        let change = Arc::new(Change {
            rv: st.rv,
            key: key.clone(),
            kind,
            namespace: meta_str(&object, "namespace").unwrap_or("").to_string(),
            object,
            old,
        });
        st.history.push_back(change.clone());
        while st.history.len() > st.history_cap {
            if let Some(c) = st.history.pop_front() {
                st.compacted = c.rv;
            }
        }
        // No receivers is fine.
        let _ = self.changes.send(change);
    }

    /// The object as the resource type `rt` shows it (Events convert between v1 and events.k8s.io/v1).
    pub fn present(obj: &Value, rt: &ResourceType) -> Value {
        let stored_as = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if rt.kind == "Event" && stored_as == "events.k8s.io/v1" && rt.is_core_event() {
            return super::events::to_core(obj);
        }
        if rt.kind == "Event" && stored_as == "v1" && rt.group == "events.k8s.io" {
            return super::events::from_core(obj);
        }
        let mut o = obj.clone();
        o["apiVersion"] = json!(rt.api_version());
        o["kind"] = json!(rt.kind);
        o
    }

    /// The form an object is stored in.
    fn storage_form(obj: &Value, rt: &ResourceType) -> Value {
        if rt.is_core_event() {
            super::events::from_core(&Self::present(obj, rt))
        } else {
            Self::present(obj, rt)
        }
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
        let st = self.lock();
        let ns = if rt.namespaced { ns } else { "" };
        st.objects
            .get(&rt.key())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|o| Self::present(o, rt))
            .ok_or_else(|| ApiError::not_found(&rt.qualified_plural(), name))
    }

    /// Objects of one resource (all namespaces when `ns` is `None`) and the current resourceVersion.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> (Vec<Value>, u64) {
        let st = self.lock();
        let items = st
            .objects
            .get(&rt.key())
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|((o_ns, _), _)| !rt.namespaced || ns.is_none_or(|n| n == o_ns))
            .map(|(_, o)| Self::present(o, rt))
            .filter(|o| sel.matches(o))
            .collect();
        (items, st.rv)
    }

    /// Every stored object of every resource (for the garbage collector).
    pub fn snapshot(&self) -> Vec<(Arc<ResourceType>, Value)> {
        let st = self.lock();
        let mut out = Vec::new();
        for (key, objs) in &st.objects {
            if let Some(rt) = st.registry.by_key(key) {
                out.extend(objs.values().map(|o| (rt.clone(), Self::present(o, &rt))));
            }
        }
        out
    }

    pub fn watch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        from: WatchFrom,
    ) -> ApiResult<WatchStart> {
        let st = self.lock();
        let receiver = self.changes.subscribe();
        let key = rt.key();
        let in_scope = |c: &Change| c.key == key && ns.is_none_or(|n| c.namespace == n);
        match from {
            WatchFrom::Now => {
                let initial = st
                    .objects
                    .get(&key)
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .filter(|((o_ns, _), _)| !rt.namespaced || ns.is_none_or(|n| n == o_ns))
                    .map(|(_, o)| Self::present(o, rt))
                    .collect();
                Ok(WatchStart {
                    initial,
                    backlog: vec![],
                    receiver,
                    current_rv: st.rv,
                })
            }
            WatchFrom::Version(v) if v < st.compacted => Err(ApiError::Gone(format!(
                "too old resource version: {v} ({})",
                st.compacted + 1
            ))),
            // A version this store never issued (e.g. from before a restart of the control plane):
            // changes up to it would be lost silently, so make the client list again.
            WatchFrom::Version(v) if v > st.rv => Err(ApiError::Gone(format!(
                "too large resource version: {v}, current: {}",
                st.rv
            ))),
            WatchFrom::Version(v) => {
                let backlog = st
                    .history
                    .iter()
                    .filter(|c| c.rv > v && in_scope(c))
                    .cloned()
                    .collect();
                Ok(WatchStart {
                    initial: vec![],
                    backlog,
                    receiver,
                    current_rv: st.rv,
                })
            }
        }
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let mut st = self.lock();
        let rt = st
            .registry
            .get(&rt.group, &rt.version, &rt.plural)
            .unwrap_or_else(|| Arc::new(rt.clone()));
        if !obj.is_object() {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        let meta = meta_mut(&mut obj);
        let name = match (
            meta.get("name").and_then(Value::as_str),
            meta.get("generateName").and_then(Value::as_str),
        ) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => format!("{g}{}", random_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
        };
        let ns = if rt.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::BadRequest(format!(
                        "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                    )));
                }
                _ => ns.to_string(),
            }
        } else {
            String::new()
        };
        if let Some(e) = dns_subdomain_error(&name) {
            return Err(ApiError::invalid(
                &rt.kind,
                &rt.group,
                &name,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    field: "metadata.name".into(),
                    message: e,
                }],
            ));
        }
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        meta.remove("resourceVersion");
        meta.remove("selfLink");
        if rt.generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        if rt.namespaced {
            let ns_obj = st
                .objects
                .get(&ResKey {
                    group: String::new(),
                    plural: "namespaces".into(),
                })
                .and_then(|m| m.get(&(String::new(), ns.clone())));
            match ns_obj {
                None => return Err(ApiError::not_found("namespaces", &ns)),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::Invalid {
                        message: format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            rt.qualified_plural()
                        ),
                        kind: rt.kind.clone(),
                        name: name.clone(),
                        group: rt.group.clone(),
                        causes: vec![],
                    });
                }
                Some(_) => {}
            }
        }
        let key = rt.key();
        if st
            .objects
            .get(&key)
            .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
        {
            return Err(ApiError::already_exists(&rt.qualified_plural(), &name));
        }
        if rt.status_subresource
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        let mut obj = self.validate(&st, &rt, &name, obj, None, Sub::Main, opts)?;
        defaults_on_create(&rt, &mut obj);
        if opts.dry_run {
            return Ok(Self::present(&obj, &rt));
        }
        let obj = self.store(&mut st, &rt, &ns, &name, obj, None);
        Ok(Self::present(&obj, &rt))
    }

    /// Validation and admission-time side checks shared by create and update. A write to the status
    /// subresource is validated against the schema of `.status` only, as the API server does.
    #[allow(clippy::too_many_arguments)]
    fn validate(
        &self,
        st: &State,
        rt: &ResourceType,
        name: &str,
        obj: Value,
        old: Option<&Value>,
        sub: Sub,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let mut obj = Self::present(&obj, rt);
        if let Some(schema) = &rt.schema {
            let status_only = sub == Sub::Status;
            obj = match &rt.rules {
                Some(rules) => rules.validate(schema, &obj, old, opts.unknown_fields, status_only),
                None => schema::validate(schema, &obj, old, opts.unknown_fields),
            }
            .map_err(|c| {
                let causes = c.into_iter().map(Cause::from).collect();
                ApiError::invalid(&rt.kind, &rt.group, name, causes)
            })?;
        }
        if rt.kind == "CustomResourceDefinition" {
            let types = from_crd(&obj).map_err(|m| {
                ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    name,
                    vec![Cause {
                        reason: "FieldValueInvalid".into(),
                        field: "spec".into(),
                        message: m,
                    }],
                )
            })?;
            for t in &types {
                if let Some(existing) = st.registry.get(&t.group, &t.version, &t.plural)
                    && existing.crd.as_deref() != Some(name)
                {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        &rt.group,
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            field: "spec.names.plural".into(),
                            message: format!(
                                "{}/{} {} is already served",
                                t.group, t.version, t.plural
                            ),
                        }],
                    ));
                }
            }
        }
        if rt.schema.is_none() {
            for field in ["spec", "data", "stringData", "binaryData"] {
                if obj
                    .get(field)
                    .is_some_and(|v| !v.is_object() && !v.is_null())
                {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        &rt.group,
                        name,
                        vec![Cause {
                            reason: "FieldValueTypeInvalid".into(),
                            field: field.into(),
                            message: format!("Invalid value: {}: must be an object", obj[field]),
                        }],
                    ));
                }
            }
        }
        if rt.kind == "Secret" {
            for (k, v) in obj
                .get("data")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let ok = v.as_str().is_some_and(|s| {
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).is_ok()
                });
                if !ok {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        "",
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            field: format!("data[{k}]"),
                            message: "Invalid value: must be base64 encoded".into(),
                        }],
                    ));
                }
            }
        }
        if let Value::Object(m) = &mut obj {
            // stringData is write-only: fold it into data like the API server does.
            if rt.kind == "Secret"
                && let Some(Value::Object(sd)) = m.remove("stringData")
            {
                let data = m.entry("data").or_insert_with(|| json!({}));
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or_default();
                    data[k] = json!(base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        s
                    ));
                }
            }
        }
        Ok(obj)
    }

    /// Writes the object at a new resource version and runs the write's side effects.
    fn store(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        old: Option<Value>,
    ) -> Value {
        st.rv += 1;
        let rv = st.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let stored = Self::storage_form(&obj, rt);
        st.objects
            .entry(rt.key())
            .or_default()
            .insert((ns.to_string(), name.to_string()), stored.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        if rt.kind == "CustomResourceDefinition" {
            self.register_crd(st, name, &stored);
        }
        let stored = if rt.kind == "CustomResourceDefinition" {
            st.objects
                .get(&rt.key())
                .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
                .cloned()
                .unwrap_or(stored)
        } else {
            stored
        };
        let old = old.map(|o| Self::storage_form(&o, rt));
        self.record(st, &rt.key(), kind, stored.clone(), old);
        Self::present(&stored, rt)
    }

    /// Serves the CRD's kinds and marks it Established (status written at the same resourceVersion).
    fn register_crd(&self, st: &mut State, name: &str, crd: &Value) {
        let Ok(types) = from_crd(crd) else { return };
        st.registry.remove_crd(name);
        for t in types {
            st.registry.insert(t);
        }
        let ts = now();
        let mut crd = crd.clone();
        crd["status"] = json!({
            "acceptedNames": crd["spec"]["names"],
            "storedVersions": crd["spec"]["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"] == json!(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": ts},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": ts},
            ],
        });
        let key = ResKey {
            group: "apiextensions.k8s.io".into(),
            plural: "customresourcedefinitions".into(),
        };
        st.objects
            .entry(key)
            .or_default()
            .insert((String::new(), name.to_string()), crd);
    }

    fn current(st: &State, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
        st.objects
            .get(&rt.key())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|o| Self::present(o, rt))
            .ok_or_else(|| ApiError::not_found(&rt.qualified_plural(), name))
    }

    /// The `autoscaling/v1` Scale view of an object.
    pub fn scale_of(rt: &ResourceType, obj: &Value) -> ApiResult<Value> {
        let paths = rt
            .scale
            .as_ref()
            .ok_or_else(|| ApiError::not_found(&format!("{}/scale", rt.qualified_plural()), ""))?;
        let selector = match &paths.label_selector {
            Some(p) => get_dotted(obj, p).cloned().unwrap_or(json!("")),
            // Deployments: the selector's matchLabels as a string.
            None => {
                let labels = obj
                    .pointer("/spec/selector/matchLabels")
                    .and_then(Value::as_object);
                json!(
                    labels
                        .map(|l| l
                            .iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default()
                )
            }
        };
        let spec_replicas = get_dotted(obj, &paths.spec_replicas)
            .and_then(Value::as_i64)
            .unwrap_or(if rt.kind == "Deployment" { 1 } else { 0 });
        Ok(json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"], "creationTimestamp": obj["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": spec_replicas},
            "status": {"replicas": get_dotted(obj, &paths.status_replicas).and_then(Value::as_i64).unwrap_or(0), "selector": selector},
        }))
    }

    /// Writes `obj` as stored data, around validation, admission and subresource rules: what a test
    /// does to play another actor (a kubelet reporting pod status, a controller updating a
    /// Deployment's status, an object written before its schema changed). A new object gets a uid,
    /// a creation time and generation 1; an update keeps the stored identity and bumps the
    /// generation when anything but metadata and status changed. Watchers see the change.
    pub fn put(&self, rt: &ResourceType, ns: &str, mut obj: Value) -> Value {
        let ns = if rt.namespaced { ns } else { "" };
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let mut st = self.lock();
        let current = Self::current(&st, rt, ns, &name).ok();
        let changed_spec = current
            .as_ref()
            .is_none_or(|c| spec_part(c) != spec_part(&obj));
        let m = meta_mut(&mut obj);
        if rt.namespaced {
            m.insert("namespace".into(), json!(ns));
        }
        match &current {
            Some(c) => {
                for f in ["uid", "creationTimestamp", "generation"] {
                    match c.pointer(&format!("/metadata/{f}")) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                if rt.generation && changed_spec {
                    let g = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                    m.insert("generation".into(), json!(g + 1));
                }
            }
            None => {
                m.insert("uid".into(), json!(new_uid()));
                m.insert("creationTimestamp".into(), json!(now()));
                if rt.generation {
                    m.insert("generation".into(), json!(1));
                }
            }
        }
        self.store(&mut st, rt, ns, &name, obj, current)
    }

    /// PUT of the object (or its status / scale).
    pub fn replace(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let ns = if rt.namespaced { ns } else { "" };
        if body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_some_and(|n| n != name)
        {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                body["metadata"]["name"]
            )));
        }
        let mut st = self.lock();
        let current = Self::current(&st, rt, ns, name)?;
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        self.update_locked(&mut st, rt, ns, name, current, body, sub, opts)
    }

    /// PATCH of the object (or its status / scale). An apply patch creates the object if missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        ptype: PatchType,
        body: &[u8],
        sub: Sub,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let ns = if rt.namespaced { ns } else { "" };
        let mut st = self.lock();
        let current = match Self::current(&st, rt, ns, name) {
            Ok(c) => c,
            Err(e) if ptype == PatchType::Apply && sub == Sub::Main => {
                drop(st);
                let applied = parse_apply(body)?;
                check_apply_identity(rt, name, &applied)?;
                let manager = opts.field_manager.as_deref().ok_or_else(|| {
                    ApiError::BadRequest("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into())
                })?;
                let mut obj = patch::server_side_apply(
                    &json!({"metadata": {}}),
                    &ApplyRequest {
                        manager,
                        force: opts.force,
                        applied: &applied,
                        subresource: "",
                        api_version: &rt.api_version(),
                        now: &now(),
                    },
                )?;
                meta_mut(&mut obj).insert("name".into(), json!(name));
                let _ = e;
                return self.create(rt, ns, obj, opts);
            }
            Err(e) => return Err(e),
        };
        let target = if sub == Sub::Scale {
            Self::scale_of(rt, &current)?
        } else {
            current.clone()
        };
        let patched = match ptype {
            PatchType::Json => patch::json_patch(&target, body)?,
            PatchType::Merge => patch::merge_patch(&target, body)?,
            PatchType::Strategic => {
                if rt.schema.is_some() {
                    return Err(ApiError::UnsupportedMediaType(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
                    ));
                }
                patch::strategic_merge_patch(&target, body)?
            }
            PatchType::Apply => {
                let applied = parse_apply(body)?;
                check_apply_identity(rt, name, &applied)?;
                let manager = opts.field_manager.as_deref().ok_or_else(|| {
                    ApiError::BadRequest("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into())
                })?;
                let mut applied = applied;
                if sub == Sub::Status {
                    // Only .status of an apply to /status counts.
                    applied = json!({"metadata": applied.get("metadata").cloned().unwrap_or(json!({})), "status": applied.get("status").cloned().unwrap_or(json!({}))});
                } else if rt.status_subresource
                    && let Value::Object(m) = &mut applied
                {
                    m.remove("status");
                }
                patch::server_side_apply(
                    &target,
                    &ApplyRequest {
                        manager,
                        force: opts.force,
                        applied: &applied,
                        subresource: if sub == Sub::Status { "status" } else { "" },
                        api_version: &rt.api_version(),
                        now: &now(),
                    },
                )?
            }
        };
        if let Some(rv) = meta_str(&patched, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        self.update_locked(&mut st, rt, ns, name, current, patched, sub, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        current: Value,
        body: Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        if !body.is_object() {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        let rt = st
            .registry
            .get(&rt.group, &rt.version, &rt.plural)
            .unwrap_or_else(|| Arc::new(rt.clone()));
        let mut new = match sub {
            Sub::Main => {
                let mut new = body;
                if rt.status_subresource {
                    match current.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Value::Object(m) = &mut new {
                                m.remove("status");
                            }
                        }
                    }
                }
                new
            }
            Sub::Status => {
                let mut new = current.clone();
                match body.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut new {
                            m.remove("status");
                        }
                    }
                }
                if let Some(mf) = body.pointer("/metadata/managedFields") {
                    new["metadata"]["managedFields"] = mf.clone();
                }
                new
            }
            Sub::Scale => {
                let paths = rt.scale.clone().ok_or_else(|| {
                    ApiError::not_found(&format!("{}/scale", rt.qualified_plural()), name)
                })?;
                let replicas = body
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "Scale",
                        "autoscaling",
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            field: "spec.replicas".into(),
                            message: format!(
                                "Invalid value: {replicas}: must be greater than or equal to 0"
                            ),
                        }],
                    ));
                }
                let mut new = current.clone();
                set_dotted(&mut new, &paths.spec_replicas, json!(replicas));
                new
            }
        };
        // Identity fields never change through an update.
        {
            let cm = current["metadata"].clone();
            let m = meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cm.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("resourceVersion");
        }
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !finalizers(&current).contains(f))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    name,
                    vec![Cause {
                        reason: "FieldValueForbidden".into(),
                        field: "metadata.finalizers".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    }],
                ));
            }
        }
        let mut new = self.validate(st, &rt, name, new, Some(&current), sub, opts)?;
        if rt.generation && spec_part(&new) != spec_part(&current) {
            let g = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        if same_content(&new, &current) {
            return Ok(Self::present(&current, &rt));
        }
        if opts.dry_run {
            let mut new = new;
            if let Some(rv) = current.pointer("/metadata/resourceVersion").cloned() {
                meta_mut(&mut new).insert("resourceVersion".into(), rv);
            }
            return Ok(Self::present(&new, &rt));
        }
        if new.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            return Ok(self.remove(st, &rt, ns, name, Some(new)));
        }
        Ok(self.store(st, &rt, ns, name, new, Some(current)))
    }

    /// Removes the object for good (DELETED event); returns its last state.
    fn remove(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        last: Option<Value>,
    ) -> Value {
        let removed = st
            .objects
            .get_mut(&rt.key())
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())));
        self.removed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut obj = last.or(removed.clone()).unwrap_or(Value::Null);
        st.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(st.rv.to_string()));
        if rt.kind == "CustomResourceDefinition" {
            st.registry.remove_crd(name);
            if let Some(group) = obj.pointer("/spec/group").and_then(Value::as_str)
                && let Some(plural) = obj.pointer("/spec/names/plural").and_then(Value::as_str)
            {
                let key = ResKey {
                    group: group.into(),
                    plural: plural.into(),
                };
                if let Some(instances) = st.objects.remove(&key) {
                    for (_, o) in instances {
                        st.rv += 1;
                        let mut o = o;
                        meta_mut(&mut o).insert("resourceVersion".into(), json!(st.rv.to_string()));
                        self.record(st, &key, "DELETED", o, None);
                    }
                }
            }
        }
        let stored = Self::storage_form(&obj, rt);
        self.record(st, &rt.key(), "DELETED", stored.clone(), removed);
        Self::present(&stored, rt)
    }

    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        let ns = if rt.namespaced { ns } else { "" };
        let mut st = self.lock();
        let current = Self::current(&st, rt, ns, name)?;
        if let Some(uid) = &opts.precondition_uid
            && Some(uid.as_str()) != meta_str(&current, "uid")
        {
            return Err(ApiError::Conflict(format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                rt.qualified_plural(),
                meta_str(&current, "uid").unwrap_or("")
            )));
        }
        if let Some(rv) = &opts.precondition_rv
            && Some(rv.as_str()) != meta_str(&current, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        if opts.dry_run {
            return Ok(Self::present(&current, rt));
        }
        if opts.propagation.as_deref() == Some("Orphan")
            && let Some(uid) = meta_str(&current, "uid")
        {
            self.orphan_dependents(&mut st, uid);
        }
        let graceful_pod = self.graceful_pods
            && rt.kind == "Pod"
            && rt.group.is_empty()
            && current.pointer("/spec/nodeName").and_then(Value::as_str) == Some(NODE_NAME)
            && opts.grace_period_seconds != Some(0);
        let is_namespace = rt.kind == "Namespace" && rt.group.is_empty();
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            if rt.kind == "Pod"
                && opts.grace_period_seconds == Some(0)
                && finalizers(&current).is_empty()
            {
                return Ok(self.remove(&mut st, rt, ns, name, None));
            }
            return Ok(Self::present(&current, rt));
        }
        if !finalizers(&current).is_empty() || graceful_pod || is_namespace {
            let mut new = current.clone();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now()));
            // Like the API server (rest.BeforeDelete): marking for deletion is a new generation, so
            // controllers filtering on generation see it.
            if let Some(g) = m.get("generation").and_then(Value::as_i64) {
                m.insert("generation".into(), json!(g + 1));
            }
            let grace = if graceful_pod {
                opts.grace_period_seconds
                    .or_else(|| {
                        current
                            .pointer("/spec/terminationGracePeriodSeconds")
                            .and_then(Value::as_i64)
                    })
                    .unwrap_or(30)
            } else {
                0
            };
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            if is_namespace {
                new["status"]["phase"] = json!("Terminating");
            }
            let stored = self.store(&mut st, rt, ns, name, new, Some(current));
            if is_namespace {
                drop(st);
                self.delete_namespace_contents(name);
            }
            return Ok(stored);
        }
        Ok(self.remove(&mut st, rt, ns, name, None))
    }

    fn orphan_dependents(&self, st: &mut State, owner_uid: &str) {
        let mut changed = Vec::new();
        for (key, objs) in &st.objects {
            for ((ns, name), o) in objs {
                let refs = o
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array);
                if refs.is_some_and(|r| r.iter().any(|r| r["uid"] == owner_uid)) {
                    let mut n = o.clone();
                    if let Some(Value::Array(r)) = n.pointer_mut("/metadata/ownerReferences") {
                        r.retain(|r| r["uid"] != owner_uid);
                    }
                    changed.push((key.clone(), ns.clone(), name.clone(), n, o.clone()));
                }
            }
        }
        for (key, ns, name, n, old) in changed {
            if let Some(rt) = st.registry.by_key(&key) {
                self.store(st, &rt, &ns, &name, n, Some(old));
            }
        }
    }

    fn delete_namespace_contents(&self, ns: &str) {
        let items: Vec<(Arc<ResourceType>, String)> = self
            .snapshot()
            .into_iter()
            .filter(|(rt, o)| rt.namespaced && meta_str(o, "namespace") == Some(ns))
            .map(|(rt, o)| (rt, meta_str(&o, "name").unwrap_or("").to_string()))
            .collect();
        for (rt, name) in items {
            // Already gone or already terminating: nothing to do.
            let _ = self.delete(&rt, ns, &name, &DeleteOptions::default());
        }
    }

    /// Garbage collection, run after deletions: removes objects whose every owner is gone
    /// (background propagation) and terminating namespaces once they are empty.
    pub fn collect_garbage(&self) -> usize {
        let all = self.snapshot();
        let uids: std::collections::HashSet<String> = all
            .iter()
            .filter_map(|(_, o)| meta_str(o, "uid").map(String::from))
            .collect();
        let mut deleted = 0;
        for (rt, o) in &all {
            let refs = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array);
            let Some(refs) = refs.filter(|r| !r.is_empty()) else {
                continue;
            };
            let orphaned = refs
                .iter()
                .all(|r| r["uid"].as_str().is_none_or(|u| !uids.contains(u)));
            if orphaned && o.pointer("/metadata/deletionTimestamp").is_none() {
                let ns = meta_str(o, "namespace").unwrap_or("");
                let name = meta_str(o, "name").unwrap_or("");
                if self.delete(rt, ns, name, &DeleteOptions::default()).is_ok() {
                    deleted += 1;
                }
            }
        }
        for (rt, o) in &all {
            if rt.kind != "Namespace" || o.pointer("/metadata/deletionTimestamp").is_none() {
                continue;
            }
            let name = meta_str(o, "name").unwrap_or("");
            let empty = !all
                .iter()
                .any(|(t, x)| t.namespaced && meta_str(x, "namespace") == Some(name));
            if empty {
                let mut st = self.lock();
                if Self::current(&st, rt, "", name).is_ok() {
                    self.remove(&mut st, rt, "", name, None);
                    deleted += 1;
                }
            }
        }
        deleted
    }
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::Conflict(format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
        rt.qualified_plural()
    ))
}

fn parse_apply(body: &[u8]) -> ApiResult<Value> {
    // Clients (kube-rs, client-go) send apply patches as JSON, which is YAML too but parses
    // several times faster as JSON.
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?,
    };
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "an apply patch must be an object".into(),
        ));
    }
    Ok(v)
}

fn check_apply_identity(rt: &ResourceType, name: &str, applied: &Value) -> ApiResult<()> {
    let kind = applied.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = applied
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind.is_empty() || api_version.is_empty() {
        return Err(ApiError::BadRequest(
            "apiVersion and kind must be set in an apply patch".into(),
        ));
    }
    if kind != rt.kind && kind != "Scale" {
        return Err(ApiError::BadRequest(format!(
            "the apply patch is a {kind}, the URL names {}",
            rt.kind
        )));
    }
    if let Some(n) = meta_str(applied, "name")
        && n != name
    {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

/// Defaults real API servers fill in for built-in kinds that clients rely on.
fn defaults_on_create(rt: &ResourceType, obj: &mut Value) {
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Namespace") => {
            obj["status"] = json!({"phase": "Active"});
            let name = obj["metadata"]["name"].clone();
            if !obj["metadata"]["labels"].is_object() {
                obj["metadata"]["labels"] = json!({});
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        }
        ("", "Pod") => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            if obj.pointer("/spec/restartPolicy").is_none() {
                obj["spec"]["restartPolicy"] = json!("Always");
            }
        }
        ("", "Secret") if obj.get("type").is_none() => obj["type"] = json!("Opaque"),
        ("", "Service") => {
            if obj.pointer("/spec/type").is_none() {
                obj["spec"]["type"] = json!("ClusterIP");
            }
            if obj.pointer("/spec/clusterIP").is_none() {
                obj["spec"]["clusterIP"] = json!("None");
            }
        }
        ("apps", "Deployment") => {
            if obj.pointer("/spec/replicas").is_none() {
                obj["spec"]["replicas"] = json!(1);
            }
            if obj.pointer("/spec/strategy").is_none() {
                obj["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
            }
        }
        ("batch", "Job") => {
            if obj.pointer("/spec/backoffLimit").is_none() {
                obj["spec"]["backoffLimit"] = json!(6);
            }
            if obj.pointer("/spec/completions").is_none() {
                obj["spec"]["completions"] = json!(1);
            }
        }
        _ => {}
    }
}
