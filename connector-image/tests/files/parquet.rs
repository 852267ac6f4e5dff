//! Parquet test input: a file with every kind of column the decoder maps, and the JSON each row
//! must become.

use anyhow::Result;

/// A Parquet file of `n` rows in row groups of `group` rows (snappy), with nullable columns,
/// a millisecond timestamp, a decimal, a double, a boolean, raw bytes, a list of strings and a
/// struct.
pub fn parquet_file(n: usize, group: usize) -> Result<Vec<u8>> {
    use parquet::{
        basic::Compression,
        data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type},
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::parser::parse_message_type,
    };
    use std::sync::Arc;
    let schema = Arc::new(parse_message_type(
        "message m {
            required int64 id;
            optional binary name (STRING);
            required int64 ts (TIMESTAMP(MILLIS,true));
            required int64 amount (DECIMAL(18,2));
            optional double score;
            required boolean flag;
            optional binary raw;
            optional group tags (LIST) {
                repeated group list {
                    optional binary element (STRING);
                }
            }
            optional group point {
                required int32 x;
                optional binary label (STRING);
            }
        }",
    )?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(Vec::new(), schema, props)?;
    for start in (0..n).step_by(group) {
        let rows: Vec<usize> = (start..(start + group).min(n)).collect();
        let mut rg = w.next_row_group()?;
        let mut col = 0;
        while let Some(mut c) = rg.next_column()? {
            let def = |null: fn(usize) -> bool| -> Vec<i16> {
                rows.iter().map(|&i| i16::from(!null(i))).collect()
            };
            match col {
                0 => {
                    let v: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                1 => {
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !name_is_null(i))
                        .map(|&i| ByteArray::from(format!("name-{i}").as_str()))
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def(name_is_null)), None)?;
                }
                2 => {
                    let v: Vec<i64> = rows.iter().map(|&i| ts_ms(i)).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                3 => {
                    let v: Vec<i64> = rows.iter().map(|&i| i as i64 * 100 + 5).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                4 => {
                    let v: Vec<f64> = rows
                        .iter()
                        .filter(|&&i| !score_is_null(i))
                        .map(|&i| i as f64 * 0.5)
                        .collect();
                    c.typed::<DoubleType>()
                        .write_batch(&v, Some(&def(score_is_null)), None)?;
                }
                5 => {
                    let v: Vec<bool> = rows.iter().map(|&i| i.is_multiple_of(2)).collect();
                    c.typed::<BoolType>().write_batch(&v, None, None)?;
                }
                6 => {
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !raw_is_null(i))
                        .map(|&i| ByteArray::from(vec![(i & 0xff) as u8, (i >> 8) as u8, 0xff]))
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def(raw_is_null)), None)?;
                }
                7 => {
                    // tags: null list, or [t<i>, null] (levels: 0 = list null, 3 = element set).
                    let (mut v, mut d, mut r) = (Vec::new(), Vec::new(), Vec::new());
                    for &i in &rows {
                        if tags_is_null(i) {
                            d.push(0);
                            r.push(0);
                        } else {
                            v.push(ByteArray::from(format!("t{i}").as_str()));
                            d.extend([3, 2]);
                            r.extend([0, 1]);
                        }
                    }
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&d), Some(&r))?;
                }
                8 => {
                    // point.x: def 1 when the point is there.
                    let v: Vec<i32> = rows
                        .iter()
                        .filter(|&&i| !point_is_null(i))
                        .map(|&i| i as i32)
                        .collect();
                    c.typed::<Int32Type>()
                        .write_batch(&v, Some(&def(point_is_null)), None)?;
                }
                _ => {
                    // point.label: def 0 = no point, 1 = point without label, 2 = label set.
                    let v: Vec<ByteArray> = rows
                        .iter()
                        .filter(|&&i| !point_is_null(i) && i.is_multiple_of(2))
                        .map(|&i| ByteArray::from(format!("p{i}").as_str()))
                        .collect();
                    let d: Vec<i16> = rows
                        .iter()
                        .map(|&i| match (point_is_null(i), i.is_multiple_of(2)) {
                            (true, _) => 0,
                            (false, false) => 1,
                            (false, true) => 2,
                        })
                        .collect();
                    c.typed::<ByteArrayType>().write_batch(&v, Some(&d), None)?;
                }
            }
            c.close()?;
            col += 1;
        }
        rg.close()?;
    }
    Ok(w.into_inner()?)
}

fn name_is_null(i: usize) -> bool {
    i.is_multiple_of(7)
}
fn score_is_null(i: usize) -> bool {
    i.is_multiple_of(5)
}
fn raw_is_null(i: usize) -> bool {
    i.is_multiple_of(3)
}
fn tags_is_null(i: usize) -> bool {
    i.is_multiple_of(4)
}
fn point_is_null(i: usize) -> bool {
    i % 6 == 5
}
fn ts_ms(i: usize) -> i64 {
    1_700_000_000_000 + i as i64 * 1_001
}

/// The event the connector must produce for row `i` of [`parquet_file`].
pub fn parquet_row(i: usize) -> serde_json::Value {
    use base64::Engine;
    let ts = chrono::DateTime::from_timestamp_millis(ts_ms(i))
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "id": i,
        "name": (!name_is_null(i)).then(|| format!("name-{i}")),
        "ts": ts,
        "amount": format!("{}.05", i),
        "score": (!score_is_null(i)).then_some(i as f64 * 0.5),
        "flag": i.is_multiple_of(2),
        "raw": (!raw_is_null(i)).then(|| base64::engine::general_purpose::STANDARD
            .encode([(i & 0xff) as u8, (i >> 8) as u8, 0xff])),
        "tags": (!tags_is_null(i)).then(|| serde_json::json!([format!("t{i}"), null])),
        "point": (!point_is_null(i)).then(|| serde_json::json!({
            "x": i,
            "label": i.is_multiple_of(2).then(|| format!("p{i}")),
        })),
    })
}
