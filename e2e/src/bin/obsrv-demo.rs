//! The local demo (`scripts/demo.sh`): a local control plane, a Kafka-protocol broker and a Postgres
//! with a sample table, the real operator binary, and `examples/postgres.yaml` applied with kubectl.
//! Shows rows arriving in the ingest topic and `kubectl get connectors`, then waits for Ctrl-C.
//!
//! `--services-only` starts just Postgres (with the sample table) and the broker on fixed local
//! ports, for the README's "Run one connector without a cluster" with `examples/local/`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use obsrv_e2e::harness::{FAILED_TOPIC, INGEST_TOPIC, STATE_TOPIC, Stack};
use obsrv_e2e::services::{Broker, Postgres};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "obsrv-demo")]
struct Args {
    /// Rows in the sample table.
    #[arg(long, default_value_t = 1000)]
    rows: u32,
    /// Directory for the kubeconfig, pod volumes and logs.
    #[arg(long, default_value = "target/obsrv-demo")]
    dir: PathBuf,
    /// Directory holding the `obsrv-operator` and `obsrv-connector` binaries.
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// Stop after showing the data instead of waiting for Ctrl-C.
    #[arg(long)]
    no_wait: bool,
    /// Start only Postgres (with the sample table) and the broker, on the ports below, for running
    /// one connector locally with examples/local/ (no control plane, no operator).
    #[arg(long)]
    services_only: bool,
    /// Postgres port of --services-only (examples/local/postgres.yaml expects 15432).
    #[arg(long, default_value_t = 15432)]
    pg_port: u16,
    /// Broker port of --services-only (the README's commands use 19092).
    #[arg(long, default_value_t = 19092)]
    broker_port: u16,
}

fn say(msg: &str) {
    println!("==> {msg}");
}

/// `examples/postgres.yaml`, pointed at the local Postgres: host, port, database, credentials, no TLS,
/// a short poll interval so new rows show quickly.
fn demo_manifest(example: &str, pg: &Postgres) -> Result<String> {
    let mut docs: Vec<Value> = serde_yaml::Deserializer::from_str(example)
        .map(|d| serde::Deserialize::deserialize(d).context("parsing examples/postgres.yaml"))
        .collect::<Result<_>>()?;
    for doc in &mut docs {
        match doc["kind"].as_str() {
            Some("Secret") => {
                doc["stringData"] =
                    serde_json::json!({"username": pg.user(), "password": pg.password()});
            }
            Some("Connector") => {
                let source = &mut doc["spec"]["source"]["postgres"];
                source["host"] = pg.host().into();
                source["port"] = pg.port().into();
                source["database"] = pg.database().into();
                source["tls"] = serde_json::json!({"mode": "disable"});
                source["pollInterval"] = "2s".into();
                if let Some(t) = doc["spec"]
                    .get_mut("template")
                    .and_then(Value::as_object_mut)
                {
                    t.remove("resources");
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc)?);
    }
    Ok(out)
}

/// The sample table `public.orders` with `rows` rows (ten share each `updated_at`).
async fn sample_table(pg: &Postgres, rows: u32) -> Result<()> {
    pg.psql(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2) NOT NULL,
                              status text NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO orders SELECT g, 'customer-' || (g % 97), round((g * 7.31)::numeric % 500, 2),
                'placed', timestamptz '2026-11-01 00:00:00+00' + (g / 10) * interval '1 minute'
         FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    Ok(())
}

/// `--services-only`: Postgres and the broker for `obsrv-connector run -f examples/local/...`.
async fn services_only(args: &Args) -> Result<()> {
    say(&format!(
        "starting Postgres on 127.0.0.1:{} and the broker (nisshi) on 127.0.0.1:{}",
        args.pg_port, args.broker_port
    ));
    let (pg, broker) = tokio::try_join!(
        Postgres::start_on(args.pg_port),
        Broker::start_on(args.broker_port)
    )?;
    sample_table(&pg, args.rows).await?;
    for topic in [INGEST_TOPIC, FAILED_TOPIC, STATE_TOPIC] {
        broker.create_topic(topic, 1).await?;
    }
    println!(
        "    Postgres 127.0.0.1:{} database {} (user {}, table public.orders, {} rows)",
        pg.port(),
        pg.database(),
        pg.user(),
        args.rows
    );
    println!(
        "    broker {} (topics {INGEST_TOPIC}, {FAILED_TOPIC}, {STATE_TOPIC})",
        broker.bootstrap()
    );
    println!();
    println!("Run one connector against them (in another shell, from the repository root):");
    println!(
        "  target/debug/obsrv-connector check -f examples/local/postgres.yaml --sink-bootstrap-servers {}",
        broker.bootstrap()
    );
    println!(
        "  target/debug/obsrv-connector run -f examples/local/postgres.yaml --sink-bootstrap-servers {} --log-format text",
        broker.bootstrap()
    );
    if args.no_wait {
        return Ok(());
    }
    println!("Press Ctrl-C to stop Postgres and the broker.");
    tokio::signal::ctrl_c().await?;
    println!("Stopping...");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.services_only {
        return services_only(&args).await;
    }
    let bin_dir = std::fs::canonicalize(&args.bin_dir).with_context(|| {
        format!(
            "{} (run `cargo build -p obsrv-operator -p obsrv-connector`)",
            args.bin_dir.display()
        )
    })?;

    say(
        "starting Postgres, the Kafka-protocol broker (nisshi), the local control plane and obsrv-operator",
    );
    let (pg, stack) = tokio::try_join!(
        Postgres::start(),
        Stack::start_with(Some(args.dir.clone()), bin_dir)
    )?;
    sample_table(&pg, args.rows).await?;
    println!(
        "    Postgres {}:{} (table public.orders, {} rows)",
        pg.host(),
        pg.port(),
        args.rows
    );
    println!(
        "    broker {}; API server {}",
        stack.broker.bootstrap(),
        stack.control_plane().map(|c| c.url()).unwrap_or_default()
    );
    println!("    operator log {}", stack.operator_log().display());

    say("kubectl apply -f examples/postgres.yaml (pointed at the local Postgres)");
    let manifest = demo_manifest(&std::fs::read_to_string("examples/postgres.yaml")?, &pg)?;
    std::fs::write(stack.dir.join("postgres-connector.yaml"), &manifest)?;
    print!("{}", stack.apply(&manifest)?);

    say(&format!(
        "waiting for {} rows in topic `{INGEST_TOPIC}`",
        args.rows
    ));
    let expected = args.rows as usize;
    let records = stack
        .broker
        .consume_all(INGEST_TOPIC, expected, Duration::from_secs(180))
        .await?;
    if records.len() < expected {
        bail!(
            "only {} of {expected} rows arrived; see {} and the pod logs in {}",
            records.len(),
            stack.operator_log().display(),
            stack.dir.join("cluster/logs").display()
        );
    }
    println!("    {} records arrived. The first three:", records.len());
    for r in records.iter().take(3) {
        println!(
            "    {}",
            String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
        );
    }

    say("waiting for the Connector to report Ready");
    stack
        .eventually("Ready=True", Duration::from_secs(60), async || {
            Ok((stack.condition("orders", "Ready")?["status"] == "True").then_some(()))
        })
        .await?;
    say("kubectl get connectors");
    print!("{}", stack.kubectl_ok(&["get", "connectors"])?);

    say("inserting 10 more rows: they keep flowing");
    pg.psql(&format!(
        "INSERT INTO orders SELECT g, 'customer-new', 9.99, 'placed', now() FROM generate_series({}, {}) g",
        args.rows + 1,
        args.rows + 10
    ))
    .await?;
    let records = stack
        .broker
        .consume_all(INGEST_TOPIC, expected + 10, Duration::from_secs(60))
        .await?;
    println!(
        "    topic `{INGEST_TOPIC}` now holds {} records",
        records.len()
    );

    println!();
    if args.no_wait {
        println!("Done (--no-wait): stopping the operator, pods, broker and Postgres.");
        return Ok(());
    }
    println!("Explore it (in another shell):");
    println!("  export KUBECONFIG={}", stack.kubeconfig.display());
    println!("  kubectl get connectors -o wide; kubectl describe connector orders");
    println!("  kubectl get deploy,pods,configmaps,events");
    println!(
        "  logs: operator {}, pods {}/cluster/logs",
        stack.operator_log().display(),
        stack.dir.display()
    );
    println!("Press Ctrl-C to stop everything (operator, pods, broker, Postgres).");
    tokio::signal::ctrl_c().await?;
    println!("Stopping...");
    Ok(())
}
