//! Admin HTTP server: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz` (the CRD
//! is established and the controller runs).

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
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use obsrv_crds::Phase;
    use tower::ServiceExt;

    async fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
        let resp = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::new());
        let state = AdminState {
            metrics: metrics.clone(),
            ready: Arc::new(AtomicBool::new(false)),
            leader: Arc::new(AtomicBool::new(true)),
        };
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);

        metrics.reconciled(std::time::Duration::from_millis(20));
        metrics.failed("TooManyRequests");
        metrics.set_phase("shop/orders", Some(Phase::Running));
        metrics.set_phase("shop/files", Some(Phase::Running));
        metrics.set_phase("shop/old", Some(Phase::Failed));
        metrics.set_phase("shop/old", None);
        let (code, body) = get(&state, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("obsrv_operator_reconciles_total 1"), "{body}");
        assert!(
            body.contains("obsrv_operator_reconcile_failures_total{reason=\"TooManyRequests\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("obsrv_operator_reconcile_duration_seconds_count 1"),
            "{body}"
        );
        assert!(
            body.contains("obsrv_operator_connectors{phase=\"Running\"} 2"),
            "{body}"
        );
        assert!(
            body.contains("obsrv_operator_connectors{phase=\"Failed\"} 0"),
            "{body}"
        );
        assert!(body.contains("obsrv_operator_leader 1"), "{body}");
        assert!(body.ends_with("# EOF\n"));
    }
}
