//! Change data capture: every row change of a database as it commits, as Debezium-shaped events
//! ([`event`]). [`postgres`]: logical replication (`pgoutput`); [`binlog`]: MySQL's and MariaDB's
//! binary log.

pub mod binlog;
pub mod event;
pub mod postgres;
