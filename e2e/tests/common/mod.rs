//! Helpers shared by the control-plane tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions, ImageBinary, KubeletOptions};
use serde_json::{Value, json};

/// The image the kubelet runs as the stand-in program in these tests.
pub const STANDIN_IMAGE: &str = "example.com/obsrv/standin";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

pub async fn api_server() -> ControlPlane {
    ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts")
}

pub async fn with_kubelet() -> ControlPlane {
    let mut k = KubeletOptions::new(vec![ImageBinary::new(
        STANDIN_IMAGE,
        env!("CARGO_BIN_EXE_obsrv-e2e-standin"),
    )]);
    k.shutdown_grace = Duration::from_secs(3);
    ControlPlane::start(ControlPlaneOptions {
        kubelet: Some(k),
        ..ControlPlaneOptions::default()
    })
    .await
    .expect("control plane starts")
}

/// Runs kubectl against the control plane. A missing kubectl is a failure that says how to install it.
pub fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = std::process::Command::new("kubectl");
    cmd.args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .current_dir(repo_root());
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl is required on PATH ({e}); install it with scripts/setup.sh or https://kubernetes.io/docs/tasks/tools/"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("kubectl runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Registers crds/connector.yaml with server-side apply and waits until it is Established.
pub async fn install_connector_crd(client: &kube::Client) {
    let yaml = std::fs::read_to_string(repo_root().join("crds/connector.yaml"))
        .expect("crds/connector.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("CRD parses");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        "connectors.obsrv.io",
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applies");
    let established = eventually(Duration::from_secs(10), || async {
        let crd = api.get("connectors.obsrv.io").await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(established.is_some(), "the CRD never became Established");
}

/// A valid Postgres Connector manifest.
pub fn connector(name: &str, dataset: &str) -> Value {
    json!({
        "apiVersion": "obsrv.io/v1alpha1",
        "kind": "Connector",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "dataset": dataset,
            "source": {"postgres": {
                "host": "db", "database": "shop",
                "credentials": {"secretName": "pg-creds"},
                "tables": [{"name": "public.orders", "cursor": {"column": "updated_at", "tieBreaker": "id"}}],
            }},
            "scaling": {"replicas": 1},
        },
    })
}

/// Polls `f` every 100ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
