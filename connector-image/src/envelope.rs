//! Obsrv's record shapes: the ingest envelope, the failed-record document, and the deterministic
//! event id. Pure functions: the sink only moves the bytes they return.

use serde_json::json;
use sha2::{Digest, Sha256};

/// Header carrying the event id (also the message key).
pub const EVENT_ID_HEADER: &str = "obsrv-event-id";
/// Input that is not a JSON object.
pub const CE_UNPARSEABLE: &str = "CE_1000";
/// A record whose envelope exceeds the sink's `maxMessageBytes`.
pub const CE_TOO_LARGE: &str = "CE_1001";
/// How much of an oversize record is kept in its failed-topic document.
pub const FAILED_EVENT_PREVIEW_BYTES: usize = 4096;

/// A deterministic id for the record at a source position: the same position always gives the same
/// id, so downstream can drop the duplicates an at-least-once restart produces. The parts are
/// length-prefixed so no two different positions hash the same input.
pub fn event_id(instance: &str, parts: &[&str]) -> String {
    match parts.split_last() {
        Some((last, leading)) => EventIds::new(instance, leading).id(last),
        None => hex16(&EventIds::new(instance, &[]).0.finalize()),
    }
}

fn hex16(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

/// [`event_id`]s of records that share their leading parts (a file's records: the instance, the
/// bucket and the key), hashed once; `id(last)` equals `event_id(instance, [leading.., last])`.
#[derive(Clone)]
pub struct EventIds(Sha256);

impl EventIds {
    pub fn new(instance: &str, leading: &[&str]) -> EventIds {
        let mut h = Sha256::new();
        for p in std::iter::once(&instance).chain(leading.iter()) {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        EventIds(h)
    }

    pub fn id(&self, last: &str) -> String {
        let mut h = self.0.clone();
        h.update((last.len() as u64).to_be_bytes());
        h.update(last.as_bytes());
        hex16(&h.finalize())
    }
}

/// Who a record comes from, pre-rendered once so building an envelope is a few memcpy.
#[derive(Clone, Debug)]
pub struct Context {
    pub dataset: String,
    pub instance: String,
    /// The source kind (`postgres`, `kafka`, ...).
    pub kind: String,
    prefix: String,
    meta_head: String,
    meta_tail: String,
}

impl Context {
    pub fn new(dataset: &str, instance: &str, kind: &str) -> Context {
        let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
        Context {
            dataset: dataset.to_string(),
            instance: instance.to_string(),
            kind: kind.to_string(),
            prefix: format!("{{\"dataset\":{},\"event\":", q(dataset)),
            meta_head: ",\"obsrv_meta\":{\"syncts\":".to_string(),
            meta_tail: format!(
                ",\"flags\":{{}},\"timespans\":{{}},\"error\":{{}},\"source\":{{\"connector\":{},\"connectorInstance\":{}}}}}}}",
                q(kind),
                q(instance)
            ),
        }
    }

    /// The envelope around `event`, which must be the text of a JSON object.
    pub fn envelope(&self, event: &str, syncts_ms: i64) -> Vec<u8> {
        self.envelope_at(event, &syncts_ms.to_string())
    }

    /// [`Context::envelope`] with the timestamp already rendered (once per batch).
    pub fn envelope_at(&self, event: &str, ts: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.envelope_into(&mut out, event, ts);
        out
    }

    /// [`Context::envelope_at`] written into `out` (cleared first), so one buffer serves a batch.
    pub fn envelope_into(&self, out: &mut Vec<u8>, event: &str, ts: &str) {
        out.clear();
        out.reserve(
            self.prefix.len()
                + event.len()
                + self.meta_head.len()
                + ts.len()
                + self.meta_tail.len(),
        );
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(self.meta_head.as_bytes());
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(self.meta_tail.as_bytes());
    }

    /// [`Context::envelope_into`] with `meta` (the text of a JSON object: what the source knows
    /// about the message that carried the event) as `obsrv_meta.source.message`.
    pub fn envelope_with_meta_into(&self, out: &mut Vec<u8>, event: &str, meta: &str, ts: &str) {
        self.envelope_into(out, event, ts);
        // The tail ends with the closing braces of `source`, `obsrv_meta` and the envelope.
        out.truncate(out.len() - 3);
        out.extend_from_slice(b",\"message\":");
        out.extend_from_slice(meta.as_bytes());
        out.extend_from_slice(b"}}}");
    }

    /// The failed-topic document for a record that cannot be ingested.
    pub fn failed(&self, event: serde_json::Value, code: &str, msg: &str) -> Vec<u8> {
        let doc = json!({
            "event": event,
            "error": {"error_code": code, "error_msg": msg},
            "connector_ctx": {
                "connector_id": self.kind,
                "dataset_id": self.dataset,
                "connector_instance_id": self.instance,
                "connector_type": "source",
            },
        });
        serde_json::to_vec(&doc).expect("JSON values serialize")
    }
}

/// What a source hands over for one record.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// The text of a JSON object (a database that rendered the row as JSON, or validated input).
    Json(String),
    /// Input that is not a JSON object, with why.
    Unparseable { raw: String, reason: String },
    /// A JSON object and, as the text of a JSON object, what the source knows about the message
    /// that carried it (a broker's headers and properties): the envelope's
    /// `obsrv_meta.source.message`.
    JsonWithMeta { event: String, meta: String },
    /// The text of a JSON object with a message key of its own: a change-data-capture event keyed
    /// by its row's primary key, so the changes of one row stay in order on one partition. The
    /// event id still travels in the `obsrv-event-id` header.
    Keyed { json: String, key: String },
}

impl Payload {
    /// Bytes of the payload's text, for batch limits.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(s) | Payload::Keyed { json: s, .. } => s.len(),
            Payload::JsonWithMeta { event, meta } => event.len() + meta.len(),
            Payload::Unparseable { raw, .. } => raw.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message key when it is not the event id.
    pub fn key(&self) -> Option<&str> {
        match self {
            Payload::Keyed { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Checks that `raw` is a JSON object, for sources whose input is not rendered by us.
pub fn validate(raw: &[u8]) -> Payload {
    match serde_json::from_slice::<&serde_json::value::RawValue>(raw) {
        Ok(v) if v.get().trim_start().starts_with('{') => Payload::Json(v.get().to_string()),
        Ok(_) => Payload::Unparseable {
            raw: String::from_utf8_lossy(raw).into_owned(),
            reason: "event is not a JSON object".into(),
        },
        Err(e) => Payload::Unparseable {
            raw: String::from_utf8_lossy(raw).into_owned(),
            reason: format!("event is not valid JSON: {e}"),
        },
    }
}

/// [`validate`] of bytes the caller gives up: a JSON object becomes the payload without a copy.
pub fn validate_owned(mut raw: Vec<u8>) -> Payload {
    let object = match serde_json::from_slice::<&serde_json::value::RawValue>(&raw) {
        Ok(v) if v.get().trim_start().starts_with('{') => {
            let start = v.get().as_ptr() as usize - raw.as_ptr() as usize;
            Some((start, v.get().len()))
        }
        _ => None,
    };
    match object {
        Some((start, len)) => {
            raw.truncate(start + len);
            raw.drain(..start);
            // RawValue only holds valid UTF-8.
            Payload::Json(
                String::from_utf8(raw)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            )
        }
        None => validate(&raw),
    }
}

/// Where a record goes, with the bytes to write.
#[derive(Debug, PartialEq)]
pub enum Routed {
    Ingest(Vec<u8>),
    /// The failed-topic document, with its error code and message (for logs and counts).
    Failed {
        doc: Vec<u8>,
        code: &'static str,
        message: String,
    },
}

/// Decides the topic and bytes for one record.
pub fn route(ctx: &Context, payload: &Payload, syncts_ms: i64, max_message_bytes: usize) -> Routed {
    route_at(ctx, payload, &syncts_ms.to_string(), max_message_bytes)
}

/// [`route`] with the sync timestamp already rendered as text.
pub fn route_at(
    ctx: &Context,
    payload: &Payload,
    syncts: &str,
    max_message_bytes: usize,
) -> Routed {
    match payload {
        Payload::Json(event)
        | Payload::Keyed { json: event, .. }
        | Payload::JsonWithMeta { event, .. } => {
            let env = match payload {
                Payload::JsonWithMeta { meta, .. } => {
                    let mut out = Vec::new();
                    ctx.envelope_with_meta_into(&mut out, event, meta, syncts);
                    out
                }
                _ => ctx.envelope_at(event, syncts),
            };
            if env.len() > max_message_bytes {
                let mut cut = FAILED_EVENT_PREVIEW_BYTES.min(event.len());
                while !event.is_char_boundary(cut) {
                    cut -= 1;
                }
                let msg = format!(
                    "record of {} bytes exceeds maxMessageBytes {}; event holds its first {} bytes",
                    env.len(),
                    max_message_bytes,
                    cut
                );
                Routed::Failed {
                    doc: ctx.failed(
                        serde_json::Value::String(event[..cut].to_string()),
                        CE_TOO_LARGE,
                        &msg,
                    ),
                    code: CE_TOO_LARGE,
                    message: msg,
                }
            } else {
                Routed::Ingest(env)
            }
        }
        Payload::Unparseable { raw, reason } => {
            let mut cut = FAILED_EVENT_PREVIEW_BYTES
                .max(max_message_bytes / 2)
                .min(raw.len());
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            Routed::Failed {
                doc: ctx.failed(
                    serde_json::Value::String(raw[..cut].to_string()),
                    CE_UNPARSEABLE,
                    reason,
                ),
                code: CE_UNPARSEABLE,
                message: reason.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn ids_from_a_shared_prefix_and_owned_validation_match_the_plain_ones() {
        let ids = EventIds::new("ns/c", &["bucket", "in/a.jsonl"]);
        assert_eq!(
            ids.id("42"),
            event_id("ns/c", &["bucket", "in/a.jsonl", "42"])
        );
        assert_ne!(ids.id("42"), ids.id("43"));
        assert_eq!(event_id("x", &[]).len(), 32);
        for raw in [&b" {\"a\": 1} "[..], b"[1]", b"{oops", b"\"s\""] {
            assert_eq!(validate_owned(raw.to_vec()), validate(raw), "{raw:?}");
        }
    }

    fn ctx() -> Context {
        Context::new("orders", "shop/orders-pg", "postgres")
    }

    #[test]
    fn envelope_matches_the_contract_field_by_field() {
        let bytes = ctx().envelope(r#"{"id":1,"note":"a \"q\""}"#, 1_700_000_000_123);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            json!({"dataset": "orders", "event": {"id": 1, "note": "a \"q\""},
                   "obsrv_meta": {"syncts": 1_700_000_000_123_i64, "flags": {}, "timespans": {}, "error": {},
                                  "source": {"connector": "postgres", "connectorInstance": "shop/orders-pg"}}})
        );
        // Key order as the contract writes it.
        let text = String::from_utf8(bytes).unwrap();
        let pos = |k: &str| text.find(k).unwrap();
        assert!(pos("\"dataset\"") < pos("\"event\"") && pos("\"event\"") < pos("\"obsrv_meta\""));
        assert!(pos("\"syncts\"") < pos("\"flags\"") && pos("\"error\"") < pos("\"source\""));
    }

    #[test]
    fn message_metadata_goes_to_obsrv_meta_source_and_leaves_the_event_alone() {
        let c = Context::new("orders", "shop/orders-mq", "rabbitmq");
        let p = Payload::JsonWithMeta {
            event: r#"{"id":1}"#.into(),
            meta: r#"{"routingKey":"order.created"}"#.into(),
        };
        let Routed::Ingest(bytes) = route(&c, &p, 7, 1 << 20) else {
            panic!("expected ingest")
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["event"], json!({"id": 1}));
        assert_eq!(
            v["obsrv_meta"]["source"],
            json!({"connector": "rabbitmq", "connectorInstance": "shop/orders-mq",
                   "message": {"routingKey": "order.created"}})
        );
        assert_eq!(v["obsrv_meta"]["syncts"], 7);
        // Oversize: the failed topic, like any event.
        assert!(matches!(route(&c, &p, 7, 40), Routed::Failed { .. }));
    }

    #[test]
    fn event_ids_are_hex_of_the_sha256_prefix() {
        // sha256 of len-prefixed ("i", "p") computed independently.
        let mut h = Sha256::new();
        h.update(1u64.to_be_bytes());
        h.update(b"i");
        h.update(1u64.to_be_bytes());
        h.update(b"p");
        let want: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(event_id("i", &["p"]), want);
    }

    #[test]
    fn event_ids_are_deterministic_and_position_specific() {
        let a = event_id("ns/c", &["public.t", "2024-01-01", "1"]);
        assert_eq!(a, event_id("ns/c", &["public.t", "2024-01-01", "1"]));
        assert_eq!(a.len(), 32);
        assert_ne!(a, event_id("ns/c", &["public.t", "2024-01-01", "2"]));
        assert_ne!(a, event_id("ns/other", &["public.t", "2024-01-01", "1"]));
        // Length prefixes: moving a boundary changes the id.
        assert_ne!(event_id("x", &["ab", "c"]), event_id("x", &["a", "bc"]));
    }

    #[test]
    fn unparseable_input_is_routed_to_failed_with_ce_1000() {
        let p = validate(b"{not json");
        let Routed::Failed { doc, .. } = route(&ctx(), &p, 1, 1 << 20) else {
            panic!("expected failed")
        };
        let v: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["event"], "{not json");
        assert_eq!(v["error"]["error_code"], "CE_1000");
        assert_eq!(
            v["connector_ctx"],
            json!({"connector_id": "postgres", "dataset_id": "orders", "connector_instance_id": "shop/orders-pg", "connector_type": "source"})
        );
        assert!(matches!(validate(b"[1,2]"), Payload::Unparseable { .. }));
        assert_eq!(validate(b" {\"a\":1} "), Payload::Json("{\"a\":1}".into()));
    }

    #[test]
    fn oversize_records_go_to_failed_with_ce_1001_and_stay_small() {
        let big = format!("{{\"blob\":\"{}\"}}", "é".repeat(3000));
        let Routed::Failed { doc, .. } = route(&ctx(), &Payload::Json(big.clone()), 1, 2048) else {
            panic!("expected failed")
        };
        let v: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["error"]["error_code"], "CE_1001");
        assert!(v["error"]["error_msg"].as_str().unwrap().contains("2048"));
        assert!(doc.len() < 2 * FAILED_EVENT_PREVIEW_BYTES);
        assert!(matches!(
            route(&ctx(), &Payload::Json(big), 1, 1 << 20),
            Routed::Ingest(_)
        ));
    }
}
