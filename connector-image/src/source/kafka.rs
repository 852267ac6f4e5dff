//! Kafka topics read with a consumer group. Offsets live in the group: atLeastOnce commits them
//! once the records before them are acknowledged by the sink; exactlyOnce sends them to the sink's
//! transaction with the batch's records (the source must then be the sink cluster). Input that is
//! not a JSON object goes to the failed topic.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt as _, future::BoxFuture};
use obsrv_crds::{Delivery, KafkaSourceSpec, OffsetReset, runtime::RuntimeConfig, runtime::env};
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
};

use super::{Batch, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory};
use crate::{
    config::{Secrets, kafka_security},
    envelope::{EventIds, validate},
    error::{Error, Result},
    sink::{Transactions, kafka::GroupOffsets},
};

/// Records per batch (fewer when [`MAX_BATCH_BYTES`] is reached first). Up to three batches are
/// alive (being read, queued, being sent), and the producer holds the in-flight bytes plus one
/// batch: 10,000 records of ~150 bytes kept the relay's peak RSS at 83-91 MiB.
pub const BATCH_RECORDS: usize = 2_000;

/// The `kafka` kind. Offsets live in the consumer group, not in the state topic.
pub fn factory() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::kafka::KAFKA.name, open)
        .keeping_own_positions()
        .with_positions_cleanup(delete_group)
}

/// How long `delete_group` waits for the group's members to leave: the Connector's pods are
/// stopped before the cleanup Job runs, and a member killed without leaving is dropped after the
/// session timeout (10 s).
const GROUP_EMPTY_WAIT: Duration = Duration::from_secs(60);

/// `deletionPolicy: Delete`: deletes the consumer group the connector read with (and with it
/// the group's committed offsets) on the source cluster. A group that does not exist (nothing
/// was ever committed) is not an error.
async fn delete_group(ctx: super::CleanupContext) -> Result<String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::types::RDKafkaErrorCode;
    let spec = kafka_spec(&ctx.config)?;
    let group = group_of(spec, &ctx.config);
    let admin: AdminClient<_> = cluster_config(spec, &ctx.secrets, &ctx.config)
        .create()
        .map_err(|e| Error::Config(format!("source admin client: {e}")))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deadline = Instant::now() + GROUP_EMPTY_WAIT;
    loop {
        let res = admin
            .delete_groups(&[group.as_str()], &opts)
            .await
            .map_err(|e| {
                Error::SourceUnreachable(format!(
                    "delete consumer group {group} on {}: {e}",
                    spec.bootstrap_servers
                ))
            })?;
        match res.into_iter().next() {
            Some(Ok(_)) => {
                return Ok(format!(
                    "deleted consumer group {group} and its committed offsets on {}",
                    spec.bootstrap_servers
                ));
            }
            Some(Err((_, RDKafkaErrorCode::GroupIdNotFound))) => {
                return Ok(format!(
                    "consumer group {group} not found on {}: no offsets to delete",
                    spec.bootstrap_servers
                ));
            }
            Some(Err((_, RDKafkaErrorCode::NonEmptyGroup))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Some(Err((_, e))) => {
                let hint = match e {
                    RDKafkaErrorCode::NonEmptyGroup => {
                        " (members still consume with it: stop them and run cleanup again)"
                    }
                    RDKafkaErrorCode::GroupAuthorizationFailed => {
                        " (the connector's user needs the DELETE operation on the group)"
                    }
                    RDKafkaErrorCode::UnsupportedVersion | RDKafkaErrorCode::InvalidRequest => {
                        " (the broker does not support DeleteGroups)"
                    }
                    _ => "",
                };
                return Err(Error::State(format!(
                    "consumer group {group} not deleted on {}: {e}{hint}",
                    spec.bootstrap_servers
                )));
            }
            None => {
                return Err(Error::State(format!(
                    "consumer group {group}: the broker returned no result for DeleteGroups"
                )));
            }
        }
    }
}

/// The consumer group of a Kafka source: the spec's, or [`default_group`].
/// The config's `source.kafka`.
fn kafka_spec(rc: &RuntimeConfig) -> Result<&KafkaSourceSpec> {
    super::spec_of(rc, "kafka", |s| s.kafka.as_ref())
}

pub fn group_of(spec: &KafkaSourceSpec, rc: &RuntimeConfig) -> String {
    spec.consumer_group
        .clone()
        .unwrap_or_else(|| default_group(rc))
}

/// librdkafka settings reaching the source cluster: servers, client id and security.
fn cluster_config(spec: &KafkaSourceSpec, secrets: &Secrets, rc: &RuntimeConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &spec.bootstrap_servers)
        .set("client.id", format!("obsrv-connector/{}", rc.instance_id()));
    let creds = match (
        secrets.get(env::SOURCE_USERNAME),
        secrets.get(env::SOURCE_PASSWORD),
    ) {
        (Some(u), Some(p)) => Some((u, p)),
        _ => None,
    };
    for (k, v) in kafka_security(
        spec.tls.as_ref(),
        spec.sasl.as_ref(),
        secrets.get(env::SOURCE_TLS_CA),
        creds,
    ) {
        c.set(k, v);
    }
    c
}

async fn open(ctx: OpenContext) -> Result<KafkaSource> {
    let spec = kafka_spec(&ctx.config)?;
    let source = KafkaSource::connect(spec, &ctx.secrets, &ctx.config, BATCH_RECORDS)?;
    if ctx.delivery() == Delivery::ExactlyOnce {
        let sink = ctx.sink.transactions().ok_or_else(|| {
            Error::Config("delivery exactlyOnce needs a sink with transactions".into())
        })?;
        same_cluster(&source.cluster_id().await?, &sink.cluster_id().await?)?;
    }
    Ok(source)
}

/// Next offsets to read, by topic and partition.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// Payload bytes after which a batch is handed on before `batch_size` records: with large records
/// a batch of 10,000 would otherwise hold hundreds of MiB (and up to three batches are alive).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// The consumer group a connector uses unless the spec names one.
pub fn default_group(rc: &RuntimeConfig) -> String {
    format!("obsrv-connector.{}.{}", rc.namespace, rc.name)
}

/// Offsets as a position value: `{"offsets": {"topic": {"0": 42}}}`.
pub fn offsets_to_value(o: &Offsets) -> serde_json::Value {
    serde_json::json!({ "offsets": o })
}

/// exactlyOnce: offsets and the rebalance count they were read in, `{"offsets": ..., "epoch": 3}`.
pub fn offsets_in_epoch(o: &Offsets, epoch: u64) -> serde_json::Value {
    serde_json::json!({ "offsets": o, "epoch": epoch })
}

/// Whether a batch read in the position's epoch may still be delivered now that `rebalances` have
/// happened. Eager rebalancing restarts every assigned partition at its committed offset, so the
/// records of an older batch come again and delivering it too would double them.
pub fn is_current_epoch(position: &serde_json::Value, rebalances: u64) -> bool {
    position.get("epoch").and_then(serde_json::Value::as_u64) == Some(rebalances)
}

/// The offsets to commit, as librdkafka wants them.
pub fn offsets_to_tpl(o: &Offsets) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (t, ps) in o {
        for (p, off) in ps {
            tpl.add_partition_offset(t, *p, Offset::Offset(*off))
                .map_err(|e| Error::State(e.to_string()))?;
        }
    }
    Ok(tpl)
}

/// exactlyOnce commits the source's offsets in a transaction of the sink cluster, so both must be
/// one cluster: offsets sent to another cluster's group would never be read back.
pub fn same_cluster(source: &str, sink: &str) -> Result<()> {
    if source == sink {
        return Ok(());
    }
    Err(Error::Config(format!(
        "delivery exactlyOnce needs the Kafka source on the sink cluster (its offsets commit in the \
         sink's transaction), but the source cluster is {source} and the sink cluster {sink}: \
         use atLeastOnce (event ids let downstream drop duplicates)"
    )))
}

/// Counts the consumer's rebalances (assignments and revocations, run inside `recv`), so that
/// exactlyOnce can tell the records read before one from those read after.
#[derive(Clone, Debug, Default)]
pub struct Rebalances(Arc<AtomicU64>);

impl Rebalances {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

type GroupConsumer = StreamConsumer<Rebalances>;

/// The [`EventIds`] of each partition read, hashed once: a record's id is
/// `event_id(instance, [topic, partition, offset])`.
#[derive(Default)]
struct PartitionIds(BTreeMap<String, BTreeMap<i32, EventIds>>);

impl PartitionIds {
    fn of(&mut self, instance: &str, topic: &str, partition: i32) -> &EventIds {
        if !self.0.contains_key(topic) {
            self.0.insert(topic.to_string(), BTreeMap::new());
        }
        let of_topic = self.0.get_mut(topic).expect("inserted above");
        of_topic
            .entry(partition)
            .or_insert_with(|| EventIds::new(instance, &[topic, &partition.to_string()]))
    }
}

pub fn offsets_from_value(v: &serde_json::Value) -> Result<Offsets> {
    serde_json::from_value(v.get("offsets").cloned().unwrap_or_default())
        .map_err(|e| Error::State(format!("not a Kafka position: {e}")))
}

/// A human-readable summary: `topic[0]=42 topic[1]=7`.
pub fn offsets_watermark(o: &Offsets) -> String {
    o.iter()
        .flat_map(|(t, ps)| ps.iter().map(move |(p, off)| format!("{t}[{p}]={off}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Lag from end offsets and committed offsets (negative = nothing committed: use the low mark).
pub fn lag_records(marks: &[(i64, i64, i64)]) -> i64 {
    marks
        .iter()
        .map(|&(low, high, committed)| (high - if committed >= 0 { committed } else { low }).max(0))
        .sum()
}

pub struct KafkaSource {
    consumer: Arc<GroupConsumer>,
    rebalances: Rebalances,
    /// exactlyOnce: positions carry their epoch, and offsets start over at each rebalance (the
    /// partitions read before it may belong to another replica now).
    exactly_once: bool,
    /// The rebalance count `offsets` were read in.
    epoch: u64,
    topics: Vec<String>,
    instance: String,
    batch_size: usize,
    offsets: Offsets,
    ids: PartitionIds,
    partitions: i32,
}

impl KafkaSource {
    pub fn connect(
        spec: &KafkaSourceSpec,
        secrets: &Secrets,
        rc: &RuntimeConfig,
        batch_size: usize,
    ) -> Result<KafkaSource> {
        let mut c = cluster_config(spec, secrets, rc);
        c.set("group.id", group_of(spec, rc))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match spec.offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            // A replaced pod's partitions move on within seconds, not the 45s default.
            .set("session.timeout.ms", "10000")
            // Records of aborted transactions upstream are never relayed (librdkafka's default,
            // stated because exactlyOnce relies on it; it also makes the group's offsets fetched
            // on assignment wait for pending transactional commits).
            .set("isolation.level", "read_committed")
            // Bound the read-ahead, whatever the topic's size. librdkafka prefetches up to 64 MiB
            // and 100k messages per partition by default, each message with a few hundred bytes
            // of bookkeeping besides its payload, and a fetch response may carry 50 MiB: more than
            // the whole pod should use. 1 MiB and 2,000 messages per partition still hold
            // thousands of typical events (2 MiB and 5,000 held 6 MiB more at no gain; 1,000
            // fetched so often it cost CPU). Once the queue is above them, the next fetch waits
            // `fetch.queue.backoff.ms`: 1 s by default, which starves a small queue (0.15 of the
            // raw pipe); 10 ms keeps it fed (peak RSS 102 -> 59 MiB at a higher rate). One
            // response of 4 MiB (1 MiB per partition) overshoots the queue at most that much
            // (halving both saved ~3 MiB for twice the fetches). A single record larger than
            // these limits is still fetched whole.
            .set("queued.max.messages.kbytes", "1024")
            .set("queued.min.messages", "2000")
            .set("fetch.queue.backoff.ms", "10")
            .set("fetch.max.bytes", (4 << 20).to_string())
            .set("max.partition.fetch.bytes", (1 << 20).to_string());
        let rebalances = Rebalances::default();
        let consumer: GroupConsumer = c
            .create_with_context(rebalances.clone())
            .map_err(|e| Error::Config(format!("source consumer: {e}")))?;
        let mut partitions = 0;
        for t in &spec.topics {
            let md = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|e| {
                    Error::SourceUnreachable(format!(
                        "no broker answered at {} within 10s ({e}): is Kafka listening there?",
                        spec.bootstrap_servers
                    ))
                })?;
            let n = md
                .topics()
                .first()
                .map(|m| {
                    if m.error().is_some() {
                        0
                    } else {
                        m.partitions().len()
                    }
                })
                .unwrap_or(0);
            if n == 0 {
                return Err(Error::Schema(format!("source topic {t} does not exist")));
            }
            partitions += n as i32;
        }
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::SourceUnreachable(format!("subscribe: {e}")))?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            rebalances,
            exactly_once: rc.spec.delivery == Delivery::ExactlyOnce,
            epoch: 0,
            topics: spec.topics.clone(),
            instance: rc.instance_id(),
            batch_size: batch_size.max(1),
            offsets: Offsets::new(),
            ids: PartitionIds::default(),
            partitions,
        })
    }

    /// The id of the source cluster, to check exactlyOnce is possible ([`same_cluster`]).
    pub async fn cluster_id(&self) -> Result<String> {
        let c = self.consumer.clone();
        tokio::task::spawn_blocking(move || c.client().fetch_cluster_id(Duration::from_secs(10)))
            .await
            .map_err(|e| Error::SourceUnreachable(e.to_string()))?
            .ok_or_else(|| Error::SourceUnreachable("the source cluster did not say its id".into()))
    }
}

impl Source for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut records = Vec::new();
        let mut bytes = 0;
        let first_wait = Duration::from_millis(500);
        let fill_until = Instant::now() + Duration::from_millis(100);
        // One stream for the batch: each `recv` registers and drops a waker slot under a lock.
        let consumer = self.consumer.clone();
        let mut stream = consumer.stream();
        let mut offset = String::new();
        while records.len() < self.batch_size && bytes < MAX_BATCH_BYTES {
            // A message already fetched is taken without a timer: a timeout per message read
            // the clock twice per record, about 3% of the relay's CPU.
            let next = match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    let wait = if records.is_empty() {
                        first_wait
                    } else {
                        fill_until.saturating_duration_since(Instant::now())
                    };
                    match tokio::time::timeout(wait, stream.next()).await {
                        Err(_) => break,
                        Ok(next) => next,
                    }
                }
            };
            let m = match next {
                None => break,
                Some(Err(e)) => return Err(Error::SourceUnreachable(format!("consume: {e}"))),
                Some(Ok(m)) => m,
            };
            // A rebalance runs inside `recv`, before the message it returns: the records before it
            // are re-read from the committed offsets, so exactlyOnce drops them here (and the
            // runner drops batches already handed on, by their epoch).
            let rebalances = self.rebalances.count();
            if self.exactly_once && rebalances != self.epoch {
                records.clear();
                bytes = 0;
                self.offsets.clear();
                self.epoch = rebalances;
            }
            bytes += m.payload_len();
            let (topic, p, off) = (m.topic(), m.partition(), m.offset());
            offset.clear();
            write!(offset, "{off}").expect("writing to a String");
            records.push(Record {
                id: self.ids.of(&self.instance, topic, p).id(&offset),
                payload: validate(m.payload().unwrap_or_default()),
            });
            match self.offsets.get_mut(topic) {
                Some(o) => {
                    o.insert(p, off + 1);
                }
                None => {
                    self.offsets
                        .entry(topic.to_string())
                        .or_default()
                        .insert(p, off + 1);
                }
            }
        }
        if records.is_empty() {
            return Ok(None);
        }
        let position = if self.exactly_once {
            offsets_in_epoch(&self.offsets, self.epoch)
        } else {
            offsets_to_value(&self.offsets)
        };
        Ok(Some(Batch {
            records,
            position,
            watermark: Some(offsets_watermark(&self.offsets)),
        }))
    }

    fn max_parallelism(&self) -> Option<i32> {
        Some(self.partitions)
    }

    fn describe(&self) -> String {
        format!(
            "kafka topics {}, {} partitions",
            self.topics.join(", "),
            self.partitions
        )
    }

    /// Lag of the partitions assigned to this replica only: replicas share the group's partitions,
    /// so the operator's sum over replicas counts each partition once. `None` before the first
    /// assignment (nothing to say yet, rather than a false 0).
    async fn lag(&mut self) -> Result<Option<Lag>> {
        let c = self.consumer.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<Lag>> {
            let t = Duration::from_secs(5);
            let assigned = c
                .assignment()
                .map_err(|e| Error::SourceUnreachable(format!("assignment: {e}")))?;
            if assigned.count() == 0 {
                return Ok(None);
            }
            let committed = c
                .committed_offsets(assigned, t)
                .map_err(|e| Error::SourceUnreachable(e.to_string()))?;
            let mut marks = Vec::new();
            for e in committed.elements() {
                let (low, high) = c
                    .fetch_watermarks(e.topic(), e.partition(), t)
                    .map_err(|e| Error::SourceUnreachable(e.to_string()))?;
                let off = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                marks.push((low, high, off));
            }
            Ok(Some(Lag {
                records: lag_records(&marks),
                seconds: None,
                bytes: None,
            }))
        })
        .await
        .map_err(|e| Error::SourceUnreachable(e.to_string()))?
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(GroupCommitter {
            consumer: self.consumer.clone(),
            rebalances: self.rebalances.clone(),
        }))
    }
}

struct GroupCommitter {
    consumer: Arc<GroupConsumer>,
    rebalances: Rebalances,
}

impl SourceCommitter for GroupCommitter {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let tpl = offsets_to_tpl(&offsets_from_value(position)?)?;
        // Async: the commit is ordered after earlier ones by librdkafka; a lost commit only means
        // re-reading (at-least-once), never skipping.
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| Error::SourceUnreachable(format!("commit offsets: {e}")))
    }

    fn is_current(&self, position: &serde_json::Value) -> bool {
        is_current_epoch(position, self.rebalances.count())
    }

    fn add_to_transaction<'a>(
        &'a self,
        position: &'a serde_json::Value,
        txn: &'a dyn Transactions,
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            // Taken before the epoch check: a rebalance counts (revocation) before the group's
            // generation changes, so a batch still current carries the generation it was read
            // in, and the broker refuses the offsets if the group moves on before they arrive.
            let group = self.consumer.group_metadata().ok_or_else(|| {
                Error::SourceUnreachable("the consumer has no group metadata yet".into())
            })?;
            if !self.is_current(position) {
                return Ok(false);
            }
            let offsets = offsets_to_tpl(&offsets_from_value(position)?)?;
            txn.send_offsets(GroupOffsets { offsets, group }).await?;
            Ok(true)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_and_summarise() {
        let mut o = Offsets::new();
        o.entry("events".into()).or_default().insert(0, 42);
        o.entry("events".into()).or_default().insert(1, 7);
        let v = offsets_to_value(&o);
        assert_eq!(
            v,
            serde_json::json!({"offsets": {"events": {"0": 42, "1": 7}}})
        );
        assert_eq!(offsets_from_value(&v).unwrap(), o);
        assert_eq!(offsets_watermark(&o), "events[0]=42 events[1]=7");
        let tpl = offsets_to_tpl(&o).unwrap();
        assert_eq!(
            tpl.find_partition("events", 1).map(|e| e.offset()),
            Some(Offset::Offset(7))
        );
    }

    #[test]
    fn exactly_once_positions_are_current_only_in_their_epoch() {
        let mut o = Offsets::new();
        o.entry("events".into()).or_default().insert(0, 42);
        let v = offsets_in_epoch(&o, 3);
        assert_eq!(
            offsets_from_value(&v).unwrap(),
            o,
            "the epoch is not an offset"
        );
        assert!(is_current_epoch(&v, 3));
        assert!(!is_current_epoch(&v, 4), "read before a rebalance");
        assert!(
            !is_current_epoch(&offsets_to_value(&o), 0),
            "an atLeastOnce position has no epoch"
        );
    }

    #[test]
    fn exactly_once_needs_one_cluster() {
        assert!(same_cluster("abc", "abc").is_ok());
        let e = same_cluster("abc", "xyz").unwrap_err();
        assert!(!e.is_retryable(), "a new spec is needed: {e}");
        assert!(e.to_string().contains("abc") && e.to_string().contains("xyz"));
    }

    #[test]
    fn record_ids_hash_topic_partition_and_offset() {
        let mut ids = PartitionIds::default();
        for (topic, p, off) in [("events", 0, "42"), ("events", 1, "42"), ("clicks", 0, "7")] {
            assert_eq!(
                ids.of("shop/orders", topic, p).id(off),
                crate::envelope::event_id("shop/orders", &[topic, &p.to_string(), off]),
            );
        }
        assert_ne!(
            ids.of("shop/orders", "events", 0).id("1"),
            ids.of("shop/orders", "events", 1).id("1")
        );
    }

    #[test]
    fn lag_is_end_minus_committed() {
        assert_eq!(
            lag_records(&[(0, 100, 40), (0, 10, -1), (5, 5, -1)]),
            60 + 10
        );
        assert_eq!(lag_records(&[(0, 10, 12)]), 0);
    }
}
