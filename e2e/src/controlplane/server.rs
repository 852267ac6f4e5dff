//! HTTP front of the API server: routing of Kubernetes REST paths, discovery, content negotiation
//! (JSON, YAML bodies, Table responses) and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::calls::{self, Call, CallLog};
use super::error::{ApiError, ApiResult};
use super::registry::ResourceType;
use super::store::{
    Change, DeleteOptions, PatchType, Selectors, Store, Sub, WatchFrom, WriteOptions,
};
use super::table;
use obsrv_crds::schema::UnknownFields;

/// Shared state of the HTTP handlers.
pub struct App {
    pub store: Arc<Store>,
    /// `host:port` the server listens on (for `/api`'s serverAddressByClientCIDRs).
    pub address: String,
    /// Directory of pod logs (`<namespace>_<name>.log`), served at `pods/<name>/log`.
    pub logs: std::path::PathBuf,
    /// Records every resource request when set (tests check them against RBAC).
    pub calls: Option<Arc<CallLog>>,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// What the request path names.
struct Target {
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    tracing::debug!(%method, %uri, "api request");
    match route(&app, &method, &path, &query, &headers, &body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %uri, code = e.code(), error = %e, "api error");
            e.into_response()
        }
    }
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["version"] => {
            return Ok(ok(&json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-obsrv-local", "gitCommit": "", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64",
            })));
        }
        ["api"] => {
            return Ok(ok(&json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.address}],
            })));
        }
        ["apis"] => return Ok(ok(&group_list(&app.store))),
        ["apis", group] => {
            let groups = group_list(&app.store);
            let g = groups["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["name"] == *group)
                .cloned();
            return g
                .map(|mut g| {
                    g["kind"] = json!("APIGroup");
                    g["apiVersion"] = json!("v1");
                    ok(&g)
                })
                .ok_or_else(|| ApiError::not_found("apigroups", group));
        }
        ["api", "v1"] => return Ok(ok(&resource_list(&app.store, "", "v1"))),
        ["apis", group, version] => {
            let list = resource_list(&app.store, group, version);
            if list["resources"].as_array().is_none_or(Vec::is_empty) {
                return Err(ApiError::not_found(
                    "apigroups",
                    &format!("{group}/{version}"),
                ));
            }
            return Ok(ok(&list));
        }
        ["openapi", "v3"] => return Ok(ok(&openapi_root(&app.store))),
        ["openapi", "v3", "api", "v1"] => return Ok(ok(&openapi_gv(&app.store, "", "v1"))),
        ["openapi", "v3", "apis", group, version] => {
            return Ok(ok(&openapi_gv(&app.store, group, version)));
        }
        ["openapi", ..] | ["swagger.json"] => {
            return Err(ApiError::not_found("openapi", path));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::not_found("paths", path)),
    };
    let target = parse_target(&app.store, group, version, rest)?;
    if let Some(log) = &app.calls {
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        log.record(Call {
            verb: calls::verb(method, target.name.is_some(), watch).into(),
            group: target.rt.group.clone(),
            resource: match &target.sub {
                Some(sub) => format!("{}/{sub}", target.rt.plural),
                None => target.rt.plural.clone(),
            },
            name: target.name.clone(),
        });
    }
    serve(app, method, target, query, headers, body).await
}

fn parse_target(store: &Store, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let resolve = |plural: &str| {
        store.resolve(group, version, plural).ok_or_else(|| {
            ApiError::not_found("the server could not find the requested resource", plural)
        })
    };
    let t = |rt, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        rt,
        namespace: ns.map(String::from),
        name: name.map(String::from),
        sub: sub.map(String::from),
    };
    let target = match rest {
        // /api/v1/namespaces/<ns>[/status] is the Namespace itself, not a namespaced collection.
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            t(resolve("namespaces")?, None, Some(ns), Some(sub))
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let rt = resolve(plural)?;
            if !rt.namespaced {
                return Err(ApiError::not_found(
                    "the server could not find the requested resource",
                    plural,
                ));
            }
            match tail {
                [] => t(rt, Some(ns), None, None),
                [name] => t(rt, Some(ns), Some(name), None),
                [name, sub] => t(rt, Some(ns), Some(name), Some(sub)),
                _ => {
                    return Err(ApiError::not_found(
                        "the server could not find the requested resource",
                        plural,
                    ));
                }
            }
        }
        [plural] => t(resolve(plural)?, None, None, None),
        [plural, name] => {
            let rt = resolve(plural)?;
            if rt.namespaced {
                return Err(ApiError::not_found(
                    "the server could not find the requested resource",
                    plural,
                ));
            }
            t(rt, None, Some(name), None)
        }
        [plural, name, sub] => {
            let rt = resolve(plural)?;
            if rt.namespaced {
                return Err(ApiError::not_found(
                    "the server could not find the requested resource",
                    plural,
                ));
            }
            t(rt, None, Some(name), Some(sub))
        }
        _ => return Err(ApiError::not_found("paths", &rest.join("/"))),
    };
    Ok(target)
}

fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = store
        .registry()
        .groups()
        .into_iter()
        .map(|(name, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/openapi/v3`: one document per group/version. The documents hold only the PATCH operations
/// with their parameters (enough for kubectl to see that the server validates fields itself with
/// `fieldValidation`), no schemas: `kubectl explain` does not work.
fn openapi_root(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    let registry = store.registry();
    for rt in registry.all() {
        let gv = if rt.group.is_empty() {
            "api/v1".to_string()
        } else {
            format!("apis/{}/{}", rt.group, rt.version)
        };
        paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", store.resource_version())}));
    }
    json!({"paths": paths})
}

fn openapi_gv(store: &Store, group: &str, version: &str) -> Value {
    let registry = store.registry();
    let mut paths = serde_json::Map::new();
    let params: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
        .iter()
        .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
        .collect();
    for rt in registry
        .all()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = if group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
        } else {
            format!("{prefix}/{}/{{name}}", rt.plural)
        };
        let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        paths.insert(
            path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", rt.kind),
                    "parameters": params,
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                },
            }),
        );
    }
    // Custom resources carry their CRD schema (so `kubectl explain connector.spec` works); built-in
    // kinds have none.
    let mut schemas = serde_json::Map::new();
    for rt in registry
        .all()
        .filter(|t| t.group == group && t.version == version)
    {
        if let Some(schema) = &rt.schema {
            let mut schema = schema.clone();
            schema["x-kubernetes-group-version-kind"] =
                json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
            let reversed: Vec<&str> = rt.group.split('.').rev().collect();
            schemas.insert(
                format!("{}.{}.{}", reversed.join("."), rt.version, rt.kind),
                schema,
            );
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-obsrv-local"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let registry = store.registry();
    let mut resources = Vec::new();
    for rt in registry
        .all()
        .filter(|t| t.group == group && t.version == version)
    {
        let mut r = json!({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced, "kind": rt.kind,
            "verbs": VERBS, "storageVersionHash": "",
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        resources.push(r);
        if rt.status_subresource {
            resources.push(json!({"name": format!("{}/status", rt.plural), "singularName": "", "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"]}));
        }
        if rt.scale.is_some() {
            resources.push(json!({"name": format!("{}/scale", rt.plural), "singularName": "", "namespaced": rt.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") }, "resources": resources})
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all("accept")
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(','))
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    let ct = headers
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") {
        return super::protobuf::decode(body).map_err(ApiError::UnsupportedMediaType);
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding JSON: {e}")))
    }
}

fn write_options(query: &HashMap<String, String>) -> WriteOptions {
    WriteOptions {
        field_manager: query.get("fieldManager").cloned(),
        force: query.get("force").is_some_and(|f| f == "true"),
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
        unknown_fields: match query.get("fieldValidation").map(String::as_str) {
            Some("Strict") => UnknownFields::Reject,
            _ => UnknownFields::Prune,
        },
    }
}

fn sub_of(target: &Target) -> ApiResult<Sub> {
    match target.sub.as_deref() {
        None => Ok(Sub::Main),
        Some("status") if target.rt.status_subresource => Ok(Sub::Status),
        Some("scale") if target.rt.scale.is_some() => Ok(Sub::Scale),
        Some(s) => Err(ApiError::not_found(
            &format!("{}/{s}", target.rt.qualified_plural()),
            target.name.as_deref().unwrap_or(""),
        )),
    }
}

async fn serve(
    app: &Arc<App>,
    method: &Method,
    target: Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let store = &app.store;
    let rt = target.rt.clone();
    let ns = target.namespace.clone().unwrap_or_default();
    if rt.kind == "Pod" && target.sub.as_deref() == Some("log") && *method == Method::GET {
        let name = target.name.clone().unwrap_or_default();
        store.get(&rt, &ns, &name)?;
        let text =
            std::fs::read_to_string(app.logs.join(format!("{ns}_{name}.log"))).unwrap_or_default();
        let text = match query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
            Some(n) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
            }
            None => text,
        };
        return Ok((StatusCode::OK, [("content-type", "text/plain")], text).into_response());
    }
    let sub = sub_of(&target)?;
    let table = wants_table(headers);
    let respond = |code: StatusCode, obj: Value, sub: Sub| -> ApiResult<Response> {
        let obj = if sub == Sub::Scale && obj.get("kind") != Some(&json!("Scale")) {
            Store::scale_of(&rt, &obj)?
        } else {
            obj
        };
        if table && sub == Sub::Main {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Ok(json_response(
                code,
                &table::table(
                    &rt,
                    &[obj],
                    &rv,
                    query
                        .get("includeObject")
                        .map_or("Metadata", String::as_str),
                    true,
                ),
            ));
        }
        Ok(json_response(code, &obj))
    };
    match (method.clone(), target.name.as_deref()) {
        (Method::GET, None) => {
            let sel = Selectors::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
            )?;
            let ns_filter = target.namespace.as_deref();
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(app, rt, ns_filter.map(String::from), sel, query, table);
            }
            let (items, rv) = store.list(&rt, ns_filter, &sel);
            let (items, page) = paginate(items, query)?;
            if table {
                let mut t = table::table(
                    &rt,
                    &items,
                    &rv.to_string(),
                    query
                        .get("includeObject")
                        .map_or("Metadata", String::as_str),
                    true,
                );
                if let Some((token, remaining)) = page {
                    t["metadata"]["continue"] = json!(token);
                    t["metadata"]["remainingItemCount"] = json!(remaining);
                }
                return Ok(ok(&t));
            }
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some((token, remaining)) = page {
                metadata["continue"] = json!(token);
                metadata["remainingItemCount"] = json!(remaining);
            }
            Ok(ok(&json!({
                "kind": format!("{}List", rt.kind),
                "apiVersion": rt.api_version(),
                "metadata": metadata,
                "items": items,
            })))
        }
        (Method::GET, Some(name)) => {
            let obj = store.get(&rt, &ns, name)?;
            if query.get("watch").is_some_and(|w| w == "true") {
                let sel = Selectors::parse(None, Some(&format!("metadata.name={name}")))?;
                return watch(app, rt, target.namespace.clone(), sel, query, table);
            }
            respond(StatusCode::OK, obj, sub)
        }
        (Method::POST, None) => {
            let obj = parse_body(headers, body)?;
            let created = store.create(&rt, &ns, obj, &write_options(query))?;
            respond(StatusCode::CREATED, created, Sub::Main)
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body(headers, body)?;
            let updated = store.replace(&rt, &ns, name, obj, sub, &write_options(query))?;
            respond(StatusCode::OK, updated, sub)
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get("content-type")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let ptype = match ct.split(';').next().unwrap_or("").trim() {
                "application/json-patch+json" => PatchType::Json,
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml"
                | "application/apply-patch+json"
                | "application/apply-patch+cbor" => PatchType::Apply,
                other => {
                    return Err(ApiError::UnsupportedMediaType(format!(
                        "the body of the request was in an unknown format ({other}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
                    )));
                }
            };
            let existed = store.get(&rt, &ns, name).is_ok();
            let out = store.patch(&rt, &ns, name, ptype, body, sub, &write_options(query))?;
            respond(
                if existed {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                },
                out,
                sub,
            )
        }
        (Method::DELETE, Some(name)) => {
            let opts = delete_options(query, body);
            let out = store.delete(&rt, &ns, name, &opts)?;
            respond(StatusCode::OK, out, Sub::Main)
        }
        (Method::DELETE, None) => {
            let sel = Selectors::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
            )?;
            let (items, rv) = store.list(&rt, target.namespace.as_deref(), &sel);
            let opts = delete_options(query, body);
            let mut deleted = Vec::new();
            for item in items {
                let (ins, iname) = (
                    item["metadata"]["namespace"].as_str().unwrap_or(""),
                    item["metadata"]["name"].as_str().unwrap_or(""),
                );
                if let Ok(d) = store.delete(&rt, ins, iname, &opts) {
                    deleted.push(d);
                }
            }
            Ok(ok(
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
            ))
        }
        (m, _) => Err(ApiError::MethodNotAllowed(format!(
            "the server does not allow this method on the requested resource: {m}"
        ))),
    }
}

/// `limit` / `continue` paging. Items come sorted by namespace and name; the token names the last
/// key returned, so a continued list shows the *current* state after that key (there is no snapshot
/// of the first page's resourceVersion, unlike etcd).
type Page = Option<(String, usize)>;

fn paginate(items: Vec<Value>, query: &HashMap<String, String>) -> ApiResult<(Vec<Value>, Page)> {
    use base64::Engine as _;
    let key = |o: &Value| {
        (
            o.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    };
    let mut items = items;
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let bad = || ApiError::BadRequest(format!("invalid continue token {token:?}"));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (ns, name) = text.split_once('/').ok_or_else(bad)?;
        let after = (ns.to_string(), name.to_string());
        items.retain(|o| key(o) > after);
    }
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    match limit {
        Some(limit) if items.len() > limit => {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let (ns, name) = items.last().map(key).unwrap_or_default();
            let token =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{ns}/{name}"));
            Ok((items, Some((token, remaining))))
        }
        _ => Ok((items, None)),
    }
}

fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> DeleteOptions {
    let b: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    DeleteOptions {
        propagation: query
            .get("propagationPolicy")
            .cloned()
            .or_else(|| b["propagationPolicy"].as_str().map(String::from))
            .or_else(|| {
                // Deprecated orphanDependents=true means Orphan.
                (b["orphanDependents"] == json!(true)).then(|| "Orphan".to_string())
            }),
        grace_period_seconds: query
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse().ok())
            .or_else(|| b["gracePeriodSeconds"].as_i64()),
        precondition_uid: b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        precondition_rv: b
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run: query.get("dryRun").is_some_and(|d| d == "All")
            || b["dryRun"]
                .as_array()
                .is_some_and(|d| d.contains(&json!("All"))),
    }
}

/// A watch stream: newline-delimited `{"type": ..., "object": ...}` events.
fn watch(
    app: &Arc<App>,
    rt: Arc<ResourceType>,
    ns: Option<String>,
    sel: Selectors,
    query: &HashMap<String, String>,
    table: bool,
) -> ApiResult<Response> {
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => WatchFrom::Now,
        Some(v) => WatchFrom::Version(
            v.parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    let send_initial = query.get("sendInitialEvents").is_some_and(|s| s == "true");
    let from = if send_initial { WatchFrom::Now } else { from };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let include = query
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    let key = rt.key();
    let watched = rt.clone();
    let bookmark_kind = rt.kind.clone();
    let bookmark_api_version = rt.api_version();
    let start = app.store.watch(&rt, ns.as_deref(), from);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let start = match start {
        Ok(s) => s,
        Err(e @ ApiError::Gone(_)) => {
            // Like the API server: 200 and an ERROR event carrying the 410 Status.
            let line = json!({"type": "ERROR", "object": e.status()}).to_string() + "\n";
            return Ok(
                (StatusCode::OK, [("content-type", "application/json")], line).into_response(),
            );
        }
        Err(e) => return Err(e),
    };
    let encode = move |kind: &str, obj: &Value| -> Bytes {
        let obj = if table && kind != "BOOKMARK" && kind != "ERROR" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            table::table(&rt, std::slice::from_ref(obj), &rv, &include, true)
        } else {
            obj.clone()
        };
        Bytes::from(json!({"type": kind, "object": obj}).to_string() + "\n")
    };
    tokio::spawn(async move {
        let mut last_rv = start.current_rv;
        for obj in &start.initial {
            if sel.matches(obj) && tx.send(Ok(encode("ADDED", obj))).await.is_err() {
                return;
            }
        }
        if send_initial {
            let bm = json!({"kind": bookmark_kind, "apiVersion": bookmark_api_version, "metadata": {"resourceVersion": last_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx.send(Ok(encode("BOOKMARK", &bm))).await.is_err() {
                return;
            }
        }
        if let WatchFrom::Version(v) = from {
            last_rv = v;
        }
        let mut pending: Vec<Arc<Change>> = start.backlog;
        let mut receiver = start.receiver;
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        );
        loop {
            for c in pending.drain(..) {
                if c.rv <= last_rv {
                    continue;
                }
                last_rv = c.rv;
                let c = Change {
                    object: Store::present(&c.object, &watched),
                    old: c.old.as_ref().map(|o| Store::present(o, &watched)),
                    key: c.key.clone(),
                    kind: c.kind,
                    namespace: c.namespace.clone(),
                    rv: c.rv,
                };
                if let Some((kind, obj)) = filter_change(&c, &sel)
                    && tx.send(Ok(encode(kind, obj))).await.is_err()
                {
                    return;
                }
            }
            tokio::select! {
                _ = &mut deadline => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": bookmark_kind, "apiVersion": bookmark_api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(Ok(encode("BOOKMARK", &bm))).await.is_err() {
                        return;
                    }
                }
                r = receiver.recv() => match r {
                    Ok(c) => {
                        if c.key == key && ns.as_deref().is_none_or(|n| n == c.namespace) {
                            pending.push(c);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::Gone("the watch fell behind; restart it from a newer resourceVersion".into());
                        let _ = tx.send(Ok(Bytes::from(json!({"type": "ERROR", "object": gone.status()}).to_string() + "\n"))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// How a change looks to a watcher with a selector: objects entering or leaving its view are
/// ADDED / DELETED.
fn filter_change<'a>(c: &'a Change, sel: &Selectors) -> Option<(&'static str, &'a Value)> {
    let now = sel.matches(&c.object);
    let before = c.old.as_ref().is_some_and(|o| sel.matches(o));
    match c.kind {
        "DELETED" => (now || before).then_some(("DELETED", &c.object)),
        "ADDED" => now.then_some(("ADDED", &c.object)),
        _ => match (before, now) {
            (true, true) => Some(("MODIFIED", &c.object)),
            (false, true) => Some(("ADDED", &c.object)),
            (true, false) => Some(("DELETED", &c.object)),
            (false, false) => None,
        },
    }
}
