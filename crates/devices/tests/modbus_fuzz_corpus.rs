//! Replays the `modbus_decode` fuzz corpus (`fuzz/corpus/modbus_decode/`)
//! through [`check_decode`], the check the libFuzzer target runs, then a
//! fixed stream of random and mutated inputs, so the register decoder is
//! exercised on every `cargo test` without libFuzzer.
//!
//! `YUNBIAN_FUZZ_ITERS=<n>` changes the number of generated inputs
//! (default 20000).

use std::path::{Path, PathBuf};

use yunbian_api::fuzzing::Mutator;
use yunbian_devices::modbus::codec::decode_registers;
use yunbian_devices::modbus::fuzzing::{check_decode, parse_input};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/modbus_decode")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, data)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_replays() {
    let files = corpus();
    assert!(files.len() >= 10, "corpus at {} is missing or nearly empty", corpus_dir().display());
    for (name, data) in &files {
        check_decode(data);
        // The named seeds decode as their names say.
        let (v, ty, words) = parse_input(data);
        let got = decode_registers(&v, ty, &words);
        let expect_ok = !["nan", "inf", "overflow", "bad_utf8", "fraction", "short"].iter().any(|w| name.contains(w));
        if name != "empty" && !name.starts_with(|c: char| c.is_ascii_hexdigit() && name.len() == 40) {
            assert_eq!(got.is_ok(), expect_ok, "{name}: {got:?}");
        }
    }
}

/// Edge values for the mutator to insert: NaN and infinity patterns, sign
/// bits, UTF-8 lead bytes, NULs.
const DICT: &[&[u8]] = &[
    b"\x7f\xc0\x00\x00",
    b"\x7f\x80\x00\x00",
    b"\xff\x80\x00\x00",
    b"\x80\x00",
    b"\xff\xff",
    b"\x00\x00",
    b"\xc3\x28",
    b"\xf0\x9f\x98\x80",
    b"\x7f\xef\xff\xff\xff\xff\xff\xff",
];

#[test]
fn mutated_inputs_keep_the_properties() {
    let iters = std::env::var("YUNBIAN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    let mut m = Mutator::new(0x00D0_B05E);
    for _ in 0..iters {
        check_decode(&m.input(&seeds, DICT));
    }
}
