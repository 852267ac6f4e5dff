//! End-to-end: a marketplace connector. A Connector with `protocol: airbyte` names an Airbyte
//! source image; the real operator runs it (the local kubelet runs `obsrv-connector` for the
//! image, as the operator's init container makes it do in a cluster), the runtime drives the real
//! `source-faker` from PyPI, records reach the ingest topic, and status shows the totals.

use std::time::Duration;

use anyhow::Result;
use obsrv_e2e::harness::{MARKETPLACE_IMAGE, Stack, ingested_ids};
use obsrv_e2e::services::marketplace_program;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_airbyte_source_runs_as_a_connector_and_reports_totals() -> Result<()> {
    const USERS: i64 = 1_500;
    let faker = marketplace_program("source-faker")?;
    let stack = Stack::start(None).await?;
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "faker-settings"},
        "stringData": {"apiKey": "faker-api-key-e2e"},
    });
    let connector = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "fake-users"},
        "spec": {
            "dataset": "fake-users",
            "source": {"custom": {
                "image": format!("{MARKETPLACE_IMAGE}:6.2.0"),
                "protocol": "airbyte",
                "command": [faker.display().to_string()],
                "config": {"count": USERS, "records_per_slice": 500, "parallelism": 1,
                           "always_updated": false,
                           // source-faker takes extra keys: one from the Secret, as a
                           // real source's API key would be.
                           "api_key": {"secretKeyRef": {"name": "faker-settings", "key": "apiKey"}}},
                "streams": [{"name": "users"}],
                "pollInterval": "1h",
            }},
        },
    });
    stack.apply(&format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret)?,
        serde_yaml::to_string(&connector)?
    ))?;

    let deployment = stack
        .eventually("a Deployment for the marketplace image", WAIT, async || {
            Ok(stack.get_json(&["deployment", "fake-users"]).ok())
        })
        .await?;
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        format!("{MARKETPLACE_IMAGE}:6.2.0")
    );
    assert_eq!(
        pod["containers"][0]["command"],
        json!(["/obsrv/bin/obsrv-connector"])
    );
    assert_eq!(pod["initContainers"][0]["name"], "install-runtime");

    let ids = ingested_ids(&stack.broker, "fake-users", USERS as usize, WAIT).await?;
    assert_eq!(
        ids,
        (1..=USERS).collect(),
        "every user once; status: {}\n{}",
        stack.get_json(&["connector", "fake-users"])?["status"],
        stack.pod_logs().unwrap_or_default()
    );
    stack
        .eventually("Ready and the totals in status", WAIT, async || {
            let s = stack.get_json(&["connector", "fake-users"])?["status"].clone();
            let ready = stack.condition("fake-users", "Ready")?["status"] == "True";
            Ok((ready && s["totals"]["recordsIngested"] == USERS).then_some(()))
        })
        .await?;
    let printed = stack.kubectl_ok(&["get", "connectors", "-o", "wide"])?;
    let line = printed
        .lines()
        .find(|l| l.starts_with("fake-users"))
        .unwrap_or_default();
    assert!(
        line.contains("custom") && line.split_whitespace().any(|w| w == USERS.to_string()),
        "{printed}"
    );
    Ok(())
}
