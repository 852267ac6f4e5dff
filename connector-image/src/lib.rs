//! The Obsrv connector runtime: reads a `Connector`'s source and writes each record into Obsrv's
//! ingest topic in Obsrv's envelope, with positions committed only after delivery.
//!
//! Also the SDK of custom connectors: implement [`source::Source`] and an `open` function, put them
//! in a [`source::Registry`] and call [`cli::main`]; envelope, failed topic, state, batching,
//! retries, schedules, metrics, `/status` and signals come from the runtime, exactly as for the
//! built-in kinds (which use the same API). See `examples/custom-connector`.

pub mod cli;
pub mod config;
pub mod envelope;
pub mod error;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod runner;
pub mod sink;
pub mod source;
pub mod state;

pub use error::{Error, Result};
