//! The Kafka sink: an idempotent producer writing envelopes to the ingest topic and failed records to
//! the failed topic. Delivery is tracked per batch so the runner can commit positions in order.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{FutureExt, future::BoxFuture};
use obsrv_crds::{Compression, runtime::env};
use rdkafka::{
    ClientConfig, ClientContext, TopicPartitionList,
    consumer::ConsumerGroupMetadata,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer},
};

use super::{Acks, Failures, InFlight, Outcome, Sink, SinkFactory, Transactions};
use crate::{
    config::{Secrets, SinkSettings, kafka_security},
    envelope::{Context, EVENT_ID_HEADER, Payload, Routed, route_at},
    error::{Error, Result},
    source::Batch,
    state::StateStore,
};

/// The Kafka sink kind (`spec.sink.kafka`).
pub static FACTORY: SinkFactory = SinkFactory {
    kind: "kafka",
    open: |settings, secrets, ctx, transactional_id| {
        Ok(Arc::new(KafkaSink::new(
            settings,
            secrets,
            ctx,
            transactional_id,
        )?))
    },
};

/// What a Kafka transaction needs to commit a batch's position in a source's consumer group.
pub struct GroupOffsets {
    /// The next offsets to read, per topic and partition.
    pub offsets: TopicPartitionList,
    /// The consumer's group generation, taken while the batch is current; the broker refuses the
    /// offsets once the group has moved on.
    pub group: ConsumerGroupMetadata,
}

/// librdkafka settings shared by everything that talks to the sink cluster.
pub fn client_config(s: &SinkSettings, secrets: &Secrets) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.bootstrap_servers)
        // With sparse connections a client connects to a broker only once a request needs it, and
        // the idempotent producer asks for its id on a 500 ms timer that first finds no broker
        // connected: every start waited a second before its first record could go.
        .set("enable.sparse.connections", "false");
    if let Ok(d) = std::env::var("OBSRV_KAFKA_DEBUG") {
        c.set("debug", d);
    }
    let creds = match (
        secrets.get(env::SINK_USERNAME),
        secrets.get(env::SINK_PASSWORD),
    ) {
        (Some(u), Some(p)) => Some((u, p)),
        _ => None,
    };
    for (k, v) in kafka_security(
        s.tls.as_ref(),
        s.sasl.as_ref(),
        secrets.get(env::SINK_TLS_CA),
        creds,
    ) {
        c.set(k, v);
    }
    c
}

/// The producer's configuration. Bounded queue so memory does not grow with the source's size.
pub fn producer_config(s: &SinkSettings, secrets: &Secrets, client_id: &str) -> ClientConfig {
    let mut c = client_config(s, secrets);
    c.set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", s.compression.as_str())
        .set("linger.ms", s.linger_ms.to_string())
        // Room for the envelope's framing above maxMessageBytes; bigger records never reach here.
        .set(
            "message.max.bytes",
            (s.max_message_bytes + 4096).max(1_000_000).to_string(),
        )
        .set("queue.buffering.max.kbytes", "8192")
        .set("queue.buffering.max.messages", "20000")
        .set("message.timeout.ms", "120000")
        // Keys land on the partitions the Java client (Flink, Kafka Connect) would choose; it is
        // also cheaper per record than the default CRC32 of the key.
        .set("partitioner", "murmur2_random");
    if let Some(b) = s.batch_bytes {
        c.set("batch.size", b.to_string());
    }
    if s.compression == Compression::Zstd {
        // zstd's fastest level: the envelope's repeated framing compresses well at any level, and
        // the default (3) costs the producer's broker thread about a third more CPU per record.
        c.set("compression.level", "1");
    }
    c
}

/// The transactional id of a connector (one writer per connector: a restarted pod fences the old).
pub fn transactional_id(instance: &str) -> String {
    format!("obsrv-connector.{}", instance.replace('/', "."))
}

/// The transactional id of one replica of a Kafka-source connector (`replica`: the pod's name
/// in a cluster, host name and process id elsewhere). Replicas share the work, so one shared id would have them fence each other;
/// stale replicas are fenced by the consumer group's generation instead (the broker refuses their
/// offsets once the group moved on).
pub fn replica_transactional_id(instance: &str, replica: &str) -> String {
    format!("{}.{replica}", transactional_id(instance))
}

/// Routes librdkafka's delivery reports to the [`Acks`] of each record's batch.
/// Also keeps what librdkafka last reported about the cluster, so a broker outage (deliveries
/// waiting, not failing) shows as a reason while the connector waits.
#[derive(Default)]
pub struct AckContext {
    /// A transport error since the last delivery, when there is one.
    problem: Mutex<Option<String>>,
}

impl AckContext {
    /// Why deliveries are not progressing, as librdkafka last said.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientContext for AckContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // Logged once per change (librdkafka repeats these on every reconnect attempt).
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        let now = format!("{error}: {reason}");
        if p.as_deref() != Some(&now) {
            tracing::debug!(error = %now, "sink cluster error");
            *p = Some(now);
        }
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        if result.is_ok() {
            *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        acks.done(result.as_ref().err().map(|(e, _)| e.to_string()));
    }
}

/// The producer every sink write goes through (records, failed records, state).
pub type SinkProducer = ThreadedProducer<AckContext>;

/// Creates a producer for `config`.
pub fn create_producer(config: &ClientConfig) -> Result<Arc<SinkProducer>> {
    config
        .create_with_context(AckContext::default())
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("sink producer: {e}")))
}

/// Enqueues one record, waiting while the bounded queue is full. `acks` counts it.
pub async fn enqueue(
    producer: &SinkProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: Option<OwnedHeaders>,
    acks: &Arc<Acks>,
) -> Result<()> {
    let mut record: BaseRecord<'_, [u8], [u8], Arc<Acks>> =
        BaseRecord::with_opaque_to(topic, acks.clone());
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = payload {
        record = record.payload(p);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    enqueue_record(producer, record, acks).await
}

/// [`enqueue`] of a record already built; `acks` must be its opaque.
async fn enqueue_record(
    producer: &SinkProducer,
    mut record: BaseRecord<'_, [u8], [u8], Arc<Acks>>,
    acks: &Arc<Acks>,
) -> Result<()> {
    acks.add();
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => {
                acks.done(None);
                return Err(Error::SinkUnreachable(format!("produce: {e}")));
            }
        }
    }
}

/// Runs a blocking transaction call of the producer off the async threads.
async fn txn_call(
    producer: &Arc<SinkProducer>,
    what: &'static str,
    f: fn(&SinkProducer) -> rdkafka::error::KafkaResult<()>,
) -> Result<()> {
    let p = producer.clone();
    tokio::task::spawn_blocking(move || f(&p))
        .await
        .map_err(|e| Error::SinkUnreachable(e.to_string()))?
        .map_err(|e| Error::SinkUnreachable(format!("{what}: {e}")))
}

/// Sends every enqueued record now (linger cut short) and waits until all are delivered, or
/// `timeout`. rdkafka's `Producer::flush` asks librdkafka without waiting and then polls the event
/// queue for up to 100 ms, a queue the producer's own thread serves: every flush, and so every
/// exactlyOnce commit, took 100 ms longer than its deliveries (a quarter of a transaction's time
/// in `bench --source postgres`). librdkafka's flush itself waits on the count of undelivered
/// records, which reaches zero once that thread has handed out their delivery reports.
pub fn flush_now(p: &SinkProducer, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the live producer's handle, which `p` keeps alive for the call;
    // rd_kafka_flush may be called from any thread.
    let err = unsafe { rdkafka::bindings::rd_kafka_flush(p.client().native_ptr(), ms) };
    match RDKafkaErrorCode::from(err) {
        RDKafkaErrorCode::NoError => Ok(()),
        code => Err(KafkaError::Flush(code)),
    }
}

/// Obsrv's ingest topic (and the failed and state topics) on one Kafka cluster.
pub struct KafkaSink {
    producer: Arc<SinkProducer>,
    settings: SinkSettings,
    ctx: Context,
    secrets: Secrets,
}

impl KafkaSink {
    /// A sink; a `transactional_id` makes it transactional (exactlyOnce).
    pub fn new(
        settings: SinkSettings,
        secrets: &Secrets,
        ctx: Context,
        transactional_id: Option<String>,
    ) -> Result<KafkaSink> {
        let mut config = producer_config(
            &settings,
            secrets,
            &format!("obsrv-connector/{}", ctx.instance),
        );
        if let Some(id) = transactional_id {
            config
                .set("transactional.id", id)
                // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
                .set("transaction.timeout.ms", "120000");
        }
        let producer = create_producer(&config)?;
        Ok(KafkaSink {
            producer,
            settings,
            ctx,
            secrets: secrets.clone(),
        })
    }

    pub fn producer(&self) -> &Arc<SinkProducer> {
        &self.producer
    }

    pub fn settings(&self) -> &SinkSettings {
        &self.settings
    }

    /// `exactlyOnce`: registers the transactional id (fencing an older writer, aborting its open
    /// transaction).
    pub async fn init_transactions(&self) -> Result<()> {
        txn_call(&self.producer, "init transactions", |p| {
            p.init_transactions(Duration::from_secs(30))
        })
        .await
    }

    pub async fn begin(&self) -> Result<()> {
        txn_call(&self.producer, "begin transaction", |p| {
            p.begin_transaction()
        })
        .await
    }

    /// Commits the open transaction: every record enqueued since `begin` becomes visible at once.
    /// Flushed first with [`flush_now`], so rdkafka's own flush in the commit finds nothing left.
    pub async fn commit_transaction(&self) -> Result<()> {
        txn_call(&self.producer, "commit transaction", |p| {
            let timeout = Duration::from_secs(60);
            flush_now(p, timeout)?;
            p.commit_transaction(timeout)
        })
        .await
    }

    pub async fn abort(&self) -> Result<()> {
        txn_call(&self.producer, "abort transaction", |p| {
            p.abort_transaction(Duration::from_secs(60))
        })
        .await
    }

    /// Adds a Kafka source's next offsets to the open transaction: the consumer group commits them
    /// with the transaction's records, or not at all.
    pub async fn send_offsets_to_transaction(&self, g: GroupOffsets) -> Result<()> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            p.send_offsets_to_transaction(&g.offsets, &g.group, Duration::from_secs(60))
        })
        .await
        .map_err(|e| Error::SinkUnreachable(e.to_string()))?
        .map_err(|e| Error::SinkUnreachable(format!("send offsets to transaction: {e}")))
    }

    /// The id of the sink cluster (exactlyOnce needs a Kafka source on the same cluster).
    pub async fn cluster_id(&self) -> Result<String> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.client().fetch_cluster_id(Duration::from_secs(10)))
            .await
            .map_err(|e| Error::SinkUnreachable(e.to_string()))?
            .ok_or_else(|| Error::SinkUnreachable("the sink cluster did not say its id".into()))
    }

    /// Checks the sink cluster answers and the ingest topic exists.
    pub async fn check(&self) -> Result<String> {
        let p = self.producer.clone();
        let topic = self.settings.topic.clone();
        let bootstrap = self.settings.bootstrap_servers.clone();
        tokio::task::spawn_blocking(move || {
            let md = p
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| {
                    Error::SinkUnreachable(format!(
                        "no broker answered at {bootstrap} within 10s ({e}): is Kafka listening there?"
                    ))
                })?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(format!(
                    "kafka {bootstrap} topic {topic}, {} partitions",
                    t.partitions().len()
                )),
                _ => Err(Error::SinkUnreachable(format!(
                    "ingest topic {topic} not found on the sink cluster"
                ))),
            }
        })
        .await
        .map_err(|e| Error::SinkUnreachable(e.to_string()))?
    }

    /// Enqueues every record of `batch` (ingest or failed topic); waits only when the producer's
    /// bounded queue is full.
    pub async fn send(&self, batch: Batch, syncts_ms: i64) -> Result<InFlight> {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        let mut failures = Failures::default();
        let acks = Acks::new();
        let syncts = syncts_ms.to_string();
        // The producer copies each payload, so one envelope buffer serves the whole batch.
        let mut buf = Vec::new();
        let mut failed;
        for rec in &batch.records {
            let ingest = match &rec.payload {
                Payload::Json(event) | Payload::Keyed { json: event, .. } => {
                    self.ctx.envelope_into(&mut buf, event, &syncts);
                    buf.len() <= self.settings.max_message_bytes
                }
                Payload::JsonWithMeta { event, meta } => {
                    self.ctx
                        .envelope_with_meta_into(&mut buf, event, meta, &syncts);
                    buf.len() <= self.settings.max_message_bytes
                }
                Payload::Unparseable { .. } => false,
            };
            let (topic, bytes) = if ingest {
                outcome.ingested += 1;
                outcome.bytes_ingested += buf.len() as u64;
                (&self.settings.topic, &buf)
            } else {
                // Oversize or unparseable: the failed-topic document (route_at decides which).
                match route_at(
                    &self.ctx,
                    &rec.payload,
                    &syncts,
                    self.settings.max_message_bytes,
                ) {
                    Routed::Ingest(b) => {
                        outcome.ingested += 1;
                        outcome.bytes_ingested += b.len() as u64;
                        failed = b;
                        (&self.settings.topic, &failed)
                    }
                    Routed::Failed { doc, code, message } => {
                        outcome.failed += 1;
                        outcome.bytes_failed += doc.len() as u64;
                        failures.add(code, message);
                        failed = doc;
                        (&self.settings.failed_topic, &failed)
                    }
                }
            };
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: EVENT_ID_HEADER,
                value: Some(rec.id.as_bytes()),
            });
            // The message timestamp is the envelope's syncts (librdkafka would read the clock
            // for every record otherwise).
            let record = BaseRecord::with_opaque_to(topic.as_str(), acks.clone())
                .key(match (&rec.payload, ingest) {
                    // A failed-topic document is keyed by its event id like any other.
                    (Payload::Keyed { key, .. }, true) => key.as_bytes(),
                    _ => rec.id.as_bytes(),
                })
                .payload(bytes.as_slice())
                .headers(headers)
                .timestamp(syncts_ms);
            enqueue_record(&self.producer, record, &acks).await?;
        }
        Ok(InFlight {
            acks,
            position: batch.position,
            watermark: batch.watermark,
            outcome,
            failures,
            started,
        })
    }

    /// Waits up to `timeout` for everything enqueued to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || flush_now(&p, timeout))
            .await
            .map_err(|e| Error::SinkUnreachable(e.to_string()))?
            .map_err(|e| Error::SinkUnreachable(format!("flush: {e}")))
    }
}

impl Sink for KafkaSink {
    fn send(&self, batch: Batch, syncts_ms: i64) -> BoxFuture<'_, Result<InFlight>> {
        KafkaSink::send(self, batch, syncts_ms).boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, Result<()>> {
        KafkaSink::flush(self, timeout).boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String>> {
        KafkaSink::check(self).boxed()
    }

    fn stalled(&self) -> Option<String> {
        self.producer.context().problem().map(|p| {
            format!(
                "deliveries wait: no broker of {} answers ({p}); nothing is lost, the records go out once it does",
                self.settings.bootstrap_servers
            )
        })
    }

    fn positions(&self, key: &str, kind: &str) -> Option<StateStore> {
        Some(StateStore::new(
            self.producer.clone(),
            client_config(&self.settings, &self.secrets),
            &self.settings.state_topic,
            key,
            kind,
        ))
    }

    fn transactions(&self) -> Option<&dyn Transactions> {
        Some(self)
    }
}

impl Transactions for KafkaSink {
    fn init(&self) -> BoxFuture<'_, Result<()>> {
        self.init_transactions().boxed()
    }
    fn begin(&self) -> BoxFuture<'_, Result<()>> {
        KafkaSink::begin(self).boxed()
    }
    fn commit(&self) -> BoxFuture<'_, Result<()>> {
        self.commit_transaction().boxed()
    }
    fn abort(&self) -> BoxFuture<'_, Result<()>> {
        KafkaSink::abort(self).boxed()
    }
    fn cluster_id(&self) -> BoxFuture<'_, Result<String>> {
        KafkaSink::cluster_id(self).boxed()
    }
    fn send_offsets(&self, offsets: GroupOffsets) -> BoxFuture<'_, Result<()>> {
        self.send_offsets_to_transaction(offsets).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_source_replicas_get_their_own_transactional_id() {
        assert_eq!(
            transactional_id("shop/orders"),
            "obsrv-connector.shop.orders"
        );
        assert_eq!(
            replica_transactional_id("shop/clicks", "clicks-7d9f-x2x.1"),
            "obsrv-connector.shop.clicks.clicks-7d9f-x2x.1"
        );
    }
}
