//! The deletion decision: whether a cleanup Job must run, and what to do with it next. Pure, so a
//! deletion can never hang: past the timeout the finalizer is released with a warning.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use obsrv_crds::DeletionPolicy;

/// What deleting a Connector must remove before its finalizer goes: what the source holds (a
/// replication slot, when the kind `needs_cleanup()`) and, with `deletionPolicy: Delete`, the
/// connector's positions (state-topic records, its Kafka source's consumer group). Both are done
/// by one cleanup Job of the connector image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub release_source: bool,
    pub delete_state: bool,
}

/// The flag of `obsrv-connector cleanup` that deletes the connector's positions.
pub const DELETE_STATE_FLAG: &str = "--delete-state";

impl Plan {
    pub fn of(needs_cleanup: bool, policy: DeletionPolicy) -> Plan {
        Plan {
            release_source: needs_cleanup,
            delete_state: policy == DeletionPolicy::Delete,
        }
    }

    /// Whether a cleanup Job must run at all: with nothing to remove the finalizer goes at once.
    pub fn needs_job(&self) -> bool {
        self.release_source || self.delete_state
    }

    /// The Job's arguments after `cleanup --file <config>`.
    pub fn flags(&self) -> Vec<String> {
        if self.delete_state {
            vec![DELETE_STATE_FLAG.into()]
        } else {
            Vec::new()
        }
    }

    /// What the Job removes, for events and logs ("release the source's ... and delete ...").
    pub fn describe(&self) -> String {
        match (self.release_source, self.delete_state) {
            (true, true) => "release what the source holds (replication slot) and delete the connector's positions (state-topic records, consumer group offsets)".into(),
            (true, false) => "release what the source holds (replication slot); positions are retained (deletionPolicy Retain)".into(),
            (false, true) => "delete the connector's positions (state-topic records, consumer group offsets)".into(),
            (false, false) => "nothing to remove".into(),
        }
    }
}

/// What a cleanup Job has done so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub created: Option<Timestamp>,
    pub succeeded: bool,
    pub failed: bool,
}

impl JobState {
    pub fn of(j: &Job) -> JobState {
        let s = j.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == t && c.status == "True")
        };
        JobState {
            created: j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            succeeded: s.succeeded.unwrap_or(0) > 0 || cond("Complete"),
            failed: cond("Failed"),
        }
    }
}

/// How long after the deletion began the cleanup Job waits for the Connector's pods to stop: their
/// grace period (60 s) and some slack. Past it the Job runs anyway (a pod that never goes must not
/// block deletion).
pub const READERS_GONE_WAIT: Duration = Duration::from_secs(90);

/// Whether the cleanup Job must wait before it starts: `readers` pods of the Connector still exist
/// (a draining pod commits its last position, a CDC reader holds its slot) and the deletion began
/// less than [`READERS_GONE_WAIT`] ago.
pub fn wait_for_readers(readers: usize, deleted_at: Option<Timestamp>, now: Timestamp) -> bool {
    if readers == 0 {
        return false;
    }
    // A deletion time ahead of our clock (skew) counts as just begun.
    let waited = deleted_at
        .map(|d| now.duration_since(d))
        .filter(|d| !d.is_negative())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default();
    waited < READERS_GONE_WAIT
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupStep {
    /// No Job yet: create it.
    Start,
    /// The Job runs and has time left.
    Wait,
    /// Release the finalizer (and delete the Job), reporting how it went.
    Done { succeeded: bool, message: String },
}

pub fn step(job: Option<JobState>, now: Timestamp, timeout: Duration, plan: Plan) -> CleanupStep {
    let Some(j) = job else {
        return CleanupStep::Start;
    };
    let leftovers = match (plan.release_source, plan.delete_state) {
        (true, true) => "replication slots, state-topic records, consumer groups",
        (true, false) => "replication slots",
        _ => "state-topic records, consumer groups",
    };
    if j.succeeded {
        return CleanupStep::Done {
            succeeded: true,
            message: format!(
                "Cleanup finished: {} (the Job's log names what was removed).",
                plan.describe()
            ),
        };
    }
    if j.failed {
        return CleanupStep::Done {
            succeeded: false,
            message: format!(
                "The cleanup Job failed; the Connector is deleted anyway. Check for leftovers ({leftovers})."
            ),
        };
    }
    let elapsed = j
        .created
        .map(|c| now.duration_since(c).unsigned_abs())
        .unwrap_or_default();
    if elapsed >= timeout {
        return CleanupStep::Done {
            succeeded: false,
            message: format!(
                "The cleanup Job did not finish within {}s; the Connector is deleted anyway. Check for leftovers ({leftovers}).",
                timeout.as_secs()
            ),
        };
    }
    CleanupStep::Wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    #[test]
    fn a_job_runs_for_a_slot_or_for_deletion_policy_delete_only() {
        let cdc_retain = Plan::of(true, DeletionPolicy::Retain);
        assert!(cdc_retain.needs_job());
        assert!(cdc_retain.flags().is_empty(), "Retain keeps the positions");
        let cdc_delete = Plan::of(true, DeletionPolicy::Delete);
        assert!(cdc_delete.needs_job());
        assert_eq!(cdc_delete.flags(), vec![DELETE_STATE_FLAG.to_string()]);
        let table_delete = Plan::of(false, DeletionPolicy::Delete);
        assert!(
            table_delete.needs_job(),
            "Delete on a non-CDC kind runs a Job"
        );
        assert_eq!(table_delete.flags(), vec![DELETE_STATE_FLAG.to_string()]);
        assert!(table_delete.describe().contains("positions"));
        let table_retain = Plan::of(false, DeletionPolicy::Retain);
        assert!(
            !table_retain.needs_job(),
            "Retain on a non-CDC kind: no Job"
        );
    }

    #[test]
    fn the_job_waits_for_the_readers_but_not_forever() {
        assert!(!wait_for_readers(0, Some(at(1000)), at(1000)));
        assert!(wait_for_readers(1, Some(at(1000)), at(1010)));
        assert!(wait_for_readers(2, Some(at(1000)), at(1089)));
        assert!(!wait_for_readers(1, Some(at(1000)), at(1090)));
        assert!(
            wait_for_readers(1, Some(at(1050)), at(1000)),
            "skew: just begun"
        );
    }

    #[test]
    fn cleanup_is_bounded_by_the_timeout() {
        let t = Duration::from_secs(300);
        let plan = Plan::of(true, DeletionPolicy::Retain);
        assert_eq!(step(None, at(1000), t, plan), CleanupStep::Start);
        let running = JobState {
            created: Some(at(1000)),
            succeeded: false,
            failed: false,
        };
        assert_eq!(
            step(Some(running.clone()), at(1100), t, plan),
            CleanupStep::Wait
        );
        assert!(matches!(
            step(Some(running), at(1300), t, plan),
            CleanupStep::Done {
                succeeded: false,
                ..
            }
        ));
        let ok = JobState {
            created: Some(at(1000)),
            succeeded: true,
            failed: false,
        };
        assert!(matches!(
            step(Some(ok), at(1001), t, plan),
            CleanupStep::Done {
                succeeded: true,
                ..
            }
        ));
        let failed = JobState {
            created: Some(at(1000)),
            succeeded: false,
            failed: true,
        };
        assert!(matches!(
            step(Some(failed), at(1001), t, plan),
            CleanupStep::Done {
                succeeded: false,
                ..
            }
        ));
    }
}
