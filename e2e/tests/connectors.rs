//! End-to-end: the real operator and connector binaries on the local control plane, driven with
//! kubectl the way a user drives a cluster, against a real Postgres and broker.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use obsrv_e2e::harness::{INGEST_TOPIC, OWN_BUILD_IMAGE, Stack, ingested_ids};
use obsrv_e2e::services::{Postgres, free_port, proxy::Proxy, unique_name};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// A Secret and a Postgres Connector reading `public.orders` by `(updated_at, id)`.
fn pg_manifest(name: &str, host: &str, port: u16, pg: &Postgres, spec_extra: Value) -> String {
    pg_manifest_as(name, host, port, pg, (pg.user(), pg.password()), spec_extra)
}

fn pg_manifest_as(
    name: &str,
    host: &str,
    port: u16,
    pg: &Postgres,
    login: (&str, &str),
    spec_extra: Value,
) -> String {
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-creds")},
        "stringData": {"username": login.0, "password": login.1},
    });
    let mut spec = json!({
        "dataset": name,
        "source": {"postgres": {
            "host": host, "port": port, "database": pg.database(),
            "credentials": {"secretName": format!("{name}-creds")},
            "tls": {"mode": "disable"},
            "tables": [{"name": "public.orders", "cursor": {"column": "updated_at", "tieBreaker": "id"}}],
            "pollInterval": "1s", "batchSize": 100,
        }},
    });
    merge(&mut spec, spec_extra);
    let connector = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name}, "spec": spec,
    });
    format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret).unwrap(),
        serde_yaml::to_string(&connector).unwrap()
    )
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// `orders` with `rows` rows; every 10 rows share an `updated_at`, so keyset pagination must
/// break ties by id to deliver them all.
async fn orders_table(pg: &Postgres, rows: u32) -> Result<()> {
    pg.psql(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO orders SELECT g, 'item-' || g, timestamptz '2026-11-01 00:00:00+00' + (g / 10) * interval '1 second'
         FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    Ok(())
}

async fn insert_orders(pg: &Postgres, from: u32, to: u32) -> Result<()> {
    pg.psql(&format!(
        "INSERT INTO orders SELECT g, 'item-' || g, now() FROM generate_series({from}, {to}) g"
    ))
    .await?;
    Ok(())
}

/// `kubectl patch connector <name> --type merge -p <patch>`.
fn patch_spec(stack: &Stack, name: &str, patch: &str) -> Result<()> {
    stack.kubectl_ok(&["patch", "connector", name, "--type", "merge", "-p", patch])?;
    Ok(())
}

fn status(stack: &Stack, name: &str) -> Result<Value> {
    Ok(stack.get_json(&["connector", name])?["status"].clone())
}

async fn wait_ready(stack: &Stack, name: &str) -> Result<()> {
    stack
        .eventually(&format!("{name} Ready=True"), WAIT, async || {
            Ok((stack.condition(name, "Ready")?["status"] == "True").then_some(()))
        })
        .await
}

async fn start_with_orders(rows: u32) -> Result<(Postgres, Stack)> {
    let (pg, stack) = tokio::try_join!(Postgres::start(), Stack::start(None))?;
    orders_table(&pg, rows).await?;
    Ok((pg, stack))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connector_delivers_every_row_and_reports_ready_lag_and_totals() -> Result<()> {
    let (pg, stack) = start_with_orders(500).await?;
    stack.apply(&pg_manifest("orders", pg.host(), pg.port(), &pg, json!({})))?;

    let ids = ingested_ids(&stack.broker, "orders", 500, WAIT).await?;
    assert_eq!(
        ids,
        (1..=500).collect(),
        "every row, ties on updated_at included, arrives once"
    );
    let records = stack
        .broker
        .consume_all(INGEST_TOPIC, 500, Duration::from_secs(10))
        .await?;
    let first = records.first().context("no record")?;
    let envelope = first.json()?;
    assert_eq!(envelope["dataset"], "orders");
    assert_eq!(
        envelope["obsrv_meta"]["source"],
        json!({"connector": "postgres", "connectorInstance": format!("{}/orders", stack.namespace)})
    );
    assert!(
        envelope["obsrv_meta"]["syncts"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000)
    );
    let event_id = first
        .header("obsrv-event-id")
        .context("obsrv-event-id header")?;
    assert_eq!(
        first.key.as_deref(),
        Some(event_id),
        "the key carries the event id"
    );

    wait_ready(&stack, "orders").await?;
    stack
        .eventually("lag 0 and totals 500", WAIT, async || {
            let s = status(&stack, "orders")?;
            Ok((s["lag"]["records"] == 0 && s["totals"]["recordsIngested"] == 500).then_some(()))
        })
        .await?;
    let table = stack.kubectl_ok(&["get", "connectors"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("orders"))
        .context("orders row in kubectl get")?;
    for cell in ["orders", "postgres", "Running", "True", "1/1"] {
        assert!(
            row.split_whitespace().any(|c| c == cell),
            "{cell:?} missing in {row:?}\n{table}"
        );
    }

    insert_orders(&pg, 501, 520).await?;
    let ids = ingested_ids(&stack.broker, "orders", 520, WAIT).await?;
    assert_eq!(ids.len(), 520, "new rows keep flowing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_image_runs_a_builtin_kind_in_an_image_of_your_own() -> Result<()> {
    let (pg, stack) = start_with_orders(40).await?;
    let image = format!("{OWN_BUILD_IMAGE}:1.2.3");
    stack.apply(&pg_manifest(
        "orders",
        pg.host(),
        pg.port(),
        &pg,
        json!({"image": image}),
    ))?;
    let ids = ingested_ids(&stack.broker, "orders", 40, WAIT).await?;
    assert_eq!(ids, (1..=40).collect());
    let d = stack.get_json(&["deployment", "orders"])?;
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        image
    );
    wait_ready(&stack, "orders").await?;

    // A custom source names its image in source.custom: both at once is refused with a reason.
    let both = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "both"},
        "spec": {"dataset": "both", "image": image, "source": {"custom": {"image": "x:1"}}},
    });
    let out = stack.kubectl_with(&["apply", "-f", "-"], Some(&both.to_string()))?;
    assert!(
        !out.success && out.stderr.contains("spec.source.custom.image"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_edit_rolls_the_pods_and_a_secret_rotation_reaches_them_without_one() -> Result<()> {
    let (pg, stack) = start_with_orders(50).await?;
    // The connector reads as a read-only role whose password we rotate.
    pg.psql(
        "CREATE ROLE reader LOGIN PASSWORD 'first-password'; GRANT SELECT ON orders TO reader;",
    )
    .await?;
    stack.apply(&pg_manifest_as(
        "orders",
        pg.host(),
        pg.port(),
        &pg,
        ("reader", "first-password"),
        json!({}),
    ))?;
    wait_ready(&stack, "orders").await?;
    let before: BTreeSet<String> = stack.ready_pods("orders")?.into_iter().collect();

    patch_spec(
        &stack,
        "orders",
        r#"{"spec":{"source":{"postgres":{"batchSize":25}}}}"#,
    )?;
    let after_edit = stack
        .eventually("a new pod after the spec edit", WAIT, async || {
            let now: BTreeSet<String> = stack.ready_pods("orders")?.into_iter().collect();
            Ok((!now.is_empty() && now.is_disjoint(&before)).then_some(now))
        })
        .await?;

    // Rotate the password in Postgres (the old one stops working for new sessions) and in the
    // Secret: the running pod reconnects with the new one, no roll.
    pg.psql("ALTER ROLE reader PASSWORD 'rotated-password'")
        .await?;
    stack.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: orders-creds}\nstringData: {username: reader, password: rotated-password}\n")?;
    stack
        .eventually(
            "the pod reconnected with the rotated Secret",
            WAIT,
            async || {
                let logs = stack.pod_logs()?;
                Ok(logs
                    .contains("a Secret changed: reconnecting")
                    .then_some(()))
            },
        )
        .await?;
    insert_orders(&pg, 51, 60).await?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 60, WAIT).await?.len(),
        60
    );
    let now: BTreeSet<String> = stack.ready_pods("orders")?.into_iter().collect();
    assert_eq!(now, after_edit, "a rotation does not roll the pods");
    wait_ready(&stack, "orders").await?;

    // No secret value anywhere a user or a log collector looks.
    let cm = stack.get_json(&["configmap", "orders"])?;
    let seen = [
        cm.to_string(),
        stack.get_json(&["connector", "orders"])?.to_string(),
        stack.get_json(&["deployment", "orders"])?.to_string(),
        stack.kubectl_ok(&["get", "events", "-o", "json"])?,
        stack.pod_logs()?,
        std::fs::read_to_string(stack.operator_log())?,
    ];
    for value in ["first-password", "rotated-password", pg.password()] {
        for text in &seen {
            assert!(!text.contains(value), "a secret value leaked: {value}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stop_and_resume() -> Result<()> {
    let (pg, stack) = start_with_orders(20).await?;
    stack.apply(&pg_manifest("orders", pg.host(), pg.port(), &pg, json!({})))?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 20, WAIT).await?.len(),
        20
    );
    wait_ready(&stack, "orders").await?;
    let pods = |stack: &Stack| -> Result<Vec<String>> {
        Ok(stack
            .pods("orders")?
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect())
    };
    let before = pods(&stack)?;

    patch_spec(&stack, "orders", r#"{"spec":{"state":"Paused"}}"#)?;
    stack
        .eventually("phase Paused", WAIT, async || {
            Ok((status(&stack, "orders")?["phase"] == "Paused").then_some(()))
        })
        .await?;
    insert_orders(&pg, 21, 30).await?;
    // Paused keeps its pods but reads nothing: several poll intervals later, still 20.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 21, Duration::from_secs(3))
            .await?
            .len(),
        20
    );
    assert!(
        !stack.ready_pods("orders")?.is_empty(),
        "a paused connector keeps its pods"
    );
    assert_eq!(pods(&stack)?, before, "pausing does not roll the pods");

    // Resume: the same pods read on from where they stopped.
    patch_spec(&stack, "orders", r#"{"spec":{"state":"Running"}}"#)?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 30, WAIT).await?.len(),
        30,
        "rows written while paused arrive"
    );
    assert_eq!(pods(&stack)?, before, "resuming does not roll the pods");
    let events = stack.kubectl_ok(&["get", "events"])?;
    assert!(!events.contains("rolling pods"), "{events}");

    patch_spec(&stack, "orders", r#"{"spec":{"state":"Stopped"}}"#)?;
    stack
        .eventually("no pods and phase Stopped", WAIT, async || {
            let s = status(&stack, "orders")?;
            Ok((s["phase"] == "Stopped" && stack.pods("orders")?.is_empty()).then_some(()))
        })
        .await?;
    let deployment = stack.get_json(&["deployment", "orders"])?;
    assert_eq!(deployment["spec"]["replicas"], 0);
    assert!(
        status(&stack, "orders")?["totals"]["recordsIngested"].as_u64() >= Some(30),
        "totals survive scaling to zero"
    );

    patch_spec(&stack, "orders", r#"{"spec":{"state":"Running"}}"#)?;
    insert_orders(&pg, 31, 40).await?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 40, WAIT).await?.len(),
        40,
        "a stopped connector resumes where it stopped"
    );
    wait_ready(&stack, "orders").await?;
    stack
        .eventually("totals over the Connector's life", WAIT, async || {
            let n = status(&stack, "orders")?["totals"]["recordsIngested"].as_u64();
            Ok((n >= Some(40)).then_some(()))
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_scales_out_to_its_partitions_and_no_further() -> Result<()> {
    let stack = Stack::start(None).await?;
    let topic = unique_name("clicks");
    stack.broker.create_topic(&topic, 3).await?;
    for i in 0..60 {
        stack
            .broker
            .produce(
                &topic,
                Some(&format!("k{i}")),
                &json!({"id": i}).to_string(),
            )
            .await?;
    }
    let manifest = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector", "metadata": {"name": "clicks"},
        "spec": {"dataset": "clicks", "scaling": {"replicas": 1},
                 "source": {"kafka": {"bootstrapServers": stack.broker.bootstrap(), "topics": [topic]}}},
    });
    stack.apply(&serde_yaml::to_string(&manifest)?)?;
    assert_eq!(
        ingested_ids(&stack.broker, "clicks", 60, WAIT).await?.len(),
        60
    );

    let first = stack.ready_pods("clicks")?;
    stack.kubectl_ok(&["scale", "connector", "clicks", "--replicas", "3"])?;
    let three = stack
        .eventually("3 ready pods", WAIT, async || {
            let pods = stack.ready_pods("clicks")?;
            Ok((pods.len() == 3).then_some(pods))
        })
        .await?;
    assert!(
        first.iter().all(|p| three.contains(p)),
        "scaling out adds pods without restarting the running one: {first:?} -> {three:?}"
    );
    for i in 60..120 {
        stack
            .broker
            .produce(
                &topic,
                Some(&format!("k{i}")),
                &json!({"id": i}).to_string(),
            )
            .await?;
    }
    assert_eq!(
        ingested_ids(&stack.broker, "clicks", 120, WAIT)
            .await?
            .len(),
        120,
        "three replicas share the topic"
    );

    stack.kubectl_ok(&["scale", "connector", "clicks", "--replicas", "5"])?;
    let limited = stack
        .eventually("ScalingLimited=True", WAIT, async || {
            let c = stack.condition("clicks", "ScalingLimited")?;
            Ok((c["status"] == "True").then_some(c))
        })
        .await?;
    let message = limited["message"].as_str().unwrap_or_default();
    assert!(
        message.contains('3') && message.contains("partition"),
        "ScalingLimited says why: {message}"
    );
    assert_eq!(status(&stack, "clicks")?["replicas"], 3);
    assert_eq!(
        stack.get_json(&["deployment", "clicks"])?["spec"]["replicas"],
        3
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_rejected_with_a_clear_message() -> Result<()> {
    let stack = Stack::start(None).await?;
    let two_sources = "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {name: bad}\nspec:\n  dataset: x\n  source:\n    kafka: {bootstrapServers: 'b:9092', topics: [t]}\n    s3: {bucket: b, format: json}\n";
    let out = stack.kubectl_with(&["apply", "-f", "-"], Some(two_sources))?;
    assert!(!out.success, "two source kinds must be refused");
    assert!(
        out.stderr.contains("exactly one source kind"),
        "{}",
        out.stderr
    );

    let good = "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {name: good}\nspec:\n  dataset: x\n  state: Stopped\n  source:\n    kafka: {bootstrapServers: 'b:9092', topics: [t]}\n";
    stack.apply(good)?;
    let out = stack.kubectl_with(
        &["apply", "-f", "-"],
        Some(&good.replace("dataset: x", "dataset: other")),
    )?;
    assert!(!out.success, "changing spec.dataset must be refused");
    assert!(
        out.stderr.contains("spec.dataset is immutable"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// The address connector pods reach this machine on: loopback locally; on a real cluster it must be
/// given as `E2E_HOST_ADDRESS`.
fn host_address() -> Result<String> {
    match std::env::var("E2E_HOST_ADDRESS") {
        Ok(a) => Ok(a),
        Err(_) if std::env::var_os("E2E_KUBECONFIG").is_some() => {
            bail!(
                "on a real cluster, set E2E_HOST_ADDRESS to an address of this machine that pods can reach"
            )
        }
        Err(_) => Ok("127.0.0.1".into()),
    }
}

/// Forwards `host`:`port` to `target` until aborted: the "source comes back" switch.
async fn tcp_forward(host: &str, port: u16, target: String) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind((host, port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_source_is_reported_and_recovers() -> Result<()> {
    let (pg, stack) = start_with_orders(30).await?;
    let port = free_port()?; // nothing listens here yet
    let host = host_address()?;
    stack.apply(&pg_manifest("orders", &host, port, &pg, json!({})))?;
    let ready = stack
        .eventually("Ready=False with a reason", WAIT, async || {
            let s = status(&stack, "orders")?;
            let reason = s["lastError"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ready = stack.condition("orders", "Ready")?;
            Ok((ready["status"] == "False" && reason == "SourceUnreachable").then_some(ready))
        })
        .await?;
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!(
                "connection refused at {host}:{port}: is Postgres listening there?"
            )),
        "Ready=False names the endpoint and the likely cause: {ready}"
    );
    let events = stack
        .eventually("a SourceUnreachable event", WAIT, async || {
            let e = stack.kubectl_ok(&["get", "events", "-o", "json"])?;
            Ok(e.contains("SourceUnreachable").then_some(e))
        })
        .await?;
    assert!(events.contains("is Postgres listening there?"), "{events}");

    let forward = tcp_forward(&host, port, format!("{}:{}", pg.host(), pg.port())).await?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 30, WAIT).await?.len(),
        30
    );
    wait_ready(&stack, "orders").await?;
    forward.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_outage_mid_stream_is_reported_and_heals_by_itself() -> Result<()> {
    let (pg, stack) = start_with_orders(30).await?;
    // The connector reaches Postgres through a proxy: cutting it is the outage.
    let proxy = Proxy::start(&format!("{}:{}", pg.host(), pg.port())).await?;
    stack.apply(&pg_manifest(
        "orders",
        "127.0.0.1",
        proxy.port(),
        &pg,
        json!({}),
    ))?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 30, WAIT).await?.len(),
        30
    );
    wait_ready(&stack, "orders").await?;

    proxy.cut();
    let outage = std::time::Instant::now();
    insert_orders(&pg, 31, 60).await?;
    let ready = stack
        .eventually("Ready=False with the outage's reason", WAIT, async || {
            let c = stack.condition("orders", "Ready")?;
            Ok((c["status"] == "False" && c["reason"] == "SourceUnreachable").then_some(c))
        })
        .await?;
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("127.0.0.1:{}", proxy.port())),
        "names the endpoint: {ready}"
    );
    // A 30 s outage, then the source is back on the same address.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    proxy.restore().await?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 60, WAIT).await?,
        (1..=60).collect(),
        "rows written during the outage arrive, none lost"
    );
    wait_ready(&stack, "orders").await?;
    assert_eq!(stack.condition("orders", "Stalled")?["status"], "False");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_connector_loses_nothing() -> Result<()> {
    const ROWS: i64 = 20_000;
    let (pg, stack) = start_with_orders(ROWS as u32).await?;
    stack.apply(&pg_manifest(
        "orders",
        pg.host(),
        pg.port(),
        &pg,
        json!({"source": {"postgres": {"batchSize": 1}}}),
    ))?;
    // Kill it mid-load: as soon as the first record is in (a read of everything so far would
    // wait for the topic to go quiet, and the load may be over by then).
    stack.broker.consume_all(INGEST_TOPIC, 1, WAIT).await?;
    let pod = stack.pods("orders")?.into_iter().next().context("a pod")?;
    stack.kill_pod(&pod)?;
    let before = ingested_ids(&stack.broker, "orders", ROWS as usize, Duration::ZERO).await?;
    if before.len() as i64 >= ROWS {
        bail!("the load finished before the kill; make it larger");
    }
    let ids = ingested_ids(
        &stack.broker,
        "orders",
        ROWS as usize,
        Duration::from_secs(300),
    )
    .await?;
    assert_eq!(
        ids,
        (1..=ROWS).collect(),
        "every row arrives after kill -9 and restart"
    );
    wait_ready(&stack, "orders").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_creates_no_duplicates_and_status_converges() -> Result<()> {
    let (pg, mut stack) = start_with_orders(200).await?;
    stack.apply(&pg_manifest("orders", pg.host(), pg.port(), &pg, json!({})))?;
    stack
        .eventually("a Deployment", WAIT, async || {
            Ok(stack.get_json(&["deployment", "orders"]).ok())
        })
        .await?;
    stack.kill_operator()?;
    insert_orders(&pg, 201, 250).await?;
    stack.start_operator()?;
    wait_ready(&stack, "orders").await?;
    stack
        .eventually("totals 250", WAIT, async || {
            Ok((status(&stack, "orders")?["totals"]["recordsIngested"] == 250).then_some(()))
        })
        .await?;
    for kind in ["deployments", "configmaps", "services"] {
        let items = stack.get_json(&[kind, "-l", "obsrv.io/connector=orders"])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            items.len(),
            1,
            "exactly one {kind} for the connector after the restart"
        );
    }
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 250, WAIT)
            .await?
            .len(),
        250
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_reconcile_leaves_no_duplicates() -> Result<()> {
    let (pg, mut stack) = start_with_orders(100).await?;
    // Two replicas with leader election, as the chart runs them (not the stack's single one).
    stack.kill_operator()?;
    let mut replicas = vec![
        ("operator-a", stack.start_operator_replica("operator-a")?),
        ("operator-b", stack.start_operator_replica("operator-b")?),
    ];
    let leader = stack
        .eventually("a leader", WAIT, async || {
            let lease = stack.get_json(&["lease", "obsrv-operator"])?;
            Ok(lease["spec"]["holderIdentity"].as_str().map(String::from))
        })
        .await?;
    stack.apply(&pg_manifest("orders", pg.host(), pg.port(), &pg, json!({})))?;
    // Mid-reconcile: the leader has started applying (the ConfigMap is there) when it dies.
    stack
        .eventually("the first object applied", WAIT, async || {
            Ok(stack.get_json(&["configmap", "orders"]).ok())
        })
        .await?;
    let i = replicas
        .iter()
        .position(|(name, _)| *name == leader)
        .context("the leader is one of ours")?;
    replicas.remove(i).1.kill9();
    insert_orders(&pg, 101, 150).await?;

    // The other replica takes the Lease over and finishes the job.
    stack
        .eventually("the other replica leads", WAIT, async || {
            let lease = stack.get_json(&["lease", "obsrv-operator"])?;
            Ok((lease["spec"]["holderIdentity"] != leader.as_str()).then_some(()))
        })
        .await?;
    wait_ready(&stack, "orders").await?;
    assert_eq!(
        ingested_ids(&stack.broker, "orders", 150, WAIT).await?,
        (1..=150).collect()
    );
    for kind in ["deployments", "configmaps", "services", "pods"] {
        let items = stack.get_json(&[kind, "-l", "app.kubernetes.io/instance=orders"])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(items.len(), 1, "exactly one of {kind} after the takeover");
    }
    stack
        .eventually("totals 150 in status", WAIT, async || {
            Ok((status(&stack, "orders")?["totals"]["recordsIngested"] == 150).then_some(()))
        })
        .await?;
    Ok(())
}

/// Deletion with `deletionPolicy: Delete`: owned objects and processes go, and so does the
/// connector's position (a cleanup Job tombstones it), so the same Connector applied again reads
/// every row again from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cleans_up_objects_and_processes() -> Result<()> {
    let (pg, stack) = start_with_orders(10).await?;
    let manifest = pg_manifest(
        "orders",
        pg.host(),
        pg.port(),
        &pg,
        json!({"deletionPolicy": "Delete"}),
    );
    stack.apply(&manifest)?;
    wait_ready(&stack, "orders").await?;
    stack
        .eventually("10 ingested and caught up", WAIT, async || {
            let s = status(&stack, "orders")?;
            Ok((s["totals"]["recordsIngested"] == 10 && s["lag"]["records"] == 0).then_some(()))
        })
        .await?;
    let c = stack.get_json(&["connector", "orders"])?;
    assert!(
        c["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "the operator adds its finalizer"
    );
    let ip = stack.pods("orders")?[0]["status"]["podIP"]
        .as_str()
        .context("podIP")?
        .to_string();
    assert!(!stack.processes_gone(&ip), "a process serves the pod");

    stack.kubectl_ok(&["delete", "connector", "orders", "--wait=false"])?;
    stack
        .eventually(
            "the Connector and everything it owned gone",
            WAIT,
            async || {
                let gone = |what: &[&str]| -> Result<bool> {
                    let out = stack.kubectl_with(&[&["get"], what].concat(), None)?;
                    Ok(!out.success && out.stderr.contains("NotFound"))
                };
                let all = gone(&["connector", "orders"])?
                    && gone(&["deployment", "orders"])?
                    && gone(&["configmap", "orders"])?
                    && gone(&["service", "orders"])?
                    && stack.pods("orders")?.is_empty()
                    && stack.processes_gone(&ip);
                Ok(all.then_some(()))
            },
        )
        .await?;

    // The position went with it: applied again, the Connector starts over.
    stack.apply(&manifest)?;
    let again = stack.broker.consume_all(INGEST_TOPIC, 20, WAIT).await?;
    assert_eq!(
        again.len(),
        20,
        "every row read again after deletionPolicy Delete"
    );
    Ok(())
}

/// A Secret and a Connector manifest for a file source `source` (its `spec.source`).
fn file_manifest(name: &str, secret: Value, source: Value, scaling: Value) -> Result<String> {
    let connector = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector", "metadata": {"name": name},
        "spec": {"dataset": name, "source": source, "scaling": scaling},
    });
    Ok(format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret)?,
        serde_yaml::to_string(&connector)?
    ))
}

/// `n` objects of `lines` JSON lines each, ids from `first`, as (key, body).
fn id_objects(prefix: &str, first: i64, n: i64, lines: i64) -> Vec<(String, String)> {
    (0..n)
        .map(|o| {
            let body: String = (0..lines)
                .map(|l| format!("{{\"id\":{}}}\n", first + o * lines + l))
                .collect();
            (format!("{prefix}{:04}.jsonl", first + o * lines), body)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_connector_delivers_and_scales_out_through_scale() -> Result<()> {
    use obsrv_e2e::services::azurite::Azurite;
    let (az, stack) = tokio::try_join!(Azurite::start(), Stack::start(None))?;
    az.create_container("landing").await?;
    for (key, body) in id_objects("logs/", 0, 10, 20) {
        az.put_blob("landing", &key, body).await?;
    }
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "weblogs-azure"},
        "stringData": {"connectionString": az.connection_string()},
    });
    let source = json!({"azureBlob": {
        "container": "landing", "prefix": "logs/", "glob": "*.jsonl", "format": "jsonLines",
        "credentials": {"secretName": "weblogs-azure", "auth": "connectionString"},
        "pollInterval": "1s",
    }});
    stack.apply(&file_manifest(
        "weblogs",
        secret,
        source,
        json!({"replicas": 1}),
    )?)?;
    assert_eq!(
        ingested_ids(&stack.broker, "weblogs", 200, WAIT).await?,
        (0..200).collect(),
        "every line of every blob"
    );
    wait_ready(&stack, "weblogs").await?;
    let first = stack.ready_pods("weblogs")?;

    // A file source shares its objects between replicas: /scale is not clamped to one.
    stack.kubectl_ok(&["scale", "connector", "weblogs", "--replicas", "2"])?;
    let two = stack
        .eventually("2 ready pods", WAIT, async || {
            let pods = stack.ready_pods("weblogs")?;
            Ok((pods.len() == 2).then_some(pods))
        })
        .await?;
    assert!(
        first.iter().all(|p| two.contains(p)),
        "{first:?} -> {two:?}"
    );
    for (key, body) in id_objects("logs/", 200, 20, 20) {
        az.put_blob("landing", &key, body).await?;
    }
    assert_eq!(
        ingested_ids(&stack.broker, "weblogs", 600, WAIT)
            .await?
            .len(),
        600,
        "two replicas share the new blobs"
    );
    stack
        .eventually(
            "status: 600 ingested, no lag, not limited",
            WAIT,
            async || {
                let s = status(&stack, "weblogs")?;
                let limited = stack.condition("weblogs", "ScalingLimited")?["status"] == "True";
                Ok(
                    (s["totals"]["recordsIngested"] == 600 && s["lag"]["records"] == 0 && !limited)
                        .then_some(()),
                )
            },
        )
        .await?;
    let records = stack
        .broker
        .consume_all(INGEST_TOPIC, 1000, Duration::from_secs(5))
        .await?;
    let mine = records
        .iter()
        .filter_map(|r| r.json().ok())
        .filter(|v| v["dataset"] == "weblogs")
        .count();
    assert_eq!(mine, 600, "each blob read by exactly one replica");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_connector_delivers_compressed_csv_and_reports_status() -> Result<()> {
    use obsrv_e2e::services::gcs::Gcs;
    use std::io::Write as _;
    let (gcs, stack) = tokio::try_join!(Gcs::start(), Stack::start(None))?;
    gcs.create_bucket("exports").await?;
    for part in 0..4 {
        let mut csv = String::from("id;item\n");
        for i in 0..25 {
            csv.push_str(&format!("{};\"item; {i}\"\n", part * 25 + i));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(csv.as_bytes())?;
        gcs.put_object(
            "exports",
            &format!("orders/part-{part}.csv.gz"),
            gz.finish()?,
        )
        .await?;
    }
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "exports-sa"},
        "stringData": {"serviceAccount.json": gcs.service_account_json()?},
    });
    let source = json!({"gcs": {
        "bucket": "exports", "endpoint": gcs.endpoint(), "prefix": "orders/", "format": "csv",
        "csv": {"delimiter": ";"}, "credentials": {"secretName": "exports-sa"}, "pollInterval": "1s",
    }});
    stack.apply(&file_manifest(
        "exports",
        secret,
        source,
        json!({"replicas": 1}),
    )?)?;
    let records = stack
        .eventually("100 rows ingested", WAIT, async || {
            let recs = stack
                .broker
                .consume_to_end(INGEST_TOPIC, Duration::from_secs(30))
                .await?;
            let mine: Vec<Value> = recs
                .iter()
                .filter_map(|r| r.json().ok())
                .filter(|v| v["dataset"] == "exports")
                .collect();
            Ok((mine.len() >= 100).then_some(mine))
        })
        .await?;
    assert_eq!(records.len(), 100);
    assert!(
        records
            .iter()
            .any(|r| r["event"] == json!({"id": "7", "item": "item; 7"}))
    );
    assert_eq!(records[0]["obsrv_meta"]["source"]["connector"], "gcs");
    wait_ready(&stack, "exports").await?;
    stack
        .eventually("totals 100 and lag 0", WAIT, async || {
            let s = status(&stack, "exports")?;
            Ok((s["totals"]["recordsIngested"] == 100 && s["lag"]["records"] == 0).then_some(()))
        })
        .await?;
    Ok(())
}
