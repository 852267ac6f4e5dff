//! PATCH semantics: JSON patch, merge patch, a strategic-merge subset, and server-side apply.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::error::{ApiError, ApiResult};

/// RFC 6902 JSON patch (`application/json-patch+json`), including `test` operations.
pub fn json_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let mut patch: json_patch::Patch = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
    let mut doc = target.clone();
    // Kubernetes treats a missing path as null in `test` (kube's finalizer helper relies on it:
    // `test /metadata/finalizers == null` before adding the first finalizer).
    patch.0.retain(|op| match op {
        json_patch::PatchOperation::Test(t) => {
            !(t.value.is_null() && doc.pointer(&t.path.to_string()).is_none())
        }
        _ => true,
    });
    json_patch::patch(&mut doc, &patch).map_err(|e| match e.kind {
        json_patch::PatchErrorKind::TestFailed => ApiError::Invalid {
            message: format!("the server rejected our request due to an error in our request: {e}"),
            kind: String::new(),
            name: String::new(),
            group: String::new(),
            causes: vec![],
        },
        _ => ApiError::Invalid {
            message: format!("the JSON patch could not be applied: {e}"),
            kind: String::new(),
            name: String::new(),
            group: String::new(),
            causes: vec![],
        },
    })?;
    Ok(doc)
}

/// RFC 7386 merge patch (`application/merge-patch+json`).
pub fn merge_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid merge patch: {e}")))?;
    let mut doc = target.clone();
    json_patch::merge(&mut doc, &patch);
    Ok(doc)
}

/// Merge key of the list at `field` in built-in kinds (`containers` by `name`, `ports` by
/// `containerPort`, ...). Lists without one are replaced, as strategic merge does for them.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets"
        | "ownerReferences" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        "conditions" => Some("type"),
        _ => None,
    }
}

/// Strategic merge patch (`application/strategic-merge-patch+json`) for the lists the project uses:
/// lists with a known merge key are merged element by element (`$patch: delete` removes one), every
/// other list is replaced; `$setElementOrder`, `$retainKeys` and other directives are honoured only
/// as far as ignoring them keeps the result right for those lists.
pub fn strategic_merge_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid strategic merge patch: {e}")))?;
    Ok(smp(target, &patch))
}

fn smp(target: &Value, patch: &Value) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        return Value::Object(
            p.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
    }
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                out.remove(k);
            }
            Value::Object(_) => {
                let merged = smp(out.get(k).unwrap_or(&Value::Null), v);
                out.insert(k.clone(), merged);
            }
            Value::Array(items) => {
                let merged = match (merge_key(k), out.get(k)) {
                    (Some(key), Some(Value::Array(current)))
                        if items.iter().all(|i| i.get(key).is_some()) =>
                    {
                        merge_list(current, items, key)
                    }
                    _ => Value::Array(
                        items
                            .iter()
                            .filter(|i| i.get("$patch").is_none())
                            .map(|i| smp(&Value::Null, i))
                            .collect(),
                    ),
                };
                out.insert(k.clone(), merged);
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

fn merge_list(current: &[Value], patch: &[Value], key: &str) -> Value {
    let mut out: Vec<Value> = current.to_vec();
    for item in patch {
        let id = &item[key];
        let pos = out.iter().position(|c| &c[key] == id);
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (Some(i), false) => out[i] = smp(&out[i], item),
            (None, false) => out.push(smp(&Value::Null, item)),
            (None, true) => {}
        }
    }
    Value::Array(out)
}

/// A field path (`["spec", "replicas"]`). Lists are atomic: a path ends at a list.
pub type FieldPath = Vec<String>;

/// The leaf fields an applied configuration sets. `apiVersion`, `kind`, `metadata.name`,
/// `metadata.namespace`, `metadata.resourceVersion` and `metadata.managedFields` are not owned.
pub fn field_set(applied: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Value::Object(m) = applied else {
        return out;
    };
    for (k, v) in m {
        if k == "apiVersion" || k == "kind" {
            continue;
        }
        if k == "metadata" {
            if let Value::Object(meta) = v {
                for (mk, mv) in meta {
                    if [
                        "name",
                        "namespace",
                        "resourceVersion",
                        "managedFields",
                        "uid",
                        "creationTimestamp",
                        "generation",
                    ]
                    .contains(&mk.as_str())
                    {
                        continue;
                    }
                    collect(mv, vec!["metadata".into(), mk.clone()], &mut out);
                }
            }
            continue;
        }
        collect(v, vec![k.clone()], &mut out);
    }
    out
}

fn collect(v: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let mut p = path.clone();
                p.push(k.clone());
                collect(v, p, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

/// `fieldsV1` (`{"f:spec": {"f:replicas": {}}}`) of a field set, as `metadata.managedFields` shows it.
pub fn to_fields_v1(set: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for seg in path {
            let entry = node.entry(format!("f:{seg}")).or_insert_with(|| json!({}));
            let Value::Object(next) = entry else { break };
            node = next;
        }
    }
    Value::Object(root)
}

/// The inverse of [`to_fields_v1`] (leaf paths only).
pub fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &FieldPath, out: &mut BTreeSet<FieldPath>) {
        let Value::Object(m) = v else { return };
        let children: Vec<(&String, &Value)> =
            m.iter().filter(|(k, _)| k.starts_with("f:")).collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, child) in children {
            let mut p = path.clone();
            p.push(k[2..].to_string());
            walk(child, &p, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &Vec::new(), &mut out);
    out
}

pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = v;
    for p in parents {
        match node.get_mut(p) {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Value::Object(m) = node {
        m.remove(last);
    }
}

/// Removes objects left empty by field removal (e.g. `metadata.labels` after its last label went).
fn prune_empty(v: &mut Value, path: &[String]) {
    for depth in (1..path.len()).rev() {
        let parent = &path[..depth];
        if get_path(v, parent).is_some_and(|p| p.as_object().is_some_and(Map::is_empty))
            && parent != ["metadata"]
        {
            remove_path(v, parent);
        }
    }
}

/// Deep merge: objects merge key by key, everything else (lists included) is replaced.
pub fn deep_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// One field manager's ownership, as kept in `metadata.managedFields`.
#[derive(Clone, Debug)]
pub struct Manager {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub subresource: String,
    pub fields: BTreeSet<FieldPath>,
    pub time: String,
}

pub fn managers(obj: &Value) -> Vec<Manager> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| Manager {
            manager: m["manager"].as_str().unwrap_or("").to_string(),
            operation: m["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: m["apiVersion"].as_str().unwrap_or("").to_string(),
            subresource: m["subresource"].as_str().unwrap_or("").to_string(),
            fields: from_fields_v1(&m["fieldsV1"]),
            time: m["time"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

pub fn set_managers(obj: &mut Value, managers: &[Manager]) {
    let list: Vec<Value> = managers
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// What a server-side apply asks for.
pub struct ApplyRequest<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub applied: &'a Value,
    /// `""` for the main resource, `"status"` for the status subresource.
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Server-side apply, simplified: every field the manager sets is owned by it; a field another
/// *apply* manager owns with a different value is a conflict unless `force` (then ownership moves);
/// fields the manager set last time and no longer sets are removed unless another manager owns
/// them. Lists are atomic. Non-apply writers (PUT, merge/JSON patch) do not take ownership.
pub fn server_side_apply(current: &Value, req: &ApplyRequest) -> ApiResult<Value> {
    let new_fields = field_set(req.applied);
    let mut all = managers(current);
    let mut conflicts = Vec::new();
    for m in all
        .iter_mut()
        .filter(|m| m.manager != req.manager && m.operation == "Apply")
    {
        let clashing: Vec<FieldPath> = m
            .fields
            .iter()
            .filter(|p| new_fields.contains(*p) && get_path(current, p) != get_path(req.applied, p))
            .cloned()
            .collect();
        if clashing.is_empty() {
            continue;
        }
        if req.force {
            for p in &clashing {
                m.fields.remove(p);
            }
        } else {
            for p in clashing {
                conflicts.push(format!("conflict with \"{}\": .{}", m.manager, p.join(".")));
            }
        }
    }
    if !conflicts.is_empty() {
        let n = conflicts.len();
        return Err(ApiError::Conflict(format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            conflicts.join("; ")
        )));
    }
    let mut result = current.clone();
    let previous = all
        .iter()
        .find(|m| {
            m.manager == req.manager && m.operation == "Apply" && m.subresource == req.subresource
        })
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let others: BTreeSet<FieldPath> = all
        .iter()
        .filter(|m| m.manager != req.manager)
        .flat_map(|m| m.fields.iter().cloned())
        .collect();
    for gone in previous.difference(&new_fields) {
        if !others.contains(gone) && !new_fields.iter().any(|n| n.starts_with(gone)) {
            remove_path(&mut result, gone);
            prune_empty(&mut result, gone);
        }
    }
    let mut applied = req.applied.clone();
    if let Some(meta) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    deep_merge(&mut result, &applied);
    let entry = Manager {
        manager: req.manager.to_string(),
        operation: "Apply".into(),
        api_version: req.api_version.to_string(),
        subresource: req.subresource.to_string(),
        fields: new_fields,
        time: req.now.to_string(),
    };
    // Keep the entry's position so an unchanged apply leaves managedFields unchanged.
    match all.iter().position(|m| {
        m.manager == req.manager && m.operation == "Apply" && m.subresource == req.subresource
    }) {
        Some(i) => all[i] = entry,
        None => all.push(entry),
    }
    set_managers(&mut result, &all);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(current: &Value, manager: &str, applied: Value, force: bool) -> ApiResult<Value> {
        server_side_apply(
            current,
            &ApplyRequest {
                manager,
                force,
                applied: &applied,
                subresource: "",
                api_version: "v1",
                now: "t",
            },
        )
    }

    #[test]
    fn apply_removes_fields_the_manager_no_longer_sets() {
        let base = json!({"metadata": {"name": "a"}});
        let one = apply(
            &base,
            "op",
            json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}, "data": {"k": "v"}}),
            false,
        )
        .unwrap();
        let two = apply(
            &one,
            "op",
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
            false,
        )
        .unwrap();
        assert_eq!(two["metadata"]["labels"], json!({"x": "1"}));
        assert!(two.get("data").is_none(), "{two}");
    }

    #[test]
    fn conflicting_apply_needs_force() {
        let base = json!({"metadata": {"name": "a"}});
        let one = apply(&base, "a", json!({"spec": {"replicas": 1}}), false).unwrap();
        let err = apply(&one, "b", json!({"spec": {"replicas": 2}}), false).unwrap_err();
        assert_eq!(err.code(), 409);
        assert!(err.to_string().contains(".spec.replicas"), "{err}");
        let forced = apply(&one, "b", json!({"spec": {"replicas": 2}}), true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        // "a" lost the field, so it no longer removes it when it stops applying it.
        let later = apply(&forced, "a", json!({"spec": {}}), false).unwrap();
        assert_eq!(later["spec"]["replicas"], 2);
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let dep = json!({"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b", "image": "y"}]}});
        let out = strategic_merge_patch(
            &dep,
            br#"{"$setElementOrder/containers":[{"name":"a"},{"name":"b"}],"spec":{"containers":[{"name":"a","image":"z"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["containers"][0],
            json!({"name": "a", "image": "z", "args": ["1"]})
        );
        assert_eq!(out["spec"]["containers"][1]["image"], "y");
        assert!(out.get("$setElementOrder/containers").is_none());
    }
}
