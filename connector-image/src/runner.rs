//! The pipeline: a reader task pulls batches from the source into a small bounded channel; the
//! writer hands each batch to the producer, keeps up to [`MAX_IN_FLIGHT_BYTES`] in flight, takes
//! acknowledgements as they come, and commits a batch's position only once it and every batch
//! before it are acknowledged. With `delivery: exactlyOnce` batches
//! instead go out in Kafka transactions with their position (a state-topic record, or a Kafka
//! source's group offsets), a transaction spanning batches up to [`TXN_MAX_BYTES`] or
//! [`TXN_MAX_AGE`] while the reader reads ahead. Errors are retried with backoff and shown as
//! `lastError`; SIGTERM stops reading, drains, commits and returns.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::jiff::Timestamp;
use obsrv_crds::{
    DesiredState, Parallelism, RuntimeState,
    runtime::RuntimeConfig,
    schedule::{Cron, Plan},
    status::Totals,
};
use tokio::sync::{mpsc, watch};

use crate::{
    config::{Secrets, SinkSettings, parse_duration},
    envelope::Context,
    error::{Error, Result},
    http::Shared,
    sink::{
        Acks, InFlight, Sink, Transactions,
        kafka::{replica_transactional_id, transactional_id},
    },
    source::{Batch, BoxedSource, OpenContext, Registry, SourceCommitter},
    state::StateStore,
};

/// atLeastOnce: bytes of records handed to the producer and not yet acknowledged. Bounded by
/// bytes, not batches: a broker source's batches are small, and two of them in flight held its
/// rate to a few hundred messages per producer linger (NATS 0.11 of the raw loop).
pub const MAX_IN_FLIGHT_BYTES: u64 = 4 << 20;
/// atLeastOnce: batches in flight, whatever their size (each keeps its position and counters).
pub const MAX_IN_FLIGHT_BATCHES: usize = 256;
/// How often positions are written while data flows (always on catch-up and on shutdown).
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// How long a drain on shutdown may take before giving up (the position then stays behind).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// exactlyOnce: a transaction takes batches until it holds this many bytes or is [`TXN_MAX_AGE`]
/// old. One transaction per batch paid a commit round trip (the coordinator writing markers on
/// every partition) per batch, with the producer idle meanwhile: 2.7x slower than atLeastOnce.
pub const TXN_MAX_BYTES: u64 = 32 << 20;
/// exactlyOnce: how long records may wait in an open transaction, invisible to read_committed
/// consumers, before it commits.
pub const TXN_MAX_AGE: Duration = Duration::from_millis(250);
/// How often lag is measured while data flows.
pub const LAG_EVERY: Duration = Duration::from_secs(10);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Exponential backoff with jitter: 1s, 2s, 4s ... 30s.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let base = 1000u64.saturating_mul(1 << self.attempt.min(5)).min(30_000);
        self.attempt += 1;
        // Jitter from the clock's sub-second part: +-20%, no RNG dependency needed.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0) as u64;
        let jitter = (nanos % 401) as i64 - 200; // -200..=200 per mille / 5
        Duration::from_millis((base as i64 + base as i64 * jitter / 1000) as u64)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// The poll interval of the configured source (the spec's, or its kind's default).
pub fn poll_interval(rc: &RuntimeConfig) -> Result<Duration> {
    let source = rc
        .spec
        .source
        .resolve()
        .map_err(|e| Error::Config(e.to_string()))?;
    parse_duration(source.poll_interval()).map_err(|e| {
        Error::Config(format!(
            "spec.source.{}.pollInterval: {e}",
            source.kind.name
        ))
    })
}

/// Opens the configured source, resuming after `position`.
pub async fn open_source(
    registry: &Registry,
    config: &Arc<RuntimeConfig>,
    secrets: &Arc<Secrets>,
    sink: &Arc<dyn Sink>,
    position: Option<serde_json::Value>,
) -> Result<BoxedSource> {
    registry
        .for_config(config)?
        .open(OpenContext {
            config: config.clone(),
            secrets: secrets.clone(),
            position,
            sink: sink.clone(),
        })
        .await
}

enum Committer {
    /// Positions in the state topic; a source may also want to hear of each commit once it is
    /// written there (a Postgres slot confirms its flush LSN only after the sink and the state
    /// topic have everything before it).
    State(StateStore, Option<Box<dyn SourceCommitter>>),
    Source(Box<dyn SourceCommitter>),
}

impl Committer {
    async fn commit(&self, position: &serde_json::Value, watermark: Option<String>) -> Result<()> {
        match self {
            Committer::State(s, then) => {
                s.commit(position, watermark, now_ms()).await?;
                match then {
                    Some(c) => c.commit(position),
                    None => Ok(()),
                }
            }
            Committer::Source(c) => c.commit(position),
        }
    }

    /// exactlyOnce, after the transaction with `position` committed: tells a state-topic source
    /// that wants to hear of commits.
    fn committed(&self, position: &serde_json::Value) -> Result<()> {
        match self {
            Committer::State(_, Some(c)) => c.commit(position),
            _ => Ok(()),
        }
    }

    /// Whether each acknowledged batch is committed at once (brokers with a prefetch window).
    fn commits_each_batch(&self) -> bool {
        match self {
            Committer::State(..) => false,
            Committer::Source(c) => c.commits_each_batch(),
        }
    }

    /// exactlyOnce: whether a batch reaching `position` may still be delivered.
    fn is_current(&self, position: &serde_json::Value) -> bool {
        match self {
            Committer::State(..) => true,
            Committer::Source(c) => c.is_current(position),
        }
    }

    /// exactlyOnce: adds `f`'s position to the open transaction (the state record, or a Kafka
    /// source's group offsets); false when the batch may no longer be delivered.
    async fn add_to_transaction(
        &self,
        txn: &dyn Transactions,
        f: &InFlight,
        acks: &Arc<Acks>,
    ) -> Result<bool> {
        match self {
            Committer::State(s, _) => {
                s.enqueue(&f.position, f.watermark.clone(), now_ms(), acks)
                    .await?;
                Ok(true)
            }
            Committer::Source(c) => c.add_to_transaction(&f.position, txn).await,
        }
    }
}

/// This process among the connector's replicas.
fn replica_name() -> String {
    replica_name_of(
        std::env::var("HOSTNAME").ok().as_deref(),
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        std::process::id(),
    )
}

/// In a pod, the pod's name: it survives a container restart, so the restarted process takes over
/// (and aborts) the transaction its predecessor left open instead of leaving it to time out.
/// Elsewhere the host name and process id, which tell local processes apart. Pure.
fn replica_name_of(hostname: Option<&str>, in_pod: bool, pid: u32) -> String {
    match hostname.filter(|h| !h.is_empty()) {
        Some(pod) if in_pod => pod.to_string(),
        host => format!("{}.{pid}", host.unwrap_or("local")),
    }
}

enum Item {
    Batch(Batch),
    CaughtUp,
}

/// How a pipeline run ended without error.
#[derive(Debug, PartialEq, Eq)]
enum Finished {
    /// SIGTERM.
    Stopped,
    /// `schedule.once` and everything read.
    Done,
}

/// Everything a run needs.
pub struct Runtime {
    /// The source kinds this binary runs.
    pub registry: Registry,
    pub config: RuntimeConfig,
    pub sink: SinkSettings,
    pub secrets: Secrets,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<bool>,
    /// Running or Paused, as it changes (the operator's state file; the spec's state locally).
    pub desired: watch::Receiver<DesiredState>,
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// SIGTERM: everything in flight delivered and committed.
    Stopped,
    /// A Secret file changed: run again with the new values (same process, no restart).
    SecretsRotated,
}

/// How often mounted Secret files are compared with what was read.
pub const SECRETS_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Turns true once a Secret file the run read has changed.
fn rotation_signal(secrets: Arc<Secrets>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(SECRETS_CHECK_EVERY) => {}
            }
            let s = secrets.clone();
            if tokio::task::spawn_blocking(move || s.rotated())
                .await
                .unwrap_or(false)
            {
                tracing::info!("a Secret changed: reconnecting with the new values");
                let _ = tx.send(true);
                return;
            }
        }
    });
    rx
}

/// Resolves when `rx` changes; never when its sender is gone (the value then stays as it is).
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// True once the run must stop reading: SIGTERM, the Connector paused (or stopped), or a Secret
/// rotated.
fn halt_signal(
    mut stop: watch::Receiver<bool>,
    mut desired: watch::Receiver<DesiredState>,
    mut rotated: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let halted = |stop: &watch::Receiver<bool>,
                  d: &watch::Receiver<DesiredState>,
                  r: &watch::Receiver<bool>| {
        *stop.borrow() || *d.borrow() != DesiredState::Running || *r.borrow()
    };
    let (tx, rx) = watch::channel(halted(&stop, &desired, &rotated));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = changed(&mut stop) => {}
                _ = changed(&mut desired) => {}
                _ = changed(&mut rotated) => {}
                _ = tx.closed() => return,
            }
            let _ = tx.send(halted(&stop, &desired, &rotated));
        }
    });
    rx
}

/// Follows the state file the operator writes beside the config (`runtime::STATE_FILE`), read
/// every 2 s; without one, the spec's state, fixed.
pub fn desired_state(
    state_file: Option<std::path::PathBuf>,
    spec_state: DesiredState,
) -> watch::Receiver<DesiredState> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| DesiredState::parse(&s))
    };
    let Some(path) = state_file.filter(|p| read(p).is_some()) else {
        let (tx, rx) = watch::channel(spec_state);
        // Kept for the life of the process: the state never changes.
        std::mem::forget(tx);
        return rx;
    };
    let (tx, rx) = watch::channel(read(&path).unwrap_or(spec_state));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Some(d) = read(&path) {
                tx.send_if_modified(|cur| std::mem::replace(cur, d) != d);
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Runs the connector until `stop` (or until a Secret it read rotates: the caller then runs it
/// again with the new values). Never gives up on retryable errors; configuration errors are
/// reported on `/status` and the process waits for SIGTERM (a new config rolls the pod).
pub async fn run(rt: Runtime) -> Result<Ended> {
    let Runtime {
        registry,
        config,
        sink: settings,
        secrets,
        shared,
        mut stop,
        mut desired,
    } = rt;
    let (kind, parallelism) = match config.spec.source.resolve() {
        Ok(s) => (s.kind, s.parallelism()),
        Err(e) => return park(&shared, &mut stop, Error::Config(e.to_string())).await,
    };
    let factory = match registry.for_config(&config) {
        Ok(f) => f.clone(),
        Err(e) => return park(&shared, &mut stop, e).await,
    };
    let instance = config.instance_id();
    let ctx = Context::new(&config.spec.dataset, &instance, kind.name);
    // exactlyOnce: records and the position in one transaction; the position is a record in the
    // state topic or the source's own (a Kafka consumer group's offsets). A source that several
    // replicas share gives each replica its own transactional id, else they would fence each other.
    let transactional = config.spec.delivery == obsrv_crds::Delivery::ExactlyOnce;
    let transactional_id = transactional.then(|| match parallelism {
        Parallelism::Single => transactional_id(&instance),
        _ => replica_transactional_id(&instance, &replica_name()),
    });
    let sink = match crate::sink::open(settings.clone(), &secrets, ctx, transactional_id) {
        Ok(s) => s,
        Err(e) => return park(&shared, &mut stop, e).await,
    };
    let txn: Option<&dyn Transactions> = match (transactional, sink.transactions()) {
        (false, _) => None,
        (true, Some(t)) => Some(t),
        (true, None) => {
            let e = Error::Config("delivery exactlyOnce needs a sink with transactions".into());
            return park(&shared, &mut stop, e).await;
        }
    };
    let config = Arc::new(config);
    let secrets = Arc::new(secrets);
    let mut rotated = rotation_signal(secrets.clone());
    let poll = match poll_interval(&config) {
        Ok(p) => p,
        Err(e) => return park(&shared, &mut stop, e).await,
    };
    let plan = match Plan::from_spec(config.spec.schedule.as_ref()) {
        Ok(p) => p,
        Err(e) => return park(&shared, &mut stop, Error::Config(e.to_string())).await,
    };
    let once = plan.is_batch();
    if let Plan::Cron(cron) = plan {
        // The first run waits for the schedule too.
        if !wait_for_next_run(&cron, &shared, &mut stop).await {
            return Ok(Ended::Stopped);
        }
    }
    let state = match factory.keeps_own_positions {
        true => None,
        false => match sink.positions(&instance, kind.name) {
            Some(s) => Some(s),
            None => {
                let e = Error::Config(format!(
                    "the sink cannot keep the positions of a {} source",
                    kind.name
                ));
                return park(&shared, &mut stop, e).await;
            }
        },
    };

    let mut backoff = Backoff::default();
    let mut committed: Option<serde_json::Value> = None;
    let mut loaded = state.is_none();
    let mut txn_ready = false;
    let mut state = state;
    let mut ended = Ended::Stopped;
    loop {
        if *stop.borrow() {
            break;
        }
        if *rotated.borrow() {
            ended = Ended::SecretsRotated;
            break;
        }
        if *desired.borrow() != DesiredState::Running {
            // Paused: connected, reading nothing; resumes where it stopped (the position kept).
            // A stop or a rotation ends the pause (the loop's top tells which).
            let (_fixed, running) = watch::channel(DesiredState::Running);
            let mut halt = halt_signal(stop.clone(), running, rotated.clone());
            if paused(
                &registry,
                &config,
                &secrets,
                &sink,
                state.as_ref(),
                &shared,
                &mut halt,
                &mut desired,
            )
            .await
            {
                tracing::info!("resumed");
                shared.set_state(RuntimeState::Running);
            }
            continue;
        }
        let halt = halt_signal(stop.clone(), desired.clone(), rotated.clone());
        let attempt = async {
            if let Some(t) = txn.filter(|_| !txn_ready) {
                t.init().await?;
                txn_ready = true;
            }
            if !loaded {
                let st = state.as_ref().expect("state store when not loaded");
                st.ensure_topic().await?;
                committed = st.load().await?.map(|r| r.position);
                loaded = true;
                tracing::info!(resumed = committed.is_some(), "state loaded");
            }
            // SIGTERM (or a pause) while connecting ends the run at once: nothing is read yet.
            let mut stop_connect = halt.clone();
            let source = tokio::select! {
                s = open_source(&registry, &config, &secrets, &sink, committed.clone()) => s?,
                _ = stopped(&mut stop_connect) => return Ok(Finished::Stopped),
            };
            shared.set_max_parallelism(source.max_parallelism());
            shared.set_ready(true);
            // A source keeping its own positions commits them; one whose positions live in the
            // state topic may still want to hear of each commit (after the state topic has it).
            let committer = match (state.take(), source.committer()) {
                (Some(st), then) => Committer::State(st, then),
                (None, Some(c)) => Committer::Source(c),
                (None, None) => {
                    return Err(Error::Config(
                        "the source keeps its own positions but offers no committer".into(),
                    ));
                }
            };
            let res = pipeline(
                source,
                sink.as_ref(),
                txn,
                &committer,
                &mut committed,
                &shared,
                halt.clone(),
                poll,
                once,
                &mut backoff,
            )
            .await;
            if let Committer::State(s, _) = committer {
                state = Some(s);
            }
            res
        };
        match attempt.await {
            // Paused or rotated: the loop's top takes it from there.
            Ok(Finished::Stopped) if !*stop.borrow() => continue,
            Ok(Finished::Stopped) => break,
            Ok(Finished::Done) => match plan {
                Plan::Cron(cron) => {
                    if !wait_for_next_run(&cron, &shared, &mut stop).await {
                        break;
                    }
                }
                _ => {
                    shared.set_state(RuntimeState::Idle);
                    tracing::info!("schedule once: everything read, idle until stopped");
                    stopped(&mut stop).await;
                    break;
                }
            },
            Err(e) => {
                shared.error(&e);
                if !e.is_retryable() {
                    shared.set_ready(false);
                    stopped(&mut stop).await;
                    break;
                }
                let d = backoff.next_delay();
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = changed(&mut rotated) => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
    if ended == Ended::Stopped {
        shared.set_state(RuntimeState::Stopping);
    }
    let _ = sink.flush(Duration::from_secs(5)).await;
    Ok(ended)
}

/// Idles until the next scheduled run; false when stopped first.
async fn wait_for_next_run(cron: &Cron, shared: &Shared, stop: &mut watch::Receiver<bool>) -> bool {
    shared.set_state(RuntimeState::Idle);
    let now = Timestamp::now();
    let Some(next) = cron.next_after(now) else {
        tracing::warn!("schedule.cron never matches: idle until stopped");
        stopped(stop).await;
        return false;
    };
    let wait = Duration::from_millis(next.duration_since(now).as_millis().max(0) as u64);
    tracing::info!(next = %next, "idle until the next scheduled run");
    tokio::select! {
        _ = stopped(stop) => false,
        _ = tokio::time::sleep(wait) => {
            shared.set_state(RuntimeState::Running);
            true
        }
    }
}

/// A configuration error: report it and wait for SIGTERM instead of crash-looping.
async fn park(shared: &Shared, stop: &mut watch::Receiver<bool>, e: Error) -> Result<Ended> {
    shared.error(&e);
    shared.set_ready(false);
    stopped(stop).await;
    Err(e)
}

/// `state: Paused`: stay connected (ready when source and sink answer), read nothing, until
/// resumed (true) or stopped (false). Lag is still measured from the committed position now and
/// then: what a pause costs shows in status (a replication slot's retained WAL, rows piling up).
// The same borrowed pieces as `run` and `open_source` hand around; a struct for one call would
// only rename them.
#[allow(clippy::too_many_arguments)]
async fn paused(
    registry: &Registry,
    config: &Arc<RuntimeConfig>,
    secrets: &Arc<Secrets>,
    sink: &Arc<dyn Sink>,
    state: Option<&StateStore>,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    desired: &mut watch::Receiver<DesiredState>,
) -> bool {
    let mut backoff = Backoff::default();
    let resumed = |d: &watch::Receiver<DesiredState>| *d.borrow() == DesiredState::Running;
    loop {
        let check = async {
            sink.check().await?;
            let committed = match state {
                Some(st) => {
                    st.ensure_topic().await?;
                    st.load().await?.map(|r| r.position)
                }
                None => None,
            };
            open_source(registry, config, secrets, sink, committed).await
        };
        let (wait, mut source) = match check.await {
            Ok(source) => {
                shared.set_max_parallelism(source.max_parallelism());
                shared.healthy();
                shared.set_state(RuntimeState::Paused);
                tracing::info!("paused: connected, reading nothing");
                (None, Some(source))
            }
            Err(e) => {
                shared.error(&e);
                (Some(backoff.next_delay()), None)
            }
        };
        let mut next_lag = tokio::time::Instant::now();
        loop {
            if resumed(desired) {
                return true;
            }
            if let Some(s) = source.as_mut()
                && tokio::time::Instant::now() >= next_lag
            {
                match s.lag().await {
                    Ok(Some(l)) => shared.set_lag(l),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "lag not measured while paused"),
                }
                next_lag = tokio::time::Instant::now() + LAG_EVERY;
            }
            tokio::select! {
                _ = stopped(stop) => return false,
                _ = changed(desired) => {}
                _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => break,
                _ = tokio::time::sleep_until(next_lag), if source.is_some() => {}
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn pipeline(
    mut source: BoxedSource,
    sink: &dyn Sink,
    txn: Option<&dyn Transactions>,
    committer: &Committer,
    committed: &mut Option<serde_json::Value>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    poll: Duration,
    once: bool,
    backoff: &mut Backoff,
) -> Result<Finished> {
    let (tx, mut rx) = mpsc::channel::<Result<Item>>(1);
    let reader_shared = shared.clone();
    let mut reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut last_lag: Option<Instant> = None;
        // A lag measurement running beside the reads (sources that offer one).
        let mut lag_job: Option<AbortOnDrop> = None;
        loop {
            let r = tokio::select! {
                _ = stopped(&mut reader_stop) => break,
                r = source.next_batch() => r,
            };
            match r {
                Ok(Some(b)) => {
                    if tx.send(Ok(Item::Batch(b))).await.is_err() {
                        break;
                    }
                    if last_lag.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
                        last_lag = Some(Instant::now());
                        if let Some(task) = source.lag_task() {
                            if lag_job.as_ref().is_none_or(|j| j.0.is_finished()) {
                                let shared = reader_shared.clone();
                                lag_job = Some(AbortOnDrop(tokio::spawn(async move {
                                    match task.await {
                                        Ok(Some(l)) => shared.set_lag(l),
                                        Ok(None) => {}
                                        Err(e) => tracing::debug!(error = %e, "lag not measured"),
                                    }
                                })));
                            }
                        } else {
                            match source.lag().await {
                                Ok(Some(l)) => reader_shared.set_lag(l),
                                Ok(None) => {}
                                Err(e) => tracing::debug!(error = %e, "lag not measured"),
                            }
                        }
                    }
                }
                Ok(None) => {
                    // A measurement started before catching up must not overwrite the zero.
                    if let Some(mut j) = lag_job.take() {
                        j.0.abort();
                        let _ = (&mut j.0).await;
                    }
                    if source.lag_known() {
                        reader_shared.set_caught_up();
                    }
                    if tx.send(Ok(Item::CaughtUp)).await.is_err() || once {
                        break;
                    }
                    tokio::select! {
                        _ = stopped(&mut reader_stop) => break,
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    let _abort = AbortOnDrop(reader);

    let mut inflight = InFlightBatches::new();
    let mut open: Option<OpenTransaction> = None;
    loop {
        let txn_due = open
            .as_ref()
            .map(|t| tokio::time::Instant::from_std(t.since + TXN_MAX_AGE));
        let item = tokio::select! {
            biased;
            _ = stopped(&mut stop) => {
                tracing::info!(in_flight = inflight.len(), "stopping: draining in-flight batches");
                let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                    if let Some(txn) = txn {
                        end_transaction(txn, committer, committed, &mut open, shared).await?;
                    }
                    inflight.drain(shared, sink).await
                }).await;
                inflight.commit(committer, committed).await?;
                return match drained {
                    Ok(r) => r.map(|_| Finished::Stopped),
                    Err(_) => Err(Error::SinkUnreachable("in-flight records not acknowledged within the drain timeout".into())),
                };
            }
            _ = tokio::time::sleep_until(txn_due.unwrap_or_else(tokio::time::Instant::now)), if txn_due.is_some() => {
                let txn = txn.expect("only exactlyOnce opens transactions");
                end_transaction(txn, committer, committed, &mut open, shared).await?;
                backoff.reset();
                continue;
            }
            // Acknowledgements are taken as they come, not only when the next batch is sent: a
            // broker source waits for them (its window full) before it hands out another batch.
            r = inflight.front_acked(shared, sink), if !inflight.is_empty() => {
                r?;
                inflight.settle_front(shared);
                backoff.reset();
                inflight.commit_if_due(committer, committed).await?;
                continue;
            }
            m = rx.recv() => m,
        };
        // Whatever ends the stream first commits the open transaction: what was read before an
        // error, a catch-up or the end is delivered and its position kept.
        if let (Some(txn), false) = (txn, matches!(item, Some(Ok(Item::Batch(_))))) {
            end_transaction(txn, committer, committed, &mut open, shared).await?;
        }
        match item {
            Some(Ok(Item::Batch(b))) if txn.is_some() => {
                let txn = txn.expect("checked by the guard");
                send_in_transaction(sink, txn, committer, &mut open, b).await?;
                if open.as_ref().is_some_and(OpenTransaction::is_full) {
                    end_transaction(txn, committer, committed, &mut open, shared).await?;
                    backoff.reset();
                }
            }
            Some(Ok(Item::Batch(b))) => {
                inflight.push(sink.send(b, now_ms()).await?);
                while inflight.is_full() {
                    inflight.ack_front(shared, sink).await?;
                    backoff.reset();
                }
                inflight.commit_if_due(committer, committed).await?;
            }
            Some(Ok(Item::CaughtUp)) => {
                inflight.drain(shared, sink).await?;
                inflight.commit(committer, committed).await?;
                backoff.reset();
                shared.healthy();
                if once {
                    return Ok(Finished::Done);
                }
            }
            Some(Err(e)) => {
                // What was read before the error is still delivered and committed.
                inflight.drain(shared, sink).await?;
                inflight.commit(committer, committed).await?;
                return Err(e);
            }
            None => {
                inflight.drain(shared, sink).await?;
                inflight.commit(committer, committed).await?;
                return Ok(if once {
                    Finished::Done
                } else {
                    Finished::Stopped
                });
            }
        }
    }
}

/// exactlyOnce: the batches sent in the open transaction, not yet committed.
struct OpenTransaction {
    batches: Vec<InFlight>,
    bytes: u64,
    since: Instant,
}

impl OpenTransaction {
    /// Whether it should commit now rather than take another batch.
    fn is_full(&self) -> bool {
        self.bytes >= TXN_MAX_BYTES || self.since.elapsed() >= TXN_MAX_AGE
    }

    /// Its last batch, whose position covers every batch before it.
    fn last(&self) -> Option<&InFlight> {
        self.batches.last()
    }
}

/// exactlyOnce: sends `b` in the open transaction, beginning one when none is open. A batch read
/// before a Kafka rebalance is dropped, and so is an open transaction of such batches (aborted):
/// the consumer reads their records again from the group's committed offsets.
async fn send_in_transaction(
    sink: &dyn Sink,
    txn: &dyn Transactions,
    committer: &Committer,
    open: &mut Option<OpenTransaction>,
    b: Batch,
) -> Result<()> {
    if !committer.is_current(&b.position) {
        tracing::debug!("batch read before a rebalance dropped: its records are read again");
        return Ok(());
    }
    if let Some(stale) =
        open.take_if(|t| t.last().is_some_and(|f| !committer.is_current(&f.position)))
    {
        tracing::debug!(
            batches = stale.batches.len(),
            "transaction read before a rebalance aborted: its records are read again"
        );
        txn.abort().await?;
    }
    if open.is_none() {
        txn.begin().await?;
        *open = Some(OpenTransaction {
            batches: Vec::new(),
            bytes: 0,
            since: Instant::now(),
        });
    }
    let t = open.as_mut().expect("opened above");
    match sink.send(b, now_ms()).await {
        Ok(f) => {
            t.bytes += f.outcome.bytes();
            t.batches.push(f);
            Ok(())
        }
        Err(e) => {
            *open = None;
            abort_after(txn, e).await
        }
    }
}

/// exactlyOnce: commits the open transaction, if any, with its last batch's position. Any failure
/// aborts it and ends the pipeline: the retry reopens the source at the last committed position (a
/// Kafka source with a new consumer, which starts at the group's committed offsets, so the batches
/// and whatever was read ahead come again).
async fn end_transaction(
    txn: &dyn Transactions,
    committer: &Committer,
    committed: &mut Option<serde_json::Value>,
    open: &mut Option<OpenTransaction>,
    shared: &Shared,
) -> Result<()> {
    let Some(mut t) = open.take() else {
        return Ok(());
    };
    let res = async {
        let last = t.last().expect("a transaction opens with a batch");
        let acks = Acks::new();
        let started = Instant::now();
        if !committer.add_to_transaction(txn, last, &acks).await? {
            return Ok(false);
        }
        txn.commit().await?;
        tracing::debug!(
            batches = t.batches.len(),
            bytes = t.bytes,
            open_ms = t.since.elapsed().as_millis() as u64,
            commit_ms = started.elapsed().as_millis() as u64,
            "transaction committed"
        );
        for f in &mut t.batches {
            f.acked().await?;
        }
        acks.wait().await?;
        Ok::<_, Error>(true)
    }
    .await;
    match res {
        Ok(true) => {
            for f in &t.batches {
                record_delivered(shared, f);
            }
            let position = t.batches.pop().expect("checked above").position;
            committer.committed(&position)?;
            *committed = Some(position);
            Ok(())
        }
        Ok(false) => {
            txn.abort().await?;
            tracing::debug!(
                "transaction read before a rebalance aborted: its records are read again"
            );
            Ok(())
        }
        Err(e) => abort_after(txn, e).await,
    }
}

/// Aborts the open transaction after `e` and returns `e`.
async fn abort_after(txn: &dyn Transactions, e: Error) -> Result<()> {
    if let Err(abort) = txn.abort().await {
        tracing::warn!(error = %abort, "abort transaction failed");
    }
    Err(e)
}

/// Counts an acknowledged batch in the metrics and in `/status`.
fn record_delivered(shared: &Shared, f: &InFlight) {
    let o = &f.outcome;
    shared.metrics.add("ingested", o.ingested, o.bytes_ingested);
    shared.metrics.add("failed", o.failed, o.bytes_failed);
    shared
        .metrics
        .batch_seconds
        .observe(f.started.elapsed().as_secs_f64());
    shared.success(
        Totals {
            records_ingested: o.ingested,
            records_failed: o.failed,
            bytes_ingested: o.bytes_ingested,
        },
        f.watermark.clone(),
    );
    shared.failures(&f.failures);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a wait for acknowledgements asks the sink why they do not come.
pub const ACK_WATCH_EVERY: Duration = Duration::from_secs(5);

/// atLeastOnce: the batches the sink has not acknowledged yet, oldest first, their bytes, the
/// position of the newest acknowledged batch, not yet committed, and when the last commit was.
struct InFlightBatches {
    batches: VecDeque<InFlight>,
    bytes: u64,
    acked: Option<Acked>,
    last_commit: Instant,
}

/// An acknowledged batch's position and watermark, to commit.
type Acked = (serde_json::Value, Option<String>);

impl InFlightBatches {
    fn new() -> InFlightBatches {
        InFlightBatches {
            batches: VecDeque::new(),
            bytes: 0,
            acked: None,
            last_commit: Instant::now(),
        }
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn push(&mut self, f: InFlight) {
        self.bytes += f.outcome.bytes();
        self.batches.push_back(f);
    }

    /// Whether the sink holds as much unacknowledged as it may before the next batch is sent.
    fn is_full(&self) -> bool {
        self.batches.len() > MAX_IN_FLIGHT_BATCHES || self.bytes > MAX_IN_FLIGHT_BYTES
    }

    /// Waits until the oldest batch is acknowledged (cancel-safe: nothing is taken off).
    async fn front_acked(&mut self, shared: &Shared, sink: &dyn Sink) -> Result<()> {
        let Some(f) = self.batches.front_mut() else {
            return Ok(());
        };
        loop {
            tokio::select! {
                r = f.acked() => return r,
                // Deliveries wait (a broker outage): say why, keep waiting; nothing is lost.
                _ = tokio::time::sleep(ACK_WATCH_EVERY) => {
                    if let Some(why) = sink.stalled() {
                        shared.error(&Error::SinkUnreachable(why));
                    }
                }
            }
        }
    }

    /// Takes the acknowledged oldest batch off: counted, and its position pending a commit.
    fn settle_front(&mut self, shared: &Shared) {
        if let Some(f) = self.batches.pop_front() {
            self.bytes -= f.outcome.bytes();
            record_delivered(shared, &f);
            self.acked = Some((f.position, f.watermark));
        }
    }

    async fn ack_front(&mut self, shared: &Shared, sink: &dyn Sink) -> Result<()> {
        self.front_acked(shared, sink).await?;
        self.settle_front(shared);
        Ok(())
    }

    /// Waits for every batch to be acknowledged.
    async fn drain(&mut self, shared: &Shared, sink: &dyn Sink) -> Result<()> {
        while !self.is_empty() {
            self.ack_front(shared, sink).await?;
        }
        Ok(())
    }

    /// Commits what is acknowledged when the source wants each batch committed or a second passed.
    async fn commit_if_due(
        &mut self,
        committer: &Committer,
        committed: &mut Option<serde_json::Value>,
    ) -> Result<()> {
        let due = committer.commits_each_batch() || self.last_commit.elapsed() >= COMMIT_EVERY;
        if due && self.acked.is_some() {
            self.commit(committer, committed).await?;
        }
        Ok(())
    }

    /// Commits the newest acknowledged position, if there is one not yet committed; the next
    /// time-based commit is due a [`COMMIT_EVERY`] from now either way.
    async fn commit(
        &mut self,
        committer: &Committer,
        committed: &mut Option<serde_json::Value>,
    ) -> Result<()> {
        if let Some((pos, wm)) = self.acked.take() {
            committer.commit(&pos, wm).await?;
            *committed = Some(pos);
        }
        self.last_commit = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, future::BoxFuture};

    use super::*;
    use crate::{
        envelope::Payload,
        sink::{Failures, Outcome},
        source::{Record, Source},
    };

    #[test]
    fn a_replica_is_its_pod_in_a_cluster_and_its_process_elsewhere() {
        assert_eq!(
            replica_name_of(Some("clicks-7d9f-x2x"), true, 1),
            "clicks-7d9f-x2x"
        );
        assert_eq!(replica_name_of(Some("laptop"), false, 4242), "laptop.4242");
        assert_eq!(replica_name_of(None, true, 7), "local.7");
        assert_eq!(replica_name_of(Some(""), false, 7), "local.7");
    }

    /// Acknowledges each batch a moment after it is handed over, as a broker does.
    struct DelayedAcks;

    impl Sink for DelayedAcks {
        fn send(&self, batch: Batch, _syncts_ms: i64) -> BoxFuture<'_, Result<InFlight>> {
            let n = batch.records.len();
            let acks = Acks::new();
            for _ in 0..n {
                acks.add();
            }
            let later = acks.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                for _ in 0..n {
                    later.done(None);
                }
            });
            let f = InFlight {
                acks,
                position: batch.position,
                watermark: batch.watermark,
                outcome: Outcome {
                    ingested: n as u64,
                    ..Outcome::default()
                },
                failures: Failures::default(),
                started: Instant::now(),
            };
            async move { Ok(f) }.boxed()
        }
        fn flush(&self, _timeout: Duration) -> BoxFuture<'_, Result<()>> {
            async { Ok(()) }.boxed()
        }
        fn check(&self) -> BoxFuture<'_, Result<String>> {
            async { Ok("test sink".into()) }.boxed()
        }
    }

    /// A broker whose window holds one batch: the next batch comes only once the previous one is
    /// committed (acknowledged to the broker). Position = batches handed out.
    struct WindowOfOneBatch {
        handed_out: u64,
        end: u64,
        committed: watch::Receiver<u64>,
        commits: Arc<watch::Sender<u64>>,
    }

    impl Source for WindowOfOneBatch {
        async fn next_batch(&mut self) -> Result<Option<Batch>> {
            if self.handed_out == self.end {
                return Ok(None);
            }
            let previous = self.handed_out;
            let _ = self.committed.wait_for(|c| *c >= previous).await;
            self.handed_out += 1;
            Ok(Some(Batch {
                records: vec![Record {
                    id: self.handed_out.to_string(),
                    payload: Payload::Json("{}".into()),
                }],
                position: serde_json::json!(self.handed_out),
                watermark: None,
            }))
        }
        fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
            Some(Box::new(BrokerAcks(self.commits.clone())))
        }
    }

    struct BrokerAcks(Arc<watch::Sender<u64>>);

    impl SourceCommitter for BrokerAcks {
        fn commit(&self, position: &serde_json::Value) -> Result<()> {
            self.0.send_replace(position.as_u64().unwrap_or_default());
            Ok(())
        }
        fn commits_each_batch(&self) -> bool {
            true
        }
    }

    /// The runner used to take acknowledgements only when it sent a third batch, so a source
    /// waiting for its window to free sat out a timeout per window (NATS and MQTT at a tenth of
    /// the broker's rate); with a window of one batch it would wait forever.
    #[tokio::test]
    async fn a_source_waiting_for_its_window_gets_each_commit() {
        let (commits, committed) = watch::channel(0);
        let source = WindowOfOneBatch {
            handed_out: 0,
            end: 50,
            committed,
            commits: Arc::new(commits),
        };
        let committer = Committer::Source(Source::committer(&source).expect("has one"));
        let shared = Shared::new(None);
        let (_keep_running, stop) = watch::channel(false);
        let mut position = None;
        let mut backoff = Backoff::default();
        let run = pipeline(
            Box::new(source),
            &DelayedAcks,
            None,
            &committer,
            &mut position,
            &shared,
            stop,
            Duration::from_millis(10),
            true,
            &mut backoff,
        );
        let finished = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the runner never committed what the source waited for")
            .expect("runs");
        assert!(matches!(finished, Finished::Done));
        assert_eq!(position, Some(serde_json::json!(50)));
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((800..=1200).contains(&d[0]), "{d:?}");
        assert!((1600..=2400).contains(&d[1]), "{d:?}");
        assert!(d[7] <= 36_000 && d[7] >= 24_000, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
