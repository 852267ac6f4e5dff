//! Postgres values as JSON, from their text form (what `pgoutput` sends, and what a simple query
//! returns for the snapshot, so a row reads the same either way). Pure.
//!
//! The rule (docs/sources/cdc.md): booleans as JSON booleans; integers, floats and `numeric` as
//! JSON numbers with exactly the digits Postgres prints (`NaN` and infinities as strings);
//! `json`/`jsonb` embedded as JSON; `bytea` as base64; `timestamp` and `timestamptz` as ISO-8601
//! UTC (`2024-01-02T03:04:05.123456Z`; a `timestamp` without zone is taken as UTC; infinities
//! and BC dates as Postgres prints them); everything else (text, dates, times, uuid, arrays,
//! ranges, enums, ...) as the string Postgres prints.

use base64::Engine as _;

use crate::source::cdc::event::push_str;

pub const BOOL: u32 = 16;
pub const BYTEA: u32 = 17;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const OID: u32 = 26;
pub const JSON: u32 = 114;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const NUMERIC: u32 = 1700;
pub const JSONB: u32 = 3802;

/// Appends the JSON of a value of type `oid` printed as `text`.
pub fn push_value(out: &mut String, oid: u32, text: &str) {
    match oid {
        BOOL => out.push_str(match text {
            "t" | "true" => "true",
            _ => "false",
        }),
        INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | NUMERIC if is_json_number(text) => {
            out.push_str(text)
        }
        JSON | JSONB => out.push_str(text),
        BYTEA => match decode_hex_bytea(text) {
            Some(bytes) => {
                out.push('"');
                base64::engine::general_purpose::STANDARD.encode_string(&bytes, out);
                out.push('"');
            }
            None => push_str(out, text),
        },
        TIMESTAMP | TIMESTAMPTZ => match iso_utc(text, oid == TIMESTAMPTZ) {
            Some(iso) => push_str(out, &iso),
            None => push_str(out, text),
        },
        _ => push_str(out, text),
    }
}

/// Whether `s` is a number by JSON's grammar (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`).
pub fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// `\x00ff` (Postgres's hex output of bytea) as bytes.
fn decode_hex_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// `2024-01-02 03:04:05.123+00` -> `2024-01-02T03:04:05.123Z` (other offsets converted to UTC);
/// `None` for what has no ISO form here (infinities, BC dates).
fn iso_utc(text: &str, with_zone: bool) -> Option<String> {
    if text.len() < 19 || !text.as_bytes()[0].is_ascii_digit() || text.ends_with(" BC") {
        return None;
    }
    if !with_zone {
        return Some(format!("{}T{}Z", &text[..10], &text[11..]));
    }
    // Sessions run in UTC, so this is the common case: no date arithmetic needed.
    if let Some(local) = text.strip_suffix("+00") {
        return Some(format!("{}T{}Z", &local[..10], &local[11..]));
    }
    let parsed = chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z").ok()?;
    Some(
        parsed
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.fZ")
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(oid: u32, text: &str) -> serde_json::Value {
        let mut s = String::new();
        push_value(&mut s, oid, text);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_documented_type_rule() {
        use serde_json::json;
        assert_eq!(v(BOOL, "t"), json!(true));
        assert_eq!(v(BOOL, "false"), json!(false));
        assert_eq!(
            v(INT8, "-9223372036854775808"),
            json!(-9223372036854775808_i64)
        );
        // numeric keeps every digit Postgres printed.
        let mut s = String::new();
        push_value(&mut s, NUMERIC, "12345678901234567890.0123456789");
        assert_eq!(s, "12345678901234567890.0123456789");
        assert_eq!(v(NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(v(FLOAT8, "-Infinity"), json!("-Infinity"));
        assert_eq!(v(FLOAT8, "1e+20"), json!(1e20));
        assert_eq!(v(JSONB, r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(v(BYTEA, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(
            v(TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            v(TIMESTAMPTZ, "2024-01-02 05:34:05+05:30"),
            json!("2024-01-02T00:04:05Z")
        );
        assert_eq!(
            v(TIMESTAMP, "2024-05-06 07:08:09"),
            json!("2024-05-06T07:08:09Z")
        );
        assert_eq!(v(TIMESTAMP, "infinity"), json!("infinity"));
        assert_eq!(
            v(TIMESTAMP, "0044-03-15 00:00:00 BC"),
            json!("0044-03-15 00:00:00 BC")
        );
        assert_eq!(v(1082, "2024-02-29"), json!("2024-02-29"));
        assert_eq!(v(25, "multi\nline \"q\""), json!("multi\nline \"q\""));
        assert_eq!(v(1007, "{1,2,3}"), json!("{1,2,3}"));
    }

    #[test]
    fn json_numbers_by_the_grammar() {
        for ok in [
            "0",
            "-1",
            "1.5",
            "1e5",
            "1E-5",
            "-0.0e+1",
            "123456789012345678901234567890",
        ] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "+1", "NaN", "Infinity", "1e", "1x", "0x10",
        ] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}
