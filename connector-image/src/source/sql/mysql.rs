//! MySQL and MariaDB: connection options (TLS modes, credentials) shared by every MySQL-protocol
//! kind, and the catalog lookup of a table.

use std::time::Duration;

use obsrv_crds::{TableSpec, TlsMode};
use sqlx::{
    MySqlPool, Row,
    mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow, MySqlSslMode},
};

use super::{
    Column, Dialect, Endpoint, Login,
    plan::{RawRow, TablePlan, quote_ident},
};
use crate::error::{Result, from_sqlx};

/// sqlx's options for `endpoint` as `login`: sessions in UTC, utf8mb4, the TLS mode and CA of
/// the spec.
pub fn connect_options(endpoint: &Endpoint<'_>, login: &Login) -> MySqlConnectOptions {
    let mut o = MySqlConnectOptions::new()
        .host(endpoint.host)
        .port(endpoint.port_or(3306))
        .username(&login.user)
        .password(&login.password)
        .database(endpoint.database)
        .timezone(Some("+00:00".to_string()))
        .charset("utf8mb4")
        .ssl_mode(match endpoint.tls_mode() {
            TlsMode::Disable => MySqlSslMode::Disabled,
            TlsMode::Prefer => MySqlSslMode::Preferred,
            TlsMode::Require => MySqlSslMode::Required,
            TlsMode::VerifyFull => MySqlSslMode::VerifyIdentity,
        });
    if let Some(ca) = &login.ca {
        o = o.ssl_ca_from_pem(ca.clone());
    }
    o
}

/// A small pool on `endpoint` (`max` connections).
pub async fn pool(endpoint: &Endpoint<'_>, login: &Login, max: u32) -> Result<MySqlPool> {
    let o = connect_options(endpoint, login);
    let port = endpoint.port_or(3306);
    super::probe(&o, "MySQL/MariaDB", endpoint.host, port).await?;
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(o)
        .await
        .map_err(from_sqlx)
}

/// `schema.table` split, the schema defaulting to the connection's database.
pub fn schema_and_table(name: &str, database: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => (database.to_string(), name.to_string()),
    }
}

/// The columns of `schema.table`, in order (types lower-cased).
pub async fn columns(p: &MySqlPool, schema: &str, table: &str) -> Result<Vec<Column>> {
    let rows = sqlx::query(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(p)
    .await
    .map_err(from_sqlx)?;
    rows.iter()
        .map(|r| {
            Ok(Column {
                name: r.try_get(0).map_err(from_sqlx)?,
                base_type: r.try_get::<String, _>(1).map_err(from_sqlx)?.to_lowercase(),
                full_type: r.try_get::<String, _>(2).map_err(from_sqlx)?.to_lowercase(),
            })
        })
        .collect()
}

/// Resolves a configured table against the catalog.
pub async fn resolve_table(p: &MySqlPool, t: &TableSpec, database: &str) -> Result<TablePlan> {
    let (schema, table) = schema_and_table(&t.name, database);
    let cols = columns(p, &schema, &table).await?;
    let from = format!(
        "{}.{}",
        quote_ident(Dialect::MySql, &schema),
        quote_ident(Dialect::MySql, &table)
    );
    TablePlan::new(Dialect::MySql, t, from, &cols)
}

/// One keyset row: row JSON, cursor, tie-breaker (all text).
pub fn decode_row(r: &MySqlRow) -> Result<RawRow> {
    Ok((
        r.try_get(0).map_err(from_sqlx)?,
        r.try_get(1).map_err(from_sqlx)?,
        r.try_get(2).map_err(from_sqlx)?,
    ))
}
