//! Change data capture: every insert, update and delete of a database's tables as it commits.
//! Postgres through logical replication (`pgoutput`), MySQL and MariaDB through the binary log.
//! The connection, TLS and credential fields are those of the polling kinds (same types, same
//! Secret keys, same runtime connection code).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{CredentialsRef, DURATION_RULE, Tls};
use crate::runtime::{SecretEnv, credentials_env, env, tls_ca_env};

pub static POSTGRES_CDC: SourceKind = SourceKind {
    name: "postgresCdc",
    category: Category::Stream,
    parallelism: Parallelism::Single,
    default_poll_interval: "100ms",
    spec: |s| s.postgres_cdc.as_ref().map(|s| s as &dyn KindSpec),
};

pub static MYSQL_CDC: SourceKind = SourceKind {
    name: "mysqlCdc",
    category: Category::Stream,
    parallelism: Parallelism::Single,
    default_poll_interval: "100ms",
    spec: |s| s.mysql_cdc.as_ref().map(|s| s as &dyn KindSpec),
};

pub static MARIADB_CDC: SourceKind = SourceKind {
    name: "mariadbCdc",
    category: Category::Stream,
    parallelism: Parallelism::Single,
    default_poll_interval: "100ms",
    spec: |s| s.mariadb_cdc.as_ref().map(|s| s as &dyn KindSpec),
};

/// What to read before streaming changes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotMode {
    /// Every existing row first (as `op: r` events), then the changes; the snapshot resumes
    /// where it stopped after a restart.
    #[default]
    Initial,
    /// Only changes from the moment the connector first starts.
    Never,
    /// Every existing row, then stop reading (no change stream kept).
    InitialOnly,
}

/// Postgres tables streamed by logical replication (`pgoutput`, Postgres 10+ with
/// `wal_level=logical`). The user needs the REPLICATION attribute (or `rds_replication`), SELECT
/// on the tables, and CREATE on the database when the publication does not exist yet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresCdcSourceSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,
    pub database: String,
    pub credentials: CredentialsRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Tables to capture, `schema.table` (the schema defaults to `public`).
    #[x_kube(validation = Rule::new("self.size() > 0 && self.all(t, t.size() > 0)").message("tables must list at least one table, none empty"))]
    pub tables: Vec<String>,
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Replication slot; defaults to `obsrv_<namespace>_<name>` (lower case, `_` for anything
    /// else, at most 63 characters). Deleting the Connector drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9_]{1,63}$')").message("slotName may hold only lower-case letters, digits and _ (at most 63)"))]
    pub slot_name: Option<String>,
    /// Publication; defaults to the slot's name. Created for `tables` when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z_][a-z0-9_]{0,62}$')").message("publicationName must be a lower-case identifier of at most 63 characters"))]
    pub publication_name: Option<String>,
    /// How often a heartbeat is written to the WAL (`pg_logical_emit_message`), so the slot's
    /// position advances even when the captured tables are idle.
    #[serde(default = "default_heartbeat")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("heartbeatInterval must be a duration such as 10s"))]
    pub heartbeat_interval: String,
    /// Rows per snapshot chunk (held in memory until the change stream passes the chunk's
    /// high watermark).
    #[serde(default = "default_chunk")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("snapshotChunkSize must be between 1 and 100000"))]
    pub snapshot_chunk_size: i32,
    /// Changes per batch handed to the sink.
    #[serde(default = "default_batch")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("batchSize must be between 1 and 100000"))]
    pub batch_size: i32,
    /// How long to wait between polls once caught up (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("pollInterval must be a duration such as 100ms"))]
    pub poll_interval: Option<String>,
}

/// MySQL or MariaDB tables streamed from the binary log (`binlog_format=ROW`,
/// `binlog_row_image=FULL`). The user needs REPLICATION SLAVE, REPLICATION CLIENT (MariaDB 10.5+:
/// BINLOG MONITOR) and SELECT on the tables.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BinlogCdcSourceSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,
    pub database: String,
    pub credentials: CredentialsRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Tables to capture, `database.table` (the database defaults to `database`).
    #[x_kube(validation = Rule::new("self.size() > 0 && self.all(t, t.size() > 0)").message("tables must list at least one table, none empty"))]
    pub tables: Vec<String>,
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// The replica server id this connector uses on the server (unique among the server's
    /// replicas); defaults to a number derived from the Connector's namespace and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4294967295").message("serverId must be between 1 and 4294967295"))]
    pub server_id: Option<i64>,
    /// Heartbeat period the server keeps on an idle binary log (lag stays measurable).
    #[serde(default = "default_heartbeat")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("heartbeatInterval must be a duration such as 10s"))]
    pub heartbeat_interval: String,
    /// Changes per batch handed to the sink.
    #[serde(default = "default_batch")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("batchSize must be between 1 and 100000"))]
    pub batch_size: i32,
    /// How long to wait between polls once caught up (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("pollInterval must be a duration such as 100ms"))]
    pub poll_interval: Option<String>,
}

fn default_heartbeat() -> String {
    "10s".into()
}

fn default_chunk() -> i32 {
    5_000
}

fn default_batch() -> i32 {
    5_000
}

/// `obsrv_<namespace>_<name>`: lower case, anything but `[a-z0-9_]` as `_`; past 63 characters
/// cut to 54 plus `_` and 8 hex digits of a hash of the whole, so distinct Connectors keep
/// distinct names. Pure.
pub fn default_slot_name(namespace: &str, name: &str) -> String {
    let raw = format!("obsrv_{namespace}_{name}");
    let clean: String = raw
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    if clean.len() <= 63 {
        return clean;
    }
    // FNV-1a: stable across releases (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in raw.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{}_{h:08x}", &clean[..54])
}

/// A replica server id in `[1_000_000, 2^31)` derived from the Connector's identity. Pure.
pub fn default_server_id(namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{namespace}/{name}").bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    1_000_000 + h % (i32::MAX as u32 - 1_000_000)
}

fn check_common(
    tables: &[String],
    port: Option<i32>,
    batch_size: i32,
    heartbeat: &str,
) -> Result<(), String> {
    if tables.is_empty() {
        return Err("tables must list at least one table".into());
    }
    if let Some(i) = tables.iter().position(|t| t.trim().is_empty()) {
        return Err(format!("tables[{i}] must not be empty"));
    }
    if let Some(p) = port.filter(|p| !(1..=65535).contains(p)) {
        return Err(format!("port must be between 1 and 65535 (got {p})"));
    }
    if !(1..=100_000).contains(&batch_size) {
        return Err("batchSize must be between 1 and 100000".into());
    }
    crate::duration::parse_duration(heartbeat).map_err(|e| format!("heartbeatInterval: {e}"))?;
    Ok(())
}

impl KindSpec for PostgresCdcSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        credentials_env(
            out,
            &self.credentials,
            env::SOURCE_USERNAME,
            env::SOURCE_PASSWORD,
        );
        tls_ca_env(out, self.tls.as_ref(), env::SOURCE_TLS_CA);
    }

    fn validate(&self) -> Result<(), String> {
        check_common(
            &self.tables,
            self.port,
            self.batch_size,
            &self.heartbeat_interval,
        )?;
        let ident = |s: &str, first_digit_ok: bool| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && (first_digit_ok || !s.starts_with(|c: char| c.is_ascii_digit()))
        };
        if let Some(s) = self.slot_name.as_deref().filter(|s| !ident(s, true)) {
            return Err(format!(
                "slotName {s:?} may hold only lower-case letters, digits and _ (at most 63)"
            ));
        }
        if let Some(p) = self
            .publication_name
            .as_deref()
            .filter(|p| !ident(p, false))
        {
            return Err(format!(
                "publicationName {p:?} must be a lower-case identifier of at most 63 characters"
            ));
        }
        if !(1..=100_000).contains(&self.snapshot_chunk_size) {
            return Err("snapshotChunkSize must be between 1 and 100000".into());
        }
        Ok(())
    }

    fn poll_interval(&self) -> Option<&str> {
        self.poll_interval.as_deref()
    }

    /// The replication slot lives on the server and holds WAL until dropped.
    fn needs_cleanup(&self) -> bool {
        true
    }
}

impl KindSpec for BinlogCdcSourceSpec {
    fn secrets(&self, out: &mut Vec<SecretEnv>) {
        credentials_env(
            out,
            &self.credentials,
            env::SOURCE_USERNAME,
            env::SOURCE_PASSWORD,
        );
        tls_ca_env(out, self.tls.as_ref(), env::SOURCE_TLS_CA);
    }

    fn validate(&self) -> Result<(), String> {
        check_common(
            &self.tables,
            self.port,
            self.batch_size,
            &self.heartbeat_interval,
        )?;
        if let Some(id) = self
            .server_id
            .filter(|i| !(1..=i64::from(u32::MAX)).contains(i))
        {
            return Err(format!(
                "serverId must be between 1 and 4294967295 (got {id})"
            ));
        }
        Ok(())
    }

    fn poll_interval(&self) -> Option<&str> {
        self.poll_interval.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slot_names_are_valid_identifiers_and_distinct() {
        assert_eq!(
            default_slot_name("shop", "orders-cdc"),
            "obsrv_shop_orders_cdc"
        );
        let long = "x".repeat(80);
        let a = default_slot_name("ns", &format!("{long}-a"));
        let b = default_slot_name("ns", &format!("{long}-b"));
        assert_ne!(a, b);
        for s in [&a, &b] {
            assert!(s.len() <= 63, "{s}");
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            );
        }
        assert_eq!(a, default_slot_name("ns", &format!("{long}-a")), "stable");
    }

    #[test]
    fn default_server_ids_are_stable_and_in_range() {
        let id = default_server_id("shop", "orders");
        assert_eq!(id, default_server_id("shop", "orders"));
        assert_ne!(id, default_server_id("shop", "orders2"));
        assert!((1_000_000..i32::MAX as u32).contains(&id));
    }

    fn pg(extra: serde_json::Value) -> PostgresCdcSourceSpec {
        let mut v = serde_json::json!({"host": "h", "database": "d",
            "credentials": {"secretName": "s"}, "tables": ["public.t"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(pg(serde_json::json!({})).validate(), Ok(()));
        let e = pg(serde_json::json!({"slotName": "Bad-Slot"}))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("slotName"), "{e}");
        let e = pg(serde_json::json!({"publicationName": "1pub"}))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("publicationName"), "{e}");
        let e = pg(serde_json::json!({"tables": []}))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("tables"), "{e}");
        let e = pg(serde_json::json!({"heartbeatInterval": "soon"}))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("heartbeatInterval"), "{e}");
        assert!(pg(serde_json::json!({})).needs_cleanup());
    }
}
