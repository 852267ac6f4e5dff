//! The connector under bench: the `obsrv-connector` binary cargo built alongside the bench
//! (release, for `cargo bench`), run on a Connector manifest as its own process, as in a pod.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use obsrv_connector::config::SinkSettings;
use obsrv_e2e::{harness::Process, services::free_port};
use serde_json::Value;

/// How long a connector may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(1800);

/// A running `obsrv-connector run`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Connector {
    process: Process,
    status_url: String,
    http: reqwest::Client,
    started: Instant,
    _dir: tempfile::TempDir,
}

/// What the connector used: peak resident memory (VmHWM) and user + system CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub cpu_secs: f64,
}

impl Usage {
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
}

impl Connector {
    /// Starts `obsrv-connector run -f <manifest>` (a Connector's YAML) writing to `sink`'s topics,
    /// with its HTTP on a free loopback port and `env` added (Secret values, by env var). Its
    /// clock starts here: process start-up counts.
    pub fn spawn(manifest: &str, sink: &SinkSettings, env: &[(&str, &str)]) -> Result<Connector> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("connector.yaml");
        std::fs::write(&path, manifest)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
            .args(["run", "-f"])
            .arg(&path)
            .args(["--sink-bootstrap-servers", &sink.bootstrap_servers])
            .args(["--sink-topic", &sink.topic])
            .args(["--sink-failed-topic", &sink.failed_topic])
            .args(["--sink-state-topic", &sink.state_topic])
            .envs(env.iter().copied())
            .env("OBSRV_LISTEN", &addr)
            // OBSRV_BENCH_LOG shows the connector's own log (e.g. `info`) to see where its time goes.
            .env(
                "RUST_LOG",
                std::env::var("OBSRV_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting obsrv-connector")?;
        Ok(Connector {
            process: child.into(),
            status_url: format!("http://{addr}/status"),
            http: reqwest::Client::new(),
            started,
            _dir: dir,
        })
    }

    /// `GET /status`, or `None` while it does not answer (starting up).
    pub async fn status(&self) -> Option<Value> {
        let r = self
            .http
            .get(&self.status_url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Polls `/status` every 20 ms until `done` returns a value. `done` gets the status
    /// (`Value::Null` while the connector does not answer) and the seconds since
    /// [`Connector::spawn`]. Fails when the connector exits or takes longer than 30 minutes; prints
    /// each new `lastError` it reports on the way.
    pub async fn wait_for<T>(
        &mut self,
        mut done: impl FnMut(&Value, f64) -> Option<T>,
    ) -> Result<T> {
        let mut last_error = Value::Null;
        loop {
            if let Some(s) = self.process.try_wait()? {
                bail!("the connector exited early: {s}");
            }
            let status = self.status().await.unwrap_or_default();
            let error = &status["lastError"];
            if error.is_object() && *error != last_error {
                eprintln!("connector error: {error}");
                last_error = error.clone();
            }
            if let Some(t) = done(&status, self.started.elapsed().as_secs_f64()) {
                return Ok(t);
            }
            if self.started.elapsed() > TIMEOUT {
                bail!("the connector did not finish within {TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The connector's peak RSS and CPU seconds so far (from /proc; zero when unreadable).
    pub fn usage(&self) -> Usage {
        let pid = self.process.pid();
        Usage {
            peak_rss_kib: peak_rss_kib(pid).unwrap_or(0),
            cpu_secs: cpu_secs(pid).unwrap_or(0.0),
        }
    }

    /// Reads [`Connector::usage`], then stops the connector.
    pub fn stop(self) -> Usage {
        self.usage()
        // dropped here: SIGTERM, wait
    }
}

/// `totals.recordsIngested` of a `/status` (0 while it does not answer).
pub fn ingested(status: &Value) -> u64 {
    status["totals"]["recordsIngested"].as_u64().unwrap_or(0)
}

/// Peak resident memory (VmHWM) of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Clock ticks: USER_HZ, 100 on Linux whatever the kernel's own HZ.
    Some(ticks as f64 / 100.0)
}
