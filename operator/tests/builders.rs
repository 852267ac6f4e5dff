//! Pure builder tests: Connector manifests (fixtures) in, owned objects out.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use obsrv_crds::runtime::RuntimeConfig;
use obsrv_crds::{Connector, DeletionPolicy, DesiredState, KafkaSinkSpec, labels};
use obsrv_operator::builders::{self, Desired, Inputs};
use obsrv_operator::cleanup::Plan;
use obsrv_operator::config::Config;

fn fixture(yaml: &str) -> Connector {
    let mut c: Connector = serde_yaml::from_str(yaml).expect("fixture parses");
    c.metadata.uid = Some("uid-1".into());
    c
}

fn defaults() -> KafkaSinkSpec {
    let mut cfg = Config::defaults();
    cfg.sink_bootstrap_servers = Some("kafka.obsrv:9092".into());
    cfg.sink_defaults()
}

fn build(c: &Connector, replicas: i32) -> Desired {
    let source = c.spec.source.resolve().expect("one source");
    builders::build(&Inputs {
        connector: c,
        image: "ghcr.io/obsrv/obsrv-connector:test",
        sink_defaults: &defaults(),
        source_kind: source.kind,
        parallelism: source.parallelism(),
        replicas,
    })
}

const POSTGRES: &str = include_str!("fixtures/postgres.yaml");
const KAFKA: &str = include_str!("fixtures/kafka-autoscale.yaml");
const S3: &str = include_str!("fixtures/s3-two-replicas.yaml");

#[test]
fn config_map_holds_runtime_config_with_merged_sink_and_no_secret() {
    let c = fixture(POSTGRES);
    let d = build(&c, 1);
    let yaml = &d.config_map.data.as_ref().expect("data")["connector.yaml"];
    let rc: RuntimeConfig = serde_yaml::from_str(yaml).expect("runtime config parses");
    assert_eq!(rc.namespace, "shop");
    assert_eq!(rc.name, "orders");
    assert_eq!(rc.uid.as_deref(), Some("uid-1"));
    let sink = rc.spec.sink.and_then(|s| s.kafka).expect("sink merged");
    assert_eq!(
        sink.topic.as_deref(),
        Some("orders-ingest"),
        "the Connector's own topic wins"
    );
    assert_eq!(
        sink.bootstrap_servers.as_deref(),
        Some("kafka.obsrv:9092"),
        "default bootstrap fills in"
    );
    assert_eq!(sink.failed_topic.as_deref(), Some("connectors.failed"));
    assert_eq!(sink.max_message_bytes, Some(1_048_576));
    // Only references: a Secret's name may appear, never a value (the fixture has none to leak,
    // but the literal override of a credential env var must not reach the pod either).
    assert!(yaml.contains("pg-creds"));
    let owner = &d
        .config_map
        .metadata
        .owner_references
        .as_ref()
        .expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Connector", "uid-1", Some(true))
    );
}

#[test]
fn deployment_pod_template_is_locked_down_and_mounts_only_the_referenced_secret_keys() {
    let c = fixture(POSTGRES);
    let d = build(&c, 1);
    let dep = d.deployment;
    let spec = dep.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let sel = spec.selector.match_labels.as_ref().expect("selector");
    assert_eq!(sel[labels::INSTANCE], "orders");
    let tmpl = &spec.template;
    let meta = tmpl.metadata.as_ref().expect("pod meta");
    let ann = meta.annotations.as_ref().expect("annotations");
    assert_eq!(ann[labels::CONFIG_CHECKSUM], d.checksum);
    assert_eq!(ann["team"], "payments");
    let pod_labels = meta.labels.as_ref().expect("labels");
    assert_eq!(pod_labels[labels::SOURCE], "postgres");
    assert_eq!(pod_labels[labels::DATASET], "orders");
    assert_eq!(pod_labels[labels::MANAGED_BY], "obsrv-operator");
    let pod = tmpl.spec.as_ref().expect("pod spec");
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let ctr = &pod.containers[0];
    assert_eq!(
        ctr.image.as_deref(),
        Some("ghcr.io/obsrv/obsrv-connector:test")
    );
    let sc = ctr.security_context.as_ref().expect("container security");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&ctr.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&ctr.readiness_probe).as_deref(), Some("/readyz"));
    let env = ctr.env.as_ref().expect("env");
    assert!(
        env.iter()
            .all(|e| e.value_from.is_none() || e.name == "RUST_LOG"),
        "no credential travels as env: {env:?}"
    );
    assert!(
        env.iter().any(|e| e.name == "OBSRV_SECRETS_DIR"
            && e.value.as_deref() == Some("/var/run/secrets/obsrv")),
        "a template cannot move the Secrets directory: {env:?}"
    );
    // Each referenced Secret is mounted (optional: the pod says which one it lacks), with only
    // the keys the spec references.
    let volumes = pod.volumes.as_ref().expect("volumes");
    let projected = |secret: &str| {
        volumes
            .iter()
            .filter_map(|v| v.secret.as_ref())
            .find(|s| s.secret_name.as_deref() == Some(secret))
            .map(|s| {
                let keys: Vec<String> = s.items.iter().flatten().map(|i| i.key.clone()).collect();
                (keys, s.optional)
            })
    };
    assert_eq!(
        projected("pg-creds"),
        Some((vec!["username".into(), "password".into()], Some(true)))
    );
    assert_eq!(
        projected("pg-ca"),
        Some((vec!["ca.crt".into()], Some(true)))
    );
    let mounts = ctr.volume_mounts.as_ref().expect("mounts");
    for secret in ["pg-creds", "pg-ca"] {
        assert!(
            mounts.iter().any(
                |m| m.mount_path == format!("/var/run/secrets/obsrv/{secret}")
                    && m.read_only == Some(true)
            ),
            "{secret} mounted: {mounts:?}"
        );
    }
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("info"))
    );
    let mounts = ctr.volume_mounts.as_ref().expect("mounts");
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/etc/obsrv-connector" && m.read_only == Some(true))
    );
    assert!(
        d.pdb.is_none(),
        "no PodDisruptionBudget for a single replica"
    );
    let svc = d.service.spec.expect("service spec");
    assert_eq!(svc.ports.expect("ports")[0].port, 8080);
}

#[test]
fn checksum_rolls_on_spec_edit_only_not_on_scale_or_pause() {
    let c = fixture(POSTGRES);
    let base = build(&c, 1).checksum;
    assert_eq!(build(&c, 1).checksum, base, "same inputs, same checksum");
    assert_eq!(build(&c, 3).checksum, base, "scaling does not roll pods");
    let mut scaled = c.clone();
    scaled.spec.scaling.replicas = Some(5);
    assert_eq!(
        build(&scaled, 5).checksum,
        base,
        "kubectl scale (spec.scaling) does not roll pods"
    );
    let mut edited = c.clone();
    if let Some(pg) = edited.spec.source.postgres.as_mut() {
        pg.batch_size = 500;
    }
    assert_ne!(build(&edited, 1).checksum, base, "a spec edit rolls");
    let mut paused = c.clone();
    paused.spec.state = DesiredState::Paused;
    let d = build(&paused, 1);
    assert_eq!(
        d.checksum, base,
        "pausing does not roll pods: it reaches them through their state file"
    );
    let data = d.config_map.data.expect("data");
    assert_eq!(data["state"], "Paused");
    let rc: RuntimeConfig = serde_yaml::from_str(&data["connector.yaml"]).expect("parses");
    assert_eq!(
        rc.spec.state,
        DesiredState::Running,
        "the checksummed config never changes with the state"
    );
}

#[test]
fn template_overrides_apply() {
    let c = fixture(KAFKA);
    let d = build(&c, 2);
    let pod = d.deployment.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/my-connector:1.2.3")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("clicks-reader"));
    assert_eq!(pod.node_selector.expect("node selector")["pool"], "ingest");
    assert!(d.pdb.is_some());
}

#[test]
fn pdb_for_more_than_one_replica() {
    let c = fixture(S3);
    let d = build(&c, 2);
    let pdb = d.pdb.expect("pdb");
    let spec = pdb.spec.expect("spec");
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        spec.selector
            .expect("selector")
            .match_labels
            .expect("labels")[labels::INSTANCE],
        "files"
    );
    let pod = d.deployment.spec.expect("spec").template.spec.expect("pod");
    let s3_keys: Vec<String> = pod
        .volumes
        .expect("volumes")
        .iter()
        .filter_map(|v| v.secret.as_ref())
        .flat_map(|s| s.items.iter().flatten().map(|i| i.key.clone()))
        .collect();
    assert_eq!(s3_keys, ["accessKeyId", "secretAccessKey"]);
}

#[test]
fn cleanup_job_is_bounded() {
    let c = fixture(POSTGRES);
    let job = builders::cleanup_job(
        &Inputs {
            connector: &c,
            image: "img",
            sink_defaults: &defaults(),
            source_kind: &obsrv_crds::source::sql::POSTGRES,
            parallelism: obsrv_crds::Parallelism::Single,
            replicas: 0,
        },
        300,
        Plan::of(true, DeletionPolicy::Retain),
    );
    let spec = job.spec.expect("spec");
    assert_eq!(spec.active_deadline_seconds, Some(300));
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let args = pod.containers[0].args.clone().expect("args");
    assert_eq!(args[0], "cleanup");
    assert!(
        !args.contains(&"--delete-state".to_string()),
        "Retain keeps the positions: {args:?}"
    );
    assert_eq!(job.metadata.name.as_deref(), Some("orders-cleanup"));
}

/// `deletionPolicy: Delete` on a kind that holds nothing on the source (a table): the finalizer
/// runs a Job, and the Job deletes the positions; Retain on the same kind runs none.
#[test]
fn deletion_policy_delete_runs_a_cleanup_job_that_deletes_the_state() {
    let mut c = fixture(POSTGRES);
    let source = c.spec.source.resolve().expect("one source");
    assert!(!source.spec.needs_cleanup(), "a table source holds nothing");
    assert_eq!(
        c.spec.deletion_policy,
        DeletionPolicy::Retain,
        "the default"
    );
    assert!(!Plan::of(false, c.spec.deletion_policy).needs_job());

    let before = build(&c, 1).checksum;
    c.spec.deletion_policy = DeletionPolicy::Delete;
    assert_eq!(
        build(&c, 1).checksum,
        before,
        "changing the policy does not roll the pods"
    );
    let plan = Plan::of(false, c.spec.deletion_policy);
    assert!(plan.needs_job());
    let job = builders::cleanup_job(
        &Inputs {
            connector: &c,
            image: "img",
            sink_defaults: &defaults(),
            source_kind: &obsrv_crds::source::sql::POSTGRES,
            parallelism: obsrv_crds::Parallelism::Single,
            replicas: 0,
        },
        300,
        plan,
    );
    let pod = job.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(
        pod.containers[0].args.as_deref().expect("args"),
        [
            "cleanup",
            "--file",
            "/etc/obsrv-connector/connector.yaml",
            "--delete-state"
        ]
    );
}

#[test]
fn a_marketplace_image_gets_the_runtime_from_an_init_container() {
    let c = fixture(
        include_str!("../../examples/airbyte-faker.yaml")
            .split("---")
            .nth(1)
            .expect("the Connector"),
    );
    let d = build(&c, 1);
    let pod = d
        .deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let init = &pod.init_containers.as_ref().expect("an init container")[0];
    assert_eq!(
        init.image.as_deref(),
        Some("ghcr.io/obsrv/obsrv-connector:test")
    );
    assert_eq!(
        init.command.as_deref().expect("cp"),
        [
            "cp",
            "/usr/local/bin/obsrv-connector",
            "/obsrv/bin/obsrv-connector"
        ]
    );
    let ctr = &pod.containers[0];
    assert_eq!(ctr.image.as_deref(), Some("airbyte/source-faker:6.2.0"));
    assert_eq!(
        ctr.command.as_deref().expect("the runtime"),
        ["/obsrv/bin/obsrv-connector"]
    );
    let mounts: Vec<(&str, &str)> = ctr
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert!(
        mounts.contains(&("obsrv-runtime", "/obsrv/bin")),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("obsrv-work", "/obsrv/work")),
        "{mounts:?}"
    );
    // The Secret named in config by secretKeyRef is mounted, like those under `secrets`.
    assert!(
        mounts
            .iter()
            .any(|(_, p)| *p == "/var/run/secrets/obsrv/faker-settings"),
        "{mounts:?}"
    );
    let memory: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory"))
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        memory,
        ["obsrv-runtime", "obsrv-work"],
        "config files with credentials stay in memory"
    );
    let env = ctr.env.as_deref().unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "OBSRV_WORK_DIR" && e.value.as_deref() == Some("/obsrv/work"))
    );

    // A native custom image and the built-in kinds get nothing injected.
    let d = build(&fixture(POSTGRES), 1);
    let pod = d
        .deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert!(pod.init_containers.is_none() && pod.containers[0].command.is_none());
}
