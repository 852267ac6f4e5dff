//! End-to-end: the message-broker sources (RabbitMQ, NATS JetStream, MQTT) through the real
//! operator and the local control plane, driven with kubectl-style manifests against a real
//! broker: two replicas share the messages, a replica killed with -9 in the middle of the stream
//! loses nothing, and status says Ready with the lag (or, for MQTT, that the lag is unknown).

use std::time::Duration;

use anyhow::{Context as _, Result};
use obsrv_e2e::harness::{Stack, ingested_ids};
use obsrv_e2e::services::{
    TEST_PASSWORD, TEST_USER, mqtt::Mosquitto, nats::Nats, rabbitmq::RabbitMq, unique_name,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// Published in two halves: the second while a killed replica restarts.
const EVENTS: usize = 4_000;

enum Broker {
    Rabbit(RabbitMq),
    Nats(Nats),
    Mqtt(Mosquitto),
}

/// A broker and where the connector reads: a queue, a stream's subject, a topic.
struct Source {
    broker: Broker,
    dest: String,
}

impl Source {
    async fn publish(&self, range: std::ops::Range<usize>) -> Result<()> {
        let bodies: Vec<String> = range.map(|i| json!({"id": i}).to_string()).collect();
        let n = match &self.broker {
            Broker::Rabbit(b) => b.publish(&self.dest, &bodies).await?,
            Broker::Nats(b) => b.publish(&self.dest, &bodies).await?,
            Broker::Mqtt(b) => b.publish(&self.dest, &bodies).await?,
        };
        anyhow::ensure!(n == bodies.len(), "published {n} of {}", bodies.len());
        Ok(())
    }
}

/// A Secret with the test user's login and a Connector with two replicas reading `source`.
fn manifest(name: &str, kind: &str, source: Value) -> String {
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-login")},
        "stringData": {"username": TEST_USER, "password": TEST_PASSWORD},
    });
    let mut source = source;
    source["credentials"] = json!({"secretName": format!("{name}-login")});
    let connector = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name},
        "spec": {"dataset": name, "scaling": {"replicas": 2}, "source": {kind: source}},
    });
    format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret).unwrap(),
        serde_yaml::to_string(&connector).unwrap()
    )
}

fn status(stack: &Stack, name: &str) -> Result<Value> {
    Ok(stack.get_json(&["connector", name])?["status"].clone())
}

/// Two replicas read `src`; one is killed mid-stream; every event arrives; status is right.
async fn two_replicas_survive_kill_9(
    stack: &Stack,
    src: &Source,
    name: &str,
    kind: &str,
    lag_known: bool,
) -> Result<()> {
    // Both replicas subscribed before anything is published (an MQTT broker keeps messages only
    // for subscriptions that exist).
    stack
        .eventually("2 ready pods", WAIT, async || {
            Ok((stack.ready_pods(name)?.len() == 2).then_some(()))
        })
        .await?;
    src.publish(0..EVENTS / 2).await?;
    let first = ingested_ids(&stack.broker, name, 1, WAIT).await?;
    anyhow::ensure!(!first.is_empty(), "nothing ingested");
    let pod = stack.pods(name)?.into_iter().next().context("a pod")?;
    stack.kill_pod(&pod)?;
    src.publish(EVENTS / 2..EVENTS).await?;

    let ids = ingested_ids(&stack.broker, name, EVENTS, Duration::from_secs(300)).await?;
    assert_eq!(
        ids,
        (0..EVENTS as i64).collect(),
        "every event arrives after kill -9 of a replica"
    );
    let s = stack
        .eventually(
            "Ready, both replicas counted, lag settled",
            WAIT,
            async || {
                let s = status(stack, name)?;
                let ready = stack.condition(name, "Ready")?["status"] == "True";
                let counted = s["totals"]["recordsIngested"].as_u64().unwrap_or(0) >= EVENTS as u64;
                let lag = if lag_known {
                    s["lag"]["records"] == 0
                } else {
                    s["lag"].is_null()
                };
                Ok((ready && counted && lag && s["replicas"] == 2).then_some(s))
            },
        )
        .await?;
    assert_eq!(s["sourceKind"], kind, "{s}");
    let lag_cond = stack.condition(name, "LagKnown")?;
    assert_eq!(
        lag_cond["status"],
        if lag_known { "True" } else { "False" },
        "{lag_cond}"
    );
    assert!(
        !stack
            .get_json(&["connector", name])?
            .to_string()
            .contains(TEST_PASSWORD),
        "no secret value in the Connector"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replicas_compete_for_the_queue_and_survive_kill_9() -> Result<()> {
    let (mq, stack) = tokio::try_join!(RabbitMq::start(), Stack::start(None))?;
    let queue = unique_name("orders");
    mq.declare_queue(&queue).await?;
    let source = json!({"host": "127.0.0.1", "port": mq.port(), "queue": queue, "prefetch": 200});
    stack.apply(&manifest("orders", "rabbitmq", source))?;
    let src = Source {
        broker: Broker::Rabbit(mq),
        dest: queue,
    };
    two_replicas_survive_kill_9(&stack, &src, "orders", "rabbitmq", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_replicas_share_the_durable_consumer_and_survive_kill_9() -> Result<()> {
    let (nats, stack) = tokio::try_join!(Nats::start(), Stack::start(None))?;
    nats.create_stream("PAYMENTS", &["payments.>"]).await?;
    // A short ackWait: what the killed replica held comes back within seconds.
    let source = json!({
        "servers": [format!("nats://127.0.0.1:{}", nats.port())],
        "stream": "PAYMENTS", "subject": "payments.settled", "ackWait": "3s",
    });
    stack.apply(&manifest("payments", "nats", source))?;
    let src = Source {
        broker: Broker::Nats(nats),
        dest: "payments.settled".into(),
    };
    two_replicas_survive_kill_9(&stack, &src, "payments", "nats", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_replicas_share_the_subscription_and_survive_kill_9() -> Result<()> {
    let (m, stack) = tokio::try_join!(Mosquitto::start(), Stack::start(None))?;
    // The restarted container keeps its pod name (HOSTNAME), so it resumes its own session and
    // gets back what it had not acknowledged.
    let source = json!({
        "host": "127.0.0.1", "port": m.port(), "topics": ["telemetry/#"], "shareGroup": "obsrv",
    });
    stack.apply(&manifest("telemetry", "mqtt", source))?;
    let src = Source {
        broker: Broker::Mqtt(m),
        dest: "telemetry/device-1".into(),
    };
    two_replicas_survive_kill_9(&stack, &src, "telemetry", "mqtt", false).await
}
