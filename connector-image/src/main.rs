//! `obsrv-connector`: the shared connector image's binary. Runs every built-in source kind with
//! the same entry point a custom connector uses ([`obsrv_connector::cli::main`]).

use std::process::ExitCode;

use obsrv_connector::source::Registry;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("bench") {
        return obsrv_connector::bench::main(std::env::args().skip(1));
    }
    obsrv_connector::cli::main(Registry::builtin())
}
