//! Totals that never go backwards. Each connector process counts from zero, so the operator keeps
//! a ledger in status: every current pod's last report, keyed by pod and process start, and what
//! retired pods contributed (gone, or replaced by a restart of their container). Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use obsrv_crds::status::{PodTotals, Totals, TotalsLedger};

/// One pod's report: its name, when its process started, and what it counted.
#[derive(Debug, Clone, PartialEq)]
pub struct PodReport {
    pub pod: String,
    pub started_at: Option<Time>,
    pub totals: Totals,
}

/// The ledger after a poll: `reports` from the pods that answered, `live` every pod of the
/// Connector that still exists (answering or not).
pub fn account(
    prev: Option<&TotalsLedger>,
    reports: &[PodReport],
    live: &[String],
) -> TotalsLedger {
    let mut next = TotalsLedger {
        retired: prev.map(|p| p.retired).unwrap_or_default(),
        pods: Vec::new(),
    };
    for old in prev.map(|p| p.pods.as_slice()).unwrap_or_default() {
        let report = reports.iter().find(|r| r.pod == old.pod);
        match report {
            // The same process: its count only grows.
            Some(r) if r.started_at == old.started_at => next.pods.push(PodTotals {
                totals: max(old.totals, r.totals),
                ..old.clone()
            }),
            // A new process in the same pod (the container restarted): the old count retires.
            Some(_) => next.retired = next.retired + old.totals,
            // Not answering this time but still there: keep its last count.
            None if live.contains(&old.pod) => next.pods.push(old.clone()),
            // Gone.
            None => next.retired = next.retired + old.totals,
        }
    }
    for r in reports {
        if !next.pods.iter().any(|p| p.pod == r.pod) {
            next.pods.push(PodTotals {
                pod: r.pod.clone(),
                started_at: r.started_at.clone(),
                totals: r.totals,
            });
        }
    }
    next.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    next
}

fn max(a: Totals, b: Totals) -> Totals {
    Totals {
        records_ingested: a.records_ingested.max(b.records_ingested),
        records_failed: a.records_failed.max(b.records_failed),
        bytes_ingested: a.bytes_ingested.max(b.bytes_ingested),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(n: u64) -> Totals {
        Totals {
            records_ingested: n,
            records_failed: 0,
            bytes_ingested: n * 10,
        }
    }

    fn at(s: i64) -> Option<Time> {
        Some(Time(Timestamp::from_second(s).expect("valid")))
    }

    fn report(pod: &str, started: i64, n: u64) -> PodReport {
        PodReport {
            pod: pod.into(),
            started_at: at(started),
            totals: t(n),
        }
    }

    #[test]
    fn totals_survive_restarts_scale_to_zero_and_silent_pods() {
        let live = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l = account(None, &[report("a", 1, 100)], &live(&["a"]));
        assert_eq!(l.sum(), t(100));
        // The container restarts: the new process counts from zero.
        let l = account(Some(&l), &[report("a", 2, 5)], &live(&["a"]));
        assert_eq!(l.sum(), t(105));
        // A second replica; the first does not answer this time but still runs.
        let l = account(Some(&l), &[report("b", 3, 7)], &live(&["a", "b"]));
        assert_eq!(l.sum(), t(112));
        // Scaled to zero: both gone, nothing lost.
        let l = account(Some(&l), &[], &[]);
        assert_eq!(l.sum(), t(112));
        assert!(l.pods.is_empty());
        // Scaled up again: new pods add to it.
        let l = account(Some(&l), &[report("c", 4, 3)], &live(&["c"]));
        assert_eq!(l.sum(), t(115));
    }
}
