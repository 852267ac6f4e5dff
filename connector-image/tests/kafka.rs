//! The Kafka source end to end: consumer group offsets, JSON validation, parallelism and lag.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Harness, consume_exactly, ids, total};
use obsrv_e2e::services::{Broker, unique_name};

const T: Duration = Duration::from_secs(60);

fn manifest(broker: &Broker, topic: &str) -> String {
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: clicks
  source:
    kafka:
      bootstrapServers: {b}
      topics: [{topic}]
      offsetReset: earliest
"#,
        b = broker.bootstrap()
    )
}

#[tokio::test]
async fn kafka_relay_validates_json_commits_offsets_and_reports_lag() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = unique_name("clicks");
    broker.create_topic(&topic, 2).await?;
    for i in 0..20 {
        broker
            .produce(
                &topic,
                Some(&format!("k{i}")),
                &format!("{{\"click\":{i}}}"),
            )
            .await?;
    }
    broker.produce(&topic, None, "not json").await?;
    broker.produce(&topic, None, "[1,2]").await?;
    let h = Harness::new(&broker, &manifest(&broker, &topic), &[]).await?;
    let conn = h.start()?;
    let recs = consume_exactly(&broker, &h.ingest, 20, T).await?;
    assert_eq!(recs.len(), 20, "{}", conn.log_tail());
    assert_eq!(ids(&recs)?.len(), 20);
    let v = recs[0].json()?;
    assert_eq!(v["dataset"], "clicks");
    assert_eq!(v["obsrv_meta"]["source"]["connector"], "kafka");
    assert!(v["event"]["click"].is_i64());
    let failed = consume_exactly(&broker, &h.failed, 2, T).await?;
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f.json()?["error"]["error_code"], "CE_1000");
    }
    let s = conn
        .wait_status("caught up with offsets committed", T, |s| {
            total(s, "recordsIngested") == 20
                && total(s, "recordsFailed") == 2
                && s["lagRecords"] == 0
        })
        .await?;
    assert_eq!(s["maxParallelism"], 2, "{s}");

    // Offsets live in the group: a restart reads only what is new.
    assert!(conn.terminate().await?.success());
    broker.produce(&topic, None, "{\"click\":20}").await?;
    let conn = h.start()?;
    conn.wait_status("the new record", T, |s| total(s, "recordsIngested") == 1)
        .await?;
    let recs = consume_exactly(&broker, &h.ingest, 21, T).await?;
    assert_eq!(recs.len(), 21, "{}", conn.log_tail());
    Ok(())
}
