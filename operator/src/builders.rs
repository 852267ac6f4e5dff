//! Pure builders: the objects a Connector should own, as functions of the Connector, the operator's
//! configuration, the referenced Secrets' versions and the decided replica count.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use obsrv_crds::runtime::{self, RuntimeConfig};
use obsrv_crds::{
    Connector, DeletionPolicy, DesiredState, KafkaSinkSpec, Parallelism, Scaling, SinkSpec,
    SourceKind, labels,
};
use sha2::{Digest, Sha256};

/// Name of the container running the connector.
pub const CONTAINER: &str = "connector";
/// Name of the HTTP port (container and Service).
pub const HTTP_PORT_NAME: &str = "http";

/// Everything the builders need, already fetched and decided.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub connector: &'a Connector,
    /// The operator's shared connector image.
    pub image: &'a str,
    pub sink_defaults: &'a KafkaSinkSpec,
    pub source_kind: &'static SourceKind,
    /// How many replicas can read the source at once (decides the rollout strategy).
    pub parallelism: Parallelism,
    pub replicas: i32,
}

/// The objects one Connector owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// Only when more than one replica is wanted.
    pub pdb: Option<PodDisruptionBudget>,
    pub checksum: String,
    /// Hash of all of the above, also on the Deployment as [`APPLIED_HASH`]: when the live
    /// Deployment carries the same, nothing needs applying (no writes in steady state).
    pub applied_hash: String,
}

/// Deployment annotation: hash of every object last applied for the Connector.
pub const APPLIED_HASH: &str = "obsrv.io/applied-hash";

/// Labels selecting a Connector's pods (stable for the Deployment's lifetime).
pub fn selector_labels(c: &Connector) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::APP_NAME.to_string()),
        (labels::INSTANCE.to_string(), c.name_any()),
    ])
}

/// [`selector_labels`] as a label-selector string, for `status.selector` and pod lists.
pub fn selector_string(c: &Connector) -> String {
    selector_labels(c)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The standard labels on every object the operator creates for a Connector.
pub fn standard_labels(c: &Connector, kind: &SourceKind) -> BTreeMap<String, String> {
    let mut l = selector_labels(c);
    l.insert(labels::COMPONENT.into(), "connector".into());
    l.insert(labels::PART_OF.into(), "obsrv".into());
    l.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    l.insert(labels::CONNECTOR.into(), c.name_any());
    l.insert(labels::DATASET.into(), label_value(&c.spec.dataset));
    l.insert(labels::SOURCE.into(), kind.name.into());
    l
}

/// A label value is at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The controller owner reference every owned object carries.
pub fn owner_ref(c: &Connector) -> Option<OwnerReference> {
    c.controller_owner_ref(&())
}

/// Whether `owners` make the object belong to this Connector (a controller reference to its uid).
pub fn owned_by(owners: &[OwnerReference], c: &Connector) -> bool {
    let uid = c.uid();
    owners.iter().any(|o| {
        Some(&o.uid) == uid.as_ref() && o.kind == "Connector" && o.controller == Some(true)
    })
}

fn meta(c: &Connector, kind: &SourceKind) -> ObjectMeta {
    ObjectMeta {
        name: Some(c.name_any()),
        namespace: c.namespace(),
        labels: Some(standard_labels(c, kind)),
        owner_references: owner_ref(c).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// What the connector pods read: the spec with the sink merged over the operator's defaults.
/// Scaling is left out: replicas are the operator's business, and a `kubectl scale` or an
/// autoscaling bound must not change the config checksum and restart every pod.
pub fn runtime_config(c: &Connector, sink_defaults: &KafkaSinkSpec) -> RuntimeConfig {
    let mut spec = c.spec.clone();
    spec.scaling = Scaling::default();
    // The state travels in its own file (runtime::STATE_FILE): pausing must not roll the pods.
    spec.state = DesiredState::Running;
    // Only the cleanup Job acts on it, told by a flag from the Connector being deleted (always
    // the latest policy): changing it must not roll the pods.
    spec.deletion_policy = DeletionPolicy::Retain;
    let own = spec
        .sink
        .as_ref()
        .and_then(|s| s.kafka.clone())
        .unwrap_or_default();
    spec.sink = Some(SinkSpec {
        kafka: Some(own.merged_over(sink_defaults)),
    });
    RuntimeConfig {
        namespace: c.namespace().unwrap_or_else(|| "default".into()),
        name: c.name_any(),
        uid: c.uid(),
        spec,
    }
}

/// The runtime config as the YAML file pods read.
pub fn config_yaml(c: &Connector, sink_defaults: &KafkaSinkSpec) -> String {
    // A RuntimeConfig is plain data (strings, numbers, maps): serializing it cannot fail.
    serde_yaml::to_string(&runtime_config(c, sink_defaults)).unwrap_or_default()
}

/// sha256 of the config file: an edit rolls the pods (a Secret rotation does not need to: the
/// pods follow their mounted Secret files).
pub fn checksum(config_yaml: &str) -> String {
    Sha256::digest(config_yaml.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds every owned object.
pub fn build(i: &Inputs<'_>) -> Desired {
    let c = i.connector;
    let yaml = config_yaml(c, i.sink_defaults);
    let sum = checksum(&yaml);
    let config_map = ConfigMap {
        metadata: meta(c, i.source_kind),
        data: Some(BTreeMap::from([
            (runtime::CONFIG_FILE.to_string(), yaml),
            (
                runtime::STATE_FILE.to_string(),
                c.spec.state.as_str().to_string(),
            ),
        ])),
        ..ConfigMap::default()
    };
    let mut desired = Desired {
        config_map,
        deployment: deployment(i, &sum),
        service: service(c, i.source_kind),
        pdb: (i.replicas > 1).then(|| pdb(c, i.source_kind)),
        checksum: sum,
        applied_hash: String::new(),
    };
    let mut h = Sha256::new();
    for part in [
        serde_json::to_vec(&desired.config_map),
        serde_json::to_vec(&desired.deployment),
        serde_json::to_vec(&desired.service),
        serde_json::to_vec(&desired.pdb),
    ] {
        // Plain data always serializes; an error would only weaken the skip, never break apply.
        h.update(part.unwrap_or_default());
        h.update(b"\0");
    }
    desired.applied_hash = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    desired
        .deployment
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH.into(), desired.applied_hash.clone());
    desired
}

/// The template's own env, and where the mounted Secrets are (never a credential value: those
/// are files of the pod's Secret volumes, see [`secret_volumes`]).
pub fn env(c: &Connector) -> Vec<EnvVar> {
    let mut out = Vec::new();
    if !secret_volumes(c).is_empty() {
        out.push(EnvVar {
            name: runtime::SECRETS_DIR_ENV.into(),
            value: Some(obsrv_crds::source::SECRETS_DIR.into()),
            value_from: None,
        });
    }
    for e in c.spec.template.iter().flat_map(|t| t.env.iter()) {
        // The template may not move the Secrets directory away from the mounts.
        if !out.iter().any(|o| o.name == e.name) {
            out.push(e.clone());
        }
    }
    out
}

/// One Secret the pod mounts: at `<SECRETS_DIR>/<secret>`, only `keys` (all keys when `None`:
/// a custom source reads whatever it needs). Optional, so a missing Secret does not keep the pod
/// from starting: the connector says which Secret and key it lacks (reason NotFound) and picks
/// them up once they exist. Files, unlike env, follow a rotation: the connector notices and
/// reconnects with the new values, so the operator never reads a Secret.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretVolume {
    pub volume: String,
    pub secret: String,
    pub keys: Option<Vec<String>>,
}

/// The Secret volumes of a Connector's pods.
pub fn secret_volumes(c: &Connector) -> Vec<SecretVolume> {
    let mut by_secret: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    for s in runtime::secret_env(&c.spec) {
        if let Some(keys) = by_secret
            .entry(s.secret_name)
            .or_insert_with(|| Some(Vec::new()))
            && !keys.contains(&s.key)
        {
            keys.push(s.key);
        }
    }
    if let Ok(source) = c.spec.source.resolve() {
        for name in source.spec.mounted_secrets() {
            by_secret.insert(name, None);
        }
    }
    by_secret
        .into_iter()
        .enumerate()
        .map(|(i, (secret, keys))| SecretVolume {
            volume: format!("secret-{i}"),
            secret,
            keys,
        })
        .collect()
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn config_path() -> String {
    format!("{}/{}", runtime::CONFIG_DIR, runtime::CONFIG_FILE)
}

/// The image a Connector runs: a custom source's own, `spec.image`, or the shared one.
pub fn image_of(c: &Connector, shared: &str) -> String {
    c.spec
        .source
        .resolve()
        .ok()
        .and_then(|s| s.spec.image().map(str::to_string))
        .or_else(|| c.spec.image.clone())
        .unwrap_or_else(|| shared.to_string())
}

/// Where a marketplace connector's pod gets the runtime: an init container of the shared image
/// copies `obsrv-connector` into this memory-backed volume, and the image's own container runs it.
pub const RUNTIME_DIR: &str = "/obsrv/bin";
/// The runtime's private files (a marketplace program's config, catalog and state): memory-backed.
pub const WORK_DIR: &str = "/obsrv/work";
/// The runtime inside the shared image.
const SHARED_IMAGE_RUNTIME: &str = "/usr/local/bin/obsrv-connector";

/// Whether the Connector's image lacks the runtime (an Airbyte source, a Singer tap).
fn injects_runtime(c: &Connector) -> bool {
    c.spec
        .source
        .resolve()
        .is_ok_and(|s| s.spec.injects_runtime())
}

fn memory_volume(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The init container that copies the runtime out of the shared image.
fn runtime_installer(image: &str) -> Container {
    Container {
        name: "install-runtime".into(),
        image: Some(image.into()),
        command: Some(vec![
            "cp".into(),
            SHARED_IMAGE_RUNTIME.into(),
            format!("{RUNTIME_DIR}/obsrv-connector"),
        ]),
        volume_mounts: Some(vec![mount("obsrv-runtime", RUNTIME_DIR, false)]),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The connector container (shared by the Deployment and the cleanup Job).
fn container(c: &Connector, image: &str, args: Vec<String>, probes: bool) -> Container {
    let t = c.spec.template.as_ref();
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: runtime::CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    for v in secret_volumes(c) {
        mounts.push(VolumeMount {
            name: v.volume,
            mount_path: format!("{}/{}", obsrv_crds::source::SECRETS_DIR, v.secret),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut env = env(c);
    let injected = injects_runtime(c);
    if injected {
        mounts.push(mount("obsrv-runtime", RUNTIME_DIR, true));
        mounts.push(mount("obsrv-work", WORK_DIR, false));
        env.push(EnvVar {
            name: runtime::WORK_DIR_ENV.into(),
            value: Some(WORK_DIR.into()),
            value_from: None,
        });
    }
    Container {
        name: CONTAINER.into(),
        image: Some(image_of(c, image)),
        image_pull_policy: t.and_then(|t| t.image_pull_policy.clone()),
        command: injected.then(|| vec![format!("{RUNTIME_DIR}/obsrv-connector")]),
        args: Some(args),
        env: Some(env),
        ports: probes.then(|| {
            vec![ContainerPort {
                name: Some(HTTP_PORT_NAME.into()),
                container_port: runtime::HTTP_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]
        }),
        liveness_probe: probes.then(|| http_probe("/healthz", 10, 6)),
        readiness_probe: probes.then(|| http_probe("/readyz", 5, 3)),
        resources: t.and_then(|t| t.resources.clone()),
        security_context: Some(restricted()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn pod_spec(c: &Connector, image: &str, args: Vec<String>, probes: bool) -> PodSpec {
    let t = c.spec.template.as_ref();
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: c.name_any(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    for v in secret_volumes(c) {
        volumes.push(Volume {
            name: v.volume,
            secret: Some(SecretVolumeSource {
                secret_name: Some(v.secret),
                items: v.keys.map(|keys| {
                    keys.into_iter()
                        .map(|k| KeyToPath {
                            path: k.clone(),
                            key: k,
                            mode: None,
                        })
                        .collect()
                }),
                optional: Some(true),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let injected = injects_runtime(c);
    if injected {
        volumes.push(memory_volume("obsrv-runtime"));
        volumes.push(memory_volume("obsrv-work"));
    }
    PodSpec {
        init_containers: injected.then(|| vec![runtime_installer(image)]),
        containers: vec![container(c, image, args, probes)],
        service_account_name: t.and_then(|t| t.service_account_name.clone()),
        node_selector: t.map(|t| t.node_selector.clone()).filter(|m| !m.is_empty()),
        tolerations: t.map(|t| t.tolerations.clone()).filter(|v| !v.is_empty()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        // The runtime drains and commits on SIGTERM; give it time.
        termination_grace_period_seconds: Some(60),
        volumes: Some(volumes),
        ..PodSpec::default()
    }
}

fn pod_meta(c: &Connector, kind: &SourceKind, checksum: &str) -> ObjectMeta {
    let t = c.spec.template.as_ref();
    let mut l: BTreeMap<String, String> = t.map(|t| t.pod_labels.clone()).unwrap_or_default();
    // Our labels win: the selector must keep matching.
    l.extend(standard_labels(c, kind));
    let mut a: BTreeMap<String, String> = t.map(|t| t.pod_annotations.clone()).unwrap_or_default();
    a.insert(labels::CONFIG_CHECKSUM.into(), checksum.into());
    ObjectMeta {
        labels: Some(l),
        annotations: Some(a),
        ..ObjectMeta::default()
    }
}

fn deployment(i: &Inputs<'_>, checksum: &str) -> Deployment {
    let c = i.connector;
    Deployment {
        metadata: meta(c, i.source_kind),
        spec: Some(DeploymentSpec {
            replicas: Some(i.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(c)),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(i.parallelism)),
            template: PodTemplateSpec {
                metadata: Some(pod_meta(c, i.source_kind, checksum)),
                spec: Some(pod_spec(
                    c,
                    i.image,
                    vec!["run".into(), "--file".into(), config_path()],
                    true,
                )),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// How pods are replaced. A single-reader source never runs two readers, not even for the
/// moments of a roll: the old pod goes first (`Recreate`). Sources that share their work replace
/// one pod at a time and never run below the wanted count.
pub fn strategy(parallelism: Parallelism) -> DeploymentStrategy {
    if parallelism == Parallelism::Single {
        return DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        };
    }
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    }
}

fn service(c: &Connector, kind: &SourceKind) -> Service {
    Service {
        metadata: meta(c, kind),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(c)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.into()),
                port: runtime::HTTP_PORT.into(),
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pdb(c: &Connector, kind: &SourceKind) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(c, kind),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(c)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Name of a Connector's cleanup Job.
pub fn cleanup_job_name(c: &Connector) -> String {
    format!("{}-cleanup", c.name_any())
}

/// The Job running `obsrv-connector cleanup` for a Connector being deleted (with
/// `--delete-state` when the plan deletes its positions). It is bounded by
/// `activeDeadlineSeconds` and never retried endlessly.
pub fn cleanup_job(i: &Inputs<'_>, timeout_seconds: i64, plan: crate::cleanup::Plan) -> Job {
    let c = i.connector;
    let mut args = vec!["cleanup".into(), "--file".into(), config_path()];
    args.extend(plan.flags());
    let mut spec = pod_spec(c, i.image, args, false);
    spec.restart_policy = Some("Never".into());
    let mut metadata = meta(c, i.source_kind);
    metadata.name = Some(cleanup_job_name(c));
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            active_deadline_seconds: Some(timeout_seconds.max(1)),
            ttl_seconds_after_finished: Some(600),
            template: PodTemplateSpec {
                metadata: Some(pod_meta(c, i.source_kind, "cleanup")),
                spec: Some(spec),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}
