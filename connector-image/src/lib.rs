//! The Obsrv connector runtime: reads a `Connector`'s source and writes each record into Obsrv's
//! ingest topic in Obsrv's envelope, with positions committed only after delivery.
//!
//! Also a library: a custom connector implements [`source::Source`] and reuses the sink, state,
//! envelope and HTTP parts.

pub mod bench;
pub mod bench_kafka;
pub mod config;
pub mod envelope;
pub mod error;
pub mod http;
pub mod metrics;
pub mod runner;
pub mod schedule;
pub mod sink;
pub mod source;
pub mod state;

pub use error::{Error, Result};
