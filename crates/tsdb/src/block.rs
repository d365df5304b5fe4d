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

use std::io::{self, Write};

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

/// Writes a block as it is built: entries go straight to `W` (a file,
/// through a buffer), so only the index stays in memory. A compaction of
/// blocks of many megabytes therefore holds one series' points at a time,
/// not the whole output twice.
#[derive(Debug)]
pub struct BlockWriter<W: Write> {
    out: W,
    /// CRC of every byte written so far (the footer's whole-file CRC).
    crc: crc32fast::Hasher,
    pos: u64,
    index: Vec<IndexEntry>,
    /// The entry being written (its CRC comes after it).
    entry: Vec<u8>,
}

impl<W: Write> BlockWriter<W> {
    /// Starts a block: writes its header.
    pub fn new(out: W, h: &BlockHeader) -> io::Result<Self> {
        let mut w = BlockWriter { out, crc: crc32fast::Hasher::new(), pos: 0, index: Vec::new(), entry: Vec::new() };
        let mut head = Vec::with_capacity(44 + 8 * h.sources.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&[1, h.kind.byte(), h.level, 0]);
        head.extend_from_slice(&h.seq.to_le_bytes());
        head.extend_from_slice(&h.wal_seq.to_le_bytes());
        head.extend_from_slice(&h.lo.to_le_bytes());
        head.extend_from_slice(&h.hi.to_le_bytes());
        head.extend_from_slice(&(h.sources.len() as u32).to_le_bytes());
        for s in &h.sources {
            head.extend_from_slice(&s.to_le_bytes());
        }
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.crc.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Adds a series' entry; `columns` are encoded chunks.
    pub fn add(&mut self, key: SeriesKey, points: u64, min_t: i64, max_t: i64, columns: &[&[u8]]) -> io::Result<()> {
        let mut e = std::mem::take(&mut self.entry);
        e.clear();
        put_varint(&mut e, columns.len() as u64);
        for c in columns {
            put_varint(&mut e, c.len() as u64);
            e.extend_from_slice(c);
        }
        let crc = crc32fast::hash(&e);
        e.extend_from_slice(&crc.to_le_bytes());
        if e.len() as u64 > u64::from(u32::MAX) {
            self.entry = e;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a block entry over 4 GiB"));
        }
        let offset = self.pos;
        let res = self.put(&e);
        let len = e.len() as u64;
        self.entry = e;
        res?;
        self.index.push(IndexEntry { key, points, min_t, max_t, offset, len });
        Ok(())
    }

    /// Number of entries so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Writes the index and the footer. Returns the writer, the block's
    /// size in bytes and its index.
    pub fn finish(mut self) -> io::Result<(W, u64, Vec<IndexEntry>)> {
        let index_offset = self.pos;
        let mut buf = Vec::with_capacity(64 * 1024);
        put_varint(&mut buf, self.index.len() as u64);
        let index = std::mem::take(&mut self.index);
        for e in &index {
            e.key.encode(&mut buf);
            put_varint(&mut buf, e.points);
            put_ivarint(&mut buf, e.min_t);
            put_ivarint(&mut buf, e.max_t);
            put_varint(&mut buf, e.offset);
            put_varint(&mut buf, e.len);
            if buf.len() >= 60 * 1024 {
                self.put(&buf)?;
                buf.clear();
            }
        }
        self.put(&buf)?;
        let crc = std::mem::take(&mut self.crc).finalize();
        let mut footer = Vec::with_capacity(FOOTER);
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&crc.to_le_bytes());
        footer.extend_from_slice(END);
        self.out.write_all(&footer)?;
        Ok((self.out, self.pos + FOOTER as u64, index))
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
        // An entry is at most 4 GiB: the store keeps its length in 32 bits.
        if offset < entries_start
            || len < 4
            || len > u64::from(u32::MAX)
            || offset.checked_add(len).is_none_or(|end| end > index_offset)
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> SeriesKey {
        SeriesKey::new("m", [("i", i.to_string())]).expect("key")
    }

    #[test]
    fn a_streamed_block_parses_back_with_its_entries() {
        let h = BlockHeader {
            kind: BlockKind::Rollup1m,
            level: 2,
            seq: 9,
            wal_seq: 4,
            lo: -5,
            hi: 77,
            sources: vec![3, 5],
        };
        let mut w = BlockWriter::new(Vec::new(), &h).expect("header");
        let mut chunks = Vec::new();
        // More than one 60 KiB index slice.
        for i in 0..5000 {
            let mut chunk = Vec::new();
            crate::codec::encode_points(&[(i as i64, i as f64), (i as i64 + 1, 0.5)], Default::default(), &mut chunk);
            w.add(key(i), 2, i as i64, i as i64 + 1, &[chunk.as_slice(); 5]).expect("entry");
            chunks.push(chunk);
        }
        assert_eq!(w.len(), 5000);
        let (bytes, size, index) = w.finish().expect("finish");
        assert_eq!(size, bytes.len() as u64);
        let (parsed, parsed_index) = parse_block(&bytes).expect("parses");
        assert_eq!(parsed, h);
        assert_eq!(parsed_index, index);
        for (i, e) in index.iter().enumerate().step_by(997) {
            assert_eq!(e.key, key(i));
            let cols = decode_entry(&bytes[e.offset as usize..(e.offset + e.len) as usize], 5).expect("entry");
            assert_eq!(cols.len(), 5);
            assert_eq!(cols[4], vec![(i as i64, i as f64), (i as i64 + 1, 0.5)]);
        }
        // One flipped byte anywhere fails the whole-file checksum.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        assert!(parse_block(&bad).is_err());
    }
}
