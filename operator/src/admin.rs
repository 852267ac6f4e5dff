//! Admin HTTP server: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz` (the CRD
//! is established and the controller runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub leader: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = s.metrics.encode();
    // The leader gauge is appended by hand: it is process state, not a registry metric.
    if let Some(stripped) = body.strip_suffix("# EOF\n") {
        body = format!(
            "{stripped}# HELP obsrv_operator_leader Whether this replica holds the Lease and writes.\n# TYPE obsrv_operator_leader gauge\nobsrv_operator_leader {}\n# EOF\n",
            u8::from(s.leader.load(Ordering::Relaxed))
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the Connector CRD",
        )
    }
}

/// Serves until `shutdown` flips to true.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
}
