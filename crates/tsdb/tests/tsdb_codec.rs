//! Chunk codec round trips: decimals (with a scale raised mid-chunk),
//! counters, arbitrary floats and special values come back bit for bit.

use yunbian_tsdb::codec::{decode_chunk, encode_points, ChunkHint};

fn roundtrip(pts: &[(i64, f64)]) -> usize {
    let mut buf = Vec::new();
    encode_points(pts, ChunkHint::default(), &mut buf);
    let mut back = Vec::new();
    let used = decode_chunk(&buf, &mut back).expect("decodes");
    assert_eq!(used, buf.len());
    assert_eq!(back.len(), pts.len());
    for (a, b) in pts.iter().zip(&back) {
        assert_eq!(a.0, b.0);
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "{} vs {}", a.1, b.1);
    }
    buf.len()
}

#[test]
fn scale_is_raised_mid_chunk() {
    let pts: Vec<(i64, f64)> = (0..100).map(|i| (i * 1000, 20.0 + (i % 10) as f64 / 10.0)).collect();
    let bytes = roundtrip(&pts);
    assert!(bytes < 100, "{bytes} bytes for 100 decimal points");
    let pts: Vec<(i64, f64)> = (0..100).map(|i| (i * 1000, [1.0, 1.5, 1.25, 1.125][i as usize % 4])).collect();
    roundtrip(&pts);
}

#[test]
fn special_values_and_xor_round_trip() {
    let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0, 1e300, 5e-324, 0.1 + 0.2, 123456.789];
    let pts: Vec<(i64, f64)> = specials.iter().enumerate().map(|(i, &v)| (i as i64 * 7 - 20, v)).collect();
    roundtrip(&pts);
    let pts: Vec<(i64, f64)> = (0..500).map(|i| (i * 15_000 + (i % 3), (i as f64 * 0.37).sin())).collect();
    roundtrip(&pts);
    let pts: Vec<(i64, f64)> = (0..500).map(|i| (i64::MIN / 2 + i * 1_000_000_007, (i * i * 31) as f64)).collect();
    roundtrip(&pts);
}
