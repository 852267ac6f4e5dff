//! Kafka -> ingest relay, against this machine's bound measured in the same run (DESIGN §7: "on
//! par with a raw consume+produce pipe"):
//!
//! 0. an input topic (3 partitions) is filled with N JSON events of about 150 bytes;
//! 1. the bound: a raw consume+produce pipe in this process — a fresh consumer group reads the input
//!    topic from the beginning and produces each payload unchanged to an output topic with the
//!    connector's own producer settings, until every record is acknowledged;
//! 2. the connector on a Connector manifest with a Kafka source on that topic (fresh group,
//!    `offsetReset: earliest`), timed until the ingest topic holds N records (start-up and group
//!    join included, as for the pipe).
//!
//! The ingest topic's fill is watched through its end offsets and the connector's acknowledged
//! total (`/status` `totals.recordsIngested`; the producer uses acks=all, so an acknowledged record
//! is on the broker). nisshi 0.6.0's ListOffsets "latest" can be wrong when a produced batch holds
//! several records (DESIGN §6), so the run ends on whichever reaches N first and the ingest topic is
//! then counted by consuming it (untimed) before any figure is reported.
//!
//! Both sides join a consumer group, which on nisshi takes about 5 s before the first record. The
//! ratio is printed with start-up included and after each side's first record; "on par" (>= 0.8)
//! is claimed only when both reach it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::FutureExt as _;
use obsrv_connector::sink::{
    Acks,
    kafka::{SinkProducer, enqueue},
};
use rdkafka::{Message as _, consumer::StreamConsumer};

use super::{
    Bench, SourceBench, broker,
    connector::{Connector, Usage, ingested},
};

pub const BENCH: SourceBench = SourceBench {
    name: "kafka",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// Partitions of the input topic.
pub const PARTITIONS: i32 = 3;

/// The ratio to the pipe that counts as "on par".
pub const ON_PAR: f64 = 0.8;

/// Input event number `i`: a realistic order event of about 150 bytes of JSON.
pub fn event(i: u64) -> String {
    format!(
        r#"{{"id":{i},"ts":"2024-01-01T{:02}:{:02}:{:02}.{:03}Z","customer":"customer-{}","amount":{}.{:02},"status":"{}","items":{},"sku":"sku-{}","qty":{}}}"#,
        (i / 3_600_000) % 24,
        (i / 60_000) % 60,
        (i / 1000) % 60,
        i % 1000,
        i % 9973,
        (i % 100_000) / 100,
        i % 100,
        ["new", "paid", "shipped"][(i % 3) as usize],
        i % 17,
        i % 501,
        i % 5,
    )
}

/// What the bench measured.
#[derive(Debug)]
pub struct Figures {
    pub rows: usize,
    pub input_bytes: usize,
    pub fill_secs: f64,
    pub pipe_secs: f64,
    /// Seconds until the pipe's first record was consumed (group join, first fetch).
    pub pipe_first_secs: f64,
    pub connector_secs: f64,
    /// Seconds until the first ingest record was seen (process start, group join, first batch).
    pub connector_first_secs: f64,
    pub connector: Usage,
    /// Ingest end offsets at the end of the timed run, and what consuming the topic counted.
    pub ingest_end_offsets: i64,
    pub ingest_counted: usize,
}

impl Figures {
    /// Connector rows/s over the pipe's, start-up (process, group join) included on both sides.
    pub fn ratio(&self) -> f64 {
        self.pipe_secs / self.connector_secs
    }

    /// The same after each side's first record: the group join (several seconds on nisshi, the
    /// same for both) no longer dilutes the difference.
    pub fn steady_ratio(&self) -> f64 {
        (self.pipe_secs - self.pipe_first_secs) / (self.connector_secs - self.connector_first_secs)
    }

    /// On par when both ratios reach [`ON_PAR`].
    pub fn on_par(&self) -> bool {
        self.ratio() >= ON_PAR && self.steady_ratio() >= ON_PAR
    }

    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        let (ratio, steady) = (self.ratio(), self.steady_ratio());
        format!(
            "rows: {} ({:.1} MiB of event JSON, {PARTITIONS} partitions, filled at {:.0} rows/s)\n\
             bound raw consume+produce pipe:      {:>10.0} rows/s ({:.2}s; {:>10.0} rows/s after its first record at {:.2}s)\n\
             obsrv-connector Kafka -> ingest:     {:>10.0} rows/s ({:.2}s; {:>10.0} rows/s after its first record at {:.2}s)\n\
             ingest topic: {} records counted by consuming (end offsets said {})\n\
             ratio to the pipe: {ratio:.2} start-up included, {steady:.2} after the first record \
             (target: on par, both >= {ON_PAR}: {})\n\
             connector peak RSS: {:.1} MiB, CPU {:.2}s",
            self.rows,
            self.input_bytes as f64 / (1 << 20) as f64,
            rate(self.fill_secs),
            rate(self.pipe_secs),
            self.pipe_secs,
            rate(self.pipe_secs - self.pipe_first_secs),
            self.pipe_first_secs,
            rate(self.connector_secs),
            self.connector_secs,
            rate(self.connector_secs - self.connector_first_secs),
            self.connector_first_secs,
            self.ingest_counted,
            self.ingest_end_offsets,
            if self.on_par() { "met" } else { "NOT met" },
            self.connector.peak_rss_mib(),
            self.connector.cpu_secs,
        )
    }
}

/// The bound: consumes `input` with a fresh group and produces each record unchanged to
/// `output`, until all `rows` are acknowledged. Returns the seconds since `started` of the first
/// record consumed.
async fn pipe(
    c: &StreamConsumer,
    producer: &SinkProducer,
    output: &str,
    rows: usize,
    started: Instant,
) -> Result<f64> {
    let acks = Acks::new();
    let mut first = None;
    for _ in 0..rows {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv())
            .await
            .map_err(|_| anyhow!("pipe: nothing consumed for 60s"))?
            .context("pipe consume")?;
        first.get_or_insert_with(|| started.elapsed().as_secs_f64());
        enqueue(producer, output, m.key(), m.payload(), None, &acks)
            .await
            .context("pipe produce")?;
    }
    acks.wait().await.context("pipe produce")?;
    Ok(first.unwrap_or(0.0))
}

/// The Connector relaying `input` from its beginning with a fresh group.
fn manifest(b: &Bench, input: &str) -> String {
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         source:\n    kafka:\n      bootstrapServers: {}\n      topics: [{input}]\n      \
         consumerGroup: {}\n      offsetReset: earliest\n",
        b.name("connector"),
        b.sink.bootstrap_servers,
        b.name("connector-group"),
    )
}

pub async fn run(b: &Bench) -> Result<Figures> {
    let bootstrap = &b.sink.bootstrap_servers;
    let (input, raw) = (b.name("input"), b.name("raw"));
    broker::create_topics(&b.sink, &[(&input, PARTITIONS), (&raw, 1)]).await?;

    eprintln!("filling {input} with {} events ...", b.rows);
    let filler = broker::fill_producer(&b.sink)?;
    let mut input_bytes = 0;
    let t = Instant::now();
    broker::produce_numbered(
        &filler,
        &input,
        (0..b.rows as u64).map(|i| {
            let e = event(i);
            input_bytes += e.len();
            e
        }),
    )
    .await?;
    let fill_secs = t.elapsed().as_secs_f64();
    drop(filler);

    // Bound: raw consume+produce with the connector's producer settings.
    eprintln!("bound: raw consume+produce pipe ...");
    let producer = broker::sink_producer(&b.sink)?;
    let t = Instant::now();
    let c = broker::consumer(bootstrap, &b.name("pipe"), Some(&input))?;
    let pipe_first_secs = pipe(&c, &producer, &raw, b.rows, t).await?;
    let pipe_secs = t.elapsed().as_secs_f64();
    drop((c, producer));

    // The connector, as its own process.
    eprintln!("connector ...");
    // Not subscribed: it only asks for end offsets, it reads nothing while the connector runs.
    let watcher = broker::consumer(bootstrap, &b.name("watch"), None)?;
    let topic = &b.sink.topic;
    let mut connector = Connector::spawn(&manifest(b, &input), &b.sink, &[])?;
    let mut first = None;
    let connector_secs = connector
        .wait_for(|s, secs| {
            let acked = ingested(s);
            let ends = broker::end_offsets(&watcher, topic).unwrap_or(0);
            if acked > 0 || ends > 0 {
                first.get_or_insert(secs);
            }
            (acked >= b.rows as u64 || ends >= b.rows as i64).then_some(secs)
        })
        .await?;
    let usage = connector.stop();
    let ingest_end_offsets = broker::end_offsets(&watcher, topic)?;
    drop(watcher);
    let ingest_counted = broker::count(bootstrap, &b.name("count"), topic, b.rows).await?;
    if ingest_counted != b.rows {
        bail!(
            "the ingest topic holds {ingest_counted} records, expected {}",
            b.rows
        );
    }
    Ok(Figures {
        rows: b.rows,
        input_bytes,
        fill_secs,
        pipe_secs,
        pipe_first_secs,
        connector_secs,
        connector_first_secs: first.unwrap_or(0.0),
        connector: usage,
        ingest_end_offsets,
        ingest_counted,
    })
}
