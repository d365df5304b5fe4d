//! Replays the `wire_decode` fuzz corpus (`fuzz/corpus/wire_decode/`)
//! through [`check_wire_frame`], the same check the libFuzzer target runs,
//! then feeds it a fixed stream of random and mutated frames so the decoders
//! are exercised without libFuzzer. Seeds named `up_*` / `down_*` must
//! decode in that direction, `bad_*` in neither; other files (found by
//! libFuzzer) only must not break a property.
//!
//! `YUNBIAN_FUZZ_ITERS=<n>` changes the number of generated inputs
//! (default 20000).

use std::path::{Path, PathBuf};

use yunbian_api::fuzzing::Mutator;
use yunbian_sync::fuzzing::{check_wire_frame, FrameCheck};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire_decode")
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

fn iterations() -> usize {
    std::env::var("YUNBIAN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

#[test]
fn corpus_replays_with_expected_outcomes() {
    let files = corpus();
    assert!(files.len() >= 10, "corpus at {} is missing or nearly empty", corpus_dir().display());
    let (mut ups, mut downs) = (0, 0);
    for (name, data) in &files {
        let got = check_wire_frame(data);
        if name.starts_with("up_") {
            assert_eq!(got, FrameCheck { up: true, down: false }, "{name}");
            ups += 1;
        } else if name.starts_with("down_") {
            assert_eq!(got, FrameCheck { up: false, down: true }, "{name}");
            downs += 1;
        } else if name.starts_with("bad_") {
            assert_eq!(got, FrameCheck::default(), "{name}");
        }
    }
    assert!(ups >= 5 && downs >= 5, "too few valid seeds: {ups} up, {downs} down");
}

/// Tokens of the protocol and JSON edge cases for the mutator to insert.
const DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"null",
    b"true",
    b"-0",
    b"1e400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0.1",
    b"\\ud800",
    b"\\u0000",
    b"\"type\":",
    b"\"hello\"",
    b"\"ack\"",
    b"\"reports\"",
    b"\"heartbeat\"",
    b"\"logData\"",
    b"\"logEnd\"",
    b"\"snapshot\"",
    b"\"delta\"",
    b"\"reportAck\"",
    b"\"logRequest\"",
    b"\"logCancel\"",
    b"\"refused\"",
    b"\"instanceStatus\"",
    b"\"op\":\"upsert\"",
    b"\"op\":\"remove\"",
    b"\"kind\":\"AppInstance\"",
    b"\"value\":",
    b"\"revision\":",
    b"\"tail\":",
];

#[test]
fn random_and_mutated_frames() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    let mut m = Mutator::new(0x7975_6e62_6961_6e01);
    let (mut ups, mut downs) = (0usize, 0usize);
    for i in 0..iterations() {
        let input = m.input(&seeds, DICT);
        let got = std::panic::catch_unwind(|| check_wire_frame(&input)).unwrap_or_else(|_| {
            panic!("input #{i} broke a property; add it to the corpus: {:?}", String::from_utf8_lossy(&input))
        });
        ups += usize::from(got.up);
        downs += usize::from(got.down);
    }
    eprintln!("{} generated frames: {ups} decoded as Up, {downs} as Down", iterations());
    // The mutations must keep some frames valid, or this tests only the error paths.
    assert!(ups > 0 && downs > 0, "no generated frame decoded ({ups} up, {downs} down)");
}
