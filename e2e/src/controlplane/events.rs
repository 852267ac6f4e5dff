//! Conversion between core `v1` Events (what `kubectl get events` and `kubectl describe` read) and
//! `events.k8s.io/v1` Events (what kube-rs' `Recorder` writes). Both are stored once, in the
//! `events.k8s.io/v1` form, like the API server does.

use serde_json::{Map, Value, json};

fn copy(from: &Value, to: &mut Map<String, Value>, src: &str, dst: &str) {
    if let Some(v) = from.get(src).filter(|v| !v.is_null()) {
        to.insert(dst.into(), v.clone());
    }
}

/// `events.k8s.io/v1` → `v1`.
pub fn to_core(e: &Value) -> Value {
    let mut o = Map::new();
    o.insert("apiVersion".into(), json!("v1"));
    o.insert("kind".into(), json!("Event"));
    copy(e, &mut o, "metadata", "metadata");
    copy(e, &mut o, "regarding", "involvedObject");
    copy(e, &mut o, "related", "related");
    copy(e, &mut o, "reason", "reason");
    copy(e, &mut o, "note", "message");
    copy(e, &mut o, "type", "type");
    copy(e, &mut o, "action", "action");
    copy(e, &mut o, "eventTime", "eventTime");
    copy(e, &mut o, "reportingController", "reportingComponent");
    copy(e, &mut o, "reportingInstance", "reportingInstance");
    let source = e.get("deprecatedSource").cloned().unwrap_or_else(
        || json!({"component": e.get("reportingController").cloned().unwrap_or(json!(""))}),
    );
    o.insert("source".into(), source);
    let event_time = e.get("eventTime").filter(|v| !v.is_null()).cloned();
    let last = e
        .get("deprecatedLastTimestamp")
        .filter(|v| !v.is_null())
        .cloned()
        .or_else(|| e.pointer("/series/lastObservedTime").cloned())
        .or_else(|| event_time.clone())
        .map(seconds);
    let first = e
        .get("deprecatedFirstTimestamp")
        .filter(|v| !v.is_null())
        .cloned()
        .or(event_time)
        .map(seconds);
    o.insert("firstTimestamp".into(), first.unwrap_or(Value::Null));
    o.insert("lastTimestamp".into(), last.unwrap_or(Value::Null));
    let count = e
        .get("deprecatedCount")
        .and_then(Value::as_i64)
        .or_else(|| e.pointer("/series/count").and_then(Value::as_i64))
        .unwrap_or(1);
    o.insert("count".into(), json!(count));
    if let Some(series) = e.get("series").filter(|v| !v.is_null()) {
        o.insert(
            "series".into(),
            json!({"count": series["count"], "lastObservedTime": series["lastObservedTime"]}),
        );
    }
    Value::Object(o)
}

/// `MicroTime` (`...T10:00:00.123456Z`) → `Time` (`...T10:00:00Z`).
fn seconds(v: Value) -> Value {
    match v.as_str() {
        Some(s) if s.contains('.') => {
            let base = s.split('.').next().unwrap_or(s);
            json!(format!("{base}Z"))
        }
        _ => v,
    }
}

/// `v1` → `events.k8s.io/v1`.
pub fn from_core(e: &Value) -> Value {
    let mut o = Map::new();
    o.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    o.insert("kind".into(), json!("Event"));
    copy(e, &mut o, "metadata", "metadata");
    copy(e, &mut o, "involvedObject", "regarding");
    copy(e, &mut o, "related", "related");
    copy(e, &mut o, "reason", "reason");
    copy(e, &mut o, "message", "note");
    copy(e, &mut o, "type", "type");
    copy(e, &mut o, "action", "action");
    copy(e, &mut o, "source", "deprecatedSource");
    copy(e, &mut o, "firstTimestamp", "deprecatedFirstTimestamp");
    copy(e, &mut o, "lastTimestamp", "deprecatedLastTimestamp");
    copy(e, &mut o, "count", "deprecatedCount");
    copy(e, &mut o, "reportingInstance", "reportingInstance");
    match e
        .get("reportingComponent")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
    {
        Some(c) => o.insert("reportingController".into(), c.clone()),
        None => o.insert(
            "reportingController".into(),
            e.pointer("/source/component").cloned().unwrap_or(json!("")),
        ),
    };
    let event_time = e
        .get("eventTime")
        .filter(|v| !v.is_null())
        .or_else(|| e.get("lastTimestamp").filter(|v| !v.is_null()))
        .or_else(|| e.get("firstTimestamp").filter(|v| !v.is_null()))
        .cloned()
        .unwrap_or(Value::Null);
    o.insert("eventTime".into(), event_time);
    copy(e, &mut o, "series", "series");
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_events_read_as_core_events() {
        let e = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "orders.1", "namespace": "default"},
            "regarding": {"kind": "Connector", "name": "orders", "namespace": "default", "uid": "u"},
            "reason": "Created", "note": "Created Deployment orders", "type": "Normal", "action": "Apply",
            "eventTime": "2026-01-01T10:00:00.123456Z", "reportingController": "obsrv-operator", "reportingInstance": "op-1",
        });
        let core = to_core(&e);
        assert_eq!(core["involvedObject"]["name"], "orders");
        assert_eq!(core["message"], "Created Deployment orders");
        assert_eq!(core["lastTimestamp"], "2026-01-01T10:00:00Z");
        assert_eq!(core["source"]["component"], "obsrv-operator");
        assert_eq!(core["count"], 1);
        let back = from_core(&core);
        assert_eq!(back["regarding"], e["regarding"]);
        assert_eq!(back["note"], e["note"]);
        assert_eq!(back["reportingController"], "obsrv-operator");
    }
}
