//! Parquet objects of the file sources, row by row. The object is first copied to an anonymous temp
//! file (never held in memory), then read one row group at a time through the `parquet` crate's
//! row API; the position inside the object is the row index. Rows become JSON objects with
//! ISO-8601 timestamps/dates, decimals as exact strings, bytes as base64 and nested groups, lists
//! and maps as JSON objects/arrays.

use std::{
    fs::File,
    panic::{AssertUnwindSafe, catch_unwind},
};

use chrono::{DateTime, SecondsFormat, Utc};
use parquet::{
    basic::{ConvertedType, LogicalType, TimeUnit},
    file::{
        reader::FileReader,
        serialized_reader::{ReadOptionsBuilder, SerializedFileReader},
    },
    record::{Field, Row, reader::RowIter},
    schema::types::Type,
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
    row_json_with(row, &[])
}

/// How a timestamp column is stored, which the row API does not keep: nanoseconds come out as plain
/// integers, and local (not UTC-adjusted) times must not get a `Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimestampColumn {
    pub utc: bool,
    pub unit: Unit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Micros,
    Nanos,
}

/// What the schema says about a field that the row API does not keep (a timestamp's unit and UTC
/// flag), at any depth: struct fields, list elements, map keys and values.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Timestamp(TimestampColumn),
    Struct(Vec<(String, Shape)>),
    List(Box<Shape>),
    Map(Box<Shape>, Box<Shape>),
    Plain,
}

impl Shape {
    /// The shape of a schema node, following Parquet's LIST and MAP layouts (three-level lists and
    /// the legacy two-level ones, as the row API reads them).
    pub fn of(t: &Type) -> Shape {
        let info = t.get_basic_info();
        if t.is_primitive() {
            return match info.logical_type_ref() {
                Some(LogicalType::Timestamp(ts)) => Shape::Timestamp(TimestampColumn {
                    utc: ts.is_adjusted_to_u_t_c,
                    unit: match ts.unit {
                        TimeUnit::MILLIS => Unit::Millis,
                        TimeUnit::MICROS => Unit::Micros,
                        TimeUnit::NANOS => Unit::Nanos,
                    },
                }),
                _ => Shape::Plain,
            };
        }
        let fields = t.get_fields();
        let annotated = |l: fn(&LogicalType) -> bool, c: &[ConvertedType]| {
            info.logical_type_ref().is_some_and(l) || c.contains(&info.converted_type())
        };
        let is_list = annotated(|l| matches!(l, LogicalType::List), &[ConvertedType::LIST]);
        let is_map = annotated(
            |l| matches!(l, LogicalType::Map),
            &[ConvertedType::MAP, ConvertedType::MAP_KEY_VALUE],
        );
        match fields {
            [repeated] if is_list => {
                let inner = repeated.get_fields();
                let element = match inner {
                    [e] if !repeated.is_primitive()
                        && repeated.name() != "array"
                        && !repeated.name().ends_with("_tuple") =>
                    {
                        e.as_ref()
                    }
                    _ => repeated.as_ref(),
                };
                Shape::List(Box::new(Shape::of(element)))
            }
            [kv] if is_map && !kv.is_primitive() && kv.get_fields().len() == 2 => {
                let kv = kv.get_fields();
                Shape::Map(Box::new(Shape::of(&kv[0])), Box::new(Shape::of(&kv[1])))
            }
            _ => Shape::Struct(
                fields
                    .iter()
                    .map(|f| (f.name().to_string(), Shape::of(f)))
                    .collect(),
            ),
        }
    }
}

/// A timestamp as ISO-8601: `…Z` when UTC-adjusted, without offset when local; digits per unit.
pub fn timestamp_json(value: i64, col: TimestampColumn) -> Value {
    let (t, digits): (Option<DateTime<Utc>>, SecondsFormat) = match col.unit {
        Unit::Millis => (
            DateTime::from_timestamp_millis(value),
            SecondsFormat::Millis,
        ),
        Unit::Micros => (
            DateTime::from_timestamp_micros(value),
            SecondsFormat::Micros,
        ),
        Unit::Nanos => (
            Some(DateTime::from_timestamp_nanos(value)),
            SecondsFormat::Nanos,
        ),
    };
    match t {
        None => Value::from(value),
        Some(t) if col.utc => Value::String(t.to_rfc3339_opts(digits, true)),
        Some(t) => {
            let fmt = match col.unit {
                Unit::Millis => "%Y-%m-%dT%H:%M:%S%.3f",
                Unit::Micros => "%Y-%m-%dT%H:%M:%S%.6f",
                Unit::Nanos => "%Y-%m-%dT%H:%M:%S%.9f",
            };
            Value::String(t.naive_utc().format(fmt).to_string())
        }
    }
}

/// A field as JSON, timestamps rendered by [`timestamp_json`] as its shape says.
pub fn json_with(f: &Field, shape: &Shape) -> Value {
    match (f, shape) {
        (
            Field::TimestampMillis(v) | Field::TimestampMicros(v) | Field::Long(v),
            Shape::Timestamp(c),
        ) => timestamp_json(*v, *c),
        (Field::Group(row), Shape::Struct(fields)) => row_json_with(row, fields),
        (Field::ListInternal(list), Shape::List(element)) => Value::Array(
            list.elements()
                .iter()
                .map(|e| json_with(e, element))
                .collect(),
        ),
        // A repeated field without a LIST annotation: each element has the field's shape.
        (Field::ListInternal(list), element) => Value::Array(
            list.elements()
                .iter()
                .map(|e| json_with(e, element))
                .collect(),
        ),
        (Field::MapInternal(map), Shape::Map(key, value)) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let k = match json_with(k, key) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, json_with(v, value))
                })
                .collect(),
        ),
        _ => field_json(f),
    }
}

/// A row (or struct) as a JSON object, columns in schema order, shaped by `fields`.
pub fn row_json_with(row: &Row, fields: &[(String, Shape)]) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, f)| {
                let shape = fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(&Shape::Plain, |(_, s)| s);
                (name.clone(), json_with(f, shape))
            })
            .collect(),
    )
}

/// The rows of one Parquet file from a given row index on.
pub struct ParquetRows {
    rows: Option<RowIter<'static>>,
    /// The file's columns, as the schema shapes them.
    columns: Vec<(String, Shape)>,
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
            Ok((rows, columns)) => ParquetRows {
                rows: Some(rows),
                columns,
                next: start,
                error: None,
            },
            Err(e) => ParquetRows {
                rows: None,
                columns: Vec::new(),
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
                Some(RowOutcome::Row(
                    at,
                    row_json_with(&row, &self.columns).to_string(),
                ))
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

type Opened = (RowIter<'static>, Vec<(String, Shape)>);

fn open_at(file: File, start: u64) -> Result<Opened, String> {
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
    let columns = match Shape::of(meta.metadata().file_metadata().schema()) {
        Shape::Struct(columns) => columns,
        _ => Vec::new(),
    };
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
    Ok((rows, columns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::{data_type::Decimal, record::Field};
    use serde_json::json;

    /// A temp file and a Parquet writer into it for `schema` (message type syntax).
    fn writer(schema: &str) -> (File, parquet::file::writer::SerializedFileWriter<File>) {
        use parquet::{
            file::{properties::WriterProperties, writer::SerializedFileWriter},
            schema::parser::parse_message_type,
        };
        let f = tempfile::tempfile().unwrap();
        let w = SerializedFileWriter::new(
            f.try_clone().unwrap(),
            std::sync::Arc::new(parse_message_type(schema).unwrap()),
            std::sync::Arc::new(WriterProperties::builder().build()),
        )
        .unwrap();
        (f, w)
    }

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
    fn timestamps_follow_their_unit_and_utc_flag() {
        let c = |utc, unit| TimestampColumn { utc, unit };
        assert_eq!(
            timestamp_json(1_700_000_000_123_456_789, c(true, Unit::Nanos)),
            json!("2023-11-14T22:13:20.123456789Z")
        );
        assert_eq!(
            timestamp_json(1_700_000_000_123, c(false, Unit::Millis)),
            json!("2023-11-14T22:13:20.123")
        );
        assert_eq!(
            timestamp_json(1_700_000_000_123_456, c(true, Unit::Micros)),
            json!("2023-11-14T22:13:20.123456Z")
        );
    }

    /// A small file written with the crate's writer: nanosecond and local timestamps, a map, and
    /// a restart position inside the second row group.
    #[test]
    fn rows_from_a_written_file_and_a_mid_file_start() {
        use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
        let (mut f, mut w) = writer(
            "message m {
                    required int64 ns (TIMESTAMP(NANOS,true));
                    required int64 local (TIMESTAMP(MILLIS,false));
                    optional group attrs (MAP) {
                        repeated group key_value {
                            required binary key (STRING);
                            optional int32 value;
                        }
                    }
                }",
        );
        for g in 0..2i64 {
            let mut rg = w.next_row_group().unwrap();
            let mut col = 0;
            while let Some(mut c) = rg.next_column().unwrap() {
                match col {
                    0 => {
                        let v = [g * 2, g * 2 + 1].map(|i| 1_700_000_000_000_000_000 + i);
                        c.typed::<Int64Type>().write_batch(&v, None, None).unwrap();
                    }
                    1 => {
                        let v = [g * 2, g * 2 + 1].map(|i| 1_700_000_000_000 + i);
                        c.typed::<Int64Type>().write_batch(&v, None, None).unwrap();
                    }
                    2 => {
                        // Row 1: {"a": 1, "b": null}; others: empty map.
                        let (v, d, r): (Vec<ByteArray>, Vec<i16>, Vec<i16>) = if g == 0 {
                            (vec!["a".into(), "b".into()], vec![1, 2, 2], vec![0, 0, 1])
                        } else {
                            (vec![], vec![1, 1], vec![0, 0])
                        };
                        c.typed::<ByteArrayType>()
                            .write_batch(&v, Some(&d), Some(&r))
                            .unwrap();
                    }
                    _ => {
                        let (v, d, r): (Vec<i32>, Vec<i16>, Vec<i16>) = if g == 0 {
                            (vec![1], vec![1, 3, 2], vec![0, 0, 1])
                        } else {
                            (vec![], vec![1, 1], vec![0, 0])
                        };
                        c.typed::<Int32Type>()
                            .write_batch(&v, Some(&d), Some(&r))
                            .unwrap();
                    }
                }
                c.close().unwrap();
                col += 1;
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
        std::io::Seek::rewind(&mut f).unwrap();

        let mut rows = ParquetRows::open(f.try_clone().unwrap(), 0);
        let mut all = Vec::new();
        while let Some(r) = rows.next_row() {
            match r {
                RowOutcome::Row(i, j) => all.push((i, serde_json::from_str::<Value>(&j).unwrap())),
                RowOutcome::Failed(i, e) => panic!("row {i}: {e}"),
            }
        }
        assert_eq!(all.len(), 4);
        assert_eq!(
            all[1].1,
            json!({"ns": "2023-11-14T22:13:20.000000001Z", "local": "2023-11-14T22:13:20.001",
                   "attrs": {"a": 1, "b": null}})
        );
        assert_eq!(rows.position(), 4);

        let mut from3 = ParquetRows::open(f, 3);
        match from3.next_row() {
            Some(RowOutcome::Row(3, j)) => assert!(j.contains("22:13:20.003"), "{j}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(from3.next_row(), None);
    }

    #[test]
    fn nested_timestamps_follow_their_unit_and_utc_flag() {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        let (mut f, mut w) = writer(
            "message m {
                    required group inner {
                        required int64 at (TIMESTAMP(NANOS,true));
                        required int64 local_ms (TIMESTAMP(MILLIS,false));
                    }
                    optional group stamps (LIST) {
                        repeated group list { required int64 element (TIMESTAMP(NANOS,true)); }
                    }
                    optional group by_name (MAP) {
                        repeated group key_value {
                            required binary key (STRING);
                            required int64 value (TIMESTAMP(NANOS,false));
                        }
                    }
                    repeated int64 legacy (TIMESTAMP(MICROS,true));
                }",
        );
        let ns = |i: i64| 1_700_000_000_000_000_000 + i;
        let mut rg = w.next_row_group().unwrap();
        let mut col = 0;
        while let Some(mut c) = rg.next_column().unwrap() {
            let (ints, d, r): (Vec<i64>, Vec<i16>, Vec<i16>) = match col {
                0 => (vec![ns(1)], vec![], vec![]),
                1 => (vec![1_700_000_000_123], vec![], vec![]),
                2 => (vec![ns(2), ns(3)], vec![2, 2], vec![0, 1]),
                3 => (vec![], vec![], vec![]),
                4 => (vec![ns(4)], vec![2], vec![0]),
                _ => (vec![1_700_000_000_000_005], vec![1], vec![0]),
            };
            fn levels(v: &[i16]) -> Option<&[i16]> {
                (!v.is_empty()).then_some(v)
            }
            if col == 3 {
                let keys: Vec<ByteArray> = vec!["x".into()];
                c.typed::<ByteArrayType>()
                    .write_batch(&keys, Some(&[2]), Some(&[0]))
                    .unwrap();
            } else {
                c.typed::<Int64Type>()
                    .write_batch(&ints, levels(&d), levels(&r))
                    .unwrap();
            }
            c.close().unwrap();
            col += 1;
        }
        rg.close().unwrap();
        w.close().unwrap();
        std::io::Seek::rewind(&mut f).unwrap();

        let mut rows = ParquetRows::open(f, 0);
        let Some(RowOutcome::Row(0, j)) = rows.next_row() else {
            panic!("one row")
        };
        assert_eq!(
            serde_json::from_str::<Value>(&j).unwrap(),
            json!({
                "inner": {"at": "2023-11-14T22:13:20.000000001Z", "local_ms": "2023-11-14T22:13:20.123"},
                "stamps": ["2023-11-14T22:13:20.000000002Z", "2023-11-14T22:13:20.000000003Z"],
                "by_name": {"x": "2023-11-14T22:13:20.000000004"},
                "legacy": ["2023-11-14T22:13:20.000005Z"],
            })
        );
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
