//! The `run` command: wait for the CRD, start admin server, leader election and controller, and
//! shut all down gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use obsrv_crds::Connector;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::{controller, leader};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let is_leader = Arc::new(AtomicBool::new(!config.leader_election));
    let admin_state = AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        leader: is_leader.clone(),
    };
    // Bind before anything else: a port in use is a startup error, not a silent missing probe.
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", config.admin_addr))?;
    let admin = tokio::spawn(admin::serve(listener, admin_state, stop_rx.clone()));
    info!(addr = %config.admin_addr, "admin server listening");

    let client = Client::try_default().await?;
    if !wait_for_crd(&client, stop_rx.clone()).await {
        return Ok(());
    }
    ready.store(true, Ordering::Relaxed);

    let lease = if config.leader_election {
        let me = std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("obsrv-operator-{}", std::process::id()));
        info!(identity = %me, lease = %config.lease_name, "leader election on");
        Some(tokio::spawn(leader::run(
            client.clone(),
            config.lease_namespace(),
            config.lease_name.clone(),
            me,
            is_leader.clone(),
            stop_rx.clone(),
        )))
    } else {
        None
    };

    let ctx = Arc::new(Context::new(client, config, metrics, is_leader));
    controller::run(ctx, stop_rx).await;
    if let Some(l) = lease {
        let _ = l.await;
    }
    match admin.await {
        Ok(Err(e)) => error!(error = %e, "admin server failed"),
        Err(e) => error!(error = %e, "admin server task failed"),
        Ok(Ok(())) => {}
    }
    info!("stopped");
    Ok(())
}

/// Waits until the Connector CRD is Established; false when asked to stop first.
async fn wait_for_crd(client: &Client, mut stop: watch::Receiver<bool>) -> bool {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = Connector::crd_name();
    let mut pause = Duration::from_secs(1);
    loop {
        let wait = tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), name, conditions::is_crd_established()),
        );
        tokio::select! {
            r = wait => match r {
                Ok(Ok(_)) => {
                    info!(crd = name, "CRD established");
                    return true;
                }
                Ok(Err(e)) => warn!(crd = name, error = %e, "waiting for the CRD failed; retrying"),
                Err(_) => warn!(crd = name, "CRD not established yet; install it (helm chart or crds/connector.yaml)"),
            },
            _ = stop.changed() => return false,
        }
        // Back off while the API server is unreachable, up to 30s, still answering to shutdown.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return false,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
