//! What a file source has done, per shard: the keys read (a bounded set) and the object being read.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::decode::Resume;
use crate::error::{Error, Result};

/// The done-state of one shard of a file source's objects: objects done, and the object being
/// read with where to resume in it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShardPosition {
    /// Every key up to and including this one is done (the processed set's folded part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_through: Option<String>,
    #[serde(default)]
    pub done: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<CurrentObject>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CurrentObject {
    pub key: String,
    #[serde(flatten)]
    pub resume: Resume,
}

impl ShardPosition {
    pub fn from_value(v: Option<&serde_json::Value>) -> Result<ShardPosition> {
        match v {
            None => Ok(ShardPosition::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Error::State(format!(
                    "saved position is not a file source's position: {e}"
                ))
            }),
        }
    }

    pub fn watermark(&self) -> String {
        let done = match &self.done_through {
            Some(t) => format!("objects through {t} and {} more done", self.done.len()),
            None => format!("{} objects done", self.done.len()),
        };
        match &self.current {
            Some(c) => format!("{done}; reading {} at {}", c.key, c.resume.offset),
            None => done,
        }
    }

    pub fn is_done(&self, key: &str) -> bool {
        self.done.contains(key) || self.done_through.as_deref().is_some_and(|t| key <= t)
    }

    /// Keeps the processed set bounded, given the keys the bucket lists now. Pure.
    /// - Keys no longer listed are forgotten (deleted objects; one uploaded again is read again).
    /// - Past `budget` bytes of keys, the lowest done keys are folded into `done_through`, but
    ///   never past a listed key that is not done, so nothing listed is ever skipped. What the fold
    ///   costs: an object that appears later with a key sorting before `done_through` is taken as
    ///   done, so keys should sort by time (date-partitioned prefixes do).
    pub fn compact(&mut self, listed: &BTreeSet<String>, budget: usize) {
        self.done.retain(|k| listed.contains(k));
        let lowest_pending = listed.iter().find(|k| !self.is_done(k)).cloned();
        let mut bytes: usize = self.done.iter().map(String::len).sum();
        while bytes > budget {
            match self.done.first() {
                Some(k) if lowest_pending.as_ref().is_none_or(|p| k < p) => {}
                _ => break,
            }
            let k = self.done.pop_first().expect("a first key");
            bytes -= k.len();
            if self.done_through.as_ref().is_none_or(|t| &k > t) {
                self.done_through = Some(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ks: &[&str]) -> BTreeSet<String> {
        ks.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn processed_set_forgets_deleted_objects_and_folds_its_lowest_keys() {
        let mut p = ShardPosition {
            done: keys(&["a", "b", "c", "d", "gone"]),
            ..ShardPosition::default()
        };
        // Deleted objects are forgotten; within budget nothing is folded.
        p.compact(&keys(&["a", "b", "c", "d", "e"]), 100);
        assert_eq!(p.done, keys(&["a", "b", "c", "d"]));
        assert_eq!(p.done_through, None);
        // Over budget (2 bytes of keys): the lowest keys fold into done_through.
        p.compact(&keys(&["a", "b", "c", "d", "e"]), 2);
        assert_eq!(p.done_through.as_deref(), Some("b"));
        assert_eq!(p.done, keys(&["c", "d"]));
        assert!(p.is_done("a") && p.is_done("b") && p.is_done("d"));
        assert!(!p.is_done("e"), "a listed key not done stays pending");
        assert_eq!(p.watermark(), "objects through b and 2 more done");
        // The state stays readable after the round trip.
        let back = ShardPosition::from_value(Some(&serde_json::to_value(&p).unwrap())).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn folding_never_passes_a_listed_key_that_is_not_done() {
        // "b" arrived late, below keys already done: it must still be read.
        let mut p = ShardPosition {
            done: keys(&["a", "c", "d", "e"]),
            ..ShardPosition::default()
        };
        p.compact(&keys(&["a", "b", "c", "d", "e"]), 0);
        assert_eq!(p.done_through.as_deref(), Some("a"));
        assert!(!p.is_done("b"));
        assert_eq!(p.done, keys(&["c", "d", "e"]));
        // Once "b" is done, the fold moves on.
        p.done.insert("b".into());
        p.compact(&keys(&["a", "b", "c", "d", "e"]), 0);
        assert_eq!(p.done_through.as_deref(), Some("e"));
        assert!(p.done.is_empty());
    }

    #[test]
    fn positions_round_trip() {
        let p = ShardPosition {
            done_through: None,
            done: ["a.jsonl".to_string()].into(),
            current: Some(CurrentObject {
                key: "b.csv".into(),
                resume: Resume {
                    offset: 42,
                    header: Some(vec!["id".into()]),
                    ..Resume::default()
                },
            }),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"done": ["a.jsonl"], "current": {"key": "b.csv", "offset": 42, "header": ["id"]}})
        );
        assert_eq!(ShardPosition::from_value(Some(&v)).unwrap(), p);
        assert_eq!(p.watermark(), "1 objects done; reading b.csv at 42");
    }
}
