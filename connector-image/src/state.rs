//! Source positions kept in a compacted topic on the sink cluster, keyed by connector identity
//! (`<namespace>/<name>`). The last record for the key is the position to resume from.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{BaseConsumer, Consumer},
    types::RDKafkaErrorCode,
};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::{
    error::{Error, Result},
    sink::{
        Acks,
        kafka::{SinkProducer, enqueue},
    },
};

/// The value written to the state topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateRecord {
    pub version: u32,
    /// Source kind, so a state written by another kind is not misread.
    pub source: String,
    pub position: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Epoch milliseconds of the commit.
    pub committed_at: i64,
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serializes")
    }

    /// Decodes a state value; `None` for a tombstone. A record for another source kind is an error:
    /// resuming from it would be wrong, starting over silently would duplicate everything.
    pub fn decode(bytes: Option<&[u8]>, kind: &str) -> Result<Option<StateRecord>> {
        let Some(b) = bytes else { return Ok(None) };
        let r: StateRecord = serde_json::from_slice(b)
            .map_err(|e| Error::State(format!("unreadable state record: {e}")))?;
        if r.source != kind {
            return Err(Error::State(format!(
                "saved state belongs to a {} source, this connector reads {kind}",
                r.source
            )));
        }
        Ok(Some(r))
    }
}

pub struct StateStore {
    producer: Arc<SinkProducer>,
    client: ClientConfig,
    topic: String,
    key: String,
    kind: String,
}

impl StateStore {
    pub fn new(
        producer: Arc<SinkProducer>,
        client: ClientConfig,
        topic: &str,
        key: &str,
        kind: &str,
    ) -> StateStore {
        StateStore {
            producer,
            client,
            topic: topic.into(),
            key: key.into(),
            kind: kind.into(),
        }
    }

    /// Creates the compacted state topic when it does not exist yet.
    pub async fn ensure_topic(&self) -> Result<()> {
        ensure_topic(&self.client, &self.topic, 1, true).await
    }

    /// The state topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// librdkafka settings of the sink cluster the state lives on (security included).
    pub fn client_config(&self) -> &ClientConfig {
        &self.client
    }

    /// This store with another key (a source that keeps several positions, e.g. one per shard).
    pub fn with_key(&self, key: &str) -> StateStore {
        StateStore {
            producer: self.producer.clone(),
            client: self.client.clone(),
            topic: self.topic.clone(),
            key: key.into(),
            kind: self.kind.clone(),
        }
    }

    /// The last committed state of each of `keys` that has one: one read of the topic.
    pub async fn load_keys(
        &self,
        keys: std::collections::BTreeSet<String>,
    ) -> Result<std::collections::BTreeMap<String, StateRecord>> {
        let cfg = self.reader_config();
        let topic = self.topic.clone();
        let kind = self.kind.clone();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = cfg
                .create()
                .map_err(|e| Error::SinkUnreachable(format!("state consumer: {e}")))?;
            let res = read_latest(&c, &topic, |k| keys.contains(k));
            destroy_in_background(c);
            let mut out = std::collections::BTreeMap::new();
            for (k, v) in res? {
                if let Some(r) = StateRecord::decode(v.as_deref(), &kind)? {
                    out.insert(k, r);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::State(e.to_string()))?
    }

    fn reader_config(&self) -> ClientConfig {
        let mut cfg = self.client.clone();
        cfg.set("group.id", format!("obsrv-connector-state-{}", self.key))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Positions written by an aborted exactlyOnce transaction must not be resumed from.
            .set("isolation.level", "read_committed");
        cfg
    }

    /// The last committed state for this connector, if any: reads the topic to its end.
    pub async fn load(&self) -> Result<Option<StateRecord>> {
        let cfg = self.reader_config();
        let topic = self.topic.clone();
        let key = self.key.clone();
        let kind = self.kind.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<StateRecord>> {
            let c: BaseConsumer = cfg
                .create()
                .map_err(|e| Error::SinkUnreachable(format!("state consumer: {e}")))?;
            let res = read_latest(&c, &topic, |k| k == key);
            destroy_in_background(c);
            match res?.remove(&key) {
                Some(v) => StateRecord::decode(v.as_deref(), &kind),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| Error::State(e.to_string()))?
    }

    /// Writes a position and waits for the broker's acknowledgement.
    pub async fn commit(
        &self,
        position: &serde_json::Value,
        watermark: Option<String>,
        now_ms: i64,
    ) -> Result<()> {
        let acks = Acks::new();
        self.enqueue(position, watermark, now_ms, &acks).await?;
        acks.wait()
            .await
            .map_err(|e| Error::SinkUnreachable(format!("state write: {e}")))
    }

    /// Enqueues a position without waiting (inside an exactlyOnce transaction).
    pub async fn enqueue(
        &self,
        position: &serde_json::Value,
        watermark: Option<String>,
        now_ms: i64,
        acks: &Arc<Acks>,
    ) -> Result<()> {
        let rec = StateRecord {
            version: 1,
            source: self.kind.clone(),
            position: position.clone(),
            watermark,
            committed_at: now_ms,
        };
        enqueue(
            &self.producer,
            &self.topic,
            Some(self.key.as_bytes()),
            Some(&rec.encode()),
            None,
            acks,
        )
        .await
    }

    /// Removes every position of connector `instance` (`deletionPolicy: Delete`): reads the
    /// topic to its end and writes a tombstone for each of the connector's keys ([`key_of`]) whose
    /// last value is a record, then waits for the broker's acknowledgement. Returns those keys;
    /// an absent topic or a connector that never committed gives none.
    pub async fn delete_all(&self, instance: &str) -> Result<Vec<String>> {
        let cfg = self.reader_config();
        let topic = self.topic.clone();
        let inst = instance.to_string();
        let keys = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let c: BaseConsumer = cfg
                .create()
                .map_err(|e| Error::SinkUnreachable(format!("state consumer: {e}")))?;
            let res = read_latest(&c, &topic, |k| key_of(&inst, k));
            destroy_in_background(c);
            Ok(res?
                .into_iter()
                .filter_map(|(k, v)| v.is_some().then_some(k))
                .collect())
        })
        .await
        .map_err(|e| Error::State(e.to_string()))??;
        if keys.is_empty() {
            return Ok(keys);
        }
        let acks = Acks::new();
        for k in &keys {
            enqueue(
                &self.producer,
                &self.topic,
                Some(k.as_bytes()),
                None,
                None,
                &acks,
            )
            .await?;
        }
        acks.wait()
            .await
            .map_err(|e| Error::SinkUnreachable(format!("state tombstones: {e}")))?;
        Ok(keys)
    }

    /// Removes the saved position (a tombstone), for a fresh start.
    pub async fn clear(&self) -> Result<()> {
        let acks = Acks::new();
        enqueue(
            &self.producer,
            &self.topic,
            Some(self.key.as_bytes()),
            None,
            None,
            &acks,
        )
        .await?;
        acks.wait().await
    }
}

/// Whether a state-topic key belongs to connector `instance`: its own key, or one under it
/// (`<instance>#...`, e.g. a file source's shards). Kubernetes names hold no `#`, so the keys of
/// `ns/orders` never match those of `ns/orders-2`.
pub fn key_of(instance: &str, key: &str) -> bool {
    key.strip_prefix(instance)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('#'))
}

/// Creates `topic` with `partitions` (compacted or not) on the cluster of `client` when it does not
/// exist yet; without the right to create topics, one made by an administrator is fine.
pub async fn ensure_topic(
    client: &ClientConfig,
    topic: &str,
    partitions: i32,
    compacted: bool,
) -> Result<()> {
    let admin: AdminClient<_> = client
        .create()
        .map_err(|e| Error::SinkUnreachable(format!("admin client: {e}")))?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    if compacted {
        new = new.set("cleanup.policy", "compact");
    }
    let res = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| Error::SinkUnreachable(format!("create topic {topic}: {e}")))?;
    for r in res {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => {
                let md = admin
                    .inner()
                    .fetch_metadata(Some(topic), Duration::from_secs(10));
                let exists = md.is_ok_and(|m| {
                    m.topics()
                        .iter()
                        .any(|t| t.error().is_none() && !t.partitions().is_empty())
                });
                if !exists {
                    return Err(Error::SinkUnreachable(format!("create topic {t}: {e}")));
                }
                tracing::warn!(topic = %t, error = %e, "topic not created, using the existing one");
            }
        }
    }
    destroy_in_background(admin);
    Ok(())
}

/// librdkafka's destroy waits for the client's threads to wind down (~100 ms); nothing here needs
/// to wait for it, and a start would pay it twice.
fn destroy_in_background<T: Send + 'static>(client: T) {
    std::thread::spawn(move || drop(client));
}

/// Reads the state topic to its end: the last value (`None`: a tombstone) of every key `wanted`.
fn read_latest(
    c: &BaseConsumer,
    topic: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Option<Vec<u8>>>> {
    let timeout = Duration::from_secs(10);
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| Error::SinkUnreachable(format!("state topic metadata: {e}")))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = Vec::new();
    for p in parts {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| Error::SinkUnreachable(format!("state topic offsets: {e}")))?;
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| Error::State(e.to_string()))?;
            remaining.push((p, hi));
        }
    }
    let mut last = BTreeMap::new();
    if remaining.is_empty() {
        return Ok(last);
    }
    c.assign(&tpl)
        .map_err(|e| Error::State(format!("assign state topic: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::State("timed out reading the state topic".into()));
        }
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.map_err(|e| Error::SinkUnreachable(format!("reading state: {e}")))?;
            if let Some(k) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                && wanted(k)
            {
                last.insert(k.to_string(), m.payload().map(<[u8]>::to_vec));
            }
            let (p, o) = (m.partition(), m.offset());
            remaining.retain(|(rp, hi)| !(*rp == p && o + 1 >= *hi));
        }
        // Transaction markers take offsets but are never delivered: the consumer's position
        // (past them) tells when a partition is read to its end.
        if let Ok(pos) = c.position() {
            for e in pos.elements() {
                if let Offset::Offset(o) = e.offset() {
                    remaining.retain(|(rp, hi)| !(*rp == e.partition() && o >= *hi));
                }
            }
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connectors_keys_are_its_own_and_its_shards_only() {
        assert!(key_of("ns/orders", "ns/orders"));
        assert!(key_of("ns/orders", "ns/orders#shard-3-of-16"));
        assert!(!key_of("ns/orders", "ns/orders-2"));
        assert!(!key_of("ns/orders", "ns/orders-2#shard-3-of-16"));
        assert!(!key_of("ns/orders", "other/orders"));
        assert!(!key_of("ns/orders", "ns/order"));
    }

    #[test]
    fn state_records_round_trip_and_refuse_another_kind() {
        let r = StateRecord {
            version: 1,
            source: "postgres".into(),
            position: serde_json::json!({"tables": {}}),
            watermark: Some("w".into()),
            committed_at: 5,
        };
        let b = r.encode();
        assert_eq!(StateRecord::decode(Some(&b), "postgres").unwrap(), Some(r));
        assert!(matches!(
            StateRecord::decode(Some(&b), "s3"),
            Err(Error::State(_))
        ));
        assert_eq!(StateRecord::decode(None, "postgres").unwrap(), None);
        assert!(StateRecord::decode(Some(b"garbage"), "postgres").is_err());
    }
}
