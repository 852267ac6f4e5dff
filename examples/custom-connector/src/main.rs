//! An example custom connector built on the obsrv-connector SDK: reads newline-delimited JSON
//! events from an HTTP API, page by page, and resumes after the last event delivered.
//!
//! The API it reads is an append-only event log: `GET <url>?offset=<n>&limit=<m>` answers up to
//! `m` events from the `n`-th on (0-based), one JSON object per line; an optional `X-Total-Count`
//! header gives the number of events in the log (the connector's lag is that minus its offset).
//! Config (`spec.source.custom.config`):
//!
//! ```yaml
//! config:
//!   url: http://events-api.shop.svc:8080/events
//!   pageSize: 500                                   # optional, default 500
//!   token: {secret: events-api-token, key: token}   # optional bearer token from a mounted Secret
//! ```
//!
//! Everything else — the envelope, the failed topic, state, retries, `/status`, `/metrics`,
//! signals — comes from the runtime, exactly as for the built-in sources.

use std::process::ExitCode;

use obsrv_connector::{
    Error, Result,
    envelope::{event_id, validate},
    source::{Batch, Lag, OpenContext, Record, Registry, Source},
};
use serde::Deserialize;

fn main() -> ExitCode {
    obsrv_connector::cli::main(Registry::custom(open))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    url: String,
    #[serde(default = "default_page")]
    page_size: u32,
    #[serde(default)]
    token: Option<SecretRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretRef {
    secret: String,
    key: String,
}

fn default_page() -> u32 {
    500
}

/// The position: how many events of the log are delivered.
#[derive(serde::Serialize, Deserialize, Default)]
struct Position {
    offset: u64,
}

struct EventsApi {
    http: reqwest::Client,
    url: String,
    page_size: u32,
    token: Option<String>,
    instance: String,
    offset: u64,
    total: Option<u64>,
}

async fn open(ctx: OpenContext) -> Result<EventsApi> {
    let config: Config = ctx.custom_config()?;
    if config.page_size == 0 {
        return Err(Error::Config(
            "spec.source.custom.config.pageSize must be at least 1".into(),
        ));
    }
    let token = match &config.token {
        Some(t) => Some(ctx.secret(&t.secret, &t.key)?),
        None => None,
    };
    let position: Position = match &ctx.position {
        Some(p) => serde_json::from_value(p.clone())
            .map_err(|e| Error::State(format!("not a position of this connector: {e}")))?,
        None => Position::default(),
    };
    let mut api = EventsApi {
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?,
        url: config.url,
        page_size: config.page_size,
        token,
        instance: ctx.instance(),
        offset: position.offset,
        total: None,
    };
    // Reach the API now, so a wrong URL or token shows at start (and in `check`).
    api.page(0).await?;
    Ok(api)
}

impl EventsApi {
    /// Up to `limit` events from the position on (and the log's `X-Total-Count`).
    async fn page(&mut self, limit: u32) -> Result<Vec<String>> {
        let mut req = self.http.get(&self.url).query(&[
            ("offset", self.offset.to_string()),
            ("limit", limit.to_string()),
        ]);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::SourceUnreachable(format!("GET {}: {e}", self.url)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(Error::AuthFailed(format!(
                "GET {} answered {status}: check the token",
                self.url
            )));
        }
        if !status.is_success() {
            return Err(Error::SourceUnreachable(format!(
                "GET {} answered {status}",
                self.url
            )));
        }
        self.total = resp
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp
            .text()
            .await
            .map_err(|e| Error::SourceUnreachable(format!("GET {}: {e}", self.url)))?;
        Ok(body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }
}

impl Source for EventsApi {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let lines = self.page(self.page_size).await?;
        if lines.is_empty() {
            return Ok(None);
        }
        // Every line is one event of the log, whatever it holds: its offset is its identity, so a
        // line that is not a JSON object goes to the failed topic and the position moves past it.
        let records = lines
            .into_iter()
            .map(|line| {
                let offset = self.offset;
                self.offset += 1;
                Record {
                    id: event_id(&self.instance, &[&offset.to_string()]),
                    payload: validate(line.as_bytes()),
                }
            })
            .collect();
        Ok(Some(Batch {
            records,
            position: serde_json::to_value(Position {
                offset: self.offset,
            })
            .map_err(|e| Error::State(e.to_string()))?,
            watermark: Some(format!("offset {}", self.offset)),
        }))
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        Ok(self.total.map(|total| Lag {
            records: total.saturating_sub(self.offset) as i64,
            seconds: None,
            bytes: None,
        }))
    }

    fn describe(&self) -> String {
        let total = self.total.map(|t| format!(" of {t}")).unwrap_or_default();
        format!("events API {} at offset {}{total}", self.url, self.offset)
    }
}
