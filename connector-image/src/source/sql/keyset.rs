//! Cursor and keyset reading: the position per table (last delivered cursor and tie-breaker), page
//! reads that complete tie groups, and streaming queries whose rows arrive while earlier batches
//! are delivered.

use std::collections::BTreeMap;

use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::mpsc;

use super::{
    Dialect, Pool, SqlSource,
    mysql::decode_row,
    plan::{Page, RawRow, TablePlan, split_page},
    postgres::CopyRows,
};
use crate::{
    envelope::{Payload, event_id},
    error::{Error, Result, from_sqlx},
    source::Record,
};

/// Position reached in one table: the last delivered row's cursor and tie-breaker, as text the
/// database casts back to the column type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TablePosition {
    pub cursor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_breaker: Option<String>,
}

/// The position of a SQL source: per configured table name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SqlPosition {
    pub tables: BTreeMap<String, TablePosition>,
}

impl SqlPosition {
    pub fn from_value(v: Option<&serde_json::Value>) -> Result<SqlPosition> {
        match v {
            None => Ok(SqlPosition::default()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::State(format!("saved position is not a SQL position: {e}"))),
        }
    }

    pub fn watermark(&self) -> Option<String> {
        if self.tables.is_empty() {
            return None;
        }
        Some(
            self.tables
                .iter()
                .map(|(t, p)| match &p.tie_breaker {
                    Some(tb) => format!("{t}: ({}, {tb})", p.cursor),
                    None => format!("{t}: {}", p.cursor),
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// Rows sent at once from the query task to the reader (fewer channel messages than one per row).
const ROW_CHUNK: usize = 256;

/// Records of a streaming query, and the position of the last of them.
#[derive(Debug)]
struct StreamChunk {
    records: Vec<Record>,
    last: TablePosition,
}

/// Turns a streaming query's rows into records where they are read (the query task), keeping only
/// the last row's position: no per-row copies of cursor and tie-breaker. Chunks end on batch
/// boundaries, so the reader never has to split one.
struct ChunkBuilder {
    instance: String,
    table: String,
    batch_size: usize,
    /// Rows since the last batch boundary.
    in_batch: usize,
    records: Vec<Record>,
    cursor: String,
    tie_breaker: Option<String>,
}

impl ChunkBuilder {
    fn new(instance: &str, table: &str, batch_size: usize) -> ChunkBuilder {
        ChunkBuilder {
            instance: instance.to_string(),
            table: table.to_string(),
            batch_size,
            in_batch: 0,
            records: Vec::with_capacity(ROW_CHUNK),
            cursor: String::new(),
            tie_breaker: None,
        }
    }

    /// Adds a row; its id is the one [`SqlSource::advance`] would give it.
    fn add(&mut self, json: String, cursor: Option<&str>, tb: Option<&str>) -> Result<()> {
        let c =
            cursor.ok_or_else(|| Error::Schema(format!("{}: cursor value is NULL", self.table)))?;
        let id = match tb {
            Some(tb) => event_id(&self.instance, &[&self.table, c, tb]),
            None => event_id(&self.instance, &[&self.table, c, &json]),
        };
        self.cursor.clear();
        self.cursor.push_str(c);
        match (&mut self.tie_breaker, tb) {
            (Some(t), Some(tb)) => {
                t.clear();
                t.push_str(tb);
            }
            (t, tb) => *t = tb.map(str::to_string),
        }
        self.records.push(Record {
            id,
            payload: Payload::Json(json),
        });
        self.in_batch += 1;
        Ok(())
    }

    /// Whether the chunk should go now: big enough, or at a batch boundary.
    fn full(&self) -> bool {
        self.records.len() >= ROW_CHUNK || self.in_batch >= self.batch_size
    }

    fn take(&mut self) -> Option<StreamChunk> {
        if self.records.is_empty() {
            return None;
        }
        if self.in_batch >= self.batch_size {
            self.in_batch = 0;
        }
        Some(StreamChunk {
            records: std::mem::replace(&mut self.records, Vec::with_capacity(ROW_CHUNK)),
            last: TablePosition {
                cursor: self.cursor.clone(),
                tie_breaker: self.tie_breaker.clone(),
            },
        })
    }
}

/// Rows per streaming query: bounds how long one query (and its snapshot) stays open.
pub const STREAM_ROWS: usize = 1_000_000;

/// A keyset query whose rows stream in while earlier batches are being delivered, so the database
/// produces continuously (like `COPY`) instead of one page per round trip.
pub(super) struct RowStream {
    table: usize,
    rx: mpsc::Receiver<Result<StreamChunk>>,
    received: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RowStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends what `chunk` gathered; false when the reader is gone.
async fn flush(tx: &mpsc::Sender<Result<StreamChunk>>, chunk: &mut ChunkBuilder) -> bool {
    match chunk.take() {
        Some(c) => tx.send(Ok(c)).await.is_ok(),
        None => true,
    }
}

/// Drives a query's result stream into chunks for the reader: what is gathered is handed over
/// whenever the database has nothing more yet or a chunk is full. `step` adds one item's rows
/// (`None`: the stream ended) and says whether to go on; its error ends the stream after what
/// came before it.
async fn pump<T>(
    mut stream: futures::stream::BoxStream<'_, T>,
    tx: &mpsc::Sender<Result<StreamChunk>>,
    chunk: &mut ChunkBuilder,
    mut step: impl FnMut(Option<T>, &mut ChunkBuilder) -> Result<bool>,
) {
    loop {
        let next = match stream.next().now_or_never() {
            Some(n) => n,
            None => {
                if !flush(tx, chunk).await {
                    return;
                }
                stream.next().await
            }
        };
        match step(next, chunk) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                if flush(tx, chunk).await {
                    let _ = tx.send(Err(e)).await;
                }
                return;
            }
        }
        if chunk.full() && !flush(tx, chunk).await {
            return;
        }
    }
    flush(tx, chunk).await;
}

impl SqlSource {
    async fn fetch(&self, plan: &TablePlan, page: Page) -> Result<Vec<RawRow>> {
        let pos = self.position.tables.get(&plan.name);
        match &self.pool {
            // The page as a binary COPY rendered here, as the streaming reads are: the same JSON
            // at less than half the database's cost.
            Pool::Pg(p) => {
                use sqlx::postgres::PgPoolCopyExt;
                let sql = plan.copy_query(page, self.batch_size, pos);
                let mut stream = p.copy_out_raw(&sql).await.map_err(from_sqlx)?;
                let mut parser = CopyRows::of_plan(plan);
                let mut rows = Vec::new();
                while let Some(chunk) = stream.next().await {
                    parser.push(&chunk.map_err(from_sqlx)?, &mut rows)?;
                }
                parser.end().map(|()| rows)
            }
            Pool::My(p) => {
                let mut q = sqlx::query(AssertSqlSafe(plan.query(page, self.batch_size)));
                for b in plan.binds(page, pos) {
                    q = q.bind(b);
                }
                let rows = q.fetch_all(p).await.map_err(from_sqlx)?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0).map_err(from_sqlx)?,
                            r.try_get(1).map_err(from_sqlx)?,
                            r.try_get(2).map_err(from_sqlx)?,
                        ))
                    })
                    .collect()
            }
        }
    }

    /// Next page of one table, tie groups completed; empty when caught up.
    pub(super) async fn read_table(&mut self, i: usize) -> Result<Vec<Record>> {
        let plan = self.plans[i].clone();
        let page = if self.position.tables.contains_key(&plan.name) {
            Page::After
        } else {
            Page::First
        };
        let rows = self.fetch(&plan, page).await?;
        let full = rows.len() >= self.batch_size;
        let (mut rows, tie) = split_page(rows, full, plan.tie_breaker.is_some());
        if let Some(cursor) = tie {
            let saved = self.position.tables.insert(
                plan.name.clone(),
                TablePosition {
                    cursor,
                    tie_breaker: None,
                },
            );
            let group = self.fetch(&plan, Page::TieGroup).await;
            match saved {
                Some(s) => self.position.tables.insert(plan.name.clone(), s),
                None => self.position.tables.remove(&plan.name),
            };
            rows.extend(group?);
        }
        self.advance(&plan.name, rows)
    }

    /// Moves the table's position to the last row and turns rows into records.
    fn advance(&mut self, table: &str, rows: Vec<RawRow>) -> Result<Vec<Record>> {
        let Some(last) = rows.last() else {
            return Ok(Vec::new());
        };
        let cursor = last
            .1
            .clone()
            .ok_or_else(|| Error::Schema(format!("{table}: cursor value is NULL")))?;
        self.position.tables.insert(
            table.to_string(),
            TablePosition {
                cursor,
                tie_breaker: last.2.clone(),
            },
        );
        Ok(rows
            .into_iter()
            .map(|(json, c, tb)| {
                let c = c.unwrap_or_default();
                let id = match &tb {
                    Some(tb) => event_id(&self.instance, &[table, &c, tb]),
                    // Without a tie-breaker the row itself disambiguates rows sharing a cursor value.
                    None => event_id(&self.instance, &[table, &c, &json]),
                };
                Record {
                    id,
                    payload: Payload::Json(json),
                }
            })
            .collect())
    }

    /// Starts streaming table `i` from its position.
    fn start_stream(&self, i: usize) -> RowStream {
        let plan = &self.plans[i];
        let pos = self.position.tables.get(&plan.name);
        let page = if pos.is_some() {
            Page::After
        } else {
            Page::First
        };
        let sql = match plan.dialect {
            Dialect::Postgres => plan.copy_query(page, STREAM_ROWS, pos),
            Dialect::MySql => plan.query(page, STREAM_ROWS),
        };
        let binds = plan.binds(page, pos);
        let (tx, rx) = mpsc::channel((self.batch_size.clamp(1, 2_000) / ROW_CHUNK).max(1));
        let pool = self.pool.clone();
        let mut chunk = ChunkBuilder::new(&self.instance, &plan.name, self.batch_size);
        let mut parser = CopyRows::of_plan(plan);
        let task = tokio::spawn(async move {
            match pool {
                Pool::Pg(p) => {
                    use sqlx::postgres::PgPoolCopyExt;
                    let stream = match p.copy_out_raw(&sql).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(from_sqlx(e))).await;
                            return;
                        }
                    };
                    pump(stream, &tx, &mut chunk, |next, chunk| match next {
                        Some(Ok(bytes)) => parser
                            .push_with(&bytes, |(json, c, tb)| chunk.add(json.to_string(), c, tb))
                            .map(|()| true),
                        Some(Err(e)) => Err(from_sqlx(e)),
                        None => parser.end().map(|()| false),
                    })
                    .await;
                }
                Pool::My(p) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    pump(q.fetch(&p), &tx, &mut chunk, |next, chunk| match next {
                        Some(r) => r
                            .map_err(from_sqlx)
                            .and_then(|r| decode_row(&r))
                            .and_then(|(json, c, tb)| chunk.add(json, c.as_deref(), tb.as_deref()))
                            .map(|()| true),
                        None => Ok(false),
                    })
                    .await;
                }
            }
        });
        RowStream {
            table: i,
            rx,
            received: 0,
            task,
        }
    }

    /// Next batch of a table with a tie-breaker, from its streaming query; empty when caught up.
    /// Chunks end on batch boundaries, so whole chunks make exactly `batchSize` records.
    pub(super) async fn read_streamed(&mut self, i: usize) -> Result<Vec<Record>> {
        let mut records: Vec<Record> = Vec::new();
        let mut last: Option<TablePosition> = None;
        while records.len() < self.batch_size {
            if self.stream.as_ref().map(|s| s.table) != Some(i) {
                self.stream = Some(self.start_stream(i));
            }
            let st = self.stream.as_mut().expect("a stream was just started");
            match st.rx.recv().await {
                Some(Ok(c)) => {
                    st.received += c.records.len();
                    if records.is_empty() {
                        records = c.records;
                        records.reserve(self.batch_size.min(10_000).saturating_sub(records.len()));
                    } else {
                        records.extend(c.records);
                    }
                    last = Some(c.last);
                }
                Some(Err(e)) => {
                    self.stream = None;
                    return Err(e);
                }
                None => {
                    // The query ended: at its row limit, go on with a fresh one; else caught up.
                    let more = st.received >= STREAM_ROWS;
                    self.stream = None;
                    if !more || !records.is_empty() {
                        break;
                    }
                }
            }
        }
        if let Some(last) = last {
            self.position
                .tables
                .insert(self.plans[i].name.clone(), last);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_state_json() {
        let mut p = SqlPosition::default();
        p.tables.insert(
            "public.orders".into(),
            TablePosition {
                cursor: "2024-01-01 00:00:00+00".into(),
                tie_breaker: Some("42".into()),
            },
        );
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tables": {"public.orders": {"cursor": "2024-01-01 00:00:00+00", "tieBreaker": "42"}}})
        );
        assert_eq!(SqlPosition::from_value(Some(&v)).unwrap(), p);
        assert_eq!(
            p.watermark().unwrap(),
            "public.orders: (2024-01-01 00:00:00+00, 42)"
        );
        assert!(SqlPosition::from_value(Some(&serde_json::json!({"offsets": 1}))).is_err());
    }

    #[test]
    fn streamed_chunks_end_on_batch_boundaries_and_carry_the_last_position() {
        let mut b = ChunkBuilder::new("ns/c", "public.t", 300);
        let mut chunks = Vec::new();
        for i in 0..700 {
            b.add(format!("{{\"i\":{i}}}"), Some(&i.to_string()), Some("x"))
                .unwrap();
            if b.full() {
                chunks.extend(b.take());
            }
        }
        chunks.extend(b.take());
        let sizes: Vec<usize> = chunks.iter().map(|c| c.records.len()).collect();
        assert_eq!(sizes, [256, 44, 256, 44, 100]);
        let last = chunks.last().unwrap();
        assert_eq!(
            last.last,
            TablePosition {
                cursor: "699".into(),
                tie_breaker: Some("x".into())
            }
        );
        // The same id the page path gives the row.
        assert_eq!(
            last.records.last().unwrap().id,
            event_id("ns/c", &["public.t", "699", "x"])
        );
        assert!(b.add("{}".into(), None, Some("x")).is_err(), "NULL cursor");
    }
}
