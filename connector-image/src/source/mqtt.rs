//! MQTT 5: topic filters subscribed with QoS 1 in a persistent session (clean start off, a session
//! expiry), manual PUBACKs sent only after the sink has the record and every record before it.
//! Unacknowledged messages are sent again by the broker when the session resumes. The broker
//! holds at most `prefetch` (the receive maximum) messages unacknowledged with us.
//!
//! One replica (no `shareGroup`): one session named by `clientId`, which outlives pod replacements.
//! With `shareGroup`, every replica subscribes to `$share/<group>/<filter>` in a session of its
//! own, named `<clientId>-<pod name>`: a restarted container resumes it, a pod that is gone for
//! good leaves it to expire (see docs/sources/streams.md).
//!
//! Record id: MQTT has no message id or sequence a subscriber can rely on (packet ids are reused),
//! so the id is a digest of the topic, payload and the publisher's properties (content type,
//! correlation data, response topic, user properties) — what stays the same when the broker sends
//! the message again. Identical messages on one topic therefore share an id. Lag: unknown (MQTT
//! does not say how many messages wait).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use obsrv_crds::{MessageFormat, MqttSourceSpec, runtime::env};
use rumqttc::{
    TlsConfiguration, Transport,
    v5::{
        AsyncClient, ConnectionError, Event, EventLoop, MqttOptions,
        mqttbytes::{
            QoS,
            v5::{
                ConnectReturnCode, Filter, Packet, Publish, PublishProperties, RetainForwardRule,
                SubscribeReasonCode,
            },
        },
    },
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

use super::{
    Batch, OpenContext, Record, Source, SourceCommitter, SourceFactory,
    acks::{self, AckCommitter, Unacked},
    kafka::MAX_BATCH_BYTES,
    message::{self, bytes_json, content_digest},
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
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest packet MQTT allows: a smaller limit would make the broker drop bigger messages
/// without telling anyone (MQTT 5 maximum packet size).
const MAX_PACKET: u32 = 268_435_455;
/// Messages buffered per connection, in receive maximums (see [`forward`]).
const OVERFLOW_FACTOR: usize = 4;

/// The `mqtt` kind. Positions are PUBACKs to the broker, not state-topic records.
pub fn factory() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::mqtt::MQTT.name, open).keeping_own_positions()
}

async fn open(ctx: OpenContext) -> Result<MqttSource> {
    let spec = super::spec_of(&ctx.config, "mqtt", |s| s.mqtt.as_ref())?;
    acks::at_least_once_only(ctx.delivery(), "mqtt")?;
    let base = spec
        .client_id
        .clone()
        .unwrap_or_else(|| format!("obsrv-{}-{}", ctx.config.namespace, ctx.config.name));
    let client_id = client_id(
        &base,
        spec.share_group.is_some(),
        std::env::var("HOSTNAME").ok().as_deref(),
        std::process::id(),
    );
    MqttSource::connect(spec, &ctx.secrets, &ctx.instance(), client_id).await
}

/// The session's client id. Alone: `base`. Shared: one session per replica, named after the pod
/// (`HOSTNAME`, which a restarted container keeps), or the process where there is no host name.
pub fn client_id(base: &str, shared: bool, hostname: Option<&str>, pid: u32) -> String {
    if !shared {
        return base.to_string();
    }
    match hostname.filter(|h| !h.is_empty()) {
        Some(h) => format!("{base}-{h}"),
        None => format!("{base}-p{pid}"),
    }
}

/// The filter subscribed to: shared among the replicas when there is a share group.
pub fn subscription(filter: &str, share_group: Option<&str>) -> String {
    match share_group {
        Some(g) => format!("$share/{g}/{filter}"),
        None => filter.to_string(),
    }
}

fn connection_error(e: &ConnectionError, endpoint: &str) -> Error {
    let msg = format!("{endpoint}: {e}");
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod,
        ) => Error::AuthFailed(msg),
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId,
        ) => Error::Config(format!("{msg} (clientId)")),
        _ => Error::SourceUnreachable(msg),
    }
}

/// What a connection needs, kept to connect again.
struct Params {
    options: MqttOptions,
    filters: Vec<Filter>,
    topics: Vec<String>,
    endpoint: String,
    prefetch: u16,
}

/// One connection: its messages, and the acknowledgements owed on it (packet ids belong to a
/// connection: an acknowledgement never goes out on another one).
struct Session {
    id: u64,
    /// Kept for the connection's life; the acker task holds its own handle for the last commits.
    _client: AsyncClient,
    incoming: mpsc::Receiver<std::result::Result<Publish, ConnectionError>>,
    unacked: Arc<Unacked<u16>>,
    /// The broker sent more than the receive maximum and the excess was left unread (see [`drive`]).
    overflowed: Arc<AtomicBool>,
    session_present: bool,
}

/// Commits go to the acker of the connection a batch was read on (`{"session": id, ...}`).
#[derive(Default)]
struct Routes(Mutex<BTreeMap<u64, Arc<watch::Sender<u64>>>>);

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<watch::Sender<u64>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct RoutedCommitter(Arc<Routes>);

impl SourceCommitter for RoutedCommitter {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let session = position
            .get("session")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::State(format!("not an MQTT position: {position}")))?;
        // A connection already replaced has nothing left to acknowledge.
        if let Some(through) = self.0.lock().get(&session).cloned() {
            AckCommitter { through }.commit(position)?;
        }
        Ok(())
    }

    fn commits_each_batch(&self) -> bool {
        true
    }
}

pub struct MqttSource {
    params: Params,
    session: Session,
    routes: Arc<Routes>,
    window: usize,
    batch_max: usize,
    format: MessageFormat,
    instance: String,
    shared: bool,
    received: u64,
    failed: Option<Error>,
    described: String,
}

impl MqttSource {
    pub async fn connect(
        spec: &MqttSourceSpec,
        secrets: &Secrets,
        instance: &str,
        client_id: String,
    ) -> Result<MqttSource> {
        let tls = tls::client_config(spec.tls.as_ref(), secrets.get(env::SOURCE_TLS_CA))?;
        let port = match spec.port {
            Some(p) => u16::try_from(p)
                .map_err(|_| Error::Config("port must be between 1 and 65535".into()))?,
            None if tls.is_some() => 8883,
            None => 1883,
        };
        let endpoint = format!(
            "{}://{}:{port}",
            if tls.is_some() { "mqtts" } else { "mqtt" },
            spec.host
        );
        let expiry = parse_duration(&spec.session_expiry)
            .map_err(|e| Error::Config(format!("sessionExpiry: {e}")))?;
        let prefetch = u16::try_from(spec.prefetch.clamp(1, 65535)).unwrap_or(u16::MAX);
        let mut options = MqttOptions::new(client_id.clone(), spec.host.clone(), port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX)))
            .set_receive_maximum(Some(prefetch))
            .set_max_packet_size(Some(MAX_PACKET))
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(15))
            .set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        if let (Some(u), Some(p)) = (
            secrets.get(env::SOURCE_USERNAME),
            secrets.get(env::SOURCE_PASSWORD),
        ) {
            options.set_credentials(u, p);
        }
        if let Some(config) = tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        let filters: Vec<Filter> = spec
            .topics
            .iter()
            .map(|t| {
                let mut f = Filter::new(
                    subscription(t, spec.share_group.as_deref()),
                    QoS::AtLeastOnce,
                );
                // Retained messages once per subscription, not again at every reconnect.
                f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                f
            })
            .collect();
        let params = Params {
            options,
            filters,
            topics: spec.topics.clone(),
            endpoint,
            prefetch,
        };
        let routes = Arc::new(Routes::default());
        let session = open_session(&params, &routes, 1).await?;
        let described = format!(
            "mqtt {} on {}, client id {client_id} ({} session){}",
            spec.topics.join(", "),
            params.endpoint,
            if session.session_present {
                "resumed"
            } else {
                "new"
            },
            spec.share_group
                .as_deref()
                .map(|g| format!(", shared in group {g}"))
                .unwrap_or_default()
        );
        let window = usize::from(prefetch);
        Ok(MqttSource {
            params,
            session,
            routes,
            window,
            batch_max: batch_records(window),
            format: spec.format,
            instance: instance.to_string(),
            shared: spec.share_group.is_some(),
            received: 0,
            failed: None,
            described,
        })
    }

    fn record(&self, p: &Publish) -> Record {
        let topic = String::from_utf8_lossy(&p.topic);
        let props = p.properties.as_ref();
        let stable = props.map(stable_properties).unwrap_or_default().to_string();
        let digest = content_digest(&[&p.topic, stable.as_bytes(), &p.payload]);
        Record {
            id: event_id(&self.instance, &["mqtt", &topic, &digest]),
            payload: message::payload(&self.format, &p.payload, || {
                json!({
                    "topic": topic,
                    "qos": p.qos as u8,
                    "retain": p.retain,
                    "properties": props.map(stable_properties).unwrap_or_else(|| json!({})),
                })
            }),
        }
    }

    /// After an overflow: once everything read on this connection is acknowledged, a new one —
    /// the broker then sends again what it sent beyond the receive maximum. `false`: not yet.
    async fn replace_overflowed_session(&mut self) -> Result<bool> {
        if !self.session.unacked.is_empty()
            && !self.session.unacked.wait_for_room(1, FIRST_WAIT).await
        {
            return Ok(false);
        }
        tracing::info!(
            endpoint = %self.params.endpoint,
            "reconnecting for the messages the broker sent beyond the receive maximum"
        );
        let old = self.session.id;
        self.session = open_session(&self.params, &self.routes, old + 1).await?;
        self.routes.lock().remove(&old);
        Ok(true)
    }
}

/// Connects, subscribes and starts the connection's driver and acker tasks.
async fn open_session(p: &Params, routes: &Arc<Routes>, id: u64) -> Result<Session> {
    let endpoint = &p.endpoint;
    let (client, mut eventloop) = AsyncClient::new(p.options.clone(), 16);
    let session_present = loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll()).await {
            Err(_) => {
                return Err(Error::SourceUnreachable(format!(
                    "{endpoint}: no CONNACK within 15s"
                )));
            }
            Ok(Err(e)) => return Err(connection_error(&e, endpoint)),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.session_present,
            Ok(Ok(_)) => {}
        }
    };
    client
        .subscribe_many(p.filters.clone())
        .await
        .map_err(|e| Error::SourceUnreachable(format!("{endpoint}: subscribe: {e}")))?;
    let (tx, incoming) = mpsc::channel(usize::from(p.prefetch) * OVERFLOW_FACTOR);
    let overflowed = Arc::new(AtomicBool::new(false));
    // A resumed session may deliver before the SUBACK: keep those messages.
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll()).await {
            Err(_) => {
                return Err(Error::SourceUnreachable(format!(
                    "{endpoint}: no SUBACK within 15s"
                )));
            }
            Ok(Err(e)) => return Err(connection_error(&e, endpoint)),
            Ok(Ok(Event::Incoming(Packet::Publish(m)))) => {
                forward(&tx, &overflowed, m);
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                suback(&ack.return_codes, &p.topics, endpoint)?;
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    tokio::spawn(drive(eventloop, tx, overflowed.clone()));

    let unacked = Unacked::new();
    let (through, rx) = AckCommitter::channel();
    routes.lock().insert(id, through);
    let acker = client.clone();
    tokio::spawn(unacked.clone().run(rx, move |pkids: Vec<u16>| {
        let client = acker.clone();
        async move {
            for pkid in pkids {
                let mut m = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
                m.pkid = pkid;
                client
                    .ack(&m)
                    .await
                    .map_err(|e| Error::SourceUnreachable(format!("puback: {e}")))?;
            }
            Ok(())
        }
    }));
    Ok(Session {
        id,
        _client: client,
        incoming,
        unacked,
        overflowed,
        session_present,
    })
}

/// Hands a message to the reader without ever blocking the connection (acknowledgements travel
/// on it). A broker should send at most the receive maximum unacknowledged, but Mosquitto 2.0
/// sends everything queued once acknowledgements flow: past [`OVERFLOW_FACTOR`] times the receive
/// maximum, this and every later message is left unacknowledged (still in flight at the broker,
/// which sends it again on the next connection), so order is kept and memory bounded.
fn forward(
    tx: &mpsc::Sender<std::result::Result<Publish, ConnectionError>>,
    overflowed: &AtomicBool,
    m: Publish,
) -> bool {
    if overflowed.load(Ordering::Relaxed) {
        return true;
    }
    match tx.try_send(Ok(m)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            overflowed.store(true, Ordering::Relaxed);
            tracing::warn!(
                "the broker sent more messages than the receive maximum allows; the rest come \
                 again on a new connection"
            );
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Every filter granted, or why not (the filter named).
fn suback(codes: &[SubscribeReasonCode], topics: &[String], endpoint: &str) -> Result<()> {
    for (code, topic) in codes.iter().zip(topics) {
        let msg = || format!("{endpoint}: subscribing to {topic:?} refused: {code:?}");
        match code {
            SubscribeReasonCode::Success(_) => {}
            SubscribeReasonCode::NotAuthorized => return Err(Error::AuthFailed(msg())),
            SubscribeReasonCode::TopicFilterInvalid
            | SubscribeReasonCode::SharedSubscriptionsNotSupported
            | SubscribeReasonCode::WildcardSubscriptionsNotSupported => {
                return Err(Error::Config(msg()));
            }
            _ => return Err(Error::SourceUnreachable(msg())),
        }
    }
    Ok(())
}

/// Polls the connection: forwards every message, and keeps sending acknowledgements after the
/// reader is gone, until every client handle is dropped. Stops at the first error: a new
/// connection starts with a new session, so an acknowledgement never meets a reused packet id.
async fn drive(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<std::result::Result<Publish, ConnectionError>>,
    overflowed: Arc<AtomicBool>,
) {
    let mut reading = true;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(m))) if reading => {
                reading = forward(&tx, &overflowed, m);
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                let e = ConnectionError::Io(std::io::Error::other(format!(
                    "the broker disconnected: {:?}",
                    d.reason_code
                )));
                let _ = tx.try_send(Err(e));
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                // Sent even when the reader's buffer is full: it reads the error after the messages.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Err(e)).await;
                });
                return;
            }
        }
    }
}

/// The publisher's properties that stay the same when the broker sends the message again (not the
/// expiry interval, which counts down, nor topic aliases or subscription ids).
fn stable_properties(p: &PublishProperties) -> Value {
    let mut m = Map::new();
    if let Some(ct) = &p.content_type {
        m.insert("contentType".into(), ct.as_str().into());
    }
    if let Some(f) = p.payload_format_indicator {
        m.insert("payloadFormatIndicator".into(), f.into());
    }
    if let Some(t) = &p.response_topic {
        m.insert("responseTopic".into(), t.as_str().into());
    }
    if let Some(c) = &p.correlation_data {
        m.insert("correlationData".into(), bytes_json(c));
    }
    if !p.user_properties.is_empty() {
        // Repeated names keep every value, in the publisher's order.
        let mut up = Map::new();
        for (k, v) in &p.user_properties {
            match up.get_mut(k) {
                None => {
                    up.insert(k.clone(), Value::from(v.as_str()));
                }
                Some(Value::Array(a)) => a.push(v.as_str().into()),
                Some(first) => *first = json!([first.take(), v]),
            }
        }
        m.insert("userProperties".into(), up.into());
    }
    Value::Object(m)
}

impl Source for MqttSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.session.overflowed.load(Ordering::Relaxed)
            && self.session.incoming.is_empty()
            && !self.replace_overflowed_session().await?
        {
            return Ok(None);
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut last = 0;
        let mut fill_until: Option<Instant> = None;
        let unacked = self.session.unacked.clone();
        while records.len() < self.batch_max && bytes < MAX_BATCH_BYTES {
            if !unacked
                .has_room(self.window, records.is_empty(), FIRST_WAIT)
                .await
            {
                break;
            }
            let wait =
                fill_until.map_or(FIRST_WAIT, |t| t.saturating_duration_since(Instant::now()));
            let p = match tokio::time::timeout(wait, self.session.incoming.recv()).await {
                Err(_) => break,
                Ok(None) => {
                    self.failed = Some(Error::SourceUnreachable(format!(
                        "{}: the connection ended",
                        self.params.endpoint
                    )));
                    break;
                }
                Ok(Some(Err(e))) => {
                    self.failed = Some(connection_error(&e, &self.params.endpoint));
                    break;
                }
                Ok(Some(Ok(p))) => p,
            };
            fill_until.get_or_insert_with(|| Instant::now() + FILL);
            self.received += 1;
            bytes += p.payload.len();
            records.push(self.record(&p));
            // QoS 0 messages have nothing to acknowledge (and no redelivery).
            if p.qos != QoS::AtMostOnce {
                last = unacked.push(p.pkid);
            }
        }
        if records.is_empty() {
            return match self.failed.take() {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let mut position = acks::position(last);
        position["session"] = self.session.id.into();
        Ok(Some(Batch {
            records,
            position,
            watermark: Some(format!("{} messages received", self.received)),
        }))
    }

    fn max_parallelism(&self) -> Option<i32> {
        if self.shared { None } else { Some(1) }
    }

    fn lag_known(&self) -> bool {
        false
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(RoutedCommitter(self.routes.clone())))
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_alone_and_one_per_pod_when_shared() {
        assert_eq!(
            client_id("obsrv-shop-iot", false, Some("iot-abc"), 7),
            "obsrv-shop-iot"
        );
        assert_eq!(
            client_id("obsrv-shop-iot", true, Some("iot-7d9f-x2x"), 7),
            "obsrv-shop-iot-iot-7d9f-x2x"
        );
        assert_eq!(client_id("c", true, None, 7), "c-p7");
        assert_eq!(subscription("sensors/#", Some("g")), "$share/g/sensors/#");
        assert_eq!(subscription("sensors/#", None), "sensors/#");
    }

    #[test]
    fn only_properties_that_survive_a_redelivery_count() {
        let p = PublishProperties {
            payload_format_indicator: None,
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            response_topic: None,
            correlation_data: Some(Bytes::from_static(b"c1")),
            user_properties: vec![
                ("device".into(), "d1".into()),
                ("tag".into(), "a".into()),
                ("tag".into(), "b".into()),
            ],
            subscription_identifiers: vec![1],
            content_type: Some("application/json".into()),
        };
        assert_eq!(
            stable_properties(&p),
            json!({"contentType": "application/json", "correlationData": "c1",
                   "userProperties": {"device": "d1", "tag": ["a", "b"]}})
        );
    }
}
