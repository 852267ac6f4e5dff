//! Pure replica decisions: state, fixed replicas or lag-driven autoscaling, clamped to the
//! parallelism the source reports.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use obsrv_crds::{DesiredState, Scaling};

/// Why replicas are fewer than asked for (`ScalingLimited` reason and message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub reason: &'static str,
    pub message: String,
}

pub mod reason {
    /// The source cannot use more readers (Kafka partitions, one table).
    pub const SOURCE_PARALLELISM: &str = "SourceParallelism";
    /// The lag asks for more than `autoscale.maxReplicas`.
    pub const MAX_REPLICAS: &str = "MaxReplicas";
}

/// What the scaler knows.
#[derive(Debug, Clone)]
pub struct ScaleInput<'a> {
    pub state: DesiredState,
    /// The restart budget ran out: no replicas until a spec change or a retry.
    pub halted: bool,
    pub scaling: &'a Scaling,
    /// Replicas decided last time (status.replicas), if any.
    pub current: Option<i32>,
    /// Aggregated lag from the last observation.
    pub lag_records: Option<i64>,
    /// Parallelism the source reports.
    pub max_parallelism: Option<i32>,
    /// When the lag last asked for at least the current replicas.
    pub last_high_lag_time: Option<Timestamp>,
    pub now: Timestamp,
    pub scale_down_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDecision {
    pub replicas: i32,
    pub limit: Option<Limit>,
    pub last_high_lag_time: Option<Timestamp>,
}

/// Decides replicas. State wins: Stopped is 0 whatever scaling says, Paused keeps the current
/// count (no autoscaling while nothing is read). Autoscaling scales up at once and down only after
/// the lag stayed low for `scale_down_delay`.
pub fn decide(i: &ScaleInput<'_>) -> ScaleDecision {
    if i.state == DesiredState::Stopped || i.halted {
        return ScaleDecision {
            replicas: 0,
            limit: None,
            last_high_lag_time: i.last_high_lag_time,
        };
    }
    let mut limit = None;
    let mut last_high = i.last_high_lag_time;
    let want = match &i.scaling.autoscale {
        Some(a) => {
            let current = i
                .current
                .filter(|c| *c > 0)
                .unwrap_or(a.min_replicas)
                .clamp(a.min_replicas, a.max_replicas);
            match i.lag_records {
                Some(lag) if i.state == DesiredState::Running => {
                    let raw = (lag.max(0) + a.target_lag_records - 1) / a.target_lag_records.max(1);
                    let raw = i32::try_from(raw).unwrap_or(i32::MAX);
                    if raw > a.max_replicas {
                        limit = Some(Limit {
                            reason: reason::MAX_REPLICAS,
                            message: format!(
                                "lag of {lag} records asks for {raw} replicas; autoscale.maxReplicas is {}",
                                a.max_replicas
                            ),
                        });
                    }
                    let by_lag = raw.clamp(a.min_replicas, a.max_replicas);
                    if by_lag >= current {
                        last_high = Some(i.now);
                        by_lag
                    } else {
                        let low_since = last_high.map(|t| i.now.duration_since(t).unsigned_abs());
                        match low_since {
                            Some(d) if d < i.scale_down_delay => current,
                            _ => {
                                // Restart the delay so each further step down waits again.
                                last_high = Some(i.now);
                                by_lag
                            }
                        }
                    }
                }
                _ => current,
            }
        }
        None => i.scaling.replicas.unwrap_or(1).max(0),
    };
    let replicas = match i.max_parallelism {
        Some(p) if p >= 1 && want > p => {
            limit = Some(Limit {
                reason: reason::SOURCE_PARALLELISM,
                message: format!(
                    "the source allows at most {p} parallel readers (its partitions, or one reader for a table or change stream); running {p} of {want} wanted replicas"
                ),
            });
            p
        }
        _ => want,
    };
    ScaleDecision {
        replicas,
        limit,
        last_high_lag_time: last_high,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obsrv_crds::Autoscale;

    fn auto(min: i32, max: i32, target: i64) -> Scaling {
        Scaling {
            replicas: None,
            autoscale: Some(Autoscale {
                min_replicas: min,
                max_replicas: max,
                target_lag_records: target,
                scale_down_delay: "5m".into(),
            }),
        }
    }

    fn input<'a>(scaling: &'a Scaling, current: Option<i32>, lag: Option<i64>) -> ScaleInput<'a> {
        ScaleInput {
            state: DesiredState::Running,
            halted: false,
            scaling,
            current,
            lag_records: lag,
            max_parallelism: None,
            last_high_lag_time: None,
            now: Timestamp::from_second(1_000_000).expect("valid"),
            scale_down_delay: Duration::from_secs(300),
        }
    }

    #[test]
    fn fixed_replicas_and_state() {
        let s = Scaling {
            replicas: Some(3),
            autoscale: None,
        };
        assert_eq!(decide(&input(&s, None, None)).replicas, 3);
        let mut i = input(&s, Some(3), None);
        i.state = DesiredState::Stopped;
        assert_eq!(decide(&i).replicas, 0);
        i.state = DesiredState::Paused;
        assert_eq!(decide(&i).replicas, 3, "paused keeps pods");
        assert_eq!(decide(&input(&Scaling::default(), None, None)).replicas, 1);
    }

    #[test]
    fn autoscale_up_fast_down_slow() {
        let s = auto(1, 8, 1000);
        let up = decide(&input(&s, Some(1), Some(4500)));
        assert_eq!(up.replicas, 5);
        assert!(up.last_high_lag_time.is_some());
        // Lag drops right after: stays at 5 until the delay has passed.
        let mut i = input(&s, Some(5), Some(10));
        i.last_high_lag_time = Some(Timestamp::from_second(1_000_000 - 60).expect("valid"));
        assert_eq!(decide(&i).replicas, 5);
        i.last_high_lag_time = Some(Timestamp::from_second(1_000_000 - 301).expect("valid"));
        assert_eq!(decide(&i).replicas, 1);
    }

    #[test]
    fn autoscale_clamps_to_max_and_parallelism() {
        let s = auto(1, 4, 100);
        let d = decide(&input(&s, Some(1), Some(100_000)));
        assert_eq!(d.replicas, 4);
        assert_eq!(d.limit.map(|l| l.reason), Some(reason::MAX_REPLICAS));
        let mut i = input(&s, Some(1), Some(100_000));
        i.max_parallelism = Some(3);
        let d = decide(&i);
        assert_eq!(d.replicas, 3);
        assert_eq!(d.limit.map(|l| l.reason), Some(reason::SOURCE_PARALLELISM));
        // Stopped wins over everything.
        i.state = DesiredState::Stopped;
        assert_eq!(
            decide(&i),
            ScaleDecision {
                replicas: 0,
                limit: None,
                last_high_lag_time: None
            }
        );
    }
}
