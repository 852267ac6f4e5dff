//! Change data capture: every row change of a database as it commits, as Debezium-shaped events
//! ([`event`]). [`postgres`]: logical replication (`pgoutput`).

pub mod event;
pub mod postgres;
