//! The message-broker sources end to end: one matrix of scenarios run against RabbitMQ, NATS
//! JetStream and MQTT (Mosquitto), each a real broker from the test support, then what is
//! particular to each kind (bindings, core NATS, TLS, metadata).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{
    CaughtUp, Connector, Harness, consume_exactly, ids, kill_9_mid_load_then_restart_until, total,
};
use obsrv_connector::envelope::event_id;
use obsrv_e2e::services::{
    Broker, ConsumedRecord, mqtt::Mosquitto, nats::Nats, rabbitmq::RabbitMq, unique_name,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Rabbitmq,
    Nats,
    Mqtt,
}

enum Service {
    Rabbit(RabbitMq),
    Nats(Nats),
    Mqtt(Mosquitto),
}

/// A broker with a place to publish to: a queue, a stream's subject, a topic.
struct Source {
    kind: Kind,
    svc: Service,
    /// Queue (RabbitMQ), subject (NATS), topic (MQTT).
    dest: String,
    /// The JetStream stream.
    stream: String,
}

impl Source {
    async fn start(kind: Kind) -> Result<Source> {
        let name = unique_name("ev");
        Ok(match kind {
            Kind::Rabbitmq => {
                let mq = RabbitMq::start().await?;
                mq.declare_queue(&name).await?;
                Source {
                    kind,
                    svc: Service::Rabbit(mq),
                    dest: name,
                    stream: String::new(),
                }
            }
            Kind::Nats => {
                let nats = Nats::start().await?;
                let stream = name.to_uppercase();
                nats.create_stream(&stream, &[&format!("{name}.>")]).await?;
                Source {
                    kind,
                    svc: Service::Nats(nats),
                    dest: format!("{name}.new"),
                    stream,
                }
            }
            Kind::Mqtt => Source {
                kind,
                svc: Service::Mqtt(Mosquitto::start().await?),
                dest: format!("sensors/{name}"),
                stream: String::new(),
            },
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Rabbitmq => "rabbitmq",
            Kind::Nats => "nats",
            Kind::Mqtt => "mqtt",
        }
    }

    async fn publish(&self, bodies: &[Vec<u8>]) -> Result<()> {
        let n = match &self.svc {
            Service::Rabbit(mq) => mq.publish(&self.dest, bodies).await?,
            Service::Nats(nats) => nats.publish(&self.dest, bodies).await?,
            Service::Mqtt(m) => m.publish(&self.dest, bodies).await?,
        };
        anyhow::ensure!(n == bodies.len(), "published {n} of {}", bodies.len());
        Ok(())
    }

    fn stop(&mut self) {
        match &mut self.svc {
            Service::Rabbit(s) => s.stop(),
            Service::Nats(s) => s.stop(),
            Service::Mqtt(s) => s.stop(),
        }
    }

    async fn start_again(&mut self) -> Result<()> {
        match &mut self.svc {
            Service::Rabbit(s) => s.start_again().await,
            Service::Nats(s) => s.start_again().await,
            Service::Mqtt(s) => s.start_again().await,
        }
    }

    fn port(&self) -> u16 {
        match &self.svc {
            Service::Rabbit(s) => s.port(),
            Service::Nats(s) => s.port(),
            Service::Mqtt(s) => s.port(),
        }
    }

    /// The kind's fields (indented for `spec.source.<kind>`), `extra` appended.
    fn fields(&self, shared: bool, extra: &str) -> String {
        let port = self.port();
        let mut f = match self.kind {
            Kind::Rabbitmq => format!(
                "      host: 127.0.0.1\n      port: {port}\n      queue: {}\n",
                self.dest
            ),
            // A short ackWait: a killed replica's messages come back within seconds. Not shorter:
            // on a loaded machine a full window can wait seconds for the sink, and a redelivery
            // then would reorder the stream.
            Kind::Nats => format!(
                "      servers: [nats://127.0.0.1:{port}]\n      stream: {}\n      subject: {}\n      ackWait: 10s\n",
                self.stream, self.dest
            ),
            Kind::Mqtt => format!(
                "      host: 127.0.0.1\n      port: {port}\n      topics: [\"{}\"]\n{}",
                self.dest,
                if shared {
                    "      shareGroup: obsrv\n"
                } else {
                    ""
                }
            ),
        };
        f.push_str("      credentials: {secretName: broker}\n");
        f.push_str(extra);
        f
    }

    fn manifest(&self, shared: bool, extra: &str) -> String {
        format!(
            "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: NAME, namespace: tests}}\n\
             spec:\n  dataset: events\n  source:\n    {}:\n{}",
            self.name(),
            self.fields(shared, extra)
        )
    }

    fn secrets(&self, password: &'static str) -> Vec<(&'static str, &'static str, &'static str)> {
        vec![
            ("broker", "username", obsrv_e2e::services::TEST_USER),
            ("broker", "password", password),
        ]
    }

    async fn harness(&self, broker: &Broker, shared: bool, extra: &str) -> Result<Harness> {
        Harness::new(
            broker,
            &self.manifest(shared, extra),
            &self.secrets(obsrv_e2e::services::TEST_PASSWORD),
        )
        .await
    }

    fn lag_known(&self) -> bool {
        self.kind != Kind::Mqtt
    }
}

/// `{"n": i, ...}` for i in `range`.
fn events(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{{\"n\":{i},\"note\":\"event number {i:08}\"}}").into_bytes())
        .collect()
}

async fn start(kind: Kind) -> Result<(Source, Broker)> {
    tokio::try_join!(Source::start(kind), Broker::start())
}

/// `check` passes (for MQTT it also creates the persistent session, so that what is published
/// next is queued for the connector).
fn check_ok(h: &Harness) -> Result<String> {
    let (code, out) = h.command("check")?;
    anyhow::ensure!(code.success(), "check failed: {out}");
    Ok(out)
}

/// Reads the ingest topic until `n` distinct ids are in (or the timeout); returns every record.
async fn all_ids(
    broker: &Broker,
    h: &Harness,
    n: usize,
    timeout: Duration,
) -> Result<Vec<ConsumedRecord>> {
    let deadline = Instant::now() + timeout;
    loop {
        let recs = broker
            .consume_to_end(&h.ingest, Duration::from_secs(30))
            .await?;
        if ids(&recs)?.len() >= n || Instant::now() > deadline {
            return Ok(recs);
        }
    }
}

async fn wait_ready(c: &Connector) -> Result<()> {
    c.wait_status("ready", T, |s| s["ready"] == true).await?;
    Ok(())
}

// ---- the matrix ----

/// Records arrive in publish order, malformed payloads land in the failed topic, lag is reported
/// while loading (and unknown, not 0, for MQTT), and what was acknowledged is not read again.
async fn delivers_in_order_reports_lag_and_fails_malformed(kind: Kind) -> Result<()> {
    let (src, broker) = start(kind).await?;
    // A small window makes the load take seconds, so the lag measured after the first batch is
    // there to see before the connector catches up: at the default window the 20,000 messages
    // went in ~1 s, between two looks at the status. (MQTT has no lag, and a small window only
    // slows it down: Mosquitto sends past the receive maximum.)
    let window = if src.lag_known() {
        "      prefetch: 200\n"
    } else {
        ""
    };
    let h = src.harness(&broker, false, window).await?;
    let out = check_ok(&h)?;
    assert!(
        out.contains(&format!("source: ok ({}", src.name())),
        "{out}"
    );
    let n = 20_000;
    let mut bodies = events(0..n / 2);
    bodies.push(b"not json".to_vec());
    bodies.extend(events(n / 2..n));
    bodies.push(vec![0xff, 0x00, 0x01]);
    src.publish(&bodies).await?;

    let conn = h.start()?;
    let saw_lag = std::cell::Cell::new(false);
    let s = conn
        .wait_status("everything ingested", T, |s| {
            if s["lagRecords"].as_i64().is_some_and(|l| l > 0) {
                assert!(src.lag_known(), "MQTT has no lag to report: {s}");
                assert!(s["lagRecords"].as_i64() <= Some(n as i64 + 2), "{s}");
                saw_lag.set(true);
            }
            total(s, "recordsIngested") == n as u64 && total(s, "recordsFailed") == 2
        })
        .await?;
    let recs = consume_exactly(&broker, &h.ingest, n, T).await?;
    assert_eq!(recs.len(), n, "{}", conn.log_tail());
    let order: Vec<i64> = recs
        .iter()
        .map(|r| r.json().unwrap()["event"]["n"].as_i64().unwrap())
        .collect();
    assert!(
        order.iter().copied().eq(0..n as i64),
        "records out of publish order"
    );
    assert_eq!(ids(&recs)?.len(), n);
    assert_eq!(
        recs[0].json()?["obsrv_meta"]["source"]["connector"],
        src.name()
    );
    let failed = consume_exactly(&broker, &h.failed, 2, T).await?;
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f.json()?["error"]["error_code"], "CE_1000");
    }
    if src.lag_known() {
        assert!(saw_lag.get(), "lag was never reported while loading: {s}");
        conn.wait_status("caught up", T, |s| s["lagRecords"] == 0)
            .await?;
    } else {
        let s = conn.status().await?;
        assert!(s["lagRecords"].is_null(), "MQTT lag must stay unknown: {s}");
        assert_eq!(s["maxParallelism"], 1, "{s}");
    }

    // Everything was acknowledged: a restart reads only what is new.
    assert!(conn.terminate().await?.success());
    src.publish(&events(n..n + 1)).await?;
    let conn = h.start()?;
    conn.wait_status("the one new message", T, |s| {
        total(s, "recordsIngested") == 1
    })
    .await?;
    let recs = consume_exactly(&broker, &h.ingest, n + 1, T).await?;
    assert_eq!(recs.len(), n + 1, "{}", conn.log_tail());
    Ok(())
}

/// kill -9 in the middle of a load, restart: every message arrives (unacknowledged ones again).
async fn kill_9_loses_nothing(kind: Kind) -> Result<()> {
    let (src, broker) = start(kind).await?;
    let h = src.harness(&broker, false, "").await?;
    check_ok(&h)?;
    let n = 40_000;
    src.publish(&events(0..n)).await?;
    let caught_up = if kind == Kind::Rabbitmq {
        CaughtUp::LagZero
    } else {
        // JetStream redelivers after ackWait, MQTT says no lag: wait for the records themselves.
        CaughtUp::AllIds
    };
    let recs = kill_9_mid_load_then_restart_until(
        &broker,
        &h,
        n,
        2_000,
        caught_up,
        &[("HOSTNAME", "replica-a")],
    )
    .await?;
    // A redelivered message keeps its id: duplicates are exact repeats.
    assert!(recs.len() >= n);
    Ok(())
}

/// Two replicas share the load (competing consumers, a shared MQTT subscription), none lost.
async fn two_replicas_share_the_load(kind: Kind) -> Result<()> {
    let (src, broker) = start(kind).await?;
    let h = src.harness(&broker, true, "").await?;
    let a = h.start_with_env(&[("HOSTNAME", "replica-a")])?;
    let b = h.start_with_env(&[("HOSTNAME", "replica-b")])?;
    wait_ready(&a).await?;
    wait_ready(&b).await?;
    let n = 20_000;
    src.publish(&events(0..n)).await?;
    let recs = all_ids(&broker, &h, n, T).await?;
    assert_eq!(
        ids(&recs)?.len(),
        n,
        "a: {}\nb: {}",
        a.log_tail(),
        b.log_tail()
    );
    // The records are in the topic; the totals follow once each replica has the sink's acks.
    let deadline = Instant::now() + T;
    let (sa, sb, ta, tb) = loop {
        let (sa, sb) = (a.status().await?, b.status().await?);
        let (ta, tb) = (total(&sa, "recordsIngested"), total(&sb, "recordsIngested"));
        if ta + tb >= n as u64 || Instant::now() > deadline {
            break (sa, sb, ta, tb);
        }
        tokio::task::yield_now().await;
    };
    assert!(ta > 0 && tb > 0, "both replicas read: {ta} and {tb}");
    assert!(ta + tb >= n as u64, "totals count every record: {sa}\n{sb}");
    if kind == Kind::Mqtt {
        assert!(sa["maxParallelism"].is_null(), "shared: no limit: {sa}");
    }
    Ok(())
}

/// The broker goes away mid-stream: status says SourceUnreachable within a retry, and once it is
/// back the connector reconnects and delivers everything.
async fn broker_restart_mid_stream_recovers(kind: Kind) -> Result<()> {
    let (mut src, broker) = start(kind).await?;
    let h = src.harness(&broker, false, "").await?;
    check_ok(&h)?;
    let n = 40_000;
    src.publish(&events(0..n)).await?;
    let conn = h.start()?;
    conn.wait_status("part of the load", T, |s| {
        total(s, "recordsIngested") >= 1_000
    })
    .await?;
    src.stop();
    let s = conn
        .wait_status("the outage in status", Duration::from_secs(30), |s| {
            s["lastError"]["reason"] == "SourceUnreachable"
        })
        .await?;
    let msg = s["lastError"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&src.port().to_string()),
        "names the endpoint: {msg}"
    );
    assert!(!msg.contains(obsrv_e2e::services::TEST_PASSWORD), "{msg}");
    src.start_again().await?;
    let recs = all_ids(&broker, &h, n, Duration::from_secs(120)).await?;
    assert_eq!(ids(&recs)?.len(), n, "{}", conn.log_tail());
    conn.wait_status("healthy again", T, |s| {
        s["lastError"].is_null() && s["ready"] == true
    })
    .await?;
    Ok(())
}

/// A wrong password is `AuthFailed`, named as such by `check`.
async fn wrong_password_is_auth_failed(kind: Kind) -> Result<()> {
    let (src, broker) = start(kind).await?;
    let h = Harness::new(
        &broker,
        &src.manifest(false, ""),
        &src.secrets("not-the-password"),
    )
    .await?;
    let (code, out) = h.command("check")?;
    assert!(!code.success(), "{out}");
    assert!(out.contains("source: AuthFailed"), "{out}");
    assert!(!out.contains("not-the-password"), "{out}");
    Ok(())
}

macro_rules! matrix {
    ($($scenario:ident),* $(,)?) => {
        mod rabbitmq { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() -> anyhow::Result<()> { super::$scenario(super::Kind::Rabbitmq).await } )* }
        mod nats { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() -> anyhow::Result<()> { super::$scenario(super::Kind::Nats).await } )* }
        mod mqtt { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() -> anyhow::Result<()> { super::$scenario(super::Kind::Mqtt).await } )* }
    };
}

matrix!(
    delivers_in_order_reports_lag_and_fails_malformed,
    kill_9_loses_nothing,
    two_replicas_share_the_load,
    broker_restart_mid_stream_recovers,
    wrong_password_is_auth_failed,
);

// ---- what is particular to each kind ----

/// The id rule of a record whose message has a `message_id`.
fn instance_of(h: &Harness) -> String {
    format!("tests/{}", h.name)
}

fn event_of(recs: &[ConsumedRecord], pred: impl Fn(&Value) -> bool) -> Result<(Value, String)> {
    for r in recs {
        let v = r.json()?;
        if pred(&v) {
            return Ok((v, r.key_str().unwrap_or_default().to_string()));
        }
    }
    bail!("no such record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_declares_and_binds_copies_metadata_and_wraps_binary_as_base64() -> Result<()> {
    use lapin::{
        BasicProperties, ExchangeKind,
        options::ExchangeDeclareOptions,
        types::{AMQPValue, FieldTable, LongString},
    };
    let (mq, broker) = tokio::try_join!(RabbitMq::start(), Broker::start())?;
    let (_conn, ch) = mq.channel().await?;
    ch.exchange_declare(
        "shop".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let queue = unique_name("orders");
    let manifest = format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: NAME, namespace: tests}}\n\
         spec:\n  dataset: orders\n  source:\n    rabbitmq:\n      host: 127.0.0.1\n      port: {}\n\
         \x20     queue: {queue}\n      declare: true\n      bindings:\n        - exchange: shop\n\
         \x20         routingKeys: [\"order.*\"]\n      credentials: {{secretName: broker}}\n\
         \x20     nonJson: base64\n      metadata: true\n",
        mq.port()
    );
    let h = Harness::new(
        &broker,
        &manifest,
        &[
            ("broker", "username", mq.user()),
            ("broker", "password", mq.password()),
        ],
    )
    .await?;
    // check declares the queue and binds it; then what the exchange routes is kept for us.
    check_ok(&h)?;
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let props = BasicProperties::default()
        .with_message_id("order-1".into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    use obsrv_e2e::services::rabbitmq::publish_on;
    publish_on(&ch, "shop", "order.created", [br#"{"order":1}"#], &props).await?;
    publish_on(
        &ch,
        "shop",
        "order.paid",
        [&[0xde, 0xad][..]],
        &BasicProperties::default(),
    )
    .await?;
    // Not bound: never reaches the queue.
    publish_on(
        &ch,
        "shop",
        "user.created",
        [br#"{"user":1}"#],
        &BasicProperties::default(),
    )
    .await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 2, T).await?;
    assert_eq!(recs.len(), 2, "{}", conn.log_tail());
    let (order, key) = event_of(&recs, |v| v["event"]["order"] == 1)?;
    assert_eq!(
        key,
        event_id(&instance_of(&h), &["amqp-message-id", "order-1"]),
        "the message id is the record id"
    );
    let m = &order["obsrv_meta"]["source"]["message"];
    assert_eq!(m["exchange"], "shop");
    assert_eq!(m["routingKey"], "order.created");
    assert_eq!(m["properties"]["headers"]["tenant"], "acme");
    assert_eq!(m["properties"]["contentType"], "application/json");
    let (binary, _) = event_of(&recs, |v| v["event"]["data_base64"].is_string())?;
    assert_eq!(binary["event"]["data_base64"], "3q0=");
    assert_eq!(
        binary["obsrv_meta"]["source"]["message"]["routingKey"],
        "order.paid"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_missing_queue_is_a_schema_error_naming_it() -> Result<()> {
    let (mq, broker) = tokio::try_join!(RabbitMq::start(), Broker::start())?;
    let manifest = format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: NAME, namespace: tests}}\n\
         spec:\n  dataset: orders\n  source:\n    rabbitmq:\n      host: 127.0.0.1\n      port: {}\n\
         \x20     queue: no-such-queue\n      credentials: {{secretName: broker}}\n",
        mq.port()
    );
    let h = Harness::new(
        &broker,
        &manifest,
        &[
            ("broker", "username", mq.user()),
            ("broker", "password", mq.password()),
        ],
    )
    .await?;
    let (code, out) = h.command("check")?;
    assert!(!code.success());
    assert!(
        out.contains("source: SchemaError") && out.contains("no-such-queue"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_ids_are_stream_sequences_and_metadata_names_the_subject() -> Result<()> {
    let (src, broker) = start(Kind::Nats).await?;
    let h = src
        .harness(&broker, false, "      metadata: true\n")
        .await?;
    src.publish(&events(0..3)).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 3, T).await?;
    assert_eq!(recs.len(), 3, "{}", conn.log_tail());
    let (first, key) = event_of(&recs, |v| v["event"]["n"] == 0)?;
    assert_eq!(
        key,
        event_id(&instance_of(&h), &["jetstream", &src.stream, "1"])
    );
    let m = &first["obsrv_meta"]["source"]["message"];
    assert_eq!(m["subject"], src.dest.as_str());
    assert_eq!(m["streamSequence"], 1);
    assert_eq!(m["stream"], src.stream.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_core_mode_reads_subjects_at_most_once_and_says_lag_is_unknown() -> Result<()> {
    let (nats, broker) = tokio::try_join!(Nats::start(), Broker::start())?;
    let subject = unique_name("clicks");
    let manifest = format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: NAME, namespace: tests}}\n\
         spec:\n  dataset: clicks\n  source:\n    nats:\n      servers: [nats://127.0.0.1:{}]\n\
         \x20     mode: core\n      subject: {subject}.>\n      credentials: {{secretName: broker}}\n",
        nats.port()
    );
    let h = Harness::new(
        &broker,
        &manifest,
        &[
            ("broker", "username", nats.user()),
            ("broker", "password", nats.password()),
        ],
    )
    .await?;
    let conn = h.start()?;
    wait_ready(&conn).await?;
    let client = nats.client().await?;
    for i in 0..100 {
        client
            .publish(format!("{subject}.a"), format!("{{\"n\":{i}}}").into())
            .await?;
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, "click-x");
    client
        .publish_with_headers(format!("{subject}.b"), headers, "{\"n\":100}".into())
        .await?;
    client.flush().await?;
    let recs = consume_exactly(&broker, &h.ingest, 101, T).await?;
    assert_eq!(recs.len(), 101, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 101);
    let (_, key) = event_of(&recs, |v| v["event"]["n"] == 100)?;
    assert_eq!(key, event_id(&instance_of(&h), &["nats-msg-id", "click-x"]));
    let s = conn
        .wait_status("all counted", T, |s| total(s, "recordsIngested") == 101)
        .await?;
    assert!(
        s["lagRecords"].is_null(),
        "core NATS has no lag to report: {s}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_verifies_the_server_with_the_ca_from_the_secret() -> Result<()> {
    let ((nats, ca), broker) = tokio::try_join!(Nats::start_tls(), Broker::start())?;
    let stream = unique_name("TLS").to_uppercase();
    nats.create_stream(&stream, &["tls.>"]).await?;
    nats.publish("tls.a", events(0..10)).await?;
    let other_ca = obsrv_e2e::services::TestCertificates::generate()?.ca_pem;
    // verify-full with the right CA: checks pass and records flow.
    let good = tls_harness(&broker, &nats, &stream, "verify-full", &ca).await?;
    check_ok(&good)?;
    let conn = good.start()?;
    let recs = consume_exactly(&broker, &good.ingest, 10, T).await?;
    assert_eq!(recs.len(), 10, "{}", conn.log_tail());
    // verify-full with another CA: refused, and said so.
    let bad = tls_harness(&broker, &nats, &stream, "verify-full", &other_ca).await?;
    let (code, out) = bad.command("check")?;
    assert!(
        !code.success() && out.contains("source: SourceUnreachable"),
        "{out}"
    );
    // require: encrypted without checking the certificate.
    check_ok(&tls_harness(&broker, &nats, &stream, "require", &other_ca).await?)?;
    Ok(())
}

async fn tls_harness(
    broker: &Broker,
    nats: &Nats,
    stream: &str,
    mode: &str,
    ca: &str,
) -> Result<Harness> {
    let manifest = format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: NAME, namespace: tests}}\n\
         spec:\n  dataset: tls\n  source:\n    nats:\n      servers: [tls://127.0.0.1:{}]\n\
         \x20     stream: {stream}\n      credentials: {{secretName: broker}}\n\
         \x20     tls: {{mode: {mode}, ca: {{secretName: broker, key: ca.crt}}}}\n",
        nats.port()
    );
    Harness::new(
        broker,
        &manifest,
        &[
            ("broker", "username", nats.user()),
            ("broker", "password", nats.password()),
            ("broker", "ca.crt", ca),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_copies_topic_and_user_properties_and_wraps_binary_as_base64() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let (src, broker) = start(Kind::Mqtt).await?;
    let h = src
        .harness(
            &broker,
            false,
            "      nonJson: base64\n      metadata: true\n",
        )
        .await?;
    check_ok(&h)?;
    let Service::Mqtt(m) = &src.svc else {
        unreachable!()
    };
    let props = PublishProperties {
        user_properties: vec![("device".into(), "d-17".into())],
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    };
    m.publish_with(&src.dest, [br#"{"t":21.5}"#], Some(props))
        .await?;
    m.publish(&src.dest, [&[0x01, 0x02][..]]).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 2, T).await?;
    assert_eq!(recs.len(), 2, "{}", conn.log_tail());
    let (reading, _) = event_of(&recs, |v| v["event"]["t"] == 21.5)?;
    let meta = &reading["obsrv_meta"]["source"]["message"];
    assert_eq!(meta["topic"], src.dest.as_str());
    assert_eq!(meta["qos"], 1);
    assert_eq!(meta["properties"]["userProperties"]["device"], "d-17");
    let (binary, _) = event_of(&recs, |v| v["event"]["data_base64"].is_string())?;
    assert_eq!(binary["event"]["data_base64"], "AQI=");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_is_refused_with_a_reason() -> Result<()> {
    let (src, broker) = start(Kind::Rabbitmq).await?;
    let m = src.manifest(false, "").replace(
        "  dataset: events\n",
        "  dataset: events\n  delivery: exactlyOnce\n",
    );
    let h = Harness::new(
        &broker,
        &m,
        &src.secrets(obsrv_e2e::services::TEST_PASSWORD),
    )
    .await?;
    let conn = h.start()?;
    let s = conn
        .wait_status("ConfigError", T, |s| {
            s["lastError"]["reason"] == "ConfigError"
        })
        .await?;
    let msg = s["lastError"]["message"].as_str().context("message")?;
    assert!(
        msg.contains("exactlyOnce") && msg.contains("atLeastOnce"),
        "{msg}"
    );
    Ok(())
}
