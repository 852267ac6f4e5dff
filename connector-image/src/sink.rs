//! The Kafka sink: an idempotent producer writing envelopes to the ingest topic and failed records to
//! the failed topic. Delivery is tracked per batch so the runner can commit positions in order.

use std::time::{Duration, Instant};

use futures::future::join_all;
use obsrv_crds::runtime::env;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};

use crate::{
    config::{Secrets, SinkSettings, kafka_security},
    envelope::{Context, EVENT_ID_HEADER, Routed, route_at},
    error::{Error, Result},
    source::Batch,
};

/// librdkafka settings shared by everything that talks to the sink cluster.
pub fn client_config(s: &SinkSettings, secrets: &Secrets) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.bootstrap_servers);
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
        .set("queue.buffering.max.messages", "50000")
        .set("message.timeout.ms", "120000");
    if let Some(b) = s.batch_bytes {
        c.set("batch.size", b.to_string());
    }
    c
}

/// Counts of one batch, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ingested: u64,
    pub failed: u64,
    pub bytes_ingested: u64,
    pub bytes_failed: u64,
}

/// A batch handed to the producer, not yet acknowledged.
pub struct InFlight {
    deliveries: Vec<DeliveryFuture>,
    pub position: serde_json::Value,
    pub watermark: Option<String>,
    pub outcome: Outcome,
    pub started: Instant,
}

impl InFlight {
    /// Waits for every record of the batch; any failed delivery fails the batch (it will be re-read).
    pub async fn acked(&mut self) -> Result<()> {
        let deliveries = std::mem::take(&mut self.deliveries);
        for r in join_all(deliveries).await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(Error::SinkUnreachable(format!("delivery failed: {e}")));
                }
                Err(_) => return Err(Error::SinkUnreachable("producer dropped a delivery".into())),
            }
        }
        Ok(())
    }
}

pub struct Sink {
    producer: FutureProducer,
    settings: SinkSettings,
    ctx: Context,
}

impl Sink {
    pub fn new(settings: SinkSettings, secrets: &Secrets, ctx: Context) -> Result<Sink> {
        let producer: FutureProducer = producer_config(
            &settings,
            secrets,
            &format!("obsrv-connector/{}", ctx.instance),
        )
        .create()
        .map_err(|e| Error::Config(format!("sink producer: {e}")))?;
        Ok(Sink {
            producer,
            settings,
            ctx,
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub fn settings(&self) -> &SinkSettings {
        &self.settings
    }

    /// Checks the sink cluster answers and the ingest topic exists.
    pub async fn check(&self) -> Result<()> {
        let p = self.producer.clone();
        let topic = self.settings.topic.clone();
        tokio::task::spawn_blocking(move || {
            let md = p
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| Error::SinkUnreachable(format!("metadata: {e}")))?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
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
        let mut deliveries = Vec::with_capacity(batch.records.len());
        let syncts = syncts_ms.to_string();
        for rec in &batch.records {
            let (topic, bytes) = match route_at(
                &self.ctx,
                &rec.payload,
                &syncts,
                self.settings.max_message_bytes,
            ) {
                Routed::Ingest(b) => {
                    outcome.ingested += 1;
                    outcome.bytes_ingested += b.len() as u64;
                    (&self.settings.topic, b)
                }
                Routed::Failed(b) => {
                    outcome.failed += 1;
                    outcome.bytes_failed += b.len() as u64;
                    (&self.settings.failed_topic, b)
                }
            };
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: EVENT_ID_HEADER,
                value: Some(rec.id.as_bytes()),
            });
            let mut record = FutureRecord::to(topic)
                .key(rec.id.as_bytes())
                .payload(&bytes)
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => return Err(Error::SinkUnreachable(format!("produce: {e}"))),
                }
            }
        }
        Ok(InFlight {
            deliveries,
            position: batch.position,
            watermark: batch.watermark,
            outcome,
            started,
        })
    }

    /// Waits up to `timeout` for everything enqueued to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|e| Error::SinkUnreachable(e.to_string()))?
            .map_err(|e| Error::SinkUnreachable(format!("flush: {e}")))
    }
}
