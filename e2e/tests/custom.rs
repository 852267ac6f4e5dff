//! End-to-end: pluggability. A Connector with `source.custom` runs the example custom connector's
//! image (examples/custom-connector, built on the SDK) through the real operator and the local
//! control plane, exactly as the shared image runs: records arrive, status shows lag and totals,
//! and a kill -9 loses nothing.

use std::collections::BTreeSet;
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use obsrv_e2e::harness::{EXAMPLE_CUSTOM_IMAGE, Stack, ingested_ids};
use obsrv_e2e::services::Broker;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "s3cr3t-events-token";

/// An append-only log of `total` events, served the way the example connector reads it:
/// `GET /events?offset=&limit=` with a bearer token, `X-Total-Count` for lag.
#[derive(Clone)]
struct EventsApi {
    total: Arc<AtomicU64>,
    /// Per page, so that a load of a few thousand events takes seconds (room for a kill -9).
    delay: Duration,
}

#[derive(serde::Deserialize)]
struct Page {
    offset: u64,
    limit: u64,
}

async fn events(
    State(api): State<EventsApi>,
    headers: HeaderMap,
    Query(p): Query<Page>,
) -> impl IntoResponse {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {TOKEN}") {
        return (StatusCode::UNAUTHORIZED, HeaderMap::new(), String::new());
    }
    tokio::time::sleep(api.delay).await;
    let total = api.total.load(Ordering::SeqCst);
    let body: String = (p.offset..total.min(p.offset + p.limit))
        .map(|i| format!("{{\"id\":{},\"kind\":\"click\",\"n\":{i}}}\n", i + 1))
        .collect();
    let mut h = HeaderMap::new();
    h.insert("x-total-count", total.into());
    (StatusCode::OK, h, body)
}

async fn serve(api: EventsApi) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/events", axum::routing::get(events))
        .with_state(api);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/events"))
}

fn manifest(name: &str, url: &str, page: u64) -> String {
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "events-api-token"},
        "stringData": {"token": TOKEN},
    });
    let connector = json!({
        "apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name},
        "spec": {
            "dataset": name,
            "source": {"custom": {
                "image": format!("{EXAMPLE_CUSTOM_IMAGE}:0.1.0"),
                "config": {"url": url, "pageSize": page, "token": {"secret": "events-api-token", "key": "token"}},
                "secrets": [{"name": "events-api-token"}],
                "pollInterval": "1s",
            }},
        },
    });
    format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret).unwrap(),
        serde_yaml::to_string(&connector).unwrap()
    )
}

async fn ingested(broker: &Broker, dataset: &str, expected: usize) -> Result<BTreeSet<i64>> {
    ingested_ids(broker, dataset, expected, Duration::from_secs(300)).await
}

fn status(stack: &Stack, name: &str) -> Result<Value> {
    Ok(stack.get_json(&["connector", name])?["status"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_image_delivers_reports_lag_and_totals_and_survives_kill_9() -> Result<()> {
    const EVENTS: u64 = 3_000;
    let stack = Stack::start(None).await?;
    let api = EventsApi {
        total: Arc::new(AtomicU64::new(EVENTS)),
        delay: Duration::from_millis(25),
    };
    let url = serve(api.clone()).await?;
    stack.apply(&manifest("clicks", &url, 20))?;

    // The operator runs the custom image like the shared one: its own Deployment and config.
    let deployment = stack
        .eventually("a Deployment for the custom image", WAIT, async || {
            Ok(stack.get_json(&["deployment", "clicks"]).ok())
        })
        .await?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], format!("{EXAMPLE_CUSTOM_IMAGE}:0.1.0"));
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "maxParallelism 1: never two readers"
    );

    // Kill it mid-load: as soon as the first records are in.
    let first = ingested(&stack.broker, "clicks", 1).await?;
    anyhow::ensure!(
        (first.len() as u64) < EVENTS,
        "the load finished before the kill; make it slower"
    );
    let pod = stack.pods("clicks")?.into_iter().next().context("a pod")?;
    stack.kill_pod(&pod)?;

    let ids = ingested(&stack.broker, "clicks", EVENTS as usize).await?;
    assert_eq!(
        ids,
        (1..=EVENTS as i64).collect(),
        "every event arrives after kill -9 and restart"
    );

    // New events keep flowing, and status reports lag, totals and readiness from /status.
    api.total.fetch_add(40, Ordering::SeqCst);
    let ids = ingested(&stack.broker, "clicks", EVENTS as usize + 40).await?;
    assert_eq!(ids.len() as u64, EVENTS + 40);
    let s = stack
        .eventually("Ready, lag 0 and totals in status", WAIT, async || {
            let s = status(&stack, "clicks")?;
            let ready = stack.condition("clicks", "Ready")?["status"] == "True";
            let caught_up = s["lag"]["records"] == 0;
            let counted = s["totals"]["recordsIngested"].as_u64().unwrap_or(0) > 0;
            Ok((ready && caught_up && counted).then_some(s))
        })
        .await?;
    assert_eq!(s["sourceKind"], "custom");
    assert_eq!(stack.condition("clicks", "LagKnown")?["status"], "True");
    assert!(
        s["watermark"]
            .as_str()
            .unwrap_or_default()
            .starts_with("offset "),
        "{s}"
    );
    let printed = stack.kubectl_ok(&["get", "connectors"])?;
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("clicks") && l.contains("custom")),
        "{printed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_source_with_a_wrong_token_says_so_in_status() -> Result<()> {
    let stack = Stack::start(None).await?;
    let url = serve(EventsApi {
        total: Arc::new(AtomicU64::new(10)),
        delay: Duration::ZERO,
    })
    .await?;
    stack.apply(&manifest("wrong", &url, 10).replace(TOKEN, "not-the-token"))?;
    let s = stack
        .eventually("AuthFailed in status", WAIT, async || {
            let s = status(&stack, "wrong")?;
            Ok((s["lastError"]["reason"] == "AuthFailed").then_some(s))
        })
        .await?;
    assert!(
        s["lastError"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("401"),
        "{s}"
    );
    assert_eq!(stack.condition("wrong", "Ready")?["status"], "False");
    Ok(())
}
