//! Cold start of N Connectors, twice:
//!
//! 1. reconciled from scratch (finalizer, apply, status) against the in-memory API (the local
//!    control plane's API server in-process), 32 at a time as the controller runs them: wall time,
//!    reconciles per second, writes in a steady-state pass, and this process's peak RSS (which
//!    includes the in-memory API);
//! 2. the `obsrv-operator` binary as its own process, as in its pod, against the local control
//!    plane's API server over HTTP (no kubelet: Deployments are stored, no pods run), the N
//!    Connectors applied with `kubectl apply`: the time until each has a status for its
//!    generation, and the operator's own peak RSS, then after 10 s of steady state (target: < 64
//!    MiB, issue 11).
//!
//! Usage: `cargo bench -p obsrv-operator -- [N]` (default 1000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::{Api, api::ListParams};
use obsrv_crds::Connector;
use obsrv_e2e::{
    controlplane::{ControlPlane, ControlPlaneOptions},
    services::{Broker, free_port},
};
use support::Harness;

const MANIFEST: &str = include_str!("../tests/fixtures/kafka-autoscale.yaml");

/// Peak resident memory (VmHWM) of a process (`self` or a pid), KiB.
fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The operator's peak RSS target (issue 11).
const OPERATOR_RSS_TARGET_MIB: f64 = 64.0;

/// Part 2: the operator binary against the local control plane; prints its report.
async fn as_its_own_process(n: usize) {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("starting the local control plane");
    let broker = Broker::start().await.expect("starting the broker");
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/connector.yaml");
    kubectl(&["apply", "-f", crd]);
    kubectl(&["create", "namespace", "bench"]);

    let admin = format!("127.0.0.1:{}", free_port().expect("a free port"));
    let operator = Command::new(env!("CARGO_BIN_EXE_obsrv-operator"))
        .env("KUBECONFIG", &kubeconfig)
        .args(["--connector-image", "ghcr.io/obsrv/obsrv-connector:dev"])
        .args(["--sink-bootstrap-servers", broker.bootstrap()])
        .args([
            "--sink-topic",
            "ingest",
            "--sink-failed-topic",
            "connectors.failed",
        ])
        .args([
            "--sink-state-topic",
            "connectors.state",
            "--admin-addr",
            &admin,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting obsrv-operator");
    let operator = Operator(operator);
    let pid = operator.0.id().to_string();

    let manifests = cp.dir().join("connectors.yaml");
    let yaml: Vec<String> = (0..n).map(|i| connector(i, "bench")).collect();
    std::fs::write(&manifests, yaml.join("---\n")).expect("writing the manifests");
    let started = Instant::now();
    kubectl(&["apply", "-f", manifests.to_str().unwrap_or_default()]);
    let applied = started.elapsed();

    let client = cp.client().await.expect("a client");
    let api: Api<Connector> = Api::namespaced(client, "bench");
    loop {
        let list = api
            .list(&ListParams::default())
            .await
            .expect("listing Connectors");
        let done = list
            .items
            .iter()
            .filter(|c| {
                c.status.as_ref().and_then(|s| s.observed_generation) == c.metadata.generation
            })
            .count();
        if done == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {done} of {n} Connectors reconciled after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    let at_done = peak_rss_kib(&pid).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let steady = peak_rss_kib(&pid).unwrap_or(0);
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "operator as its own process: {n} Connectors applied by kubectl in {:.2}s, all reconciled {:.2}s after the apply began; \
         operator peak RSS {:.1} MiB then, {:.1} MiB after 10 s more (target < {OPERATOR_RSS_TARGET_MIB} MiB)",
        applied.as_secs_f64(),
        took.as_secs_f64(),
        mib(at_done),
        mib(steady),
    );
}

/// The fixture as Connector `c<i>` in `namespace`.
fn connector(i: usize, namespace: &str) -> String {
    MANIFEST
        .replace("name: clicks", &format!("name: c{i}"))
        .replace("namespace: web", &format!("namespace: {namespace}"))
}

/// The operator process; stopped (SIGKILL) when dropped.
struct Operator(std::process::Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let h = Harness::new("bench").await;
    for i in 0..n {
        h.apply_yaml(&connector(i, "bench"));
    }
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let started = Instant::now();
    // Two passes per Connector, as in a cluster: the first adds the finalizer, the second applies.
    for pass in 0..2 {
        let failures = futures::stream::iter(names.iter())
            .map(|name| {
                let h = &h;
                async move { h.reconcile(name).await.is_err() }
            })
            .buffer_unordered(32)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        assert_eq!(failures, 0, "pass {pass}: reconciles failed");
    }
    let took = started.elapsed();
    let steady = Instant::now();
    h.api.clear_calls();
    futures::stream::iter(names.iter())
        .map(|name| {
            let h = &h;
            async move { h.reconcile(name).await.is_err() }
        })
        .buffer_unordered(32)
        .for_each(|_| std::future::ready(()))
        .await;
    let write_calls: Vec<_> = h
        .api
        .calls()
        .into_iter()
        .filter(|c| c.verb != "get" && c.verb != "list")
        .collect();
    let writes = write_calls.len();
    if let Some(c) = write_calls.first() {
        println!("first steady-state write: {c:?}");
    }
    println!(
        "cold start: {n} Connectors applied in {:.2}s ({:.0} reconciles/s); steady-state pass {:.2}s with {writes} writes; peak RSS {} KiB (includes the in-memory API)",
        took.as_secs_f64(),
        (2 * n) as f64 / took.as_secs_f64(),
        steady.elapsed().as_secs_f64(),
        peak_rss_kib("self").map_or("?".into(), |k| k.to_string()),
    );
    drop(h);
    as_its_own_process(n).await;
}
