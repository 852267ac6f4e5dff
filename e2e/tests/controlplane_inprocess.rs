//! The API server in-process (what the operator's reconcile tests use): a kube client served by
//! the same router and store, every call recorded in RBAC terms, garbage collection done by the
//! time the call that removed an owner returns, and direct writes for the test's other actors.

mod common;

use common::connector;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use obsrv_e2e::controlplane::{Call, InProcessApi};
use serde_json::json;

/// An in-process API serving the Connector CRD of crds/connector.yaml.
fn api_with_connectors() -> InProcessApi {
    let yaml = std::fs::read_to_string(common::repo_root().join("crds/connector.yaml"))
        .expect("crds/connector.yaml");
    let api = InProcessApi::new();
    api.create(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "",
        serde_yaml::from_str(&yaml).expect("CRD parses"),
    );
    api
}

#[tokio::test]
async fn calls_are_recorded_and_owned_objects_are_gone_when_the_delete_returns() {
    let api = api_with_connectors();
    api.namespace("shop");
    let mut c = connector("orders", "orders");
    c["metadata"]["namespace"] = json!("shop");
    let owner = api.create("obsrv.io", "connectors", "shop", c);
    let client = api.client();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    let owned = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "orders", "ownerReferences": [{"apiVersion": "obsrv.io/v1alpha1",
            "kind": "Connector", "name": "orders", "uid": owner["metadata"]["uid"]}]},
        "data": {"k": "v"}});
    cms.patch("orders", &PatchParams::apply("op"), &Patch::Apply(owned))
        .await
        .expect("apply");
    cms.list(&ListParams::default()).await.expect("list");
    let ar = kube::api::ApiResource {
        group: "obsrv.io".into(),
        version: "v1alpha1".into(),
        api_version: "obsrv.io/v1alpha1".into(),
        kind: "Connector".into(),
        plural: "connectors".into(),
    };
    let connectors: Api<DynamicObject> = Api::namespaced_with(client, "shop", &ar);
    connectors
        .patch_status(
            "orders",
            &PatchParams::apply("op"),
            &Patch::Apply(
                json!({"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
                                 "status": {"phase": "Pending"}}),
            ),
        )
        .await
        .expect("status");
    connectors
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(
        api.get("", "configmaps", "shop", "orders").is_none(),
        "collected before the delete returned"
    );

    let call = |verb: &str, group: &str, resource: &str, name: Option<&str>| Call {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        name: name.map(String::from),
    };
    assert_eq!(
        api.calls(),
        [
            call("patch", "", "configmaps", Some("orders")),
            call("list", "", "configmaps", None),
            call("patch", "obsrv.io", "connectors/status", Some("orders")),
            call("delete", "obsrv.io", "connectors", Some("orders")),
        ],
        "the test's own direct writes are not calls"
    );
    assert_eq!(api.count("patch", "connectors/status"), 1);
    api.clear_calls();
    assert!(api.calls().is_empty());
}

#[tokio::test]
async fn direct_writes_play_other_actors_around_validation() {
    let api = api_with_connectors();
    let mut c = connector("orders", "orders");
    c["spec"]["state"] = json!("Sleeping");
    let err = api
        .try_create("obsrv.io", "connectors", "default", c.clone())
        .expect_err("a client's create is validated");
    assert!(err.to_string().contains("spec.state"), "{err}");

    let stored = api.put("obsrv.io", "connectors", "default", c);
    assert_eq!(stored["spec"]["state"], "Sleeping");
    assert_eq!(stored["metadata"]["generation"], 1);

    // A status-only change keeps the generation; a spec change bumps it; the uid stays.
    api.edit("obsrv.io", "connectors", "default", "orders", |o| {
        o["status"] = json!({"phase": "Failed"})
    });
    let after = api
        .get("obsrv.io", "connectors", "default", "orders")
        .expect("stored");
    assert_eq!(after["metadata"]["generation"], 1);
    assert_eq!(after["status"]["phase"], "Failed");
    api.edit("obsrv.io", "connectors", "default", "orders", |o| {
        o["spec"]["state"] = json!("Running")
    });
    let fixed = api
        .get("obsrv.io", "connectors", "default", "orders")
        .expect("stored");
    assert_eq!(fixed["metadata"]["generation"], 2);
    assert_eq!(fixed["metadata"]["uid"], stored["metadata"]["uid"]);

    // A pod with the status a kubelet reports (a client's create would reset it to Pending).
    let pod = api.put(
        "",
        "pods",
        "default",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "status": {"phase": "Running", "podIP": "127.0.0.9"}}),
    );
    assert_eq!(pod["status"]["podIP"], "127.0.0.9");
    assert_eq!(api.list("", "pods", "default").len(), 1);
    api.delete("", "pods", "default", "p");
    assert!(api.list("", "pods", "default").is_empty());
    assert!(api.calls().is_empty(), "direct access is not an API call");
}
