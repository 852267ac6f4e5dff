//! `obsrv-connector`: the shared connector image's binary. Runs every built-in source kind with
//! the same entry point a custom connector uses ([`obsrv_connector::cli::main`]).

use std::process::ExitCode;

use obsrv_connector::source::Registry;

fn main() -> ExitCode {
    obsrv_connector::cli::main(Registry::builtin())
}
