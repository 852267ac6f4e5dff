//! MariaDB change data capture end to end: a real MariaDB 10.11 (binary log in ROW format,
//! GTIDs), a real broker, the real binary. (No MySQL server is installed here: the MySQL paths are
//! unit-tested, see docs/sources/cdc.md.)

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use common::{Connector, Harness, total};
use obsrv_e2e::services::{Broker, ConsumedRecord, MariaDb};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn manifest(db: &MariaDb, tables: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: customers
  source:
    mariadbCdc:
      host: {host}
      port: {port}
      database: {database}
      credentials: {{secretName: db-creds}}
      tls: {{mode: disable}}
      tables: [{tables}]
      heartbeatInterval: 1s
{extra}"#,
        host = db.host(),
        port = db.port(),
        database = db.database(),
    )
}

async fn harness(broker: &Broker, db: &MariaDb, manifest: &str) -> Result<Harness> {
    Harness::new(
        broker,
        manifest,
        &[
            ("db-creds", "username", db.user()),
            ("db-creds", "password", db.password()),
        ],
    )
    .await
}

fn events(recs: &[ConsumedRecord]) -> Result<Vec<Value>> {
    recs.iter()
        .map(|r| Ok(r.json()?["event"].clone()))
        .collect()
}

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

fn of_table<'a>(evs: &'a [Value], table: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["source"]["table"] == table)
        .collect()
}

/// Applies change events in order to a table image keyed by `id`.
fn apply(events: &[Value], table: &str) -> BTreeMap<i64, Value> {
    let mut rows = BTreeMap::new();
    for e in of_table(events, table) {
        match e["op"].as_str() {
            Some("r" | "c" | "u") => {
                if let (Some(b), Some(a)) = (e["before"]["id"].as_i64(), e["after"]["id"].as_i64())
                    && a != b
                {
                    rows.remove(&b);
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

/// Snapshot, then insert/update/delete/truncate in commit order with full before images, typed
/// values, the primary key as Kafka key, MariaDB GTIDs in `source`, ALTER TABLE ADD COLUMN
/// mid-stream (with and without column names in the log), and a restart that resumes by GTID.
#[tokio::test]
async fn changes_in_order_with_gtids_types_and_schema_changes() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    db.sql(
        "CREATE TABLE customers (id int PRIMARY KEY, name varchar(40), balance decimal(12,2), \
         big bigint unsigned, seen datetime(6), at timestamp(3) NULL, raw varbinary(8), doc json, \
         tier enum('free','pro'), tags set('a','b','c')); \
         INSERT INTO customers (id, name) VALUES (1, 'one'), (2, 'two');",
    )
    .await?;
    let h = harness(&broker, &db, &manifest(&db, "customers", "")).await?;
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    let mut conn = h.start()?;
    wait_events(&broker, &h, &conn, "the snapshot", |e| e.len() >= 2).await?;
    db.sql(
        "INSERT INTO customers VALUES (10, 'ten', 12.50, 18446744073709551615, '2024-01-02 03:04:05.123456', \
         '2024-01-02 03:04:05.500', x'00ff', '{\"k\": [1, 2]}', 'pro', 'a,c'); \
         UPDATE customers SET name = 'TEN' WHERE id = 10; \
         DELETE FROM customers WHERE id = 10; \
         TRUNCATE TABLE customers; \
         ALTER TABLE customers ADD COLUMN extra int DEFAULT 7; \
         INSERT INTO customers (id, name) VALUES (20, 'twenty');",
    )
    .await?;
    let evs = wait_events(&broker, &h, &conn, "every change", |e| e.len() >= 7).await?;
    let ops: Vec<&str> = evs
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(ops, ["r", "r", "c", "u", "d", "t", "c"], "in commit order");
    let c = &evs[2];
    assert_eq!(
        c["after"],
        json!({"id": 10, "name": "ten", "balance": 12.5, "big": 18446744073709551615_u64,
               "seen": "2024-01-02T03:04:05.123456Z", "at": "2024-01-02T03:04:05.500000Z",
               "raw": "AP8=", "doc": {"k": [1, 2]}, "tier": "pro", "tags": "a,c"}),
        "typed by the documented rule"
    );
    assert_eq!(evs[3]["before"]["name"], "ten", "full before image");
    assert_eq!(evs[3]["after"]["name"], "TEN");
    assert_eq!(evs[4]["before"]["id"], 10);
    assert_eq!(evs[6]["after"]["extra"], 7, "the column added mid-stream");
    let src = &c["source"];
    assert_eq!(src["connector"], "mariadb");
    assert_eq!(
        (src["db"].as_str(), src["table"].as_str()),
        (Some(db.database()), Some("customers"))
    );
    assert!(
        src["gtid"]
            .as_str()
            .is_some_and(|g| g.split('-').count() == 3),
        "a MariaDB GTID: {src}"
    );
    assert!(
        src["file"].as_str().is_some() && src["pos"].as_i64().is_some(),
        "{src}"
    );
    assert_eq!(evs[0]["source"]["snapshot"], "true");
    let recs = broker
        .consume_to_end(&h.ingest, Duration::from_secs(30))
        .await?;
    let key = recs
        .iter()
        .find(|r| {
            r.json()
                .is_ok_and(|v| v["event"]["op"] == "c" && v["event"]["after"]["id"] == 10)
        })
        .and_then(|r| r.key_str().map(str::to_string));
    assert_eq!(key.as_deref(), Some(r#"{"id":10}"#));

    // A graceful restart resumes after the last delivered GTID: nothing twice.
    let s = conn
        .wait_status("the position committed", T, |s| {
            total(s, "recordsIngested") >= 7
        })
        .await?;
    assert!(
        s["watermark"].as_str().is_some_and(|w| w.contains("gtid")),
        "{s}"
    );
    conn.terminate().await?;
    db.sql("SET GLOBAL binlog_row_metadata = FULL").await?;
    db.sql("INSERT INTO customers (id, name) VALUES (21, 'after restart'); ALTER TABLE customers ADD COLUMN late varchar(5); \
            INSERT INTO customers (id, name, late) VALUES (22, 'named', 'yes')")
        .await?;
    conn = h.start()?;
    let evs = wait_events(&broker, &h, &conn, "changes after the restart", |e| {
        e.len() >= 9
    })
    .await?;
    let ids: Vec<i64> = evs
        .iter()
        .filter_map(|e| e["after"]["id"].as_i64())
        .collect();
    assert_eq!(
        ids,
        [1, 2, 10, 10, 20, 21, 22],
        "resumed exactly after what was delivered"
    );
    assert_eq!(
        evs[8]["after"]["late"], "yes",
        "column names from the log (binlog_row_metadata=FULL)"
    );
    drop(conn);
    Ok(())
}

/// The snapshot under concurrent writes, killed (-9) in the middle and restarted; then ten more
/// kill -9 at random moments under writes: applying every event in order gives exactly the table.
#[tokio::test]
async fn snapshot_and_kill_9_at_random_points_lose_nothing() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    let n = 20_000;
    db.sql(&format!(
        "CREATE TABLE acct (id int PRIMARY KEY, v int, note varchar(40)); \
         INSERT INTO acct SELECT seq, 0, md5(seq) FROM seq_1_to_{n};"
    ))
    .await?;
    let h = harness(
        &broker,
        &db,
        &manifest(&db, "acct", "      batchSize: 1000\n"),
    )
    .await?;
    let mut conn = h.start()?;
    let writer = {
        let url = db.url();
        tokio::spawn(async move {
            let pool = sqlx::MySqlPool::connect(&url).await?;
            for i in 0..1500 {
                let id = (i * 67) % n + 1;
                sqlx::query("UPDATE acct SET v = v + 1 WHERE id = ?")
                    .bind(id)
                    .execute(&pool)
                    .await?;
                if i % 5 == 0 {
                    sqlx::query("INSERT INTO acct VALUES (?, 1, 'new')")
                        .bind(n + 1 + i)
                        .execute(&pool)
                        .await?;
                    sqlx::query("DELETE FROM acct WHERE id = ?")
                        .bind((i * 31) % n + 1)
                        .execute(&pool)
                        .await?;
                }
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    conn.wait_status("part of the snapshot", T, |s| {
        total(s, "recordsIngested") >= 3_000
    })
    .await?;
    conn.kill9()?;
    conn = h.start()?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos() as u64;
    for k in 0..10u64 {
        let ms = 200 + (seed.wrapping_mul(k + 7).wrapping_add(k * 7919)) % 500;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        conn.kill9()?;
        conn = h.start()?;
    }
    writer.await??;
    let out = db.sql("SELECT id, v, note FROM acct ORDER BY id").await?;
    let want: BTreeMap<i64, Value> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let id: i64 = f[0].parse()?;
            Ok((
                id,
                json!({"id": id, "v": f[1].parse::<i64>()?, "note": f[2]}),
            ))
        })
        .collect::<Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let recs = broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?;
        let got = apply(&events(&recs)?, "acct");
        if got == want {
            break;
        }
        if Instant::now() > deadline {
            let missing: BTreeSet<_> = want
                .keys()
                .filter(|k| !got.contains_key(k))
                .take(5)
                .collect();
            let extra: BTreeSet<_> = got
                .keys()
                .filter(|k| !want.contains_key(k))
                .take(5)
                .collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
                .take(3)
                .collect();
            // What the topic says about the first row that differs, to tell a lost change from a
            // stale read.
            let evs = events(&recs)?;
            let k = extra
                .iter()
                .chain(missing.iter())
                .next()
                .map(|k| **k)
                .unwrap_or(0);
            let about: Vec<String> = evs
                .iter()
                .filter(|e| e["after"]["id"] == k || e["before"]["id"] == k)
                .map(|e| format!("{} at {} {}", e["op"], e["source"]["gtid"], e["after"]))
                .collect();
            bail!(
                "events do not add up to the table: {} vs {} rows; missing {missing:?} extra {extra:?} differ {differ:?}; events of {k}: {about:?}\n{}",
                got.len(),
                want.len(),
                conn.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// A backlog of many more transactions than one batch (the connector was down while they
/// committed) is delivered whole: a batch that fills up in the middle of a transaction does not
/// stall the stream.
#[tokio::test]
async fn a_backlog_larger_than_a_batch_is_delivered_whole() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    db.sql("CREATE TABLE backlog (id int PRIMARY KEY, v int); INSERT INTO backlog VALUES (0, 0);")
        .await?;
    let h = harness(
        &broker,
        &db,
        &manifest(&db, "backlog", "      batchSize: 50\n"),
    )
    .await?;
    let mut conn = h.start()?;
    wait_events(&broker, &h, &conn, "the snapshot row", |evs| {
        of_table(evs, "backlog").len() == 1
    })
    .await?;
    conn.kill9()?;
    // Each statement its own transaction: 400 transactions, eight batches' worth.
    let n = 400;
    let inserts: String = (1..=n)
        .map(|i| format!("INSERT INTO backlog VALUES ({i}, {i});"))
        .collect();
    db.sql(&inserts).await?;
    conn = h.start()?;
    let evs = wait_events(&broker, &h, &conn, "every insert of the backlog", |evs| {
        apply(evs, "backlog").len() == n as usize + 1
    })
    .await?;
    let rows = apply(&evs, "backlog");
    assert_eq!(rows[&(n as i64)]["v"], n);
    drop(conn);
    Ok(())
}

/// `check` says what is wrong: a table without a primary key, a binary log not in ROW format.
#[tokio::test]
async fn preflight_names_what_to_change() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    db.sql("CREATE TABLE loose (v int)").await?;
    let h = harness(&broker, &db, &manifest(&db, "loose", "")).await?;
    let out = common::check_fails(&h)?;
    assert!(
        out.contains("SchemaError") && out.contains("loose") && out.contains("primary key"),
        "{out}"
    );
    db.sql("CREATE TABLE keyed (id int PRIMARY KEY); SET GLOBAL binlog_format = 'STATEMENT'")
        .await?;
    let h = harness(&broker, &db, &manifest(&db, "keyed", "")).await?;
    let out = common::check_fails(&h)?;
    assert!(out.contains("binlog_format=ROW"), "{out}");
    Ok(())
}
