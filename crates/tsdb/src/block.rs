//! Sealed blocks: immutable files holding chunks of many series for one
//! time range, written once (temporary name, fsync, rename) and never
//! modified; compaction writes a new block and deletes its sources.
//!
//! # On-disk format
//!
//! `blocks/<kind>-<seq:016x>-<level:02x>.blk`, kind `raw`, `r1m` or `r1h`.
//!
//! ```text
//! header   "YTSB" u8 version=1, u8 kind (0 raw, 1 rollup 1 min, 2 rollup 1 h),
//!          u8 level, u8 0, u64 seq, u64 wal_seq, i64 lo, i64 hi,
//!          u32 n_sources, n_sources × u64 seq        (all little-endian)
//! entries  per series: varint n_columns, n_columns × (varint len, chunk),
//!          u32 crc32 of the entry bytes before it
//! index    varint n_entries, per entry: series key, varint points,
//!          zigzag varint min_t, zigzag varint max_t, varint offset, varint len
//! footer   u64 index offset, u32 crc32 of every byte before the footer, "YTSE"
//! ```
//!
//! A raw entry has one column (the chunk, see `codec`). A rollup entry has
//! five columns sharing bucket start timestamps: min, max, sum, count, last.
//! `seq` orders blocks by write time (newer wins a duplicate timestamp);
//! `wal_seq` is the last WAL segment whose points the block holds; `lo`/`hi`
//! bound its points (raw) or the watermark range it rolled up (rollups,
//! `lo` exclusive). A compacted block keeps its newest source's `seq`,
//! has a higher `level` and lists its sources, so on open a source left
//! behind by a crash is recognised and deleted.
//!
//! The whole-file CRC is checked on open, an entry's CRC on every read; a
//! mismatch moves the file to `quarantine/`.

use crate::codec::{put_ivarint, put_varint, Cursor};
use crate::error::DecodeError;
use crate::series::SeriesKey;

const MAGIC: &[u8; 4] = b"YTSB";
const END: &[u8; 4] = b"YTSE";
const FOOTER: usize = 16;

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockKind {
    /// Raw points.
    Raw,
    /// 1-minute aggregates.
    Rollup1m,
    /// 1-hour aggregates.
    Rollup1h,
}

impl BlockKind {
    /// File name prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            BlockKind::Raw => "raw",
            BlockKind::Rollup1m => "r1m",
            BlockKind::Rollup1h => "r1h",
        }
    }
    fn byte(self) -> u8 {
        match self {
            BlockKind::Raw => 0,
            BlockKind::Rollup1m => 1,
            BlockKind::Rollup1h => 2,
        }
    }
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(BlockKind::Raw),
            1 => Ok(BlockKind::Rollup1m),
            2 => Ok(BlockKind::Rollup1h),
            _ => Err(DecodeError::Invalid("block kind")),
        }
    }
    /// Columns per entry.
    pub fn columns(self) -> usize {
        match self {
            BlockKind::Raw => 1,
            _ => 5,
        }
    }
    /// Bucket width of a rollup, in ms.
    pub fn resolution_ms(self) -> i64 {
        match self {
            BlockKind::Raw => 1,
            BlockKind::Rollup1m => 60_000,
            BlockKind::Rollup1h => 3_600_000,
        }
    }
}

/// The fixed part of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    /// What the block holds.
    pub kind: BlockKind,
    /// Compaction level (0: written by a flush or a rollup).
    pub level: u8,
    /// Write order; newer blocks win duplicate timestamps.
    pub seq: u64,
    /// Last WAL segment whose points this block holds (raw).
    pub wal_seq: u64,
    /// Lower bound: oldest point (raw) or exclusive watermark (rollups).
    pub lo: i64,
    /// Upper bound: newest point (raw) or inclusive watermark (rollups).
    pub hi: i64,
    /// Blocks (by seq) this one replaces.
    pub sources: Vec<u64>,
}

/// Where one series' entry lies in a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The series.
    pub key: SeriesKey,
    /// Points (buckets for rollups).
    pub points: u64,
    /// Oldest timestamp.
    pub min_t: i64,
    /// Newest timestamp.
    pub max_t: i64,
    /// Byte offset of the entry.
    pub offset: u64,
    /// Entry length including its CRC.
    pub len: u64,
}

/// Builds a block in memory.
#[derive(Debug)]
pub struct BlockBuilder {
    buf: Vec<u8>,
    index: Vec<IndexEntry>,
}

impl BlockBuilder {
    /// Starts a block.
    pub fn new(h: &BlockHeader) -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&[1, h.kind.byte(), h.level, 0]);
        buf.extend_from_slice(&h.seq.to_le_bytes());
        buf.extend_from_slice(&h.wal_seq.to_le_bytes());
        buf.extend_from_slice(&h.lo.to_le_bytes());
        buf.extend_from_slice(&h.hi.to_le_bytes());
        buf.extend_from_slice(&(h.sources.len() as u32).to_le_bytes());
        for s in &h.sources {
            buf.extend_from_slice(&s.to_le_bytes());
        }
        BlockBuilder { buf, index: Vec::new() }
    }

    /// Adds a series' entry; `columns` are encoded chunks.
    pub fn add(&mut self, key: SeriesKey, points: u64, min_t: i64, max_t: i64, columns: &[&[u8]]) {
        let start = self.buf.len();
        put_varint(&mut self.buf, columns.len() as u64);
        for c in columns {
            put_varint(&mut self.buf, c.len() as u64);
            self.buf.extend_from_slice(c);
        }
        let crc = crc32fast::hash(&self.buf[start..]);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        let len = (self.buf.len() - start) as u64;
        self.index.push(IndexEntry { key, points, min_t, max_t, offset: start as u64, len });
    }

    /// Number of entries so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The finished file bytes and its index.
    pub fn finish(mut self) -> (Vec<u8>, Vec<IndexEntry>) {
        let index_offset = self.buf.len() as u64;
        put_varint(&mut self.buf, self.index.len() as u64);
        for e in &self.index {
            e.key.encode(&mut self.buf);
            put_varint(&mut self.buf, e.points);
            put_ivarint(&mut self.buf, e.min_t);
            put_ivarint(&mut self.buf, e.max_t);
            put_varint(&mut self.buf, e.offset);
            put_varint(&mut self.buf, e.len);
        }
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&index_offset.to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(END);
        (self.buf, self.index)
    }
}

/// Parses and verifies a whole block file: header and index.
pub fn parse_block(buf: &[u8]) -> Result<(BlockHeader, Vec<IndexEntry>), DecodeError> {
    if buf.len() < FOOTER + 44 {
        return Err(DecodeError::Truncated);
    }
    let body_len = buf.len() - FOOTER;
    let mut f = Cursor::new(&buf[body_len..]);
    let index_offset = f.u64()?;
    let crc = f.u32()?;
    if f.bytes(4)? != END {
        return Err(DecodeError::Invalid("block footer magic"));
    }
    if crc32fast::hash(&buf[..body_len]) != crc {
        return Err(DecodeError::Checksum);
    }
    let body = &buf[..body_len];
    let mut c = Cursor::new(body);
    if c.bytes(4)? != MAGIC {
        return Err(DecodeError::Invalid("block magic"));
    }
    if c.u8()? != 1 {
        return Err(DecodeError::Invalid("block version"));
    }
    let kind = BlockKind::from_byte(c.u8()?)?;
    let level = c.u8()?;
    let _ = c.u8()?;
    let seq = c.u64()?;
    let wal_seq = c.u64()?;
    let lo = c.u64()? as i64;
    let hi = c.u64()? as i64;
    let n_src = c.u32()? as usize;
    if n_src > c.remaining() / 8 {
        return Err(DecodeError::Truncated);
    }
    let sources = (0..n_src).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
    let entries_start = c.pos() as u64;
    if index_offset < entries_start || index_offset > body_len as u64 {
        return Err(DecodeError::Invalid("block index offset"));
    }
    let mut ic = Cursor::new(&body[index_offset as usize..]);
    let n = ic.len(ic.remaining())?;
    let mut index = Vec::with_capacity(n);
    for _ in 0..n {
        let key = SeriesKey::decode(&mut ic)?;
        let points = ic.varint()?;
        let min_t = ic.ivarint()?;
        let max_t = ic.ivarint()?;
        let offset = ic.varint()?;
        let len = ic.varint()?;
        if offset < entries_start || len < 4 || offset.checked_add(len).is_none_or(|end| end > index_offset) {
            return Err(DecodeError::Invalid("block entry location"));
        }
        if min_t > max_t {
            return Err(DecodeError::Invalid("block entry time range"));
        }
        index.push(IndexEntry { key, points, min_t, max_t, offset, len });
    }
    if ic.remaining() != 0 {
        return Err(DecodeError::Invalid("block index has trailing bytes"));
    }
    Ok((BlockHeader { kind, level, seq, wal_seq, lo, hi, sources }, index))
}

/// Decodes one entry (its bytes including the CRC) into columns of points.
pub fn decode_entry(buf: &[u8], expect_columns: usize) -> Result<Vec<Vec<(i64, f64)>>, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(DecodeError::Checksum);
    }
    let mut c = Cursor::new(body);
    let ncols = c.len(16)?;
    if ncols != expect_columns {
        return Err(DecodeError::Invalid("entry column count"));
    }
    let mut cols = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        let len = c.len(c.remaining())?;
        let chunk = c.bytes(len)?;
        let mut pts = Vec::new();
        crate::codec::decode_chunk(chunk, &mut pts)?;
        cols.push(pts);
    }
    if c.remaining() != 0 {
        return Err(DecodeError::Invalid("entry has trailing bytes"));
    }
    if cols.windows(2).any(|w| w[0].len() != w[1].len() || w[0].iter().zip(&w[1]).any(|(a, b)| a.0 != b.0)) {
        return Err(DecodeError::Invalid("rollup columns disagree"));
    }
    Ok(cols)
}

/// File name of a block.
pub fn file_name(kind: BlockKind, seq: u64, level: u8) -> String {
    format!("{}-{seq:016x}-{level:02x}.blk", kind.prefix())
}
