//! End-to-end support for Obsrv Connectors: real services on demand for every crate's tests
//! ([`services`]), the local control plane ([`controlplane`]) and the whole system on it
//! ([`harness`]: control plane + broker + the real operator), used by the end-to-end suite and the demo.

pub mod controlplane;
pub mod harness;
pub mod services;
