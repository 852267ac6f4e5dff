//! Postgres -> broker benchmark of the connector against this machine's two bounds, in one run:
//!
//! 1. `COPY (SELECT row_to_json(t) FROM bench t) TO STDOUT` out of Postgres (how fast rows can leave
//!    the database as JSON at all);
//! 2. raw produce of those same payloads to the broker with the connector's producer settings (how
//!    fast the broker takes them);
//! 3. the real `obsrv-connector` binary loading the table (schedule once) into a fresh topic.
//!
//! Prints rows/s for each, the connector's ratio to the slower bound, and its peak RSS (VmHWM).
//!
//! ```text
//! cargo build --release -p obsrv-connector --bin obsrv-connector
//! cargo run --release -p obsrv-connector --example bench -- [ROWS]      # default 1000000
//! ```
//! Uses fresh local Postgres and nisshi (or POSTGRES_URL / KAFKA_BOOTSTRAP).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use obsrv_connector::{
    config::{Secrets, SinkSettings, default_sink},
    sink::producer_config,
};
use obsrv_crds::{Compression, Delivery};
use obsrv_e2e::services::{Broker, Postgres, free_port, unique_name};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::postgres::PgPoolOptions;

fn connector_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench -> target/<profile>/obsrv-connector
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("obsrv-connector"))
        .context("locating target dir")?;
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p obsrv-connector --bin obsrv-connector` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let bin = connector_binary()?;
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    eprintln!("loading {rows} rows into Postgres ...");
    pg.psql(&format!(
        "CREATE TABLE bench (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, customer text, amount numeric(12,2), \
         status text, items int, doc jsonb); \
         INSERT INTO bench SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', 'customer-' || (g % 9973), \
         (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 17, jsonb_build_object('sku', 'sku-' || (g % 501), 'qty', g % 5) \
         FROM generate_series(1, {rows}) g; CREATE INDEX ON bench (updated_at, id); VACUUM ANALYZE bench;"
    ))
    .await?;

    // Bound 1: COPY of row_to_json out of Postgres.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url())
        .await?;
    let mut conn = pool.acquire().await?;
    let t = Instant::now();
    let mut stream = conn
        .copy_out_raw("COPY (SELECT row_to_json(t) FROM bench t) TO STDOUT")
        .await?;
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(rows);
    let mut partial = Vec::new();
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.len();
        partial.extend_from_slice(&chunk);
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).take(i).collect();
            payloads.push(line);
        }
    }
    let copy_secs = t.elapsed().as_secs_f64();
    drop(stream);
    drop(conn);
    if payloads.len() != rows {
        bail!("COPY returned {} rows, expected {rows}", payloads.len());
    }

    // Bound 2: raw produce of the same payloads with the connector's producer settings.
    let raw_topic = unique_name("bench-raw");
    let topic = unique_name("bench-ingest");
    broker.create_topic(&raw_topic, 1).await?;
    broker.create_topic(&topic, 1).await?;
    let settings = SinkSettings {
        bootstrap_servers: broker.bootstrap().to_string(),
        topic: raw_topic.clone(),
        failed_topic: "bench-failed".into(),
        state_topic: "bench-state".into(),
        max_message_bytes: 1_048_576,
        compression: Compression::Zstd,
        linger_ms: 20,
        batch_bytes: None,
        tls: None,
        sasl: None,
        delivery: Delivery::AtLeastOnce,
    };
    let producer: FutureProducer =
        producer_config(&settings, &Secrets::default(), "obsrv-bench").create()?;
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(rows);
    for (i, p) in payloads.iter().enumerate() {
        let key = i.to_string();
        let mut rec = FutureRecord::to(&raw_topic)
            .key(key.as_bytes())
            .payload(p.as_slice());
        loop {
            match producer.send_result(rec) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => bail!("produce: {e}"),
            }
        }
    }
    for d in futures::future::join_all(deliveries).await {
        if !matches!(d, Ok(Ok(_))) {
            bail!("raw produce: a delivery failed");
        }
    }
    let produce_secs = t.elapsed().as_secs_f64();
    drop(payloads);

    // The connector itself.
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("connector.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: bench, namespace: bench}}\nspec:\n  dataset: bench\n  \
             schedule: {{once: true}}\n  source:\n    postgres:\n      host: {}\n      port: {}\n      database: {}\n      \
             credentials: {{secretName: pg}}\n      tls: {{mode: disable}}\n      \
             tables: [{{name: bench, cursor: {{column: updated_at, tieBreaker: id}}}}]\n",
            pg.host(),
            pg.port(),
            pg.database()
        ),
    )?;
    let defaults = default_sink(
        Some(broker.bootstrap().into()),
        topic.clone(),
        "bench-failed".into(),
        unique_name("bench-state"),
        1_048_576,
        Compression::Zstd,
    );
    let port = free_port()?;
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .args(["run", "-f"])
        .arg(&manifest)
        .args([
            "--sink-bootstrap-servers",
            defaults.bootstrap_servers.as_deref().unwrap_or_default(),
            "--sink-topic",
            &topic,
        ])
        .args([
            "--sink-state-topic",
            defaults.state_topic.as_deref().unwrap_or_default(),
        ])
        .env("OBSRV_SOURCE_USERNAME", pg.user())
        .env("OBSRV_SOURCE_PASSWORD", pg.password())
        .env("OBSRV_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let status_url = format!("http://127.0.0.1:{port}/status");
    let (connector_secs, ingested) = loop {
        if let Some(s) = child.try_wait()? {
            bail!("connector exited early: {s}");
        }
        if let Ok(r) = reqwest::get(&status_url).await
            && let Ok(s) = r.json::<serde_json::Value>().await
        {
            let n = s["totals"]["recordsIngested"].as_u64().unwrap_or(0);
            if s["state"] == "Idle" {
                break (t.elapsed().as_secs_f64(), n);
            }
            if s["lastError"].is_object() {
                eprintln!("connector error: {}", s["lastError"]);
            }
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("connector did not finish within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    if ingested != rows as u64 {
        bail!("connector ingested {ingested} rows, expected {rows}");
    }

    let rate = |secs: f64| rows as f64 / secs;
    let (copy, produce, connector) = (rate(copy_secs), rate(produce_secs), rate(connector_secs));
    let bound = copy.min(produce);
    println!(
        "rows: {rows} ({:.1} MiB of row JSON)",
        bytes as f64 / (1 << 20) as f64
    );
    println!("bound COPY row_to_json out of Postgres: {copy:>10.0} rows/s ({copy_secs:.2}s)");
    println!("bound raw produce to the broker:        {produce:>10.0} rows/s ({produce_secs:.2}s)");
    println!(
        "obsrv-connector Postgres -> broker:     {connector:>10.0} rows/s ({connector_secs:.2}s, incl. start-up)"
    );
    println!(
        "ratio to the slower bound: {:.2} (target >= 0.7)",
        connector / bound
    );
    println!(
        "connector peak RSS: {:.1} MiB (target < 64 MiB)",
        rss_kib as f64 / 1024.0
    );
    Ok(())
}
