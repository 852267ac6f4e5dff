//! MariaDB change data capture (`mariadbCdc`) -> ingest topic, against a raw read of the same
//! binary log in the same run (issue 12: target >= 0.8 of it), as the `postgres-cdc` bench:
//!
//! 0. a throwaway MariaDB (ROW binlog) gets an empty table; a first run of the connector
//!    (`snapshot: never`) records its GTID position and stops;
//! 1. N inserts are committed at full speed, 10,000 rows per transaction;
//! 2. the bound: `mariadb-binlog --read-from-remote-server --to-last-log --verbose` from the first
//!    binary log to /dev/null: how fast the server ships the log and a client decodes every row
//!    event into its values (without `--verbose` it only base64-encodes the events: 2.5M
//!    changes/s, a copy of bytes, not a read of changes);
//! 3. the connector started again, timed until `/status` counts N records ingested;
//! 4. the same connector, caught up: one transaction of N rows (its peak RSS);
//! 5. still the same connector: commit -> ingest topic latency at a steady 10k changes/s;
//! 6. the snapshot: `mariadb --quick -e 'SELECT * FROM <table>'` to /dev/null against a second
//!    Connector, `snapshot: initialOnly`, reading the whole table.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use futures::FutureExt as _;
use obsrv_crds::runtime::env;
use obsrv_e2e::services::{MariaDb, find_binary};
use sqlx::{Connection as _, mysql::MySqlConnection};

use super::{
    Bench, SourceBench,
    cdc::{self, BigTransaction, Latency, Snapshot},
    connector::Usage,
    postgres_cdc::TARGET,
};

pub const BENCH: SourceBench = SourceBench {
    name: "mariadb-cdc",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// Rows per inserting transaction.
const TX_ROWS: usize = 10_000;

/// What the bench measured.
#[derive(Debug)]
pub struct Figures {
    pub rows: usize,
    pub fill_secs: f64,
    /// Seconds for mariadb-binlog to read the whole binary log to /dev/null.
    pub bound_secs: f64,
    pub connector_secs: f64,
    pub connector: Usage,
    pub big_transaction: BigTransaction,
    pub latency: Latency,
    pub snapshot: Snapshot,
}

impl Figures {
    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        format!(
            "rows: {} (inserts, {TX_ROWS} per transaction, committed in {:.2}s)\n\
             bound mariadb-binlog --read-from-remote-server -v > /dev/null: {:>10.0} changes/s ({:.2}s)\n\
             obsrv-connector mariadbCdc -> broker:                          {:>10.0} changes/s ({:.2}s, start-up included)\n\
             ratio to the raw read: {:.2} (target >= {TARGET})\n\
             connector peak RSS: {:.1} MiB, CPU {:.2}s\n\
             {}\n\
             {}\n\
             {}",
            self.rows,
            self.fill_secs,
            rate(self.bound_secs),
            self.bound_secs,
            rate(self.connector_secs),
            self.connector_secs,
            self.bound_secs / self.connector_secs,
            self.connector.peak_rss_mib(),
            self.connector.cpu_secs,
            self.big_transaction.line(),
            self.latency.line(),
            self.snapshot.line("mariadb --quick SELECT *"),
        )
    }
}

/// The Connector streaming the table's changes (`snapshot: never`), or with `name` "snapshot",
/// reading the table once (`initialOnly`).
fn manifest(b: &Bench, db: &MariaDb, name: &str) -> String {
    let snapshot = if name == "snapshot" {
        "initialOnly"
    } else {
        "never"
    };
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         source:\n    mariadbCdc:\n      host: {}\n      port: {}\n      database: {}\n      \
         credentials: {{secretName: db}}\n      tls: {{mode: disable}}\n      \
         tables: [{}.cdc_bench]\n      snapshot: {snapshot}\n      heartbeatInterval: 1s\n",
        b.name(name),
        db.host(),
        db.port(),
        db.database(),
        db.database(),
    )
}

/// Inserts rows `from..=to` (MariaDB's sequence engine numbers them), the same shape as the
/// `postgres-cdc` bench's.
fn insert(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO cdc_bench SELECT seq, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL seq SECOND, \
         CONCAT('customer-', seq % 9973), (seq % 100000) / 100, ELT(1 + seq % 3, 'new', 'paid', 'shipped'), \
         seq % 17, JSON_OBJECT('sku', CONCAT('sku-', seq % 501), 'qty', seq % 5) FROM seq_{from}_to_{to}"
    )
}

/// The snapshot's bound: every row through the client, unbuffered, to /dev/null.
async fn select_to_null(db: &MariaDb) -> Result<()> {
    let status = tokio::process::Command::new(find_binary("mariadb", &[])?)
        .args(["--no-defaults", "--protocol=TCP", "--quick", "-B", "-N"])
        .args([
            "-h",
            db.host(),
            "-P",
            &db.port().to_string(),
            "-u",
            db.user(),
        ])
        .args([db.database(), "-e", "SELECT * FROM cdc_bench"])
        .env("MYSQL_PWD", db.password())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .await
        .context("running the mariadb client")?;
    if !status.success() {
        bail!("mariadb SELECT to /dev/null: {status}");
    }
    Ok(())
}

pub async fn run(b: &Bench) -> Result<Figures> {
    let db = MariaDb::start().await?;
    if db.pid().is_none() {
        bail!(
            "the mariadb-cdc bench starts its own MariaDB (it reads the whole binary log): unset MYSQL_URL"
        );
    }
    db.sql(
        "CREATE TABLE cdc_bench (id bigint PRIMARY KEY, updated_at datetime NOT NULL, customer varchar(40), \
         amount decimal(12,2), status varchar(10), items int, doc json)",
    )
    .await?;
    let secrets = [
        (env::SOURCE_USERNAME, db.user()),
        (env::SOURCE_PASSWORD, db.password()),
    ];

    eprintln!("connector's first run: its binlog position ...");
    let streaming = manifest(b, &db, "connector");
    cdc::first_run(&streaming, b, &secrets).await?;

    eprintln!("committing {} inserts ...", b.rows);
    let mut sql = String::new();
    for from in (1..=b.rows).step_by(TX_ROWS) {
        let to = (from + TX_ROWS - 1).min(b.rows);
        sql.push_str(&format!("{};\n", insert(from as i64, to as i64)));
    }
    let t = Instant::now();
    db.sql(&sql).await.context("inserting")?;
    let fill_secs = t.elapsed().as_secs_f64();

    let first_log = db.sql("SHOW BINARY LOGS").await?;
    let first_log = first_log
        .split_whitespace()
        .next()
        .context("no binary log")?;
    eprintln!("bound: mariadb-binlog from {first_log} ...");
    let t = Instant::now();
    let out = Command::new(find_binary("mariadb-binlog", &[])?)
        .args([
            "--no-defaults",
            "--read-from-remote-server",
            "--to-last-log",
            "--verbose",
        ])
        .args([
            "-h",
            db.host(),
            "-P",
            &db.port().to_string(),
            "-u",
            db.user(),
        ])
        .args(["--result-file=/dev/null", first_log])
        .env("MYSQL_PWD", db.password())
        .stdin(Stdio::null())
        .output()
        .context("starting mariadb-binlog")?;
    let bound_secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "mariadb-binlog: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    eprintln!("connector ...");
    let (connector_secs, connector) =
        cdc::until_ingested(&streaming, b, &secrets, b.rows as u64).await?;
    let usage = connector.stop();

    eprintln!("one transaction of {} rows ...", b.rows);
    let mut connector = cdc::running(&streaming, b, &secrets).await?;
    let big = insert(b.rows as i64 + 1, 2 * b.rows as i64);
    let big_transaction =
        cdc::big_transaction(&mut connector, 0, b.rows, db.sql(&big).map(|r| r.map(drop))).await?;

    eprintln!("latency at {} changes/s ...", cdc::LATENCY_RATE);
    let mut conn = MySqlConnection::connect(&db.url()).await?;
    let latency = cdc::steady_latency(b, &mut conn, b.rows, 2 * b.rows as i64 + 1, insert).await?;
    drop(connector);

    eprintln!("snapshot ...");
    let snapshot = cdc::snapshot(
        &manifest(b, &db, "snapshot"),
        b,
        &secrets,
        db.sql("SELECT count(*) FROM cdc_bench")
            .await?
            .trim()
            .parse()?,
        select_to_null(&db),
    )
    .await?;
    Ok(Figures {
        rows: b.rows,
        fill_secs,
        bound_secs,
        connector_secs,
        connector: usage,
        big_transaction,
        latency,
        snapshot,
    })
}
