//! `obsrv-connector bench`: Postgres -> broker throughput of the connector against this machine's
//! two bounds, measured in the same run:
//!
//! 1. `COPY (SELECT row_to_json(t) FROM bench t) TO STDOUT` out of Postgres — how fast rows can
//!    leave the database as JSON at all;
//! 2. raw produce of those same payloads to the broker with the connector's producer settings —
//!    how fast the broker takes them;
//! 3. this binary, as a child `obsrv-connector run` process, loading the table (`schedule: once`).
//!
//! It prints rows/s for each, the connector's ratio to the slower bound, and the connector's peak
//! resident memory (VmHWM). Without `--postgres-url`/`--bootstrap` it starts a throwaway Postgres
//! (initdb, loopback, trust auth) and a `nisshi` broker, and stops them at the end.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use obsrv_crds::{Compression, Delivery};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};
use sqlx::{Connection, postgres::PgConnection};

use crate::{
    config::{Secrets, SinkSettings},
    sink::{
        Acks,
        kafka::{client_config, create_producer, enqueue, producer_config},
    },
};

pub(crate) type BenchResult<T> = std::result::Result<T, String>;

pub(crate) fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A child process killed (and its directory removed) when dropped.
pub(crate) struct Service {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> BenchResult<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .map_err(err("free port"))?
        .local_addr()
        .map_err(err("free port"))?
        .port())
}

fn find(name: &str) -> BenchResult<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(Path::new(&h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} not found: run scripts/setup.sh"))
}

fn wait_port(port: u16, what: &str) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not open port {port}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// uid/gid of the `postgres` user when running as root (Postgres refuses root).
fn postgres_user() -> Option<(u32, u32)> {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))?;
    if !is_root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn start_postgres() -> BenchResult<(Service, String)> {
    use std::os::unix::process::CommandExt;
    let user = postgres_user();
    let dir = tempfile::Builder::new()
        .prefix("obsrv-bench-pg-")
        .tempdir()
        .map_err(err("temp dir"))?;
    if let Some((u, g)) = user {
        std::os::unix::fs::chown(dir.path(), Some(u), Some(g)).map_err(err("chown"))?;
    }
    let data = dir.path().join("data");
    let mut init = Command::new(find("initdb")?);
    init.args([
        "-U",
        "obsrv",
        "-E",
        "UTF8",
        "--no-sync",
        "--auth=trust",
        "-D",
    ])
    .arg(&data)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some((u, g)) = user {
        init.uid(u).gid(g);
    }
    if !init.status().map_err(err("initdb"))?.success() {
        return Err("initdb failed".into());
    }
    let port = free_port()?;
    let mut pg = Command::new(find("postgres")?);
    pg.arg("-D")
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("port={port}"),
        ])
        .args([
            "-c",
            &format!("unix_socket_directories={}", dir.path().display()),
        ])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((u, g)) = user {
        pg.uid(u).gid(g);
    }
    let child = pg.spawn().map_err(err("postgres"))?;
    wait_port(port, "postgres")?;
    Ok((
        Service { child, _dir: dir },
        format!("postgres://obsrv@127.0.0.1:{port}/postgres"),
    ))
}

pub(crate) fn start_broker() -> BenchResult<(Service, String)> {
    let dir = tempfile::Builder::new()
        .prefix("obsrv-bench-broker-")
        .tempdir()
        .map_err(err("temp dir"))?;
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(find("nisshi")?)
        .current_dir(dir.path())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://nisshi/",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err("nisshi"))?;
    wait_port(port, "nisshi")?;
    Ok((Service { child, _dir: dir }, format!("127.0.0.1:{port}")))
}

/// User + system CPU seconds of a process (from /proc, clock ticks at 100 Hz).
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `GET /status` over a plain socket (no HTTP client needed in the runtime).
pub(crate) fn get_status(addr: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = body.split_once("\r\n\r\n")?.1;
    serde_json::from_str(json).ok()
}

/// The sink settings both benches give the connector and use for their raw-produce bound, so the
/// bound and the connector produce with the same librdkafka configuration.
pub(crate) fn sink_settings(
    bootstrap: &str,
    topic: &str,
    state_topic: &str,
    run_id: u32,
) -> SinkSettings {
    SinkSettings {
        bootstrap_servers: bootstrap.to_string(),
        topic: topic.to_string(),
        failed_topic: format!("bench-failed-{run_id}"),
        state_topic: state_topic.to_string(),
        max_message_bytes: 1_048_576,
        compression: Compression::Zstd,
        linger_ms: 20,
        batch_bytes: None,
        tls: None,
        sasl: None,
        delivery: Delivery::AtLeastOnce,
    }
}

/// Creates `(name, partitions)` topics on the sink's broker.
pub(crate) async fn create_topics(
    settings: &SinkSettings,
    topics: &[(&str, i32)],
) -> BenchResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings, &Secrets::default())
        .create()
        .map_err(err("admin"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .map_err(err("create topics"))?
    {
        r.map_err(|(t, e)| format!("create topic {t}: {e}"))?;
    }
    Ok(())
}

/// Starts this binary as `obsrv-connector run -f manifest` writing to `settings`' topics, with its
/// HTTP on a free loopback port (returned) and `env` added.
pub(crate) fn spawn_connector(
    manifest: &Path,
    settings: &SinkSettings,
    env: &[(&str, &str)],
) -> BenchResult<(Child, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let exe = std::env::current_exe().map_err(err("own path"))?;
    let child = Command::new(exe)
        .args(["run", "-f"])
        .arg(manifest)
        .args([
            "--sink-bootstrap-servers",
            &settings.bootstrap_servers,
            "--sink-topic",
            &settings.topic,
            "--sink-state-topic",
            &settings.state_topic,
        ])
        .envs(env.iter().copied())
        .env("OBSRV_LISTEN", &addr)
        // OBSRV_BENCH_LOG shows the connector's own log (e.g. `info`) to see where its time goes.
        .env(
            "RUST_LOG",
            std::env::var("OBSRV_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // As set in the image (Dockerfile): fewer malloc arenas, less fragmentation.
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(err("connector"))?;
    Ok((child, addr))
}

/// Reads the connector's peak RSS (KiB) and CPU seconds, then stops it with SIGTERM.
pub(crate) fn stop_connector(mut child: Child) -> (u64, f64) {
    let pid = child.id();
    let rss = peak_rss_kib(pid).unwrap_or(0);
    let cpu = cpu_secs(pid).unwrap_or(0.0);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    (rss, cpu)
}

/// What the bench measured.
#[derive(Debug)]
pub struct Figures {
    pub rows: usize,
    pub json_bytes: usize,
    pub copy_secs: f64,
    pub produce_secs: f64,
    pub connector_secs: f64,
    pub connector_peak_rss_kib: u64,
    pub connector_cpu_secs: f64,
}

impl Figures {
    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        let (copy, produce, conn) = (
            rate(self.copy_secs),
            rate(self.produce_secs),
            rate(self.connector_secs),
        );
        let bound = copy.min(produce);
        format!(
            "rows: {} ({:.1} MiB of row JSON)\n\
             bound COPY row_to_json out of Postgres: {copy:>10.0} rows/s ({:.2}s)\n\
             bound raw produce to the broker:        {produce:>10.0} rows/s ({:.2}s)\n\
             obsrv-connector Postgres -> broker:     {conn:>10.0} rows/s ({:.2}s, start-up included)\n\
             ratio to the slower bound: {:.2} (target >= 0.7)\n\
             connector peak RSS: {:.1} MiB (target < 64 MiB), CPU {:.2}s",
            self.rows,
            self.json_bytes as f64 / (1 << 20) as f64,
            self.copy_secs,
            self.produce_secs,
            self.connector_secs,
            conn / bound,
            self.connector_peak_rss_kib as f64 / 1024.0,
            self.connector_cpu_secs,
        )
    }
}

/// Runs the benchmark; `postgres_url`/`bootstrap` point at existing services or are started here.
pub async fn run(
    rows: usize,
    batch_size: usize,
    postgres_url: Option<String>,
    bootstrap: Option<String>,
) -> BenchResult<Figures> {
    let (_pg, url) = match postgres_url {
        Some(u) => (None, u),
        None => start_postgres().map(|(s, u)| (Some(s), u))?,
    };
    let (_broker, bootstrap) = match bootstrap {
        Some(b) => (None, b),
        None => start_broker().map(|(s, b)| (Some(s), b))?,
    };
    let mut conn = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match PgConnection::connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("connect to Postgres: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    eprintln!("loading {rows} rows into Postgres ...");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS obsrv_bench; \
         CREATE TABLE obsrv_bench (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, customer text, amount numeric(12,2), \
         status text, items int, doc jsonb); \
         INSERT INTO obsrv_bench SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', 'customer-' || (g % 9973), \
         (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 17, \
         jsonb_build_object('sku', 'sku-' || (g % 501), 'qty', g % 5) FROM generate_series(1, {rows}) g; \
         CREATE INDEX ON obsrv_bench (updated_at, id);"
    )))
    .execute(&mut conn)
    .await
    .map_err(err("loading the table"))?;
    sqlx::raw_sql("VACUUM ANALYZE obsrv_bench")
        .execute(&mut conn)
        .await
        .map_err(err("vacuum"))?;

    // Bound 1: COPY of row_to_json.
    eprintln!("bound 1: COPY row_to_json ...");
    let t = Instant::now();
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(rows);
    let mut json_bytes = 0usize;
    {
        let mut stream = conn
            .copy_out_raw("COPY (SELECT row_to_json(t) FROM obsrv_bench t) TO STDOUT")
            .await
            .map_err(err("COPY"))?;
        let mut partial = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(err("COPY"))?;
            json_bytes += chunk.len();
            partial.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(i) = partial[start..].iter().position(|&b| b == b'\n') {
                payloads.push(partial[start..start + i].to_vec());
                start += i + 1;
            }
            partial.drain(..start);
        }
    }
    let copy_secs = t.elapsed().as_secs_f64();
    if payloads.len() != rows {
        return Err(format!(
            "COPY returned {} rows, expected {rows}",
            payloads.len()
        ));
    }
    drop(conn);

    // Bound 2: raw produce with the connector's producer settings.
    eprintln!("bound 2: raw produce ...");
    let run_id = std::process::id();
    let (raw_topic, topic, state_topic) = (
        format!("bench-raw-{run_id}"),
        format!("bench-ingest-{run_id}"),
        format!("bench-state-{run_id}"),
    );
    let settings = sink_settings(&bootstrap, &topic, &state_topic, run_id);
    create_topics(&settings, &[(&raw_topic, 1), (&topic, 1)]).await?;
    let producer = create_producer(&producer_config(
        &settings,
        &Secrets::default(),
        "obsrv-bench",
    ))
    .map_err(err("producer"))?;
    // The idempotent producer's start (producer id, connections) is not throughput: one record
    // first, untimed.
    let warm = Acks::new();
    enqueue(&producer, &raw_topic, None, Some(b"{}"), None, &warm)
        .await
        .map_err(err("raw produce"))?;
    warm.wait().await.map_err(err("raw produce"))?;
    let t = Instant::now();
    let acks = Acks::new();
    for (i, p) in payloads.iter().enumerate() {
        let key = i.to_string();
        enqueue(
            &producer,
            &raw_topic,
            Some(key.as_bytes()),
            Some(p),
            None,
            &acks,
        )
        .await
        .map_err(err("raw produce"))?;
    }
    acks.wait().await.map_err(err("raw produce"))?;
    let produce_secs = t.elapsed().as_secs_f64();
    drop(payloads);
    drop(producer);

    // The connector, as its own process.
    eprintln!("connector ...");
    let u: sqlx::postgres::PgConnectOptions = url.parse().map_err(err("postgres url"))?;
    let dir = tempfile::tempdir().map_err(err("temp dir"))?;
    let manifest = dir.path().join("connector.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: bench-{run_id}, namespace: bench}}\nspec:\n  dataset: bench\n  \
             schedule: {{once: true}}\n  source:\n    postgres:\n      host: {}\n      port: {}\n      database: {}\n      \
             credentials: {{secretName: pg}}\n      tls: {{mode: disable}}\n      \
             tables: [{{name: obsrv_bench, cursor: {{column: updated_at, tieBreaker: id}}}}]\n      batchSize: {}\n",
            u.get_host(),
            u.get_port(),
            u.get_database().unwrap_or("postgres"),
            batch_size,
        ),
    )
    .map_err(err("manifest"))?;
    let password = url::password(&url);
    let t = Instant::now();
    let (mut child, addr) = spawn_connector(
        &manifest,
        &settings,
        &[
            ("OBSRV_SOURCE_USERNAME", u.get_username()),
            ("OBSRV_SOURCE_PASSWORD", &password),
        ],
    )?;
    let result = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Err(format!("connector exited early: {s}"));
        }
        if let Some(s) = get_status(&addr) {
            if s["state"] == "Idle" {
                break Ok((
                    t.elapsed().as_secs_f64(),
                    s["totals"]["recordsIngested"].as_u64().unwrap_or(0),
                ));
            }
            if s["lastError"].is_object() {
                eprintln!("connector error: {}", s["lastError"]);
            }
        }
        if t.elapsed() > Duration::from_secs(1800) {
            break Err("connector did not finish within 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (rss, cpu) = stop_connector(child);
    let (connector_secs, ingested) = result?;
    if ingested != rows as u64 {
        return Err(format!(
            "connector ingested {ingested} rows, expected {rows}"
        ));
    }
    Ok(Figures {
        rows,
        json_bytes,
        copy_secs,
        produce_secs,
        connector_secs,
        connector_peak_rss_kib: rss,
        connector_cpu_secs: cpu,
    })
}

mod url {
    /// The password of a `postgres://user:password@host/db` URL (empty when none).
    pub fn password(url: &str) -> String {
        url.split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, p)| p.to_string())
            .unwrap_or_default()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn password_from_url() {
            assert_eq!(super::password("postgres://u:p%40@h:1/d"), "p%40");
            assert_eq!(super::password("postgres://u@h:1/d"), "");
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchSource {
    Postgres,
    Kafka,
}

/// `obsrv-connector bench`: Source -> broker benchmark against the machine's bounds: Postgres
/// (COPY out, raw produce) or Kafka (raw consume+produce pipe).
#[derive(clap::Parser)]
#[command(name = "obsrv-connector bench")]
struct BenchArgs {
    /// What to benchmark: a Postgres table or a Kafka topic relayed to the ingest topic.
    #[arg(long, value_enum, default_value = "postgres")]
    source: BenchSource,
    /// Rows (Postgres) or records (Kafka) to load.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// The connector's batchSize (rows per query; Postgres only).
    #[arg(long, default_value_t = 10_000)]
    batch_size: usize,
    /// An existing Postgres (`postgres://user:password@host:port/db`); a throwaway one otherwise.
    #[arg(long)]
    postgres_url: Option<String>,
    /// An existing broker; a throwaway nisshi otherwise.
    #[arg(long)]
    bootstrap: Option<String>,
}

/// Runs the benchmark named by `args` (`bench --source ... --rows ...`).
pub fn main(args: impl Iterator<Item = String>) -> std::process::ExitCode {
    use clap::Parser;
    let b = BenchArgs::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("obsrv-connector bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(async {
        match b.source {
            BenchSource::Postgres => run(b.rows, b.batch_size, b.postgres_url, b.bootstrap)
                .await
                .map(|f| f.report()),
            BenchSource::Kafka => crate::bench_kafka::run(b.rows, b.bootstrap)
                .await
                .map(|f| f.report()),
        }
    });
    match report {
        Ok(r) => {
            println!("{r}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("obsrv-connector bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
