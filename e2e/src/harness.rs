//! The whole system on one machine, as the end-to-end suite and the demo use it: the local control
//! plane (API server + kubelet running connector pods as `obsrv-connector` processes), a broker, and
//! the real `obsrv-operator` binary talking to the control plane through a kubeconfig. Users' view of
//! it is `kubectl`, so the helpers here drive `kubectl` too.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::controlplane::{ControlPlane, ControlPlaneOptions, ImageBinary, KubeletOptions};
use crate::services::{Broker, free_port, unique_name};

/// Image whose pods the local kubelet runs as `obsrv-connector` processes.
pub const CONNECTOR_IMAGE: &str = "ghcr.io/obsrv/obsrv-connector";
/// A user's own build of the connector image (`spec.image`): the kubelet runs `obsrv-connector`.
pub const OWN_BUILD_IMAGE: &str = "registry.example/team/obsrv-connector-patched";
/// The custom connector of `examples/custom-connector` (`spec.source.custom.image`): the kubelet
/// runs its binary, `obsrv-example-http-connector`.
pub const EXAMPLE_CUSTOM_IMAGE: &str = "registry.example/team/http-events-connector";
/// The binary of [`EXAMPLE_CUSTOM_IMAGE`].
pub const EXAMPLE_CUSTOM_BINARY: &str = "obsrv-example-http-connector";
pub const INGEST_TOPIC: &str = "ingest";
pub const FAILED_TOPIC: &str = "connectors.failed";
pub const STATE_TOPIC: &str = "connectors.state";

/// Where `obsrv-operator` and `obsrv-connector` were built: `E2E_BIN_DIR`, or the cargo target
/// directory this test binary runs from (`target/debug/deps/<test>` -> `target/debug`).
pub fn binaries_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("E2E_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test binary has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in ["obsrv-operator", "obsrv-connector", EXAMPLE_CUSTOM_BINARY] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process(Child);

impl From<Child> for Process {
    fn from(child: Child) -> Process {
        Process(child)
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its exit status once it has exited (`None` while it runs).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.0.try_wait()
    }

    /// `kill -9`, and reap it.
    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: our own child, not yet reaped, so the pid cannot have been reused.
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

/// The output of a kubectl run.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Where the system under test runs.
enum Cluster {
    /// The local control plane and the operator binary as a child process.
    Local {
        cp: Box<ControlPlane>,
        operator: Option<Process>,
        runs: u32,
        /// Where the running operator serves `/metrics`, `/healthz` and `/readyz`.
        admin: Option<String>,
    },
    /// A real cluster (`E2E_KUBECONFIG`) where the operator was installed with the Helm chart.
    Remote { operator_namespace: String },
}

/// Control plane + broker + operator, and a namespace of its own for the test's objects.
/// Dropping it stops the operator, every pod process and the broker (local), or deletes the
/// namespace (remote).
pub struct Stack {
    // Field order is drop order: pods stop before the broker they write to.
    cluster: Cluster,
    pub broker: Broker,
    pub kubeconfig: PathBuf,
    /// The namespace every namespaced kubectl call of this stack uses.
    pub namespace: String,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Stack {
    /// Starts everything; `dir` keeps kubeconfig, logs and pod volumes (a temp dir when None).
    ///
    /// With `E2E_KUBECONFIG` set, runs against that cluster instead: the operator must already be
    /// installed there (Helm chart, namespace `E2E_OPERATOR_NAMESPACE`, default `obsrv-system`) with
    /// its sink pointing at `KAFKA_BOOTSTRAP`, and `KAFKA_BOOTSTRAP` / `POSTGRES_URL` must be
    /// reachable from the test machine and from the cluster's pods (see e2e/README.md).
    pub async fn start(dir: Option<PathBuf>) -> Result<Stack> {
        if std::env::var_os("E2E_KUBECONFIG").is_some() {
            return Self::start_remote(dir).await;
        }
        Self::start_with(dir, binaries_dir()?).await
    }

    fn workdir(dir: Option<PathBuf>) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
        Ok(match dir {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                (None, std::fs::canonicalize(d)?)
            }
            None => {
                // E2E_KEEP_DIR keeps logs and pod directories of every run for a post-mortem.
                let mut b = tempfile::Builder::new();
                b.prefix("obsrv-e2e-")
                    .disable_cleanup(std::env::var_os("E2E_KEEP_DIR").is_some());
                let t = b.tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        })
    }

    async fn broker_with_topics() -> Result<Broker> {
        let broker = Broker::start().await?;
        for topic in [INGEST_TOPIC, FAILED_TOPIC, STATE_TOPIC] {
            broker.create_topic(topic, 1).await?;
        }
        Ok(broker)
    }

    /// [`Stack::start`] on the local control plane, with the directory holding `obsrv-operator`
    /// and `obsrv-connector`. Uses the `default` namespace.
    pub async fn start_with(dir: Option<PathBuf>, bin_dir: PathBuf) -> Result<Stack> {
        let (tmp, dir) = Self::workdir(dir)?;
        let broker = Self::broker_with_topics().await?;
        let kubelet = KubeletOptions::new(vec![
            ImageBinary::new(CONNECTOR_IMAGE, bin_dir.join("obsrv-connector")),
            ImageBinary::new(OWN_BUILD_IMAGE, bin_dir.join("obsrv-connector")),
            ImageBinary::new(EXAMPLE_CUSTOM_IMAGE, bin_dir.join(EXAMPLE_CUSTOM_BINARY)),
        ]);
        let cp = ControlPlane::start(ControlPlaneOptions {
            dir: Some(dir.join("cluster")),
            kubelet: Some(kubelet),
            ..ControlPlaneOptions::default()
        })
        .await?;
        let kubeconfig = dir.join("kubeconfig");
        cp.write_kubeconfig(&kubeconfig)?;
        let mut stack = Stack {
            cluster: Cluster::Local {
                cp: Box::new(cp),
                operator: None,
                runs: 0,
                admin: None,
            },
            broker,
            kubeconfig,
            namespace: "default".into(),
            dir,
            bin_dir,
            _tmp: tmp,
        };
        let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/connector.yaml");
        stack.kubectl_ok(&["apply", "-f", crd.to_str().unwrap_or_default()])?;
        stack.start_operator()?;
        Ok(stack)
    }

    async fn start_remote(dir: Option<PathBuf>) -> Result<Stack> {
        if std::env::var_os("KAFKA_BOOTSTRAP").is_none() {
            bail!(
                "E2E_KUBECONFIG is set, so KAFKA_BOOTSTRAP must name a broker that the test machine and the cluster's pods both reach"
            );
        }
        let (tmp, dir) = Self::workdir(dir)?;
        let broker = Self::broker_with_topics().await?;
        let kubeconfig = PathBuf::from(std::env::var("E2E_KUBECONFIG")?);
        let operator_namespace =
            std::env::var("E2E_OPERATOR_NAMESPACE").unwrap_or_else(|_| "obsrv-system".into());
        // Tests on a shared cluster each get a namespace, so their objects cannot collide.
        let namespace = unique_name("obsrv-e2e").replace('_', "-");
        let stack = Stack {
            cluster: Cluster::Remote { operator_namespace },
            broker,
            kubeconfig,
            namespace,
            dir,
            bin_dir: PathBuf::new(),
            _tmp: tmp,
        };
        stack.kubectl_ok(&["create", "namespace", &stack.namespace])?;
        Ok(stack)
    }

    /// The local control plane (None on a real cluster).
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        match &self.cluster {
            Cluster::Local { cp, .. } => Some(cp),
            Cluster::Remote { .. } => None,
        }
    }

    /// Starts (or restarts) the operator binary against the control plane. On a real cluster the
    /// operator's Deployment brings it back by itself, so this only waits for that.
    pub fn start_operator(&mut self) -> Result<()> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let Cluster::Local { runs, .. } = &mut self.cluster else {
            return Ok(());
        };
        *runs += 1;
        let log = self.dir.join(format!("operator-{runs}.log"));
        let child = self.spawn_operator(&admin, &log, &[], None)?;
        if let Cluster::Local {
            operator,
            admin: admin_addr,
            ..
        } = &mut self.cluster
        {
            *admin_addr = Some(admin);
            *operator = Some(child);
        }
        Ok(())
    }

    /// One more operator replica with leader election on (the Lease `obsrv-operator` in the
    /// stack's namespace), as the chart runs two; `identity` is its pod name. Its log is
    /// `operator-<identity>.log`.
    pub fn start_operator_replica(&self, identity: &str) -> Result<Process> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let log = self.dir.join(format!("operator-{identity}.log"));
        self.spawn_operator(
            &admin,
            &log,
            &["--leader-election", "--lease-namespace", &self.namespace],
            Some(identity),
        )
    }

    fn spawn_operator(
        &self,
        admin: &str,
        log: &Path,
        extra: &[&str],
        pod_name: Option<&str>,
    ) -> Result<Process> {
        let log = std::fs::File::create(log)?;
        let mut cmd = Command::new(self.bin_dir.join("obsrv-operator"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .args(["--connector-image", &format!("{CONNECTOR_IMAGE}:dev")])
            .args(["--sink-bootstrap-servers", self.broker.bootstrap()])
            .args([
                "--sink-topic",
                INGEST_TOPIC,
                "--sink-failed-topic",
                FAILED_TOPIC,
            ])
            .args(["--sink-state-topic", STATE_TOPIC])
            .args([
                "--status-poll-interval",
                "2s",
                "--admin-addr",
                admin,
                "--log-format",
                "text",
            ])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        if let Some(name) = pod_name {
            cmd.env("POD_NAME", name);
        }
        Ok(Process(cmd.spawn().context("starting obsrv-operator")?))
    }

    /// `host:port` of the local operator's admin server (`/metrics`, `/healthz`, `/readyz`); None on
    /// a real cluster, where the chart's `<fullname>-metrics` Service exposes it.
    pub fn operator_admin(&self) -> Option<&str> {
        match &self.cluster {
            Cluster::Local { admin, .. } => admin.as_deref(),
            Cluster::Remote { .. } => None,
        }
    }

    /// `kill -9` of the operator (a forced delete of its pods on a real cluster).
    pub fn kill_operator(&mut self) -> Result<()> {
        match &mut self.cluster {
            Cluster::Local { operator, .. } => {
                if let Some(p) = operator.take() {
                    p.kill9();
                }
                Ok(())
            }
            Cluster::Remote { operator_namespace } => {
                let ns = operator_namespace.clone();
                self.kubectl_ok(&[
                    "delete",
                    "pod",
                    "-n",
                    &ns,
                    "-l",
                    "app.kubernetes.io/name=obsrv-operator",
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ])?;
                Ok(())
            }
        }
    }

    /// `kill -9` of the process behind a connector pod (a forced delete of the pod on a real cluster).
    pub fn kill_pod(&self, pod: &Value) -> Result<()> {
        match &self.cluster {
            Cluster::Local { cp, .. } => {
                let name = pod["metadata"]["name"].as_str().context("pod name")?;
                let pid = cp
                    .pod_pid(&self.namespace, name)
                    .with_context(|| format!("no process runs pod {name}"))?;
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                Ok(())
            }
            Cluster::Remote { .. } => {
                let name = pod["metadata"]["name"].as_str().context("pod name")?;
                self.kubectl_ok(&[
                    "delete",
                    "pod",
                    name,
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ])?;
                Ok(())
            }
        }
    }

    /// No process of the pod that had `ip` runs any more (always true on a real cluster, where the
    /// pod objects are the only view).
    pub fn processes_gone(&self, ip: &str) -> bool {
        match &self.cluster {
            Cluster::Local { .. } => connector_pids_on(ip).is_empty(),
            Cluster::Remote { .. } => true,
        }
    }

    /// Where to look when something times out.
    pub fn logs_hint(&self) -> String {
        match &self.cluster {
            Cluster::Local { runs, .. } => format!(
                "operator log: {}, pod logs: {}",
                self.dir.join(format!("operator-{runs}.log")).display(),
                self.dir.join("cluster/logs").display()
            ),
            Cluster::Remote { operator_namespace } => format!(
                "kubectl logs -n {operator_namespace} -l app.kubernetes.io/name=obsrv-operator; kubectl logs -n {} -l app.kubernetes.io/name=obsrv-connector",
                self.namespace
            ),
        }
    }

    /// Everything the connector pods logged so far (local control plane: one file per pod, with
    /// every restart of its container).
    pub fn pod_logs(&self) -> Result<String> {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("cluster/logs"))?.flatten() {
            if entry.path().is_file() {
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        Ok(out)
    }

    /// Path of the current operator's log (local control plane).
    pub fn operator_log(&self) -> PathBuf {
        let runs = match &self.cluster {
            Cluster::Local { runs, .. } => *runs,
            Cluster::Remote { .. } => 0,
        };
        self.dir.join(format!("operator-{runs}.log"))
    }

    /// Runs kubectl against the control plane, optionally with `stdin`.
    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Result<KubectlOutput> {
        let mut child = Command::new("kubectl")
            .args(["--namespace", &self.namespace])
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl (is it on PATH?)")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok(KubectlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs kubectl and fails with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_with(args, None)?;
        if !out.success {
            bail!("kubectl {}: {}", args.join(" "), out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// `kubectl apply -f -` of a manifest.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_with(&["apply", "-f", "-"], Some(yaml))?;
        if !out.success {
            bail!("kubectl apply: {}", out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// `kubectl get <what> -o json`.
    pub fn get_json(&self, what: &[&str]) -> Result<Value> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl_ok(&args)?)?)
    }

    /// A Connector's status condition (`type`), or Null.
    pub fn condition(&self, connector: &str, type_: &str) -> Result<Value> {
        let c = self.get_json(&["connector", connector])?;
        Ok(c["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null))
    }

    /// Pods of a Connector (by the `obsrv.io/connector` label), running or not.
    pub fn pods(&self, connector: &str) -> Result<Vec<Value>> {
        let list = self.get_json(&["pods", "-l", &format!("obsrv.io/connector={connector}")])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Names of the pods of a Connector that are Ready.
    pub fn ready_pods(&self, connector: &str) -> Result<Vec<String>> {
        Ok(self
            .pods(connector)?
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter(|p| {
                p["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect())
    }

    /// Polls `probe` every 500 ms until it yields a value; the error names what was awaited and the
    /// last thing seen, with the operator's log path.
    pub async fn eventually<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl AsyncFnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match probe().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "timed out after {timeout:?} waiting for {what} (last error: {last}); {}",
            self.logs_hint()
        )
    }
}

/// Distinct `event.id`s of the records in the ingest topic for `dataset`, once there are at least
/// `expected` (or at `timeout`, with what arrived).
pub async fn ingested_ids(
    broker: &Broker,
    dataset: &str,
    expected: usize,
    timeout: Duration,
) -> Result<std::collections::BTreeSet<i64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let ids: std::collections::BTreeSet<i64> = broker
            .consume_all(INGEST_TOPIC, usize::MAX, Duration::from_secs(3))
            .await?
            .iter()
            .filter_map(|r| r.json().ok())
            .filter(|v| v["dataset"] == dataset)
            .filter_map(|v| v["event"]["id"].as_i64())
            .collect();
        if ids.len() >= expected || Instant::now() > deadline {
            return Ok(ids);
        }
    }
}

/// Pids of `obsrv-connector` processes serving `ip` (found by their `OBSRV_LISTEN` environment),
/// the way an operator of a node would find a pod's process.
pub fn connector_pids_on(ip: &str) -> Vec<i32> {
    let needle = format!("OBSRV_LISTEN={ip}:");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.split(|b| *b == 0)
                        .any(|kv| kv.starts_with(needle.as_bytes()))
                })
                .unwrap_or(false)
        })
        .collect()
}

impl Drop for Stack {
    fn drop(&mut self) {
        match &mut self.cluster {
            // Operator first, so it does not react to pods going away; the control plane then
            // stops every pod process when it drops.
            Cluster::Local { operator, .. } => drop(operator.take()),
            Cluster::Remote { .. } => {
                let _ = self.kubectl_with(
                    &["delete", "namespace", &self.namespace, "--wait=false"],
                    None,
                );
            }
        }
    }
}
