//! Postgres change data capture (`postgresCdc`) -> ingest topic, against a raw read of the same
//! changes through the same plugin in the same run (issue 12: target >= 0.8 of it):
//!
//! 0. a throwaway Postgres (`wal_level=logical`) gets an empty table; a first run of the connector
//!    (`snapshot: never`) creates its slot and publication and stops; a second slot, `pgoutput`
//!    too, and a publication of the same table are made for the bound;
//! 1. N inserts are committed at full speed, 10,000 rows per transaction (so both slots hold the
//!    same backlog of N changes);
//! 2. the bound: `pg_recvlogical --start` on the second slot with pgoutput's options, to
//!    /dev/null, until the WAL position after the inserts: how fast the server decodes and ships
//!    the changes at all;
//! 3. the connector started again, timed until `/status` counts N records ingested (process start
//!    and replication connection included; each change decoded, rendered as a Debezium-style
//!    event, enveloped, produced and acknowledged, the slot confirmed after the sink).
//!
//! 4. the same connector, now caught up: one transaction of N rows (its peak RSS; the server hands
//!    the whole transaction over at its commit, so this is the connector's backpressure at work);
//! 5. still the same connector: commit -> ingest topic latency at a steady 10k changes/s
//!    ([`cdc::steady_latency`]);
//! 6. the snapshot: `psql \copy <table> TO '/dev/null'` of the whole table (now 2N rows and the
//!    latency's) against a second Connector, `snapshot: initialOnly`, reading it all.
//!
//! Targets (issue 12): throughput >= 0.8 of the raw read, the transaction's peak RSS < 128 MiB,
//! p99 < 50 ms, snapshot >= 0.7 of the COPY.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use futures::FutureExt as _;
use obsrv_crds::runtime::env;
use obsrv_e2e::services::Postgres;

use sqlx::{Connection as _, postgres::PgConnection};

use super::{
    Bench, SourceBench,
    cdc::{self, Figures, TX_ROWS},
};

pub const BENCH: SourceBench = SourceBench {
    name: "postgres-cdc",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// The bound's slot and publication.
const BOUND: &str = "obsrv_bench_bound";

/// Inserts rows `from..=to` of the same shape as the polling bench's.
fn insert(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO cdc_bench SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', 'customer-' || (g % 9973), \
         (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 17, \
         jsonb_build_object('sku', 'sku-' || (g % 501), 'qty', g % 5) FROM generate_series({from}, {to}) g"
    )
}

/// One transaction of inserts: rows `from..from + n` (explicit, as `psql -c` would make one
/// transaction of all the statements).
fn insert_sql(from: usize, n: usize) -> String {
    format!(
        "BEGIN; {}; COMMIT;\n",
        insert(from as i64, (from + n - 1) as i64)
    )
}

/// Postgres' `pg_recvlogical` (Debian keeps it in a versioned directory).
fn pg_recvlogical() -> Result<std::path::PathBuf> {
    let mut found: Vec<_> = glob::glob("/usr/lib/postgresql/*/bin/pg_recvlogical")?
        .filter_map(|p| p.ok())
        .collect();
    found.sort();
    found
        .pop()
        .context("pg_recvlogical not found under /usr/lib/postgresql: run scripts/setup.sh")
}

pub async fn run(b: &Bench) -> Result<Figures> {
    if b.postgres_url.is_some() {
        bail!("the postgres-cdc bench starts its own Postgres (it creates slots and fills WAL)");
    }
    let pg = Postgres::start().await?;
    pg.psql(&format!(
        "CREATE TABLE cdc_bench (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, customer text, \
         amount numeric(12,2), status text, items int, doc jsonb); \
         CREATE PUBLICATION {BOUND} FOR TABLE cdc_bench;"
    ))
    .await?;
    // A slot is made outside a transaction that wrote.
    pg.psql(&format!(
        "SELECT pg_create_logical_replication_slot('{BOUND}', 'pgoutput')"
    ))
    .await?;
    let secrets = [
        (env::SOURCE_USERNAME, pg.user()),
        (env::SOURCE_PASSWORD, pg.password()),
    ];

    eprintln!("connector's first run: its slot and publication ...");
    let at = (pg.host(), pg.port(), pg.database());
    let manifest = |name| cdc::manifest(b, name, "postgresCdc", at, "public.cdc_bench");
    let streaming = manifest("connector");
    cdc::first_run(&streaming, b, &secrets).await?;

    eprintln!("committing {} inserts ...", b.rows);
    let mut sql = String::new();
    for from in (1..=b.rows).step_by(TX_ROWS) {
        sql.push_str(&insert_sql(from, TX_ROWS.min(b.rows + 1 - from)));
    }
    let t = Instant::now();
    pg.psql(&sql).await.context("inserting")?;
    let fill_secs = t.elapsed().as_secs_f64();
    let end_lsn = pg.psql("SELECT pg_current_wal_lsn()").await?;

    eprintln!("bound: pg_recvlogical to {} ...", end_lsn.trim());
    let conninfo = format!(
        "host={} port={} dbname={} user={}",
        pg.host(),
        pg.port(),
        pg.database(),
        pg.user()
    );
    let t = Instant::now();
    let out = Command::new(pg_recvlogical()?)
        .args(["-d", &conninfo, "-S", BOUND, "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={BOUND}"))
        .args(["--endpos", end_lsn.trim(), "-f", "/dev/null"])
        .env("PGPASSWORD", pg.password())
        .stdin(Stdio::null())
        .output()
        .context("starting pg_recvlogical")?;
    let bound_secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "pg_recvlogical: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut conn = PgConnection::connect(&pg.url()).await?;
    // As a production server commits: the test server's `synchronous_commit=off` leaves a commit
    // in memory for up to wal_writer_delay (200 ms), and WAL goes to the slot once flushed.
    sqlx::raw_sql("SET synchronous_commit = on")
        .execute(&mut conn)
        .await?;
    let target = cdc::Target {
        streaming: &streaming,
        snapshot: &manifest("snapshot"),
        secrets: &secrets,
        conn: &mut conn,
        insert,
    };
    let runs = cdc::connector_runs(
        b,
        target,
        pg.psql(&insert_sql(b.rows + 1, b.rows))
            .map(|r| r.map(drop)),
        async {
            Ok(pg
                .psql("SELECT count(*) FROM cdc_bench")
                .await?
                .trim()
                .parse()?)
        },
        pg.psql("\\copy cdc_bench TO '/dev/null'")
            .map(|r| r.map(drop)),
    )
    .await?;
    Ok(Figures {
        kind: "postgresCdc",
        bound: "pg_recvlogical pgoutput",
        snapshot_bound: "psql \\copy <table>",
        rows: b.rows,
        fill_secs,
        bound_secs,
        runs,
    })
}
