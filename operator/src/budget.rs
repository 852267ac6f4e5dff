//! The restart budget: a connector that keeps failing at start is not restarted forever. The
//! kubelet already spaces restarts out (CrashLoopBackOff doubles the wait up to five minutes); past
//! [`RESTART_BUDGET`] restarts of the current pods the operator runs no replicas, says why in
//! status (phase Failed, `Stalled=True`, reason `RestartBudgetExhausted`) and waits for a spec
//! change or a new value of the `obsrv.io/retry` annotation. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use obsrv_crds::status::{RestartBudget, Restarts};

/// Container restarts of the current pods that exhaust the budget.
pub const RESTART_BUDGET: i64 = 5;
/// Reason of the Stalled condition (and event) once the budget ran out.
pub const EXHAUSTED: &str = "RestartBudgetExhausted";

/// The budget after this observation: `Some` while it is exhausted.
pub fn account(
    prev: Option<&RestartBudget>,
    generation: i64,
    retry: Option<&str>,
    restarts: Option<&Restarts>,
    name: &str,
    now: Timestamp,
) -> Option<RestartBudget> {
    if let Some(p) = prev
        && p.generation == generation
        && p.retry.as_deref() == retry
    {
        return Some(p.clone());
    }
    let r = restarts.filter(|r| r.count >= RESTART_BUDGET)?;
    let exit = r
        .last_exit
        .as_deref()
        .map(|e| format!(", the last with {e}"))
        .unwrap_or_default();
    Some(RestartBudget {
        generation,
        retry: retry.map(str::to_string),
        message: format!(
            "The connector restarted {} times{exit}; no replicas run now. Read the pod logs, fix the cause, then change the spec or run: kubectl annotate connector {name} obsrv.io/retry=$(date +%s) --overwrite",
            r.count
        ),
        exhausted_at: Some(Time(now)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restarts(n: i64) -> Restarts {
        Restarts {
            count: n,
            last_restart_time: None,
            last_exit: Some("exit code 2 (Error)".into()),
        }
    }

    #[test]
    fn exhausted_until_the_spec_or_the_retry_annotation_changes() {
        let now = Timestamp::from_second(1_000).expect("valid");
        assert_eq!(account(None, 3, None, Some(&restarts(4)), "c", now), None);
        let b = account(None, 3, None, Some(&restarts(5)), "c", now).expect("exhausted");
        assert!(
            b.message
                .contains("restarted 5 times, the last with exit code 2 (Error)")
        );
        assert!(b.message.contains("obsrv.io/retry"));
        // No pods run any more (no restarts seen): still exhausted for this generation.
        assert_eq!(account(Some(&b), 3, None, None, "c", now), Some(b.clone()));
        // A spec change, or a new retry value, gives it another go.
        assert_eq!(account(Some(&b), 4, None, None, "c", now), None);
        assert_eq!(account(Some(&b), 3, Some("1"), None, "c", now), None);
    }
}
