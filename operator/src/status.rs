//! Pure status computation: kstatus conditions, phase and the observed numbers, from what was
//! applied and observed. Conditions keep their `lastTransitionTime` while their status holds.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use obsrv_crds::status::{ConnectorStatus, LagStatus, Phase, condition};
use obsrv_crds::{DesiredState, SourceKind};

use crate::observe::Observed;
use crate::scaling::ScaleDecision;

/// How long an unchanged lag keeps its `observedAt` before it is written again.
pub const LAG_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Failed attempts in a row (reported by a pod) after which the Connector is `Stalled`: an outage
/// is then a failure to kstatus (Flux, cli-utils), not a healthy Connector that is not ready.
pub const STALL_AFTER_ATTEMPTS: u32 = 5;

/// Something that stops the operator from running the spec (the running Deployment is left as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub reason: String,
    pub message: String,
    /// The spec itself is wrong (`ConfigValid=False`), rather than the world around it.
    pub invalid_spec: bool,
}

/// How far the Deployment has rolled out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    pub ready: i32,
    pub updated: i32,
    pub total: i32,
    /// The Deployment controller has seen the latest spec.
    pub observed: bool,
    /// The Deployment controller gave up (`Progressing=False`, e.g. `ProgressDeadlineExceeded`).
    pub stuck: Option<(String, String)>,
}

impl Rollout {
    pub fn of(d: Option<&Deployment>) -> Rollout {
        let Some(d) = d else {
            return Rollout::default();
        };
        let s = d.status.clone().unwrap_or_default();
        let stuck = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Progressing" && c.status == "False")
            .map(|c| {
                (
                    c.reason
                        .clone()
                        .unwrap_or_else(|| "ProgressDeadlineExceeded".into()),
                    c.message
                        .clone()
                        .unwrap_or_else(|| "The Deployment stopped progressing.".into()),
                )
            });
        Rollout {
            stuck,
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            total: s.replicas.unwrap_or(0),
            observed: match (d.metadata.generation, s.observed_generation) {
                (Some(g), Some(o)) => o >= g,
                (None, _) => true,
                _ => false,
            },
        }
    }

    /// Every wanted replica runs the latest template and is ready; no old pods are left.
    pub fn complete(&self, want: i32) -> bool {
        self.observed && self.updated >= want && self.ready >= want && self.total <= want
    }
}

/// What the reconcile did, for status.
#[derive(Debug, Clone)]
pub enum Outcome<'a> {
    Blocked(Blocked),
    Applied {
        decision: &'a ScaleDecision,
        rollout: Rollout,
        observed: &'a Observed,
    },
}

#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    pub previous: Option<&'a ConnectorStatus>,
    /// The restart budget after this observation (`Some` while exhausted).
    pub restart_budget: Option<obsrv_crds::status::RestartBudget>,
    pub generation: Option<i64>,
    pub now: Timestamp,
    pub state: DesiredState,
    pub source_kind: Option<&'static SourceKind>,
    pub selector: String,
    pub outcome: Outcome<'a>,
}

fn cond(
    i: &StatusInput<'_>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = i
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(i.now));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: i.generation,
        last_transition_time: since,
    }
}

/// The Connector's next status.
pub fn compute(i: &StatusInput<'_>) -> ConnectorStatus {
    let mut s = i.previous.cloned().unwrap_or_default();
    s.observed_generation = i.generation;
    s.source_kind = i.source_kind.map(|k| k.name.to_string()).or(s.source_kind);
    s.selector = Some(i.selector.clone());
    let conditions = match &i.outcome {
        Outcome::Blocked(b) => {
            s.phase = Some(Phase::Failed);
            vec![
                cond(i, condition::READY, false, &b.reason, b.message.clone()),
                cond(
                    i,
                    condition::RECONCILING,
                    false,
                    &b.reason,
                    "Waiting for a change that fixes this.".into(),
                ),
                cond(i, condition::STALLED, true, &b.reason, b.message.clone()),
                if b.invalid_spec {
                    cond(
                        i,
                        condition::CONFIG_VALID,
                        false,
                        &b.reason,
                        b.message.clone(),
                    )
                } else {
                    cond(
                        i,
                        condition::CONFIG_VALID,
                        true,
                        "Valid",
                        "The spec is valid.".into(),
                    )
                },
                previous_or(i, condition::SCALING_LIMITED),
            ]
        }
        Outcome::Applied {
            decision,
            rollout,
            observed,
        } => applied(i, &mut s, decision, rollout, observed),
    };
    s.conditions = conditions;
    s
}

fn previous_or(i: &StatusInput<'_>, type_: &str) -> Condition {
    previous_or_else(i, type_, || {
        cond(
            i,
            type_,
            false,
            "NotLimited",
            "Replicas are not limited.".into(),
        )
    })
}

/// The previous condition of `type_` (with this generation), or `default`.
fn previous_or_else(
    i: &StatusInput<'_>,
    type_: &str,
    default: impl FnOnce() -> Condition,
) -> Condition {
    i.previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_).cloned())
        .map(|c| Condition {
            observed_generation: i.generation,
            ..c
        })
        .unwrap_or_else(default)
}

fn applied(
    i: &StatusInput<'_>,
    s: &mut ConnectorStatus,
    decision: &ScaleDecision,
    rollout: &Rollout,
    observed: &Observed,
) -> Vec<Condition> {
    let want = decision.replicas;
    s.replicas = want;
    s.ready_replicas = rollout.ready;
    s.replicas_summary = Some(format!("{}/{}", rollout.ready, want));
    s.last_high_lag_time = decision.last_high_lag_time.map(Time);
    if s.replicas != i.previous.map(|p| p.replicas).unwrap_or(-1) {
        s.last_scale_time = Some(Time(i.now));
    }
    if observed.answered > 0 {
        let lag = observed.lag_records.map(|records| LagStatus {
            records,
            seconds: observed.lag_seconds,
            bytes: observed.lag_bytes,
            observed_at: None,
        });
        // Keep observedAt while the numbers hold, so an unchanged lag does not cause a write on
        // every poll; refresh it once it is LAG_REFRESH old, so it never looks stale.
        s.lag = match (lag, s.lag.take()) {
            (Some(new), Some(old))
                if old.records == new.records
                    && old.seconds == new.seconds
                    && old.bytes == new.bytes
                    && old.observed_at.as_ref().is_some_and(|t| {
                        i.now.duration_since(t.0).unsigned_abs() < LAG_REFRESH
                    }) =>
            {
                Some(old)
            }
            (Some(new), _) => Some(LagStatus {
                observed_at: Some(Time(i.now)),
                ..new
            }),
            (None, old) => old,
        };
        s.watermark = observed.watermark.clone().or(s.watermark.take());
        s.max_parallelism = observed.max_parallelism.or(s.max_parallelism);
    }
    // Totals over the Connector's life: pods that restarted or went away keep their share.
    let ledger = crate::totals::account(
        s.totals_ledger.as_ref(),
        &observed.reports,
        &observed.live_pods,
    );
    if s.totals.is_some() || !ledger.pods.is_empty() || ledger.retired != Default::default() {
        s.totals = Some(ledger.sum());
        s.totals_ledger = Some(ledger);
    }
    if observed.restarts.is_some() {
        s.restarts = observed.restarts.clone();
    }
    if observed.answered > 0 && observed.worst_error.is_none() {
        // Every pod that answered is fine: an old error would read as a current one.
        s.last_error = None;
    }
    if let Some(e) = &observed.worst_error {
        let same = s
            .last_error
            .as_ref()
            .is_some_and(|p| p.reason == e.reason && p.message == e.message);
        if !same {
            s.last_error = Some(obsrv_crds::status::LastError {
                time: Some(Time(i.now)),
                ..e.clone()
            });
        }
    }

    s.restart_budget = i.restart_budget.clone();
    let complete = rollout.complete(want);
    let healthy = observed.failing == 0;
    let exhausted = i.restart_budget.as_ref().map(|b| b.message.clone());
    let (ready, ready_reason, ready_msg, phase) = match i.state {
        DesiredState::Running | DesiredState::Paused if exhausted.is_some() => (
            false,
            crate::budget::EXHAUSTED,
            exhausted.clone().unwrap_or_default(),
            Phase::Failed,
        ),
        DesiredState::Stopped if rollout.total == 0 => (
            true,
            "Stopped",
            "Stopped: no replicas run, as asked.".to_string(),
            Phase::Stopped,
        ),
        DesiredState::Stopped => (
            false,
            "Stopping",
            format!("Stopping: {} pods still run.", rollout.total),
            Phase::Stopped,
        ),
        _ if rollout.stuck.is_some() && !complete => {
            let (reason, message) = rollout.stuck.clone().unwrap_or_default();
            (
                false,
                "RolloutStuck",
                format!("{reason}: {message}"),
                Phase::Degraded,
            )
        }
        _ if !healthy => {
            let e = observed.worst_error.as_ref();
            (
                false,
                e.map_or("Degraded", |e| e.reason.as_str()),
                e.map_or_else(
                    || "A replica reports an error.".into(),
                    |e| e.message.clone(),
                ),
                Phase::Degraded,
            )
        }
        _ if !complete => (
            false,
            "RollingOut",
            format!(
                "{} of {want} replicas ready and up to date.",
                rollout.ready.min(rollout.updated)
            ),
            if observed.failing > 0 {
                Phase::Degraded
            } else {
                Phase::Pending
            },
        ),
        // The pods read until they see the new state (their state file, within seconds).
        DesiredState::Paused if observed.paused < want => (
            false,
            "Pausing",
            format!(
                "Pausing: {} of {want} replicas have stopped reading.",
                observed.paused
            ),
            Phase::Running,
        ),
        DesiredState::Paused => (
            true,
            "Paused",
            format!("Paused: {want} replicas connected, not reading."),
            Phase::Paused,
        ),
        DesiredState::Running if observed.reading < want => (
            false,
            "NotReading",
            format!(
                "{} of {want} replicas report they are reading.",
                observed.reading
            ),
            Phase::Pending,
        ),
        DesiredState::Running => (
            true,
            "Running",
            format!("{want} of {want} replicas reading."),
            Phase::Running,
        ),
    };
    s.phase = Some(phase);
    let stuck = rollout.stuck.is_some() && !complete;
    let reconciling = !complete && healthy && !stuck && exhausted.is_none();
    let limited = match &decision.limit {
        Some(l) => cond(
            i,
            condition::SCALING_LIMITED,
            true,
            l.reason,
            l.message.clone(),
        ),
        None => cond(
            i,
            condition::SCALING_LIMITED,
            false,
            "NotLimited",
            "Replicas are not limited.".into(),
        ),
    };
    vec![
        cond(i, condition::READY, ready, ready_reason, ready_msg.clone()),
        cond(
            i,
            condition::RECONCILING,
            reconciling,
            if reconciling {
                "RollingOut"
            } else {
                "Reconciled"
            },
            if reconciling {
                ready_msg
            } else {
                "The Deployment matches the spec.".into()
            },
        ),
        if let Some(m) = exhausted.filter(|_| i.state != DesiredState::Stopped) {
            cond(i, condition::STALLED, true, crate::budget::EXHAUSTED, m)
        } else if stuck {
            cond(
                i,
                condition::STALLED,
                true,
                "RolloutStuck",
                ready_msg_for_stalled(rollout),
            )
        } else if !healthy && observed.failed_attempts >= STALL_AFTER_ATTEMPTS {
            let e = observed.worst_error.as_ref();
            cond(
                i,
                condition::STALLED,
                true,
                e.map_or("Degraded", |e| e.reason.as_str()),
                format!(
                    "{} attempts in a row failed; the connector keeps retrying with backoff and this clears by itself once it succeeds: {}",
                    observed.failed_attempts,
                    e.map_or("a replica reports an error", |e| e.message.as_str())
                ),
            )
        } else {
            cond(
                i,
                condition::STALLED,
                false,
                "Progressing",
                "Nothing blocks progress.".into(),
            )
        },
        cond(
            i,
            condition::CONFIG_VALID,
            true,
            "Valid",
            "The spec is valid.".into(),
        ),
        limited,
        lag_known(i, s, observed),
    ]
}

/// `LagKnown`: whether `status.lag` says how far behind the source the connector is.
fn lag_known(i: &StatusInput<'_>, s: &ConnectorStatus, observed: &Observed) -> Condition {
    if observed.no_status > 0 {
        return cond(
            i,
            condition::LAG_KNOWN,
            false,
            "NoStatusEndpoint",
            format!(
                "{} ready pod(s) serve no GET /status on port {}: Ready comes from their readiness probes; lag, totals and errors are unknown (see docs/custom-connectors.md).",
                observed.no_status,
                obsrv_crds::runtime::HTTP_PORT
            ),
        );
    }
    if observed.answered == 0 {
        return previous_or_else(i, condition::LAG_KNOWN, || {
            cond(
                i,
                condition::LAG_KNOWN,
                false,
                "NotObserved",
                "No pod has reported yet.".into(),
            )
        });
    }
    match &s.lag {
        Some(_) => cond(
            i,
            condition::LAG_KNOWN,
            true,
            "Reported",
            "The connector reports its lag.".into(),
        ),
        None => cond(
            i,
            condition::LAG_KNOWN,
            false,
            "NotReported",
            "The connector has not reported a lag: it has not measured one yet, or its source cannot tell.".into(),
        ),
    }
}

fn ready_msg_for_stalled(r: &Rollout) -> String {
    r.stuck
        .as_ref()
        .map(|(reason, message)| {
            format!("The Deployment stopped progressing ({reason}): {message}")
        })
        .unwrap_or_default()
}

/// Whether two statuses differ in anything a user would see (so a write is needed).
pub fn changed(old: Option<&ConnectorStatus>, new: &ConnectorStatus) -> bool {
    old != Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::{Limit, ScaleDecision};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    fn input<'a>(
        prev: Option<&'a ConnectorStatus>,
        now: i64,
        outcome: Outcome<'a>,
    ) -> StatusInput<'a> {
        StatusInput {
            previous: prev,
            restart_budget: None,
            generation: Some(4),
            now: at(now),
            state: DesiredState::Running,
            source_kind: Some(&obsrv_crds::source::kafka::KAFKA),
            selector: "app=x".into(),
            outcome,
        }
    }

    fn get<'a>(s: &'a ConnectorStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    #[test]
    fn rollout_then_ready_keeps_transition_times() {
        let d = ScaleDecision {
            replicas: 2,
            limit: None,
            last_high_lag_time: None,
        };
        let rolling = Rollout {
            ready: 1,
            updated: 1,
            total: 2,
            observed: true,
            stuck: None,
        };
        let obs = Observed {
            polled: 1,
            answered: 1,
            reading: 1,
            ..Observed::default()
        };
        let s1 = compute(&input(
            None,
            100,
            Outcome::Applied {
                decision: &d,
                rollout: rolling,
                observed: &obs,
            },
        ));
        assert_eq!(get(&s1, condition::RECONCILING).status, "True");
        assert_eq!(get(&s1, condition::READY).status, "False");
        assert_eq!(s1.replicas_summary.as_deref(), Some("1/2"));
        assert!(
            s1.conditions
                .iter()
                .all(|c| c.observed_generation == Some(4))
        );

        let done = Rollout {
            ready: 2,
            updated: 2,
            total: 2,
            observed: true,
            stuck: None,
        };
        let obs = Observed {
            polled: 2,
            answered: 2,
            reading: 2,
            ..Observed::default()
        };
        let s2 = compute(&input(
            Some(&s1),
            200,
            Outcome::Applied {
                decision: &d,
                rollout: done.clone(),
                observed: &obs,
            },
        ));
        assert_eq!(get(&s2, condition::READY).status, "True");
        assert_eq!(
            get(&s2, condition::READY).last_transition_time,
            Time(at(200))
        );
        assert_eq!(
            get(&s2, condition::STALLED).last_transition_time,
            Time(at(100)),
            "unchanged status keeps its time"
        );
        assert_eq!(s2.phase, Some(Phase::Running));

        let s3 = compute(&input(
            Some(&s2),
            300,
            Outcome::Applied {
                decision: &d,
                rollout: done,
                observed: &obs,
            },
        ));
        assert!(
            !changed(Some(&s2), &s3),
            "same observation, same status: no write"
        );
    }

    #[test]
    fn stuck_rollout_is_stalled_and_limits_are_reported() {
        let d = ScaleDecision {
            replicas: 3,
            limit: Some(Limit {
                reason: "SourceParallelism",
                message: "3 partitions".into(),
            }),
            last_high_lag_time: None,
        };
        let stuck = Rollout {
            ready: 0,
            updated: 1,
            total: 1,
            observed: true,
            stuck: Some(("ProgressDeadlineExceeded".into(), "ImagePullBackOff".into())),
        };
        let s = compute(&input(
            None,
            100,
            Outcome::Applied {
                decision: &d,
                rollout: stuck,
                observed: &Observed::default(),
            },
        ));
        assert_eq!(get(&s, condition::STALLED).status, "True");
        assert_eq!(get(&s, condition::RECONCILING).status, "False");
        assert_eq!(get(&s, condition::READY).reason, "RolloutStuck");
        assert_eq!(
            get(&s, condition::SCALING_LIMITED).reason,
            "SourceParallelism"
        );
        assert_eq!(s.phase, Some(Phase::Degraded));
    }
}
