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
    cdc::{self, Figures, TX_ROWS},
};

pub const BENCH: SourceBench = SourceBench {
    name: "mariadb-cdc",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// Inserts rows `from..=to` (MariaDB's sequence engine numbers them), the same shape as the
/// `postgres-cdc` bench's.
fn insert(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO cdc_bench SELECT seq, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL seq SECOND, \
         CONCAT('customer-', seq % 9973), (seq % 100000) / 100, ELT(1 + seq % 3, 'new', 'paid', 'shipped'), \
         seq % 17, JSON_OBJECT('sku', CONCAT('sku-', seq % 501), 'qty', seq % 5) FROM seq_{from}_to_{to}"
    )
}

/// The client options that reach `db` as its user (the password goes in `MYSQL_PWD`).
fn login(db: &MariaDb) -> [String; 6] {
    [
        "-h".into(),
        db.host().into(),
        "-P".into(),
        db.port().to_string(),
        "-u".into(),
        db.user().into(),
    ]
}

/// The snapshot's bound: every row through the client, unbuffered, to /dev/null.
async fn select_to_null(db: &MariaDb) -> Result<()> {
    let status = tokio::process::Command::new(find_binary("mariadb", &[])?)
        .args(["--no-defaults", "--protocol=TCP", "--quick", "-B", "-N"])
        .args(login(db))
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
    let table = format!("{}.cdc_bench", db.database());
    let at = (db.host(), db.port(), db.database());
    let manifest = |name| cdc::manifest(b, name, "mariadbCdc", at, &table);
    let streaming = manifest("connector");
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
        .args(login(&db))
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

    let mut conn = MySqlConnection::connect(&db.url()).await?;
    let target = cdc::Target {
        streaming: &streaming,
        snapshot: &manifest("snapshot"),
        secrets: &secrets,
        conn: &mut conn,
        insert,
    };
    let big = insert(b.rows as i64 + 1, 2 * b.rows as i64);
    let runs = cdc::connector_runs(
        b,
        target,
        db.sql(&big).map(|r| r.map(drop)),
        async {
            Ok(db
                .sql("SELECT count(*) FROM cdc_bench")
                .await?
                .trim()
                .parse()?)
        },
        select_to_null(&db),
    )
    .await?;
    Ok(Figures {
        kind: "mariadbCdc",
        bound: "mariadb-binlog --read-from-remote-server -v",
        snapshot_bound: "mariadb --quick SELECT *",
        rows: b.rows,
        fill_secs,
        bound_secs,
        runs,
    })
}
