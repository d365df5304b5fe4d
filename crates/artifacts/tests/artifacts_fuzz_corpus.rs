//! Replays the `chunk_manifest` and `artifact_export` fuzz corpora
//! (`fuzz/corpus/…`) through [`check_chunk_manifest`] and [`check_export`],
//! the checks the libFuzzer targets run, then a fixed stream of random and
//! mutated inputs, so both decoders are exercised on every `cargo test`.
//! Seeds named `ok_*` must be accepted and `bad_*` refused (chunk lists:
//! by the check, not by JSON decoding); other files (found by libFuzzer, or
//! `built_*` inputs of the built-file mode) only must not break a property.
//! `cargo run -p yunbian-artifacts --example artifacts_seed_corpus`
//! rewrites the seeds.
//!
//! `YUNBIAN_FUZZ_ITERS=<n>` changes the number of generated inputs per test
//! (default 20000).

use std::path::{Path, PathBuf};

use yunbian_api::fuzzing::Mutator;
use yunbian_artifacts::fuzzing::{check_chunk_manifest, check_export, ChunkListVerdict};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
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
fn chunk_manifest_corpus_replays_with_expected_outcomes() {
    let files = corpus("chunk_manifest");
    let (mut ok, mut bad) = (0, 0);
    for (name, data) in &files {
        let got = check_chunk_manifest(data);
        if name.starts_with("ok_") {
            assert!(matches!(got, ChunkListVerdict::Accepted(n) if n > 0), "{name}: expected acceptance, got {got:?}");
            ok += 1;
        } else if name.starts_with("bad_") {
            assert!(
                matches!(got, ChunkListVerdict::Refused(_)),
                "{name}: expected a refusal by the check, got {got:?}"
            );
            bad += 1;
        }
    }
    assert!(
        ok >= 3 && bad >= 5,
        "corpus at {} is missing seeds ({ok} ok, {bad} bad)",
        corpus_dir("chunk_manifest").display()
    );
}

#[test]
fn export_corpus_replays_with_expected_outcomes() {
    let files = corpus("artifact_export");
    let (mut ok, mut bad) = (0, 0);
    for (name, data) in &files {
        let got = check_export(data);
        if name.starts_with("ok_") {
            assert!(got.is_ok(), "{name}: expected acceptance, got {got:?}");
            ok += 1;
        } else if name.starts_with("bad_") {
            assert!(got.is_err(), "{name}: expected a refusal, got {got:?}");
            bad += 1;
        }
    }
    assert!(
        ok >= 2 && bad >= 5,
        "corpus at {} is missing seeds ({ok} ok, {bad} bad)",
        corpus_dir("artifact_export").display()
    );
}

/// Every truncation and every single-bit flip of each valid seed is
/// refused (trailing bytes after the last chunk are not damage: the reader
/// stops at the last listed chunk).
#[test]
fn every_cut_and_bit_flip_of_a_valid_export_is_refused() {
    for (name, data) in corpus("artifact_export").iter().filter(|(n, _)| n.starts_with("ok_")) {
        for cut in 0..data.len() {
            assert!(check_export(&data[..cut]).is_err(), "{name} cut at {cut} accepted");
        }
        for i in 0..data.len() {
            for bit in 0..8 {
                let mut d = data.clone();
                d[i] ^= 1 << bit;
                assert!(check_export(&d).is_err(), "{name} with bit {bit} of byte {i} flipped accepted");
            }
        }
    }
}

/// JSON tokens and edge values for the chunk-list mutator to insert.
const CHUNK_LIST_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\u0000",
    b"null",
    b"\"type\"",
    b"\"size\"",
    b"\"sha256\"",
    b"\"chunks\"",
    b"\"digest\"",
    b"\"signatures\"",
    b"\"blobs\"",
    b"\"executable\"",
    b"\"wasm\"",
    b"0",
    b"1",
    b"-1",
    b"4194303",
    b"4194304",
    b"4194305",
    b"8388608",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e3",
    b"{\"digest\":\"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\",\"size\":4194304}",
    b"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
];

#[test]
fn random_and_mutated_chunk_lists() {
    let seeds: Vec<Vec<u8>> = corpus("chunk_manifest").into_iter().map(|(_, d)| d).collect();
    let mut m = Mutator::new(0x7975_6e62_6961_6e0c);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for i in 0..iterations() {
        let input = m.input(&seeds, CHUNK_LIST_DICT);
        let got = std::panic::catch_unwind(|| check_chunk_manifest(&input)).unwrap_or_else(|_| {
            panic!("input #{i} broke a property; add it to the corpus: {:?}", String::from_utf8_lossy(&input))
        });
        match got {
            ChunkListVerdict::Accepted(_) => accepted += 1,
            ChunkListVerdict::Refused(_) => refused += 1,
            ChunkListVerdict::NotJson => {}
        }
    }
    eprintln!("{} generated chunk lists: {accepted} accepted, {refused} refused by the check", iterations());
    // Both outcomes must occur, or the mutations test only one side.
    assert!(accepted > 0 && refused > 0, "{accepted} accepted, {refused} refused");
}

#[test]
fn random_and_mutated_exports() {
    let seeds: Vec<Vec<u8>> = corpus("artifact_export").into_iter().map(|(_, d)| d).collect();
    let dict: &[&[u8]] =
        &[b"YBAX1\n", b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x00\x00\x40\x00", b"\x01\x00\x40\x00", b"\""];
    let mut m = Mutator::new(0x7975_6e62_6961_6e0d);
    let mut accepted = 0usize;
    for i in 0..iterations() {
        let input = m.input(&seeds, dict);
        let got = std::panic::catch_unwind(|| check_export(&input))
            .unwrap_or_else(|_| panic!("input #{i} broke a property; add it to the corpus: {input:?}"));
        accepted += usize::from(got.is_ok());
    }
    eprintln!("{} generated export files: {accepted} accepted", iterations());
}
