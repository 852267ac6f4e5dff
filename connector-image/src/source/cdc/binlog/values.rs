//! MySQL/MariaDB values as JSON, from the binary log's row images and from the snapshot's
//! binary-protocol rows, by one rule (docs/sources/cdc.md). The column's kind comes from the
//! catalog (`information_schema`): the log's own type codes do not say text from binary, nor a
//! MariaDB JSON column from a `longtext`. Pure.

use base64::Engine as _;
use mysql_async::Value;

use crate::source::cdc::{event::push_str, postgres::values::is_json_number};

/// How a column's values are rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Int { unsigned: bool, bits: u32 },
    Float,
    Decimal,
    Text,
    Binary,
    Json,
    DateTime,
    Date,
    Time,
    Year,
    Bit,
    Enum(Vec<String>),
    Set(Vec<String>),
    Other,
}

impl Kind {
    /// From `information_schema.COLUMNS` (`DATA_TYPE`, `COLUMN_TYPE`), and whether a MariaDB
    /// `json_valid` check makes a text column JSON.
    pub fn of(data_type: &str, column_type: &str, json_check: bool) -> Kind {
        let unsigned = column_type.contains("unsigned");
        match data_type {
            "tinyint" => Kind::Int { unsigned, bits: 8 },
            "smallint" => Kind::Int { unsigned, bits: 16 },
            "mediumint" => Kind::Int { unsigned, bits: 24 },
            "int" | "integer" => Kind::Int { unsigned, bits: 32 },
            "bigint" => Kind::Int { unsigned, bits: 64 },
            "float" | "double" | "real" => Kind::Float,
            "decimal" | "numeric" => Kind::Decimal,
            "json" => Kind::Json,
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" if json_check => {
                Kind::Json
            }
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => Kind::Text,
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob"
            | "geometry" | "point" | "linestring" | "polygon" => Kind::Binary,
            "datetime" | "timestamp" => Kind::DateTime,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "year" => Kind::Year,
            "bit" => Kind::Bit,
            "enum" => Kind::Enum(labels(column_type)),
            "set" => Kind::Set(labels(column_type)),
            _ => Kind::Other,
        }
    }
}

/// The labels of `enum('a','b')` / `set('a','b')` (quotes doubled inside a label).
pub fn labels(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type
        .find('(')
        .and_then(|i| column_type.rfind(')').map(|j| &column_type[i + 1..j]))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('\'', false) => quoted = true,
            ('\'', true) if chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            ('\'', true) => {
                quoted = false;
                out.push(std::mem::take(&mut cur));
            }
            (c, true) => cur.push(c),
            _ => {}
        }
    }
    out
}

/// Where a value was read: the binary log's row image, or a snapshot row (binary protocol). They
/// differ for `set` (a bitmask in the log, labels in a row) and `timestamp` (epoch seconds in
/// the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    Log,
    Row,
}

/// Appends the JSON of `v`, a value of a column of kind `k`.
pub fn push_value(out: &mut String, k: &Kind, v: &Value, from: From) {
    use std::fmt::Write;
    match v {
        Value::NULL => out.push_str("null"),
        Value::Int(i) => match k {
            Kind::Int {
                unsigned: true,
                bits,
            } if *i < 0 => {
                let mask = if *bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                let _ = write!(out, "{}", (*i as u64) & mask);
            }
            Kind::Enum(labels) => match usize::try_from(*i)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|n| labels.get(n))
            {
                Some(l) => push_str(out, l),
                None => push_str(out, ""),
            },
            Kind::DateTime => push_epoch(out, &i.to_string()),
            _ => {
                let _ = write!(out, "{i}");
            }
        },
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Float(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        Value::Double(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        Value::Float(f) => push_str(out, &f.to_string()),
        Value::Double(f) => push_str(out, &f.to_string()),
        Value::Date(y, m, d, h, mi, s, us) => {
            if *k == Kind::Date {
                let _ = write!(out, "\"{y:04}-{m:02}-{d:02}\"");
            } else {
                let _ = write!(
                    out,
                    "\"{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z\""
                );
            }
        }
        Value::Time(neg, d, h, mi, s, us) => {
            let hours = u32::from(*h) + d * 24;
            let sign = if *neg { "-" } else { "" };
            if *us == 0 {
                let _ = write!(out, "\"{sign}{hours:02}:{mi:02}:{s:02}\"");
            } else {
                let _ = write!(out, "\"{sign}{hours:02}:{mi:02}:{s:02}.{us:06}\"");
            }
        }
        Value::Bytes(b) => push_bytes(out, k, b, from),
    }
}

fn push_bytes(out: &mut String, k: &Kind, b: &[u8], from: From) {
    use std::fmt::Write;
    let text = || String::from_utf8_lossy(b);
    match k {
        Kind::Binary => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(b, out);
            out.push('"');
        }
        Kind::Int { .. } | Kind::Float | Kind::Decimal | Kind::Year => {
            let t = text();
            if is_json_number(&t) {
                out.push_str(&t);
            } else {
                push_str(out, &t);
            }
        }
        Kind::Bit => {
            // Big-endian bytes, up to 64 bits.
            let n = b.iter().fold(0u64, |acc, x| acc << 8 | u64::from(*x));
            let _ = write!(out, "{n}");
        }
        Kind::Json => match serde_json::from_slice::<&serde_json::value::RawValue>(b) {
            Ok(raw) => out.push_str(raw.get()),
            Err(_) => push_str(out, &text()),
        },
        Kind::Set(labels) if from == From::Log => {
            // A little-endian bitmask of the labels.
            let mut chosen = Vec::new();
            for (i, l) in labels.iter().enumerate() {
                if b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0) {
                    chosen.push(l.as_str());
                }
            }
            push_str(out, &chosen.join(","));
        }
        Kind::DateTime if from == From::Log => push_epoch(out, &text()),
        _ => push_str(out, &text()),
    }
}

/// `1704164645.123456` (the log's TIMESTAMP) as ISO-8601 UTC.
fn push_epoch(out: &mut String, text: &str) {
    let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
    let us: u32 = format!("{frac:0<6}")[..6].parse().unwrap_or(0);
    match secs
        .parse::<i64>()
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, us * 1000))
    {
        Some(t) => push_str(out, &t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        None => push_str(out, text),
    }
}

/// A key value as text, for keyset pages and positions (MySQL casts it back on comparison).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::NULL => String::new(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(f) => f.to_string(),
        Value::Date(y, m, d, h, mi, s, us) => {
            format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }
        Value::Time(neg, d, h, mi, s, us) => format!(
            "{}{:02}:{mi:02}:{s:02}.{us:06}",
            if *neg { "-" } else { "" },
            u32::from(*h) + d * 24
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(k: &Kind, val: Value, from: From) -> serde_json::Value {
        let mut s = String::new();
        push_value(&mut s, k, &val, from);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn kinds_from_the_catalog() {
        assert_eq!(
            Kind::of("bigint", "bigint(20) unsigned", false),
            Kind::Int {
                unsigned: true,
                bits: 64
            }
        );
        assert_eq!(Kind::of("longtext", "longtext", true), Kind::Json);
        assert_eq!(Kind::of("longtext", "longtext", false), Kind::Text);
        assert_eq!(Kind::of("varbinary", "varbinary(16)", false), Kind::Binary);
        assert_eq!(
            Kind::of("enum", "enum('new','it''s')", false),
            Kind::Enum(vec!["new".into(), "it's".into()])
        );
    }

    #[test]
    fn the_documented_type_rule_from_log_and_row_alike() {
        let u8k = Kind::Int {
            unsigned: true,
            bits: 8,
        };
        assert_eq!(v(&u8k, Value::Int(-1), From::Log), json!(255));
        let u64k = Kind::Int {
            unsigned: true,
            bits: 64,
        };
        assert_eq!(v(&u64k, Value::Int(-1), From::Log), json!(u64::MAX));
        assert_eq!(
            v(&Kind::Decimal, Value::Bytes(b"12.50".to_vec()), From::Log),
            json!(12.5)
        );
        assert_eq!(
            v(&Kind::Binary, Value::Bytes(vec![0, 255]), From::Row),
            json!("AP8=")
        );
        assert_eq!(
            v(
                &Kind::Json,
                Value::Bytes(br#"{"a":[1]}"#.to_vec()),
                From::Log
            ),
            json!({"a": [1]})
        );
        let at = Value::Date(2024, 1, 2, 3, 4, 5, 123_456);
        assert_eq!(
            v(&Kind::DateTime, at, From::Row),
            json!("2024-01-02T03:04:05.123456Z")
        );
        // The log's TIMESTAMP: epoch seconds; the same instant as a row would read in UTC.
        assert_eq!(
            v(
                &Kind::DateTime,
                Value::Bytes(b"1704164645.5".to_vec()),
                From::Log
            ),
            json!("2024-01-02T03:04:05.500000Z")
        );
        assert_eq!(
            v(&Kind::Date, Value::Date(2024, 2, 29, 0, 0, 0, 0), From::Row),
            json!("2024-02-29")
        );
        assert_eq!(
            v(&Kind::Time, Value::Time(true, 1, 2, 3, 4, 0), From::Row),
            json!("-26:03:04")
        );
        let e = Kind::Enum(vec!["new".into(), "paid".into()]);
        assert_eq!(v(&e, Value::Int(2), From::Log), json!("paid"));
        assert_eq!(
            v(&e, Value::Bytes(b"paid".to_vec()), From::Row),
            json!("paid")
        );
        let s = Kind::Set(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(v(&s, Value::Bytes(vec![0b101]), From::Log), json!("a,c"));
        assert_eq!(
            v(&s, Value::Bytes(b"a,c".to_vec()), From::Row),
            json!("a,c")
        );
        assert_eq!(
            v(&Kind::Bit, Value::Bytes(vec![1, 2]), From::Log),
            json!(258)
        );
        assert_eq!(
            v(&Kind::Year, Value::Bytes(b"2024".to_vec()), From::Log),
            json!(2024)
        );
        assert_eq!(v(&Kind::Text, Value::NULL, From::Log), json!(null));
        assert_eq!(value_text(&Value::Int(-3)), "-3");
    }
}
