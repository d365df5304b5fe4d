//! A portable, compressed encoding of a set of points: what the edge ships
//! to the cloud in one store-and-forward batch.
//!
//! ```text
//! "YTB1"
//! varint  n_series
//! n_series × { series key (as in blocks), chunk (the store's chunk codec) }
//! u32     crc32 (little endian) of every byte before it
//! ```
//!
//! Each series' points are sorted by time; of two points at the same
//! timestamp the later one given to [`BatchBuilder::push`] wins (the
//! store's last-write-wins rule). [`decode`] reads untrusted bytes (the
//! cloud decodes what an edge sent): it never panics, checks the checksum
//! first, and bounds every allocation by the input size.

use std::collections::BTreeMap;

use crate::codec::{decode_chunk, encode_points, put_varint, ChunkHint, Cursor};
use crate::error::DecodeError;
use crate::series::SeriesKey;
use crate::store::SeriesPoints;

const MAGIC: &[u8; 4] = b"YTB1";

/// Collects points of many series and encodes them as one batch.
#[derive(Debug, Default, Clone)]
pub struct BatchBuilder {
    series: BTreeMap<SeriesKey, Vec<(i64, f64)>>,
    points: usize,
    key_bytes: usize,
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one point.
    pub fn push(&mut self, key: &SeriesKey, ts: i64, v: f64) {
        match self.series.get_mut(key) {
            Some(p) => p.push((ts, v)),
            None => {
                self.key_bytes +=
                    key.name().len() + key.tags().iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>() + 4;
                self.series.insert(key.clone(), vec![(ts, v)]);
            }
        }
        self.points += 1;
    }

    /// An upper bound of the encoded size so far (series keys plus at most
    /// 20 bytes a point: 68 bits of timestamp and 80 of value in the worst
    /// case), for sealing batches before they grow too large.
    pub fn max_encoded_bytes(&self) -> usize {
        16 + self.key_bytes + self.series.len() * 24 + self.points * 20
    }

    /// Points pushed (before deduplication of equal timestamps).
    pub fn len(&self) -> usize {
        self.points
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    /// Encodes the batch and empties the builder. Returns the bytes and the
    /// number of points they hold (after deduplication).
    pub fn finish(&mut self) -> (Vec<u8>, usize) {
        let series = std::mem::take(&mut self.series);
        self.points = 0;
        self.key_bytes = 0;
        let series: Vec<SeriesPoints> = series.into_iter().map(|(key, points)| SeriesPoints { key, points }).collect();
        encode(series)
    }
}

/// Encodes series (their points in any order). Returns the bytes and the
/// number of points after deduplication of equal timestamps.
pub fn encode(series: Vec<SeriesPoints>) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(16 + series.len() * 32);
    out.extend_from_slice(MAGIC);
    put_varint(&mut out, series.len() as u64);
    let mut total = 0;
    for mut s in series {
        // Stable sort keeps push order among equal timestamps; the last wins.
        s.points.sort_by_key(|p| p.0);
        let mut pts: Vec<(i64, f64)> = Vec::with_capacity(s.points.len());
        for p in s.points {
            match pts.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => pts.push(p),
            }
        }
        total += pts.len();
        s.key.encode(&mut out);
        encode_points(&pts, ChunkHint::default(), &mut out);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    (out, total)
}

/// Decodes a batch. Series are returned in the order they were encoded,
/// each with strictly increasing timestamps.
pub fn decode(buf: &[u8]) -> Result<Vec<SeriesPoints>, DecodeError> {
    if buf.len() < MAGIC.len() + 1 + 4 {
        return Err(DecodeError::Truncated);
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if !body.starts_with(MAGIC) {
        return Err(DecodeError::Invalid("batch magic"));
    }
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(DecodeError::Checksum);
    }
    decode_body(&body[MAGIC.len()..])
}

/// Decodes what follows the magic, without a checksum (the fuzz target
/// reaches the structure through here).
pub(crate) fn decode_body(body: &[u8]) -> Result<Vec<SeriesPoints>, DecodeError> {
    let mut c = Cursor::new(body);
    // A series takes at least 2 bytes of key and 4 of chunk.
    let n = c.len(c.remaining() / 6)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let key = SeriesKey::decode(&mut c)?;
        let rest = &body[c.pos()..];
        let mut points = Vec::new();
        let used = decode_chunk(rest, &mut points)?;
        c.bytes(used)?;
        out.push(SeriesPoints { key, points });
    }
    if c.remaining() != 0 {
        return Err(DecodeError::Invalid("trailing bytes after the last series"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(m: &str, dev: &str) -> SeriesKey {
        SeriesKey::new(m, [("device", dev)]).expect("valid key")
    }

    #[test]
    fn round_trip_sorts_and_keeps_the_last_write_of_a_timestamp() {
        let mut b = BatchBuilder::new();
        let a = key("temp", "a");
        let z = key("temp", "z");
        b.push(&z, 2000, 21.5);
        b.push(&a, 3000, 1.0);
        b.push(&a, 1000, 2.0);
        b.push(&a, 3000, 7.0);
        b.push(&z, 1000, f64::NAN);
        assert_eq!(b.len(), 5);
        let (bytes, n) = b.finish();
        assert!(b.is_empty());
        assert_eq!(n, 4);
        let got = decode(&bytes).expect("decodes");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key, a);
        assert_eq!(got[0].points, vec![(1000, 2.0), (3000, 7.0)]);
        assert_eq!(got[1].key, z);
        assert!(got[1].points[0].1.is_nan());
        assert_eq!(got[1].points[1], (2000, 21.5));
    }

    #[test]
    fn the_size_bound_holds_for_incompressible_points() {
        let mut b = BatchBuilder::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut t: i64 = 0;
        for i in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t += 1 + (x >> 20) as i64 % 1_000_000_000;
            let k = key("m", &format!("d{}", i % 7));
            b.push(&k, t, f64::from_bits(x));
        }
        let bound = b.max_encoded_bytes();
        let (bytes, _) = b.finish();
        assert!(bytes.len() <= bound, "{} > {bound}", bytes.len());
    }

    #[test]
    fn an_empty_batch_round_trips() {
        let (bytes, n) = BatchBuilder::new().finish();
        assert_eq!(n, 0);
        assert!(decode(&bytes).expect("decodes").is_empty());
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_an_error() {
        let mut b = BatchBuilder::new();
        for i in 0..50 {
            b.push(&key("temp", "a"), 1000 * i, 20.0 + (i % 7) as f64 / 10.0);
        }
        let (bytes, _) = b.finish();
        for i in 0..bytes.len() {
            assert!(decode(&bytes[..i]).is_err(), "truncated at {i}");
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "bit {bit} of byte {i}");
            }
        }
    }

    #[test]
    fn sensor_data_costs_about_a_byte_per_point() {
        let mut b = BatchBuilder::new();
        for d in 0..10 {
            let k = key("temp", &format!("dev-{d}"));
            for i in 0..600i64 {
                b.push(&k, 1_700_000_000_000 + i * 1000, 20.0 + ((i / 10 + d) % 5) as f64 / 10.0);
            }
        }
        let (bytes, n) = b.finish();
        assert_eq!(n, 6000);
        assert!(bytes.len() < n, "{} bytes for {n} points", bytes.len());
    }
}
