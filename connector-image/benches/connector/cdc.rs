//! What the change-data-capture benches (`postgres-cdc`, `mariadb-cdc`) share: the first run that
//! makes the source's replication position, the backlog run, and commit -> ingest topic latency at
//! a steady rate of changes.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
};
use serde_json::Value;
use sqlx::AssertSqlSafe;

use super::{
    Bench, broker,
    connector::{Connector, Usage, ingested},
};

/// The backlog's ratio to the raw read the issue asks for.
pub const TARGET: f64 = 0.8;
/// Rows per inserting transaction of the backlog.
pub const TX_ROWS: usize = 10_000;
/// The steady rate the latency is measured at (issue 12: p99 < 50 ms at 10k changes/s).
pub const LATENCY_RATE: usize = 10_000;
/// Rows per transaction at that rate: one transaction every 10 ms.
const LATENCY_TX_ROWS: usize = 100;
/// The most changes the latency is measured over (15 s at the rate).
const LATENCY_MAX_CHANGES: usize = 150_000;
/// The snapshot's ratio to the database's own read of the table (issue 12: >= 0.7 of a COPY).
pub const SNAPSHOT_TARGET: f64 = 0.7;
/// Latency target, p99.
pub const LATENCY_TARGET_MS: f64 = 50.0;

/// What a CDC bench measured.
#[derive(Debug)]
pub struct Figures {
    /// The source kind (`postgresCdc`) and the raw read the backlog is measured against.
    pub kind: &'static str,
    pub bound: &'static str,
    /// The database's dump of the table the snapshot is measured against.
    pub snapshot_bound: &'static str,
    pub rows: usize,
    /// Seconds to commit the N inserts.
    pub fill_secs: f64,
    /// Seconds for the raw read of the N changes to /dev/null.
    pub bound_secs: f64,
    pub runs: Runs,
}

impl Figures {
    /// Connector changes/s over the raw read's.
    pub fn ratio(&self) -> f64 {
        self.bound_secs / self.runs.connector_secs
    }

    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        let r = &self.runs;
        let bound = format!("bound {} > /dev/null:", self.bound);
        let connector = format!("obsrv-connector {} -> broker:", self.kind);
        let w = bound.len().max(connector.len());
        format!(
            "rows: {} (inserts, {TX_ROWS} per transaction, committed in {:.2}s)\n\
             {bound:<w$} {:>10.0} changes/s ({:.2}s)\n\
             {connector:<w$} {:>10.0} changes/s ({:.2}s, start-up included)\n\
             ratio to the raw read: {:.2} (target >= {TARGET})\n\
             the connector's records read back and produced again (nothing read from the source): {:.0} changes/s; \
             the connector at {:.2} of it\n\
             connector peak RSS: {:.1} MiB, CPU {:.2}s\n\
             {}\n\
             {}\n\
             {}",
            self.rows,
            self.fill_secs,
            rate(self.bound_secs),
            self.bound_secs,
            rate(r.connector_secs),
            r.connector_secs,
            self.ratio(),
            rate(r.replay_secs),
            r.replay_secs / r.connector_secs,
            r.connector.peak_rss_mib(),
            r.connector.cpu_secs,
            r.big_transaction.line(),
            r.latency.line(),
            r.snapshot.line(self.snapshot_bound),
        )
    }
}

/// What the connector did after the bound: the backlog, one big transaction, latency, snapshot.
#[derive(Debug)]
pub struct Runs {
    pub connector_secs: f64,
    /// Seconds to produce the backlog's records again ([`broker::replay`]).
    pub replay_secs: f64,
    pub connector: Usage,
    pub big_transaction: BigTransaction,
    pub latency: Latency,
    pub snapshot: Snapshot,
}

/// Where the connector's runs go: the Connector streaming the table and the one reading it once
/// ([`manifest`]), their Secret values, and the database (`conn`, `insert`, as
/// [`steady_latency`] takes them).
pub struct Target<'a, C> {
    pub streaming: &'a str,
    pub snapshot: &'a str,
    pub secrets: &'a [(&'a str, &'a str)],
    pub conn: &'a mut C,
    pub insert: fn(i64, i64) -> String,
}

/// Steps 3-6 of either CDC bench, once the backlog of `b.rows` changes and its bound are done:
/// the connector through the backlog, then, running on, `big_commit` (rows `N+1..=2N` in one
/// transaction) and the steady latency (rows from `2N+1`), then the snapshot of the table
/// (`table_rows` rows once all that is in) against `snapshot_bound`.
pub async fn connector_runs<C>(
    b: &Bench,
    t: Target<'_, C>,
    big_commit: impl Future<Output = Result<()>>,
    table_rows: impl Future<Output = Result<u64>>,
    snapshot_bound: impl Future<Output = Result<()>>,
) -> Result<Runs>
where
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    eprintln!("connector ...");
    let start = ingest_end(b)?;
    let (connector_secs, connector) =
        until_ingested(t.streaming, b, t.secrets, b.rows as u64).await?;
    let usage = connector.stop();
    eprintln!("its records produced again ...");
    let replay_secs = broker::replay(&b.sink, start, b.rows, &b.name("replay")).await?;

    eprintln!("one transaction of {} rows ...", b.rows);
    let mut connector = running(t.streaming, b, t.secrets).await?;
    let big_transaction = big_transaction(&mut connector, 0, b.rows, big_commit).await?;

    eprintln!("latency at {LATENCY_RATE} changes/s ...");
    let latency = steady_latency(b, t.conn, b.rows, 2 * b.rows as i64 + 1, t.insert).await?;
    drop(connector);

    eprintln!("snapshot ...");
    let rows = table_rows.await?;
    let snapshot = snapshot(t.snapshot, b, t.secrets, rows, snapshot_bound).await?;
    Ok(Runs {
        connector_secs,
        replay_secs,
        connector: usage,
        big_transaction,
        latency,
        snapshot,
    })
}

/// A Connector of `kind` on `table` of `database` at `host:port` (credentials in Secret `db`):
/// named `name`, streaming its changes (`snapshot: never`), or, named "snapshot", reading the
/// table once (`initialOnly`).
pub fn manifest(
    b: &Bench,
    name: &str,
    kind: &str,
    (host, port, database): (&str, u16, &str),
    table: &str,
) -> String {
    let snapshot = if name == "snapshot" {
        "initialOnly"
    } else {
        "never"
    };
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         source:\n    {kind}:\n      host: {host}\n      port: {port}\n      database: {database}\n      \
         credentials: {{secretName: db}}\n      tls: {{mode: disable}}\n      \
         tables: [{table}]\n      snapshot: {snapshot}\n      heartbeatInterval: 1s\n",
        b.name(name),
    )
}

/// Runs the connector on `manifest` until it is Running, lets it confirm its start (a heartbeat)
/// and stops it: its slot or binlog position then exists, so changes committed next are its
/// backlog.
pub async fn first_run(manifest: &str, b: &Bench, secrets: &[(&str, &str)]) -> Result<()> {
    let first = running(manifest, b, secrets).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.stop();
    Ok(())
}

/// Starts the connector on `manifest` and returns it once its `/status` says Running.
pub async fn running(manifest: &str, b: &Bench, secrets: &[(&str, &str)]) -> Result<Connector> {
    let mut c = Connector::spawn(manifest, &b.sink, secrets)?;
    c.wait_for(|s, _| (s["state"] == "Running").then_some(()))
        .await?;
    Ok(c)
}

/// Starts the connector on `manifest` and times it until its `/status` counts `n` records
/// ingested (start-up included). Returns the seconds, and the connector, still running.
pub async fn until_ingested(
    manifest: &str,
    b: &Bench,
    secrets: &[(&str, &str)],
    n: u64,
) -> Result<(f64, Connector)> {
    let mut c = Connector::spawn(manifest, &b.sink, secrets)?;
    let secs = c
        .wait_for(|s, secs| (ingested(s) >= n).then_some(secs))
        .await?;
    Ok((secs, c))
}

/// One transaction of many rows committed while the connector streams: the seconds from its
/// commit to the last of its rows ingested, and the connector's peak RSS meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct BigTransaction {
    pub rows: usize,
    pub commit_secs: f64,
    pub secs: f64,
    pub usage: Usage,
}

impl BigTransaction {
    pub fn line(&self) -> String {
        format!(
            "one transaction of {} rows: committed in {:.2}s, all ingested {:.2}s later ({:.0} changes/s); \
             connector peak RSS {:.1} MiB (target < 128)",
            self.rows,
            self.commit_secs,
            self.secs,
            self.rows as f64 / self.secs,
            self.usage.peak_rss_mib(),
        )
    }
}

/// Commits `rows` rows in one transaction (`commit`, which returns when it has) while
/// `connector`, streaming and caught up, has ingested `before` records; waits for all of them.
pub async fn big_transaction(
    connector: &mut Connector,
    before: u64,
    rows: usize,
    commit: impl Future<Output = Result<()>>,
) -> Result<BigTransaction> {
    let t = Instant::now();
    commit.await.context("the big transaction")?;
    let commit_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n = before + rows as u64;
    connector
        .wait_for(|s, _| (ingested(s) >= n).then_some(()))
        .await?;
    Ok(BigTransaction {
        rows,
        commit_secs,
        secs: t.elapsed().as_secs_f64(),
        usage: connector.usage(),
    })
}

/// The snapshot of a whole table against the database's own fastest read of it.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub rows: u64,
    pub bound_secs: f64,
    pub secs: f64,
    /// Seconds to produce the snapshot's records again ([`broker::replay`]).
    pub replay_secs: f64,
    pub usage: Usage,
}

impl Snapshot {
    /// The report's line; `bound` names the read it is measured against.
    pub fn line(&self, bound: &str) -> String {
        format!(
            "snapshot of {} rows: {bound} to /dev/null {:.0} rows/s ({:.2}s); connector initialOnly {:.0} rows/s \
             ({:.2}s, start-up included), ratio {:.2} (target >= {SNAPSHOT_TARGET}), peak RSS {:.1} MiB; \
             its records produced again {:.0} rows/s, the connector at {:.2} of it",
            self.rows,
            self.rows as f64 / self.bound_secs,
            self.bound_secs,
            self.rows as f64 / self.secs,
            self.secs,
            self.bound_secs / self.secs,
            self.usage.peak_rss_mib(),
            self.rows as f64 / self.replay_secs,
            self.replay_secs / self.secs,
        )
    }
}

/// Times `bound` (a read of the whole table, `rows` rows, to /dev/null), then the connector on
/// `manifest` (`snapshot: initialOnly`) until it has ingested them all.
pub async fn snapshot(
    manifest: &str,
    b: &Bench,
    secrets: &[(&str, &str)],
    rows: u64,
    bound: impl Future<Output = Result<()>>,
) -> Result<Snapshot> {
    let t = Instant::now();
    bound.await.context("the snapshot's bound")?;
    let bound_secs = t.elapsed().as_secs_f64();
    let start = ingest_end(b)?;
    let (secs, connector) = until_ingested(manifest, b, secrets, rows).await?;
    let usage = connector.stop();
    let replay_secs =
        broker::replay(&b.sink, start, rows as usize, &b.name("replay-snapshot")).await?;
    Ok(Snapshot {
        rows,
        bound_secs,
        secs,
        replay_secs,
        usage,
    })
}

/// The end offset of the ingest topic: where the next run's records begin.
fn ingest_end(b: &Bench) -> Result<i64> {
    let c = broker::consumer(&b.sink.bootstrap_servers, &b.name("ingest-end"), None)?;
    broker::end_offsets(&c, &b.sink.topic)
}

/// Commit -> ingest topic latency over a steady rate of inserts.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub changes: usize,
    /// Seconds the inserts took (the rate achieved is changes / secs).
    pub secs: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn line(&self) -> String {
        format!(
            "latency commit -> ingest topic, {} changes at {:.0}/s ({LATENCY_TX_ROWS} per transaction): \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < {LATENCY_TARGET_MS} ms)",
            self.changes,
            self.changes as f64 / self.secs,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
        )
    }
}

/// The `q` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Commits inserts at [`LATENCY_RATE`] through `conn` (`insert(from, to)` is the SQL of one
/// transaction inserting ids `from..=to`, starting at `first_id`), `min(rows, 150k)` changes in
/// all, while reading the ingest topic from its current end. A change's latency runs from just
/// before its transaction is sent (so it includes the insert itself) to its record read from the
/// topic by this process (so it includes the topic's fetch).
pub async fn steady_latency<C>(
    b: &Bench,
    conn: &mut C,
    rows: usize,
    first_id: i64,
    insert: impl Fn(i64, i64) -> String,
) -> Result<Latency>
where
    for<'c> &'c mut C: sqlx::Executor<'c>,
{
    let changes =
        rows.clamp(LATENCY_TX_ROWS, LATENCY_MAX_CHANGES) / LATENCY_TX_ROWS * LATENCY_TX_ROWS;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b.sink.bootstrap_servers)
        .set("group.id", b.name("latency"))
        .set("enable.auto.commit", "false")
        // Fetch as soon as a record is there: the latency is the connector's, not a fetch wait.
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("latency consumer")?;
    let end = consumer
        .fetch_watermarks(&b.sink.topic, 0, Duration::from_secs(5))
        .context("end of the ingest topic")?
        .1;
    let mut from_end = TopicPartitionList::new();
    from_end.add_partition_offset(&b.sink.topic, 0, Offset::Offset(end))?;
    consumer.assign(&from_end)?;

    let last_id = first_id + changes as i64 - 1;
    let reader = tokio::spawn(async move {
        let mut arrived: Vec<Option<Instant>> = vec![None; changes];
        let mut left = changes;
        while left > 0 {
            let m = consumer.recv().await.context("reading the ingest topic")?;
            let at = Instant::now();
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            let Some(id) = v["event"]["after"]["id"].as_i64() else {
                continue;
            };
            if (first_id..=last_id).contains(&id) {
                let slot = &mut arrived[(id - first_id) as usize];
                if slot.is_none() {
                    *slot = Some(at);
                    left -= 1;
                }
            }
        }
        anyhow::Ok(arrived)
    });

    let mut sent = Vec::with_capacity(changes / LATENCY_TX_ROWS);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        LATENCY_TX_ROWS as f64 / LATENCY_RATE as f64,
    ));
    let t = Instant::now();
    for from in (first_id..=last_id).step_by(LATENCY_TX_ROWS) {
        tick.tick().await;
        sent.push(Instant::now());
        let sql = insert(from, from + LATENCY_TX_ROWS as i64 - 1);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .context("a steady insert")?;
    }
    let secs = t.elapsed().as_secs_f64();
    let arrived = match tokio::time::timeout(Duration::from_secs(120), reader).await {
        Ok(r) => r??,
        Err(_) => bail!("not every steady insert reached the ingest topic within 2 minutes"),
    };
    let mut ms: Vec<f64> = arrived
        .iter()
        .enumerate()
        .filter_map(|(i, at)| Some((at.as_ref()?, sent[i / LATENCY_TX_ROWS])))
        .map(|(at, sent)| at.saturating_duration_since(sent).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(Latency {
        changes,
        secs,
        p50_ms: quantile(&ms, 0.5),
        p99_ms: quantile(&ms, 0.99),
        max_ms: quantile(&ms, 1.0),
    })
}
