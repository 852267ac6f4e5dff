//! Change data capture: every row change of a database as it commits, as Debezium-shaped events
//! ([`event`]). [`postgres`]: logical replication (`pgoutput`); [`binlog`]: MySQL's and MariaDB's
//! binary log.

pub mod binlog;
pub mod event;
pub mod postgres;

/// How long a batch that has changes waits for more before it goes out. A batch ended whenever
/// the replication client's buffer runs dry holds a few hundred changes, and the runner's two
/// batches in flight then each wait out the producer's linger: 1M Postgres changes went at 16k/s
/// instead of 160k/s.
pub const BATCH_FILL: std::time::Duration = std::time::Duration::from_millis(10);
