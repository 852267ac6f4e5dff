//! Format decoders every object store reuses: JSON documents, JSON lines, CSV and Parquet, each
//! behind optional gzip, zstd or snappy compression.
//!
//! [`decode`] runs on a blocking thread over a synchronous reader of the object's bytes and hands
//! records out in bounded chunks, so a file of any size is never held whole (JSON documents up to
//! [`json::MAX_JSON_DOCUMENT_BYTES`] excepted; Parquet is staged in an anonymous temp file because
//! its footer comes first). Each chunk carries the [`Resume`] point after its last record.
//!
//! Failures are told apart: the store failing to deliver bytes is a [`Transport`] error (the
//! connector retries and resumes), while content that cannot be decoded (a truncated gzip stream,
//! a corrupt Parquet file) ends the object with one [`Event::Unreadable`] after the records read
//! before it: the object is reported once in the failed topic and skipped.

pub mod compression;
pub mod csv;
pub mod json;
pub mod lines;
pub mod parquet;

use std::{
    io::{BufReader, Read, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use obsrv_crds::{ObjectCompression, ObjectFormat};
use serde::{Deserialize, Serialize};

use crate::envelope::{Payload, validate_owned};
use compression::Codec;
use lines::{LineSplitter, MAX_LINE_BYTES};
use parquet::{ParquetRows, RowOutcome};

/// Records per chunk.
pub const BATCH_RECORDS: usize = 5_000;
/// Payload bytes per chunk (bounds memory with large records).
pub const BATCH_BYTES: usize = 4 << 20;
/// Bytes read from the object at a time.
const READ_CHUNK: usize = 256 << 10;

/// How the objects of a source are decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoding {
    pub format: ObjectFormat,
    pub compression: ObjectCompression,
    pub csv: csv::Dialect,
}

/// Where reading an object starts or resumes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    /// Byte offset of the first unread record in the decompressed bytes (JSON documents: index of
    /// the first unread element; Parquet: index of the first unread row).
    pub offset: u64,
    /// Lines (elements, rows) before `offset`, so messages name the right line after a resume.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub line: u64,
    /// CSV header, so a resumed read does not need the first line again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Vec<String>>,
    /// The codec found at the start, so a resume knows whether it may start mid-object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<Codec>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Decoding {
    /// The codec of `key` when known before reading it (from the spec, the key, or a resume).
    pub fn known_codec(&self, key: &str, resume: &Resume) -> Option<Codec> {
        resume.codec.or_else(|| Codec::named(self.compression, key))
    }

    /// Where in the stored bytes reading may start: at the resume offset for uncompressed line
    /// formats (a ranged GET), else at 0 (the decoder skips what was read).
    pub fn start_byte(&self, key: &str, resume: &Resume) -> u64 {
        let lines = matches!(self.format, ObjectFormat::JsonLines | ObjectFormat::Csv);
        if lines && self.known_codec(key, resume) == Some(Codec::None) {
            resume.offset
        } else {
            0
        }
    }
}

/// One decoded record: its position in the object (for its event id) and its payload.
#[derive(Debug, PartialEq)]
pub struct Item {
    pub at: u64,
    pub payload: Payload,
}

/// What [`decode`] hands out.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// Records, where to resume after them, and whether the object ends here.
    Records {
        items: Vec<Item>,
        resume: Resume,
        last: bool,
    },
    /// The object's content cannot be decoded past `resume`: why (records before it were handed
    /// out). Nothing follows.
    Unreadable { reason: String, resume: Resume },
}

/// The store failed to deliver the object's bytes (as opposed to content that cannot be decoded).
#[derive(Debug)]
pub struct Transport(pub std::io::Error);

/// A reader that remembers whether an error came from it (the store) rather than a decoder.
struct Tap<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| {
            self.failed.store(true, Ordering::SeqCst);
        })
    }
}

/// Decodes an object. `input` holds its stored bytes from [`Decoding::start_byte`] on; `url`
/// names it in messages; `emit` gets each chunk and returns false to stop early.
pub fn decode(
    input: impl Read + Send,
    d: &Decoding,
    key: &str,
    url: &str,
    start: Resume,
    mut emit: impl FnMut(Event) -> bool,
) -> Result<(), Transport> {
    let failed = Arc::new(AtomicBool::new(false));
    let from_byte = d.start_byte(key, &start);
    let tap = Tap {
        inner: input,
        failed: failed.clone(),
    };
    let mut out = Out {
        items: Vec::new(),
        bytes: 0,
        emit: &mut emit,
        stopped: false,
    };
    let res = (|| -> std::io::Result<Resume> {
        let (codec, whole) = match d.known_codec(key, &start) {
            Some(c) => (c, Box::new(tap) as Box<dyn Read + Send>),
            None => {
                let (c, whole) = compression::sniff_reader(tap)?;
                (c, Box::new(whole) as Box<dyn Read + Send>)
            }
        };
        let mut resume = Resume {
            codec: Some(codec),
            ..start.clone()
        };
        let mut reader = codec.reader(BufReader::with_capacity(READ_CHUNK, whole))?;
        match d.format {
            ObjectFormat::JsonLines | ObjectFormat::Csv => {
                if from_byte == 0 && start.offset > 0 {
                    // A compressed object resumes by decompressing again up to the offset.
                    std::io::copy(&mut (&mut reader).take(start.offset), &mut std::io::sink())
                        .map_err(|e| at(&resume, e))?;
                }
                lines_of(&mut reader, d, url, &mut resume, &mut out)?;
            }
            ObjectFormat::Json => document_of(&mut reader, url, &mut resume, &mut out)?,
            ObjectFormat::Parquet => parquet_of(&mut reader, &mut resume, &mut out)?,
        }
        Ok(resume)
    })();
    match res {
        Ok(resume) => {
            out.flush(resume, true);
            Ok(())
        }
        Err(e) if failed.load(Ordering::SeqCst) => Err(Transport(e)),
        Err(e) => {
            let resume = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<Failed>())
                .map(|f| f.resume.clone())
                .unwrap_or(start);
            out.flush(resume.clone(), false);
            let stopped = out.stopped;
            drop(out);
            if !stopped {
                emit(Event::Unreadable {
                    reason: format!(
                        "{url} cannot be decoded past {}: {}",
                        place(&resume, d.format),
                        root(&e)
                    ),
                    resume,
                });
            }
            Ok(())
        }
    }
}

/// A content error, with the resume point reached before it.
#[derive(Debug)]
struct Failed {
    resume: Resume,
    message: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failed {}

/// Tags a decoder's error with the resume point reached (the store's errors pass unchanged).
fn at(resume: &Resume, e: std::io::Error) -> std::io::Error {
    let message = e.to_string();
    std::io::Error::new(
        e.kind(),
        Failed {
            resume: resume.clone(),
            message,
        },
    )
}

fn root(e: &std::io::Error) -> String {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<Failed>())
        .map(|f| f.message.clone())
        .unwrap_or_else(|| e.to_string())
}

fn place(r: &Resume, format: ObjectFormat) -> String {
    match format {
        ObjectFormat::Parquet => format!("row {}", r.offset),
        ObjectFormat::Json => "its start".into(),
        _ => format!("line {} (byte {})", r.line, r.offset),
    }
}

/// Collects items and hands them out in chunks.
struct Out<'a, F: FnMut(Event) -> bool> {
    items: Vec<Item>,
    bytes: usize,
    emit: &'a mut F,
    stopped: bool,
}

impl<F: FnMut(Event) -> bool> Out<'_, F> {
    fn push(&mut self, at: u64, payload: Payload, resume: &Resume) -> std::io::Result<()> {
        self.bytes += payload.len();
        self.items.push(Item { at, payload });
        if self.items.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            self.flush(resume.clone(), false);
            if self.stopped {
                return Err(std::io::Error::other("stopped"));
            }
        }
        Ok(())
    }

    fn flush(&mut self, resume: Resume, last: bool) {
        if self.stopped || (self.items.is_empty() && !last) {
            return;
        }
        self.bytes = 0;
        let items = std::mem::take(&mut self.items);
        if !(self.emit)(Event::Records {
            items,
            resume,
            last,
        }) {
            self.stopped = true;
        }
    }
}

/// A record that cannot be ingested, its reason naming the file and line.
fn failed(url: &str, line: u64, raw: Vec<u8>, reason: &str) -> Payload {
    Payload::Unparseable {
        raw: String::from_utf8_lossy(&raw).into_owned(),
        reason: format!("{url} line {line}: {reason}"),
    }
}

/// `p`, its reason (when it cannot be ingested) prefixed with the file and the record's place.
fn located(p: Payload, url: &str, unit: &str, n: u64) -> Payload {
    match p {
        Payload::Unparseable { raw, reason } if !reason.starts_with(url) => Payload::Unparseable {
            raw,
            reason: format!("{url} {unit} {n}: {reason}"),
        },
        p => p,
    }
}

fn lines_of<F: FnMut(Event) -> bool>(
    reader: &mut impl Read,
    d: &Decoding,
    url: &str,
    resume: &mut Resume,
    out: &mut Out<'_, F>,
) -> std::io::Result<()> {
    let mut splitter = LineSplitter::new(resume.offset, resume.line);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut eof = false;
    let csv = d.format == ObjectFormat::Csv;
    let mut read_more = |splitter: &mut LineSplitter, eof: &mut bool, resume: &Resume| {
        match reader.read(&mut buf) {
            Ok(0) => *eof = true,
            Ok(n) => splitter.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(at(resume, e)),
        }
        Ok(())
    };
    loop {
        let line = match splitter.next_line(eof) {
            Some(l) => l,
            None if eof => return Ok(()),
            None => {
                read_more(&mut splitter, &mut eof, resume)?;
                continue;
            }
        };
        let (number, offset, mut end, mut raw, truncated) = (
            line.number,
            line.offset,
            line.end,
            line.bytes,
            line.truncated,
        );
        let mut last_line = number;
        if csv {
            // A quoted field may hold newlines: join lines until the quotes balance.
            while !truncated && !d.csv.complete(&raw) {
                match splitter.next_line(eof) {
                    Some(more) => {
                        raw.push(b'\n');
                        raw.extend_from_slice(&more.bytes);
                        end = more.end;
                        last_line = more.number;
                    }
                    None if eof => break,
                    None => read_more(&mut splitter, &mut eof, resume)?,
                }
            }
        }
        resume.offset = end;
        resume.line = last_line;
        let payload = if truncated {
            failed(
                url,
                number,
                raw,
                &format!("line longer than {MAX_LINE_BYTES} bytes"),
            )
        } else if csv {
            let Some(fields) = d.csv.fields(&raw) else {
                out.push(offset, failed(url, number, raw, "invalid CSV"), resume)?;
                continue;
            };
            match &resume.header {
                None if d.csv.header => {
                    resume.header = Some(fields);
                    continue;
                }
                None => csv::row(&csv::numbered_columns(fields.len()), &fields),
                Some(h) => csv::row(h, &fields),
            }
        } else {
            validate_owned(raw)
        };
        out.push(offset, located(payload, url, "line", number), resume)?;
    }
}

fn document_of<F: FnMut(Event) -> bool>(
    reader: &mut impl Read,
    url: &str,
    resume: &mut Resume,
    out: &mut Out<'_, F>,
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    let cap = json::MAX_JSON_DOCUMENT_BYTES as u64;
    reader
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| at(resume, e))?;
    let items = if bytes.len() as u64 > cap {
        bytes.truncate(64 * 1024);
        vec![Payload::Unparseable {
            raw: String::from_utf8_lossy(&bytes).into_owned(),
            reason: format!(
                "{url}: JSON document larger than {} bytes: use jsonLines",
                json::MAX_JSON_DOCUMENT_BYTES
            ),
        }]
    } else {
        json::document(&bytes)
    };
    drop(bytes);
    let first = resume.offset;
    for (i, p) in items.into_iter().enumerate().skip(first as usize) {
        let p = located(p, url, "element", i as u64);
        resume.offset = i as u64 + 1;
        resume.line = resume.offset;
        out.push(i as u64, p, resume)?;
    }
    Ok(())
}

fn parquet_of<F: FnMut(Event) -> bool>(
    reader: &mut impl Read,
    resume: &mut Resume,
    out: &mut Out<'_, F>,
) -> std::io::Result<()> {
    // Parquet needs random access (its footer first): stage the object in an anonymous temp file.
    let mut file = tempfile::tempfile()?;
    std::io::copy(reader, &mut file).map_err(|e| at(resume, e))?;
    file.flush()?;
    let mut rows = ParquetRows::open(file, resume.offset);
    loop {
        match rows.next_row() {
            Some(RowOutcome::Row(i, json)) => {
                resume.offset = i + 1;
                resume.line = resume.offset;
                out.push(i, Payload::Json(json), resume)?;
            }
            Some(RowOutcome::Failed(i, reason)) => {
                return Err(at(
                    &Resume {
                        offset: i,
                        ..resume.clone()
                    },
                    std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
                ));
            }
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use compression::{Codec, compress};

    fn decoding(format: ObjectFormat) -> Decoding {
        Decoding {
            format,
            compression: ObjectCompression::Auto,
            csv: csv::Dialect::default(),
        }
    }

    /// Every event of decoding `body` as `key`, from `start`.
    fn run(d: &Decoding, key: &str, body: &[u8], start: Resume) -> Vec<Event> {
        let from = d.start_byte(key, &start) as usize;
        let mut events = Vec::new();
        decode(&body[from..], d, key, "s3://b/k", start, |e| {
            events.push(e);
            true
        })
        .unwrap();
        events
    }

    fn payloads(events: &[Event]) -> Vec<&Payload> {
        events
            .iter()
            .flat_map(|e| match e {
                Event::Records { items, .. } => items.iter().map(|i| &i.payload).collect(),
                Event::Unreadable { .. } => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn json_lines_in_every_codec_resume_at_the_same_record() {
        let text: String = (0..12_000).map(|i| format!("{{\"i\":{i}}}\n")).collect();
        for codec in [Codec::None, Codec::Gzip, Codec::Zstd, Codec::Snappy] {
            let body = compress(codec, text.as_bytes());
            let d = decoding(ObjectFormat::JsonLines);
            // No extension: the codec is told by content.
            let events = run(&d, "in/x", &body, Resume::default());
            assert_eq!(payloads(&events).len(), 12_000, "{codec:?}");
            let Event::Records {
                resume,
                last: false,
                ..
            } = &events[0]
            else {
                panic!("{codec:?}: first chunk {:?}", events.first().map(|_| ()))
            };
            assert_eq!(resume.codec, Some(codec));
            assert_eq!(resume.line, BATCH_RECORDS as u64);
            let rest = run(&d, "in/x", &body, resume.clone());
            let again = payloads(&rest);
            assert_eq!(again.len(), 12_000 - BATCH_RECORDS, "{codec:?}");
            assert_eq!(
                again[0],
                &Payload::Json(format!("{{\"i\":{BATCH_RECORDS}}}")),
                "{codec:?} resumed at the next record"
            );
            assert!(matches!(
                rest.last(),
                Some(Event::Records { last: true, .. })
            ));
        }
    }

    #[test]
    fn a_bad_line_is_named_by_file_and_line() {
        let d = decoding(ObjectFormat::JsonLines);
        let events = run(&d, "a.jsonl", b"{\"a\":1}\n\nnot json\n", Resume::default());
        match payloads(&events)[1] {
            Payload::Unparseable { raw, reason } => {
                assert_eq!(raw, "not json");
                assert!(reason.starts_with("s3://b/k line 3: "), "{reason}");
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_truncated_gzip_file_keeps_its_records_and_is_reported_once() {
        let text: String = (0..50_000).map(|i| format!("{{\"i\":{i}}}\n")).collect();
        let body = compress(Codec::Gzip, text.as_bytes());
        let cut = &body[..body.len() * 3 / 4];
        let d = decoding(ObjectFormat::JsonLines);
        let events = run(&d, "a.jsonl.gz", cut, Resume::default());
        let n = payloads(&events).len();
        assert!(n > 10_000 && n < 50_000, "records before the cut: {n}");
        let unreadable: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Unreadable { reason, resume } => Some((reason, resume)),
                _ => None,
            })
            .collect();
        assert_eq!(unreadable.len(), 1);
        assert!(
            unreadable[0].0.contains("s3://b/k cannot be decoded"),
            "{}",
            unreadable[0].0
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::Records { last: true, .. }))
        );
    }

    #[test]
    fn csv_with_a_dialect_and_without_header() {
        let d = Decoding {
            csv: csv::Dialect {
                header: false,
                delimiter: b';',
                quote: b'\'',
            },
            ..decoding(ObjectFormat::Csv)
        };
        let events = run(&d, "x.csv", b"1;'a;\nb'\n2;c\n", Resume::default());
        assert_eq!(
            payloads(&events),
            [
                &Payload::Json(r#"{"col1":"1","col2":"a;\nb"}"#.into()),
                &Payload::Json(r#"{"col1":"2","col2":"c"}"#.into())
            ]
        );
        let with_header = decoding(ObjectFormat::Csv);
        let events = run(
            &with_header,
            "x.csv.zst",
            &compress(Codec::Zstd, b"id,v\n1,x\n1\n"),
            Resume::default(),
        );
        let p = payloads(&events);
        assert_eq!(p[0], &Payload::Json(r#"{"id":"1","v":"x"}"#.into()));
        assert!(matches!(p[1], Payload::Unparseable { reason, .. } if reason.contains("line 3")));
    }

    #[test]
    fn an_uncompressed_resume_starts_mid_object() {
        let d = decoding(ObjectFormat::JsonLines);
        let r = Resume {
            offset: 8,
            line: 1,
            codec: Some(Codec::None),
            header: None,
        };
        assert_eq!(d.start_byte("a.jsonl", &r), 8);
        assert_eq!(
            d.start_byte(
                "a.jsonl.gz",
                &Resume {
                    codec: Some(Codec::Gzip),
                    ..r.clone()
                }
            ),
            0
        );
        let events = run(&d, "a.jsonl", b"{\"a\":1}\n{\"a\":2}\n", r);
        let Event::Records { items, .. } = &events[0] else {
            panic!()
        };
        assert_eq!(items[0].at, 8, "ids keep the object offset");
    }
}
