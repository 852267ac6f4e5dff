//! Rows and keys as JSON: from `pgoutput` tuples (relation messages say the columns) and from
//! snapshot chunks (the catalog says them), rendered by the same rule so a row reads the same
//! either way. Pure.

use pg_walstream::{ColumnData, TupleData};

use super::{catalog::Table, values::push_value};
use crate::source::cdc::event::{UNAVAILABLE, push_str};

/// A table as the stream describes it (its latest relation message).
#[derive(Clone, Debug, PartialEq)]
pub struct Relation {
    /// `schema.table`.
    pub name: String,
    pub schema: String,
    pub table: String,
    /// Name and type of each column, in tuple order.
    pub columns: Vec<(String, u32)>,
    /// Indexes of the key columns: the primary key when the catalog knows one (the Kafka key and
    /// the snapshot's de-duplication use it), else the replica identity's columns.
    pub key: Vec<usize>,
}

impl Relation {
    /// From a relation message; `pk` names the primary key's columns (empty: none known).
    pub fn new(
        schema: &str,
        table: &str,
        columns: Vec<(String, u32, bool)>,
        pk: &[String],
    ) -> Relation {
        let by_pk: Option<Vec<usize>> = (!pk.is_empty())
            .then(|| {
                pk.iter()
                    .map(|k| columns.iter().position(|c| &c.0 == k))
                    .collect()
            })
            .flatten();
        let key = by_pk.unwrap_or_else(|| {
            columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.2)
                .map(|(i, _)| i)
                .collect()
        });
        Relation {
            name: format!("{schema}.{table}"),
            schema: schema.to_string(),
            table: table.to_string(),
            columns: columns.into_iter().map(|(n, t, _)| (n, t)).collect(),
            key,
        }
    }

    /// The stream's view of a table read from the catalog (snapshot rows).
    pub fn of_table(t: &Table) -> Relation {
        Relation::new(
            &t.schema,
            &t.table,
            t.columns
                .iter()
                .map(|c| (c.name.clone(), c.type_oid, false))
                .collect(),
            &t.pk,
        )
    }
}

/// A tuple's column as text: `None` for NULL, `Some(Err(()))` for an unchanged TOAST value.
fn text(c: &ColumnData) -> Option<Result<std::borrow::Cow<'_, str>, ()>> {
    match c.data_type {
        b'n' => None,
        b'u' => Some(Err(())),
        _ => Some(Ok(String::from_utf8_lossy(c.as_bytes()))),
    }
}

/// The row of `tuple` as a JSON object.
pub fn tuple_json(rel: &Relation, tuple: &TupleData) -> String {
    row_json(
        rel,
        (0..rel.columns.len()).map(|i| tuple.columns.get(i).and_then(text)),
    )
}

/// The key of `tuple` as a JSON object (`{"id":1}`); `None` when the relation has no key or the
/// tuple lacks a key value.
pub fn tuple_key(rel: &Relation, tuple: &TupleData) -> Option<String> {
    key_json(rel, |i| tuple.columns.get(i).and_then(text))
}

/// The row of a snapshot chunk (text per catalog column) as a JSON object.
pub fn text_row_json(rel: &Relation, values: &[Option<String>]) -> String {
    row_json(
        rel,
        (0..rel.columns.len()).map(|i| {
            values
                .get(i)
                .and_then(|v| v.as_deref())
                .map(|s| Ok(std::borrow::Cow::Borrowed(s)))
        }),
    )
}

/// The key of a snapshot chunk's row.
pub fn text_row_key(rel: &Relation, values: &[Option<String>]) -> Option<String> {
    key_json(rel, |i| {
        values
            .get(i)
            .and_then(|v| v.as_deref())
            .map(|s| Ok(std::borrow::Cow::Borrowed(s)))
    })
}

fn row_json<'a>(
    rel: &Relation,
    values: impl Iterator<Item = Option<Result<std::borrow::Cow<'a, str>, ()>>>,
) -> String {
    let mut out = String::with_capacity(64 + 24 * rel.columns.len());
    out.push('{');
    for (i, ((name, oid), v)) in rel.columns.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(&mut out, name);
        out.push(':');
        match v {
            None => out.push_str("null"),
            Some(Err(())) => push_str(&mut out, UNAVAILABLE),
            Some(Ok(t)) => push_value(&mut out, *oid, &t),
        }
    }
    out.push('}');
    out
}

fn key_json<'a>(
    rel: &Relation,
    value: impl Fn(usize) -> Option<Result<std::borrow::Cow<'a, str>, ()>>,
) -> Option<String> {
    if rel.key.is_empty() {
        return None;
    }
    let mut out = String::from("{");
    for (n, &i) in rel.key.iter().enumerate() {
        let (name, oid) = rel.columns.get(i)?;
        let Some(Ok(t)) = value(i) else {
            return None;
        };
        if n > 0 {
            out.push(',');
        }
        push_str(&mut out, name);
        out.push(':');
        push_value(&mut out, *oid, &t);
    }
    out.push('}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::cdc::postgres::values::{INT4, JSONB};

    fn rel() -> Relation {
        Relation::new(
            "public",
            "t",
            vec![
                ("id".into(), INT4, true),
                ("doc".into(), JSONB, false),
                ("note".into(), 25, false),
            ],
            &["id".to_string()],
        )
    }

    #[test]
    fn tuples_render_nulls_values_and_the_toast_placeholder() {
        let t = TupleData::new(vec![
            ColumnData::text(b"7".to_vec()),
            ColumnData::unchanged(),
            ColumnData::null(),
        ]);
        assert_eq!(
            tuple_json(&rel(), &t),
            r#"{"id":7,"doc":"__debezium_unavailable_value","note":null}"#
        );
        assert_eq!(tuple_key(&rel(), &t).as_deref(), Some(r#"{"id":7}"#));
    }

    #[test]
    fn snapshot_rows_render_exactly_like_stream_rows() {
        let values = vec![Some("7".to_string()), Some(r#"{"a": 1}"#.into()), None];
        let t = TupleData::new(vec![
            ColumnData::text(b"7".to_vec()),
            ColumnData::text(br#"{"a": 1}"#.to_vec()),
            ColumnData::null(),
        ]);
        assert_eq!(text_row_json(&rel(), &values), tuple_json(&rel(), &t));
        assert_eq!(text_row_key(&rel(), &values), tuple_key(&rel(), &t));
    }

    #[test]
    fn the_key_is_the_primary_key_else_the_replica_identity() {
        let full = Relation::new(
            "public",
            "t",
            vec![("a".into(), INT4, true), ("b".into(), INT4, true)],
            &[],
        );
        assert_eq!(full.key, vec![0, 1]);
        let by_pk = Relation::new(
            "public",
            "t",
            vec![("a".into(), INT4, true), ("b".into(), INT4, true)],
            &["b".to_string()],
        );
        assert_eq!(by_pk.key, vec![1]);
        let none = Relation::new("public", "t", vec![("a".into(), INT4, false)], &[]);
        let t = TupleData::new(vec![ColumnData::text(b"1".to_vec())]);
        assert_eq!(tuple_key(&none, &t), None);
    }
}
