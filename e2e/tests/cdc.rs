//! End-to-end: a postgresCdc Connector through the real operator on the local control plane:
//! changes flow, `kubectl get connectors -o wide` shows its lag, deleting it drops the slot.

use std::time::Duration;

use anyhow::{Context as _, Result};
use obsrv_e2e::harness::{INGEST_TOPIC, Stack};
use obsrv_e2e::services::Postgres;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cdc_streams_reports_lag_and_drops_its_slot_on_delete() -> Result<()> {
    let (pg, stack) = tokio::try_join!(Postgres::start(), Stack::start(None))?;
    pg.psql(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric); \
         INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 20) g",
    )
    .await?;
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "accounts-creds"},
        "stringData": {"username": pg.user(), "password": pg.password()}});
    let connector = json!({"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": "accounts"},
        "spec": {"dataset": "accounts", "source": {"postgresCdc": {
            "host": pg.host(), "port": pg.port(), "database": pg.database(),
            "credentials": {"secretName": "accounts-creds"}, "tls": {"mode": "disable"},
            "tables": ["public.accounts"], "heartbeatInterval": "1s"}}}});
    stack.apply(&format!(
        "{}---\n{}",
        serde_yaml::to_string(&secret)?,
        serde_yaml::to_string(&connector)?
    ))?;
    let slot = format!("obsrv_{}_accounts", stack.namespace.replace('-', "_"));
    let ops = async |want: usize| -> Result<Vec<String>> {
        stack
            .eventually(&format!("{want} change events"), WAIT, async || {
                let recs = stack
                    .broker
                    .consume_to_end(INGEST_TOPIC, Duration::from_secs(30))
                    .await?;
                let ops: Vec<String> = recs
                    .iter()
                    .filter_map(|r| r.json().ok())
                    .filter(|v| v["dataset"] == "accounts")
                    .map(|v| v["event"]["op"].as_str().unwrap_or("?").to_string())
                    .collect();
                Ok((ops.len() >= want).then_some(ops))
            })
            .await
    };
    assert_eq!(
        ops(20).await?.iter().filter(|o| *o == "r").count(),
        20,
        "the snapshot"
    );
    pg.psql("UPDATE accounts SET balance = balance - 10 WHERE id = 1; DELETE FROM accounts WHERE id = 2")
        .await?;
    let all = ops(22).await?;
    assert_eq!(&all[20..], ["u", "d"]);

    // Ready, and the lag columns of `kubectl get connectors -o wide` filled in by the pod's
    // measurement (bytes of WAL the slot holds, seconds behind).
    stack
        .eventually("Ready with lag in bytes", WAIT, async || {
            let c = stack.get_json(&["connector", "accounts"])?;
            let ready = c["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            Ok((ready && c["status"]["lag"]["bytes"].is_i64()).then_some(()))
        })
        .await?;
    let table = stack.kubectl_ok(&["get", "connectors", "-o", "wide"])?;
    let header = table.lines().next().context("header")?;
    assert!(
        header.contains("LAGSECONDS") && header.contains("LAGBYTES"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("accounts"))
        .context("accounts row")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert!(
        cells.contains(&"postgresCdc") && cells.contains(&"True"),
        "{row}"
    );
    let bytes_col = header
        .split_whitespace()
        .position(|h| h == "LAGBYTES")
        .context("column")?;
    assert!(
        cells
            .get(bytes_col)
            .is_some_and(|c| c.parse::<i64>().is_ok()),
        "lag in bytes shown: {table}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await?,
        "1"
    );

    // Deleting the Connector runs the cleanup Job, which drops the slot.
    stack.kubectl_ok(&["delete", "connector", "accounts", "--wait=false"])?;
    stack
        .eventually(
            "the Connector gone and its slot dropped",
            WAIT,
            async || {
                let out = stack.kubectl_with(&["get", "connector", "accounts"], None)?;
                let slots = pg
                    .psql(&format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ))
                    .await?;
                Ok((!out.success && slots == "0").then_some(()))
            },
        )
        .await?;
    Ok(())
}
