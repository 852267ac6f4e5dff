//! `obsrv-connector check -f` on bad input: every message names the field or the endpoint and
//! says what to check, the way a newcomer meets them on the shipped examples.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result};
use obsrv_e2e::services::free_port;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the repository")
        .to_path_buf()
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Runs `obsrv-connector <cmd> -f <manifest> --sink-bootstrap-servers <sink>` on a temp copy.
fn run(cmd: &str, manifest: &str, sink: &str, extra: &[&str]) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("connector.yaml");
    std::fs::write(&file, manifest)?;
    Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
        .arg(cmd)
        .arg("-f")
        .arg(&file)
        .args(["--sink-bootstrap-servers", sink])
        .args(extra)
        .env("OBSRV_LOG_FORMAT", "text")
        .env("OBSRV_LISTEN", format!("127.0.0.1:{}", free_port()?))
        .stdin(Stdio::null())
        .output()
        .context("running obsrv-connector")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn local_example() -> Vec<Value> {
    docs(&std::fs::read_to_string(repo().join("examples/local/postgres.yaml")).expect("example"))
}

/// A change to the local example's Connector.
fn edited(f: impl FnOnce(&mut Value)) -> String {
    let mut d = local_example();
    let c = d
        .iter_mut()
        .find(|d| d["kind"] == "Connector")
        .expect("a Connector");
    f(c);
    yaml(&d)
}

#[test]
fn a_misspelt_field_of_every_kind_names_its_path_and_the_closest_field() -> Result<()> {
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(repo().join("examples"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let mut d = docs(&std::fs::read_to_string(&path)?);
        let c = d
            .iter_mut()
            .find(|d| d["kind"] == "Connector")
            .context("a Connector")?;
        let (kind, spec) = c["spec"]["source"]
            .as_object_mut()
            .and_then(|s| s.iter_mut().next())
            .context("a source")?;
        let kind = kind.clone();
        let spec = spec.as_object_mut().context("a source spec")?;
        let field = spec.keys().next().context("a field")?.clone();
        let value = spec.remove(&field).context("the field")?;
        spec.insert(format!("{field}x"), value);
        let out = run("check", &yaml(&d), "127.0.0.1:9", &[])?;
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let want = format!("unknown field `spec.source.{kind}.{field}x`, did you mean `{field}`?");
        assert!(
            text(&out).contains(&want),
            "{}: {}",
            path.display(),
            text(&out)
        );
        kinds.push(kind);
    }
    for k in obsrv_crds::SOURCE_KINDS {
        assert!(
            kinds.iter().any(|s| s == k.name),
            "no example checks {}",
            k.name
        );
    }
    Ok(())
}

#[test]
fn bad_values_name_the_field_and_run_refuses_them_at_once() -> Result<()> {
    let pg = |f: &'static str, v: Value| edited(move |c| c["spec"]["source"]["postgres"][f] = v);
    let cases: Vec<(String, &str)> = vec![
        (
            pg("port", "15432x".into()),
            r#"spec.source.postgres.port: expected an integer, got "15432x""#,
        ),
        (
            pg("pollInterval", "5 minutes".into()),
            "spec.source.postgres.pollInterval: pollInterval must be a duration such as 30s, 5m or 1h",
        ),
        (
            pg("port", 70000.into()),
            "spec.source.postgres.port: port must be between 1 and 65535",
        ),
        (
            edited(|c| c["spec"]["state"] = "Sleeping".into()),
            r#"spec.state: Unsupported value: "Sleeping""#,
        ),
        (
            edited(|c| c["spec"]["schedule"] = serde_json::json!({"cron": "0 25 * * *"})),
            "spec.schedule: schedule.cron: bad hour field `25`",
        ),
        (
            edited(|c| {
                c["spec"]["source"]["postgres"]["tables"][0]
                    .as_object_mut()
                    .expect("a table")
                    .remove("cursor");
            }),
            "spec.source.postgres.tables[0].cursor: required, but missing",
        ),
    ];
    for (manifest, want) in &cases {
        let out = run("check", manifest, "127.0.0.1:9", &[])?;
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(want),
            "want {want:?} in:\n{}",
            text(&out)
        );
        let out = run("run", manifest, "127.0.0.1:9", &[])?;
        assert_eq!(
            out.status.code(),
            Some(2),
            "run exits at once: {}",
            text(&out)
        );
        assert!(text(&out).contains(want), "{}", text(&out));
    }
    Ok(())
}

#[test]
fn a_file_with_several_connectors_needs_a_name() -> Result<()> {
    let mut d = local_example();
    let mut second = d
        .iter()
        .find(|d| d["kind"] == "Connector")
        .cloned()
        .context("c")?;
    second["metadata"]["name"] = "invoices".into();
    d.push(second);
    let out = run("check", &yaml(&d), "127.0.0.1:9", &[])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out)
            .contains("the file holds 2 Connectors (orders, invoices): choose one with --name"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn unreachable_endpoints_are_named_with_the_likely_cause() -> Result<()> {
    // Nothing listens on these ports.
    let (pg_port, broker_port) = (free_port()?, free_port()?);
    let manifest = edited(|c| c["spec"]["source"]["postgres"]["port"] = pg_port.into());
    let out = run("check", &manifest, &format!("127.0.0.1:{broker_port}"), &[])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = text(&out);
    assert!(
        out.contains(&format!(
            "source: SourceUnreachable - source unreachable: connection refused at 127.0.0.1:{pg_port}: is Postgres listening there?"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "sink: SinkUnreachable - sink unreachable: no broker answered at 127.0.0.1:{broker_port}"
        )) && out.contains("is Kafka listening there?"),
        "{out}"
    );
    assert!(
        !out.contains("librdkafka") && out.lines().count() <= 4,
        "one line per part, no librdkafka noise:\n{out}"
    );
    Ok(())
}

#[test]
fn a_ca_that_is_not_pem_is_a_tls_config_error() -> Result<()> {
    let mut d = local_example();
    for doc in &mut d {
        if doc["kind"] == "Secret" {
            doc["stringData"]["ca.crt"] = "this is not a certificate".into();
        } else {
            doc["spec"]["source"]["postgres"]["tls"] = serde_json::json!(
                {"mode": "verify-full", "ca": {"secretName": "pg-orders-creds", "key": "ca.crt"}}
            );
        }
    }
    let out = run("check", &yaml(&d), "127.0.0.1:9", &[])?;
    assert!(
        text(&out).contains(
            "source: TlsConfig - TLS: Secret pg-orders-creds key ca.crt is not a PEM certificate"
        ),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn help_lists_values_and_ends_with_an_example_and_a_closed_stdout_is_quiet() -> Result<()> {
    for cmd in ["run", "check", "cleanup"] {
        let out = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
            .args([cmd, "--help"])
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.trim_end()
                .lines()
                .last()
                .unwrap_or("")
                .contains(&format!("obsrv-connector {cmd} -f")),
            "{help}"
        );
        assert!(
            help.contains("[possible values: none, gzip, snappy, lz4, zstd]"),
            "{help}"
        );
        assert!(help.contains("[possible values: json, text]"), "{help}");
        assert_eq!(help.contains("--listen"), cmd == "run", "{cmd}: {help}");
        assert!(!help.contains('\u{1b}'), "no ANSI colour into a pipe");
    }
    // stdout closed before the first line: the lines are lost, nothing panics.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, yaml(&local_example()))?;
    let out = Command::new(env!("CARGO_BIN_EXE_obsrv-connector"))
        .args(["check", "-f"])
        .arg(&file)
        .args([
            "--sink-bootstrap-servers",
            &format!("127.0.0.1:{}", free_port()?),
        ])
        .args(["--log-format", "text"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}
