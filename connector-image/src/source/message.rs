//! From a broker message to a record's payload, the same for every broker kind: JSON objects pass
//! through; anything else goes to the failed topic or, when the spec asks, in as base64; headers and
//! properties go to `obsrv_meta.source.message` when the spec asks.

use base64::Engine as _;
use obsrv_crds::{MessageFormat, NonJson};
use sha2::{Digest, Sha256};

use crate::envelope::{Payload, validate};

/// The field holding a payload that is not a JSON object, base64 (`nonJson: base64`).
pub const BASE64_FIELD: &str = "data_base64";

/// The payload of a message with `body`; `meta` is asked for only when the spec copies metadata.
pub fn payload(
    format: &MessageFormat,
    body: &[u8],
    meta: impl FnOnce() -> serde_json::Value,
) -> Payload {
    let event = match validate(body) {
        Payload::Json(event) => event,
        unparseable => match format.non_json {
            NonJson::FailedTopic => return unparseable,
            NonJson::Base64 => format!(
                "{{\"{BASE64_FIELD}\":\"{}\"}}",
                base64::engine::general_purpose::STANDARD.encode(body)
            ),
        },
    };
    if format.metadata {
        Payload::JsonWithMeta {
            event,
            meta: meta().to_string(),
        }
    } else {
        Payload::Json(event)
    }
}

/// Bytes as JSON: a UTF-8 string when they are one, else `{"base64": ...}`.
pub fn bytes_json(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => s.into(),
        Err(_) => {
            serde_json::json!({"base64": base64::engine::general_purpose::STANDARD.encode(b)})
        }
    }
}

/// A digest of the parts of a message that stay the same when the broker delivers it again (for
/// sources without a message id or sequence). Length-prefixed, like [`crate::envelope::event_id`].
pub fn content_digest(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn format(non_json: NonJson, metadata: bool) -> MessageFormat {
        MessageFormat { non_json, metadata }
    }

    #[test]
    fn json_passes_and_the_rest_fails_unless_base64_is_asked_for() {
        let f = format(NonJson::FailedTopic, false);
        assert_eq!(
            payload(&f, br#"{"a":1}"#, || unreachable!()),
            Payload::Json(r#"{"a":1}"#.into())
        );
        assert!(matches!(
            payload(&f, b"\x01\x02binary", || unreachable!()),
            Payload::Unparseable { .. }
        ));
        let b = format(NonJson::Base64, false);
        let Payload::Json(e) = payload(&b, b"\x01\x02", || unreachable!()) else {
            panic!("base64 wraps")
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e).unwrap(),
            json!({"data_base64": "AQI="})
        );
        // A JSON value that is not an object is no event either.
        assert!(matches!(
            payload(&b, b"[1,2]", || unreachable!()),
            Payload::Json(e) if e.contains("data_base64")
        ));
    }

    #[test]
    fn metadata_rides_beside_the_event() {
        let f = format(NonJson::FailedTopic, true);
        assert_eq!(
            payload(&f, br#"{"a":1}"#, || json!({"topic": "t"})),
            Payload::JsonWithMeta {
                event: r#"{"a":1}"#.into(),
                meta: r#"{"topic":"t"}"#.into()
            }
        );
    }

    #[test]
    fn digests_separate_parts_and_bytes_render_as_text_or_base64() {
        assert_eq!(
            content_digest(&[b"ab", b"c"]),
            content_digest(&[b"ab", b"c"])
        );
        assert_ne!(
            content_digest(&[b"ab", b"c"]),
            content_digest(&[b"a", b"bc"])
        );
        assert_eq!(bytes_json(b"hi"), json!("hi"));
        assert_eq!(bytes_json(&[0xff]), json!({"base64": "/w=="}));
    }
}
