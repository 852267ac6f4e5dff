//! The MySQL/MariaDB source end to end against a real MariaDB.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{
    Harness, check_fails, check_passes_and_loads, consume_exactly, ids,
    kill_9_mid_load_then_restart, total,
};
use obsrv_e2e::services::{Broker, MariaDb};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn manifest(db: &MariaDb, table: &str, tie_breaker: &str, batch: usize) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: shop
  source:
    mariadb:
      host: {host}
      port: {port}
      database: {name}
      credentials: {{secretName: db, usernameKey: user, passwordKey: pass}}
      tls: {{mode: disable}}
      tables: [{{name: {table}, cursor: {{column: updated_at, tieBreaker: {tie_breaker}}}}}]
      pollInterval: 200ms
      batchSize: {batch}
"#,
        host = db.host(),
        port = db.port(),
        name = db.database(),
    )
}

/// Full load with ties and typed columns, new rows, restart from state.
#[tokio::test]
async fn mariadb_full_load_ties_types_and_restart() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    db.sql(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, updated_at DATETIME(6) NOT NULL, amount DECIMAL(30,10), raw VARBINARY(16), \
         doc JSON, note VARCHAR(20), KEY (updated_at, id)); \
         INSERT INTO orders SELECT seq, TIMESTAMP('2024-01-01 00:00:00') + INTERVAL (seq DIV 10) MINUTE, \
         12345678901234567890.0123456789 + seq, UNHEX('00FF10'), JSON_OBJECT('n', seq), IF(seq % 2 = 0, NULL, CONCAT('n', seq)) \
         FROM seq_1_to_95;",
    )
    .await?;
    let creds = [("db", "user", db.user()), ("db", "pass", db.password())];
    let h = Harness::new(&broker, &manifest(&db, "orders", "id", 6), &creds).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 95, T).await?;
    assert_eq!(recs.len(), 95, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 95);
    let first = recs
        .iter()
        .find(|r| r.json().map(|v| v["event"]["id"] == 1).unwrap_or(false))
        .expect("row 1");
    let v = first.json()?;
    let text = String::from_utf8(first.value.clone().unwrap_or_default())?;
    assert!(
        text.contains("12345678901234567891.0123456789"),
        "numeric digits kept: {text}"
    );
    assert_eq!(
        v["event"]["updated_at"], "2024-01-01T00:00:00.000000Z",
        "{text}"
    );
    assert_eq!(v["event"]["raw"], "AP8Q", "{text}");
    assert_eq!(v["event"]["note"], "n1");
    assert_eq!(
        v["event"]["doc"],
        json!({"n": 1}),
        "JSON columns nest: {text}"
    );
    assert_eq!(
        v["obsrv_meta"]["source"],
        json!({"connector": "mariadb", "connectorInstance": format!("tests/{}", h.name)})
    );
    let two = recs
        .iter()
        .find(|r| r.json().map(|v| v["event"]["id"] == 2).unwrap_or(false))
        .expect("row 2");
    assert_eq!(two.json()?["event"]["note"], Value::Null);
    conn.wait_status("caught up", T, |s| {
        total(s, "recordsIngested") == 95 && s["lagRecords"] == 0
    })
    .await?;

    db.sql("INSERT INTO orders (id, updated_at) VALUES (96, '2024-01-01 00:09:00'), (97, '2024-02-01 00:00:00')").await?;
    assert_eq!(
        consume_exactly(&broker, &h.ingest, 97, T).await?.len(),
        97,
        "{}",
        conn.log_tail()
    );
    conn.wait_status("97 ingested", T, |s| total(s, "recordsIngested") == 97)
        .await?;
    assert!(conn.terminate().await?.success());
    db.sql("INSERT INTO orders (id, updated_at) VALUES (98, '2024-03-01 00:00:00')")
        .await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 98, T).await?;
    assert_eq!(
        recs.len(),
        98,
        "resumed from state: no loss, no duplicate\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), 98);
    Ok(())
}

/// TLS modes against a server that requires TLS: verify-full with the CA from the Secret loads the
/// table; plaintext is refused and an unverifiable server too, and `check` says why.
#[tokio::test]
async fn mariadb_tls_modes_verify_the_server_and_refuse_plaintext() -> Result<()> {
    let ((db, ca), broker) = tokio::try_join!(MariaDb::start_tls(), Broker::start())?;
    db.sql(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, updated_at DATETIME(6) NOT NULL, KEY (updated_at, id)); \
         INSERT INTO orders SELECT seq, TIMESTAMP('2024-01-01 00:00:00') + INTERVAL seq SECOND FROM seq_1_to_30;",
    )
    .await?;
    let with_mode = |mode: &str| manifest(&db, "orders", "id", 8).replace("{mode: disable}", mode);
    let creds = [("db", "user", db.user()), ("db", "pass", db.password())];
    let with_ca = [
        ("db", "user", db.user()),
        ("db", "pass", db.password()),
        ("db", "ca.crt", ca.as_str()),
    ];

    let verified = Harness::new(
        &broker,
        &with_mode("{mode: verify-full, ca: {secretName: db, key: ca.crt}}"),
        &with_ca,
    )
    .await?;
    check_passes_and_loads(&broker, &verified, 30).await?;

    let plain = Harness::new(&broker, &with_mode("{mode: disable}"), &creds).await?;
    let out = check_fails(&plain)?;
    // MariaDB answers a plaintext login on a TLS-only server with "Access denied".
    assert!(
        out.contains("source: AuthFailed") && out.contains("Access denied"),
        "plaintext refused by the server: {out}"
    );

    let unverified = Harness::new(&broker, &with_mode("{mode: verify-full}"), &creds).await?;
    let out = check_fails(&unverified)?;
    assert!(
        out.to_lowercase().contains("certificate"),
        "an unknown issuer is refused: {out}"
    );
    Ok(())
}

/// A `kill -9` in the middle of a load, then a restart: nothing lost (count distinct ids).
#[tokio::test]
async fn mariadb_kill_9_mid_load_then_restart_loses_nothing() -> Result<()> {
    let (db, broker) = tokio::try_join!(MariaDb::start(), Broker::start())?;
    let n = 30_000;
    db.sql(&format!(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, updated_at DATETIME(6) NOT NULL, payload VARCHAR(64), \
         KEY (updated_at, id)); \
         INSERT INTO orders SELECT seq, TIMESTAMP('2024-01-01 00:00:00') + INTERVAL (seq DIV 7) SECOND, MD5(seq) \
         FROM seq_1_to_{n};"
    ))
    .await?;
    let creds = [("db", "user", db.user()), ("db", "pass", db.password())];
    let h = Harness::new(&broker, &manifest(&db, "orders", "id", 500), &creds).await?;
    kill_9_mid_load_then_restart(&broker, &h, n, 3_000).await?;
    Ok(())
}
