//! Every Kubernetes API verb and resource the operator uses, in one place.
//!
//! The Helm chart grants exactly these (its check runs `obsrv-operator print-rbac` and compares), so
//! a new API call in the operator must be declared here first.

use serde::Serialize;

/// One permission: verbs on resources of one API group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// What the operator calls, and why.
pub const RULES: &[Rule] = &[
    // Watch Connectors, add/remove the finalizer (JSON patch).
    Rule {
        api_group: "obsrv.io",
        resources: &["connectors"],
        verbs: &["list", "watch", "patch"],
    },
    // Status is written with server-side apply on the status subresource (read back only for a
    // Connector that cannot be deserialized, to report it once).
    Rule {
        api_group: "obsrv.io",
        resources: &["connectors/status"],
        verbs: &["get", "patch"],
    },
    // Owned objects: read (metadata) to refuse foreign ones, server-side apply (patch); ConfigMaps,
    // Services and Deployments are watched; PDBs and cleanup Jobs are deleted when no longer wanted.
    Rule {
        api_group: "",
        resources: &["configmaps", "services"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        api_group: "apps",
        resources: &["deployments"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        api_group: "policy",
        resources: &["poddisruptionbudgets"],
        verbs: &["get", "patch", "delete"],
    },
    Rule {
        api_group: "batch",
        resources: &["jobs"],
        verbs: &["get", "patch", "delete"],
    },
    // Ready pods are listed to poll their GET /status.
    Rule {
        api_group: "",
        resources: &["pods"],
        verbs: &["list"],
    },
    // No Secrets: connector pods mount the Secrets their Connector references and follow
    // rotations themselves, so the operator needs no access to any Secret.
    // kube::runtime::events::Recorder creates events and patches repeated ones into a series.
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
    // Leader election.
    Rule {
        api_group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "create", "update"],
    },
    // Wait for the Connector CRD to be Established before starting (a watch on its name).
    Rule {
        api_group: "apiextensions.k8s.io",
        resources: &["customresourcedefinitions"],
        verbs: &["list", "watch"],
    },
];

/// A ClusterRole/Role rule as the chart writes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

/// [`RULES`] as policy rules: verbs and resources sorted, rules sorted, one per group + resource set.
pub fn policy_rules() -> Vec<PolicyRule> {
    let mut out: Vec<PolicyRule> = Vec::new();
    for r in RULES {
        let mut resources: Vec<String> = r.resources.iter().map(|s| s.to_string()).collect();
        resources.sort();
        let mut verbs: Vec<String> = r.verbs.iter().map(|s| s.to_string()).collect();
        verbs.sort();
        verbs.dedup();
        let api_groups = vec![r.api_group.to_string()];
        if let Some(existing) = out
            .iter_mut()
            .find(|p| p.api_groups == api_groups && p.resources == resources)
        {
            existing.verbs.extend(verbs);
            existing.verbs.sort();
            existing.verbs.dedup();
        } else {
            out.push(PolicyRule {
                api_groups,
                resources,
                verbs,
            });
        }
    }
    out.sort();
    out
}

/// `print-rbac` output: a pretty JSON array of policy rules.
pub fn policy_rules_json() -> String {
    serde_json::to_string_pretty(&policy_rules()).unwrap_or_else(|_| "[]".into())
}

/// Whether the declared rules allow `verb` on `resource` of `api_group` (used by tests that record
/// the calls made against the in-memory API).
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RULES.iter().any(|r| {
        r.api_group == api_group && r.resources.contains(&resource) && r.verbs.contains(&verb)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_sorted_and_unique() {
        let rules = policy_rules();
        let mut sorted = rules.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(rules, sorted);
        for r in &rules {
            let mut v = r.verbs.clone();
            v.sort();
            v.dedup();
            assert_eq!(v, r.verbs);
        }
    }

    #[test]
    fn json_shape_matches_chart_rules() {
        let v: serde_json::Value = serde_json::from_str(&policy_rules_json()).expect("valid JSON");
        let first = &v.as_array().expect("array")[0];
        assert!(first.get("apiGroups").is_some());
        assert!(first.get("resources").is_some());
        assert!(first.get("verbs").is_some());
        assert!(allows("apps", "deployments", "patch"));
        assert!(
            !allows("", "secrets", "patch"),
            "the operator never writes Secrets"
        );
    }
}
