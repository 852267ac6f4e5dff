//! Reconcile tests against the in-memory API, with local HTTP servers standing in for pods.

mod support;

use kube::runtime::controller::Action;
use obsrv_crds::Phase;
use obsrv_crds::status::{LastError, RuntimeState, Totals, condition, reason};
use obsrv_operator::rbac;
use serde_json::json;
use support::*;

const POSTGRES: &str = include_str!("fixtures/postgres.yaml");
const KAFKA: &str = include_str!("fixtures/kafka-autoscale.yaml");
const S3: &str = include_str!("fixtures/s3-two-replicas.yaml");
const KAFKA_TWO: &str = include_str!("fixtures/kafka-two-replicas.yaml");
const POSTGRES_TWO: &str = include_str!("fixtures/postgres-two-replicas.yaml");

async fn postgres() -> Harness {
    let h = Harness::new("shop").await;
    h.secret(
        "pg-creds",
        &[("username", "app"), ("password", "s3cr3t-pw")],
    );
    h.secret("pg-ca", &[("ca.crt", "-----BEGIN CERTIFICATE-----")]);
    h.apply_yaml(POSTGRES);
    h
}

/// First reconcile adds the finalizer; the second applies.
async fn create(h: &Harness, name: &str) {
    assert_eq!(h.reconcile_ok(name).await, Action::await_change());
    let c = h.connector(name).expect("connector");
    assert_eq!(
        c.metadata.finalizers,
        Some(vec!["obsrv.io/cleanup".to_string()])
    );
    h.reconcile_ok(name).await;
}

/// Creates, rolls out with one pod answering `status`, and reconciles to Ready.
async fn running_connector(h: &mut Harness, name: &str, lag: i64) -> String {
    create(h, name).await;
    let ip = h.pod(running(lag)).await;
    h.roll_out(name, std::slice::from_ref(&ip));
    h.reconcile_ok(name).await;
    ip
}

#[tokio::test]
async fn create_applies_owned_objects_and_reports_progress() {
    let mut h = postgres().await;
    create(&h, "orders").await;

    let cm = h.object(CONFIGMAPS, "orders").expect("configmap");
    let yaml = cm["data"]["connector.yaml"].as_str().expect("config");
    assert!(yaml.contains("kafka.obsrv:9092"), "sink defaults merged in");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "Connector");
    assert!(h.object(SERVICES, "orders").is_some());
    assert!(h.object(PDBS, "orders").is_none(), "one replica: no PDB");
    assert_eq!(h.replicas("orders"), 1);
    assert_eq!(h.checksum("orders").len(), 64);

    let s = h.status("orders");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(s.source_kind.as_deref(), Some("postgres"));
    assert_eq!(s.replicas_summary.as_deref(), Some("0/1"));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=orders,app.kubernetes.io/name=obsrv-connector")
    );
    assert_eq!(h.condition("orders", condition::RECONCILING).0, "True");
    assert_eq!(h.condition("orders", condition::READY).0, "False");
    assert_eq!(h.condition("orders", condition::CONFIG_VALID).0, "True");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(1))
    );
    assert!(h.event_reasons().contains(&"Created".to_string()));

    // Pods come up and report: Ready, Running, lag and totals in status.
    let ip = h.pod(support::running(42)).await;
    h.set_pod(&ip, |s| {
        s.totals = Totals {
            records_ingested: 1000,
            records_failed: 2,
            bytes_ingested: 64_000,
        };
        s.watermark = Some("updated_at=2026-01-01T00:00:00Z,id=17".into());
        s.max_parallelism = Some(1);
    });
    h.roll_out("orders", std::slice::from_ref(&ip));
    h.reconcile_ok("orders").await;
    let s = h.status("orders");
    assert_eq!(s.phase, Some(Phase::Running));
    assert_eq!(h.condition("orders", condition::READY).0, "True");
    assert_eq!(h.condition("orders", condition::RECONCILING).0, "False");
    assert_eq!(s.replicas_summary.as_deref(), Some("1/1"));
    assert_eq!(s.lag.as_ref().map(|l| l.records), Some(42));
    assert_eq!(s.totals.map(|t| t.records_ingested), Some(1000));
    assert_eq!(
        s.watermark.as_deref(),
        Some("updated_at=2026-01-01T00:00:00Z,id=17")
    );
    assert_eq!(s.max_parallelism, Some(1));

    // Nothing changed: no write at all, neither objects' status nor events beyond applies.
    h.api.clear_calls();
    let writes_before = h.metrics.status_writes.get();
    h.advance(15);
    h.reconcile_ok("orders").await;
    assert_eq!(
        h.api.count("patch", "connectors/status"),
        0,
        "status written only when changed"
    );
    assert_eq!(h.metrics.status_writes.get(), writes_before);
    let writes: Vec<_> = h
        .api
        .calls()
        .into_iter()
        .filter(|c| c.verb != "get" && c.verb != "list")
        .collect();
    assert!(writes.is_empty(), "no writes in steady state: {writes:?}");

    // No secret value anywhere the operator writes.
    for kind in [CONFIGMAPS, DEPLOYMENTS, SERVICES, CONNECTORS, EVENTS] {
        for obj in h.api.list(kind.0, kind.1, "shop") {
            let text = obj.to_string();
            assert!(
                !text.contains("s3cr3t-pw") && !text.contains("czNjcjN0LXB3"),
                "secret leaked into {kind:?}"
            );
        }
    }
}

#[tokio::test]
async fn spec_change_rolls_pods() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    let before = h.checksum("orders");
    h.edit_spec("orders", |s| {
        s["source"]["postgres"]["batchSize"] = json!(500)
    });
    h.reconcile_ok("orders").await;
    assert_ne!(h.checksum("orders"), before);
    assert!(h.event_reasons().contains(&"RollingOut".to_string()));
    let cm = h.object(CONFIGMAPS, "orders").expect("configmap");
    assert!(
        cm["data"]["connector.yaml"]
            .as_str()
            .expect("config")
            .contains("batchSize: 500")
    );
    assert_eq!(h.status("orders").observed_generation, Some(2));
    assert_eq!(
        h.condition("orders", condition::RECONCILING).0,
        "True",
        "the Deployment has not caught up yet"
    );
}

#[tokio::test]
async fn a_secret_rotation_needs_no_roll_and_the_operator_reads_no_secret() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    let before = h.checksum("orders");
    h.rotate_secret("pg-creds", "password", "rotated-pw");
    h.reconcile_ok("orders").await;
    assert_eq!(
        h.checksum("orders"),
        before,
        "pods follow their mounted Secret files: no roll"
    );
    let dep = h.deployment("orders").to_string();
    assert!(!dep.contains("rotated-pw") && !dep.contains("s3cr3t-pw"));
    let secret_calls: Vec<_> = h
        .api
        .calls()
        .into_iter()
        .filter(|c| c.resource.starts_with("secrets"))
        .collect();
    assert!(secret_calls.is_empty(), "{secret_calls:?}");
}

#[tokio::test]
async fn a_missing_secret_is_reported_by_the_pod_that_lacks_it() {
    let mut h = Harness::new("shop").await;
    h.apply_yaml(POSTGRES);
    create(&h, "orders").await;
    // Applied anyway: the Secret volume is optional, so the pod starts and says what it lacks.
    assert!(h.object(DEPLOYMENTS, "orders").is_some());
    let ip = h.pod(running(0)).await;
    h.set_pod(&ip, |s| {
        s.state = RuntimeState::Degraded;
        s.ready = false;
        s.last_error = Some(LastError {
            reason: reason::NOT_FOUND.into(),
            message: "not found: Secret pg-creds key password: No such file or directory (/var/run/secrets/obsrv/pg-creds/password): create the Secret with that key in the Connector's namespace".into(),
            time: None,
        });
    });
    h.roll_out_with("orders", std::slice::from_ref(&ip), false);
    h.reconcile_ok("orders").await;
    let (status, reason, message) = h.condition("orders", condition::READY);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotFound"));
    assert!(
        message.contains("Secret pg-creds key password"),
        "{message}"
    );
}

#[tokio::test]
async fn pause_stop_resume() {
    let mut h = Harness::new("lake").await;
    // Kafka: a source several replicas share (a single-reader kind never runs two).
    h.apply_yaml(KAFKA_TWO);
    create(&h, "events").await;
    assert_eq!(h.replicas("events"), 2);
    assert!(h.object(PDBS, "events").is_some(), "two replicas: PDB");
    let a = h.pod(running(0)).await;
    let b = h.pod(running(0)).await;
    h.roll_out("events", &[a.clone(), b.clone()]);
    h.reconcile_ok("events").await;
    assert_eq!(h.status("events").phase, Some(Phase::Running));

    // Paused: pods stay (not even rolled), their state file says Paused.
    let checksum = h.checksum("events");
    h.edit_spec("events", |s| s["state"] = json!("Paused"));
    h.reconcile_ok("events").await;
    assert_eq!(h.replicas("events"), 2, "paused keeps pods");
    let cm = h.object(CONFIGMAPS, "events").expect("configmap");
    assert_eq!(cm["data"]["state"], "Paused");
    assert_eq!(
        h.checksum("events"),
        checksum,
        "pausing does not roll the pods"
    );
    // Until the pods say they stopped reading, the status does not claim they did.
    h.reconcile_ok("events").await;
    assert_eq!(h.status("events").phase, Some(Phase::Running));
    assert_eq!(h.condition("events", condition::READY).1, "Pausing");
    for ip in [&a, &b] {
        h.set_pod(ip, |s| s.state = RuntimeState::Paused);
    }
    h.roll_out("events", &[a.clone(), b.clone()]);
    h.reconcile_ok("events").await;
    assert_eq!(h.status("events").phase, Some(Phase::Paused));
    assert_eq!(h.condition("events", condition::READY).1, "Paused");

    // Stopped: zero replicas, no PDB; a /scale write does not win over the state.
    h.edit_spec("events", |s| {
        s["state"] = json!("Stopped");
        s["scaling"]["replicas"] = json!(5);
    });
    h.reconcile_ok("events").await;
    assert_eq!(h.replicas("events"), 0);
    assert!(h.object(PDBS, "events").is_none());
    h.roll_out("events", &[]);
    h.reconcile_ok("events").await;
    let s = h.status("events");
    assert_eq!(s.phase, Some(Phase::Stopped));
    assert_eq!(s.replicas_summary.as_deref(), Some("0/0"));
    assert_eq!(h.condition("events", condition::READY).1, "Stopped");

    // Resume: replicas from the spec (the /scale write), pods read again.
    h.edit_spec("events", |s| {
        s["state"] = json!("Running");
        s["scaling"]["replicas"] = json!(2);
    });
    h.reconcile_ok("events").await;
    assert_eq!(h.replicas("events"), 2);
    assert!(h.object(PDBS, "events").is_some());
    for ip in [&a, &b] {
        h.set_pod(ip, |s| s.state = RuntimeState::Running);
    }
    h.roll_out("events", &[a, b]);
    h.reconcile_ok("events").await;
    assert_eq!(h.status("events").phase, Some(Phase::Running));
}

#[tokio::test]
async fn a_single_reader_source_never_runs_two_readers() {
    let h = Harness::new("shop").await;
    h.secret(
        "pg-creds",
        &[("username", "app"), ("password", "s3cr3t-pw")],
    );
    h.apply_yaml(POSTGRES_TWO);
    create(&h, "orders").await;
    // Two replicas asked for; a table cursor reads with one reader: clamped before any pod reports.
    assert_eq!(h.replicas("orders"), 1);
    assert!(h.object(PDBS, "orders").is_none());
    let (status, reason, message) = h.condition("orders", condition::SCALING_LIMITED);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SourceParallelism")
    );
    assert!(message.contains("at most 1"), "{message}");
    // A roll stops the old pod before the new one starts.
    assert_eq!(
        h.deployment("orders")["spec"]["strategy"]["type"],
        "Recreate"
    );
}

#[tokio::test]
async fn a_file_source_runs_the_replicas_asked_for() {
    let h = Harness::new("lake").await;
    h.secret(
        "s3-creds",
        &[("accessKeyId", "AK"), ("secretAccessKey", "SK")],
    );
    h.apply_yaml(S3);
    create(&h, "files").await;
    // Replicas share the objects (each read by one of them): no clamp, rolled one pod at a time.
    assert_eq!(h.replicas("files"), 2);
    assert!(h.object(PDBS, "files").is_some());
    assert_ne!(h.condition("files", condition::SCALING_LIMITED).0, "True");
    assert_eq!(
        h.deployment("files")["spec"]["strategy"]["type"],
        "RollingUpdate"
    );
}

#[tokio::test]
async fn autoscale_up_fast_down_slow_clamped_to_partitions() {
    let mut h = Harness::new("web").await;
    h.apply_yaml(KAFKA);
    create(&h, "clicks").await;
    assert_eq!(h.replicas("clicks"), 1, "starts at minReplicas");

    // The one pod reports a lag asking for 5 replicas, on a topic with 3 partitions.
    let ip = h.pod(running(4_500)).await;
    h.set_pod(&ip, |s| s.max_parallelism = Some(3));
    h.roll_out("clicks", std::slice::from_ref(&ip));
    h.reconcile_ok("clicks").await; // observes the lag
    h.reconcile_ok("clicks").await; // acts on it
    assert_eq!(h.replicas("clicks"), 3, "clamped to the partition count");
    let (limited, why, msg) = h.condition("clicks", condition::SCALING_LIMITED);
    assert_eq!(
        (limited.as_str(), why.as_str()),
        ("True", "SourceParallelism")
    );
    assert!(msg.contains('3'), "{msg}");
    assert!(h.event_reasons().contains(&"Scaled".to_string()));

    // Lag gone: stays up during the scale-down delay, then steps down.
    h.set_pod(&ip, |s| s.lag_records = Some(0));
    h.roll_out("clicks", std::slice::from_ref(&ip));
    h.reconcile_ok("clicks").await;
    h.advance(60);
    h.reconcile_ok("clicks").await;
    assert_eq!(
        h.replicas("clicks"),
        3,
        "no scale-down before scaleDownDelay"
    );
    h.advance(300);
    h.reconcile_ok("clicks").await;
    assert_eq!(h.replicas("clicks"), 1, "scaled down after the delay");
    assert_eq!(h.condition("clicks", condition::SCALING_LIMITED).0, "False");

    // Paused: no autoscaling even with a large lag.
    h.set_pod(&ip, |s| s.lag_records = Some(100_000));
    h.roll_out("clicks", std::slice::from_ref(&ip));
    h.edit_spec("clicks", |s| s["state"] = json!("Paused"));
    h.reconcile_ok("clicks").await;
    h.reconcile_ok("clicks").await;
    assert_eq!(h.replicas("clicks"), 1, "state wins over autoscaling");
}

#[tokio::test]
async fn autoscale_limited_by_max_replicas() {
    let mut h = Harness::new("web").await;
    h.apply_yaml(KAFKA);
    create(&h, "clicks").await;
    let ip = h.pod(running(1_000_000)).await;
    h.roll_out("clicks", std::slice::from_ref(&ip));
    h.reconcile_ok("clicks").await;
    h.reconcile_ok("clicks").await;
    assert_eq!(h.replicas("clicks"), 8);
    assert_eq!(
        h.condition("clicks", condition::SCALING_LIMITED).1,
        "MaxReplicas"
    );
}

#[tokio::test]
async fn aggregates_lag_and_errors_from_pods_one_unreachable() {
    let mut h = Harness::new("web").await;
    h.apply_yaml(KAFKA);
    h.edit_spec("clicks", |s| s["scaling"] = json!({"replicas": 3}));
    create(&h, "clicks").await;
    assert_eq!(h.replicas("clicks"), 3);
    let a = h.pod(running(100)).await;
    h.set_pod(&a, |s| {
        s.totals = Totals {
            records_ingested: 10,
            records_failed: 1,
            bytes_ingested: 100,
        };
        s.watermark = Some("clicks/0@5".into());
        s.lag_seconds = Some(1.5);
    });
    let b = h.pod(running(250)).await;
    h.set_pod(&b, |s| {
        s.state = RuntimeState::Degraded;
        s.totals = Totals {
            records_ingested: 20,
            records_failed: 0,
            bytes_ingested: 200,
        };
        s.watermark = Some("clicks/1@9".into());
        s.lag_seconds = Some(4.0);
        s.last_error = Some(LastError {
            reason: reason::SOURCE_UNREACHABLE.into(),
            message: "source-kafka:9092 refused the connection".into(),
            time: None,
        });
    });
    let c = h.unreachable_ip().await;
    // The unreachable pod sorts first: the worst error must still win over it.
    h.roll_out("clicks", &[c, a, b]);
    h.api.edit(PODS.0, PODS.1, "web", "clicks-pod-2", |p| {
        p["status"]["containerStatuses"] = json!([{
            "name": "connector", "ready": true, "restartCount": 2, "image": "img", "imageID": "img@sha",
            "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2026-01-01T00:05:00Z"}}
        }]);
    });
    h.reconcile_ok("clicks").await;
    let s = h.status("clicks");
    let lag = s.lag.expect("lag");
    assert_eq!(lag.records, 350, "lag summed over the pods that answered");
    assert_eq!(lag.seconds, Some(4.0), "worst lag in seconds");
    assert_eq!(
        s.totals,
        Some(Totals {
            records_ingested: 30,
            records_failed: 1,
            bytes_ingested: 300
        })
    );
    let wm = s.watermark.expect("watermark");
    assert!(
        wm.contains("clicks/0@5") && wm.contains("clicks/1@9"),
        "{wm}"
    );
    let err = s.last_error.expect("last error");
    assert_eq!(
        err.reason, "SourceUnreachable",
        "the source error outranks an unreachable pod"
    );
    assert!(err.message.contains("clicks-pod-2"), "{}", err.message);
    assert_eq!(s.phase, Some(Phase::Degraded));
    let restarts = s.restarts.expect("restarts");
    assert_eq!(restarts.count, 2);
    assert!(restarts.last_restart_time.is_some());
    let (ready, why, _) = h.condition("clicks", condition::READY);
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("False", "SourceUnreachable")
    );
    assert_eq!(h.condition("clicks", condition::STALLED).0, "False");
}

#[tokio::test]
async fn name_conflict_leaves_foreign_object_alone() {
    let h = postgres().await;
    h.api.create(
        DEPLOYMENTS.0,
        DEPLOYMENTS.1,
        "shop",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orders", "labels": {"team": "other"}},
               "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "x"}}, "template": {}}}),
    );
    let foreign = h.deployment("orders");
    create(&h, "orders").await;
    assert_eq!(h.deployment("orders"), foreign, "not taken over");
    assert!(
        h.object(CONFIGMAPS, "orders").is_none(),
        "nothing applied while blocked"
    );
    let (stalled, why, msg) = h.condition("orders", condition::STALLED);
    assert_eq!((stalled.as_str(), why.as_str()), ("True", "NameConflict"));
    assert!(msg.contains("Deployment"), "{msg}");
    assert_eq!(h.status("orders").phase, Some(Phase::Failed));
    assert!(h.event_reasons().contains(&"NameConflict".to_string()));
}

#[tokio::test]
async fn deletion_runs_finalizer_and_releases_the_connector() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    h.api.delete(CONNECTORS.0, CONNECTORS.1, "shop", "orders");
    let marked = h.connector("orders").expect("kept by the finalizer");
    assert!(marked.metadata.deletion_timestamp.is_some());
    h.reconcile_ok("orders").await;
    assert!(
        h.connector("orders").is_none(),
        "finalizer removed, Connector gone"
    );
    assert!(
        h.object(DEPLOYMENTS, "orders").is_none(),
        "owned objects garbage-collected"
    );
    assert_eq!(
        h.api.count("patch", "jobs"),
        0,
        "postgres needs no cleanup Job"
    );
}

/// `deletionPolicy: Delete` on a table source: the finalizer stops the pods, runs a cleanup Job
/// with `--delete-state`, keeps the Connector while it runs and lets it go once it succeeded.
#[tokio::test]
async fn deletion_policy_delete_runs_a_job_that_deletes_the_state() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    h.edit_spec("orders", |s| s["deletionPolicy"] = json!("Delete"));
    h.api.delete(CONNECTORS.0, CONNECTORS.1, "shop", "orders");
    // Deleted now on the operator's (test) clock.
    let now = (h.ctx.clock)().to_string();
    h.api
        .edit(CONNECTORS.0, CONNECTORS.1, "shop", "orders", |c| {
            c["metadata"]["deletionTimestamp"] = json!(now);
        });
    let err = h.reconcile("orders").await.expect_err("waits for the pods");
    assert!(err.to_string().contains("orders-cleanup"), "{err}");
    assert_eq!(h.replicas("orders"), 0, "readers stop first");
    assert!(
        h.object(JOBS, "orders-cleanup").is_none(),
        "no Job while a pod could still commit a position"
    );
    // The kubelet's part: the pods go.
    for p in h.api.list(PODS.0, PODS.1, "shop") {
        let name = p["metadata"]["name"]
            .as_str()
            .expect("pod name")
            .to_string();
        h.api.delete(PODS.0, PODS.1, "shop", &name);
    }
    let err = h.reconcile("orders").await.expect_err("waits for the Job");
    assert!(err.to_string().contains("orders-cleanup"), "{err}");
    assert!(h.connector("orders").is_some(), "kept while the Job runs");
    let job = h.object(JOBS, "orders-cleanup").expect("a cleanup Job");
    let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(
        args,
        &json!([
            "cleanup",
            "--file",
            "/etc/obsrv-connector/connector.yaml",
            "--delete-state"
        ])
    );
    assert!(h.event_reasons().contains(&"CleanupStarted".to_string()));

    h.api.edit(JOBS.0, JOBS.1, "shop", "orders-cleanup", |j| {
        j["status"] = json!({"succeeded": 1});
    });
    h.reconcile_ok("orders").await;
    assert!(h.connector("orders").is_none(), "finalizer released");
    assert!(h.event_reasons().contains(&"CleanupSucceeded".to_string()));
    assert!(h.object(JOBS, "orders-cleanup").is_none(), "Job deleted");
}

#[tokio::test]
async fn invalid_spec_reports_config_invalid_and_keeps_the_deployment() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    let deployment = h.deployment("orders");

    // Two source kinds (an API server without CEL, or an old object, could let this through).
    h.edit_spec("orders", |s| {
        s["source"]["s3"] = json!({"bucket": "b", "format": "csv"})
    });
    let action = h.reconcile_ok("orders").await;
    assert_eq!(
        action,
        Action::await_change(),
        "waits for the next change, no requeue loop"
    );
    let (valid, why, msg) = h.condition("orders", condition::CONFIG_VALID);
    assert_eq!((valid.as_str(), why.as_str()), ("False", "InvalidSource"));
    assert!(msg.contains("exactly one"), "{msg}");
    assert_eq!(h.condition("orders", condition::STALLED).0, "True");
    assert_eq!(
        h.deployment("orders"),
        deployment,
        "the running Deployment is untouched"
    );
    assert!(h.event_reasons().contains(&"InvalidSource".to_string()));

    // Reconciling again changes nothing and writes nothing.
    h.api.clear_calls();
    h.reconcile_ok("orders").await;
    assert_eq!(h.api.count("patch", "connectors/status"), 0);
    assert_eq!(h.api.count("patch", "deployments"), 0);

    // A bad duration is also caught, with the field named.
    h.edit_spec("orders", |s| {
        s["source"].as_object_mut().expect("source").remove("s3");
        s["source"]["postgres"]["pollInterval"] = json!("soon");
    });
    h.reconcile_ok("orders").await;
    let (valid, why, msg) = h.condition("orders", condition::CONFIG_VALID);
    assert_eq!((valid.as_str(), why.as_str()), ("False", "InvalidDuration"));
    assert!(msg.contains("pollInterval"), "{msg}");
    assert_eq!(h.deployment("orders"), deployment);

    // Fixed: valid again and applied.
    h.edit_spec("orders", |s| {
        s["source"]["postgres"]["pollInterval"] = json!("10s")
    });
    h.reconcile_ok("orders").await;
    assert_eq!(h.condition("orders", condition::CONFIG_VALID).0, "True");
    assert_ne!(
        h.checksum("orders"),
        deployment["spec"]["template"]["metadata"]["annotations"]["obsrv.io/config-checksum"]
    );
}

#[tokio::test]
async fn followers_do_not_write() {
    let h = postgres().await;
    h.ctx
        .leader
        .store(false, std::sync::atomic::Ordering::SeqCst);
    h.reconcile_ok("orders").await;
    assert!(
        h.api
            .calls()
            .iter()
            .all(|c| c.verb == "get" || c.verb == "list"),
        "{:?}",
        h.api.calls()
    );
    assert!(
        h.connector("orders")
            .expect("connector")
            .metadata
            .finalizers
            .is_none()
    );
}

#[tokio::test]
async fn every_api_call_is_declared_in_rbac() {
    let mut h = Harness::new("lake").await;
    h.apply_yaml(KAFKA_TWO);
    running_connector(&mut h, "events", 0).await;
    h.edit_spec("events", |s| s["scaling"]["replicas"] = json!(1));
    h.reconcile_ok("events").await;
    h.api.delete(CONNECTORS.0, CONNECTORS.1, "lake", "events");
    h.reconcile_ok("events").await;
    let calls = h.api.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.resource == "poddisruptionbudgets" && c.verb == "delete")
    );
    for c in calls {
        assert!(
            rbac::allows(&c.group, &c.resource, &c.verb),
            "undeclared API call: {c:?}"
        );
    }
}

#[tokio::test]
async fn a_pod_that_cannot_start_reading_says_why_and_recovers() {
    let mut h = postgres().await;
    create(&h, "orders").await;
    // The pod runs but never gets ready: its /status names the cause.
    let ip = h.pod(running(0)).await;
    h.set_pod(&ip, |s| {
        s.state = RuntimeState::Degraded;
        s.ready = false;
        s.last_error = Some(LastError {
            reason: reason::SOURCE_UNREACHABLE.into(),
            message: "orders-db.shop.svc:5432: connection refused".into(),
            time: None,
        });
    });
    h.roll_out_with("orders", std::slice::from_ref(&ip), false);
    h.reconcile_ok("orders").await;
    let (ready, why, msg) = h.condition("orders", condition::READY);
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("False", "SourceUnreachable")
    );
    assert!(msg.contains("connection refused"), "{msg}");
    assert_eq!(h.status("orders").phase, Some(Phase::Degraded));
    assert_eq!(
        h.condition("orders", condition::STALLED).0,
        "False",
        "a source problem is not a spec problem"
    );

    // A pod that is not ready and does not answer yet is just starting, not an error.
    let silent = h.unreachable_ip().await;
    h.roll_out_with("orders", std::slice::from_ref(&silent), false);
    h.reconcile_ok("orders").await;
    assert_eq!(h.condition("orders", condition::READY).1, "RollingOut");
    assert_eq!(h.condition("orders", condition::RECONCILING).0, "True");

    // The source comes back: Ready, and the old error is gone.
    h.set_pod(&ip, |s| {
        s.state = RuntimeState::Running;
        s.ready = true;
        s.last_error = None;
    });
    h.roll_out("orders", std::slice::from_ref(&ip));
    h.reconcile_ok("orders").await;
    assert_eq!(h.condition("orders", condition::READY).0, "True");
    assert!(h.status("orders").last_error.is_none());
}

#[tokio::test]
async fn an_unreadable_connector_is_reported_and_never_blocks_deletion() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    let deployment = h.deployment("orders");
    // Written around validation (an old object, or an API server without the schema).
    h.edit_spec("orders", |s| s["state"] = json!("Sleeping"));
    assert!(h.reconcile_guarded("orders").await.is_ok());
    let stored = h.object(CONNECTORS, "orders").expect("connector");
    let conds = stored["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .clone();
    let valid = conds
        .iter()
        .find(|c| c["type"] == "ConfigValid")
        .expect("ConfigValid");
    assert_eq!(
        (valid["status"].as_str(), valid["reason"].as_str()),
        (Some("False"), Some("UnreadableSpec"))
    );
    assert!(
        valid["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Sleeping"),
        "{valid}"
    );
    assert_eq!(stored["status"]["phase"], "Failed");
    assert_eq!(
        h.deployment("orders"),
        deployment,
        "nothing applied from an unreadable spec"
    );
    assert!(h.event_reasons().contains(&"UnreadableSpec".to_string()));

    h.api.clear_calls();
    h.reconcile_guarded("orders")
        .await
        .expect("second reconcile");
    assert_eq!(
        h.api.count("patch", "connectors/status"),
        0,
        "reported once, no loop"
    );

    h.api.delete(CONNECTORS.0, CONNECTORS.1, "shop", "orders");
    h.reconcile_guarded("orders")
        .await
        .expect("deletion reconcile");
    assert!(
        h.object(CONNECTORS, "orders").is_none(),
        "finalizer released, Connector gone"
    );

    for c in h.api.calls() {
        assert!(
            rbac::allows(&c.group, &c.resource, &c.verb),
            "undeclared API call: {c:?}"
        );
    }
}

#[tokio::test]
async fn a_stale_cache_does_not_cause_a_second_identical_status_write() {
    let h = postgres().await;
    h.reconcile_ok("orders").await; // finalizer
    let snapshot = h.connector("orders").expect("connector");
    h.reconcile_ok("orders").await; // applies, writes status
    assert_eq!(h.metrics.status_writes.get(), 1);
    // The owned Deployment's watch event arrives before the Connector's status event: the
    // controller reconciles the cached object, which does not show our status yet.
    h.api.clear_calls();
    obsrv_operator::reconcile::reconcile(std::sync::Arc::new(snapshot), h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        h.api.count("patch", "connectors/status"),
        0,
        "same status, not written twice"
    );
    assert_eq!(h.metrics.status_writes.get(), 1);
}

#[tokio::test]
async fn an_outage_past_the_retry_budget_is_stalled_and_clears_by_itself() {
    let mut h = postgres().await;
    let ip = running_connector(&mut h, "orders", 0).await;
    let outage = |attempts: u32| {
        move |s: &mut obsrv_crds::RuntimeStatus| {
            s.state = RuntimeState::Degraded;
            s.ready = false;
            s.failed_attempts = attempts;
            s.last_error = Some(LastError {
                reason: reason::SOURCE_UNREACHABLE.into(),
                message: "connection refused at pg:5432: is Postgres listening there?".into(),
                time: None,
            });
        }
    };
    // A first failure: not ready, but kstatus would still call it Current (not stalled yet).
    h.set_pod(&ip, outage(1));
    h.reconcile_ok("orders").await;
    assert_eq!(
        h.condition("orders", condition::READY).1,
        "SourceUnreachable"
    );
    assert_eq!(h.condition("orders", condition::STALLED).0, "False");

    // Past the budget: Stalled with the reason (kstatus: Failed), not Reconciling.
    h.set_pod(&ip, outage(5));
    h.reconcile_ok("orders").await;
    let (stalled, why, msg) = h.condition("orders", condition::STALLED);
    assert_eq!(
        (stalled.as_str(), why.as_str()),
        ("True", "SourceUnreachable")
    );
    assert!(
        msg.contains("5 attempts") && msg.contains("pg:5432"),
        "{msg}"
    );
    assert_eq!(h.condition("orders", condition::RECONCILING).0, "False");

    // The source is back: everything clears without anyone touching the Connector.
    h.set_pod(&ip, |s| {
        s.state = RuntimeState::Running;
        s.ready = true;
        s.failed_attempts = 0;
        s.last_error = None;
    });
    h.reconcile_ok("orders").await;
    assert_eq!(h.condition("orders", condition::STALLED).0, "False");
    assert_eq!(h.condition("orders", condition::READY).0, "True");
    assert!(h.status("orders").last_error.is_none());
}

#[tokio::test]
async fn totals_never_go_backwards_across_restarts_and_scale_to_zero() {
    let mut h = Harness::new("lake").await;
    h.apply_yaml(KAFKA_TWO);
    create(&h, "events").await;
    let started = |s: i64| {
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(s).expect("valid"),
        ))
    };
    let counted = |n: u64| Totals {
        records_ingested: n,
        records_failed: 0,
        bytes_ingested: n * 100,
    };
    let a = h.pod(running(0)).await;
    let b = h.pod(running(0)).await;
    h.set_pod(&a, |s| {
        s.started_at = started(1);
        s.totals = counted(100);
    });
    h.set_pod(&b, |s| {
        s.started_at = started(1);
        s.totals = counted(50);
    });
    h.roll_out("events", &[a.clone(), b.clone()]);
    h.reconcile_ok("events").await;
    let ingested = |h: &Harness| h.status("events").totals.expect("totals").records_ingested;
    assert_eq!(ingested(&h), 150);

    // Pod a's container restarts: its new process counts from zero; nothing is lost.
    h.set_pod(&a, |s| {
        s.started_at = started(2);
        s.totals = counted(10);
    });
    h.reconcile_ok("events").await;
    assert_eq!(ingested(&h), 160);

    // Scaled to zero, then up again: the totals hold, and new pods add to them.
    h.edit_spec("events", |s| s["scaling"]["replicas"] = json!(0));
    h.reconcile_ok("events").await;
    h.roll_out("events", &[]);
    h.reconcile_ok("events").await;
    assert_eq!(
        ingested(&h),
        160,
        "was 0 before: the demo's scale to 0 and back"
    );
    h.edit_spec("events", |s| s["scaling"]["replicas"] = json!(1));
    h.reconcile_ok("events").await;
    let c = h.pod(running(0)).await;
    h.set_pod(&c, |s| {
        s.started_at = started(3);
        s.totals = counted(5);
    });
    h.roll_out("events", std::slice::from_ref(&c));
    h.reconcile_ok("events").await;
    assert_eq!(ingested(&h), 165);
}

#[tokio::test]
async fn replicas_lag_is_summed_once_and_drives_the_autoscaler() {
    let mut h = Harness::new("web").await;
    h.apply_yaml(KAFKA);
    h.edit_spec("clicks", |s| {
        s["scaling"]["autoscale"]["minReplicas"] = json!(2);
    });
    create(&h, "clicks").await;
    assert_eq!(h.replicas("clicks"), 2);
    // Each replica reports the lag of its own partitions (2 of 4 each): 1,500 + 1,500.
    let a = h.pod(running(1_500)).await;
    let b = h.pod(running(1_500)).await;
    for ip in [&a, &b] {
        h.set_pod(ip, |s| s.max_parallelism = Some(4));
    }
    h.roll_out("clicks", &[a, b]);
    h.reconcile_ok("clicks").await;
    assert_eq!(h.status("clicks").lag.expect("lag").records, 3_000);
    h.reconcile_ok("clicks").await;
    assert_eq!(
        h.replicas("clicks"),
        3,
        "3,000 records at 1,000 per replica: 3 (not 6 from counting the group twice)"
    );
}

#[tokio::test]
async fn lag_observed_at_is_refreshed_once_a_minute_while_pods_report() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 7).await;
    let seen = |h: &Harness| {
        h.status("orders")
            .lag
            .and_then(|l| l.observed_at)
            .expect("observedAt")
    };
    let first = seen(&h);
    h.advance(30);
    h.reconcile_ok("orders").await;
    assert_eq!(seen(&h), first, "unchanged lag, no write within a minute");
    h.advance(31);
    h.reconcile_ok("orders").await;
    assert!(seen(&h).0 > first.0, "refreshed after a minute");
}

#[tokio::test]
async fn a_connector_that_keeps_restarting_stops_until_a_change_or_a_retry() {
    let mut h = postgres().await;
    running_connector(&mut h, "orders", 0).await;
    let checksum = h.checksum("orders");
    let crash = |h: &Harness, restarts: i64| {
        h.api.edit(PODS.0, PODS.1, "shop", "orders-pod-0", |p| {
            p["metadata"]["annotations"] = json!({"obsrv.io/config-checksum": checksum});
            p["status"]["containerStatuses"] = json!([{
                "name": "connector", "ready": false, "restartCount": restarts, "image": "img", "imageID": "img@sha",
                "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "finishedAt": "2026-01-01T00:05:00Z"}}
            }]);
        });
    };
    crash(&h, 4);
    h.reconcile_ok("orders").await;
    assert_eq!(h.replicas("orders"), 1, "within the budget");

    crash(&h, 5);
    h.reconcile_ok("orders").await;
    let s = h.status("orders");
    assert_eq!(s.phase, Some(Phase::Failed));
    let (stalled, why, msg) = h.condition("orders", condition::STALLED);
    assert_eq!(
        (stalled.as_str(), why.as_str()),
        ("True", "RestartBudgetExhausted")
    );
    assert!(
        msg.contains("restarted 5 times") && msg.contains("exit code 2 (Error)"),
        "{msg}"
    );
    assert!(msg.contains("obsrv.io/retry"), "says how to retry: {msg}");
    h.reconcile_ok("orders").await;
    assert_eq!(h.replicas("orders"), 0, "no more restarts");
    h.roll_out("orders", &[]);
    h.reconcile_ok("orders").await;
    assert_eq!(h.replicas("orders"), 0, "stays down without pods to count");
    assert_eq!(h.status("orders").phase, Some(Phase::Failed));

    // The documented retry: a new annotation value runs it again.
    h.api
        .edit(CONNECTORS.0, CONNECTORS.1, "shop", "orders", |c| {
            c["metadata"]["annotations"] = json!({"obsrv.io/retry": "1"});
        });
    h.reconcile_ok("orders").await;
    h.reconcile_ok("orders").await;
    assert_eq!(h.replicas("orders"), 1);
    assert!(h.status("orders").restart_budget.is_none());
}
