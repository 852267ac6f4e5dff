//! Pure validation of a Connector: everything a schema cannot say, or that an API server without
//! CEL (or an older object) may have let through. An invalid spec is reported as `ConfigValid=False`
//! and waits for the next change.

use std::time::Duration;

use obsrv_crds::{Connector, Parallelism, SourceKind};

/// Why a spec cannot be run. The reason is a stable CamelCase word used in conditions and events.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Source(#[from] obsrv_crds::SourceError),
    #[error("{field} is not a duration ({value:?}): use a value such as 30s, 5m or 1h")]
    Duration { field: String, value: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "no Kafka bootstrap servers for the sink: set spec.sink.kafka.bootstrapServers or the operator's --sink-bootstrap-servers"
    )]
    NoSinkBootstrap,
}

impl SpecError {
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::Source(_) => "InvalidSource",
            SpecError::Duration { .. } => "InvalidDuration",
            SpecError::Invalid(_) => "InvalidSpec",
            SpecError::NoSinkBootstrap => "NoSinkBootstrap",
        }
    }
}

pub use obsrv_crds::duration::{DurationError, parse_duration};

/// What validation learned about a spec, used by the builders and the scaler.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub source_kind: &'static SourceKind,
    /// How many replicas can read the source at once, as far as the spec tells.
    pub parallelism: Parallelism,
    /// Scale-down stabilisation of the autoscaler.
    pub scale_down_delay: Duration,
}

/// Checks a Connector against what the operator can run. `sink_has_bootstrap` tells whether the
/// operator has a default bootstrap server list.
pub fn validate(c: &Connector, sink_has_bootstrap: bool) -> Result<Validated, SpecError> {
    let spec = &c.spec;
    if spec.dataset.trim().is_empty() {
        return Err(SpecError::Invalid("spec.dataset must not be empty".into()));
    }
    let source = spec.source.resolve()?;
    let duration = |field: &str, value: &str| {
        parse_duration(value).map_err(|_| SpecError::Duration {
            field: field.to_string(),
            value: value.to_string(),
        })
    };
    if spec.image.is_some() && source.spec.image().is_some() {
        return Err(SpecError::Invalid(format!(
            "spec.image overrides the shared image of a built-in source kind; a {} source names its image in spec.source.{}.image",
            source.kind.name, source.kind.name
        )));
    }
    source
        .spec
        .validate()
        .map_err(|e| SpecError::Invalid(format!("spec.source.{}.{e}", source.kind.name)))?;
    let poll_field = format!("spec.source.{}.pollInterval", source.kind.name);
    duration(&poll_field, source.poll_interval())?;
    let mut scale_down_delay = Duration::from_secs(300);
    if let Some(r) = spec.scaling.replicas
        && r < 0
    {
        return Err(SpecError::Invalid(format!(
            "spec.scaling.replicas must not be negative (got {r})"
        )));
    }
    if let Some(a) = &spec.scaling.autoscale {
        if a.min_replicas < 1 || a.min_replicas > a.max_replicas {
            return Err(SpecError::Invalid(format!(
                "spec.scaling.autoscale needs 1 <= minReplicas <= maxReplicas (got {} and {})",
                a.min_replicas, a.max_replicas
            )));
        }
        if a.target_lag_records < 1 {
            return Err(SpecError::Invalid(
                "spec.scaling.autoscale.targetLagRecords must be at least 1".into(),
            ));
        }
        scale_down_delay = duration("spec.scaling.autoscale.scaleDownDelay", &a.scale_down_delay)?;
    }
    let sink_bootstrap = spec
        .sink
        .as_ref()
        .and_then(|s| s.kafka.as_ref())
        .and_then(|k| k.bootstrap_servers.as_deref())
        .is_some_and(|b| !b.trim().is_empty());
    if !sink_bootstrap && !sink_has_bootstrap {
        return Err(SpecError::NoSinkBootstrap);
    }
    Ok(Validated {
        source_kind: source.kind,
        parallelism: source.parallelism(),
        scale_down_delay,
    })
}
