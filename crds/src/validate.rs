//! Everything about a spec that its schema cannot say (or that an older object, or an API server
//! without CEL, let through): one check for the operator (before it runs anything: an invalid spec
//! is `ConfigValid=False` and waits for the next change) and the runtime (`check` and `run` refuse
//! what they could not run, naming the field).

use std::time::Duration;

use crate::{
    ConnectorSpec, Parallelism, SourceKind,
    duration::parse_duration,
    schedule::{Plan, ScheduleError},
    source::SourceError,
};

/// Why a spec cannot be run. The reason is a stable CamelCase word used in conditions and events.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{field} is not a duration ({value:?}): use a value such as 30s, 5m or 1h")]
    Duration { field: String, value: String },
    #[error("spec.schedule: {0}")]
    Schedule(#[from] ScheduleError),
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
            SpecError::Schedule(_) => "InvalidSchedule",
            SpecError::Invalid(_) => "InvalidSpec",
            SpecError::NoSinkBootstrap => "NoSinkBootstrap",
        }
    }
}

/// What validation learned about a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub source_kind: &'static SourceKind,
    /// How many replicas can read the source at once, as far as the spec tells.
    pub parallelism: Parallelism,
    /// How long to wait between polls once caught up.
    pub poll_interval: Duration,
    /// When the connector reads.
    pub plan: Plan,
    /// Scale-down stabilisation of the autoscaler.
    pub scale_down_delay: Duration,
}

/// Checks a spec: one source kind and its own checks, every duration, the schedule, scaling, and
/// the sink when it names bootstrap servers. Whether the sink has bootstrap servers at all depends
/// on the defaults of whoever runs it (operator flags, runtime flags), so callers check that.
pub fn validate_spec(spec: &ConnectorSpec) -> Result<Validated, SpecError> {
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
    let poll_interval = duration(&poll_field, source.poll_interval())?;
    let plan = Plan::from_spec(spec.schedule.as_ref())?;
    if let Some(r) = spec.scaling.replicas
        && r < 0
    {
        return Err(SpecError::Invalid(format!(
            "spec.scaling.replicas must not be negative (got {r})"
        )));
    }
    let mut scale_down_delay = Duration::from_secs(300);
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
    if let Some(k) = spec.sink.as_ref().and_then(|s| s.kafka.as_ref())
        && let Some(m) = k.max_message_bytes.filter(|m| *m < 1024)
    {
        return Err(SpecError::Invalid(format!(
            "spec.sink.kafka.maxMessageBytes must be at least 1024 (got {m})"
        )));
    }
    Ok(Validated {
        source_kind: source.kind,
        parallelism: source.parallelism(),
        poll_interval,
        plan,
        scale_down_delay,
    })
}

/// Whether the spec names its own sink bootstrap servers.
pub fn has_sink_bootstrap(spec: &ConnectorSpec) -> bool {
    spec.sink
        .as_ref()
        .and_then(|s| s.kafka.as_ref())
        .and_then(|k| k.bootstrap_servers.as_deref())
        .is_some_and(|b| !b.trim().is_empty())
}
