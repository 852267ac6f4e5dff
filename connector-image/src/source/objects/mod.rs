//! The file sources' shared layer: one [`ObjectSource`] over any `object_store` client (S3 and
//! S3-compatible stores, Azure Blob Storage, Google Cloud Storage). The kinds' own modules
//! (`s3`, `azure_blob`, `gcs`) only build the client from the spec and the Secret.
//!
//! - Listing ([`Selection`]): keys under a prefix, matching a glob, modified at or after a start
//!   point, in key order.
//! - Done-state ([`position`]): per shard, the keys read and the object being read with where to
//!   resume in it; kept in the state topic, never written to the store.
//! - Scale-out ([`shards`]): replicas share the shards of the keys through a consumer group on the
//!   sink cluster; each object is read by exactly one replica.
//! - Reading ([`decode`]): each object is streamed from the store into a blocking decoder thread
//!   (gzip/zstd/snappy, then JSON, JSON lines, CSV or Parquet) that hands records out in bounded
//!   chunks.
//!
//! An object whose content cannot be decoded (truncated compression, corrupt Parquet) yields its
//! records up to the damage, then one failed-topic record naming the object and why, and is marked
//! done: it is skipped, not retried (uploading it again under a new key reads it again). A store
//! that fails to deliver bytes is an error the runner retries, resuming at the committed position.

pub mod decode;
pub mod position;
pub mod shards;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, TryStreamExt, future::BoxFuture};
use object_store::{GetOptions, GetRange, ObjectStore, path::Path};
use obsrv_crds::{ObjectFormat, ObjectSelection};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Batch, Lag, OpenContext, Record, Source, SourceCommitter, SourceFactory};
use crate::{
    config::Secrets,
    envelope::{EventIds, Payload},
    error::{Error, Result},
    runner::now_ms,
    sink::{Acks, Transactions},
    state::StateStore,
};
use decode::{Decoding, Event, Transport, compression::Codec};
use position::{CurrentObject, ShardPosition};
use shards::{Group, Membership, Progress, SHARDS, shard_of, state_key};

/// Bytes of remembered keys per shard before the lowest fold into "done through"; all shards
/// together stay far below the sink's message size.
pub const DONE_KEYS_BUDGET: usize = (256 << 10) / SHARDS as usize;
/// How long `next_batch` waits for this replica's first shards before reporting "nothing now".
const ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);

/// An object store as the shared layer sees it.
pub struct Store {
    pub client: Arc<dyn ObjectStore>,
    /// `s3://bucket`, `az://container`, `gs://bucket`: names objects in messages.
    pub url: String,
    /// The bucket or container: part of every record's event id.
    pub name: String,
}

/// The runtime's factory of a file kind. What differs between the stores is only where a
/// Connector's spec holds the kind (`of`), its selection (`objects`), and how its client is built
/// from the spec and the Secret (`store`). Positions are kept per shard by this module.
pub fn factory<S: Send + Sync + 'static>(
    kind: &'static obsrv_crds::SourceKind,
    of: fn(&obsrv_crds::SourceSpec) -> Option<&S>,
    objects: fn(&S) -> &ObjectSelection,
    store: fn(&S, &Secrets) -> Result<Store>,
) -> SourceFactory {
    SourceFactory::new(kind.name, move |ctx: OpenContext| async move {
        let spec = super::spec_of(&ctx.config, kind.name, of)?;
        ObjectSource::open(&ctx, store(spec, &ctx.secrets)?, objects(spec)).await
    })
    .keeping_own_positions()
}

impl Store {
    /// A store from a client builder's outcome (a builder's error is the spec's: `Config`).
    pub fn new<C: ObjectStore>(
        kind: &str,
        built: object_store::Result<C>,
        url: String,
        name: &str,
    ) -> Result<Store> {
        let client = built.map_err(|e| Error::Config(format!("{kind} source: {e}")))?;
        Ok(Store {
            client: Arc::new(client),
            url,
            name: name.to_string(),
        })
    }
}

/// Which objects are read: a raw key prefix, a glob below it, a start time.
#[derive(Clone, Debug)]
pub struct Selection {
    prefix: String,
    glob: Option<glob::Pattern>,
    modified_after: Option<DateTime<Utc>>,
}

impl Selection {
    pub fn new(s: &ObjectSelection) -> Result<Selection> {
        let glob = s
            .glob
            .as_deref()
            .map(glob::Pattern::new)
            .transpose()
            .map_err(|e| Error::Config(format!("glob {:?}: {e}", s.glob)))?;
        Ok(Selection {
            prefix: s.prefix.trim_start_matches('/').to_string(),
            glob,
            modified_after: s.modified_after,
        })
    }

    /// The directory to list: the prefix up to its last `/` (object stores list by path segment;
    /// the rest of the prefix is matched on each key).
    pub fn list_root(&self) -> Option<Path> {
        self.prefix
            .rsplit_once('/')
            .map(|(dir, _)| Path::from(dir))
            .filter(|p| !p.as_ref().is_empty())
    }

    /// Whether the object `key`, last modified at `modified`, is read. Pure.
    pub fn selects(&self, key: &str, modified: DateTime<Utc>) -> bool {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return false;
        };
        let rest = rest.trim_start_matches('/');
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.glob
            .as_ref()
            .is_none_or(|g| g.matches_with(rest, opts))
            && self.modified_after.is_none_or(|t| modified >= t)
    }
}

/// Maps a store error to the runtime's reasons, naming the store (`s3://bucket`) and the object
/// when there is one. A missing bucket or object gets one line, not the store's XML reply.
pub fn store_err(url: &str, key: Option<&str>, e: object_store::Error) -> Error {
    let s = e.to_string();
    let auth = [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AuthenticationFailed",
        "AuthorizationFailure",
        "403",
        "401",
    ];
    let missing = [
        "NoSuchBucket",
        "ContainerNotFound",
        "NoSuchKey",
        "BlobNotFound",
        "404",
    ];
    let is_missing =
        matches!(e, object_store::Error::NotFound { .. }) || missing.iter().any(|m| s.contains(m));
    let is_auth = matches!(
        e,
        object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. }
    ) || auth.iter().any(|a| s.contains(a));
    match key {
        _ if is_auth => Error::AuthFailed(format!("{url}: {s}")),
        Some(key) if is_missing => Error::NotFound(format!(
            "object {url}/{key} does not exist (deleted after it was listed?)"
        )),
        None if is_missing => Error::NotFound(format!(
            "{url} does not exist: check the bucket (container) name and the endpoint"
        )),
        _ => Error::SourceUnreachable(format!("{url}: {s}")),
    }
}

/// The store's error inside an I/O error from the object's byte stream.
fn transport_err(url: &str, key: &str, e: std::io::Error) -> Error {
    match e.into_inner().map(|i| i.downcast::<object_store::Error>()) {
        Some(Ok(e)) => store_err(url, Some(key), *e),
        Some(Err(other)) => Error::SourceUnreachable(format!("reading {url}/{key}: {other}")),
        None => Error::SourceUnreachable(format!("reading {url}/{key}")),
    }
}

/// An object listed and not yet read.
#[derive(Clone, Debug)]
struct Pending {
    location: Path,
    key: String,
    shard: u32,
    size: u64,
    modified: DateTime<Utc>,
}

/// The object being read: the decoder thread's chunks.
struct Reading {
    object: Pending,
    rx: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<std::result::Result<(), Transport>>,
    /// Decompressed bytes read so far, for lag (uncompressed objects only).
    offset: u64,
    compressed: bool,
}

/// What a batch's position holds: the done-state of every shard held when it was read.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectsPosition {
    /// Batch number, for the hand-over of shards.
    pub seq: u64,
    pub shards: BTreeMap<u32, ShardPosition>,
}

/// Commits positions to the state topic, one record per shard that changed.
struct ShardStates {
    store: StateStore,
    instance: String,
    membership: Arc<Membership>,
    progress: Arc<Progress>,
    /// What was last written per shard (only changes are written).
    written: Mutex<BTreeMap<u32, ShardPosition>>,
    /// The writer task's first failure, surfaced by the next `next_batch`.
    error: Mutex<Option<Error>>,
}

impl ShardStates {
    /// Writes the changed shards of `p` that this replica may write. `acks`: enqueue them all
    /// into the sink's open transaction; `None`: write one at a time, each acknowledged before the
    /// next (a produce request holding several records makes nisshi's end offsets wrong, and a
    /// reader of the state topic would stop short of the newest).
    async fn write(&self, p: &ObjectsPosition, acks: Option<&Arc<Acks>>) -> Result<usize> {
        let changed: Vec<(u32, ShardPosition)> = {
            let w = self.written.lock().unwrap_or_else(|e| e.into_inner());
            p.shards
                .iter()
                .filter(|(s, pos)| w.get(s) != Some(pos) && self.membership.writable(**s))
                .map(|(s, pos)| (*s, pos.clone()))
                .collect()
        };
        for (shard, pos) in &changed {
            let v = serde_json::to_value(pos).map_err(|e| Error::State(e.to_string()))?;
            let store = self.store.with_key(&state_key(&self.instance, *shard));
            match acks {
                Some(acks) => {
                    store
                        .enqueue(&v, Some(pos.watermark()), now_ms(), acks)
                        .await?
                }
                None => store.commit(&v, Some(pos.watermark()), now_ms()).await?,
            }
        }
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        for (shard, pos) in changed.iter() {
            w.insert(*shard, pos.clone());
        }
        Ok(changed.len())
    }
}

/// The runner's handle on [`ShardStates`].
struct Committer {
    states: Arc<ShardStates>,
    tx: mpsc::UnboundedSender<ObjectsPosition>,
}

fn parse_position(v: &serde_json::Value) -> Result<ObjectsPosition> {
    serde_json::from_value(v.clone())
        .map_err(|e| Error::State(format!("not a file source's position: {e}")))
}

impl SourceCommitter for Committer {
    fn commit(&self, position: &serde_json::Value) -> Result<()> {
        let p = parse_position(position)?;
        self.tx
            .send(p)
            .map_err(|_| Error::State("the file source's state writer stopped".into()))
    }

    fn is_current(&self, position: &serde_json::Value) -> bool {
        parse_position(position)
            .is_ok_and(|p| p.shards.keys().all(|s| self.states.membership.writable(*s)))
    }

    fn add_to_transaction<'a>(
        &'a self,
        position: &'a serde_json::Value,
        _txn: &'a dyn Transactions,
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            let p = parse_position(position)?;
            if !self.is_current(position) {
                return Ok(false);
            }
            // The state store writes through the sink's (transactional) producer: the records
            // commit with the batch's.
            self.states.write(&p, Some(&Acks::new())).await?;
            self.states
                .progress
                .committed(p.seq, &self.states.membership);
            Ok(true)
        }
        .boxed()
    }
}

/// Writes what the runner commits, in order, waiting for each write's acknowledgement.
async fn write_states(states: Arc<ShardStates>, mut rx: mpsc::UnboundedReceiver<ObjectsPosition>) {
    while let Some(mut p) = rx.recv().await {
        // Only the newest of what queued up matters.
        while let Ok(newer) = rx.try_recv() {
            p = newer;
        }
        match states.write(&p, None).await {
            Ok(_) => states.progress.committed(p.seq, &states.membership),
            Err(e) => {
                // Forget what was written: the next commit writes every shard again.
                states
                    .written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                *states.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }
}

/// A file source over one store.
pub struct ObjectSource {
    store: Store,
    selection: Selection,
    decoding: Decoding,
    instance: String,
    group_id: String,
    states: Arc<ShardStates>,
    writer: Option<mpsc::UnboundedReceiver<ObjectsPosition>>,
    tx: mpsc::UnboundedSender<ObjectsPosition>,
    group: Option<Group>,
    epoch: Option<u64>,
    shards: BTreeMap<u32, ShardPosition>,
    pending: VecDeque<Pending>,
    reading: Option<Reading>,
    /// Objects found by `open`'s listing, for `describe`.
    listed: usize,
}

impl ObjectSource {
    /// Opens a file source on `store`: checks that the store answers (a listing), nothing more.
    /// The group is joined at the first read, so `check` and a paused connector never take shards.
    pub async fn open(
        ctx: &OpenContext,
        store: Store,
        selection: &ObjectSelection,
    ) -> Result<ObjectSource> {
        let kind = ctx
            .config
            .spec
            .source
            .resolve()
            .map_err(|e| Error::Config(e.to_string()))?
            .kind
            .name;
        let instance = ctx.instance();
        let state = ctx.sink.positions(&instance, kind).ok_or_else(|| {
            Error::Config(format!(
                "the sink cannot keep the positions of a {kind} source"
            ))
        })?;
        let decoding = Decoding {
            format: selection.format,
            compression: selection.compression,
            csv: selection
                .csv
                .as_ref()
                .map(decode::csv::Dialect::from)
                .unwrap_or_default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let states = Arc::new(ShardStates {
            store: state,
            instance: instance.clone(),
            membership: Arc::new(Membership::default()),
            progress: Arc::new(Progress::default()),
            written: Mutex::new(BTreeMap::new()),
            error: Mutex::new(None),
        });
        let mut s = ObjectSource {
            store,
            selection: Selection::new(selection)?,
            decoding,
            group_id: format!("obsrv-connector.files.{}", instance.replace('/', ".")),
            instance,
            states,
            writer: Some(rx),
            tx,
            group: None,
            epoch: None,
            shards: BTreeMap::new(),
            pending: VecDeque::new(),
            reading: None,
            listed: 0,
        };
        // Reach the store now so a wrong endpoint or key shows at start.
        s.listed = s.list_all().await?.len();
        Ok(s)
    }

    /// Every selected object in the store, in key order.
    async fn list_all(&self) -> Result<Vec<Pending>> {
        let root = self.selection.list_root();
        let metas: Vec<_> = self
            .store
            .client
            .list(root.as_ref())
            .try_collect()
            .await
            .map_err(|e| store_err(&self.store.url, None, e))?;
        let mut out: Vec<Pending> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string();
                self.selection
                    .selects(&key, m.last_modified)
                    .then(|| Pending {
                        shard: shard_of(&key),
                        key,
                        location: m.location,
                        size: m.size,
                        modified: m.last_modified,
                    })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The objects of the held shards not yet done, in key order, the ones being read first;
    /// forgets done keys no longer listed.
    async fn list(&mut self) -> Result<VecDeque<Pending>> {
        let all = self.list_all().await?;
        let mut listed: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for p in &all {
            listed.entry(p.shard).or_default().insert(p.key.clone());
        }
        for (shard, pos) in self.shards.iter_mut() {
            pos.compact(&listed.remove(shard).unwrap_or_default(), DONE_KEYS_BUDGET);
        }
        let (current, rest): (Vec<Pending>, Vec<Pending>) = all
            .into_iter()
            .filter(|p| {
                self.shards
                    .get(&p.shard)
                    .is_some_and(|pos| !pos.is_done(&p.key))
            })
            .partition(|p| {
                self.shards[&p.shard]
                    .current
                    .as_ref()
                    .is_some_and(|c| c.key == p.key)
            });
        Ok(current.into_iter().chain(rest).collect())
    }

    /// Joins the group on the first read, and starts the state writer.
    async fn ensure_group(&mut self) -> Result<()> {
        if self.group.is_some() {
            return Ok(());
        }
        let topic = format!("{}.shards", self.states.store.topic());
        let group = Group::join(
            self.states.store.client_config(),
            &topic,
            &self.group_id,
            self.states.membership.clone(),
        )
        .await?;
        if let Some(rx) = self.writer.take() {
            tokio::spawn(write_states(self.states.clone(), rx));
        }
        self.group = Some(group);
        Ok(())
    }

    /// Loads the committed state of the shards now held.
    async fn load_shards(&mut self, held: &BTreeSet<u32>) -> Result<()> {
        let keys: BTreeMap<String, u32> = held
            .iter()
            .map(|s| (state_key(&self.instance, *s), *s))
            .collect();
        let records = self
            .states
            .store
            .load_keys(keys.keys().cloned().collect())
            .await?;
        let mut shards = BTreeMap::new();
        for (key, shard) in &keys {
            let pos = ShardPosition::from_value(records.get(key).map(|r| &r.position))?;
            shards.insert(*shard, pos);
        }
        *self
            .states
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = shards.clone();
        self.shards = shards;
        Ok(())
    }

    /// Stops reading: the shards are being given up (or changed hands).
    fn stop_reading(&mut self) {
        if let Some(r) = self.reading.take() {
            r.task.abort();
        }
        self.pending.clear();
        self.shards.clear();
        self.epoch = None;
    }

    async fn open_object(&self, object: Pending) -> Result<Reading> {
        let resume = self.shards[&object.shard]
            .current
            .as_ref()
            .filter(|c| c.key == object.key)
            .map(|c| c.resume.clone())
            .unwrap_or_default();
        let from = self.decoding.start_byte(&object.key, &resume);
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let got = self
            .store
            .client
            .get_opts(&object.location, opts)
            .await
            .map_err(|e| store_err(&self.store.url, Some(&object.key), e))?;
        let stream = got.into_stream().map_err(std::io::Error::other);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        // Two chunks in the channel (plus one being built) bound what an object holds in memory.
        let (tx, rx) = mpsc::channel(2);
        let (decoding, key) = (self.decoding.clone(), object.key.clone());
        let url = format!("{}/{}", self.store.url, object.key);
        let compressed = self.decoding.known_codec(&object.key, &resume) != Some(Codec::None);
        let task = tokio::task::spawn_blocking(move || {
            decode::decode(reader, &decoding, &key, &url, resume, |e| {
                tx.blocking_send(e).is_ok()
            })
        });
        Ok(Reading {
            offset: from,
            compressed,
            object,
            rx,
            task,
        })
    }

    fn position(&self, seq: u64) -> Result<serde_json::Value> {
        serde_json::to_value(ObjectsPosition {
            seq,
            shards: self.shards.clone(),
        })
        .map_err(|e| Error::State(e.to_string()))
    }

    fn watermark(&self) -> String {
        let done: usize = self.shards.values().map(|s| s.done.len()).sum();
        let reading = self
            .reading
            .as_ref()
            .map(|r| format!("; reading {}", r.object.key))
            .unwrap_or_default();
        format!(
            "{} shards, {done} objects remembered done{reading}",
            self.shards.len()
        )
    }

    /// Turns one decoder event into records; marks the object done when it ends.
    fn records(&mut self, event: Event) -> Vec<Record> {
        let r = self.reading.as_mut().expect("an object being read");
        let (key, shard) = (r.object.key.clone(), r.object.shard);
        let ids = EventIds::new(&self.instance, &[&self.store.name, &key]);
        let mut at = String::new();
        let mut id = |n: &dyn std::fmt::Display| {
            use std::fmt::Write as _;
            at.clear();
            let _ = write!(at, "{n}");
            ids.id(&at)
        };
        let (records, resume, done) = match event {
            Event::Records {
                items,
                resume,
                last,
            } => {
                let records = items
                    .into_iter()
                    .map(|i| Record {
                        id: id(&i.at),
                        payload: i.payload,
                    })
                    .collect();
                (records, resume, last)
            }
            Event::Unreadable { reason, resume } => {
                tracing::warn!(object = %key, %reason, "object skipped: its content cannot be decoded");
                let record = Record {
                    id: id(&"unreadable"),
                    payload: Payload::Unparseable {
                        raw: format!("{}/{key}", self.store.url),
                        reason,
                    },
                };
                (vec![record], resume, true)
            }
        };
        r.offset = resume.offset;
        let pos = self.shards.entry(shard).or_default();
        if done {
            pos.done.insert(key);
            pos.current = None;
            self.reading = None;
        } else {
            pos.current = Some(CurrentObject { key, resume });
        }
        records
    }

    /// Waits for the next decoder event, or a change of the group (a revoke must not wait for a
    /// large object's next chunk).
    async fn next_event(&mut self) -> Result<Option<Event>> {
        let membership = self.states.membership.clone();
        let r = self.reading.as_mut().expect("an object being read");
        let got = tokio::select! {
            e = r.rx.recv() => Some(e),
            _ = membership.changed(Duration::from_secs(3600)) => None,
        };
        match got {
            None => Ok(None),
            Some(Some(e)) => Ok(Some(e)),
            Some(None) => {
                let r = self.reading.take().expect("an object being read");
                let (url, key) = (&self.store.url, &r.object.key);
                match r.task.await {
                    Ok(Err(Transport(e))) => Err(transport_err(url, key, e)),
                    Ok(Ok(())) => Err(Error::SourceUnreachable(format!(
                        "{url}/{key}: the decoder stopped early"
                    ))),
                    Err(e) => Err(Error::SourceUnreachable(format!(
                        "{url}/{key}: decoder: {e}"
                    ))),
                }
            }
        }
    }
}

impl Source for ObjectSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        self.ensure_group().await?;
        loop {
            if let Some(e) = self
                .states
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                return Err(e);
            }
            if let Some(e) = self.states.membership.take_error() {
                return Err(Error::SinkUnreachable(e));
            }
            let view = self.states.membership.view();
            if view.revoking {
                // Give the shards up: the runner delivers and commits what was handed out, then
                // the committer lets the rebalance go on.
                self.stop_reading();
                self.states
                    .progress
                    .await_hand_over(&self.states.membership);
                return Ok(None);
            }
            let Some(held) = view.assigned else {
                self.stop_reading();
                self.states.membership.changed(ASSIGNMENT_WAIT).await;
                if self.states.membership.view().assigned.is_none() {
                    return Ok(None);
                }
                continue;
            };
            if self.epoch != Some(view.epoch) {
                self.stop_reading();
                self.load_shards(&held).await?;
                self.epoch = Some(view.epoch);
                self.pending = self.list().await?;
            }
            if self.reading.is_none() {
                if self.pending.is_empty() {
                    self.pending = self.list().await?;
                }
                let Some(next) = self.pending.pop_front() else {
                    return Ok(None);
                };
                self.reading = Some(self.open_object(next).await?);
            }
            let Some(event) = self.next_event().await? else {
                continue;
            };
            let records = self.records(event);
            if records.is_empty() && self.reading.is_some() {
                continue;
            }
            let seq = self.states.progress.next();
            return Ok(Some(Batch {
                records,
                position: self.position(seq)?,
                watermark: Some(self.watermark()),
            }));
        }
    }

    fn max_parallelism(&self) -> Option<i32> {
        Some(SHARDS as i32)
    }

    async fn lag(&mut self) -> Result<Option<Lag>> {
        let mut objects = self.pending.len() as i64;
        let mut bytes: i64 = self.pending.iter().map(|p| p.size as i64).sum();
        let mut oldest = self.pending.iter().map(|p| p.modified).min();
        if let Some(r) = &self.reading {
            objects += 1;
            let read = if r.compressed { 0 } else { r.offset };
            bytes += r.object.size.saturating_sub(read) as i64;
            oldest = oldest
                .min(Some(r.object.modified))
                .or(Some(r.object.modified));
        }
        let seconds = oldest.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
        Ok(Some(Lag {
            records: objects,
            seconds,
            bytes: Some(bytes),
        }))
    }

    fn committer(&self) -> Option<Box<dyn SourceCommitter>> {
        Some(Box::new(Committer {
            states: self.states.clone(),
            tx: self.tx.clone(),
        }))
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}, {} objects selected ({} format)",
            self.store.url,
            self.selection.prefix,
            self.listed,
            match self.decoding.format {
                ObjectFormat::Json => "json",
                ObjectFormat::JsonLines => "jsonLines",
                ObjectFormat::Csv => "csv",
                ObjectFormat::Parquet => "parquet",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obsrv_crds::{ObjectCompression, ObjectFormat};

    fn selection(prefix: &str, glob: Option<&str>, after: Option<&str>) -> Selection {
        Selection::new(&ObjectSelection {
            prefix: prefix.into(),
            glob: glob.map(str::to_string),
            format: ObjectFormat::JsonLines,
            csv: None,
            compression: ObjectCompression::Auto,
            modified_after: after.map(|t| t.parse().unwrap()),
            poll_interval: "30s".into(),
        })
        .unwrap()
    }

    #[test]
    fn prefix_glob_and_start_time_select_objects() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let noon = t("2026-11-01T12:00:00Z");
        let s = selection("in/2026-", Some("*.jsonl*"), Some("2026-11-01T00:00:00Z"));
        assert_eq!(s.list_root(), Some(Path::from("in")));
        assert!(s.selects("in/2026-11.jsonl", noon));
        assert!(s.selects("in/2026-11.jsonl.gz", noon));
        assert!(!s.selects("in/2025-11.jsonl", noon), "outside the prefix");
        assert!(
            !s.selects("in/2026-11/x.jsonl", noon),
            "* stays within a segment"
        );
        assert!(!s.selects("in/2026-11.csv", noon), "glob");
        assert!(
            !s.selects("in/2026-11.jsonl", t("2026-10-31T23:59:59Z")),
            "before the start"
        );
        let deep = selection("in/", Some("**/*.csv"), None);
        assert!(deep.selects("in/a/b/c.csv", noon));
        assert!(!deep.selects("in/a/b/c.json", noon));
        let all = selection("", None, None);
        assert_eq!(all.list_root(), None);
        assert!(all.selects("anything", noon));
        assert!(
            Selection::new(&ObjectSelection {
                glob: Some("[".into()),
                ..ObjectSelection {
                    prefix: String::new(),
                    glob: None,
                    format: ObjectFormat::Csv,
                    csv: None,
                    compression: ObjectCompression::Auto,
                    modified_after: None,
                    poll_interval: "1s".into(),
                }
            })
            .is_err()
        );
    }

    #[test]
    fn positions_hold_every_shard_and_round_trip() {
        let mut p = ObjectsPosition {
            seq: 7,
            ..ObjectsPosition::default()
        };
        p.shards.insert(3, ShardPosition::default());
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq": 7, "shards": {"3": {"done": []}}})
        );
        assert_eq!(parse_position(&v).unwrap(), p);
    }
}
