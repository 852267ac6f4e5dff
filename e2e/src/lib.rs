//! End-to-end support for Obsrv Connectors: real services on demand for every crate's tests
//! ([`services`]), and the local control plane used by the end-to-end suite and the demo.

pub mod controlplane;
pub mod services;
