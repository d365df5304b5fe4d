//! The artifact export file (`yunbian artifact export`), read by the
//! registry's import and by an edge's offline import.
//!
//! ```text
//! "YBAX1\n"
//! u32 LE length, JSON header: {"name", "version", "blobs": {platform: blob}}
//! 32 bytes: sha256 of the header JSON
//! per distinct chunk, in the order the blobs list them:
//!   64 bytes hex digest, u32 LE length, the bytes
//! ```
//!
//! Every chunk carries its own digest and the header its hash, so a
//! damaged file is refused: [`ExportReader`] checks the header hash, each
//! chunk against its digest, that each chunk is one the header lists, and
//! that none is missing.

use std::collections::HashSet;
use std::io::{Read, Write};

use crate::{sha256, CHUNK_SIZE};

/// The first bytes of an export file.
pub const MAGIC: &[u8; 6] = b"YBAX1\n";

/// Largest header accepted.
const MAX_HEADER: usize = 16 << 20;

/// Writes the magic, the header and its hash.
pub fn write_header(w: &mut impl Write, header_json: &[u8]) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&(header_json.len() as u32).to_le_bytes())?;
    w.write_all(header_json)?;
    w.write_all(&sha256(header_json).0)
}

/// Writes one chunk record.
pub fn write_chunk(w: &mut impl Write, digest_hex: &str, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(digest_hex.as_bytes())?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

/// Reads an export file, checking as it goes. Errors are the reason the
/// file is refused (`truncated: 3 chunks missing`).
pub struct ExportReader<R: Read> {
    r: R,
    wanted: HashSet<String>,
}

impl<R: Read> ExportReader<R> {
    /// Reads and checks the magic and the header; returns the header JSON.
    /// Call [`expect_chunks`](Self::expect_chunks) with the chunk digests
    /// the header lists before reading chunks.
    pub fn open(mut r: R) -> Result<(ExportReader<R>, Vec<u8>), String> {
        let mut magic = [0u8; 6];
        r.read_exact(&mut magic).map_err(|_| "too short".to_string())?;
        if &magic != MAGIC {
            return Err("wrong magic".into());
        }
        let mut word = [0u8; 4];
        r.read_exact(&mut word).map_err(|_| "truncated header".to_string())?;
        let len = u32::from_le_bytes(word) as usize;
        if len > MAX_HEADER {
            return Err("header over 16 MiB".into());
        }
        let header = read_exactly(&mut r, len).ok_or_else(|| "truncated header".to_string())?;
        let mut hash = [0u8; 32];
        r.read_exact(&mut hash).map_err(|_| "truncated header hash".to_string())?;
        if sha256(&header).0 != hash {
            return Err("header checksum mismatch".into());
        }
        Ok((ExportReader { r, wanted: HashSet::new() }, header))
    }

    /// The chunks the file must carry (the digests the header's blobs list).
    pub fn expect_chunks(&mut self, digests: impl IntoIterator<Item = String>) {
        self.wanted = digests.into_iter().collect();
    }

    /// Chunks still to come.
    pub fn remaining(&self) -> usize {
        self.wanted.len()
    }

    /// The next chunk, checked against its digest; `None` once every
    /// expected chunk was read.
    pub fn next_chunk(&mut self) -> Result<Option<(String, Vec<u8>)>, String> {
        if self.wanted.is_empty() {
            return Ok(None);
        }
        let mut d = [0u8; 64];
        self.r.read_exact(&mut d).map_err(|_| format!("truncated: {} chunks missing", self.wanted.len()))?;
        let digest = String::from_utf8(d.to_vec()).map_err(|_| "chunk digest is not text".to_string())?;
        let mut word = [0u8; 4];
        self.r.read_exact(&mut word).map_err(|_| "truncated chunk".to_string())?;
        let n = u32::from_le_bytes(word) as usize;
        if n > CHUNK_SIZE {
            return Err("chunk over 4 MiB".into());
        }
        let bytes = read_exactly(&mut self.r, n).ok_or_else(|| "truncated chunk".to_string())?;
        if sha256(&bytes).hex() != digest {
            return Err(format!("chunk {digest} does not match its digest"));
        }
        if !self.wanted.remove(&digest) {
            return Err(format!("chunk {digest} is not listed by any blob"));
        }
        Ok(Some((digest, bytes)))
    }
}

/// The next `len` bytes, or `None` if the reader ends (or fails) first.
/// Memory grows with the bytes that really come, not with the length the
/// file claims: a 10-byte file announcing a 16 MiB header costs 64 KiB.
fn read_exactly(r: &mut impl Read, len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64).read_to_end(&mut out).ok()?;
    (out.len() == len).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(chunks: &[&[u8]]) -> (Vec<u8>, Vec<String>) {
        let mut out = Vec::new();
        write_header(&mut out, br#"{"name":"x"}"#).expect("header");
        let mut ds = Vec::new();
        for c in chunks {
            let d = sha256(c).hex();
            write_chunk(&mut out, &d, c).expect("chunk");
            ds.push(d);
        }
        (out, ds)
    }

    #[test]
    fn round_trip_and_every_damage_is_refused() {
        let (bytes, ds) = file(&[b"one", b"two"]);
        let (mut r, header) = ExportReader::open(&bytes[..]).expect("open");
        assert_eq!(header, br#"{"name":"x"}"#);
        r.expect_chunks(ds.clone());
        assert_eq!(r.next_chunk().expect("1").map(|c| c.1), Some(b"one".to_vec()));
        assert_eq!(r.next_chunk().expect("2").map(|c| c.1), Some(b"two".to_vec()));
        assert_eq!(r.next_chunk().expect("end"), None);
        // Truncated anywhere, or one byte flipped anywhere: refused.
        for cut in 0..bytes.len() {
            let outcome = ExportReader::open(&bytes[..cut]).and_then(|(mut r, _)| {
                r.expect_chunks(ds.clone());
                while r.next_chunk()?.is_some() {}
                Ok(())
            });
            assert!(outcome.is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let outcome = ExportReader::open(&b[..]).and_then(|(mut r, _)| {
                r.expect_chunks(ds.clone());
                while r.next_chunk()?.is_some() {}
                Ok(())
            });
            assert!(outcome.is_err(), "flip at {i}");
        }
        // A chunk the header does not list.
        let (mut r, _) = ExportReader::open(&bytes[..]).expect("open");
        r.expect_chunks([ds[1].clone()]);
        assert!(r.next_chunk().expect_err("unlisted").contains("not listed"));
    }
}
