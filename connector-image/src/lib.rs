//! obsrv-connector runtime library
