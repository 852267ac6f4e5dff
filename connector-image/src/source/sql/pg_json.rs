//! A Postgres row's JSON rendered in the connector from the binary form `COPY (FORMAT binary)`
//! sends, byte for byte as `row_to_json` renders it (sessions run in UTC). Rendering JSON is most
//! of what the database spends on a keyset read: `COPY` of a 1M-row table's columns in binary
//! costs it under half of the same rows through `row_to_json`, and on a machine whose cores the
//! database, the broker and the connector share, that is the throughput. Types whose JSON is not
//! rendered here arrive already rendered by Postgres (`to_json(column)::text`), so every type
//! keeps exactly the JSON it always had.

/// How one column's value travels in the COPY stream and becomes JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueFormat {
    Int2,
    Int4,
    Int8,
    Bool,
    /// `text`, `varchar`, `bpchar`: the string, JSON-escaped as Postgres escapes it.
    Text,
    /// `json`: its text, as stored.
    Json,
    /// `jsonb`: a version byte, then Postgres's text of the value.
    Jsonb,
    Numeric,
    /// `timestamptz`, and `timestamp` (which the row's JSON gives in UTC, `AT TIME ZONE 'UTC'`).
    Timestamp,
    Date,
    Uuid,
    /// Any other type: Postgres sends the value's JSON (`to_json(...)::text`), appended as it is.
    Rendered,
}

impl ValueFormat {
    /// By Postgres base type name (`pg_type.typname`); domains, enums, arrays and every type not
    /// listed are [`ValueFormat::Rendered`].
    pub fn of_postgres(typname: &str) -> ValueFormat {
        match typname {
            "int2" => ValueFormat::Int2,
            "int4" => ValueFormat::Int4,
            "int8" => ValueFormat::Int8,
            "bool" => ValueFormat::Bool,
            "text" | "varchar" | "bpchar" => ValueFormat::Text,
            "json" => ValueFormat::Json,
            "jsonb" => ValueFormat::Jsonb,
            "numeric" => ValueFormat::Numeric,
            "timestamptz" | "timestamp" => ValueFormat::Timestamp,
            "date" => ValueFormat::Date,
            "uuid" => ValueFormat::Uuid,
            _ => ValueFormat::Rendered,
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string, escaped as Postgres's `escape_json` does (control characters
/// other than the five with short forms as `\u00xx`, lower-case hex; nothing else escaped).
pub fn push_json_string(s: &str, out: &mut String) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if short.is_empty() {
            // Control characters below 0x20 not named above: \u00xx.
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `b` as text; an error names the format.
fn utf8(f: ValueFormat, b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|_| format!("{f:?} value not UTF-8"))
}

/// `b` as a value of exactly `N` bytes; an error names `what`.
pub(super) fn fixed<const N: usize>(
    what: impl std::fmt::Debug,
    b: &[u8],
) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| format!("{what:?} value of {} bytes", b.len()))
}

/// Appends the JSON of one non-NULL value of format `f` from its binary form `b`. Pure.
pub fn push_value(f: ValueFormat, b: &[u8], out: &mut String) -> Result<(), String> {
    match f {
        ValueFormat::Int2 => push_int(out, i16::from_be_bytes(fixed(f, b)?)),
        ValueFormat::Int4 => push_int(out, i32::from_be_bytes(fixed(f, b)?)),
        ValueFormat::Int8 => push_int(out, i64::from_be_bytes(fixed(f, b)?)),
        ValueFormat::Bool => {
            let [v] = fixed(f, b)?;
            out.push_str(if v != 0 { "true" } else { "false" });
        }
        ValueFormat::Text => push_json_string(utf8(f, b)?, out),
        ValueFormat::Json | ValueFormat::Rendered => out.push_str(utf8(f, b)?),
        ValueFormat::Jsonb => match b.split_first() {
            Some((1, text)) => out.push_str(utf8(f, text)?),
            _ => return Err("jsonb value of an unknown version".into()),
        },
        ValueFormat::Numeric => push_numeric(b, out)?,
        ValueFormat::Timestamp => {
            out.push('"');
            push_timestamp(out, i64::from_be_bytes(fixed(f, b)?), 'T', "+00:00");
            out.push('"');
        }
        ValueFormat::Date => {
            out.push('"');
            push_date(out, i32::from_be_bytes(fixed(f, b)?));
            out.push('"');
        }
        ValueFormat::Uuid => {
            out.push('"');
            push_uuid(out, &fixed(f, b)?);
            out.push('"');
        }
    }
    Ok(())
}

/// Decimal digits of `n` (without `fmt`'s machinery: a fifth of the rendering's time).
pub(super) fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `n` (below 10^width) zero-padded to `width` digits.
fn push_padded(out: &mut String, mut n: u32, width: usize) {
    let mut digits = [b'0'; 6];
    for d in digits[..width].iter_mut().rev() {
        *d += (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&digits[..width]).expect("ASCII digits"));
}

/// A uuid as Postgres prints it: lower-case hex, dashed 8-4-4-4-12.
pub(super) fn push_uuid(out: &mut String, b: &[u8; 16]) {
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
}

/// A date (days since 2000-01-01) as Postgres prints it in ISO and XSD styles: `YYYY-MM-DD`,
/// ` BC` after years before 1, `infinity` and `-infinity`.
pub(super) fn push_date(out: &mut String, days: i32) {
    match days {
        i32::MAX => out.push_str("infinity"),
        i32::MIN => out.push_str("-infinity"),
        days => {
            if push_ymd(out, i64::from(days)) {
                out.push_str(" BC");
            }
        }
    }
}

/// A timestamp (microseconds since 2000-01-01 UTC) as Postgres prints it in UTC: date, `sep`,
/// `HH:MM:SS`, the fraction less its trailing zeros, `zone`, then ` BC`; `infinity` and
/// `-infinity`. Text output: `sep` ' ' and zone `+00` (none without time zone); JSON: 'T' and
/// `+00:00`.
pub(super) fn push_timestamp(out: &mut String, us: i64, sep: char, zone: &str) {
    const DAY_US: i64 = 86_400_000_000;
    match us {
        i64::MAX => out.push_str("infinity"),
        i64::MIN => out.push_str("-infinity"),
        us => {
            let bc = push_ymd(out, us.div_euclid(DAY_US));
            let t = us.rem_euclid(DAY_US);
            let (secs, micros) = ((t / 1_000_000) as u32, (t % 1_000_000) as u32);
            out.push(sep);
            push_padded(out, secs / 3600, 2);
            out.push(':');
            push_padded(out, secs / 60 % 60, 2);
            out.push(':');
            push_padded(out, secs % 60, 2);
            if micros != 0 {
                let (mut digits, mut width) = (micros, 6);
                while digits % 10 == 0 {
                    digits /= 10;
                    width -= 1;
                }
                out.push('.');
                push_padded(out, digits, width);
            }
            out.push_str(zone);
            if bc {
                out.push_str(" BC");
            }
        }
    }
}

/// Writes `YYYY-MM-DD` of a day counted from 2000-01-01 (Postgres's epoch) in the proleptic
/// Gregorian calendar; true when the year is BC (written as Postgres does: year 0 is 1 BC).
fn push_ymd(out: &mut String, days_since_2000: i64) -> bool {
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
    if shown < 10_000 {
        push_padded(out, shown as u32, 4);
    } else {
        push_int(out, shown);
    }
    out.push('-');
    push_padded(out, month as u32, 2);
    out.push('-');
    push_padded(out, day as u32, 2);
    bc
}

/// A numeric's binary form (digit count, weight, sign, display scale, base-10000 digits) as
/// `numeric_out` prints it: a bare JSON number, or `"NaN"`, `"Infinity"`, `"-Infinity"` quoted.
fn push_numeric(b: &[u8], out: &mut String) -> Result<(), String> {
    let word = |i: usize| -> Result<u16, String> {
        b.get(2 * i..2 * i + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
            .ok_or_else(|| format!("numeric value of {} bytes", b.len()))
    };
    let ndigits = word(0)? as usize;
    let weight = i32::from(word(1)? as i16);
    let (sign, dscale) = (word(2)?, word(3)? as usize);
    if b.len() != 8 + 2 * ndigits {
        return Err(format!(
            "numeric value of {} bytes for {ndigits} digits",
            b.len()
        ));
    }
    // Not numbers in JSON: numeric_out's words, quoted.
    let special = match sign {
        0x0000 => None,
        0x4000 => {
            out.push('-');
            None
        }
        0xC000 => Some("\"NaN\""),
        0xD000 => Some("\"Infinity\""),
        0xF000 => Some("\"-Infinity\""),
        s => return Err(format!("numeric sign {s:#x}")),
    };
    if let Some(word) = special {
        out.push_str(word);
        return Ok(());
    }
    // The group of four decimal digits at index d (0: the one of weight `weight`), 0 outside.
    let group = |d: i32| -> Result<u16, String> {
        let g = match usize::try_from(d) {
            Ok(d) if d < ndigits => word(4 + d)?,
            _ => 0,
        };
        if g > 9999 {
            return Err(format!("numeric digit {g}"));
        }
        Ok(g)
    };
    let mut d = 0;
    if weight < 0 {
        out.push('0');
        d = weight + 1;
    } else {
        while d <= weight {
            let g = group(d)?;
            if d == 0 {
                push_int(out, g);
            } else {
                push_padded(out, g.into(), 4);
            }
            d += 1;
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut left = dscale;
        while left > 0 {
            // The group's leading digits, as many as the scale has left.
            let take = left.min(4);
            push_padded(out, u32::from(group(d)?) / 10u32.pow(4 - take as u32), take);
            left -= take;
            d += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(f: ValueFormat, b: &[u8]) -> String {
        let mut out = String::new();
        push_value(f, b, &mut out).unwrap();
        out
    }

    /// A numeric's binary form.
    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_print_their_display_scale() {
        let n = ValueFormat::Numeric;
        assert_eq!(json(n, &numeric(0, 0, 0, &[])), "0");
        assert_eq!(json(n, &numeric(0, 0, 2, &[])), "0.00");
        // 12345.678 = groups 1 | 2345 . 6780, scale 3
        assert_eq!(json(n, &numeric(1, 0, 3, &[1, 2345, 6780])), "12345.678");
        assert_eq!(json(n, &numeric(1, 0x4000, 0, &[1, 2345])), "-12345");
        // 0.00012 = groups 0.0001 | 2000 (weight -1), scale 5; 1e-8 a group further right
        assert_eq!(json(n, &numeric(-1, 0, 5, &[1, 2000])), "0.00012");
        assert_eq!(json(n, &numeric(-2, 0, 8, &[1])), "0.00000001");
        // 10000 with trailing zero groups not sent
        assert_eq!(json(n, &numeric(1, 0, 0, &[1])), "10000");
        assert_eq!(json(n, &numeric(0, 0xC000, 0, &[])), "\"NaN\"");
        assert_eq!(json(n, &numeric(0, 0xF000, 0, &[])), "\"-Infinity\"");
        let mut out = String::new();
        assert!(push_value(n, &numeric(0, 0, 0, &[1])[..9], &mut out).is_err());
        assert!(push_value(n, &numeric(0, 0, 0, &[10000]), &mut out).is_err());
    }

    #[test]
    fn strings_escape_as_postgres_escapes_them() {
        let mut out = String::new();
        push_json_string("a\"b\\c\nd\te\u{1}f\u{7f}é\u{8}\u{c}\r", &mut out);
        let want = format!(r#""a\"b\\c\nd\te\u0001f{}é\b\f\r""#, '\u{7f}');
        assert_eq!(out, want);
    }

    #[test]
    fn timestamps_and_dates_are_iso_in_utc() {
        let ts = |us: i64| json(ValueFormat::Timestamp, &us.to_be_bytes());
        assert_eq!(ts(0), r#""2000-01-01T00:00:00+00:00""#);
        assert_eq!(ts(1_500), r#""2000-01-01T00:00:00.0015+00:00""#);
        assert_eq!(ts(-1), r#""1999-12-31T23:59:59.999999+00:00""#);
        assert_eq!(ts(i64::MAX), r#""infinity""#);
        let date = |d: i32| json(ValueFormat::Date, &d.to_be_bytes());
        assert_eq!(date(0), r#""2000-01-01""#);
        assert_eq!(date(i32::MIN), r#""-infinity""#);
        assert_eq!(
            json(ValueFormat::Uuid, &[0xab; 16]),
            r#""abababab-abab-abab-abab-abababababab""#
        );
        assert_eq!(json(ValueFormat::Jsonb, b"\x01{\"a\": 1}"), r#"{"a": 1}"#);
        let mut out = String::new();
        assert!(push_value(ValueFormat::Jsonb, b"\x02{}", &mut out).is_err());
        assert!(push_value(ValueFormat::Int8, b"\x01", &mut out).is_err());
    }
}
