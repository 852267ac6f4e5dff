//! Test harness: the local control plane's API server in-process (the Connector CRD installed, the
//! test's namespace created), a reconcile context pointed at it, and local HTTP servers standing in
//! for connector pods' `GET /status`. The test plays the other actors (the Deployment controller,
//! the kubelet, users) by writing objects directly.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt as _;
use kube::runtime::controller::Action;
use obsrv_crds::Connector;
use obsrv_crds::status::{ConnectorStatus, RuntimeStatus};
use obsrv_operator::config::Config;
use obsrv_operator::metrics::Metrics;
use obsrv_operator::reconcile::{self, Context};
use serde_json::{Value, json};

pub use obsrv_e2e::controlplane::InProcessApi;

pub const CONNECTORS: (&str, &str) = ("obsrv.io", "connectors");
pub const DEPLOYMENTS: (&str, &str) = ("apps", "deployments");
pub const CONFIGMAPS: (&str, &str) = ("", "configmaps");
pub const SERVICES: (&str, &str) = ("", "services");
pub const PDBS: (&str, &str) = ("policy", "poddisruptionbudgets");
pub const SECRETS: (&str, &str) = ("", "secrets");
pub const PODS: (&str, &str) = ("", "pods");
pub const EVENTS: (&str, &str) = ("events.k8s.io", "events");
pub const JOBS: (&str, &str) = ("batch", "jobs");

/// One fake connector pod: a real HTTP server on its own loopback address.
pub struct PodServer {
    pub ip: String,
    pub status: Arc<Mutex<RuntimeStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Harness {
    pub api: InProcessApi,
    pub ctx: Arc<Context>,
    pub metrics: Arc<Metrics>,
    pub ns: String,
    pub port: u16,
    clock: Arc<AtomicI64>,
    pods: Vec<PodServer>,
}

/// Binds the first free loopback address of 127.0.0.2.. on `port` (0 = any).
async fn bind(port: u16, first_host: u8) -> (tokio::net::TcpListener, SocketAddr) {
    for host in first_host..250 {
        let addr = SocketAddr::from(([127, 0, 0, host], port));
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            let local = l.local_addr().expect("bound address");
            return (l, local);
        }
    }
    panic!("no free loopback address for port {port}");
}

impl Harness {
    pub async fn new(ns: &str) -> Harness {
        Harness::with_poll_interval(ns, Duration::from_secs(15)).await
    }

    pub async fn with_poll_interval(ns: &str, poll: Duration) -> Harness {
        let api = InProcessApi::new();
        api.create(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
            serde_json::to_value(Connector::crd()).expect("CRD serializes"),
        );
        api.namespace(ns);
        let client = api.client();
        let mut config = Config::defaults();
        config.sink_bootstrap_servers = Some("kafka.obsrv:9092".into());
        config.namespaces = vec![ns.to_string()];
        config.status_poll_interval = poll;
        let metrics = Arc::new(Metrics::new());
        let mut ctx = Context::new(
            client,
            config,
            metrics.clone(),
            Arc::new(AtomicBool::new(true)),
        );
        // Reserve a port by binding the first pod address now; other pods share it on other IPs.
        let (probe, addr) = bind(0, 2).await;
        drop(probe);
        ctx.status_port = addr.port();
        ctx.poll_timeout = Duration::from_secs(2);
        let clock = Arc::new(AtomicI64::new(1_800_000_000));
        let c = clock.clone();
        ctx.clock =
            Arc::new(move || Timestamp::from_second(c.load(Ordering::SeqCst)).expect("valid time"));
        Harness {
            api,
            ctx: Arc::new(ctx),
            metrics,
            ns: ns.into(),
            port: addr.port(),
            clock,
            pods: Vec::new(),
        }
    }

    pub fn advance(&self, secs: i64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    pub fn apply_yaml(&self, yaml: &str) -> Value {
        let mut v: Value = serde_yaml::from_str(yaml).expect("fixture YAML");
        v["metadata"]["namespace"] = json!(self.ns);
        self.api.create(CONNECTORS.0, CONNECTORS.1, &self.ns, v)
    }

    pub fn secret(&self, name: &str, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(base64_encode(v.as_bytes()))))
            .collect();
        self.api.create(
            SECRETS.0,
            SECRETS.1,
            &self.ns,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}),
        );
    }

    pub fn rotate_secret(&self, name: &str, key: &str, value: &str) {
        self.api.edit(SECRETS.0, SECRETS.1, &self.ns, name, |s| {
            s["data"][key] = json!(base64_encode(value.as_bytes()));
        });
    }

    pub fn connector(&self, name: &str) -> Option<Connector> {
        self.api
            .get(CONNECTORS.0, CONNECTORS.1, &self.ns, name)
            .map(|v| serde_json::from_value(v).expect("stored Connector deserializes"))
    }

    pub fn status(&self, name: &str) -> ConnectorStatus {
        self.connector(name)
            .and_then(|c| c.status)
            .expect("status written")
    }

    pub fn condition(&self, name: &str, type_: &str) -> (String, String, String) {
        let s = self.status(name);
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    pub fn edit_spec(&self, name: &str, f: impl FnOnce(&mut Value)) {
        self.api
            .edit(CONNECTORS.0, CONNECTORS.1, &self.ns, name, |c| {
                f(&mut c["spec"])
            });
    }

    pub fn object(&self, kind: (&str, &str), name: &str) -> Option<Value> {
        self.api.get(kind.0, kind.1, &self.ns, name)
    }

    pub fn deployment(&self, name: &str) -> Value {
        self.object(DEPLOYMENTS, name).expect("deployment exists")
    }

    pub fn replicas(&self, name: &str) -> i64 {
        self.deployment(name)["spec"]["replicas"]
            .as_i64()
            .expect("replicas")
    }

    pub fn checksum(&self, name: &str) -> String {
        self.deployment(name)["spec"]["template"]["metadata"]["annotations"]["obsrv.io/config-checksum"]
            .as_str()
            .expect("checksum annotation")
            .to_string()
    }

    pub fn event_reasons(&self) -> Vec<String> {
        self.api
            .list(EVENTS.0, EVENTS.1, &self.ns)
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect()
    }

    /// Runs one reconcile of the Connector as stored now.
    pub async fn reconcile(&self, name: &str) -> Result<Action, obsrv_operator::error::Error> {
        let c = self.connector(name).expect("connector exists");
        reconcile::reconcile(Arc::new(c), self.ctx.clone()).await
    }

    /// Runs one reconcile the way the controller does: through the DeserializeGuard.
    pub async fn reconcile_guarded(
        &self,
        name: &str,
    ) -> Result<Action, obsrv_operator::error::Error> {
        let v = self
            .api
            .get(CONNECTORS.0, CONNECTORS.1, &self.ns, name)
            .expect("connector exists");
        let guard: kube::core::DeserializeGuard<Connector> =
            serde_json::from_value(v).expect("guard always deserializes");
        obsrv_operator::unreadable::reconcile(Arc::new(guard), self.ctx.clone()).await
    }

    /// Reconciles until the finalizer is on and objects are applied (first run only adds the finalizer).
    pub async fn reconcile_ok(&self, name: &str) -> Action {
        self.reconcile(name).await.expect("reconcile succeeds")
    }

    /// Plays the Deployment controller and kubelet: the Deployment reports every replica ready and
    /// up to date, and one Pod per entry of `pods` exists (ready, with that IP), written as stored
    /// data (a kubelet's status, not a client's create).
    pub fn roll_out(&self, name: &str, pod_ips: &[String]) {
        self.roll_out_with(name, pod_ips, true);
    }

    /// Like [`Harness::roll_out`], but the pods run without passing readiness (e.g. the source is down).
    pub fn roll_out_with(&self, name: &str, pod_ips: &[String], ready: bool) {
        let want = self.replicas(name);
        let ready_count = if ready { want } else { 0 };
        let ready_str = if ready { "True" } else { "False" };
        self.api.edit(DEPLOYMENTS.0, DEPLOYMENTS.1, &self.ns, name, |d| {
            let generation = d["metadata"]["generation"].clone();
            d["status"] = json!({
                "observedGeneration": generation,
                "replicas": want, "readyReplicas": ready_count, "updatedReplicas": want, "availableReplicas": ready_count
            });
        });
        for p in self.api.list(PODS.0, PODS.1, &self.ns) {
            if let Some(n) = p["metadata"]["name"].as_str() {
                self.api.delete(PODS.0, PODS.1, &self.ns, n);
            }
        }
        let labels = self.deployment(name)["spec"]["template"]["metadata"]["labels"].clone();
        for (i, ip) in pod_ips.iter().enumerate() {
            self.api.put(
                PODS.0,
                PODS.1,
                &self.ns,
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{name}-pod-{i}"), "labels": labels},
                    "spec": {"containers": [{"name": "connector"}]},
                    "status": {"phase": "Running", "podIP": ip,
                               "conditions": [{"type": "Ready", "status": ready_str}]}
                }),
            );
        }
    }

    /// Starts a pod `/status` server answering `status`; returns its IP.
    pub async fn pod(&mut self, status: RuntimeStatus) -> String {
        let (listener, addr) = bind(self.port, 2).await;
        let shared = Arc::new(Mutex::new(status));
        let s = shared.clone();
        let app = Router::new().route(
            "/status",
            get(move || {
                let s = s.clone();
                async move { axum::Json(s.lock().expect("lock").clone()) }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let ip = addr.ip().to_string();
        self.pods.push(PodServer {
            ip: ip.clone(),
            status: shared,
            task,
        });
        ip
    }

    /// Changes what the pod at `ip` reports.
    pub fn set_pod(&self, ip: &str, f: impl FnOnce(&mut RuntimeStatus)) {
        let p = self.pods.iter().find(|p| p.ip == ip).expect("pod server");
        f(&mut p.status.lock().expect("lock"));
    }

    /// A loopback address nothing listens on at the status port.
    pub async fn unreachable_ip(&self) -> String {
        // High host numbers: pod servers take the low ones.
        let (l, addr) = bind(self.port, 200).await;
        drop(l);
        addr.ip().to_string()
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn running(lag: i64) -> RuntimeStatus {
    RuntimeStatus {
        state: obsrv_crds::RuntimeState::Running,
        ready: true,
        lag_records: Some(lag),
        ..RuntimeStatus::default()
    }
}
