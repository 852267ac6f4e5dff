//! The binary's `print-rbac` command, exactly as the Helm chart check runs it.

use std::process::Command;

#[test]
fn print_rbac_prints_the_declared_rules_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_obsrv-operator"))
        .arg("print-rbac")
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let declared = serde_json::to_value(obsrv_operator::rbac::policy_rules()).expect("serializes");
    assert_eq!(printed, declared);
    let rules = printed.as_array().expect("an array");
    let find = |group: &str, resource: &str| {
        rules
            .iter()
            .find(|r| {
                r["apiGroups"][0] == group
                    && r["resources"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == resource))
            })
            .unwrap_or_else(|| panic!("{group}/{resource} declared"))
    };
    assert_eq!(
        find("apps", "deployments")["verbs"],
        serde_json::json!(["get", "list", "patch", "watch"])
    );
    assert_eq!(
        find("obsrv.io", "connectors/status")["verbs"],
        serde_json::json!(["get", "patch"])
    );
    assert!(
        out.stderr.is_empty(),
        "print-rbac writes nothing but the JSON"
    );
}
