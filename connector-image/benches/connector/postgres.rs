//! Postgres table -> ingest topic, against this machine's two bounds measured in the same run:
//!
//! 1. `COPY (SELECT row_to_json(t) FROM obsrv_bench t) TO STDOUT` out of Postgres: how fast rows
//!    can leave the database as JSON at all;
//! 2. raw produce of those same payloads to the broker with the connector's producer settings:
//!    how fast the broker takes them;
//! 3. the connector (`schedule: once`) loading the table, until its `/status` says Idle.
//!
//! Target (DESIGN §7): ratio to the slower bound >= 0.7, peak RSS < 64 MiB.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use futures::{FutureExt as _, StreamExt as _};
use obsrv_crds::runtime::env;
use obsrv_e2e::services::{Postgres, SqlEndpoint};
use sqlx::{Connection as _, postgres::PgConnection};

use super::{
    Bench, SourceBench, broker,
    connector::{Connector, Usage},
};

pub const BENCH: SourceBench = SourceBench {
    name: "postgres",
    run: |b| run(b).map(|f| f.map(|f| f.report())).boxed_local(),
};

/// What the bench measured.
#[derive(Debug)]
pub struct Figures {
    pub rows: usize,
    pub json_bytes: usize,
    pub copy_secs: f64,
    pub produce_secs: f64,
    pub connector_secs: f64,
    pub connector: Usage,
}

impl Figures {
    /// The connector's rows/s over the slower bound's.
    pub fn ratio(&self) -> f64 {
        self.copy_secs.max(self.produce_secs) / self.connector_secs
    }

    pub fn report(&self) -> String {
        let rate = |secs: f64| self.rows as f64 / secs;
        format!(
            "rows: {} ({:.1} MiB of row JSON)\n\
             bound COPY row_to_json out of Postgres: {:>10.0} rows/s ({:.2}s)\n\
             bound raw produce to the broker:        {:>10.0} rows/s ({:.2}s)\n\
             obsrv-connector Postgres -> broker:     {:>10.0} rows/s ({:.2}s, start-up included)\n\
             ratio to the slower bound: {:.2} (target >= 0.7)\n\
             connector peak RSS: {:.1} MiB (target < 64 MiB), CPU {:.2}s",
            self.rows,
            self.json_bytes as f64 / (1 << 20) as f64,
            rate(self.copy_secs),
            self.copy_secs,
            rate(self.produce_secs),
            self.produce_secs,
            rate(self.connector_secs),
            self.connector_secs,
            self.ratio(),
            self.connector.peak_rss_mib(),
            self.connector.cpu_secs,
        )
    }
}

/// The table's rows: realistic orders, with a `jsonb` column.
fn load_sql(rows: usize) -> String {
    format!(
        "DROP TABLE IF EXISTS obsrv_bench; \
         CREATE TABLE obsrv_bench (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, customer text, amount numeric(12,2), \
         status text, items int, doc jsonb); \
         INSERT INTO obsrv_bench SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', 'customer-' || (g % 9973), \
         (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 17, \
         jsonb_build_object('sku', 'sku-' || (g % 501), 'qty', g % 5) FROM generate_series(1, {rows}) g; \
         CREATE INDEX ON obsrv_bench (updated_at, id);"
    )
}

/// The Connector that loads the table once.
fn manifest(b: &Bench, pg: &SqlEndpoint) -> String {
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         schedule: {{once: true}}\n  source:\n    postgres:\n      host: {}\n      port: {}\n      database: {}\n      \
         credentials: {{secretName: pg}}\n      tls: {{mode: disable}}\n      \
         tables: [{{name: obsrv_bench, cursor: {{column: updated_at, tieBreaker: id}}}}]\n      batchSize: {}\n",
        b.name("connector"),
        pg.host,
        pg.port,
        pg.database,
        b.batch_size,
    )
}

pub async fn run(b: &Bench) -> Result<Figures> {
    let (_server, pg) = match &b.postgres_url {
        Some(url) => (None, SqlEndpoint::parse(url)?),
        None => {
            let server = Postgres::start().await?;
            let pg = SqlEndpoint::parse(&server.url())?;
            (Some(server), pg)
        }
    };
    let url = pg.url("postgres");
    let mut conn = PgConnection::connect(&url)
        .await
        .with_context(|| format!("connecting to Postgres at {}:{}", pg.host, pg.port))?;
    eprintln!("loading {} rows into Postgres ...", b.rows);
    sqlx::raw_sql(sqlx::AssertSqlSafe(load_sql(b.rows)))
        .execute(&mut conn)
        .await
        .context("loading the table")?;
    sqlx::raw_sql("VACUUM ANALYZE obsrv_bench")
        .execute(&mut conn)
        .await
        .context("vacuum")?;

    // Bound 1: COPY of row_to_json.
    eprintln!("bound 1: COPY row_to_json ...");
    let t = Instant::now();
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(b.rows);
    let mut json_bytes = 0usize;
    {
        let mut stream = conn
            .copy_out_raw("COPY (SELECT row_to_json(t) FROM obsrv_bench t) TO STDOUT")
            .await
            .context("COPY")?;
        let mut partial = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("COPY")?;
            json_bytes += chunk.len();
            partial.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(i) = partial[start..].iter().position(|&c| c == b'\n') {
                payloads.push(partial[start..start + i].to_vec());
                start += i + 1;
            }
            partial.drain(..start);
        }
    }
    let copy_secs = t.elapsed().as_secs_f64();
    if payloads.len() != b.rows {
        bail!("COPY returned {} rows, expected {}", payloads.len(), b.rows);
    }
    drop(conn);

    // Bound 2: raw produce with the connector's producer settings.
    eprintln!("bound 2: raw produce ...");
    let raw = b.name("raw");
    broker::create_topics(&b.sink, &[(&raw, 1)]).await?;
    let producer = broker::sink_producer(&b.sink)?;
    broker::warm_up(&producer, &raw).await?;
    let t = Instant::now();
    broker::produce_numbered(&producer, &raw, &payloads).await?;
    let produce_secs = t.elapsed().as_secs_f64();
    drop(payloads);
    drop(producer);

    // The connector, as its own process.
    eprintln!("connector ...");
    let mut connector = Connector::spawn(
        &manifest(b, &pg),
        &b.sink,
        &[
            (env::SOURCE_USERNAME, &pg.user),
            (env::SOURCE_PASSWORD, &pg.password),
        ],
    )?;
    let (connector_secs, ingested) = connector
        .wait_for(|s, secs| {
            (s["state"] == "Idle")
                .then(|| (secs, s["totals"]["recordsIngested"].as_u64().unwrap_or(0)))
        })
        .await?;
    let usage = connector.stop();
    if ingested != b.rows as u64 {
        bail!(
            "the connector ingested {ingested} rows, expected {}",
            b.rows
        );
    }
    Ok(Figures {
        rows: b.rows,
        json_bytes,
        copy_secs,
        produce_secs,
        connector_secs,
        connector: usage,
    })
}
