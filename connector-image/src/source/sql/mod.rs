//! Postgres, MySQL and MariaDB tables read incrementally by keyset pagination on
//! `(cursor, tieBreaker)`: never OFFSET, and never a row skipped because it shares its cursor value
//! with the last row of a batch. Each row becomes JSON as the database renders it (`row_to_json`,
//! `JSON_OBJECT`): faithful (numerics keep their digits, json nests). Postgres reads take the
//! columns in binary COPY and render that same JSON here ([`pg_json`]), which costs the database
//! less than half as much.
//!
//! [`plan`] builds the SQL of a table, [`keyset`] reads it page by page or streaming, [`postgres`]
//! and [`mysql`] hold what is per database: connection options (TLS modes, credentials, shared
//! with the change-data-capture kinds), catalog lookups, Postgres's binary COPY stream.

/// The same code on whichever driver the pool holds: sqlx's query builders are typed per database,
/// so each arm type-checks on its own.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Pg($p) => $body,
            Pool::My($p) => $body,
        }
    };
}

pub mod keyset;
pub mod mysql;
pub mod pg_json;
pub mod plan;
pub mod postgres;

use std::time::{Duration, Instant};

use obsrv_crds::{SqlSourceSpec, Tls, TlsMode, runtime::env};
use sqlx::{AssertSqlSafe, MySqlPool, PgPool};

use super::{Batch, Lag, OpenContext, Source, SourceFactory};
use crate::{
    config::Secrets,
    error::{Error, Result, check_ca_pem, connect_error, from_sqlx},
};

/// How long a first connection may take before the source is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection before the pool is built: a pool retries refused connections until its acquire
/// timeout and then says only "pool timed out"; this says where and why, within seconds.
pub(crate) async fn probe<O>(o: &O, what: &str, host: &str, port: u16) -> Result<()>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, o.connect()).await {
        Ok(Ok(c)) => {
            // Closing politely is best effort: the pool opens its own connections.
            let _ = sqlx::Connection::close(c).await;
            Ok(())
        }
        Ok(Err(e)) => Err(connect_error(what, host, port, e)),
        Err(_) => Err(Error::SourceUnreachable(format!(
            "no answer from {host}:{port} within {}s: is {what} reachable there (host, port, firewall)?",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// The CA bundle the spec's `tls.ca` names, when set, must be a PEM certificate: said here by the
/// Secret's name and key rather than as a TLS failure later.
pub fn check_tls_ca(secrets: &Secrets, tls: Option<&Tls>) -> Result<()> {
    if let (Some(pem), Some(r)) = (
        secrets.get(env::SOURCE_TLS_CA),
        tls.and_then(|t| t.ca.as_ref()),
    ) {
        check_ca_pem(&format!("Secret {} key {}", r.secret_name, r.key), pem)?;
    }
    Ok(())
}

pub use keyset::{STREAM_ROWS, SqlPosition, TablePosition};
pub use pg_json::ValueFormat;
pub use plan::{
    EXACT_LAG_BELOW, Page, RawRow, TablePlan, column_expr, param_cast, plan_rows, quote_ident,
    split_page,
};
pub use postgres::{CopyRow, CopyRows, KeyFormat, render_key};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// One column as the catalog describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    /// Base type name (`bytea`, `timestamp`, `datetime`, `varbinary`, ...).
    pub base_type: String,
    /// Full type as it can be written in a cast (`numeric(10,2)`, `decimal(10,2) unsigned`).
    pub full_type: String,
}

/// Where a SQL kind connects: the fields every Postgres/MySQL/MariaDB spec has, polling and
/// change data capture alike.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: Option<i32>,
    pub database: &'a str,
    pub tls: Option<&'a Tls>,
}

impl Endpoint<'_> {
    pub fn port_or(&self, default: u16) -> u16 {
        self.port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default)
    }

    /// `prefer` when the spec says nothing.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls.map(|t| t.mode).unwrap_or(TlsMode::Prefer)
    }
}

impl<'a> From<&'a SqlSourceSpec> for Endpoint<'a> {
    fn from(s: &'a SqlSourceSpec) -> Self {
        Endpoint {
            host: &s.host,
            port: s.port,
            database: &s.database,
            tls: s.tls.as_ref(),
        }
    }
}

/// Who connects: the user, password and CA the Connector's Secrets hold (the same environment
/// variables for every SQL kind). Never logged.
#[derive(Clone, Default)]
pub struct Login {
    pub user: String,
    pub password: String,
    /// PEM CA bundle (`tls.ca`).
    pub ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Login {
    pub fn from_secrets(secrets: &Secrets) -> Login {
        Login {
            user: secrets
                .get(env::SOURCE_USERNAME)
                .unwrap_or_default()
                .to_string(),
            password: secrets
                .get(env::SOURCE_PASSWORD)
                .unwrap_or_default()
                .to_string(),
            ca: secrets
                .get(env::SOURCE_TLS_CA)
                .map(|s| s.as_bytes().to_vec()),
        }
    }
}

#[derive(Clone)]
enum Pool {
    Pg(PgPool),
    My(MySqlPool),
}

/// The `postgres` kind.
pub fn postgres() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::POSTGRES.name, |ctx| {
        SqlSource::open(Dialect::Postgres, ctx, "postgres", |s| s.postgres.as_ref())
    })
}

/// The `mysql` kind.
pub fn mysql() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::MYSQL.name, |ctx| {
        SqlSource::open(Dialect::MySql, ctx, "mysql", |s| s.mysql.as_ref())
    })
}

/// The `mariadb` kind (MySQL's protocol and dialect).
pub fn mariadb() -> SourceFactory {
    SourceFactory::new(obsrv_crds::source::sql::MARIADB.name, |ctx| {
        SqlSource::open(Dialect::MySql, ctx, "mariadb", |s| s.mariadb.as_ref())
    })
}
/// A Postgres/MySQL/MariaDB source over one or more tables, read round-robin.
pub struct SqlSource {
    dialect: Dialect,
    /// `host:port`, named in every error of a running read.
    endpoint: String,
    instance: String,
    pool: Pool,
    plans: Vec<TablePlan>,
    position: SqlPosition,
    batch_size: usize,
    next_table: usize,
    stream: Option<keyset::RowStream>,
}

impl SqlSource {
    /// Opens the table source `field` of the context's spec.
    async fn open(
        dialect: Dialect,
        ctx: OpenContext,
        kind: &str,
        field: fn(&obsrv_crds::SourceSpec) -> Option<&SqlSourceSpec>,
    ) -> Result<SqlSource> {
        let spec = super::spec_of(&ctx.config, kind, field)?;
        SqlSource::connect(
            dialect,
            spec,
            &ctx.secrets,
            &ctx.instance(),
            ctx.position.as_ref(),
        )
        .await
    }

    /// Connects, resolves every table against its catalog, and starts after `position`.
    pub async fn connect(
        dialect: Dialect,
        spec: &SqlSourceSpec,
        secrets: &Secrets,
        instance: &str,
        position: Option<&serde_json::Value>,
    ) -> Result<SqlSource> {
        let endpoint = Endpoint::from(spec);
        check_tls_ca(secrets, spec.tls.as_ref())?;
        let login = Login::from_secrets(secrets);
        let pool = match dialect {
            Dialect::Postgres => Pool::Pg(postgres::pool(&endpoint, &login, 2).await?),
            Dialect::MySql => Pool::My(mysql::pool(&endpoint, &login, 2).await?),
        };
        let mut plans = Vec::new();
        for t in &spec.tables {
            plans.push(match &pool {
                Pool::Pg(p) => postgres::resolve_table(p, t).await?,
                Pool::My(p) => mysql::resolve_table(p, t, &spec.database).await?,
            });
        }
        let position = SqlPosition::from_value(position)?;
        let port = endpoint.port_or(match dialect {
            Dialect::Postgres => 5432,
            Dialect::MySql => 3306,
        });
        Ok(SqlSource {
            endpoint: format!("{}:{port}", spec.host),
            dialect,
            instance: instance.to_string(),
            pool,
            plans,
            position,
            batch_size: spec.batch_size.max(1) as usize,
            next_table: 0,
            stream: None,
        })
    }
}

impl SqlSource {
    /// Errors of a running read name the endpoint: a dropped connection or a pool that cannot open
    /// a new one says where, not just "pool timed out".
    fn located(&self, e: Error) -> Error {
        match e {
            Error::SourceUnreachable(m) if m.contains("pool timed out") => {
                Error::SourceUnreachable(format!(
                    "no connection to {} could be opened: is the database reachable there?",
                    self.endpoint
                ))
            }
            Error::SourceUnreachable(m) if !m.contains(&self.endpoint) => {
                Error::SourceUnreachable(format!("{}: {m}", self.endpoint))
            }
            e => e,
        }
    }

    async fn read_next(&mut self) -> Result<Option<Batch>> {
        let n = self.plans.len();
        for k in 0..n {
            let i = (self.next_table + k) % n;
            let records = if self.plans[i].tie_breaker.is_some() {
                self.read_streamed(i).await?
            } else {
                self.read_table(i).await?
            };
            if !records.is_empty() {
                self.next_table = (i + 1) % n;
                let position = serde_json::to_value(&self.position)
                    .map_err(|e| Error::State(e.to_string()))?;
                return Ok(Some(Batch {
                    records,
                    position,
                    watermark: self.position.watermark(),
                }));
            }
        }
        Ok(None)
    }
}

impl Source for SqlSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let res = self.read_next().await;
        res.map_err(|e| self.located(e))
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        measure_lag(
            self.dialect,
            self.pool.clone(),
            self.plans.clone(),
            self.position.clone(),
        )
        .await
    }

    fn describe(&self) -> String {
        let tables: Vec<&str> = self.plans.iter().map(|p| p.name.as_str()).collect();
        format!("{:?} tables {}", self.dialect, tables.join(", "))
    }

    fn lag_task(&self) -> Option<futures::future::BoxFuture<'static, Result<Option<Lag>>>> {
        Some(Box::pin(measure_lag(
            self.dialect,
            self.pool.clone(),
            self.plans.clone(),
            self.position.clone(),
        )))
    }
}

/// Rows after the position (capped count) and the age of the oldest of them, over every table.
async fn measure_lag(
    dialect: Dialect,
    pool: Pool,
    plans: Vec<TablePlan>,
    position: SqlPosition,
) -> Result<Option<Lag>> {
    let started = Instant::now();
    let mut total = 0i64;
    let mut seconds: Option<f64> = None;
    for plan in &plans {
        let pos = position.tables.get(&plan.name);
        let estimate = match &pool {
            Pool::Pg(p) => {
                let mut q = sqlx::query_scalar(AssertSqlSafe(plan.estimate_query(pos.is_some())));
                for b in plan.binds(Page::After, pos) {
                    q = q.bind(b);
                }
                let top: String = q.fetch_one(p).await.map_err(from_sqlx)?;
                plan_rows(&top)
            }
            Pool::My(_) => None,
        };
        let n: i64 = match estimate {
            Some(e) if e >= EXACT_LAG_BELOW => e,
            _ => {
                let sql = plan.count_query(pos.is_some());
                let binds = plan.binds(Page::After, pos);
                with_pool!(&pool, p => {
                    let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    q.fetch_one(p).await.map_err(from_sqlx)?
                })
            }
        };
        total += n;
        if n > 0
            && let Some(sql) = plan.age_query(pos.is_some())
        {
            let binds = plan.binds(Page::After, pos);
            let age: Option<f64> = with_pool!(&pool, p => {
                let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
                for b in binds {
                    q = q.bind(b);
                }
                q.fetch_one(p).await.map_err(from_sqlx)?
            });
            if let Some(a) = age {
                seconds = Some(seconds.map_or(a, |s: f64| s.max(a)));
            }
        }
    }
    tracing::debug!(
        ?dialect,
        elapsed_ms = started.elapsed().as_millis() as u64,
        lag = total,
        "lag measured"
    );
    Ok(Some(Lag {
        records: total,
        seconds: if total == 0 { Some(0.0) } else { seconds },
        bytes: None,
    }))
}
