//! Broker acknowledgements held back until the sink has the records (RabbitMQ, JetStream, MQTT).
//!
//! Every message read gets the next number of its connection and waits in [`Unacked`] with what
//! acknowledging it takes (a delivery tag, a reply subject, a packet id). A batch's position is
//! `{"through": N}`, the number of its last message. The runner commits a position once the sink
//! acknowledged that batch and every batch before it; the committer then hands `N` to the acker
//! task, which acknowledges every message up to `N` to the broker, in order. What was never
//! acknowledged (a crash, a lost connection) the broker delivers again.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use obsrv_crds::Delivery;
use tokio::sync::{Notify, watch};

use super::SourceCommitter;
use crate::error::{Error, Result};

/// Messages read from one connection and not yet acknowledged to the broker.
pub struct Unacked<H> {
    queue: Mutex<Queue<H>>,
    /// Woken when acknowledgements free room in the window.
    freed: Notify,
}

struct Queue<H> {
    next: u64,
    waiting: VecDeque<(u64, H)>,
}

impl<H: Send + 'static> Unacked<H> {
    pub fn new() -> Arc<Unacked<H>> {
        Arc::new(Unacked {
            queue: Mutex::new(Queue {
                next: 1,
                waiting: VecDeque::new(),
            }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<H>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `handle` until its message is committed; returns the message's number.
    pub fn push(&self, handle: H) -> u64 {
        let mut q = self.lock();
        let n = q.next;
        q.next += 1;
        q.waiting.push_back((n, handle));
        n
    }

    /// Messages read and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns the handles of every message numbered up to `through`, in order.
    pub fn take_through(&self, through: u64) -> Vec<H> {
        let mut q = self.lock();
        let k = q.waiting.partition_point(|(n, _)| *n <= through);
        q.waiting.drain(..k).map(|(_, h)| h).collect()
    }

    /// Whether one more message may be read into a batch: the window has room, or the batch is
    /// empty and room came within `wait`. `false`: the batch goes out as it is (or, empty, the
    /// source checks for an outage rather than report a catch-up).
    pub async fn has_room(&self, window: usize, batch_is_empty: bool, wait: Duration) -> bool {
        self.len() < window || (batch_is_empty && self.wait_for_room(window, wait).await)
    }

    /// Waits until fewer than `window` messages are unacknowledged; false after `timeout`.
    pub async fn wait_for_room(&self, window: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let freed = self.freed.notified();
            if self.len() < window {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.len() < window;
            }
        }
    }

    /// Runs until every [`AckCommitter`] of `through` is gone: each committed number is handed to
    /// `ack` with the handles it covers. `ack` failing (the connection is gone) only means the
    /// broker delivers those messages again.
    pub async fn run<F, Fut>(self: Arc<Self>, mut through: watch::Receiver<u64>, mut ack: F)
    where
        F: FnMut(Vec<H>) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        while through.changed().await.is_ok() {
            let n = *through.borrow_and_update();
            let due = self.take_through(n);
            if due.is_empty() {
                continue;
            }
            let count = due.len();
            if let Err(e) = ack(due).await {
                tracing::warn!(error = %e, count, "acknowledgements not sent: the broker delivers those messages again");
            }
            self.freed.notify_waiters();
        }
    }
}

/// Broker sources acknowledge after delivery, which is at least once: `exactlyOnce` would need the
/// broker's acknowledgement inside the sink's Kafka transaction, which no broker offers.
pub fn at_least_once_only(delivery: Delivery, kind: &str) -> Result<()> {
    match delivery {
        Delivery::AtLeastOnce => Ok(()),
        Delivery::ExactlyOnce => Err(Error::Config(format!(
            "delivery exactlyOnce is not possible with a {kind} source (its acknowledgements \
             cannot join the sink's transaction): use atLeastOnce; event ids let downstream drop \
             redelivered records"
        ))),
    }
}

/// The position of a batch whose last message is numbered `through`.
pub fn position(through: u64) -> serde_json::Value {
    serde_json::json!({ "through": through })
}

/// The number a position reaches.
pub fn through(position: &serde_json::Value) -> Result<u64> {
    position
        .get("through")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::State(format!("not a broker position: {position}")))
}

/// Hands committed positions to the acker task.
pub struct AckCommitter {
    pub through: Arc<watch::Sender<u64>>,
}

impl AckCommitter {
    /// A committer and the receiver its acker task reads.
    pub fn channel() -> (Arc<watch::Sender<u64>>, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (Arc::new(tx), rx)
    }
}

impl SourceCommitter for AckCommitter {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let n = through(position)?;
        self.through.send_if_modified(|v| {
            let newer = n > *v;
            if newer {
                *v = n;
            }
            newer
        });
        Ok(())
    }

    fn commits_each_batch(&self) -> bool {
        true
    }
}

/// The committer of a source with nothing to acknowledge (core NATS, at most once).
pub struct NoAcks;

impl SourceCommitter for NoAcks {
    fn commit(&self, _position: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_acknowledges_everything_up_to_its_position_in_order() {
        let unacked = Unacked::<&'static str>::new();
        for h in ["a", "b", "c", "d"] {
            unacked.push(h);
        }
        let (tx, rx) = AckCommitter::channel();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let seen = acked.clone();
        let task = tokio::spawn(unacked.clone().run(rx, move |hs| {
            seen.lock().unwrap().push(hs);
            async { Ok(()) }
        }));
        let c = AckCommitter { through: tx };
        c.commit(&position(2)).unwrap();
        assert!(unacked.wait_for_room(3, Duration::from_secs(5)).await);
        // An older position (a late commit) acknowledges nothing again.
        c.commit(&position(1)).unwrap();
        c.commit(&position(4)).unwrap();
        assert!(unacked.wait_for_room(1, Duration::from_secs(5)).await);
        drop(c);
        task.await.unwrap();
        assert_eq!(*acked.lock().unwrap(), vec![vec!["a", "b"], vec!["c", "d"]]);
        assert!(unacked.is_empty());
    }

    #[tokio::test]
    async fn a_full_window_ends_a_batch_and_an_empty_one_waits_for_room() {
        let unacked = Unacked::<u64>::new();
        unacked.push(1);
        assert!(unacked.has_room(2, false, Duration::ZERO).await);
        unacked.push(2);
        // Records read: the batch goes out without waiting.
        let t = std::time::Instant::now();
        assert!(!unacked.has_room(2, false, Duration::from_secs(5)).await);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Nothing read: it waits, and says no when nothing is acknowledged meanwhile.
        assert!(!unacked.has_room(2, true, Duration::from_millis(20)).await);
    }

    #[tokio::test]
    async fn the_window_stays_full_until_something_is_acknowledged() {
        let unacked = Unacked::<u64>::new();
        unacked.push(1);
        unacked.push(2);
        assert!(!unacked.wait_for_room(2, Duration::from_millis(50)).await);
        assert!(unacked.wait_for_room(3, Duration::ZERO).await);
        assert_eq!(unacked.take_through(1), vec![1]);
        assert!(unacked.wait_for_room(2, Duration::ZERO).await);
    }

    #[test]
    fn positions_round_trip() {
        assert_eq!(through(&position(42)).unwrap(), 42);
        assert!(through(&serde_json::json!({"offsets": {}})).is_err());
    }
}
