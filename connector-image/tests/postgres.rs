//! The Postgres source end to end: real Postgres, real broker, the real binary.

mod common;

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use common::{
    Harness, check_fails, check_passes_and_loads, consume_exactly, ids,
    kill_9_mid_load_then_restart, pg_manifest as manifest, total,
};
use obsrv_e2e::services::{Broker, Postgres};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn creds(pg: &Postgres) -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("pg-creds", "username", pg.user().to_string()),
        ("pg-creds", "password", pg.password().to_string()),
    ]
}

async fn harness(
    broker: &Broker,
    manifest: &str,
    creds: &[(&'static str, &'static str, String)],
) -> Result<Harness> {
    let c: Vec<(&str, &str, &str)> = creds.iter().map(|(a, b, c)| (*a, *b, c.as_str())).collect();
    Harness::new(broker, manifest, &c).await
}

/// Full load of typed rows tied on the cursor (batch boundaries fall inside tie groups), the
/// envelope field by field, new rows picked up, then a graceful restart resuming from state with
/// neither loss nor duplicates.
#[tokio::test]
async fn full_load_ties_types_new_rows_and_restart() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, amount numeric(30,10), doc jsonb, \
         raw bytea, local_ts timestamp, uid uuid, tags int[], note text); \
         INSERT INTO orders SELECT g, timestamptz '2024-01-01 00:00:00+00' + (g / 25) * interval '1 minute', \
         12345678901234567890.0123456789 + g, jsonb_build_object('n', g, 'nested', jsonb_build_array(1, 2)), \
         decode('00ff10', 'hex'), timestamp '2024-05-06 07:08:09.123456', '6f1c1e5e-0000-4000-8000-000000000000', \
         ARRAY[g, g + 1], CASE WHEN g % 2 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 250) g;",
    )
    .await?;
    let h = harness(
        &broker,
        &manifest(&pg, "public.orders", "updated_at", Some("id"), 7, ""),
        &creds(&pg),
    )
    .await?;
    let conn = h.start()?;

    let recs = consume_exactly(&broker, &h.ingest, 250, T).await?;
    assert_eq!(recs.len(), 250, "{}", conn.log_tail());
    assert_eq!(
        ids(&recs)?.len(),
        250,
        "every row once, each with its own id"
    );
    let events: Vec<Value> = recs.iter().map(|r| r.json()).collect::<Result<_>>()?;
    let mut seen: BTreeSet<i64> = events
        .iter()
        .map(|e| e["event"]["id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(seen.len(), 250);
    assert_eq!((seen.pop_first(), seen.pop_last()), (Some(1), Some(250)));

    // The envelope, exactly per contract.
    let first = recs
        .iter()
        .find(|r| r.json().map(|v| v["event"]["id"] == 1).unwrap_or(false))
        .expect("row 1");
    let v = first.json()?;
    let syncts = v["obsrv_meta"]["syncts"]
        .as_i64()
        .expect("syncts is epoch millis");
    assert!(syncts > 1_700_000_000_000);
    assert_eq!(
        v,
        json!({
            "dataset": "orders",
            "event": {"id": 1, "updated_at": "2024-01-01T00:00:00+00:00", "amount": 12345678901234567891.0123456789_f64,
                      "doc": {"n": 1, "nested": [1, 2]}, "raw": "AP8Q", "local_ts": "2024-05-06T07:08:09.123456+00:00",
                      "uid": "6f1c1e5e-0000-4000-8000-000000000000", "tags": [1, 2], "note": "n1"},
            "obsrv_meta": {"syncts": syncts, "flags": {}, "timespans": {}, "error": {},
                           "source": {"connector": "postgres", "connectorInstance": format!("tests/{}", h.name)}}
        })
    );
    // Numerics keep every digit (the JSON text itself, not a float).
    let text = String::from_utf8(first.value.clone().unwrap_or_default())?;
    assert!(
        text.contains("\"amount\":12345678901234567891.0123456789"),
        "{text}"
    );
    let even = events
        .iter()
        .find(|e| e["event"]["id"] == 2)
        .expect("row 2");
    assert_eq!(even["event"]["note"], Value::Null);

    let status = conn
        .wait_status("250 ingested and caught up", T, |s| {
            total(s, "recordsIngested") == 250 && s["lagRecords"] == 0
        })
        .await?;
    assert_eq!(status["state"], "Running");
    assert_eq!(status["ready"], true);
    assert_eq!(status["maxParallelism"], 1);
    assert!(
        status["watermark"]
            .as_str()
            .unwrap_or_default()
            .contains("public.orders"),
        "{status}"
    );
    assert_eq!(conn.get("/readyz").await?.0, 200);
    let (_, metrics) = conn.get("/metrics").await?;
    assert!(
        metrics.contains("obsrv_connector_records_total{outcome=\"ingested\"} 250"),
        "{metrics}"
    );

    // New rows, including one tied with the last delivered cursor value, are picked up.
    pg.psql(
        "INSERT INTO orders (id, updated_at) SELECT g, timestamptz '2024-01-01 00:10:00+00' + (g - 250) * interval '1 second' \
         FROM generate_series(251, 270) g; INSERT INTO orders (id, updated_at) VALUES (271, timestamptz '2024-01-01 00:10:00+00')",
    )
    .await?;
    let recs = consume_exactly(&broker, &h.ingest, 271, T).await?;
    assert_eq!(recs.len(), 271, "{}", conn.log_tail());
    conn.wait_status("271 ingested", T, |s| total(s, "recordsIngested") == 271)
        .await?;

    // SIGTERM: drains, commits, exits 0. A restart resumes after the committed position.
    let exit = conn.terminate().await?;
    assert!(exit.success(), "{exit:?}");
    pg.psql("INSERT INTO orders (id, updated_at) SELECT g, timestamptz '2024-01-02 00:00:00+00' FROM generate_series(272, 300) g").await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 300, T).await?;
    assert_eq!(
        recs.len(),
        300,
        "no row lost and none re-sent after a graceful restart\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), 300);
    let status = conn
        .wait_status("resumed run delivered 29", T, |s| {
            total(s, "recordsIngested") == 29
        })
        .await?;
    assert_eq!(status["lastError"], Value::Null);
    Ok(())
}

/// Without a tie-breaker, a page ending inside a group of equal cursor values never skips the rest
/// of the group.
#[tokio::test]
async fn rows_tied_on_the_cursor_are_all_delivered_without_tie_breaker() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE events (ts int NOT NULL, v text); INSERT INTO events SELECT g / 10, 'v' || g FROM generate_series(0, 30) g").await?;
    let h = harness(
        &broker,
        &manifest(&pg, "events", "ts", None, 4, ""),
        &creds(&pg),
    )
    .await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 31, T).await?;
    assert_eq!(recs.len(), 31, "{}", conn.log_tail());
    let vs: BTreeSet<String> = recs
        .iter()
        .map(|r| {
            r.json()
                .map(|v| v["event"]["v"].as_str().unwrap_or_default().to_string())
        })
        .collect::<Result<_>>()?;
    assert_eq!(vs.len(), 31);
    assert_eq!(ids(&recs)?.len(), 31);
    Ok(())
}

/// A record whose envelope exceeds maxMessageBytes goes to the failed topic (CE_1001) and the
/// stream goes on.
#[tokio::test]
async fn oversize_rows_go_to_the_failed_topic() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE docs (id int PRIMARY KEY, body text); INSERT INTO docs VALUES (1, 'a'), (2, repeat('x', 5000)), (3, 'c')").await?;
    let extra = "  sink:\n    kafka: {maxMessageBytes: 2048}\n";
    let h = harness(
        &broker,
        &manifest(&pg, "docs", "id", None, 100, extra),
        &creds(&pg),
    )
    .await?;
    let conn = h.start()?;
    let ok = consume_exactly(&broker, &h.ingest, 2, T).await?;
    assert_eq!(ok.len(), 2, "{}", conn.log_tail());
    let failed = consume_exactly(&broker, &h.failed, 1, T).await?;
    assert_eq!(failed.len(), 1);
    let f = failed[0].json()?;
    assert_eq!(f["error"]["error_code"], "CE_1001");
    assert_eq!(
        f["connector_ctx"],
        json!({"connector_id": "postgres", "dataset_id": "orders", "connector_instance_id": format!("tests/{}", h.name), "connector_type": "source"})
    );
    assert!(
        f["event"]
            .as_str()
            .unwrap_or_default()
            .starts_with("{\"id\":2"),
        "{f}"
    );
    assert!(failed[0].value.as_ref().map(Vec::len).unwrap_or(0) < 2048 * 4);
    let s = conn
        .wait_status("totals", T, |s| {
            total(s, "recordsIngested") == 2 && total(s, "recordsFailed") == 1
        })
        .await?;
    assert_eq!(s["state"], "Running");
    Ok(())
}

/// kill -9 in the middle of a load, then a restart: every row arrives (duplicates allowed, losses
/// not), counted by distinct event id.
#[tokio::test]
async fn kill_9_mid_load_then_restart_loses_nothing() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    let n = 30_000;
    pg.psql(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, at timestamptz NOT NULL, payload text); \
         INSERT INTO big SELECT g, timestamptz '2024-01-01' + (g / 7) * interval '1 ms', md5(g::text) FROM generate_series(1, {n}) g; \
         CREATE INDEX ON big (at, id)"
    ))
    .await?;
    let h = harness(
        &broker,
        &manifest(&pg, "big", "at", Some("id"), 500, ""),
        &creds(&pg),
    )
    .await?;
    kill_9_mid_load_then_restart(&broker, &h, n, 3_000).await?;
    Ok(())
}

/// Wrong credentials: `lastError` AuthFailed, not ready, no crash. `check` says what is wrong.
#[tokio::test]
async fn auth_failure_is_reported_and_check_explains() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY)").await?;
    let bad = vec![
        ("pg-creds", "username", pg.user().to_string()),
        ("pg-creds", "password", "wrong".to_string()),
    ];
    let h = harness(&broker, &manifest(&pg, "t", "id", None, 10, ""), &bad).await?;
    let mut conn = h.start()?;
    let s = conn
        .wait_status("AuthFailed", T, |s| {
            s["lastError"]["reason"] == "AuthFailed"
        })
        .await?;
    assert_eq!(s["state"], "Degraded");
    assert!(
        !s.to_string().contains("wrong"),
        "no secret value in status: {s}"
    );
    assert_eq!(conn.get("/readyz").await?.0, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(conn.is_running(), "retries instead of crashing");
    let (code, out) = h.command("check")?;
    assert!(!code.success());
    assert!(out.contains("source: AuthFailed"), "{out}");
    assert!(out.contains("sink: ok"), "{out}");

    let good = harness(
        &broker,
        &manifest(&pg, "t", "id", None, 10, ""),
        &creds(&pg),
    )
    .await?;
    let (code, out) = good.command("check")?;
    assert!(code.success(), "{out}");
    let missing = harness(
        &broker,
        &manifest(&pg, "nope", "id", None, 10, ""),
        &creds(&pg),
    )
    .await?;
    let (code, out) = missing.command("check")?;
    assert!(
        !code.success() && out.contains("source: SchemaError"),
        "{out}"
    );
    let (code, out) = good.command("cleanup")?;
    assert!(code.success() && out.contains("nothing held"), "{out}");
    Ok(())
}

/// `deletionPolicy`: `cleanup` alone (Retain) keeps the position, so a restart resumes and reads
/// nothing again; `cleanup --delete-state` (Delete) tombstones it, so a restart reads every row
/// again from the start.
#[tokio::test]
async fn cleanup_delete_state_starts_over_and_retain_resumes() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 30)")
        .await?;
    let h = harness(
        &broker,
        &manifest(&pg, "t", "id", None, 10, ""),
        &creds(&pg),
    )
    .await?;
    let caught_up =
        |n: u64| move |s: &Value| total(s, "recordsIngested") == n && s["lagRecords"] == 0;
    let conn = h.start()?;
    conn.wait_status("30 ingested and caught up", T, caught_up(30))
        .await?;
    assert!(conn.terminate().await?.success());

    // Retain: the kind's hook only; the position stays.
    let (code, out) = h.command("cleanup")?;
    assert!(code.success(), "{out}");
    assert!(out.contains("cleanup: nothing held"), "{out}");
    assert!(!out.contains("state:"), "Retain touches no state: {out}");
    let conn = h.start()?;
    conn.wait_status("resumed and caught up", T, caught_up(0))
        .await?;
    assert_eq!(
        consume_exactly(&broker, &h.ingest, 30, T).await?.len(),
        30,
        "nothing read again: {}",
        conn.log_tail()
    );
    assert!(conn.terminate().await?.success());

    // Delete: the connector's state record is tombstoned (and says so, by key and topic).
    let (code, out) = h.command_with("cleanup", &["--delete-state"])?;
    assert!(code.success(), "{out}");
    let instance = format!("tests/{}", h.name);
    assert!(
        out.contains(&format!(
            "state: deleted 1 record(s) of {instance} from topic {}",
            h.state
        )),
        "{out}"
    );
    assert!(
        !out.contains("group:"),
        "a table source has no group: {out}"
    );
    assert!(!out.contains(pg.password()), "no secret in the output");
    let (code, again) = h.command_with("cleanup", &["--delete-state"])?;
    assert!(
        code.success() && again.contains("nothing to delete"),
        "{again}"
    );

    let conn = h.start()?;
    conn.wait_status("read again from the start", T, caught_up(30))
        .await?;
    let recs = consume_exactly(&broker, &h.ingest, 60, T).await?;
    assert_eq!(recs.len(), 60, "every row once more: {}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 30, "the same rows, the same event ids");
    Ok(())
}

/// `state: Paused` connects but reads nothing; `schedule: {once: true}` loads everything then idles.
#[tokio::test]
async fn paused_reads_nothing_and_once_idles_after_the_load() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 40)")
        .await?;
    let paused = manifest(&pg, "t", "id", None, 10, "").replace(
        "  dataset: orders\n",
        "  dataset: orders\n  state: Paused\n",
    );
    let h = harness(&broker, &paused, &creds(&pg)).await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("Paused and ready", T, |s| s["state"] == "Paused")
        .await?;
    assert_eq!(s["ready"], true);
    assert!(
        broker
            .consume_all(&h.ingest, 1, Duration::from_secs(2))
            .await?
            .is_empty(),
        "a paused connector reads nothing"
    );
    drop(conn);

    let once = manifest(&pg, "t", "id", None, 10, "").replace(
        "  dataset: orders\n",
        "  dataset: orders\n  schedule: {once: true}\n",
    );
    let h = harness(&broker, &once, &creds(&pg)).await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("Idle after the load", T, |s| s["state"] == "Idle")
        .await?;
    assert_eq!(total(&s, "recordsIngested"), 40);
    assert_eq!(consume_exactly(&broker, &h.ingest, 40, T).await?.len(), 40);
    Ok(())
}

/// SIGTERM in the middle of a load: the connector drains, commits and exits 0; the restart
/// delivers the rest with neither loss nor duplicate.
#[tokio::test]
async fn sigterm_mid_load_drains_commits_and_resumes_exactly() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    let n = 30_000;
    pg.psql(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, at timestamptz NOT NULL, payload text); \
         INSERT INTO big SELECT g, timestamptz '2024-01-01' + (g / 3) * interval '1 ms', md5(g::text) FROM generate_series(1, {n}) g"
    ))
    .await?;
    let h = harness(
        &broker,
        &manifest(&pg, "big", "at", Some("id"), 500, ""),
        &creds(&pg),
    )
    .await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("part of the load", T, |s| {
            total(s, "recordsIngested") >= 3000
        })
        .await?;
    let exit = conn.terminate().await?;
    assert!(exit.success(), "{exit:?}");
    assert!(
        total(&s, "recordsIngested") < n as u64,
        "stopped in the middle: {s}"
    );
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, n, Duration::from_secs(120)).await?;
    assert_eq!(
        recs.len(),
        n,
        "no loss and no duplicate across a graceful stop\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), n);
    Ok(())
}

/// The source going away is a reason on /status (SourceUnreachable), retried, never a crash.
#[tokio::test]
async fn source_outage_is_reported_and_retried() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .await?;
    let h = harness(
        &broker,
        &manifest(&pg, "t", "id", None, 10, ""),
        &creds(&pg),
    )
    .await?;
    let mut conn = h.start()?;
    conn.wait_status("loaded", T, |s| total(s, "recordsIngested") == 2)
        .await?;
    let pid = pg.pid().expect("a local Postgres");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    let s = conn
        .wait_status("SourceUnreachable", T, |s| {
            s["lastError"]["reason"] == "SourceUnreachable"
        })
        .await?;
    assert_eq!(s["state"], "Degraded");
    assert_eq!(s["ready"], false);
    assert_eq!(total(&s, "recordsIngested"), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        conn.is_running(),
        "retries with backoff instead of exiting\n{}",
        conn.log_tail()
    );
    Ok(())
}

/// `delivery: exactlyOnce`: batches and their position in one transaction. A graceful stop and
/// restart gives exactly the table; a kill -9 loses nothing (the local broker does not hide aborted
/// records from readers, so only distinct ids are counted there).
#[tokio::test]
async fn exactly_once_transactions_resume_without_loss() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    let n = 20_000;
    pg.psql(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, at timestamptz NOT NULL); \
         INSERT INTO big SELECT g, timestamptz '2024-01-01' + g * interval '1 ms' FROM generate_series(1, {n}) g"
    ))
    .await?;
    let m = manifest(&pg, "big", "at", Some("id"), 500, "").replace(
        "  dataset: orders\n",
        "  dataset: orders\n  delivery: exactlyOnce\n",
    );
    let h = harness(&broker, &m, &creds(&pg)).await?;
    let conn = h.start()?;
    conn.wait_status("part of the load", T, |s| {
        total(s, "recordsIngested") >= 2000
    })
    .await?;
    assert!(conn.terminate().await?.success());
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, n, Duration::from_secs(120)).await?;
    assert_eq!(recs.len(), n, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), n);
    let before = total(
        &conn
            .wait_status("caught up", T, |s| s["lagRecords"] == 0)
            .await?,
        "recordsIngested",
    );

    pg.psql(&format!("INSERT INTO big SELECT g, timestamptz '2024-02-01' + g * interval '1 ms' FROM generate_series({}, {}) g", n + 1, 2 * n)).await?;
    conn.wait_status("part of the new rows", T, |s| {
        total(s, "recordsIngested") >= before + 2000
    })
    .await?;
    conn.kill9()?;
    let conn = h.start()?;
    // Lag is unknown until the restarted process measures it from its resumed position, so 0
    // means caught up, even when the kill came after the last commit and nothing is left to read.
    conn.wait_status("caught up after kill -9", Duration::from_secs(120), |s| {
        s["lagRecords"] == 0
    })
    .await?;
    let recs = broker
        .consume_all(&h.ingest, 4 * n, Duration::from_secs(10))
        .await?;
    assert_eq!(ids(&recs)?.len(), 2 * n, "{}", conn.log_tail());
    Ok(())
}

/// Lag of a large table is the planner's estimate (nothing counted), close to the truth; once few
/// rows remain it is exact.
#[tokio::test]
async fn lag_is_estimated_for_large_tables_and_exact_near_the_end() -> Result<()> {
    use obsrv_connector::{
        config::Secrets,
        source::{
            Source,
            sql::{Dialect, SqlSource},
        },
    };
    let pg = Postgres::start().await?;
    pg.psql(
        "CREATE TABLE big (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL); \
         INSERT INTO big SELECT g, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second' \
         FROM generate_series(1, 300000) g; \
         CREATE INDEX ON big (updated_at, id); ANALYZE big;",
    )
    .await?;
    let rc = obsrv_connector::config::parse_config(
        &manifest(&pg, "public.big", "updated_at", Some("id"), 1000, "").replace("NAME", "lag"),
    )?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("pg-creds"))?;
    std::fs::write(dir.path().join("pg-creds/username"), pg.user())?;
    std::fs::write(dir.path().join("pg-creds/password"), pg.password())?;
    let secrets = Secrets::load(
        &rc.spec,
        Some(&dir.path().to_path_buf()),
        Default::default(),
    )?;
    let spec = rc.spec.source.postgres.as_ref().expect("a postgres source");
    let open = |pos: Option<serde_json::Value>| {
        let (secrets, instance) = (secrets.clone(), rc.instance_id());
        async move {
            SqlSource::connect(Dialect::Postgres, spec, &secrets, &instance, pos.as_ref()).await
        }
    };

    // From the start: 300,000 rows, far above the exact-count limit.
    let mut src = open(None).await?;
    let lag = src.lag().await?.expect("SQL sources measure lag");
    assert!(
        (270_000..=330_000).contains(&lag.records),
        "estimate within 10% of 300000, got {}",
        lag.records
    );
    assert!(lag.seconds.is_some_and(|s| s > 0.0), "{lag:?}");

    // 123 rows after the position: counted exactly.
    let pos = json!({"tables": {"public.big": {"cursor": "2024-01-04 11:17:57+00", "tieBreaker": "299877"}}});
    let mut src = open(Some(pos)).await?;
    let lag = src.lag().await?.expect("SQL sources measure lag");
    assert_eq!(lag.records, 123);
    Ok(())
}

/// Cursor and tie-breaker types that travel binary in the COPY stream are rendered exactly as
/// Postgres prints them (positions and event ids are made of that text), edge values included.
#[tokio::test]
async fn binary_keys_render_exactly_as_postgres_prints_them() -> Result<()> {
    use futures::StreamExt;
    use obsrv_connector::source::sql::{CopyRows, KeyFormat};
    use sqlx::postgres::{PgConnectOptions, PgPoolCopyExt};
    let pg = Postgres::start().await?;
    let cases: [(KeyFormat, &str, &str); 7] = [
        (KeyFormat::Int2, "int2", "'-32768', '0', '7', '32767'"),
        (KeyFormat::Int4, "int4", "'-2147483648', '42', '2147483647'"),
        (
            KeyFormat::Int8,
            "int8",
            "'-9223372036854775808', '1', '9223372036854775807'",
        ),
        (
            KeyFormat::Uuid,
            "uuid",
            "'6F1C1E5E-0000-4000-8000-00000000000A', '00000000-0000-0000-0000-000000000000'",
        ),
        (
            KeyFormat::Date,
            "date",
            "'2024-02-29', '2000-01-01', '1999-12-31', '0001-01-01', '0044-03-15 BC', '12345-06-07', 'infinity', '-infinity'",
        ),
        (
            KeyFormat::Timestamp,
            "timestamp",
            "'2024-05-06 07:08:09.123456', '2000-01-01', '1969-12-31 23:59:59.5', '0001-01-01 00:00:00.000001 BC', 'infinity'",
        ),
        (
            KeyFormat::Timestamptz,
            "timestamptz",
            "'2024-01-01 00:00:00.001+00', '2024-06-30 23:59:59.99+05:30', '1900-01-01 00:00:00+00', '4713-01-01 00:00:00+00 BC', '-infinity'",
        ),
    ];
    // In UTC, as the connector's sessions run.
    let opts: PgConnectOptions = pg.url().parse()?;
    let pool = sqlx::PgPool::connect_with(opts.options([("TimeZone", "UTC")])).await?;
    for (format, ty, values) in cases {
        // The cursor is the binary value the parser renders; the tie-breaker Postgres's own text.
        let sql = format!(
            "COPY (SELECT v, v::text FROM unnest(ARRAY[{values}]::{ty}[]) v) TO STDOUT (FORMAT binary)"
        );
        let mut stream = pool.copy_out_raw(&sql).await?;
        let mut parser = CopyRows::new(&[], [format, KeyFormat::Text]);
        let mut pairs = Vec::new();
        while let Some(bytes) = stream.next().await {
            parser.push_with(&bytes?, |(_, rendered, text)| {
                pairs.push((
                    text.unwrap_or_default().to_string(),
                    rendered.map(str::to_string),
                ));
                Ok(())
            })?;
        }
        assert!(parser.finished());
        assert_eq!(pairs.len(), values.split("', '").count(), "{ty}");
        for (text, rendered) in pairs {
            assert_eq!(rendered.as_deref(), Some(text.as_str()), "{ty}");
        }
    }
    Ok(())
}

/// Reads render each row's JSON themselves from the binary COPY stream: for every type, edge
/// values and NULLs included, it is byte for byte the JSON the database renders (`row_to_json`),
/// so events are what they were when the database rendered them.
#[tokio::test]
async fn rows_render_as_row_to_json_renders_them() -> Result<()> {
    use futures::StreamExt;
    use obsrv_connector::source::sql::{CopyRows, Dialect, Page, TablePlan, postgres::columns};
    use sqlx::postgres::{PgConnectOptions, PgPoolCopyExt};
    let pg = Postgres::start().await?;
    pg.psql(
        r#"CREATE TYPE mood AS ENUM ('ok', 'sad'); CREATE DOMAIN short AS text CHECK (length(VALUE) < 20);
        CREATE TABLE typed (id int8 PRIMARY KEY, i2 int2, i4 int4, yes bool, t text, vc varchar(12), ch char(4),
          j json, jb jsonb, n numeric, money numeric(12,2), tz timestamptz, ts timestamp, d date, u uuid,
          f8 float8, f4 real, b bytea, arr int[], iv interval, m mood, s short, "we""ird ñame" text);
        INSERT INTO typed VALUES
          (1, -32768, 2147483647, true, E'tab\t"q" \\ nl\n cr\r ff\f bs\b ctl\u0001 del\u007f é 😀', 'short', 'ab',
           '{"a" : [1, 2.50, "x"]}', '{"b": {"c": [1, 2.50, null]}, "a": "é\n"}', 'NaN', 12345.60,
           '2024-01-01 00:00:00.001+00', '2024-05-06 07:08:09.123456', '2024-02-29', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           'NaN', 3.4e38, '\x00ff10', ARRAY[1, NULL, 3], '1 day 02:03:04.5', 'sad', 'dom', 'w'),
          (2, 0, 0, false, '', '', '', 'null', '[]', 'Infinity', -0.01,
           '0044-03-15 12:00:00+00 BC', '4713-01-01 00:00:00 BC', '0001-01-01 BC', '00000000-0000-0000-0000-000000000000',
           '-Infinity', -1.5e-7, '\x', '{}', '-3 months', 'ok', '', ''),
          (3, 7, -7, NULL, NULL, NULL, NULL, NULL, NULL, '-Infinity', 0,
           'infinity', '-infinity', 'infinity', NULL, 1e300, 0.1, NULL, NULL, NULL, NULL, NULL, NULL),
          (4, NULL, NULL, NULL, 'x', NULL, NULL, '  {"ws" :1 }  ', '"s"', 0.000, 9999999999.99,
           '12345-06-07 08:09:10.5+00', '1999-12-31 23:59:59.999999', '-infinity', NULL, 0, -0, NULL, NULL, NULL, NULL, NULL, NULL),
          (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 123456789012345678901234567890.000000000000000000001, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (6, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0.0000000100, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL),
          (7, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 10000000000000000, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL);"#,
    )
    .await?;
    let opts: PgConnectOptions = pg.url().parse()?;
    let pool = sqlx::PgPool::connect_with(opts.options([("TimeZone", "UTC")])).await?;
    let spec: obsrv_crds::TableSpec =
        serde_json::from_value(json!({"name": "typed", "cursor": {"column": "id"}}))?;
    let plan = TablePlan::new(
        Dialect::Postgres,
        &spec,
        "typed".into(),
        &columns(&pool, "typed").await?,
    )?;

    // What the page reads deliver: the database's row_to_json.
    let paged: Vec<String> =
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(plan.query(Page::First, 100)))
            .fetch_all(&pool)
            .await?;
    // What the streaming read renders.
    let mut stream = pool
        .copy_out_raw(&plan.copy_query(Page::First, 100, None))
        .await?;
    let mut parser = CopyRows::new(&plan.json_columns(), plan.key_formats());
    let mut streamed = Vec::new();
    while let Some(bytes) = stream.next().await {
        parser.push_with(&bytes?, |(json, _, _)| {
            streamed.push(json.to_string());
            Ok(())
        })?;
    }
    assert!(parser.finished());
    assert_eq!(streamed.len(), 7);
    assert_eq!(streamed, paged);
    for s in &streamed {
        serde_json::from_str::<Value>(s)?;
    }
    Ok(())
}

/// TLS modes against a server that only accepts TLS: verify-full with the CA from the Secret
/// loads the table; plaintext (`disable`) and an unverifiable server (`verify-full` without the
/// CA) are refused, and `check` says why.
#[tokio::test]
async fn tls_modes_verify_the_server_and_refuse_plaintext() -> Result<()> {
    let ((pg, ca), broker) = tokio::try_join!(Postgres::start_tls(), Broker::start())?;
    pg.psql(
        "CREATE TABLE t (id bigint PRIMARY KEY, at timestamptz NOT NULL); \
         INSERT INTO t SELECT g, now() FROM generate_series(1, 40) g;",
    )
    .await?;
    let with_mode =
        |mode: &str| manifest(&pg, "t", "at", Some("id"), 16, "").replace("{mode: disable}", mode);
    let mut with_ca = creds(&pg);
    with_ca.push(("pg-creds", "ca.crt", ca));

    let verified = harness(
        &broker,
        &with_mode("{mode: verify-full, ca: {secretName: pg-creds, key: ca.crt}}"),
        &with_ca,
    )
    .await?;
    check_passes_and_loads(&broker, &verified, 40).await?;

    let required = harness(&broker, &with_mode("{mode: require}"), &creds(&pg)).await?;
    let (code, out) = required.command("check")?;
    assert!(code.success(), "require encrypts without verifying: {out}");

    let plain = harness(&broker, &with_mode("{mode: disable}"), &creds(&pg)).await?;
    let out = check_fails(&plain)?;
    assert!(
        out.contains("source: AuthFailed") && out.contains("no encryption"),
        "plaintext refused by the server: {out}"
    );

    let unverified = harness(&broker, &with_mode("{mode: verify-full}"), &creds(&pg)).await?;
    let out = check_fails(&unverified)?;
    assert!(
        out.to_lowercase().contains("certificate"),
        "an unknown issuer is refused: {out}"
    );
    Ok(())
}
