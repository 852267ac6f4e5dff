//! The operator's errors, each with a stable CamelCase reason for conditions, events and metrics.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cleanup Job {0} is still running")]
    CleanupRunning(String),
    #[error("could not serialize an object: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// Stable reason, used as a metric label and in events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) => match s.code {
                409 => "Conflict",
                429 => "TooManyRequests",
                403 => "Forbidden",
                404 => "NotFound",
                422 => "Invalid",
                c if c >= 500 => "ApiServerError",
                _ => "ApiError",
            },
            Error::Kube(_) => "ApiUnreachable",
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerFailed",
            },
            Error::CleanupRunning(_) => "CleanupRunning",
            Error::Serialize(_) => "Serialization",
        }
    }

    /// How long to wait before retrying, before jitter: slower when the API server asks us to.
    pub fn backoff(&self) -> Duration {
        match self.reason() {
            "TooManyRequests" => Duration::from_secs(30),
            "CleanupRunning" => Duration::from_secs(5),
            "Conflict" => Duration::from_secs(1),
            _ => Duration::from_secs(10),
        }
    }
}

/// `base` plus up to 50% jitter, so many failing Connectors do not retry in lockstep.
pub fn with_jitter(base: Duration, seed: u64) -> Duration {
    // splitmix64: enough spread for jitter without a random-number dependency.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let frac = (z % 1000) as f64 / 2000.0;
    base + base.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_the_base_and_spreads() {
        let base = Duration::from_secs(10);
        let delays: Vec<Duration> = (0..50u64).map(|s| with_jitter(base, s)).collect();
        assert!(delays.iter().all(|d| *d >= base && *d <= base + base / 2));
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 25, "jitter spreads retries");
    }

    #[test]
    fn reasons_are_stable_and_429_backs_off_longer() {
        let e = Error::CleanupRunning("x-cleanup".into());
        assert_eq!(e.reason(), "CleanupRunning");
        let throttled = Error::Kube(kube::Error::Api(
            kube::core::Status::failure("slow down", "TooManyRequests")
                .with_code(429)
                .boxed(),
        ));
        assert_eq!(throttled.reason(), "TooManyRequests");
        assert!(throttled.backoff() > Error::CleanupRunning(String::new()).backoff());
    }
}
