//! The Singer spec: `<tap> --config c.json --discover` prints the catalog; `<tap> --config c.json
//! --catalog catalog.json [--state state.json]` syncs, with RECORD, SCHEMA and STATE messages on
//! stdout and its logs on stderr. State is the last STATE message's `value`, whole.

use obsrv_crds::source::custom::{StreamSelection, SyncMode};
use serde_json::{Value, json};

use super::{
    Dialect, Message,
    program::{Line, Program, WorkDir},
};
use crate::error::{Error, Result};

pub struct Singer {
    wanted: Vec<StreamSelection>,
}

impl Singer {
    pub fn new(streams: &[StreamSelection]) -> Singer {
        Singer {
            wanted: streams.to_vec(),
        }
    }
}

impl Dialect for Singer {
    fn name(&self) -> &'static str {
        "singer"
    }

    async fn prepare(&mut self, program: &Program, dir: &WorkDir) -> Result<String> {
        let config = dir.path("config.json").display().to_string();
        // The catalog may be pretty-printed over many lines: read it whole.
        let mut run = program.spawn(&["--config".into(), config, "--discover".into()], dir)?;
        let mut text = String::new();
        loop {
            match run.next_line().await? {
                Line::Text { text: t, .. } => {
                    text.push_str(&t);
                    text.push('\n');
                }
                Line::TooLong { .. } => {}
                Line::End => break,
            }
        }
        run.finish().await?;
        let catalog: Value = serde_json::from_str(&text).map_err(|e| {
            Error::SourceUnreachable(format!(
                "{} --discover did not print a catalog: {e}",
                program.display()
            ))
        })?;
        let (catalog, selected) = select(catalog, &self.wanted)?;
        dir.write("catalog.json", &catalog)?;
        Ok(format!(
            "singer {}: discovered; streams {}",
            program.display(),
            selected.join(", ")
        ))
    }

    fn read_args(&self, dir: &WorkDir, state: Option<&Value>) -> Result<Vec<String>> {
        let mut args = vec![
            "--config".to_string(),
            dir.path("config.json").display().to_string(),
            "--catalog".into(),
            dir.path("catalog.json").display().to_string(),
        ];
        if let Some(state) = state {
            let file = dir.write("state.json", state)?;
            args.extend(["--state".into(), file.display().to_string()]);
        }
        Ok(args)
    }

    fn parse(&self, mut msg: Value, _state: Option<&Value>) -> Message {
        match msg["type"].as_str() {
            Some("RECORD") => Message::Record {
                stream: msg["stream"].as_str().unwrap_or_default().to_string(),
                data: msg["record"].take(),
            },
            Some("STATE") => Message::State(msg["value"].take()),
            _ => Message::Other,
        }
    }
}

fn stream_id(s: &Value) -> &str {
    s["tap_stream_id"]
        .as_str()
        .or_else(|| s["stream"].as_str())
        .unwrap_or_default()
}

/// The catalog with the wanted streams (all when none are named) selected, every property of
/// them too, incremental by their replication key unless full refresh is asked.
fn select(mut catalog: Value, wanted: &[StreamSelection]) -> Result<(Value, Vec<String>)> {
    let offered: Vec<String> = catalog["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| stream_id(s).to_string())
        .collect();
    if let Some(w) = wanted.iter().find(|w| !offered.contains(&w.name)) {
        return Err(Error::Config(format!(
            "spec.source.custom.streams: the tap has no stream {:?}; it offers {offered:?}",
            w.name
        )));
    }
    let mut selected = Vec::new();
    for s in catalog["streams"].as_array_mut().into_iter().flatten() {
        let id = stream_id(s).to_string();
        let want = wanted.iter().find(|w| w.name == id);
        let on = wanted.is_empty() || want.is_some();
        let metadata = s["metadata"].as_array_mut();
        let Some(metadata) = metadata else { continue };
        for m in metadata.iter_mut() {
            let top = m["breadcrumb"].as_array().is_some_and(Vec::is_empty);
            m["metadata"]["selected"] = json!(on);
            if !top || !on {
                continue;
            }
            let key = want
                .and_then(|w| w.cursor_field.clone())
                .or_else(|| {
                    m["metadata"]["replication-key"]
                        .as_str()
                        .map(str::to_string)
                })
                .or_else(|| {
                    m["metadata"]["valid-replication-keys"][0]
                        .as_str()
                        .map(str::to_string)
                });
            let full = want.and_then(|w| w.sync_mode) == Some(SyncMode::FullRefresh);
            match key {
                Some(key) if !full => {
                    m["metadata"]["replication-method"] = json!("INCREMENTAL");
                    m["metadata"]["replication-key"] = json!(key);
                    selected.push(format!("{id} (incremental by {key})"));
                }
                _ => {
                    m["metadata"]["replication-method"] = json!("FULL_TABLE");
                    selected.push(format!("{id} (full table)"));
                }
            }
        }
    }
    Ok((catalog, selected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_streams_are_selected_incrementally_and_others_not() {
        let catalog = json!({"streams": [
            {"tap_stream_id": "public-events", "metadata": [
                {"breadcrumb": [], "metadata": {"valid-replication-keys": ["id"]}},
                {"breadcrumb": ["properties", "id"], "metadata": {"inclusion": "automatic"}},
            ]},
            {"tap_stream_id": "public-other", "metadata": [{"breadcrumb": [], "metadata": {}}]},
        ]});
        let want = [StreamSelection {
            name: "public-events".into(),
            sync_mode: None,
            cursor_field: None,
        }];
        let (c, selected) = select(catalog.clone(), &want).unwrap();
        assert_eq!(selected, ["public-events (incremental by id)"]);
        let top = &c["streams"][0]["metadata"][0]["metadata"];
        assert_eq!(top["selected"], true);
        assert_eq!(top["replication-method"], "INCREMENTAL");
        assert_eq!(c["streams"][0]["metadata"][1]["metadata"]["selected"], true);
        assert_eq!(
            c["streams"][1]["metadata"][0]["metadata"]["selected"],
            false
        );
        let bad = [StreamSelection {
            name: "events".into(),
            sync_mode: None,
            cursor_field: None,
        }];
        let err = select(catalog, &bad).unwrap_err().to_string();
        assert!(
            err.contains("no stream \"events\"") && err.contains("public-events"),
            "{err}"
        );
    }
}
