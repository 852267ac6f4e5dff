//! The change event every CDC kind emits: Debezium's envelope (`before`, `after`, `op`, `ts_ms`,
//! `source`) as JSON text, written directly (no intermediate `Value` per row). Pure.
//!
//! Field order: `source`, `op`, `ts_ms`, `before`, `after`. Consumers read JSON by name, and with
//! the position first, the preview of an oversize event in the failed topic (its first 4 KiB)
//! says where in the log the row was.

use std::fmt::Write as _;

/// Placeholder for a value the log does not carry: a Postgres TOASTed column an UPDATE left
/// unchanged (the WAL holds no copy of it). Debezium's own marker, so consumers that handle
/// Debezium's events handle ours. Never sent as null, which would read as "set to NULL".
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// What happened to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    /// A row read by the snapshot.
    Read,
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// A JSON object written field by field into a string.
#[derive(Clone, Debug, Default)]
pub struct Obj {
    out: String,
    fields: usize,
}

impl Obj {
    pub fn new() -> Obj {
        let mut out = String::with_capacity(256);
        out.push('{');
        Obj { out, fields: 0 }
    }

    fn key(&mut self, k: &str) {
        if self.fields > 0 {
            self.out.push(',');
        }
        self.fields += 1;
        push_str(&mut self.out, k);
        self.out.push(':');
    }

    /// `k` with `raw`, which must already be JSON (a number, an object, `null`, ...).
    pub fn raw(&mut self, k: &str, raw: &str) -> &mut Obj {
        self.key(k);
        self.out.push_str(raw);
        self
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Obj {
        self.key(k);
        push_str(&mut self.out, v);
        self
    }

    pub fn int(&mut self, k: &str, v: i64) -> &mut Obj {
        self.key(k);
        let _ = write!(self.out, "{v}");
        self
    }

    pub fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Obj {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, "null"),
        }
    }

    /// Starts writing the value of `k` by hand: push JSON to the returned string.
    pub fn value(&mut self, k: &str) -> &mut String {
        self.key(k);
        &mut self.out
    }

    pub fn is_empty(&self) -> bool {
        self.fields == 0
    }

    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// One change, rendered: `source` must be a JSON object, `before`/`after` JSON objects or absent
/// (`null`).
pub fn render(
    source: &str,
    op: Op,
    ts_ms: i64,
    before: Option<&str>,
    after: Option<&str>,
) -> String {
    let mut o = Obj::new();
    o.raw("source", source)
        .str("op", op.code())
        .int("ts_ms", ts_ms)
        .raw("before", before.unwrap_or("null"))
        .raw("after", after.unwrap_or("null"));
    o.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_what_json_requires() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn events_are_debezium_shaped_json_with_the_position_first() {
        let mut src = Obj::new();
        src.str("connector", "postgresql").str("lsn", "0/16B3748");
        let e = render(
            &src.finish(),
            Op::Update,
            1_700_000_000_000,
            Some(r#"{"id":1,"n":"a"}"#),
            Some(r#"{"id":1,"n":"b"}"#),
        );
        assert!(e.starts_with(r#"{"source":{"connector":"postgresql","lsn":"0/16B3748"}"#));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"source": {"connector": "postgresql", "lsn": "0/16B3748"},
                "op": "u", "ts_ms": 1_700_000_000_000_i64,
                "before": {"id": 1, "n": "a"}, "after": {"id": 1, "n": "b"}})
        );
        let t = render("{}", Op::Truncate, 1, None, None);
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["op"], "t");
        assert!(v["before"].is_null() && v["after"].is_null());
    }
}
