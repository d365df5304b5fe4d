//! The edge's store-and-forward shipper: points from rules' `cloud` sinks
//! are batched, written to disk, sent to the cloud when connected, and
//! deleted once the cloud acknowledges them. The protocol and limits are
//! the sans-IO [`DataOutbox`]; this module is its driver: one thread (disk
//! writes and fsyncs never run on the agent's async worker), one file per
//! batch.
//!
//! # Files
//!
//! ```text
//! <data-dir>/outbox/<id:020>.batch    "YOB1", u8 priority, u64 created ms,
//!                                     u64 points, u32 crc32 of what follows
//!                                     it, payload (yunbian_tsdb::batch)
//! <data-dir>/outbox/counters          acked and dropped point counters,
//!                                     rewritten before batch files are
//!                                     deleted (a SIGKILL never loses a
//!                                     count; a power loss may)
//! <data-dir>/outbox/quarantine/       batch files that failed their checksum
//! <data-dir>/outbox/next-id           ids below it may have been used
//!                                     (reserved in blocks, fsynced)
//! ```
//!
//! A batch file is written to a temporary name, fsynced and renamed (then
//! the directory fsynced) before the batch may be sent, so a SIGKILL at any
//! moment leaves either the whole batch or none of it; stray temporary
//! files are removed on start. Ids only grow, across restarts too: every
//! start begins above the highest id on disk, above the reserved
//! high-water mark in `next-id` (so a clock set back — a gateway booting at
//! 1970 before NTP — cannot reuse ids the cloud has seen) and above the
//! current Unix time in microseconds (so an outbox directory that was lost
//! does not either, with a sane clock).
//!
//! Invariants: a point the shipper accepted is in a batch that is either
//! acknowledged by the cloud, still on disk, or counted as dropped (TTL,
//! size limit, full disk) — never silently lost, except the points of a
//! batch not yet sealed when the process dies (at most `batch_interval`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use yunbian_api::DataOutboxStatus;
use yunbian_sync::data::{DataAction, DataOutbox, DataOutboxConfig, DropReason};
use yunbian_sync::wire::{encode, Up};
use yunbian_tsdb::batch::BatchBuilder;
use yunbian_tsdb::SeriesKey;

const MAGIC: &[u8; 4] = b"YOB1";
const HEADER: usize = 4 + 1 + 8 + 8 + 4;
/// Points queued between rules and the shipper thread before rules see
/// "behind" errors.
const QUEUE: usize = 65_536;
/// A batch is sealed before its encoding can pass this (it must fit one
/// WebSocket frame, base64 and JSON included, with room to spare).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Ids reserved at a time in `next-id`.
const ID_RESERVE: u64 = 1 << 20;

/// Limits and pacing of the shipper.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// Most bytes of batches kept on disk.
    pub max_bytes: u64,
    /// Batches older than this are dropped (zero: never).
    pub ttl: Duration,
    /// Upload limit in bytes per second (0: none).
    pub bandwidth: u64,
    /// A batch is sealed this long after its first point…
    pub batch_interval: Duration,
    /// …or when it holds this many points.
    pub batch_points: usize,
    /// Batches in flight (sent, not acknowledged).
    pub window: usize,
    /// An unacknowledged batch is sent again after this long.
    pub resend: Duration,
}

impl Default for ShipperOptions {
    fn default() -> Self {
        ShipperOptions {
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(7 * 86_400),
            bandwidth: 0,
            batch_interval: Duration::from_secs(1),
            batch_points: 10_000,
            window: 16,
            resend: Duration::from_secs(300),
        }
    }
}

enum Msg {
    Point(u8, SeriesKey, i64, f64),
    Connected(mpsc::Sender<Vec<u8>>),
    Disconnected,
    Ack(Vec<u64>),
    /// Seal open batches now (tests, shutdown).
    Seal,
    Stop,
}

/// Handle to the shipper thread (cheap to clone).
#[derive(Clone)]
pub struct Shipper {
    /// Unbounded, so control messages never block the caller (the agent's
    /// runtime worker); points are bounded by `queued`.
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    status: Arc<Mutex<DataOutboxStatus>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Shipper {
    /// Opens the outbox in `dir` (restoring queued batches) and starts the
    /// thread.
    pub fn start(dir: &Path, opts: ShipperOptions) -> std::io::Result<Shipper> {
        let mut disk = BatchDir::open(dir)?;
        let (restored, corrupt) = disk.restore();
        let mut counters = disk.read_counters();
        let cfg = DataOutboxConfig {
            max_bytes: opts.max_bytes,
            ttl_ms: opts.ttl.as_millis() as u64,
            window: opts.window,
            resend_ms: opts.resend.as_millis() as u64,
        };
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        let reserved = disk.read_next_id().unwrap_or_else(|e| {
            tracing::error!(error = %e, "data outbox id mark unreadable; new ids start at the current time");
            0
        });
        let meta: Vec<(u64, u8, u64, u64)> =
            restored.iter().map(|b| (b.id, b.priority, b.created_ms, b.size)).collect();
        let outbox = DataOutbox::new(cfg, meta, now_us.max(reserved));
        // Reserve the first block before any id of it is used.
        let reserved = outbox.next_id() + ID_RESERVE;
        disk.write_next_id(reserved)?;
        let points: HashMap<u64, u64> = restored.iter().map(|b| (b.id, b.points)).collect();
        if !restored.is_empty() {
            tracing::info!(
                batches = restored.len(),
                points = points.values().sum::<u64>(),
                "data outbox restored from disk"
            );
        }
        let mut status = DataOutboxStatus { bandwidth_limit: opts.bandwidth, ..Default::default() };
        if !corrupt.is_empty() {
            counters.disk += corrupt.iter().sum::<u64>();
            status.last_error =
                format!("{} corrupt batch file(s) quarantined in {}/quarantine", corrupt.len(), dir.display());
        }
        let counters_dirty = !corrupt.is_empty();
        let status = Arc::new(Mutex::new(status));
        let (tx, rx) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut worker = Worker {
            queued: queued.clone(),
            reserved,
            opts,
            disk,
            outbox,
            points,
            counters,
            open: HashMap::new(),
            conn: None,
            tokens: 0.0,
            last_refill: Instant::now(),
            status: status.clone(),
            counters_dirty,
            last_counters_write: Instant::now(),
        };
        let thread = std::thread::Builder::new().name("data-shipper".into()).spawn(move || worker.run(rx))?;
        Ok(Shipper { tx, queued, status, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Queues a point for the cloud. Never blocks: when the thread is this
    /// far behind, the point is refused with an error the rule counts.
    pub fn push(&self, priority: u8, key: SeriesKey, ts: i64, v: f64) -> Result<(), String> {
        if self.queued.load(Ordering::Relaxed) >= QUEUE {
            return Err("cloud sink: the data outbox is behind; point dropped".into());
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Msg::Point(priority.min(9), key, ts, v)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            "cloud sink: the data outbox is stopped".to_string()
        })
    }

    fn control(&self, m: Msg) {
        // Never blocks; fails only when the thread is gone.
        let _ = self.tx.send(m);
    }

    /// The cloud connection is up; batches go on `conn` (after the agent's
    /// Hello, which it queued before calling this).
    pub fn connected(&self, conn: mpsc::Sender<Vec<u8>>) {
        self.control(Msg::Connected(conn));
    }

    /// The cloud connection is gone.
    pub fn disconnected(&self) {
        self.control(Msg::Disconnected);
    }

    /// The cloud stored these batches.
    pub fn acked(&self, ids: Vec<u64>) {
        self.control(Msg::Ack(ids));
    }

    /// Seals the batches being filled now.
    pub fn seal(&self) {
        self.control(Msg::Seal);
    }

    /// Backlog and counters (updated by the thread a few times a second).
    pub fn status(&self) -> DataOutboxStatus {
        lock(&self.status).clone()
    }

    /// Seals what is open and stops the thread (returns at once).
    pub fn stop(&self) {
        self.control(Msg::Seal);
        self.control(Msg::Stop);
    }

    /// [`Shipper::stop`], then waits up to `timeout` for the thread to have
    /// written what it held; true when it did.
    pub fn stop_and_wait(&self, timeout: Duration) -> bool {
        self.stop();
        let Some(h) = lock(&self.thread).take() else { return true };
        let deadline = Instant::now() + timeout;
        while !h.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().is_ok()
    }
}

/// Acked and dropped points, persisted so drops stay visible across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    acked: u64,
    expired: u64,
    full: u64,
    disk: u64,
}

struct Open {
    builder: BatchBuilder,
    since: Instant,
}

struct Worker {
    queued: Arc<AtomicUsize>,
    /// Ids below this are reserved in `next-id`.
    reserved: u64,
    opts: ShipperOptions,
    disk: BatchDir,
    outbox: DataOutbox,
    /// Points per queued batch.
    points: HashMap<u64, u64>,
    counters: Counters,
    /// Batches being filled, per priority.
    open: HashMap<u8, Open>,
    conn: Option<mpsc::Sender<Vec<u8>>>,
    /// Bandwidth tokens (bytes; negative after a batch larger than them).
    tokens: f64,
    last_refill: Instant,
    status: Arc<Mutex<DataOutboxStatus>>,
    counters_dirty: bool,
    last_counters_write: Instant,
}

impl Worker {
    fn run(&mut self, rx: Receiver<Msg>) {
        let tick = Duration::from_millis(100);
        let mut last_tick = Instant::now();
        loop {
            match rx.recv_timeout(tick) {
                Ok(Msg::Stop) => {
                    self.seal_due(true);
                    self.write_counters();
                    return;
                }
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.seal_due(true);
                    self.write_counters();
                    return;
                }
            }
            if last_tick.elapsed() >= tick {
                last_tick = Instant::now();
                self.seal_due(false);
                self.ship();
                self.publish_status();
                // A write that failed (full disk) is retried.
                if self.counters_dirty && self.last_counters_write.elapsed() >= Duration::from_secs(5) {
                    self.write_counters();
                }
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Point(priority, key, ts, v) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                let open = self
                    .open
                    .entry(priority)
                    .or_insert_with(|| Open { builder: BatchBuilder::new(), since: Instant::now() });
                if open.builder.is_empty() {
                    open.since = Instant::now();
                }
                open.builder.push(&key, ts, v);
                if open.builder.len() >= self.opts.batch_points || open.builder.max_encoded_bytes() >= MAX_BATCH_BYTES {
                    self.seal(priority);
                }
            }
            Msg::Connected(c) => {
                self.conn = Some(c);
                self.outbox.on_connected();
                self.ship();
            }
            Msg::Disconnected => {
                self.conn = None;
                self.outbox.on_disconnected();
            }
            Msg::Ack(ids) => {
                let actions = self.outbox.on_ack(&ids);
                for a in &actions {
                    if let DataAction::Delete(done) = a {
                        for id in done {
                            self.counters.acked += self.points.remove(id).unwrap_or(0);
                            self.counters_dirty = true;
                        }
                    }
                }
                self.execute(actions);
                self.ship();
            }
            Msg::Seal => self.seal_due(true),
            Msg::Stop => {}
        }
    }

    fn seal_due(&mut self, all: bool) {
        let due: Vec<u8> = self
            .open
            .iter()
            .filter(|(_, o)| !o.builder.is_empty() && (all || o.since.elapsed() >= self.opts.batch_interval))
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.seal(p);
        }
    }

    /// Encodes the open batch of `priority`, queues and persists it.
    fn seal(&mut self, priority: u8) {
        let Some(open) = self.open.get_mut(&priority) else { return };
        if open.builder.is_empty() {
            return;
        }
        let (payload, points) = open.builder.finish();
        if self.outbox.next_id() >= self.reserved {
            let next = self.outbox.next_id() + ID_RESERVE;
            match self.disk.write_next_id(next) {
                Ok(()) => self.reserved = next,
                // Used anyway (the batch write needs the same disk); only
                // a restart with the clock set back could then reuse ids.
                Err(e) => tracing::warn!(error = %e, "cannot reserve data batch ids"),
            }
        }
        let size = disk_size(payload.len());
        let actions = self.outbox.enqueue_sized(priority, payload, size, unix_ms());
        let id = actions.iter().find_map(|a| match a {
            DataAction::Persist(b) => Some(b.id),
            _ => None,
        });
        if let Some(id) = id {
            self.points.insert(id, points as u64);
        }
        self.execute(actions);
    }

    fn execute(&mut self, actions: Vec<DataAction>) {
        // Counters first, written before any batch file is deleted: a kill
        // between the two must not lose a drop (or an acknowledgement) from
        // the counts.
        for a in &actions {
            if let DataAction::Dropped { id, priority, reason } = a {
                let n = self.points.remove(id).unwrap_or(0);
                match reason {
                    DropReason::Expired => self.counters.expired += n,
                    DropReason::Full => self.counters.full += n,
                    DropReason::Disk => self.counters.disk += n,
                }
                self.counters_dirty = true;
                tracing::warn!(batch = id, priority, points = n, reason = ?reason, "data batch dropped by policy");
            }
        }
        if self.counters_dirty && actions.iter().any(|a| matches!(a, DataAction::Delete(_))) {
            self.write_counters();
        }
        for a in actions {
            match a {
                DataAction::Persist(b) => {
                    let points = self.points.get(&b.id).copied().unwrap_or(0);
                    let mut result = self.disk.write(b.id, b.priority, b.created_ms, points, &b.payload);
                    // A full disk: give up lower-priority, older batches to
                    // make room (the drop policy), then this one.
                    let mut tries = 0;
                    while let Err(e) = &result {
                        let no_space = e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull;
                        let evicted = if no_space && tries < 8 { self.outbox.evict_for_disk(b.id) } else { Vec::new() };
                        if evicted.is_empty() {
                            tracing::warn!(batch = b.id, points, error = %e, "data batch could not be written; dropped");
                            self.set_error(format!("write batch {}: {e}", b.id));
                            let dropped = self.outbox.unpersisted(b.id);
                            self.execute(dropped);
                            break;
                        }
                        self.execute(evicted);
                        tries += 1;
                        result = self.disk.write(b.id, b.priority, b.created_ms, points, &b.payload);
                    }
                    if result.is_ok() {
                        self.clear_error_if_write();
                    }
                }
                DataAction::Send { id } => {
                    if !self.send(id) {
                        self.outbox.unsend(id);
                    }
                }
                DataAction::Delete(ids) => {
                    for id in ids {
                        self.disk.delete(id);
                    }
                }
                DataAction::Dropped { .. } => {}
            }
        }
    }

    /// Reads batch `id` back and hands it to the connection; false when the
    /// connection cannot take it now.
    fn send(&mut self, id: u64) -> bool {
        let Some(conn) = &self.conn else { return false };
        let (priority, points, payload) = match self.disk.read(id) {
            Ok(b) => b,
            Err(ReadError::Io(e)) => {
                // Transient (EMFILE, EIO…): the file stays; try again later.
                tracing::warn!(batch = id, error = %e, "data batch not readable now; will retry");
                self.set_error(format!("read batch {id}: {e}"));
                return false;
            }
            Err(ReadError::Lost(e)) => {
                // Quarantined by `read`: count its points as lost to the disk.
                tracing::error!(batch = id, error = %e, "data batch unreadable; quarantined");
                self.set_error(format!("read batch {id}: {e}"));
                let dropped = self.outbox.unpersisted(id);
                self.execute(dropped);
                return true;
            }
        };
        let frame = encode(&Up::Data { id, first_id: self.outbox.first_id(), priority, points, payload });
        if frame.len() > yunbian_sync::wire::MAX_FRAME {
            // Cannot happen with the sealing bound above; if it did, sending
            // it would close the connection on every attempt.
            tracing::error!(batch = id, bytes = frame.len(), "data batch larger than a frame; dropped");
            self.set_error(format!("batch {id} of {} bytes exceeds the frame limit", frame.len()));
            let dropped = self.outbox.unpersisted(id);
            self.execute(dropped);
            return true;
        }
        let size = frame.len() as f64;
        match conn.try_send(frame) {
            Ok(()) => {
                self.tokens -= size;
                true
            }
            Err(_) => false,
        }
    }

    fn ship(&mut self) {
        let now = Instant::now();
        let budget = if self.opts.bandwidth == 0 {
            u64::MAX
        } else {
            let rate = self.opts.bandwidth as f64;
            let burst = rate.max(64.0 * 1024.0);
            self.tokens = (self.tokens + rate * now.duration_since(self.last_refill).as_secs_f64()).min(burst);
            self.last_refill = now;
            if self.tokens <= 0.0 {
                // Still paying for an earlier batch: nothing is sent (a poll
                // would mark a batch in flight), but the TTL still applies.
                let actions = self.outbox.expire(unix_ms());
                self.execute(actions);
                return;
            }
            self.tokens as u64
        };
        let actions = self.outbox.poll(unix_ms(), budget);
        self.execute(actions);
    }

    fn set_error(&mut self, e: String) {
        lock(&self.status).last_error = e;
    }

    fn clear_error_if_write(&mut self) {
        let mut s = lock(&self.status);
        if s.last_error.starts_with("write batch") {
            s.last_error.clear();
        }
    }

    fn publish_status(&mut self) {
        let st = self.outbox.stats();
        let now = unix_ms();
        let mut s = lock(&self.status);
        s.queued_batches = st.queued;
        s.queued_bytes = st.bytes;
        s.queued_points = self.points.values().sum();
        s.oldest_age_seconds = if st.queued == 0 { 0 } else { now.saturating_sub(st.oldest_ms) / 1000 };
        s.acked_points = self.counters.acked;
        s.dropped_expired_points = self.counters.expired;
        s.dropped_full_points = self.counters.full;
        s.dropped_disk_points = self.counters.disk;
    }

    fn write_counters(&mut self) {
        self.last_counters_write = Instant::now();
        match self.disk.write_counters(&self.counters) {
            Ok(()) => self.counters_dirty = false,
            Err(e) => tracing::debug!(error = %e, "data outbox counters not written"),
        }
    }
}

/// A batch read back on start.
struct Restored {
    id: u64,
    priority: u8,
    created_ms: u64,
    points: u64,
    size: u64,
}

/// What a batch file of `payload` bytes takes on disk, as the size limit
/// counts it: the header, rounded up to whole 4 KiB blocks (a file of a few
/// bytes still takes a block; many small batches must not escape the limit).
fn disk_size(payload: usize) -> u64 {
    ((HEADER + payload) as u64).div_ceil(4096) * 4096
}

/// Why a batch could not be read back.
enum ReadError {
    /// Gone or corrupt (quarantined): its points are lost to the disk.
    Lost(String),
    /// A transient error: the file is intact as far as we know.
    Io(String),
}

/// The outbox directory: one file per batch.
struct BatchDir {
    dir: PathBuf,
}

impl BatchDir {
    fn open(dir: &Path) -> std::io::Result<BatchDir> {
        std::fs::create_dir_all(dir)?;
        Ok(BatchDir { dir: dir.to_path_buf() })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.batch"))
    }

    fn write(&self, id: u64, priority: u8, created_ms: u64, points: u64, payload: &[u8]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.push(priority);
        buf.extend_from_slice(&created_ms.to_le_bytes());
        buf.extend_from_slice(&points.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&buf[4..]);
        h.update(payload);
        buf.extend_from_slice(&h.finalize().to_le_bytes());
        buf.extend_from_slice(payload);
        let tmp = self.dir.join(format!(".{id:020}.tmp"));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path(id))?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(self.path(id));
        }
        result
    }

    /// Parses a batch file: (priority, created, points, payload).
    fn parse(buf: &[u8]) -> Result<(u8, u64, u64, Vec<u8>), String> {
        if buf.len() < HEADER || &buf[..4] != MAGIC {
            return Err("not a batch file".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(buf[21..25].try_into().expect("4 bytes"));
        let mut h = crc32fast::Hasher::new();
        h.update(&buf[4..21]);
        h.update(&buf[HEADER..]);
        if h.finalize() != crc {
            return Err("checksum mismatch".into());
        }
        Ok((buf[4], u64_at(5), u64_at(13), buf[HEADER..].to_vec()))
    }

    fn read(&self, id: u64) -> Result<(u8, u64, Vec<u8>), ReadError> {
        let path = self.path(id);
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReadError::Lost(format!("{}: {e}", path.display())))
            }
            Err(e) => return Err(ReadError::Io(format!("{}: {e}", path.display()))),
        };
        match Self::parse(&buf) {
            Ok((priority, _, points, payload)) => Ok((priority, points, payload)),
            Err(e) => {
                self.quarantine(&path);
                Err(ReadError::Lost(format!("{}: {e}", path.display())))
            }
        }
    }

    fn quarantine(&self, path: &Path) {
        let q = self.dir.join("quarantine");
        let _ = std::fs::create_dir_all(&q);
        if let Some(name) = path.file_name() {
            if std::fs::rename(path, q.join(name)).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn delete(&self, id: u64) {
        if let Err(e) = std::fs::remove_file(self.path(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(batch = id, error = %e, "cannot delete data batch file");
            }
        }
    }

    /// Every intact batch on disk, and the point counts of corrupt ones
    /// (quarantined; 0 where the header is unreadable too). Removes
    /// temporary files.
    fn restore(&mut self) -> (Vec<Restored>, Vec<u64>) {
        let mut out = Vec::new();
        let mut corrupt = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return (out, corrupt) };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".batch").and_then(|n| n.parse::<u64>().ok()) else { continue };
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| Self::parse(&b)) {
                Ok((priority, created_ms, points, payload)) => {
                    out.push(Restored { id, priority, created_ms, points, size: disk_size(payload.len()) })
                }
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "corrupt data batch quarantined");
                    let points = std::fs::read(&path)
                        .ok()
                        .filter(|b| b.len() >= HEADER && &b[..4] == MAGIC)
                        .map_or(0, |b| u64::from_le_bytes(b[13..21].try_into().expect("8 bytes")));
                    corrupt.push(points);
                    self.quarantine(&path);
                }
            }
        }
        out.sort_by_key(|r| r.id);
        (out, corrupt)
    }

    fn next_id_path(&self) -> PathBuf {
        self.dir.join("next-id")
    }

    /// The reserved high-water mark (0 when never written). An unreadable
    /// file is an error: starting below ids already used would make the
    /// cloud take new batches for old ones.
    fn read_next_id(&self) -> std::io::Result<u64> {
        match std::fs::read_to_string(self.next_id_path()) {
            Ok(t) => t.trim().parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a number: {t:?}", self.next_id_path().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn write_next_id(&self, id: u64) -> std::io::Result<()> {
        let tmp = self.dir.join(".next-id.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.next_id_path())?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn counters_path(&self) -> PathBuf {
        self.dir.join("counters")
    }

    fn read_counters(&self) -> Counters {
        let Ok(text) = std::fs::read_to_string(self.counters_path()) else { return Counters::default() };
        let v: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        match v[..] {
            [acked, expired, full, disk] => Counters { acked, expired, full, disk },
            _ => Counters::default(),
        }
    }

    fn write_counters(&self, c: &Counters) -> std::io::Result<()> {
        let tmp = self.dir.join(".counters.tmp");
        std::fs::write(&tmp, format!("{} {} {} {}\n", c.acked, c.expired, c.full, c.disk))?;
        std::fs::rename(&tmp, self.counters_path())
    }
}
