//! The connector's HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use obsrv_crds::{
    RuntimeState, RuntimeStatus,
    status::{LastError, Totals},
};

use crate::{error::Error, metrics::Metrics, sink::Failures, source::Lag};

/// What the runtime reports, shared by the pipeline and the HTTP server.
pub struct Shared {
    status: Mutex<RuntimeStatus>,
    failure_log: Mutex<FailureLog>,
    pub metrics: Metrics,
}

/// How often each kind of failed record is logged at most (with the count since the last line).
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// Rate limit of the failed-record log: per error code, the first occurrence at once, then at
/// most one line per [`FAILURE_LOG_EVERY`] with how many came meanwhile. Pure: it says what to log.
#[derive(Debug, Default)]
pub struct FailureLog {
    by_code: BTreeMap<&'static str, (Option<Instant>, u64)>,
}

impl FailureLog {
    /// Counts `failures` seen at `now`; returns the lines due: `(code, count, example message)`.
    pub fn record(
        &mut self,
        failures: &Failures,
        now: Instant,
    ) -> Vec<(&'static str, u64, String)> {
        let mut due = Vec::new();
        for (code, (n, example)) in &failures.0 {
            let (last, pending) = self.by_code.entry(code).or_insert((None, 0));
            *pending += n;
            if last.is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_EVERY) {
                due.push((*code, *pending, example.clone()));
                *last = Some(now);
                *pending = 0;
            }
        }
        due
    }
}

impl Shared {
    pub fn new(config_checksum: Option<String>) -> Arc<Shared> {
        let status = RuntimeStatus {
            started_at: Some(Time(Timestamp::now())),
            config_checksum,
            ..RuntimeStatus::default()
        };
        Arc::new(Shared {
            status: Mutex::new(status),
            failure_log: Mutex::new(FailureLog::default()),
            metrics: Metrics::new(),
        })
    }

    pub fn status(&self) -> RuntimeStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RuntimeStatus> {
        // A panic while holding the lock cannot leave the status half-written in a harmful way.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_state(&self, state: RuntimeState) {
        self.lock().state = state;
    }

    pub fn set_ready(&self, ready: bool) {
        self.lock().ready = ready;
    }

    pub fn set_max_parallelism(&self, p: Option<i32>) {
        self.lock().max_parallelism = p;
    }

    pub fn set_lag(&self, lag: Lag) {
        {
            let mut s = self.lock();
            s.lag_records = Some(lag.records);
            s.lag_seconds = lag.seconds;
            s.lag_bytes = lag.bytes;
        }
        self.metrics.lag_records.set(lag.records);
        self.metrics.lag_seconds.set(lag.seconds.unwrap_or(0.0));
    }

    /// Caught up: nothing left to read (bytes shown as 0 only by sources that count bytes).
    pub fn set_caught_up(&self) {
        let had_bytes = self.lock().lag_bytes.is_some();
        self.set_lag(Lag {
            records: 0,
            seconds: Some(0.0),
            bytes: had_bytes.then_some(0),
        });
    }

    /// Records a failure: `Degraded` with the reason, until the next success.
    pub fn error(&self, e: &Error) {
        tracing::warn!(reason = e.reason(), error = %e, "connector error");
        self.metrics.error(e.reason());
        let mut s = self.lock();
        if s.state != RuntimeState::Stopping {
            s.state = RuntimeState::Degraded;
        }
        // Not ready until the next success proves source and sink answer again.
        s.ready = false;
        s.failed_attempts = s.failed_attempts.saturating_add(1);
        s.last_error = Some(LastError {
            reason: e.reason().to_string(),
            message: e.to_string(),
            time: Some(Time(Timestamp::now())),
        });
    }

    /// Logs records sent to the failed topic, rate-limited per error code.
    pub fn failures(&self, f: &Failures) {
        if f.0.is_empty() {
            return;
        }
        let due = self
            .failure_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(f, Instant::now());
        for (code, count, example) in due {
            tracing::warn!(
                error_code = code,
                count,
                example = %example,
                "records sent to the failed topic (logged at most every {}s per code)",
                FAILURE_LOG_EVERY.as_secs()
            );
        }
    }

    /// Records an acknowledged batch.
    pub fn success(&self, add: Totals, watermark: Option<String>) {
        {
            let mut s = self.lock();
            s.totals = s.totals + add;
            if watermark.is_some() {
                s.watermark = watermark;
            }
        }
        self.healthy();
    }

    /// Source and sink just worked (a batch delivered, or caught up after a clean read and
    /// commit): the last error is over, even on a quiet source with nothing new to deliver.
    pub fn healthy(&self) {
        let now = Timestamp::now();
        self.metrics.last_success.set(now.as_second());
        let mut s = self.lock();
        s.last_success_at = Some(Time(now));
        s.last_error = None;
        s.failed_attempts = 0;
        s.ready = true;
        if matches!(s.state, RuntimeState::Degraded | RuntimeState::Starting) {
            s.state = RuntimeState::Running;
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(shared)
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.status().ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn status(State(s): State<Arc<Shared>>) -> Json<RuntimeStatus> {
    Json(s.status())
}

/// Binds the HTTP port and serves until the process ends.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "http listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(shared)).await {
            tracing::error!(error = %e, "http server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_records_are_logged_once_per_interval_per_code_with_a_count() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let mut bad = Failures::default();
        bad.add("CE_1000", "line 3 of s3://b/k: not JSON".into());
        bad.add("CE_1000", "line 9 of s3://b/k: not JSON".into());
        assert_eq!(
            log.record(&bad, t0),
            vec![("CE_1000", 2, "line 3 of s3://b/k: not JSON".to_string())],
            "the first occurrence at once"
        );
        assert!(log.record(&bad, t0 + Duration::from_secs(5)).is_empty());
        let mut big = Failures::default();
        big.add("CE_1001", "too large".into());
        assert_eq!(
            log.record(&big, t0 + Duration::from_secs(6)).len(),
            1,
            "another code"
        );
        let due = log.record(&bad, t0 + FAILURE_LOG_EVERY);
        assert_eq!(due[0].1, 4, "the count since the last line");
    }
}
