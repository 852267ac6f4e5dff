//! The local kubelet: Deployment and Job pods as real processes on their own loopback addresses.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use obsrv_e2e::controlplane::{ControlPlane, ControlPlaneOptions, ImageBinary, KubeletOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn deployment(name: &str, replicas: i32, env: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "connector",
                        "image": format!("{STANDIN_IMAGE}:1.0"),
                        "args": ["run", "--config", "/etc/obsrv-connector/connector.yaml"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "env": env,
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/obsrv-connector", "readOnly": true}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "cfg"}}],
                },
            },
        },
    }))
    .expect("deployment")
}

async fn setup(client: &kube::Client) {
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let secret =
        json!({"metadata": {"name": "pg-creds"}, "stringData": {"password": "s3cr3t-value"}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).expect("secret"),
        )
        .await
        .expect("secret");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = json!({"metadata": {"name": "cfg"}, "data": {"connector.yaml": "namespace: default\nname: orders\n"}});
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(cm).expect("cm"),
    )
    .await
    .expect("cm");
}

fn secret_env() -> Value {
    json!([
        {"name": "OBSRV_SOURCE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "pg-creds", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ])
}

async fn http(ip: &str, path: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let r = client
        .get(format!("http://{ip}:8080{path}"))
        .send()
        .await
        .ok()?;
    if r.status().is_success() {
        r.text().await.ok()
    } else {
        None
    }
}

/// Ready pods of `app` (names and IPs) once exactly `n` are ready and no other pod is left.
async fn ready_pods(pods: &Api<Pod>, app: &str, n: usize) -> Option<Vec<(String, String)>> {
    let ready = eventually(WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .ok()?;
        let ready: Vec<(String, String)> = list
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.clone()?)))
            .collect();
        (ready.len() == n && list.items.len() == n).then_some(ready)
    })
    .await;
    if ready.is_none() {
        // Say what the pods looked like, so a failure can be diagnosed from the test output.
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await;
        let shown: Vec<String> = list
            .map(|l| {
                l.items
                    .iter()
                    .map(|p| {
                        format!(
                            "{}: {:?}",
                            p.metadata.name.clone().unwrap_or_default(),
                            p.status
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("pods of {app} never reached {n} ready: {shown:#?}");
    }
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_replicas_run_as_processes_with_secrets_and_config_materialised() {
    let cp = with_kubelet().await;
    let client = cp.client().await.expect("client");
    setup(&client).await;
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments
        .create(
            &PostParams::default(),
            &deployment("orders", 3, secret_env()),
        )
        .await
        .expect("create");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let ready = ready_pods(&pods, "orders", 3).await.expect("3 ready pods");

    let mut ips: Vec<&str> = ready.iter().map(|(_, ip)| ip.as_str()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "each pod has its own address: {ready:?}");
    for (name, ip) in &ready {
        assert!(ip.starts_with("127."), "{ip}");
        assert_eq!(
            http(ip, "/env/OBSRV_LISTEN").await.as_deref(),
            Some(format!("{ip}:8080").as_str())
        );
        assert_eq!(
            http(ip, "/env/OBSRV_SOURCE_PASSWORD").await.as_deref(),
            Some("s3cr3t-value")
        );
        assert_eq!(
            http(ip, "/env/POD_NAME").await.as_deref(),
            Some(name.as_str())
        );
        // The ConfigMap mount path in the args points at a materialised directory.
        let args = http(ip, "/args").await.expect("args");
        let config = args.lines().last().expect("config path");
        assert!(
            config.ends_with("/connector.yaml") && !config.starts_with("/etc/"),
            "{args}"
        );
        assert_eq!(
            http(ip, &format!("/file{config}")).await.as_deref(),
            Some("namespace: default\nname: orders\n")
        );
    }

    // ConfigMap edits reach the mounted files of running pods (kubelet's periodic sync).
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let edit = json!({"data": {"connector.yaml": "namespace: default\nname: edited\n"}});
    cms.patch("cfg", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit config");
    let (_, ip) = &ready[0];
    let args = http(ip, "/args").await.expect("args");
    let config = args.lines().last().expect("config path").to_string();
    let updated = eventually(WAIT, || async {
        (http(ip, &format!("/file{config}")).await.as_deref()
            == Some("namespace: default\nname: edited\n"))
        .then_some(())
    })
    .await;
    assert!(updated.is_some(), "the mounted config never changed");

    let status = eventually(WAIT, || async {
        let s = deployments.get("orders").await.ok()?.status?;
        (s.ready_replicas == Some(3)).then_some(s)
    })
    .await
    .expect("deployment status");
    assert_eq!(
        (
            s_i(status.replicas),
            s_i(status.updated_replicas),
            s_i(status.available_replicas)
        ),
        (3, 3, 3)
    );
    assert_eq!(status.observed_generation, Some(1));
    cp.shutdown().await;
    for ip in ips {
        assert!(
            http(ip, "/healthz").await.is_none(),
            "{ip} still answers after shutdown"
        );
    }
}

fn s_i(v: Option<i32>) -> i32 {
    v.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_change_replaces_pods_and_scale_down_and_delete_stop_processes() {
    let cp = with_kubelet().await;
    let client = cp.client().await.expect("client");
    setup(&client).await;
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments
        .create(
            &PostParams::default(),
            &deployment("orders", 2, secret_env()),
        )
        .await
        .expect("create");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let first = ready_pods(&pods, "orders", 2).await.expect("2 ready pods");

    // A template change (e.g. the operator's config checksum annotation) rolls every pod.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"obsrv.io/config-checksum": "v2"}}}}});
    deployments
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    let second = eventually(WAIT, || async {
        let now = ready_pods(&pods, "orders", 2).await?;
        now.iter()
            .all(|(n, _)| first.iter().all(|(f, _)| f != n))
            .then_some(now)
    })
    .await
    .expect("two new pods replaced the old ones");
    for (_, ip) in &first {
        if second.iter().all(|(_, i)| i != ip) {
            assert!(
                eventually(WAIT, || async {
                    http(ip, "/healthz").await.is_none().then_some(())
                })
                .await
                .is_some(),
                "old pod at {ip} still runs"
            );
        }
    }
    let status = deployments
        .get("orders")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(status.observed_generation, Some(2));

    // Scale down: one pod and its process go away.
    deployments
        .patch_scale(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scale");
    let one = ready_pods(&pods, "orders", 1).await.expect("one pod left");
    let (_, removed_ip) = second
        .iter()
        .find(|(n, _)| *n != one[0].0)
        .expect("a removed pod");
    assert!(
        eventually(WAIT, || async {
            http(removed_ip, "/healthz").await.is_none().then_some(())
        })
        .await
        .is_some(),
        "scaled-down pod still runs"
    );
    assert!(http(&one[0].1, "/healthz").await.is_some());

    // Delete: the garbage collector removes the pods, the kubelet stops the process.
    deployments
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    let empty = eventually(WAIT, || async {
        pods.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(empty.is_some(), "pods are garbage collected");
    assert!(
        eventually(WAIT, || async {
            http(&one[0].1, "/healthz").await.is_none().then_some(())
        })
        .await
        .is_some(),
        "process stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_processes_restart_and_missing_secrets_wait_with_a_reason() {
    let cp = with_kubelet().await;
    let client = cp.client().await.expect("client");
    setup(&client).await;
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    deployments
        .create(
            &PostParams::default(),
            &deployment("orders", 1, secret_env()),
        )
        .await
        .expect("create");
    let ready = ready_pods(&pods, "orders", 1).await.expect("ready pod");
    let (name, ip) = &ready[0];
    let _ = http(ip, "/exit/3").await;
    let restarted = eventually(WAIT, || async {
        let p = pods.get(name).await.ok()?;
        let cs = p.status?.container_statuses?.into_iter().next()?;
        (cs.restart_count == 1 && cs.ready).then_some(cs)
    })
    .await
    .expect("the container restarts and becomes ready again");
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .expect("last state");
    assert_eq!(last.exit_code, 3);

    // kill -9, as a crashed node process would: restarted in place, exit code 137.
    let pid = cp
        .pod_pid("default", name)
        .expect("pid of the pod's process");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let restarted = eventually(WAIT, || async {
        let cs = pods
            .get(name)
            .await
            .ok()?
            .status?
            .container_statuses?
            .into_iter()
            .next()?;
        (cs.restart_count == 2 && cs.ready).then_some(cs)
    })
    .await
    .expect("restarted after kill -9");
    let last = restarted
        .last_state
        .and_then(|s| s.terminated)
        .expect("last state");
    assert_eq!(last.exit_code, 137);
    assert_ne!(cp.pod_pid("default", name), Some(pid), "a new process runs");
    // The kubelet's events explain it (`kubectl describe pod`).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::default_namespaced(client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "Started").count(),
        3,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "BackOff").count(),
        2,
        "{reasons:?}"
    );

    let env = json!([{"name": "OBSRV_SOURCE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "later-creds", "key": "password"}}}]);
    deployments
        .create(&PostParams::default(), &deployment("later", 1, env))
        .await
        .expect("create");
    let waiting = eventually(WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=later"))
            .await
            .ok()?;
        let cs = list
            .items
            .into_iter()
            .next()?
            .status?
            .container_statuses?
            .into_iter()
            .next()?;
        cs.state?
            .waiting
            .filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
    })
    .await
    .expect("the pod waits for its secret");
    assert_eq!(
        waiting.message.as_deref(),
        Some("secret \"later-creds\" not found")
    );
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let secret = json!({"metadata": {"name": "later-creds"}, "stringData": {"password": "p"}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).expect("secret"),
        )
        .await
        .expect("secret");
    let ready = ready_pods(&pods, "later", 1)
        .await
        .expect("ready once the secret exists");
    assert_eq!(
        http(&ready[0].1, "/env/OBSRV_SOURCE_PASSWORD")
            .await
            .as_deref(),
        Some("p")
    );
}

fn job(name: &str, script: &str, backoff: i32) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "cleanup", "image": "example.com/obsrv/shell:1", "args": ["-c", script]}],
        }}},
    }))
    .expect("job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_to_completion_or_fail_after_the_backoff_limit() {
    let kubelet = KubeletOptions::new(vec![ImageBinary::new("example.com/obsrv/shell", "/bin/sh")]);
    let cp = ControlPlane::start(ControlPlaneOptions {
        kubelet: Some(kubelet),
        ..ControlPlaneOptions::default()
    })
    .await
    .expect("start");
    let client = cp.client().await.expect("client");
    let jobs: Api<Job> = Api::default_namespaced(client.clone());
    jobs.create(&PostParams::default(), &job("ok", "echo cleaned", 2))
        .await
        .expect("create");
    jobs.create(&PostParams::default(), &job("bad", "exit 4", 1))
        .await
        .expect("create");
    let condition = |name: &'static str, type_: &'static str| {
        let jobs = jobs.clone();
        async move {
            eventually(WAIT, || async {
                let j = jobs.get(name).await.ok()?;
                let st = j.status?;
                st.conditions?
                    .iter()
                    .any(|c| c.type_ == type_ && c.status == "True")
                    .then_some((st.succeeded, st.failed))
            })
            .await
        }
    };
    assert_eq!(condition("ok", "Complete").await, Some((Some(1), None)));
    assert_eq!(condition("bad", "Failed").await, Some((None, Some(2))));
    // The job's output is served as the pod log.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod = pods
        .list(&ListParams::default().labels("job-name=ok"))
        .await
        .expect("list")
        .items
        .into_iter()
        .next()
        .expect("job pod");
    let log = pods
        .logs(
            pod.metadata.name.as_deref().unwrap_or(""),
            &Default::default(),
        )
        .await
        .expect("logs");
    assert_eq!(log.trim(), "cleaned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_liveness_probes_drive_ready_and_restarts() {
    let cp = with_kubelet().await;
    let client = cp.client().await.expect("client");
    setup(&client).await;
    let flags = tempfile::tempdir().expect("tempdir");
    let not_ready = flags.path().join("not-ready");
    let dead = flags.path().join("dead");
    std::fs::write(&not_ready, "").expect("flag");
    let env = json!([
        {"name": "STANDIN_NOT_READY", "value": not_ready.to_string_lossy()},
        {"name": "STANDIN_NOT_LIVE", "value": dead.to_string_lossy()},
    ]);
    let mut dep = serde_json::to_value(deployment("probed", 1, env)).expect("json");
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 2});
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(dep).expect("deployment"),
        )
        .await
        .expect("create");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let container = |p: Pod| {
        p.status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
    };
    let running_not_ready = eventually(WAIT, || async {
        let p = pods
            .list(&ListParams::default().labels("app=probed"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()?;
        let cs = container(p)?;
        (cs.started == Some(true) && !cs.ready).then_some(())
    })
    .await;
    assert!(
        running_not_ready.is_some(),
        "the process runs but is not ready while /readyz fails"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ready_pods_now(&pods, "probed").await.is_empty());
    std::fs::remove_file(&not_ready).expect("remove flag");
    let ready = ready_pods(&pods, "probed", 1)
        .await
        .expect("ready once /readyz answers 200");
    let name = ready[0].0.clone();

    std::fs::write(&dead, "").expect("flag");
    let restarted = eventually(WAIT, || async {
        let cs = container(pods.get(&name).await.ok()?)?;
        (cs.restart_count >= 1).then_some(cs)
    })
    .await;
    assert!(
        restarted.is_some(),
        "a failing liveness probe restarts the container"
    );
    std::fs::remove_file(&dead).expect("remove flag");
    let ready = ready_pods(&pods, "probed", 1).await.expect("ready again");
    assert_eq!(ready[0].0, name, "restarted in place, same pod");
}

async fn ready_pods_now(pods: &Api<Pod>, app: &str) -> Vec<String> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list");
    list.items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    let kubelet = KubeletOptions::new(vec![ImageBinary::new("example.com/obsrv/shell", "/bin/sh")]);
    let cp = ControlPlane::start(ControlPlaneOptions {
        kubelet: Some(kubelet),
        ..ControlPlaneOptions::default()
    })
    .await
    .expect("start");
    let client = cp.client().await.expect("client");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod = json!({
        "metadata": {"name": "stubborn"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "c", "image": "example.com/obsrv/shell:1", "args": ["-c", "trap '' TERM; while true; do sleep 0.1; done"],
        }]},
    });
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).expect("pod"),
    )
    .await
    .expect("create");
    let pid = eventually(WAIT, || async { cp.pod_pid("default", "stubborn") })
        .await
        .expect("running");
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid));
    let started = std::time::Instant::now();
    pods.delete("stubborn", &DeleteParams::default())
        .await
        .expect("delete");
    // Terminating while the grace period runs, then SIGKILL and the pod is gone.
    let terminating = pods.get("stubborn").await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let gone = eventually(WAIT, || async {
        pods.get("stubborn").await.is_err().then_some(())
    })
    .await;
    assert!(gone.is_some(), "the pod is removed after the grace period");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "SIGTERM alone stopped a process that ignores it"
    );
    assert!(
        eventually(WAIT, || async { (!alive(pid)).then_some(()) })
            .await
            .is_some(),
        "the process was not killed"
    );
}
