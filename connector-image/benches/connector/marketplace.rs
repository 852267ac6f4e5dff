//! A marketplace connector (the Airbyte source `source-faker` from PyPI) -> ingest, against the
//! same program writing to /dev/null in the same run (issue 15: our side's overhead; target >= 0.9
//! of it, the runtime's peak RSS < 64 MiB, the child's own memory apart):
//!
//! 1. the bound: `source-faker discover` then `read` of the `users` stream (N records), run
//!    directly with stdout to /dev/null: what the program costs on its own, the same two calls the
//!    runtime makes;
//! 2. the connector on a `source.custom` manifest with `protocol: airbyte` driving the same
//!    program into the ingest topic (every record parsed, enveloped, produced and acknowledged,
//!    its state committed), timed until `/status` counts N records ingested (start-up included).

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use futures::FutureExt as _;
use obsrv_e2e::services::marketplace_program;
use serde_json::{Value, json};

use super::{
    Bench, SourceBench,
    connector::{Connector, Usage, ingested},
};

pub const BENCH: SourceBench = SourceBench {
    name: "airbyte",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// The ratio to the program on its own the issue asks for.
pub const TARGET: f64 = 0.9;
/// The runtime's peak RSS bound, MiB (the child is another process).
pub const RSS_MIB: f64 = 64.0;

/// What the bench measured.
#[derive(Debug)]
pub struct Figures {
    pub rows: usize,
    /// Seconds for discover + read straight to /dev/null.
    pub program_secs: f64,
    pub connector_secs: f64,
    pub connector: Usage,
}

impl Figures {
    /// Connector records/s over the program's own.
    pub fn ratio(&self) -> f64 {
        self.program_secs / self.connector_secs
    }

    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        format!(
            "rows: {} (source-faker users records)\n\
             bound source-faker discover + read > /dev/null: {:>8.0} records/s ({:.2}s)\n\
             obsrv-connector source-faker -> broker:         {:>8.0} records/s ({:.2}s, start-up included)\n\
             ratio to the program on its own: {:.2} (target >= {TARGET})\n\
             connector peak RSS: {:.1} MiB (target < {RSS_MIB} MiB; the runtime, the program's own apart), CPU {:.2}s",
            self.rows,
            rate(self.program_secs),
            self.program_secs,
            rate(self.connector_secs),
            self.connector_secs,
            self.ratio(),
            self.connector.peak_rss_mib(),
            self.connector.cpu_secs,
        )
    }
}

/// source-faker's config for `rows` users; the connector gets the same.
fn config(rows: usize) -> Value {
    json!({"count": rows, "seed": 1, "records_per_slice": 1000, "parallelism": 1, "always_updated": false})
}

/// The Connector that drives source-faker.
fn manifest(b: &Bench, program: &str) -> String {
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: users\n  \
         source:\n    custom:\n      image: airbyte/source-faker:6.2.0\n      protocol: airbyte\n      \
         command: [\"{program}\"]\n      config: {}\n      streams: [{{name: users}}]\n      pollInterval: 1h\n",
        b.name("connector"),
        config(b.rows),
    )
}

/// Runs `program args` with stdout to `stdout`; fails with its stderr when it fails.
fn call(program: &str, args: &[&str], stdout: Stdio) -> Result<std::process::Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The `users` stream of a discover's CATALOG, configured as the runtime does (incremental on
/// its default cursor where the stream supports it).
fn users_catalog(discover_stdout: &[u8]) -> Result<Value> {
    let stream = discover_stdout
        .split(|&c| c == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(|m| m["type"] == "CATALOG")
        .flat_map(|m| {
            m["catalog"]["streams"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|s| s["name"] == "users")
        .context("source-faker discover listed no users stream")?;
    let incremental = stream["supported_sync_modes"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m == "incremental"));
    Ok(json!({"streams": [{
        "stream": stream,
        "sync_mode": if incremental { "incremental" } else { "full_refresh" },
        "destination_sync_mode": "append",
        "cursor_field": stream["default_cursor_field"].clone(),
    }]}))
}

pub async fn run(b: &Bench) -> Result<Figures> {
    let program = marketplace_program("source-faker")?;
    let program = program
        .to_str()
        .context("the program's path is not UTF-8")?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config(b.rows).to_string())?;
    let config_path = config_path.to_str().context("temp path")?;

    eprintln!("bound: source-faker discover + read > /dev/null ...");
    let t = Instant::now();
    let discovered = call(
        program,
        &["discover", "--config", config_path],
        Stdio::piped(),
    )?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(
        &catalog_path,
        users_catalog(&discovered.stdout)?.to_string(),
    )?;
    call(
        program,
        &[
            "read",
            "--config",
            config_path,
            "--catalog",
            catalog_path.to_str().context("temp path")?,
        ],
        Stdio::null(),
    )?;
    let program_secs = t.elapsed().as_secs_f64();

    eprintln!("connector ...");
    let mut connector = Connector::spawn(&manifest(b, program), &b.sink, &[])?;
    let rows = b.rows as u64;
    let connector_secs = connector
        .wait_for(|s, secs| (ingested(s) >= rows).then_some(secs))
        .await?;
    let usage = connector.stop();
    Ok(Figures {
        rows: b.rows,
        program_secs,
        connector_secs,
        connector: usage,
    })
}
