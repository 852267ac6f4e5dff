//! What the Postgres CDC source asks and tells the server over an ordinary SQL connection: the
//! preflight, the captured tables' columns and keys, the slot and the publication, WAL
//! messages (heartbeats, snapshot watermarks), lag.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::{
    error::{Error, Result, from_sqlx},
    source::sql::{Dialect, plan::quote_literal, quote_ident},
};

/// Prefix of the WAL messages this connector writes (heartbeats and snapshot watermarks).
pub const HEARTBEAT_PREFIX: &str = "obsrv.heartbeat";
pub const WATERMARK_PREFIX: &str = "obsrv.watermark";

/// A captured column.
#[derive(Clone, Debug, PartialEq)]
pub struct Col {
    pub name: String,
    pub type_oid: u32,
    /// As it can be written in a cast (`numeric(10,2)`).
    pub full_type: String,
}

/// A captured table as the catalog describes it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// `schema.table`, unquoted: the name in positions, events and the spec's canonical form.
    pub name: String,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Col>,
    /// Primary-key column names, in key order (empty: none).
    pub pk: Vec<String>,
    /// `pg_class.relreplident`: d(efault), n(othing), f(ull), i(ndex).
    pub replica_identity: char,
}

impl Table {
    /// `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(Dialect::Postgres, &self.schema),
            quote_ident(Dialect::Postgres, &self.table)
        )
    }

    /// Updates and deletes carry a key only with a primary key or a replica identity that is
    /// not `nothing`/`default without a key`.
    pub fn has_usable_identity(&self) -> bool {
        match self.replica_identity {
            'f' | 'i' => true,
            'd' => !self.pk.is_empty(),
            _ => false,
        }
    }
}

/// Looks up a configured table (`schema.table`, or a name on the search path).
pub async fn table(pool: &PgPool, name: &str) -> Result<Table> {
    let row = sqlx::query(
        "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(from_sqlx)?
    .ok_or_else(|| Error::Schema(format!("table {name} not found")))?;
    let oid: i64 = row.try_get(0).map_err(from_sqlx)?;
    let schema: String = row.try_get(1).map_err(from_sqlx)?;
    let table: String = row.try_get(2).map_err(from_sqlx)?;
    let ident: String = row.try_get(3).map_err(from_sqlx)?;
    let columns = columns(pool, oid).await?;
    let pk: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid \
         AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(Table {
        name: format!("{schema}.{table}"),
        schema,
        table,
        columns,
        pk,
        replica_identity: ident.chars().next().unwrap_or('d'),
    })
}

/// The replicated columns of a table, in order (generated columns are not replicated).
pub async fn columns(pool: &PgPool, oid: i64) -> Result<Vec<Col>> {
    let rows = sqlx::query(
        "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
         AND a.attgenerated = '' ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)?;
    rows.iter()
        .map(|r| {
            Ok(Col {
                name: r.try_get(0).map_err(from_sqlx)?,
                type_oid: r.try_get::<i64, _>(1).map_err(from_sqlx)? as u32,
                full_type: r.try_get(2).map_err(from_sqlx)?,
            })
        })
        .collect()
}

/// Everything logical replication needs from the server and the user, checked before anything
/// is created: `wal_level`, the REPLICATION attribute, the tables, their keys, SELECT on them.
/// Errors say what to change.
pub async fn preflight(pool: &PgPool, names: &[String], endpoint: &str) -> Result<Vec<Table>> {
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)?;
    if wal_level != "logical" {
        return Err(Error::Schema(format!(
            "{endpoint} runs with wal_level={wal_level}: logical replication needs wal_level=logical (set it and restart the server)"
        )));
    }
    let (user, can_replicate): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper OR r.rolreplication OR EXISTS (SELECT 1 FROM pg_roles g \
         WHERE g.rolname = 'rds_replication' AND pg_has_role(current_user, g.oid, 'member')) \
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .map_err(from_sqlx)?;
    if !can_replicate {
        return Err(missing_replication(&user));
    }
    let mut tables = Vec::new();
    for n in names {
        tables.push(table(pool, n).await?);
    }
    let keyless: Vec<&str> = tables
        .iter()
        .filter(|t| !t.has_usable_identity())
        .map(|t| t.name.as_str())
        .collect();
    if !keyless.is_empty() {
        return Err(Error::Schema(format!(
            "tables without a primary key or a usable REPLICA IDENTITY: {} (updates and deletes would carry no key, and Postgres refuses them on a published table): add a primary key or run ALTER TABLE ... REPLICA IDENTITY FULL",
            keyless.join(", ")
        )));
    }
    for t in &tables {
        let ok: bool = sqlx::query_scalar("SELECT has_table_privilege(to_regclass($1), 'SELECT')")
            .bind(&t.name)
            .fetch_one(pool)
            .await
            .map_err(from_sqlx)?;
        if !ok {
            return Err(Error::AuthFailed(format!(
                "user {user} may not SELECT from {} (GRANT SELECT ON {} TO {user})",
                t.name,
                t.quoted()
            )));
        }
    }
    Ok(tables)
}

pub fn missing_replication(user: &str) -> Error {
    Error::AuthFailed(format!(
        "user {user} lacks the REPLICATION attribute logical replication needs (ALTER ROLE {user} REPLICATION; on RDS: GRANT rds_replication TO {user})"
    ))
}

/// The slot's state, when it exists.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotInfo {
    pub confirmed_flush: Option<u64>,
    pub active_pid: Option<i32>,
    pub plugin: String,
    pub database: String,
}

pub async fn slot(pool: &PgPool, name: &str) -> Result<Option<SlotInfo>> {
    let row = sqlx::query(
        "SELECT confirmed_flush_lsn::text, active_pid, coalesce(plugin, '')::text, coalesce(database, '')::text \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(from_sqlx)?;
    row.map(|r| {
        let lsn: Option<String> = r.try_get(0).map_err(from_sqlx)?;
        Ok(SlotInfo {
            confirmed_flush: lsn.as_deref().and_then(parse_lsn),
            active_pid: r.try_get(1).map_err(from_sqlx)?,
            plugin: r.try_get(2).map_err(from_sqlx)?,
            database: r.try_get(3).map_err(from_sqlx)?,
        })
    })
    .transpose()
}

/// Creates the slot (`pgoutput`); returns its consistent point.
pub async fn create_slot(pool: &PgPool, name: &str) -> Result<u64> {
    let lsn: String = sqlx::query_scalar(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .map_err(from_sqlx)?;
    parse_lsn(&lsn).ok_or_else(|| Error::SourceUnreachable(format!("slot {name} at {lsn:?}")))
}

/// Creates the publication for `tables` when missing, or adds the tables it lacks.
pub async fn ensure_publication(pool: &PgPool, name: &str, tables: &[Table]) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(name)
            .fetch_one(pool)
            .await
            .map_err(from_sqlx)?;
    let pubname = quote_ident(Dialect::Postgres, name);
    if !exists {
        let list: Vec<String> = tables.iter().map(Table::quoted).collect();
        return exec(
            pool,
            &format!("CREATE PUBLICATION {pubname} FOR TABLE {}", list.join(", ")),
        )
        .await
        .map_err(|e| publication_error(name, e));
    }
    let published: Vec<String> = sqlx::query_scalar(
        "SELECT (schemaname || '.' || tablename)::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(from_sqlx)?;
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| !published.contains(&t.name))
        .map(Table::quoted)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    exec(
        pool,
        &format!(
            "ALTER PUBLICATION {pubname} ADD TABLE {}",
            missing.join(", ")
        ),
    )
    .await
    .map_err(|e| publication_error(name, e))
}

fn publication_error(name: &str, e: Error) -> Error {
    match e {
        Error::AuthFailed(m) | Error::Schema(m) | Error::SourceUnreachable(m) => {
            Error::AuthFailed(format!(
                "publication {name} cannot be created or extended ({m}): create it as the tables' owner (CREATE PUBLICATION {name} FOR TABLE ...) or grant CREATE on the database"
            ))
        }
        e => e,
    }
}

async fn exec(pool: &PgPool, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(from_sqlx)
}

/// Writes a non-transactional logical message into the WAL; returns its LSN.
pub async fn emit_message(pool: &PgPool, prefix: &str, content: &str) -> Result<u64> {
    let lsn: String = sqlx::query_scalar("SELECT pg_logical_emit_message(false, $1, $2)::text")
        .bind(prefix)
        .bind(content)
        .fetch_one(pool)
        .await
        .map_err(from_sqlx)?;
    parse_lsn(&lsn).ok_or_else(|| Error::SourceUnreachable(format!("message at {lsn:?}")))
}

/// One snapshot chunk: up to `limit` rows after `after` (primary-key values as text) in key
/// order, each column in Postgres's text output (the same text `pgoutput` sends). A simple query,
/// so values come as text: the key values are inlined as escaped literals cast to their types.
pub async fn chunk(
    pool: &PgPool,
    t: &Table,
    after: Option<&[String]>,
    limit: usize,
) -> Result<Vec<Vec<Option<String>>>> {
    let q = |n: &str| quote_ident(Dialect::Postgres, n);
    let cols: Vec<String> = t.columns.iter().map(|c| q(&c.name)).collect();
    let pk: Vec<String> = t.pk.iter().map(|c| q(c)).collect();
    let mut sql = format!("SELECT {} FROM {}", cols.join(", "), t.quoted());
    if let Some(after) = after {
        let vals: Vec<String> =
            t.pk.iter()
                .zip(after)
                .map(|(name, v)| {
                    let ty = t
                        .columns
                        .iter()
                        .find(|c| &c.name == name)
                        .map(|c| c.full_type.as_str())
                        .unwrap_or("text");
                    format!("E{}::{ty}", quote_literal(v))
                })
                .collect();
        sql.push_str(&format!(
            " WHERE ({}) > ({})",
            pk.join(", "),
            vals.join(", ")
        ));
    }
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", pk.join(", ")));
    let rows = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .map_err(from_sqlx)?;
    rows.iter()
        .map(|r| {
            (0..t.columns.len())
                .map(|i| {
                    let v = r.try_get_raw(i).map_err(from_sqlx)?;
                    if sqlx::ValueRef::is_null(&v) {
                        return Ok(None);
                    }
                    v.as_str()
                        .map(|s| Some(s.to_string()))
                        .map_err(|e| Error::Schema(format!("{}: {e}", t.name)))
                })
                .collect()
        })
        .collect()
}

/// What the slot costs and how far behind it is, in bytes of WAL.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlotLag {
    /// WAL kept for the slot (from its restart point to the server's current position).
    pub retained: i64,
    /// WAL not yet confirmed by the connector.
    pub unconfirmed: i64,
}

pub async fn slot_lag(pool: &PgPool, slot: &str) -> Result<Option<SlotLag>> {
    let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .map_err(from_sqlx)?;
    Ok(row.map(|(r, u)| SlotLag {
        retained: r.unwrap_or(0).max(0),
        unconfirmed: u.unwrap_or(0).max(0),
    }))
}

/// The planner's row estimate of a table (`reltuples`; -1 before the first ANALYZE counts as 0).
pub async fn estimated_rows(pool: &PgPool, table: &str) -> Result<i64> {
    let n: f32 = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
        .bind(table)
        .fetch_optional(pool)
        .await
        .map_err(from_sqlx)?
        .unwrap_or(0.0);
    Ok(n.max(0.0) as i64)
}

/// Drops the slot, ending the session that holds it (the connector being deleted) if it does not
/// let go within `wait`. `Ok(false)`: there was no such slot.
pub async fn drop_slot(pool: &PgPool, name: &str, wait: Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let Some(s) = slot(pool, name).await? else {
            return Ok(false);
        };
        match s.active_pid {
            None => {
                let res = sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(name)
                    .execute(pool)
                    .await;
                match res {
                    Ok(_) => return Ok(true),
                    // Taken again between the check and the drop: look again.
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "slot busy, retrying the drop");
                    }
                    Err(e) => return Err(from_sqlx(e)),
                }
            }
            Some(pid) if std::time::Instant::now() >= deadline => {
                tracing::warn!(
                    slot = name,
                    pid,
                    "ending the session that still holds the slot"
                );
                sqlx::query("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .execute(pool)
                    .await
                    .map_err(from_sqlx)?;
            }
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drops the publication if it exists.
pub async fn drop_publication(pool: &PgPool, name: &str) -> Result<()> {
    exec(
        pool,
        &format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(Dialect::Postgres, name)
        ),
    )
    .await
}

/// `16/B374D848` as a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
}

/// A number as `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_as_postgres_writes_them() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn(&format_lsn(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn tables_need_a_key_or_a_full_identity() {
        let t = |ident, pk: &[&str]| Table {
            name: "public.t".into(),
            schema: "public".into(),
            table: "t".into(),
            columns: vec![],
            pk: pk.iter().map(|s| s.to_string()).collect(),
            replica_identity: ident,
        };
        assert!(t('d', &["id"]).has_usable_identity());
        assert!(!t('d', &[]).has_usable_identity());
        assert!(t('f', &[]).has_usable_identity());
        assert!(!t('n', &["id"]).has_usable_identity());
        assert_eq!(t('d', &[]).quoted(), r#""public"."t""#);
    }
}
