//! Marketplace connectors: an Airbyte source or a Singer tap, run as a child process and driven
//! through its JSON-lines protocol (`spec.source.custom.protocol: airbyte | singer`).
//!
//! The program's config, catalog and last committed state go to a private directory (0700, files
//! 0600, removed when the source closes). Its stdout is read line by line with a bound on a line's
//! size: RECORD messages become records; a STATE message closes a batch whose position is that
//! state, so the runner commits it only once the sink acknowledged every record before it, and a
//! restart hands it back to the program. LOG messages become log lines, error TRACE messages and a
//! failed CONNECTION_STATUS the Connector's reason, with the program's own words. Lines that are
//! not JSON go to the failed topic with their line number. Secret values never reach a log line:
//! the program's stderr and messages are redacted.
//!
//! Record ids are `event_id(instance, [state the records follow, stream/n])`: a program that
//! replays from a state emits the same records in the same order, so redeliveries after a restart
//! carry the same ids.

mod airbyte;
mod program;
mod singer;

use obsrv_crds::source::custom::{CUSTOM, CustomSourceSpec, Protocol};
use serde_json::Value;

use super::{Batch, OpenContext, Record, Source, SourceFactory};
use crate::{
    envelope::{EventIds, Payload},
    error::{Error, Result},
};
use program::{Line, Program, Redactor, WorkDir};

/// Records handed out in one batch at most (a STATE message ends a batch sooner).
const MAX_BATCH_RECORDS: usize = 5_000;
/// Bytes of payload in one batch at most.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// The `custom` kind of the shared image: marketplace programs. A native custom source runs its
/// own image (built with `Registry::custom`), never this one.
pub fn factory() -> SourceFactory {
    SourceFactory::new(CUSTOM.name, open)
}

/// What differs between the two protocols.
trait Dialect: Send + Sync + 'static {
    /// `airbyte` or `singer`, for messages.
    fn name(&self) -> &'static str;
    /// Checks the config and builds the catalog to read with (runs the program's check and
    /// discover); returns a one-line description for `obsrv-connector check`.
    fn prepare(
        &mut self,
        program: &Program,
        dir: &WorkDir,
    ) -> impl Future<Output = Result<String>> + Send;
    /// The arguments of a read, with the files it needs written into `dir`.
    fn read_args(&self, dir: &WorkDir, state: Option<&Value>) -> Result<Vec<String>>;
    /// What one line of output means.
    fn parse(&self, msg: Value, state: Option<&Value>) -> Message;
}

/// One message of the program's output.
#[derive(Debug, PartialEq)]
pub enum Message {
    Record {
        stream: String,
        data: Value,
    },
    /// The whole state to resume from (already merged with the previous one where the protocol
    /// sends parts of it).
    State(Value),
    Log {
        level: String,
        message: String,
    },
    /// The program says it failed: `config` when its config is wrong (retrying does not help).
    Failed {
        message: String,
        config: bool,
    },
    Other,
}

async fn open(ctx: OpenContext) -> Result<ProgramSource> {
    let spec = ctx.config.spec.source.custom.clone().ok_or_else(|| {
        Error::Config("this connector reads spec.source.custom, which is not set".into())
    })?;
    match spec.protocol {
        Protocol::Airbyte => {
            let dialect = airbyte::Airbyte::new(&spec.streams);
            ProgramSource::open(ctx, spec, dialect).await
        }
        Protocol::Singer => {
            let dialect = singer::Singer::new(&spec.streams);
            ProgramSource::open(ctx, spec, dialect).await
        }
        Protocol::Native => Err(Error::Config(format!(
            "spec.source.custom.protocol is native: image {} must be built on the obsrv-connector SDK and run its own runtime, not this one",
            spec.image
        ))),
    }
}

/// A marketplace program as a source; one read of it at a time.
pub struct ProgramSource {
    dialect: Box<dyn DynDialect>,
    program: Program,
    dir: WorkDir,
    describe: String,
    instance: String,
    /// The state the records being read follow (the last one seen).
    state: Option<Value>,
    ids: EventIds,
    since_state: u64,
    reading: Option<program::Run>,
    /// The last read ended with records still to hand out: the next call says "caught up" once,
    /// and the one after (the runner's poll interval later) starts a new read.
    caught_up_next: bool,
}

/// [`Dialect`] as an object, so one source type serves both protocols.
trait DynDialect: Send + Sync {
    fn name(&self) -> &'static str;
    fn read_args(&self, dir: &WorkDir, state: Option<&Value>) -> Result<Vec<String>>;
    fn parse(&self, msg: Value, state: Option<&Value>) -> Message;
}

impl<D: Dialect> DynDialect for D {
    fn name(&self) -> &'static str {
        Dialect::name(self)
    }
    fn read_args(&self, dir: &WorkDir, state: Option<&Value>) -> Result<Vec<String>> {
        Dialect::read_args(self, dir, state)
    }
    fn parse(&self, msg: Value, state: Option<&Value>) -> Message {
        Dialect::parse(self, msg, state)
    }
}

impl ProgramSource {
    async fn open<D: Dialect>(
        ctx: OpenContext,
        spec: CustomSourceSpec,
        mut dialect: D,
    ) -> Result<ProgramSource> {
        let (config, secrets) = resolve_secrets(&spec.config, &ctx)?;
        let command = match spec.command.as_slice() {
            [] => airbyte::entrypoint()?,
            c => c.to_vec(),
        };
        let program = Program::new(command, Redactor::new(secrets));
        let dir = WorkDir::create()?;
        dir.write("config.json", &config)?;
        let describe = dialect.prepare(&program, &dir).await?;
        let instance = ctx.instance();
        let state = ctx.position.and_then(|p| p.get("state").cloned());
        Ok(ProgramSource {
            ids: ids_after(&instance, state.as_ref()),
            dialect: Box::new(dialect),
            program,
            dir,
            describe,
            instance,
            state,
            since_state: 0,
            reading: None,
            caught_up_next: false,
        })
    }

    fn position(&self) -> Value {
        serde_json::json!({ "state": self.state })
    }

    fn batch(&self, records: Vec<Record>) -> Batch {
        Batch {
            records,
            position: self.position(),
            watermark: Some(format!(
                "{} records since the last {} state",
                self.since_state,
                self.dialect.name()
            )),
        }
    }

    async fn read(&mut self) -> Result<Option<Batch>> {
        if std::mem::take(&mut self.caught_up_next) {
            return Ok(None);
        }
        if self.reading.is_none() {
            self.start()?;
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        loop {
            let run = self.reading.as_mut().expect("a read runs");
            let line = run.next_line().await?;
            match line {
                Line::End => {
                    let run = self.reading.take().expect("a read runs");
                    run.finish().await?;
                    if records.is_empty() {
                        return Ok(None);
                    }
                    self.caught_up_next = true;
                    return Ok(Some(self.batch(records)));
                }
                Line::TooLong { number, preview } => {
                    records.push(self.failed(
                        preview,
                        format!(
                            "line {number} of the program's output is longer than {} bytes",
                            program::MAX_LINE_BYTES
                        ),
                    ));
                }
                Line::Text { number, text } => match serde_json::from_str::<Value>(&text) {
                    Err(e) => {
                        records.push(self.failed(
                            program::preview(&text),
                            format!("line {number} of the program's output is not JSON: {e}"),
                        ));
                    }
                    Ok(msg) => match self.dialect.parse(msg, self.state.as_ref()) {
                        Message::Record { stream, data } => {
                            let payload = match data {
                                Value::Object(_) => Payload::Json(data.to_string()),
                                other => Payload::Unparseable {
                                    raw: program::preview(&other.to_string()),
                                    reason: format!(
                                        "line {number}: the record of stream {stream} is not a JSON object"
                                    ),
                                },
                            };
                            bytes += payload.len();
                            self.since_state += 1;
                            let id = self.ids.id(&format!("{stream}/{}", self.since_state));
                            records.push(Record { id, payload });
                        }
                        Message::State(state) => {
                            self.state = Some(state);
                            let batch = self.batch(records);
                            self.ids = ids_after(&self.instance, self.state.as_ref());
                            self.since_state = 0;
                            return Ok(Some(batch));
                        }
                        Message::Log { level, message } => {
                            let message = self.program.redactor.redact(&message);
                            match level.as_str() {
                                "ERROR" | "FATAL" | "CRITICAL" => {
                                    tracing::error!(program = %self.program.display(), "{message}")
                                }
                                "WARN" | "WARNING" => {
                                    tracing::warn!(program = %self.program.display(), "{message}")
                                }
                                _ => tracing::info!(program = %self.program.display(), "{message}"),
                            }
                        }
                        Message::Failed { message, config } => {
                            let message = self.program.redactor.redact(&message);
                            tracing::error!(program = %self.program.display(), "{message}");
                            run.failed(message, config);
                        }
                        Message::Other => {}
                    },
                },
            }
            if records.len() >= MAX_BATCH_RECORDS || bytes >= MAX_BATCH_BYTES {
                // No state yet: the position stays the previous state, so a restart re-reads
                // these records (at-least-once) with the same ids.
                return Ok(Some(self.batch(records)));
            }
        }
    }

    fn start(&mut self) -> Result<()> {
        let args = self.dialect.read_args(&self.dir, self.state.as_ref())?;
        self.reading = Some(self.program.spawn(&args, &self.dir)?);
        self.ids = ids_after(&self.instance, self.state.as_ref());
        self.since_state = 0;
        Ok(())
    }

    fn failed(&mut self, raw: String, reason: String) -> Record {
        self.since_state += 1;
        Record {
            id: self.ids.id(&format!("line/{}", self.since_state)),
            payload: Payload::Unparseable {
                raw: self.program.redactor.redact(&raw),
                reason,
            },
        }
    }
}

/// Ids of the records that follow `state`.
fn ids_after(instance: &str, state: Option<&Value>) -> EventIds {
    let state = state.map(Value::to_string).unwrap_or_default();
    EventIds::new(instance, &[&state])
}

/// `config` with every `{"secretKeyRef": {"name", "key"}}` replaced by the Secret's value, and the
/// values (to redact from the program's output).
fn resolve_secrets(config: &Value, ctx: &OpenContext) -> Result<(Value, Vec<String>)> {
    fn walk(v: &Value, ctx: &OpenContext, found: &mut Vec<String>) -> Result<Value> {
        if let Some((name, key)) = obsrv_crds::source::custom::secret_ref(v) {
            let value = ctx.secret(name, key)?;
            found.push(value.clone());
            return Ok(Value::String(value));
        }
        Ok(match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), walk(v, ctx, found)?)))
                    .collect::<Result<_>>()?,
            ),
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|v| walk(v, ctx, found))
                    .collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }
    let mut found = Vec::new();
    let resolved = walk(config, ctx, &mut found)?;
    Ok((resolved, found))
}

impl Source for ProgramSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        self.read().await
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
