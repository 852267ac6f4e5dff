//! NATS. Mode `jetStream` (default): a durable, explicit-ack pull consumer on a stream, shared by
//! the replicas; a message is acknowledged only after the sink has its record and every record
//! before it, and the server redelivers what was not acknowledged within `ackWait`. Record id: the
//! stream and the message's stream sequence. Lag: the consumer's pending count, each replica
//! reporting its share (see [`lag_share`]).
//!
//! Mode `core`: a queue-group subscription, AT MOST ONCE (core NATS keeps nothing: what arrives
//! while no replica is connected, or is in flight at a crash, is gone). Record id: the
//! `Nats-Msg-Id` header when the publisher set one, else one per delivery (core NATS never
//! redelivers). Lag: unknown.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::{
    Client, ConnectErrorKind, ConnectOptions, HeaderMap, ServerAddr, Subject, Subscriber,
    connection::State,
    jetstream::{
        self,
        consumer::{
            AckPolicy, Consumer, DeliverPolicy,
            pull::{self, MessagesErrorKind},
        },
        context::ConsumerInfoErrorKind,
        stream::Stream as JsStream,
    },
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use obsrv_crds::{MessageFormat, NatsDeliver, NatsMode, NatsSourceSpec, runtime::env};
use serde_json::{Map, Value, json};

use super::{
    Batch, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory,
    acks::{self, AckCommitter, NoAcks, Unacked},
    kafka::MAX_BATCH_BYTES,
    message,
    rabbitmq::batch_records,
    tls,
};
use crate::{
    config::{Secrets, parse_duration},
    envelope::event_id,
    error::{Error, Result},
};

const FIRST_WAIT: Duration = Duration::from_secs(1);
const FILL: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server sends a heartbeat this often while a pull waits; two missed ones end the read.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A consumer created by the connector lets replicas hold this many messages unacknowledged in
/// all (each replica bounds its own share with `prefetch`).
const CONSUMER_MAX_ACK_PENDING: i64 = 1_000_000;

/// The `nats` kind. Positions are acknowledgements to the server, not state-topic records.
pub fn factory() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::nats::NATS.name, open).keeping_own_positions()
}

async fn open(ctx: OpenContext) -> Result<NatsSource> {
    let spec = super::spec_of(&ctx.config, "nats", |s| s.nats.as_ref())?;
    if spec.mode == NatsMode::JetStream {
        acks::at_least_once_only(ctx.delivery(), "nats")?;
    }
    let name = spec
        .consumer
        .clone()
        .unwrap_or_else(|| default_consumer(&ctx.config.namespace, &ctx.config.name));
    NatsSource::connect(spec, &ctx.secrets, &ctx.instance(), &name).await
}

/// `obsrv-<namespace>-<name>`, with the characters NATS names refuse replaced.
pub fn default_consumer(namespace: &str, name: &str) -> String {
    format!("obsrv-{namespace}-{name}")
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' | ' ' | '/' | '\\' => '_',
            c => c,
        })
        .collect()
}

/// Each replica's share of the consumer's pending messages, so that the operator's sum over the
/// replicas is the consumer's pending count: `pending` times this replica's share of what the
/// consumer delivered since the last measurement (all replicas pull from one consumer, so the
/// share is how much of the work this replica does). Without deliveries since then, the last share.
pub fn lag_share(pending: u64, mine: u64, all: u64, last_share: f64) -> (i64, f64) {
    let share = if all == 0 {
        last_share
    } else {
        (mine as f64 / all as f64).clamp(0.0, 1.0)
    };
    let lag = (pending as f64 * share).ceil() as i64;
    (lag.min(pending as i64), share)
}

/// What the lag measurement remembers between runs.
struct ShareState {
    /// This replica's deliveries and the consumer's, at the last measurement.
    mine: u64,
    all: u64,
    share: f64,
}

fn connect_error(e: async_nats::ConnectError, servers: &str) -> Error {
    let msg = format!("{servers}: {e}");
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            Error::AuthFailed(msg)
        }
        ConnectErrorKind::ServerParse => Error::Config(msg),
        _ => Error::SourceUnreachable(msg),
    }
}

struct JetStreamReader {
    messages: pull::Stream,
    stream: String,
    consumer: Consumer<pull::Config>,
    unacked: Arc<Unacked<Subject>>,
    through: Arc<tokio::sync::watch::Sender<u64>>,
    window: usize,
    /// Messages this replica received, for its share of the lag.
    received: Arc<AtomicU64>,
    share: Arc<Mutex<ShareState>>,
}

enum Reader {
    /// Boxed: a pull consumer and its stream are large.
    JetStream(Box<JetStreamReader>),
    Core {
        subscriber: Subscriber,
        subject: String,
        /// Tells this process's deliveries apart from another's (core ids are per delivery).
        run: String,
        received: u64,
    },
}

pub struct NatsSource {
    client: Client,
    reader: Reader,
    format: MessageFormat,
    instance: String,
    servers: String,
    batch_max: usize,
    failed: Option<Error>,
    described: String,
}

impl NatsSource {
    pub async fn connect(
        spec: &NatsSourceSpec,
        secrets: &Secrets,
        instance: &str,
        consumer_name: &str,
    ) -> Result<NatsSource> {
        let servers_text = spec.servers.join(",");
        let servers: Vec<ServerAddr> = spec
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse()
                    .map_err(|e| Error::Config(format!("servers[{i}] {s:?}: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut options = ConnectOptions::new()
            .name(format!("obsrv-connector {instance}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(Duration::from_secs(10));
        if let (Some(u), Some(p)) = (
            secrets.get(env::SOURCE_USERNAME),
            secrets.get(env::SOURCE_PASSWORD),
        ) {
            options = options.user_and_password(u.to_string(), p.to_string());
        }
        if let Some(config) =
            tls::client_config(spec.tls.as_ref(), secrets.get(env::SOURCE_TLS_CA))?
        {
            options = options.require_tls(true).tls_client_config(config);
        }
        let client = options
            .connect(servers)
            .await
            .map_err(|e| connect_error(e, &servers_text))?;
        let prefetch = usize::try_from(spec.prefetch.clamp(1, 100_000)).unwrap_or(1);
        let (reader, described) = match spec.mode {
            NatsMode::JetStream => {
                Self::jetstream(spec, &client, &servers_text, consumer_name, prefetch).await?
            }
            NatsMode::Core => {
                let subject = spec.subject.clone().unwrap_or_default();
                let subscriber = client
                    .queue_subscribe(subject.clone(), consumer_name.to_string())
                    .await
                    .map_err(|e| {
                        Error::SourceUnreachable(format!(
                            "subscribe {subject} on {servers_text}: {e}"
                        ))
                    })?;
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let described = format!(
                    "nats core subject {subject} (queue group {consumer_name}, at most once) on {servers_text}"
                );
                let run = format!("{}-{nanos}", std::process::id());
                (
                    Reader::Core {
                        subscriber,
                        subject,
                        run,
                        received: 0,
                    },
                    described,
                )
            }
        };
        Ok(NatsSource {
            client,
            reader,
            format: spec.format,
            instance: instance.to_string(),
            servers: servers_text,
            batch_max: batch_records(prefetch),
            failed: None,
            described,
        })
    }

    async fn jetstream(
        spec: &NatsSourceSpec,
        client: &Client,
        servers: &str,
        name: &str,
        prefetch: usize,
    ) -> Result<(Reader, String)> {
        let stream_name = spec.stream.clone().unwrap_or_default();
        let js = jetstream::new(client.clone());
        let stream: JsStream = js.get_stream(&stream_name).await.map_err(|e| {
            let msg = format!("stream {stream_name} on {servers}: {e}");
            match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Error::Schema(msg)
                }
                jetstream::context::GetStreamErrorKind::EmptyName
                | jetstream::context::GetStreamErrorKind::InvalidStreamName => Error::Config(msg),
                _ => Error::SourceUnreachable(msg),
            }
        })?;
        let filter = spec.subject.clone().unwrap_or_default();
        let mut consumer: Consumer<pull::Config> = match stream.consumer_info(name).await {
            Ok(info) => {
                if info.config.filter_subject != filter {
                    return Err(Error::Config(format!(
                        "consumer {name} of stream {stream_name} filters subject {:?}, the spec \
                         asks for {filter:?}: delete the consumer or name another in consumer",
                        info.config.filter_subject
                    )));
                }
                stream
                    .get_consumer::<pull::Config>(name)
                    .await
                    .map_err(|e| {
                        Error::Config(format!(
                            "consumer {name} of stream {stream_name} is not a pull consumer: {e}"
                        ))
                    })?
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                let ack_wait = parse_duration(&spec.ack_wait)
                    .map_err(|e| Error::Config(format!("ackWait: {e}")))?;
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(name.to_string()),
                        description: Some("obsrv-connector".into()),
                        filter_subject: filter.clone(),
                        deliver_policy: match spec.deliver {
                            NatsDeliver::All => DeliverPolicy::All,
                            NatsDeliver::New => DeliverPolicy::New,
                        },
                        ack_policy: AckPolicy::Explicit,
                        ack_wait,
                        max_ack_pending: CONSUMER_MAX_ACK_PENDING,
                        ..pull::Config::default()
                    })
                    .await
                    .map_err(|e| {
                        Error::SourceUnreachable(format!(
                            "create consumer {name} on stream {stream_name} ({servers}): {e}"
                        ))
                    })?
            }
            Err(e) => {
                return Err(Error::SourceUnreachable(format!(
                    "consumer {name} of stream {stream_name} on {servers}: {e}"
                )));
            }
        };
        let info = consumer
            .info()
            .await
            .map_err(|e| Error::SourceUnreachable(format!("consumer {name} on {servers}: {e}")))?;
        let described = format!(
            "nats jetstream stream {stream_name} consumer {name}{} on {servers}: {} pending",
            if filter.is_empty() {
                String::new()
            } else {
                format!(" (subject {filter})")
            },
            info.num_pending
        );
        let delivered = info.delivered.consumer_sequence;
        let messages = consumer
            .stream()
            .max_messages_per_batch(prefetch)
            .heartbeat(HEARTBEAT)
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| {
                Error::SourceUnreachable(format!("pull from consumer {name} on {servers}: {e}"))
            })?;

        let unacked = Unacked::new();
        let (through, rx) = AckCommitter::channel();
        let acker = client.clone();
        tokio::spawn(unacked.clone().run(rx, move |replies: Vec<Subject>| {
            let client = acker.clone();
            async move {
                for reply in replies {
                    client
                        .publish(reply, "".into())
                        .await
                        .map_err(|e| Error::SourceUnreachable(format!("ack: {e}")))?;
                }
                Ok(())
            }
        }));
        Ok((
            Reader::JetStream(Box::new(JetStreamReader {
                messages,
                stream: stream_name,
                consumer,
                unacked,
                through,
                window: prefetch,
                received: Arc::new(AtomicU64::new(0)),
                share: Arc::new(Mutex::new(ShareState {
                    mine: 0,
                    all: delivered,
                    share: 1.0,
                })),
            })),
            described,
        ))
    }

    fn disconnected(&self) -> Option<Error> {
        (self.client.connection_state() == State::Disconnected)
            .then(|| Error::SourceUnreachable(format!("{}: disconnected", self.servers)))
    }
}

impl Source for NatsSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut fill_until: Option<Instant> = None;
        let watermark;
        let position;
        match &mut self.reader {
            Reader::JetStream(js) => {
                let JetStreamReader {
                    messages,
                    stream,
                    unacked,
                    window,
                    received,
                    ..
                } = &mut **js;
                let mut last = 0;
                let mut last_seq = 0;
                while records.len() < self.batch_max && bytes < MAX_BATCH_BYTES {
                    if !unacked
                        .has_room(*window, records.is_empty(), FIRST_WAIT)
                        .await
                    {
                        break;
                    }
                    let wait = fill_until
                        .map_or(FIRST_WAIT, |t| t.saturating_duration_since(Instant::now()));
                    let m = match tokio::time::timeout(wait, messages.next()).await {
                        Err(_) => break,
                        Ok(None) => {
                            self.failed = Some(Error::SourceUnreachable(format!(
                                "{}: the pull from stream {stream} ended",
                                self.servers
                            )));
                            break;
                        }
                        Ok(Some(Err(e))) => {
                            let msg = format!("pull from stream {stream} on {}: {e}", self.servers);
                            self.failed = Some(match e.kind() {
                                MessagesErrorKind::ConsumerDeleted => Error::Schema(msg),
                                MessagesErrorKind::PushBasedConsumer => Error::Config(msg),
                                _ => Error::SourceUnreachable(msg),
                            });
                            break;
                        }
                        Ok(Some(Ok(m))) => m,
                    };
                    fill_until.get_or_insert_with(|| Instant::now() + FILL);
                    received.fetch_add(1, Ordering::Relaxed);
                    let (seq, meta) = match m.info() {
                        Ok(info) => (
                            info.stream_sequence,
                            self.format.metadata.then(|| {
                                json!({
                                    "subject": m.subject.as_str(),
                                    "stream": info.stream,
                                    "streamSequence": info.stream_sequence,
                                    "published": (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
                                    "headers": headers_json(m.headers.as_ref()),
                                })
                            }),
                        ),
                        Err(e) => {
                            self.failed = Some(Error::SourceUnreachable(format!(
                                "a message of stream {stream} without JetStream metadata: {e}"
                            )));
                            break;
                        }
                    };
                    bytes += m.payload.len();
                    records.push(Record {
                        id: event_id(&self.instance, &["jetstream", stream, &seq.to_string()]),
                        payload: message::payload(&self.format, &m.payload, || {
                            meta.unwrap_or_default()
                        }),
                    });
                    let Some(reply) = m.message.reply.clone() else {
                        continue;
                    };
                    last = unacked.push(reply);
                    last_seq = seq;
                }
                position = acks::position(last);
                watermark = format!("stream {stream} sequence {last_seq}");
            }
            Reader::Core {
                subscriber,
                subject,
                run,
                received,
            } => {
                while records.len() < self.batch_max && bytes < MAX_BATCH_BYTES {
                    let wait = fill_until
                        .map_or(FIRST_WAIT, |t| t.saturating_duration_since(Instant::now()));
                    let m = match tokio::time::timeout(wait, subscriber.next()).await {
                        Err(_) => break,
                        Ok(None) => {
                            self.failed = Some(Error::SourceUnreachable(format!(
                                "{}: the subscription to {subject} ended",
                                self.servers
                            )));
                            break;
                        }
                        Ok(Some(m)) => m,
                    };
                    fill_until.get_or_insert_with(|| Instant::now() + FILL);
                    *received += 1;
                    bytes += m.payload.len();
                    let id = match m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    {
                        Some(id) => event_id(&self.instance, &["nats-msg-id", id.as_str()]),
                        None => event_id(&self.instance, &["core", run, &received.to_string()]),
                    };
                    records.push(Record {
                        id,
                        payload: message::payload(&self.format, &m.payload, || {
                            json!({
                                "subject": m.subject.as_str(),
                                "headers": headers_json(m.headers.as_ref()),
                            })
                        }),
                    });
                }
                position = acks::position(*received);
                watermark = format!("subject {subject}: {received} messages received");
            }
        }
        if records.is_empty() {
            if let Some(e) = self.failed.take().or_else(|| self.disconnected()) {
                return Err(e);
            }
            return Ok(None);
        }
        Ok(Some(Batch {
            records,
            position,
            watermark: Some(watermark),
        }))
    }

    fn max_parallelism(&self) -> Option<i32> {
        None
    }

    fn lag_known(&self) -> bool {
        matches!(self.reader, Reader::JetStream(_))
    }

    fn lag_task(&self) -> Option<BoxFuture<'static, Result<Option<Lag>>>> {
        let Reader::JetStream(js) = &self.reader else {
            return None;
        };
        let mut consumer = js.consumer.clone();
        let received = js.received.clone();
        let share = js.share.clone();
        let servers = self.servers.clone();
        Some(
            async move {
                let info = consumer.info().await.map_err(|e| {
                    Error::SourceUnreachable(format!("consumer info on {servers}: {e}"))
                })?;
                let (pending, all) = (info.num_pending, info.delivered.consumer_sequence);
                let mine = received.load(Ordering::Relaxed);
                let mut s = share.lock().unwrap_or_else(|e| e.into_inner());
                let (lag, new_share) = lag_share(
                    pending,
                    mine.saturating_sub(s.mine),
                    all.saturating_sub(s.all),
                    s.share,
                );
                *s = ShareState {
                    mine,
                    all,
                    share: new_share,
                };
                Ok(Some(Lag {
                    records: lag,
                    seconds: None,
                    bytes: None,
                }))
            }
            .boxed(),
        )
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(match &self.reader {
            Reader::JetStream(js) => Box::new(AckCommitter {
                through: js.through.clone(),
            }),
            Reader::Core { .. } => Box::new(NoAcks),
        })
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

/// NATS headers as JSON, sorted by name: one value as a string, several as an array.
fn headers_json(h: Option<&HeaderMap>) -> Value {
    let Some(h) = h else {
        return Value::Object(Map::new());
    };
    let sorted: BTreeMap<&str, Vec<&str>> = h
        .iter()
        .map(|(k, vs)| (k.as_ref(), vs.iter().map(|v| v.as_str()).collect()))
        .collect();
    sorted
        .into_iter()
        .map(|(k, vs)| {
            let v = match vs.as_slice() {
                [one] => Value::from(*one),
                many => many.iter().map(|v| Value::from(*v)).collect(),
            };
            (k.to_string(), v)
        })
        .collect::<Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_report_shares_that_add_up_to_the_pending_count() {
        // Alone: the whole pending count.
        assert_eq!(lag_share(100, 40, 40, 1.0), (100, 1.0));
        // One of two replicas doing a quarter of the deliveries.
        let (lag, share) = lag_share(100, 10, 40, 1.0);
        assert_eq!((lag, share), (25, 0.25));
        assert_eq!(lag_share(100, 30, 40, 1.0).0 + lag, 100);
        // Nothing delivered since the last measurement: the last share holds.
        assert_eq!(lag_share(80, 0, 0, 0.25), (20, 0.25));
        assert_eq!(lag_share(0, 5, 5, 1.0), (0, 1.0));
    }

    #[test]
    fn default_consumer_names_avoid_what_nats_refuses() {
        assert_eq!(
            default_consumer("shop", "orders.v1"),
            "obsrv-shop-orders_v1"
        );
    }
}
