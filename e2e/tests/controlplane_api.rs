//! kube-rs clients against the local API server: apply, watch, subresources, finalizers, GC.

mod common;

use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::{Api, Client};
use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions};
use serde_json::{Value, json};

fn connectors(client: &Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "obsrv.io".into(),
        version: "v1alpha1".into(),
        api_version: "obsrv.io/v1alpha1".into(),
        kind: "Connector".into(),
        plural: "connectors".into(),
    };
    Api::namespaced_with(client.clone(), "default", &ar)
}

fn dynamic(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("a valid object")
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

#[tokio::test]
async fn server_side_apply_owns_fields_and_force_takes_them_over() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    let api: Api<ConfigMap> = Api::default_namespaced(client);
    let first = api
        .patch(
            "app",
            &PatchParams::apply("team-a"),
            &Patch::Apply(cm("app", json!({"mode": "fast", "extra": "x"}))),
        )
        .await
        .expect("create by apply");
    assert_eq!(
        first
            .data
            .as_ref()
            .and_then(|d| d.get("mode"))
            .map(String::as_str),
        Some("fast")
    );

    let err = api
        .patch(
            "app",
            &PatchParams::apply("team-b"),
            &Patch::Apply(cm("app", json!({"mode": "safe"}))),
        )
        .await
        .expect_err("another manager changing an owned field conflicts");
    assert_eq!(api_code(&err), Some(409), "{err}");
    assert!(
        err.to_string().contains("team-a") && err.to_string().contains(".data.mode"),
        "{err}"
    );

    let forced = api
        .patch(
            "app",
            &PatchParams::apply("team-b").force(),
            &Patch::Apply(cm("app", json!({"mode": "safe"}))),
        )
        .await
        .expect("force takes the field over");
    assert_eq!(
        forced
            .data
            .as_ref()
            .and_then(|d| d.get("mode"))
            .map(String::as_str),
        Some("safe")
    );
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"team-a".to_string()) && managers.contains(&"team-b".to_string()),
        "{managers:?}"
    );

    // team-a stops applying "extra": it goes away; "mode" now belongs to team-b and stays.
    let after = api
        .patch(
            "app",
            &PatchParams::apply("team-a"),
            &Patch::Apply(cm("app", json!({}))),
        )
        .await
        .expect("apply");
    let data = after.data.unwrap_or_default();
    assert_eq!(data.get("mode").map(String::as_str), Some("safe"));
    assert!(!data.contains_key("extra"), "{data:?}");

    // An apply that changes nothing does not write (same resourceVersion).
    let again = api
        .patch(
            "app",
            &PatchParams::apply("team-b"),
            &Patch::Apply(cm("app", json!({"mode": "safe"}))),
        )
        .await
        .expect("apply");
    assert_eq!(
        again.metadata.resource_version,
        after.metadata.resource_version
    );
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_answers_410_when_too_old() {
    let cp = ControlPlane::start(ControlPlaneOptions {
        watch_history: 50,
        ..ControlPlaneOptions::default()
    })
    .await
    .expect("start");
    let client = cp.client().await.expect("client");
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let pp = PostParams::default();
    api.create(
        &pp,
        &serde_json::from_value(cm("one", json!({"k": "1"}))).expect("cm"),
    )
    .await
    .expect("create");
    let rv = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("list rv");

    api.create(
        &pp,
        &serde_json::from_value(cm("two", json!({"k": "2"}))).expect("cm"),
    )
    .await
    .expect("create");
    api.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "3"}})),
    )
    .await
    .expect("patch");
    api.delete("one", &DeleteParams::default())
        .await
        .expect("delete");

    let events: Vec<WatchEvent<ConfigMap>> = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch")
        .take(3)
        .try_collect()
        .await
        .expect("events");
    let seen: Vec<String> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(o) => {
                format!("ADDED {}", o.metadata.name.clone().unwrap_or_default())
            }
            WatchEvent::Modified(o) => {
                format!("MODIFIED {}", o.metadata.name.clone().unwrap_or_default())
            }
            WatchEvent::Deleted(o) => {
                format!("DELETED {}", o.metadata.name.clone().unwrap_or_default())
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(seen, ["ADDED two", "MODIFIED two", "DELETED one"]);

    // A label-selected watch only sees matching objects.
    let mut labelled = api
        .watch(&WatchParams::default().labels("tier=db").timeout(2), &rv)
        .await
        .expect("watch")
        .boxed();
    api.create(
        &pp,
        &serde_json::from_value(json!({"metadata": {"name": "db", "labels": {"tier": "db"}}}))
            .expect("cm"),
    )
    .await
    .expect("create");
    match labelled.try_next().await.expect("event") {
        Some(WatchEvent::Added(o)) => assert_eq!(o.metadata.name.as_deref(), Some("db")),
        other => panic!("expected ADDED db, got {other:?}"),
    }

    // After compaction the old version is gone: 410 Expired, as etcd compaction does.
    cp.store().compact();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match stream.try_next().await.expect("event") {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    // A version from the future (e.g. before a control-plane restart) is not silently accepted.
    let mut future = api
        .watch(&WatchParams::default(), "999999999")
        .await
        .expect("watch")
        .boxed();
    match future.try_next().await.expect("event") {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 error event, got {other:?}"),
    }

    // kube-runtime's watcher recovers from 410 by re-listing and keeps delivering.
    let seen_late = tokio::spawn({
        let api = api.clone();
        async move {
            let stream = kube::runtime::watcher(api, kube::runtime::watcher::Config::default());
            let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(stream));
            while let Ok(Some(cm)) = stream.try_next().await {
                if cm.metadata.name.as_deref() == Some("late") {
                    return true;
                }
            }
            false
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.create(
        &pp,
        &serde_json::from_value(cm("late", json!({}))).expect("cm"),
    )
    .await
    .expect("create");
    let seen = tokio::time::timeout(Duration::from_secs(10), seen_late).await;
    assert!(
        matches!(seen, Ok(Ok(true))),
        "kube-runtime watcher never saw the new object"
    );
}

#[tokio::test]
async fn status_and_scale_subresources_and_generation() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    install_connector_crd(&client).await;
    let api = connectors(&client);
    let created = api
        .create(
            &PostParams::default(),
            &dynamic(connector("orders", "orders")),
        )
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    // Defaults from the schema are applied.
    assert_eq!(created.data["spec"]["state"], "Running");
    assert_eq!(created.data["spec"]["delivery"], "atLeastOnce");

    // Status goes through /status only and does not bump the generation.
    let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "selector": "app.kubernetes.io/instance=orders", "observedGeneration": 1}});
    let with_status = api
        .patch_status("orders", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status");
    assert_eq!(with_status.metadata.generation, Some(1));
    assert_eq!(with_status.data["status"]["replicas"], 1);
    let ignored = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 9}, "metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("patch");
    assert_eq!(
        ignored.data["status"]["replicas"], 1,
        "status is ignored on the main resource"
    );
    assert_eq!(
        ignored.metadata.generation,
        Some(1),
        "metadata changes do not bump the generation"
    );

    let edited = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": "Paused"}})),
        )
        .await
        .expect("patch");
    assert_eq!(edited.metadata.generation, Some(2));

    // Scale reads and writes the CRD's paths.
    let scale = api.get_scale("orders").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    let st = scale.status.expect("scale status");
    assert_eq!(
        (st.replicas, st.selector.as_deref()),
        (1, Some("app.kubernetes.io/instance=orders"))
    );
    let scaled = api
        .patch_scale(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scale");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(3));
    let after = api.get("orders").await.expect("get");
    assert_eq!(after.data["spec"]["scaling"]["replicas"], 3);
    assert_eq!(after.metadata.generation, Some(3));
    let err = api
        .patch_scale(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": -1}})),
        )
        .await
        .expect_err("negative");
    assert_eq!(api_code(&err), Some(422));

    // Deployments have a scale subresource too.
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let dep: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}},
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &dep)
        .await
        .expect("create");
    let s = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .expect("scale");
    assert_eq!(
        s.status.and_then(|s| s.selector).as_deref(),
        Some("app=web")
    );
    let web = deployments.get("web").await.expect("get");
    assert_eq!(web.spec.and_then(|s| s.replicas), Some(4));
    assert_eq!(web.metadata.generation, Some(2));
}

#[tokio::test]
async fn invalid_custom_resources_get_422_with_the_rule_message() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    install_connector_crd(&client).await;
    let api = connectors(&client);
    let mut bad = connector("bad", "orders");
    bad["spec"]["scaling"]["autoscale"] = json!({"minReplicas": 5, "maxReplicas": 2});
    let err = api
        .create(&PostParams::default(), &dynamic(bad))
        .await
        .expect_err("min > max is rejected");
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .contains("autoscale.minReplicas must not exceed autoscale.maxReplicas"),
                "{}",
                s.message
            );
            assert!(
                s.message.contains("spec.scaling.autoscale"),
                "{}",
                s.message
            );
        }
        other => panic!("expected an API error, got {other}"),
    }
    api.create(
        &PostParams::default(),
        &dynamic(connector("good", "orders")),
    )
    .await
    .expect("valid connector");
    let err = api
        .patch(
            "good",
            &PatchParams::apply("me").force(),
            &Patch::Apply(connector("good", "other")),
        )
        .await
        .expect_err("dataset is immutable");
    assert!(
        err.to_string().contains("spec.dataset is immutable"),
        "{err}"
    );
}

#[tokio::test]
async fn an_object_stored_before_its_rules_still_takes_status_and_finalizer_updates() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    install_connector_crd(&client).await;
    let api = connectors(&client);
    // Stored around validation, as an object from before a rule existed would be.
    let mut old = connector("old", "orders");
    old["spec"]["state"] = json!("Sleeping");
    old["metadata"]["finalizers"] = json!(["obsrv.io/cleanup"]);
    let rt = cp
        .store()
        .resource("obsrv.io", "connectors")
        .expect("connectors served");
    cp.store().put(&rt, "default", old);

    // The status subresource validates .status only; unchanged invalid fields are ratcheted.
    api.patch_status(
        "old",
        &PatchParams::apply("operator").force(),
        &Patch::Apply(
            json!({"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
                             "status": {"phase": "Failed"}}),
        ),
    )
    .await
    .expect("status of an object with an invalid spec");
    let err = api
        .patch_status(
            "old",
            &PatchParams::apply("operator").force(),
            &Patch::Apply(
                json!({"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector",
                                 "status": {"phase": "Sleepy"}}),
            ),
        )
        .await
        .expect_err("the status is still checked");
    assert_eq!(api_code(&err), Some(422), "{err}");

    // Changing the invalid field to another invalid value is refused; fixing it is not.
    let err = api
        .patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": "Dozing"}})),
        )
        .await
        .expect_err("a changed field is validated");
    assert!(err.to_string().contains("spec.state"), "{err}");

    // Releasing the finalizer of the unchanged invalid object deletes it.
    api.delete("old", &DeleteParams::default())
        .await
        .expect("delete");
    api.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer released despite the invalid spec");
    assert_eq!(
        api_code(&api.get("old").await.expect_err("gone")),
        Some(404)
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    install_connector_crd(&client).await;
    let api = connectors(&client);
    let mut c = connector("orders", "orders");
    c["metadata"]["finalizers"] = json!(["obsrv.io/cleanup"]);
    api.create(&PostParams::default(), &dynamic(c))
        .await
        .expect("create");
    let mut events = api
        .watch(
            &WatchParams::default()
                .fields("metadata.name=orders")
                .timeout(5),
            "0",
        )
        .await
        .expect("watch")
        .boxed();

    api.delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    let held = api
        .get("orders")
        .await
        .expect("still there while the finalizer is set");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(
        held.metadata.generation,
        Some(2),
        "marking for deletion is a new generation (controllers filtering on it see it)"
    );
    let err = api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["obsrv.io/cleanup", "x.io/more"]}})),
        )
        .await
        .expect_err("no new finalizers while terminating");
    assert_eq!(api_code(&err), Some(422));

    let remove = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "obsrv.io/cleanup"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(remove).expect("patch");
    api.patch("orders", &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .expect("remove finalizer");
    let err = api
        .get("orders")
        .await
        .expect_err("gone once the last finalizer is removed");
    assert_eq!(api_code(&err), Some(404));

    let mut kinds = Vec::new();
    while let Ok(Some(e)) = events.try_next().await {
        let k = match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
        kinds.push(k);
        if k == "DELETED" {
            break;
        }
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
}

#[tokio::test]
async fn owner_references_are_garbage_collected() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    install_connector_crd(&client).await;
    let conns = connectors(&client);
    let owner = conns
        .create(
            &PostParams::default(),
            &dynamic(connector("orders", "orders")),
        )
        .await
        .expect("create");
    let uid = owner.metadata.uid.clone().expect("uid");
    let owner_ref = json!([{"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector", "name": "orders", "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for name in ["orders-config", "orders-extra"] {
        let obj =
            json!({"metadata": {"name": name, "ownerReferences": owner_ref}, "data": {"k": "v"}});
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(obj).expect("cm"),
        )
        .await
        .expect("create");
    }
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(cm("unrelated", json!({}))).expect("cm"),
    )
    .await
    .expect("create");

    conns
        .delete("orders", &DeleteParams::background())
        .await
        .expect("delete");
    let collected = eventually(Duration::from_secs(10), || async {
        let names: Vec<String> = cms
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        (!names.iter().any(|n| n.starts_with("orders-"))).then_some(names)
    })
    .await;
    assert_eq!(collected, Some(vec!["unrelated".to_string()]));

    // Orphan propagation keeps dependents and drops the reference.
    let owner = conns
        .create(&PostParams::default(), &dynamic(connector("keep", "keep")))
        .await
        .expect("create");
    let r = json!([{"apiVersion": "obsrv.io/v1alpha1", "kind": "Connector", "name": "keep", "uid": owner.metadata.uid, "controller": true}]);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "kept", "ownerReferences": r}}))
            .expect("cm"),
    )
    .await
    .expect("create");
    conns
        .delete("keep", &DeleteParams::orphan())
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = cms.get("kept").await.expect("orphaned dependent stays");
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn namespaces_and_label_selectors() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "team-a");
    let err = missing
        .create(
            &PostParams::default(),
            &serde_json::from_value(cm("x", json!({}))).expect("cm"),
        )
        .await
        .expect_err("no namespace");
    assert_eq!(api_code(&err), Some(404));
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team-a"}})).expect("ns"),
        )
        .await
        .expect("ns");

    let in_a: Api<ConfigMap> = Api::namespaced(client.clone(), "team-a");
    let in_default: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for (api, name, labels) in [
        (&in_a, "a1", json!({"app": "x"})),
        (&in_a, "a2", json!({"app": "y", "skip": "true"})),
        (&in_default, "d1", json!({"app": "x"})),
        (&in_default, "d2", json!({"app": "z"})),
    ] {
        let obj = json!({"metadata": {"name": name, "labels": labels}});
        api.create(
            &PostParams::default(),
            &serde_json::from_value(obj).expect("cm"),
        )
        .await
        .expect("create");
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let names = |l: kube::api::ObjectList<ConfigMap>| -> Vec<String> {
        let mut n: Vec<String> = l
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app in (x,y),!skip"))
                .await
                .expect("list")
        ),
        ["a1", "d1"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app!=x"))
                .await
                .expect("list")
        ),
        ["a2", "d2"]
    );
    assert_eq!(
        names(in_a.list(&ListParams::default()).await.expect("list")),
        ["a1", "a2"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.namespace=default"))
                .await
                .expect("list")
        ),
        ["d1", "d2"]
    );

    // Paging: limit + continue walk every object once.
    let mut paged = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(1);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = all.list(&lp).await.expect("page");
        assert!(page.items.len() <= 1);
        paged.extend(page.items.into_iter().filter_map(|c| c.metadata.name));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(paged, ["d1", "d2", "a1", "a2"]);

    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .expect("delete ns");
    let gone = eventually(Duration::from_secs(10), || async {
        namespaces.get("team-a").await.is_err().then_some(())
    })
    .await;
    assert!(gone.is_some(), "the namespace is removed once empty");
    assert!(
        in_a.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    assert_eq!(
        in_default
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
}

#[tokio::test]
async fn recorder_events_are_listed_as_core_events_for_describe() {
    use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    let reporter = Reporter {
        controller: "obsrv-operator".into(),
        instance: Some("op-1".into()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let reference = ObjectReference {
        api_version: Some("obsrv.io/v1alpha1".into()),
        kind: Some("Connector".into()),
        name: Some("orders".into()),
        namespace: Some("default".into()),
        uid: Some("uid-1".into()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "SourceUnreachable".into(),
        note: Some("cannot connect to db:5432".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.expect("publish");
    recorder
        .publish(&event, &reference)
        .await
        .expect("publish again (a series)");

    // What `kubectl describe connector orders` asks for.
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let selected = core
        .list(&ListParams::default().fields(
            "involvedObject.name=orders,involvedObject.namespace=default,involvedObject.uid=uid-1",
        ))
        .await
        .expect("list v1 events");
    assert_eq!(selected.items.len(), 1, "{:?}", selected.items);
    let e = &selected.items[0];
    assert_eq!(e.reason.as_deref(), Some("SourceUnreachable"));
    assert_eq!(e.message.as_deref(), Some("cannot connect to db:5432"));
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.count, Some(2));
    assert_eq!(
        e.source.as_ref().and_then(|s| s.component.as_deref()),
        Some("obsrv-operator")
    );
    assert!(e.last_timestamp.is_some());
    let other = core
        .list(&ListParams::default().fields("involvedObject.name=other"))
        .await
        .expect("list");
    assert!(other.items.is_empty());
}

#[tokio::test]
async fn malformed_objects_get_errors_and_the_server_keeps_serving() {
    let cp = api_server().await;
    let client = cp.client().await.expect("client");
    let raw = |body: &str, path: &str, ct: &str| {
        let req = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", ct)
            .body(body.as_bytes().to_vec())
            .expect("request");
        let client = client.clone();
        async move { client.request_text(req).await }
    };
    let err = raw(
        r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x"},"spec":5}"#,
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
    )
    .await
    .expect_err("spec must be an object");
    assert_eq!(api_code(&err), Some(422), "{err}");
    let err = raw(
        "{not json",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
    )
    .await
    .expect_err("bad JSON");
    assert_eq!(api_code(&err), Some(400), "{err}");
    let err = raw(
        r#"{"metadata":{"name":"Bad_Name"}}"#,
        "/api/v1/namespaces/default/configmaps",
        "application/json",
    )
    .await
    .expect_err("invalid name");
    assert!(err.to_string().contains("RFC 1123"), "{err}");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    assert!(
        cms.list(&ListParams::default())
            .await
            .expect("still serving")
            .items
            .is_empty()
    );
}
