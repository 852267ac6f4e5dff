//! The file sources' test matrix: every scenario runs against S3 (s3s-fs, addressed the MinIO way),
//! Azure Blob (Azurite) and GCS (fake-gcs-server), through the real `obsrv-connector` binary and a
//! real broker. Written once over [`stores::Store`]; the `matrix!` macro makes one test per store
//! and scenario.

mod common;
#[path = "files/parquet.rs"]
mod parquet;
#[path = "files/stores.rs"]
mod stores;

use std::{collections::BTreeMap, io::Write, time::Duration};

use anyhow::{Context as _, Result};
use common::{Harness, consume_exactly, ids, kill_9_mid_load_then_restart, total};
use obsrv_e2e::services::{Broker, ConsumedRecord};
use serde_json::{Value, json};
use stores::{Kind, Store, manifest};

const T: Duration = Duration::from_secs(90);

async fn harness(broker: &Broker, store: &Store, source: Value) -> Result<Harness> {
    let secrets = store.secrets();
    let secrets: Vec<(&str, &str, &str)> = secrets
        .iter()
        .map(|(s, k, v)| (*s, *k, v.as_str()))
        .collect();
    Harness::new(broker, &manifest(source, json!({})), &secrets).await
}

/// The events delivered more than once.
fn twice(recs: &[ConsumedRecord]) -> Result<Vec<Value>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for r in recs {
        if !seen.insert(r.key.clone()) {
            out.push(r.json()?["event"].clone());
        }
    }
    Ok(out)
}

fn events(recs: &[ConsumedRecord]) -> Result<Vec<Value>> {
    recs.iter()
        .map(|r| Ok(r.json()?["event"].clone()))
        .collect()
}

#[derive(Clone, Copy)]
enum Codec {
    None,
    Gzip,
    Zstd,
    Snappy,
}

const CODECS: [Codec; 4] = [Codec::None, Codec::Gzip, Codec::Zstd, Codec::Snappy];

impl Codec {
    fn ext(self) -> &'static str {
        match self {
            Codec::None => "",
            Codec::Gzip => ".gz",
            Codec::Zstd => ".zst",
            Codec::Snappy => ".sz",
        }
    }

    fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => data.to_vec(),
            Codec::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).expect("in memory");
                e.finish().expect("in memory")
            }
            Codec::Zstd => zstd::encode_all(data, 1).expect("in memory"),
            Codec::Snappy => {
                let mut e = snap::write::FrameEncoder::new(Vec::new());
                e.write_all(data).expect("in memory");
                e.into_inner().expect("in memory")
            }
        }
    }
}

/// Every format in every compression (named by extension, and one gzip object told by content
/// only) arrives once per record, typed as its format says.
async fn every_format_in_every_compression(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    let jsonl: String = (0..20).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let csv: String = std::iter::once("i,note\n".to_string())
        .chain((0..20).map(|i| format!("{i},\"note {i}, with a comma\"\n")))
        .collect();
    let doc = serde_json::to_string(&(0..20).map(|i| json!({"i": i})).collect::<Vec<_>>())?;
    let pq = parquet::parquet_file(20, 7)?;
    let formats: [(&str, &str, Vec<u8>); 4] = [
        ("jsonLines", "jsonl", jsonl.into_bytes()),
        ("csv", "csv", csv.into_bytes()),
        ("json", "json", doc.into_bytes()),
        ("parquet", "parquet", pq),
    ];
    let mut runs = Vec::new();
    for (format, ext, body) in &formats {
        for c in CODECS {
            store
                .put(
                    &b,
                    &format!("{format}/data.{ext}{}", c.ext()),
                    c.compress(body),
                )
                .await?;
        }
        // gzip without the extension: told by its first bytes.
        store
            .put(&b, &format!("{format}/sniffed"), Codec::Gzip.compress(body))
            .await?;
        let h = harness(
            broker,
            store,
            store.source(
                &b,
                json!({"format": format, "prefix": format!("{format}/")}),
            ),
        )
        .await?;
        let conn = h.start()?;
        runs.push((format, h, conn));
    }
    for (format, h, conn) in &runs {
        let recs = consume_exactly(broker, &h.ingest, 100, T).await?;
        assert_eq!(
            recs.len(),
            100,
            "{format}: 5 objects x 20 records\n{}",
            conn.log_tail()
        );
        assert_eq!(ids(&recs)?.len(), 100, "{format}: one id per record");
        let mut per_i: BTreeMap<i64, usize> = BTreeMap::new();
        for e in events(&recs)? {
            let i = match &e["i"] {
                Value::String(s) => s.parse()?,
                v => v.as_i64().or_else(|| e["id"].as_i64()).context("i")?,
            };
            *per_i.entry(i).or_default() += 1;
            match **format {
                "csv" => assert_eq!(e["note"], format!("note {i}, with a comma")),
                "parquet" => assert_eq!(e, parquet::parquet_row(i as usize)),
                _ => assert_eq!(e, json!({"i": i})),
            }
        }
        assert!(per_i.values().all(|&n| n == 5), "{format}: {per_i:?}");
        let first = recs[0].json()?;
        assert_eq!(first["obsrv_meta"]["source"]["connector"], store.kind());
        assert!(
            consume_exactly(broker, &h.failed, 0, Duration::from_secs(1))
                .await?
                .is_empty()
        );
    }
    Ok(())
}

/// Only keys under the prefix that match the glob and were modified at or after `modifiedAfter`.
async fn prefix_glob_and_start_point_select_objects(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    store
        .put(&b, "in/2026/old.jsonl", "{\"n\":\"old\"}\n")
        .await?;
    // Stores keep modification times in whole seconds: the start point falls on a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for (key, n) in [
        ("in/2026/a.jsonl", "a"),
        ("in/2026/deeper/b.jsonl", "b"),
        ("in/2026/c.csv", "not-glob"),
        ("in/2025/d.jsonl", "not-prefix"),
        ("elsewhere/e.jsonl", "not-prefix"),
    ] {
        store.put(&b, key, format!("{{\"n\":\"{n}\"}}\n")).await?;
    }
    let h = harness(
        broker,
        store,
        store.source(
            &b,
            json!({"format": "jsonLines", "prefix": "in/2026", "glob": "**/*.jsonl", "modifiedAfter": start}),
        ),
    )
    .await?;
    let conn = h.start()?;
    let recs = consume_exactly(broker, &h.ingest, 2, T).await?;
    let mut got: Vec<String> = events(&recs)?
        .iter()
        .map(|e| e["n"].as_str().unwrap_or("").to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["a", "b"], "{}", conn.log_tail());
    Ok(())
}

/// Records flow, a bad line goes to the failed topic naming file and line, new objects are picked
/// up, and a restart reads neither old objects nor lost ones.
async fn restart_resumes_after_what_was_read(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    store
        .put(
            &b,
            "in/a.jsonl",
            "{\"n\":1}\n{\"n\":2}\nnot json\n{\"n\":3}",
        )
        .await?;
    let h = harness(
        broker,
        store,
        store.source(&b, json!({"format": "jsonLines", "prefix": "in/"})),
    )
    .await?;
    let conn = h.start()?;
    let recs = consume_exactly(broker, &h.ingest, 3, T).await?;
    assert_eq!(recs.len(), 3, "{}", conn.log_tail());
    assert_eq!(recs[0].json()?["event"], json!({"n": 1}));
    let failed = consume_exactly(broker, &h.failed, 1, T).await?;
    assert_eq!(failed.len(), 1);
    let f = failed[0].json()?;
    assert_eq!(f["error"]["error_code"], "CE_1000");
    assert_eq!(f["event"], "not json");
    let msg = f["error"]["error_msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!("{} line 3:", store.url(&b, "in/a.jsonl"))),
        "{msg}"
    );

    store.put(&b, "in/b.jsonl", "{\"n\":4}\n").await?;
    assert_eq!(
        consume_exactly(broker, &h.ingest, 4, T).await?.len(),
        4,
        "new object\n{}",
        conn.log_tail()
    );
    conn.wait_status("4 ingested", T, |s| total(s, "recordsIngested") == 4)
        .await?;
    assert!(conn.terminate().await?.success());

    store.put(&b, "in/c.jsonl", "{\"n\":5}\n").await?;
    let conn = h.start()?;
    let recs = consume_exactly(broker, &h.ingest, 5, T).await?;
    assert_eq!(
        recs.len(),
        5,
        "read objects are not read again\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), 5);
    Ok(())
}

/// kill -9 inside a large object, plain and gzip-compressed: the restart resumes at the saved
/// offset (the compressed one by decompressing up to it) and loses nothing.
async fn kill_9_inside_a_large_object_loses_nothing(store: &Store, broker: &Broker) -> Result<()> {
    let n = 60_000;
    for codec in [Codec::None, Codec::Gzip] {
        let b = store.bucket().await?;
        let body: String = (0..n)
            .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "p".repeat(40)))
            .collect();
        store
            .put(
                &b,
                &format!("in/big.jsonl{}", codec.ext()),
                codec.compress(body.as_bytes()),
            )
            .await?;
        let h = harness(
            broker,
            store,
            store.source(&b, json!({"format": "jsonLines", "prefix": "in/"})),
        )
        .await?;
        let recs = kill_9_mid_load_then_restart(broker, &h, n, 10_000).await?;
        assert!(
            recs.len() < 2 * n,
            "resumed from the saved offset, not from the start"
        );
    }
    Ok(())
}

/// Two replicas share a bucket: every object is read by exactly one of them (across the rebalance
/// when the second joins), and both do work; after one is killed with kill -9 the other takes its shards over and nothing is lost.
async fn two_replicas_read_every_object_exactly_once(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    let lines = 50;
    let put_wave = |wave: usize, objects: usize, pad: usize| {
        let b = b.clone();
        async move {
            for o in 0..objects {
                let body: String = (0..lines)
                    .map(|l| {
                        format!(
                            "{{\"w\":{wave},\"o\":{o},\"l\":{l},\"pad\":\"{}\"}}\n",
                            "x".repeat(pad)
                        )
                    })
                    .collect();
                store
                    .put(&b, &format!("in/w{wave}/{o:03}.jsonl"), body)
                    .await?;
            }
            anyhow::Ok(objects * lines)
        }
    };
    let mut expected = put_wave(1, 20, 10).await?;
    let h = harness(
        broker,
        store,
        store.source(&b, json!({"format": "jsonLines", "prefix": "in/"})),
    )
    .await?;
    let a = h.start()?;
    a.wait_status("wave 1 read by the first replica", T, |s| {
        total(s, "recordsIngested") == expected as u64
    })
    .await?;
    let second = h.start()?;
    // The second replica has joined once it went through a read with its shards (lag 0), and the
    // first has its shards back once it reads again.
    second
        .wait_status("second replica in the group", T, |s| s["lagRecords"] == 0)
        .await?;
    expected += put_wave(2, 40, 10).await?;
    let recs = consume_exactly(broker, &h.ingest, expected, T).await?;
    assert_eq!(recs.len(), expected, "read twice: {:?}", twice(&recs)?);
    assert_eq!(
        recs.len(),
        expected,
        "every record exactly once across the rebalance\n{}\n{}",
        a.log_tail(),
        second.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), expected);
    let (sa, sb) = (a.status().await?, second.status().await?);
    let (na, nb) = (total(&sa, "recordsIngested"), total(&sb, "recordsIngested"));
    assert!(
        nb > 0 && na > 1000,
        "both replicas read wave 2: {na} and {nb}"
    );
    assert_eq!(na + nb, expected as u64);

    // Larger objects; the second replica dies with kill -9 in the middle of them.
    expected += put_wave(3, 16, 400).await?;
    second
        .wait_status("the second replica reading wave 3", T, |s| {
            total(s, "recordsIngested") > nb + 100
        })
        .await?;
    second.kill9()?;
    let distinct = distinct_ids(broker, &h.ingest, expected, T).await?;
    assert_eq!(
        distinct,
        expected,
        "nothing lost after kill -9 of a replica\n{}",
        a.log_tail()
    );
    Ok(())
}

/// Reads `topic` until `n` distinct event ids arrived (or `timeout`); how many did.
async fn distinct_ids(broker: &Broker, topic: &str, n: usize, timeout: Duration) -> Result<usize> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let recs = broker
            .consume_to_end(topic, Duration::from_secs(30))
            .await?;
        let got = ids(&recs)?.len();
        if got >= n || std::time::Instant::now() > deadline {
            return Ok(got);
        }
    }
}

/// Lag counts objects not yet fully read, their bytes, and the age of the oldest.
async fn lag_counts_objects_and_bytes_pending(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    // Big enough to take over a second to read (the status is looked at every 100 ms).
    let big: String = (0..500_000)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "p".repeat(30)))
        .collect();
    store.put(&b, "in/a-big.jsonl", big.clone()).await?;
    store.put(&b, "in/b.jsonl", "{\"i\":-1}\n").await?;
    store.put(&b, "in/c.jsonl", "{\"i\":-2}\n").await?;
    let h = harness(
        broker,
        store,
        store.source(&b, json!({"format": "jsonLines", "prefix": "in/"})),
    )
    .await?;
    let conn = h.start()?;
    // Measured after the first batch: the big object being read and the two behind it.
    let s = conn
        .wait_status("lag while the big object is read", T, |s| {
            s["lagRecords"] == 3
        })
        .await?;
    let bytes = s["lagBytes"].as_i64().unwrap_or(0);
    assert!(bytes > 20 && bytes < big.len() as i64 + 20, "{s}");
    assert!(s["lagSeconds"].as_f64().is_some_and(|x| x >= 0.0), "{s}");
    conn.wait_status("caught up", T, |s| {
        s["lagRecords"] == 0 && s["lagBytes"] == 0
    })
    .await?;
    Ok(())
}

/// A malformed line names its file and line; a truncated gzip object yields its records up to the
/// damage and one failed record; a corrupt Parquet object one failed record; reading goes on.
async fn malformed_and_corrupt_inputs_are_reported(store: &Store, broker: &Broker) -> Result<()> {
    let b = store.bucket().await?;
    let good: String = (0..30_000).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    let gz = Codec::Gzip.compress(good.as_bytes());
    store
        .put(
            &b,
            "lines/a-truncated.jsonl.gz",
            gz[..gz.len() / 2].to_vec(),
        )
        .await?;
    store
        .put(&b, "lines/b-csv-ish.jsonl", "{\"ok\":1}\n[1,2]\n")
        .await?;
    store.put(&b, "lines/c-fine.jsonl", "{\"ok\":2}\n").await?;
    store
        .put(&b, "pq/a-corrupt.parquet", "PAR1 this is not parquet")
        .await?;
    store
        .put(&b, "pq/b-rows.parquet", parquet::parquet_file(10, 4)?)
        .await?;
    let lines = harness(
        broker,
        store,
        store.source(&b, json!({"format": "jsonLines", "prefix": "lines/"})),
    )
    .await?;
    let pq = harness(
        broker,
        store,
        store.source(&b, json!({"format": "parquet", "prefix": "pq/"})),
    )
    .await?;
    let (cl, cp) = (lines.start()?, pq.start()?);

    let failed = consume_exactly(broker, &lines.failed, 2, T).await?;
    assert_eq!(failed.len(), 2, "{}", cl.log_tail());
    let docs: Vec<Value> = failed.iter().map(|r| r.json()).collect::<Result<_>>()?;
    let truncated = docs
        .iter()
        .find(|d| d["event"] == store.url(&b, "lines/a-truncated.jsonl.gz"))
        .with_context(|| format!("a failed record for the truncated object: {docs:?}"))?;
    let why = truncated["error"]["error_msg"].as_str().unwrap_or_default();
    assert!(why.contains("cannot be decoded past line"), "{why}");
    let array = docs
        .iter()
        .find(|d| d["event"] == "[1,2]")
        .context("the array line")?;
    assert!(
        array["error"]["error_msg"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!(
                "{} line 2:",
                store.url(&b, "lines/b-csv-ish.jsonl")
            ))),
        "{array}"
    );
    let ok = broker
        .consume_all(&lines.ingest, 40_000, Duration::from_secs(10))
        .await?;
    let n = ok.len();
    assert!(
        n > 2 && n < 30_002,
        "records before the damage, and the next objects: {n}"
    );
    let tail: Vec<Value> = events(&ok[n - 2..])?;
    assert_eq!(
        tail,
        [json!({"ok": 1}), json!({"ok": 2})],
        "the objects after it are read"
    );
    cl.wait_status("reported once, then idle", T, |s| {
        s["lagRecords"] == 0 && total(s, "recordsFailed") == 2
    })
    .await?;

    let f = consume_exactly(broker, &pq.failed, 1, T).await?;
    assert_eq!(f.len(), 1, "{}", cp.log_tail());
    let f = f[0].json()?;
    assert_eq!(f["event"], store.url(&b, "pq/a-corrupt.parquet"));
    assert!(
        f["error"]["error_msg"]
            .as_str()
            .is_some_and(|m| m.contains("not a readable Parquet file")),
        "{f}"
    );
    assert_eq!(
        consume_exactly(broker, &pq.ingest, 10, T).await?.len(),
        10,
        "{}",
        cp.log_tail()
    );
    Ok(())
}

/// Azure users sign in with a shared key, a connection string (naming account and endpoint) or a
/// SAS token; a wrong key is `AuthFailed`, and no secret value reaches the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_signs_in_the_ways_azure_users_hold_credentials() -> Result<()> {
    use obsrv_e2e::services::azurite::Azurite;
    let (az, broker) = tokio::try_join!(Azurite::start(), Broker::start())?;
    let c = "signin";
    az.create_container(c).await?;
    az.put_blob(c, "a.jsonl", "{\"n\":1}\n").await?;
    let sas = az.sas_token("rl")?;
    let wrong = "d3Jvbmcta2V5LW9mLXRoZS1yaWdodC1sZW5ndGgtZm9yLWF6dXJl";
    let cases = [
        ("sharedKey", "accountKey", az.key().to_string(), true),
        (
            "connectionString",
            "connectionString",
            az.connection_string(),
            false,
        ),
        ("sasToken", "sasToken", format!("?{sas}"), true),
        ("sharedKey", "accountKey", wrong.to_string(), true),
    ];
    for (i, (auth, key, value, names_account)) in cases.iter().enumerate() {
        let mut spec = json!({
            "container": c, "format": "jsonLines", "pollInterval": "200ms",
            "credentials": {"secretName": "az", "auth": auth},
        });
        if *names_account {
            spec["account"] = az.account().into();
            spec["endpoint"] = az.endpoint().into();
        }
        let m = manifest(json!({"azureBlob": spec}), json!({}));
        let h = Harness::new(&broker, &m, &[("az", key, value)]).await?;
        if i < 3 {
            common::check_passes_and_loads(&broker, &h, 1).await?;
        } else {
            let out = common::check_fails(&h)?;
            assert!(out.contains("source: AuthFailed"), "{out}");
            assert!(!out.contains(wrong), "no secret value in the output: {out}");
        }
    }
    Ok(())
}

/// A GCS Secret that is not a service-account key is a `Config` error naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gcs_secret_that_is_no_service_account_key_is_a_config_error() -> Result<()> {
    use obsrv_e2e::services::gcs::Gcs;
    let (gcs, broker) = tokio::try_join!(Gcs::start(), Broker::start())?;
    gcs.create_bucket("sa-check").await?;
    let source = json!({"gcs": {"bucket": "sa-check", "endpoint": gcs.endpoint(), "format": "json",
        "credentials": {"secretName": "sa"}}});
    let h = Harness::new(
        &broker,
        &manifest(source, json!({})),
        &[("sa", "serviceAccount.json", "hunter2")],
    )
    .await?;
    let out = common::check_fails(&h)?;
    assert!(
        out.contains("source: ConfigError") || out.contains("source: Config"),
        "{out}"
    );
    assert!(
        out.contains("service-account JSON") && !out.contains("hunter2"),
        "{out}"
    );
    Ok(())
}

/// `delivery: exactlyOnce`: each batch's records and its shards' states commit in one
/// transaction; a restart resumes after the last one and delivers nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_shard_states_with_the_records() -> Result<()> {
    let (store, broker) = tokio::try_join!(Store::start(Kind::S3), Broker::start())?;
    let b = store.bucket().await?;
    for o in 0..6 {
        let body: String = (0..100)
            .map(|l| format!("{{\"o\":{o},\"l\":{l}}}\n"))
            .collect();
        store.put(&b, &format!("in/{o}.jsonl"), body).await?;
    }
    let source = store.source(&b, json!({"format": "jsonLines", "prefix": "in/"}));
    let secrets = store.secrets();
    let secrets: Vec<(&str, &str, &str)> = secrets
        .iter()
        .map(|(s, k, v)| (*s, *k, v.as_str()))
        .collect();
    let m = manifest(source, json!({"delivery": "exactlyOnce"}));
    let h = Harness::new(&broker, &m, &secrets).await?;
    let conn = h.start()?;
    assert_eq!(
        consume_exactly(&broker, &h.ingest, 600, T).await?.len(),
        600,
        "{}",
        conn.log_tail()
    );
    conn.wait_status("600 ingested", T, |s| total(s, "recordsIngested") == 600)
        .await?;
    assert!(conn.terminate().await?.success());
    store.put(&b, "in/9.jsonl", "{\"o\":9}\n").await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 601, T).await?;
    assert_eq!(
        recs.len(),
        601,
        "only the new object after the restart\n{}",
        conn.log_tail()
    );
    assert_eq!(ids(&recs)?.len(), 601);
    Ok(())
}

/// Starts the store and a broker, and runs `scenario` against them.
async fn run(kind: Kind, scenario: impl AsyncFnOnce(&Store, &Broker) -> Result<()>) -> Result<()> {
    let (store, broker) = tokio::try_join!(Store::start(kind), Broker::start())?;
    scenario(&store, &broker).await
}

/// One test per scenario for one store.
macro_rules! scenarios {
    ($kind:expr, ($($scenario:ident),* $(,)?)) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() -> Result<()> {
                run($kind, super::$scenario).await
            }
        )*
    };
}

/// A module per store, each with every scenario.
macro_rules! matrix {
    ($($store:ident: $kind:expr),* ; $scenarios:tt) => {
        $(
            mod $store {
                use super::*;
                scenarios!($kind, $scenarios);
            }
        )*
    };
}

matrix!(
    s3: Kind::S3, azure_blob: Kind::Azure, gcs: Kind::Gcs;
    (
        every_format_in_every_compression,
        prefix_glob_and_start_point_select_objects,
        restart_resumes_after_what_was_read,
        kill_9_inside_a_large_object_loses_nothing,
        two_replicas_read_every_object_exactly_once,
        malformed_and_corrupt_inputs_are_reported,
        lag_counts_objects_and_bytes_pending,
    )
);
