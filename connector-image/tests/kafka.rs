//! The Kafka source end to end: consumer group offsets, JSON validation, parallelism and lag, and
//! `delivery: exactlyOnce` (records and group offsets in one transaction).

mod common;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use common::{Harness, consume_exactly, ids, kill_9_mid_load_then_restart, total};
use obsrv_e2e::services::{Broker, unique_name};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};

const T: Duration = Duration::from_secs(60);

fn manifest(broker: &Broker, topic: &str) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: clicks
  source:
    kafka:
      bootstrapServers: {b}
      topics: [{topic}]
      offsetReset: earliest
"#,
        b = broker.bootstrap()
    )
}

#[tokio::test]
async fn kafka_relay_validates_json_commits_offsets_and_reports_lag() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = unique_name("clicks");
    broker.create_topic(&topic, 2).await?;
    for i in 0..20 {
        broker
            .produce(
                &topic,
                Some(&format!("k{i}")),
                &format!("{{\"click\":{i}}}"),
            )
            .await?;
    }
    broker.produce(&topic, None, "not json").await?;
    broker.produce(&topic, None, "[1,2]").await?;
    let h = Harness::new(&broker, &manifest(&broker, &topic), &[]).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 20, T).await?;
    assert_eq!(recs.len(), 20, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 20);
    let v = recs[0].json()?;
    assert_eq!(v["dataset"], "clicks");
    assert_eq!(v["obsrv_meta"]["source"]["connector"], "kafka");
    assert!(v["event"]["click"].is_i64());
    let failed = consume_exactly(&broker, &h.failed, 2, T).await?;
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f.json()?["error"]["error_code"], "CE_1000");
    }
    let s = conn
        .wait_status("caught up with offsets committed", T, |s| {
            total(s, "recordsIngested") == 20
                && total(s, "recordsFailed") == 2
                && s["lagRecords"] == 0
        })
        .await?;
    assert_eq!(s["maxParallelism"], 2, "{s}");

    // Offsets live in the group: a restart reads only what is new.
    assert!(conn.terminate().await?.success());
    broker.produce(&topic, None, "{\"click\":20}").await?;
    let conn = h.start()?;
    conn.wait_status("the new record", T, |s| total(s, "recordsIngested") == 1)
        .await?;
    let recs = consume_exactly(&broker, &h.ingest, 21, T).await?;
    assert_eq!(recs.len(), 21, "{}", conn.log_tail());
    Ok(())
}

/// Produces `values` to one partition in large batches (fast; the broker's end offsets may then be
/// off, so tests using this read the group's committed offsets instead of `lagRecords`).
/// `deletionPolicy` for a Kafka source: `cleanup` alone (Retain) keeps the consumer group, so a
/// restart reads only what is new; `cleanup --delete-state` (Delete) deletes the group with its
/// offsets, so a restart reads the topic again from the start (`offsetReset: earliest`).
#[tokio::test]
async fn cleanup_delete_state_deletes_the_consumer_group() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = unique_name("clicks");
    broker.create_topic(&topic, 1).await?;
    for i in 0..5 {
        broker
            .produce(&topic, None, &format!("{{\"click\":{i}}}"))
            .await?;
    }
    let h = Harness::new(&broker, &manifest(&broker, &topic), &[]).await?;
    let conn = h.start()?;
    conn.wait_status("5 ingested, offsets committed", T, |s| {
        total(s, "recordsIngested") == 5 && s["lagRecords"] == 0
    })
    .await?;
    assert!(conn.terminate().await?.success());

    let (code, out) = h.command("cleanup")?;
    assert!(code.success(), "{out}");
    assert!(!out.contains("group:"), "Retain keeps the group: {out}");
    broker.produce(&topic, None, "{\"click\":5}").await?;
    let conn = h.start()?;
    conn.wait_status("only the new record", T, |s| {
        total(s, "recordsIngested") == 1 && s["lagRecords"] == 0
    })
    .await?;
    assert_eq!(consume_exactly(&broker, &h.ingest, 6, T).await?.len(), 6);
    assert!(conn.terminate().await?.success());

    let (code, out) = h.command_with("cleanup", &["--delete-state"])?;
    assert!(code.success(), "{out}");
    let group = format!("obsrv-connector.tests.{}", h.name);
    assert!(
        out.contains(&format!("group: deleted consumer group {group}")),
        "{out}"
    );
    assert!(out.contains("state: no records"), "{out}");
    let (code, again) = h.command_with("cleanup", &["--delete-state"])?;
    // Idempotent (the Job may retry). Kafka answers GroupIdNotFound ("not found"); nisshi 0.6.0
    // answers success for a group it does not hold, so either wording passes.
    assert!(code.success(), "{again}");
    assert!(
        again.contains(&format!("consumer group {group}")),
        "{again}"
    );

    let conn = h.start()?;
    conn.wait_status("the topic again from the start", T, |s| {
        total(s, "recordsIngested") == 6 && s["lagRecords"] == 0
    })
    .await?;
    let recs = consume_exactly(&broker, &h.ingest, 12, T).await?;
    assert_eq!(recs.len(), 12, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 6, "the same records, the same event ids");
    Ok(())
}

async fn produce_to(broker: &Broker, topic: &str, partition: i32, values: &[String]) -> Result<()> {
    let producer: FutureProducer = broker
        .client_config()
        .set("linger.ms", "20")
        .create()
        .context("creating a Kafka producer")?;
    let sent: Vec<_> = values
        .iter()
        .map(|v| {
            producer
                .send_result(
                    FutureRecord::<(), str>::to(topic)
                        .partition(partition)
                        .payload(v),
                )
                .map_err(|(e, _)| anyhow!("producing to {topic}: {e}"))
        })
        .collect::<Result<_>>()?;
    for d in futures::future::join_all(sent).await {
        d?.map_err(|(e, _)| anyhow!("producing to {topic}: {e}"))?;
    }
    Ok(())
}

/// The offsets the connector's consumer group has committed, by partition (0 when none).
fn committed(broker: &Broker, h: &Harness, topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c: BaseConsumer = broker
        .client_config()
        .set("group.id", format!("obsrv-connector.tests.{}", h.name))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect())
}

/// `delivery: exactlyOnce`: each batch's records (ingest and failed topic) and the group's next
/// offsets commit in one transaction. A graceful stop mid-load leaves exactly as many records
/// written as offsets committed, and the restart resumes after them: every record once. (Only
/// graceful paths: the local broker does not hide aborted transactions from readers.)
#[tokio::test]
async fn exactly_once_kafka_relay_commits_records_and_offsets_together() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = unique_name("orders");
    broker.create_topic(&topic, 2).await?;
    let per_partition = 15_000;
    let events = |p: usize| -> Vec<String> {
        (0..per_partition)
            .map(|i| format!("{{\"partition\":{p},\"order\":{i},\"note\":\"{:040}\"}}", i))
            .collect()
    };
    let mut first = events(0);
    // Malformed input in the middle of a partition: it goes to the failed topic, in the same
    // transactions as its neighbours.
    first.insert(7_000, "not json".into());
    first.insert(7_001, "[1,2]".into());
    produce_to(&broker, &topic, 0, &first).await?;
    produce_to(&broker, &topic, 1, &events(1)).await?;
    let n = 2 * per_partition;

    let m = manifest(&broker, &topic).replace(
        "  dataset: clicks\n",
        "  dataset: clicks\n  delivery: exactlyOnce\n",
    );
    let h = Harness::new(&broker, &m, &[]).await?;
    let conn = h.start()?;
    conn.wait_status("part of the load", T, |s| {
        total(s, "recordsIngested") >= 5_000
    })
    .await?;
    assert!(conn.terminate().await?.success());

    // Graceful stop: what was written is exactly what the group's offsets cover.
    let offsets = committed(&broker, &h, &topic, 2)?;
    let written = broker
        .consume_all(&h.ingest, n, Duration::from_secs(5))
        .await?;
    let failed = broker
        .consume_all(&h.failed, 2, Duration::from_secs(2))
        .await?;
    assert_eq!(
        offsets.iter().sum::<i64>() as usize,
        written.len() + failed.len(),
        "committed offsets {offsets:?}, {} ingested, {} failed",
        written.len(),
        failed.len()
    );
    assert_eq!(ids(&written)?.len(), written.len());
    let first_run = written.len();

    // The restart resumes after the committed offsets: every record exactly once.
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, n, Duration::from_secs(120)).await?;
    assert_eq!(recs.len(), n, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), n, "distinct event ids");
    let failed = consume_exactly(&broker, &h.failed, 2, T).await?;
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f.json()?["error"]["error_code"], "CE_1000");
    }
    conn.wait_status("the rest delivered", T, |s| {
        total(s, "recordsIngested") as usize == n - first_run
    })
    .await?;
    assert_eq!(
        committed(&broker, &h, &topic, 2)?,
        vec![per_partition as i64 + 2, per_partition as i64]
    );
    // Transactions, not plain writes: each commit leaves a marker that takes an offset.
    let last = recs.iter().map(|r| r.offset).max().unwrap_or(0);
    assert!(
        last + 1 > n as i64,
        "no commit markers in the ingest topic: {n} records end at offset {last}"
    );
    assert!(conn.terminate().await?.success());
    Ok(())
}

/// At-least-once across a `kill -9` in the middle of a relay: offsets are committed only after
/// the records before them are acknowledged, so the restart re-reads at most what was in flight
/// and every record arrives (count distinct event ids).
#[tokio::test]
async fn kill_9_mid_relay_then_restart_loses_nothing() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = unique_name("views");
    broker.create_topic(&topic, 2).await?;
    let per_partition = 15_000;
    for p in 0..2 {
        let values: Vec<String> = (0..per_partition)
            .map(|i| format!("{{\"partition\":{p},\"view\":{i},\"page\":\"{:048}\"}}", i))
            .collect();
        produce_to(&broker, &topic, p, &values).await?;
    }
    let n = 2 * per_partition;
    let h = Harness::new(&broker, &manifest(&broker, &topic), &[]).await?;
    kill_9_mid_load_then_restart(&broker, &h, n, 3_000).await?;
    Ok(())
}

/// Replicas share the consumer group's partitions, so each reports the lag of its own partitions
/// only: the operator's sum over replicas then counts every partition once (it used to count the
/// whole group's lag once per replica).
#[tokio::test]
async fn a_replica_reports_the_lag_of_its_own_partitions_only() -> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use obsrv_connector::source::{Source, kafka::KafkaSource};

    let broker = Broker::start().await?;
    let topic = unique_name("shared");
    broker.create_topic(&topic, 2).await?;
    let producer: FutureProducer = broker.client_config().create()?;
    for p in 0..2 {
        for i in 0..10 {
            let value = format!("{{\"p\":{p},\"i\":{i}}}");
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic)
                        .partition(p)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| anyhow!("produce: {e}"))?;
        }
    }
    let group = unique_name("group");

    // Another replica of the group: it holds partitions and never commits.
    let other: BaseConsumer = broker
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()?;
    other.subscribe(&[&topic])?;
    let other = Arc::new(other);
    let done = Arc::new(AtomicBool::new(false));
    let poller = std::thread::spawn({
        let (other, done) = (other.clone(), done.clone());
        move || {
            while !done.load(Ordering::SeqCst) {
                let _ = other.poll(Duration::from_millis(100));
            }
        }
    });
    let deadline = std::time::Instant::now() + T;
    while other.assignment()?.count() < 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the other member got no partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // This replica joins: the group splits the two partitions between them.
    let rc = obsrv_connector::config::parse_config(
        &manifest(&broker, &topic).replace("NAME", "lag").replace(
            "offsetReset: earliest",
            &format!("offsetReset: earliest\n      consumerGroup: {group}"),
        ),
    )?;
    let spec = rc.spec.source.kafka.clone().context("a kafka source")?;
    let mut source = KafkaSource::connect(&spec, &Default::default(), &rc, 100)?;
    let committer = source.committer().context("the group commits")?;
    let mut read = 0;
    while read < 10 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "read {read} of its 10 records"
        );
        if let Some(b) = source.next_batch().await? {
            read += b.records.len();
            committer.commit(&b.position)?;
        }
    }
    // Committed (async): its own partitions drain to 0; the other member's partition keeps 10.
    let lag = loop {
        let lag = source.lag().await?.context("lag once assigned")?;
        if lag.records == 0 || std::time::Instant::now() > deadline {
            break lag;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(read, 10, "one partition's records");
    assert_eq!(
        lag.records, 0,
        "only this replica's partition counts: {lag:?}"
    );
    done.store(true, Ordering::SeqCst);
    let _ = poller.join();
    Ok(())
}
