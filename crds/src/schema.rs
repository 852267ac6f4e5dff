//! Validation of custom resources against their CRD's `openAPIV3Schema`, as an API server does it:
//! defaults, unknown-field pruning (or rejection with `fieldValidation=Strict`), types, `required`,
//! `enum`, bounds, and the `x-kubernetes-validations` CEL rules (evaluated by kube's client-side CEL
//! engine, `kube-cel`). The local control plane validates every custom resource with it, and the
//! runtime's `check`/`run` validate a Connector manifest with it before running anything, so both
//! say what `kubectl apply` against a real cluster would.

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::{Map, Value};

/// One reason an object was rejected (an API server's `Status.details.causes[]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`, ...
    pub reason: String,
    /// Dotted path of the field as the API reports it, e.g. `spec.source` (empty for unknown fields,
    /// whose path is in the message, like a real API server's strict decoding error).
    pub field: String,
    /// Dotted path of the offending field, always set (`spec.source.postgres.tables[0].cursor.tiebreaker`).
    pub path: String,
    pub message: String,
}

impl Cause {
    /// Whether the field is not in the schema at all.
    pub fn is_unknown_field(&self) -> bool {
        self.field.is_empty() && self.message.starts_with("unknown field")
    }
}

thread_local! {
    /// The CEL environment with Kubernetes' functions, built once per thread.
    static VALIDATOR: Validator = Validator::new();
}

/// What to do with fields the schema does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownFields {
    /// Drop them silently (the API's default).
    Prune,
    /// `fieldValidation=Strict` (kubectl's default): reject the object.
    Reject,
}

/// A CRD's schema with its CEL rules compiled once (compiling them is most of a validation's cost),
/// for the whole object and for `.status` alone (what a write to the status subresource is checked
/// against, as the API server does).
#[derive(Debug)]
pub struct Rules {
    main: CompiledSchema,
    status_schema: Value,
    status: CompiledSchema,
}

impl Rules {
    pub fn new(schema: &Value) -> Rules {
        let status_schema = status_part(schema);
        Rules {
            main: compile_schema(schema),
            status: compile_schema(&status_schema),
            status_schema,
        }
    }

    /// [`validate`] of `object` against `schema` (the one these rules were compiled from), or
    /// against its `.status` alone.
    pub fn validate(
        &self,
        schema: &Value,
        object: &Value,
        old: Option<&Value>,
        unknown: UnknownFields,
        status_only: bool,
    ) -> Result<Value, Vec<Cause>> {
        if status_only {
            validate_with(&self.status_schema, &self.status, object, old, unknown)
        } else {
            validate_with(schema, &self.main, object, old, unknown)
        }
    }
}

/// Applies defaults and prunes unknown fields, then checks the object. `old` is the stored object on
/// updates: CEL transition rules such as `self == oldSelf` only run then, and errors at a path whose
/// value is the same as in `old` are not reported (Kubernetes' validation ratcheting, so an object
/// stored before a rule existed can still have its status or finalizers updated).
pub fn validate(
    schema: &Value,
    object: &Value,
    old: Option<&Value>,
    unknown: UnknownFields,
) -> Result<Value, Vec<Cause>> {
    validate_with(schema, &compile_schema(schema), object, old, unknown)
}

fn validate_with(
    schema: &Value,
    rules: &CompiledSchema,
    object: &Value,
    old: Option<&Value>,
    unknown: UnknownFields,
) -> Result<Value, Vec<Cause>> {
    let mut out = kube::core::cel::apply_defaults(schema, object);
    let mut causes = Vec::new();
    // Kubernetes does not validate apiVersion/kind/metadata against the CRD schema.
    if let Value::Object(root) = &mut out {
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, v) in root.iter_mut() {
            if ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                continue;
            }
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, v, k, unknown, &mut causes),
                None if preserves_unknown(schema) => {}
                None if unknown == UnknownFields::Reject => causes.push(unknown_field(k)),
                None => {}
            }
        }
        if unknown == UnknownFields::Prune && !preserves_unknown(schema) {
            root.retain(|k, _| {
                ["apiVersion", "kind", "metadata"].contains(&k.as_str())
                    || props.is_some_and(|p| p.contains_key(k))
            });
        }
        required(schema, root, "", &mut causes);
    }
    ratchet(&mut causes, &out, old);
    if !causes.is_empty() {
        return Err(causes);
    }
    if let Err(errors) = VALIDATOR.with(|v| v.validate_compiled(rules, &out, old)) {
        for e in errors.into_vec() {
            let field = e.field_path.trim_start_matches('.').to_string();
            causes.push(Cause {
                reason: e
                    .reason
                    .clone()
                    .unwrap_or_else(|| "FieldValueInvalid".into()),
                path: field.clone(),
                field,
                message: format!("Invalid value: \"object\": {}", e.message),
            });
        }
        // The CEL engine reports a rule on a field at its path; name the value's type like the API does.
        for c in &mut causes {
            if let Some(v) = lookup(&out, &c.field) {
                c.message = c
                    .message
                    .replacen("\"object\"", &format!("\"{}\"", type_name(v)), 1);
            }
        }
        ratchet(&mut causes, &out, old);
    }
    if causes.is_empty() {
        Ok(out)
    } else {
        Err(causes)
    }
}

/// Drops the errors at paths whose value did not change from `old`.
fn ratchet(causes: &mut Vec<Cause>, new: &Value, old: Option<&Value>) {
    if let Some(old) = old {
        causes.retain(|c| c.field.is_empty() || lookup(new, &c.field) != lookup(old, &c.field));
    }
}

/// The schema a write to the status subresource is checked against: `.status` only, every other
/// field kept as it is.
fn status_part(schema: &Value) -> Value {
    let status = schema
        .pointer("/properties/status")
        .cloned()
        .unwrap_or_else(
            || serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    serde_json::json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {"status": status},
    })
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(v);
    }
    path.split('.').try_fold(v, |v, k| {
        let (name, index) = match k.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (k, None),
        };
        let v = v.get(name)?;
        match index {
            Some(i) => v.get(i),
            None => Some(v),
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

fn unknown_field(path: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        field: String::new(),
        path: path.into(),
        message: format!("unknown field \"{path}\""),
    }
}

fn required(schema: &Value, obj: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    for r in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !obj.contains_key(r) {
            let field = if path.is_empty() {
                r.to_string()
            } else {
                format!("{path}.{r}")
            };
            causes.push(Cause {
                reason: "FieldValueRequired".into(),
                path: field.clone(),
                field,
                message: "Required value".into(),
            });
        }
    }
}

fn invalid(path: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        field: path.to_string(),
        path: path.to_string(),
        message,
    }
}

/// Checks `v` against `schema` at `path`, pruning unknown fields in place.
fn check(
    schema: &Value,
    v: &mut Value,
    path: &str,
    unknown: UnknownFields,
    causes: &mut Vec<Cause>,
) {
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            // The API drops nulls for non-nullable fields during defaulting/pruning.
            return;
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            causes.push(Cause {
                reason: "FieldValueTypeInvalid".into(),
                field: path.into(),
                path: path.into(),
                message: format!(
                    "Invalid value: \"{}\": {path} in body must be of type int-or-string",
                    type_name(v)
                ),
            });
        }
        return;
    }
    let expected = schema.get("type").and_then(Value::as_str);
    let ok = match expected {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        causes.push(Cause {
            reason: "FieldValueTypeInvalid".into(),
            field: path.into(),
            path: path.into(),
            message: format!(
                "Invalid value: \"{}\": {path} in body must be of type {}",
                type_name(v),
                expected.unwrap_or("")
            ),
        });
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: path.into(),
            path: path.into(),
            message: format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        });
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            causes.push(invalid(
                path,
                format!(
                    "Invalid value: {v}: {path} in body should be greater than or equal to {min}"
                ),
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            causes.push(invalid(
                path,
                format!("Invalid value: {v}: {path} in body should be less than or equal to {max}"),
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            causes.push(invalid(
                path,
                format!("Invalid value: {v}: {path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            causes.push(Cause {
                reason: "FieldValueTooLong".into(),
                field: path.into(),
                path: path.into(),
                message: format!("Too long: may not be more than {max} bytes"),
            });
        }
    }
    match v {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = preserves_unknown(schema);
            let mut drop = Vec::new();
            for (k, child) in obj.iter_mut() {
                let child_path = format!("{path}.{k}");
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check(s, child, &child_path, unknown, causes);
                } else if let Some(s) = additional {
                    check(s, child, &child_path, unknown, causes);
                } else if schema.get("additionalProperties") == Some(&Value::Bool(true)) || preserve
                {
                } else if props.is_some()
                    || schema.get("type").and_then(Value::as_str) == Some("object")
                {
                    match unknown {
                        UnknownFields::Reject => causes.push(unknown_field(&child_path)),
                        UnknownFields::Prune => drop.push(k.clone()),
                    }
                }
            }
            for k in drop {
                obj.remove(&k);
            }
            required(schema, obj, path, causes);
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                causes.push(invalid(
                    path,
                    format!(
                        "Invalid value: {}: {path} in body should have at least {min} items",
                        items.len()
                    ),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooMany".into(),
                    field: path.into(),
                    path: path.into(),
                    message: format!("Too many: {}: must have at most {max} items", items.len()),
                });
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(s, item, &format!("{path}[{i}]"), unknown, causes);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["dataset"],
                    "properties": {
                        "dataset": {"type": "string"},
                        "state": {"type": "string", "enum": ["Running", "Paused"], "default": "Running"},
                        "replicas": {"type": "integer", "x-kubernetes-validations": [{"rule": "self >= 0", "message": "replicas must not be negative"}]}
                    }
                }
            },
            "x-kubernetes-validations": [{"rule": "!has(oldSelf.spec) || self.spec.dataset == oldSelf.spec.dataset", "message": "spec.dataset is immutable"}]
        })
    }

    #[test]
    fn defaults_prunes_and_checks_types_and_enums() {
        let obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {}, "spec": {"dataset": "d", "extra": 1}});
        let out = validate(&schema(), &obj, None, UnknownFields::Prune).unwrap();
        assert_eq!(out["spec"], json!({"dataset": "d", "state": "Running"}));
        let bad = json!({"spec": {"state": "Gone", "replicas": "3", "extra": 1}});
        let causes = validate(&schema(), &bad, None, UnknownFields::Reject).unwrap_err();
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.state")
                && fields.contains(&"spec.replicas")
                && fields.contains(&"spec.dataset"),
            "{causes:?}"
        );
        assert!(
            causes
                .iter()
                .any(|c| c.message.contains("unknown field \"spec.extra\"")),
            "{causes:?}"
        );
    }

    #[test]
    fn cel_rules_and_transition_rules() {
        let err = validate(
            &schema(),
            &json!({"spec": {"dataset": "d", "replicas": -1}}),
            None,
            UnknownFields::Prune,
        )
        .unwrap_err();
        assert!(
            err[0].message.contains("replicas must not be negative"),
            "{err:?}"
        );
        let old = json!({"spec": {"dataset": "a"}});
        let err = validate(
            &schema(),
            &json!({"spec": {"dataset": "b"}}),
            Some(&old),
            UnknownFields::Prune,
        )
        .unwrap_err();
        assert!(
            err[0].message.contains("spec.dataset is immutable"),
            "{err:?}"
        );
    }
}
