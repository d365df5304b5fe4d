//! Checks shared by the cargo-fuzz targets (`fuzz/fuzz_targets/tsdb_*.rs`)
//! and the corpus replay test (`tests/tsdb_fuzz_corpus.rs`): decoders fed
//! by the disk never panic, and what they accept is self-consistent.

use crate::block::{decode_entry, parse_block};
use crate::codec::{decode_chunk, encode_points, ChunkHint};
use crate::wal::read_segment;

/// Block decoder: `parse_block` then every entry's `decode_entry` on
/// arbitrary bytes never panic; accepted entries lie inside the file.
pub fn check_block(data: &[u8]) {
    if let Ok((h, index)) = parse_block(data) {
        for e in index {
            let (Ok(start), Ok(len)) = (usize::try_from(e.offset), usize::try_from(e.len)) else { continue };
            let entry = data.get(start..start + len).expect("parse_block checked entry bounds");
            if let Ok(cols) = decode_entry(entry, h.kind.columns()) {
                for c in cols {
                    assert!(c.windows(2).all(|w| w[0].0 < w[1].0), "decoded timestamps increase");
                }
            }
        }
    }
    let mut out = Vec::new();
    if decode_chunk(data, &mut out).is_ok() {
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "decoded timestamps increase");
    }
}

/// Batch decoder (what the cloud reads from edges): never panics, with or
/// without a valid checksum; what it accepts has strictly increasing
/// timestamps per series and encodes back to the same points.
pub fn check_batch(data: &[u8]) {
    let _ = crate::batch::decode(data);
    let Some(body) = data.get(4..) else { return };
    let Ok(series) = crate::batch::decode_body(body) else { return };
    for s in &series {
        assert!(s.points.windows(2).all(|w| w[0].0 < w[1].0), "decoded timestamps increase");
    }
    let (bytes, n) = crate::batch::encode(series.clone());
    assert_eq!(n, series.iter().map(|s| s.points.len()).sum::<usize>());
    let again = crate::batch::decode(&bytes).expect("an encoded batch decodes");
    assert_eq!(again.len(), series.len());
    for (a, b) in again.iter().zip(&series) {
        assert_eq!(a.key, b.key);
        let bits = |p: &[(i64, f64)]| p.iter().map(|(t, v)| (*t, v.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&a.points), bits(&b.points), "round trip of {}", a.key);
    }
}

/// WAL reader: never panics; the valid prefix reads back as the same records.
pub fn check_wal(data: &[u8]) {
    let (records, valid) = read_segment(data);
    assert!(valid <= data.len());
    let (again, valid2) = read_segment(&data[..valid]);
    assert_eq!(valid, valid2);
    assert_eq!(records.len(), again.len());
}

/// Codec round trip: bytes read as points (16 bytes each, timestamps made
/// strictly increasing) encode and decode back bit for bit.
pub fn check_chunk_roundtrip(data: &[u8]) {
    let mut pts: Vec<(i64, f64)> = Vec::new();
    let mut t: i64 = 0;
    for c in data.chunks_exact(16) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&c[..8]);
        let dt = (i64::from_le_bytes(a) & 0xffff_ffff).max(1);
        t = t.saturating_add(dt);
        if pts.last().is_some_and(|p| p.0 >= t) {
            break;
        }
        a.copy_from_slice(&c[8..]);
        let v = match c[8] % 4 {
            0 => f64::from_bits(u64::from_le_bytes(a)),
            1 => f64::from(c[9]) / 10.0,
            2 => f64::from(u32::from_le_bytes([c[9], c[10], c[11], c[12]])),
            _ => f64::from(c[9] as i8) + 20.0,
        };
        pts.push((t, v));
    }
    let mut buf = Vec::new();
    encode_points(&pts, ChunkHint::default(), &mut buf);
    let mut back = Vec::new();
    let used = decode_chunk(&buf, &mut back).expect("own encoding decodes");
    assert_eq!(used, buf.len());
    assert_eq!(pts.len(), back.len());
    for (a, b) in pts.iter().zip(&back) {
        assert_eq!(a.0, b.0);
        assert_eq!(a.1.to_bits(), b.1.to_bits());
    }
}
