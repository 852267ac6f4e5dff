//! Go-style durations (`30s`, `1m30s`, `1.5h`, `250ms`) as Connector fields spell them: one parser
//! for the operator's validation and the runtime's timers.

use std::time::Duration;

/// A string that is not a non-negative Go-style duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration such as 30s, 5m or 1h")]
pub struct DurationError(pub String);

/// Parses a Go-style duration with kube's `metav1.Duration` parser; negative durations are refused.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_string());
    let trimmed = s.trim();
    // kube's parser reads "" (and a bare "0") as zero; a Connector field must name its unit.
    if !trimmed.ends_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(err());
    }
    let d: kube::core::Duration = trimmed.parse().map_err(|_| err())?;
    if d.is_negative() {
        return Err(err());
    }
    Ok(d.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_crd_accepts_and_refuses_the_rest() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "30", "30 seconds", "5 m", "-5s", "s", "5d", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
