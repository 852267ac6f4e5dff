//! Marketplace connectors driven through their protocol by the real runtime: Airbyte sources
//! (`source-faker`, and `source-s3` reading files from the test S3 server) and a Singer tap
//! (`tap-postgres` against the test Postgres), all real programs from PyPI installed by
//! `scripts/setup.sh`.

mod common;

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use common::{Harness, consume_exactly, total};
use obsrv_e2e::services::{Broker, Postgres, S3, marketplace_program};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

fn faker_manifest(count: usize, extra_config: &str) -> Result<String> {
    let faker = marketplace_program("source-faker")?;
    Ok(format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: users
  source:
    custom:
      image: airbyte/source-faker:6.2.0
      protocol: airbyte
      command: ["{faker}"]
      config: {{count: {count}, seed: 1, records_per_slice: 500, parallelism: 1, always_updated: false{extra_config}}}
      streams: [{{name: users}}]
      pollInterval: 1h
"#,
        faker = faker.display()
    ))
}

/// The distinct `id` fields of the users in a topic's records.
async fn user_ids(broker: &Broker, topic: &str, at_least: usize) -> Result<BTreeSet<i64>> {
    let recs = broker
        .consume_all(topic, at_least, Duration::from_secs(60))
        .await?;
    Ok(recs
        .iter()
        .filter_map(|r| r.json().ok())
        .filter_map(|v: Value| v["event"]["id"].as_i64())
        .collect())
}

/// A record's `event.id`: a number, or a number as text (CSV sources emit every field as text).
fn event_id(v: &Value) -> Option<i64> {
    let id = &v["event"]["id"];
    id.as_i64().or_else(|| id.as_str()?.parse().ok())
}

/// Waits until the `event.id`s of the topic's records cover `want`; says what is missing if not.
async fn wait_ids(
    broker: &Broker,
    topic: &str,
    want: std::ops::RangeInclusive<i64>,
    conn: &common::Connector,
) -> Result<()> {
    let want: BTreeSet<i64> = want.collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got: BTreeSet<i64> = broker
            .consume_to_end(topic, Duration::from_secs(30))
            .await?
            .iter()
            .filter_map(|r| r.json().ok())
            .filter_map(|v| event_id(&v))
            .collect();
        let missing = want.difference(&got).count();
        if missing == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "{missing} of {} ids missing: {}",
                want.len(),
                conn.log_tail()
            );
        }
    }
}

#[tokio::test]
async fn an_airbyte_source_checks_loads_and_resumes_from_its_committed_state() -> Result<()> {
    let broker = Broker::start().await?;
    let h = Harness::new(&broker, &faker_manifest(2_000, "")?, &[]).await?;
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    assert!(
        out.contains("source: ok (airbyte")
            && out.contains("check succeeded; streams users (incremental)"),
        "{out}"
    );
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 2_000, WAIT).await?;
    assert_eq!(recs.len(), 2_000, "{}", conn.log_tail());
    assert_eq!(common::ids(&recs)?.len(), 2_000);
    let ids = user_ids(&broker, &h.ingest, 2_000).await?;
    assert_eq!(ids, (1..=2_000).collect(), "every user once");
    let event: Value = recs[0].json()?;
    assert_eq!(event["dataset"], "users");
    assert!(
        event["event"]["email"].is_string(),
        "the record's data is the event: {event}"
    );
    let s = conn
        .wait_status("the last state committed", WAIT, |s| {
            total(s, "recordsIngested") == 2_000 && s["watermark"].is_string()
        })
        .await?;
    assert_eq!(s["lastError"], Value::Null, "{s}");
    conn.terminate().await?;

    // A restart hands the committed state back: the source has nothing new to send.
    let conn = h.start()?;
    conn.wait_status("running again", WAIT, |s| s["state"] == "Running")
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = broker
        .consume_all(&h.ingest, 2_001, Duration::from_secs(3))
        .await?;
    assert_eq!(
        again.len(),
        2_000,
        "nothing re-read after the state: {}",
        conn.log_tail()
    );
    Ok(())
}

/// A real file source from the marketplace: Airbyte's S3 source reading CSV objects from the test
/// S3 server (s3s-fs, signatures verified), its keys from a Secret. Every row arrives once, a new
/// object is picked up on the next run from the committed state without reading the first again,
/// and the secret key appears in no output.
#[tokio::test]
async fn airbyte_s3_source_reads_csv_objects_and_resumes_from_its_state() -> Result<()> {
    let (broker, s3) = tokio::try_join!(Broker::start(), S3::start())?;
    s3.create_bucket("orders").await?;
    let csv = |from: i64, to: i64| {
        let mut body = String::from("id,customer,amount\n");
        for i in from..=to {
            body += &format!("{i},customer-{},{}.50\n", i % 97, i % 1000);
        }
        body
    };
    s3.put_object("orders", "2024/orders-1.csv", csv(1, 1500))
        .await?;
    s3.put_object("orders", "other/skip.csv", csv(90_001, 90_010))
        .await?;
    let program = marketplace_program("source-s3")?;
    let manifest = format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: orders
  source:
    custom:
      image: airbyte/source-s3:4.16.1
      protocol: airbyte
      command: ["{program}"]
      config:
        bucket: orders
        endpoint: {endpoint}
        region_name: us-east-1
        aws_access_key_id: {{secretKeyRef: {{name: s3, key: accessKey}}}}
        aws_secret_access_key: {{secretKeyRef: {{name: s3, key: secretKey}}}}
        streams: [{{name: orders, globs: ["2024/*.csv"], format: {{filetype: csv}}, validation_policy: Emit Record}}]
      streams: [{{name: orders}}]
      pollInterval: 2s
"#,
        program = program.display(),
        endpoint = s3.endpoint(),
    );
    let secrets = [
        ("s3", "accessKey", s3.access_key()),
        ("s3", "secretKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest, &secrets).await?;
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    assert!(out.contains("check succeeded"), "{out}");
    assert!(
        !out.contains(s3.secret_key()),
        "no secret in the output: {out}"
    );

    let conn = h.start()?;
    wait_ids(&broker, &h.ingest, 1..=1500, &conn).await?;
    let recs = broker
        .consume_to_end(&h.ingest, Duration::from_secs(30))
        .await?;
    let event: Value = recs[0].json()?;
    assert_eq!(event["dataset"], "orders");
    assert!(event["event"]["customer"].is_string(), "{event}");
    assert!(
        !recs
            .iter()
            .filter_map(|r| r.json().ok())
            .any(|v| event_id(&v) > Some(90_000)),
        "objects outside the glob are not read"
    );
    conn.wait_status("the state committed", WAIT, |s| {
        total(s, "recordsIngested") >= 1500 && s["watermark"].is_string()
    })
    .await?;

    // A new object: the next run reads it, and only it (the state says the first one is done).
    s3.put_object("orders", "2024/orders-2.csv", csv(1501, 1600))
        .await?;
    wait_ids(&broker, &h.ingest, 1..=1600, &conn).await?;
    assert!(
        !conn.log_tail().contains(s3.secret_key()),
        "no secret in the log"
    );
    conn.terminate().await?;
    let recs = broker
        .consume_to_end(&h.ingest, Duration::from_secs(30))
        .await?;
    let mut per_id = std::collections::BTreeMap::<i64, usize>::new();
    for v in recs.iter().filter_map(|r| r.json().ok()) {
        if let Some(id) = event_id(&v) {
            *per_id.entry(id).or_default() += 1;
        }
    }
    assert!(
        per_id.values().all(|&n| n == 1),
        "every row once: {:?}",
        per_id
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn a_broken_program_says_why_and_keeps_its_secrets() -> Result<()> {
    let broker = Broker::start().await?;
    // Config from a Secret: the value must not appear in any output.
    let secret = "faker-s3cret-value-42";
    let manifest = faker_manifest(100, "")?.replace(
        "count: 100,",
        "count: {secretKeyRef: {name: faker, key: count}},",
    );
    // A count that is not a number: the program's own check fails with its message.
    let h = Harness::new(&broker, &manifest, &[("faker", "count", secret)]).await?;
    let (code, out) = h.command("check")?;
    assert!(!code.success(), "{out}");
    assert!(out.contains("source-faker"), "names the program: {out}");
    assert!(!out.contains(secret), "no secret in the output: {out}");
    let conn = h.start()?;
    let s = conn
        .wait_status("the failure in status", WAIT, |s| {
            s["lastError"].is_object()
        })
        .await?;
    assert!(!s.to_string().contains(secret), "no secret in status: {s}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!conn.log_tail().contains(secret), "no secret in the log");

    // A program that writes garbage, a 5 MB record and then dies mid-stream.
    let script = r#"echo '{"type":"RECORD","record":{"stream":"s","data":{"id":1},"emitted_at":0}}'
echo 'this is not json'
printf '{"type":"RECORD","record":{"stream":"s","data":{"blob":"'; head -c 5000000 /dev/zero | tr '\0' x; echo '"},"emitted_at":0}}'
echo '{"type":"STATE","state":{"type":"STREAM","stream":{"stream_descriptor":{"name":"s"},"stream_state":{"n":3}}}}'
echo '{"type":"TRACE","trace":{"type":"ERROR","error":{"message":"upstream API returned 500","failure_type":"system_error"}}}'
exit 3"#;
    let dir = tempfile::tempdir()?;
    let prog = dir.path().join("broken-source");
    std::fs::write(
        &prog,
        format!(
            r#"#!/bin/sh
case "$1" in
  check) echo '{{"type":"CONNECTION_STATUS","connectionStatus":{{"status":"SUCCEEDED"}}}}' ;;
  discover) echo '{{"type":"CATALOG","catalog":{{"streams":[{{"name":"s","json_schema":{{}},"supported_sync_modes":["full_refresh"]}}]}}}}' ;;
  read) {script} ;;
esac
"#
        ),
    )?;
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let manifest = faker_manifest(1, "")?.replace(
        &marketplace_program("source-faker")?.display().to_string(),
        &prog.display().to_string(),
    );
    let manifest = manifest.replace("streams: [{name: users}]", "streams: [{name: s}]");
    let h = Harness::new(&broker, &manifest, &[]).await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("the program's error in status", WAIT, |s| {
            s["lastError"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("upstream API returned 500"))
        })
        .await?;
    assert_eq!(s["lastError"]["reason"], "SourceUnreachable", "{s}");
    let failed = broker.consume_all(&h.failed, 2, WAIT).await?;
    let docs: Vec<Value> = failed.iter().filter_map(|r| r.json().ok()).collect();
    let text = serde_json::to_string(&docs)?;
    assert!(
        text.contains("line 2 of the program's output is not JSON"),
        "{text}"
    );
    assert_eq!(
        docs.len(),
        2,
        "the garbage line and the oversize record: {text}"
    );
    let ingested = broker.consume_all(&h.ingest, 1, WAIT).await?;
    assert!(!ingested.is_empty(), "the good record arrived");
    Ok(())
}

#[tokio::test]
async fn a_singer_tap_reads_postgres_incrementally_and_resumes_after_kill_9() -> Result<()> {
    let broker = Broker::start().await?;
    let pg = Postgres::start().await?;
    pg.psql(
        "CREATE TABLE events (id bigserial PRIMARY KEY, kind text NOT NULL); \
         INSERT INTO events (kind) SELECT 'click' FROM generate_series(1, 20000);",
    )
    .await?;
    let tap = marketplace_program("tap-postgres")?;
    let manifest = format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: events
  source:
    custom:
      image: meltano/tap-postgres:0.10.0
      protocol: singer
      command: ["{tap}"]
      config:
        host: {host}
        port: {port}
        user: {user}
        database: {db}
        password: {{secretKeyRef: {{name: pg, key: password}}}}
      streams: [{{name: public-events, cursorField: id}}]
      pollInterval: 1s
"#,
        tap = tap.display(),
        host = pg.host(),
        port = pg.port(),
        user = pg.user(),
        db = pg.database(),
    );
    let h = Harness::new(&broker, &manifest, &[("pg", "password", pg.password())]).await?;
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    assert!(out.contains("public-events (incremental by id)"), "{out}");
    let conn = h.start()?;
    let s = conn
        .wait_status("part of the load", WAIT, |s| {
            total(s, "recordsIngested") >= 4_000
        })
        .await?;
    conn.kill9()?;
    assert!(
        total(&s, "recordsIngested") < 20_000,
        "killed mid-load: {s}"
    );
    // Rows added while it is down arrive after the restart, from the committed bookmark.
    pg.psql("INSERT INTO events (kind) SELECT 'view' FROM generate_series(1, 500);")
        .await?;
    let conn = h.start()?;
    wait_ids(&broker, &h.ingest, 1..=20_500, &conn).await?;
    // Incremental: later polls (every second) read from the bookmark, not the whole table.
    let count = || async {
        anyhow::Ok(
            broker
                .consume_to_end(&h.ingest, Duration::from_secs(30))
                .await?
                .len(),
        )
    };
    let before = count().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = count().await?;
    assert!(
        after - before < 100,
        "{before} then {after} records: polls re-read the table"
    );
    Ok(())
}
