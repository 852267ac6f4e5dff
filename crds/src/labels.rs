//! Labels and annotations on everything the operator creates for a Connector.

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const PART_OF: &str = "app.kubernetes.io/part-of";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const CONNECTOR: &str = "obsrv.io/connector";
pub const DATASET: &str = "obsrv.io/dataset";
pub const SOURCE: &str = "obsrv.io/source";

/// `app.kubernetes.io/name` of connector pods.
pub const APP_NAME: &str = "obsrv-connector";
/// `app.kubernetes.io/managed-by` of objects the operator creates.
pub const MANAGER: &str = "obsrv-operator";

/// Pod-template annotation: checksum of the rendered config and referenced Secrets' versions.
pub const CONFIG_CHECKSUM: &str = "obsrv.io/config-checksum";
/// The finalizer the operator adds to every Connector.
pub const FINALIZER: &str = "obsrv.io/cleanup";

/// Connector annotation: a new value retries a Connector whose restart budget ran out
/// (`kubectl annotate connector <name> obsrv.io/retry=$(date +%s) --overwrite`).
pub const RETRY: &str = "obsrv.io/retry";
