//! Faults the connector must ride out by itself: the broker cut off mid-stream for 30 s and back on
//! the same address. Nothing is lost, the outage shows as a reason while it lasts, and the
//! connector is healthy again without anyone touching it.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Harness, ids, pg_manifest, total};
use obsrv_e2e::services::{Broker, Postgres, free_port, proxy::Proxy};

const ROWS: u32 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_loses_nothing_and_heals_by_itself() -> Result<()> {
    // The broker advertises the proxy's address, so every client connection goes through it.
    let (proxy_port, broker_port) = (free_port()?, free_port()?);
    let proxy = Proxy::start_on(proxy_port, &format!("127.0.0.1:{broker_port}")).await?;
    let advertised = proxy.address();
    let (broker, pg) = tokio::try_join!(
        Broker::start_advertising(broker_port, &advertised),
        Postgres::start()
    )?;
    pg.psql(&format!(
        "CREATE TABLE events (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL);
         INSERT INTO events SELECT g, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 ms'
         FROM generate_series(1, {ROWS}) g;"
    ))
    .await?;
    let manifest = pg_manifest(&pg, "public.events", "updated_at", Some("id"), 200, "");
    let h = Harness::new(
        &broker,
        &manifest,
        &[
            ("pg-creds", "username", pg.user()),
            ("pg-creds", "password", pg.password()),
        ],
    )
    .await?;
    let conn = h.start()?;
    conn.wait_status("part of the load", Duration::from_secs(60), |s| {
        total(s, "recordsIngested") >= 1_000
    })
    .await?;

    proxy.cut();
    let s = conn
        .wait_status("the outage as a reason", Duration::from_secs(60), |s| {
            s["lastError"]["reason"] == "SinkUnreachable"
        })
        .await?;
    assert!(
        total(&s, "recordsIngested") < u64::from(ROWS),
        "cut mid-stream: {s}"
    );
    let message = s["lastError"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&proxy.address()) && message.contains("nothing is lost"),
        "{message}"
    );
    // The rest of the 30 s outage: the connector waits, bounded, and keeps its reason.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let s = conn.status().await?;
    assert_eq!(s["lastError"]["reason"], "SinkUnreachable", "{s}");

    proxy.restore().await?;
    conn.wait_status(
        "caught up and healthy again",
        Duration::from_secs(120),
        |s| s["lagRecords"] == 0 && s["lastError"].is_null() && s["state"] == "Running",
    )
    .await?;
    let recs = broker
        .consume_all(&h.ingest, 2 * ROWS as usize, Duration::from_secs(10))
        .await?;
    assert_eq!(
        ids(&recs)?.len(),
        ROWS as usize,
        "every row delivered across the outage\n{}",
        conn.log_tail()
    );
    Ok(())
}
