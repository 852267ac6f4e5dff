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
    pg_json::{
        ValueFormat, fixed, push_date, push_int, push_json_string, push_timestamp, push_uuid,
        push_value,
    },
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
    out.clear();
    match f {
        KeyFormat::Text => out.push_str(std::str::from_utf8(b).map_err(|_| "not UTF-8")?),
        KeyFormat::Int2 => push_int(out, i16::from_be_bytes(fixed(f, b)?)),
        KeyFormat::Int4 => push_int(out, i32::from_be_bytes(fixed(f, b)?)),
        KeyFormat::Int8 => push_int(out, i64::from_be_bytes(fixed(f, b)?)),
        KeyFormat::Uuid => push_uuid(out, &fixed(f, b)?),
        KeyFormat::Date => push_date(out, i32::from_be_bytes(fixed(f, b)?)),
        KeyFormat::Timestamp => push_timestamp(out, i64::from_be_bytes(fixed(f, b)?), ' ', ""),
        KeyFormat::Timestamptz => push_timestamp(out, i64::from_be_bytes(fixed(f, b)?), ' ', "+00"),
    }
    Ok(())
}

/// `COPY ... (FORMAT binary)` starts with this signature, then flags and a header extension.
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Incremental parser of `COPY (...) TO STDOUT (FORMAT binary)` output of a row's columns, then
/// its cursor and tie-breaker: the bytes arrive in arbitrary chunks, complete rows come out with
/// their JSON rendered as `row_to_json` renders it (see [`super::pg_json`]).
#[derive(Debug, Default)]
pub struct CopyRows {
    buf: Vec<u8>,
    header: bool,
    finished: bool,
    /// Per column of the row: what comes before its value in the JSON (`"name":`, then
    /// `,"name":`), and its format.
    columns: Vec<(String, ValueFormat)>,
    /// Cursor and tie-breaker formats.
    keys: [KeyFormat; 2],
    /// The row's JSON and its keys' text, reused row after row.
    json: String,
    rendered: [String; 2],
}

/// One row of the COPY stream, borrowed from the parser: row JSON, cursor, tie-breaker.
pub type CopyRow<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

impl CopyRows {
    /// A parser for a stream of `columns` (name and format, in order) followed by the cursor and
    /// tie-breaker in `keys` formats.
    pub fn new(columns: &[(String, ValueFormat)], keys: [KeyFormat; 2]) -> CopyRows {
        let columns = columns
            .iter()
            .enumerate()
            .map(|(i, (name, f))| {
                let mut before = String::from(if i == 0 { "" } else { "," });
                push_json_string(name, &mut before);
                before.push(':');
                (before, *f)
            })
            .collect();
        CopyRows {
            columns,
            keys,
            ..CopyRows::default()
        }
    }

    /// A parser for `plan`'s [`TablePlan::copy_query`].
    pub fn of_plan(plan: &TablePlan) -> CopyRows {
        CopyRows::new(&plan.json_columns(), plan.key_formats())
    }

    /// Ok when the stream's trailer was seen: a stream that ended before it was cut short.
    pub fn end(&self) -> Result<()> {
        if self.finished {
            Ok(())
        } else {
            Err(Error::SourceUnreachable(
                "COPY output ended before its trailer".into(),
            ))
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
        let expected = self.columns.len() + 2;
        'rows: while !self.finished && data.len() >= at + 2 {
            let n = i16::from_be_bytes([data[at], data[at + 1]]);
            if n == -1 {
                self.finished = true;
                at += 2;
                break;
            }
            if n as usize != expected {
                return Err(bad(&format!("expected {expected} columns, got {n}")));
            }
            let mut p = at + 2;
            // The next field's bytes (None for NULL); a row cut short waits for the next chunk.
            let field = |p: &mut usize| -> Option<Option<&[u8]>> {
                let len = i32::from_be_bytes(data.get(*p..*p + 4)?.try_into().ok()?);
                *p += 4;
                if len < 0 {
                    return Some(None);
                }
                let bytes = data.get(*p..*p + len as usize)?;
                *p += len as usize;
                Some(Some(bytes))
            };
            self.json.clear();
            self.json.push('{');
            for (before, f) in &self.columns {
                let Some(value) = field(&mut p) else {
                    break 'rows;
                };
                self.json.push_str(before);
                match value {
                    None => self.json.push_str("null"),
                    Some(b) => push_value(*f, b, &mut self.json).map_err(|m| {
                        let name = before.trim_start_matches(',').trim_end_matches(':');
                        bad(&format!("column {name}: {m}"))
                    })?,
                }
            }
            self.json.push('}');
            let (Some(cursor), Some(tb)) = (field(&mut p), field(&mut p)) else {
                break 'rows;
            };
            let [rc, rt] = &mut self.rendered;
            let key = |bytes: Option<&[u8]>, f: KeyFormat, out: &mut String| {
                bytes
                    .map(|b| render_key(f, b, out).map_err(|m| bad(&format!("key column: {m}"))))
                    .transpose()
            };
            let has_c = key(cursor, self.keys[0], rc)?.is_some();
            let has_t = key(tb, self.keys[1], rt)?.is_some();
            on_row((
                &self.json,
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

    /// The bytes Postgres sends for `COPY ... (FORMAT binary)` of text columns.
    fn copy_bytes(rows: &[Vec<Option<&str>>]) -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"xy");
        for r in rows {
            b.extend_from_slice(&(r.len() as i16).to_be_bytes());
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

    /// Columns `a` (text) and `j` (json), keys as text.
    fn parser() -> CopyRows {
        CopyRows::new(
            &[
                ("a".into(), ValueFormat::Text),
                ("j\"".into(), ValueFormat::Json),
            ],
            [KeyFormat::Text; 2],
        )
    }

    #[test]
    fn copy_rows_render_their_json_whatever_the_chunking() {
        let rows = [
            vec![
                Some("tab\there \"q\" é"),
                Some(r#"{"n": [1, 2]}"#),
                Some("2024-01-01"),
                Some("1"),
            ],
            vec![None, None, Some("2024-01-02"), None],
            vec![Some(""), Some("3"), Some(""), Some("3")],
        ];
        let bytes = copy_bytes(&rows);
        let row = |json: &str, c: Option<&str>, tb: Option<&str>| {
            (json.to_string(), c.map(String::from), tb.map(String::from))
        };
        let want: Vec<RawRow> = vec![
            row(
                r#"{"a":"tab\there \"q\" é","j\"":{"n": [1, 2]}}"#,
                Some("2024-01-01"),
                Some("1"),
            ),
            row(r#"{"a":null,"j\"":null}"#, Some("2024-01-02"), None),
            row(r#"{"a":"","j\"":3}"#, Some(""), Some("3")),
        ];
        for size in [1, 2, 3, 7, 19, 20, 64, bytes.len()] {
            let mut p = parser();
            let mut out = Vec::new();
            for chunk in bytes.chunks(size) {
                p.push(chunk, &mut out).unwrap();
            }
            assert_eq!(out, want, "chunks of {size}");
            assert!(p.finished(), "chunks of {size}");
        }
        // Cut before the trailer: rows so far, not finished.
        let mut p = parser();
        let mut out = Vec::new();
        p.push(&bytes[..bytes.len() - 2], &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(!p.finished());
        // No columns: an empty object.
        let mut out = Vec::new();
        CopyRows::new(&[], [KeyFormat::Text; 2])
            .push(&copy_bytes(&[vec![Some("c"), None]]), &mut out)
            .unwrap();
        assert_eq!(out, vec![row("{}", Some("c"), None)]);
    }

    #[test]
    fn copy_rows_refuse_foreign_output() {
        let mut out = Vec::new();
        let text = b"{\"a\":1}\t2024-01-01\t1\n{\"a\":2}\t2024-01-02\t2\n";
        assert!(parser().push(text, &mut out).is_err());
        let three = copy_bytes(&[vec![Some("x"), Some("1"), Some("1")]]);
        let e = parser().push(&three, &mut out).unwrap_err();
        assert!(e.to_string().contains("expected 4 columns, got 3"), "{e}");
        let mut not_utf8 = copy_bytes(&[vec![Some("\u{fffd}"), None, None, None]]);
        let at = not_utf8
            .windows(3)
            .position(|w| w == "\u{fffd}".as_bytes())
            .unwrap();
        not_utf8[at] = 0xff;
        let e = parser().push(&not_utf8, &mut out).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
