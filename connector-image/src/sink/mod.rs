//! Sinks: where records go. Kafka (Obsrv's ingest topic) is the one sink today; reverse ETL adds
//! databases, object stores and HTTP behind the same [`Sink`] trait and [`SINKS`] registry.
//!
//! A sink takes a whole batch and hands back an [`InFlight`]: the runner commits the batch's
//! position only once it and every batch before it are acknowledged.

pub mod kafka;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::{
    config::{Secrets, SinkSettings},
    envelope::Context,
    error::{Error, Result},
    source::Batch,
    state::StateStore,
};

/// Where a connector's records go.
pub trait Sink: Send + Sync + 'static {
    /// Hands every record of `batch` to the destination (waiting only while its buffers are full).
    fn send(&self, batch: Batch, syncts_ms: i64) -> BoxFuture<'_, Result<InFlight>>;

    /// Waits up to `timeout` for everything handed over to be delivered.
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<()>>;

    /// Checks the destination answers and can take records; says what was checked.
    fn check(&self) -> BoxFuture<'_, Result<String>>;

    /// Why deliveries are waiting, when the sink knows (a broker that does not answer): shown as
    /// a reason while the connector waits for its acknowledgements.
    fn stalled(&self) -> Option<String> {
        None
    }

    /// Where positions of sources that keep none of their own are stored (`key`: the connector
    /// instance, `kind`: its source kind), when this sink can keep them.
    fn positions(&self, _key: &str, _kind: &str) -> Option<StateStore> {
        None
    }

    /// Atomic writes of records and positions (exactlyOnce), when this sink has them.
    fn transactions(&self) -> Option<&dyn Transactions> {
        None
    }
}

/// Transactions of a sink: records handed over between `begin` and `commit` become visible
/// together with the positions added to the same transaction, or not at all.
pub trait Transactions: Send + Sync {
    /// Registers this writer (fencing an older one with the same id, aborting its transaction).
    fn init(&self) -> BoxFuture<'_, Result<()>>;
    fn begin(&self) -> BoxFuture<'_, Result<()>>;
    fn commit(&self) -> BoxFuture<'_, Result<()>>;
    fn abort(&self) -> BoxFuture<'_, Result<()>>;
    /// The id of the cluster the transactions run on (a Kafka source's offsets can only commit in
    /// a transaction of their own cluster).
    fn cluster_id(&self) -> BoxFuture<'_, Result<String>>;
    /// Adds a Kafka consumer group's next offsets to the open transaction.
    fn send_offsets(&self, offsets: kafka::GroupOffsets) -> BoxFuture<'_, Result<()>>;
}

/// Opens a sink; a `transactional_id` makes it transactional (exactlyOnce) under that id.
pub type OpenSink = fn(SinkSettings, &Secrets, Context, Option<String>) -> Result<Arc<dyn Sink>>;

/// One sink kind: its name (a field of the CRD's `spec.sink`) and how it opens.
pub struct SinkFactory {
    pub kind: &'static str,
    pub open: OpenSink,
}

/// Every sink kind.
pub static SINKS: &[&SinkFactory] = &[&kafka::FACTORY];

/// Opens the configured sink (Kafka: the only kind so far, and the default).
pub fn open(
    settings: SinkSettings,
    secrets: &Secrets,
    ctx: Context,
    transactional_id: Option<String>,
) -> Result<Arc<dyn Sink>> {
    let factory = SINKS
        .iter()
        .find(|f| f.kind == kafka::FACTORY.kind)
        .ok_or_else(|| Error::Config("no sink kind is registered".into()))?;
    (factory.open)(settings, secrets, ctx, transactional_id)
}

/// Counts of one batch, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ingested: u64,
    pub failed: u64,
    pub bytes_ingested: u64,
    pub bytes_failed: u64,
}

impl Outcome {
    /// Bytes handed to the producer: ingested and failed-topic records alike.
    pub fn bytes(&self) -> u64 {
        self.bytes_ingested + self.bytes_failed
    }
}

/// Delivery reports of a group of records: one counter per batch instead of a channel per
/// record, which keeps per-record overhead to an atomic increment.
#[derive(Debug, Default)]
pub struct Acks {
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    notify: Notify,
}

impl Acks {
    pub fn new() -> Arc<Acks> {
        Arc::new(Acks::default())
    }

    /// One more record to wait for.
    pub fn add(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// One record delivered (or failed, with why).
    pub fn done(&self, error: Option<String>) {
        if let Some(e) = error {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit when nobody waits yet: no lost wake-up.
            self.notify.notify_one();
        }
    }

    /// Waits until every record added so far is acknowledged; the first failure fails the group.
    pub async fn wait(&self) -> Result<()> {
        while self.remaining.load(Ordering::Acquire) > 0 {
            self.notify.notified().await;
        }
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(Error::SinkUnreachable(format!("delivery failed: {e}"))),
            None => Ok(()),
        }
    }
}

/// Records of a batch sent to the failed topic, by error code: how many, and the first message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Failures(pub BTreeMap<&'static str, (u64, String)>);

impl Failures {
    pub fn add(&mut self, code: &'static str, message: String) {
        self.0.entry(code).or_insert((0, message)).0 += 1;
    }
}

/// A batch handed to the sink, not yet acknowledged.
pub struct InFlight {
    pub acks: Arc<Acks>,
    pub position: serde_json::Value,
    pub watermark: Option<String>,
    pub outcome: Outcome,
    pub failures: Failures,
    pub started: Instant,
}

impl InFlight {
    /// Waits for every record of the batch; any failed delivery fails the batch (it will be re-read).
    pub async fn acked(&mut self) -> Result<()> {
        self.acks.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_wait_for_every_record_and_keep_the_first_failure() {
        let acks = Acks::new();
        acks.add();
        acks.add();
        let waiter = tokio::spawn({
            let a = acks.clone();
            async move { a.wait().await }
        });
        acks.done(None);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one record still unacknowledged");
        acks.done(Some("broker down".into()));
        let res = waiter.await.unwrap();
        assert!(
            matches!(res, Err(Error::SinkUnreachable(ref m)) if m.contains("broker down")),
            "{res:?}"
        );
        let empty = Acks::new();
        assert!(empty.wait().await.is_ok());
    }

    #[test]
    fn every_sink_kind_is_a_field_of_the_crd_sink() {
        let schema = serde_json::to_value(schemars::schema_for!(obsrv_crds::SinkSpec)).unwrap();
        for f in SINKS {
            assert!(
                schema["properties"].get(f.kind).is_some(),
                "sink kind {} is not a field of spec.sink",
                f.kind
            );
        }
    }
}
