//! The write-ahead log: every accepted batch is in the WAL before `append`
//! returns, so the head (which lives only in memory) can be rebuilt on open.
//!
//! # On-disk format
//!
//! `wal/<segment:016x>.wal`, a sequence of records:
//!
//! ```text
//! u32 le  payload length (≤ 64 MiB)
//! u32 le  crc32 of the payload
//! payload:
//!   u8 1  series:  varint id, series key            (declares an id for this segment)
//!   u8 2  samples: varint n, n × (varint id, zigzag varint ts, u64 le f64 bits)
//! ```
//!
//! Ids are only meaningful inside their segment: a segment declares a
//! series before its first sample. A new segment starts at every open and
//! after every flush of the head into a block; a block records the segment
//! it covers and older segments are then deleted (see `store`).
//!
//! # Durability
//!
//! Each batch is one record written with one `write` call, so a SIGKILL
//! leaves it whole or torn, never interleaved. [`FsyncPolicy`] decides when
//! the segment is `fdatasync`ed: `Always` before `append` returns (safe
//! against power loss), `Interval(ms)` at most that much data lost, `Never`
//! leaves it to the OS (safe against a process crash only).
//!
//! `Interval` syncs on an append that comes at least `ms` after the last
//! sync; data written just before a silence is synced only when the owner
//! calls [`WalWriter::sync_if_due`] (the store's `sync_if_due`), which the
//! edge agent's writer does whenever it is idle.
//!
//! # Replay
//!
//! Records are read until the first one that is truncated, fails its CRC or
//! does not parse; the segment is truncated there (a torn tail after a
//! crash, or corruption: everything after it is dropped and counted).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::codec::{put_ivarint, put_varint, Cursor};
use crate::error::{DecodeError, Error};
use crate::series::SeriesKey;

/// Largest record accepted by the reader.
pub const MAX_RECORD: usize = 64 << 20;

/// When the WAL is synced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Sync every batch before `append` returns.
    Always,
    /// Sync when this many milliseconds passed since the last sync.
    Interval(u64),
    /// Never sync explicitly.
    Never,
}

/// A decoded WAL record.
#[derive(Debug, Clone, PartialEq)]
pub enum WalRecord {
    /// Declares `id` as `key` for the rest of the segment.
    Series {
        /// Segment-local id.
        id: u32,
        /// The series.
        key: SeriesKey,
    },
    /// Accepted points: `(id, ts, value)`.
    Samples(Vec<(u32, i64, f64)>),
}

/// Decodes the records of a segment. Returns them and the length of the
/// valid prefix (the segment is truncated there).
pub fn read_segment(buf: &[u8]) -> (Vec<WalRecord>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(rest) = buf.get(pos..) {
        match read_record(rest) {
            Ok((rec, len)) => {
                out.push(rec);
                pos += len;
            }
            Err(_) => break,
        }
    }
    (out, pos)
}

fn read_record(buf: &[u8]) -> Result<(WalRecord, usize), DecodeError> {
    let mut c = Cursor::new(buf);
    let len = c.u32()? as usize;
    if len > MAX_RECORD || len == 0 {
        return Err(DecodeError::Invalid("WAL record length"));
    }
    let crc = c.u32()?;
    let payload = c.bytes(len)?;
    if crc32fast::hash(payload) != crc {
        return Err(DecodeError::Checksum);
    }
    let mut p = Cursor::new(payload);
    let rec = match p.u8()? {
        1 => {
            let id = u32::try_from(p.varint()?).map_err(|_| DecodeError::Invalid("WAL series id"))?;
            WalRecord::Series { id, key: SeriesKey::decode(&mut p)? }
        }
        2 => {
            let n = p.len(p.remaining() / 10)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let id = u32::try_from(p.varint()?).map_err(|_| DecodeError::Invalid("WAL series id"))?;
                let ts = p.ivarint()?;
                let val = f64::from_bits(p.u64()?);
                v.push((id, ts, val));
            }
            WalRecord::Samples(v)
        }
        _ => return Err(DecodeError::Invalid("WAL record type")),
    };
    if p.remaining() != 0 {
        return Err(DecodeError::Invalid("WAL record has trailing bytes"));
    }
    Ok((rec, 8 + len))
}

/// Path of a segment.
pub fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.wal"))
}

/// Parses a segment file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Appends records to the current segment.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    seg: u64,
    file: File,
    policy: FsyncPolicy,
    last_sync: Instant,
    dirty: bool,
    rec: Vec<u8>,
    bytes: u64,
    /// `bytes` at the last sync.
    synced_bytes: u64,
    /// `fdatasync` calls on this segment.
    syncs: u64,
}

impl WalWriter {
    /// Creates segment `seg` in `dir` (which must exist).
    pub fn create(dir: &Path, seg: u64, policy: FsyncPolicy) -> Result<Self, Error> {
        let path = segment_path(dir, seg);
        let file =
            OpenOptions::new().create(true).append(true).open(&path).map_err(Error::io("create WAL segment", &path))?;
        if policy != FsyncPolicy::Never {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(WalWriter {
            dir: dir.to_path_buf(),
            seg,
            file,
            policy,
            last_sync: Instant::now(),
            dirty: false,
            rec: Vec::with_capacity(256),
            bytes: 0,
            synced_bytes: 0,
            syncs: 0,
        })
    }

    /// The segment number.
    pub fn segment(&self) -> u64 {
        self.seg
    }

    /// Bytes written to this segment.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of this segment written but not yet synced.
    pub fn unsynced_bytes(&self) -> u64 {
        if self.dirty {
            self.bytes - self.synced_bytes
        } else {
            0
        }
    }

    /// `fdatasync` calls made on this segment.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Starts a record payload; fill it with [`Self::payload`] then [`Self::commit`].
    pub fn begin(&mut self) {
        self.rec.clear();
        self.rec.extend_from_slice(&[0; 8]);
    }

    /// Adds a series declaration to the record being built.
    pub fn declare(&mut self, id: u32, key: &SeriesKey) {
        // Declarations are separate records so samples stay one record.
        let start = self.rec.len();
        self.rec.extend_from_slice(&[0; 8]);
        self.rec.push(1);
        put_varint(&mut self.rec, u64::from(id));
        key.encode(&mut self.rec);
        seal_record(&mut self.rec, start);
    }

    /// Writes the samples record (after any declarations) and syncs as the
    /// policy says. Nothing is written when `samples` is empty and no
    /// series was declared.
    pub fn commit(&mut self, samples: &[(u32, i64, f64)]) -> Result<(), Error> {
        // The first 8 bytes reserved by `begin` are unused when declarations
        // came first; the samples record is appended at the end.
        let body_start = 8;
        if !samples.is_empty() {
            let start = self.rec.len();
            self.rec.extend_from_slice(&[0; 8]);
            self.rec.push(2);
            put_varint(&mut self.rec, samples.len() as u64);
            for &(id, ts, v) in samples {
                put_varint(&mut self.rec, u64::from(id));
                put_ivarint(&mut self.rec, ts);
                self.rec.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            seal_record(&mut self.rec, start);
        }
        if self.rec.len() == body_start {
            return Ok(());
        }
        let path = || segment_path(&self.dir, self.seg);
        self.file.write_all(&self.rec[body_start..]).map_err(|e| Error::Io {
            op: "write WAL",
            path: path(),
            source: e,
        })?;
        self.bytes += (self.rec.len() - body_start) as u64;
        self.dirty = true;
        match self.policy {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::Interval(ms) => {
                if self.last_sync.elapsed() >= Duration::from_millis(ms) {
                    self.sync()?;
                }
            }
            FsyncPolicy::Never => {}
        }
        Ok(())
    }

    /// Under [`FsyncPolicy::Interval`]`(ms)`, syncs what was written if the
    /// last sync is at least `ms` before `now`: what an append would have
    /// done, for an owner whose appends stopped. Returns whether it synced.
    /// Other policies never sync here.
    pub fn sync_if_due(&mut self, now: Instant) -> Result<bool, Error> {
        let FsyncPolicy::Interval(ms) = self.policy else { return Ok(false) };
        if !self.dirty || now.saturating_duration_since(self.last_sync) < Duration::from_millis(ms) {
            return Ok(false);
        }
        self.sync()?;
        Ok(true)
    }

    /// Syncs the segment if anything was written since the last sync.
    pub fn sync(&mut self) -> Result<(), Error> {
        if self.dirty {
            self.file.sync_data().map_err(|e| Error::Io {
                op: "sync WAL",
                path: segment_path(&self.dir, self.seg),
                source: e,
            })?;
            self.dirty = false;
            self.synced_bytes = self.bytes;
            self.syncs += 1;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

fn seal_record(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}
