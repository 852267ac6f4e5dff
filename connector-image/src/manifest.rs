//! Reading what a connector runs: a file of Kubernetes manifests (a Connector, usually with the
//! Secret it references, as every shipped example is) or the operator's rendered runtime config.
//!
//! A Connector is checked as the API server would check it under kubectl's default strict field
//! validation (the CRD's own schema and CEL rules, through `obsrv_crds::schema`), so a misspelt
//! field fails here with its path and the closest valid name instead of being silently dropped.

use std::collections::BTreeMap;

use base64::Engine as _;
use obsrv_crds::{
    Connector,
    runtime::RuntimeConfig,
    schema::{self, Cause, UnknownFields},
};
use serde_json::Value;

use crate::error::{Error, Result};

/// Secret values found in the same file, by `(secretName, key)`.
pub type FileSecrets = BTreeMap<(String, String), String>;

/// What a config file holds for one connector.
#[derive(Debug)]
pub struct Manifest {
    pub config: RuntimeConfig,
    /// `stringData`/`data` of the Secrets in the file (local runs need no `--secrets-dir` then).
    pub secrets: FileSecrets,
}

/// Parses a config file. `name` picks one Connector when the file holds several.
pub fn parse(text: &str, name: Option<&str>) -> Result<Manifest> {
    let docs = documents(text)?;
    let connectors: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Connector").collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    if connectors.is_empty() {
        // The operator's ConfigMap file: a RuntimeConfig, no `kind`.
        if let [doc] = docs.as_slice()
            && doc.get("kind").is_none()
        {
            return Ok(Manifest {
                config: runtime_config(doc)?,
                secrets: FileSecrets::new(),
            });
        }
        return Err(Error::Config(format!(
            "the file holds no Connector (found {}): give a Connector manifest",
            if kinds.is_empty() {
                "no Kubernetes objects".to_string()
            } else {
                kinds.join(", ")
            }
        )));
    }
    let names: Vec<&str> = connectors
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap_or(""))
        .collect();
    let doc = match (name, connectors.as_slice()) {
        (Some(n), _) => *connectors
            .iter()
            .find(|c| c["metadata"]["name"] == n)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no Connector named {n} in the file (it holds {})",
                    names.join(", ")
                ))
            })?,
        (None, [one]) => *one,
        (None, _) => {
            return Err(Error::Config(format!(
                "the file holds {} Connectors ({}): choose one with --name",
                connectors.len(),
                names.join(", ")
            )));
        }
    };
    let connector = checked_connector(doc)?;
    let metadata = &connector.metadata;
    let name = metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Config("the Connector manifest has no metadata.name".into()))?;
    Ok(Manifest {
        config: RuntimeConfig {
            namespace: metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name,
            uid: metadata.uid.clone(),
            spec: connector.spec,
        },
        secrets: secrets_in(&docs)?,
    })
}

/// The YAML documents of `text`, as JSON values (empty documents skipped).
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(d)
            .map_err(|e| Error::Config(format!("the file is not valid YAML: {e}")))?;
        if v.is_null() {
            continue;
        }
        let json = serde_json::to_value(&v)
            .map_err(|e| Error::Config(format!("the file is not valid YAML: {e}")))?;
        out.push(json);
    }
    Ok(out)
}

/// A Connector document checked against the CRD (defaults applied), then typed.
fn checked_connector(doc: &Value) -> Result<Connector> {
    let schema = obsrv_crds::connector_schema();
    let defaulted = schema::validate(&schema, doc, None, UnknownFields::Reject)
        .map_err(|causes| Error::Config(explain(&schema, doc, &causes)))?;
    serde_json::from_value(defaulted)
        .map_err(|e| Error::Config(format!("not a valid Connector manifest: {e}")))
}

/// The operator's runtime config; its spec is checked like a Connector's.
fn runtime_config(doc: &Value) -> Result<RuntimeConfig> {
    let as_connector = serde_json::json!({
        "apiVersion": "obsrv.io/v1alpha1",
        "kind": "Connector",
        "metadata": {"name": doc["name"], "namespace": doc["namespace"]},
        "spec": doc["spec"],
    });
    let c = checked_connector(&as_connector)?;
    let mut rc: RuntimeConfig = serde_json::from_value(doc.clone())
        .map_err(|e| Error::Config(format!("not a valid runtime config: {e}")))?;
    rc.spec = c.spec;
    Ok(rc)
}

/// One line per cause, naming the field: `spec.source.postgres.port: expected an integer, got
/// "15432x"`; `unknown field spec.x.tiebreaker, did you mean tieBreaker?`.
fn explain(schema: &Value, doc: &Value, causes: &[Cause]) -> String {
    let lines: Vec<String> = causes
        .iter()
        .map(|c| {
            if c.is_unknown_field() {
                let field = c.path.rsplit('.').next().unwrap_or(&c.path);
                match closest(field, &siblings(schema, &c.path)) {
                    Some(s) => format!("unknown field `{}`, did you mean `{s}`?", c.path),
                    None => format!("unknown field `{}`", c.path),
                }
            } else if c.reason == "FieldValueTypeInvalid" {
                let want = c.message.rsplit("must be of type ").next().unwrap_or("");
                let got = lookup(doc, &c.path)
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                format!("{}: expected {}, got {got}", c.path, article(want))
            } else if c.reason == "FieldValueRequired" {
                format!("{}: required, but missing", c.path)
            } else if c.path.is_empty() {
                c.message.clone()
            } else {
                // CEL and enum messages: drop the API's `Invalid value: "string":` prefix.
                let msg = c
                    .message
                    .split_once("\": ")
                    .filter(|_| c.message.starts_with("Invalid value: \""))
                    .map_or(c.message.as_str(), |(_, m)| m);
                format!("{}: {msg}", c.path)
            }
        })
        .collect();
    lines.join("\n")
}

fn article(t: &str) -> String {
    match t {
        "integer" => "an integer".into(),
        "object" => "an object".into(),
        "array" => "a list".into(),
        "" => "another type".into(),
        other => format!("a {other}"),
    }
}

/// The field names the schema allows next to the (unknown) field at `path`.
fn siblings(schema: &Value, path: &str) -> Vec<String> {
    let mut s = schema;
    let mut parts: Vec<&str> = path.split('.').collect();
    parts.pop();
    for part in parts {
        let (name, indexed) = match part.split_once('[') {
            Some((n, _)) => (n, true),
            None => (part, false),
        };
        s = &s["properties"][name];
        if indexed {
            s = &s["items"];
        }
    }
    s["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The candidate closest to `name`: same letters in another case, or a few edits away.
pub fn closest(name: &str, candidates: &[String]) -> Option<String> {
    if let Some(c) = candidates.iter().find(|c| c.eq_ignore_ascii_case(name)) {
        return Some(c.clone());
    }
    let limit = (name.len() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edits(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| match k.split_once('[') {
        Some((n, rest)) => v
            .get(n)?
            .get(rest.trim_end_matches(']').parse::<usize>().ok()?),
        None => v.get(k),
    })
}

/// `stringData` and (base64) `data` of every Secret in the file.
fn secrets_in(docs: &[Value]) -> Result<FileSecrets> {
    let mut out = FileSecrets::new();
    for d in docs.iter().filter(|d| d["kind"] == "Secret") {
        let name = d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for (k, v) in d["data"].as_object().into_iter().flatten() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .map_err(|e| Error::Config(format!("Secret {name} data.{k} is not base64: {e}")))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::Config(format!("Secret {name} data.{k} is not UTF-8 text")))?;
            out.insert((name.clone(), k.clone()), text);
        }
        // stringData wins over data, as the API server merges them.
        for (k, v) in d["stringData"].as_object().into_iter().flatten() {
            out.insert(
                (name.clone(), k.clone()),
                v.as_str().unwrap_or_default().to_string(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SECRET_AND_CONNECTOR: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: pg-creds}
stringData: {username: app}
data: {password: czNjcmV0}
---
apiVersion: obsrv.io/v1alpha1
kind: Connector
metadata: {name: orders, namespace: shop}
spec:
  dataset: orders
  source:
    postgres:
      host: localhost
      database: shop
      credentials: {secretName: pg-creds}
      tables: [{name: public.orders, cursor: {column: updated_at, tieBreaker: id}}]
"#;

    #[test]
    fn a_secret_and_a_connector_in_one_file() {
        let m = parse(SECRET_AND_CONNECTOR, None).unwrap();
        assert_eq!(m.config.instance_id(), "shop/orders");
        assert_eq!(
            m.config
                .spec
                .source
                .postgres
                .as_ref()
                .unwrap()
                .poll_interval,
            "30s"
        );
        assert_eq!(m.secrets[&("pg-creds".into(), "username".into())], "app");
        assert_eq!(m.secrets[&("pg-creds".into(), "password".into())], "s3cret");
    }

    #[test]
    fn a_connector_without_a_name_is_refused() {
        let e = parse(&SECRET_AND_CONNECTOR.replace("name: orders, ", ""), None).unwrap_err();
        assert!(e.to_string().contains("metadata.name"), "{e}");
    }

    #[test]
    fn several_connectors_need_a_name() {
        let two = format!(
            "{SECRET_AND_CONNECTOR}---\n{}",
            SECRET_AND_CONNECTOR
                .split("---")
                .nth(1)
                .unwrap()
                .replace("name: orders,", "name: invoices,")
        );
        let e = parse(&two, None).unwrap_err().to_string();
        assert!(
            e.contains("orders, invoices") && e.contains("--name"),
            "{e}"
        );
        assert_eq!(
            parse(&two, Some("invoices")).unwrap().config.name,
            "invoices"
        );
        let e = parse(&two, Some("refunds")).unwrap_err().to_string();
        assert!(e.contains("no Connector named refunds"), "{e}");
    }

    #[test]
    fn misspelt_fields_name_their_path_and_the_closest_field() {
        let e = parse(
            &SECRET_AND_CONNECTOR.replace("tieBreaker", "tiebreaker"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "unknown field `spec.source.postgres.tables[0].cursor.tiebreaker`, did you mean `tieBreaker`?"
            ),
            "{e}"
        );
        let e = parse(
            &SECRET_AND_CONNECTOR
                .replace("database: shop", "database: shop\n      pollIntervall: 5s"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean `pollInterval`?"), "{e}");
    }

    #[test]
    fn type_errors_and_rules_name_the_field() {
        let e = parse(
            &SECRET_AND_CONNECTOR.replace("host: localhost", "host: localhost\n      port: 15432x"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "configuration: spec.source.postgres.port: expected an integer, got \"15432x\""
        );
        let e = parse(
            &SECRET_AND_CONNECTOR.replace(
                "database: shop",
                "database: shop\n      pollInterval: 5 minutes",
            ),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("spec.source.postgres.pollInterval: pollInterval must be a duration"),
            "{e}"
        );
    }

    #[test]
    fn a_runtime_config_is_checked_like_a_manifest() {
        let rc = parse(SECRET_AND_CONNECTOR, None).unwrap().config;
        let text = serde_yaml::to_string(&rc).unwrap();
        assert_eq!(parse(&text, None).unwrap().config, rc);
        let bad = text.replace("tieBreaker", "tiebreaker");
        assert!(
            parse(&bad, None)
                .unwrap_err()
                .to_string()
                .contains("did you mean")
        );
    }

    #[test]
    fn closest_names() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            closest("tiebreaker", &c(&["column", "tieBreaker"])).as_deref(),
            Some("tieBreaker")
        );
        assert_eq!(
            closest("pollIntervall", &c(&["pollInterval", "port"])).as_deref(),
            Some("pollInterval")
        );
        assert_eq!(closest("zzz", &c(&["host", "port"])), None);
    }
}
