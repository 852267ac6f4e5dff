//! File sources: rows/s for one large JSON-lines object, against a bound measured in the same run.
//!
//! ```sh
//! cargo bench -p obsrv-connector --bench files -- [--source s3|azure-blob|gcs] [--mib 1024]
//! ```
//!
//! 1. Bound: a plain GET of the object's bytes through the same `object_store` client, split into
//!    lines (no parsing, nothing sent anywhere): how fast the store hands the rows out at all.
//! 2. For context, a second bound: produce of the connector's own records for those lines, with
//!    nothing read (each line in Obsrv's envelope, a 32-character id as key and `obsrv-event-id`
//!    header; the connector's producer settings, `linger.ms` 20, zstd level 1, idempotent): how
//!    fast the producer and the broker take them on this machine, the data contract's cost alone.
//! 3. The `obsrv-connector` binary reading the object into the broker (`schedule: once`), timed from
//!    its first delivered record to its last (the consumer-group join at start is reported apart).
//!
//! It prints rows/s for each, the connector's ratio to the GET bound (target >= 0.7) and to the
//! same records' produce, and the connector's peak resident memory (VmHWM, target < 128 MiB). The store and a
//! `nisshi` broker are started through the e2e test support (`scripts/setup.sh` installs them).

use std::{
    io::Write as _,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path};
use obsrv_connector::{envelope::Context, sink::Acks};
use obsrv_e2e::services::{Broker, S3, azurite::Azurite, free_port, gcs::Gcs, unique_name};

/// The connector bench's broker side: the sink's settings and producer, topics, the record a
/// connector writes. (`tests/bench.rs` loads both benches, so it sees this file twice.)
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "connector/broker.rs"]
mod broker;

/// One line of the benchmark's object: realistic web events of ~150 bytes.
fn line(i: u64, out: &mut Vec<u8>) {
    let _ = writeln!(
        out,
        "{{\"id\":{i},\"ts\":\"2026-11-03T10:{:02}:{:02}.{:03}Z\",\"user\":\"user-{}\",\"event\":\"page_view\",\"amount\":{}.{:02},\"tags\":[\"web\",\"eu\"],\"path\":\"/products/{}\"}}",
        (i / 60_000) % 60,
        (i / 1000) % 60,
        i % 1000,
        i % 100_000,
        i % 500,
        i % 100,
        i % 10_000
    );
}

/// The store under benchmark: where the object lives and how the connector reads it.
enum Store {
    S3(S3),
    Azure(Azurite),
    Gcs(Gcs, String),
}

impl Store {
    async fn start(kind: &str) -> Result<Store> {
        Ok(match kind {
            "s3" => Store::S3(S3::start().await?),
            "azure-blob" => Store::Azure(Azurite::start().await?),
            "gcs" => {
                let g = Gcs::start().await?;
                let key = g.service_account_json()?;
                Store::Gcs(g, key)
            }
            other => bail!("--source {other}: s3, azure-blob or gcs"),
        })
    }

    async fn upload(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
        match self {
            Store::S3(s) => {
                s.create_bucket(bucket).await?;
                s.put_object(bucket, key, body).await
            }
            Store::Azure(a) => {
                a.create_container(bucket).await?;
                a.put_blob(bucket, key, body).await
            }
            Store::Gcs(g, _) => {
                g.create_bucket(bucket).await?;
                g.put_object(bucket, key, body).await
            }
        }
    }

    /// The client the GET bound uses: the same `object_store` client kind the connector builds.
    fn client(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        Ok(match self {
            Store::S3(s) => Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(s.endpoint())
                    .with_allow_http(true)
                    .with_region(s.region())
                    .with_bucket_name(bucket)
                    .with_access_key_id(s.access_key())
                    .with_secret_access_key(s.secret_key())
                    .build()?,
            ),
            Store::Azure(a) => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(a.account())
                    .with_access_key(a.key())
                    .with_endpoint(a.endpoint().to_string())
                    .with_allow_http(true)
                    .with_container_name(bucket)
                    .build()?,
            ),
            Store::Gcs(g, key) => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_base_url(g.endpoint())
                    .with_service_account_key(key)
                    .with_bucket_name(bucket)
                    .build()?,
            ),
        })
    }

    /// `spec.source` and the env carrying its Secret values.
    fn source(&self, bucket: &str) -> (serde_json::Value, Vec<(&'static str, String)>) {
        let objects = serde_json::json!({"format": "jsonLines", "pollInterval": "1s"});
        let (mut spec, kind, env) = match self {
            Store::S3(s) => (
                serde_json::json!({"endpoint": s.endpoint(), "region": s.region(), "bucket": bucket,
                    "forcePathStyle": true, "credentials": {"secretName": "bench"}}),
                "s3",
                vec![
                    ("OBSRV_SOURCE_ACCESS_KEY_ID", s.access_key().to_string()),
                    ("OBSRV_SOURCE_SECRET_ACCESS_KEY", s.secret_key().to_string()),
                ],
            ),
            Store::Azure(a) => (
                serde_json::json!({"account": a.account(), "container": bucket, "endpoint": a.endpoint(),
                    "credentials": {"secretName": "bench"}}),
                "azureBlob",
                vec![("OBSRV_SOURCE_ACCOUNT_KEY", a.key().to_string())],
            ),
            Store::Gcs(g, key) => (
                serde_json::json!({"bucket": bucket, "endpoint": g.endpoint(),
                    "credentials": {"secretName": "bench"}}),
                "gcs",
                vec![("OBSRV_SOURCE_SERVICE_ACCOUNT", key.clone())],
            ),
        };
        for (k, v) in objects.as_object().expect("an object") {
            spec[k] = v.clone();
        }
        (serde_json::json!({ kind: spec }), env)
    }
}

/// Bound 1: GET the object and split it into lines; (non-empty lines, seconds).
async fn get_and_split(store: &dyn ObjectStore, key: &str) -> Result<(u64, f64)> {
    let t = Instant::now();
    let mut stream = store.get(&Path::from(key)).await?.into_stream();
    // Bytes of a line begun in an earlier chunk.
    let (mut lines, mut carried) = (0u64, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let mut start = 0;
        while let Some(nl) = chunk[start..].iter().position(|&b| b == b'\n') {
            let line = &chunk[start..start + nl];
            if carried + line.len() > 0 {
                lines += 1;
                std::hint::black_box(line);
            }
            carried = 0;
            start += nl + 1;
        }
        carried += chunk.len() - start;
    }
    if carried > 0 {
        lines += 1;
    }
    Ok((lines, t.elapsed().as_secs_f64()))
}

/// Bound 2: produce the connector's records for the lines (`ctx`'s envelope, id key and header)
/// to a new topic, with the connector's producer settings.
async fn produce_records(bootstrap: &str, body: &[u8], ctx: &Context) -> Result<(u64, f64)> {
    let mut sink = broker::sink_settings(bootstrap);
    sink.topic = unique_name("bench-raw");
    broker::create_topics(&sink, &[(&sink.topic, 1)]).await?;
    let producer = broker::sink_producer(&sink)?;
    broker::warm_up(&producer, &sink.topic).await?;
    let (acks, syncts) = (Acks::new(), chrono::Utc::now().timestamp_millis());
    let t = Instant::now();
    let mut n = 0u64;
    for l in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let event = std::str::from_utf8(l)?;
        broker::produce_record(&producer, &sink.topic, ctx, syncts, n, event, &acks).await?;
        n += 1;
    }
    acks.wait().await?;
    Ok((n, t.elapsed().as_secs_f64()))
}

fn status(addr: &str) -> Option<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).ok()?;
    serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

struct Run {
    join_secs: f64,
    rows: u64,
    secs: f64,
    rss_mib: f64,
}

/// Bound 3: the connector binary reading the object; its pace from first to last record.
fn connector(
    bootstrap: &str,
    name: &str,
    source: serde_json::Value,
    env: &[(&str, String)],
    rows: u64,
) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("connector.yaml");
    std::fs::write(
        &manifest,
        serde_yaml::to_string(&serde_json::json!({
            "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"dataset": "bench", "schedule": {"once": true}, "source": source},
        }))?,
    )?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let ingest = unique_name("bench-ingest");
    let started = Instant::now();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
        .args(["run", "-f"])
        .arg(&manifest)
        .args([
            "--sink-bootstrap-servers",
            bootstrap,
            "--sink-topic",
            &ingest,
        ])
        .args(["--sink-state-topic", &unique_name("bench-state")])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("OBSRV_LISTEN", &addr)
        .env(
            "RUST_LOG",
            std::env::var("OBSRV_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting obsrv-connector")?;
    let ingested = |s: &serde_json::Value| s["totals"]["recordsIngested"].as_u64().unwrap_or(0);
    let mut first: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let done = loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the connector did not ingest {rows} rows within 30 minutes");
        }
        if let Ok(Some(exit)) = child.try_wait() {
            bail!("the connector exited ({exit})");
        }
        if let Some(s) = status(&addr) {
            let n = ingested(&s);
            if n > 0 && first.is_none() {
                first = Some((Instant::now(), n));
            }
            if n >= rows {
                break Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rss_mib = peak_rss_mib(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (t0, n0) = first.context("no record ingested")?;
    Ok(Run {
        join_secs: (t0 - started).as_secs_f64(),
        rows: rows - n0,
        secs: (done - t0).as_secs_f64(),
        rss_mib,
    })
}

/// What one run measured.
pub struct Report {
    kind: String,
    mib: usize,
    /// Rows in the object; both bounds and the connector handled every one.
    rows: u64,
    get_secs: f64,
    produce_secs: f64,
    run: Run,
}

impl Report {
    /// The connector's rows/s from its first record to its last (0 when it had no time between).
    pub fn connector_rate(&self) -> f64 {
        match self.run.rows {
            0 => 0.0,
            rows => rows as f64 / self.run.secs,
        }
    }

    /// Rows in the object, each counted by both bounds and acknowledged through the connector.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = |secs: f64| self.rows as f64 / secs;
        let (get, produce) = (rate(self.get_secs), rate(self.produce_secs));
        let conn = self.connector_rate();
        writeln!(
            f,
            "source {}, {} rows ({} MiB JSON lines)",
            self.kind, self.rows, self.mib
        )?;
        writeln!(
            f,
            "  bound: GET + line split                      {get:>10.0} rows/s ({:.2}s)",
            self.get_secs
        )?;
        writeln!(
            f,
            "  bound: produce of the connector's records    {produce:>10.0} rows/s ({:.2}s; {:.2} of the GET bound: no reader at all gets further here)",
            self.produce_secs,
            produce / get
        )?;
        if self.run.rows == 0 {
            // Everything arrived between two polls of the connector's status.
            writeln!(
                f,
                "  connector                                    all rows {:.1}s after its start: too few to time, use a larger --mib",
                self.run.join_secs
            )?;
        } else {
            writeln!(
                f,
                "  connector                                    {conn:>10.0} rows/s ({:.2}s after a {:.1}s start incl. group join)",
                self.run.secs, self.run.join_secs
            )?;
        }
        writeln!(
            f,
            "  ratio to GET + split: {:.2} (target >= 0.7); to the same records' produce: {:.2}",
            conn / get,
            conn / produce
        )?;
        write!(
            f,
            "  connector peak RSS: {:.1} MiB (target < 128 MiB)",
            self.run.rss_mib
        )
    }
}

/// Uploads `mib` MiB of JSON lines to a fresh `kind` store and measures the bounds and the
/// connector on it.
pub async fn run(kind: &str, mib: usize) -> Result<Report> {
    let (store, broker) = tokio::try_join!(Store::start(kind), Broker::start())?;
    let mut body = Vec::with_capacity(mib << 20);
    let mut i = 0u64;
    while body.len() < mib << 20 {
        line(i, &mut body);
        i += 1;
    }
    let rows = i;
    let bucket = unique_name("bench").replace('_', "-");
    let key = "events/big.jsonl";
    eprintln!(
        "{kind}: uploading {rows} rows, {:.0} MiB",
        body.len() as f64 / 1048576.0
    );
    store.upload(&bucket, key, body.clone()).await?;

    let client = store.client(&bucket)?;
    let (get_rows, get_secs) = get_and_split(client.as_ref(), key).await?;
    if get_rows != rows {
        bail!("the GET bound split {get_rows} lines, the object has {rows}");
    }
    let bootstrap = broker.bootstrap().to_string();
    let (source, env) = store.source(&bucket);
    // The records carry the Connector's name and kind: the bound writes the same bytes.
    let name = unique_name("bench").replace('_', "-");
    let source_kind = source
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .context("a source kind")?;
    let ctx = Context::new("bench", &format!("bench/{name}"), &source_kind);
    let (produced, produce_secs) = produce_records(&bootstrap, &body, &ctx).await?;
    if produced != rows {
        bail!("the produce bound wrote {produced} records, the object has {rows} lines");
    }
    let run = tokio::task::spawn_blocking(move || connector(&bootstrap, &name, source, &env, rows))
        .await??;
    Ok(Report {
        kind: kind.to_string(),
        mib,
        rows,
        get_secs,
        produce_secs,
        run,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let kind = arg("--source").unwrap_or_else(|| "s3".into());
    let mib: usize = arg("--mib")
        .map_or(Ok(1024), |m| m.parse())
        .context("--mib")?;
    println!("{}", run(&kind, mib).await?);
    Ok(())
}
