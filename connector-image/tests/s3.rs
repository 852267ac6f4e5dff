//! The S3 source end to end against a real S3 API (s3s-fs): JSON lines, CSV, JSON documents, new
//! objects, restart from state, kill -9 inside a large object.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Harness, consume_exactly, ids, total};
use obsrv_e2e::services::{Broker, S3, unique_name};

const T: Duration = Duration::from_secs(60);

fn manifest(s3: &S3, bucket: &str, format: &str) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: files
  source:
    s3:
      endpoint: {ep}
      region: {region}
      bucket: {bucket}
      prefix: in/
      format: {format}
      forcePathStyle: true
      credentials: {{secretName: s3-creds}}
      pollInterval: 200ms
"#,
        ep = s3.endpoint(),
        region = s3.region(),
    )
}

fn bucket() -> String {
    unique_name("bucket").replace('_', "-")
}

#[tokio::test]
async fn json_lines_bad_lines_new_objects_and_restart() -> Result<()> {
    let (s3, broker) = tokio::try_join!(S3::start(), Broker::start())?;
    let b = bucket();
    s3.create_bucket(&b).await?;
    s3.put_object(
        &b,
        "in/a.jsonl",
        "{\"n\":1}\n{\"n\":2}\nnot json\n{\"n\":3}",
    )
    .await?;
    s3.put_object(&b, "other/ignored.jsonl", "{\"n\":100}\n")
        .await?;
    let creds = [
        ("s3-creds", "accessKeyId", s3.access_key()),
        ("s3-creds", "secretAccessKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest(&s3, &b, "jsonLines"), &creds).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 3, T).await?;
    assert_eq!(recs.len(), 3, "{}", conn.log_tail());
    assert_eq!(recs[0].json()?["event"], serde_json::json!({"n": 1}));
    assert_eq!(recs[0].json()?["obsrv_meta"]["source"]["connector"], "s3");
    let failed = consume_exactly(&broker, &h.failed, 1, T).await?;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].json()?["error"]["error_code"], "CE_1000");
    assert_eq!(failed[0].json()?["event"], "not json");

    s3.put_object(&b, "in/b.jsonl", "{\"n\":4}\n").await?;
    assert_eq!(
        consume_exactly(&broker, &h.ingest, 4, T).await?.len(),
        4,
        "new object picked up\n{}",
        conn.log_tail()
    );
    conn.wait_status("4 ingested", T, |s| total(s, "recordsIngested") == 4)
        .await?;
    assert!(conn.terminate().await?.success());

    s3.put_object(&b, "in/c.jsonl", "{\"n\":5}\n").await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 5, T).await?;
    assert_eq!(
        recs.len(),
        5,
        "processed objects are not read again\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), 5);
    Ok(())
}

#[tokio::test]
async fn csv_and_json_documents() -> Result<()> {
    let (s3, broker) = tokio::try_join!(S3::start(), Broker::start())?;
    let b = bucket();
    s3.create_bucket(&b).await?;
    s3.put_object(
        &b,
        "in/x.csv",
        "id,note\n1,plain\n2,\"two\nlines, and a comma\"\n3,\n",
    )
    .await?;
    let creds = [
        ("s3-creds", "accessKeyId", s3.access_key()),
        ("s3-creds", "secretAccessKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest(&s3, &b, "csv"), &creds).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 3, T).await?;
    assert_eq!(recs.len(), 3, "{}", conn.log_tail());
    assert_eq!(
        recs[1].json()?["event"],
        serde_json::json!({"id": "2", "note": "two\nlines, and a comma"})
    );
    drop(conn);

    let b2 = bucket();
    s3.create_bucket(&b2).await?;
    s3.put_object(&b2, "in/doc.json", "[{\"a\":1},{\"a\":2},7]")
        .await?;
    let h = Harness::new(&broker, &manifest(&s3, &b2, "json"), &creds).await?;
    let conn = h.start()?;
    assert_eq!(
        consume_exactly(&broker, &h.ingest, 2, T).await?.len(),
        2,
        "{}",
        conn.log_tail()
    );
    assert_eq!(consume_exactly(&broker, &h.failed, 1, T).await?.len(), 1);
    Ok(())
}

/// kill -9 while inside a large object, then restart: resumes at the saved byte offset, loses
/// nothing.
#[tokio::test]
async fn kill_9_inside_a_large_object_loses_nothing() -> Result<()> {
    let (s3, broker) = tokio::try_join!(S3::start(), Broker::start())?;
    let b = bucket();
    s3.create_bucket(&b).await?;
    let n = 60_000;
    let body: String = (0..n)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "p".repeat(40)))
        .collect();
    s3.put_object(&b, "in/big.jsonl", body).await?;
    let creds = [
        ("s3-creds", "accessKeyId", s3.access_key()),
        ("s3-creds", "secretAccessKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest(&s3, &b, "jsonLines"), &creds).await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("part of the object", T, |s| {
            total(s, "recordsIngested") >= 10_000
        })
        .await?;
    conn.kill9()?;
    assert!(
        total(&s, "recordsIngested") < n as u64,
        "killed inside the object: {s}"
    );
    let conn = h.start()?;
    conn.wait_status("caught up", Duration::from_secs(120), |s| {
        s["lagRecords"] == 0 && total(s, "recordsIngested") > 0
    })
    .await?;
    let recs = broker
        .consume_all(&h.ingest, 2 * n, Duration::from_secs(10))
        .await?;
    assert_eq!(
        ids(&recs)?.len(),
        n,
        "distinct ids ({} read)\n{}",
        recs.len(),
        conn.log_tail()
    );
    assert!(
        recs.len() < 2 * n,
        "resumed from the saved offset, not from the start"
    );
    Ok(())
}
