//! The real controller wiring (watches, predicates, owned objects, shutdown) run
//! against the in-memory API's watch streams. Requeues are set to an hour, so everything here
//! happens because a watch triggered it.

mod support;

use std::time::Duration;

use obsrv_crds::Phase;
use obsrv_operator::controller;
use serde_json::json;
use support::*;

const POSTGRES: &str = include_str!("fixtures/postgres.yaml");

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_drive_reconciles_and_status_writes_do_not_loop() {
    let h = Harness::with_poll_interval("shop", Duration::from_secs(3600)).await;
    h.secret("pg-creds", &[("username", "app"), ("password", "pw")]);
    h.secret("pg-ca", &[("ca.crt", "ca")]);
    h.apply_yaml(POSTGRES);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(controller::run(h.ctx.clone(), stopped));

    eventually("Deployment created and status written", || {
        h.object(DEPLOYMENTS, "orders").is_some()
            && h.connector("orders").and_then(|c| c.status).is_some()
    })
    .await;
    assert_eq!(h.status("orders").phase, Some(Phase::Pending));

    // Our own status writes and applies must not keep reconciles going: the count settles (a loop
    // would never hold still for 300 ms, however slow the machine).
    let mut settled = false;
    for _ in 0..30 {
        let before = h.metrics.reconciles.get();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if h.metrics.reconciles.get() == before {
            settled = true;
            break;
        }
    }
    assert!(settled, "reconciles keep running on our own writes");
    assert!(
        h.metrics.reconciles.get() < 20,
        "a handful of reconciles, not a loop"
    );

    // An annotation change (the restart budget's obsrv.io/retry) triggers a reconcile.
    let before = h.metrics.reconciles.get();
    h.api
        .edit(CONNECTORS.0, CONNECTORS.1, "shop", "orders", |c| {
            c["metadata"]["annotations"] = json!({"obsrv.io/retry": "1"});
        });
    eventually("the retry annotation reconciled", || {
        h.metrics.reconciles.get() > before
    })
    .await;

    // A spec edit (generation change) triggers.
    let before = h.checksum("orders");
    h.edit_spec("orders", |s| {
        s["source"]["postgres"]["batchSize"] = json!(123)
    });
    eventually("spec edit rolled the pods", || {
        h.checksum("orders") != before
    })
    .await;
    eventually("status caught up with generation 2", || {
        h.status("orders").observed_generation == Some(2)
    })
    .await;

    // Deletion: the finalizer runs and the Connector goes away.
    h.api.delete(CONNECTORS.0, CONNECTORS.1, "shop", "orders");
    eventually("Connector deleted", || h.connector("orders").is_none()).await;

    stop.send(true).expect("controller listening");
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("graceful shutdown")
        .expect("controller task");
}
