//! Parquet objects of the S3 source, row by row. The object is first copied to an anonymous temp
//! file (never held in memory), then read one row group at a time through the `parquet` crate's
//! row API; the position inside the object is the row index. Rows become JSON objects with
//! ISO-8601 timestamps/dates, decimals as exact strings, bytes as base64 and nested groups, lists
//! and maps as JSON objects/arrays.

use std::{
    fs::File,
    panic::{AssertUnwindSafe, catch_unwind},
};

use chrono::{DateTime, SecondsFormat};
use parquet::{
    file::{
        reader::FileReader,
        serialized_reader::{ReadOptionsBuilder, SerializedFileReader},
    },
    record::{Field, Row, reader::RowIter},
};
use serde_json::Value;

/// A JSON value for one Parquet field (total: never panics on out-of-range values).
pub fn field_json(f: &Field) -> Value {
    match f {
        Field::TimestampMillis(ms) => DateTime::from_timestamp_millis(*ms)
            .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
            .unwrap_or_else(|| Value::from(*ms)),
        Field::TimestampMicros(us) => DateTime::from_timestamp_micros(*us)
            .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true)))
            .unwrap_or_else(|| Value::from(*us)),
        Field::Date(days) => DateTime::from_timestamp(i64::from(*days) * 86_400, 0)
            .map(|t| Value::String(t.date_naive().to_string()))
            .unwrap_or_else(|| Value::from(*days)),
        Field::Group(row) => row_json(row),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_json(v))
                })
                .collect(),
        ),
        // Numbers, strings, base64 bytes, decimals as exact strings, times of day "HH:MM:SS.fff".
        other => other.to_json_value(),
    }
}

/// A Parquet row as a JSON object, columns in schema order.
pub fn row_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, f)| (name.clone(), field_json(f)))
            .collect(),
    )
}

/// The rows of one Parquet file from a given row index on.
pub struct ParquetRows {
    rows: Option<RowIter<'static>>,
    /// Index of the next row.
    next: u64,
    /// Why the file cannot be read (further), reported once.
    error: Option<String>,
}

/// What [`ParquetRows::next_row`] yields: a row's index and its JSON text, or why reading stopped.
#[derive(Debug, PartialEq)]
pub enum RowOutcome {
    Row(u64, String),
    Failed(u64, String),
}

impl ParquetRows {
    /// Opens `file` and positions it at row `start` (skipping whole row groups without decoding).
    pub fn open(file: File, start: u64) -> ParquetRows {
        match guarded(|| open_at(file, start)) {
            Ok(rows) => ParquetRows {
                rows: Some(rows),
                next: start,
                error: None,
            },
            Err(e) => ParquetRows {
                rows: None,
                next: start,
                error: Some(format!("object is not a readable Parquet file: {e}")),
            },
        }
    }

    /// Index of the next row to read.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next row, or the error that ends this file, or `None` at its end.
    pub fn next_row(&mut self) -> Option<RowOutcome> {
        if let Some(e) = self.error.take() {
            self.rows = None;
            return Some(RowOutcome::Failed(self.next, e));
        }
        let rows = self.rows.as_mut()?;
        let at = self.next;
        match guarded(|| rows.next().transpose().map_err(|e| e.to_string())) {
            Ok(Some(row)) => {
                self.next += 1;
                Some(RowOutcome::Row(at, row_json(&row).to_string()))
            }
            Ok(None) => {
                self.rows = None;
                None
            }
            Err(e) => {
                self.rows = None;
                // The failed row counts as read, so a restart does not stall on it.
                self.next += 1;
                Some(RowOutcome::Failed(
                    at,
                    format!("Parquet row {at} could not be read: {e}"),
                ))
            }
        }
    }
}

/// Runs `f`, turning a panic of the decoder on hostile input into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "decoder panicked".into());
        Err(format!("invalid Parquet data ({msg})"))
    })
}

fn open_at(file: File, start: u64) -> Result<RowIter<'static>, String> {
    let clone = file.try_clone().map_err(|e| e.to_string())?;
    let meta = SerializedFileReader::new(clone).map_err(|e| e.to_string())?;
    // First row group holding row `start`, and the rows before it.
    let mut before = 0u64;
    let mut group = meta.metadata().num_row_groups();
    for (i, rg) in meta.metadata().row_groups().iter().enumerate() {
        let n = u64::try_from(rg.num_rows()).unwrap_or(0);
        if before + n > start {
            group = i;
            break;
        }
        before += n;
    }
    drop(meta);
    let options = ReadOptionsBuilder::new()
        .with_predicate(Box::new(move |_, i| i >= group))
        .build();
    let reader =
        SerializedFileReader::new_with_options(file, options).map_err(|e| e.to_string())?;
    let reader: Box<dyn FileReader> = Box::new(reader);
    let mut rows = RowIter::from_file_into(reader);
    for _ in before..start {
        match rows.next() {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::{data_type::Decimal, record::Field};
    use serde_json::json;

    #[test]
    fn fields_map_to_json_faithfully() {
        assert_eq!(
            field_json(&Field::TimestampMillis(1_700_000_000_123)),
            json!("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(
            field_json(&Field::TimestampMicros(-1)),
            json!("1969-12-31T23:59:59.999999Z")
        );
        assert_eq!(
            field_json(&Field::TimestampMillis(i64::MAX)),
            json!(i64::MAX),
            "out of range stays a number"
        );
        assert_eq!(field_json(&Field::Date(19_000)), json!("2022-01-08"));
        assert_eq!(
            field_json(&Field::Decimal(Decimal::from_i64(
                -123_456_789_012_345_678,
                18,
                9
            ))),
            json!("-123456789.012345678")
        );
        assert_eq!(field_json(&Field::Null), json!(null));
        assert_eq!(field_json(&Field::Double(f64::NAN)), json!(null));
    }

    #[test]
    fn a_file_that_is_not_parquet_fails_once() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"PAR1 not really").unwrap();
        let mut rows = ParquetRows::open(f, 0);
        match rows.next_row() {
            Some(RowOutcome::Failed(0, e)) => {
                assert!(e.contains("not a readable Parquet file"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rows.next_row(), None);
    }
}
