//! Kafka -> ingest relay, against this machine's bound measured in the same run (DESIGN §7: "on
//! par with a raw consume+produce pipe"):
//!
//! 0. an input topic (3 partitions) is filled with N JSON events of about 150 bytes;
//! 1. the bound: a raw consume+produce pipe in this process — a fresh consumer group reads the input
//!    topic from the beginning and produces each payload unchanged to an output topic with the
//!    connector's own producer settings, until every record is acknowledged;
//!    beside it, the same pipe producing the records the connector writes (each payload in Obsrv's
//!    envelope, a 32-character id as key and `obsrv-event-id` header): what the data contract
//!    costs with nothing else in between, printed as a second ratio ("to the same records");
//! 2. the connector on a Connector manifest with a Kafka source on that topic (fresh group,
//!    `offsetReset: earliest`), once per `--delivery` (atLeastOnce and exactlyOnce by default),
//!    timed until the ingest topic holds N records (start-up and group join included, as for the
//!    pipe).
//!
//! The ingest topic's fill is watched through its end offsets (atLeastOnce only: transaction
//! markers take offsets too) and the connector's acknowledged total (`/status` `totals.recordsIngested`; the producer uses acks=all, so an acknowledged record
//! is on the broker). nisshi 0.6.0's ListOffsets "latest" can be wrong when a produced batch holds
//! several records (DESIGN §6), so the run ends on whichever reaches N first and the ingest topic is
//! then counted by consuming it (untimed) before any figure is reported.
//!
//! Both sides join a consumer group, which on nisshi takes about 5 s before the first record. The
//! ratio is printed with start-up included and after each side's first record; the target
//! (DESIGN §7: >= 0.9 of the pipe, peak RSS < 64 MiB) is claimed only when both ratios reach it.
//! With `--runs N` the pipe and the connector are measured N times on the same input and the
//! report ends with the medians.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::FutureExt as _;
use obsrv_connector::{
    envelope::Context,
    sink::{
        Acks,
        kafka::{SinkProducer, enqueue},
    },
};
use rdkafka::{Message as _, consumer::StreamConsumer};

use obsrv_crds::Delivery;

use super::{
    Bench, SourceBench, broker,
    connector::{Connector, Usage, ingested},
    delivery_name,
};

pub const BENCH: SourceBench = SourceBench {
    name: "kafka",
    run: |b| {
        run(b)
            .map(|runs| {
                runs.map(|runs| {
                    let each: Vec<String> = runs.iter().map(Figures::report).collect();
                    match runs.len() {
                        1 => each.join(""),
                        _ => format!("{}\n{}", each.join("\n"), medians(&runs)),
                    }
                })
            })
            .boxed_local()
    },
};

/// Partitions of the input topic.
pub const PARTITIONS: i32 = 3;

/// The ratio to the pipe the relay should reach (DESIGN §7).
pub const ON_PAR: f64 = 0.9;

/// The peak RSS the relay should stay under, MiB (DESIGN §7).
pub const MAX_RSS_MIB: f64 = 64.0;

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

/// One run of the connector with one delivery.
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    pub delivery: Delivery,
    /// Seconds until the ingest topic had every record (process start and group join included).
    pub secs: f64,
    /// Seconds until the first ingest record was seen (process start, group join, first batch).
    pub first_secs: f64,
    pub usage: Usage,
}

/// What the bench measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub rows: usize,
    pub input_bytes: usize,
    pub fill_secs: f64,
    pub pipe_secs: f64,
    /// Seconds until the pipe's first record was consumed (group join, first fetch).
    pub pipe_first_secs: f64,
    /// The same pipe producing the connector's records (envelope, key, id header).
    pub records_pipe_secs: f64,
    pub records_pipe_first_secs: f64,
    /// One per delivery asked for.
    pub relays: Vec<Relay>,
    /// Records counted by consuming the ingest topic (read_committed) after every relay.
    pub ingest_counted: usize,
}

impl Figures {
    /// Connector rows/s over the pipe's, start-up (process, group join) included on both sides.
    pub fn ratio(&self, r: &Relay) -> f64 {
        self.pipe_secs / r.secs
    }

    /// The same after each side's first record: the group join (several seconds on nisshi, the
    /// same for both) no longer dilutes the difference.
    pub fn steady_ratio(&self, r: &Relay) -> f64 {
        (self.pipe_secs - self.pipe_first_secs) / (r.secs - r.first_secs)
    }

    /// Connector rows/s over the same-records pipe's, after each side's first record.
    pub fn records_ratio(&self, r: &Relay) -> f64 {
        (self.records_pipe_secs - self.records_pipe_first_secs) / (r.secs - r.first_secs)
    }

    /// On par when both ratios reach [`ON_PAR`].
    pub fn on_par(&self, r: &Relay) -> bool {
        self.ratio(r) >= ON_PAR && self.steady_ratio(r) >= ON_PAR
    }

    fn relay(&self, d: Delivery) -> Option<&Relay> {
        self.relays.iter().find(|r| r.delivery == d)
    }

    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        let mut out = format!(
            "rows: {} ({:.1} MiB of event JSON, {PARTITIONS} partitions, filled at {:.0} rows/s)\n\
             bound raw consume+produce pipe:       {:>10.0} rows/s ({:.2}s; {:>10.0} rows/s after its first record at {:.2}s)\n\
             \x20 the same, producing the connector's records (envelope, key, id header): {:>10.0} rows/s after its first record\n",
            self.rows,
            self.input_bytes as f64 / (1 << 20) as f64,
            rate(self.fill_secs),
            rate(self.pipe_secs),
            self.pipe_secs,
            rate(self.pipe_secs - self.pipe_first_secs),
            self.pipe_first_secs,
            rate(self.records_pipe_secs - self.records_pipe_first_secs),
        );
        for r in &self.relays {
            out += &format!(
                "obsrv-connector Kafka -> ingest, {:<12} {:>10.0} rows/s ({:.2}s; {:>10.0} rows/s after its first record at {:.2}s)\n\
                 \x20 ratio to the pipe: {:.2} start-up included, {:.2} after the first record \
                 (target: both >= {ON_PAR}: {}; to the same records: {:.2}); peak RSS {:.1} MiB (target < {MAX_RSS_MIB}: {}), CPU {:.2}s\n",
                delivery_name(r.delivery),
                rate(r.secs),
                r.secs,
                rate(r.secs - r.first_secs),
                r.first_secs,
                self.ratio(r),
                self.steady_ratio(r),
                met(self.on_par(r)),
                self.records_ratio(r),
                r.usage.peak_rss_mib(),
                met(r.usage.peak_rss_mib() < MAX_RSS_MIB),
                r.usage.cpu_secs,
            );
        }
        if let (Some(alo), Some(eo)) = (
            self.relay(Delivery::AtLeastOnce),
            self.relay(Delivery::ExactlyOnce),
        ) {
            out += &format!(
                "exactlyOnce / atLeastOnce: {:.2} start-up included, {:.2} after the first record (target >= 0.8)\n",
                alo.secs / eo.secs,
                (alo.secs - alo.first_secs) / (eo.secs - eo.first_secs),
            );
        }
        // Counted once, after every run: the runs share the ingest topic.
        out += &format!(
            "ingest topic after all runs: {} records counted by consuming (read_committed) = {} relays x {} rows",
            self.ingest_counted,
            self.ingest_counted / self.rows.max(1),
            self.rows
        );
        out
    }
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}

/// The medians over several runs of the same input, per delivery, with the verdicts.
pub fn medians(runs: &[Figures]) -> String {
    let median = super::postgres::median;
    // Every run measures the same deliveries.
    let deliveries = runs
        .first()
        .map(|f| f.relays.as_slice())
        .unwrap_or_default();
    let mut out = format!("medians of {} run(s):\n", runs.len());
    for d in deliveries.iter().map(|r| r.delivery) {
        let of = |f: fn(&Figures, &Relay) -> f64| {
            median(
                runs.iter()
                    .filter_map(|fig| fig.relay(d).map(|r| f(fig, r)))
                    .collect(),
            )
        };
        let (ratio, steady) = (of(Figures::ratio), of(Figures::steady_ratio));
        let (records, rss) = (
            of(Figures::records_ratio),
            of(|_, r| r.usage.peak_rss_mib()),
        );
        out += &format!(
            "  {:<12} ratio to the pipe {ratio:.2} start-up included, {steady:.2} after the first record \
             (target: both >= {ON_PAR}: {}; to the same records: {records:.2}); peak RSS {rss:.1} MiB (target < {MAX_RSS_MIB}: {})\n",
            delivery_name(d),
            met(ratio >= ON_PAR && steady >= ON_PAR),
            met(rss < MAX_RSS_MIB),
        );
    }
    out
}

/// The bound: consumes `input` with a fresh group and produces each record to `output`, unchanged
/// or, with `records`, as the connector writes it, until all `rows` are acknowledged. Returns the
/// seconds since `started` of the first record consumed.
async fn pipe(
    c: &StreamConsumer,
    producer: &SinkProducer,
    output: &str,
    rows: usize,
    started: Instant,
    records: Option<&Context>,
) -> Result<f64> {
    let acks = Acks::new();
    let syncts = chrono::Utc::now().timestamp_millis();
    let mut first = None;
    for n in 0..rows {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv())
            .await
            .map_err(|_| anyhow!("pipe: nothing consumed for 60s"))?
            .context("pipe consume")?;
        first.get_or_insert_with(|| started.elapsed().as_secs_f64());
        match records {
            None => enqueue(producer, output, m.key(), m.payload(), None, &acks)
                .await
                .context("pipe produce")?,
            Some(ctx) => {
                let event = std::str::from_utf8(m.payload().unwrap_or_default())?;
                broker::produce_record(producer, output, ctx, syncts, n as u64, event, &acks)
                    .await?
            }
        }
    }
    acks.wait().await.context("pipe produce")?;
    Ok(first.unwrap_or(0.0))
}

/// The Connector relaying `input` from its beginning with a fresh group, with `delivery`.
fn manifest(b: &Bench, input: &str, delivery: Delivery, run: usize) -> String {
    let d = delivery_name(delivery);
    let name = format!("{}-{run}", d.to_lowercase());
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         delivery: {d}\n  source:\n    kafka:\n      bootstrapServers: {}\n      topics: [{input}]\n      \
         consumerGroup: {}\n      offsetReset: earliest\n",
        b.name(&format!("connector-{name}")),
        b.sink.bootstrap_servers,
        b.name(&format!("connector-group-{name}")),
    )
}

/// The connector relaying all of `input` with `delivery`, timed until its status counts every
/// record acknowledged (an exactlyOnce record counts once its transaction committed). atLeastOnce
/// also ends when the ingest topic's end offsets (asked through `watcher`) grew by the rows.
async fn relay(
    b: &Bench,
    input: &str,
    delivery: Delivery,
    run: usize,
    watcher: &StreamConsumer,
) -> Result<Relay> {
    let topic = &b.sink.topic;
    let base = broker::end_offsets(watcher, topic)?;
    let mut connector = Connector::spawn(&manifest(b, input, delivery, run), &b.sink, &[])?;
    let mut first = None;
    let by_offsets = delivery == Delivery::AtLeastOnce;
    let secs = connector
        .wait_for(|s, secs| {
            let acked = ingested(s);
            // exactlyOnce: offsets also count transaction markers, so only the status counts.
            let grown = if by_offsets {
                broker::end_offsets(watcher, topic).unwrap_or(base) - base
            } else {
                0
            };
            if acked > 0 || grown > 0 {
                first.get_or_insert(secs);
            }
            (acked >= b.rows as u64 || grown >= b.rows as i64).then_some(secs)
        })
        .await?;
    Ok(Relay {
        delivery,
        secs,
        first_secs: first.unwrap_or(0.0),
        usage: connector.stop(),
    })
}

pub async fn run(b: &Bench) -> Result<Vec<Figures>> {
    let bootstrap = &b.sink.bootstrap_servers;
    let input = b.name("input");
    broker::create_topics(&b.sink, &[(&input, PARTITIONS)]).await?;

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

    let mut runs = Vec::new();
    for n in 1..=b.runs {
        // Bound: raw consume+produce with the connector's producer settings.
        eprintln!("run {n}/{}: bound: raw consume+produce pipe ...", b.runs);
        let raw = b.name(&format!("raw-{n}"));
        broker::create_topics(&b.sink, &[(&raw, 1)]).await?;
        let producer = broker::sink_producer(&b.sink)?;
        let t = Instant::now();
        let c = broker::consumer(bootstrap, &b.name(&format!("pipe-{n}")), Some(&input))?;
        let pipe_first_secs = pipe(&c, &producer, &raw, b.rows, t, None).await?;
        let pipe_secs = t.elapsed().as_secs_f64();
        drop((c, producer));

        eprintln!(
            "run {n}/{}: the same pipe, producing the connector's records ...",
            b.runs
        );
        let records = b.name(&format!("records-{n}"));
        broker::create_topics(&b.sink, &[(&records, 1)]).await?;
        let producer = broker::sink_producer(&b.sink)?;
        // An instance name as long as the connector's: it is in every envelope.
        let ctx = Context::new(
            "bench",
            &format!("bench/{}", b.name("records-bound")),
            "kafka",
        );
        let t = Instant::now();
        let c = broker::consumer(bootstrap, &b.name(&format!("records-{n}")), Some(&input))?;
        let records_pipe_first_secs = pipe(&c, &producer, &records, b.rows, t, Some(&ctx)).await?;
        let records_pipe_secs = t.elapsed().as_secs_f64();
        drop((c, producer));

        // The connector, as its own process, once per delivery (each with its own group).
        // Not subscribed: it only asks for end offsets, it reads nothing while the connector runs.
        let watcher = broker::consumer(bootstrap, &b.name(&format!("watch-{n}")), None)?;
        let mut relays = Vec::new();
        for &d in &b.deliveries {
            eprintln!("run {n}/{}: connector {} ...", b.runs, delivery_name(d));
            relays.push(relay(b, &input, d, n, &watcher).await?);
        }
        drop(watcher);
        runs.push((
            (pipe_secs, pipe_first_secs),
            (records_pipe_secs, records_pipe_first_secs),
            relays,
        ));
    }
    let expected = b.rows * b.deliveries.len() * b.runs;
    let ingest_counted =
        broker::count(bootstrap, &b.name("count"), &b.sink.topic, expected).await?;
    if ingest_counted != expected {
        bail!("the ingest topic holds {ingest_counted} records, expected {expected}");
    }
    Ok(runs
        .into_iter()
        .map(|((pipe_secs, pipe_first_secs), records, relays)| Figures {
            rows: b.rows,
            input_bytes,
            fill_secs,
            pipe_secs,
            pipe_first_secs,
            records_pipe_secs: records.0,
            records_pipe_first_secs: records.1,
            relays,
            ingest_counted,
        })
        .collect())
}
