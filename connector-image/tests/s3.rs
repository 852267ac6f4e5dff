//! The S3 source end to end against a real S3 API (s3s-fs): JSON lines, CSV, JSON documents, new
//! objects, restart from state, kill -9 inside a large object.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Harness, consume_exactly, ids, kill_9_mid_load_then_restart, total};
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
    let recs = kill_9_mid_load_then_restart(&broker, &h, n, 10_000).await?;
    assert!(
        recs.len() < 2 * n,
        "resumed from the saved offset, not from the start"
    );
    Ok(())
}

/// A Parquet file of `n` rows in row groups of `group` rows (snappy), with nullable columns,
/// a millisecond timestamp, a decimal, a double, a boolean, raw bytes, a list of strings and a
/// struct.
fn parquet_file(n: usize, group: usize) -> Result<Vec<u8>> {
    use parquet::{
        basic::Compression,
        data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type},
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::parser::parse_message_type,
    };
    use std::sync::Arc;
    let schema = Arc::new(parse_message_type(
        "message m {
            required int64 id;
            optional binary name (STRING);
            required int64 ts (TIMESTAMP(MILLIS,true));
            required int64 amount (DECIMAL(18,2));
            optional double score;
            required boolean flag;
            optional binary raw;
            optional group tags (LIST) {
                repeated group list {
                    optional binary element (STRING);
                }
            }
            optional group point {
                required int32 x;
                optional binary label (STRING);
            }
        }",
    )?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(Vec::new(), schema, props)?;
    for start in (0..n).step_by(group) {
        let rows: Vec<usize> = (start..(start + group).min(n)).collect();
        let mut rg = w.next_row_group()?;
        let mut col = 0;
        while let Some(mut c) = rg.next_column()? {
            let def = |null: fn(usize) -> bool| -> Vec<i16> {
                rows.iter().map(|&i| i16::from(!null(i))).collect()
            };
            match col {
                0 => {
                    let v: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                1 => {
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !name_is_null(i))
                        .map(|&i| ByteArray::from(format!("name-{i}").as_str()))
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def(name_is_null)), None)?;
                }
                2 => {
                    let v: Vec<i64> = rows.iter().map(|&i| ts_ms(i)).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                3 => {
                    let v: Vec<i64> = rows.iter().map(|&i| i as i64 * 100 + 5).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                4 => {
                    let v: Vec<f64> = rows
                        .iter()
                        .filter(|&&i| !score_is_null(i))
                        .map(|&i| i as f64 * 0.5)
                        .collect();
                    c.typed::<DoubleType>()
                        .write_batch(&v, Some(&def(score_is_null)), None)?;
                }
                5 => {
                    let v: Vec<bool> = rows.iter().map(|&i| i.is_multiple_of(2)).collect();
                    c.typed::<BoolType>().write_batch(&v, None, None)?;
                }
                6 => {
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !raw_is_null(i))
                        .map(|&i| ByteArray::from(vec![(i & 0xff) as u8, (i >> 8) as u8, 0xff]))
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def(raw_is_null)), None)?;
                }
                7 => {
                    // tags: null list, or [t<i>, null] (levels: 0 = list null, 3 = element set).
                    let (mut v, mut d, mut r) = (Vec::new(), Vec::new(), Vec::new());
                    for &i in &rows {
                        if tags_is_null(i) {
                            d.push(0);
                            r.push(0);
                        } else {
                            v.push(ByteArray::from(format!("t{i}").as_str()));
                            d.extend([3, 2]);
                            r.extend([0, 1]);
                        }
                    }
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&d), Some(&r))?;
                }
                8 => {
                    // point.x: def 1 when the point is there.
                    let v: Vec<i32> = rows
                        .iter()
                        .filter(|&&i| !point_is_null(i))
                        .map(|&i| i as i32)
                        .collect();
                    c.typed::<Int32Type>()
                        .write_batch(&v, Some(&def(point_is_null)), None)?;
                }
                _ => {
                    // point.label: def 0 = no point, 1 = point without label, 2 = label set.
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !point_is_null(i) && i.is_multiple_of(2))
                        .map(|&i| ByteArray::from(format!("p{i}").as_str()))
                        .collect();
                    let d: Vec<i16> = rows
                        .iter()
                        .map(|&i| match (point_is_null(i), i.is_multiple_of(2)) {
                            (true, _) => 0,
                            (false, false) => 1,
                            (false, true) => 2,
                        })
                        .collect();
                    c.typed::<ByteArrayType>().write_batch(&v, Some(&d), None)?;
                }
            }
            c.close()?;
            col += 1;
        }
        rg.close()?;
    }
    Ok(w.into_inner()?)
}

fn name_is_null(i: usize) -> bool {
    i.is_multiple_of(7)
}
fn score_is_null(i: usize) -> bool {
    i.is_multiple_of(5)
}
fn raw_is_null(i: usize) -> bool {
    i.is_multiple_of(3)
}
fn tags_is_null(i: usize) -> bool {
    i.is_multiple_of(4)
}
fn point_is_null(i: usize) -> bool {
    i % 6 == 5
}
fn ts_ms(i: usize) -> i64 {
    1_700_000_000_000 + i as i64 * 1_001
}

/// The event the connector must produce for row `i` of [`parquet_file`].
fn parquet_row(i: usize) -> serde_json::Value {
    use base64::Engine;
    let ts = chrono::DateTime::from_timestamp_millis(ts_ms(i))
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "id": i,
        "name": (!name_is_null(i)).then(|| format!("name-{i}")),
        "ts": ts,
        "amount": format!("{}.05", i),
        "score": (!score_is_null(i)).then_some(i as f64 * 0.5),
        "flag": i.is_multiple_of(2),
        "raw": (!raw_is_null(i)).then(|| base64::engine::general_purpose::STANDARD
            .encode([(i & 0xff) as u8, (i >> 8) as u8, 0xff])),
        "tags": (!tags_is_null(i)).then(|| serde_json::json!([format!("t{i}"), null])),
        "point": (!point_is_null(i)).then(|| serde_json::json!({
            "x": i,
            "label": i.is_multiple_of(2).then(|| format!("p{i}")),
        })),
    })
}

/// Parquet rows arrive once each with typed values; a corrupt `.parquet` object goes to the failed
/// topic and the next object is still read.
#[tokio::test]
async fn parquet_rows_typed_and_corrupt_objects_fail() -> Result<()> {
    let (s3, broker) = tokio::try_join!(S3::start(), Broker::start())?;
    let b = bucket();
    s3.create_bucket(&b).await?;
    let n = 3_500;
    s3.put_object(&b, "in/a-corrupt.parquet", "PAR1 this is not parquet")
        .await?;
    s3.put_object(&b, "in/b-rows.parquet", parquet_file(n, 1_000)?)
        .await?;
    let creds = [
        ("s3-creds", "accessKeyId", s3.access_key()),
        ("s3-creds", "secretAccessKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest(&s3, &b, "parquet"), &creds).await?;
    let conn = h.start()?;
    let failed = consume_exactly(&broker, &h.failed, 1, T).await?;
    assert_eq!(failed.len(), 1, "{}", conn.log_tail());
    let f = failed[0].json()?;
    assert_eq!(f["error"]["error_code"], "CE_1000");
    assert!(
        f["error"]["error_msg"]
            .as_str()
            .is_some_and(|m| m.contains("not a readable Parquet file")),
        "{f}"
    );
    assert_eq!(f["event"], format!("s3://{b}/in/a-corrupt.parquet"));

    let recs = consume_exactly(&broker, &h.ingest, n, T).await?;
    assert_eq!(recs.len(), n, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), n, "one id per row");
    let mut seen = vec![false; n];
    for r in &recs {
        let v = r.json()?;
        let i = v["event"]["id"].as_u64().expect("id") as usize;
        assert!(!seen[i], "row {i} twice");
        seen[i] = true;
        assert_eq!(v["event"], parquet_row(i), "row {i}");
    }
    assert_eq!(recs[0].json()?["obsrv_meta"]["source"]["connector"], "s3");
    conn.wait_status("all rows ingested", T, |s| {
        total(s, "recordsIngested") == n as u64
    })
    .await?;
    assert!(conn.terminate().await?.success());
    Ok(())
}

/// kill -9 inside a Parquet object, then restart: resumes at the saved row index, loses nothing.
#[tokio::test]
async fn parquet_kill_9_mid_object_resumes_at_the_row() -> Result<()> {
    let (s3, broker) = tokio::try_join!(S3::start(), Broker::start())?;
    let b = bucket();
    s3.create_bucket(&b).await?;
    let n = 40_000;
    s3.put_object(&b, "in/big.parquet", parquet_file(n, 3_000)?)
        .await?;
    let creds = [
        ("s3-creds", "accessKeyId", s3.access_key()),
        ("s3-creds", "secretAccessKey", s3.secret_key()),
    ];
    let h = Harness::new(&broker, &manifest(&s3, &b, "parquet"), &creds).await?;
    let recs = kill_9_mid_load_then_restart(&broker, &h, n, 10_000).await?;
    assert!(
        recs.len() < 2 * n,
        "resumed from the saved row, not from the start"
    );
    let distinct_rows: std::collections::BTreeSet<u64> = recs
        .iter()
        .map(|r| {
            r.json()
                .map(|v| v["event"]["id"].as_u64().unwrap_or(u64::MAX))
        })
        .collect::<Result<_>>()?;
    assert_eq!(distinct_rows.len(), n);
    assert_eq!(distinct_rows.last(), Some(&(n as u64 - 1)));
    Ok(())
}
