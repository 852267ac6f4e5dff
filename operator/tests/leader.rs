//! Leader election against the in-memory API: two replicas, exactly one leader, and a handover
//! when the leader shuts down (it releases the Lease).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use obsrv_operator::leader;
use support::InProcessApi;

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_handover_on_shutdown() {
    let api = InProcessApi::new();
    api.namespace("ops");
    let a = Arc::new(AtomicBool::new(false));
    let b = Arc::new(AtomicBool::new(false));
    let (stop_a, rx_a) = tokio::sync::watch::channel(false);
    let (stop_b, rx_b) = tokio::sync::watch::channel(false);
    let run_a = tokio::spawn(leader::run(
        api.client(),
        "ops".into(),
        "obsrv-operator".into(),
        "a".into(),
        a.clone(),
        rx_a,
    ));
    eventually("a leads", || a.load(Ordering::SeqCst)).await;
    let run_b = tokio::spawn(leader::run(
        api.client(),
        "ops".into(),
        "obsrv-operator".into(),
        "b".into(),
        b.clone(),
        rx_b,
    ));
    // b has tried at least once by now and must follow.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        a.load(Ordering::SeqCst) && !b.load(Ordering::SeqCst),
        "exactly one leader"
    );
    let lease = api
        .get("coordination.k8s.io", "leases", "ops", "obsrv-operator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "a");

    stop_a.send(true).expect("a listening");
    tokio::time::timeout(Duration::from_secs(5), run_a)
        .await
        .expect("a stops")
        .expect("a task");
    assert!(!a.load(Ordering::SeqCst), "a stepped down");
    // b retries every RENEW_EVERY and takes the released Lease.
    eventually("b takes over", || b.load(Ordering::SeqCst)).await;
    let lease = api
        .get("coordination.k8s.io", "leases", "ops", "obsrv-operator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    stop_b.send(true).expect("b listening");
    tokio::time::timeout(Duration::from_secs(5), run_b)
        .await
        .expect("b stops")
        .expect("b task");
}
