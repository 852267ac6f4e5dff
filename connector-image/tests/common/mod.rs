//! Shared support for the runtime's integration tests: writes a Connector manifest and its
//! Secret files, runs the real `obsrv-connector` binary, reads `/status`.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use obsrv_e2e::services::{Broker, ConsumedRecord, Postgres, free_port, unique_name};
use serde_json::Value;

/// Topics and files of one connector under test.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub manifest: PathBuf,
    pub ingest: String,
    pub failed: String,
    pub state: String,
    pub bootstrap: String,
    pub name: String,
}

impl Harness {
    /// Writes `manifest` (a Connector YAML; `NAME` in it is replaced by a unique name) and the
    /// Secret files `secrets/<secret>/<key>` from `secrets`, and creates the ingest and failed topics.
    pub async fn new(
        broker: &Broker,
        manifest: &str,
        secrets: &[(&str, &str, &str)],
    ) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let name = unique_name("conn").replace('_', "-");
        let path = dir.path().join("connector.yaml");
        std::fs::write(&path, manifest.replace("NAME", &name))?;
        for (secret, key, value) in secrets {
            let d = dir.path().join("secrets").join(secret);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join(key), value)?;
        }
        let h = Harness {
            manifest: path,
            ingest: unique_name("ingest"),
            failed: unique_name("failed"),
            state: unique_name("state"),
            bootstrap: broker.bootstrap().to_string(),
            name,
            dir,
        };
        broker.create_topic(&h.ingest, 1).await?;
        broker.create_topic(&h.failed, 1).await?;
        Ok(h)
    }

    /// Starts `obsrv-connector run` on its own loopback port.
    pub fn start(&self) -> Result<Connector> {
        self.start_with_env(&[])
    }

    /// [`Harness::start`] with extra environment (e.g. `HOSTNAME`, a replica's pod name).
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Result<Connector> {
        let port = free_port()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("connector.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
            .arg("run")
            .args(self.args())
            .env("OBSRV_LISTEN", format!("127.0.0.1:{port}"))
            .env("OBSRV_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,obsrv_connector=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning obsrv-connector")?;
        Ok(Connector {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            log: self.dir.path().join("connector.log"),
        })
    }

    /// Runs `obsrv-connector <cmd>` to its end: exit status and stdout.
    pub fn command(&self, cmd: &str) -> Result<(ExitStatus, String)> {
        self.command_with(cmd, &[])
    }

    /// [`Harness::command`] with extra arguments (e.g. `cleanup --delete-state`).
    pub fn command_with(&self, cmd: &str, extra: &[&str]) -> Result<(ExitStatus, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
            .arg(cmd)
            .args(self.args())
            .args(extra)
            .env("OBSRV_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-f".into(),
            self.manifest.display().to_string(),
            "--secrets-dir".into(),
            self.dir.path().join("secrets").display().to_string(),
            "--sink-bootstrap-servers".into(),
            self.bootstrap.clone(),
            "--sink-topic".into(),
            self.ingest.clone(),
            "--sink-failed-topic".into(),
            self.failed.clone(),
            "--sink-state-topic".into(),
            self.state.clone(),
        ]
    }
}

/// A Postgres Connector reading `table` by `cursor` (and `tie_breaker`), `NAME` left for the
/// harness to fill in; `extra` is appended to the spec (e.g. `  delivery: exactlyOnce`).
pub fn pg_manifest(
    pg: &Postgres,
    table: &str,
    cursor: &str,
    tie_breaker: Option<&str>,
    batch: usize,
    extra: &str,
) -> String {
    let tb = tie_breaker
        .map(|t| format!(", tieBreaker: {t}"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {{name: NAME, namespace: tests}}
spec:
  dataset: orders
  source:
    postgres:
      host: {host}
      port: {port}
      database: {db}
      credentials: {{secretName: pg-creds}}
      tls: {{mode: disable}}
      tables: [{{name: {table}, cursor: {{column: {cursor}{tb}}}}}]
      pollInterval: 200ms
      batchSize: {batch}
{extra}"#,
        host = pg.host(),
        port = pg.port(),
        db = pg.database(),
    )
}

/// A running connector process; SIGKILLed if still running when dropped.
pub struct Connector {
    child: Option<Child>,
    pub addr: String,
    log: PathBuf,
}

impl Connector {
    pub async fn status(&self) -> Result<Value> {
        let body = reqwest::get(format!("http://{}/status", self.addr))
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = reqwest::get(format!("http://{}{path}", self.addr)).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Polls `/status` until `pred` holds; the error carries the last status and the log tail.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(s) = self.status().await {
                if pred(&s) {
                    return Ok(s);
                }
                last = s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "timed out waiting for {what}; last status {last}\nlog:\n{}",
            self.log_tail()
        )
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "connector did not exit within 30s of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (kill -9), no chance to flush or commit.
    pub fn kill9(mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Event ids (message keys) of `records`, checking each key equals its `obsrv-event-id` header.
pub fn ids(records: &[ConsumedRecord]) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for r in records {
        let key = r.key_str().context("record without key")?.to_string();
        let header = r
            .header("obsrv-event-id")
            .context("record without obsrv-event-id header")?;
        if header != key.as_bytes() {
            bail!("key {key} differs from its obsrv-event-id header");
        }
        out.insert(key);
    }
    Ok(out)
}

/// Reads a topic until `expected` records or `timeout`, then asserts nothing more arrives within
/// `settle` (so "exactly N" really means N).
pub async fn consume_exactly(
    broker: &Broker,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<ConsumedRecord>> {
    let got = broker.consume_all(topic, expected, timeout).await?;
    if got.len() < expected {
        return Ok(got);
    }
    broker
        .consume_all(topic, expected + 1, Duration::from_secs(2))
        .await
}

pub fn total(status: &Value, field: &str) -> u64 {
    status["totals"][field].as_u64().unwrap_or(0)
}

/// How the kill -9 scenario tells that the restarted connector has caught up.
pub enum CaughtUp {
    /// `/status` says `lagRecords` 0.
    LagZero,
    /// Every id is in the ingest topic (sources whose lag is unknown: MQTT).
    AllIds,
}

/// The kill -9 scenario every source shares: starts the connector, SIGKILLs it once `kill_after`
/// records are ingested (before all `n`), restarts it until caught up, and checks that all `n`
/// event ids reached the ingest topic (nothing lost). Returns every record read, duplicates of
/// the replayed part included.
pub async fn kill_9_mid_load_then_restart(
    broker: &Broker,
    h: &Harness,
    n: usize,
    kill_after: u64,
) -> Result<Vec<ConsumedRecord>> {
    kill_9_mid_load_then_restart_until(broker, h, n, kill_after, CaughtUp::LagZero, &[]).await
}

/// [`kill_9_mid_load_then_restart`] with a choice of how to tell the restart caught up, and
/// environment for both processes (the same `HOSTNAME`: the restarted container of one pod).
pub async fn kill_9_mid_load_then_restart_until(
    broker: &Broker,
    h: &Harness,
    n: usize,
    kill_after: u64,
    caught_up: CaughtUp,
    env: &[(&str, &str)],
) -> Result<Vec<ConsumedRecord>> {
    let conn = h.start_with_env(env)?;
    let s = conn
        .wait_status("part of the load", Duration::from_secs(60), |s| {
            total(s, "recordsIngested") >= kill_after
        })
        .await?;
    conn.kill9()?;
    assert!(
        total(&s, "recordsIngested") < n as u64,
        "killed in the middle of the load: {s}"
    );
    let conn = h.start_with_env(env)?;
    match caught_up {
        CaughtUp::LagZero => {
            conn.wait_status("caught up after restart", Duration::from_secs(120), |s| {
                s["lagRecords"] == 0 && total(s, "recordsIngested") > 0
            })
            .await?;
        }
        CaughtUp::AllIds => {
            let deadline = Instant::now() + Duration::from_secs(120);
            while ids(&broker
                .consume_all(&h.ingest, 2 * n, Duration::from_secs(3))
                .await?)?
            .len()
                < n
                && Instant::now() < deadline
            {}
        }
    }
    let recs = broker
        .consume_all(&h.ingest, 2 * n, Duration::from_secs(10))
        .await?;
    assert_eq!(
        ids(&recs)?.len(),
        n,
        "distinct ids after kill -9 and restart ({} records read)\n{}",
        recs.len(),
        conn.log_tail()
    );
    Ok(recs)
}

/// `check` passes, then the connector loads the `n` records of its source, each id once.
pub async fn check_passes_and_loads(broker: &Broker, h: &Harness, n: usize) -> Result<()> {
    let (code, out) = h.command("check")?;
    assert!(code.success(), "{out}");
    let conn = h.start()?;
    let recs = consume_exactly(broker, &h.ingest, n, Duration::from_secs(60)).await?;
    assert_eq!(ids(&recs)?.len(), n, "{}", conn.log_tail());
    Ok(())
}

/// `check` fails; its output, for the caller to say why it should have.
pub fn check_fails(h: &Harness) -> Result<String> {
    let (code, out) = h.command("check")?;
    assert!(!code.success(), "check passed: {out}");
    Ok(out)
}
