//! Scale-out without double reads: which replica reads which object.
//!
//! Every key belongs to one of [`SHARDS`] shards by a stable hash of the key. The replicas of a
//! file connector are the members of one Kafka consumer group on the sink cluster, subscribed to a
//! small coordination topic (`<stateTopic>.shards`, [`SHARDS`] partitions, never written to):
//! partition `n` stands for shard `n`, and the broker's group protocol gives each partition to
//! exactly one live member. A replica reads only the objects of the shards it holds, and keeps the
//! done-state of each shard under its own key in the state topic (`<namespace>/<name>#shard-n-of-16`),
//! so whoever holds a shard next resumes exactly where the last holder committed.
//!
//! Why a consumer group rather than the operator numbering replicas: a Deployment's pods have no
//! index, and handing them one (a lease per index, the replica count in the config) needs Kubernetes
//! API access from every pod and a second mechanism for liveness. The group protocol already
//! answers "who is alive and what does each own": members join and leave with the pods, a replica
//! killed with `kill -9` is dropped after the session timeout (10 s) and its shards move to the
//! others, and it works the same for `obsrv-connector run` on a laptop. It needs nothing the
//! connector does not already have (the sink cluster holds the state topic anyway).
//!
//! No object is read by two replicas, and none is skipped:
//! - Rebalances are eager: every member gives up its shards before any are handed out again. A
//!   member giving up shards stops reading, lets the runner deliver and commit what it handed out,
//!   and only then lets the rebalance go on (the revoke callback waits for [`Membership::hand_over`],
//!   at most [`HANDOVER_TIMEOUT`]). The next holder loads the shard's state after that commit.
//! - A commit for a shard this replica no longer holds is dropped ([`Membership::writable`]), so a
//!   slow replica cannot overwrite the state of the shard's new holder.
//! - After `kill -9` the next holder resumes from the last committed state: records handed out but
//!   not committed come again with the same event ids (at-least-once, as for every source). So do
//!   a replica's records when its hand-over took longer than [`HANDOVER_TIMEOUT`].

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance},
};
use sha2::{Digest, Sha256};

use crate::{
    error::{Error, Result},
    state::ensure_topic,
};

/// Shards of a file source's keys: the most replicas that can have work at once.
pub const SHARDS: u32 = 16;
/// How long a replica giving up shards may take to deliver and commit what it read of them.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica killed without leaving the group keeps its shards.
const SESSION_TIMEOUT_MS: &str = "10000";

/// The shard of a key: stable across processes, versions and replica counts.
pub fn shard_of(key: &str) -> u32 {
    let d = Sha256::digest(key.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % SHARDS
}

/// The state-topic key of one shard's done-state.
pub fn state_key(instance: &str, shard: u32) -> String {
    format!("{instance}#shard-{shard}-of-{SHARDS}")
}

/// What this replica holds, as the group's rebalances decide.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Rebalances seen: a new value means shards changed hands (state must be loaded again).
    pub epoch: u64,
    /// The shards held; `None` while the first assignment is awaited or a revoke is under way.
    pub assigned: Option<BTreeSet<u32>>,
    /// A rebalance waits for this replica to hand its shards over.
    pub revoking: bool,
}

#[derive(Debug, Default)]
struct Inner {
    view: View,
    /// Shards whose state may still be written: the held ones, and the revoked ones until handed over.
    writable: BTreeSet<u32>,
    handed_over: bool,
    closing: bool,
    error: Option<String>,
}

/// This replica's membership, shared by the group's poll thread, the source and its committer.
#[derive(Debug, Default)]
pub struct Membership {
    inner: Mutex<Inner>,
    cond: Condvar,
    changed: tokio::sync::Notify,
}

impl Membership {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> View {
        self.lock().view.clone()
    }

    /// Whether this replica may still write the state of `shard`.
    pub fn writable(&self, shard: u32) -> bool {
        self.lock().writable.contains(&shard)
    }

    /// The shards given up are committed: the rebalance may go on.
    pub fn hand_over(&self) {
        let mut i = self.lock();
        if i.view.revoking {
            i.handed_over = true;
            self.cond.notify_all();
        }
    }

    /// A group error (the coordination topic gone, authorization refused), once.
    pub fn take_error(&self) -> Option<String> {
        self.lock().error.take()
    }

    /// Waits until the membership changes (or `timeout`).
    pub async fn changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    /// Revoke callback: stop reading, and wait until what was read is committed.
    fn revoke(&self) {
        let mut i = self.lock();
        i.view.epoch += 1;
        i.view.assigned = None;
        if i.closing {
            i.writable.clear();
            return;
        }
        i.view.revoking = true;
        i.handed_over = false;
        self.changed.notify_waiters();
        self.changed.notify_one();
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        while !i.handed_over && !i.closing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "shards given up before their reads were committed: their last records may be read again"
                );
                break;
            }
            i = self
                .cond
                .wait_timeout(i, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        i.view.revoking = false;
        i.writable.clear();
    }

    fn assign(&self, shards: BTreeSet<u32>) {
        let mut i = self.lock();
        i.view.epoch += 1;
        i.writable = shards.clone();
        tracing::info!(shards = ?shards, "file shards assigned");
        i.view.assigned = Some(shards);
        i.view.revoking = false;
        drop(i);
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    fn fail(&self, e: String) {
        self.lock().error = Some(e);
        self.changed.notify_one();
    }

    fn close(&self) {
        self.lock().closing = true;
        self.cond.notify_all();
    }
}

struct GroupContext(Arc<Membership>);

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Revoke(_) => self.0.revoke(),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => self.0.fail(format!("file shards rebalance: {e}")),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            let shards = tpl
                .elements()
                .iter()
                .filter_map(|e| u32::try_from(e.partition()).ok())
                .filter(|p| *p < SHARDS)
                .collect();
            self.0.assign(shards);
        }
    }
}

/// This replica's seat in the group: a consumer polled on its own thread (the revoke callback
/// blocks that thread while the source hands its shards over).
pub struct Group {
    pub membership: Arc<Membership>,
    stop: Arc<AtomicBool>,
    /// Signalled once the consumer has left the group.
    left: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Group {
    /// Joins `group_id` on the cluster of `client`, creating the coordination `topic` if needed.
    pub async fn join(
        client: &ClientConfig,
        topic: &str,
        group_id: &str,
        membership: Arc<Membership>,
    ) -> Result<Group> {
        ensure_topic(client, topic, SHARDS as i32, false).await?;
        let mut cfg = client.clone();
        cfg.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "roundrobin");
        let consumer: BaseConsumer<GroupContext> = cfg
            .create_with_context(GroupContext(membership.clone()))
            .map_err(|e| Error::SinkUnreachable(format!("file shards consumer: {e}")))?;
        let partitions = {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map_err(|e| Error::SinkUnreachable(format!("topic {topic}: {e}")))?;
            md.topics().first().map_or(0, |t| t.partitions().len())
        };
        if partitions != SHARDS as usize {
            return Err(Error::Config(format!(
                "the coordination topic {topic} has {partitions} partitions; file sources need \
                 exactly {SHARDS} (delete it, or create it with {SHARDS})"
            )));
        }
        consumer
            .subscribe(&[topic])
            .map_err(|e| Error::SinkUnreachable(format!("subscribe {topic}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let m = membership.clone();
        let (left_tx, left) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("file-shards".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    // Nothing is ever written to the topic: polling serves the group's callbacks.
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                        tracing::debug!(error = %e, "file shards consumer");
                    }
                }
                m.close();
                // Leaves the group now, so the others take the shards without a session timeout.
                drop(consumer);
                let _ = left_tx.send(());
            })
            .map_err(|e| Error::State(format!("file shards thread: {e}")))?;
        Ok(Group {
            membership,
            stop,
            left: Mutex::new(left),
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.membership.close();
        self.stop.store(true, Ordering::SeqCst);
        // A process stopping right after would otherwise leave before the consumer says goodbye,
        // and its shards would wait out the session timeout.
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let _ = left.recv_timeout(Duration::from_secs(5));
    }
}

/// Batches handed out and committed, to know when shards may be handed over.
#[derive(Debug, Default)]
pub struct Progress {
    handed_out: AtomicU64,
    committed: AtomicU64,
    awaiting: AtomicBool,
}

impl Progress {
    /// Numbers the next batch handed out.
    pub fn next(&self) -> u64 {
        self.handed_out.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Everything up to batch `seq` is committed.
    pub fn committed(&self, seq: u64, m: &Membership) {
        self.committed.fetch_max(seq, Ordering::SeqCst);
        self.maybe_hand_over(m);
    }

    /// The source stopped reading for a revoke: hand over once all it handed out is committed.
    pub fn await_hand_over(&self, m: &Membership) {
        self.awaiting.store(true, Ordering::SeqCst);
        self.maybe_hand_over(m);
    }

    fn maybe_hand_over(&self, m: &Membership) {
        if self.committed.load(Ordering::SeqCst) >= self.handed_out.load(Ordering::SeqCst)
            && self
                .awaiting
                .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            m.hand_over();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_every_shard_and_stay_put() {
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..1600 {
            counts[shard_of(&format!("in/2026/11/{i:05}.jsonl")) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        assert_eq!(shard_of("in/a.jsonl"), shard_of("in/a.jsonl"));
        // The hash is part of the state layout: changing it would move objects between shards.
        assert_eq!(shard_of("a"), 0xca97_8112 % SHARDS);
    }

    #[test]
    fn a_revoke_waits_for_the_hand_over_and_then_nothing_is_writable() {
        let m = Arc::new(Membership::default());
        m.assign([1, 2].into());
        assert!(m.writable(1) && !m.writable(3));
        let p = Arc::new(Progress::default());
        let seq = p.next();
        let revoker = {
            let m = m.clone();
            std::thread::spawn(move || m.revoke())
        };
        while !m.view().revoking {
            std::thread::yield_now();
        }
        assert!(
            m.writable(1),
            "revoked shards stay writable until handed over"
        );
        p.await_hand_over(&m);
        assert!(!revoker.is_finished(), "batch {seq} is not committed yet");
        p.committed(seq, &m);
        revoker.join().unwrap();
        let v = m.view();
        assert_eq!((v.assigned, v.revoking), (None, false));
        assert!(
            !m.writable(1),
            "a late commit of a revoked shard is dropped"
        );
    }
}
