//! `postgresCdc`: every insert, update, delete and truncate of the configured tables, from
//! Postgres's logical replication (`pgoutput`), after a snapshot that runs beside the stream.
//!
//! - Replication: [pgwire-replication](https://docs.rs/pgwire-replication) holds the session and
//!   sends standby status updates; its flush LSN is what [`PgCommitter`] sets, which the runner
//!   calls only after the sink acknowledged and the state topic stored everything up to it.
//!   `pg_walstream` decodes the `pgoutput` messages. TLS: [`bridge`].
//! - Position (state topic): the LSN up to which every commit is delivered, the snapshot's
//!   progress per table, and the snapshot epoch. A restart streams from there.
//! - A slot that is gone, or ahead of that LSN (re-created, moved by someone else), means changes
//!   may be missing: the connector says so (`StateError` in status, once), re-creates the slot
//!   and snapshots the tables again. Never a silent gap.
//! - Heartbeats (`pg_logical_emit_message`) and the server's keepalives move the position on an
//!   idle database, so the slot never holds WAL for nothing.
//! - Large transactions stream through with bounded memory: batches are cut mid-transaction;
//!   their position stays at the last whole transaction, so a restart replays the transaction
//!   (same event ids: LSN of its commit and the change's ordinal).

pub mod bridge;
pub mod catalog;
pub mod rows;
pub mod snapshot;
pub mod values;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::FutureExt;
use obsrv_crds::{
    PostgresCdcSourceSpec, SnapshotMode, TlsMode,
    source::cdc::{POSTGRES_CDC, default_slot_name},
};
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::watch;

use self::{
    bridge::TlsBridge,
    catalog::{HEARTBEAT_PREFIX, Table, WATERMARK_PREFIX, format_lsn, parse_lsn},
    rows::Relation,
    snapshot::{Chunk, ChunkRow, Mark, SnapshotProgress, parse_watermark, watermark},
};
use super::event::{Obj, Op, render};
use crate::{
    config::parse_duration,
    envelope::{Payload, event_id},
    error::{Error, Result},
    runner::now_ms,
    source::{
        Batch, CleanupContext, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory,
        sql::{Endpoint, Login, check_tls_ca},
    },
};

/// The `postgresCdc` kind: opens the stream, and drops the slot when the Connector is deleted.
pub fn factory() -> SourceFactory {
    SourceFactory::new(POSTGRES_CDC.name, open).with_cleanup(cleanup)
}

/// How long `next_batch` waits for a change before saying "nothing new" (the runner then commits
/// and polls again after `pollInterval`).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Events the replication client buffers ahead of us; beyond that TCP pushes back on the server.
const STREAM_BUFFER: usize = 1024;
/// Postgres's epoch (2000-01-01) in Unix milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// The position in the state topic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PgCdcPosition {
    /// Every transaction committed before this LSN is delivered (`16/B374D848`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// The snapshot's progress (`None`: no snapshot wanted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// Snapshots started so far minus one: a lost slot starts the next.
    #[serde(default)]
    pub epoch: u32,
}

impl PgCdcPosition {
    fn lsn(&self) -> Option<u64> {
        self.lsn.as_deref().and_then(parse_lsn)
    }
}

/// What the spec resolves to.
#[derive(Clone, Debug)]
struct Settings {
    slot: String,
    publication: String,
    mode: SnapshotMode,
    heartbeat: Duration,
    chunk: usize,
    batch: usize,
}

/// The transaction being streamed.
#[derive(Clone, Copy, Debug)]
struct Tx {
    final_lsn: u64,
    xid: u32,
    commit_ms: i64,
    seq: u32,
}

/// The open replication session.
struct Stream {
    client: ReplicationClient,
    bridge: Option<TlsBridge>,
}

pub struct PgCdcSource {
    instance: String,
    database: String,
    host: String,
    port: u16,
    tls_mode: TlsMode,
    login: Login,
    pool: PgPool,
    s: Settings,
    /// Captured tables by canonical name (`schema.table`), in the spec's order.
    tables: Vec<Table>,
    names: Vec<String>,
    pos: PgCdcPosition,
    /// `pos.lsn` as a number.
    lsn: u64,
    stream: Option<Stream>,
    started: bool,
    rels: HashMap<u32, Relation>,
    /// Relations of the publication that are not ours.
    foreign: HashSet<u32>,
    parser: LogicalReplicationParser,
    tx: Option<Tx>,
    chunk: Option<Chunk>,
    /// Chunk ids are `<run>-<n>`: unique across restarts.
    run: String,
    chunks: u64,
    /// A lost slot: first a batch that stores the new position, then the error that reports it.
    gap_batch: Option<Batch>,
    gap_report: Option<String>,
    last_heartbeat: Instant,
    applied: watch::Sender<u64>,
    applied_rx: watch::Receiver<u64>,
    /// Server time (Unix ms) of the newest commit or keepalive processed: lag in seconds.
    seen_ms: Arc<AtomicI64>,
}

async fn open(ctx: OpenContext) -> Result<PgCdcSource> {
    let spec: &PostgresCdcSourceSpec =
        crate::source::spec_of(&ctx.config, "postgresCdc", |s| s.postgres_cdc.as_ref())?;
    let endpoint = endpoint(spec);
    check_tls_ca(&ctx.secrets, spec.tls.as_ref())?;
    let login = Login::from_secrets(&ctx.secrets);
    let pool = crate::source::sql::postgres::pool(&endpoint, &login, 3).await?;
    let at = format!("{}:{}", spec.host, endpoint.port_or(5432));
    let tables = catalog::preflight(&pool, &spec.tables, &at).await?;
    let slot = spec
        .slot_name
        .clone()
        .unwrap_or_else(|| default_slot_name(&ctx.config.namespace, &ctx.config.name));
    let s = Settings {
        publication: spec
            .publication_name
            .clone()
            .unwrap_or_else(|| slot.clone()),
        slot,
        mode: spec.snapshot,
        heartbeat: parse_duration(&spec.heartbeat_interval)?,
        chunk: spec.snapshot_chunk_size.max(1) as usize,
        batch: spec.batch_size.max(1) as usize,
    };
    let pos: PgCdcPosition = match &ctx.position {
        None => PgCdcPosition::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            Error::State(format!("saved position is not a postgresCdc position: {e}"))
        })?,
    };
    let (applied, applied_rx) = watch::channel(pos.lsn().unwrap_or(0));
    let names = tables.iter().map(|t| t.name.clone()).collect();
    Ok(PgCdcSource {
        instance: ctx.instance(),
        database: spec.database.clone(),
        host: spec.host.clone(),
        port: endpoint.port_or(5432),
        tls_mode: endpoint.tls_mode(),
        login,
        pool,
        s,
        tables,
        names,
        lsn: pos.lsn().unwrap_or(0),
        pos,
        stream: None,
        started: false,
        rels: HashMap::new(),
        foreign: HashSet::new(),
        parser: LogicalReplicationParser::with_protocol_version(1),
        tx: None,
        chunk: None,
        run: format!("{:x}{:x}", now_ms(), std::process::id()),
        chunks: 0,
        gap_batch: None,
        gap_report: None,
        last_heartbeat: Instant::now(),
        applied,
        applied_rx,
        seen_ms: Arc::new(AtomicI64::new(now_ms())),
    })
}

fn endpoint(spec: &PostgresCdcSourceSpec) -> Endpoint<'_> {
    Endpoint {
        host: &spec.host,
        port: spec.port,
        database: &spec.database,
        tls: spec.tls.as_ref(),
    }
}

/// Drops the slot (ending the session still holding it) and the publication the connector
/// created; the position stays in the state topic, so a Connector re-created under the same name
/// finds its slot gone and snapshots again instead of skipping what changed meanwhile.
async fn cleanup(ctx: CleanupContext) -> Result<String> {
    let spec = crate::source::spec_of(&ctx.config, "postgresCdc", |s| s.postgres_cdc.as_ref())?;
    let login = Login::from_secrets(&ctx.secrets);
    let pool = crate::source::sql::postgres::pool(&endpoint(spec), &login, 1).await?;
    let slot = spec
        .slot_name
        .clone()
        .unwrap_or_else(|| default_slot_name(&ctx.config.namespace, &ctx.config.name));
    let dropped = catalog::drop_slot(&pool, &slot, Duration::from_secs(30)).await?;
    let mut done = if dropped {
        format!("dropped replication slot {slot}")
    } else {
        format!("replication slot {slot} did not exist")
    };
    if spec.publication_name.is_none() {
        catalog::drop_publication(&pool, &slot).await?;
        done.push_str(&format!(", dropped publication {slot}"));
    }
    Ok(done)
}

/// Confirms the flush LSN to the server once the runner committed a position.
struct PgCommitter {
    applied: watch::Sender<u64>,
}

impl SourceCommitter for PgCommitter {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let p: PgCdcPosition = serde_json::from_value(position.clone())
            .map_err(|e| Error::State(format!("position to commit: {e}")))?;
        if let Some(lsn) = p.lsn() {
            self.applied.send_if_modified(|v| {
                let newer = lsn > *v;
                if newer {
                    *v = lsn;
                }
                newer
            });
        }
        Ok(())
    }
}

/// A replication-session error, in the runtime's reasons, naming the server and the slot.
fn stream_error(
    e: PgWireError,
    at: &str,
    slot: &str,
    user: &str,
    bridge: Option<&TlsBridge>,
) -> Error {
    let msg = e.to_string();
    if msg.contains("replication slot") && msg.contains("does not exist") {
        return Error::State(format!(
            "replication slot {slot} on {at} no longer exists (dropped by hand, or lost in a failover): the connector re-creates it and snapshots the tables again"
        ));
    }
    if msg.contains("is active for PID") {
        return Error::SourceUnreachable(format!(
            "replication slot {slot} on {at} is in use by another session ({msg}): is another connector using slotName {slot}?"
        ));
    }
    if msg.contains("replication role")
        || msg.contains("permission denied to start WAL sender")
        || msg.contains("REPLICATION attribute")
    {
        return catalog::missing_replication(user);
    }
    match e {
        PgWireError::Auth(m) => Error::AuthFailed(format!("{at}: {m}")),
        PgWireError::Server(m) if m.contains("28P01") || m.contains("28000") => {
            Error::AuthFailed(format!("{at}: {m}"))
        }
        PgWireError::Server(m) if m.contains("pg_hba.conf") => Error::AuthFailed(format!(
            "{at}: {m} (replication connections need their own pg_hba.conf line: host replication {user} ...)"
        )),
        other => match bridge.and_then(TlsBridge::last_error) {
            Some(why) => Error::SourceUnreachable(format!("{at}: {why}")),
            None => Error::SourceUnreachable(format!("{at}: replication session: {other}")),
        },
    }
}

impl PgCdcSource {
    fn at(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// First `next_batch`: publication and slot (created when missing), the check for a lost
    /// slot, then the replication session.
    async fn start(&mut self) -> Result<()> {
        if self.s.mode == SnapshotMode::InitialOnly {
            if self.pos.snapshot.is_none() {
                self.pos.snapshot = Some(SnapshotProgress::new(0, &self.names));
            }
            self.started = true;
            return Ok(());
        }
        catalog::ensure_publication(&self.pool, &self.s.publication, &self.tables).await?;
        let slot = catalog::slot(&self.pool, &self.s.slot).await?;
        if let Some(si) = &slot
            && (si.plugin != "pgoutput" || si.database != self.database)
        {
            return Err(Error::Config(format!(
                "replication slot {} on {} belongs to plugin {:?} on database {:?}, not pgoutput on {}: choose another slotName",
                self.s.slot,
                self.at(),
                si.plugin,
                si.database,
                self.database
            )));
        }
        let committed = self.pos.lsn();
        let (slot_lsn, gap) = match (slot, committed) {
            (None, None) => (catalog::create_slot(&self.pool, &self.s.slot).await?, None),
            (None, Some(c)) => (
                catalog::create_slot(&self.pool, &self.s.slot).await?,
                Some(format!(
                    "replication slot {} on {} no longer exists (dropped by hand, or lost in a failover): changes after {} may be missing",
                    self.s.slot,
                    self.at(),
                    format_lsn(c)
                )),
            ),
            (Some(si), Some(c)) if si.confirmed_flush.is_some_and(|f| f > c) => (
                si.confirmed_flush.unwrap_or(c),
                Some(format!(
                    "replication slot {} on {} is ahead of the last delivered position ({} > {}): it was re-created or advanced by someone else, and changes in between may be missing",
                    self.s.slot,
                    self.at(),
                    format_lsn(si.confirmed_flush.unwrap_or(c)),
                    format_lsn(c)
                )),
            ),
            (Some(si), c) => (c.or(si.confirmed_flush).unwrap_or(0), None),
        };
        if committed.is_none() {
            self.pos.snapshot = (self.s.mode == SnapshotMode::Initial)
                .then(|| SnapshotProgress::new(self.pos.epoch, &self.names));
        }
        self.set_lsn(slot_lsn);
        if let Some(why) = gap {
            tracing::warn!(slot = %self.s.slot, "{why}");
            self.pos.epoch += 1;
            let again = self.s.mode == SnapshotMode::Initial;
            self.pos.snapshot = again.then(|| SnapshotProgress::new(self.pos.epoch, &self.names));
            let batch = self.batch(Vec::new())?;
            let what = if again {
                "the tables are being snapshotted again"
            } else {
                "snapshot is never, so nothing is read again"
            };
            self.gap_batch = Some(batch);
            self.gap_report = Some(format!("{why}; the slot was re-created and {what}"));
        }
        self.connect().await?;
        self.started = true;
        Ok(())
    }

    /// The replication session from `self.lsn`.
    async fn connect(&mut self) -> Result<()> {
        let bridge = match self.tls_mode {
            TlsMode::Disable => None,
            mode => Some(TlsBridge::start(
                &self.host,
                self.port,
                mode,
                self.login.ca.as_deref(),
            )?),
        };
        let host = match &bridge {
            Some(b) => b.socket_dir().to_string_lossy().into_owned(),
            None => self.host.clone(),
        };
        let cfg = ReplicationConfig::new(
            host,
            self.login.user.clone(),
            self.login.password.clone(),
            self.database.clone(),
            self.s.slot.clone(),
            self.s.publication.clone(),
        )
        .with_port(self.port)
        .with_start_lsn(Lsn::from_u64(self.lsn))
        .with_status_interval(Duration::from_secs(1))
        .with_buffer_size(STREAM_BUFFER)
        // Sessions in UTC, ISO dates: values decode as the snapshot's SQL session prints them.
        .with_options("-c TimeZone=UTC -c DateStyle=ISO")
        .with_application_name("obsrv-connector");
        let (at, slot, user) = (self.at(), self.s.slot.clone(), self.login.user.clone());
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| stream_error(e, &at, &slot, &user, bridge.as_ref()))?;
        client
            .wait_started()
            .await
            .map_err(|e| stream_error(e, &at, &slot, &user, bridge.as_ref()))?;
        tracing::info!(slot = %slot, lsn = %format_lsn(self.lsn), "replication started");
        self.rels.clear();
        self.foreign.clear();
        self.tx = None;
        self.parser = LogicalReplicationParser::with_protocol_version(1);
        self.stream = Some(Stream { client, bridge });
        Ok(())
    }

    fn set_lsn(&mut self, lsn: u64) {
        if lsn > self.lsn || self.pos.lsn.is_none() {
            self.lsn = lsn;
            self.pos.lsn = Some(format_lsn(lsn));
        }
    }

    /// A batch of `records` reaching the current position.
    fn batch(&self, records: Vec<Record>) -> Result<Batch> {
        let position = serde_json::to_value(&self.pos).map_err(|e| Error::State(e.to_string()))?;
        let mut watermark = match &self.pos.lsn {
            Some(l) => format!("lsn {l}"),
            None => String::new(),
        };
        if let Some(snap) = &self.pos.snapshot {
            if !watermark.is_empty() {
                watermark.push_str("; ");
            }
            watermark.push_str(&snap.describe(&self.names));
        }
        Ok(Batch {
            records,
            position,
            watermark: Some(watermark),
        })
    }

    fn source_block(&self, rel: &Relation, snapshot: bool, lsn: u64, tx: Option<&Tx>) -> String {
        let mut o = Obj::new();
        o.str(
            "version",
            concat!("obsrv-connector ", env!("CARGO_PKG_VERSION")),
        )
        .str("connector", "postgresql")
        .str("name", &self.instance)
        .int("ts_ms", tx.map_or_else(now_ms, |t| t.commit_ms))
        .str("snapshot", if snapshot { "true" } else { "false" })
        .str("db", &self.database)
        .str("schema", &rel.schema)
        .str("table", &rel.table);
        match tx {
            Some(t) => o.int("txId", i64::from(t.xid)),
            None => o.raw("txId", "null"),
        };
        o.int("lsn", lsn as i64);
        o.finish()
    }

    /// Sends a heartbeat into the WAL when one is due.
    async fn heartbeat(&mut self) -> Result<()> {
        if self.last_heartbeat.elapsed() >= self.s.heartbeat {
            self.last_heartbeat = Instant::now();
            catalog::emit_message(&self.pool, HEARTBEAT_PREFIX, &self.s.slot).await?;
        }
        Ok(())
    }

    /// Reads the next snapshot chunk between its watermarks, when the snapshot has one to read and
    /// none is waiting for its high watermark. Tables with nothing left are marked done at once.
    async fn read_chunk(&mut self, watermarks: bool) -> Result<Option<Chunk>> {
        loop {
            let Some(snap) = &self.pos.snapshot else {
                return Ok(None);
            };
            let Some(name) = snap.next_table(&self.names).map(str::to_string) else {
                return Ok(None);
            };
            let after = snap.after(&name).map(<[String]>::to_vec);
            // Read afresh: a column added mid-snapshot is in the next chunk.
            let table = catalog::table(&self.pool, &name).await?;
            if table.pk.is_empty() {
                return Err(Error::Schema(format!(
                    "table {name} has no primary key: the snapshot pages by primary key (add one, or use snapshot: never)"
                )));
            }
            self.chunks += 1;
            let id = format!("{}-{}", self.run, self.chunks);
            if watermarks {
                let low = watermark(&self.s.slot, &id, &Mark::Low);
                catalog::emit_message(&self.pool, WATERMARK_PREFIX, &low).await?;
            }
            let rows = catalog::chunk(&self.pool, &table, after.as_deref(), self.s.chunk).await?;
            if rows.is_empty() {
                let snap = self.pos.snapshot.as_mut().expect("checked above");
                snap.tables.entry(name).or_default().done = true;
                continue;
            }
            if watermarks {
                let high = watermark(&self.s.slot, &id, &Mark::High);
                catalog::emit_message(&self.pool, WATERMARK_PREFIX, &high).await?;
            }
            let rel = Relation::of_table(&table);
            let pk_idx: Vec<usize> = table
                .pk
                .iter()
                .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
                .collect();
            let last = rows.len() < self.s.chunk;
            let last_key = rows.last().map(|r| {
                pk_idx
                    .iter()
                    .map(|&i| r[i].clone().unwrap_or_default())
                    .collect()
            });
            let rows = rows
                .iter()
                .map(|r| ChunkRow {
                    key: rows::text_row_key(&rel, r).unwrap_or_default(),
                    row: rows::text_row_json(&rel, r),
                })
                .collect();
            return Ok(Some(Chunk::new(id, name, rows, last_key, last)));
        }
    }

    /// Turns a chunk's surviving rows into `op: r` records at the current position.
    fn chunk_records(&self, table: &str, rows: Vec<ChunkRow>, out: &mut Vec<Record>) {
        let Some(t) = self.tables.iter().find(|t| t.name == table) else {
            return;
        };
        let rel = Relation::of_table(t);
        let source = self.source_block(&rel, true, self.lsn, None);
        let epoch = self
            .pos
            .snapshot
            .as_ref()
            .map_or(0, |s| s.epoch)
            .to_string();
        let ts = now_ms();
        for r in rows {
            let json = render(&source, Op::Read, ts, None, Some(&r.row));
            let id = event_id(&self.instance, &["snapshot", &epoch, table, &r.key]);
            out.push(Record {
                id,
                payload: Payload::Keyed { json, key: r.key },
            });
        }
    }

    /// `initialOnly`: the snapshot alone, chunk after chunk, no slot.
    async fn snapshot_only(&mut self) -> Result<Option<Batch>> {
        let mut records = Vec::new();
        while records.len() < self.s.batch {
            let Some(chunk) = self.read_chunk(false).await? else {
                break;
            };
            let mut chunk = chunk;
            chunk.on_low();
            let table = chunk.table.clone();
            let (rows, progress) = chunk.on_high().expect("low marked");
            self.chunk_records(&table, rows, &mut records);
            if let Some(snap) = self.pos.snapshot.as_mut() {
                snap.tables.insert(table, progress);
            }
        }
        if records.is_empty() {
            return Ok(None);
        }
        self.batch(records).map(Some)
    }

    /// One stream event into records and position. Returns whether the position moved.
    fn on_event(&mut self, ev: ReplicationEvent, out: &mut Vec<Record>) -> Result<bool> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.tx = Some(Tx {
                    final_lsn: final_lsn.as_u64(),
                    xid,
                    commit_ms: PG_EPOCH_MS + commit_time_micros / 1000,
                    seq: 0,
                });
                Ok(false)
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.tx = None;
                self.seen_ms
                    .store(PG_EPOCH_MS + commit_time_micros / 1000, Ordering::Relaxed);
                self.set_lsn(end_lsn.as_u64());
                Ok(true)
            }
            ReplicationEvent::KeepAlive {
                wal_end,
                server_time_micros,
                ..
            } => {
                // Between transactions everything before the server's sent position is here.
                if self.tx.is_none() && wal_end.as_u64() > self.lsn {
                    self.seen_ms
                        .store(PG_EPOCH_MS + server_time_micros / 1000, Ordering::Relaxed);
                    self.set_lsn(wal_end.as_u64());
                    return Ok(true);
                }
                Ok(false)
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix == WATERMARK_PREFIX {
                    let text = String::from_utf8_lossy(&content);
                    if let Some((id, mark)) = parse_watermark(&self.s.slot, &text)
                        && self.chunk.as_ref().is_some_and(|c| c.id == id)
                    {
                        match mark {
                            Mark::Low => {
                                if let Some(c) = self.chunk.as_mut() {
                                    c.on_low();
                                }
                            }
                            Mark::High => {
                                let c = self.chunk.take().expect("checked above");
                                let table = c.table.clone();
                                // A high mark without its low (not expected): the chunk is read again.
                                if let Some((rows, progress)) = c.on_high() {
                                    if !transactional && self.tx.is_none() {
                                        self.set_lsn(lsn.as_u64());
                                    }
                                    self.chunk_records(&table, rows, out);
                                    if let Some(snap) = self.pos.snapshot.as_mut() {
                                        snap.tables.insert(table, progress);
                                    }
                                    return Ok(true);
                                }
                            }
                        }
                    }
                }
                if !transactional && self.tx.is_none() && lsn.as_u64() > self.lsn {
                    self.set_lsn(lsn.as_u64());
                    return Ok(true);
                }
                Ok(false)
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = self
                    .parser
                    .parse_wal_message(&data)
                    .map_err(|e| Error::SourceUnreachable(format!("pgoutput message: {e}")))?;
                self.on_change(msg.message, out);
                Ok(false)
            }
            ReplicationEvent::StoppedAt { .. } => Ok(false),
        }
    }

    fn on_change(&mut self, msg: LogicalReplicationMessage, out: &mut Vec<Record>) {
        use LogicalReplicationMessage as M;
        let (rel_id, op, old, new) = match msg {
            M::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let name = format!("{namespace}.{relation_name}");
                match self.tables.iter().find(|t| t.name == name) {
                    Some(t) => {
                        let cols = columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_id, c.is_key()))
                            .collect();
                        self.rels.insert(
                            relation_id,
                            Relation::new(&namespace, &relation_name, cols, &t.pk),
                        );
                        self.foreign.remove(&relation_id);
                    }
                    None => {
                        self.foreign.insert(relation_id);
                    }
                }
                return;
            }
            M::Insert { relation_id, tuple } => (relation_id, Op::Create, None, Some(tuple)),
            M::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } => (relation_id, Op::Update, old_tuple, Some(new_tuple)),
            M::Delete {
                relation_id,
                old_tuple,
                ..
            } => (relation_id, Op::Delete, Some(old_tuple), None),
            M::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    self.on_truncate(id, out);
                }
                return;
            }
            _ => return,
        };
        let Some(rel) = self.rels.get(&rel_id) else {
            return;
        };
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        tx.seq += 1;
        let tx = *tx;
        let before = old.as_ref().map(|t| rows::tuple_json(rel, t));
        let after = new.as_ref().map(|t| rows::tuple_json(rel, t));
        let key = new
            .as_ref()
            .and_then(|t| rows::tuple_key(rel, t))
            .or_else(|| old.as_ref().and_then(|t| rows::tuple_key(rel, t)));
        if let Some(chunk) = self.chunk.as_mut() {
            // A key change removes the old key from the chunk too.
            if let Some(k) = old.as_ref().and_then(|t| rows::tuple_key(rel, t)) {
                chunk.on_change(&rel.name, &k);
            }
            if let Some(k) = &key {
                chunk.on_change(&rel.name, k);
            }
        }
        let source = self.source_block(rel, false, tx.final_lsn, Some(&tx));
        let json = render(&source, op, now_ms(), before.as_deref(), after.as_deref());
        let id = event_id(
            &self.instance,
            &[&format_lsn(tx.final_lsn), &tx.seq.to_string()],
        );
        out.push(Record {
            id,
            payload: match key {
                Some(key) => Payload::Keyed { json, key },
                None => Payload::Json(json),
            },
        });
    }

    fn on_truncate(&mut self, rel_id: u32, out: &mut Vec<Record>) {
        let Some(rel) = self.rels.get(&rel_id) else {
            return;
        };
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        tx.seq += 1;
        let tx = *tx;
        if let Some(chunk) = self.chunk.as_mut() {
            chunk.on_truncate(&rel.name);
        }
        let source = self.source_block(rel, false, tx.final_lsn, Some(&tx));
        let json = render(&source, Op::Truncate, now_ms(), None, None);
        out.push(Record {
            id: event_id(
                &self.instance,
                &[&format_lsn(tx.final_lsn), &tx.seq.to_string()],
            ),
            payload: Payload::Json(json),
        });
    }

    /// Tells the session the newest position the runner committed.
    fn forward_applied(&mut self) {
        if self.applied_rx.has_changed().unwrap_or(false) {
            let lsn = *self.applied_rx.borrow_and_update();
            if let Some(s) = &self.stream {
                s.client.update_applied_lsn(Lsn::from_u64(lsn));
            }
        }
    }

    fn measure(&self) -> futures::future::BoxFuture<'static, Result<Option<Lag>>> {
        let pool = self.pool.clone();
        let slot = self.s.slot.clone();
        let streaming = self.s.mode != SnapshotMode::InitialOnly;
        let pending: Vec<String> = match &self.pos.snapshot {
            Some(snap) => self
                .names
                .iter()
                .filter(|t| !snap.tables.get(*t).is_some_and(|p| p.done))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let seen = self.seen_ms.clone();
        async move {
            let mut records = 0;
            for t in &pending {
                records += catalog::estimated_rows(&pool, t).await?;
            }
            let slot = if streaming {
                catalog::slot_lag(&pool, &slot).await?
            } else {
                None
            };
            let seconds = match slot {
                Some(l) if l.unconfirmed > 0 => {
                    ((now_ms() - seen.load(Ordering::Relaxed)).max(0) as f64) / 1000.0
                }
                _ => 0.0,
            };
            Ok(Some(Lag {
                records,
                seconds: Some(seconds),
                bytes: slot.map(|l| l.retained),
            }))
        }
        .boxed()
    }
}

impl Source for PgCdcSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if !self.started {
            self.start().await?;
        }
        if let Some(b) = self.gap_batch.take() {
            return Ok(Some(b));
        }
        if let Some(why) = self.gap_report.take() {
            return Err(Error::State(why));
        }
        if self.s.mode == SnapshotMode::InitialOnly {
            return self.snapshot_only().await;
        }
        if self.stream.is_none() {
            self.connect().await?;
        }
        let mut records: Vec<Record> = Vec::new();
        let mut moved = false;
        let mut deadline = tokio::time::Instant::now() + IDLE_WAIT;
        let mut fill_until = None;
        loop {
            self.forward_applied();
            self.heartbeat().await?;
            if self.chunk.is_none() && records.len() < self.s.batch {
                self.chunk = self.read_chunk(true).await?;
            }
            let waiting_chunk = self.chunk.is_some();
            let stream = self.stream.as_mut().expect("connected above");
            let next = if !records.is_empty() || (moved && !waiting_chunk) {
                // Something to hand over: fill the batch for a moment, then send it.
                let until = *fill_until
                    .get_or_insert_with(|| tokio::time::Instant::now() + super::BATCH_FILL);
                match tokio::time::timeout_at(until, stream.client.recv()).await {
                    Ok(r) => Some(r),
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    r = stream.client.recv() => Some(r),
                    _ = self.applied_rx.changed() => None,
                    _ = tokio::time::sleep_until(deadline) => {
                        if waiting_chunk {
                            // The watermarks are in the WAL and on their way: keep waiting.
                            deadline = tokio::time::Instant::now() + IDLE_WAIT;
                            continue;
                        }
                        break;
                    }
                }
            };
            let Some(r) = next else { continue };
            let ev = match r {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    self.stream = None;
                    return Err(Error::SourceUnreachable(format!(
                        "{}: the replication session ended",
                        self.at()
                    )));
                }
                Err(e) => {
                    let s = self.stream.take();
                    let err = stream_error(
                        e,
                        &self.at(),
                        &self.s.slot,
                        &self.login.user,
                        s.as_ref().and_then(|s| s.bridge.as_ref()),
                    );
                    // What was read before the failure still goes out (its position is exact).
                    if records.is_empty() && !moved {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "replication session failed; delivering what was read");
                    break;
                }
            };
            moved |= self.on_event(ev, &mut records)?;
            if records.len() >= self.s.batch {
                break;
            }
        }
        if records.is_empty() && !moved {
            return Ok(None);
        }
        self.batch(records).map(Some)
    }

    fn lag(&mut self) -> impl std::future::Future<Output = Result<Option<Lag>>> + Send {
        self.measure()
    }

    fn lag_task(&self) -> Option<futures::future::BoxFuture<'static, Result<Option<Lag>>>> {
        Some(self.measure())
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(PgCommitter {
            applied: self.applied.clone(),
        }))
    }

    fn describe(&self) -> String {
        format!(
            "postgresCdc {} slot {} publication {} tables {}",
            self.at(),
            self.s.slot,
            self.s.publication,
            self.names.join(", ")
        )
    }
}
