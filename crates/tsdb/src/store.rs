//! The store: series index, head, WAL, blocks, and the maintenance steps
//! that move points between them.
//!
//! # Steps and their crash ordering
//!
//! - **append**: validate every point (watermark, out-of-order window),
//!   write one WAL record, then apply to the head. A WAL error rejects the
//!   whole batch and leaves the head untouched.
//! - **flush** (when the head spans `block_duration_ms`, under memory
//!   pressure, when the WAL passes its size limit, or on demand): encode
//!   every series' head into one raw block whose
//!   `wal_seq` is the current segment → write it atomically → open the next
//!   segment → delete segments ≤ `wal_seq`. A crash before the rename
//!   replays the WAL; after it, open deletes the covered segments.
//! - **compaction**: merge a run of small blocks of one kind into a block
//!   with a higher level listing its sources → write atomically → delete
//!   the sources. A crash in between leaves sources that open deletes.
//! - **retention**: raise the raw watermark `W` (age, total bytes) → roll
//!   the raw points in `(old W, W]` up into an r1m and an r1h block whose
//!   `hi` is `W` → write `meta` → delete raw blocks with `hi ≤ W`. On open,
//!   `W` is the maximum of `meta` and every rollup block's `hi`, so rolled
//!   up points are never rolled up twice nor shown twice.
//!
//! # Memory
//!
//! Accounted bytes are head chunks and out-of-order buffers, series keys
//! and structures, and block indexes. At `flush_at_percent` of the cap the
//! head is flushed early; a new series that would pass the cap (after a
//! flush) is rejected with [`Error::MemoryCap`], points of existing series
//! are always accepted (and flushed).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::agg::{AggState, Aggregation};
use crate::block::{self, BlockHeader, BlockKind, BlockWriter, IndexEntry};
use crate::codec::{self, ChunkEncoder, ChunkHint, Cursor};
use crate::error::{DecodeError, Error};
use crate::fsutil::{sync_dir, write_atomic};
use crate::series::{Selector, SeriesKey};
use crate::wal::{self, FsyncPolicy, WalRecord, WalWriter};

/// Configuration of a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// When the WAL is synced.
    pub fsync: FsyncPolicy,
    /// The head is flushed into a block when it spans this many ms.
    pub block_duration_ms: i64,
    /// How far behind a series' newest point a point may arrive.
    pub out_of_order_window_ms: i64,
    /// Cap on accounted memory (head, series, block indexes), bytes: new
    /// series are refused past it. Existing series always write, so block
    /// indexes and a sixteenth of the cap of head can take memory past it.
    pub memory_cap_bytes: usize,
    /// The head is flushed early when memory reaches this share of the cap.
    pub flush_at_percent: u8,
    /// Maximum number of series.
    pub max_series: usize,
    /// Compact when at least this many consecutive small blocks exist.
    pub compact_min_blocks: usize,
    /// A block smaller than this is small; compaction stops growing an
    /// output past it.
    pub compact_target_bytes: u64,
    /// Compact automatically after each flush and retention run.
    pub auto_compact: bool,
    /// Raw points older than this (relative to `now` given to
    /// [`Store::apply_retention`]) are rolled up and deleted.
    pub raw_retention_ms: Option<i64>,
    /// Raw blocks beyond this many bytes are rolled up and deleted, oldest first.
    pub max_raw_bytes: Option<u64>,
    /// Retention of 1-minute rollups.
    pub rollup_1m_retention_ms: Option<i64>,
    /// Retention of 1-hour rollups.
    pub rollup_1h_retention_ms: Option<i64>,
    /// The head is flushed when the WAL (every segment not yet covered by
    /// a block) passes this many bytes, so the WAL stays small next to the
    /// blocks whatever the ingest rate. With `max_raw_bytes`, the limit is
    /// at most a quarter of it (but never under 1 MiB). `None`: no limit.
    pub max_wal_bytes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: FsyncPolicy::Interval(1000),
            block_duration_ms: 2 * 3_600_000,
            out_of_order_window_ms: 10 * 60_000,
            memory_cap_bytes: 32 << 20,
            flush_at_percent: 75,
            max_series: 100_000,
            compact_min_blocks: 4,
            compact_target_bytes: 16 << 20,
            auto_compact: true,
            raw_retention_ms: Some(7 * 24 * 3_600_000),
            max_raw_bytes: Some(1 << 30),
            rollup_1m_retention_ms: Some(30 * 24 * 3_600_000),
            rollup_1h_retention_ms: Some(400 * 24 * 3_600_000),
            max_wal_bytes: Some(64 << 20),
        }
    }
}

/// A handle to a series of one store, from [`Store::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeriesRef(u32);

/// What happened to a batch: points not listed in `rejected` were accepted.
#[derive(Debug, Default)]
pub struct BatchResult {
    /// Points accepted.
    pub accepted: usize,
    /// Index in the batch and reason of each rejected point.
    pub rejected: Vec<(usize, Error)>,
}

/// Points of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoints {
    /// The series.
    pub key: SeriesKey,
    /// `(timestamp ms, value)`, oldest first.
    pub points: Vec<(i64, f64)>,
}

/// Counters and gauges of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Series known.
    pub series: usize,
    /// Points in the head.
    pub head_points: u64,
    /// Bytes of head chunks and out-of-order buffers.
    pub head_bytes: usize,
    /// All accounted bytes (head, series, block indexes).
    pub memory_bytes: usize,
    /// Bytes of block files (raw and rollups).
    pub disk_bytes: u64,
    /// Bytes of the WAL: the segment being written and older segments not
    /// yet covered by a block.
    pub wal_bytes: u64,
    /// Bytes of the WAL segment being written that are not synced yet.
    pub wal_unsynced_bytes: u64,
    /// WAL syncs (`fdatasync`) since open.
    pub wal_syncs: u64,
    /// Raw blocks.
    pub raw_blocks: usize,
    /// Rollup blocks.
    pub rollup_blocks: usize,
    /// Points accepted since open (WAL replay included).
    pub points_appended: u64,
    /// Points rejected as out of order.
    pub rejected_out_of_order: u64,
    /// Points rejected as older than the retention watermark.
    pub rejected_too_old: u64,
    /// New series rejected by the memory cap.
    pub rejected_memory_cap: u64,
    /// New series rejected by the series limit.
    pub rejected_series_limit: u64,
    /// Blocks moved to `quarantine/` since open.
    pub quarantined_blocks: u64,
    /// WAL bytes dropped on open (torn or corrupt tails).
    pub wal_truncated_bytes: u64,
    /// Head flushes.
    pub flushes: u64,
    /// Of those, flushes forced by memory pressure.
    pub pressure_flushes: u64,
    /// Of those, flushes forced by the WAL's size (`max_wal_bytes`).
    pub wal_flushes: u64,
    /// Compactions run.
    pub compactions: u64,
    /// Raw points at or before this timestamp were rolled up or deleted.
    pub raw_watermark: i64,
}

#[derive(Debug)]
struct Series {
    key: SeriesKey,
    /// Newest timestamp ever accepted (`i64::MIN`: none).
    max_ts: i64,
    chunk: Option<ChunkEncoder>,
    ooo: Vec<(i64, f64)>,
    hint: ChunkHint,
    /// WAL segment + 1 in which this series was declared (0: none).
    wal_declared: u64,
    /// Newest timestamp in any raw block registered since open (blocks
    /// deleted since included): what the head's rollback recomputes from.
    block_max_ts: i64,
}

impl Series {
    fn head_bytes(&self) -> usize {
        self.chunk.as_ref().map_or(0, |c| c.heap_bytes() + std::mem::size_of::<ChunkEncoder>())
            + self.ooo.capacity() * 16
    }
}

/// Where a series' entry is in a block file.
#[derive(Debug, Clone, Copy)]
struct EntryLoc {
    offset: u64,
    len: u64,
}

/// One series' entry in a block's in-memory index: 16 bytes, kept for every
/// series of every block, so with many series it is most of the accounted
/// memory once blocks pile up. Entries' time ranges stay on disk: blocks
/// are pruned by their own `lo`/`hi`, and an entry read needlessly is
/// filtered by time after decoding.
#[derive(Debug, Clone, Copy)]
struct Slot {
    sid: u32,
    /// At most 4 GiB (the block decoder refuses more).
    len: u32,
    offset: u64,
}

#[derive(Debug)]
struct Block {
    path: PathBuf,
    header: BlockHeader,
    bytes: u64,
    file: File,
    /// Sorted by series id.
    entries: Vec<Slot>,
}

impl Block {
    fn entry(&self, sid: u32) -> Option<EntryLoc> {
        let i = self.entries.binary_search_by_key(&sid, |e| e.sid).ok()?;
        let e = self.entries[i];
        Some(EntryLoc { offset: e.offset, len: u64::from(e.len) })
    }
    fn index_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Slot>() + std::mem::size_of::<Block>()
    }
}

#[derive(Debug, Clone, Copy)]
struct Watermarks {
    raw: i64,
    r1m: i64,
    r1h: i64,
}

const SERIES_OVERHEAD: usize = std::mem::size_of::<Series>() + 64;
/// What an open chunk costs before its first bits: the encoder and its
/// first allocation.
const CHUNK_FIXED_BYTES: usize = std::mem::size_of::<ChunkEncoder>() + 16;

/// The edge time-series store. One writer: wrap it in a mutex to share.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    opts: Options,
    series: Vec<Series>,
    by_key: HashMap<SeriesKey, u32>,
    blocks: Vec<Block>,
    wal: WalWriter,
    /// Bytes of WAL segments older than the one being written (replayed
    /// at open, or left by a failed write), deleted by the next flush.
    wal_old_bytes: u64,
    /// Syncs of WAL segments no longer written.
    wal_old_syncs: u64,
    next_seq: u64,
    low: Watermarks,
    head_min_t: i64,
    head_max_t: i64,
    head_points: u64,
    head_bytes: usize,
    /// Series with an open chunk in the head.
    head_chunks: usize,
    series_bytes: usize,
    index_bytes: usize,
    stats: Stats,
    scratch: Vec<(u32, i64, f64)>,
    undo: Vec<(u32, i64)>,
}

/// A block being written (see [`Store::start_block`]).
struct NewBlock {
    w: BlockWriter<std::io::BufWriter<File>>,
    /// Columns per entry of the block's kind.
    columns: usize,
    path: PathBuf,
    tmp: PathBuf,
}

impl NewBlock {
    /// Adds a series' entry: `bytes` is the chunk of a raw entry, or the
    /// length-prefixed columns of a rollup entry.
    fn add(&mut self, key: SeriesKey, n: u64, min_t: i64, max_t: i64, bytes: &[u8]) -> Result<(), Error> {
        let res = if self.columns == 1 {
            self.w.add(key, n, min_t, max_t, &[bytes])
        } else {
            let mut c = Cursor::new(bytes);
            let mut cols: Vec<&[u8]> = Vec::with_capacity(self.columns);
            for _ in 0..self.columns {
                let len = c.len(c.remaining()).map_err(|_| Error::InvalidQuery("rollup columns".into()))?;
                cols.push(c.bytes(len).map_err(|_| Error::InvalidQuery("rollup columns".into()))?);
            }
            self.w.add(key, n, min_t, max_t, &cols)
        };
        res.map_err(|source| Error::Io { op: "write", path: self.tmp.clone(), source })
    }

    /// Deletes the unfinished file.
    fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_path_buf(), source }
}

impl Store {
    /// Opens (or creates) the store in `dir`: loads blocks (quarantining
    /// any that fail their checksum), deletes blocks superseded by a
    /// compaction, replays the WAL (truncating a torn tail).
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Store, Error> {
        let dir = dir.as_ref().to_path_buf();
        for sub in ["", "blocks", "wal", "quarantine"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let meta = read_meta(&dir.join("meta"));
        let mut stats = Stats::default();

        // Blocks.
        let bdir = dir.join("blocks");
        let mut loaded: Vec<(PathBuf, BlockHeader, Vec<IndexEntry>, u64)> = Vec::new();
        for path in list_dir(&bdir)? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".blk") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err("read block", &path))?;
            match block::parse_block(&bytes) {
                Ok((h, idx)) => loaded.push((path, h, idx, bytes.len() as u64)),
                Err(_) => {
                    quarantine(&dir, &path)?;
                    stats.quarantined_blocks += 1;
                }
            }
        }
        // Sources left behind by an interrupted compaction.
        let superseded: Vec<bool> = loaded
            .iter()
            .map(|(_, h, _, _)| {
                loaded.iter().any(|(_, o, _, _)| o.kind == h.kind && o.level > h.level && o.sources.contains(&h.seq))
            })
            .collect();
        let mut kept = Vec::new();
        for ((path, h, idx, len), sup) in loaded.into_iter().zip(superseded) {
            if sup {
                fs::remove_file(&path).map_err(io_err("remove superseded block", &path))?;
            } else {
                kept.push((path, h, idx, len));
            }
        }
        kept.sort_by_key(|(_, h, _, _)| (h.seq, h.level));

        let mut low = meta;
        for (_, h, _, _) in &kept {
            if h.kind != BlockKind::Raw {
                low.raw = low.raw.max(h.hi);
            }
        }
        let next_seq = kept.iter().map(|(_, h, _, _)| h.seq).max().map_or(1, |s| s + 1);
        let covered = kept.iter().filter(|(_, h, _, _)| h.kind == BlockKind::Raw).map(|(_, h, _, _)| h.wal_seq).max();

        // WAL segments.
        let wdir = dir.join("wal");
        let mut segs: Vec<u64> = list_dir(&wdir)?
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).and_then(wal::parse_segment_name))
            .collect();
        segs.sort_unstable();
        let new_seg = segs.last().copied().max(covered).map_or(1, |s| s + 1);
        let wal = WalWriter::create(&wdir, new_seg, opts.fsync)?;

        let mut store = Store {
            dir,
            opts,
            series: Vec::new(),
            by_key: HashMap::new(),
            blocks: Vec::new(),
            wal,
            wal_old_bytes: 0,
            wal_old_syncs: 0,
            next_seq,
            low,
            head_min_t: i64::MAX,
            head_max_t: i64::MIN,
            head_points: 0,
            head_bytes: 0,
            head_chunks: 0,
            series_bytes: 0,
            index_bytes: 0,
            stats,
            scratch: Vec::new(),
            undo: Vec::new(),
        };
        for (path, h, idx, len) in kept {
            store.register_block(path, h, idx, len)?;
        }
        for seg in segs {
            let path = wal::segment_path(&wdir, seg);
            if covered.is_some_and(|c| seg <= c) {
                fs::remove_file(&path).map_err(io_err("remove covered WAL segment", &path))?;
                continue;
            }
            store.replay_segment(&path)?;
        }
        sync_dir(&wdir)?;
        Ok(store)
    }

    fn register_block(
        &mut self,
        path: PathBuf,
        header: BlockHeader,
        idx: Vec<IndexEntry>,
        bytes: u64,
    ) -> Result<(), Error> {
        let file = File::open(&path).map_err(io_err("open block", &path))?;
        let mut entries = Vec::with_capacity(idx.len());
        for e in idx {
            let sid = self.series_for_disk(e.key);
            if header.kind == BlockKind::Raw {
                let s = &mut self.series[sid as usize];
                s.max_ts = s.max_ts.max(e.max_t);
                s.block_max_ts = s.block_max_ts.max(e.max_t);
            }
            // The decoder and the writer keep entries under 4 GiB.
            let len = u32::try_from(e.len).unwrap_or(u32::MAX);
            entries.push(Slot { sid, len, offset: e.offset });
        }
        entries.sort_by_key(|e| e.sid);
        let b = Block { path, header, bytes, file, entries };
        self.index_bytes += b.index_bytes();
        self.blocks.push(b);
        self.blocks.sort_by_key(|b| (b.header.seq, b.header.level));
        Ok(())
    }

    /// Series found on disk are admitted regardless of the caps.
    fn series_for_disk(&mut self, key: SeriesKey) -> u32 {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        self.insert_series(key)
    }

    fn insert_series(&mut self, key: SeriesKey) -> u32 {
        let id = self.series.len() as u32;
        self.series_bytes += 2 * key.heap_bytes() + SERIES_OVERHEAD;
        self.by_key.insert(key.clone(), id);
        self.series.push(Series {
            key,
            max_ts: i64::MIN,
            chunk: None,
            block_max_ts: i64::MIN,
            ooo: Vec::new(),
            hint: ChunkHint::default(),
            wal_declared: 0,
        });
        id
    }

    fn replay_segment(&mut self, path: &Path) -> Result<(), Error> {
        let bytes = fs::read(path).map_err(io_err("read WAL segment", path))?;
        let (records, valid) = wal::read_segment(&bytes);
        if valid < bytes.len() {
            self.stats.wal_truncated_bytes += (bytes.len() - valid) as u64;
            let f = fs::OpenOptions::new().write(true).open(path).map_err(io_err("open WAL segment", path))?;
            f.set_len(valid as u64).map_err(io_err("truncate WAL segment", path))?;
            f.sync_all().map_err(io_err("sync WAL segment", path))?;
        }
        if records.is_empty() {
            fs::remove_file(path).map_err(io_err("remove empty WAL segment", path))?;
            return Ok(());
        }
        self.wal_old_bytes += valid as u64;
        let mut ids: HashMap<u32, u32> = HashMap::new();
        for rec in records {
            match rec {
                WalRecord::Series { id, key } => {
                    let sid = self.series_for_disk(key);
                    ids.insert(id, sid);
                }
                WalRecord::Samples(samples) => {
                    for (id, ts, v) in samples {
                        // A sample of an undeclared id cannot be written by
                        // this store; skip it rather than guess.
                        let Some(&sid) = ids.get(&id) else { continue };
                        if ts <= self.low.raw {
                            continue;
                        }
                        let s = &mut self.series[sid as usize];
                        s.max_ts = s.max_ts.max(ts);
                        self.apply(sid, ts, v);
                    }
                }
            }
        }
        Ok(())
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The handle of `key`, creating the series if needed (subject to the
    /// series limit and the memory cap).
    pub fn resolve(&mut self, key: &SeriesKey) -> Result<SeriesRef, Error> {
        if let Some(&id) = self.by_key.get(key) {
            return Ok(SeriesRef(id));
        }
        if self.series.len() >= self.opts.max_series {
            self.stats.rejected_series_limit += 1;
            return Err(Error::SeriesLimit { series: key.to_string(), limit: self.opts.max_series });
        }
        // The series, and the chunk its first point opens: admitted series
        // then write without passing the cap.
        let cost = 2 * key.heap_bytes() + SERIES_OVERHEAD + CHUNK_FIXED_BYTES;
        let cap = self.opts.memory_cap_bytes;
        // Flushed only if that makes room that lasts: the open chunks'
        // fixed cost comes back with the next batch, and the flush adds a
        // block index. Otherwise, with the rest (series, block indexes)
        // near the cap, every new series would flush the head.
        let after_flush = self.memory_bytes() - self.head_data_bytes()
            + self.head_chunks * std::mem::size_of::<Slot>()
            + std::mem::size_of::<Block>();
        if self.memory_bytes() + cost > cap && self.head_points > 0 && after_flush + cost <= cap {
            self.flush_inner(true)?;
        }
        if self.memory_bytes() + cost > self.opts.memory_cap_bytes {
            self.stats.rejected_memory_cap += 1;
            return Err(Error::MemoryCap {
                series: key.to_string(),
                used: self.memory_bytes(),
                cap: self.opts.memory_cap_bytes,
            });
        }
        Ok(SeriesRef(self.insert_series(key.clone())))
    }

    /// The key of a handle.
    pub fn key(&self, r: SeriesRef) -> Option<&SeriesKey> {
        self.series.get(r.0 as usize).map(|s| &s.key)
    }

    /// Appends one point.
    pub fn append(&mut self, key: &SeriesKey, ts: i64, v: f64) -> Result<(), Error> {
        let r = self.resolve(key)?;
        let mut res = self.append_many(&[(r, ts, v)])?;
        match res.rejected.pop() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends a batch: one WAL record, synced per the fsync policy before
    /// this returns. Points that break the out-of-order policy are rejected
    /// one by one (see [`BatchResult`]); an I/O error rejects the batch.
    pub fn append_many(&mut self, batch: &[(SeriesRef, i64, f64)]) -> Result<BatchResult, Error> {
        self.maybe_pressure_flush()?;
        let mut res = BatchResult::default();
        self.scratch.clear();
        self.undo.clear();
        self.wal.begin();
        let seg_mark = self.wal.segment() + 1;
        for (i, &(r, ts, v)) in batch.iter().enumerate() {
            let Some(s) = self.series.get_mut(r.0 as usize) else {
                res.rejected.push((i, Error::UnknownSeries(r.0)));
                continue;
            };
            if ts <= self.low.raw {
                self.stats.rejected_too_old += 1;
                res.rejected.push((i, Error::TooOld { ts, watermark: self.low.raw }));
                continue;
            }
            let oldest = s.max_ts.saturating_sub(self.opts.out_of_order_window_ms);
            if s.max_ts != i64::MIN && ts <= oldest {
                self.stats.rejected_out_of_order += 1;
                res.rejected.push((i, Error::OutOfOrder { series: s.key.to_string(), ts, oldest_allowed: oldest + 1 }));
                continue;
            }
            if s.wal_declared != seg_mark {
                self.wal.declare(r.0, &s.key);
                s.wal_declared = seg_mark;
            }
            self.undo.push((r.0, s.max_ts));
            s.max_ts = s.max_ts.max(ts);
            self.scratch.push((r.0, ts, v));
        }
        if let Err(e) = self.wal.commit(&self.scratch) {
            // Roll back what validation changed; nothing reached the head.
            self.rollback_after_wal_error();
            return Err(e);
        }
        let pts = std::mem::take(&mut self.scratch);
        for &(sid, ts, v) in &pts {
            self.apply(sid, ts, v);
        }
        res.accepted = pts.len();
        self.scratch = pts;
        if self.head_points > 0 && self.head_max_t.saturating_sub(self.head_min_t) >= self.opts.block_duration_ms {
            self.flush_inner(false)?;
        } else if self.head_points > 0 && self.wal_limit().is_some_and(|l| self.wal_total_bytes() >= l) {
            self.flush_inner(false)?;
            self.stats.wal_flushes += 1;
        }
        Ok(res)
    }

    /// After a failed WAL write the segment may hold a partial record:
    /// start a new segment so later records are readable, and recompute the
    /// newest timestamps from the head and each series' newest timestamp
    /// in the raw blocks registered since open (`block_max_ts`).
    fn rollback_after_wal_error(&mut self) {
        self.undo.clear();
        self.scratch.clear();
        let next = self.wal.segment() + 1;
        if let Ok(w) = WalWriter::create(&self.dir.join("wal"), next, self.opts.fsync) {
            let old = std::mem::replace(&mut self.wal, w);
            self.wal_old_bytes += old.bytes();
            self.wal_old_syncs += old.syncs();
        }
        for s in &mut self.series {
            s.wal_declared = 0;
        }
        for s in &mut self.series {
            let head = s.chunk.as_ref().filter(|c| !c.is_empty()).map_or(i64::MIN, |c| c.max_t());
            let ooo = s.ooo.iter().map(|p| p.0).max().unwrap_or(i64::MIN);
            s.max_ts = s.block_max_ts.max(head).max(ooo);
        }
    }

    fn apply(&mut self, sid: u32, ts: i64, v: f64) {
        let s = &mut self.series[sid as usize];
        let before = s.head_bytes();
        match &mut s.chunk {
            Some(c) if !c.is_empty() && ts <= c.max_t() => s.ooo.push((ts, v)),
            Some(c) => c.push(ts, v),
            None => {
                let mut c = ChunkEncoder::new(v, s.hint);
                c.push(ts, v);
                s.chunk = Some(c);
                self.head_chunks += 1;
            }
        }
        let after = s.head_bytes();
        self.head_bytes = self.head_bytes + after - before;
        self.head_points += 1;
        self.head_min_t = self.head_min_t.min(ts);
        self.head_max_t = self.head_max_t.max(ts);
        self.stats.points_appended += 1;
    }

    fn memory_bytes(&self) -> usize {
        self.head_bytes + self.series_bytes + self.index_bytes + self.by_key.capacity() * 8
    }

    /// Head bytes beyond each open chunk's fixed cost: what grows with the
    /// points written. A flush frees the fixed cost too, but the next
    /// batch brings it back (one encoder per series written), so only
    /// this part is worth flushing for.
    fn head_data_bytes(&self) -> usize {
        self.head_bytes.saturating_sub(self.head_chunks * CHUNK_FIXED_BYTES)
    }

    /// Flushes the head when memory passes `flush_at_percent` of the cap
    /// and the head holds at least a sixteenth of the cap in points. When
    /// what a flush cannot free (series, block indexes, one encoder per
    /// series) is itself past the mark, this still flushes only per
    /// sixteenth of the cap of points, never once per batch.
    fn maybe_pressure_flush(&mut self) -> Result<(), Error> {
        let cap = self.opts.memory_cap_bytes;
        let flush_at = cap / 100 * usize::from(self.opts.flush_at_percent.min(100));
        if self.head_points > 0 && self.memory_bytes() >= flush_at && self.head_data_bytes() >= cap / 16 {
            self.flush_inner(true)?;
        }
        Ok(())
    }

    /// Seals the head into a block (if it holds points) and starts a new
    /// WAL segment.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.flush_inner(false)
    }

    /// Syncs the WAL now (for `FsyncPolicy::Interval`/`Never` callers that
    /// want a durability point, e.g. before shutdown).
    pub fn sync(&mut self) -> Result<(), Error> {
        self.wal.sync()
    }

    /// Under `FsyncPolicy::Interval(ms)`, syncs the WAL if something is
    /// unsynced and the last sync is at least `ms` before `now`. Appends
    /// do this themselves; an owner calls it when appends stop (after a
    /// burst, then silence), so nothing stays unsynced much longer than
    /// the interval. Returns whether it synced.
    pub fn sync_if_due(&mut self, now: std::time::Instant) -> Result<bool, Error> {
        self.wal.sync_if_due(now)
    }

    /// Bytes of every WAL segment not yet covered by a block.
    fn wal_total_bytes(&self) -> u64 {
        self.wal_old_bytes + self.wal.bytes()
    }

    /// The WAL size at which the head is flushed (see
    /// [`Options::max_wal_bytes`]).
    fn wal_limit(&self) -> Option<u64> {
        let limit = self.opts.max_wal_bytes?;
        Some(match self.opts.max_raw_bytes {
            Some(raw) => limit.min((raw / 4).max(1 << 20)),
            None => limit,
        })
    }

    fn flush_inner(&mut self, pressure: bool) -> Result<(), Error> {
        if self.head_points == 0 {
            return Ok(());
        }
        let seq = self.next_seq;
        let wal_seq = self.wal.segment();
        let mut lo = i64::MAX;
        let mut hi = i64::MIN;
        let mut entries: Vec<(SeriesKey, u64, i64, i64, Vec<u8>)> = Vec::new();
        let mut pts = Vec::new();
        let mut buf = Vec::new();
        for s in &mut self.series {
            let Some(chunk) = &s.chunk else { continue };
            if chunk.is_empty() {
                continue;
            }
            buf.clear();
            let hint;
            if s.ooo.is_empty() && chunk.min_t() > self.low.raw {
                chunk.finish_into(&mut buf);
                hint = chunk.hint();
                pts.clear();
                entries.push((s.key.clone(), u64::from(chunk.len()), chunk.min_t(), chunk.max_t(), buf.clone()));
            } else {
                pts.clear();
                head_points_of(s, &mut pts);
                pts.retain(|p| p.0 > self.low.raw);
                if pts.is_empty() {
                    s.hint = chunk.hint();
                    continue;
                }
                hint = codec::encode_points(&pts, s.hint, &mut buf);
                let (min_t, max_t) = (pts[0].0, pts[pts.len() - 1].0);
                entries.push((s.key.clone(), pts.len() as u64, min_t, max_t, buf.clone()));
            }
            s.hint = hint;
            let e = entries.last().expect("just pushed");
            lo = lo.min(e.2);
            hi = hi.max(e.3);
        }
        if !entries.is_empty() {
            self.next_seq += 1;
            let header = BlockHeader { kind: BlockKind::Raw, level: 0, seq, wal_seq, lo, hi, sources: Vec::new() };
            self.write_block(header, entries)?;
        }
        // The block holds the head: a new segment, then drop covered ones.
        let wdir = self.dir.join("wal");
        let old = std::mem::replace(&mut self.wal, WalWriter::create(&wdir, wal_seq + 1, self.opts.fsync)?);
        self.wal_old_syncs += old.syncs();
        self.wal_old_bytes += old.bytes();
        for path in list_dir(&wdir)? {
            let name = path.file_name().and_then(|n| n.to_str()).and_then(wal::parse_segment_name);
            if name.is_some_and(|seg| seg <= wal_seq) {
                fs::remove_file(&path).map_err(io_err("remove WAL segment", &path))?;
            }
        }
        self.wal_old_bytes = 0;
        for s in &mut self.series {
            s.chunk = None;
            s.ooo = Vec::new();
        }
        self.head_bytes = 0;
        self.head_chunks = 0;
        self.head_points = 0;
        self.head_min_t = i64::MAX;
        self.head_max_t = i64::MIN;
        self.stats.flushes += 1;
        if pressure {
            self.stats.pressure_flushes += 1;
        }
        if self.opts.auto_compact {
            self.compact()?;
        }
        Ok(())
    }

    fn write_block(
        &mut self,
        header: BlockHeader,
        entries: Vec<(SeriesKey, u64, i64, i64, Vec<u8>)>,
    ) -> Result<(), Error> {
        let mut out = self.start_block(&header)?;
        for (key, n, min_t, max_t, bytes) in entries {
            if let Err(e) = out.add(key, n, min_t, max_t, &bytes) {
                out.abandon();
                return Err(e);
            }
        }
        self.commit_block(header, out)
    }

    /// Starts writing a block to a temporary file next to its final name.
    fn start_block(&self, header: &BlockHeader) -> Result<NewBlock, Error> {
        let path = self.dir.join("blocks").join(block::file_name(header.kind, header.seq, header.level));
        let tmp = path.with_extension("tmp");
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        match BlockWriter::new(std::io::BufWriter::with_capacity(256 * 1024, file), header) {
            Ok(w) => Ok(NewBlock { w, columns: header.kind.columns(), path, tmp }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(Error::Io { op: "write", path: tmp, source: e })
            }
        }
    }

    /// Finishes a block from [`start_block`](Self::start_block): index,
    /// footer, fsync, rename into place, directory sync; then serves it.
    fn commit_block(&mut self, header: BlockHeader, out: NewBlock) -> Result<(), Error> {
        let NewBlock { w, path, tmp, .. } = out;
        let done = (|| {
            let (buf, bytes, idx) = w.finish()?;
            let file = buf.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok::<_, std::io::Error>((bytes, idx))
        })();
        let (bytes, idx) = match done {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::Io { op: "write", path: tmp, source: e });
            }
        };
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Io { op: "rename", path, source: e });
        }
        sync_dir(&self.dir.join("blocks"))?;
        self.register_block(path, header, idx, bytes)
    }

    fn remove_block(&mut self, i: usize) -> Result<(), Error> {
        let b = self.blocks.remove(i);
        self.index_bytes -= b.index_bytes();
        fs::remove_file(&b.path).map_err(io_err("remove block", &b.path))
    }

    fn quarantine_block(&mut self, i: usize) {
        let b = self.blocks.remove(i);
        self.index_bytes -= b.index_bytes();
        self.stats.quarantined_blocks += 1;
        let _ = quarantine(&self.dir, &b.path);
    }

    /// Reads one entry of block `bi`; a checksum or format error
    /// quarantines the block and reads as nothing.
    fn read_entry(&mut self, bi: usize, e: EntryLoc) -> Option<Vec<Vec<(i64, f64)>>> {
        let b = &self.blocks[bi];
        let mut buf = vec![0u8; e.len as usize];
        let res = b
            .file
            .read_exact_at(&mut buf, e.offset)
            .map_err(|_| DecodeError::Truncated)
            .and_then(|_| block::decode_entry(&buf, b.header.kind.columns()));
        match res {
            Ok(cols) => Some(cols),
            Err(_) => {
                self.quarantine_block(bi);
                None
            }
        }
    }

    /// Raw points of a series in `[start, end)` newer than the watermark,
    /// merged over blocks and head (newest write wins).
    fn raw_points(&mut self, sid: u32, start: i64, end: i64, out: &mut Vec<(i64, f64)>) {
        let start = start.max(self.low.raw.saturating_add(1));
        if start >= end {
            return;
        }
        let mut sources: Vec<Vec<(i64, f64)>> = Vec::new();
        let mut bi = 0;
        while bi < self.blocks.len() {
            let b = &self.blocks[bi];
            if b.header.kind != BlockKind::Raw || b.header.hi < start || b.header.lo >= end {
                bi += 1;
                continue;
            }
            let Some(e) = b.entry(sid) else {
                bi += 1;
                continue;
            };
            let before = self.blocks.len();
            if let Some(mut cols) = self.read_entry(bi, e) {
                sources.push(cols.swap_remove(0));
            }
            if self.blocks.len() == before {
                bi += 1;
            }
        }
        let s = &self.series[sid as usize];
        let mut has_ooo = false;
        if let Some(c) = &s.chunk {
            if !c.is_empty() && c.max_t() >= start && c.min_t() < end {
                let mut buf = Vec::with_capacity(c.encoded_len());
                c.finish_into(&mut buf);
                let mut pts = Vec::new();
                if codec::decode_chunk(&buf, &mut pts).is_ok() {
                    sources.push(pts);
                }
            }
            if !s.ooo.is_empty() {
                has_ooo = true;
                sources.push(s.ooo.clone());
            }
        }
        merge_sources(sources, has_ooo, start, end, out);
    }

    fn matching(&self, sel: &Selector) -> Vec<u32> {
        let mut ids: Vec<u32> =
            self.series.iter().enumerate().filter(|(_, s)| sel.matches(&s.key)).map(|(i, _)| i as u32).collect();
        ids.sort_by(|a, b| self.series[*a as usize].key.cmp(&self.series[*b as usize].key));
        ids
    }

    /// Series matching `sel`, sorted.
    pub fn series(&self, sel: &Selector) -> Vec<SeriesKey> {
        self.matching(sel).into_iter().map(|i| self.series[i as usize].key.clone()).collect()
    }

    /// Raw points of the matching series in `[start, end)`; series without
    /// points there are left out.
    pub fn select(&mut self, sel: &Selector, start: i64, end: i64) -> Result<Vec<SeriesPoints>, Error> {
        let mut out = Vec::new();
        for sid in self.matching(sel) {
            let mut pts = Vec::new();
            self.raw_points(sid, start, end, &mut pts);
            if !pts.is_empty() {
                out.push(SeriesPoints { key: self.series[sid as usize].key.clone(), points: pts });
            }
        }
        Ok(out)
    }

    /// Step aggregation: buckets `[start + i·step, start + (i+1)·step)`,
    /// each stamped with its start. Where raw points were rolled up, 1-min
    /// rollups serve steps ≥ 1 min and 1-h rollups steps ≥ 1 h (a rollup
    /// bucket counts in the step bucket holding its start: exact when
    /// `start` and `step` are multiples of the rollup resolution).
    pub fn select_step(
        &mut self,
        sel: &Selector,
        start: i64,
        end: i64,
        step_ms: i64,
        agg: Aggregation,
    ) -> Result<Vec<SeriesPoints>, Error> {
        if step_ms <= 0 || start >= end {
            return Err(Error::InvalidQuery("step must be positive and start before end".into()));
        }
        let nb = (end - start - 1) / step_ms + 1;
        if nb > 10_000_000 {
            return Err(Error::InvalidQuery(format!("{nb} buckets; at most 10,000,000")));
        }
        let mut out = Vec::new();
        let mut pts = Vec::new();
        let mut states: Vec<Option<AggState>> = Vec::new();
        for sid in self.matching(sel) {
            states.clear();
            states.resize(nb as usize, None);
            let add = |states: &mut Vec<Option<AggState>>, t: i64, st: AggState| {
                if t < start || t >= end {
                    return;
                }
                let i = ((t - start) / step_ms) as usize;
                match &mut states[i] {
                    Some(s) => s.merge(&st),
                    slot => *slot = Some(st),
                }
            };
            if start <= self.low.raw && step_ms >= 60_000 {
                let use_1h = step_ms >= 3_600_000;
                let mut bi = 0;
                while bi < self.blocks.len() {
                    let b = &self.blocks[bi];
                    let use_it = match b.header.kind {
                        BlockKind::Raw => false,
                        BlockKind::Rollup1m => true,
                        BlockKind::Rollup1h => use_1h && b.header.hi <= self.low.r1m,
                    };
                    // Buckets of a rollup of raw points in (lo, hi] start in
                    // (lo - resolution, hi].
                    let res = if b.header.kind == BlockKind::Rollup1h { 3_600_000 } else { 60_000 };
                    let use_it = use_it && b.header.hi >= start && b.header.lo.saturating_sub(res) < end;
                    let e = if use_it { b.entry(sid) } else { None };
                    let Some(e) = e else {
                        bi += 1;
                        continue;
                    };
                    let before = self.blocks.len();
                    if let Some(cols) = self.read_entry(bi, e) {
                        for (k, &(t, _)) in cols[0].iter().enumerate() {
                            let st = AggState {
                                min: cols[0][k].1,
                                max: cols[1][k].1,
                                sum: cols[2][k].1,
                                count: cols[3][k].1,
                                last: cols[4][k].1,
                                last_t: t,
                            };
                            add(&mut states, t, st);
                        }
                    }
                    if self.blocks.len() == before {
                        bi += 1;
                    }
                }
            }
            pts.clear();
            self.raw_points(sid, start, end, &mut pts);
            for &(t, v) in &pts {
                add(&mut states, t, AggState::point(t, v));
            }
            let points: Vec<(i64, f64)> = states
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|s| (start + i as i64 * step_ms, s.value(agg))))
                .collect();
            if !points.is_empty() {
                out.push(SeriesPoints { key: self.series[sid as usize].key.clone(), points });
            }
        }
        Ok(out)
    }

    /// The newest raw point of every matching series that has one.
    pub fn latest(&mut self, sel: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, Error> {
        let mut out = Vec::new();
        let mut pts = Vec::new();
        for sid in self.matching(sel) {
            let t = self.series[sid as usize].max_ts;
            if t == i64::MIN || t <= self.low.raw {
                continue;
            }
            pts.clear();
            self.raw_points(sid, t, t.saturating_add(1), &mut pts);
            if let Some(&(t, v)) = pts.last() {
                out.push((self.series[sid as usize].key.clone(), t, v));
            }
        }
        Ok(out)
    }

    /// Merges runs of small blocks (per kind) into larger ones. Returns the
    /// number of compactions done.
    pub fn compact(&mut self) -> Result<usize, Error> {
        let mut done = 0;
        for kind in [BlockKind::Raw, BlockKind::Rollup1m, BlockKind::Rollup1h] {
            while let Some(run) = self.pick_run(kind) {
                self.merge_blocks(kind, &run)?;
                done += 1;
            }
        }
        self.stats.compactions += done as u64;
        Ok(done)
    }

    /// Seqs of a run of consecutive small blocks of `kind` worth merging.
    fn pick_run(&self, kind: BlockKind) -> Option<Vec<u64>> {
        let target = self.opts.compact_target_bytes;
        let min = self.opts.compact_min_blocks.max(2);
        let mut run: Vec<(u64, u64)> = Vec::new();
        let mut total = 0;
        for b in self.blocks.iter().filter(|b| b.header.kind == kind) {
            // 1-hour rollups still shadowed by 1-minute ones are not merged
            // with those that are not (queries pick them by `hi`).
            let side = |hi: i64| kind == BlockKind::Rollup1h && hi <= self.low.r1m;
            let breaks =
                b.bytes >= target || run.first().is_some_and(|_| side(b.header.hi) != side(self.lo_hi(run[0].0).1));
            if breaks {
                if run.len() >= min {
                    return Some(run.into_iter().map(|r| r.0).collect());
                }
                run.clear();
                total = 0;
                if b.bytes >= target {
                    continue;
                }
            }
            run.push((b.header.seq, b.bytes));
            total += b.bytes;
            if total >= target && run.len() >= min {
                return Some(run.into_iter().map(|r| r.0).collect());
            }
        }
        (run.len() >= min).then(|| run.into_iter().map(|r| r.0).collect())
    }

    fn lo_hi(&self, seq: u64) -> (i64, i64) {
        self.blocks.iter().find(|b| b.header.seq == seq).map_or((0, 0), |b| (b.header.lo, b.header.hi))
    }

    fn merge_blocks(&mut self, kind: BlockKind, seqs: &[u64]) -> Result<(), Error> {
        let idx: Vec<usize> = (0..self.blocks.len())
            .filter(|&i| self.blocks[i].header.kind == kind && seqs.contains(&self.blocks[i].header.seq))
            .collect();
        let hs: Vec<BlockHeader> = idx.iter().map(|&i| self.blocks[i].header.clone()).collect();
        let header = BlockHeader {
            kind,
            level: hs.iter().map(|h| h.level).max().unwrap_or(0).saturating_add(1),
            seq: hs.iter().map(|h| h.seq).max().unwrap_or(0),
            wal_seq: hs.iter().map(|h| h.wal_seq).max().unwrap_or(0),
            lo: hs.iter().map(|h| h.lo).min().unwrap_or(0),
            hi: hs.iter().map(|h| h.hi).max().unwrap_or(0),
            sources: hs.iter().map(|h| h.seq).collect(),
        };
        let mut sids: Vec<u32> = idx.iter().flat_map(|&i| self.blocks[i].entries.iter().map(|e| e.sid)).collect();
        sids.sort_unstable();
        sids.dedup();
        let paths: Vec<PathBuf> = idx.iter().map(|&i| self.blocks[i].path.clone()).collect();
        // Written as merged, one series at a time: a run of blocks near
        // `compact_target_bytes` is never held in memory.
        let mut out = self.start_block(&header)?;
        let mut buf = Vec::new();
        let mut pts = Vec::new();
        for sid in sids {
            // Sources oldest first, so later writes win.
            let mut cols_per_block = Vec::new();
            for p in &paths {
                let Some(bi) = self.blocks.iter().position(|b| &b.path == p) else {
                    continue;
                };
                if let Some(e) = self.blocks[bi].entry(sid) {
                    if let Some(cols) = self.read_entry(bi, e) {
                        cols_per_block.push(cols);
                    }
                }
            }
            let key = self.series[sid as usize].key.clone();
            buf.clear();
            let added = if kind == BlockKind::Raw {
                let sources: Vec<Vec<(i64, f64)>> = cols_per_block.into_iter().map(|mut c| c.swap_remove(0)).collect();
                pts.clear();
                merge_sources(sources, false, self.low.raw.saturating_add(1), i64::MAX, &mut pts);
                if pts.is_empty() {
                    continue;
                }
                codec::encode_points(&pts, ChunkHint::default(), &mut buf);
                out.add(key, pts.len() as u64, pts[0].0, pts[pts.len() - 1].0, &buf)
            } else {
                let mut buckets: std::collections::BTreeMap<i64, AggState> = std::collections::BTreeMap::new();
                for cols in &cols_per_block {
                    for (k, &(t, _)) in cols[0].iter().enumerate() {
                        let st = AggState {
                            min: cols[0][k].1,
                            max: cols[1][k].1,
                            sum: cols[2][k].1,
                            count: cols[3][k].1,
                            last: cols[4][k].1,
                            last_t: t,
                        };
                        buckets.entry(t).and_modify(|s| s.merge(&st)).or_insert(st);
                    }
                }
                if buckets.is_empty() {
                    continue;
                }
                let (n, min_t, max_t) = encode_rollup(&buckets, &mut buf);
                out.add(key, n, min_t, max_t, &buf)
            };
            if let Err(e) = added {
                out.abandon();
                return Err(e);
            }
        }
        // A source quarantined while it was read (a checksum failure) is
        // named in the header already written, and a reopen deletes the
        // blocks a header names: one whose move to `quarantine/` failed, or
        // that an operator put back, would go. So the output is dropped;
        // the next `compact` merges the run without it.
        if self.blocks.iter().filter(|b| paths.contains(&b.path)).count() != paths.len() {
            out.abandon();
            return Ok(());
        }
        self.commit_block(header.clone(), out)?;
        let mut i = 0;
        while i < self.blocks.len() {
            let b = &self.blocks[i];
            if paths.contains(&b.path) && !(b.header.level == header.level && b.header.seq == header.seq) {
                self.remove_block(i)?;
            } else {
                i += 1;
            }
        }
        sync_dir(&self.dir.join("blocks"))?;
        Ok(())
    }

    /// Applies retention at time `now_ms`: raises the raw watermark by age
    /// and total raw bytes, rolls the points at or before it up into 1-min
    /// and 1-h rollups, deletes raw blocks wholly at or before it, and
    /// deletes rollups past their own retention.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<(), Error> {
        let old = self.low.raw;
        let mut target = old;
        if let Some(age) = self.opts.raw_retention_ms {
            target = target.max(now_ms.saturating_sub(age));
        }
        if let Some(max) = self.opts.max_raw_bytes {
            loop {
                let live = self.blocks.iter().filter(|b| b.header.kind == BlockKind::Raw && b.header.hi > target);
                let total: u64 = live.clone().map(|b| b.bytes).sum();
                if total <= max {
                    break;
                }
                match live.map(|b| b.header.hi).min() {
                    Some(hi) => target = hi,
                    None => break,
                }
            }
        }
        if target > old {
            let mut r1m = Vec::new();
            let mut r1h = Vec::new();
            let mut pts = Vec::new();
            for sid in 0..self.series.len() as u32 {
                pts.clear();
                self.raw_points(sid, old.saturating_add(1), target.saturating_add(1), &mut pts);
                if pts.is_empty() {
                    continue;
                }
                let key = self.series[sid as usize].key.clone();
                for (res, out) in [(60_000i64, &mut r1m), (3_600_000, &mut r1h)] {
                    let mut buckets = std::collections::BTreeMap::new();
                    for &(t, v) in &pts {
                        let b = t.div_euclid(res) * res;
                        buckets.entry(b).and_modify(|s: &mut AggState| s.add(b, v)).or_insert(AggState::point(b, v));
                    }
                    let mut buf = Vec::new();
                    let (n, min_t, max_t) = encode_rollup(&buckets, &mut buf);
                    out.push((key.clone(), n, min_t, max_t, buf));
                }
            }
            for (kind, entries) in [(BlockKind::Rollup1m, r1m), (BlockKind::Rollup1h, r1h)] {
                if entries.is_empty() {
                    // Nothing was in the range: no empty file every minute.
                    continue;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let header = BlockHeader { kind, level: 0, seq, wal_seq: 0, lo: old, hi: target, sources: Vec::new() };
                self.write_block(header, entries)?;
            }
            self.low.raw = target;
            write_meta(&self.dir.join("meta"), self.low)?;
        }
        // Rollup retention: whole files.
        for (kind, keep) in [
            (BlockKind::Rollup1m, self.opts.rollup_1m_retention_ms),
            (BlockKind::Rollup1h, self.opts.rollup_1h_retention_ms),
        ] {
            let Some(age) = keep else { continue };
            let cutoff = now_ms.saturating_sub(age);
            let mut i = 0;
            while i < self.blocks.len() {
                let h = &self.blocks[i].header;
                if h.kind == kind && h.hi <= cutoff {
                    let hi = h.hi;
                    match kind {
                        BlockKind::Rollup1m => self.low.r1m = self.low.r1m.max(hi),
                        _ => self.low.r1h = self.low.r1h.max(hi),
                    }
                    self.remove_block(i)?;
                } else {
                    i += 1;
                }
            }
        }
        write_meta(&self.dir.join("meta"), self.low)?;
        let mut i = 0;
        while i < self.blocks.len() {
            let h = &self.blocks[i].header;
            if h.kind == BlockKind::Raw && h.hi <= self.low.raw {
                self.remove_block(i)?;
            } else {
                i += 1;
            }
        }
        sync_dir(&self.dir.join("blocks"))?;
        if self.opts.auto_compact {
            self.compact()?;
        }
        Ok(())
    }

    /// Raw points at or before this timestamp are gone (rolled up).
    pub fn raw_watermark(&self) -> i64 {
        self.low.raw
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.series = self.series.len();
        s.head_points = self.head_points;
        s.head_bytes = self.head_bytes;
        s.memory_bytes = self.memory_bytes();
        s.disk_bytes = self.blocks.iter().map(|b| b.bytes).sum();
        s.wal_bytes = self.wal_total_bytes();
        s.wal_unsynced_bytes = self.wal.unsynced_bytes();
        s.wal_syncs = self.wal_old_syncs + self.wal.syncs();
        s.raw_blocks = self.blocks.iter().filter(|b| b.header.kind == BlockKind::Raw).count();
        s.rollup_blocks = self.blocks.len() - s.raw_blocks;
        s.raw_watermark = self.low.raw;
        s
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Points of a series' head, sorted, duplicates resolved (last write wins).
fn head_points_of(s: &Series, out: &mut Vec<(i64, f64)>) {
    let mut sources = Vec::new();
    if let Some(c) = &s.chunk {
        let mut buf = Vec::with_capacity(c.encoded_len());
        c.finish_into(&mut buf);
        let mut pts = Vec::new();
        if codec::decode_chunk(&buf, &mut pts).is_ok() {
            sources.push(pts);
        }
    }
    let has_ooo = !s.ooo.is_empty();
    if has_ooo {
        sources.push(s.ooo.clone());
    }
    merge_sources(sources, has_ooo, i64::MIN, i64::MAX, out);
}

/// Merges sources given oldest write first into sorted points in
/// `[start, end)`; at equal timestamps the later source (or, within the
/// last unsorted source, the later element) wins.
fn merge_sources(
    mut sources: Vec<Vec<(i64, f64)>>,
    last_unsorted: bool,
    start: i64,
    end: i64,
    out: &mut Vec<(i64, f64)>,
) {
    if sources.len() == 1 && !last_unsorted {
        out.extend(sources[0].iter().copied().filter(|p| p.0 >= start && p.0 < end));
        return;
    }
    // Fast path: sorted sources whose ranges do not overlap.
    if !last_unsorted {
        let mut order: Vec<usize> = (0..sources.len()).filter(|&i| !sources[i].is_empty()).collect();
        order.sort_by_key(|&i| sources[i][0].0);
        let disjoint = order.windows(2).all(|w| {
            let a = &sources[w[0]];
            a[a.len() - 1].0 < sources[w[1]][0].0
        });
        if disjoint {
            for i in order {
                out.extend(sources[i].iter().copied().filter(|p| p.0 >= start && p.0 < end));
            }
            return;
        }
    }
    let mut all: Vec<(i64, usize, f64)> = Vec::with_capacity(sources.iter().map(|s| s.len()).sum());
    let mut rank = 0usize;
    for src in sources.iter_mut() {
        for &(t, v) in src.iter() {
            if t >= start && t < end {
                all.push((t, rank, v));
                rank += 1;
            }
        }
    }
    all.sort_unstable_by_key(|p| (p.0, p.1));
    for (i, &(t, _, v)) in all.iter().enumerate() {
        if all.get(i + 1).is_some_and(|n| n.0 == t) {
            continue;
        }
        out.push((t, v));
    }
}

/// Encodes rollup buckets as five length-prefixed chunks.
fn encode_rollup(buckets: &std::collections::BTreeMap<i64, AggState>, out: &mut Vec<u8>) -> (u64, i64, i64) {
    let mut cols: [Vec<(i64, f64)>; 5] = Default::default();
    for (&t, s) in buckets {
        for (c, v) in cols.iter_mut().zip([s.min, s.max, s.sum, s.count, s.last]) {
            c.push((t, v));
        }
    }
    let mut chunk = Vec::new();
    for c in &cols {
        chunk.clear();
        codec::encode_points(c, ChunkHint::default(), &mut chunk);
        codec::put_varint(out, chunk.len() as u64);
        out.extend_from_slice(&chunk);
    }
    let min_t = buckets.keys().next().copied().unwrap_or(0);
    let max_t = buckets.keys().next_back().copied().unwrap_or(0);
    (buckets.len() as u64, min_t, max_t)
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("list directory", dir))? {
        let e = e.map_err(io_err("list directory", dir))?;
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

fn quarantine(dir: &Path, path: &Path) -> Result<(), Error> {
    let name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let to = dir.join("quarantine").join(name);
    fs::rename(path, &to).map_err(io_err("quarantine block", path))
}

const META_MAGIC: &[u8; 4] = b"YTSM";

fn read_meta(path: &Path) -> Watermarks {
    let none = Watermarks { raw: i64::MIN, r1m: i64::MIN, r1h: i64::MIN };
    let Ok(b) = fs::read(path) else { return none };
    if b.len() != 32 || &b[..4] != META_MAGIC || crc32fast::hash(&b[..28]).to_le_bytes() != b[28..32] {
        return none;
    }
    let mut c = Cursor::new(&b[4..28]);
    let mut next = || c.u64().map(|v| v as i64).unwrap_or(i64::MIN);
    Watermarks { raw: next(), r1m: next(), r1h: next() }
}

fn write_meta(path: &Path, w: Watermarks) -> Result<(), Error> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(META_MAGIC);
    for v in [w.raw, w.r1m, w.r1h] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    write_atomic(path, &b)
}
