use clap::Parser;
use obsrv_operator::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::PrintRbac) => {
            // A closed stdout (`| head`) just ends the listing.
            use std::io::Write;
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                obsrv_operator::rbac::policy_rules_json()
            );
            Ok(())
        }
        Some(Command::Run) | None => {
            obsrv_operator::telemetry::init(cli.config.log_format);
            obsrv_operator::run::run(cli.config).await
        }
    }
}
