//! Starts the local control plane (API server + kubelet), writes a kubeconfig and waits for Ctrl-C.

use std::path::PathBuf;

use clap::Parser;
use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions, ImageBinary, KubeletOptions};

/// A local Kubernetes control plane for Obsrv Connectors: an API server that kubectl and kube-rs
/// clients use through a kubeconfig, and a kubelet that runs connector pods as local processes.
#[derive(Parser, Debug)]
#[command(name = "obsrv-local-cluster", version)]
struct Args {
    /// Where to write the kubeconfig.
    #[arg(
        long,
        env = "OBSRV_LOCAL_KUBECONFIG",
        default_value = "target/obsrv-local/kubeconfig"
    )]
    kubeconfig: PathBuf,
    /// Port of the API server on 127.0.0.1 (0 = any free port).
    #[arg(long, env = "OBSRV_LOCAL_PORT", default_value_t = 0)]
    port: u16,
    /// Directory for pod volumes and logs (`<dir>/logs/<namespace>_<pod>.log`).
    #[arg(long, env = "OBSRV_LOCAL_DIR", default_value = "target/obsrv-local")]
    dir: PathBuf,
    /// Image (repository, any tag) whose pods run as local processes.
    #[arg(
        long,
        env = "OBSRV_CONNECTOR_IMAGE",
        default_value = "ghcr.io/obsrv/obsrv-connector"
    )]
    connector_image: String,
    /// The program those pods run (the `obsrv-connector` binary).
    #[arg(
        long,
        env = "OBSRV_CONNECTOR_BINARY",
        default_value = "target/debug/obsrv-connector"
    )]
    connector_binary: PathBuf,
    /// Do not run pods (API server only).
    #[arg(long)]
    no_kubelet: bool,
    /// More images to run as local programs, `IMAGE=PROGRAM` (repeatable), e.g.
    /// `--image example.com/tools=/bin/sh`.
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<ImageBinary>,
}

fn parse_image(s: &str) -> Result<ImageBinary, String> {
    let (image, program) = s.split_once('=').ok_or("expected IMAGE=PROGRAM")?;
    Ok(ImageBinary::new(image, program))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let binary =
        std::fs::canonicalize(&args.connector_binary).unwrap_or(args.connector_binary.clone());
    if !args.no_kubelet && !binary.exists() {
        eprintln!(
            "warning: {} does not exist yet; connector pods will show RunContainerError until it does (cargo build -p obsrv-connector)",
            binary.display()
        );
    }
    let kubelet = (!args.no_kubelet).then(|| {
        let mut images = vec![ImageBinary::new(
            args.connector_image.clone(),
            binary.clone(),
        )];
        images.extend(args.images.iter().cloned());
        KubeletOptions::new(images)
    });
    let cp = ControlPlane::start(ControlPlaneOptions {
        port: args.port,
        dir: Some(args.dir.clone()),
        kubelet,
        ..ControlPlaneOptions::default()
    })
    .await?;
    if let Some(parent) = args.kubeconfig.parent() {
        std::fs::create_dir_all(parent)?;
    }
    cp.write_kubeconfig(&args.kubeconfig)?;
    let kubeconfig = std::fs::canonicalize(&args.kubeconfig).unwrap_or(args.kubeconfig.clone());
    println!("Local control plane listening on {}", cp.url());
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl apply -f crds/connector.yaml && kubectl get connectors");
    if !args.no_kubelet {
        println!(
            "Pods with image {}[:tag] run {} on their own 127.x.y.N; logs in {}/logs",
            args.connector_image,
            binary.display(),
            args.dir.display()
        );
    }
    println!("Stop with Ctrl-C (stops every process it started).");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("Stopping...");
    cp.shutdown().await;
    Ok(())
}
