//! The Airbyte protocol: `check`, `discover` and `read --config --catalog [--state]`, with
//! AirbyteMessages on stdout. State is kept per stream (and global) as the program sends it, and
//! handed back whole on the next read.

use obsrv_crds::source::custom::{StreamSelection, SyncMode};
use serde_json::{Value, json};

use super::{
    Dialect, Message,
    program::{Program, WorkDir},
};
use crate::error::{Error, Result};

pub struct Airbyte {
    wanted: Vec<StreamSelection>,
}

impl Airbyte {
    pub fn new(streams: &[StreamSelection]) -> Airbyte {
        Airbyte {
            wanted: streams.to_vec(),
        }
    }
}

/// The program of an Airbyte image when the spec names none: its `$AIRBYTE_ENTRYPOINT`.
pub fn entrypoint() -> Result<Vec<String>> {
    std::env::var("AIRBYTE_ENTRYPOINT")
        .ok()
        .map(|e| e.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Error::Config(
                "spec.source.custom.command is not set and there is no $AIRBYTE_ENTRYPOINT: name the program, e.g. [\"source-faker\"] or [\"python\", \"/airbyte/integration_code/main.py\"]".into(),
            )
        })
}

impl Dialect for Airbyte {
    fn name(&self) -> &'static str {
        "airbyte"
    }

    async fn prepare(&mut self, program: &Program, dir: &WorkDir) -> Result<String> {
        let config = dir.path("config.json").display().to_string();
        let (messages, mut run) = program
            .messages(&["check".into(), "--config".into(), config.clone()], dir)
            .await?;
        for m in &messages {
            if let Message::Failed { message, config } = self.parse(m.clone(), None) {
                run.failed(program.redactor.redact(&message), config);
            }
        }
        run.finish().await?;
        if !messages.iter().any(|m| m["type"] == "CONNECTION_STATUS") {
            return Err(Error::SourceUnreachable(format!(
                "{} check wrote no CONNECTION_STATUS: is it an Airbyte source?",
                program.display()
            )));
        }
        let (messages, run) = program
            .messages(&["discover".into(), "--config".into(), config], dir)
            .await?;
        run.finish().await?;
        let catalog = messages
            .iter()
            .find(|m| m["type"] == "CATALOG")
            .map(|m| m["catalog"].clone())
            .ok_or_else(|| {
                Error::SourceUnreachable(format!("{} discover wrote no CATALOG", program.display()))
            })?;
        let configured = configure(&catalog, &self.wanted)?;
        let streams: Vec<String> = configured["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} ({})",
                    s["stream"]["name"].as_str().unwrap_or("?"),
                    s["sync_mode"].as_str().unwrap_or("?")
                )
            })
            .collect();
        dir.write("catalog.json", &configured)?;
        Ok(format!(
            "airbyte {}: check succeeded; streams {}",
            program.display(),
            streams.join(", ")
        ))
    }

    fn read_args(&self, dir: &WorkDir, state: Option<&Value>) -> Result<Vec<String>> {
        let mut args = vec![
            "read".to_string(),
            "--config".into(),
            dir.path("config.json").display().to_string(),
            "--catalog".into(),
            dir.path("catalog.json").display().to_string(),
        ];
        if let Some(state) = state {
            let file = dir.write("state.json", &state_file(state))?;
            args.extend(["--state".into(), file.display().to_string()]);
        }
        Ok(args)
    }

    fn parse(&self, msg: Value, state: Option<&Value>) -> Message {
        match msg["type"].as_str() {
            Some("RECORD") => {
                let mut r = msg;
                let stream = r["record"]["stream"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                Message::Record {
                    stream,
                    data: r["record"]["data"].take(),
                }
            }
            Some("STATE") => Message::State(merge_state(state, &msg["state"])),
            Some("LOG") => Message::Log {
                level: msg["log"]["level"].as_str().unwrap_or("INFO").to_string(),
                message: msg["log"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            },
            Some("TRACE") if msg["trace"]["type"] == "ERROR" => {
                let e = &msg["trace"]["error"];
                Message::Failed {
                    message: e["message"].as_str().unwrap_or("an error").to_string(),
                    config: e["failure_type"] == "config_error",
                }
            }
            Some("CONNECTION_STATUS") if msg["connectionStatus"]["status"] == "FAILED" => {
                Message::Failed {
                    message: format!(
                        "check failed: {}",
                        msg["connectionStatus"]["message"]
                            .as_str()
                            .unwrap_or("no message")
                    ),
                    config: false,
                }
            }
            _ => Message::Other,
        }
    }
}

/// The configured catalog: the wanted streams (all when none are named), incremental where the
/// stream supports it unless full refresh is asked, appended.
fn configure(catalog: &Value, wanted: &[StreamSelection]) -> Result<Value> {
    let offered: Vec<&Value> = catalog["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let names: Vec<&str> = offered.iter().filter_map(|s| s["name"].as_str()).collect();
    let mut out = Vec::new();
    let pick: Vec<(Option<&StreamSelection>, &Value)> = if wanted.is_empty() {
        offered.iter().map(|s| (None, *s)).collect()
    } else {
        wanted
            .iter()
            .map(|w| {
                offered
                    .iter()
                    .find(|s| s["name"] == w.name.as_str())
                    .map(|s| (Some(w), *s))
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "spec.source.custom.streams: the program has no stream {:?}; it offers {names:?}",
                            w.name
                        ))
                    })
            })
            .collect::<Result<_>>()?
    };
    for (w, stream) in pick {
        let modes: Vec<&str> = stream["supported_sync_modes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let incremental = match w.and_then(|w| w.sync_mode) {
            Some(SyncMode::FullRefresh) => false,
            Some(SyncMode::Incremental) if !modes.contains(&"incremental") => {
                return Err(Error::Config(format!(
                    "spec.source.custom.streams: stream {} cannot be read incrementally (it supports {modes:?})",
                    stream["name"]
                )));
            }
            _ => modes.contains(&"incremental"),
        };
        let cursor = match w.and_then(|w| w.cursor_field.as_deref()) {
            Some(c) => json!([c]),
            None => stream["default_cursor_field"].clone(),
        };
        let mut configured = json!({
            "stream": stream,
            "sync_mode": if incremental { "incremental" } else { "full_refresh" },
            "destination_sync_mode": "append",
        });
        if incremental && !cursor.is_null() {
            configured["cursor_field"] = cursor;
        }
        out.push(configured);
    }
    Ok(json!({ "streams": out }))
}

/// The whole state after one STATE message: per stream (keyed by namespace and name), global, or
/// a legacy blob.
fn merge_state(previous: Option<&Value>, msg: &Value) -> Value {
    match msg["type"].as_str() {
        Some("STREAM") => {
            let d = &msg["stream"]["stream_descriptor"];
            let key = format!(
                "{}/{}",
                d["namespace"].as_str().unwrap_or_default(),
                d["name"].as_str().unwrap_or_default()
            );
            let mut out = previous
                .filter(|p| p.get("legacy").is_none())
                .cloned()
                .unwrap_or_else(|| json!({}));
            out["streams"][key] = msg.clone();
            out
        }
        Some("GLOBAL") => {
            let mut out = previous
                .filter(|p| p.get("legacy").is_none())
                .cloned()
                .unwrap_or_else(|| json!({}));
            out["global"] = msg.clone();
            out
        }
        _ => json!({ "legacy": msg.get("data").cloned().unwrap_or_else(|| msg.clone()) }),
    }
}

/// What `read --state` takes: the state messages, or the legacy blob.
fn state_file(state: &Value) -> Value {
    if let Some(legacy) = state.get("legacy") {
        return legacy.clone();
    }
    let mut out: Vec<Value> = state["streams"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values().cloned())
        .collect();
    if let Some(g) = state.get("global") {
        out.push(g.clone());
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_states_accumulate_and_are_handed_back_as_messages() {
        let s1 = json!({"type": "STREAM", "stream": {"stream_descriptor": {"name": "users"}, "stream_state": {"updated_at": "1"}}});
        let s2 = json!({"type": "STREAM", "stream": {"stream_descriptor": {"name": "products"}, "stream_state": {"id": 3}}});
        let s3 = json!({"type": "STREAM", "stream": {"stream_descriptor": {"name": "users"}, "stream_state": {"updated_at": "2"}}});
        let mut st = merge_state(None, &s1);
        st = merge_state(Some(&st), &s2);
        st = merge_state(Some(&st), &s3);
        let file = state_file(&st);
        assert_eq!(file.as_array().unwrap().len(), 2);
        assert!(file.as_array().unwrap().contains(&s3) && file.as_array().unwrap().contains(&s2));
        let legacy = merge_state(Some(&st), &json!({"data": {"cursor": 5}}));
        assert_eq!(state_file(&legacy), json!({"cursor": 5}));
    }

    #[test]
    fn catalog_selects_named_streams_incrementally_where_supported() {
        let catalog = json!({"streams": [
            {"name": "users", "supported_sync_modes": ["full_refresh", "incremental"], "default_cursor_field": ["updated_at"]},
            {"name": "products", "supported_sync_modes": ["full_refresh"]},
        ]});
        let all = configure(&catalog, &[]).unwrap();
        assert_eq!(all["streams"][0]["sync_mode"], "incremental");
        assert_eq!(all["streams"][0]["cursor_field"], json!(["updated_at"]));
        assert_eq!(all["streams"][1]["sync_mode"], "full_refresh");
        let sel = |name: &str, mode| StreamSelection {
            name: name.into(),
            sync_mode: mode,
            cursor_field: None,
        };
        let one = configure(&catalog, &[sel("users", Some(SyncMode::FullRefresh))]).unwrap();
        assert_eq!(one["streams"].as_array().unwrap().len(), 1);
        assert_eq!(one["streams"][0]["sync_mode"], "full_refresh");
        let err = configure(&catalog, &[sel("user", None)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no stream \"user\"") && err.contains("users"),
            "{err}"
        );
        let err = configure(&catalog, &[sel("products", Some(SyncMode::Incremental))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read incrementally"), "{err}");
    }

    #[test]
    fn errors_say_whether_the_config_is_to_blame() {
        let a = Airbyte::new(&[]);
        let m = a.parse(json!({"type": "TRACE", "trace": {"type": "ERROR", "error": {"message": "bad host", "failure_type": "config_error"}}}), None);
        assert_eq!(
            m,
            Message::Failed {
                message: "bad host".into(),
                config: true
            }
        );
        let m = a.parse(json!({"type": "CONNECTION_STATUS", "connectionStatus": {"status": "FAILED", "message": "refused"}}), None);
        assert_eq!(
            m,
            Message::Failed {
                message: "check failed: refused".into(),
                config: false
            }
        );
    }
}
