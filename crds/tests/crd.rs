//! The committed CRD is fresh, and its schema's CEL rules accept good manifests and reject bad ones
//! with the message a user sees from `kubectl apply`.

use std::path::{Path, PathBuf};

use kube::core::cel::Validator;
use obsrv_crds::Connector;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The openAPIV3Schema of the committed `crds/connector.yaml`: what a cluster really enforces.
fn committed_schema() -> Value {
    let text = std::fs::read_to_string(repo_root().join("crds/connector.yaml")).unwrap();
    let crd: Value = serde_yaml::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn validate(object: &Value, old: Option<&Value>) -> Result<(), String> {
    Validator::new()
        .validate(&committed_schema(), object, old)
        .map_err(|e| e.to_string())
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(kind),
    )
    .unwrap()
    .map(|e| e.unwrap().path())
    .collect();
    files.sort();
    assert!(!files.is_empty(), "no {kind} fixtures");
    files
}

#[test]
fn committed_crd_is_fresh() {
    let committed = std::fs::read_to_string(repo_root().join("crds/connector.yaml")).unwrap();
    assert!(
        committed == obsrv_crds::crd_yaml(),
        "crds/connector.yaml is stale: run `cargo run -q -p obsrv-crds --bin crdgen > crds/connector.yaml`"
    );
}

#[test]
fn crd_has_subresources_columns_and_names() {
    let crd: Value = serde_yaml::from_str(&obsrv_crds::crd_yaml()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(
        v["subresources"]["scale"]["specReplicasPath"],
        ".spec.scaling.replicas"
    );
    assert_eq!(
        v["subresources"]["scale"]["labelSelectorPath"],
        ".status.selector"
    );
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "Dataset", "Source", "State", "Ready", "Replicas", "Lag", "Age",
    ] {
        assert!(
            columns.contains(&want),
            "printer column {want} missing: {columns:?}"
        );
    }
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "conn");
    assert_eq!(crd["spec"]["names"]["categories"][0], "obsrv");
    let conditions =
        &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}

#[test]
fn valid_fixtures_pass_cel_and_deserialize() {
    for path in fixtures("valid") {
        for doc in yaml_docs(&path) {
            validate(&doc, None).unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
            let c: Connector =
                serde_json::from_value(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            c.spec
                .source
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn invalid_fixtures_are_rejected_with_their_message() {
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a `# expect:` first line", path.display()));
        let doc = &yaml_docs(&path)[0];
        match validate(doc, None) {
            Ok(()) => panic!("{} was accepted", path.display()),
            Err(e) => assert!(
                e.contains(expect),
                "{}: expected {expect:?} in {e}",
                path.display()
            ),
        }
    }
}

#[test]
fn dataset_is_immutable_but_other_fields_may_change() {
    let old = &yaml_docs(&fixtures("valid")[0])[0];
    let mut renamed = old.clone();
    renamed["spec"]["dataset"] = "invoices".into();
    let err = validate(&renamed, Some(old)).expect_err("changing spec.dataset must be refused");
    assert!(err.contains("spec.dataset is immutable"), "{err}");

    let mut paused = old.clone();
    paused["spec"]["state"] = "Paused".into();
    validate(&paused, Some(old)).expect("changing spec.state is allowed");
}

#[test]
fn examples_are_valid_connectors() {
    let dir = repo_root().join("examples");
    let mut kinds = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let docs = yaml_docs(&path);
        for doc in docs.iter().filter(|d| d["kind"] == "Connector") {
            validate(doc, None).unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
            let c: Connector = serde_json::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let source = c
                .spec
                .source
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            kinds.insert(source.kind.name);
            secrets_are_in_the_file(&path, &docs, &c);
        }
    }
    let all: std::collections::BTreeSet<&str> =
        obsrv_crds::SOURCE_KINDS.iter().map(|k| k.name).collect();
    assert_eq!(kinds, all, "examples/ holds one Connector per source kind");
}

/// Every Secret (and key) a Connector references is defined in its example file, in its namespace.
fn secrets_are_in_the_file(path: &Path, docs: &[Value], c: &Connector) {
    let secret = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| {
                panic!(
                    "{}: {} references Secret {name}, which the file does not define",
                    path.display(),
                    c.instance_id()
                )
            })
    };
    for name in obsrv_crds::runtime::referenced_secrets(&c.spec) {
        let s = secret(&name);
        assert_eq!(
            s["metadata"]["namespace"].as_str(),
            c.metadata.namespace.as_deref(),
            "{}: Secret {name} must be in the Connector's namespace",
            path.display()
        );
    }
    let env = obsrv_crds::runtime::secret_env(&c.spec)
        .into_iter()
        .map(|e| (e.secret_name, e.key));
    let template = c
        .spec
        .template
        .iter()
        .flat_map(|t| t.env.iter())
        .filter_map(|e| {
            let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
            Some((r.name.clone(), r.key.clone()))
        });
    for (name, key) in env.chain(template) {
        let s = secret(&name);
        let has = ["stringData", "data"]
            .iter()
            .any(|f| s[f].get(&key).is_some());
        assert!(has, "{}: Secret {name} has no key {key:?}", path.display());
    }
}

#[test]
fn secret_values_travel_only_as_env_references() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/postgres-full.yaml");
    let doc = &yaml_docs(&path)[0];
    let c: Connector = serde_json::from_value(doc.clone()).unwrap();
    let env = obsrv_crds::runtime::secret_env(&c.spec);
    let names: Vec<_> = env
        .iter()
        .map(|e| (e.env, e.secret_name.as_str(), e.key.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("OBSRV_SOURCE_USERNAME", "pg-creds", "username"),
            ("OBSRV_SOURCE_PASSWORD", "pg-creds", "password")
        ]
    );
    assert_eq!(
        obsrv_crds::runtime::referenced_secrets(&c.spec),
        vec!["pg-creds".to_string()]
    );
}
