//! Sources: each hands out batches of records, every batch carrying the position it reaches. The
//! runner commits a batch's position only once the sink has acknowledged it and every batch before.

pub mod kafka;
pub mod s3;
pub mod sql;

use std::future::Future;

use rdkafka::{TopicPartitionList, consumer::ConsumerGroupMetadata};

use crate::{
    envelope::Payload,
    error::{Error, Result},
};

/// One record read from a source.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Deterministic id derived from the record's source position (see [`crate::envelope::event_id`]).
    pub id: String,
    pub payload: Payload,
}

/// Records read together, and the position reached once all of them (and all before) are delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Opaque to the runner: stored as-is in the state topic (or given back to the source to commit).
    pub position: serde_json::Value,
    /// Human-readable position for `/status`.
    pub watermark: Option<String>,
}

/// How far behind the source the connector is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    pub records: i64,
    pub seconds: Option<f64>,
}

/// A source of records.
pub trait Source: Send + 'static {
    /// The next batch after everything handed out so far; `None` when there is nothing new now
    /// (the runner waits for the poll interval).
    fn next_batch(&mut self) -> impl Future<Output = Result<Option<Batch>>> + Send;

    /// How many replicas could share the work (Kafka: partitions; a table: 1).
    fn max_parallelism(&self) -> Option<i32> {
        Some(1)
    }

    /// Current lag, when the source can tell cheaply enough. Called now and then, not per batch.
    fn lag(&mut self) -> impl Future<Output = Result<Option<Lag>>> + Send {
        async { Ok(None) }
    }

    /// A measurement of the current lag that owns what it needs, so the runner can run it beside
    /// reading instead of between batches; `None` = use [`Source::lag`].
    fn lag_task(&self) -> Option<futures::future::BoxFuture<'static, Result<Option<Lag>>>> {
        None
    }

    /// Where positions are kept: `None` = the state topic; otherwise the source commits them itself
    /// (Kafka consumer groups).
    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        None
    }
}

/// What a Kafka transaction needs to commit a batch's position in the source's consumer group.
pub struct GroupOffsets {
    /// The next offsets to read, per topic and partition.
    pub offsets: TopicPartitionList,
    /// The consumer's group generation, taken while the batch is current; the broker refuses the
    /// offsets once the group has moved on.
    pub group: ConsumerGroupMetadata,
}

/// Commits positions where the source keeps them (a Kafka consumer group).
pub trait SourceCommitter: Send + Sync {
    /// atLeastOnce: commits `position` once everything before it is acknowledged.
    fn commit(&self, position: &serde_json::Value) -> Result<()>;

    /// exactlyOnce: whether the batch reaching `position` may still be delivered. A Kafka batch read
    /// before a rebalance may not: the consumer re-reads its records from the committed offsets.
    fn is_current(&self, _position: &serde_json::Value) -> bool {
        true
    }

    /// exactlyOnce: what to send to the open transaction so `position` commits with the batch;
    /// `None` when the batch is no longer current (see [`SourceCommitter::is_current`]).
    fn transaction_offsets(&self, _position: &serde_json::Value) -> Result<Option<GroupOffsets>> {
        Err(Error::Config(
            "this source cannot commit its position in a transaction".into(),
        ))
    }
}
