//! Postgres table -> ingest topic, per table shape, against this machine's bounds measured in the
//! same run:
//!
//! 1. `psql \copy (SELECT row_to_json(t) FROM <table> t) TO '/dev/null'`: how fast the rows leave
//!    the database as JSON it renders (faster than a COPY into this process; the connector's
//!    streaming read, which renders the same JSON itself from binary COPY, costs the database
//!    less than half of this);
//! 2. `COPY ... TO STDOUT` through sqlx into this process, which also keeps the rows for 3;
//! 3. raw produce of those rows to the broker with the connector's producer settings: how fast the
//!    broker takes them;
//! 4. `psql \copy ... TO STDOUT` piped into a raw produce of each line, both at once: the same rows
//!    out of the database and into the broker with nothing in between but a line split, and the
//!    database, the broker and the mover sharing the machine's cores as they do for the connector.
//!    The ratios are taken against this bound;
//! 5. the same pipe producing the records the connector writes (each row in Obsrv's envelope, a
//!    32-character id as key and in the `obsrv-event-id` header): the data contract's cost with
//!    nothing else in between, so the connector's ratio to it tells what is left to win in the
//!    connector itself;
//!
//! then the connector (`schedule: once`, as its own process) loading the table once per delivery
//! (`atLeastOnce`, `exactlyOnce`), until its `/status` says Idle. With `--runs N` everything is
//! measured N times and the report gives the medians.
//!
//! Targets (DESIGN §7, issue 17): atLeastOnce >= 0.9 of the bound with a peak RSS < 64 MiB;
//! exactlyOnce >= 0.8 of atLeastOnce.

use std::{process::Stdio, time::Instant};

use anyhow::{Context as _, Result, bail};
use futures::{FutureExt as _, StreamExt as _};
use obsrv_connector::envelope::Context;
use obsrv_connector::sink::Acks;
use obsrv_connector::sink::kafka::enqueue;
use obsrv_crds::{Delivery, runtime::env};
use obsrv_e2e::services::{Postgres, SqlEndpoint};
use sqlx::{Connection as _, postgres::PgConnection};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::{
    Bench, SourceBench, broker,
    connector::{Connector, Usage, ingested},
    delivery_name,
};

pub const BENCH: SourceBench = SourceBench {
    name: "postgres",
    run: |b| run(b).boxed_local(),
};

/// A table shape: its name in `--shape`, its table and how to fill it.
pub struct Shape {
    name: &'static str,
    table: &'static str,
    /// What the rows look like, for the report.
    about: &'static str,
    /// SQL that (re)creates the table with `rows` rows and an index on the connector's cursor.
    load: fn(usize) -> String,
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "orders",
        table: "obsrv_bench",
        about: "orders: id, updated_at, customer, amount numeric, status, items, doc jsonb (small)",
        load: |rows| {
            format!(
                "DROP TABLE IF EXISTS obsrv_bench; \
                 CREATE TABLE obsrv_bench (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL, customer text, \
                 amount numeric(12,2), status text, items int, doc jsonb); \
                 INSERT INTO obsrv_bench SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', 'customer-' || (g % 9973), \
                 (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 17, \
                 jsonb_build_object('sku', 'sku-' || (g % 501), 'qty', g % 5) FROM generate_series(1, {rows}) g; \
                 CREATE INDEX ON obsrv_bench (updated_at, id);"
            )
        },
    },
    Shape {
        name: "events",
        table: "obsrv_bench_events",
        about: "events: id, ts, user_id, kind, amount numeric, payload jsonb (~200 B)",
        load: |rows| {
            format!(
                "DROP TABLE IF EXISTS obsrv_bench_events; \
                 CREATE TABLE obsrv_bench_events (id bigint PRIMARY KEY, ts timestamptz NOT NULL, user_id int, kind text, \
                 amount numeric(12,2), payload jsonb); \
                 INSERT INTO obsrv_bench_events SELECT g, timestamptz '2024-01-01' + g * interval '1 ms', g % 50021, \
                 (ARRAY['view','click','add_to_cart','purchase'])[1 + g % 4], (g % 100000) / 100.0, \
                 jsonb_build_object('page', '/products/' || (g % 1009), 'session', md5(g::text), \
                 'referrer', 'https://search.example.com/?q=item-' || (g % 211), 'device', \
                 jsonb_build_object('os', (ARRAY['android','ios','windows','macos'])[1 + g % 4], 'screen', '1920x1080'), \
                 'ab', g % 2 = 0) FROM generate_series(1, {rows}) g; \
                 CREATE INDEX ON obsrv_bench_events (ts, id);"
            )
        },
    },
];

/// One run's figures for one shape, in seconds for the whole table.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub psql_secs: f64,
    pub copy_secs: f64,
    pub produce_secs: f64,
    pub pipe_secs: f64,
    /// Bound 5: the pipe producing the connector's records (envelope, key, id header).
    pub envelope_pipe_secs: f64,
    /// Per delivery: seconds (start-up included) and what the connector used.
    pub connector: Vec<(Delivery, f64, Usage)>,
}

impl Run {
    /// The connector's seconds and usage with `d`, when this run had it.
    fn connector_of(&self, d: Delivery) -> Option<(f64, Usage)> {
        self.connector.iter().find(|c| c.0 == d).map(|c| (c.1, c.2))
    }
}

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => xs[n / 2],
        _ => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The report of one shape over every run.
pub fn report(shape: &Shape, rows: usize, json_bytes: usize, runs: &[Run]) -> String {
    let rate = |secs: Vec<f64>| rows as f64 / median(secs);
    let of = |f: fn(&Run) -> f64| rate(runs.iter().map(f).collect());
    let pipe = of(|r| r.pipe_secs);
    let mut out = format!(
        "shape {} ({:.1} MiB of row JSON; medians of {} run(s), rows/s)\n\
         \x20 bound psql \\copy row_to_json to /dev/null:     {:>8.0}\n\
         \x20 bound COPY row_to_json into the bench (sqlx): {:>8.0}\n\
         \x20 bound raw produce of the rows to the broker:  {:>8.0}\n\
         \x20 bound psql \\copy | raw produce, at once:      {:>8.0}  <- the ratios' bound\n\
         \x20 bound the same, producing the connector's records (envelope, key, id header): {:>8.0}\n",
        shape.about,
        json_bytes as f64 / (1 << 20) as f64,
        runs.len(),
        of(|r| r.psql_secs),
        of(|r| r.copy_secs),
        of(|r| r.produce_secs),
        pipe,
        of(|r| r.envelope_pipe_secs),
    );
    let deliveries: Vec<Delivery> = runs
        .first()
        .map(|r| r.connector.iter().map(|c| c.0).collect())
        .unwrap_or_default();
    // The targets hold "in the median of the runs": ratios are taken per run (each against the
    // bound measured beside it), then their median.
    let per_run =
        |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    let listed = |xs: &[f64]| {
        xs.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for d in deliveries {
        let used = |f: fn(&Usage) -> f64| median(per_run(&|r| r.connector_of(d).map(|c| f(&c.1))));
        let ratios = per_run(&|r| r.connector_of(d).map(|c| r.pipe_secs / c.0));
        let to_records = per_run(&|r| r.connector_of(d).map(|c| r.envelope_pipe_secs / c.0));
        out += &format!(
            "  obsrv-connector {:<12} {:>8.0}  ratio {:.2} (runs: {}; to the same records: {:.2}), peak RSS {:.1} MiB, CPU {:.1}s",
            delivery_name(d),
            rate(per_run(&|r| r.connector_of(d).map(|c| c.0))),
            median(ratios.clone()),
            listed(&ratios),
            median(to_records),
            used(Usage::peak_rss_mib),
            used(|u| u.cpu_secs),
        );
        out += match d {
            Delivery::AtLeastOnce => "  (targets: ratio >= 0.9, RSS < 64 MiB)\n",
            Delivery::ExactlyOnce => "\n",
        };
    }
    let of_alo = per_run(&|r| {
        Some(r.connector_of(Delivery::AtLeastOnce)?.0 / r.connector_of(Delivery::ExactlyOnce)?.0)
    });
    if !of_alo.is_empty() {
        out += &format!(
            "  exactlyOnce / atLeastOnce: {:.2} (runs: {}; target >= 0.8)\n",
            median(of_alo.clone()),
            listed(&of_alo)
        );
    }
    out
}

/// The Connector that loads `table` once with `delivery`.
fn manifest(b: &Bench, pg: &SqlEndpoint, shape: &Shape, delivery: Delivery, n: usize) -> String {
    let cursor = match shape.name {
        "events" => "ts",
        _ => "updated_at",
    };
    format!(
        "apiVersion: obsrv.io/v1alpha1\nkind: Connector\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  dataset: bench\n  \
         delivery: {}\n  schedule: {{once: true}}\n  source:\n    postgres:\n      host: {}\n      port: {}\n      database: {}\n      \
         credentials: {{secretName: pg}}\n      tls: {{mode: disable}}\n      \
         tables: [{{name: {}, cursor: {{column: {cursor}, tieBreaker: id}}}}]\n      batchSize: {}\n",
        b.name(&format!(
            "{}-{}-{n}",
            shape.name,
            delivery_name(delivery).to_lowercase()
        )),
        delivery_name(delivery),
        pg.host,
        pg.port,
        pg.database,
        shape.table,
        b.batch_size,
    )
}

/// `psql` on `pg` running one command, its output on a pipe.
fn psql(pg: &SqlEndpoint, command: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("psql");
    c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command])
        .arg(pg.url("postgres"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Bound 1: psql's `\copy` of the rows as JSON to /dev/null.
async fn psql_to_null(pg: &SqlEndpoint, table: &str) -> Result<f64> {
    let t = Instant::now();
    let out = psql(
        pg,
        &format!("\\copy (SELECT row_to_json(t) FROM {table} t) TO '/dev/null'"),
    )
    .output()
    .await
    .context("running psql (apt: postgresql-client)")?;
    if !out.status.success() {
        bail!("psql \\copy to /dev/null: {}", out.status);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Bound 2: the rows as JSON through sqlx's COPY into this process; returns them with the time.
async fn copy_in(pg: &SqlEndpoint, table: &str) -> Result<(f64, Vec<Vec<u8>>)> {
    let mut conn = PgConnection::connect(&pg.url("postgres")).await?;
    let t = Instant::now();
    let mut rows: Vec<Vec<u8>> = Vec::new();
    let mut stream = conn
        .copy_out_raw(&format!(
            "COPY (SELECT row_to_json(t) FROM {table} t) TO STDOUT"
        ))
        .await
        .context("COPY")?;
    let mut partial = Vec::new();
    while let Some(chunk) = stream.next().await {
        partial.extend_from_slice(&chunk.context("COPY")?);
        let mut start = 0;
        while let Some(i) = partial[start..].iter().position(|&c| c == b'\n') {
            rows.push(partial[start..start + i].to_vec());
            start += i + 1;
        }
        partial.drain(..start);
    }
    Ok((t.elapsed().as_secs_f64(), rows))
}

/// What the pipe of bounds 4 and 5 produces for each row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Produce {
    /// The row's JSON, a row number as key (bound 4).
    Rows,
    /// The row in the envelope, a 32-character id as key and header (bound 5).
    Records,
}

/// Bounds 4 and 5: psql's `\copy ... TO STDOUT` read line by line, each line produced as it
/// arrives.
async fn pipe(
    b: &Bench,
    pg: &SqlEndpoint,
    table: &str,
    topic: &str,
    produce: Produce,
) -> Result<f64> {
    let producer = broker::sink_producer(&b.sink)?;
    broker::warm_up(&producer, topic).await?;
    let t = Instant::now();
    let mut child = psql(
        pg,
        &format!("\\copy (SELECT row_to_json(t) FROM {table} t) TO STDOUT"),
    )
    .spawn()
    .context("running psql")?;
    let mut lines = BufReader::with_capacity(1 << 16, child.stdout.take().context("psql stdout")?);
    let acks = Acks::new();
    // An instance name as long as the connector's: it is in every envelope.
    let envelope = Context::new(
        "bench",
        &format!("bench/{}", b.name("records-bound")),
        "postgres",
    );
    let syncts = chrono::Utc::now().timestamp_millis();
    let (mut line, mut n) = (Vec::new(), 0usize);
    while lines.read_until(b'\n', &mut line).await? > 0 {
        let row = line.strip_suffix(b"\n").unwrap_or(&line);
        match produce {
            Produce::Rows => {
                let key = n.to_string();
                enqueue(
                    &producer,
                    topic,
                    Some(key.as_bytes()),
                    Some(row),
                    None,
                    &acks,
                )
                .await?;
            }
            Produce::Records => {
                let row = std::str::from_utf8(row)?;
                broker::produce_record(&producer, topic, &envelope, syncts, n as u64, row, &acks)
                    .await?;
            }
        }
        n += 1;
        line.clear();
    }
    acks.wait().await?;
    let status = child.wait().await?;
    if !status.success() || n != b.rows {
        bail!("psql \\copy | produce: {status}, {n} rows of {}", b.rows);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The connector loading the table once with `delivery`: seconds and usage.
async fn connector(
    b: &Bench,
    pg: &SqlEndpoint,
    shape: &Shape,
    delivery: Delivery,
    n: usize,
) -> Result<(f64, Usage)> {
    let mut connector = Connector::spawn(
        &manifest(b, pg, shape, delivery, n),
        &b.sink,
        &[
            (env::SOURCE_USERNAME, &pg.user),
            (env::SOURCE_PASSWORD, &pg.password),
        ],
    )?;
    let (secs, ingested) = connector
        .wait_for(|s, secs| (s["state"] == "Idle").then(|| (secs, ingested(s))))
        .await?;
    let usage = connector.stop();
    if ingested != b.rows as u64 {
        bail!(
            "the connector ({}) ingested {ingested} rows, expected {}",
            delivery_name(delivery),
            b.rows
        );
    }
    Ok((secs, usage))
}

pub async fn run(b: &Bench) -> Result<String> {
    let (_server, pg) = match &b.postgres_url {
        Some(url) => (None, SqlEndpoint::parse(url)?),
        None => {
            let server = Postgres::start().await?;
            let pg = SqlEndpoint::parse(&server.url())?;
            (Some(server), pg)
        }
    };
    let mut conn = PgConnection::connect(&pg.url("postgres"))
        .await
        .with_context(|| format!("connecting to Postgres at {}:{}", pg.host, pg.port))?;
    let mut out = format!("rows: {} per shape\n", b.rows);
    for shape in SHAPES
        .iter()
        .filter(|s| b.shapes.iter().any(|n| n == s.name))
    {
        eprintln!("loading {} rows of {} ...", b.rows, shape.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe((shape.load)(b.rows)))
            .execute(&mut conn)
            .await
            .context("loading the table")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "VACUUM ANALYZE {}",
            shape.table
        )))
        .execute(&mut conn)
        .await
        .context("vacuum")?;
        let mut runs = Vec::new();
        let mut json_bytes = 0;
        for n in 1..=b.runs {
            eprintln!("{} run {n}/{}: bounds ...", shape.name, b.runs);
            let mut run = Run {
                psql_secs: psql_to_null(&pg, shape.table).await?,
                ..Run::default()
            };
            let (copy_secs, rows) = copy_in(&pg, shape.table).await?;
            if rows.len() != b.rows {
                bail!("COPY returned {} rows, expected {}", rows.len(), b.rows);
            }
            run.copy_secs = copy_secs;
            json_bytes = rows.iter().map(|r| r.len() + 1).sum();
            let raw = b.name(&format!("raw-{}-{n}", shape.name));
            let piped = b.name(&format!("pipe-{}-{n}", shape.name));
            let enveloped = b.name(&format!("pipe-records-{}-{n}", shape.name));
            broker::create_topics(&b.sink, &[(&raw, 1), (&piped, 1), (&enveloped, 1)]).await?;
            let producer = broker::sink_producer(&b.sink)?;
            broker::warm_up(&producer, &raw).await?;
            let t = Instant::now();
            broker::produce_numbered(&producer, &raw, &rows).await?;
            run.produce_secs = t.elapsed().as_secs_f64();
            drop((rows, producer));
            run.pipe_secs = pipe(b, &pg, shape.table, &piped, Produce::Rows).await?;
            run.envelope_pipe_secs =
                pipe(b, &pg, shape.table, &enveloped, Produce::Records).await?;
            for &d in &b.deliveries {
                eprintln!(
                    "{} run {n}/{}: connector {} ...",
                    shape.name,
                    b.runs,
                    delivery_name(d)
                );
                let (secs, usage) = connector(b, &pg, shape, d, n).await?;
                run.connector.push((d, secs, usage));
            }
            runs.push(run);
        }
        out += &report(shape, b.rows, json_bytes, &runs);
    }
    Ok(out)
}
