//! Objects in an S3-compatible bucket: JSON, JSON lines, CSV and Parquet. Objects are read in key
//! order as byte streams (never whole, except JSON documents up to a cap; Parquet objects are copied
//! to a temp file and read row group by row group), so memory stays bounded whatever the object
//! size. State holds the processed keys and the byte offset (Parquet: row index) reached inside the
//! current object; nothing is ever written to the bucket.

use std::{
    collections::{BTreeSet, VecDeque},
    io::Write,
    sync::Arc,
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{GetOptions, GetRange, ObjectStore, aws::AmazonS3Builder, path::Path};
use obsrv_crds::{ObjectFormat, S3SourceSpec, runtime::env};
use serde::{Deserialize, Serialize};

use super::{Batch, Lag, OpenContext, Record, Source, SourceFactory};
#[path = "parquet.rs"]
pub mod pq;
use crate::{
    config::Secrets,
    envelope::{Payload, event_id, validate},
    error::{Error, Result},
};
use pq::{ParquetRows, RowOutcome};

/// Records per batch.
pub const BATCH_RECORDS: usize = 5_000;
/// Bytes of payload per batch (bounds memory with large records).
pub const BATCH_BYTES: usize = 4 << 20;
/// Longest line kept whole; longer ones become failed records holding their beginning.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Largest JSON document (format `json`) read; larger ones become a failed record.
pub const MAX_JSON_DOCUMENT_BYTES: usize = 16 << 20;

/// How many bytes of keys the processed set may hold; past it, its lowest keys are folded into
/// `doneThrough`. Keeps the state record far below the sink's message size whatever the bucket.
pub const DONE_KEYS_BUDGET: usize = 256 << 10;

/// Where an S3 source is: objects done, and the object being read with the byte offset reached.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct S3Position {
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
    /// Byte offset of the first unread record (JSON documents: index of the first unread element;
    /// Parquet: index of the first unread row).
    pub offset: u64,
    /// CSV header, so a resumed read does not need the first line again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Vec<String>>,
}

impl S3Position {
    pub fn from_value(v: Option<&serde_json::Value>) -> Result<S3Position> {
        match v {
            None => Ok(S3Position::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::State(format!("saved position is not an S3 position: {e}"))),
        }
    }

    pub fn watermark(&self) -> String {
        let done = match &self.done_through {
            Some(t) => format!("objects through {t} and {} more done", self.done.len()),
            None => format!("{} objects done", self.done.len()),
        };
        match &self.current {
            Some(c) => format!("{done}; reading {} at {}", c.key, c.offset),
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

/// Splits a byte stream into lines, remembering each line's byte offset. Pure and incremental:
/// each byte is scanned once and the buffer is compacted lazily, so long objects stay linear.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// First unread byte of `buf`.
    pos: usize,
    /// Bytes of `buf` before this index hold no newline past `pos`.
    scanned: usize,
    /// Object offset of `buf[pos]`.
    start: u64,
    /// Inside an over-long line: bytes are dropped until its end.
    skipping: bool,
}

/// One line: its offset, its bytes (without `\n`/`\r\n`), and whether it was cut.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub offset: u64,
    pub end: u64,
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl LineSplitter {
    pub fn new(start: u64) -> LineSplitter {
        LineSplitter {
            start,
            ..LineSplitter::default()
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.scanned = self.scanned.saturating_sub(self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Whether every pushed byte has been handed out.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Object offset of the first byte not yet handed out.
    pub fn offset(&self) -> u64 {
        self.start
    }

    /// The next complete line, or the rest at end of input (`eof`).
    pub fn next_line(&mut self, eof: bool) -> Option<Line> {
        loop {
            let len = self.buf.len();
            let from = self.scanned.max(self.pos);
            let nl = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| from + i);
            let (take, consumed) = match nl {
                Some(i) => (i - self.pos, i + 1 - self.pos),
                None if eof && self.pos < len => (len - self.pos, len - self.pos),
                None if len - self.pos > MAX_LINE_BYTES && !self.skipping => {
                    // Emit the beginning of an over-long line now; drop the rest as it arrives.
                    let bytes = self.buf[self.pos..self.pos + 64 * 1024].to_vec();
                    let offset = self.start;
                    self.start += (len - self.pos) as u64;
                    self.pos = len;
                    self.scanned = len;
                    self.skipping = true;
                    return Some(Line {
                        offset,
                        end: self.start,
                        bytes,
                        truncated: true,
                    });
                }
                None => {
                    self.scanned = len;
                    if self.skipping {
                        self.start += (len - self.pos) as u64;
                        self.pos = len;
                    }
                    return None;
                }
            };
            let offset = self.start;
            let mut bytes = self.buf[self.pos..self.pos + take].to_vec();
            self.pos += consumed;
            self.scanned = self.pos;
            self.start += consumed as u64;
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Line {
                offset,
                end: self.start,
                bytes,
                truncated: false,
            });
        }
    }
}

/// Parses one CSV record (possibly spanning lines) into its fields.
pub fn csv_fields(record: &[u8]) -> Option<Vec<String>> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(record);
    let rec = r.records().next()?.ok()?;
    Some(rec.iter().map(str::to_string).collect())
}

/// A CSV row as a JSON object keyed by the header; values stay strings (CSV has no types).
pub fn csv_row(header: &[String], fields: &[String]) -> Payload {
    if fields.len() != header.len() {
        return Payload::Unparseable {
            raw: fields.join(","),
            reason: format!(
                "CSV row has {} fields, the header has {}",
                fields.len(),
                header.len()
            ),
        };
    }
    let obj: serde_json::Map<String, serde_json::Value> = header
        .iter()
        .cloned()
        .zip(fields.iter().map(|f| serde_json::Value::String(f.clone())))
        .collect();
    Payload::Json(serde_json::Value::Object(obj).to_string())
}

/// Whether a CSV record is complete (its quotes are balanced).
pub fn csv_complete(bytes: &[u8]) -> bool {
    bytes.iter().filter(|&&b| b == b'"').count() % 2 == 0
}

/// The records of a JSON document: an object, or an array of objects.
pub fn json_document(bytes: &[u8]) -> Vec<Payload> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::Object(_) => Payload::Json(v.to_string()),
                other => Payload::Unparseable {
                    raw: other.to_string(),
                    reason: "array element is not a JSON object".into(),
                },
            })
            .collect(),
        Ok(v @ serde_json::Value::Object(_)) => vec![Payload::Json(v.to_string())],
        Ok(other) => vec![Payload::Unparseable {
            raw: other.to_string(),
            reason: "document is not a JSON object or array".into(),
        }],
        Err(e) => vec![Payload::Unparseable {
            raw: String::from_utf8_lossy(bytes).into_owned(),
            reason: format!("document is not valid JSON: {e}"),
        }],
    }
}

struct OpenObject {
    key: String,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    lines: LineSplitter,
    eof: bool,
    header: Option<Vec<String>>,
    /// JSON documents: records left, and the index of the next one.
    doc: Option<(VecDeque<Payload>, u64)>,
    /// Parquet: the rows of the object's local copy.
    parquet: Option<ParquetRows>,
}

pub struct S3Source {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: Option<Path>,
    format: ObjectFormat,
    instance: String,
    position: S3Position,
    pending: VecDeque<String>,
    open: Option<OpenObject>,
}

fn store_err(e: object_store::Error) -> Error {
    match &e {
        object_store::Error::Unauthenticated { .. }
        | object_store::Error::PermissionDenied { .. } => Error::AuthFailed(e.to_string()),
        object_store::Error::NotFound { .. } => Error::Schema(e.to_string()),
        _ => {
            let s = e.to_string();
            if s.contains("InvalidAccessKeyId")
                || s.contains("SignatureDoesNotMatch")
                || s.contains("AccessDenied")
                || s.contains("403")
            {
                Error::AuthFailed(s)
            } else if s.contains("NoSuchBucket") {
                Error::Schema(s)
            } else {
                Error::SourceUnreachable(s)
            }
        }
    }
}

/// The `s3` kind.
pub fn factory() -> SourceFactory {
    SourceFactory::new(
        obsrv_crds::source::object::S3.name,
        |ctx: OpenContext| async move {
            let spec = ctx
                .config
                .spec
                .source
                .s3
                .as_ref()
                .ok_or_else(|| Error::Config("the spec names another source kind".into()))?;
            S3Source::connect(spec, &ctx.secrets, &ctx.instance(), ctx.position.as_ref()).await
        },
    )
}

impl S3Source {
    pub async fn connect(
        spec: &S3SourceSpec,
        secrets: &Secrets,
        instance: &str,
        position: Option<&serde_json::Value>,
    ) -> Result<S3Source> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&spec.bucket)
            .with_region(&spec.region)
            .with_virtual_hosted_style_request(!spec.force_path_style);
        if let Some(ep) = &spec.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        if let (Some(k), Some(s)) = (
            secrets.get(env::SOURCE_ACCESS_KEY_ID),
            secrets.get(env::SOURCE_SECRET_ACCESS_KEY),
        ) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store: Arc<dyn ObjectStore> = Arc::new(
            b.build()
                .map_err(|e| Error::Config(format!("s3 source: {e}")))?,
        );
        let prefix =
            (!spec.prefix.is_empty()).then(|| Path::from(spec.prefix.trim_end_matches('/')));
        let mut s = S3Source {
            store,
            bucket: spec.bucket.clone(),
            prefix,
            format: spec.format,
            instance: instance.to_string(),
            position: S3Position::from_value(position)?,
            pending: VecDeque::new(),
            open: None,
        };
        // Reach the bucket now so a wrong endpoint or key shows at start; the first batch reads
        // from this listing.
        s.pending = s.list().await?.into();
        Ok(s)
    }

    /// Keys not yet done, in order; the object being read (if any) first.
    async fn list(&mut self) -> Result<Vec<String>> {
        let metas: Vec<_> = self
            .store
            .list(self.prefix.as_ref())
            .try_collect()
            .await
            .map_err(store_err)?;
        let listed: BTreeSet<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        self.position.compact(&listed, DONE_KEYS_BUDGET);
        // In key order (a BTreeSet's).
        let mut keys: Vec<String> = listed
            .into_iter()
            .filter(|k| !self.position.is_done(k))
            .collect();
        if let Some(i) = self
            .position
            .current
            .as_ref()
            .and_then(|c| keys.iter().position(|k| k == &c.key))
        {
            let k = keys.remove(i);
            keys.insert(0, k);
        }
        Ok(keys)
    }

    async fn open(&mut self, key: &str) -> Result<OpenObject> {
        let (offset, header) = match &self.position.current {
            Some(c) if c.key == key => (c.offset, c.header.clone()),
            _ => (0, None),
        };
        let byte_offset = if matches!(self.format, ObjectFormat::Json | ObjectFormat::Parquet) {
            0
        } else {
            offset
        };
        let opts = GetOptions {
            range: (byte_offset > 0).then_some(GetRange::Offset(byte_offset)),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&Path::from(key), opts)
            .await
            .map_err(store_err)?;
        let mut o = OpenObject {
            key: key.to_string(),
            stream: got.into_stream(),
            lines: LineSplitter::new(byte_offset),
            eof: false,
            header,
            doc: None,
            parquet: None,
        };
        if self.format == ObjectFormat::Parquet {
            // Parquet needs random access (footer first): copy the object to an anonymous temp
            // file chunk by chunk, then read it from there.
            let mut file = tempfile::tempfile()
                .map_err(|e| Error::SourceUnreachable(format!("temp file for {key}: {e}")))?;
            while let Some(chunk) = o.stream.next().await {
                let chunk = chunk.map_err(store_err)?;
                file.write_all(&chunk)
                    .map_err(|e| Error::SourceUnreachable(format!("temp file for {key}: {e}")))?;
            }
            file.flush()
                .map_err(|e| Error::SourceUnreachable(format!("temp file for {key}: {e}")))?;
            o.parquet = Some(ParquetRows::open(file, offset));
            o.eof = true;
        }
        if self.format == ObjectFormat::Json {
            let mut bytes = Vec::new();
            let mut too_big = false;
            while let Some(chunk) = o.stream.next().await {
                let chunk = chunk.map_err(store_err)?;
                if bytes.len() + chunk.len() > MAX_JSON_DOCUMENT_BYTES {
                    too_big = true;
                    bytes.truncate(64 * 1024);
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            let mut items: VecDeque<Payload> = if too_big {
                VecDeque::from([Payload::Unparseable {
                    raw: String::from_utf8_lossy(&bytes).into_owned(),
                    reason: format!(
                        "JSON document larger than {MAX_JSON_DOCUMENT_BYTES} bytes: use jsonLines"
                    ),
                }])
            } else {
                json_document(&bytes).into()
            };
            items.drain(..(offset as usize).min(items.len()));
            o.doc = Some((items, offset));
            o.eof = true;
        }
        Ok(o)
    }

    /// Reads the next records of the open object (up to the batch limits).
    async fn read(&mut self) -> Result<(Vec<Record>, bool)> {
        let o = self.open.as_mut().expect("an open object");
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let (instance, bucket, key) = (self.instance.clone(), self.bucket.clone(), o.key.clone());
        let ids = move |offset: u64| event_id(&instance, &[&bucket, &key, &offset.to_string()]);
        if let Some(rows) = &mut o.parquet {
            let mut finished = false;
            while records.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
                match rows.next_row() {
                    Some(RowOutcome::Row(i, json)) => {
                        bytes += json.len();
                        records.push(Record {
                            id: ids(i),
                            payload: Payload::Json(json),
                        });
                    }
                    Some(RowOutcome::Failed(i, reason)) => {
                        records.push(Record {
                            id: ids(i),
                            payload: Payload::Unparseable {
                                raw: format!("s3://{}/{}", self.bucket, o.key),
                                reason,
                            },
                        });
                    }
                    None => {
                        finished = true;
                        break;
                    }
                }
            }
            self.position.current = Some(CurrentObject {
                key: o.key.clone(),
                offset: rows.position(),
                header: None,
            });
            return Ok((records, finished));
        }
        if let Some((items, next)) = &mut o.doc {
            while records.len() < BATCH_RECORDS {
                let Some(p) = items.pop_front() else { break };
                records.push(Record {
                    id: event_id(&self.instance, &[&self.bucket, &o.key, &next.to_string()]),
                    payload: p,
                });
                *next += 1;
            }
            let finished = items.is_empty();
            self.position.current = Some(CurrentObject {
                key: o.key.clone(),
                offset: *next,
                header: None,
            });
            return Ok((records, finished));
        }
        let mut resume_at = o.lines.offset();
        loop {
            if records.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
                break;
            }
            let line = match o.lines.next_line(o.eof) {
                Some(l) => l,
                None if o.eof => break,
                None => {
                    match o.stream.next().await {
                        Some(chunk) => o.lines.push(&chunk.map_err(store_err)?),
                        None => o.eof = true,
                    }
                    continue;
                }
            };
            let (offset, mut end, mut raw, truncated) =
                (line.offset, line.end, line.bytes, line.truncated);
            if self.format == ObjectFormat::Csv {
                // A quoted field may hold newlines: join lines until the quotes balance.
                while !truncated && !csv_complete(&raw) {
                    match o.lines.next_line(o.eof) {
                        Some(more) => {
                            raw.push(b'\n');
                            raw.extend_from_slice(&more.bytes);
                            end = more.end;
                        }
                        None if o.eof => break,
                        None => match o.stream.next().await {
                            Some(chunk) => o.lines.push(&chunk.map_err(store_err)?),
                            None => o.eof = true,
                        },
                    }
                }
            }
            resume_at = end;
            bytes += raw.len();
            let payload = if truncated {
                Payload::Unparseable {
                    raw: String::from_utf8_lossy(&raw).into_owned(),
                    reason: format!("line longer than {MAX_LINE_BYTES} bytes"),
                }
            } else {
                match self.format {
                    ObjectFormat::Csv => {
                        let Some(fields) = csv_fields(&raw) else {
                            records.push(Record {
                                id: ids(offset),
                                payload: Payload::Unparseable {
                                    raw: String::from_utf8_lossy(&raw).into_owned(),
                                    reason: "invalid CSV".into(),
                                },
                            });
                            continue;
                        };
                        match &o.header {
                            None => {
                                o.header = Some(fields);
                                continue;
                            }
                            Some(h) => csv_row(h, &fields),
                        }
                    }
                    _ => validate(&raw),
                }
            };
            records.push(Record {
                id: ids(offset),
                payload,
            });
        }
        let finished = o.eof && o.lines.is_empty();
        self.position.current = Some(CurrentObject {
            key: o.key.clone(),
            offset: resume_at,
            header: o.header.clone(),
        });
        Ok((records, finished))
    }
}

impl Source for S3Source {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        loop {
            if self.open.is_none() {
                if self.pending.is_empty() {
                    self.pending = self.list().await?.into();
                }
                let Some(key) = self.pending.pop_front() else {
                    return Ok(None);
                };
                self.open = Some(self.open(&key).await?);
            }
            let (records, finished) = self.read().await?;
            if finished {
                let o = self.open.take().expect("open object");
                self.position.done.insert(o.key);
                self.position.current = None;
            }
            if records.is_empty() && !finished {
                continue;
            }
            let position =
                serde_json::to_value(&self.position).map_err(|e| Error::State(e.to_string()))?;
            return Ok(Some(Batch {
                records,
                position,
                watermark: Some(self.position.watermark()),
            }));
        }
    }

    fn describe(&self) -> String {
        let prefix = self
            .prefix
            .as_ref()
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        format!(
            "s3 {}{prefix}, {} objects to read",
            self.bucket,
            self.pending.len()
        )
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        Ok(None)
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
        let mut p = S3Position {
            done: keys(&["a", "b", "c", "d", "gone"]),
            ..S3Position::default()
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
        let back = S3Position::from_value(Some(&serde_json::to_value(&p).unwrap())).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn folding_never_passes_a_listed_key_that_is_not_done() {
        // "b" arrived late, below keys already done: it must still be read.
        let mut p = S3Position {
            done: keys(&["a", "c", "d", "e"]),
            ..S3Position::default()
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
    fn lines_keep_their_offsets_across_chunks() {
        let mut s = LineSplitter::new(100);
        s.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(
            s.next_line(false),
            Some(Line {
                offset: 100,
                end: 109,
                bytes: b"{\"a\":1}".to_vec(),
                truncated: false
            })
        );
        assert_eq!(s.next_line(false), None);
        s.push(b":2}\n\n{\"c\":3}");
        assert_eq!(
            s.next_line(false).map(|l| (l.offset, l.bytes)),
            Some((109, b"{\"b\":2}".to_vec()))
        );
        assert_eq!(
            s.next_line(false),
            None,
            "blank line skipped, last line incomplete"
        );
        assert_eq!(
            s.next_line(true).map(|l| (l.offset, l.end)),
            Some((118, 125))
        );
    }

    #[test]
    fn over_long_lines_are_cut_and_skipped() {
        let mut s = LineSplitter::new(0);
        s.push(&vec![b'x'; MAX_LINE_BYTES + 10]);
        let l = s.next_line(false).unwrap();
        assert!(l.truncated && l.bytes.len() == 64 * 1024);
        s.push(b"yyy\n{\"ok\":1}\n");
        let next = s.next_line(false).unwrap();
        assert_eq!(
            (next.bytes.as_slice(), next.offset),
            (b"{\"ok\":1}".as_slice(), MAX_LINE_BYTES as u64 + 14)
        );
        assert!(s.is_empty());
    }

    #[test]
    fn csv_rows_become_objects_and_quoted_newlines_join() {
        assert!(!csv_complete(b"1,\"multi"));
        assert!(csv_complete(b"1,\"multi\nline\""));
        let h = csv_fields(b"id,note").unwrap();
        let f = csv_fields(b"1,\"multi\nline, with comma\"").unwrap();
        assert_eq!(
            csv_row(&h, &f),
            Payload::Json(r#"{"id":"1","note":"multi\nline, with comma"}"#.into())
        );
        assert!(matches!(
            csv_row(&h, &["1".into()]),
            Payload::Unparseable { .. }
        ));
    }

    #[test]
    fn json_documents_yield_objects() {
        assert_eq!(json_document(br#"[{"a":1},{"b":2}]"#).len(), 2);
        assert!(matches!(
            json_document(br#"[1]"#)[0],
            Payload::Unparseable { .. }
        ));
        assert_eq!(
            json_document(br#"{"a":1}"#),
            vec![Payload::Json(r#"{"a":1}"#.into())]
        );
        assert!(matches!(
            json_document(b"{oops")[0],
            Payload::Unparseable { .. }
        ));
    }

    #[test]
    fn positions_round_trip() {
        let p = S3Position {
            done_through: None,
            done: ["a.jsonl".to_string()].into(),
            current: Some(CurrentObject {
                key: "b.csv".into(),
                offset: 42,
                header: Some(vec!["id".into()]),
            }),
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"done": ["a.jsonl"], "current": {"key": "b.csv", "offset": 42, "header": ["id"]}})
        );
        assert_eq!(S3Position::from_value(Some(&v)).unwrap(), p);
        assert_eq!(p.watermark(), "1 objects done; reading b.csv at 42");
    }
}
