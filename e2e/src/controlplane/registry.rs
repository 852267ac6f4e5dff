//! The resource types the API serves: built-in kinds and kinds registered by CustomResourceDefinitions.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

/// How a table cell is computed.
#[derive(Clone, Debug)]
pub enum CellSource {
    /// A Kubernetes JSONPath (`.status.replicas`), as in `additionalPrinterColumns`.
    JsonPath(String),
    /// Built-in kinds: a function of the object (e.g. `READY 2/3`).
    Computed(fn(&Value) -> Value),
}

/// One printer column.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `date`.
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub source: CellSource,
}

/// The scale subresource's paths (`spec.versions[].subresources.scale` of a CRD).
#[derive(Clone, Debug)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// A resource the API serves at `/api/v1/...` or `/apis/<group>/<version>/...`.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    /// Writes to the main resource keep `.status`; `/status` writes only change `.status`.
    pub status_subresource: bool,
    pub scale: Option<ScalePaths>,
    /// Whether `metadata.generation` is kept.
    pub generation: bool,
    pub columns: Vec<Column>,
    /// `openAPIV3Schema` of a custom resource; `None` for built-in kinds (not validated beyond metadata).
    pub schema: Option<Value>,
    /// The schema's CEL rules, compiled once.
    pub rules: Option<Arc<obsrv_crds::schema::Rules>>,
    /// Name of the CRD that registered this type.
    pub crd: Option<String>,
}

impl ResourceType {
    pub fn is_core_event(&self) -> bool {
        self.group.is_empty() && self.kind == "Event"
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, `pods`: how the API names the resource in messages.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Storage key: one store per group and plural (versions of one kind share it). Core `v1`
    /// Events share the store of `events.k8s.io/v1` Events, as in Kubernetes, and are converted.
    pub fn key(&self) -> ResKey {
        if self.is_core_event() {
            return ResKey {
                group: "events.k8s.io".into(),
                plural: "events".into(),
            };
        }
        ResKey {
            group: self.group.clone(),
            plural: self.plural.clone(),
        }
    }
}

/// Identifies where objects of one resource are stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResKey {
    pub group: String,
    pub plural: String,
}

fn col(name: &str, type_: &str, priority: i64, source: CellSource) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        source,
    }
}

fn path(p: &str) -> CellSource {
    CellSource::JsonPath(p.into())
}

fn age() -> Column {
    col("Age", "date", 0, path(".metadata.creationTimestamp"))
}

fn int_at(v: &Value, p: &[&str]) -> i64 {
    p.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn deployment_ready(v: &Value) -> Value {
    json!(format!(
        "{}/{}",
        int_at(v, &["status", "readyReplicas"]),
        int_at(v, &["spec", "replicas"])
    ))
}

fn pod_ready(v: &Value) -> Value {
    let statuses = v
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    let total = v
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses.map_or(0, |s| {
        s.iter().filter(|c| c["ready"] == json!(true)).count()
    });
    json!(format!("{ready}/{total}"))
}

fn pod_status(v: &Value) -> Value {
    if v.pointer("/metadata/deletionTimestamp").is_some() {
        return json!("Terminating");
    }
    let waiting = v
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .and_then(|s| {
            s.iter()
                .find_map(|c| c.pointer("/state/waiting/reason").cloned())
        });
    waiting.unwrap_or_else(|| {
        v.pointer("/status/phase")
            .cloned()
            .unwrap_or(json!("Pending"))
    })
}

fn pod_restarts(v: &Value) -> Value {
    let statuses = v
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    json!(statuses.map_or(0, |s| {
        s.iter()
            .map(|c| c["restartCount"].as_i64().unwrap_or(0))
            .sum::<i64>()
    }))
}

fn data_count(v: &Value) -> Value {
    let n = |k: &str| v.get(k).and_then(Value::as_object).map_or(0, |m| m.len());
    json!(n("data") + n("binaryData") + n("stringData"))
}

fn job_completions(v: &Value) -> Value {
    let want = v
        .pointer("/spec/completions")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    json!(format!("{}/{}", int_at(v, &["status", "succeeded"]), want))
}

fn job_status(v: &Value) -> Value {
    let conditions = v.pointer("/status/conditions").and_then(Value::as_array);
    let done = |t: &str| {
        conditions.is_some_and(|c| c.iter().any(|c| c["type"] == t && c["status"] == "True"))
    };
    json!(if done("Complete") {
        "Complete"
    } else if done("Failed") {
        "Failed"
    } else {
        "Running"
    })
}

fn service_ports(v: &Value) -> Value {
    let ports = v.pointer("/spec/ports").and_then(Value::as_array);
    let shown: Vec<String> = ports
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
        .collect();
    json!(if shown.is_empty() {
        "<none>".to_string()
    } else {
        shown.join(",")
    })
}

fn event_object(v: &Value) -> Value {
    let o = v
        .get("involvedObject")
        .or_else(|| v.get("regarding"))
        .cloned()
        .unwrap_or(Value::Null);
    json!(format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("").to_lowercase(),
        o["name"].as_str().unwrap_or("")
    ))
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    short: &[&str],
    namespaced: bool,
    status: bool,
    mut columns: Vec<Column>,
) -> ResourceType {
    if group.is_empty() && kind == "Event" {
        columns.insert(0, col("Last Seen", "date", 0, path(".lastTimestamp")));
    } else {
        columns.push(age());
    }
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if ["Pod", "Service", "Deployment", "Job"].contains(&kind) {
            vec!["all".into()]
        } else {
            vec![]
        },
        namespaced,
        status_subresource: status,
        scale: None,
        generation: status && !["Pod", "Namespace", "Service"].contains(&kind),
        columns,
        schema: None,
        rules: None,
        crd: None,
    }
}

/// The built-in kinds the project's operator, tests and demo touch.
pub fn builtins() -> Vec<ResourceType> {
    let c = |n: &str, t: &str, p: i64, s: CellSource| col(n, t, p, s);
    let mut deployments = builtin(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        &["deploy"],
        true,
        true,
        vec![
            c("Ready", "string", 0, CellSource::Computed(deployment_ready)),
            c("Up-to-date", "integer", 0, path(".status.updatedReplicas")),
            c("Available", "integer", 0, path(".status.availableReplicas")),
        ],
    );
    deployments.scale = Some(ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: ".status.replicas".into(),
        label_selector: None,
    });
    vec![
        builtin(
            "",
            "v1",
            "Namespace",
            "namespaces",
            &["ns"],
            false,
            true,
            vec![c("Status", "string", 0, path(".status.phase"))],
        ),
        builtin(
            "",
            "v1",
            "ConfigMap",
            "configmaps",
            &["cm"],
            true,
            false,
            vec![c("Data", "integer", 0, CellSource::Computed(data_count))],
        ),
        builtin(
            "",
            "v1",
            "Secret",
            "secrets",
            &[],
            true,
            false,
            vec![
                c("Type", "string", 0, path(".type")),
                c("Data", "integer", 0, CellSource::Computed(data_count)),
            ],
        ),
        builtin(
            "",
            "v1",
            "Service",
            "services",
            &["svc"],
            true,
            true,
            vec![
                c("Type", "string", 0, path(".spec.type")),
                c("Cluster-IP", "string", 0, path(".spec.clusterIP")),
                c("Port(s)", "string", 0, CellSource::Computed(service_ports)),
            ],
        ),
        builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            &["sa"],
            true,
            false,
            vec![],
        ),
        builtin(
            "",
            "v1",
            "Pod",
            "pods",
            &["po"],
            true,
            true,
            vec![
                c("Ready", "string", 0, CellSource::Computed(pod_ready)),
                c("Status", "string", 0, CellSource::Computed(pod_status)),
                c("Restarts", "integer", 0, CellSource::Computed(pod_restarts)),
                c("IP", "string", 1, path(".status.podIP")),
                c("Node", "string", 1, path(".spec.nodeName")),
            ],
        ),
        builtin(
            "",
            "v1",
            "Event",
            "events",
            &["ev"],
            true,
            false,
            vec![
                c("Type", "string", 0, path(".type")),
                c("Reason", "string", 0, path(".reason")),
                c("Object", "string", 0, CellSource::Computed(event_object)),
                c("Message", "string", 0, path(".message")),
            ],
        ),
        deployments,
        builtin(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            &["pdb"],
            true,
            true,
            vec![
                c("Min Available", "string", 0, path(".spec.minAvailable")),
                c("Max Unavailable", "string", 0, path(".spec.maxUnavailable")),
                c(
                    "Allowed Disruptions",
                    "integer",
                    0,
                    path(".status.disruptionsAllowed"),
                ),
            ],
        ),
        builtin(
            "batch",
            "v1",
            "Job",
            "jobs",
            &[],
            true,
            true,
            vec![
                c("Status", "string", 0, CellSource::Computed(job_status)),
                c(
                    "Completions",
                    "string",
                    0,
                    CellSource::Computed(job_completions),
                ),
            ],
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            &[],
            true,
            false,
            vec![c("Holder", "string", 0, path(".spec.holderIdentity"))],
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            &["ev"],
            true,
            false,
            vec![
                c("Type", "string", 0, path(".type")),
                c("Reason", "string", 0, path(".reason")),
                c("Object", "string", 0, CellSource::Computed(event_object)),
                c("Note", "string", 0, path(".note")),
            ],
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            &["crd", "crds"],
            false,
            true,
            vec![],
        ),
    ]
}

/// The resource types one CRD defines (one per served version), or a message saying what is wrong.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let group = spec["group"]
        .as_str()
        .filter(|g| !g.is_empty())
        .ok_or("spec.group is required")?;
    let names = &spec["names"];
    let kind = names["kind"]
        .as_str()
        .filter(|k| !k.is_empty())
        .ok_or("spec.names.kind is required")?;
    let plural = names["plural"]
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or("spec.names.plural is required")?;
    let expected = format!("{plural}.{group}");
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name != expected {
        return Err(format!(
            "metadata.name must be spec.names.plural+\".\"+spec.group ({expected})"
        ));
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope must be Namespaced or Cluster".into()),
    };
    let versions = spec["versions"]
        .as_array()
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions must not be empty")?;
    let mut out = Vec::new();
    for v in versions {
        if v["served"] != json!(true) {
            continue;
        }
        let version = v["name"]
            .as_str()
            .ok_or("spec.versions[].name is required")?;
        let mut columns: Vec<Column> = strings_cols(&v["additionalPrinterColumns"]);
        if columns.is_empty() {
            columns.push(age());
        }
        let scale = v.pointer("/subresources/scale").map(|s| ScalePaths {
            spec_replicas: s["specReplicasPath"]
                .as_str()
                .unwrap_or(".spec.replicas")
                .into(),
            status_replicas: s["statusReplicasPath"]
                .as_str()
                .unwrap_or(".status.replicas")
                .into(),
            label_selector: s["labelSelectorPath"].as_str().map(String::from),
        });
        out.push(ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            namespaced,
            status_subresource: v.pointer("/subresources/status").is_some(),
            scale,
            generation: true,
            columns,
            rules: v
                .pointer("/schema/openAPIV3Schema")
                .map(|s| Arc::new(obsrv_crds::schema::Rules::new(s))),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            crd: Some(name.to_string()),
        });
    }
    Ok(out)
}

fn strings_cols(v: &Value) -> Vec<Column> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some(Column {
                name: c["name"].as_str()?.to_string(),
                type_: c["type"].as_str().unwrap_or("string").to_string(),
                format: c["format"].as_str().unwrap_or("").to_string(),
                description: c["description"].as_str().unwrap_or("").to_string(),
                priority: c["priority"].as_i64().unwrap_or(0),
                source: CellSource::JsonPath(c["jsonPath"].as_str()?.to_string()),
            })
        })
        .collect()
}

/// All served resource types, by group/version/plural.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        for t in builtins() {
            r.insert(t);
        }
        r
    }

    pub fn insert(&mut self, t: ResourceType) {
        self.types.insert(
            (t.group.clone(), t.version.clone(), t.plural.clone()),
            Arc::new(t),
        );
    }

    /// Removes every type registered by the named CRD.
    pub fn remove_crd(&mut self, crd: &str) {
        self.types.retain(|_, t| t.crd.as_deref() != Some(crd));
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Any served version of the resource stored under `key`.
    pub fn by_key(&self, key: &ResKey) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|t| t.group == key.group && t.plural == key.plural)
            .cloned()
    }

    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|t| t.api_version() == api_version && t.kind == kind)
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Groups (other than the core group) with their versions.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut g: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in self.types.values().filter(|t| !t.group.is_empty()) {
            let versions = g.entry(t.group.clone()).or_default();
            if !versions.contains(&t.version) {
                versions.push(t.version.clone());
            }
        }
        g
    }
}
