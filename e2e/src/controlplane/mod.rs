//! A local Kubernetes control plane for the end-to-end suite and the demo: an API server (kubectl and
//! kube-rs talk to it through an ordinary kubeconfig) and a local "kubelet" that runs Deployment and
//! Job pods whose image is the connector image as real processes on loopback addresses (127.x.y.N, a /24 per process).
//!
//! The same API server also runs in-process, without a socket ([`InProcessApi`]): the operator's
//! reconcile tests and its cold-start bench use it as their in-memory API, with every call recorded
//! ([`CallLog`]) to check against the operator's RBAC.
//!
//! ```no_run
//! # async fn demo() -> Result<(), obsrv_e2e::controlplane::ControlPlaneError> {
//! use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions, KubeletOptions, ImageBinary};
//! let cp = ControlPlane::start(ControlPlaneOptions {
//!     kubelet: Some(KubeletOptions::new(vec![ImageBinary::new("ghcr.io/obsrv/obsrv-connector", "target/debug/obsrv-connector")])),
//!     ..ControlPlaneOptions::default()
//! })
//! .await?;
//! let client = cp.client().await?;
//! println!("KUBECONFIG={}", cp.kubeconfig_path().display());
//! # drop(client); cp.shutdown().await; Ok(()) }
//! ```
//!
//! # How it differs from a real cluster
//!
//! Good enough for the operator, kubectl and the suite; not a conformant API server. Honestly:
//!
//! **API server** ([`server`], [`store`], validation by `obsrv_crds::schema`)
//! - No authentication or authorization: RBAC is not enforced (the Helm chart check compares the
//!   operator's declared RBAC instead). Plain HTTP on 127.0.0.1.
//! - Server-side apply is simplified: each *Apply* manager owns the leaf fields it sets; another
//!   Apply manager changing one of them with a different value is a 409 conflict unless `force`
//!   (then ownership moves); fields a manager stops applying are removed unless another manager
//!   owns them. Lists are atomic (no `x-kubernetes-list-type: map` merging: two managers applying
//!   different entries of one list replace each other). PUT / merge / JSON / strategic patches do
//!   not record ownership, so they never conflict and their fields are not protected.
//! - Strategic merge patch: lists with a well-known merge key (`containers`, `env`, `volumes`,
//!   `ownerReferences` by name, `volumeMounts` by mountPath, `ports` by containerPort,
//!   `conditions` by type) merge by key with `$patch: delete`; other directives are ignored and
//!   other lists are replaced. Custom resources reject it (415), like a real server.
//! - Watch history is a ring of the last `watch_history` changes (a watch from before it gets a
//!   410 ERROR event); bookmarks every 5 s when asked; `sendInitialEvents` supported. `limit` /
//!   `continue` are ignored (lists are returned whole) and the `resourceVersion` of GET/LIST is
//!   ignored (always the latest state).
//! - Validation: custom resources get schema defaults, pruning (or rejection with
//!   `fieldValidation=Strict`), `type`, `nullable`, `required`, `enum`, min/max, lengths, item
//!   counts and CEL rules (kube-cel); `pattern`, `format`, `multipleOf`, list uniqueness are not
//!   checked. Writes to `/status` are checked against the schema of `.status` only. Updates ratchet
//!   per path: an error at a path whose value did not change is not reported (Kubernetes ratchets
//!   per schema node and exempts a few keywords). Built-in kinds only get metadata checks and a few
//!   defaults.
//! - Deletion: `Foreground` is treated as `Background`; `Orphan` strips owner references. The
//!   garbage collector runs after deletions and every 2 s and ignores `blockOwnerDeletion`.
//!   Deleting a CRD drops its objects at once (their finalizers are not waited for).
//! - One storage version per CRD, no conversion between versions; no admission webhooks, quotas or
//!   Service networking (Services are stored; their names do not resolve).
//! - OpenAPI v3 lists PATCH operations only (so kubectl validates fields on the server) and the
//!   schemas of custom resources (`kubectl explain connectors.spec` works); built-in kinds have no
//!   schema (`kubectl explain pods` does not work). Protobuf bodies are understood only for
//!   `kubectl create secret|configmap|namespace|serviceaccount`.
//!
//! **Kubelet** ([`kubelet`])
//! - No ReplicaSets: Deployments own their pods directly. Rolling updates honour maxSurge /
//!   maxUnavailable (ready counts as available: minReadySeconds is ignored); `Recreate` deletes
//!   every old pod first; `kubectl rollout status` works, `rollout undo/history` do not.
//! - One container per pod runs (the first whose image matches an [`ImageBinary`]); init containers
//!   and other containers are ignored. Pods of other images stay Pending (Unschedulable, with a
//!   message naming the runnable images).
//! - No isolation: processes run as the current user without resource limits or security context;
//!   the host environment is not inherited except `KubeletOptions::inherit_env`. Volume mount
//!   paths are rewritten in args and env values only (a program hard-coding a mount path does not
//!   find it). Pods get a 127.x.y.N address; declared ports are not enforced (the process binds
//!   `OBSRV_LISTEN`).
//! - Readiness: the HTTP readiness probe every `probe_period` (300 ms), not the pod's
//!   periodSeconds; exec/tcp probes count as passing. Liveness: HTTP only, with the pod's timings.
//!   Restart back-off 0.5 s doubling to 5 s. Volumes: configMap, secret, emptyDir (others are
//!   empty directories), refreshed about every 2 s. Logs: `kubectl logs` (no follow/previous).
//! - Jobs: one pod at a time until one succeeds, `backoffLimit`; no deadlines, TTL or
//!   parallelism.

pub mod calls;
pub mod error;
pub mod events;
pub mod inprocess;
pub mod kubelet;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod server;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use calls::{Call, CallLog};
pub use inprocess::InProcessApi;
pub use kubelet::{ImageBinary, KubeletOptions};
pub use store::Store;

/// Why the control plane could not start or a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build a client from {path}: {message}")]
    Client { path: PathBuf, message: String },
}

impl ControlPlaneError {
    /// Stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ControlPlaneError::Bind { .. } => "BindFailed",
            ControlPlaneError::Write { .. } => "WriteFailed",
            ControlPlaneError::Client { .. } => "ClientFailed",
        }
    }
}

/// How to start the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Directory for the kubeconfig, pod directories and logs; a temporary directory (removed on
    /// drop) when `None`.
    pub dir: Option<PathBuf>,
    /// How many changes the watch history keeps; a watch from an older resourceVersion gets 410 Gone.
    pub watch_history: usize,
    /// Run pods as processes; `None` runs only the API server (pods stay Pending).
    pub kubelet: Option<KubeletOptions>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            port: 0,
            dir: None,
            watch_history: 10_000,
            kubelet: None,
        }
    }
}

/// A running control plane. Dropping it stops the server and kills every process it started;
/// [`ControlPlane::shutdown`] stops them gracefully (SIGTERM first).
pub struct ControlPlane {
    addr: SocketAddr,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    kubeconfig: PathBuf,
    store: Arc<Store>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    kubelet: Option<JoinHandle<()>>,
}

impl ControlPlane {
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self, ControlPlaneError> {
        let (temp, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|source| ControlPlaneError::Write {
                    path: d.clone(),
                    source,
                })?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("obsrv-local-cluster-")
                    .tempdir()
                    .map_err(|source| ControlPlaneError::Write {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let bind = format!("127.0.0.1:{}", opts.port);
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ControlPlaneError::Bind { addr: bind, source })?;
        let store = Store::new(opts.watch_history, opts.kubelet.is_some());
        let app = Arc::new(server::App {
            store: store.clone(),
            address: addr.to_string(),
            logs: dir.join("logs"),
            calls: None,
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut server_stop = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let serve =
                axum::serve(listener, server::router(app)).with_graceful_shutdown(async move {
                    let _ = server_stop.changed().await;
                });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "local API server stopped");
            }
        }));
        tasks.push(tokio::spawn(garbage_collector(
            store.clone(),
            stopped.clone(),
        )));
        let kubelet = opts
            .kubelet
            .clone()
            .map(|k| tokio::spawn(kubelet::run(store.clone(), k, dir.clone(), stopped.clone())));
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&format!("http://{addr}"))).map_err(
            |source| ControlPlaneError::Write {
                path: kubeconfig.clone(),
                source,
            },
        )?;
        Ok(ControlPlane {
            addr,
            dir,
            _temp: temp,
            kubeconfig,
            store,
            stop,
            tasks,
            kubelet,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Where pod directories and logs live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the kubeconfig to another path too (the binary's `--kubeconfig`).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ControlPlaneError> {
        std::fs::write(path, kubeconfig_yaml(&self.url())).map_err(|source| {
            ControlPlaneError::Write {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// A kube-rs client built from the kubeconfig, as any other client would.
    pub async fn client(&self) -> Result<kube::Client, ControlPlaneError> {
        client_from(&self.kubeconfig).await
    }

    /// The pid of the process running a pod (to `kill -9` it in a test, as a node failure would).
    pub fn pod_pid(&self, namespace: &str, name: &str) -> Option<u32> {
        kubelet::pod_pid(&self.dir, namespace, name)
    }

    /// Direct access to the store (tests: [`Store::compact`] to provoke 410 Gone).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops the kubelet (SIGTERM to every process, SIGKILL after the grace period), then the server.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(k) = self.kubelet.take() {
            let _ = k.await;
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Processes are spawned with kill_on_drop and a registry the kubelet kills synchronously.
        kubelet::kill_all_now(&self.dir);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A kube-rs client from a kubeconfig file (its current context).
pub async fn client_from(path: &Path) -> Result<kube::Client, ControlPlaneError> {
    let err = |message: String| ControlPlaneError::Client {
        path: path.to_path_buf(),
        message,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// One garbage-collection sweep; a panic on an odd object is logged, not fatal to the collector.
fn gc_once(store: &Store) -> usize {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.collect_garbage()))
        .unwrap_or_else(|_| {
            tracing::error!("garbage collection sweep failed");
            0
        })
}

async fn garbage_collector(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut changes = store.subscribe();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = changes.recv() => {
                let deleted = match r {
                    Ok(c) => c.kind == "DELETED" || c.object.pointer("/metadata/deletionTimestamp").is_some(),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if deleted {
                    // Let a burst of deletions land, then sweep once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changes.try_recv().is_ok() {}
                    while gc_once(&store) > 0 {}
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                gc_once(&store);
            }
        }
    }
}

/// A kubeconfig for `server` (plain HTTP, no credentials: the local API server does not authenticate).
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: obsrv-local\n  cluster:\n    server: {server}\ncontexts:\n- name: obsrv-local\n  context:\n    cluster: obsrv-local\n    user: obsrv-local\n    namespace: default\ncurrent-context: obsrv-local\nusers:\n- name: obsrv-local\n  user: {{}}\n"
    )
}
