//! Cold start: N Connectors reconciled from scratch (finalizer, apply, status) against the
//! in-memory API (the local control plane's API server in-process), 32 at a time as the controller
//! runs them. Prints wall time, reconciles per second and the process's peak resident memory. Usage: `cargo bench -p obsrv-operator -- [N]`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use futures::StreamExt;
use support::Harness;

const MANIFEST: &str = include_str!("../tests/fixtures/kafka-autoscale.yaml");

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let h = Harness::new("bench").await;
    for i in 0..n {
        h.apply_yaml(
            &MANIFEST
                .replace("name: clicks", &format!("name: c{i}"))
                .replace("namespace: web", "namespace: bench"),
        );
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
        peak_rss_kib().map_or("?".into(), |k| k.to_string()),
    );
}
