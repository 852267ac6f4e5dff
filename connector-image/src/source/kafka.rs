//! Kafka topics read with a consumer group. Offsets live in the group (committed only after the
//! records before them are acknowledged by the sink); input that is not a JSON object goes to the
//! failed topic.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use obsrv_crds::{KafkaSource as KafkaSpec, OffsetReset, runtime::RuntimeConfig, runtime::env};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
};

use super::{Batch, Lag, Record, Source, SourceCommitter};
use crate::{
    config::{Secrets, kafka_security},
    envelope::{event_id, validate},
    error::{Error, Result},
};

/// Next offsets to read, by topic and partition.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// The consumer group a connector uses unless the spec names one.
pub fn default_group(rc: &RuntimeConfig) -> String {
    format!("obsrv-connector.{}.{}", rc.namespace, rc.name)
}

/// Offsets as a position value: `{"offsets": {"topic": {"0": 42}}}`.
pub fn offsets_to_value(o: &Offsets) -> serde_json::Value {
    serde_json::json!({ "offsets": o })
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
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
    instance: String,
    batch_size: usize,
    offsets: Offsets,
    partitions: i32,
}

impl KafkaSource {
    pub fn connect(
        spec: &KafkaSpec,
        secrets: &Secrets,
        rc: &RuntimeConfig,
        batch_size: usize,
    ) -> Result<KafkaSource> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &spec.bootstrap_servers)
            .set(
                "group.id",
                spec.consumer_group
                    .clone()
                    .unwrap_or_else(|| default_group(rc)),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match spec.offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            .set("client.id", format!("obsrv-connector/{}", rc.instance_id()))
            // A replaced pod's partitions move on within seconds, not the 45s default.
            .set("session.timeout.ms", "10000");
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
        let consumer: StreamConsumer = c
            .create()
            .map_err(|e| Error::Config(format!("source consumer: {e}")))?;
        let mut partitions = 0;
        for t in &spec.topics {
            let md = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|e| Error::SourceUnreachable(format!("metadata of {t}: {e}")))?;
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
            topics: spec.topics.clone(),
            instance: rc.instance_id(),
            batch_size: batch_size.max(1),
            offsets: Offsets::new(),
            partitions,
        })
    }
}

impl Source for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut records = Vec::new();
        let first_wait = Duration::from_millis(500);
        let fill_until = Instant::now() + Duration::from_millis(100);
        while records.len() < self.batch_size {
            let wait = if records.is_empty() {
                first_wait
            } else {
                fill_until.saturating_duration_since(Instant::now())
            };
            let m = match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(Error::SourceUnreachable(format!("consume: {e}"))),
                Ok(Ok(m)) => m,
            };
            let (topic, p, off) = (m.topic().to_string(), m.partition(), m.offset());
            let id = event_id(&self.instance, &[&topic, &p.to_string(), &off.to_string()]);
            records.push(Record {
                id,
                payload: validate(m.payload().unwrap_or_default()),
            });
            self.offsets.entry(topic).or_default().insert(p, off + 1);
        }
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch {
            records,
            position: offsets_to_value(&self.offsets),
            watermark: Some(offsets_watermark(&self.offsets)),
        }))
    }

    fn max_parallelism(&self) -> Option<i32> {
        Some(self.partitions)
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        let c = self.consumer.clone();
        let topics = self.topics.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<Lag>> {
            let t = Duration::from_secs(5);
            let mut tpl = TopicPartitionList::new();
            for topic in &topics {
                let md = c
                    .fetch_metadata(Some(topic), t)
                    .map_err(|e| Error::SourceUnreachable(e.to_string()))?;
                for p in md.topics().iter().flat_map(|m| m.partitions()) {
                    tpl.add_partition(topic, p.id());
                }
            }
            let committed = c
                .committed_offsets(tpl, t)
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
            }))
        })
        .await
        .map_err(|e| Error::SourceUnreachable(e.to_string()))?
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(GroupCommitter(self.consumer.clone())))
    }
}

struct GroupCommitter(Arc<StreamConsumer>);

impl SourceCommitter for GroupCommitter {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let offsets = offsets_from_value(position)?;
        let mut tpl = TopicPartitionList::new();
        for (t, ps) in &offsets {
            for (p, o) in ps {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                    .map_err(|e| Error::State(e.to_string()))?;
            }
        }
        // Async: the commit is ordered after earlier ones by librdkafka; a lost commit only means
        // re-reading (at-least-once), never skipping.
        self.0
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| Error::SourceUnreachable(format!("commit offsets: {e}")))
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
