//! Observing connector pods: poll each ready pod's `GET /status` (short timeout, bounded
//! concurrency) and aggregate the reports. A pod that cannot be reached is a reason, not a failure.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use obsrv_crds::status::{LastError, Restarts, RuntimeState, RuntimeStatus, Totals};

/// Reason used when a ready pod does not answer `/status`.
pub const POD_UNREACHABLE: &str = "PodUnreachable";

/// A pod to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pod: String,
    pub url: String,
    /// The pod passed its readiness probe. Pods that are not ready are polled too (their
    /// `/status` says *why*), but one that does not answer is just starting, not failing.
    pub ready: bool,
}

/// What one pod said, or why it said nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub pod: String,
    pub ready: bool,
    pub status: Result<RuntimeStatus, String>,
}

/// The message of a pod whose image serves no `GET /status` (404): a custom image that keeps only
/// the probes of the contract. Its readiness probe is then all the operator knows.
pub const NO_STATUS_ENDPOINT: &str = "GET /status answered 404 Not Found";

/// Running pods with an IP, as poll targets on `port`.
pub fn targets(pods: &[Pod], port: u16) -> Vec<Target> {
    let mut out: Vec<Target> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            let name = p.metadata.name.clone()?;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            Some(Target {
                pod: name,
                url: format!("http://{host}:{port}/status"),
                ready,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// The pods whose template carries `checksum` (the current config).
pub fn of_template(pods: &[Pod], checksum: &str) -> Vec<Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(obsrv_crds::labels::CONFIG_CHECKSUM))
                .is_some_and(|c| c == checksum)
        })
        .cloned()
        .collect()
}

/// Names of the pods that exist (any phase, not being deleted).
pub fn live_pods(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

/// Container restarts over the Connector's pods (current pods only: a replaced pod's count is gone
/// with it), and the latest time a container last terminated.
pub fn restarts(pods: &[Pod]) -> Option<Restarts> {
    let statuses: Vec<_> = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .collect();
    if statuses.is_empty() {
        return None;
    }
    let count = statuses.iter().map(|s| i64::from(s.restart_count)).sum();
    let last = statuses
        .iter()
        .filter_map(|s| s.last_state.as_ref()?.terminated.as_ref())
        .max_by_key(|t| t.finished_at.clone());
    Some(Restarts {
        count,
        last_restart_time: last.and_then(|t| t.finished_at.clone()),
        last_exit: last.map(|t| match (&t.reason, &t.message) {
            (Some(r), Some(m)) => format!("exit code {} ({r}: {m})", t.exit_code),
            (Some(r), None) => format!("exit code {} ({r})", t.exit_code),
            _ => format!("exit code {}", t.exit_code),
        }),
    })
}

/// Polls every target, at most `concurrency` at a time, each bounded by the client's timeout.
pub async fn poll(
    http: &reqwest::Client,
    targets: Vec<Target>,
    concurrency: usize,
    timeout: Duration,
) -> Vec<Report> {
    let mut reports: Vec<Report> = futures::stream::iter(targets)
        .map(|t| async move {
            let status = fetch(http, &t.url, timeout).await;
            Report {
                pod: t.pod,
                ready: t.ready,
                status,
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    reports.sort_by(|a, b| a.pod.cmp(&b.pod));
    reports
}

async fn fetch(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<RuntimeStatus, String> {
    let resp = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| describe(&e))?;
    if !resp.status().is_success() {
        return Err(format!("GET /status answered {}", resp.status()));
    }
    resp.json::<RuntimeStatus>()
        .await
        .map_err(|e| format!("GET /status returned an unreadable body: {e}"))
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "GET /status timed out".into()
    } else if e.is_connect() {
        "GET /status: connection refused or unreachable".into()
    } else {
        format!("GET /status failed: {e}")
    }
}

/// The pods' reports, aggregated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Pods polled.
    pub polled: i32,
    /// Pods that answered.
    pub answered: i32,
    /// Pods reading without error (Running or Idle).
    pub reading: i32,
    pub paused: i32,
    /// Sum of the lag the pods report (None when none can tell).
    pub lag_records: Option<i64>,
    /// Largest lag in seconds reported.
    pub lag_seconds: Option<f64>,
    /// Sum of the bytes the pods report not yet read.
    pub lag_bytes: Option<i64>,
    pub totals: Option<Totals>,
    pub watermark: Option<String>,
    pub max_parallelism: Option<i32>,
    /// The worst current error, with the pod it came from in the message.
    pub worst_error: Option<LastError>,
    /// How many pods report an error or could not be reached.
    pub failing: i32,
    /// Ready pods whose image serves no `/status` (counted as reading: their readiness says so;
    /// their lag is unknown).
    pub no_status: i32,
    /// Every pod's counts, for the totals ledger.
    pub reports: Vec<crate::totals::PodReport>,
    /// Every pod of the Connector that exists (answering or not).
    pub live_pods: Vec<String>,
    /// The most failed attempts in a row a pod reports.
    pub failed_attempts: u32,
    /// Restarts of the pods running the current config only (a roll's old pods do not count
    /// against the new config's restart budget).
    pub current_restarts: Option<Restarts>,
    pub restarts: Option<Restarts>,
}

/// How bad an error is: the worst one is shown in status.
fn severity(reason: &str) -> u8 {
    use obsrv_crds::status::reason as r;
    match reason {
        r::AUTH_FAILED | r::CONFIG_ERROR | r::TLS_CONFIG => 5,
        r::SOURCE_UNREACHABLE | r::SINK_UNREACHABLE => 4,
        r::SCHEMA_ERROR | r::STATE_ERROR | r::NOT_FOUND => 3,
        POD_UNREACHABLE => 2,
        _ => 1,
    }
}

/// Aggregates reports: lag and totals are summed, lag seconds and parallelism take the maximum,
/// watermarks are listed per pod when they differ, and the most severe error wins.
pub fn aggregate(reports: &[Report]) -> Observed {
    let mut o = Observed {
        polled: i32::try_from(reports.len()).unwrap_or(i32::MAX),
        ..Observed::default()
    };
    let mut watermarks: Vec<(String, String)> = Vec::new();
    let mut errors: Vec<LastError> = Vec::new();
    for r in reports {
        match &r.status {
            // Not ready and not answering: still starting (the Deployment's rollout says so).
            Err(_) if !r.ready => {}
            Err(msg) if msg == NO_STATUS_ENDPOINT => {
                o.no_status += 1;
                o.reading += 1;
            }
            Err(msg) => {
                o.failing += 1;
                errors.push(LastError {
                    reason: POD_UNREACHABLE.into(),
                    message: format!("pod {}: {msg}", r.pod),
                    time: None,
                });
            }
            Ok(s) => {
                o.answered += 1;
                o.failed_attempts = o.failed_attempts.max(s.failed_attempts);
                o.reports.push(crate::totals::PodReport {
                    pod: r.pod.clone(),
                    started_at: s.started_at.clone(),
                    totals: s.totals,
                });
                match s.state {
                    RuntimeState::Running | RuntimeState::Idle => o.reading += 1,
                    RuntimeState::Paused => o.paused += 1,
                    _ => {}
                }
                if let Some(l) = s.lag_records {
                    o.lag_records = Some(o.lag_records.unwrap_or(0).saturating_add(l.max(0)));
                }
                if let Some(b) = s.lag_bytes {
                    o.lag_bytes = Some(o.lag_bytes.unwrap_or(0).saturating_add(b.max(0)));
                }
                if let Some(secs) = s.lag_seconds {
                    o.lag_seconds = Some(o.lag_seconds.map_or(secs, |m: f64| m.max(secs)));
                }
                o.totals = Some(o.totals.unwrap_or_default() + s.totals);
                if let Some(w) = &s.watermark {
                    watermarks.push((r.pod.clone(), w.clone()));
                }
                if let Some(p) = s.max_parallelism {
                    o.max_parallelism = Some(o.max_parallelism.map_or(p, |m| m.max(p)));
                }
                if s.state == RuntimeState::Degraded {
                    o.failing += 1;
                    let e = s.last_error.clone().unwrap_or(LastError {
                        reason: "Degraded".into(),
                        message: "the connector reports it is degraded".into(),
                        time: None,
                    });
                    errors.push(LastError {
                        message: format!("pod {}: {}", r.pod, e.message),
                        ..e
                    });
                }
            }
        }
    }
    let mut distinct: Vec<&String> = watermarks.iter().map(|(_, w)| w).collect();
    distinct.sort();
    distinct.dedup();
    o.watermark = match distinct.len() {
        0 => None,
        1 => Some(distinct[0].clone()),
        _ => Some(
            watermarks
                .iter()
                .map(|(p, w)| format!("{p}: {w}"))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    // Stable pick: highest severity, then first pod by name (reports are sorted).
    o.worst_error = errors
        .into_iter()
        .fold(None, |best: Option<LastError>, e| match best {
            Some(b) if severity(&b.reason) >= severity(&e.reason) => Some(b),
            _ => Some(e),
        });
    o
}
