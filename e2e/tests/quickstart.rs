//! The README's "Run one connector without a cluster", command by command, as a newcomer types
//! them: the services of `scripts/demo.sh --services-only`, then `check` and `run` of the shipped
//! `examples/local/postgres.yaml`. Only the fixed ports are swapped for free ones (so the test
//! does not depend on 15432 and 19092 being free on the machine).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use obsrv_e2e::harness::binaries_dir;
use obsrv_e2e::services::free_port;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repository")
        .to_path_buf()
}

/// The shell lines of the section's first code block, comments and blank lines dropped.
fn quick_start_commands() -> Result<Vec<String>> {
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let section = readme
        .split("## Run one connector without a cluster")
        .nth(1)
        .context("the README has no 'Run one connector without a cluster' section")?;
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .context("the section has no ```sh block")?;
    Ok(block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or_default().trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

/// Stops a child on drop: SIGINT first (the demo waits for Ctrl-C), then SIGKILL.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_works_on_the_shipped_example() -> Result<()> {
    let commands = quick_start_commands()?;
    let (pg_port, broker_port) = (free_port()?, free_port()?);
    let bin = binaries_dir()?;
    let dir = tempfile::tempdir()?;
    let example = "examples/local/postgres.yaml";
    let local = dir.path().join("postgres.yaml");
    let text = std::fs::read_to_string(repo().join(example))?;
    assert!(
        text.contains("port: 15432"),
        "the example names the README's port"
    );
    std::fs::write(
        &local,
        text.replace("port: 15432", &format!("port: {pg_port}")),
    )?;

    let [services, check, run] = commands.as_slice() else {
        bail!("expected three commands (services, check, run), got {commands:?}");
    };

    // 1. scripts/demo.sh --services-only: the demo binary that script runs, with its arguments.
    let args: Vec<&str> = services
        .strip_prefix("scripts/demo.sh")
        .context("the first command starts the services with scripts/demo.sh")?
        .split_whitespace()
        .collect();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_obsrv-demo"))
        .args(&args)
        .args(["--pg-port", &pg_port.to_string()])
        .args(["--broker-port", &broker_port.to_string()])
        .args(["--rows", "300"])
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = demo.stdout.take().context("demo stdout")?;
    let demo = Running(demo);
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line?;
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert!(
        printed.contains("Press Ctrl-C"),
        "the services did not start:\n{printed}"
    );
    // Keep reading what it prints later (on Ctrl-C), like a terminal would.
    std::thread::spawn(move || lines.for_each(drop));

    // 2 and 3: the connector commands, verbatim but for the ports and the example's copy.
    let argv = |line: &str| -> Vec<String> {
        line.replace("127.0.0.1:19092", &format!("127.0.0.1:{broker_port}"))
            .split_whitespace()
            .map(|w| match w {
                "target/debug/obsrv-connector" => bin.join("obsrv-connector").display().to_string(),
                w if w == example => local.display().to_string(),
                w => w.to_string(),
            })
            .collect()
    };
    let c = argv(check);
    let out = Command::new(&c[0])
        .args(&c[1..])
        .current_dir(repo())
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed:\n{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in ["config: ok", "source: ok", "sink: ok"] {
        assert!(said.contains(part), "{part} missing in:\n{said}");
    }

    let r = argv(run);
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut connector = Command::new(&r[0])
        .args(&r[1..])
        .args(["--listen", &listen])
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = serde_json::Value::Null;
    let loaded = loop {
        if let Ok(resp) = reqwest::get(format!("http://{listen}/status")).await
            && let Ok(s) = resp.json::<serde_json::Value>().await
        {
            if s["totals"]["recordsIngested"].as_u64() >= Some(300) {
                break true;
            }
            last = s;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Ctrl-C stops it cleanly, as the README says.
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(connector.id() as libc::pid_t, libc::SIGINT) };
    let status = connector.wait()?;
    assert!(
        loaded,
        "the 300 sample rows did not arrive; last status {last}"
    );
    assert!(
        status.success(),
        "run did not stop cleanly on Ctrl-C: {status}"
    );
    drop(demo);
    Ok(())
}
