//! JSON documents: one object, or an array of objects, per file.

use crate::envelope::Payload;

/// Largest JSON document (format `json`) read; larger ones become one failed record.
pub const MAX_JSON_DOCUMENT_BYTES: usize = 16 << 20;

/// The records of a JSON document: an object, or an array of objects.
pub fn document(bytes: &[u8]) -> Vec<Payload> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::Object(_) => Payload::Json(v.to_string()),
                other => Payload::Unparseable {
                    raw: other.to_string(),
                    reason: "array element is not a JSON object".into(),
                },
            })
            .collect(),
        Ok(v @ serde_json::Value::Object(_)) => vec![Payload::Json(v.to_string())],
        Ok(other) => vec![Payload::Unparseable {
            raw: other.to_string(),
            reason: "document is not a JSON object or array".into(),
        }],
        Err(e) => vec![Payload::Unparseable {
            raw: String::from_utf8_lossy(bytes).into_owned(),
            reason: format!("document is not valid JSON: {e}"),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_yield_objects() {
        assert_eq!(document(br#"[{"a":1},{"b":2}]"#).len(), 2);
        assert!(matches!(
            document(br#"[1]"#)[0],
            Payload::Unparseable { .. }
        ));
        assert_eq!(
            document(br#"{"a":1}"#),
            vec![Payload::Json(r#"{"a":1}"#.into())]
        );
        assert!(matches!(document(b"{oops")[0], Payload::Unparseable { .. }));
    }
}
