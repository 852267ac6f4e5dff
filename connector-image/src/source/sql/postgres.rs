//! Postgres: connection options (TLS modes, credentials) shared by every Postgres kind, the
//! catalog lookup of a table, and the binary `COPY` stream the keyset reads come in.

use std::time::Duration;

use obsrv_crds::{TableSpec, TlsMode};
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};

use super::{
    Column, Dialect, Endpoint, Login,
    plan::{RawRow, TablePlan},
};
use crate::error::{Error, Result, from_sqlx};

/// sqlx's options for `endpoint` as `login`: sessions in UTC (timestamps render without an
/// offset to guess), the TLS mode and CA of the spec.
pub fn connect_options(endpoint: &Endpoint<'_>, login: &Login) -> PgConnectOptions {
    let mut o = PgConnectOptions::new()
        .host(endpoint.host)
        .port(endpoint.port_or(5432))
        .username(&login.user)
        .password(&login.password)
        .database(endpoint.database)
        .application_name("obsrv-connector")
        .options([("TimeZone", "UTC")])
        .ssl_mode(match endpoint.tls_mode() {
            TlsMode::Disable => PgSslMode::Disable,
            TlsMode::Prefer => PgSslMode::Prefer,
            TlsMode::Require => PgSslMode::Require,
            TlsMode::VerifyFull => PgSslMode::VerifyFull,
        });
    if let Some(ca) = &login.ca {
        o = o.ssl_root_cert_from_pem(ca.clone());
    }
    o
}

/// A small pool on `endpoint` (`max` connections).
pub async fn pool(endpoint: &Endpoint<'_>, login: &Login, max: u32) -> Result<PgPool> {
    let o = connect_options(endpoint, login);
    let port = endpoint.port_or(5432);
    super::probe(&o, "Postgres", endpoint.host, port).await?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(o)
        .await
        .map_err(from_sqlx)
}

/// The columns of a table (`schema.table` or a name on the search path), in order.
pub async fn columns(p: &PgPool, table: &str) -> Result<Vec<Column>> {
    let rows = sqlx::query(
        "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 \
         AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(p)
    .await
    .map_err(from_sqlx)?;
    rows.iter()
        .map(|r| {
            Ok(Column {
                name: r.try_get(0).map_err(from_sqlx)?,
                base_type: r.try_get(1).map_err(from_sqlx)?,
                full_type: r.try_get(2).map_err(from_sqlx)?,
            })
        })
        .collect()
}

/// Resolves a configured table against the catalog.
pub async fn resolve_table(p: &PgPool, t: &TableSpec) -> Result<TablePlan> {
    let from: String = sqlx::query_scalar("SELECT $1::text::regclass::text")
        .bind(&t.name)
        .fetch_one(p)
        .await
        .map_err(from_sqlx)?;
    TablePlan::new(Dialect::Postgres, t, from, &columns(p, &t.name).await?)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
