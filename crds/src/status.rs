//! `Connector` status (written by the operator) and the runtime's `GET /status` report (written by
//! every connector pod, read by the operator). Both sides share these types so the contract cannot
//! drift.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::{Deserialize, Serialize};

/// Condition types. `Ready`, `Reconciling` and `Stalled` follow kstatus.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    pub const CONFIG_VALID: &str = "ConfigValid";
    pub const SCALING_LIMITED: &str = "ScalingLimited";
    /// Whether `status.lag` is known (an image without `/status`, or a source without lag, is not).
    pub const LAG_KNOWN: &str = "LagKnown";
}

#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
pub enum Phase {
    #[default]
    Pending,
    Running,
    Paused,
    Stopped,
    Degraded,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Running,
        Phase::Paused,
        Phase::Stopped,
        Phase::Degraded,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
            Phase::Stopped => "Stopped",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Source kind (postgres, kafka, ...), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_kind: Option<String>,
    /// Desired replicas after state, scaling and clamping.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_summary: Option<String>,
    /// Label selector of the connector's pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagStatus>,
    /// Records and bytes over the Connector's life: every pod's, including pods that restarted or
    /// are gone (counted at each poll of the pods; a pod that crashes loses at most its last poll
    /// interval from these numbers, and those records are read again and counted then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    /// How `totals` add up: what retired pods (gone, or restarted) contributed, and each current
    /// pod's last report. Kept in status so totals never go backwards, not even across an
    /// operator restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals_ledger: Option<TotalsLedger>,
    /// Human-readable source position (cursor value, offsets summary, last object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Most parallelism the source allows (Kafka: partitions; one table: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<Restarts>,
    /// Set when the connector restarted too often: replicas stay at 0 until a spec change or a new
    /// `obsrv.io/retry` annotation value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_budget: Option<RestartBudget>,
    /// When the autoscaler last changed replicas (for stabilisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// When the lag last required the current number of replicas (scale-down delay starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_high_lag_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LagStatus {
    /// Records not yet read, summed over the replicas. For a Postgres table with 100,000 or more
    /// rows to go this is the query planner's estimate; below that it is an exact count.
    pub records: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Bytes not yet read, when the source can tell (WAL a replication slot retains, objects
    /// pending), summed over the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    #[serde(default)]
    pub records_ingested: u64,
    #[serde(default)]
    pub records_failed: u64,
    #[serde(default)]
    pub bytes_ingested: u64,
}

impl std::ops::Add for Totals {
    type Output = Totals;
    fn add(self, o: Totals) -> Totals {
        Totals {
            records_ingested: self.records_ingested + o.records_ingested,
            records_failed: self.records_failed + o.records_failed,
            bytes_ingested: self.bytes_ingested + o.bytes_ingested,
        }
    }
}

/// Totals of retired pods, and of each current pod by the process start it reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TotalsLedger {
    #[serde(default)]
    pub retired: Totals,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodTotals>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTotals {
    pub pod: String,
    /// When the pod's connector process started (a restart starts a new count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    pub totals: Totals,
}

impl TotalsLedger {
    /// The Connector's totals: retired pods' plus current pods'.
    pub fn sum(&self) -> Totals {
        self.pods.iter().fold(self.retired, |t, p| t + p.totals)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// CamelCase reason, e.g. `SourceUnreachable`.
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Restarts {
    /// Container restarts of the current pods.
    pub count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_time: Option<Time>,
    /// How the last restarted container ended (`exit code 2 (Error)`, `OOMKilled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// The restart budget ran out: the Connector runs no replicas until its spec changes or the
/// `obsrv.io/retry` annotation gets a new value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartBudget {
    /// The generation whose pods used up the budget.
    pub generation: i64,
    /// The `obsrv.io/retry` annotation's value at the time (a new value retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
    /// What happened, for the Stalled condition.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_at: Option<Time>,
}

/// What the runtime is doing, as reported on `/status`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimeState {
    /// Connecting to source and sink.
    #[default]
    Starting,
    /// Reading and delivering.
    Running,
    /// Connected, not reading (spec.state: Paused).
    Paused,
    /// Batch source done until the next scheduled run.
    Idle,
    /// Retrying after an error (see `lastError`).
    Degraded,
    /// Draining after SIGTERM.
    Stopping,
}

/// Reasons the runtime reports in `lastError.reason`.
pub mod reason {
    pub const SOURCE_UNREACHABLE: &str = "SourceUnreachable";
    pub const SINK_UNREACHABLE: &str = "SinkUnreachable";
    pub const AUTH_FAILED: &str = "AuthFailed";
    pub const SCHEMA_ERROR: &str = "SchemaError";
    pub const CONFIG_ERROR: &str = "ConfigError";
    pub const STATE_ERROR: &str = "StateError";
    pub const NOT_FOUND: &str = "NotFound";
    pub const TLS_CONFIG: &str = "TlsConfig";
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The JSON body of a connector pod's `GET /status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeStatus {
    pub state: RuntimeState,
    /// Connected to source and sink (the same answer as `/readyz`).
    #[serde(default)]
    pub ready: bool,
    /// Records not yet read, when the source can tell (Postgres: the planner's estimate from
    /// 100,000 rows to go, an exact count below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_records: Option<i64>,
    /// Age of the oldest unread record, when the source can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Bytes not yet read, when the source can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    #[serde(default)]
    pub totals: Totals,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Most replicas that can share the work (Kafka: partitions; a table: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Failed attempts in a row (reset by the next success): the operator says `Stalled` past a
    /// few, so GitOps tools see an outage as a failure rather than as healthy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: u32,
    /// Checksum of the config the pod runs, to tell old pods from new during a roll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_checksum: Option<String>,
}
