//! The deletion decision: whether a cleanup Job must run, and what to do with it next. Pure, so a
//! deletion can never hang: past the timeout the finalizer is released with a warning.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupStep {
    /// No Job yet: create it.
    Start,
    /// The Job runs and has time left.
    Wait,
    /// Release the finalizer (and delete the Job), reporting how it went.
    Done { succeeded: bool, message: String },
}

pub fn step(job: Option<JobState>, now: Timestamp, timeout: Duration) -> CleanupStep {
    let Some(j) = job else {
        return CleanupStep::Start;
    };
    if j.succeeded {
        return CleanupStep::Done {
            succeeded: true,
            message: "Source-side cleanup finished.".into(),
        };
    }
    if j.failed {
        return CleanupStep::Done {
            succeeded: false,
            message: "The cleanup Job failed; the Connector is deleted anyway. Check the source for leftovers (e.g. replication slots).".into(),
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
                "The cleanup Job did not finish within {}s; the Connector is deleted anyway. Check the source for leftovers.",
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
    fn cleanup_is_bounded_by_the_timeout() {
        let t = Duration::from_secs(300);
        assert_eq!(step(None, at(1000), t), CleanupStep::Start);
        let running = JobState {
            created: Some(at(1000)),
            succeeded: false,
            failed: false,
        };
        assert_eq!(step(Some(running.clone()), at(1100), t), CleanupStep::Wait);
        assert!(matches!(
            step(Some(running), at(1300), t),
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
            step(Some(ok), at(1001), t),
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
            step(Some(failed), at(1001), t),
            CleanupStep::Done {
                succeeded: false,
                ..
            }
        ));
    }
}
