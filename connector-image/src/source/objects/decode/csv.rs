//! CSV records: a record may span physical lines (a quoted field holding a newline), so lines are
//! joined until the record's quotes balance, then parsed with the `csv` crate in the configured
//! dialect. Values stay strings: CSV has no types.

use obsrv_crds::CsvOptions;

use crate::envelope::Payload;

/// A CSV dialect, as bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    pub header: bool,
    pub delimiter: u8,
    pub quote: u8,
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect::from(&CsvOptions::default())
    }
}

impl From<&CsvOptions> for Dialect {
    fn from(o: &CsvOptions) -> Self {
        // The spec's validation keeps both to one ASCII character.
        let byte = |s: &str, default: u8| s.bytes().next().unwrap_or(default);
        Dialect {
            header: o.header,
            delimiter: byte(&o.delimiter, b','),
            quote: byte(&o.quote, b'"'),
        }
    }
}

impl Dialect {
    /// Whether `record` is complete: its quotes balance (a doubled quote counts twice).
    pub fn complete(&self, record: &[u8]) -> bool {
        record.iter().filter(|&&b| b == self.quote).count() % 2 == 0
    }

    /// The fields of one complete record; `None` when it is not valid CSV.
    pub fn fields(&self, record: &[u8]) -> Option<Vec<String>> {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(self.delimiter)
            .quote(self.quote)
            .from_reader(record);
        let rec = r.records().next()?.ok()?;
        Some(rec.iter().map(str::to_string).collect())
    }
}

/// Column names for a file without a header: `col1`, `col2`, ...
pub fn numbered_columns(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("col{i}")).collect()
}

/// A CSV row as a JSON object keyed by the header; a row whose width differs from the header's
/// is refused with why.
pub fn row(header: &[String], fields: &[String]) -> Payload {
    if fields.len() != header.len() {
        return Payload::Unparseable {
            raw: fields.join(","),
            reason: format!(
                "CSV row has {} fields, the header has {}",
                fields.len(),
                header.len()
            ),
        };
    }
    let obj: serde_json::Map<String, serde_json::Value> = header
        .iter()
        .cloned()
        .zip(fields.iter().map(|f| serde_json::Value::String(f.clone())))
        .collect();
    Payload::Json(serde_json::Value::Object(obj).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_objects_and_quoted_newlines_join() {
        let d = Dialect::default();
        assert!(!d.complete(b"1,\"multi"));
        assert!(d.complete(b"1,\"multi\nline\""));
        let h = d.fields(b"id,note").unwrap();
        let f = d.fields(b"1,\"multi\nline, with comma\"").unwrap();
        assert_eq!(
            row(&h, &f),
            Payload::Json(r#"{"id":"1","note":"multi\nline, with comma"}"#.into())
        );
        assert!(matches!(
            row(&h, &["1".into()]),
            Payload::Unparseable { .. }
        ));
    }

    #[test]
    fn other_dialects_split_and_quote_their_way() {
        let d = Dialect::from(&CsvOptions {
            header: false,
            delimiter: ";".into(),
            quote: "'".into(),
        });
        assert!(!d.complete(b"1;'it''s"));
        let f = d.fields(b"1;'it''s; here';\"x\"").unwrap();
        assert_eq!(f, ["1", "it's; here", "\"x\""]);
        assert_eq!(numbered_columns(2), ["col1", "col2"]);
        let tab = Dialect::from(&CsvOptions {
            delimiter: "\t".into(),
            ..CsvOptions::default()
        });
        assert_eq!(tab.fields(b"a\tb,c").unwrap(), ["a", "b,c"]);
    }
}
