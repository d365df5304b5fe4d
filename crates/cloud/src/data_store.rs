//! Where the cloud keeps the data edges ship (store-and-forward batches):
//! the [`DataStore`] trait, so a deployment that outgrows one machine can
//! route data to an external time-series database, and the built-in
//! implementation, [`TsdbDataStore`], on the same engine as the edge's
//! store (docs/design/010-cloud-data.md).
//!
//! Invariant: [`DataStore::ingest`] stores a batch's points and records its
//! id atomically, and answers [`Ingested::Duplicate`] for an id it stored
//! before — across restarts — so an edge's retry never duplicates points.
//!
//! # How [`TsdbDataStore`] keeps it
//!
//! A batch's id is recorded as a point of an internal series
//! `__yunbian_batch{node="<node>"}` (timestamp: the ingest time in ms, made
//! strictly increasing per node; value: the id, exact in an f64 below
//! 2^53) appended in the **same** `append_many` call as the batch's points.
//! The engine writes one call as one checksummed WAL record, synced before
//! it returns ([`FsyncPolicy::Always`]), and a torn record is dropped
//! whole on replay: after a crash either the points and the marker are
//! there, or neither is.
//!
//! In memory each node has a [`DataInbox`] (ids stored above a floor). It
//! is built on the node's first batch after a start from the node's marker
//! points of the last [`DEDUP_LOOKBACK_MS`] (8 days: an edge drops batches
//! older than its 7-day TTL, and a batch's marker is never older than the
//! batch), then trimmed with the batch's `first_id` (the edge never sends
//! ids below it again). The markers are hidden from queries and series
//! listings unless the selector names `__yunbian_batch`.
//!
//! Lock: one mutex over the engine and the inboxes. Ingest holds it across
//! the WAL fsync, so batches of all nodes are written one at a time (one
//! machine's disk is the limit either way; the design note says where to
//! go past it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use yunbian_dataapi::{Aggregation, DataQuery, QueryError, Selector};
use yunbian_sync::data::DataInbox;
use yunbian_tsdb::{FsyncPolicy, Store, TagMatcher};
pub use yunbian_tsdb::{SeriesKey, SeriesPoints};

/// What [`DataStore::ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// The points are durably stored (some may have been rejected by the
    /// store's rules, e.g. too old or out of order; they are counted).
    Stored {
        /// Points stored.
        accepted: u64,
        /// Points refused.
        rejected: u64,
    },
    /// The batch was stored before; nothing was written.
    Duplicate,
}

/// Why a batch could not be stored (the edge keeps it and sends it again).
#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    /// The store failed (I/O, full disk, memory cap).
    #[error("data store: {0}")]
    Store(String),
    /// The batch's bytes are not a valid batch.
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// The cloud's data store. Calls block (disk I/O): call them from blocking
/// threads.
pub trait DataStore: Send + Sync + 'static {
    /// Stores batch `id` of `node` — its points with a `node` tag set to
    /// `node` (replacing any the edge set) — unless it was stored before.
    /// `first_id` is the edge's lowest unacknowledged id: ids below it are
    /// never sent again and their dedup records may be forgotten. Calls for
    /// one node are serialized by the caller.
    fn ingest(&self, node: &str, id: u64, first_id: u64, series: Vec<SeriesPoints>)
        -> Result<Ingested, DataStoreError>;
}

/// Metric of the internal series recording stored batch ids, one series
/// per node (`node` tag).
pub const BATCH_MARKER_METRIC: &str = "__yunbian_batch";
/// Metric names starting with this are the cloud's own: edges' points
/// under them are refused (counted as rejected).
pub const RESERVED_METRIC_PREFIX: &str = "__yunbian_";
/// How far back a node's markers are read to rebuild its dedup state.
pub const DEDUP_LOOKBACK_MS: i64 = 8 * DAY_MS;
/// Largest batch id a marker records exactly (2^53).
pub const MAX_BATCH_ID: u64 = 1 << 53;

const DAY_MS: i64 = 86_400_000;

/// Limits of the built-in store: larger than the edge's, for many nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsdbDataOptions {
    /// Hard cap on the engine's accounted memory (head, series, indexes).
    pub memory_cap_bytes: usize,
    /// Most series (over all nodes).
    pub max_series: usize,
    /// How far behind a series' newest point a point may arrive.
    pub out_of_order_window_ms: i64,
    /// Raw points older than this are rolled up and deleted. At least
    /// [`DEDUP_LOOKBACK_MS`]: the batch markers live as long.
    pub raw_retention_ms: i64,
    /// Cap on raw block bytes (`None`: age only). A cap that deletes
    /// points younger than [`DEDUP_LOOKBACK_MS`] also deletes markers, and
    /// a batch resent after a restart could then be stored twice.
    pub max_raw_bytes: Option<u64>,
    /// Retention of 1-minute rollups.
    pub rollup_1m_retention_ms: Option<i64>,
    /// Retention of 1-hour rollups.
    pub rollup_1h_retention_ms: Option<i64>,
}

impl Default for TsdbDataOptions {
    fn default() -> Self {
        TsdbDataOptions {
            memory_cap_bytes: 256 << 20,
            max_series: 1_000_000,
            out_of_order_window_ms: 3_600_000,
            raw_retention_ms: 30 * DAY_MS,
            max_raw_bytes: None,
            rollup_1m_retention_ms: Some(90 * DAY_MS),
            rollup_1h_retention_ms: Some(2 * 365 * DAY_MS),
        }
    }
}

impl TsdbDataOptions {
    fn engine(&self) -> yunbian_tsdb::Options {
        yunbian_tsdb::Options {
            // The hub acknowledges a batch once ingest returns: it must be on disk.
            fsync: FsyncPolicy::Always,
            out_of_order_window_ms: self.out_of_order_window_ms,
            memory_cap_bytes: self.memory_cap_bytes,
            max_series: self.max_series,
            compact_target_bytes: 64 << 20,
            raw_retention_ms: Some(self.raw_retention_ms),
            max_raw_bytes: self.max_raw_bytes,
            rollup_1m_retention_ms: self.rollup_1m_retention_ms,
            rollup_1h_retention_ms: self.rollup_1h_retention_ms,
            ..yunbian_tsdb::Options::default()
        }
    }
}

/// Unix milliseconds, now. Injected so tests move time without waiting.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// Dedup state of one node.
struct NodeDedup {
    inbox: DataInbox,
    /// Timestamp of the node's newest marker (the next one is later).
    last_marker_ms: i64,
}

struct Inner {
    store: Store,
    nodes: HashMap<String, NodeDedup>,
}

/// The built-in cloud data store: the tsdb engine in `<cloud data dir>/tsdb`
/// with dedup markers (see the module documentation).
pub struct TsdbDataStore {
    inner: Mutex<Inner>,
    clock: Clock,
    dir: PathBuf,
    /// Holds an exclusive `flock` on `<dir>/LOCK` while open: the engine
    /// has one writer, and two cloud processes given the same directory
    /// would interleave their WAL records.
    _lock: std::fs::File,
}

impl std::fmt::Debug for TsdbDataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsdbDataStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn store_err(what: &str) -> impl FnOnce(yunbian_tsdb::Error) -> DataStoreError + '_ {
    move |e| DataStoreError::Store(format!("{what}: {e}"))
}

impl TsdbDataStore {
    /// Opens (or creates) the store in `dir` (replaying its WAL).
    pub fn open(dir: impl AsRef<Path>, opts: TsdbDataOptions) -> Result<TsdbDataStore, DataStoreError> {
        Self::open_with_clock(dir, opts, system_clock())
    }

    /// [`open`](Self::open) with the clock that stamps markers and drives
    /// retention.
    pub fn open_with_clock(
        dir: impl AsRef<Path>,
        opts: TsdbDataOptions,
        clock: Clock,
    ) -> Result<TsdbDataStore, DataStoreError> {
        let dir = dir.as_ref().to_path_buf();
        if opts.raw_retention_ms < DEDUP_LOOKBACK_MS {
            return Err(DataStoreError::Store(format!(
                "raw retention of {} ms is shorter than the {DEDUP_LOOKBACK_MS} ms the batch markers must be kept",
                opts.raw_retention_ms
            )));
        }
        let lock = lock_dir(&dir)?;
        let store = Store::open(&dir, opts.engine())
            .map_err(|e| DataStoreError::Store(format!("open {}: {e}", dir.display())))?;
        Ok(TsdbDataStore { inner: Mutex::new(Inner { store, nodes: HashMap::new() }), clock, dir, _lock: lock })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock cannot leave the engine half-written (a
        // failed WAL write is rolled back before it returns) and leaves an
        // inbox at worst without its last id, which only lets a resend of
        // that batch overwrite the same points.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rolls up and deletes what is past retention, at the clock's now.
    pub fn apply_retention(&self) -> Result<(), DataStoreError> {
        let now = (self.clock)();
        self.lock().store.apply_retention(now).map_err(store_err("apply retention"))
    }

    /// Counters and gauges of the engine.
    pub fn stats(&self) -> yunbian_tsdb::Stats {
        self.lock().store.stats()
    }

    /// Applies retention every `every` on a thread of its own, until the
    /// store is dropped (the thread holds only a weak reference).
    pub fn spawn_retention(self: &Arc<Self>, every: Duration) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new().name("cloud-data-retention".into()).spawn(move || loop {
            std::thread::sleep(every);
            let Some(store) = weak.upgrade() else { return };
            if let Err(e) = store.apply_retention() {
                tracing::warn!(error = %e, "cloud data store: retention failed; retrying at the next run");
            }
        })
    }
}

/// Creates `dir` and takes the exclusive lock on `dir/LOCK`.
fn lock_dir(dir: &Path) -> Result<std::fs::File, DataStoreError> {
    std::fs::create_dir_all(dir).map_err(|e| DataStoreError::Store(format!("create {}: {e}", dir.display())))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DataStoreError::Store(format!("open {}: {e}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        DataStoreError::Store(format!(
            "lock {}: {e} (is another cloud process using this data directory?)",
            path.display()
        ))
    })?;
    Ok(file)
}

fn marker_key(node: &str) -> Result<SeriesKey, DataStoreError> {
    SeriesKey::new(BATCH_MARKER_METRIC, [("node", node)]).map_err(store_err("batch marker series"))
}

fn marker_selector(node: &str) -> Selector {
    Selector::metric(BATCH_MARKER_METRIC).with(TagMatcher::eq("node", node))
}

/// `key` with its `node` tag set to `node`.
fn with_node(key: &SeriesKey, node: &str) -> Result<SeriesKey, yunbian_tsdb::Error> {
    let tags = key.tags().iter().filter(|(k, _)| k != "node").map(|(k, v)| (k.as_str(), v.as_str()));
    SeriesKey::new(key.name(), tags.chain([("node", node)]))
}

/// The dedup state of `node` from its markers of the lookback window.
fn rebuild(store: &mut Store, node: &str, now: i64) -> Result<NodeDedup, DataStoreError> {
    let sel = marker_selector(node);
    let found =
        store.select(&sel, now.saturating_sub(DEDUP_LOOKBACK_MS), i64::MAX).map_err(store_err("read batch markers"))?;
    let mut ids = Vec::new();
    let mut last = i64::MIN;
    for sp in &found {
        for &(t, v) in &sp.points {
            last = last.max(t);
            // Markers are written by this store only; anything else is skipped.
            if v.fract() == 0.0 && (0.0..MAX_BATCH_ID as f64).contains(&v) {
                ids.push(v as u64);
            }
        }
    }
    // Markers older than the window still bound the next timestamp.
    for (_, t, _) in store.latest(&sel).map_err(store_err("read batch markers"))? {
        last = last.max(t);
    }
    tracing::debug!(node, ids = ids.len(), "cloud data store: batch ids rebuilt from markers");
    // Floor 0: an id missing from the window may be one the edge has not
    // sent yet; `forget_below(first_id)` then raises the floor.
    Ok(NodeDedup { inbox: DataInbox::new(0, ids), last_marker_ms: last })
}

impl DataStore for TsdbDataStore {
    fn ingest(
        &self,
        node: &str,
        id: u64,
        first_id: u64,
        series: Vec<SeriesPoints>,
    ) -> Result<Ingested, DataStoreError> {
        if id >= MAX_BATCH_ID {
            return Err(DataStoreError::Store(format!(
                "batch id {id} is not below 2^53 and cannot be recorded exactly"
            )));
        }
        let now = (self.clock)();
        let mut guard = self.lock();
        let Inner { store, nodes } = &mut *guard;
        if !nodes.contains_key(node) {
            let d = rebuild(store, node, now)?;
            nodes.insert(node.to_string(), d);
        }
        let d = nodes.get_mut(node).expect("inserted above when missing");
        d.inbox.forget_below(first_id);
        if !d.inbox.accept(id) {
            return Ok(Ingested::Duplicate);
        }
        // The marker's series first: if it cannot exist, nothing is written.
        let marker = store.resolve(&marker_key(node)?).map_err(store_err("batch marker series"))?;
        let total: usize = series.iter().map(|s| s.points.len()).sum();
        let mut batch = Vec::with_capacity(total + 1);
        let mut refused = 0u64;
        for sp in &series {
            if sp.key.name().starts_with(RESERVED_METRIC_PREFIX) {
                refused += sp.points.len() as u64;
                continue;
            }
            let key = match with_node(&sp.key, node) {
                Ok(k) => k,
                Err(_) => {
                    refused += sp.points.len() as u64;
                    continue;
                }
            };
            match store.resolve(&key) {
                Ok(r) => batch.extend(sp.points.iter().map(|&(t, v)| (r, t, v))),
                Err(e @ yunbian_tsdb::Error::Io { .. }) => return Err(store_err("create series")(e)),
                // Series limit, memory cap: the points are refused, counted.
                Err(_) => refused += sp.points.len() as u64,
            }
        }
        let ts = now.max(d.last_marker_ms.saturating_add(1)).max(store.raw_watermark().saturating_add(1));
        batch.push((marker, ts, id as f64));
        let marker_at = batch.len() - 1;
        let res = store.append_many(&batch).map_err(store_err("append batch"))?;
        if let Some((_, e)) = res.rejected.iter().find(|(i, _)| *i == marker_at) {
            // Cannot happen (the timestamp is past the series and the
            // watermark); if it did, the points are written but not the id:
            // the edge resends and the same points overwrite themselves.
            return Err(DataStoreError::Store(format!("batch marker refused: {e}")));
        }
        d.inbox.stored(id);
        d.last_marker_ms = ts;
        Ok(Ingested::Stored {
            accepted: res.accepted.saturating_sub(1) as u64,
            rejected: refused + res.rejected.len() as u64,
        })
    }
}

/// Whether a series is shown to a query by `sel`: batch markers only when
/// the selector names their metric. A [`Selector`] does not expose its
/// metric, so: it names it exactly when it stops matching the same tags
/// under another metric name.
fn visible(sel: &Selector, key: &SeriesKey) -> bool {
    if key.name() != BATCH_MARKER_METRIC {
        return true;
    }
    match SeriesKey::new("__yunbian_probe", key.tags().iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(probe) => !sel.matches(&probe),
        Err(_) => false,
    }
}

impl DataQuery for TsdbDataStore {
    fn select(&self, sel: &Selector, start: i64, end: i64) -> Result<Vec<SeriesPoints>, QueryError> {
        let mut out = self.lock().store.select(sel, start, end)?;
        out.retain(|s| visible(sel, &s.key));
        Ok(out)
    }

    fn select_step(
        &self,
        sel: &Selector,
        start: i64,
        end: i64,
        step_ms: i64,
        agg: Aggregation,
    ) -> Result<Vec<SeriesPoints>, QueryError> {
        let mut out = self.lock().store.select_step(sel, start, end, step_ms, agg)?;
        out.retain(|s| visible(sel, &s.key));
        Ok(out)
    }

    fn series(&self, sel: &Selector) -> Result<Vec<SeriesKey>, QueryError> {
        let mut out = self.lock().store.series(sel);
        out.retain(|k| visible(sel, k));
        Ok(out)
    }

    fn latest(&self, sel: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, QueryError> {
        let mut out = self.lock().store.latest(sel)?;
        out.retain(|(k, _, _)| visible(sel, k));
        Ok(out)
    }
}

/// How often the cloud applies retention to its data store.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Opens the built-in store in `<data_dir>/tsdb`, starts its retention
/// thread and gives it to the hub; returns what answers the API's data
/// queries. When the store cannot be opened the cloud runs without data:
/// the error is logged, the hub acknowledges no batch (edges keep them) and
/// queries answer 503 with the reason.
///
/// Each replica has its own store: with several replicas (etcd backend)
/// a node's data lands on the replica it is connected to.
pub async fn start(data_dir: &Path, hub: &crate::hub::Hub) -> Arc<dyn DataQuery> {
    let dir = data_dir.join("tsdb");
    let opened = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || TsdbDataStore::open(&dir, TsdbDataOptions::default())).await
    };
    let db = match opened {
        Ok(Ok(db)) => Arc::new(db),
        Ok(Err(e)) => return unavailable(&dir, &e.to_string()),
        Err(e) => return unavailable(&dir, &format!("open task: {e}")),
    };
    if let Err(e) = db.spawn_retention(RETENTION_EVERY) {
        tracing::error!(error = %e, "cloud data store: cannot start the retention thread; old data is kept");
    }
    let stats = db.stats();
    tracing::info!(dir = %dir.display(), series = stats.series, "cloud data store open");
    hub.set_data_store(db.clone());
    db
}

fn unavailable(dir: &Path, error: &str) -> Arc<dyn DataQuery> {
    tracing::error!(
        dir = %dir.display(),
        error,
        "cannot open the cloud data store: running without it (edges keep their data, queries answer 503)"
    );
    Arc::new(yunbian_dataapi::Unavailable::new(format!("the cloud data store is not available: {error}")))
}
