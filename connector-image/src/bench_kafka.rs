//! `obsrv-connector bench --source kafka`: Kafka -> ingest relay throughput of the connector against
//! this machine's bound, measured in the same run (DESIGN §7: "on par with a raw consume+produce
//! pipe"):
//!
//! 0. an input topic (3 partitions) is filled with N JSON events of about 150 bytes;
//! 1. the bound: a raw consume+produce pipe in this process — a fresh consumer group reads the input
//!    topic from the beginning and produces each payload unchanged to an output topic with the
//!    connector's own producer settings, until every record is acknowledged;
//! 2. this binary, as a child `obsrv-connector run` process on a Connector manifest with a Kafka
//!    source on that topic (fresh group, `offsetReset: earliest`), timed until the ingest topic
//!    holds N records (start-up and group join included, as for the pipe).
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

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
};

use crate::{
    bench::{
        BenchResult, create_topics, err, get_status, sink_settings, spawn_connector, start_broker,
        stop_connector,
    },
    config::Secrets,
    sink::{
        Acks,
        kafka::{SinkProducer, client_config, create_producer, enqueue, producer_config},
    },
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
pub struct KafkaFigures {
    pub rows: usize,
    pub input_bytes: usize,
    pub fill_secs: f64,
    pub pipe_secs: f64,
    /// Seconds until the pipe's first record was consumed (group join, first fetch).
    pub pipe_first_secs: f64,
    pub connector_secs: f64,
    /// Seconds until the first ingest record was seen (process start, group join, first batch).
    pub connector_first_secs: f64,
    pub connector_peak_rss_kib: u64,
    pub connector_cpu_secs: f64,
    /// Ingest end offsets at the end of the timed run, and what consuming the topic counted.
    pub ingest_end_offsets: i64,
    pub ingest_counted: usize,
}

impl KafkaFigures {
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
            self.connector_peak_rss_kib as f64 / 1024.0,
            self.connector_cpu_secs,
        )
    }
}

/// A consumer in `group` (earliest, no commits), subscribed to `topic` when one is given.
fn consumer(bootstrap: &str, group: &str, topic: Option<&str>) -> BenchResult<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()
        .map_err(err("consumer"))?;
    if let Some(t) = topic {
        c.subscribe(&[t]).map_err(err("subscribe"))?;
    }
    Ok(c)
}

/// Sum of the high watermarks of `topic`'s partitions.
fn end_offsets(c: &StreamConsumer, topic: &str) -> BenchResult<i64> {
    let t = Duration::from_secs(5);
    let md = c
        .fetch_metadata(Some(topic), t)
        .map_err(err("ingest metadata"))?;
    let mut sum = 0;
    for p in md.topics().iter().flat_map(|m| m.partitions()) {
        sum += c
            .fetch_watermarks(topic, p.id(), t)
            .map_err(err("ingest end offsets"))?
            .1;
    }
    Ok(sum)
}

/// Consumes `topic` from the beginning until `expected` records arrived or nothing came for `idle`.
async fn count(bootstrap: &str, group: &str, topic: &str, expected: usize) -> BenchResult<usize> {
    let c = consumer(bootstrap, group, Some(topic))?;
    let idle = Duration::from_secs(10);
    let mut n = 0;
    while n < expected {
        match tokio::time::timeout(idle, c.recv()).await {
            Err(_) => break,
            Ok(m) => {
                m.map_err(err("count ingest"))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Fills `topic` with `rows` events, large producer batches for speed. Returns the payload bytes.
async fn fill(producer: &SinkProducer, topic: &str, rows: usize) -> BenchResult<usize> {
    let acks = Acks::new();
    let mut bytes = 0;
    for i in 0..rows as u64 {
        let e = event(i);
        bytes += e.len();
        let key = i.to_string();
        enqueue(
            producer,
            topic,
            Some(key.as_bytes()),
            Some(e.as_bytes()),
            None,
            &acks,
        )
        .await
        .map_err(err("fill"))?;
    }
    acks.wait().await.map_err(err("fill"))?;
    Ok(bytes)
}

/// The bound: consume `input` with a fresh group and produce each record unchanged to `output`.
async fn pipe(
    bootstrap: &str,
    group: &str,
    input: &str,
    producer: &Arc<SinkProducer>,
    output: &str,
    rows: usize,
    started: Instant,
) -> BenchResult<f64> {
    let c = consumer(bootstrap, group, Some(input))?;
    let acks = Acks::new();
    let mut first = None;
    for _ in 0..rows {
        let m = tokio::time::timeout(Duration::from_secs(60), c.recv())
            .await
            .map_err(|_| "pipe: nothing consumed for 60s".to_string())?
            .map_err(err("pipe consume"))?;
        first.get_or_insert_with(|| started.elapsed().as_secs_f64());
        enqueue(producer, output, m.key(), m.payload(), None, &acks)
            .await
            .map_err(err("pipe produce"))?;
    }
    acks.wait().await.map_err(err("pipe produce"))?;
    Ok(first.unwrap_or(0.0))
}

/// Runs the benchmark; `bootstrap` points at an existing broker or a throwaway nisshi is started.
pub async fn run(rows: usize, bootstrap: Option<String>) -> BenchResult<KafkaFigures> {
    let (_broker, bootstrap) = match bootstrap {
        Some(b) => (None, b),
        None => start_broker().map(|(s, b)| (Some(s), b))?,
    };
    let run_id = std::process::id();
    let (input, raw, topic, state_topic) = (
        format!("bench-input-{run_id}"),
        format!("bench-raw-{run_id}"),
        format!("bench-ingest-{run_id}"),
        format!("bench-state-{run_id}"),
    );
    let settings = sink_settings(&bootstrap, &topic, &state_topic, run_id);
    create_topics(&settings, &[(&input, PARTITIONS), (&raw, 1), (&topic, 1)]).await?;

    eprintln!("filling {input} with {rows} events ...");
    let mut fill_config = client_config(&settings, &Secrets::default());
    fill_config
        .set("client.id", "obsrv-bench-fill")
        .set("linger.ms", "50")
        .set("batch.num.messages", "100000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "none");
    let filler = create_producer(&fill_config).map_err(err("fill producer"))?;
    let t = Instant::now();
    let input_bytes = fill(&filler, &input, rows).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    drop(filler);

    // Bound: raw consume+produce with the connector's producer settings.
    eprintln!("bound: raw consume+produce pipe ...");
    let producer = create_producer(&producer_config(
        &settings,
        &Secrets::default(),
        "obsrv-bench",
    ))
    .map_err(err("producer"))?;
    let t = Instant::now();
    let pipe_first_secs = pipe(
        &bootstrap,
        &format!("bench-pipe-{run_id}"),
        &input,
        &producer,
        &raw,
        rows,
        t,
    )
    .await?;
    let pipe_secs = t.elapsed().as_secs_f64();
    drop(producer);

    // The connector, as its own process.
    eprintln!("connector ...");
    let dir = tempfile::tempdir().map_err(err("temp dir"))?;
    let manifest = dir.path().join("connector.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: bench-{run_id}, namespace: bench}}\nspec:\n  dataset: bench\n  \
             source:\n    kafka:\n      bootstrapServers: {bootstrap}\n      topics: [{input}]\n      \
             consumerGroup: bench-connector-{run_id}\n      offsetReset: earliest\n",
        ),
    )
    .map_err(err("manifest"))?;
    // Not subscribed: it only asks for end offsets, it reads nothing while the connector runs.
    let watcher = consumer(&bootstrap, &format!("bench-watch-{run_id}"), None)?;
    let t = Instant::now();
    let (mut child, addr) = spawn_connector(&manifest, &settings, &[])?;
    let mut first = None;
    let result = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Err(format!("connector exited early: {s}"));
        }
        let acked = get_status(&addr)
            .map(|s| {
                if s["lastError"].is_object() {
                    eprintln!("connector error: {}", s["lastError"]);
                }
                s["totals"]["recordsIngested"].as_u64().unwrap_or(0)
            })
            .unwrap_or(0);
        let ends = end_offsets(&watcher, &topic).unwrap_or(0);
        if acked > 0 || ends > 0 {
            first.get_or_insert_with(|| t.elapsed().as_secs_f64());
        }
        if acked >= rows as u64 || ends >= rows as i64 {
            break Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > Duration::from_secs(1800) {
            break Err("connector did not finish within 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (rss, cpu) = stop_connector(child);
    let connector_secs = result?;
    let ingest_end_offsets = end_offsets(&watcher, &topic)?;
    drop(watcher);
    let ingest_counted = count(&bootstrap, &format!("bench-count-{run_id}"), &topic, rows).await?;
    if ingest_counted != rows {
        return Err(format!(
            "the ingest topic holds {ingest_counted} records, expected {rows}"
        ));
    }
    Ok(KafkaFigures {
        rows,
        input_bytes,
        fill_secs,
        pipe_secs,
        pipe_first_secs,
        connector_secs,
        connector_first_secs: first.unwrap_or(0.0),
        connector_peak_rss_kib: rss,
        connector_cpu_secs: cpu,
        ingest_end_offsets,
        ingest_counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_distinct_json_objects_of_realistic_size() {
        for i in [0u64, 1, 2, 999, 123_456, 4_999_999, u32::MAX as u64] {
            let e = event(i);
            let v: serde_json::Value = serde_json::from_str(&e).expect("valid JSON");
            assert_eq!(v["id"], i, "{e}");
            assert!(v.is_object());
            assert!((120..=180).contains(&e.len()), "{} bytes: {e}", e.len());
        }
        assert_ne!(event(1), event(2));
    }

    #[test]
    fn ratio_and_verdict() {
        let f = KafkaFigures {
            rows: 1000,
            input_bytes: 150_000,
            fill_secs: 0.5,
            pipe_secs: 1.0,
            pipe_first_secs: 0.5,
            connector_secs: 2.0,
            connector_first_secs: 1.0,
            connector_peak_rss_kib: 40 * 1024,
            connector_cpu_secs: 1.0,
            ingest_end_offsets: 1000,
            ingest_counted: 1000,
        };
        assert_eq!(f.ratio(), 0.5);
        assert_eq!(f.steady_ratio(), 0.5);
        assert!(
            f.report()
                .contains("ratio to the pipe: 0.50 start-up included, 0.50 after")
        );
        assert!(f.report().contains("NOT met"));
        // 1000 rows in the 0.5s after the pipe's first record.
        assert!(
            f.report()
                .contains("2000 rows/s after its first record at 0.50s")
        );
        let g = KafkaFigures {
            connector_secs: 1.1,
            ..f
        };
        assert!(g.on_par(), "{}", g.report());
        assert!(!g.report().contains("NOT met"));
        // Start-up hides a slow steady state: 0.91 overall, 0.5 after the first record.
        let h = KafkaFigures {
            pipe_secs: 5.5,
            pipe_first_secs: 5.0,
            connector_secs: 6.0,
            connector_first_secs: 5.0,
            ..g
        };
        assert!(h.ratio() > ON_PAR);
        assert!(!h.on_par());
        assert!(h.report().contains("NOT met"));
    }
}
