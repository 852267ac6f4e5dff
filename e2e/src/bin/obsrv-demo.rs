//! The local demo (`scripts/demo.sh`): a local control plane, a Kafka-protocol broker and a Postgres
//! with a sample table, the real operator binary, and `examples/postgres.yaml` applied with kubectl.
//! Shows rows arriving in the ingest topic and `kubectl get connectors`, then waits for Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions, ImageBinary, KubeletOptions};
use obsrv_e2e::services::{Broker, Postgres, free_port};
use serde_json::Value;

const IMAGE: &str = "ghcr.io/obsrv/obsrv-connector";
const INGEST: &str = "ingest";
const FAILED: &str = "connectors.failed";
const STATE: &str = "connectors.state";

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
}

/// Stops a child process when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn say(msg: &str) {
    println!("==> {msg}");
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .output()
        .context("running kubectl (is it on PATH?)")?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
                doc["spec"]["delivery"] = "atLeastOnce".into();
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

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    while Instant::now() < deadline {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    match last_err {
        Some(e) => bail!("timed out waiting for {what}: {e:#}"),
        None => bail!("timed out waiting for {what}"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let bin_dir = std::fs::canonicalize(&args.bin_dir)
        .context("the binaries' directory (cargo build first)")?;
    let operator_bin = bin_dir.join("obsrv-operator");
    let connector_bin = bin_dir.join("obsrv-connector");
    for b in [&operator_bin, &connector_bin] {
        if !b.is_file() {
            bail!(
                "{} is missing: run `cargo build -p obsrv-operator -p obsrv-connector` first",
                b.display()
            );
        }
    }

    say("starting Postgres and the Kafka-protocol broker (nisshi)");
    let (pg, broker) = tokio::try_join!(Postgres::start(), Broker::start())?;
    pg.psql(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2) NOT NULL,
                              status text NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO orders SELECT g, 'customer-' || (g % 97), round((g * 7.31)::numeric % 500, 2),
                'placed', timestamptz '2026-11-01 00:00:00+00' + (g / 10) * interval '1 minute'
         FROM generate_series(1, {}) g;",
        args.rows
    ))
    .await?;
    for (topic, partitions) in [(INGEST, 1), (FAILED, 1), (STATE, 1)] {
        broker.create_topic(topic, partitions).await?;
    }
    println!(
        "    Postgres {}:{} (table public.orders, {} rows), broker {}",
        pg.host(),
        pg.port(),
        args.rows,
        broker.bootstrap()
    );

    say("starting the local control plane (API server + kubelet)");
    let kubelet = KubeletOptions::new(vec![ImageBinary::new(IMAGE, &connector_bin)]);
    let cp = ControlPlane::start(ControlPlaneOptions {
        dir: Some(dir.join("cluster")),
        kubelet: Some(kubelet),
        ..ControlPlaneOptions::default()
    })
    .await?;
    let kubeconfig = dir.join("kubeconfig");
    cp.write_kubeconfig(&kubeconfig)?;
    println!(
        "    API server {}; KUBECONFIG={}",
        cp.url(),
        kubeconfig.display()
    );

    say("kubectl apply -f crds/connector.yaml");
    print!(
        "{}",
        kubectl(&kubeconfig, &["apply", "-f", "crds/connector.yaml"])?
    );

    say("starting obsrv-operator");
    let operator_log = dir.join("operator.log");
    let log = std::fs::File::create(&operator_log)?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let _operator = Process(
        Command::new(&operator_bin)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--connector-image", &format!("{IMAGE}:dev")])
            .args(["--sink-bootstrap-servers", broker.bootstrap()])
            .args([
                "--sink-topic",
                INGEST,
                "--sink-failed-topic",
                FAILED,
                "--sink-state-topic",
                STATE,
            ])
            .args([
                "--status-poll-interval",
                "2s",
                "--admin-addr",
                &admin,
                "--log-format",
                "text",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting obsrv-operator")?,
    );
    println!(
        "    logs: {}; metrics: http://{admin}/metrics",
        operator_log.display()
    );

    say("kubectl apply -f examples/postgres.yaml (pointed at the local Postgres)");
    let manifest = demo_manifest(&std::fs::read_to_string("examples/postgres.yaml")?, &pg)?;
    let manifest_path = dir.join("postgres-connector.yaml");
    std::fs::write(&manifest_path, manifest)?;
    print!(
        "{}",
        kubectl(
            &kubeconfig,
            &["apply", "-f", manifest_path.to_str().unwrap_or_default()]
        )?
    );

    say(&format!(
        "waiting for {} rows in topic `{INGEST}`",
        args.rows
    ));
    let expected = args.rows as usize;
    let records = broker
        .consume_all(INGEST, expected, Duration::from_secs(180))
        .await?;
    if records.len() < expected {
        bail!(
            "only {} of {expected} rows arrived; see {} and the pod logs in {}",
            records.len(),
            operator_log.display(),
            dir.join("cluster/logs").display()
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
    wait_for("Ready=True", Duration::from_secs(60), async || {
        let ready = kubectl(
            &kubeconfig,
            &[
                "get",
                "connector",
                "orders",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        )?;
        Ok((ready.trim() == "True").then_some(()))
    })
    .await?;
    say("kubectl get connectors");
    print!("{}", kubectl(&kubeconfig, &["get", "connectors"])?);

    say("inserting 10 more rows: they keep flowing");
    pg.psql(&format!(
        "INSERT INTO orders SELECT g, 'customer-new', 9.99, 'placed', now() FROM generate_series({}, {}) g",
        args.rows + 1,
        args.rows + 10
    ))
    .await?;
    let records = broker
        .consume_all(INGEST, expected + 10, Duration::from_secs(60))
        .await?;
    println!("    topic `{INGEST}` now holds {} records", records.len());

    println!();
    println!("Explore it (in another shell):");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get connectors -o wide; kubectl describe connector orders");
    println!("  kubectl get deploy,pods,configmaps,events");
    println!(
        "  logs: operator {}, pods {}/cluster/logs",
        operator_log.display(),
        dir.display()
    );
    if args.no_wait {
        return Ok(());
    }
    println!("Press Ctrl-C to stop everything (operator, pods, broker, Postgres).");
    tokio::signal::ctrl_c().await?;
    println!("Stopping...");
    drop(_operator);
    cp.shutdown().await;
    Ok(())
}
