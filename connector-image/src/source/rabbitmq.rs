//! RabbitMQ (AMQP 0-9-1): one queue, read with a prefetch window by competing consumers (each
//! replica is one). A message is acknowledged (`basic.ack`, multiple, up to the committed delivery
//! tag) only after the sink has its record and every record before it; whatever a replica held
//! unacknowledged goes back to the queue when its channel closes (a crash, a lost connection).
//!
//! Record id: the `message_id` property when the publisher set one; otherwise a digest of the
//! exchange, routing key, properties (without the `x-delivery-count` header a quorum queue adds on
//! redelivery) and payload, so a redelivered message keeps its id. Identical messages without a
//! `message_id` therefore share an id.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    tcp::{AsyncTcpStream, RustlsConnector},
    types::{AMQPValue, FieldTable},
    uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo},
};
use obsrv_crds::{MessageFormat, RabbitmqSourceSpec, runtime::env};
use serde_json::{Map, Value, json};

use super::{
    Batch, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory,
    acks::{self, AckCommitter, Unacked},
    kafka::MAX_BATCH_BYTES,
    message::{self, bytes_json, content_digest},
    tls,
};
use crate::{
    config::Secrets,
    envelope::event_id,
    error::{Error, Result},
};

/// How long a read waits for the first message before saying it is caught up.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// How long a batch keeps filling once its first message is in.
const FILL: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Heartbeats find a dead connection that no TCP reset announced.
const HEARTBEAT_SECS: u16 = 10;

/// The `rabbitmq` kind. Positions are acknowledgements to the broker, not state-topic records.
pub fn factory() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::rabbitmq::RABBITMQ.name, open).keeping_own_positions()
}

async fn open(ctx: OpenContext) -> Result<RabbitmqSource> {
    let spec = super::spec_of(&ctx.config, "rabbitmq", |s| s.rabbitmq.as_ref())?;
    acks::at_least_once_only(ctx.delivery(), "rabbitmq")?;
    RabbitmqSource::connect(spec, &ctx.secrets, &ctx.instance()).await
}

/// Where the broker is, for messages (never with credentials).
fn endpoint(spec: &RabbitmqSourceSpec, port: u16) -> String {
    let scheme = if tls::enabled(spec.tls.as_ref()) {
        "amqps"
    } else {
        "amqp"
    };
    format!("{scheme}://{}:{port} vhost {}", spec.host, spec.vhost)
}

/// The runtime's reason for an AMQP failure: refused logins and permissions are `AuthFailed`, a
/// missing queue, exchange or vhost or a queue declared differently is `Schema`.
fn classify(e: &lapin::Error, what: &str) -> Error {
    let msg = format!("{what}: {e}");
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return Error::SourceUnreachable(msg);
    };
    let text = amqp.get_message().as_str();
    match amqp.get_id() {
        403 => Error::AuthFailed(msg),
        404 | 406 => Error::Schema(msg),
        // NOT_ALLOWED: a vhost that does not exist, or one the user may not use.
        530 if text.contains("not found") => Error::Schema(msg),
        530 => Error::AuthFailed(msg),
        _ => Error::SourceUnreachable(msg),
    }
}

pub struct RabbitmqSource {
    /// Kept open while any acknowledgement may still be sent (the acker task holds it too).
    _connection: Arc<Connection>,
    consumer: Consumer,
    /// A channel of its own for queue depth: a passive declare of a deleted queue closes its channel.
    lag_channel: Channel,
    unacked: Arc<Unacked<u64>>,
    through: Arc<tokio::sync::watch::Sender<u64>>,
    window: usize,
    batch_max: usize,
    format: MessageFormat,
    instance: String,
    queue: String,
    endpoint: String,
    /// What stopped reading, reported after the records read before it are handed on.
    failed: Option<Error>,
    ready_at_open: u32,
    consumers_at_open: u32,
}

impl RabbitmqSource {
    pub async fn connect(
        spec: &RabbitmqSourceSpec,
        secrets: &Secrets,
        instance: &str,
    ) -> Result<RabbitmqSource> {
        let tls = tls::client_config(spec.tls.as_ref(), secrets.get(env::SOURCE_TLS_CA))?;
        let port = match spec.port {
            Some(p) => u16::try_from(p)
                .map_err(|_| Error::Config("port must be between 1 and 65535".into()))?,
            None if tls.is_some() => 5671,
            None => 5672,
        };
        let endpoint = endpoint(spec, port);
        let (username, password) = match (
            secrets.get(env::SOURCE_USERNAME),
            secrets.get(env::SOURCE_PASSWORD),
        ) {
            (Some(u), Some(p)) => (u.to_string(), p.to_string()),
            _ => ("guest".to_string(), "guest".to_string()),
        };
        let uri = AMQPUri {
            scheme: if tls.is_some() {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username, password },
                host: spec.host.clone(),
                port,
            },
            vhost: spec.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(HEARTBEAT_SECS),
                connection_timeout: Some(CONNECT_TIMEOUT.as_millis() as u64),
                ..AMQPQueryString::default()
            },
        };
        let props = ConnectionProperties::default()
            .with_connection_name(format!("obsrv-connector {instance}").into());
        let connecting = async {
            let runtime = lapin::runtime::default_runtime()?;
            match tls {
                None => Connection::connect_uri_with_runtime(uri, props, runtime).await,
                // Our own TLS (lapin's verifies always): `require` encrypts without checking.
                Some(config) => {
                    let connector = RustlsConnector::from(Arc::new(config));
                    let host = spec.host.clone();
                    Connection::connector(
                        uri,
                        runtime,
                        async move |uri, runtime| {
                            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((
                                uri.authority.host.as_str(),
                                uri.authority.port,
                            ))
                            .await?
                            .collect();
                            let tcp = AsyncTcpStream::connect(&runtime, addrs).await?;
                            Ok(tcp.into_rustls(&connector, &host).await?)
                        },
                        props,
                    )
                    .await
                }
            }
        };
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| Error::SourceUnreachable(format!("{endpoint}: no connection within 15s")))?
            .map_err(|e| classify(&e, &endpoint))?;
        let connection = Arc::new(connection);
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| classify(&e, &endpoint))?;
        let prefetch = u16::try_from(spec.prefetch.clamp(1, 65535)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| classify(&e, &endpoint))?;
        let queue_name = spec.queue.as_str();
        let declared = channel
            .queue_declare(
                queue_name.into(),
                QueueDeclareOptions {
                    passive: !spec.declare,
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(&e, &format!("queue {queue_name} on {endpoint}")))?;
        for b in &spec.bindings {
            let keys: Vec<&str> = if b.routing_keys.is_empty() {
                vec![""]
            } else {
                b.routing_keys.iter().map(String::as_str).collect()
            };
            for key in keys {
                channel
                    .queue_bind(
                        queue_name.into(),
                        b.exchange.as_str().into(),
                        key.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        classify(
                            &e,
                            &format!(
                                "binding queue {queue_name} to exchange {} with key {key:?} on {endpoint}",
                                b.exchange
                            ),
                        )
                    })?;
            }
        }
        let lag_channel = connection
            .create_channel()
            .await
            .map_err(|e| classify(&e, &endpoint))?;
        let consumer = channel
            .basic_consume(
                queue_name.into(),
                format!("obsrv-connector {instance} {}", std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(&e, &format!("consume queue {queue_name} on {endpoint}")))?;

        let unacked = Unacked::new();
        let (through, rx) = AckCommitter::channel();
        let acker_connection = connection.clone();
        let ack_channel = channel.clone();
        tokio::spawn(
            unacked
                .clone()
                .run(rx, move |tags: Vec<u64>| {
                    let ch = ack_channel.clone();
                    // Delivery tags rise on a channel: one `multiple` ack covers every tag up to the last.
                    let last = tags.last().copied().unwrap_or_default();
                    async move {
                        ch.basic_ack(last, BasicAckOptions { multiple: true })
                            .await
                            .map_err(|e| Error::SourceUnreachable(format!("basic.ack: {e}")))
                    }
                })
                .map(move |_| drop(acker_connection)),
        );

        let window = usize::from(prefetch);
        Ok(RabbitmqSource {
            _connection: connection,
            consumer,
            lag_channel,
            unacked,
            through,
            window,
            batch_max: batch_records(window),
            format: spec.format,
            instance: instance.to_string(),
            queue: spec.queue.clone(),
            endpoint,
            failed: None,
            ready_at_open: declared.message_count(),
            consumers_at_open: declared.consumer_count(),
        })
    }

    fn record(&self, d: &Delivery) -> Record {
        let id = match d.properties.message_id() {
            Some(m) if !m.as_str().is_empty() => {
                event_id(&self.instance, &["amqp-message-id", m.as_str()])
            }
            _ => {
                let props = properties_json(&d.properties, false).to_string();
                let digest = content_digest(&[
                    d.exchange.as_str().as_bytes(),
                    d.routing_key.as_str().as_bytes(),
                    props.as_bytes(),
                    &d.data,
                ]);
                event_id(&self.instance, &["amqp-content", &digest])
            }
        };
        Record {
            id,
            payload: message::payload(&self.format, &d.data, || metadata(d)),
        }
    }
}

/// Records per batch: an eighth of the prefetch window, so the batches the pipeline holds
/// unacknowledged (read ahead, queued, in flight) never fill the window and stall the reads.
pub fn batch_records(window: usize) -> usize {
    (window / 8).clamp(1, 10_000)
}

/// Each replica's share of the ready messages, so the operator's sum over replicas is the queue's
/// depth (rounded up: a replica with anything left to read never reports 0).
pub fn lag_share(ready: u32, consumers: u32) -> i64 {
    u64::from(ready).div_ceil(u64::from(consumers.max(1))) as i64
}

impl Source for RabbitmqSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut last = 0;
        let mut fill_until: Option<Instant> = None;
        while records.len() < self.batch_max && bytes < MAX_BATCH_BYTES {
            // The broker sends nothing more until acknowledgements free the window.
            if !self
                .unacked
                .has_room(self.window, records.is_empty(), FIRST_WAIT)
                .await
            {
                break;
            }
            let wait =
                fill_until.map_or(FIRST_WAIT, |t| t.saturating_duration_since(Instant::now()));
            let d = match tokio::time::timeout(wait, self.consumer.next()).await {
                Err(_) => break,
                Ok(None) => {
                    self.failed = Some(Error::SourceUnreachable(format!(
                        "the broker cancelled the consumer of queue {} on {} (queue deleted?)",
                        self.queue, self.endpoint
                    )));
                    break;
                }
                Ok(Some(Err(e))) => {
                    self.failed = Some(classify(
                        &e,
                        &format!("consume queue {} on {}", self.queue, self.endpoint),
                    ));
                    break;
                }
                Ok(Some(Ok(d))) => d,
            };
            fill_until.get_or_insert_with(|| Instant::now() + FILL);
            bytes += d.data.len();
            records.push(self.record(&d));
            last = self.unacked.push(d.delivery_tag);
        }
        if records.is_empty() {
            return match self.failed.take() {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        Ok(Some(Batch {
            records,
            position: acks::position(last),
            watermark: Some(format!("queue {}: {last} messages read", self.queue)),
        }))
    }

    fn max_parallelism(&self) -> Option<i32> {
        None
    }

    fn lag_task(&self) -> Option<BoxFuture<'static, Result<Option<Lag>>>> {
        let channel = self.lag_channel.clone();
        let queue = self.queue.clone();
        let endpoint = self.endpoint.clone();
        Some(
            async move {
                let q = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| classify(&e, &format!("queue {queue} on {endpoint}")))?;
                Ok(Some(Lag {
                    records: lag_share(q.message_count(), q.consumer_count()),
                    seconds: None,
                    bytes: None,
                }))
            }
            .boxed(),
        )
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(AckCommitter {
            through: self.through.clone(),
        }))
    }

    fn describe(&self) -> String {
        format!(
            "rabbitmq queue {} on {}: {} messages ready, {} other consumers",
            self.queue, self.endpoint, self.ready_at_open, self.consumers_at_open
        )
    }
}

/// What `metadata: true` copies into `obsrv_meta.source.message`.
fn metadata(d: &Delivery) -> Value {
    json!({
        "exchange": d.exchange.as_str(),
        "routingKey": d.routing_key.as_str(),
        "redelivered": d.redelivered,
        "properties": properties_json(&d.properties, true),
    })
}

/// The message's properties as JSON (headers under `headers`). `all`: also `x-delivery-count`,
/// which a quorum queue changes on every redelivery (left out of record ids).
fn properties_json(p: &BasicProperties, all: bool) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    put("contentType", s(p.content_type()));
    put("contentEncoding", s(p.content_encoding()));
    put("deliveryMode", p.delivery_mode().map(Value::from));
    put("priority", p.priority().map(Value::from));
    put("correlationId", s(p.correlation_id()));
    put("replyTo", s(p.reply_to()));
    put("expiration", s(p.expiration()));
    put("messageId", s(p.message_id()));
    put("timestamp", p.timestamp().map(Value::from));
    put("type", s(p.kind()));
    put("userId", s(p.user_id()));
    put("appId", s(p.app_id()));
    if let Some(h) = p.headers() {
        let headers: Map<String, Value> = h
            .inner()
            .iter()
            .filter(|(k, _)| all || k.as_str() != "x-delivery-count")
            .map(|(k, v)| (k.as_str().to_string(), amqp_json(v)))
            .collect();
        put("headers", Some(Value::Object(headers)));
    }
    Value::Object(m)
}

/// An AMQP field value as JSON; byte arrays as text when they are UTF-8, else base64.
fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => (*b).into(),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            value.into()
        }
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongString(s) => bytes_json(s.as_bytes()),
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(amqp_json).collect(),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => t
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), amqp_json(v)))
            .collect::<Map<_, _>>()
            .into(),
        AMQPValue::ByteArray(b) => bytes_json(b.as_slice()),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    #[test]
    fn a_replica_reports_its_share_of_the_queue() {
        assert_eq!(lag_share(10, 3), 4);
        assert_eq!(lag_share(10, 0), 10);
        assert_eq!(lag_share(0, 2), 0);
        assert_eq!(lag_share(1, 4), 1, "something left is never 0");
    }

    #[test]
    fn batches_leave_room_in_the_window() {
        assert_eq!(batch_records(2000), 250);
        assert_eq!(batch_records(3), 1);
    }

    #[test]
    fn properties_render_as_json_and_ids_ignore_the_delivery_count() {
        let mut h = FieldTable::default();
        h.insert(
            "tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
        let p = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_timestamp(1_700_000_000)
            .with_headers(h);
        assert_eq!(
            properties_json(&p, true),
            json!({"contentType": "application/json", "timestamp": 1_700_000_000u64,
                   "headers": {"tenant": "acme", "x-delivery-count": 2}})
        );
        assert_eq!(
            properties_json(&p, false)["headers"],
            json!({"tenant": "acme"})
        );
    }
}
