//! The local "kubelet" plus the two controllers that create pods: Deployments and Jobs.
//!
//! - Deployment controller: keeps `spec.replicas` pods of the current template (labelled with
//!   `pod-template-hash`, owned directly by the Deployment: there are no ReplicaSets here); a template
//!   change rolls pods within maxSurge / maxUnavailable (or Recreate); writes Deployment status.
//! - Job controller: one pod at a time until one succeeds (`completions: 1`) or `backoffLimit`
//!   failures; writes Job status and Complete/Failed conditions.
//! - Kubelet: every pod whose container image matches an [`ImageBinary`] runs that program as a real
//!   process on its own loopback address 127.x.y.N, with the container's env (values, `secretKeyRef`,
//!   `configMapKeyRef`, `fieldRef`, `envFrom`), ConfigMap/Secret/emptyDir volumes materialised to
//!   directories (mount paths in args and env values are rewritten to them; a directory above
//!   mounts becomes a local directory linking to them), `HOSTNAME=<pod name>`, `OBSRV_LISTEN=<ip>:<port>`,
//!   readiness from the readiness probe's HTTP GET, restarts with back-off, SIGTERM then SIGKILL after
//!   the grace period when the pod is deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::store::{
    DeleteOptions, NODE_NAME, Selectors, Store, Sub, WriteOptions, now, random_suffix,
};

/// Which local program runs a container image.
#[derive(Clone, Debug)]
pub struct ImageBinary {
    /// Image repository (`ghcr.io/obsrv/obsrv-connector`); a tag or digest here must match exactly,
    /// without one any tag matches.
    pub image: String,
    /// The program that replaces the image's entrypoint.
    pub program: PathBuf,
    /// Arguments put before the container's own (e.g. a script for an interpreter).
    pub args: Vec<String>,
}

impl ImageBinary {
    pub fn new(image: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        ImageBinary {
            image: image.into(),
            program: program.into(),
            args: vec![],
        }
    }

    pub fn matches(&self, image: &str) -> bool {
        if image == self.image {
            return true;
        }
        let repo = image.split('@').next().unwrap_or(image);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        repo == self.image
    }
}

/// Kubelet configuration.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    pub images: Vec<ImageBinary>,
    /// Variables passed through from this process (a container gets no other host environment).
    pub inherit_env: Vec<String>,
    /// How often readiness probes run (the pod's periodSeconds is not used, to keep tests fast).
    pub probe_period: Duration,
    /// Upper bound of the restart back-off (it doubles from 500ms).
    pub max_restart_backoff: Duration,
    /// Upper bound on the grace period at shutdown of the whole control plane.
    pub shutdown_grace: Duration,
}

impl KubeletOptions {
    pub fn new(images: Vec<ImageBinary>) -> Self {
        KubeletOptions {
            images,
            inherit_env: [
                "PATH",
                "HOME",
                "LANG",
                "TMPDIR",
                "RUST_LOG",
                "RUST_BACKTRACE",
                "LD_LIBRARY_PATH",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            probe_period: Duration::from_millis(300),
            max_restart_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Loopback addresses in use by any control plane of this process.
fn addresses() -> &'static Mutex<HashSet<Ipv4Addr>> {
    static A: OnceLock<Mutex<HashSet<Ipv4Addr>>> = OnceLock::new();
    A.get_or_init(Default::default)
}

/// Pids started per control-plane directory (with the pod's `namespace/name`), killed
/// synchronously on drop.
fn pids() -> &'static Mutex<HashMap<PathBuf, HashMap<i32, String>>> {
    static P: OnceLock<Mutex<HashMap<PathBuf, HashMap<i32, String>>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// The pid of the process running pod `namespace/name` of the control plane in `dir`.
pub fn pod_pid(dir: &Path, namespace: &str, name: &str) -> Option<u32> {
    let key = format!("{namespace}/{name}");
    let all = lock(pids());
    all.get(dir)?
        .iter()
        .find(|(_, pod)| **pod == key)
        .and_then(|(pid, _)| u32::try_from(*pid).ok())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILLs every process started for the control plane in `dir` (used by `Drop`).
pub fn kill_all_now(dir: &Path) {
    let set = lock(pids()).remove(dir).unwrap_or_default();
    for pid in set.into_keys() {
        signal(pid, libc::SIGKILL);
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process group we created; no memory is touched. The group id equals the
    // child's pid because it was spawned with process_group(0).
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// A loopback address free for `port`: not used by another pod here and bindable now.
///
/// Each process starts in its own /24 (`127.<pid / 256 % 256>.<pid % 256>.N`): test processes run
/// side by side, and a pod address another process briefly left unbound (a `kill -9`ed container
/// about to restart) must not be handed out there.
fn allocate_address(port: u16) -> Option<Ipv4Addr> {
    let pid = std::process::id();
    let own = [(pid >> 8) as u8, pid as u8];
    let mut used = lock(addresses());
    let blocks =
        std::iter::once(own).chain((0..=255u8).flat_map(|b| (0..=255u8).map(move |c| [b, c])));
    for [second, third] in blocks.take(1 + 1024) {
        for fourth in 2..=254u8 {
            let ip = Ipv4Addr::new(127, second, third, fourth);
            if used.contains(&ip) {
                continue;
            }
            if std::net::TcpListener::bind((ip, port)).is_ok() {
                used.insert(ip);
                return Some(ip);
            }
        }
    }
    None
}

fn release_address(ip: Ipv4Addr) {
    lock(addresses()).remove(&ip);
}

/// FNV-1a of the pod template: the `pod-template-hash` label.
pub fn template_hash(template: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in template.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn owned_by(pod: &Value, uid: &str) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|r| {
            r.iter()
                .any(|r| r["uid"] == uid && r["controller"] == json!(true))
        })
}

fn terminating(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp").is_some()
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// What the Deployment controller does for one Deployment: a pure decision on its pods.
#[derive(Debug, Default, PartialEq)]
pub struct DeploymentPlan {
    pub create: usize,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    pub status: Value,
}

/// Decides pod creations/deletions and the status of a Deployment from its (owned) pods.
pub fn plan_deployment(dep: &Value, pods: &[Value]) -> DeploymentPlan {
    let desired = dep
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let hash = template_hash(&dep["spec"]["template"]);
    let live: Vec<&Value> = pods.iter().filter(|p| !terminating(p)).collect();
    let (current, old): (Vec<&Value>, Vec<&Value>) = live.iter().partition(|p| {
        p.pointer("/metadata/labels/pod-template-hash")
            .and_then(Value::as_str)
            == Some(hash.as_str())
    });
    let name = |p: &Value| s(p, "/metadata/name").to_string();
    let mut plan = DeploymentPlan::default();
    // Not-ready first, then newest first.
    let order = |v: &mut Vec<&Value>| {
        v.sort_by(|a, b| {
            pod_ready(a).cmp(&pod_ready(b)).then_with(|| {
                s(b, "/metadata/creationTimestamp").cmp(s(a, "/metadata/creationTimestamp"))
            })
        })
    };
    let mut current_sorted = current.clone();
    order(&mut current_sorted);
    if current.len() > desired {
        plan.delete.extend(
            current_sorted
                .iter()
                .take(current.len() - desired)
                .map(|p| name(p)),
        );
    }
    let mut old_sorted = old.clone();
    order(&mut old_sorted);
    let ready_total = live.iter().filter(|p| pod_ready(p)).count();
    if s(dep, "/spec/strategy/type") == "Recreate" {
        // Every old pod goes first; new ones only once none is left (terminating ones included).
        plan.delete.extend(old_sorted.iter().map(|p| name(p)));
        let old_terminating = pods.iter().any(|p| {
            terminating(p)
                && p.pointer("/metadata/labels/pod-template-hash")
                    .and_then(Value::as_str)
                    != Some(hash.as_str())
        });
        if old.is_empty() && !old_terminating {
            plan.create = desired.saturating_sub(current.len());
        }
    } else {
        // RollingUpdate: at most desired + maxSurge pods, at least desired - maxUnavailable ready.
        let rolling = dep
            .pointer("/spec/strategy/rollingUpdate")
            .cloned()
            .unwrap_or(Value::Null);
        let surge = int_or_percent(
            rolling.get("maxSurge").unwrap_or(&json!("25%")),
            desired,
            true,
        )
        .unwrap_or(1);
        let mut unavailable = int_or_percent(
            rolling.get("maxUnavailable").unwrap_or(&json!("25%")),
            desired,
            false,
        )
        .unwrap_or(0);
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        let room = (desired + surge).saturating_sub(live.len());
        plan.create = desired.saturating_sub(current.len()).min(room);
        let mut removable = ready_total.saturating_sub(desired.saturating_sub(unavailable));
        for p in &old_sorted {
            // Not-ready old pods never count towards availability: they can always go.
            if !pod_ready(p) || desired == 0 {
                plan.delete.push(name(p));
            } else if removable > 0 {
                removable -= 1;
                plan.delete.push(name(p));
            }
        }
    }
    let ready = live.iter().filter(|p| pod_ready(p)).count();
    let updated = current.len().min(desired);
    let generation = dep
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let available = ready >= desired;
    let complete = updated == desired
        && old.is_empty()
        && current.iter().filter(|p| pod_ready(p)).count() >= desired;
    let previous = dep
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c["type"] == type_ && c["status"] == status)
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now()));
        json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since, "lastUpdateTime": since})
    };
    let mut status = json!({
        "observedGeneration": generation,
        "replicas": live.len(),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "conditions": [
            condition("Available", available, if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                format!("{ready} of {desired} replicas are available")),
            condition("Progressing", true, if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                format!("{updated} of {desired} replicas run the current template")),
        ],
    });
    if desired > ready {
        status["unavailableReplicas"] = json!(desired - ready);
    }
    for k in [
        "readyReplicas",
        "availableReplicas",
        "updatedReplicas",
        "replicas",
    ] {
        if status[k] == json!(0) {
            status.as_object_mut().map(|m| m.remove(k));
        }
    }
    plan.status = status;
    plan
}

/// What the Job controller does for one Job.
#[derive(Debug, Default, PartialEq)]
pub struct JobPlan {
    pub create: bool,
    pub status: Value,
}

/// A `LabelSelector` (matchLabels + matchExpressions) as selector-string syntax.
pub fn selector_string(sel: &Value) -> String {
    let mut terms: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        terms.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "DoesNotExist" => format!("!{key}"),
            _ => key.to_string(),
        });
    }
    terms.join(",")
}

/// An int-or-percent of `total`; percentages round up or down (maxSurge and PDBs up,
/// maxUnavailable down, as Kubernetes does).
fn int_or_percent(v: &Value, total: usize, round_up: bool) -> Option<usize> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        Value::String(p) => {
            let pct: usize = p.strip_suffix('%')?.parse().ok()?;
            Some(if round_up {
                (pct * total).div_ceil(100)
            } else {
                pct * total / 100
            })
        }
        _ => None,
    }
}

/// PodDisruptionBudget status from the pods its selector matches.
pub fn pdb_status(pdb: &Value, pods: &[Value]) -> Value {
    let live: Vec<&Value> = pods.iter().filter(|p| !terminating(p)).collect();
    let expected = live.len();
    let healthy = live.iter().filter(|p| pod_ready(p)).count();
    let desired = match (
        pdb.pointer("/spec/minAvailable"),
        pdb.pointer("/spec/maxUnavailable"),
    ) {
        (Some(min), _) => int_or_percent(min, expected, true).unwrap_or(expected),
        (None, Some(max)) => {
            expected.saturating_sub(int_or_percent(max, expected, true).unwrap_or(0))
        }
        (None, None) => expected,
    };
    let allowed = healthy.saturating_sub(desired);
    let prev = pdb
        .pointer("/status/conditions/0")
        .cloned()
        .unwrap_or(Value::Null);
    let ok = allowed > 0;
    let status_str = if ok { "True" } else { "False" };
    let since = if prev["status"] == status_str {
        prev["lastTransitionTime"].clone()
    } else {
        json!(now())
    };
    json!({
        "observedGeneration": pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "disruptionsAllowed": allowed,
        "conditions": [{
            "type": "DisruptionAllowed", "status": status_str,
            "reason": if ok { "SufficientPods" } else { "InsufficientPods" }, "message": "",
            "lastTransitionTime": since, "observedGeneration": pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        }],
    })
}

pub fn plan_job(job: &Value, pods: &[Value]) -> JobPlan {
    let phase = |p: &Value| s(p, "/status/phase").to_string();
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count();
    let failed = pods.iter().filter(|p| phase(p) == "Failed").count();
    let active = pods
        .iter()
        .filter(|p| !terminating(p) && !["Succeeded", "Failed"].contains(&phase(p).as_str()))
        .count();
    let completions = job
        .pointer("/spec/completions")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(1) as usize;
    let backoff = job
        .pointer("/spec/backoffLimit")
        .and_then(Value::as_i64)
        .unwrap_or(6)
        .max(0) as usize;
    let mut status = job
        .get("status")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    if status.get("startTime").is_none() {
        status["startTime"] = json!(now());
    }
    let done = |st: &Value| {
        st.get("conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter().any(|c| {
                    (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True"
                })
            })
    };
    let mut create = false;
    if !done(&status) {
        let ts = now();
        if succeeded >= completions {
            status["completionTime"] = json!(ts);
            status["conditions"] = json!([
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods", "lastTransitionTime": ts, "lastProbeTime": ts},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods", "lastTransitionTime": ts, "lastProbeTime": ts},
            ]);
        } else if failed > backoff {
            status["conditions"] = json!([
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": ts, "lastProbeTime": ts},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": ts, "lastProbeTime": ts},
            ]);
        } else if active == 0 && job.pointer("/spec/suspend") != Some(&json!(true)) {
            create = true;
        }
    }
    let set = |st: &mut Value, k: &str, n: usize| {
        if n > 0 {
            st[k] = json!(n);
        } else if let Some(m) = st.as_object_mut() {
            m.remove(k);
        }
    };
    set(&mut status, "succeeded", succeeded);
    set(&mut status, "failed", failed);
    set(&mut status, "active", active + usize::from(create));
    JobPlan { create, status }
}

/// Runs the controllers and the kubelet until `stop` turns true, then stops every process.
pub async fn run(
    store: Arc<Store>,
    opts: KubeletOptions,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut k = Kubelet {
        store: store.clone(),
        opts,
        dir,
        workers: HashMap::new(),
    };
    let mut changes = store.subscribe();
    loop {
        // A bug on one odd object must not take the whole kubelet (and every pod) down.
        let step = std::panic::AssertUnwindSafe(async {
            k.sync_deployments();
            k.sync_jobs();
            k.sync_disruption_budgets();
            k.sync_pods().await;
        });
        if let Err(panic) = futures::FutureExt::catch_unwind(step).await {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!(panic = %what, "kubelet sync failed; retrying");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = changes.recv() => {
                // Coalesce bursts.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(k.opts.probe_period) => {}
        }
    }
    k.stop_all().await;
}

struct Worker {
    uid: String,
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    state: Arc<Mutex<Runtime>>,
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the kubelet knows about a pod's container.
#[derive(Clone, Debug, Default, PartialEq)]
struct Runtime {
    started_at: Option<String>,
    running: bool,
    ready: bool,
    restart_count: i64,
    waiting: Option<(String, String)>,
    terminated: Option<(i32, String, String)>,
    last_terminated: Option<(i32, String, String)>,
    /// Pod phase once the container will not run again (restartPolicy Never/OnFailure).
    final_phase: Option<String>,
}

struct Kubelet {
    store: Arc<Store>,
    opts: KubeletOptions,
    dir: PathBuf,
    workers: HashMap<String, Worker>,
}

fn rt(store: &Store, group: &str, plural: &str) -> Option<Arc<super::registry::ResourceType>> {
    store.resolve(group, "v1", plural)
}

fn system() -> WriteOptions {
    WriteOptions {
        field_manager: Some("obsrv-local-kubelet".into()),
        ..WriteOptions::default()
    }
}

impl Kubelet {
    fn pods(&self) -> Vec<Value> {
        rt(&self.store, "", "pods")
            .map(|t| self.store.list(&t, None, &Selectors::default()).0)
            .unwrap_or_default()
    }

    fn new_pod(
        &self,
        owner: &Value,
        owner_api: &str,
        name: String,
        labels: Value,
        restart_policy: Option<&str>,
    ) -> Value {
        let template = &owner["spec"]["template"];
        let mut spec = template
            .get("spec")
            .filter(|v| v.is_object())
            .cloned()
            .unwrap_or(json!({}));
        if let Some(r) = restart_policy {
            spec["restartPolicy"] = json!(r);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": labels,
                "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
                "ownerReferences": [{
                    "apiVersion": owner_api, "kind": owner["kind"], "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": spec,
        })
    }

    fn write_status(&self, group: &str, plural: &str, obj: &Value, status: Value) {
        if obj.get("status") == Some(&status) {
            return;
        }
        let Some(t) = rt(&self.store, group, plural) else {
            return;
        };
        let mut body = obj.clone();
        body["status"] = status;
        if let Some(m) = body["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let (ns, name) = (s(obj, "/metadata/namespace"), s(obj, "/metadata/name"));
        if let Err(e) = self
            .store
            .replace(&t, ns, name, body, Sub::Status, &system())
        {
            tracing::debug!(error = %e, "status write lost a race; next sync retries");
        }
    }

    fn sync_deployments(&self) {
        let Some(dt) = self.store.resolve("apps", "v1", "deployments") else {
            return;
        };
        let Some(pt) = rt(&self.store, "", "pods") else {
            return;
        };
        let pods = self.pods();
        for dep in self.store.list(&dt, None, &Selectors::default()).0 {
            if terminating(&dep) {
                continue;
            }
            let uid = s(&dep, "/metadata/uid");
            let owned: Vec<Value> = pods.iter().filter(|p| owned_by(p, uid)).cloned().collect();
            let plan = plan_deployment(&dep, &owned);
            let ns = s(&dep, "/metadata/namespace");
            let hash = template_hash(&dep["spec"]["template"]);
            for _ in 0..plan.create {
                let mut labels = dep
                    .pointer("/spec/template/metadata/labels")
                    .filter(|v| v.is_object())
                    .cloned()
                    .unwrap_or(json!({}));
                labels["pod-template-hash"] = json!(hash);
                let name = format!("{}-{hash}-{}", s(&dep, "/metadata/name"), random_suffix());
                let pod = self.new_pod(&dep, "apps/v1", name, labels, None);
                if let Err(e) = self.store.create(&pt, ns, pod, &system()) {
                    tracing::warn!(error = %e, "creating a pod failed");
                }
            }
            for name in &plan.delete {
                let _ = self.store.delete(&pt, ns, name, &DeleteOptions::default());
            }
            self.write_status("apps", "deployments", &dep, plan.status);
        }
    }

    fn sync_disruption_budgets(&self) {
        let Some(t) = self.store.resolve("policy", "v1", "poddisruptionbudgets") else {
            return;
        };
        let pods = self.pods();
        for pdb in self.store.list(&t, None, &Selectors::default()).0 {
            let ns = s(&pdb, "/metadata/namespace");
            let Ok(sel) = Selectors::parse(Some(&selector_string(&pdb["spec"]["selector"])), None)
            else {
                continue;
            };
            let matching: Vec<Value> = pods
                .iter()
                .filter(|p| s(p, "/metadata/namespace") == ns && sel.matches(p))
                .cloned()
                .collect();
            self.write_status(
                "policy",
                "poddisruptionbudgets",
                &pdb,
                pdb_status(&pdb, &matching),
            );
        }
    }

    fn sync_jobs(&self) {
        let Some(jt) = self.store.resolve("batch", "v1", "jobs") else {
            return;
        };
        let Some(pt) = rt(&self.store, "", "pods") else {
            return;
        };
        let pods = self.pods();
        for job in self.store.list(&jt, None, &Selectors::default()).0 {
            if terminating(&job) {
                continue;
            }
            let uid = s(&job, "/metadata/uid");
            let owned: Vec<Value> = pods.iter().filter(|p| owned_by(p, uid)).cloned().collect();
            let plan = plan_job(&job, &owned);
            if plan.create {
                let job_name = s(&job, "/metadata/name");
                let mut labels = job
                    .pointer("/spec/template/metadata/labels")
                    .filter(|v| v.is_object())
                    .cloned()
                    .unwrap_or(json!({}));
                labels["batch.kubernetes.io/job-name"] = json!(job_name);
                labels["job-name"] = json!(job_name);
                labels["batch.kubernetes.io/controller-uid"] = json!(uid);
                let policy = match s(&job, "/spec/template/spec/restartPolicy") {
                    "OnFailure" => "OnFailure",
                    _ => "Never",
                };
                let pod = self.new_pod(
                    &job,
                    "batch/v1",
                    format!("{job_name}-{}", random_suffix()),
                    labels,
                    Some(policy),
                );
                if let Err(e) =
                    self.store
                        .create(&pt, s(&job, "/metadata/namespace"), pod, &system())
                {
                    tracing::warn!(error = %e, "creating a job pod failed");
                }
            }
            self.write_status("batch", "jobs", &job, plan.status);
        }
    }

    fn image_for(&self, pod: &Value) -> Option<(usize, ImageBinary)> {
        let containers = pod.pointer("/spec/containers").and_then(Value::as_array)?;
        containers.iter().enumerate().find_map(|(i, c)| {
            let image = c["image"].as_str()?;
            self.opts
                .images
                .iter()
                .find(|b| b.matches(image))
                .map(|b| (i, b.clone()))
        })
    }

    async fn sync_pods(&mut self) {
        let Some(pt) = rt(&self.store, "", "pods") else {
            return;
        };
        let pods = self.pods();
        let live: HashMap<String, &Value> = pods
            .iter()
            .map(|p| (s(p, "/metadata/uid").to_string(), p))
            .collect();
        // Pods gone from the API (deleted with grace 0, or their namespace): stop their processes.
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|u| !live.contains_key(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(w) = self.workers.remove(&uid) {
                let _ = w.stop.send(Some(Duration::from_secs(2)));
                release_address(w.ip);
                let _ = w.task.await;
            }
        }
        for pod in &pods {
            let uid = s(pod, "/metadata/uid").to_string();
            let ns = s(pod, "/metadata/namespace").to_string();
            let name = s(pod, "/metadata/name").to_string();
            if terminating(pod) {
                let grace = pod
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
                    .max(0) as u64;
                match self.workers.get(&uid) {
                    Some(w) => {
                        let _ = w.stop.send(Some(Duration::from_secs(grace)));
                        if w.task.is_finished() {
                            if let Some(w) = self.workers.remove(&uid) {
                                release_address(w.ip);
                            }
                            let _ = self.store.delete(
                                &pt,
                                &ns,
                                &name,
                                &DeleteOptions {
                                    grace_period_seconds: Some(0),
                                    ..DeleteOptions::default()
                                },
                            );
                        }
                    }
                    None => {
                        let _ = self.store.delete(
                            &pt,
                            &ns,
                            &name,
                            &DeleteOptions {
                                grace_period_seconds: Some(0),
                                ..DeleteOptions::default()
                            },
                        );
                    }
                }
                continue;
            }
            let node = s(pod, "/spec/nodeName");
            if !node.is_empty() && node != NODE_NAME {
                continue;
            }
            if !self.workers.contains_key(&uid) {
                match self.image_for(pod) {
                    Some((index, binary)) => self.start_worker(pod, index, binary, &pt),
                    None => {
                        let images: Vec<&str> =
                            self.opts.images.iter().map(|b| b.image.as_str()).collect();
                        let image = s(pod, "/spec/containers/0/image");
                        let msg = format!(
                            "the local kubelet runs only the images {images:?}; {image:?} is not one of them"
                        );
                        let mut status = pod
                            .get("status")
                            .filter(|v| v.is_object())
                            .cloned()
                            .unwrap_or(json!({}));
                        status["phase"] = json!("Pending");
                        status["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}]);
                        self.write_status("", "pods", pod, status);
                    }
                }
            }
            if let Some(w) = self.workers.get(&uid) {
                let runtime = lock(&w.state).clone();
                let status = pod_status(pod, &runtime, w.ip);
                self.write_status("", "pods", pod, status);
            }
        }
    }

    fn start_worker(
        &mut self,
        pod: &Value,
        index: usize,
        binary: ImageBinary,
        pt: &super::registry::ResourceType,
    ) {
        let container = pod["spec"]["containers"][index].clone();
        let port = container_port(&container);
        let Some(ip) = allocate_address(port) else {
            tracing::error!("no free loopback address for a pod");
            return;
        };
        let uid = s(pod, "/metadata/uid").to_string();
        let (ns, name) = (
            s(pod, "/metadata/namespace").to_string(),
            s(pod, "/metadata/name").to_string(),
        );
        // Bind the pod to this node.
        let mut bound = pod.clone();
        bound["spec"]["nodeName"] = json!(NODE_NAME);
        if let Some(m) = bound["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let bound = match self
            .store
            .replace(pt, &ns, &name, bound, Sub::Main, &system())
        {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "binding the pod failed; retrying");
                release_address(ip);
                return;
            }
        };
        let state = Arc::new(Mutex::new(Runtime::default()));
        let (stop, stopped) = watch::channel(None);
        let ctx = ProcessContext {
            store: self.store.clone(),
            pod: bound,
            container,
            binary,
            ip,
            port,
            pod_dir: self.dir.join("pods").join(format!("{ns}_{name}")),
            log: self.dir.join("logs").join(format!("{ns}_{name}.log")),
            opts: self.opts.clone(),
            cp_dir: self.dir.clone(),
        };
        let task = tokio::spawn(run_container(ctx, state.clone(), stopped));
        self.workers.insert(
            uid.clone(),
            Worker {
                uid,
                namespace: ns,
                name,
                ip,
                state,
                stop,
                task,
            },
        );
    }

    async fn stop_all(&mut self) {
        for w in self.workers.values() {
            let _ = w.stop.send(Some(self.opts.shutdown_grace));
        }
        for (_, w) in self.workers.drain() {
            tracing::debug!(pod = %format!("{}/{}", w.namespace, w.name), uid = %w.uid, "stopping");
            let _ = w.task.await;
            release_address(w.ip);
        }
    }
}

fn container_port(c: &Value) -> u16 {
    c.pointer("/ports/0/containerPort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(8080)
}

fn pod_status(pod: &Value, r: &Runtime, ip: Ipv4Addr) -> Value {
    let prev = pod
        .get("status")
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or(json!({}));
    let phase = r.final_phase.clone().unwrap_or_else(|| {
        if r.started_at.is_some() {
            "Running".into()
        } else {
            "Pending".into()
        }
    });
    let since = |type_: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        let t = prev
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == type_ && c["status"] == status)
            })
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now()));
        json!({"type": type_, "status": status, "lastTransitionTime": t})
    };
    let ready = r.ready && r.running;
    let state = if r.running {
        json!({"running": {"startedAt": r.started_at}})
    } else if let Some((reason, message)) = &r.waiting {
        json!({"waiting": {"reason": reason, "message": message}})
    } else if let Some((code, reason, at)) = &r.terminated {
        json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": at, "startedAt": r.started_at}})
    } else {
        json!({"waiting": {"reason": "ContainerCreating"}})
    };
    let last_state = match &r.last_terminated {
        Some((code, reason, at)) => {
            json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": at}})
        }
        None => json!({}),
    };
    let c = &pod["spec"]["containers"][0];
    json!({
        "phase": phase,
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "hostIP": "127.0.0.1",
        "startTime": prev.get("startTime").cloned().unwrap_or_else(|| json!(now())),
        "qosClass": prev.get("qosClass").cloned().unwrap_or(json!("BestEffort")),
        "conditions": [since("PodScheduled", true), since("Initialized", true), since("ContainersReady", ready), since("Ready", ready)],
        "containerStatuses": [{
            "name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "started": r.running,
            "restartCount": r.restart_count, "state": state, "lastState": last_state,
        }],
    })
}

struct ProcessContext {
    store: Arc<Store>,
    pod: Value,
    container: Value,
    binary: ImageBinary,
    ip: Ipv4Addr,
    port: u16,
    pod_dir: PathBuf,
    log: PathBuf,
    opts: KubeletOptions,
    cp_dir: PathBuf,
}

/// A directory standing in for a volume mount.
struct Mount {
    path: String,
    local: PathBuf,
}

impl ProcessContext {
    /// Records an `events.k8s.io/v1` Event about the pod, as the kubelet does (shown by
    /// `kubectl describe pod` and `kubectl get events`).
    fn event(&self, type_: &str, reason: &str, note: String) {
        let Some(t) = self.store.resolve("events.k8s.io", "v1", "events") else {
            return;
        };
        let (ns, name) = (
            s(&self.pod, "/metadata/namespace"),
            s(&self.pod, "/metadata/name"),
        );
        let micro = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let event = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{name}."), "namespace": ns},
            "regarding": {
                "apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns,
                "uid": self.pod["metadata"]["uid"], "fieldPath": format!("spec.containers{{{}}}", s(&self.container, "/name")),
            },
            "reason": reason,
            "note": note,
            "type": type_,
            "action": reason,
            "eventTime": micro,
            "reportingController": "kubelet",
            "reportingInstance": NODE_NAME,
        });
        if let Err(e) = self.store.create(&t, ns, event, &WriteOptions::default()) {
            tracing::debug!(error = %e, "recording a pod event");
        }
    }

    fn lookup(&self, plural: &str, name: &str) -> Result<Value, String> {
        let t = rt(&self.store, "", plural).ok_or("no such resource")?;
        self.store
            .get(&t, s(&self.pod, "/metadata/namespace"), name)
            .map_err(|_| {
                format!(
                    "{} \"{name}\" not found",
                    if plural == "secrets" {
                        "secret"
                    } else {
                        "configmap"
                    }
                )
            })
    }

    /// Key of a ConfigMap or Secret, decoded.
    fn key_of(&self, plural: &str, obj: &Value, key: &str) -> Option<Vec<u8>> {
        if plural == "secrets" {
            obj.get("data")
                .and_then(|d| d.get(key))
                .and_then(Value::as_str)
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        } else {
            obj.get("data")
                .and_then(|d| d.get(key))
                .and_then(Value::as_str)
                .map(|v| v.as_bytes().to_vec())
                .or_else(|| {
                    obj.get("binaryData")
                        .and_then(|d| d.get(key))
                        .and_then(Value::as_str)
                        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                })
        }
    }

    /// Materialises the pod's volumes; returns the mounts of this container.
    fn volumes(&self) -> Result<Vec<Mount>, String> {
        let vol_dir = self.pod_dir.join("volumes");
        let mut locals: HashMap<String, PathBuf> = HashMap::new();
        for v in self
            .pod
            .pointer("/spec/volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = v["name"].as_str().unwrap_or("");
            let dir = vol_dir.join(name);
            let source = if let Some(cm) = v.get("configMap") {
                Some(("configmaps", cm, cm["name"].as_str().unwrap_or("")))
            } else if let Some(sec) = v.get("secret") {
                Some(("secrets", sec, sec["secretName"].as_str().unwrap_or("")))
            } else {
                None
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            if let Some((plural, src, obj_name)) = source {
                let optional = src["optional"] == json!(true);
                let obj = match self.lookup(plural, obj_name) {
                    Ok(o) => o,
                    Err(_) if optional => json!({}),
                    Err(e) => return Err(e),
                };
                let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                match src.get("items").and_then(Value::as_array) {
                    Some(items) => {
                        for it in items {
                            let key = it["key"].as_str().unwrap_or("");
                            let value = self.key_of(plural, &obj, key).ok_or_else(|| {
                                format!("couldn't find key {key} in {plural} {obj_name}")
                            })?;
                            files.insert(it["path"].as_str().unwrap_or(key).to_string(), value);
                        }
                    }
                    None => {
                        for field in ["data", "binaryData"] {
                            for key in obj
                                .get(field)
                                .and_then(Value::as_object)
                                .into_iter()
                                .flatten()
                                .map(|(k, _)| k.clone())
                            {
                                if let Some(value) = self.key_of(plural, &obj, &key) {
                                    files.insert(key, value);
                                }
                            }
                        }
                    }
                }
                for (path, bytes) in files {
                    let file = dir.join(&path);
                    if let Some(parent) = file.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                    }
                    // Rewrite only what changed, atomically (readers never see half a file).
                    if std::fs::read(&file).ok().as_deref() != Some(&bytes[..]) {
                        let tmp = file.with_extension("obsrv-tmp");
                        std::fs::write(&tmp, bytes)
                            .and_then(|()| std::fs::rename(&tmp, &file))
                            .map_err(|e| format!("writing {}: {e}", file.display()))?;
                    }
                }
            }
            locals.insert(name.to_string(), dir);
        }
        let mut mounts = Vec::new();
        for m in self
            .container
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = m["name"].as_str().unwrap_or("");
            let local = locals
                .get(name)
                .ok_or_else(|| format!("volume {name:?} is mounted but not defined"))?;
            let local = match m["subPath"].as_str().filter(|p| !p.is_empty()) {
                Some(sub) => local.join(sub),
                None => local.clone(),
            };
            mounts.push(Mount {
                path: m["mountPath"]
                    .as_str()
                    .unwrap_or("")
                    .trim_end_matches('/')
                    .to_string(),
                local,
            });
        }
        // A directory above mounts (`/var/run/secrets/obsrv` above one Secret volume per
        // `/var/run/secrets/obsrv/<name>`) is a real directory in a container: give it a local
        // one whose entries link to the mounts below it.
        let tree = self.pod_dir.join("fs");
        let mut parents: Vec<Mount> = Vec::new();
        for m in &mounts {
            let link = tree.join(m.path.trim_start_matches('/'));
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
            }
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&m.local, &link)
                .map_err(|e| format!("linking {}: {e}", link.display()))?;
            let mut p = Path::new(&m.path).parent();
            while let Some(dir) = p.filter(|d| d.components().count() > 2) {
                let path = dir.to_string_lossy().to_string();
                if !mounts.iter().any(|o| o.path == path) && !parents.iter().any(|o| o.path == path)
                {
                    parents.push(Mount {
                        local: tree.join(path.trim_start_matches('/')),
                        path,
                    });
                }
                p = dir.parent();
            }
        }
        mounts.extend(parents);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.path.len()));
        Ok(mounts)
    }

    fn env(&self, mounts: &[Mount]) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = self
            .opts
            .inherit_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        };
        // A container's host name is its pod's name, as the kubelet sets it (the container's own
        // env may override it). Sources keyed by replica (an MQTT session) rely on it.
        if let Some(pod) =
            super::store::get_dotted(&self.pod, "metadata.name").and_then(Value::as_str)
        {
            set(&mut env, "HOSTNAME".into(), pod.to_string());
        }
        for from in self
            .container
            .get("envFrom")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let prefix = from["prefix"].as_str().unwrap_or("");
            for (plural, r) in [
                ("configmaps", from.get("configMapRef")),
                ("secrets", from.get("secretRef")),
            ] {
                let Some(r) = r else { continue };
                let obj = match self.lookup(plural, r["name"].as_str().unwrap_or("")) {
                    Ok(o) => o,
                    Err(_) if r["optional"] == json!(true) => continue,
                    Err(e) => return Err(e),
                };
                for key in obj
                    .get("data")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone())
                {
                    if let Some(v) = self.key_of(plural, &obj, &key) {
                        set(
                            &mut env,
                            format!("{prefix}{key}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
            }
        }
        for e in self
            .container
            .get("env")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = e["name"].as_str().unwrap_or("").to_string();
            let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
                expand(v, &env)
            } else if let Some(from) = e.get("valueFrom") {
                let key_ref = |plural: &str, r: &Value| -> Result<Option<String>, String> {
                    let (obj_name, key) = (
                        r["name"].as_str().unwrap_or(""),
                        r["key"].as_str().unwrap_or(""),
                    );
                    let optional = r["optional"] == json!(true);
                    let obj = match self.lookup(plural, obj_name) {
                        Ok(o) => o,
                        Err(_) if optional => return Ok(None),
                        Err(e) => return Err(e),
                    };
                    match self.key_of(plural, &obj, key) {
                        Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                        None if optional => Ok(None),
                        None => Err(format!(
                            "couldn't find key {key} in {} {}/{obj_name}",
                            if plural == "secrets" {
                                "Secret"
                            } else {
                                "ConfigMap"
                            },
                            s(&self.pod, "/metadata/namespace")
                        )),
                    }
                };
                let v = if let Some(r) = from.get("secretKeyRef") {
                    key_ref("secrets", r)?
                } else if let Some(r) = from.get("configMapKeyRef") {
                    key_ref("configmaps", r)?
                } else {
                    from.pointer("/fieldRef/fieldPath")
                        .and_then(Value::as_str)
                        .map(|f| match f {
                            "status.podIP" => self.ip.to_string(),
                            "status.hostIP" => "127.0.0.1".into(),
                            "spec.nodeName" => NODE_NAME.into(),
                            other => super::store::get_dotted(&self.pod, other)
                                .map(|v| {
                                    v.as_str()
                                        .map(String::from)
                                        .unwrap_or_else(|| v.to_string())
                                })
                                .unwrap_or_default(),
                        })
                };
                match v {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                String::new()
            };
            set(&mut env, name, value);
        }
        set(
            &mut env,
            "OBSRV_LISTEN".into(),
            format!("{}:{}", self.ip, self.port),
        );
        Ok(env
            .into_iter()
            .map(|(k, v)| (k, rewrite(&v, mounts)))
            .collect())
    }

    fn args(&self, mounts: &[Mount]) -> Vec<String> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let mut args = self.binary.args.clone();
        // `command[0]` is the image's program, replaced by ours; the rest are arguments.
        args.extend(strings(&self.container["command"]).into_iter().skip(1));
        args.extend(strings(&self.container["args"]));
        args.into_iter().map(|a| rewrite(&a, mounts)).collect()
    }

    /// `(path, port)` of an HTTP probe (`readinessProbe` or `livenessProbe`).
    fn probe(&self, which: &str) -> Option<(String, u16)> {
        let p = self.container.get(which)?.get("httpGet")?;
        let path = p["path"].as_str().unwrap_or("/").to_string();
        let port = match &p["port"] {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(self.port),
            Value::String(name) => self
                .container
                .get("ports")
                .and_then(Value::as_array)
                .and_then(|ps| ps.iter().find(|p| p["name"] == *name.as_str()))
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(self.port),
            _ => self.port,
        };
        Some((path, port))
    }
}

/// `$(VAR)` references to earlier variables, as Kubernetes expands them.
fn expand(v: &str, env: &[(String, String)]) -> String {
    let mut out = v.to_string();
    for (k, val) in env {
        out = out.replace(&format!("$({k})"), val);
    }
    out
}

/// Replaces a mount path (at a path boundary) with its local directory.
fn rewrite(v: &str, mounts: &[Mount]) -> String {
    for m in mounts.iter().filter(|m| !m.path.is_empty()) {
        let mut out = String::new();
        let mut rest = v;
        let mut changed = false;
        while let Some(i) = rest.find(&m.path) {
            let after = rest[i + m.path.len()..].chars().next();
            let before_ok = i == 0 || rest[..i].ends_with(['=', ' ', ':', ',', '"', '\'']);
            if before_ok
                && after.is_none_or(|c| c == '/' || c == ' ' || c == ',' || c == ':' || c == '"')
            {
                out.push_str(&rest[..i]);
                out.push_str(&m.local.to_string_lossy());
                changed = true;
            } else {
                out.push_str(&rest[..i + m.path.len()]);
            }
            rest = &rest[i + m.path.len()..];
        }
        if changed {
            out.push_str(rest);
            return out;
        }
    }
    v.to_string()
}

fn set_state(state: &Mutex<Runtime>, f: impl FnOnce(&mut Runtime)) {
    f(&mut lock(state));
}

/// Runs one container for the life of its pod.
async fn run_container(
    ctx: ProcessContext,
    state: Arc<Mutex<Runtime>>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let policy = s(&ctx.pod, "/spec/restartPolicy").to_string();
    let mut backoff = Duration::from_millis(500);
    let mut last_config_error: Option<String> = None;
    let container_name = s(&ctx.container, "/name").to_string();
    let probe_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .ok();
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let prepared = ctx.volumes().and_then(|m| Ok((ctx.env(&m)?, ctx.args(&m))));
        let (env, args) = match prepared {
            Ok(p) => p,
            Err(message) => {
                if last_config_error.as_deref() != Some(message.as_str()) {
                    ctx.event("Warning", "Failed", format!("Error: {message}"));
                    last_config_error = Some(message.clone());
                }
                set_state(&state, |r| {
                    r.running = false;
                    r.ready = false;
                    r.waiting = Some(("CreateContainerConfigError".into(), message));
                });
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Some(parent) = ctx.log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::create_dir_all(&ctx.pod_dir);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ctx.log);
        let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let mut cmd = tokio::process::Command::new(&ctx.binary.program);
        cmd.args(&args)
            .env_clear()
            .envs(env)
            .current_dir(&ctx.pod_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                set_state(&state, |r| {
                    r.waiting = Some((
                        "RunContainerError".into(),
                        format!("starting {}: {e}", ctx.binary.program.display()),
                    ));
                });
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => { backoff = (backoff * 2).min(ctx.opts.max_restart_backoff); continue }
                }
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid {
            let pod = format!(
                "{}/{}",
                s(&ctx.pod, "/metadata/namespace"),
                s(&ctx.pod, "/metadata/name")
            );
            lock(pids())
                .entry(ctx.cp_dir.clone())
                .or_default()
                .insert(pid, pod);
        }
        set_state(&state, |r| {
            r.running = true;
            r.ready = false;
            r.waiting = None;
            r.terminated = None;
            r.started_at = Some(now());
        });
        last_config_error = None;
        ctx.event(
            "Normal",
            "Started",
            format!(
                "Started container {container_name} (pid {})",
                pid.unwrap_or(0)
            ),
        );
        let probe = ctx.probe("readinessProbe");
        let mut tick = tokio::time::interval(ctx.opts.probe_period);
        let mut ticks: u64 = 0;
        // Liveness keeps the pod's own timing: a restart is a visible event, unlike readiness.
        let liveness = ctx.probe("livenessProbe").map(|target| {
            let secs = |k: &str, d: u64| ctx.container["livenessProbe"][k].as_u64().unwrap_or(d);
            let period = Duration::from_secs(secs("periodSeconds", 10).max(1));
            let first = tokio::time::Instant::now()
                + Duration::from_secs(secs("initialDelaySeconds", 0))
                + period;
            (target, period, secs("failureThreshold", 3).max(1), first)
        });
        let mut next_liveness = liveness.as_ref().map(|l| l.3);
        let mut liveness_failures = 0;
        let exit = loop {
            tokio::select! {
                status = child.wait() => break status.ok(),
                _ = stop.changed() => {
                    let grace = stop.borrow().unwrap_or(Duration::from_secs(30));
                    ctx.event("Normal", "Killing", format!("Stopping container {container_name}"));
                    if let Some(pid) = pid {
                        signal(pid, libc::SIGTERM);
                    }
                    // A later, shorter grace (control-plane shutdown) shortens the wait.
                    let mut deadline = tokio::time::Instant::now() + grace;
                    let exited = loop {
                        tokio::select! {
                            r = child.wait() => break r.ok(),
                            _ = tokio::time::sleep_until(deadline) => break None,
                            changed = stop.changed() => {
                                if changed.is_err() {
                                    break None;
                                }
                                let shorter = stop.borrow().map(|g| tokio::time::Instant::now() + g);
                                if let Some(d) = shorter.filter(|d| *d < deadline) {
                                    deadline = d;
                                }
                            }
                        }
                    };
                    if exited.is_none() {
                        if let Some(pid) = pid {
                            signal(pid, libc::SIGKILL);
                        }
                        let _ = child.kill().await;
                    }
                    if let Some(pid) = pid {
                        lock(pids()).entry(ctx.cp_dir.clone()).or_default().remove(&pid);
                    }
                    set_state(&state, |r| {
                        r.running = false;
                        r.ready = false;
                        r.terminated = Some((0, "Completed".into(), now()));
                    });
                    return;
                }
                _ = tick.tick() => {
                    ticks += 1;
                    // Like the kubelet's periodic sync: ConfigMap/Secret edits reach mounted files.
                    if ticks.is_multiple_of(7) && let Err(e) = ctx.volumes() {
                        tracing::debug!(error = %e, "refreshing volumes");
                    }
                    let ready = match (&probe, &probe_client) {
                        (Some((path, port)), Some(client)) => {
                            let url = format!("http://{}:{port}{path}", ctx.ip);
                            client.get(&url).send().await.is_ok_and(|r| r.status().is_success() || r.status().is_redirection())
                        }
                        _ => true,
                    };
                    set_state(&state, |r| r.ready = ready);
                    if let (Some(((path, port), period, threshold, _)), Some(at), Some(client)) = (&liveness, next_liveness, &probe_client)
                        && tokio::time::Instant::now() >= at
                    {
                        next_liveness = Some(at + *period);
                        let url = format!("http://{}:{port}{path}", ctx.ip);
                        let alive = client.get(&url).send().await.is_ok_and(|r| r.status().is_success() || r.status().is_redirection());
                        liveness_failures = if alive { 0 } else { liveness_failures + 1 };
                        if liveness_failures >= *threshold {
                            tracing::info!(pod = %s(&ctx.pod, "/metadata/name"), "liveness probe failed; restarting the container");
                            ctx.event("Warning", "Unhealthy", format!("Liveness probe failed: GET {path} did not answer 2xx/3xx {threshold} times"));
                            ctx.event("Normal", "Killing", format!("Container {container_name} failed liveness probe, will be restarted"));
                            let grace = ctx.pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
                            if let Some(pid) = pid {
                                signal(pid, libc::SIGTERM);
                            }
                            match tokio::time::timeout(Duration::from_secs(grace), child.wait()).await {
                                Ok(status) => break status.ok(),
                                Err(_) => {
                                    if let Some(pid) = pid {
                                        signal(pid, libc::SIGKILL);
                                    }
                                    break child.wait().await.ok();
                                }
                            }
                        }
                    }
                }
            }
        };
        if let Some(pid) = pid {
            lock(pids())
                .entry(ctx.cp_dir.clone())
                .or_default()
                .remove(&pid);
        }
        // Killed by a signal: 128 + signal number, as container runtimes report it (137 = SIGKILL).
        let code = exit
            .and_then(|s| {
                s.code().or_else(|| {
                    std::os::unix::process::ExitStatusExt::signal(&s).map(|sig| 128 + sig)
                })
            })
            .unwrap_or(137);
        let reason = if code == 0 { "Completed" } else { "Error" };
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        set_state(&state, |r| {
            r.running = false;
            r.ready = false;
            r.terminated = Some((code, reason.into(), now()));
            if restart {
                r.last_terminated = r.terminated.take();
                r.restart_count += 1;
                r.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!("back-off restarting the container (exit code {code})"),
                ));
            } else {
                r.final_phase = Some(if code == 0 {
                    "Succeeded".into()
                } else {
                    "Failed".into()
                });
            }
        });
        if restart {
            ctx.event(
                "Warning",
                "BackOff",
                format!("Back-off restarting failed container {container_name} (exit code {code})"),
            );
        }
        if !restart {
            // Keep the pod (and its status) until it is deleted.
            while stop.borrow().is_none() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ctx.opts.max_restart_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, hash: &str, ready: bool, created: &str) -> Value {
        json!({"metadata": {"name": name, "creationTimestamp": created, "labels": {"pod-template-hash": hash}},
               "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn rolling_update_keeps_old_pods_until_new_ones_are_ready() {
        let dep = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2, "template": {"spec": {"containers": [{"image": "b"}]}}}});
        let h = template_hash(&dep["spec"]["template"]);
        let old = vec![pod("old-1", "x", true, "1"), pod("old-2", "x", true, "2")];
        // Default strategy (25% / 25% of 2): one extra pod at a time, none unavailable.
        let plan = plan_deployment(&dep, &old);
        assert_eq!(plan.create, 1);
        assert!(plan.delete.is_empty(), "{plan:?}");
        let mut pods = old.clone();
        pods.push(pod("new-1", &h, true, "3"));
        pods.push(pod("new-2", &h, false, "4"));
        let plan = plan_deployment(&dep, &pods);
        assert_eq!((plan.create, plan.delete.len()), (0, 1), "{plan:?}");
        pods[3] = pod("new-2", &h, true, "4");
        let plan = plan_deployment(&dep, &pods);
        assert_eq!(plan.delete.len(), 2);
        assert_eq!(plan.status["observedGeneration"], 2);
    }

    #[test]
    fn operator_strategy_surges_one_pod_and_recreate_empties_first() {
        let strategy =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
        let dep = json!({"spec": {"replicas": 3, "strategy": strategy, "template": {"v": 2}}});
        let h = template_hash(&dep["spec"]["template"]);
        let mut pods = vec![
            pod("o1", "x", true, "1"),
            pod("o2", "x", true, "2"),
            pod("o3", "x", true, "3"),
        ];
        assert_eq!(plan_deployment(&dep, &pods).create, 1);
        pods.push(pod("n1", &h, true, "4"));
        let plan = plan_deployment(&dep, &pods);
        assert_eq!(
            (plan.create, plan.delete.len()),
            (0, 1),
            "one old pod goes once the new one is ready"
        );

        let recreate = json!({"spec": {"replicas": 2, "strategy": {"type": "Recreate"}, "template": {"v": 2}}});
        let old = vec![pod("o1", "x", true, "1"), pod("o2", "x", false, "2")];
        let plan = plan_deployment(&recreate, &old);
        assert_eq!((plan.create, plan.delete.len()), (0, 2), "{plan:?}");
        let mut leaving = pod("o1", "x", true, "1");
        leaving["metadata"]["deletionTimestamp"] = json!("t");
        assert_eq!(
            plan_deployment(&recreate, &[leaving]).create,
            0,
            "waits for terminating old pods"
        );
        assert_eq!(plan_deployment(&recreate, &[]).create, 2);
    }

    #[test]
    fn scale_down_deletes_not_ready_pods_first() {
        let dep = json!({"spec": {"replicas": 1, "template": {}}});
        let h = template_hash(&dep["spec"]["template"]);
        let plan = plan_deployment(&dep, &[pod("a", &h, true, "1"), pod("b", &h, false, "2")]);
        assert_eq!(plan.delete, vec!["b".to_string()]);
    }

    #[test]
    fn mount_paths_are_rewritten_at_path_boundaries() {
        let mounts = vec![
            Mount {
                path: "/etc/obsrv-connector".into(),
                local: PathBuf::from("/tmp/x/config"),
            },
            Mount {
                path: "/tmp".into(),
                local: PathBuf::from("/w/tmp"),
            },
        ];
        assert_eq!(
            rewrite("/etc/obsrv-connector/connector.yaml", &mounts),
            "/tmp/x/config/connector.yaml"
        );
        assert_eq!(
            rewrite("--config=/etc/obsrv-connector/connector.yaml", &mounts),
            "--config=/tmp/x/config/connector.yaml"
        );
        assert_eq!(rewrite("/tmpfoo", &mounts), "/tmpfoo");
        assert_eq!(rewrite("/tmp", &mounts), "/w/tmp");
    }

    #[test]
    fn disruption_budget_allows_what_exceeds_min_available() {
        let pods = vec![
            pod("a", "h", true, "1"),
            pod("b", "h", true, "2"),
            pod("c", "h", false, "3"),
        ];
        let pdb = json!({"metadata": {"generation": 1}, "spec": {"minAvailable": 1}});
        let st = pdb_status(&pdb, &pods);
        assert_eq!(
            (
                st["currentHealthy"].clone(),
                st["expectedPods"].clone(),
                st["disruptionsAllowed"].clone()
            ),
            (json!(2), json!(3), json!(1))
        );
        let pdb = json!({"spec": {"maxUnavailable": "50%"}});
        assert_eq!(
            pdb_status(&pdb, &pods)["desiredHealthy"],
            1,
            "3 - ceil(1.5)"
        );
        let sel = json!({"matchLabels": {"app": "x"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]});
        assert_eq!(selector_string(&sel), "app=x,tier in (a,b)");
    }

    #[test]
    fn images_match_by_repository() {
        let b = ImageBinary::new("ghcr.io/obsrv/obsrv-connector", "/bin/true");
        assert!(b.matches("ghcr.io/obsrv/obsrv-connector:0.1.0"));
        assert!(b.matches("ghcr.io/obsrv/obsrv-connector@sha256:abc"));
        assert!(!b.matches("ghcr.io/obsrv/other:0.1.0"));
        assert!(ImageBinary::new("localhost:5000/x", "/bin/true").matches("localhost:5000/x:1"));
    }
}
