//! Postgres, MySQL and MariaDB tables read incrementally by a cursor column: one spec type, three
//! kinds.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{Category, KindSpec, Parallelism, SourceKind};
use crate::connector::{CredentialsRef, DURATION_RULE, Tls, default_poll_interval};
use crate::runtime::{SecretEnv, credentials_env, env, tls_ca_env};

pub static POSTGRES: SourceKind = SourceKind {
    name: "postgres",
    category: Category::Database,
    parallelism: Parallelism::Single,
    default_poll_interval: "30s",
    spec: |s| s.postgres.as_ref().map(|s| s as &dyn KindSpec),
};

pub static MYSQL: SourceKind = SourceKind {
    name: "mysql",
    category: Category::Database,
    parallelism: Parallelism::Single,
    default_poll_interval: "30s",
    spec: |s| s.mysql.as_ref().map(|s| s as &dyn KindSpec),
};

pub static MARIADB: SourceKind = SourceKind {
    name: "mariadb",
    category: Category::Database,
    parallelism: Parallelism::Single,
    default_poll_interval: "30s",
    spec: |s| s.mariadb.as_ref().map(|s| s as &dyn KindSpec),
};

/// Postgres, MySQL or MariaDB tables read incrementally by a cursor column.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SqlSourceSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: Option<i32>,
    pub database: String,
    pub credentials: CredentialsRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[x_kube(validation = Rule::new("self.size() > 0").message("tables must list at least one table"))]
    pub tables: Vec<TableSpec>,
    /// How long to wait between polls once caught up (Go duration, e.g. 30s).
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("pollInterval must be a duration such as 30s, 5m or 1h"))]
    pub poll_interval: String,
    /// Rows fetched per query, which is also one batch in memory (5000 rows of a few hundred
    /// bytes keep a connector under 64 MiB).
    #[serde(default = "default_batch_size")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("batchSize must be between 1 and 1000000"))]
    pub batch_size: i32,
}

fn default_batch_size() -> i32 {
    5_000
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableSpec {
    /// Table name, optionally schema-qualified (`public.orders`).
    #[x_kube(validation = Rule::new("self.size() > 0").message("table name must not be empty"))]
    pub name: String,
    pub cursor: CursorSpec,
    /// Columns to read; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

/// Keyset pagination on `(column, tieBreaker)`: rows sharing a cursor value are never skipped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CursorSpec {
    /// A column that grows as rows are added or changed (e.g. `updated_at`, `id`).
    pub column: String,
    /// A unique column ordering rows that share a cursor value (e.g. the primary key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_breaker: Option<String>,
}

impl KindSpec for SqlSourceSpec {
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
        if self.tables.is_empty() {
            return Err("tables must list at least one table".into());
        }
        for (i, t) in self.tables.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(format!("tables[{i}].name must not be empty"));
            }
            if t.cursor.column.trim().is_empty() {
                return Err(format!(
                    "tables[{i}].cursor.column must name a column (table {:?})",
                    t.name
                ));
            }
        }
        if let Some(p) = self.port.filter(|p| !(1..=65535).contains(p)) {
            return Err(format!("port must be between 1 and 65535 (got {p})"));
        }
        if self.batch_size < 1 {
            return Err("batchSize must be at least 1".into());
        }
        Ok(())
    }

    fn poll_interval(&self) -> Option<&str> {
        Some(&self.poll_interval)
    }
}
