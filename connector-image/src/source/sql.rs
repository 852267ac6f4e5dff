//! Postgres, MySQL and MariaDB tables read incrementally by keyset pagination on
//! `(cursor, tieBreaker)`: never OFFSET, and never a row skipped because it shares its cursor value
//! with the last row of a batch. The database renders each row as JSON (`row_to_json`,
//! `JSON_OBJECT`), which is both faithful (numerics keep their digits, json nests) and fast.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use obsrv_crds::{SqlSourceSpec, TableSpec, TlsMode, runtime::env};
use serde::{Deserialize, Serialize};
use sqlx::{
    AssertSqlSafe, MySqlPool, PgPool, Row,
    mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlSslMode},
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};
use tokio::sync::mpsc;

use super::{Batch, Lag, OpenContext, Record, Source, SourceFactory};
use crate::{
    config::Secrets,
    envelope::{Payload, event_id},
    error::{Error, Result, check_ca_pem, connect_error, from_sqlx},
};

/// How long a first connection may take before the source is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection before the pool is built: a pool retries refused connections until its acquire
/// timeout and then says only "pool timed out"; this says where and why, within seconds.
async fn probe<O>(o: &O, what: &str, host: &str, port: u16) -> Result<()>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, o.connect()).await {
        Ok(Ok(c)) => {
            // Closing politely is best effort: the pool opens its own connections.
            let _ = sqlx::Connection::close(c).await;
            Ok(())
        }
        Ok(Err(e)) => Err(connect_error(what, host, port, e)),
        Err(_) => Err(Error::SourceUnreachable(format!(
            "no answer from {host}:{port} within {}s: is {what} reachable there (host, port, firewall)?",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

impl Dialect {
    fn default_port(self) -> u16 {
        match self {
            Dialect::Postgres => 5432,
            Dialect::MySql => 3306,
        }
    }
}

/// One column as the catalog describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    /// Base type name (`bytea`, `timestamp`, `datetime`, `varbinary`, ...).
    pub base_type: String,
    /// Full type as it can be written in a cast (`numeric(10,2)`, `decimal(10,2) unsigned`).
    pub full_type: String,
}

/// Position reached in one table: the last delivered row's cursor and tie-breaker, as text the
/// database casts back to the column type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TablePosition {
    pub cursor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_breaker: Option<String>,
}

/// The position of a SQL source: per configured table name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SqlPosition {
    pub tables: BTreeMap<String, TablePosition>,
}

impl SqlPosition {
    pub fn from_value(v: Option<&serde_json::Value>) -> Result<SqlPosition> {
        match v {
            None => Ok(SqlPosition::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::State(format!("saved position is not a SQL position: {e}"))),
        }
    }

    pub fn watermark(&self) -> Option<String> {
        if self.tables.is_empty() {
            return None;
        }
        Some(
            self.tables
                .iter()
                .map(|(t, p)| match &p.tie_breaker {
                    Some(tb) => format!("{t}: ({}, {tb})", p.cursor),
                    None => format!("{t}: {}", p.cursor),
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// Quotes an identifier for the dialect.
pub fn quote_ident(d: Dialect, name: &str) -> String {
    match d {
        Dialect::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
        Dialect::MySql => format!("`{}`", name.replace('`', "``")),
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The expression rendering a column into the row's JSON, so that types map faithfully:
/// bytes as base64, timestamps ISO-8601 with zone (sessions run in UTC).
pub fn column_expr(d: Dialect, c: &Column) -> String {
    let col = format!("s.{}", quote_ident(d, &c.name));
    match d {
        Dialect::Postgres => match c.base_type.as_str() {
            "bytea" => format!("translate(encode({col}, 'base64'), E'\\n', '')"),
            "timestamp" => format!("({col} AT TIME ZONE 'UTC')"),
            _ => col,
        },
        Dialect::MySql => match c.base_type.as_str() {
            "binary" | "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob" => {
                format!("REPLACE(TO_BASE64({col}), CHAR(10), '')")
            }
            "datetime" | "timestamp" => format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
            "bit" => format!("CAST({col} AS UNSIGNED)"),
            _ => col,
        },
    }
}

/// How a bound text parameter is cast back to a column's type for the keyset comparison.
pub fn param_cast(d: Dialect, c: &Column, placeholder: &str) -> String {
    match d {
        Dialect::Postgres => format!("{placeholder}::{}", c.full_type),
        Dialect::MySql => {
            let unsigned = c.full_type.contains("unsigned");
            match c.base_type.as_str() {
                "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => {
                    format!(
                        "CAST({placeholder} AS {})",
                        if unsigned { "UNSIGNED" } else { "SIGNED" }
                    )
                }
                "decimal" | "numeric" => {
                    let ty = c
                        .full_type
                        .split_whitespace()
                        .next()
                        .unwrap_or("decimal(65,30)");
                    format!("CAST({placeholder} AS {})", ty.to_uppercase())
                }
                "datetime" | "timestamp" => format!("CAST({placeholder} AS DATETIME(6))"),
                "date" => format!("CAST({placeholder} AS DATE)"),
                "time" => format!("CAST({placeholder} AS TIME(6))"),
                "float" | "double" | "real" => format!("CAST({placeholder} AS DOUBLE)"),
                _ => placeholder.to_string(),
            }
        }
    }
}

/// Everything needed to page through one table, resolved against its catalog once at start.
#[derive(Clone, Debug, PartialEq)]
pub struct TablePlan {
    /// The table as configured (state key).
    pub name: String,
    pub dialect: Dialect,
    /// The table as the FROM clause names it.
    pub from: String,
    pub select: Vec<String>,
    pub cursor: Column,
    pub tie_breaker: Option<Column>,
    /// Every column, none rewritten: Postgres renders the row itself (`row_to_json(s)`), which
    /// saves a subquery per row.
    pub whole_row: bool,
}

/// Which query to run next on a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// From the start (no position yet).
    First,
    /// Rows after the position.
    After,
    /// Every row whose cursor equals the bound value (completing a tie group when there is no
    /// tie-breaker).
    TieGroup,
}

impl TablePlan {
    /// Builds the plan from the table's catalog columns; fails on unknown columns.
    pub fn new(
        dialect: Dialect,
        t: &TableSpec,
        from: String,
        columns: &[Column],
    ) -> Result<TablePlan> {
        let find = |n: &str| {
            columns
                .iter()
                .find(|c| c.name == n)
                .or_else(|| columns.iter().find(|c| c.name.eq_ignore_ascii_case(n)))
                .cloned()
                .ok_or_else(|| Error::Schema(format!("table {} has no column {n}", t.name)))
        };
        if columns.is_empty() {
            return Err(Error::Schema(format!(
                "table {} not found or has no columns",
                t.name
            )));
        }
        let cursor = find(&t.cursor.column)?;
        let tie_breaker = t.cursor.tie_breaker.as_deref().map(find).transpose()?;
        let chosen: Vec<Column> = if t.columns.is_empty() {
            columns.to_vec()
        } else {
            t.columns.iter().map(|c| find(c)).collect::<Result<_>>()?
        };
        let select = chosen
            .iter()
            .map(|c| match dialect {
                Dialect::Postgres => format!(
                    "{} AS {}",
                    column_expr(dialect, c),
                    quote_ident(dialect, &c.name)
                ),
                Dialect::MySql => {
                    format!("{}, {}", quote_literal(&c.name), column_expr(dialect, c))
                }
            })
            .collect();
        let whole_row = t.columns.is_empty()
            && chosen
                .iter()
                .all(|c| column_expr(dialect, c) == format!("s.{}", quote_ident(dialect, &c.name)));
        Ok(TablePlan {
            name: t.name.clone(),
            dialect,
            from,
            select,
            cursor,
            tie_breaker,
            whole_row,
        })
    }

    /// The SQL of one page. Binds, in order: for `After` the cursor (MySQL: twice) and tie-breaker;
    /// for `TieGroup` the cursor. Columns returned: row JSON text, cursor text, tie-breaker text.
    pub fn query(&self, page: Page, limit: usize) -> String {
        let params = match self.dialect {
            Dialect::Postgres => ["$1", "$2", "$3"],
            Dialect::MySql => ["?", "?", "?"],
        };
        self.query_with(page, limit, params, false)
    }

    /// How the cursor and tie-breaker travel in this table's COPY stream.
    pub fn key_formats(&self) -> [KeyFormat; 2] {
        let of = |c: &Column| match self.dialect {
            Dialect::Postgres => KeyFormat::of_postgres(&c.base_type),
            Dialect::MySql => KeyFormat::Text,
        };
        [
            of(&self.cursor),
            self.tie_breaker.as_ref().map_or(KeyFormat::Text, of),
        ]
    }

    /// Postgres: the page at `pos` as `COPY (...) TO STDOUT (FORMAT binary)`. COPY takes no
    /// parameters, so the position's values are inlined as escaped string literals (`E'...'`,
    /// read the same whatever `standard_conforming_strings` says) cast to the column types.
    /// Columns: row JSON text, then cursor and tie-breaker in their [`TablePlan::key_formats`].
    pub fn copy_query(&self, page: Page, limit: usize, pos: Option<&TablePosition>) -> String {
        let lits: Vec<String> = self
            .binds(page, pos)
            .iter()
            .map(|b| format!("E{}", quote_literal(b)))
            .collect();
        let lit = |i: usize| lits.get(i).map(String::as_str).unwrap_or("NULL");
        format!(
            "COPY ({}) TO STDOUT (FORMAT binary)",
            self.query_with(page, limit, [lit(0), lit(1), lit(2)], true)
        )
    }

    /// `binary_keys`: cursor and tie-breaker as selected for a binary COPY (see
    /// [`KeyFormat`]); text otherwise.
    fn query_with(&self, page: Page, limit: usize, params: [&str; 3], binary_keys: bool) -> String {
        let d = self.dialect;
        let c = format!("s.{}", quote_ident(d, &self.cursor.name));
        let tb = self
            .tie_breaker
            .as_ref()
            .map(|t| format!("s.{}", quote_ident(d, &t.name)));
        let [p1, p2, p3] = params;
        let mut conds = vec![format!("{c} IS NOT NULL")];
        if let Some(tb) = &tb {
            conds.push(format!("{tb} IS NOT NULL"));
        }
        match (page, &tb, d) {
            (Page::First, _, _) => {}
            (Page::TieGroup, _, _) => {
                conds.push(format!("{c} = {}", param_cast(d, &self.cursor, p1)))
            }
            (Page::After, None, _) => {
                conds.push(format!("{c} > {}", param_cast(d, &self.cursor, p1)))
            }
            (Page::After, Some(tb), Dialect::Postgres) => {
                let tbc = self.tie_breaker.as_ref().expect("tie-breaker column");
                conds.push(format!(
                    "({c}, {tb}) > ({}, {})",
                    param_cast(d, &self.cursor, p1),
                    param_cast(d, tbc, p2)
                ));
            }
            (Page::After, Some(tb), Dialect::MySql) => {
                // Expanded so MySQL/MariaDB use a range scan on the (cursor, tieBreaker) index.
                let tbc = self.tie_breaker.as_ref().expect("tie-breaker column");
                let cv = param_cast(d, &self.cursor, p1);
                let cv2 = param_cast(d, &self.cursor, p2);
                conds.push(format!(
                    "{c} >= {cv} AND ({c} > {cv2} OR {tb} > {})",
                    param_cast(d, tbc, p3)
                ));
            }
        }
        let order = match &tb {
            Some(tb) => format!("{c}, {tb}"),
            None => c.clone(),
        };
        let limit = if page == Page::TieGroup {
            String::new()
        } else {
            format!(" LIMIT {limit}")
        };
        match d {
            Dialect::Postgres => {
                let [cf, tf] = if binary_keys {
                    self.key_formats()
                } else {
                    [KeyFormat::Text; 2]
                };
                let key = |col: &str, f: KeyFormat| match f {
                    KeyFormat::Text => format!("{col}::text"),
                    _ => col.to_string(),
                };
                let c_sel = key(&c, cf);
                let tb_sel = tb
                    .as_ref()
                    .map(|tb| key(tb, tf))
                    .unwrap_or_else(|| "NULL::text".into());
                if self.whole_row {
                    format!(
                        "SELECT row_to_json(s)::text, {c_sel}, {tb_sel} FROM {} s WHERE {} ORDER BY {order}{limit}",
                        self.from,
                        conds.join(" AND ")
                    )
                } else {
                    format!(
                        "SELECT row_to_json(r)::text, {c_sel}, {tb_sel} FROM {} s CROSS JOIN LATERAL (SELECT {}) r WHERE {} ORDER BY {order}{limit}",
                        self.from,
                        self.select.join(", "),
                        conds.join(" AND ")
                    )
                }
            }
            Dialect::MySql => {
                let tb_sel = tb
                    .as_ref()
                    .map(|tb| format!("CAST({tb} AS CHAR)"))
                    .unwrap_or_else(|| "CAST(NULL AS CHAR)".into());
                format!(
                    "SELECT CAST(JSON_OBJECT({}) AS CHAR), CAST({c} AS CHAR), {tb_sel} FROM {} s WHERE {} ORDER BY {order}{limit}",
                    self.select.join(", "),
                    self.from,
                    conds.join(" AND ")
                )
            }
        }
    }

    /// Binds for `page` at `pos`, in placeholder order.
    pub fn binds(&self, page: Page, pos: Option<&TablePosition>) -> Vec<String> {
        let Some(p) = pos else { return Vec::new() };
        match (page, self.dialect, &self.tie_breaker) {
            (Page::First, _, _) => Vec::new(),
            (Page::TieGroup, _, _) | (Page::After, _, None) => vec![p.cursor.clone()],
            (Page::After, Dialect::Postgres, Some(_)) => {
                vec![p.cursor.clone(), p.tie_breaker.clone().unwrap_or_default()]
            }
            (Page::After, Dialect::MySql, Some(_)) => {
                vec![
                    p.cursor.clone(),
                    p.cursor.clone(),
                    p.tie_breaker.clone().unwrap_or_default(),
                ]
            }
        }
    }

    /// Age in seconds of the oldest unread row, when the cursor is a time (else `None`).
    pub fn age_query(&self, pos_known: bool) -> Option<String> {
        let c = format!("s.{}", quote_ident(self.dialect, &self.cursor.name));
        let age = match (self.dialect, self.cursor.base_type.as_str()) {
            (Dialect::Postgres, "timestamptz" | "timestamp" | "date") => {
                format!("EXTRACT(EPOCH FROM (now() - min({c})::timestamptz))::float8")
            }
            (Dialect::MySql, "datetime" | "timestamp" | "date") => {
                format!(
                    "CAST(TIMESTAMPDIFF(MICROSECOND, min({c}), UTC_TIMESTAMP(6)) AS DOUBLE) / 1000000"
                )
            }
            _ => return None,
        };
        let count = self.count_query(pos_known);
        let where_at = count.find(" WHERE ").expect("count queries have a WHERE");
        let end = count.rfind(" LIMIT ").expect("count queries have a LIMIT");
        Some(format!(
            "SELECT {age} FROM {} s{}",
            self.from,
            &count[where_at..end]
        ))
    }

    /// Rows remaining after `pos` (capped), for lag.
    pub fn count_query(&self, pos_known: bool) -> String {
        format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} s{} LIMIT 10000000) x",
            self.from,
            self.remaining_where(pos_known)
        )
    }

    /// Postgres: the planner's estimate of the rows remaining after `pos` (`EXPLAIN`, nothing
    /// read). Same binds as [`TablePlan::count_query`].
    pub fn estimate_query(&self, pos_known: bool) -> String {
        format!(
            "EXPLAIN SELECT 1 FROM {} s{}",
            self.from,
            self.remaining_where(pos_known)
        )
    }

    /// ` WHERE ...` of the page query: the rows after the position.
    fn remaining_where(&self, pos_known: bool) -> String {
        let page = if pos_known { Page::After } else { Page::First };
        let q = self.query(page, 10_000_000);
        let where_at = q.find(" WHERE ").expect("page queries have a WHERE");
        let order_at = q.find(" ORDER BY ").expect("page queries have an ORDER BY");
        q[where_at..order_at].to_string()
    }
}

/// Below this many remaining rows (by the planner's estimate) lag is counted exactly; above it the
/// estimate is reported, since counting millions of rows every few seconds would cost the database
/// a good share of what the load itself costs.
pub const EXACT_LAG_BELOW: i64 = 100_000;

/// The row estimate of the top node of a text `EXPLAIN` plan
/// (`Seq Scan on t s  (cost=0.00..1.10 rows=10 width=4)` -> 10). Pure.
pub fn plan_rows(first_line: &str) -> Option<i64> {
    let after = &first_line[first_line.find(" rows=")? + 6..];
    let digits: &str = &after[..after.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

// SQL safety: page queries are built only from catalog identifiers (quoted by `quote_ident`) and
// casts of catalog types; every value is a bound parameter.

/// One row as fetched: JSON text, cursor text, tie-breaker text.
pub type RawRow = (String, Option<String>, Option<String>);

/// What a fetched page means for the position, given whether it was full. Pure.
/// When the page is full and there is no tie-breaker, the rows sharing the last cursor value are
/// held back (returned as `Some(cursor)`) so the caller fetches that whole tie group at once.
pub fn split_page(
    rows: Vec<RawRow>,
    full: bool,
    has_tie_breaker: bool,
) -> (Vec<RawRow>, Option<String>) {
    if !full || has_tie_breaker {
        return (rows, None);
    }
    let Some(last) = rows.last().and_then(|r| r.1.clone()) else {
        return (rows, None);
    };
    let keep: Vec<RawRow> = rows
        .into_iter()
        .filter(|r| r.1.as_deref() != Some(last.as_str()))
        .collect();
    (keep, Some(last))
}

/// How a key column (cursor, tie-breaker) travels in a Postgres COPY stream. Converting keys to
/// text is a tenth of the database's cost for the whole query, so the types whose binary form is
/// rendered here exactly as Postgres prints them (sessions run in UTC) come binary; the rest as
/// text. The rendered text is what positions and event ids are made of, as before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyFormat {
    #[default]
    Text,
    Int2,
    Int4,
    Int8,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
}

impl KeyFormat {
    /// By Postgres base type name (`pg_type.typname`).
    pub fn of_postgres(typname: &str) -> KeyFormat {
        match typname {
            "int2" => KeyFormat::Int2,
            "int4" => KeyFormat::Int4,
            "int8" => KeyFormat::Int8,
            "date" => KeyFormat::Date,
            "timestamp" => KeyFormat::Timestamp,
            "timestamptz" => KeyFormat::Timestamptz,
            "uuid" => KeyFormat::Uuid,
            _ => KeyFormat::Text,
        }
    }
}

/// Postgres's text output of a key column's binary form, into `out` (cleared first). Pure.
pub fn render_key(f: KeyFormat, b: &[u8], out: &mut String) -> std::result::Result<(), String> {
    use std::fmt::Write;
    out.clear();
    let size = |n: usize| {
        if b.len() == n {
            Ok(())
        } else {
            Err(format!("{f:?} value of {} bytes", b.len()))
        }
    };
    match f {
        KeyFormat::Text => out.push_str(std::str::from_utf8(b).map_err(|_| "not UTF-8")?),
        KeyFormat::Int2 => {
            size(2)?;
            let _ = write!(out, "{}", i16::from_be_bytes([b[0], b[1]]));
        }
        KeyFormat::Int4 => {
            size(4)?;
            let _ = write!(out, "{}", i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        }
        KeyFormat::Int8 => {
            size(8)?;
            let _ = write!(
                out,
                "{}",
                i64::from_be_bytes(b.try_into().expect("8 bytes"))
            );
        }
        KeyFormat::Uuid => {
            size(16)?;
            for (i, byte) in b.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    out.push('-');
                }
                let _ = write!(out, "{byte:02x}");
            }
        }
        KeyFormat::Date => {
            size(4)?;
            match i32::from_be_bytes([b[0], b[1], b[2], b[3]]) {
                i32::MAX => out.push_str("infinity"),
                i32::MIN => out.push_str("-infinity"),
                days => {
                    let bc = push_date(out, i64::from(days));
                    if bc {
                        out.push_str(" BC");
                    }
                }
            }
        }
        KeyFormat::Timestamp | KeyFormat::Timestamptz => {
            size(8)?;
            const DAY_US: i64 = 86_400_000_000;
            match i64::from_be_bytes(b.try_into().expect("8 bytes")) {
                i64::MAX => out.push_str("infinity"),
                i64::MIN => out.push_str("-infinity"),
                us => {
                    let bc = push_date(out, us.div_euclid(DAY_US));
                    let t = us.rem_euclid(DAY_US);
                    let (secs, micros) = (t / 1_000_000, t % 1_000_000);
                    let _ = write!(
                        out,
                        " {:02}:{:02}:{:02}",
                        secs / 3600,
                        secs / 60 % 60,
                        secs % 60
                    );
                    if micros != 0 {
                        // Six digits less the trailing zeros, as Postgres prints them.
                        let (mut digits, mut width) = (micros, 6);
                        while digits % 10 == 0 {
                            digits /= 10;
                            width -= 1;
                        }
                        let _ = write!(out, ".{digits:0width$}");
                    }
                    if f == KeyFormat::Timestamptz {
                        out.push_str("+00");
                    }
                    if bc {
                        out.push_str(" BC");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes `YYYY-MM-DD` of a day counted from 2000-01-01 (Postgres's epoch) in the proleptic
/// Gregorian calendar; true when the year is BC (written as Postgres does: year 0 is 1 BC).
fn push_date(out: &mut String, days_since_2000: i64) -> bool {
    use std::fmt::Write;
    // Days from 1970-01-01, then the civil date (H. Hinnant's days-to-civil algorithm).
    let z = days_since_2000 + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (shown, bc) = if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    };
    let _ = write!(out, "{shown:04}-{month:02}-{day:02}");
    bc
}

/// `COPY ... (FORMAT binary)` starts with this signature, then flags and a header extension.
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Incremental parser of `COPY (...) TO STDOUT (FORMAT binary)` output of three text columns
/// (row JSON, cursor, tie-breaker): the bytes arrive in arbitrary chunks, complete rows come out.
/// Text columns are sent as raw UTF-8, so there is nothing to unescape.
#[derive(Debug, Default)]
pub struct CopyRows {
    buf: Vec<u8>,
    header: bool,
    finished: bool,
    /// Cursor and tie-breaker formats.
    keys: [KeyFormat; 2],
    /// Their rendered text, reused row after row.
    rendered: [String; 2],
}

/// One row of the COPY stream, borrowed from its bytes: row JSON, cursor, tie-breaker.
pub type CopyRow<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

impl CopyRows {
    /// A parser for a stream whose cursor and tie-breaker come in `keys` formats.
    pub fn new(keys: [KeyFormat; 2]) -> CopyRows {
        CopyRows {
            keys,
            ..CopyRows::default()
        }
    }

    /// Takes the next chunk of the COPY stream and appends every row it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<RawRow>) -> Result<()> {
        self.push_with(chunk, |(json, c, tb)| {
            out.push((
                json.to_string(),
                c.map(str::to_string),
                tb.map(str::to_string),
            ));
            Ok(())
        })
    }

    /// [`CopyRows::push`] handing each completed row, borrowed, to `on_row` (no copy unless it
    /// makes one).
    pub fn push_with(
        &mut self,
        chunk: &[u8],
        mut on_row: impl FnMut(CopyRow<'_>) -> Result<()>,
    ) -> Result<()> {
        if self.buf.is_empty() {
            let used = self.parse(chunk, &mut on_row)?;
            self.buf.extend_from_slice(&chunk[used..]);
        } else {
            self.buf.extend_from_slice(chunk);
            let buf = std::mem::take(&mut self.buf);
            let used = self.parse(&buf, &mut on_row);
            self.buf = buf;
            self.buf.drain(..used?);
        }
        Ok(())
    }

    /// Whether the trailer was seen (the stream ended cleanly).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Parses complete rows of `data`; returns how many bytes were consumed.
    fn parse(
        &mut self,
        data: &[u8],
        on_row: &mut impl FnMut(CopyRow<'_>) -> Result<()>,
    ) -> Result<usize> {
        let bad = |m: &str| Error::SourceUnreachable(format!("COPY output: {m}"));
        let mut at = 0;
        if !self.header {
            if data.len() < 19 {
                return Ok(0);
            }
            if &data[..11] != COPY_SIGNATURE {
                return Err(bad("missing signature"));
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
            if data.len() < 19 + ext {
                return Ok(0);
            }
            at = 19 + ext;
            self.header = true;
        }
        'rows: while !self.finished && data.len() >= at + 2 {
            let n = i16::from_be_bytes([data[at], data[at + 1]]);
            if n == -1 {
                self.finished = true;
                at += 2;
                break;
            }
            if n != 3 {
                return Err(bad(&format!("expected 3 columns, got {n}")));
            }
            let mut p = at + 2;
            // Each column's bytes (None for NULL); a row cut short waits for the next chunk.
            let mut cols: [Option<&[u8]>; 3] = [None, None, None];
            for c in &mut cols {
                if data.len() < p + 4 {
                    break 'rows;
                }
                let len = i32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]);
                p += 4;
                if len < 0 {
                    continue;
                }
                let len = len as usize;
                if data.len() < p + len {
                    break 'rows;
                }
                *c = Some(&data[p..p + len]);
                p += len;
            }
            let [json, cursor, tb] = cols;
            let json = std::str::from_utf8(json.ok_or_else(|| bad("row JSON is NULL"))?)
                .map_err(|_| bad("row JSON is not UTF-8"))?;
            let [rc, rt] = &mut self.rendered;
            let key = |bytes: Option<&[u8]>, f: KeyFormat, out: &mut String| {
                bytes
                    .map(|b| render_key(f, b, out).map_err(|m| bad(&format!("key column: {m}"))))
                    .transpose()
            };
            let has_c = key(cursor, self.keys[0], rc)?.is_some();
            let has_t = key(tb, self.keys[1], rt)?.is_some();
            on_row((
                json,
                has_c.then_some(rc.as_str()),
                has_t.then_some(rt.as_str()),
            ))?;
            at = p;
        }
        Ok(at)
    }
}

/// Rows sent at once from the query task to the reader (fewer channel messages than one per row).
const ROW_CHUNK: usize = 256;

/// Records of a streaming query, and the position of the last of them.
#[derive(Debug)]
struct StreamChunk {
    records: Vec<Record>,
    last: TablePosition,
}

/// Turns a streaming query's rows into records where they are read (the query task), keeping only
/// the last row's position: no per-row copies of cursor and tie-breaker. Chunks end on batch
/// boundaries, so the reader never has to split one.
struct ChunkBuilder {
    instance: String,
    table: String,
    batch_size: usize,
    /// Rows since the last batch boundary.
    in_batch: usize,
    records: Vec<Record>,
    cursor: String,
    tie_breaker: Option<String>,
}

impl ChunkBuilder {
    fn new(instance: &str, table: &str, batch_size: usize) -> ChunkBuilder {
        ChunkBuilder {
            instance: instance.to_string(),
            table: table.to_string(),
            batch_size,
            in_batch: 0,
            records: Vec::with_capacity(ROW_CHUNK),
            cursor: String::new(),
            tie_breaker: None,
        }
    }

    /// Adds a row; its id is the one [`SqlSource::advance`] would give it.
    fn add(&mut self, json: String, cursor: Option<&str>, tb: Option<&str>) -> Result<()> {
        let c =
            cursor.ok_or_else(|| Error::Schema(format!("{}: cursor value is NULL", self.table)))?;
        let id = match tb {
            Some(tb) => event_id(&self.instance, &[&self.table, c, tb]),
            None => event_id(&self.instance, &[&self.table, c, &json]),
        };
        self.cursor.clear();
        self.cursor.push_str(c);
        match (&mut self.tie_breaker, tb) {
            (Some(t), Some(tb)) => {
                t.clear();
                t.push_str(tb);
            }
            (t, tb) => *t = tb.map(str::to_string),
        }
        self.records.push(Record {
            id,
            payload: Payload::Json(json),
        });
        self.in_batch += 1;
        Ok(())
    }

    /// Whether the chunk should go now: big enough, or at a batch boundary.
    fn full(&self) -> bool {
        self.records.len() >= ROW_CHUNK || self.in_batch >= self.batch_size
    }

    fn take(&mut self) -> Option<StreamChunk> {
        if self.records.is_empty() {
            return None;
        }
        if self.in_batch >= self.batch_size {
            self.in_batch = 0;
        }
        Some(StreamChunk {
            records: std::mem::replace(&mut self.records, Vec::with_capacity(ROW_CHUNK)),
            last: TablePosition {
                cursor: self.cursor.clone(),
                tie_breaker: self.tie_breaker.clone(),
            },
        })
    }
}

/// The same code on whichever driver the pool holds: sqlx's query builders are typed per database,
/// so each arm type-checks on its own.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Pg($p) => $body,
            Pool::My($p) => $body,
        }
    };
}

#[derive(Clone)]
enum Pool {
    Pg(PgPool),
    My(MySqlPool),
}

/// Rows per streaming query: bounds how long one query (and its snapshot) stays open.
pub const STREAM_ROWS: usize = 1_000_000;

/// A keyset query whose rows stream in while earlier batches are being delivered, so the database
/// produces continuously (like `COPY`) instead of one page per round trip.
struct RowStream {
    table: usize,
    rx: mpsc::Receiver<Result<StreamChunk>>,
    received: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RowStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode_my(r: &sqlx::mysql::MySqlRow) -> Result<RawRow> {
    Ok((
        r.try_get(0).map_err(from_sqlx)?,
        r.try_get(1).map_err(from_sqlx)?,
        r.try_get(2).map_err(from_sqlx)?,
    ))
}

/// Sends what `chunk` gathered; false when the reader is gone.
async fn flush(tx: &mpsc::Sender<Result<StreamChunk>>, chunk: &mut ChunkBuilder) -> bool {
    match chunk.take() {
        Some(c) => tx.send(Ok(c)).await.is_ok(),
        None => true,
    }
}

/// Drives a query's result stream into chunks for the reader: what is gathered is handed over
/// whenever the database has nothing more yet or a chunk is full. `step` adds one item's rows
/// (`None`: the stream ended) and says whether to go on; its error ends the stream after what
/// came before it.
async fn pump<T>(
    mut stream: futures::stream::BoxStream<'_, T>,
    tx: &mpsc::Sender<Result<StreamChunk>>,
    chunk: &mut ChunkBuilder,
    mut step: impl FnMut(Option<T>, &mut ChunkBuilder) -> Result<bool>,
) {
    loop {
        let next = match stream.next().now_or_never() {
            Some(n) => n,
            None => {
                if !flush(tx, chunk).await {
                    return;
                }
                stream.next().await
            }
        };
        match step(next, chunk) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                if flush(tx, chunk).await {
                    let _ = tx.send(Err(e)).await;
                }
                return;
            }
        }
        if chunk.full() && !flush(tx, chunk).await {
            return;
        }
    }
    flush(tx, chunk).await;
}

/// The `postgres` kind.
pub fn postgres() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::POSTGRES.name, |ctx| {
        SqlSource::open(Dialect::Postgres, ctx, |s| s.postgres.as_ref())
    })
}

/// The `mysql` kind.
pub fn mysql() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::MYSQL.name, |ctx| {
        SqlSource::open(Dialect::MySql, ctx, |s| s.mysql.as_ref())
    })
}

/// The `mariadb` kind (MySQL's protocol and dialect).
pub fn mariadb() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::MARIADB.name, |ctx| {
        SqlSource::open(Dialect::MySql, ctx, |s| s.mariadb.as_ref())
    })
}

/// A Postgres/MySQL/MariaDB source over one or more tables, read round-robin.
pub struct SqlSource {
    dialect: Dialect,
    /// `host:port`, named in every error of a running read.
    endpoint: String,
    instance: String,
    pool: Pool,
    plans: Vec<TablePlan>,
    position: SqlPosition,
    batch_size: usize,
    next_table: usize,
    stream: Option<RowStream>,
}

impl SqlSource {
    /// Opens the table source `field` of the context's spec.
    async fn open(
        dialect: Dialect,
        ctx: OpenContext,
        field: fn(&obsrv_crds::SourceSpec) -> Option<&SqlSourceSpec>,
    ) -> Result<SqlSource> {
        let spec = field(&ctx.config.spec.source)
            .ok_or_else(|| Error::Config("the spec names another source kind".into()))?;
        SqlSource::connect(
            dialect,
            spec,
            &ctx.secrets,
            &ctx.instance(),
            ctx.position.as_ref(),
        )
        .await
    }

    /// Connects, resolves every table against its catalog, and starts after `position`.
    pub async fn connect(
        dialect: Dialect,
        spec: &SqlSourceSpec,
        secrets: &Secrets,
        instance: &str,
        position: Option<&serde_json::Value>,
    ) -> Result<SqlSource> {
        let user = secrets.get(env::SOURCE_USERNAME).unwrap_or_default();
        let pass = secrets.get(env::SOURCE_PASSWORD).unwrap_or_default();
        let ca = secrets
            .get(env::SOURCE_TLS_CA)
            .map(|s| s.as_bytes().to_vec());
        let mode = spec.tls.as_ref().map(|t| t.mode).unwrap_or(TlsMode::Prefer);
        if let (Some(pem), Some(r)) = (
            secrets.get(env::SOURCE_TLS_CA),
            spec.tls.as_ref().and_then(|t| t.ca.as_ref()),
        ) {
            check_ca_pem(&format!("Secret {} key {}", r.secret_name, r.key), pem)?;
        }
        let port = spec.port.map_or(dialect.default_port(), |p| p as u16);
        let timeout = Duration::from_secs(15);
        let pool = match dialect {
            Dialect::Postgres => {
                let mut o = PgConnectOptions::new()
                    .host(&spec.host)
                    .port(port)
                    .username(user)
                    .password(pass)
                    .database(&spec.database)
                    .application_name("obsrv-connector")
                    .options([("TimeZone", "UTC")])
                    .ssl_mode(match mode {
                        TlsMode::Disable => PgSslMode::Disable,
                        TlsMode::Prefer => PgSslMode::Prefer,
                        TlsMode::Require => PgSslMode::Require,
                        TlsMode::VerifyFull => PgSslMode::VerifyFull,
                    });
                if let Some(ca) = ca {
                    o = o.ssl_root_cert_from_pem(ca);
                }
                probe(&o, "Postgres", &spec.host, port).await?;
                Pool::Pg(
                    PgPoolOptions::new()
                        .max_connections(2)
                        .acquire_timeout(timeout)
                        .connect_with(o)
                        .await
                        .map_err(from_sqlx)?,
                )
            }
            _ => {
                let mut o = MySqlConnectOptions::new()
                    .host(&spec.host)
                    .port(port)
                    .username(user)
                    .password(pass)
                    .database(&spec.database)
                    .timezone(Some("+00:00".to_string()))
                    .charset("utf8mb4")
                    .ssl_mode(match mode {
                        TlsMode::Disable => MySqlSslMode::Disabled,
                        TlsMode::Prefer => MySqlSslMode::Preferred,
                        TlsMode::Require => MySqlSslMode::Required,
                        TlsMode::VerifyFull => MySqlSslMode::VerifyIdentity,
                    });
                if let Some(ca) = ca {
                    o = o.ssl_ca_from_pem(ca);
                }
                probe(&o, "MySQL/MariaDB", &spec.host, port).await?;
                Pool::My(
                    MySqlPoolOptions::new()
                        .max_connections(2)
                        .acquire_timeout(timeout)
                        .connect_with(o)
                        .await
                        .map_err(from_sqlx)?,
                )
            }
        };
        let mut plans = Vec::new();
        for t in &spec.tables {
            plans.push(resolve_table(&pool, t, &spec.database).await?);
        }
        let position = SqlPosition::from_value(position)?;
        Ok(SqlSource {
            endpoint: format!("{}:{port}", spec.host),
            dialect,
            instance: instance.to_string(),
            pool,
            plans,
            position,
            batch_size: spec.batch_size.max(1) as usize,
            next_table: 0,
            stream: None,
        })
    }

    async fn fetch(&self, plan: &TablePlan, page: Page) -> Result<Vec<RawRow>> {
        let sql = plan.query(page, self.batch_size);
        let binds = plan.binds(page, self.position.tables.get(&plan.name));
        with_pool!(&self.pool, p => {
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for b in binds {
                q = q.bind(b);
            }
            let rows = q.fetch_all(p).await.map_err(from_sqlx)?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get(0).map_err(from_sqlx)?,
                        r.try_get(1).map_err(from_sqlx)?,
                        r.try_get(2).map_err(from_sqlx)?,
                    ))
                })
                .collect()
        })
    }

    /// Next page of one table, tie groups completed; empty when caught up.
    async fn read_table(&mut self, i: usize) -> Result<Vec<Record>> {
        let plan = self.plans[i].clone();
        let page = if self.position.tables.contains_key(&plan.name) {
            Page::After
        } else {
            Page::First
        };
        let rows = self.fetch(&plan, page).await?;
        let full = rows.len() >= self.batch_size;
        let (mut rows, tie) = split_page(rows, full, plan.tie_breaker.is_some());
        if let Some(cursor) = tie {
            let saved = self.position.tables.insert(
                plan.name.clone(),
                TablePosition {
                    cursor,
                    tie_breaker: None,
                },
            );
            let group = self.fetch(&plan, Page::TieGroup).await;
            match saved {
                Some(s) => self.position.tables.insert(plan.name.clone(), s),
                None => self.position.tables.remove(&plan.name),
            };
            rows.extend(group?);
        }
        self.advance(&plan.name, rows)
    }

    /// Moves the table's position to the last row and turns rows into records.
    fn advance(&mut self, table: &str, rows: Vec<RawRow>) -> Result<Vec<Record>> {
        let Some(last) = rows.last() else {
            return Ok(Vec::new());
        };
        let cursor = last
            .1
            .clone()
            .ok_or_else(|| Error::Schema(format!("{table}: cursor value is NULL")))?;
        self.position.tables.insert(
            table.to_string(),
            TablePosition {
                cursor,
                tie_breaker: last.2.clone(),
            },
        );
        Ok(rows
            .into_iter()
            .map(|(json, c, tb)| {
                let c = c.unwrap_or_default();
                let id = match &tb {
                    Some(tb) => event_id(&self.instance, &[table, &c, tb]),
                    // Without a tie-breaker the row itself disambiguates rows sharing a cursor value.
                    None => event_id(&self.instance, &[table, &c, &json]),
                };
                Record {
                    id,
                    payload: Payload::Json(json),
                }
            })
            .collect())
    }

    /// Starts streaming table `i` from its position.
    fn start_stream(&self, i: usize) -> RowStream {
        let plan = &self.plans[i];
        let pos = self.position.tables.get(&plan.name);
        let page = if pos.is_some() {
            Page::After
        } else {
            Page::First
        };
        let sql = match plan.dialect {
            Dialect::Postgres => plan.copy_query(page, STREAM_ROWS, pos),
            Dialect::MySql => plan.query(page, STREAM_ROWS),
        };
        let binds = plan.binds(page, pos);
        let (tx, rx) = mpsc::channel((self.batch_size.clamp(1, 2_000) / ROW_CHUNK).max(1));
        let pool = self.pool.clone();
        let mut chunk = ChunkBuilder::new(&self.instance, &plan.name, self.batch_size);
        let keys = plan.key_formats();
        let task = tokio::spawn(async move {
            match pool {
                Pool::Pg(p) => {
                    use sqlx::postgres::PgPoolCopyExt;
                    let stream = match p.copy_out_raw(&sql).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(from_sqlx(e))).await;
                            return;
                        }
                    };
                    let mut parser = CopyRows::new(keys);
                    pump(stream, &tx, &mut chunk, |next, chunk| match next {
                        Some(Ok(bytes)) => parser
                            .push_with(&bytes, |(json, c, tb)| chunk.add(json.to_string(), c, tb))
                            .map(|()| true),
                        Some(Err(e)) => Err(from_sqlx(e)),
                        None if parser.finished() => Ok(false),
                        None => Err(Error::SourceUnreachable(
                            "COPY output ended before its trailer".into(),
                        )),
                    })
                    .await;
                }
                Pool::My(p) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    pump(q.fetch(&p), &tx, &mut chunk, |next, chunk| match next {
                        Some(r) => r
                            .map_err(from_sqlx)
                            .and_then(|r| decode_my(&r))
                            .and_then(|(json, c, tb)| chunk.add(json, c.as_deref(), tb.as_deref()))
                            .map(|()| true),
                        None => Ok(false),
                    })
                    .await;
                }
            }
        });
        RowStream {
            table: i,
            rx,
            received: 0,
            task,
        }
    }

    /// Next batch of a table with a tie-breaker, from its streaming query; empty when caught up.
    /// Chunks end on batch boundaries, so whole chunks make exactly `batchSize` records.
    async fn read_streamed(&mut self, i: usize) -> Result<Vec<Record>> {
        let mut records: Vec<Record> = Vec::new();
        let mut last: Option<TablePosition> = None;
        while records.len() < self.batch_size {
            if self.stream.as_ref().map(|s| s.table) != Some(i) {
                self.stream = Some(self.start_stream(i));
            }
            let st = self.stream.as_mut().expect("a stream was just started");
            match st.rx.recv().await {
                Some(Ok(c)) => {
                    st.received += c.records.len();
                    if records.is_empty() {
                        records = c.records;
                        records.reserve(self.batch_size.min(10_000).saturating_sub(records.len()));
                    } else {
                        records.extend(c.records);
                    }
                    last = Some(c.last);
                }
                Some(Err(e)) => {
                    self.stream = None;
                    return Err(e);
                }
                None => {
                    // The query ended: at its row limit, go on with a fresh one; else caught up.
                    let more = st.received >= STREAM_ROWS;
                    self.stream = None;
                    if !more || !records.is_empty() {
                        break;
                    }
                }
            }
        }
        if let Some(last) = last {
            self.position
                .tables
                .insert(self.plans[i].name.clone(), last);
        }
        Ok(records)
    }
}

async fn resolve_table(pool: &Pool, t: &TableSpec, database: &str) -> Result<TablePlan> {
    match pool {
        Pool::Pg(p) => {
            let from: String = sqlx::query_scalar("SELECT $1::text::regclass::text")
                .bind(&t.name)
                .fetch_one(p)
                .await
                .map_err(from_sqlx)?;
            let rows = sqlx::query(
                "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 \
                 AND NOT a.attisdropped ORDER BY a.attnum",
            )
            .bind(&t.name)
            .fetch_all(p)
            .await
            .map_err(from_sqlx)?;
            let cols = rows
                .iter()
                .map(|r| {
                    Ok(Column {
                        name: r.try_get(0).map_err(from_sqlx)?,
                        base_type: r.try_get(1).map_err(from_sqlx)?,
                        full_type: r.try_get(2).map_err(from_sqlx)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            TablePlan::new(Dialect::Postgres, t, from, &cols)
        }
        Pool::My(p) => {
            let (schema, table) = match t.name.split_once('.') {
                Some((s, n)) => (s.to_string(), n.to_string()),
                None => (database.to_string(), t.name.clone()),
            };
            let rows = sqlx::query(
                "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            )
            .bind(&schema)
            .bind(&table)
            .fetch_all(p)
            .await
            .map_err(from_sqlx)?;
            let cols = rows
                .iter()
                .map(|r| {
                    Ok(Column {
                        name: r.try_get(0).map_err(from_sqlx)?,
                        base_type: r.try_get::<String, _>(1).map_err(from_sqlx)?.to_lowercase(),
                        full_type: r.try_get::<String, _>(2).map_err(from_sqlx)?.to_lowercase(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let from = format!(
                "{}.{}",
                quote_ident(Dialect::MySql, &schema),
                quote_ident(Dialect::MySql, &table)
            );
            TablePlan::new(Dialect::MySql, t, from, &cols)
        }
    }
}

impl SqlSource {
    /// Errors of a running read name the endpoint: a dropped connection or a pool that cannot open
    /// a new one says where, not just "pool timed out".
    fn located(&self, e: Error) -> Error {
        match e {
            Error::SourceUnreachable(m) if m.contains("pool timed out") => {
                Error::SourceUnreachable(format!(
                    "no connection to {} could be opened: is the database reachable there?",
                    self.endpoint
                ))
            }
            Error::SourceUnreachable(m) if !m.contains(&self.endpoint) => {
                Error::SourceUnreachable(format!("{}: {m}", self.endpoint))
            }
            e => e,
        }
    }

    async fn read_next(&mut self) -> Result<Option<Batch>> {
        let n = self.plans.len();
        for k in 0..n {
            let i = (self.next_table + k) % n;
            let records = if self.plans[i].tie_breaker.is_some() {
                self.read_streamed(i).await?
            } else {
                self.read_table(i).await?
            };
            if !records.is_empty() {
                self.next_table = (i + 1) % n;
                let position = serde_json::to_value(&self.position)
                    .map_err(|e| Error::State(e.to_string()))?;
                return Ok(Some(Batch {
                    records,
                    position,
                    watermark: self.position.watermark(),
                }));
            }
        }
        Ok(None)
    }
}

impl Source for SqlSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let res = self.read_next().await;
        res.map_err(|e| self.located(e))
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        measure_lag(
            self.dialect,
            self.pool.clone(),
            self.plans.clone(),
            self.position.clone(),
        )
        .await
    }

    fn describe(&self) -> String {
        let tables: Vec<&str> = self.plans.iter().map(|p| p.name.as_str()).collect();
        format!("{:?} tables {}", self.dialect, tables.join(", "))
    }

    fn lag_task(&self) -> Option<futures::future::BoxFuture<'static, Result<Option<Lag>>>> {
        Some(Box::pin(measure_lag(
            self.dialect,
            self.pool.clone(),
            self.plans.clone(),
            self.position.clone(),
        )))
    }
}

/// Rows after the position (capped count) and the age of the oldest of them, over every table.
async fn measure_lag(
    dialect: Dialect,
    pool: Pool,
    plans: Vec<TablePlan>,
    position: SqlPosition,
) -> Result<Option<Lag>> {
    let started = Instant::now();
    let mut total = 0i64;
    let mut seconds: Option<f64> = None;
    for plan in &plans {
        let pos = position.tables.get(&plan.name);
        let estimate = match &pool {
            Pool::Pg(p) => {
                let mut q = sqlx::query_scalar(AssertSqlSafe(plan.estimate_query(pos.is_some())));
                for b in plan.binds(Page::After, pos) {
                    q = q.bind(b);
                }
                let top: String = q.fetch_one(p).await.map_err(from_sqlx)?;
                plan_rows(&top)
            }
            Pool::My(_) => None,
        };
        let n: i64 = match estimate {
            Some(e) if e >= EXACT_LAG_BELOW => e,
            _ => {
                let sql = plan.count_query(pos.is_some());
                let binds = plan.binds(Page::After, pos);
                with_pool!(&pool, p => {
                    let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    q.fetch_one(p).await.map_err(from_sqlx)?
                })
            }
        };
        total += n;
        if n > 0
            && let Some(sql) = plan.age_query(pos.is_some())
        {
            let binds = plan.binds(Page::After, pos);
            let age: Option<f64> = with_pool!(&pool, p => {
                let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
                for b in binds {
                    q = q.bind(b);
                }
                q.fetch_one(p).await.map_err(from_sqlx)?
            });
            if let Some(a) = age {
                seconds = Some(seconds.map_or(a, |s: f64| s.max(a)));
            }
        }
    }
    tracing::debug!(
        ?dialect,
        elapsed_ms = started.elapsed().as_millis() as u64,
        lag = total,
        "lag measured"
    );
    Ok(Some(Lag {
        records: total,
        seconds: if total == 0 { Some(0.0) } else { seconds },
        bytes: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obsrv_crds::CursorSpec;

    fn col(name: &str, base: &str, full: &str) -> Column {
        Column {
            name: name.into(),
            base_type: base.into(),
            full_type: full.into(),
        }
    }

    fn table(tb: Option<&str>) -> TableSpec {
        TableSpec {
            name: "public.orders".into(),
            cursor: CursorSpec {
                column: "updated_at".into(),
                tie_breaker: tb.map(Into::into),
            },
            columns: vec![],
        }
    }

    /// `orders` keyed on (updated_at, id), with the columns of [`pg_cols`].
    fn pg_plan() -> TablePlan {
        TablePlan::new(
            Dialect::Postgres,
            &table(Some("id")),
            "orders".into(),
            &pg_cols(),
        )
        .unwrap()
    }

    fn pg_cols() -> Vec<Column> {
        vec![
            col("id", "int8", "bigint"),
            col("updated_at", "timestamptz", "timestamp with time zone"),
            col("blob", "bytea", "bytea"),
            col("local", "timestamp", "timestamp without time zone"),
        ]
    }

    #[test]
    fn postgres_keyset_query_never_uses_offset_and_compares_the_pair() {
        let plan = pg_plan();
        let q = plan.query(Page::After, 500);
        assert!(!q.to_uppercase().contains("OFFSET"));
        assert!(
            q.contains(r#"(s."updated_at", s."id") > ($1::timestamp with time zone, $2::bigint)"#),
            "{q}"
        );
        assert!(
            q.ends_with(r#"ORDER BY s."updated_at", s."id" LIMIT 500"#),
            "{q}"
        );
        assert!(
            q.contains(r#"translate(encode(s."blob", 'base64'), E'\n', '') AS "blob""#),
            "{q}"
        );
        assert!(
            q.contains(r#"(s."local" AT TIME ZONE 'UTC') AS "local""#),
            "{q}"
        );
        let pos = TablePosition {
            cursor: "2024-01-01".into(),
            tie_breaker: Some("7".into()),
        };
        assert_eq!(plan.binds(Page::After, Some(&pos)), vec!["2024-01-01", "7"]);
        let first = plan.query(Page::First, 500);
        assert!(
            !first.contains("$1") && first.contains("IS NOT NULL"),
            "{first}"
        );
    }

    #[test]
    fn postgres_copy_query_inlines_the_position_as_escaped_literals() {
        let plan = pg_plan();
        let pos = TablePosition {
            cursor: "2024-01-01 00:00:00+00".into(),
            tie_breaker: Some(r"it's \ 7".into()),
        };
        let q = plan.copy_query(Page::After, 500, Some(&pos));
        // Keys of types rendered from their binary form are selected as they are.
        assert_eq!(
            plan.key_formats(),
            [KeyFormat::Timestamptz, KeyFormat::Int8]
        );
        assert!(
            q.starts_with(r#"COPY (SELECT row_to_json(r)::text, s."updated_at", s."id" FROM"#),
            "{q}"
        );
        // The page query (sqlx, text protocol) keeps text keys.
        assert!(plan.query(Page::After, 500).starts_with(
            r#"SELECT row_to_json(r)::text, s."updated_at"::text, s."id"::text FROM"#
        ));
        assert!(q.ends_with(" LIMIT 500) TO STDOUT (FORMAT binary)"), "{q}");
        assert!(
            q.contains(
                r#"(s."updated_at", s."id") > (E'2024-01-01 00:00:00+00'::timestamp with time zone, E'it''s \\ 7'::bigint)"#
            ),
            "{q}"
        );
        assert!(
            !q.contains('$') && !q.to_uppercase().contains("OFFSET"),
            "{q}"
        );
        let first = plan.copy_query(Page::First, 500, None);
        assert!(!first.contains(") > ("), "{first}");
    }

    /// The bytes Postgres sends for `COPY ... (FORMAT binary)` of three text columns.
    fn copy_bytes(rows: &[[Option<&str>; 3]]) -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"xy");
        for r in rows {
            b.extend_from_slice(&3i16.to_be_bytes());
            for c in r {
                match c {
                    Some(t) => {
                        b.extend_from_slice(&(t.len() as i32).to_be_bytes());
                        b.extend_from_slice(t.as_bytes());
                    }
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn copy_rows_parse_whatever_the_chunking() {
        let rows = [
            [
                Some(r#"{"a":"tab\there \"q\" é"}"#),
                Some("2024-01-01"),
                Some("1"),
            ],
            [Some("{}"), Some("2024-01-02"), None],
            [Some(r#"{"b":null}"#), Some(""), Some("3")],
        ];
        let bytes = copy_bytes(&rows);
        let want: Vec<RawRow> = rows
            .iter()
            .map(|r| {
                (
                    r[0].unwrap().to_string(),
                    r[1].map(String::from),
                    r[2].map(String::from),
                )
            })
            .collect();
        for size in [1, 2, 3, 7, 19, 20, 64, bytes.len()] {
            let mut p = CopyRows::default();
            let mut out = Vec::new();
            for chunk in bytes.chunks(size) {
                p.push(chunk, &mut out).unwrap();
            }
            assert_eq!(out, want, "chunks of {size}");
            assert!(p.finished(), "chunks of {size}");
        }
        // Cut before the trailer: rows so far, not finished.
        let mut p = CopyRows::default();
        let mut out = Vec::new();
        p.push(&bytes[..bytes.len() - 2], &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(!p.finished());
    }

    #[test]
    fn copy_rows_refuse_foreign_output() {
        let mut out = Vec::new();
        let text = b"{\"a\":1}\t2024-01-01\t1\n{\"a\":2}\t2024-01-02\t2\n";
        assert!(CopyRows::default().push(text, &mut out).is_err());
        let mut two = copy_bytes(&[]);
        two.truncate(two.len() - 2);
        two.extend_from_slice(&2i16.to_be_bytes());
        assert!(CopyRows::default().push(&two, &mut out).is_err());
        let null_json = copy_bytes(&[[None, Some("1"), Some("1")]]);
        assert!(CopyRows::default().push(&null_json, &mut out).is_err());
    }

    #[test]
    fn mysql_keyset_query_is_an_index_friendly_range() {
        let cols = vec![
            col("id", "bigint", "bigint unsigned"),
            col("updated_at", "datetime", "datetime(6)"),
            col("b", "varbinary", "varbinary(10)"),
        ];
        let plan = TablePlan::new(
            Dialect::MySql,
            &table(Some("id")),
            "`shop`.`orders`".into(),
            &cols,
        )
        .unwrap();
        let q = plan.query(Page::After, 10);
        assert!(
            q.contains("s.`updated_at` >= CAST(? AS DATETIME(6)) AND (s.`updated_at` > CAST(? AS DATETIME(6)) OR s.`id` > CAST(? AS UNSIGNED))"),
            "{q}"
        );
        assert!(q.contains("JSON_OBJECT('id', s.`id`, 'updated_at', DATE_FORMAT(s.`updated_at`, '%Y-%m-%dT%H:%i:%s.%fZ'), 'b', REPLACE(TO_BASE64(s.`b`), CHAR(10), ''))"), "{q}");
        let pos = TablePosition {
            cursor: "c".into(),
            tie_breaker: Some("t".into()),
        };
        assert_eq!(plan.binds(Page::After, Some(&pos)), vec!["c", "c", "t"]);
    }

    #[test]
    fn tables_needing_no_rewrite_render_the_whole_row() {
        let plain = vec![
            col("id", "int8", "bigint"),
            col("updated_at", "timestamptz", "timestamp with time zone"),
        ];
        let plan = TablePlan::new(
            Dialect::Postgres,
            &table(Some("id")),
            "orders".into(),
            &plain,
        )
        .unwrap();
        assert!(plan.whole_row);
        let q = plan.query(Page::First, 5);
        assert!(q.starts_with("SELECT row_to_json(s)::text, s.\"updated_at\"::text, s.\"id\"::text FROM orders s WHERE"), "{q}");
        let mut some = table(Some("id"));
        some.columns = vec!["id".into()];
        assert!(
            !TablePlan::new(Dialect::Postgres, &some, "orders".into(), &plain)
                .unwrap()
                .whole_row
        );
        assert!(
            !TablePlan::new(
                Dialect::Postgres,
                &table(Some("id")),
                "orders".into(),
                &pg_cols()
            )
            .unwrap()
            .whole_row
        );
    }

    #[test]
    fn unknown_columns_are_schema_errors() {
        let e = TablePlan::new(
            Dialect::Postgres,
            &table(Some("nope")),
            "orders".into(),
            &pg_cols(),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "SchemaError");
        assert!(e.to_string().contains("nope"));
        let e = TablePlan::new(Dialect::Postgres, &table(None), "orders".into(), &[]).unwrap_err();
        assert_eq!(e.reason(), "SchemaError");
    }

    #[test]
    fn without_tie_breaker_a_full_page_holds_back_its_last_tie_group() {
        let r = |c: &str| (format!("{{\"c\":\"{c}\"}}"), Some(c.to_string()), None);
        let (keep, tie) = split_page(vec![r("1"), r("2"), r("2")], true, false);
        assert_eq!(keep, vec![r("1")]);
        assert_eq!(tie.as_deref(), Some("2"));
        // A short page is everything there is: nothing held back.
        let (keep, tie) = split_page(vec![r("1"), r("2")], false, false);
        assert_eq!((keep.len(), tie), (2, None));
        // With a tie-breaker the pair is unique: nothing held back.
        let (keep, tie) = split_page(vec![r("1"), r("2")], true, true);
        assert_eq!((keep.len(), tie), (2, None));
        let plan =
            TablePlan::new(Dialect::Postgres, &table(None), "orders".into(), &pg_cols()).unwrap();
        let q = plan.query(Page::TieGroup, 10);
        assert!(
            q.contains(r#"s."updated_at" = $1::timestamp with time zone"#) && !q.contains("LIMIT"),
            "{q}"
        );
    }

    #[test]
    fn positions_round_trip_through_state_json() {
        let mut p = SqlPosition::default();
        p.tables.insert(
            "public.orders".into(),
            TablePosition {
                cursor: "2024-01-01 00:00:00+00".into(),
                tie_breaker: Some("42".into()),
            },
        );
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tables": {"public.orders": {"cursor": "2024-01-01 00:00:00+00", "tieBreaker": "42"}}})
        );
        assert_eq!(SqlPosition::from_value(Some(&v)).unwrap(), p);
        assert_eq!(
            p.watermark().unwrap(),
            "public.orders: (2024-01-01 00:00:00+00, 42)"
        );
        assert!(SqlPosition::from_value(Some(&serde_json::json!({"offsets": 1}))).is_err());
    }

    #[test]
    fn streamed_chunks_end_on_batch_boundaries_and_carry_the_last_position() {
        let mut b = ChunkBuilder::new("ns/c", "public.t", 300);
        let mut chunks = Vec::new();
        for i in 0..700 {
            b.add(format!("{{\"i\":{i}}}"), Some(&i.to_string()), Some("x"))
                .unwrap();
            if b.full() {
                chunks.extend(b.take());
            }
        }
        chunks.extend(b.take());
        let sizes: Vec<usize> = chunks.iter().map(|c| c.records.len()).collect();
        assert_eq!(sizes, [256, 44, 256, 44, 100]);
        let last = chunks.last().unwrap();
        assert_eq!(
            last.last,
            TablePosition {
                cursor: "699".into(),
                tie_breaker: Some("x".into())
            }
        );
        // The same id the page path gives the row.
        assert_eq!(
            last.records.last().unwrap().id,
            event_id("ns/c", &["public.t", "699", "x"])
        );
        assert!(b.add("{}".into(), None, Some("x")).is_err(), "NULL cursor");
    }

    #[test]
    fn plan_rows_reads_the_top_node_estimate() {
        assert_eq!(
            plan_rows("Seq Scan on orders s  (cost=0.00..18334.00 rows=999994 width=4)"),
            Some(999_994)
        );
        assert_eq!(
            plan_rows("Index Only Scan using t_idx on t s  (cost=0.42..4.44 rows=1 width=4)"),
            Some(1)
        );
        assert_eq!(plan_rows("Result  (cost=0.00..0.01 width=4)"), None);
        assert_eq!(plan_rows(""), None);
    }

    #[test]
    fn estimate_query_explains_the_remaining_rows() {
        let p = pg_plan();
        let q = p.estimate_query(true);
        assert!(
            q.starts_with(r#"EXPLAIN SELECT 1 FROM orders s WHERE s."updated_at" IS NOT NULL"#),
            "{q}"
        );
        assert!(
            q.ends_with("($1::timestamp with time zone, $2::bigint)"),
            "{q}"
        );
        assert!(!q.contains("LIMIT"), "{q}");
    }

    #[test]
    fn age_query_only_for_time_cursors() {
        let plan = pg_plan();
        let q = plan.age_query(true).unwrap();
        assert!(q.starts_with(r#"SELECT EXTRACT(EPOCH FROM (now() - min(s."updated_at")::timestamptz))::float8 FROM orders s WHERE"#), "{q}");
        assert!(
            q.ends_with("($1::timestamp with time zone, $2::bigint)"),
            "{q}"
        );
        let mut by_id = table(None);
        by_id.cursor.column = "id".into();
        let plan = TablePlan::new(Dialect::Postgres, &by_id, "orders".into(), &pg_cols()).unwrap();
        assert_eq!(plan.age_query(true), None);
    }

    #[test]
    fn count_query_reuses_the_keyset_condition() {
        let plan = pg_plan();
        let q = plan.count_query(true);
        assert!(
            q.starts_with("SELECT count(*) FROM (SELECT 1 FROM orders s WHERE"),
            "{q}"
        );
        assert!(
            q.contains("> ($1::timestamp with time zone, $2::bigint) LIMIT 10000000) x"),
            "{q}"
        );
    }
}
