//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), which is what
//! `kubectl get` prints.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::registry::{CellSource, Column, ResourceType};

/// Go's `duration.HumanDuration`, the format of the AGE column.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    format!("{}y", hours / 24 / 365)
}

/// Evaluates a Kubernetes JSONPath (`.status.conditions[?(@.type=="Ready")].status`).
pub fn jsonpath(obj: &Value, path: &str) -> Value {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let expr = if path.starts_with('$') {
        path.to_string()
    } else {
        format!("${path}")
    };
    match jsonpath_rust::query::js_path_vals(&expr, obj) {
        Ok(found) => match found.as_slice() {
            [] => Value::Null,
            [one] => (*one).clone(),
            many => {
                let parts: Vec<String> = many
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect();
                Value::String(parts.join(","))
            }
        },
        Err(_) => Value::Null,
    }
}

fn cell(column: &Column, obj: &Value, now: DateTime<Utc>) -> Value {
    let v = match &column.source {
        CellSource::JsonPath(p) => jsonpath(obj, p),
        CellSource::Computed(f) => f(obj),
    };
    match (column.type_.as_str(), &v) {
        ("date", Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::String(human_duration((now - t.with_timezone(&Utc)).num_seconds())),
            Err(_) => v,
        },
        ("string", Value::Number(_) | Value::Bool(_)) => Value::String(v.to_string()),
        ("string", Value::Object(_) | Value::Array(_)) => Value::String(v.to_string()),
        _ => v,
    }
}

/// The partial object kubectl receives with each row (`includeObject=Metadata`, the default).
fn row_object(obj: &Value, include: &str) -> Value {
    match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => {
            let mut meta = obj.get("metadata").cloned().unwrap_or(json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
            }
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
        }
    }
}

/// A `Table` of `objects`; `resource_version` goes into its list metadata.
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    resource_version: &str,
    include: &str,
    with_definitions: bool,
) -> Value {
    let now = Utc::now();
    let mut defs = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": if rt.is_core_event() { 1 } else { 0 },
        "description": "Name must be unique within a namespace.",
    })];
    for c in &rt.columns {
        defs.push(json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority}));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            cells.extend(rt.columns.iter().map(|c| cell(c, o, now)));
            json!({"cells": cells, "object": row_object(o, include)})
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "rows": rows,
    });
    t["columnDefinitions"] = if with_definitions {
        Value::Array(defs)
    } else {
        Value::Null
    };
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_filters_like_kubectl() {
        let obj = json!({"status": {"conditions": [{"type": "Stalled", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(
            jsonpath(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            json!("True")
        );
        assert_eq!(jsonpath(&obj, ".status.lag.records"), Value::Null);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 30), "30h");
        assert_eq!(human_duration(86400 * 3 + 3600), "3d1h");
    }
}
