//! The initial snapshot beside the change stream, de-duplicated by watermarks (DBLog, Netflix
//! 2019; the approach Sequin takes). Per chunk: write a low watermark into the WAL, read up to
//! `snapshotChunkSize` rows after the last key, write a high watermark. The stream keeps
//! flowing; every key the stream changes between the two watermarks is dropped from the chunk
//! (the change event carries that row's newer state); at the high watermark the rest of the
//! chunk goes out as `op: r` reads. Progress is the last key per table, committed like any
//! position, so a restart resumes at the last chunk, and the slot's position keeps moving
//! during the snapshot instead of holding WAL for all of it. Pure.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// How far the snapshot of every table got.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotProgress {
    /// Bumped by every new snapshot (after a lost slot): part of snapshot event ids.
    pub epoch: u32,
    pub tables: BTreeMap<String, TableProgress>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TableProgress {
    #[serde(default)]
    pub done: bool,
    /// Primary-key values (text) of the last row delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
}

impl SnapshotProgress {
    pub fn new(epoch: u32, tables: &[String]) -> SnapshotProgress {
        SnapshotProgress {
            epoch,
            tables: tables
                .iter()
                .map(|t| (t.clone(), TableProgress::default()))
                .collect(),
        }
    }

    /// The next table to read a chunk of, in the spec's order. A table the spec gained after the
    /// snapshot started is snapshotted too.
    pub fn next_table<'a>(&self, order: &'a [String]) -> Option<&'a str> {
        order
            .iter()
            .find(|t| !self.tables.get(*t).is_some_and(|p| p.done))
            .map(String::as_str)
    }

    pub fn after(&self, table: &str) -> Option<&[String]> {
        self.tables.get(table).and_then(|p| p.after.as_deref())
    }

    /// Human-readable, for `/status`.
    pub fn describe(&self, order: &[String]) -> String {
        match self.next_table(order) {
            None => "snapshot done".into(),
            Some(t) => match self.after(t) {
                Some(k) => format!("snapshot of {t} after ({})", k.join(", ")),
                None => format!("snapshot of {t} starting"),
            },
        }
    }
}

/// One row of a chunk: its key (as the stream's events render it) and the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRow {
    pub key: String,
    pub row: String,
}

/// A chunk read between its watermarks, waiting for the stream to pass them.
#[derive(Debug)]
pub struct Chunk {
    /// Unique across processes (a restarted connector replays its predecessor's watermarks).
    pub id: String,
    pub table: String,
    pub rows: Vec<ChunkRow>,
    /// Key values (text) of the chunk's last row.
    pub last_key: Option<Vec<String>>,
    /// Fewer rows than asked for: the table ends with this chunk.
    pub last: bool,
    low_seen: bool,
    changed: HashSet<String>,
    truncated: bool,
}

/// What the stream's watermark message means for a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark {
    Low,
    High,
}

/// Content of a watermark message: `<slot> <chunk id> low|high`.
pub fn watermark(slot: &str, chunk: &str, mark: &Mark) -> String {
    let m = match mark {
        Mark::Low => "low",
        Mark::High => "high",
    };
    format!("{slot} {chunk} {m}")
}

/// Reads a watermark message written for `slot` (another connector's are `None`).
pub fn parse_watermark<'a>(slot: &str, content: &'a str) -> Option<(&'a str, Mark)> {
    let mut it = content.split(' ');
    let (s, id, m) = (it.next()?, it.next()?, it.next()?);
    if s != slot || it.next().is_some() {
        return None;
    }
    let mark = match m {
        "low" => Mark::Low,
        "high" => Mark::High,
        _ => return None,
    };
    Some((id, mark))
}

impl Chunk {
    pub fn new(
        id: String,
        table: String,
        rows: Vec<ChunkRow>,
        last_key: Option<Vec<String>>,
        last: bool,
    ) -> Chunk {
        Chunk {
            id,
            table,
            rows,
            last_key,
            last,
            low_seen: false,
            changed: HashSet::new(),
            truncated: false,
        }
    }

    pub fn on_low(&mut self) {
        self.low_seen = true;
    }

    /// A change of `key` in `table` streamed past: after the low watermark, that row of the chunk
    /// is superseded by the change.
    pub fn on_change(&mut self, table: &str, key: &str) {
        if self.low_seen && table == self.table {
            self.changed.insert(key.to_string());
        }
    }

    /// `table` was truncated: after the low watermark, none of the chunk's rows exist any more.
    pub fn on_truncate(&mut self, table: &str) {
        if self.low_seen && table == self.table {
            self.truncated = true;
        }
    }

    /// The high watermark: the rows to deliver as reads, and the table's progress. `None` when
    /// the low watermark never came first (the chunk is read again).
    pub fn on_high(self) -> Option<(Vec<ChunkRow>, TableProgress)> {
        if !self.low_seen {
            return None;
        }
        let rows = if self.truncated {
            Vec::new()
        } else {
            let changed = self.changed;
            self.rows
                .into_iter()
                .filter(|r| !changed.contains(&r.key))
                .collect()
        };
        Some((
            rows,
            TableProgress {
                done: self.last,
                after: self.last_key,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: i32) -> ChunkRow {
        ChunkRow {
            key: format!("{{\"id\":{k}}}"),
            row: format!("{{\"id\":{k},\"v\":\"old\"}}"),
        }
    }

    fn chunk() -> Chunk {
        Chunk::new(
            "run-1".into(),
            "public.t".into(),
            (1..=5).map(row).collect(),
            Some(vec!["5".into()]),
            false,
        )
    }

    #[test]
    fn rows_changed_between_the_watermarks_give_way_to_their_changes() {
        let mut c = chunk();
        // Before the low watermark: the chunk read the row after that change; it stays.
        c.on_change("public.t", "{\"id\":1}");
        c.on_low();
        c.on_change("public.t", "{\"id\":2}");
        c.on_change("public.other", "{\"id\":3}");
        let (rows, progress) = c.on_high().expect("low came first");
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            ["{\"id\":1}", "{\"id\":3}", "{\"id\":4}", "{\"id\":5}"]
        );
        assert_eq!(
            progress,
            TableProgress {
                done: false,
                after: Some(vec!["5".into()])
            }
        );
    }

    #[test]
    fn a_truncate_between_the_watermarks_empties_the_chunk() {
        let mut c = chunk();
        c.on_low();
        c.on_truncate("public.t");
        let (rows, _) = c.on_high().unwrap();
        assert!(rows.is_empty());
        let mut c = chunk();
        c.on_truncate("public.t");
        c.on_low();
        assert_eq!(c.on_high().unwrap().0.len(), 5, "truncated before the read");
    }

    #[test]
    fn a_high_watermark_without_its_low_rereads_the_chunk() {
        assert!(chunk().on_high().is_none());
    }

    #[test]
    fn watermarks_belong_to_one_slot() {
        let w = watermark("obsrv_a", "123-4", &Mark::High);
        assert_eq!(parse_watermark("obsrv_a", &w), Some(("123-4", Mark::High)));
        assert_eq!(parse_watermark("obsrv_b", &w), None);
        assert_eq!(parse_watermark("obsrv_a", "obsrv_a 1 middle"), None);
        assert_eq!(parse_watermark("obsrv_a", "obsrv_a 1 low x"), None);
    }

    #[test]
    fn progress_goes_table_by_table_and_survives_json() {
        let order = vec!["public.a".to_string(), "public.b".to_string()];
        let mut p = SnapshotProgress::new(0, &order);
        assert_eq!(p.next_table(&order), Some("public.a"));
        p.tables.insert(
            "public.a".into(),
            TableProgress {
                done: true,
                after: Some(vec!["9".into()]),
            },
        );
        assert_eq!(p.next_table(&order), Some("public.b"));
        // A table added to the spec later is snapshotted too.
        let more = vec![order[0].clone(), order[1].clone(), "public.c".into()];
        p.tables.insert(
            "public.b".into(),
            TableProgress {
                done: true,
                after: None,
            },
        );
        assert_eq!(p.next_table(&more), Some("public.c"));
        assert_eq!(p.next_table(&order), None);
        let back: SnapshotProgress =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.describe(&order), "snapshot done");
    }
}
