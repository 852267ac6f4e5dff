//! kubectl against the local control plane: CRD registration, printer columns, validation messages.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_crd_then_connector_shows_printer_columns() {
    let cp = api_server().await;
    let out = kubectl(&cp, &["apply", "-f", "crds/connector.yaml"], None);
    assert!(
        out.status.success(),
        "applying the CRD failed: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out)
            .contains("customresourcedefinition.apiextensions.k8s.io/connectors.obsrv.io created"),
        "{}",
        stdout(&out)
    );

    let manifest = serde_json::to_string(&connector("orders", "orders-ds")).expect("json");
    let out = kubectl(&cp, &["apply", "-f", "-"], Some(&manifest));
    assert!(
        out.status.success(),
        "applying the Connector failed: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("connector.obsrv.io/orders created"),
        "{}",
        stdout(&out)
    );

    // Re-applying the same manifest is a no-op, as with a real API server.
    let out = kubectl(&cp, &["apply", "-f", "-"], Some(&manifest));
    assert!(
        stdout(&out).contains("connector.obsrv.io/orders unchanged"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
    // `kubectl diff` (server-side dry-run apply) sees no difference; an edit shows one (exit 1).
    let out = kubectl(&cp, &["diff", "-f", "-"], Some(&manifest));
    assert!(
        out.status.success(),
        "unexpected diff: {} {}",
        stdout(&out),
        stderr(&out)
    );
    let edited = manifest.replace(r#""replicas":1"#, r#""replicas":2"#);
    let out = kubectl(&cp, &["diff", "-f", "-"], Some(&edited));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with('+') && l.trim_end().ends_with("replicas: 2")),
        "{text}"
    );

    // The status a controller would write shows up in the columns (short name `conn`).
    let client = cp.client().await.expect("client");
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client,
        "default",
        &kube::api::ApiResource {
            group: "obsrv.io".into(),
            version: "v1alpha1".into(),
            api_version: "obsrv.io/v1alpha1".into(),
            kind: "Connector".into(),
            plural: "connectors".into(),
        },
    );
    let status = serde_json::json!({"status": {
        "sourceKind": "postgres", "replicasSummary": "1/1", "lag": {"records": 42}, "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "reading", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    api.patch_status(
        "orders",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .expect("status patch");

    let out = kubectl(&cp, &["get", "conn"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "DATASET", "SOURCE", "STATE", "READY", "REPLICAS", "LAG", "AGE"
        ],
        "{text}"
    );
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(
        &row[..7],
        [
            "orders",
            "orders-ds",
            "postgres",
            "Running",
            "True",
            "1/1",
            "42"
        ],
        "{text}"
    );
    assert!(row[7].ends_with('s'), "age column: {text}");

    // Priority-1 columns appear with -o wide.
    let wide = stdout(&kubectl(&cp, &["get", "connectors", "-o", "wide"], None));
    assert!(
        wide.lines().next().is_some_and(|h| h.contains("PHASE")) && wide.contains("Running"),
        "{wide}"
    );
    // The CRD's schema is served as OpenAPI v3: kubectl explain works for custom resources.
    let explained = stdout(&kubectl(&cp, &["explain", "connectors.spec.source"], None));
    assert!(
        explained.contains("KIND:       Connector") && explained.contains("postgres"),
        "{explained}"
    );
    // Category `obsrv` lists it too.
    let by_category = stdout(&kubectl(&cp, &["get", "obsrv"], None));
    assert!(
        by_category.contains("DATASET") && by_category.contains("orders-ds"),
        "{by_category}"
    );
}

fn reject(cp: &obsrv_e2e::controlplane::ControlPlane, manifest: &serde_json::Value) -> String {
    let out = kubectl(cp, &["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(
        !out.status.success(),
        "kubectl accepted an invalid Connector: {}",
        stdout(&out)
    );
    stderr(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_connectors_are_rejected_with_the_cel_message() {
    let cp = api_server().await;
    let out = kubectl(&cp, &["apply", "-f", "crds/connector.yaml"], None);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut two_sources = connector("two", "ds");
    two_sources["spec"]["source"]["s3"] = serde_json::json!({"bucket": "b", "format": "json"});
    let err = reject(&cp, &two_sources);
    assert!(err.contains("The Connector \"two\" is invalid"), "{err}");
    assert!(
        err.contains("spec.source must set exactly one source kind"),
        "{err}"
    );

    let mut no_tables = connector("empty", "ds");
    no_tables["spec"]["source"]["postgres"]["tables"] = serde_json::json!([]);
    let err = reject(&cp, &no_tables);
    assert!(
        err.contains("spec.source.postgres.tables")
            && err.contains("tables must list at least one table"),
        "{err}"
    );

    let mut bad_enum = connector("enum", "ds");
    bad_enum["spec"]["state"] = serde_json::json!("Sleeping");
    let err = reject(&cp, &bad_enum);
    assert!(
        err.contains("spec.state") && err.contains("Unsupported value: \"Sleeping\""),
        "{err}"
    );

    let custom = |config: serde_json::Value| {
        let mut c = connector("mine", "ds");
        c["spec"]["source"] =
            serde_json::json!({"custom": {"image": "registry.example/mine:1", "config": config}});
        c
    };
    let err = reject(&cp, &custom(serde_json::json!([1, 2])));
    assert!(
        err.contains("spec.source.custom.config") && err.contains("must be of type object"),
        "{err}"
    );
    let mut no_image = custom(serde_json::json!({}));
    no_image["spec"]["source"]["custom"]
        .as_object_mut()
        .expect("object")
        .remove("image");
    let err = reject(&cp, &no_image);
    assert!(
        err.contains("spec.source.custom.image") && err.contains("Required value"),
        "{err}"
    );
    let out = kubectl(
        &cp,
        &["apply", "-f", "-"],
        Some(&custom(serde_json::json!({"url": "http://x", "nested": {"a": [1]}})).to_string()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let kept = kubectl(&cp, &["get", "connector", "mine", "-o", "json"], None);
    let kept: serde_json::Value = serde_json::from_slice(&kept.stdout).expect("json");
    assert_eq!(
        kept["spec"]["source"]["custom"]["config"]["nested"]["a"][0], 1,
        "free-form config is kept, not pruned"
    );

    let mut unknown = connector("typo", "ds");
    unknown["spec"]["replicas"] = serde_json::json!(3);
    let err = reject(&cp, &unknown);
    assert!(err.contains("unknown field \"spec.replicas\""), "{err}");

    // A misspelt nested field: rejected under kubectl's default (Strict), pruned when the user
    // turns validation off, as a real API server does.
    let mut typo = connector("lenient", "ds");
    typo["spec"]["source"]["postgres"]["tables"][0]["cursor"]["tiebreaker"] = "id".into();
    let err = reject(&cp, &typo);
    assert!(
        err.contains("unknown field \"spec.source.postgres.tables[0].cursor.tiebreaker\""),
        "{err}"
    );
    let out = kubectl(
        &cp,
        &["apply", "--validate=false", "-f", "-"],
        Some(&typo.to_string()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = kubectl(&cp, &["get", "connector", "lenient", "-o", "json"], None);
    let stored: serde_json::Value = serde_json::from_slice(&stored.stdout).expect("json");
    assert_eq!(
        stored["spec"]["source"]["postgres"]["tables"][0]["cursor"],
        serde_json::json!({"column": "updated_at", "tieBreaker": "id"}),
        "the unknown field is pruned"
    );

    let out = kubectl(
        &cp,
        &["apply", "-f", "-"],
        Some(&connector("orders", "orders").to_string()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = reject(&cp, &connector("orders", "payments"));
    assert!(err.contains("spec.dataset is immutable"), "{err}");
    let shown = stdout(&kubectl(
        &cp,
        &["get", "conn", "orders", "-o", "jsonpath={.spec.dataset}"],
        None,
    ));
    assert_eq!(shown, "orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_server_side_apply_and_builtin_tables() {
    let cp = api_server().await;
    // kubectl's typed clients post protobuf for `create secret|configmap|namespace`.
    let out = kubectl(
        &cp,
        &[
            "create",
            "secret",
            "generic",
            "pg-creds",
            "--from-literal=password=s3cret",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let client = cp.client().await.expect("client");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::default_namespaced(client);
    let secret = secrets.get("pg-creds").await.expect("secret");
    let password = secret
        .data
        .unwrap_or_default()
        .remove("password")
        .expect("password key");
    assert_eq!(password.0, b"s3cret");
    let out = kubectl(&cp, &["create", "namespace", "shop"], None);
    assert!(out.status.success(), "{}", stderr(&out));

    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  labels: {team: a}\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    let out = kubectl(&cp, &["apply", "--server-side", "-f", "-"], Some(cm));
    assert!(
        out.status.success() && stdout(&out).contains("serverside-applied"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
    // Dropping a key from the applied manifest removes it (the manager owned it).
    let out = kubectl(
        &cp,
        &["apply", "--server-side", "-f", "-"],
        Some(&cm.replace("  b: \"2\"\n", "")),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let data = stdout(&kubectl(
        &cp,
        &["get", "cm", "settings", "-o", "jsonpath={.data}"],
        None,
    ));
    assert_eq!(data, r#"{"a":"1"}"#);

    let table = stdout(&kubectl(&cp, &["get", "configmaps", "-l", "team=a"], None));
    assert!(
        table.starts_with("NAME") && table.contains("DATA") && table.contains("settings"),
        "{table}"
    );
    let none = stderr(&kubectl(&cp, &["get", "configmaps", "-l", "team=b"], None));
    assert!(none.contains("No resources found"), "{none}");
    let namespaces = stdout(&kubectl(&cp, &["get", "ns"], None));
    assert!(
        namespaces.contains("default") && namespaces.contains("Active"),
        "{namespaces}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obsrv_local_cluster_binary_writes_a_kubeconfig_and_stops_its_pods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_obsrv-local-cluster"))
        .args([
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "--dir",
            &dir.path().join("cluster").to_string_lossy(),
        ])
        .args([
            "--connector-binary",
            env!("CARGO_BIN_EXE_obsrv-e2e-standin"),
        ])
        .args([
            "--image",
            &format!(
                "{STANDIN_IMAGE}={}",
                env!("CARGO_BIN_EXE_obsrv-e2e-standin")
            ),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("obsrv-local-cluster starts");
    let written = eventually(std::time::Duration::from_secs(20), || async {
        kubeconfig.exists().then_some(())
    })
    .await;
    assert!(written.is_some(), "no kubeconfig written");
    let run = |args: &[&str]| {
        std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("kubectl runs")
    };
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: c\n    image: {STANDIN_IMAGE}:1\n"
    );
    let mut apply = std::process::Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("kubectl");
    use std::io::Write as _;
    apply
        .stdin
        .take()
        .expect("stdin")
        .write_all(pod.as_bytes())
        .expect("write");
    assert!(apply.wait().expect("kubectl").success());
    let ip = eventually(std::time::Duration::from_secs(20), || async {
        let out = run(&[
            "get",
            "pod",
            "p",
            "-o",
            "jsonpath={.status.podIP} {.status.phase}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.ends_with("Running")
            .then(|| text.split(' ').next().unwrap_or("").to_string())
    })
    .await
    .expect("the pod runs");
    let listening = |ip: &str| std::net::TcpStream::connect((ip, 8080)).is_ok();
    assert!(listening(&ip));

    // SIGTERM: the binary stops its pods' processes and exits.
    let pid = i32::try_from(child.id()).expect("pid");
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let mut status = None;
    for _ in 0..200 {
        status = child.try_wait().ok().flatten();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "obsrv-local-cluster did not exit cleanly: {status:?}"
    );
    assert!(!listening(&ip), "the pod's process outlived the cluster");
}
