//! The embedded [`Store`] backend: one [redb] file, an in-memory read index
//! and a single group-committing writer thread.
//!
//! # On-disk format (format version 1)
//!
//! The database file holds four redb tables:
//!
//! - `objects` (`&str -> &[u8]`): key `"<Kind>/<name>"` where `<Kind>` is
//!   [`Kind::as_str`] (`"App/hello"`; the name may itself contain `/`, the
//!   key is split at the first one). The value is the object's JSON (UTF-8),
//!   with `metadata.resourceVersion` (a JSON number) equal to the revision of
//!   the write that produced it; that number is the object's revision.
//! - `events` (`u64 -> &[u8]`): key is the revision of the write; the value
//!   is the encoded event:
//!
//!   | bytes        | content                                                  |
//!   |--------------|----------------------------------------------------------|
//!   | 1            | event codec version, `1`                                 |
//!   | 1            | event type: `0` added, `1` modified, `2` deleted         |
//!   | 1            | length `k` of the kind string                            |
//!   | `k`          | [`Kind::as_str`], ASCII                                  |
//!   | 4            | length `n` of the name, little-endian `u32`              |
//!   | `n`          | name, UTF-8                                              |
//!   | rest         | JSON of the object after the write (deletes: the last    |
//!   |              | state, whose `resourceVersion` is that of the last write |
//!   |              | before the delete, i.e. smaller than the event's key)    |
//!
//!   Because every successful write takes the next revision and records one
//!   event, the keys of `events` are exactly `compacted + 1 ..= revision`.
//! - `meta` (`&str -> u64`): `"format"` (= 1), `"revision"` (latest
//!   revision, 0 when nothing was ever written) and `"compacted"` (the
//!   compaction point: every event with a revision `<=` it was deleted).
//! - `system` (`&str -> &[u8]`): the cluster-wide values of
//!   [`Coordinator::get_or_init`], written once each and never changed. It
//!   takes no revision and is created on first use (older files without it
//!   stay valid).
//!
//! On open the whole file is loaded and checked: the objects into the read
//! index, the events into the in-memory history. Anything that does not
//! decode or breaks the invariants above makes [`RedbStore::open`] fail with
//! [`StoreError::Backend`]; nothing read from disk is trusted enough to panic.
//!
//! # Reads
//!
//! `get`, `list`, `revision` and `watch` replays are served from memory (an
//! index per kind sorted by name, and a ring buffer with the last
//! [`StoreOptions::history`] events) behind one `RwLock`; they never touch
//! the disk.
//!
//! # Writes (group commit)
//!
//! Writes are queued to one dedicated writer thread. It takes every request
//! queued at that moment (up to 4096), decides each in queue order
//! against the state as left by the requests before it in the batch (so
//! `AlreadyExists`, `NotFound` and `Conflict` are per request), gives each
//! successful one the next revision, and applies the whole batch in a single
//! redb write transaction (one fsync), together with the new events, the
//! compaction of the oldest events and the new `meta`. Only after the commit
//! succeeds are the index, the history and the watchers updated (atomically,
//! under the write lock) and the callers answered, so a caller that got its
//! answer reads its own write. If the commit fails, every request of the
//! batch gets [`StoreError::Backend`] and nothing changes.
//!
//! # Watchers
//!
//! Each watcher has a bounded channel of
//! `watch_buffer + (events replayed at start) + 1` slots. The writer never
//! blocks on it: it only sends an event while at least two slots are free;
//! when only the last slot is free, the watcher has fallen
//! [`StoreOptions::watch_buffer`] events behind, and the writer puts
//! `Err(StoreError::Compacted { requested, oldest })` into that reserved slot
//! (`requested` is the revision of the last event the watcher was sent,
//! `oldest` the current compaction point) and drops the sender, so the
//! watcher reads its backlog, then that error, then `None`. Dropping the
//! store ends every watch with `None`.
//!
//! # Coordination
//!
//! A redb file is opened by one process, so there is one replica: it leads
//! at once ([`Coordinator::campaign`] returns this very store, unfenced, and
//! leadership is never lost), and presence records live in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::thread::JoinHandle;

use redb::{Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use yunbian_api::Kind;

use crate::{Coordinator, EventType, Leadership, Store, StoreError, StoreEvent, StoredObject, Watch};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SYSTEM: TableDefinition<&str, &[u8]> = TableDefinition::new("system");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Version of the on-disk layout written to `meta["format"]`.
const FORMAT_VERSION: u64 = 1;
/// First byte of every encoded event.
const EVENT_CODEC_VERSION: u8 = 1;
/// Most write requests applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Upper bound of a watch channel's capacity (tokio's limit is far higher).
const MAX_WATCH_CAPACITY: usize = 1 << 30;

/// Tuning of a [`RedbStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Events kept (on disk and in memory) for watches to resume from;
    /// older ones are compacted away. Default 100 000.
    pub history: u64,
    /// Live events a watcher may have unread before it is ended with
    /// `Err(Compacted)`. Default 10 000 (values below 1 count as 1).
    pub watch_buffer: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { history: 100_000, watch_buffer: 10_000 }
    }
}

/// The embedded store: see the [module docs](self).
pub struct RedbStore {
    shared: Arc<Shared>,
    /// Queue to the writer; taken on drop to stop it.
    sender: Option<std_mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    /// The database, also owned by the writer; used directly only for the
    /// `system` table (redb serializes write transactions).
    db: Arc<Database>,
    /// This store itself, handed out as the leader's store by `campaign`.
    me: Weak<RedbStore>,
    /// Never sends: a single replica never loses leadership.
    leadership_lost: watch::Sender<bool>,
    /// Presence records (one process, so in memory).
    presence: Mutex<BTreeMap<String, Vec<u8>>>,
}

/// State shared by the store handle and the writer thread.
struct Shared {
    state: RwLock<State>,
    /// Mirrors of `State::{revision, compacted}` for lock-free reads.
    revision: AtomicU64,
    compacted: AtomicU64,
    opts: StoreOptions,
}

/// One event of the in-memory history, kept encoded (the `events` table
/// format): a few hundred bytes instead of a parsed JSON tree, which matters
/// when 100,000 events of 10,000 nodes' status writes are retained.
struct HistoryEntry {
    revision: u64,
    kind: Kind,
    encoded: Arc<[u8]>,
}

impl HistoryEntry {
    fn decode(&self) -> Result<StoreEvent, StoreError> {
        decode_event(self.revision, &self.encoded)
    }
}

struct State {
    objects: HashMap<Kind, BTreeMap<String, StoredObject>>,
    /// Events `compacted + 1 ..= revision`, oldest first.
    history: VecDeque<HistoryEntry>,
    revision: u64,
    compacted: u64,
    watchers: Vec<Watcher>,
}

struct Watcher {
    kind: Option<Kind>,
    /// Only events with a revision above this are sent.
    from: u64,
    tx: mpsc::Sender<Result<StoreEvent, StoreError>>,
}

enum Op {
    Create(Value),
    Update(Value, Option<u64>),
    Delete(Option<u64>),
}

struct Request {
    kind: Kind,
    name: String,
    op: Op,
    reply: oneshot::Sender<Result<StoredObject, StoreError>>,
}

/// A successful write of a batch, ready to be stored.
struct Change {
    event: StoreEvent,
    /// JSON of `event.object`.
    json: Vec<u8>,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn backend(context: &str, err: impl fmt::Display) -> StoreError {
    StoreError::Backend(format!("{context}: {err}"))
}

fn corrupt(what: impl fmt::Display) -> StoreError {
    StoreError::Backend(format!("corrupt store file: {what}"))
}

fn closed() -> StoreError {
    StoreError::Backend("store writer has stopped".to_string())
}

fn kind_from_str(s: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str() == s)
}

fn object_key(kind: Kind, name: &str) -> String {
    format!("{}/{}", kind.as_str(), name)
}

/// Sets `metadata.resourceVersion` to `revision`, creating `metadata` if it
/// is missing or null.
pub(crate) fn set_resource_version(value: &mut Value, revision: u64) -> Result<(), StoreError> {
    let obj =
        value.as_object_mut().ok_or_else(|| StoreError::Backend("a stored value must be a JSON object".to_string()))?;
    let meta = obj.entry("metadata").or_insert(Value::Null);
    if meta.is_null() {
        *meta = Value::Object(serde_json::Map::new());
    }
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| StoreError::Backend("metadata of a stored value must be a JSON object".to_string()))?;
    meta.insert("resourceVersion".to_string(), Value::from(revision));
    Ok(())
}

/// `metadata.resourceVersion` of a value read from disk.
fn resource_version(value: &Value) -> Option<u64> {
    value.get("metadata")?.get("resourceVersion")?.as_u64()
}

fn event_type_code(t: EventType) -> u8 {
    match t {
        EventType::Added => 0,
        EventType::Modified => 1,
        EventType::Deleted => 2,
    }
}

fn encode_event(t: EventType, kind: Kind, name: &str, json: &[u8]) -> Result<Vec<u8>, StoreError> {
    let kind = kind.as_str().as_bytes();
    let kind_len = u8::try_from(kind.len()).map_err(|_| StoreError::Backend("kind name too long".to_string()))?;
    let name_len = u32::try_from(name.len()).map_err(|_| StoreError::Backend("object name too long".to_string()))?;
    let mut out = Vec::with_capacity(7 + kind.len() + name.len() + json.len());
    out.push(EVENT_CODEC_VERSION);
    out.push(event_type_code(t));
    out.push(kind_len);
    out.extend_from_slice(kind);
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(json);
    Ok(out)
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize, revision: u64) -> Result<&'a [u8], StoreError> {
    if bytes.len() < n {
        return Err(corrupt(format_args!("event {revision} is truncated")));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn decode_event(revision: u64, mut bytes: &[u8]) -> Result<StoreEvent, StoreError> {
    let b = &mut bytes;
    let header = take(b, 3, revision)?;
    if header[0] != EVENT_CODEC_VERSION {
        return Err(corrupt(format_args!("event {revision} has unknown codec version {}", header[0])));
    }
    let event = match header[1] {
        0 => EventType::Added,
        1 => EventType::Modified,
        2 => EventType::Deleted,
        other => return Err(corrupt(format_args!("event {revision} has unknown type {other}"))),
    };
    let kind_bytes = take(b, usize::from(header[2]), revision)?;
    let kind = std::str::from_utf8(kind_bytes)
        .ok()
        .and_then(kind_from_str)
        .ok_or_else(|| corrupt(format_args!("event {revision} has an unknown kind")))?;
    let mut len = [0u8; 4];
    len.copy_from_slice(take(b, 4, revision)?);
    let name_len = usize::try_from(u32::from_le_bytes(len))
        .map_err(|_| corrupt(format_args!("event {revision} has a bad name length")))?;
    let name = std::str::from_utf8(take(b, name_len, revision)?)
        .map_err(|_| corrupt(format_args!("event {revision} has a name that is not UTF-8")))?
        .to_string();
    let value: Value = serde_json::from_slice(b)
        .map_err(|e| corrupt(format_args!("event {revision} ({kind} {name}) is not JSON: {e}")))?;
    let object_revision = resource_version(&value)
        .ok_or_else(|| corrupt(format_args!("event {revision} ({kind} {name}) has no metadata.resourceVersion")))?;
    let consistent = match event {
        EventType::Added | EventType::Modified => object_revision == revision,
        EventType::Deleted => object_revision < revision,
    };
    if !consistent {
        return Err(corrupt(format_args!(
            "event {revision} ({kind} {name}) carries resourceVersion {object_revision}"
        )));
    }
    Ok(StoreEvent {
        revision,
        event,
        object: StoredObject { kind, name, revision: object_revision, value: Arc::new(value) },
    })
}

fn decode_object(key: &str, bytes: &[u8]) -> Result<StoredObject, StoreError> {
    let (kind, name) = key
        .split_once('/')
        .and_then(|(k, n)| Some((kind_from_str(k)?, n)))
        .ok_or_else(|| corrupt(format_args!("bad object key {key:?}")))?;
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format_args!("object {key:?} is not JSON: {e}")))?;
    let revision = resource_version(&value)
        .filter(|r| *r > 0)
        .ok_or_else(|| corrupt(format_args!("object {key:?} has no metadata.resourceVersion")))?;
    Ok(StoredObject { kind, name: name.to_string(), revision, value: Arc::new(value) })
}

fn meta_get(table: &Table<&str, u64>, key: &str) -> Result<Option<u64>, StoreError> {
    Ok(table.get(key).map_err(|e| backend("read meta", e))?.map(|g| g.value()))
}

/// Deletes the events `from + 1 ..= to`.
fn delete_events(events: &mut Table<u64, &[u8]>, from: u64, to: u64) -> Result<(), StoreError> {
    if to > from {
        events.retain_in(from + 1..=to, |_, _| false).map_err(|e| backend("compact events", e))?;
    }
    Ok(())
}

/// What [`load`] read from the file.
struct Loaded {
    objects: HashMap<Kind, BTreeMap<String, StoredObject>>,
    history: VecDeque<HistoryEntry>,
    revision: u64,
    compacted: u64,
}

/// Creates missing tables, loads and checks everything, and compacts the
/// history down to `history` events (it may have been opened with a larger
/// setting before). Runs in the given write transaction.
fn load(txn: &WriteTransaction, history: u64) -> Result<Loaded, StoreError> {
    let mut meta = txn.open_table(META).map_err(|e| backend("open meta table", e))?;
    let objects_table = txn.open_table(OBJECTS).map_err(|e| backend("open objects table", e))?;
    let mut events_table = txn.open_table(EVENTS).map_err(|e| backend("open events table", e))?;

    let format = meta_get(&meta, META_FORMAT)?;
    match format {
        Some(FORMAT_VERSION) => {}
        Some(other) => return Err(corrupt(format_args!("unknown format version {other}"))),
        None => {
            let empty = meta.is_empty().map_err(|e| backend("read meta", e))?
                && objects_table.is_empty().map_err(|e| backend("read objects", e))?
                && events_table.is_empty().map_err(|e| backend("read events", e))?;
            if !empty {
                return Err(corrupt("data present but no format version"));
            }
            meta.insert(META_FORMAT, FORMAT_VERSION).map_err(|e| backend("write meta", e))?;
        }
    }
    let revision = meta_get(&meta, META_REVISION)?.unwrap_or(0);
    let mut compacted = meta_get(&meta, META_COMPACTED)?.unwrap_or(0);
    if revision == u64::MAX {
        return Err(corrupt("revision is out of range"));
    }
    if compacted > revision {
        return Err(corrupt(format_args!("compacted revision {compacted} is above revision {revision}")));
    }

    let mut objects: HashMap<Kind, BTreeMap<String, StoredObject>> = HashMap::new();
    for entry in objects_table.iter().map_err(|e| backend("read objects", e))? {
        let (key, value) = entry.map_err(|e| backend("read objects", e))?;
        let obj = decode_object(key.value(), value.value())?;
        if obj.revision > revision {
            return Err(corrupt(format_args!(
                "object {:?} has revision {} above the store revision {revision}",
                key.value(),
                obj.revision
            )));
        }
        objects.entry(obj.kind).or_default().insert(obj.name.clone(), obj);
    }

    let mut loaded_history = VecDeque::new();
    let mut expected = compacted + 1;
    for entry in events_table.iter().map_err(|e| backend("read events", e))? {
        let (key, value) = entry.map_err(|e| backend("read events", e))?;
        let rev = key.value();
        if rev != expected || rev > revision {
            return Err(corrupt(format_args!("expected event {expected}, found event {rev}")));
        }
        // Decoded once to validate the record; kept encoded.
        let ev = decode_event(rev, value.value())?;
        loaded_history.push_back(HistoryEntry { revision: rev, kind: ev.object.kind, encoded: value.value().into() });
        expected += 1;
    }
    if expected != revision + 1 {
        return Err(corrupt(format_args!(
            "events end at revision {}, but the store revision is {revision}",
            expected - 1
        )));
    }

    let target = revision.saturating_sub(history);
    if target > compacted {
        delete_events(&mut events_table, compacted, target)?;
        compacted = target;
        meta.insert(META_COMPACTED, compacted).map_err(|e| backend("write meta", e))?;
        while loaded_history.front().is_some_and(|e| e.revision <= compacted) {
            loaded_history.pop_front();
        }
    }
    Ok(Loaded { objects, history: loaded_history, revision, compacted })
}

impl RedbStore {
    /// Opens (creating if needed) the store file at `path`, loads it and
    /// starts the writer thread.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Arc<RedbStore>, StoreError> {
        let db = Database::create(path).map_err(|e| backend(&format!("open {}", path.display()), e))?;
        let txn = db.begin_write().map_err(|e| backend("begin write", e))?;
        let loaded = load(&txn, opts.history)?;
        txn.commit().map_err(|e| backend("commit", e))?;

        let shared = Arc::new(Shared {
            revision: AtomicU64::new(loaded.revision),
            compacted: AtomicU64::new(loaded.compacted),
            state: RwLock::new(State {
                objects: loaded.objects,
                history: loaded.history,
                revision: loaded.revision,
                compacted: loaded.compacted,
                watchers: Vec::new(),
            }),
            opts,
        });
        let db = Arc::new(db);
        let (sender, receiver) = std_mpsc::channel();
        let writer_shared = shared.clone();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("yunbian-store-writer".to_string())
            .spawn(move || writer_loop(&writer_db, writer_shared, receiver))
            .map_err(|e| backend("spawn store writer", e))?;
        tracing::debug!(path = %path.display(), revision = loaded.revision, "store opened");
        Ok(Arc::new_cyclic(|me| RedbStore {
            shared,
            sender: Some(sender),
            writer: Some(writer),
            path: path.to_path_buf(),
            db,
            me: me.clone(),
            leadership_lost: watch::channel(false).0,
            presence: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn submit(&self, kind: Kind, name: &str, op: Op) -> Result<StoredObject, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.as_ref().ok_or_else(closed)?;
        sender.send(Request { kind, name: name.to_string(), op, reply }).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("revision", &self.shared.revision.load(Ordering::Acquire))
            .field("compacted", &self.shared.compacted.load(Ordering::Acquire))
            .field("opts", &self.shared.opts)
            .finish()
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer after the batch in hand; joining
        // it closes the database file so the path can be opened again.
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
        self.shared.write().watchers.clear();
    }
}

fn writer_loop(db: &Database, shared: Arc<Shared>, queue: std_mpsc::Receiver<Request>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        process_batch(db, &shared, batch);
    }
    // Store dropped: end every watch.
    shared.write().watchers.clear();
}

fn check_expected(kind: Kind, name: &str, current: &StoredObject, expected: Option<u64>) -> Result<(), StoreError> {
    match expected {
        Some(rv) if rv != current.revision => {
            Err(StoreError::Conflict { kind, name: name.to_string(), expected: rv, current: current.revision })
        }
        _ => Ok(()),
    }
}

/// Decides one request against `current`; on success returns the event
/// (with `revision`) it produces.
fn decide(
    kind: Kind,
    name: &str,
    op: Op,
    current: Option<&StoredObject>,
    revision: u64,
) -> Result<StoreEvent, StoreError> {
    let not_found = || StoreError::NotFound { kind, name: name.to_string() };
    let (event, object) = match op {
        Op::Create(mut value) => {
            if current.is_some() {
                return Err(StoreError::AlreadyExists { kind, name: name.to_string() });
            }
            set_resource_version(&mut value, revision)?;
            (EventType::Added, StoredObject { kind, name: name.to_string(), revision, value: Arc::new(value) })
        }
        Op::Update(mut value, expected) => {
            let current = current.ok_or_else(not_found)?;
            check_expected(kind, name, current, expected)?;
            set_resource_version(&mut value, revision)?;
            (EventType::Modified, StoredObject { kind, name: name.to_string(), revision, value: Arc::new(value) })
        }
        Op::Delete(expected) => {
            let current = current.ok_or_else(not_found)?;
            check_expected(kind, name, current, expected)?;
            (EventType::Deleted, current.clone())
        }
    };
    Ok(StoreEvent { revision, event, object })
}

fn process_batch(db: &Database, shared: &Shared, batch: Vec<Request>) {
    let (base_revision, base_compacted) = {
        let s = shared.read();
        (s.revision, s.compacted)
    };
    // State of the keys written so far in this batch (None = deleted).
    let mut overlay: HashMap<(Kind, String), Option<StoredObject>> = HashMap::new();
    let mut changes: Vec<Change> = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    let mut revision = base_revision;

    for Request { kind, name, op, reply } in batch {
        let key = (kind, name);
        let committed;
        let current = match overlay.get(&key) {
            Some(v) => v.as_ref(),
            None => {
                committed = shared.read().objects.get(&kind).and_then(|m| m.get(&key.1)).cloned();
                committed.as_ref()
            }
        };
        let outcome = decide(kind, &key.1, op, current, revision + 1).and_then(|event| {
            let json = serde_json::to_vec(&*event.object.value).map_err(|e| backend("encode object", e))?;
            Ok(Change { event, json })
        });
        match outcome {
            Ok(change) => {
                revision += 1;
                let after = match change.event.event {
                    EventType::Deleted => None,
                    EventType::Added | EventType::Modified => Some(change.event.object.clone()),
                };
                overlay.insert(key, after);
                replies.push((reply, Ok(change.event.object.clone())));
                changes.push(change);
            }
            Err(e) => replies.push((reply, Err(e))),
        }
    }

    if changes.is_empty() {
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        return;
    }

    let compacted = base_compacted.max(revision.saturating_sub(shared.opts.history));
    if let Err(e) = commit(db, &changes, base_compacted, compacted, revision) {
        tracing::error!(error = %e, writes = changes.len(), "store commit failed");
        for (reply, _) in replies {
            let _ = reply.send(Err(e.clone()));
        }
        return;
    }
    tracing::trace!(requests = replies.len(), writes = changes.len(), revision, "store batch committed");

    {
        let mut guard = shared.write();
        let s = &mut *guard;
        for change in &changes {
            let obj = &change.event.object;
            let by_name = s.objects.entry(obj.kind).or_default();
            match change.event.event {
                EventType::Deleted => {
                    by_name.remove(&obj.name);
                }
                EventType::Added | EventType::Modified => {
                    by_name.insert(obj.name.clone(), obj.clone());
                }
            }
        }
        for c in &changes {
            let ev = &c.event;
            match encode_event(ev.event, ev.object.kind, &ev.object.name, &c.json) {
                Ok(encoded) => s.history.push_back(HistoryEntry {
                    revision: ev.revision,
                    kind: ev.object.kind,
                    encoded: encoded.into(),
                }),
                // Cannot happen: the same encoding was just committed.
                Err(e) => tracing::error!(error = %e, "encode history event"),
            }
        }
        while s.history.front().is_some_and(|e| e.revision <= compacted) {
            s.history.pop_front();
        }
        s.revision = revision;
        s.compacted = compacted;
        shared.revision.store(revision, Ordering::Release);
        shared.compacted.store(compacted, Ordering::Release);
        fan_out(&mut s.watchers, changes.iter().map(|c| &c.event), compacted);
    }

    for (reply, result) in replies {
        let _ = reply.send(result);
    }
}

/// Stores one batch in one write transaction.
fn commit(
    db: &Database,
    changes: &[Change],
    old_compacted: u64,
    compacted: u64,
    revision: u64,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| backend("begin write", e))?;
    {
        let mut objects = txn.open_table(OBJECTS).map_err(|e| backend("open objects table", e))?;
        let mut events = txn.open_table(EVENTS).map_err(|e| backend("open events table", e))?;
        let mut meta = txn.open_table(META).map_err(|e| backend("open meta table", e))?;
        for change in changes {
            let ev = &change.event;
            let key = object_key(ev.object.kind, &ev.object.name);
            match ev.event {
                EventType::Deleted => {
                    objects.remove(key.as_str()).map_err(|e| backend("delete object", e))?;
                }
                EventType::Added | EventType::Modified => {
                    objects.insert(key.as_str(), change.json.as_slice()).map_err(|e| backend("write object", e))?;
                }
            }
            let encoded = encode_event(ev.event, ev.object.kind, &ev.object.name, &change.json)?;
            events.insert(ev.revision, encoded.as_slice()).map_err(|e| backend("write event", e))?;
        }
        delete_events(&mut events, old_compacted, compacted)?;
        meta.insert(META_REVISION, revision).map_err(|e| backend("write meta", e))?;
        meta.insert(META_COMPACTED, compacted).map_err(|e| backend("write meta", e))?;
    }
    txn.commit().map_err(|e| backend("commit", e))
}

/// Sends `events` to every interested watcher without blocking; ends the
/// ones that are full or gone (see the module docs).
fn fan_out<'a>(watchers: &mut Vec<Watcher>, events: impl Iterator<Item = &'a StoreEvent> + Clone, compacted: u64) {
    watchers.retain(|w| {
        if w.tx.is_closed() {
            return false;
        }
        for ev in events.clone() {
            if ev.revision <= w.from || w.kind.is_some_and(|k| k != ev.object.kind) {
                continue;
            }
            if w.tx.capacity() > 1 {
                match w.tx.try_send(Ok(ev.clone())) {
                    Ok(()) => continue,
                    Err(TrySendError::Closed(_)) => return false,
                    Err(TrySendError::Full(_)) => {}
                }
            }
            // Only the reserved slot is left: end this watcher.
            tracing::warn!(kind = ?w.kind, revision = ev.revision, "watcher fell behind; ending it");
            let _ = w.tx.try_send(Err(StoreError::Compacted { requested: ev.revision - 1, oldest: compacted }));
            return false;
        }
        true
    });
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<StoredObject, StoreError> {
        self.shared
            .read()
            .objects
            .get(&kind)
            .and_then(|m| m.get(name))
            .cloned()
            .ok_or_else(|| StoreError::NotFound { kind, name: name.to_string() })
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<StoredObject>, u64), StoreError> {
        let s = self.shared.read();
        let objects = s.objects.get(&kind).map(|m| m.values().cloned().collect()).unwrap_or_default();
        Ok((objects, s.revision))
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<StoredObject, StoreError> {
        self.submit(kind, name, Op::Create(value)).await
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<StoredObject, StoreError> {
        self.submit(kind, name, Op::Update(value, expected)).await
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError> {
        self.submit(kind, name, Op::Delete(expected)).await
    }

    async fn watch(&self, kind: Option<Kind>, from_revision: u64) -> Result<Watch, StoreError> {
        // The write lock keeps the writer out between reading the history
        // and registering the watcher: no gap, no duplicate.
        let mut s = self.shared.write();
        if from_revision < s.compacted {
            return Err(StoreError::Compacted { requested: from_revision, oldest: s.compacted });
        }
        let start = s.history.partition_point(|e| e.revision <= from_revision);
        let replay: Vec<StoreEvent> = s
            .history
            .range(start..)
            .filter(|e| kind.is_none_or(|k| k == e.kind))
            .map(HistoryEntry::decode)
            .collect::<Result<_, _>>()?;
        let capacity =
            self.shared.opts.watch_buffer.clamp(1, MAX_WATCH_CAPACITY).saturating_add(replay.len()).saturating_add(1);
        let (tx, rx) = mpsc::channel(capacity);
        for ev in replay {
            tx.try_send(Ok(ev)).map_err(|_| StoreError::Backend("watch channel rejected the replay".to_string()))?;
        }
        s.watchers.push(Watcher { kind, from: from_revision, tx });
        Ok(rx)
    }

    fn revision(&self) -> u64 {
        self.shared.revision.load(Ordering::Acquire)
    }

    fn compacted_revision(&self) -> u64 {
        self.shared.compacted.load(Ordering::Acquire)
    }
}

/// Reads `key` from the `system` table, inserting `init` first if absent,
/// in one write transaction.
fn system_get_or_init(db: &Database, key: &str, init: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let txn = db.begin_write().map_err(|e| backend("begin write", e))?;
    let value = {
        let mut table = txn.open_table(SYSTEM).map_err(|e| backend("open system table", e))?;
        let existing = table.get(key).map_err(|e| backend("read system table", e))?.map(|v| v.value().to_vec());
        match existing {
            Some(v) => v,
            None => {
                table.insert(key, init.as_slice()).map_err(|e| backend("write system table", e))?;
                init
            }
        }
    };
    txn.commit().map_err(|e| backend("commit", e))?;
    Ok(value)
}

#[async_trait::async_trait]
impl Coordinator for RedbStore {
    async fn get_or_init(&self, key: &str, init: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let db = self.db.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || system_get_or_init(&db, &key, init))
            .await
            .map_err(|e| backend("system table task", e))?
    }

    async fn campaign(&self, replica: &str) -> Result<Leadership, StoreError> {
        let store: Arc<dyn Store> = self.me.upgrade().ok_or_else(closed)?;
        tracing::debug!(replica, "single replica: leading at once");
        Ok(Leadership { store, lost: self.leadership_lost.subscribe(), term: self.revision() })
    }

    async fn set_presence(&self, replica: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.presence.lock().unwrap_or_else(PoisonError::into_inner).insert(replica.to_string(), data);
        Ok(())
    }

    async fn presences(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let presence = self.presence.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(presence.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn event_round_trip() {
        let value = json!({"metadata": {"name": "a/b", "resourceVersion": 7}, "spec": {"x": 1}});
        let json = serde_json::to_vec(&value).expect("encode");
        let bytes = encode_event(EventType::Modified, Kind::AppInstance, "a/b", &json).expect("encode");
        let ev = decode_event(7, &bytes).expect("decode");
        assert_eq!(
            (ev.revision, ev.event, ev.object.kind, ev.object.name.as_str()),
            (7, EventType::Modified, Kind::AppInstance, "a/b")
        );
        assert_eq!((ev.object.revision, &*ev.object.value), (7, &value));
        // A delete carries the last state, written before the delete.
        let bytes = encode_event(EventType::Deleted, Kind::App, "a/b", &json).expect("encode");
        assert_eq!(decode_event(9, &bytes).expect("decode").object.revision, 7);
        assert!(decode_event(7, &bytes).is_err());
        // Every truncation fails cleanly.
        for n in 0..bytes.len() {
            assert!(decode_event(9, &bytes[..n]).is_err(), "prefix {n}");
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(rev in any::<u64>(), bytes in prop::collection::vec(any::<u8>(), 0..64), key in ".{0,16}") {
            let _ = decode_event(rev, &bytes);
            let _ = decode_object(&key, &bytes);
            let mut prefixed = vec![EVENT_CODEC_VERSION];
            prefixed.extend_from_slice(&bytes);
            let _ = decode_event(rev, &prefixed);
        }
    }
}
