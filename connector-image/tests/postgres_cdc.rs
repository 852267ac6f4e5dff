//! Postgres change data capture end to end: a real Postgres (`wal_level=logical`), a real
//! broker, the real binary.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use common::{Connector, Harness, consume_exactly};
use obsrv_e2e::services::{Broker, ConsumedRecord, Postgres};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn manifest(pg: &Postgres, tables: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: orders
  source:
    postgresCdc:
      host: {host}
      port: {port}
      database: {db}
      credentials: {{secretName: pg-creds}}
      tls: {{mode: disable}}
      tables: [{tables}]
      heartbeatInterval: 1s
{extra}"#,
        host = pg.host(),
        port = pg.port(),
        db = pg.database(),
    )
}

async fn harness(broker: &Broker, pg: &Postgres, manifest: &str) -> Result<Harness> {
    harness_as(broker, manifest, pg.user(), pg.password()).await
}

async fn harness_as(broker: &Broker, manifest: &str, user: &str, pass: &str) -> Result<Harness> {
    Harness::new(
        broker,
        manifest,
        &[
            ("pg-creds", "username", user),
            ("pg-creds", "password", pass),
        ],
    )
    .await
}

/// The events (`event` of each envelope) of `recs`, in topic order.
fn events(recs: &[ConsumedRecord]) -> Result<Vec<Value>> {
    recs.iter()
        .map(|r| Ok(r.json()?["event"].clone()))
        .collect()
}

/// Applies change events in order to a table image keyed by `id` (as Debezium consumers do):
/// reads, creates and updates set the row, deletes remove it, a truncate empties the table.
fn apply(events: &[Value], table: &str) -> BTreeMap<i64, Value> {
    let mut rows = BTreeMap::new();
    for e in events.iter().filter(|e| e["source"]["table"] == table) {
        match e["op"].as_str() {
            Some("r" | "c" | "u") => {
                if let (Some(before), Some(id)) =
                    (e["before"]["id"].as_i64(), e["after"]["id"].as_i64())
                    && before != id
                {
                    rows.remove(&before);
                }
                rows.insert(e["after"]["id"].as_i64().unwrap_or(-1), e["after"].clone());
            }
            Some("d") => {
                rows.remove(&e["before"]["id"].as_i64().unwrap_or(-1));
            }
            Some("t") => rows.clear(),
            _ => {}
        }
    }
    rows
}

/// The table as Postgres has it now, as the same image (`id` -> row JSON).
async fn table_image(pg: &Postgres, table: &str) -> Result<BTreeMap<i64, Value>> {
    let out = pg
        .psql(&format!(
            "SELECT row_to_json(t)::text FROM {table} t ORDER BY id"
        ))
        .await?;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok((v["id"].as_i64().context("id")?, v))
        })
        .collect()
}

/// Reads the ingest topic until `pred` holds for the events so far (or fails with what came).
async fn wait_events(
    broker: &Broker,
    h: &Harness,
    conn: &Connector,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + T;
    loop {
        let recs = broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?;
        let evs = events(&recs)?;
        if pred(&evs) {
            return Ok(evs);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}: {} events\nlast: {:?}\nlog:\n{}",
                evs.len(),
                evs.last(),
                conn.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ops(evs: &[Value], table: &str) -> Vec<String> {
    evs.iter()
        .filter(|e| e["source"]["table"] == table)
        .map(|e| e["op"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits until the slot exists and a session streams from it.
async fn wait_slot_active(pg: &Postgres, slot: &str) -> Result<()> {
    let deadline = Instant::now() + T;
    while pg
        .psql(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
        ))
        .await?
        != "1"
    {
        if Instant::now() > deadline {
            bail!("slot {slot} never became active");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn slot_lsn(pg: &Postgres, slot: &str) -> Result<String> {
    pg.psql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .await
}

/// Snapshot, then insert/update/delete/truncate in commit order with their before and after
/// images, the primary key as Kafka key, REPLICA IDENTITY FULL before images, the unchanged-TOAST
/// placeholder, ALTER TABLE ADD COLUMN mid-stream, typed values, a dedicated publication; then
/// `cleanup` drops the slot and the publication.
#[tokio::test]
async fn changes_in_order_with_before_after_keys_and_schema_changes() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12,2), doc jsonb, \
         raw bytea, at timestamptz, big text); \
         ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL; \
         CREATE TABLE audit (id int PRIMARY KEY, note text); ALTER TABLE audit REPLICA IDENTITY FULL; \
         INSERT INTO items (id, name) VALUES (1, 'one'), (2, 'two'); \
         INSERT INTO audit VALUES (1, 'first');",
    )
    .await?;
    let h = harness(&broker, &pg, &manifest(&pg, "public.items, audit", "")).await?;
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    assert!(out.contains("slot obsrv_tests_conn"), "{out}");
    let conn = h.start()?;
    // The snapshot: every existing row as a read.
    wait_events(&broker, &h, &conn, "the snapshot", |e| e.len() >= 3).await?;

    pg.psql(
        "INSERT INTO items VALUES (10, 'ten', 12.50, '{\"tags\": [\"a\"]}', '\\x00ff', \
         '2024-01-02 03:04:05.123456+00', repeat(md5('x'), 400)); \
         UPDATE items SET name = 'TEN' WHERE id = 10; \
         UPDATE items SET id = 11 WHERE id = 10; \
         DELETE FROM items WHERE id = 11; \
         UPDATE audit SET note = 'second' WHERE id = 1; \
         DELETE FROM audit WHERE id = 1;",
    )
    .await?;
    pg.psql("TRUNCATE items").await?;
    pg.psql(
        "ALTER TABLE items ADD COLUMN extra int DEFAULT 7; INSERT INTO items (id, name) VALUES (20, 'twenty'); \
         INSERT INTO items (id, name, big) VALUES (21, 'toast', repeat(md5('y'), 400)); \
         UPDATE items SET name = 'still toast' WHERE id = 21;",
    )
    .await?;
    let evs = wait_events(&broker, &h, &conn, "every change", |e| {
        e.iter().filter(|e| e["source"]["table"] == "items").count() >= 10
    })
    .await?;
    assert_eq!(
        ops(&evs, "items"),
        ["r", "r", "c", "u", "u", "d", "t", "c", "c", "u"],
        "items in commit order"
    );
    assert_eq!(ops(&evs, "audit"), ["r", "u", "d"]);
    let items: Vec<&Value> = evs
        .iter()
        .filter(|e| e["source"]["table"] == "items")
        .collect();

    // The insert: typed values by the documented rule, Debezium's envelope and source block.
    let c = items[2];
    assert_eq!(c["before"], Value::Null);
    assert_eq!(
        c["after"]["price"],
        json!(12.5),
        "numeric as a JSON number: {c}"
    );
    assert_eq!(c["after"]["doc"], json!({"tags": ["a"]}));
    assert_eq!(c["after"]["raw"], "AP8=");
    assert_eq!(c["after"]["at"], "2024-01-02T03:04:05.123456Z");
    assert_eq!(c["after"]["big"].as_str().map(str::len), Some(12_800));
    let src = &c["source"];
    assert_eq!(src["connector"], "postgresql");
    assert_eq!(src["db"], pg.database());
    assert_eq!(
        (src["schema"].as_str(), src["snapshot"].as_str()),
        (Some("public"), Some("false"))
    );
    assert!(
        src["lsn"].as_i64().is_some() && src["txId"].as_i64().is_some(),
        "{src}"
    );
    assert!(c["ts_ms"].as_i64().is_some_and(|t| t > 1_700_000_000_000));
    assert_eq!(items[0]["source"]["snapshot"], "true");

    // Updates: default identity has no before image; a key change updates the row under its new
    // key; the delete carries the key.
    assert_eq!(items[3]["after"]["name"], "TEN");
    assert_eq!(items[4]["after"]["id"], 11);
    assert_eq!(items[4]["before"]["id"], 10, "the old key: {}", items[4]);
    assert_eq!(items[5]["before"]["id"], 11);
    assert_eq!(items[5]["after"], Value::Null);
    // REPLICA IDENTITY FULL: the whole old row.
    let audit: Vec<&Value> = evs
        .iter()
        .filter(|e| e["source"]["table"] == "audit")
        .collect();
    assert_eq!(audit[1]["before"], json!({"id": 1, "note": "first"}));
    assert_eq!(audit[1]["after"], json!({"id": 1, "note": "second"}));
    assert_eq!(audit[2]["before"], json!({"id": 1, "note": "second"}));
    // The column added mid-stream is there from the next change on.
    assert_eq!(items[7]["after"]["extra"], 7);
    // An unchanged TOASTed value is marked, never null.
    assert_eq!(items[9]["after"]["big"], "__debezium_unavailable_value");
    assert_eq!(items[9]["after"]["name"], "still toast");

    // The Kafka key is the primary key; the event id travels in its header.
    let recs = broker
        .consume_to_end(&h.ingest, Duration::from_secs(30))
        .await?;
    let keyed: Vec<(&str, Value)> = recs
        .iter()
        .map(|r| {
            (
                r.key_str().unwrap_or(""),
                r.json().unwrap()["event"].clone(),
            )
        })
        .collect();
    let insert_key = keyed
        .iter()
        .find(|(_, e)| e["op"] == "c" && e["after"]["id"] == 10)
        .map(|(k, _)| *k);
    assert_eq!(insert_key, Some(r#"{"id":10}"#));
    assert!(
        recs.iter()
            .all(|r| r.header("obsrv-event-id").is_some_and(|h| h.len() == 32)),
        "every record carries its event id"
    );

    // Status: running, position and lag in bytes.
    let s = conn
        .wait_status("lag measured", T, |s| s["lagBytes"].is_i64())
        .await?;
    assert!(
        s["watermark"].as_str().is_some_and(|w| w.contains("lsn ")),
        "{s}"
    );

    conn.terminate().await?;
    let slot = h.name.replace('-', "_");
    let slot = format!("obsrv_tests_{slot}");
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await?,
        "1"
    );
    let (code, out) = h.command("cleanup")?;
    assert!(code.success(), "{out}");
    assert!(
        out.contains(&format!("dropped replication slot {slot}")),
        "{out}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}') + \
             (SELECT count(*) FROM pg_publication WHERE pubname = '{slot}')"
        ))
        .await?,
        "0",
        "slot and publication dropped"
    );
    assert!(!out.contains("state:"), "Retain keeps the position: {out}");
    // deletionPolicy Delete: the slot (gone already: a retried Job) and the state record.
    let (code, out) = h.command_with("cleanup", &["--delete-state"])?;
    assert!(code.success(), "{out}");
    assert!(
        out.contains(&format!("replication slot {slot} did not exist")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "state: deleted 1 record(s) of tests/{} from topic {}",
            h.name, h.state
        )),
        "{out}"
    );
    Ok(())
}

/// The snapshot runs beside concurrent writes, is killed (-9) in the middle and resumes at its
/// last chunk: applying every event in order gives exactly the table as it ends up (nothing lost),
/// and the rows read before the kill are not read again from the start.
#[tokio::test]
async fn snapshot_with_concurrent_writes_and_a_kill_9_loses_nothing() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    let n = 20_000;
    pg.psql(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, v int, note text); \
         INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {n}) g;"
    ))
    .await?;
    let h = harness(
        &broker,
        &pg,
        &manifest(
            &pg,
            "public.big",
            "      snapshotChunkSize: 2000\n      batchSize: 2000\n",
        ),
    )
    .await?;
    let conn = h.start()?;
    // Writes while the snapshot runs, as dense as the machine allows, so that rows of the chunk
    // being read change between its watermarks: updates across the key range, inserts past its
    // end, deletes.
    let writer = |seed: i32| {
        let url = pg.url();
        tokio::spawn(async move {
            let pool = sqlx::PgPool::connect(&url).await?;
            for i in 0..1500 {
                let id = (i * 67 + seed * 7919) % n + 1;
                sqlx::query("UPDATE big SET v = v + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await?;
                if i % 5 == 0 {
                    sqlx::query("INSERT INTO big VALUES ($1, 1, 'new')")
                        .bind(n + 1 + i + seed * 10_000)
                        .execute(&pool)
                        .await?;
                    sqlx::query("DELETE FROM big WHERE id = $1")
                        .bind((i * 31 + seed * 104_729) % n + 1)
                        .execute(&pool)
                        .await?;
                }
            }
            anyhow::Ok(())
        })
    };
    let writers = [writer(1), writer(2)];
    // Killed once the state topic holds snapshot progress (so there is a chunk to resume at).
    let deadline = Instant::now() + T;
    loop {
        let states = broker
            .consume_to_end(&h.state, Duration::from_secs(30))
            .await?;
        let progressed = states.iter().any(|r| {
            r.json().is_ok_and(|v| {
                v["position"]["snapshot"]["tables"]["public.big"]["after"].is_array()
            })
        });
        if progressed {
            break;
        }
        if Instant::now() > deadline {
            bail!("no snapshot progress committed\n{}", conn.log_tail());
        }
    }
    let s = conn.status().await?;
    conn.kill9()?;
    // The totals count streamed changes too: the watermark tells whether the snapshot is done.
    assert!(
        s["watermark"]
            .as_str()
            .is_some_and(|w| w.contains("snapshot of")),
        "killed mid-snapshot: {s}"
    );
    let reads_before_kill = events(
        &broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?,
    )?
    .iter()
    .filter(|e| e["op"] == "r")
    .count();
    let conn = h.start()?;
    for w in writers {
        w.await??;
    }
    let want = table_image(&pg, "big").await?;
    let deadline = Instant::now() + T;
    loop {
        let recs = broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?;
        let evs = events(&recs)?;
        let got = apply(&evs, "big");
        if got == want {
            // Resumed at the last committed chunk: only what was read after that commit is read
            // again, not everything read before the kill.
            let reads: Vec<i64> = evs
                .iter()
                .filter(|e| e["op"] == "r")
                .filter_map(|e| e["after"]["id"].as_i64())
                .collect();
            let distinct: BTreeSet<i64> = reads.iter().copied().collect();
            let again = reads.len() - distinct.len();
            assert!(
                again < reads_before_kill,
                "{again} rows read twice; {reads_before_kill} were read before the kill"
            );
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want
                .keys()
                .filter(|k| !got.contains_key(k))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !want.contains_key(k))
                .take(5)
                .collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
                .take(3)
                .collect();
            bail!(
                "events do not add up to the table: {} rows vs {} wanted; missing {missing:?}, extra {extra:?}, differ {differ:?}\n{}",
                got.len(),
                want.len(),
                conn.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Writes keep coming while the connector is killed (-9) ten times at random moments: after the
/// last restart every change is in the ingest topic.
#[tokio::test]
async fn kill_9_at_random_points_ten_times_loses_no_change() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE ev (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        .await?;
    let h = harness(
        &broker,
        &pg,
        &manifest(
            &pg,
            "public.ev",
            "      snapshot: never\n      batchSize: 100\n      slotName: ev_slot\n",
        ),
    )
    .await?;
    let total_rows = 3_000;
    let mut conn = h.start()?;
    wait_slot_active(&pg, "ev_slot").await?;
    let writer = {
        let url = pg.url();
        tokio::spawn(async move {
            let pool = sqlx::PgPool::connect(&url).await?;
            for i in 0..total_rows / 10 {
                let mut tx = pool.begin().await?;
                for j in 0..10 {
                    sqlx::query("INSERT INTO ev (id) VALUES ($1)")
                        .bind(i * 10 + j + 1)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            anyhow::Ok(())
        })
    };
    // Pseudo-random pauses from the clock, so each run kills at other points.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos() as u64;
    for k in 0..10u64 {
        let ms = 150 + (seed.wrapping_mul(k + 7).wrapping_add(k * 7919)) % 450;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        conn.kill9()?;
        conn = h.start()?;
    }
    writer.await??;
    let want: BTreeSet<i64> = (1..=total_rows as i64).collect();
    let deadline = Instant::now() + T;
    loop {
        let recs = broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?;
        let got: BTreeSet<i64> = events(&recs)?
            .iter()
            .filter_map(|e| e["after"]["id"].as_i64())
            .collect();
        if got == want {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.difference(&got).take(10).collect();
            bail!(
                "{} of {total_rows} changes; missing {missing:?}\n{}",
                got.len(),
                conn.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// An idle database: heartbeats keep the slot's confirmed position moving, and `kubectl`-level
/// lag reads zero bytes behind once caught up.
#[tokio::test]
async fn heartbeats_advance_the_slot_of_an_idle_database() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, v text)")
        .await?;
    let h = harness(
        &broker,
        &pg,
        &manifest(&pg, "public.quiet", "      slotName: quiet_slot\n"),
    )
    .await?;
    let conn = h.start()?;
    wait_slot_active(&pg, "quiet_slot").await?;
    // WAL written by a table the connector does not capture (it filters all of it out).
    pg.psql("INSERT INTO busy (v) SELECT md5(g::text) FROM generate_series(1, 5000) g")
        .await?;
    let first = slot_lsn(&pg, "quiet_slot").await?;
    let deadline = Instant::now() + T;
    loop {
        let now = slot_lsn(&pg, "quiet_slot").await?;
        let behind = pg
            .psql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) < 1000 FROM pg_replication_slots WHERE slot_name = 'quiet_slot'")
            .await?;
        if now != first && behind == "t" {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "confirmed_flush_lsn stayed at {first} (now {now})\n{}",
                conn.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        broker
            .consume_all(&h.ingest, 1, Duration::from_secs(1))
            .await?
            .is_empty(),
        "no events for an idle table"
    );
    Ok(())
}

/// The slot dropped under a running connector: the status says so (StateError naming the slot),
/// the process keeps running, the slot is re-created and the table snapshotted again.
#[tokio::test]
async fn a_dropped_slot_is_reported_and_followed_by_a_new_snapshot() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
        .await?;
    let h = harness(
        &broker,
        &pg,
        &manifest(&pg, "public.t", "      slotName: lost_slot\n"),
    )
    .await?;
    let mut conn = h.start()?;
    wait_events(&broker, &h, &conn, "the first snapshot", |e| e.len() >= 50).await?;
    // End the session holding the slot and drop it before the connector reconnects.
    pg.psql(
        "DO $$ BEGIN \
           PERFORM pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'lost_slot'; \
           FOR i IN 1..200 LOOP \
             EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'lost_slot' AND active); \
             PERFORM pg_sleep(0.01); \
           END LOOP; \
           PERFORM pg_drop_replication_slot('lost_slot'); END $$",
    )
    .await?;
    pg.psql("INSERT INTO t VALUES (51, 'after the drop')")
        .await?;
    let s = conn
        .wait_status("the lost slot reported", T, |s| {
            s["lastError"]["reason"] == "StateError"
        })
        .await?;
    let msg = s["lastError"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("lost_slot") && msg.contains("snapshot"),
        "{msg}"
    );
    let evs = wait_events(&broker, &h, &conn, "the second snapshot", |e| {
        e.iter().filter(|e| e["op"] == "r").count() >= 101
    })
    .await?;
    assert!(conn.is_running(), "no crash");
    let image = apply(&evs, "t");
    assert_eq!(
        image.len(),
        51,
        "row 51, written while no slot existed, is in the new snapshot"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'lost_slot'")
            .await?,
        "1",
        "re-created"
    );
    conn.wait_status("healthy again", T, |s| s["lastError"].is_null())
        .await?;
    Ok(())
}

/// Preflight: `check` names the table without a key and the missing REPLICATION attribute; a
/// running connector whose user loses REPLICATION reports AuthFailed and does not crash-loop.
#[tokio::test]
async fn preflight_and_a_revoked_replication_privilege_are_clear() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql(
        "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (v int); \
         CREATE ROLE reader LOGIN PASSWORD 'reader-pw'; GRANT SELECT ON keyed TO reader; \
         CREATE ROLE cdc LOGIN REPLICATION PASSWORD 'cdc-pw'; GRANT SELECT ON keyed TO cdc; \
         GRANT CREATE ON DATABASE obsrv TO cdc; ALTER TABLE keyed OWNER TO cdc;",
    )
    .await?;
    let h = harness(&broker, &pg, &manifest(&pg, "keyed, loose", "")).await?;
    let out = common::check_fails(&h)?;
    assert!(
        out.contains("SchemaError") && out.contains("public.loose"),
        "{out}"
    );
    assert!(out.contains("REPLICA IDENTITY FULL"), "{out}");

    let h = harness_as(&broker, &manifest(&pg, "keyed", ""), "reader", "reader-pw").await?;
    let out = common::check_fails(&h)?;
    assert!(
        out.contains("AuthFailed") && out.contains("REPLICATION"),
        "{out}"
    );

    let h = harness_as(
        &broker,
        &manifest(&pg, "keyed", "      slotName: cdc_slot\n"),
        "cdc",
        "cdc-pw",
    )
    .await?;
    let mut conn = h.start()?;
    wait_slot_active(&pg, "cdc_slot").await?;
    pg.psql("INSERT INTO keyed VALUES (1)").await?;
    wait_events(&broker, &h, &conn, "a change", |e| !e.is_empty()).await?;
    pg.psql(
        "ALTER ROLE cdc NOREPLICATION; \
         SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
    )
    .await?;
    let s = conn
        .wait_status("the missing privilege reported", T, |s| {
            s["lastError"]["reason"] == "AuthFailed"
        })
        .await?;
    assert!(
        s["lastError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("REPLICATION")),
        "{s}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(conn.is_running(), "waits and retries instead of exiting");
    pg.psql("ALTER ROLE cdc REPLICATION; INSERT INTO keyed VALUES (2)")
        .await?;
    wait_events(&broker, &h, &conn, "changes after the grant", |e| {
        e.iter().any(|e| e["after"]["id"] == 2)
    })
    .await?;
    Ok(())
}

/// TLS verify-full with the CA from the Secret, on the replication session as on SQL.
#[tokio::test]
async fn tls_verify_full_streams_changes() -> Result<()> {
    let ((pg, ca), broker) = tokio::try_join!(Postgres::start_tls(), Broker::start())?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY)").await?;
    let m = manifest(
        &pg,
        "t",
        "      snapshot: never\n      slotName: tls_slot\n",
    )
    .replace(
        "tls: {mode: disable}",
        "tls: {mode: verify-full, ca: {secretName: pg-creds, key: ca.crt}}",
    );
    let h = Harness::new(
        &broker,
        &m,
        &[
            ("pg-creds", "username", pg.user()),
            ("pg-creds", "password", pg.password()),
            ("pg-creds", "ca.crt", &ca),
        ],
    )
    .await?;
    let conn = h.start()?;
    wait_slot_active(&pg, "tls_slot").await?;
    pg.psql("INSERT INTO t VALUES (1), (2)").await?;
    let recs = consume_exactly(&broker, &h.ingest, 2, T).await?;
    assert_eq!(recs.len(), 2, "{}", conn.log_tail());
    Ok(())
}

/// A change too large for the sink goes to the failed topic, its preview starting with the
/// position; the changes after it still arrive.
#[tokio::test]
async fn an_oversize_change_goes_to_the_failed_topic_with_its_position() -> Result<()> {
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await?;
    let m = format!(
        "{}  sink:\n    kafka: {{maxMessageBytes: 2048}}\n",
        manifest(
            &pg,
            "docs",
            "      snapshot: never\n      slotName: docs_slot\n"
        )
    );
    let h = harness(&broker, &pg, &m).await?;
    let conn = h.start()?;
    wait_slot_active(&pg, "docs_slot").await?;
    pg.psql("INSERT INTO docs VALUES (1, 'a'); INSERT INTO docs VALUES (2, repeat('x', 5000)); INSERT INTO docs VALUES (3, 'c')")
        .await?;
    let ok = consume_exactly(&broker, &h.ingest, 2, T).await?;
    assert_eq!(ok.len(), 2, "{}", conn.log_tail());
    let failed = consume_exactly(&broker, &h.failed, 1, T).await?;
    assert_eq!(failed.len(), 1);
    let f = failed[0].json()?;
    assert_eq!(f["error"]["error_code"], "CE_1001");
    let preview = f["event"].as_str().unwrap_or_default();
    assert!(
        preview.starts_with("{\"source\":") && preview.contains("\"lsn\":"),
        "the preview says where the row was: {preview:.200}"
    );
    Ok(())
}
