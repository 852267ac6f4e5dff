//! The reconcile pipeline for one Connector: validate → build → apply → observe → status.
//! Decisions live in pure modules; this file is the thin I/O edge around them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use obsrv_crds::status::{ConnectorStatus, condition};
use obsrv_crds::{Connector, KafkaSinkSpec, labels};
use tracing::{Instrument, info, warn};

use crate::builders::{self, Inputs};
use crate::cleanup::{self, CleanupStep, JobState};
use crate::config::Config;
use crate::error::{Error, with_jitter};
use crate::metrics::Metrics;
use crate::observe;
use crate::scaling::{self, ScaleInput};
use crate::status::{self, Blocked, Outcome, Rollout, StatusInput};
use crate::validate::{self, SpecError};

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = labels::MANAGER;

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub sink_defaults: KafkaSinkSpec,
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Writes happen only while this is true (leader election).
    pub leader: Arc<AtomicBool>,
    /// Port of the pods' `/status` (8080; tests point it at a local server).
    pub status_port: u16,
    pub poll_concurrency: usize,
    pub poll_timeout: Duration,
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// The status last written per Connector uid, with the resourceVersion it was computed from.
    /// The watch cache can lag behind our own write (an owned-object event triggers the next
    /// reconcile first); then this is the true previous status, and no identical write follows.
    written: std::sync::Mutex<std::collections::HashMap<String, (String, ConnectorStatus)>>,
}

impl Context {
    pub fn new(
        client: Client,
        config: Config,
        metrics: Arc<Metrics>,
        leader: Arc<AtomicBool>,
    ) -> Context {
        let reporter = Reporter {
            controller: labels::MANAGER.into(),
            instance: std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sink_defaults: config.sink_defaults(),
            config,
            // Building a client only fails when the TLS backend cannot load; then fall back to
            // the default client rather than crash.
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            metrics,
            leader,
            status_port: obsrv_crds::runtime::HTTP_PORT,
            poll_concurrency: 16,
            poll_timeout: Duration::from_secs(3),
            clock: Arc::new(Timestamp::now),
            written: Default::default(),
        }
    }

    /// The Connector's previous status: ours when the cached object predates our last write.
    fn previous_status(&self, c: &Connector) -> Option<ConnectorStatus> {
        let uid = c.uid()?;
        let written = self.written.lock().ok()?;
        match written.get(&uid) {
            Some((rv, s)) if c.metadata.resource_version.as_ref() == Some(rv) => Some(s.clone()),
            _ => c.status.clone(),
        }
    }

    fn remember_status(&self, c: &Connector, s: Option<ConnectorStatus>) {
        let (Some(uid), Ok(mut written)) = (c.uid(), self.written.lock()) else {
            return;
        };
        match (s, c.metadata.resource_version.clone()) {
            (Some(s), Some(rv)) => {
                written.insert(uid, (rv, s));
            }
            _ => {
                written.remove(&uid);
            }
        }
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    fn apply_params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Publishes an event; a failure to do so is logged, never fatal.
    async fn event(
        &self,
        c: &Connector,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &c.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish event");
        }
    }
}

/// Entry point for the controller: runs the finalizer-wrapped pipeline and records metrics.
pub async fn reconcile(c: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", connector = %c.instance_id(), generation = c.metadata.generation);
    async move {
        if !ctx.leader.load(Ordering::Relaxed) {
            // Followers keep their caches warm but never write.
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        let started = Instant::now();
        let ns = c.namespace().unwrap_or_else(|| "default".into());
        let api: Api<Connector> = Api::namespaced(ctx.client.clone(), &ns);
        let result = finalizer(&api, labels::FINALIZER, c.clone(), |event| async {
            match event {
                Finalizer::Apply(c) => apply(&c, &ctx).await,
                Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
        ctx.metrics.reconciled(started.elapsed());
        if let Err(e) = &result {
            ctx.metrics.failed(e.reason());
        }
        result
    }
    .instrument(span)
    .await
}

/// Requeue policy on errors: back off by reason, with jitter.
pub fn error_policy(c: Arc<Connector>, e: &Error, _ctx: Arc<Context>) -> Action {
    warn!(connector = %c.instance_id(), reason = e.reason(), error = %e, "reconcile failed");
    // Spread by time and by object, so Connectors failing together do not retry together.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&c.uid(), &mut h);
    let seed =
        std::hash::Hasher::finish(&h) ^ Timestamp::now().subsec_nanosecond().unsigned_abs() as u64;
    Action::requeue(with_jitter(e.backoff(), seed))
}

fn condition_of<'a>(
    s: Option<&'a ConnectorStatus>,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// What an existing object of one of our names is.
fn conflict<K: Resource<DynamicType = ()>>(
    c: &Connector,
    existing: &Option<PartialObjectMeta<K>>,
) -> Option<Blocked> {
    let meta = existing.as_ref()?;
    if builders::owned_by(
        meta.metadata
            .owner_references
            .as_deref()
            .unwrap_or_default(),
        c,
    ) {
        return None;
    }
    Some(Blocked {
        reason: "NameConflict".into(),
        message: format!(
            "A {} named {} already exists and is not owned by this Connector; delete or rename it, or rename the Connector.",
            K::kind(&()),
            c.name_any()
        ),
        invalid_spec: false,
    })
}

async fn apply(c: &Connector, ctx: &Context) -> Result<Action, Error> {
    let ns = c.namespace().unwrap_or_else(|| "default".into());
    let name = c.name_any();
    let prev_status = ctx.previous_status(c);
    let prev = prev_status.as_ref();
    let poll = ctx.config.status_poll_interval;

    // 1. Validate (pure).
    let valid = match validate::validate(c, ctx.sink_defaults.bootstrap_servers.is_some()) {
        Ok(v) => v,
        Err(e) => return blocked(c, ctx, invalid(&e), None).await,
    };

    // 2. Nothing to dereference: Secrets reach the pods as optional volumes, the pods say which
    //    one they lack and follow rotations themselves, so the operator reads no Secret at all.

    // 3. Refuse objects of our names that we do not own.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    let live_deploy = deployments.get_opt(&name).await?;
    let live_cm = config_maps.get_metadata_opt(&name).await?;
    let live_svc = services.get_metadata_opt(&name).await?;
    let live_pdb = pdbs.get_metadata_opt(&name).await?;
    let live_deploy_meta = live_deploy
        .as_ref()
        .map(|d| PartialObjectMeta::<Deployment> {
            metadata: d.metadata.clone(),
            ..PartialObjectMeta::default()
        });
    let conflicts = [
        conflict(c, &live_deploy_meta),
        conflict(c, &live_cm),
        conflict(c, &live_svc),
        conflict(c, &live_pdb),
    ];
    if let Some(b) = conflicts.into_iter().flatten().next() {
        return blocked(c, ctx, b, Some(poll)).await;
    }

    // 4. Decide replicas (pure). A spent restart budget runs none until a change or a retry.
    let now = ctx.now();
    let generation = c.metadata.generation.unwrap_or_default();
    let retry = c.annotations().get(labels::RETRY).cloned();
    let spent = prev
        .and_then(|s| s.restart_budget.as_ref())
        .filter(|b| b.generation == generation && b.retry == retry);
    let has_status = prev.is_some_and(|s| s.phase.is_some());
    let decision = scaling::decide(&ScaleInput {
        state: c.spec.state,
        halted: spent.is_some(),
        scaling: &c.spec.scaling,
        current: if has_status {
            prev.map(|s| s.replicas)
        } else {
            None
        },
        lag_records: prev.and_then(|s| s.lag.as_ref()).map(|l| l.records),
        max_parallelism: effective_parallelism(
            valid.parallelism.limit(),
            prev.and_then(|s| s.max_parallelism),
        ),
        last_high_lag_time: prev
            .and_then(|s| s.last_high_lag_time.as_ref())
            .map(|t| t.0),
        now,
        scale_down_delay: valid.scale_down_delay,
    });

    // 5. Build (pure) and apply.
    let desired = builders::build(&Inputs {
        connector: c,
        image: &ctx.config.connector_image,
        sink_defaults: &ctx.sink_defaults,
        source_kind: valid.source_kind,
        parallelism: valid.parallelism,
        replicas: decision.replicas,
    });
    // Skip the applies when the live Deployment carries the hash of exactly these objects: no
    // writes in steady state.
    let in_sync = live_deploy.as_ref().is_some_and(|d| {
        d.annotations().get(builders::APPLIED_HASH) == Some(&desired.applied_hash)
            && d.spec.as_ref().and_then(|s| s.replicas) == Some(decision.replicas)
    }) && live_cm.is_some()
        && live_svc.is_some()
        && live_pdb.is_some() == desired.pdb.is_some();
    // Pods about to stop report their counts first: once scaled down they are gone, and the records
    // they delivered since the last poll would be missing from the totals.
    let live_replicas = live_deploy
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(0);
    let observed_before_scale_down = if decision.replicas < live_replicas {
        Some(observe_pods(c, ctx, &ns, &desired.checksum).await?)
    } else {
        None
    };
    let applied = match live_deploy.clone() {
        Some(d) if in_sync => d,
        _ => {
            let pp = Context::apply_params();
            config_maps
                .patch(&name, &pp, &Patch::Apply(&desired.config_map))
                .await?;
            services
                .patch(&name, &pp, &Patch::Apply(&desired.service))
                .await?;
            let applied = deployments
                .patch(&name, &pp, &Patch::Apply(&desired.deployment))
                .await?;
            match &desired.pdb {
                Some(p) => {
                    pdbs.patch(&name, &pp, &Patch::Apply(p)).await?;
                }
                None if live_pdb.is_some() => {
                    pdbs.delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ())
                        .or_else(ignore_not_found)?;
                }
                None => {}
            }
            deployment_events(
                c,
                ctx,
                live_deploy.as_ref(),
                &desired.checksum,
                decision.replicas,
            )
            .await;
            applied
        }
    };

    // 6. Observe the ready pods (those about to stop were observed before the apply).
    let observed = match observed_before_scale_down {
        Some(o) => o,
        None if decision.replicas > 0 || Rollout::of(Some(&applied)).total > 0 => {
            observe_pods(c, ctx, &ns, &desired.checksum).await?
        }
        None => observe::Observed::default(),
    };

    // 7. Status (pure) and write when changed.
    let budget = crate::budget::account(
        spent,
        generation,
        retry.as_deref(),
        observed.current_restarts.as_ref(),
        &name,
        now,
    );
    let next = status::compute(&StatusInput {
        previous: prev,
        restart_budget: budget,
        generation: c.metadata.generation,
        now,
        state: c.spec.state,
        source_kind: Some(valid.source_kind),
        selector: builders::selector_string(c),
        outcome: Outcome::Applied {
            decision: &decision,
            rollout: Rollout::of(Some(&applied)),
            observed: &observed,
        },
    });
    write_status(c, ctx, next).await?;
    Ok(Action::requeue(poll))
}

/// Polls the Connector's pods' `/status` and counts their restarts.
async fn observe_pods(
    c: &Connector,
    ctx: &Context,
    ns: &str,
    checksum: &str,
) -> Result<observe::Observed, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&builders::selector_string(c));
    let list = pods.list(&lp).await?;
    let targets = observe::targets(&list.items, ctx.status_port);
    let reports = observe::poll(&ctx.http, targets, ctx.poll_concurrency, ctx.poll_timeout).await;
    Ok(observe::Observed {
        restarts: observe::restarts(&list.items),
        current_restarts: observe::restarts(&observe::of_template(&list.items, checksum)),
        live_pods: observe::live_pods(&list.items),
        ..observe::aggregate(&reports)
    })
}

/// The most replicas the source allows: what the spec says (a single reader is 1 before any pod
/// runs) or, when only the running source knows (Kafka partitions), what the pods report.
fn effective_parallelism(from_spec: Option<i32>, reported: Option<i32>) -> Option<i32> {
    match (from_spec, reported) {
        (Some(s), Some(r)) => Some(s.min(r)),
        (s, r) => s.or(r),
    }
}

fn invalid(e: &SpecError) -> Blocked {
    Blocked {
        reason: e.reason().into(),
        message: format!("{e}. The running Deployment is left as it is until the spec is fixed."),
        invalid_spec: true,
    }
}

/// Reports a spec or world problem without touching owned objects. Invalid specs wait for a
/// change (no hot loop); missing Secrets and name conflicts are retried on the poll interval.
async fn blocked(
    c: &Connector,
    ctx: &Context,
    b: Blocked,
    retry: Option<Duration>,
) -> Result<Action, Error> {
    // Counted with the failures so an invalid spec or a conflict shows up by reason in metrics.
    ctx.metrics.failed(&b.reason);
    let previous = ctx.previous_status(c);
    let next = status::compute(&StatusInput {
        restart_budget: previous.as_ref().and_then(|s| s.restart_budget.clone()),
        previous: previous.as_ref(),
        generation: c.metadata.generation,
        now: ctx.now(),
        state: c.spec.state,
        source_kind: c.spec.source.resolve().ok().map(|s| s.kind),
        selector: builders::selector_string(c),
        outcome: Outcome::Blocked(b),
    });
    write_status(c, ctx, next).await?;
    Ok(retry.map_or_else(Action::await_change, Action::requeue))
}

/// Events for what changed in the Deployment: created, rolled, scaled.
async fn deployment_events(
    c: &Connector,
    ctx: &Context,
    live: Option<&Deployment>,
    checksum: &str,
    replicas: i32,
) {
    let Some(live) = live else {
        ctx.event(
            c,
            EventType::Normal,
            "Created",
            "Apply",
            format!(
                "Created Deployment {} with {replicas} replicas.",
                c.name_any()
            ),
        )
        .await;
        return;
    };
    let old_sum = live
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(labels::CONFIG_CHECKSUM));
    if old_sum.is_some_and(|s| s != checksum) {
        ctx.event(
            c,
            EventType::Normal,
            "RollingOut",
            "Apply",
            "The config or a referenced Secret changed: rolling pods.".into(),
        )
        .await;
    }
    let old_replicas = live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if old_replicas != replicas {
        ctx.event(
            c,
            EventType::Normal,
            "Scaled",
            "Scale",
            format!("Scaled from {old_replicas} to {replicas} replicas."),
        )
        .await;
    }
}

/// Writes status with server-side apply when it changed, and emits events for transitions.
async fn write_status(c: &Connector, ctx: &Context, next: ConnectorStatus) -> Result<(), Error> {
    let prev_status = ctx.previous_status(c);
    let prev = prev_status.as_ref();
    ctx.metrics.set_phase(&c.instance_id(), next.phase);
    if !status::changed(prev, &next) {
        return Ok(());
    }
    transition_events(c, ctx, prev, &next).await;
    let api: Api<Connector> = Api::namespaced(
        ctx.client.clone(),
        &c.namespace().unwrap_or_else(|| "default".into()),
    );
    let body = serde_json::json!({
        "apiVersion": "obsrv.io/v1alpha1",
        "kind": "Connector",
        "status": next,
    });
    api.patch_status(
        &c.name_any(),
        &Context::apply_params(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics.status_writes.inc();
    ctx.remember_status(c, Some(next));
    Ok(())
}

async fn transition_events(
    c: &Connector,
    ctx: &Context,
    prev: Option<&ConnectorStatus>,
    next: &ConnectorStatus,
) {
    let now_cond = |t| condition_of(Some(next), t);
    for t in [
        condition::CONFIG_VALID,
        condition::READY,
        condition::SCALING_LIMITED,
        condition::STALLED,
    ] {
        let (Some(n), p) = (now_cond(t), condition_of(prev, t)) else {
            continue;
        };
        if p.is_some_and(|p| p.status == n.status && p.reason == n.reason) {
            continue;
        }
        // Announce only what a human acts on: problems, and recoveries from them.
        let bad = match t {
            condition::READY | condition::CONFIG_VALID => n.status == "False",
            _ => n.status == "True",
        };
        if !bad && p.is_none() && t != condition::READY {
            continue;
        }
        // Rolling out, stopping, pausing, starting to read: expected on the way, not a warning.
        let transient =
            ["RollingOut", "Stopping", "NotReading", "Pausing"].contains(&n.reason.as_str());
        let type_ = if bad && !transient {
            EventType::Warning
        } else {
            EventType::Normal
        };
        info!(condition = t, status = %n.status, reason = %n.reason, "condition changed");
        ctx.event(
            c,
            type_,
            &n.reason,
            t,
            format!("{t}={}: {}", n.status, n.message),
        )
        .await;
    }
    if prev.and_then(|p| p.phase) != next.phase
        && let Some(p) = next.phase
    {
        info!(phase = p.as_str(), "phase changed");
    }
}

async fn cleanup(c: &Connector, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.set_phase(&c.instance_id(), None);
    ctx.remember_status(c, None);
    let Ok(source) = c.spec.source.resolve() else {
        // Nothing could have run, so nothing holds source-side state.
        return Ok(Action::await_change());
    };
    let kind = source.kind;
    let plan = cleanup::Plan::of(source.spec.needs_cleanup(), c.spec.deletion_policy);
    if !plan.needs_job() {
        info!(
            source = kind.name,
            "no cleanup needed: nothing held on the source, positions retained (deletionPolicy Retain)"
        );
        return Ok(Action::await_change());
    }
    let ns = c.namespace().unwrap_or_else(|| "default".into());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = builders::cleanup_job_name(c);
    let live = jobs.get_opt(&job_name).await?;
    let timeout = ctx.config.cleanup_timeout;
    let step = cleanup::step(live.as_ref().map(JobState::of), ctx.now(), timeout, plan);
    match step {
        CleanupStep::Start => {
            // The readers stop first: a connector still running holds what the Job releases (a
            // replication slot) and would take it again right after.
            let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            deployments
                .patch(
                    &c.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
                )
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
            // A pod still draining would commit a position right after the Job deleted it (or
            // take the slot again): the Job waits for the readers to be gone, within a bound.
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let readers = pods
                .list(&ListParams::default().labels(&builders::selector_string(c)))
                .await?
                .items
                .iter()
                .filter(|p| !p.owner_references().iter().any(|o| o.kind == "Job"))
                .count();
            let deleted_at = c.meta().deletion_timestamp.as_ref().map(|t| t.0);
            if cleanup::wait_for_readers(readers, deleted_at, ctx.now()) {
                info!(readers, "cleanup waits for the connector's pods to stop");
                return Err(Error::CleanupRunning(job_name));
            }
            let job = builders::cleanup_job(
                &Inputs {
                    connector: c,
                    image: &ctx.config.connector_image,
                    sink_defaults: &ctx.sink_defaults,
                    source_kind: kind,
                    parallelism: source.parallelism(),
                    replicas: 0,
                },
                i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
                plan,
            );
            jobs.patch(&job_name, &Context::apply_params(), &Patch::Apply(&job))
                .await?;
            let what = plan.describe();
            info!(job = %job_name, deletion_policy = c.spec.deletion_policy.as_str(), "cleanup Job started: {what}");
            ctx.event(
                c,
                EventType::Normal,
                "CleanupStarted",
                "Cleanup",
                format!("Started Job {job_name} to {what}."),
            )
            .await;
            Err(Error::CleanupRunning(job_name))
        }
        CleanupStep::Wait => Err(Error::CleanupRunning(job_name)),
        CleanupStep::Done { succeeded, message } => {
            let type_ = if succeeded {
                EventType::Normal
            } else {
                EventType::Warning
            };
            let reason = if succeeded {
                "CleanupSucceeded"
            } else {
                "CleanupFailed"
            };
            info!(job = %job_name, succeeded, "{message}");
            ctx.event(c, type_, reason, "Cleanup", message).await;
            jobs.delete(&job_name, &DeleteParams::background())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
            Ok(Action::await_change())
        }
    }
}

fn ignore_not_found(e: kube::Error) -> Result<(), kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        e => Err(e),
    }
}
