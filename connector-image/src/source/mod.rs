//! Sources: each hands out batches of records, every batch carrying the position it reaches. The
//! runner commits a batch's position only once the sink has acknowledged it and every batch before.
//!
//! This is also the SDK's contract: a custom connector implements [`Source`] and an `open`
//! function, registers them in a [`Registry`], and calls [`crate::cli::main`]. The built-in kinds
//! use the very same API (see [`Registry::builtin`]).

pub mod acks;
pub mod azure_blob;
pub mod cdc;
pub mod gcs;
pub mod kafka;
pub mod marketplace;
pub mod message;
pub mod mqtt;
pub mod nats;
pub mod objects;
pub mod rabbitmq;
pub mod s3;
pub mod sql;
pub mod tls;

use std::{future::Future, sync::Arc};

use futures::{FutureExt, future::BoxFuture};
use obsrv_crds::{Delivery, runtime::RuntimeConfig};
use serde::de::DeserializeOwned;

use crate::{
    config::Secrets,
    envelope::Payload,
    error::{Error, Result},
    sink::{Sink, Transactions},
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
    /// Bytes not yet read, when the source can tell (WAL retained, objects pending).
    pub bytes: Option<i64>,
}

/// A source of records: what a connector implements.
///
/// ```
/// use obsrv_connector::source::{Batch, Record, Source};
/// use obsrv_connector::envelope::{Payload, event_id};
///
/// /// Counts to `end`, ten numbers a batch; the position is the next number.
/// struct Counter { next: u64, end: u64 }
///
/// impl Source for Counter {
///     async fn next_batch(&mut self) -> obsrv_connector::Result<Option<Batch>> {
///         if self.next >= self.end {
///             return Ok(None); // caught up: the runner waits for the poll interval
///         }
///         let to = (self.next + 10).min(self.end);
///         let records = (self.next..to)
///             .map(|n| Record {
///                 id: event_id("demo/counter", &[&n.to_string()]),
///                 payload: Payload::Json(format!("{{\"n\":{n}}}")),
///             })
///             .collect();
///         self.next = to;
///         Ok(Some(Batch { records, position: serde_json::json!(to), watermark: Some(to.to_string()) }))
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut c = Counter { next: 0, end: 25 };
/// let mut seen = 0;
/// while let Some(b) = c.next_batch().await.unwrap() { seen += b.records.len(); }
/// assert_eq!(seen, 25);
/// # });
/// ```
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
    fn lag_task(&self) -> Option<BoxFuture<'static, Result<Option<Lag>>>> {
        None
    }

    /// Whether the source can tell its lag at all. `false` (MQTT, core NATS: nothing says how
    /// much is waiting) keeps the lag unknown in `/status` instead of 0 when caught up.
    fn lag_known(&self) -> bool {
        true
    }

    /// Where positions are kept: `None` = the state topic; otherwise the source commits them itself
    /// (Kafka consumer groups, broker acknowledgements).
    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        None
    }

    /// What `obsrv-connector check` prints after `source: ok` (e.g. `s3 bucket/prefix, 3 objects`).
    fn describe(&self) -> String {
        String::new()
    }
}

/// The kind's own field of `spec.source` (`field`, e.g. `|s| s.nats.as_ref()`), where each
/// factory and cleanup starts: the registry picks them by the field that is set, so a miss means
/// a kind registered under the wrong name.
pub fn spec_of<'a, S>(
    rc: &'a RuntimeConfig,
    kind: &str,
    field: impl FnOnce(&'a obsrv_crds::SourceSpec) -> Option<&'a S>,
) -> Result<&'a S> {
    field(&rc.spec.source).ok_or_else(|| {
        Error::Config(format!(
            "spec.source.{kind} is not set: the {kind} source was opened for another kind"
        ))
    })
}

/// Commits positions where the source keeps them (a Kafka consumer group).
pub trait SourceCommitter: Send + Sync {
    /// atLeastOnce: commits `position` once everything before it is acknowledged.
    fn commit(&self, position: &serde_json::Value) -> Result<()>;

    /// Commit each batch as soon as it and those before it are acknowledged, rather than about
    /// once a second: a broker that stops delivering while a window of messages is unacknowledged
    /// (AMQP prefetch, JetStream and MQTT in-flight limits) would otherwise stall the source.
    fn commits_each_batch(&self) -> bool {
        false
    }

    /// exactlyOnce: whether the batch reaching `position` may still be delivered. A Kafka batch read
    /// before a rebalance may not: the consumer re-reads its records from the committed offsets.
    fn is_current(&self, _position: &serde_json::Value) -> bool {
        true
    }

    /// exactlyOnce: adds `position` to the sink's open transaction, so it commits with the batch.
    /// `false` when the batch is no longer current (see [`SourceCommitter::is_current`]).
    fn add_to_transaction<'a>(
        &'a self,
        _position: &'a serde_json::Value,
        _txn: &'a dyn Transactions,
    ) -> BoxFuture<'a, Result<bool>> {
        async {
            Err(Error::Config(
                "this source cannot commit its position in a transaction".into(),
            ))
        }
        .boxed()
    }
}

/// [`Source`] behind a pointer, for the runner (which runs whichever kind the config names).
pub trait DynSource: Send {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch>>>;
    fn max_parallelism(&self) -> Option<i32>;
    fn lag(&mut self) -> BoxFuture<'_, Result<Option<Lag>>>;
    fn lag_task(&self) -> Option<BoxFuture<'static, Result<Option<Lag>>>>;
    fn lag_known(&self) -> bool;
    fn committer(&self) -> Option<Box<dyn SourceCommitter>>;
    fn describe(&self) -> String;
}

impl<S: Source> DynSource for S {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch>>> {
        Source::next_batch(self).boxed()
    }
    fn max_parallelism(&self) -> Option<i32> {
        Source::max_parallelism(self)
    }
    fn lag(&mut self) -> BoxFuture<'_, Result<Option<Lag>>> {
        Source::lag(self).boxed()
    }
    fn lag_task(&self) -> Option<BoxFuture<'static, Result<Option<Lag>>>> {
        Source::lag_task(self)
    }
    fn lag_known(&self) -> bool {
        Source::lag_known(self)
    }
    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Source::committer(self)
    }
    fn describe(&self) -> String {
        Source::describe(self)
    }
}

/// A source opened by a registry entry.
pub type BoxedSource = Box<dyn DynSource>;

/// Everything a source's `open` gets: the config it runs, its Secret values, where to resume.
#[derive(Clone)]
pub struct OpenContext {
    pub config: Arc<RuntimeConfig>,
    pub secrets: Arc<Secrets>,
    /// The last committed position (from the state topic), `None` on a first start.
    pub position: Option<serde_json::Value>,
    /// The sink records go to (a Kafka source's exactlyOnce checks it shares the sink's cluster).
    pub sink: Arc<dyn Sink>,
}

impl OpenContext {
    /// `<namespace>/<name>`: the connector instance, for event ids and state keys.
    pub fn instance(&self) -> String {
        self.config.instance_id()
    }

    pub fn delivery(&self) -> Delivery {
        self.config.spec.delivery
    }

    /// A custom source's `spec.source.custom.config`, as the connector's own config type.
    pub fn custom_config<T: DeserializeOwned>(&self) -> Result<T> {
        let c = self.config.spec.source.custom.as_ref().ok_or_else(|| {
            Error::Config("this connector reads spec.source.custom, which is not set".into())
        })?;
        serde_json::from_value(c.config.clone())
            .map_err(|e| Error::Config(format!("spec.source.custom.config: {e}")))
    }

    /// A value of a Secret mounted for a custom source (`spec.source.custom.secrets`).
    pub fn secret(&self, name: &str, key: &str) -> Result<String> {
        self.secrets.file(name, key)
    }
}

type OpenFn = dyn Fn(OpenContext) -> BoxFuture<'static, Result<BoxedSource>> + Send + Sync;
type CleanupFn = dyn Fn(CleanupContext) -> BoxFuture<'static, Result<String>> + Send + Sync;

/// What a kind's cleanup gets when its Connector is deleted (`obsrv-connector cleanup`, run by
/// the operator as a short Job with the Connector's own config and Secrets).
#[derive(Clone)]
pub struct CleanupContext {
    pub config: Arc<RuntimeConfig>,
    pub secrets: Arc<Secrets>,
}

/// One source kind of the runtime: its name (a field of the CRD's `spec.source`) and how it opens.
#[derive(Clone)]
pub struct SourceFactory {
    pub kind: &'static str,
    /// Positions live with the source (a Kafka consumer group) rather than in the state topic.
    pub keeps_own_positions: bool,
    open: Arc<OpenFn>,
    /// Releases what the source holds on its side (a replication slot); `None`: nothing.
    cleanup: Option<Arc<CleanupFn>>,
    /// Deletes the positions the source keeps itself (a Kafka consumer group's offsets), for
    /// `deletionPolicy: Delete`; `None`: it keeps none outside the state topic.
    delete_positions: Option<Arc<CleanupFn>>,
}

impl SourceFactory {
    /// A kind opened by `open` (an `async fn(OpenContext) -> Result<YourSource>`).
    pub fn new<F, Fut, S>(kind: &'static str, open: F) -> SourceFactory
    where
        F: Fn(OpenContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S>> + Send + 'static,
        S: Source,
    {
        SourceFactory {
            kind,
            keeps_own_positions: false,
            open: Arc::new(move |ctx| {
                let fut = open(ctx);
                async move { fut.await.map(|s| Box::new(s) as BoxedSource) }.boxed()
            }),
            cleanup: None,
            delete_positions: None,
        }
    }

    /// What deleting the Connector must release on the source side (`cleanup` returns what it
    /// did, for the Job's log). The CRD kind says `needs_cleanup()` so the operator runs it.
    pub fn with_cleanup<F, Fut>(mut self, cleanup: F) -> SourceFactory
    where
        F: Fn(CleanupContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String>> + Send + 'static,
    {
        self.cleanup = Some(Arc::new(move |ctx| cleanup(ctx).boxed()));
        self
    }

    /// Runs the kind's cleanup; says what was done (or that nothing is held).
    pub async fn cleanup(&self, ctx: CleanupContext) -> Result<String> {
        match &self.cleanup {
            Some(f) => f(ctx).await,
            None => Ok(format!("nothing held on the {} source", self.kind)),
        }
    }

    /// How to delete the positions the source keeps on its own side (a consumer group) when the
    /// Connector is deleted with `deletionPolicy: Delete` (`obsrv-connector cleanup
    /// --delete-state`); returns what it removed, for the Job's log. Positions in the state topic
    /// need no hook: the runtime tombstones them for every kind.
    pub fn with_positions_cleanup<F, Fut>(mut self, delete: F) -> SourceFactory
    where
        F: Fn(CleanupContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String>> + Send + 'static,
    {
        self.delete_positions = Some(Arc::new(move |ctx| delete(ctx).boxed()));
        self
    }

    /// Deletes the positions the source keeps itself; `None` when it keeps none there.
    pub async fn delete_positions(&self, ctx: CleanupContext) -> Option<Result<String>> {
        match &self.delete_positions {
            Some(f) => Some(f(ctx).await),
            None => None,
        }
    }

    /// The source commits its positions itself ([`Source::committer`]): no state topic.
    pub fn keeping_own_positions(mut self) -> SourceFactory {
        self.keeps_own_positions = true;
        self
    }

    pub async fn open(&self, ctx: OpenContext) -> Result<BoxedSource> {
        (self.open)(ctx).await
    }
}

/// The source kinds a runtime binary can run.
#[derive(Clone, Default)]
pub struct Registry {
    sources: Vec<SourceFactory>,
}

impl Registry {
    /// The kinds of the shared connector image.
    pub fn builtin() -> Registry {
        Registry::default()
            .with(sql::postgres())
            .with(sql::mysql())
            .with(sql::mariadb())
            .with(kafka::factory())
            .with(s3::factory())
            .with(azure_blob::factory())
            .with(gcs::factory())
            .with(marketplace::factory())
            .with(cdc::postgres::factory())
            .with(cdc::binlog::mysql())
            .with(cdc::binlog::mariadb())
            .with(rabbitmq::factory())
            .with(nats::factory())
            .with(mqtt::factory())
    }

    /// A custom connector: `open` runs `spec.source.custom`.
    pub fn custom<F, Fut, S>(open: F) -> Registry
    where
        F: Fn(OpenContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S>> + Send + 'static,
        S: Source,
    {
        Registry::default().with(SourceFactory::new(
            obsrv_crds::source::custom::CUSTOM.name,
            open,
        ))
    }

    /// Adds (or replaces) a kind.
    pub fn with(mut self, f: SourceFactory) -> Registry {
        self.sources.retain(|s| s.kind != f.kind);
        self.sources.push(f);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&SourceFactory> {
        self.sources.iter().find(|s| s.kind == kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.sources.iter().map(|s| s.kind)
    }

    /// The factory of the kind `config` names, or why this binary cannot run it.
    pub fn for_config(&self, config: &RuntimeConfig) -> Result<&SourceFactory> {
        let source = config
            .spec
            .source
            .resolve()
            .map_err(|e| Error::Config(e.to_string()))?;
        self.get(source.kind.name).ok_or_else(|| {
            let known: Vec<&str> = self.kinds().collect();
            let hint = if source.spec.image().is_some() {
                format!(
                    " (a {} source runs its own image, spec.source.{}.image)",
                    source.kind.name, source.kind.name
                )
            } else {
                String::new()
            };
            Error::Config(format!(
                "this binary runs the source kinds {known:?}, not {}{hint}",
                source.kind.name
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crd_kind_has_a_runtime_factory_and_no_other() {
        let runtime: Vec<&str> = Registry::builtin().kinds().collect();
        for kind in obsrv_crds::SOURCE_KINDS {
            assert!(
                runtime.contains(&kind.name),
                "{} is in the CRD but has no runtime factory",
                kind.name
            );
        }
        for k in &runtime {
            assert!(
                obsrv_crds::source_kind(k).is_some(),
                "{k} has a runtime factory but is not a CRD kind"
            );
        }
        let mut sorted = runtime.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), runtime.len(), "a kind is registered twice");
    }
}
