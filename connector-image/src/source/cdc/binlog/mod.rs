//! `mysqlCdc` and `mariadbCdc`: every row change of the configured tables from the binary log
//! (mysql_async's binlog stream, mysql_common's event parser), after a consistent snapshot.
//!
//! - Position (state topic): binlog file and offset of the last whole transaction, and the GTID
//!   state (MariaDB `domain-server-seq` list, MySQL executed set). MariaDB resumes by GTID
//!   (`@slave_connect_state`), MySQL by its GTID set when it has one (`COM_BINLOG_DUMP_GTID`),
//!   else by file and offset.
//! - Snapshot: `START TRANSACTION WITH CONSISTENT SNAPSHOT` at a known binlog position, keyset
//!   pages by primary key, then the stream from that position. A restart mid-snapshot reads the
//!   remaining pages in a new transaction; the stream still starts at the first snapshot's
//!   position, so nothing is missed (changes made meanwhile replay after their rows).
//! - Batches may end inside a transaction; their position stays at the last whole one, so a
//!   restart replays the transaction with the same event ids (GTID or file/offset, and the row's
//!   ordinal).

pub mod gtid;
pub mod values;

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use mysql_async::{
    BinlogStream, BinlogStreamRequest, Conn, GnoInterval, Opts, OptsBuilder, Pool, Row, Sid,
    SslOpts, Value,
    binlog::{
        events::{EventData, OptionalMetaExtractor, RowsEventData, TableMapEvent},
        value::BinlogValue,
    },
    prelude::Queryable,
};
use obsrv_crds::{
    BinlogCdcSourceSpec, SnapshotMode, TlsMode,
    source::cdc::{MARIADB_CDC, MYSQL_CDC, default_server_id},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::{
    gtid::{MARIADB_GTID_EVENT, MariadbState, MysqlSet, parse_mariadb_gtid_event, uuid_text},
    values::{From, Kind, push_value, value_text},
};
use super::{
    event::{Obj, Op, push_str, render},
    postgres::snapshot::SnapshotProgress,
};
use crate::{
    config::parse_duration,
    envelope::{EventIds, Payload},
    error::{Error, Result},
    runner::now_ms,
    source::{
        Batch, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory,
        sql::{Endpoint, Login, check_tls_ca},
    },
};

/// Which server speaks the protocol: their GTIDs and snapshot positions differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Mysql,
    Mariadb,
}

pub fn mysql() -> SourceFactory {
    SourceFactory::new(MYSQL_CDC.name, |ctx| open(Flavor::Mysql, ctx))
}

pub fn mariadb() -> SourceFactory {
    SourceFactory::new(MARIADB_CDC.name, |ctx| open(Flavor::Mariadb, ctx))
}

const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The position in the state topic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BinlogPosition {
    /// Binlog file and offset after the last whole transaction delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    /// GTID state after it (MariaDB list or MySQL set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
}

/// A captured table as the catalog describes it now.
#[derive(Clone, Debug, PartialEq)]
struct TableInfo {
    db: String,
    table: String,
    /// `db.table`.
    name: String,
    cols: Vec<(String, Kind)>,
    pk: Vec<String>,
}

/// The transaction being streamed.
#[derive(Clone, Debug, Default)]
struct Tx {
    /// Its GTID as text, when the server has GTIDs.
    gtid: Option<String>,
    mariadb: Option<(u32, u32, u64)>,
    mysql: Option<(String, u64)>,
    ts_ms: i64,
    seq: u32,
    open: bool,
}

pub struct BinlogSource {
    flavor: Flavor,
    instance: String,
    at: String,
    opts: Opts,
    pool: Pool,
    server_id: u32,
    heartbeat: Duration,
    mode: SnapshotMode,
    batch: usize,
    /// Captured tables in the spec's order, by `db.table`.
    names: Vec<String>,
    schemas: HashMap<String, TableInfo>,
    pos: BinlogPosition,
    mariadb_state: MariadbState,
    mysql_set: MysqlSet,
    stream: Option<BinlogStream>,
    /// The snapshot's transaction.
    snap: Option<Conn>,
    tx: Tx,
    /// Server time (Unix ms) of the newest event processed: lag in seconds.
    seen_ms: Arc<AtomicI64>,
    /// A first start's position must be in the state topic before anything is read after it,
    /// or a restart would pick a later position and miss what changed in between.
    start_committed: watch::Sender<bool>,
    awaiting_start: bool,
}

/// Hears that the runner committed a position with a start point.
struct StartCommitted(watch::Sender<bool>);

impl SourceCommitter for StartCommitted {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        if position.get("file").is_some_and(|f| !f.is_null()) {
            self.0.send_replace(true);
        }
        Ok(())
    }
}

fn kind_name(f: Flavor) -> &'static str {
    match f {
        Flavor::Mysql => "mysqlCdc",
        Flavor::Mariadb => "mariadbCdc",
    }
}

/// mysql_async's options for the spec's endpoint, TLS mode and login.
fn options(endpoint: &Endpoint<'_>, login: &Login, tls: bool) -> OptsBuilder {
    let ssl = match endpoint.tls_mode() {
        TlsMode::Disable => None,
        _ if !tls => None,
        TlsMode::Prefer | TlsMode::Require => Some(
            SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true),
        ),
        TlsMode::VerifyFull => Some(match &login.ca {
            Some(ca) => SslOpts::default()
                .with_root_certs(vec![ca.clone().into()])
                .with_disable_built_in_roots(true),
            None => SslOpts::default(),
        }),
    };
    OptsBuilder::default()
        .ip_or_hostname(endpoint.host)
        .tcp_port(endpoint.port_or(3306))
        .user(Some(login.user.clone()))
        .pass(Some(login.password.clone()))
        .db_name(Some(endpoint.database))
        .init(vec!["SET time_zone = '+00:00'", "SET NAMES utf8mb4"])
        .ssl_opts(ssl)
}

/// A mysql_async error in the runtime's reasons, naming the server.
fn my_error(at: &str, e: mysql_async::Error) -> Error {
    match &e {
        mysql_async::Error::Server(s) => match s.code {
            1045 | 1044 | 1227 | 1142 | 1143 => Error::AuthFailed(format!("{at}: {}", s.message)),
            1146 | 1054 | 1049 => Error::Schema(format!("{at}: {}", s.message)),
            1236 => Error::State(format!(
                "{at}: the binary log no longer has the position to resume from ({}): the connector has to start over (delete its state or the Connector)",
                s.message
            )),
            _ => Error::SourceUnreachable(format!("{at}: {}", s.message)),
        },
        _ => Error::SourceUnreachable(format!("{at}: {e}")),
    }
}

async fn open(flavor: Flavor, ctx: OpenContext) -> Result<BinlogSource> {
    let spec: &BinlogCdcSourceSpec =
        crate::source::spec_of(&ctx.config, kind_name(flavor), |s| match flavor {
            Flavor::Mysql => s.mysql_cdc.as_ref(),
            Flavor::Mariadb => s.mariadb_cdc.as_ref(),
        })?;
    let endpoint = Endpoint {
        host: &spec.host,
        port: spec.port,
        database: &spec.database,
        tls: spec.tls.as_ref(),
    };
    check_tls_ca(&ctx.secrets, spec.tls.as_ref())?;
    let login = Login::from_secrets(&ctx.secrets);
    let at = format!("{}:{}", spec.host, endpoint.port_or(3306));
    // `prefer`: TLS when the server has it, else plain text.
    let mut opts: Opts = options(&endpoint, &login, true).into();
    let mut conn = match Conn::new(opts.clone()).await {
        Ok(c) => c,
        Err(_) if endpoint.tls_mode() == TlsMode::Prefer => {
            opts = options(&endpoint, &login, false).into();
            Conn::new(opts.clone())
                .await
                .map_err(|e| my_error(&at, e))?
        }
        Err(e) => return Err(my_error(&at, e)),
    };
    preflight(&mut conn, &at).await?;
    let mut names = Vec::new();
    let mut schemas = HashMap::new();
    for t in &spec.tables {
        let (db, table) = match t.split_once('.') {
            Some((d, t)) => (d.to_string(), t.to_string()),
            None => (spec.database.clone(), t.clone()),
        };
        let info = table_info(&mut conn, flavor, &db, &table)
            .await
            .map_err(|e| my_error(&at, e))?
            .ok_or_else(|| Error::Schema(format!("{at}: table {db}.{table} not found")))?;
        if info.pk.is_empty() {
            return Err(Error::Schema(format!(
                "{at}: table {} has no primary key: events would carry no key and the snapshot pages by primary key (add one)",
                info.name
            )));
        }
        names.push(info.name.clone());
        schemas.insert(info.name.clone(), info);
    }
    drop(conn);
    let pos: BinlogPosition = match &ctx.position {
        None => BinlogPosition::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            Error::State(format!(
                "saved position is not a {} position: {e}",
                kind_name(flavor)
            ))
        })?,
    };
    let mariadb_state = pos
        .gtid
        .as_deref()
        .filter(|_| flavor == Flavor::Mariadb)
        .and_then(MariadbState::parse)
        .unwrap_or_default();
    let mysql_set = pos
        .gtid
        .as_deref()
        .filter(|_| flavor == Flavor::Mysql)
        .and_then(MysqlSet::parse)
        .unwrap_or_default();
    Ok(BinlogSource {
        flavor,
        instance: ctx.instance(),
        at,
        pool: Pool::new(opts.clone()),
        opts,
        server_id: spec
            .server_id
            .map(|i| i as u32)
            .unwrap_or_else(|| default_server_id(&ctx.config.namespace, &ctx.config.name)),
        heartbeat: parse_duration(&spec.heartbeat_interval)?,
        mode: spec.snapshot,
        batch: spec.batch_size.max(1) as usize,
        names,
        schemas,
        pos,
        mariadb_state,
        mysql_set,
        stream: None,
        snap: None,
        tx: Tx::default(),
        seen_ms: Arc::new(AtomicI64::new(now_ms())),
        start_committed: watch::channel(false).0,
        awaiting_start: false,
    })
}

/// The binary log must be on, in ROW format with full images.
async fn preflight(conn: &mut Conn, at: &str) -> Result<()> {
    let row: Option<(i64, String, String)> = conn
        .query_first("SELECT @@log_bin, @@binlog_format, @@binlog_row_image")
        .await
        .map_err(|e| my_error(at, e))?;
    let (log_bin, format, image) = row.unwrap_or((0, String::new(), String::new()));
    if log_bin != 1 {
        return Err(Error::Schema(format!(
            "{at} has no binary log: change data capture needs log_bin on (and a restart)"
        )));
    }
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(Error::Schema(format!(
            "{at} logs binlog_format={format}: change data capture needs binlog_format=ROW"
        )));
    }
    if !image.eq_ignore_ascii_case("FULL") {
        return Err(Error::Schema(format!(
            "{at} logs binlog_row_image={image}: change data capture needs binlog_row_image=FULL"
        )));
    }
    Ok(())
}

async fn table_info(
    conn: &mut Conn,
    flavor: Flavor,
    db: &str,
    table: &str,
) -> std::result::Result<Option<TableInfo>, mysql_async::Error> {
    // MariaDB's JSON is a longtext with a json_valid check; MySQL's has its own type.
    let json_check = match flavor {
        Flavor::Mariadb => {
            "EXISTS (SELECT 1 FROM information_schema.CHECK_CONSTRAINTS k WHERE k.CONSTRAINT_SCHEMA = c.TABLE_SCHEMA \
             AND k.TABLE_NAME = c.TABLE_NAME AND k.CHECK_CLAUSE LIKE CONCAT('%json_valid(`', c.COLUMN_NAME, '`)%'))"
        }
        Flavor::Mysql => "0",
    };
    let cols: Vec<(String, String, String, i64)> = conn
        .exec(
            format!(
                "SELECT CAST(c.COLUMN_NAME AS CHAR), CAST(c.DATA_TYPE AS CHAR), CAST(c.COLUMN_TYPE AS CHAR), {json_check} \
                 FROM information_schema.COLUMNS c WHERE c.TABLE_SCHEMA = ? AND c.TABLE_NAME = ? ORDER BY c.ORDINAL_POSITION"
            ),
            (db, table),
        )
        .await?;
    if cols.is_empty() {
        return Ok(None);
    }
    let pk: Vec<String> = conn
        .exec(
            "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await?;
    Ok(Some(TableInfo {
        db: db.to_string(),
        table: table.to_string(),
        name: format!("{db}.{table}"),
        cols: cols
            .into_iter()
            .map(|(n, d, t, j)| {
                let k = Kind::of(&d.to_lowercase(), &t.to_lowercase(), j != 0);
                (n, k)
            })
            .collect(),
        pk,
    }))
}

fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A `source` block (from `BinlogSource::source_head`) completed with the change's row in its
/// event.
fn with_row(mut head: Obj, row: i64) -> String {
    head.int("row", row);
    head.finish()
}

/// A row (values in `cols` order) as a JSON object, and its key.
fn row_json(
    cols: &[(String, Kind)],
    pk: &[usize],
    values: &[Option<&Value>],
    from: From,
) -> (String, Option<String>) {
    let mut out = String::with_capacity(64 + 24 * cols.len());
    out.push('{');
    for (i, (name, kind)) in cols.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(&mut out, name);
        out.push(':');
        match values.get(i).copied().flatten() {
            Some(v) => push_value(&mut out, kind, v, from),
            None => out.push_str("null"),
        }
    }
    out.push('}');
    let key = (!pk.is_empty())
        .then(|| {
            let mut k = String::from("{");
            for (n, &i) in pk.iter().enumerate() {
                let (name, kind) = cols.get(i)?;
                if n > 0 {
                    k.push(',');
                }
                push_str(&mut k, name);
                k.push(':');
                push_value(&mut k, kind, values.get(i).copied().flatten()?, from);
            }
            k.push('}');
            Some(k)
        })
        .flatten();
    (out, key)
}

impl BinlogSource {
    fn connector(&self) -> &'static str {
        match self.flavor {
            Flavor::Mysql => "mysql",
            Flavor::Mariadb => "mariadb",
        }
    }

    fn gtid_text(&self) -> Option<String> {
        let s = match self.flavor {
            Flavor::Mariadb if !self.mariadb_state.is_empty() => self.mariadb_state.to_string(),
            Flavor::Mysql if !self.mysql_set.is_empty() => self.mysql_set.to_string(),
            _ => return None,
        };
        Some(s)
    }

    fn batch_of(&self, records: Vec<Record>) -> Result<Batch> {
        let position = serde_json::to_value(&self.pos).map_err(|e| Error::State(e.to_string()))?;
        let mut wm = match (&self.pos.file, self.pos.pos) {
            (Some(f), Some(p)) => format!("{f}:{p}"),
            _ => String::new(),
        };
        if let Some(g) = &self.pos.gtid {
            wm.push_str(&format!(" gtid {g}"));
        }
        if let Some(s) = &self.pos.snapshot {
            wm.push_str(&format!("; {}", s.describe(&self.names)));
        }
        Ok(Batch {
            records,
            position,
            watermark: Some(wm.trim().to_string()),
        })
    }

    /// The `source` block of a streamed change at `log_pos` in the current file and transaction,
    /// up to its row.
    fn change_source(&self, t: &TableInfo, log_pos: u64, ts_ms: i64) -> Obj {
        let (file, gtid) = (self.pos.file.as_deref(), self.tx.gtid.as_deref());
        self.source_head(t, false, file, Some(log_pos), gtid, ts_ms)
    }

    /// The `source` block up to its last field, the row.
    fn source_head(
        &self,
        t: &TableInfo,
        snapshot: bool,
        file: Option<&str>,
        pos: Option<u64>,
        gtid: Option<&str>,
        ts_ms: i64,
    ) -> Obj {
        let mut o = Obj::new();
        o.str(
            "version",
            concat!("obsrv-connector ", env!("CARGO_PKG_VERSION")),
        )
        .str("connector", self.connector())
        .str("name", &self.instance)
        .int("ts_ms", ts_ms)
        .str("snapshot", if snapshot { "true" } else { "false" })
        .str("db", &t.db)
        .str("table", &t.table)
        .int("server_id", i64::from(self.server_id))
        .opt_str("gtid", gtid)
        .opt_str("file", file);
        match pos {
            Some(p) => o.int("pos", p as i64),
            None => o.raw("pos", "null"),
        };
        o
    }

    /// The binlog position the snapshot's transaction sees (and the stream starts from).
    async fn snapshot_point(&self, conn: &mut Conn) -> Result<(String, u64, Option<String>)> {
        let at = &self.at;
        match self.flavor {
            Flavor::Mariadb => {
                conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                    .await
                    .map_err(|e| my_error(at, e))?;
                let rows: Vec<(String, String)> = conn
                    .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                    .await
                    .map_err(|e| my_error(at, e))?;
                let get = |k: &str| {
                    rows.iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                };
                let file = get("binlog_snapshot_file").unwrap_or_default();
                let pos: u64 = get("binlog_snapshot_position")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(4);
                let gtid: Option<String> = conn
                    .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
                    .await
                    .map_err(|e| my_error(at, e))?
                    .flatten();
                Ok((file, pos, gtid))
            }
            Flavor::Mysql => {
                // MySQL has no snapshot-consistent binlog status: hold a global read lock for
                // the moment the transaction starts and the position is read.
                conn.query_drop("FLUSH TABLES WITH READ LOCK")
                    .await
                    .map_err(|e| my_error(at, e))?;
                let res = async {
                    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                        .await?;
                    let row: Option<Row> = conn.query_first("SHOW MASTER STATUS").await?;
                    Ok::<_, mysql_async::Error>(row)
                }
                .await;
                conn.query_drop("UNLOCK TABLES")
                    .await
                    .map_err(|e| my_error(at, e))?;
                let row = res.map_err(|e| my_error(at, e))?.ok_or_else(|| {
                    Error::Schema(format!("{at}: SHOW MASTER STATUS is empty: is log_bin on?"))
                })?;
                let file: String = row.get(0).unwrap_or_default();
                let pos: u64 = row.get(1).unwrap_or(4);
                let gtid: Option<String> = row.get::<Option<String>, _>(4).flatten();
                Ok((file, pos, gtid.filter(|g| !g.trim().is_empty())))
            }
        }
    }

    /// The server's current position (no snapshot wanted).
    async fn current_point(&self) -> Result<(String, u64, Option<String>)> {
        let at = &self.at;
        let mut conn = self.pool.get_conn().await.map_err(|e| my_error(at, e))?;
        let row: Option<Row> = conn
            .query_first("SHOW MASTER STATUS")
            .await
            .map_err(|e| my_error(at, e))?;
        let row = row.ok_or_else(|| {
            Error::Schema(format!("{at}: SHOW MASTER STATUS is empty: is log_bin on?"))
        })?;
        let file: String = row.get(0).unwrap_or_default();
        let pos: u64 = row.get(1).unwrap_or(4);
        let gtid = match self.flavor {
            Flavor::Mariadb => conn
                .exec_first::<Option<String>, _, _>("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
                .await
                .map_err(|e| my_error(at, e))?
                .flatten(),
            Flavor::Mysql => row.get::<Option<String>, _>(4).flatten(),
        };
        Ok((file, pos, gtid.filter(|g| !g.trim().is_empty())))
    }

    fn set_point(&mut self, file: String, pos: u64, gtid: Option<String>) {
        self.pos.file = Some(file);
        self.pos.pos = Some(pos);
        match self.flavor {
            Flavor::Mariadb => {
                self.mariadb_state = gtid
                    .as_deref()
                    .and_then(MariadbState::parse)
                    .unwrap_or_default()
            }
            Flavor::Mysql => {
                self.mysql_set = gtid
                    .as_deref()
                    .and_then(MysqlSet::parse)
                    .unwrap_or_default()
            }
        }
        self.pos.gtid = self.gtid_text();
    }

    /// Starts the snapshot's transaction. The stream starts where the first snapshot
    /// transaction started; a later one (after a restart) only reads the remaining pages.
    async fn open_snapshot(&mut self) -> Result<()> {
        let mut conn = Conn::new(self.opts.clone())
            .await
            .map_err(|e| my_error(&self.at, e))?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(|e| my_error(&self.at, e))?;
        let (file, pos, gtid) = self.snapshot_point(&mut conn).await?;
        if self.pos.file.is_none() {
            self.set_point(file, pos, gtid);
        }
        self.snap = Some(conn);
        Ok(())
    }

    /// One page of the snapshot; `None` once it is done.
    async fn snapshot_page(&mut self) -> Result<Option<Vec<Record>>> {
        let Some(snap) = &self.pos.snapshot else {
            return Ok(None);
        };
        let Some(name) = snap.next_table(&self.names).map(str::to_string) else {
            // Done: end the snapshot's transaction.
            if let Some(mut c) = self.snap.take() {
                let _ = c.query_drop("COMMIT").await;
            }
            return Ok(None);
        };
        let after = snap.after(&name).map(<[String]>::to_vec);
        if self.snap.is_none() {
            self.open_snapshot().await?;
        }
        let t = self
            .schemas
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::Schema(format!("{}: table {name} not found", self.at)))?;
        let cols: Vec<String> = t.cols.iter().map(|(n, _)| quote(n)).collect();
        let pk: Vec<String> = t.pk.iter().map(|c| quote(c)).collect();
        let mut sql = format!(
            "SELECT {} FROM {}.{}",
            cols.join(", "),
            quote(&t.db),
            quote(&t.table)
        );
        let params: Vec<Value> = match &after {
            Some(k) => {
                let marks = vec!["?"; k.len()].join(", ");
                sql.push_str(&format!(" WHERE ({}) > ({marks})", pk.join(", ")));
                k.iter().map(|v| Value::from(v.as_str())).collect()
            }
            None => Vec::new(),
        };
        sql.push_str(&format!(" ORDER BY {} LIMIT {}", pk.join(", "), self.batch));
        let conn = self.snap.as_mut().expect("opened above");
        let rows: Vec<Row> = conn
            .exec(sql, params)
            .await
            .map_err(|e| my_error(&self.at, e))?;
        let pk_idx: Vec<usize> =
            t.pk.iter()
                .filter_map(|k| t.cols.iter().position(|(n, _)| n == k))
                .collect();
        let epoch = self
            .pos
            .snapshot
            .as_ref()
            .map_or(0, |s| s.epoch)
            .to_string();
        let source = with_row(
            self.source_head(
                &t,
                true,
                self.pos.file.as_deref(),
                self.pos.pos,
                self.pos.gtid.as_deref(),
                now_ms(),
            ),
            0,
        );
        let mut records = Vec::with_capacity(rows.len());
        // The ids of the batch share their leading parts: hashed once.
        let ids = EventIds::new(&self.instance, &["snapshot", &epoch, &name]);
        for r in &rows {
            let values: Vec<Option<&Value>> = (0..t.cols.len()).map(|i| r.as_ref(i)).collect();
            let (json, key) = row_json(&t.cols, &pk_idx, &values, From::Row);
            let key = key.unwrap_or_default();
            let id = ids.id(&key);
            let json = render(&source, Op::Read, now_ms(), None, Some(&json));
            records.push(Record {
                id,
                payload: Payload::Keyed { json, key },
            });
        }
        let last_key = rows.last().map(|r| {
            pk_idx
                .iter()
                .map(|&i| r.as_ref(i).map(value_text).unwrap_or_default())
                .collect::<Vec<_>>()
        });
        let done = rows.len() < self.batch;
        let progress = self.pos.snapshot.as_mut().expect("checked above");
        let entry = progress.tables.entry(name).or_default();
        entry.done = done;
        if last_key.is_some() {
            entry.after = last_key;
        }
        Ok(Some(records))
    }

    /// The binlog stream from the position (by GTID where the server has them).
    async fn connect(&mut self) -> Result<()> {
        let at = self.at.clone();
        let mut conn = Conn::new(self.opts.clone())
            .await
            .map_err(|e| my_error(&at, e))?;
        let period_ns = self
            .heartbeat
            .as_nanos()
            .min(u128::from(u32::MAX) * 1_000_000_000) as u64;
        conn.query_drop(format!("SET @master_heartbeat_period = {period_ns}"))
            .await
            .map_err(|e| my_error(&at, e))?;
        let file = self.pos.file.clone().unwrap_or_default();
        let pos = self.pos.pos.unwrap_or(4);
        let mut req = BinlogStreamRequest::new(self.server_id);
        let sids: Vec<Sid<'static>>;
        match self.flavor {
            Flavor::Mariadb => {
                // MariaDB sends its GTID events to replicas that announce the capability, and
                // starts after the GTIDs of @slave_connect_state.
                conn.query_drop("SET @mariadb_slave_capability = 4")
                    .await
                    .map_err(|e| my_error(&at, e))?;
                if !self.mariadb_state.is_empty() {
                    conn.exec_drop(
                        "SET @slave_connect_state = ?",
                        (self.mariadb_state.to_string(),),
                    )
                    .await
                    .map_err(|e| my_error(&at, e))?;
                    conn.query_drop(
                        "SET @slave_gtid_strict_mode = 0, @slave_gtid_ignore_duplicates = 0",
                    )
                    .await
                    .map_err(|e| my_error(&at, e))?;
                } else {
                    req = req.with_filename(file.as_bytes()).with_pos(pos);
                }
            }
            Flavor::Mysql => {
                if self.mysql_set.is_empty() {
                    req = req.with_filename(file.as_bytes()).with_pos(pos);
                } else {
                    sids = self
                        .mysql_set
                        .sids()
                        .into_iter()
                        .map(|(uuid, ivs)| {
                            Sid::new(uuid).with_intervals(
                                ivs.into_iter()
                                    .map(|(a, b)| GnoInterval::new(a, b))
                                    .collect(),
                            )
                        })
                        .collect();
                    req = req.with_gtid().with_gtid_set(sids);
                }
            }
        }
        // The request borrows the file name: build the stream before it goes out of scope.
        let stream = conn
            .get_binlog_stream(req)
            .await
            .map_err(|e| my_error(&at, e))?;
        tracing::info!(file = %file, pos, gtid = ?self.pos.gtid, "binlog stream started");
        self.stream = Some(stream);
        self.tx = Tx::default();
        Ok(())
    }

    /// Columns of a table map event: names from the event when the server logs them
    /// (`binlog_row_metadata=FULL`), else the catalog's by position; kinds from the catalog.
    async fn columns_for(
        &mut self,
        tme: &TableMapEvent<'_>,
    ) -> Result<Option<(TableInfo, Vec<(String, Kind)>)>> {
        let name = format!("{}.{}", tme.database_name(), tme.table_name());
        if !self.names.contains(&name) {
            return Ok(None);
        }
        let count = tme.columns_count() as usize;
        let logged: Vec<String> = OptionalMetaExtractor::new(tme.iter_optional_meta())
            .ok()
            .map(|m| {
                m.iter_column_name()
                    .filter_map(|n| n.ok().map(|n| n.name().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        for attempt in 0..2 {
            let info = self.schemas.get(&name).cloned();
            if let Some(info) = info {
                let cols: Option<Vec<(String, Kind)>> = if logged.len() == count {
                    Some(
                        logged
                            .iter()
                            .map(|n| {
                                let k = info
                                    .cols
                                    .iter()
                                    .find(|(c, _)| c == n)
                                    .map(|(_, k)| k.clone())
                                    .unwrap_or(Kind::Other);
                                (n.clone(), k)
                            })
                            .collect(),
                    )
                } else if info.cols.len() == count {
                    Some(info.cols.clone())
                } else {
                    None
                };
                let complete = cols
                    .as_ref()
                    .is_some_and(|c| c.iter().all(|(_, k)| *k != Kind::Other) || attempt == 1);
                if let Some(cols) = cols
                    && complete
                {
                    return Ok(Some((info, cols)));
                }
            }
            // The table changed since the catalog was read: read it again.
            let (db, table) = name.split_once('.').expect("db.table");
            let mut conn = self
                .pool
                .get_conn()
                .await
                .map_err(|e| my_error(&self.at, e))?;
            if let Some(fresh) = table_info(&mut conn, self.flavor, db, table)
                .await
                .map_err(|e| my_error(&self.at, e))?
            {
                self.schemas.insert(name.clone(), fresh);
            }
        }
        let info = self.schemas.get(&name).cloned();
        Ok(info.map(|i| {
            let cols = (0..count)
                .map(|n| {
                    i.cols
                        .get(n)
                        .cloned()
                        .unwrap_or_else(|| (format!("_col{n}"), Kind::Other))
                })
                .collect();
            (i, cols)
        }))
    }

    /// One binlog event into records and position. Returns whether the position moved.
    async fn on_event(
        &mut self,
        ev: mysql_async::binlog::events::Event,
        out: &mut Vec<Record>,
    ) -> Result<bool> {
        let header = ev.header();
        let ts_ms = i64::from(header.timestamp()) * 1000;
        if header.timestamp() > 0 {
            self.seen_ms.store(ts_ms, Ordering::Relaxed);
        }
        let log_pos = u64::from(header.log_pos());
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            if let Some(g) = parse_mariadb_gtid_event(ev.data()) {
                let server = header.server_id();
                self.tx = Tx {
                    gtid: Some(format!("{}-{server}-{}", g.domain, g.seq)),
                    mariadb: Some((g.domain, server, g.seq)),
                    ts_ms,
                    open: !g.standalone,
                    ..Tx::default()
                };
            }
            return Ok(false);
        }
        let data = ev
            .read_data()
            .map_err(|e| Error::SourceUnreachable(format!("{}: binlog event: {e}", self.at)))?;
        let Some(data) = data else {
            return Ok(false);
        };
        match data {
            EventData::RotateEvent(r) => {
                if !self.tx.open {
                    self.pos.file = Some(r.name().into_owned());
                    self.pos.pos = Some(r.position());
                }
                Ok(false)
            }
            EventData::GtidEvent(g) => {
                let uuid = uuid_text(&g.sid());
                self.tx = Tx {
                    gtid: Some(format!("{uuid}:{}", g.gno())),
                    mysql: Some((uuid, g.gno())),
                    ts_ms,
                    open: true,
                    ..Tx::default()
                };
                Ok(false)
            }
            EventData::QueryEvent(q) => {
                let sql = q.query().trim().to_string();
                let upper = sql.to_ascii_uppercase();
                if upper == "BEGIN" {
                    self.tx.open = true;
                    self.tx.ts_ms = ts_ms;
                    return Ok(false);
                }
                if upper == "COMMIT" {
                    return Ok(self.commit(log_pos));
                }
                // DDL: a truncate of a captured table is an event; any other statement may have
                // changed a table's shape, so the catalog is read again when next needed.
                if let Some(table) = truncated_table(&sql, &q.schema()) {
                    if let Some(info) = self.schemas.get(&table).cloned() {
                        self.tx.seq += 1;
                        let source = with_row(self.change_source(&info, log_pos, ts_ms), 0);
                        let json = render(&source, Op::Truncate, now_ms(), None, None);
                        out.push(Record {
                            id: self.change_id(&self.change_ids(log_pos), 0),
                            payload: Payload::Json(json),
                        });
                    }
                } else {
                    self.stale_schemas();
                }
                Ok(self.commit(log_pos))
            }
            EventData::XidEvent(_) => Ok(self.commit(log_pos)),
            EventData::RowsEvent(re) => {
                let Some(tme) = self
                    .stream
                    .as_ref()
                    .and_then(|s| s.get_tme(re.table_id()))
                    .cloned()
                else {
                    return Ok(false);
                };
                let Some((info, cols)) = self.columns_for(&tme).await? else {
                    return Ok(false);
                };
                let op = match &re {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        Op::Create
                    }
                    RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                        Op::Delete
                    }
                    _ => Op::Update,
                };
                let pk: Vec<usize> = info
                    .pk
                    .iter()
                    .filter_map(|k| cols.iter().position(|(n, _)| n == k))
                    .collect();
                // What every row of the event shares, built once: the id's hash of the
                // position and the `source` block up to the row number.
                let ids = self.change_ids(log_pos);
                let ts_ms = if self.tx.ts_ms > 0 {
                    self.tx.ts_ms
                } else {
                    ts_ms
                };
                let source_head = self.change_source(&info, log_pos, ts_ms);
                for (row_no, row) in re.rows(&tme).enumerate() {
                    let (before, after) = row.map_err(|e| {
                        Error::SourceUnreachable(format!(
                            "{}: rows event of {}: {e}",
                            self.at, info.name
                        ))
                    })?;
                    let image = |r: &Option<mysql_async::binlog::row::BinlogRow>| {
                        r.as_ref().map(|r| {
                            // Values are borrowed from the event; only JSON is converted.
                            let values: Vec<Option<Cow<'_, Value>>> = (0..cols.len())
                                .map(|i| match r.as_ref(i) {
                                    Some(BinlogValue::Value(v)) => Some(Cow::Borrowed(v)),
                                    Some(BinlogValue::Jsonb(j)) => {
                                        serde_json::Value::try_from(j.clone()).ok().map(|v| {
                                            Cow::Owned(Value::Bytes(v.to_string().into_bytes()))
                                        })
                                    }
                                    _ => None,
                                })
                                .collect();
                            let refs: Vec<Option<&Value>> =
                                values.iter().map(|v| v.as_deref()).collect();
                            row_json(&cols, &pk, &refs, From::Log)
                        })
                    };
                    let split = |(json, key)| (Some(json), key);
                    let (before, before_key): (Option<String>, _) =
                        image(&before).map_or((None, None), split);
                    let (after, after_key) = image(&after).map_or((None, None), split);
                    self.tx.seq += 1;
                    let key = after_key.or(before_key);
                    let json = render(
                        &with_row(source_head.clone(), row_no as i64),
                        op,
                        now_ms(),
                        before.as_deref(),
                        after.as_deref(),
                    );
                    out.push(Record {
                        id: self.change_id(&ids, row_no),
                        payload: match key {
                            Some(key) => Payload::Keyed { json, key },
                            None => Payload::Json(json),
                        },
                    });
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// A change's id: its GTID and ordinal in the transaction, else file, offset and row; `ids`
    /// is the hash of the leading parts ([`Self::change_ids`]).
    fn change_id(&self, ids: &EventIds, row: usize) -> String {
        match self.tx.gtid {
            Some(_) => ids.id(&self.tx.seq.to_string()),
            None => ids.id(&row.to_string()),
        }
    }

    /// The hash of what the ids of an event's changes share: the GTID, else file and offset; the
    /// change's ordinal in the transaction (GTID) or row in the event completes it.
    fn change_ids(&self, log_pos: u64) -> EventIds {
        match &self.tx.gtid {
            Some(g) => EventIds::new(&self.instance, &[g]),
            None => EventIds::new(
                &self.instance,
                &[self.pos.file.as_deref().unwrap_or(""), &log_pos.to_string()],
            ),
        }
    }

    /// The transaction ended at `log_pos`: the position moves past it.
    fn commit(&mut self, log_pos: u64) -> bool {
        if let Some((d, s, n)) = self.tx.mariadb {
            self.mariadb_state.add(d, s, n);
        }
        if let Some((u, g)) = &self.tx.mysql {
            self.mysql_set.add(u, *g);
        }
        self.tx = Tx::default();
        if log_pos > 0 {
            self.pos.pos = Some(log_pos);
        }
        self.pos.gtid = self.gtid_text();
        true
    }

    fn stale_schemas(&mut self) {
        for info in self.schemas.values_mut() {
            // Kinds are re-read on the next rows event of the table.
            for c in &mut info.cols {
                c.1 = Kind::Other;
            }
        }
    }

    fn measure(&self) -> futures::future::BoxFuture<'static, Result<Option<Lag>>> {
        let pool = self.pool.clone();
        let at = self.at.clone();
        let ours = (self.pos.file.clone(), self.pos.pos);
        let seen = self.seen_ms.clone();
        async move {
            let mut conn = pool.get_conn().await.map_err(|e| my_error(&at, e))?;
            let row: Option<Row> = conn
                .query_first("SHOW MASTER STATUS")
                .await
                .map_err(|e| my_error(&at, e))?;
            let theirs = row.map(|r| (r.get::<String, _>(0), r.get::<u64, _>(1)));
            let behind = match (theirs, ours) {
                (Some((Some(f), Some(p))), (Some(of), Some(op))) => f != of || p > op,
                _ => true,
            };
            let seconds = if behind {
                ((now_ms() - seen.load(Ordering::Relaxed)).max(0) as f64) / 1000.0
            } else {
                0.0
            };
            Ok(Some(Lag {
                records: 0,
                seconds: Some(seconds),
                bytes: None,
            }))
        }
        .boxed()
    }
}

/// The captured table a `TRUNCATE [TABLE] [db.]name` statement empties, as `db.table`.
fn truncated_table(sql: &str, schema: &str) -> Option<String> {
    let words: Vec<&str> = sql.split_whitespace().collect();
    if !words.first()?.eq_ignore_ascii_case("TRUNCATE") {
        return None;
    }
    let name = match words.get(1) {
        Some(w) if w.eq_ignore_ascii_case("TABLE") => words.get(2)?,
        Some(w) => w,
        None => return None,
    };
    let name = name.trim_end_matches(';').replace('`', "");
    Some(match name.split_once('.') {
        Some(_) => name,
        None => format!("{schema}.{name}"),
    })
}

impl Source for BinlogSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.pos.file.is_none() {
            // First start: fix the point the stream starts from (the snapshot's, or now), and
            // hand it over alone; nothing is read after it until the state topic has it.
            match self.mode {
                SnapshotMode::Never => {
                    let (f, p, g) = self.current_point().await?;
                    self.set_point(f, p, g);
                }
                _ => {
                    self.pos.snapshot = Some(SnapshotProgress::new(0, &self.names));
                    self.open_snapshot().await?;
                }
            }
            self.awaiting_start = true;
            return self.batch_of(Vec::new()).map(Some);
        }
        if self.awaiting_start {
            if !*self.start_committed.borrow() {
                // Caught up as far as the runner can tell: it commits now.
                return Ok(None);
            }
            self.awaiting_start = false;
        }
        if let Some(records) = self.snapshot_page().await? {
            return self.batch_of(records).map(Some);
        }
        if self.mode == SnapshotMode::InitialOnly {
            return Ok(None);
        }
        if self.stream.is_none() {
            self.connect().await?;
        }
        let mut records = Vec::new();
        let mut moved = false;
        let deadline = tokio::time::Instant::now() + IDLE_WAIT;
        let mut fill_until = None;
        loop {
            let stream = self.stream.as_mut().expect("connected above");
            let next = if !records.is_empty() || moved {
                // Something to hand over: fill the batch for a moment, then send it.
                let until = *fill_until
                    .get_or_insert_with(|| tokio::time::Instant::now() + super::BATCH_FILL);
                match tokio::time::timeout_at(until, stream.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    n = stream.next() => n,
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            };
            let ev = match next {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    self.stream = None;
                    let err = my_error(&self.at, e);
                    if records.is_empty() && !moved {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "binlog stream failed; delivering what was read");
                    break;
                }
                None => {
                    self.stream = None;
                    if records.is_empty() && !moved {
                        return Err(Error::SourceUnreachable(format!(
                            "{}: the binlog stream ended",
                            self.at
                        )));
                    }
                    break;
                }
            };
            moved |= self.on_event(ev, &mut records).await?;
            if records.len() >= self.batch {
                break;
            }
        }
        if records.is_empty() && !moved {
            return Ok(None);
        }
        self.batch_of(records).map(Some)
    }

    fn lag(&mut self) -> impl std::future::Future<Output = Result<Option<Lag>>> + Send {
        self.measure()
    }

    fn lag_task(&self) -> Option<futures::future::BoxFuture<'static, Result<Option<Lag>>>> {
        Some(self.measure())
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(StartCommitted(self.start_committed.clone())))
    }

    fn describe(&self) -> String {
        format!(
            "{} {} server id {} tables {}",
            kind_name(self.flavor),
            self.at,
            self.server_id,
            self.names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_name_their_table() {
        assert_eq!(
            truncated_table("TRUNCATE TABLE `shop`.`t`", "x").as_deref(),
            Some("shop.t")
        );
        assert_eq!(
            truncated_table("truncate t", "shop").as_deref(),
            Some("shop.t")
        );
        assert_eq!(truncated_table("ALTER TABLE t ADD c int", "shop"), None);
    }

    #[test]
    fn rows_and_keys_render_by_kind() {
        let cols = vec![
            (
                "id".to_string(),
                Kind::Int {
                    unsigned: false,
                    bits: 32,
                },
            ),
            ("name".to_string(), Kind::Text),
        ];
        let id = Value::Int(7);
        let name = Value::Bytes(b"seven".to_vec());
        let (row, key) = row_json(&cols, &[0], &[Some(&id), Some(&name)], From::Log);
        assert_eq!(row, r#"{"id":7,"name":"seven"}"#);
        assert_eq!(key.as_deref(), Some(r#"{"id":7}"#));
        let (row, key) = row_json(&cols, &[0], &[None, Some(&name)], From::Log);
        assert_eq!(row, r#"{"id":null,"name":"seven"}"#);
        assert_eq!(key, None);
    }
}
