//! Replays the `manifest_parse` and `quantities` fuzz corpora
//! (`fuzz/corpus/…`) through [`check_manifest`] and [`check_quantities`],
//! the same checks the libFuzzer targets run, then feeds them a fixed
//! stream of random and mutated inputs so the parsers are exercised without
//! libFuzzer. Manifest seeds named `ok_*` must parse, `bad_*` must be
//! refused; other files (found by libFuzzer) only must not break a property.
//!
//! `YUNBIAN_FUZZ_ITERS=<n>` changes the number of generated inputs per test
//! (default 20000).

use std::path::{Path, PathBuf};

use yunbian_api::fuzzing::{check_manifest, check_quantities, Mutator};

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
fn manifest_corpus_replays_with_expected_outcomes() {
    let files = corpus("manifest_parse");
    assert!(files.len() >= 10, "corpus at {} is missing or nearly empty", corpus_dir("manifest_parse").display());
    let mut ok = 0;
    for (name, data) in &files {
        let got = check_manifest(data);
        if name.starts_with("ok_") {
            assert!(matches!(got, Some(n) if n > 0), "{name}: expected resources, got {got:?}");
            ok += 1;
        } else if name.starts_with("bad_") {
            assert_eq!(got, None, "{name}: expected a refusal");
        }
    }
    assert!(ok >= 5, "too few valid seeds: {ok}");
}

#[test]
fn quantities_corpus_replays() {
    let files = corpus("quantities");
    assert!(!files.is_empty(), "corpus at {} is missing", corpus_dir("quantities").display());
    for (_, data) in &files {
        check_quantities(data);
    }
}

/// YAML / manifest tokens and edge cases for the mutator to insert.
const DICT: &[&[u8]] = &[
    b"\n---\n",
    b"\n...\n",
    b"\n  ",
    b": ",
    b"- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"&a ",
    b"*a",
    b"!!str ",
    b"!!binary ",
    b"? ",
    b"|\n  ",
    b"\"",
    b"'",
    b"~",
    b"null",
    b".nan",
    b"-.inf",
    b"0x1F",
    b"1e400",
    b"-1",
    b"9223372036854775808",
    b"\\u0000",
    b"kind: App\n",
    b"kind: Node\n",
    b"kind: NodeGroup\n",
    b"kind: Token\n",
    b"kind: AppInstance\n",
    b"apiVersion: yunbian.io/v1\n",
    b"metadata: {name: a}\n",
    b"items",
    b"replicas",
    b"runtime: fake",
    b"process: {command: [x]}",
    b"limits: {memory: 1Ki}",
    b"cpu: 0.001",
    b"memory: 18446744073709551615",
    b"liveness: {}",
    b"secretHash",
    b"2026-11-21T09:10:00Z",
];

#[test]
fn random_and_mutated_manifests() {
    let seeds: Vec<Vec<u8>> = corpus("manifest_parse").into_iter().map(|(_, d)| d).collect();
    let mut m = Mutator::new(0x7975_6e62_6961_6e02);
    let mut accepted = 0usize;
    for i in 0..iterations() {
        let input = m.input(&seeds, DICT);
        let got = std::panic::catch_unwind(|| check_manifest(&input)).unwrap_or_else(|_| {
            panic!("input #{i} broke a property; add it to the corpus: {:?}", String::from_utf8_lossy(&input))
        });
        accepted += usize::from(got.is_some_and(|n| n > 0));
    }
    eprintln!("{} generated manifests: {accepted} accepted", iterations());
    // The mutations must keep some manifests valid, or this tests only the error paths.
    assert!(accepted > 0, "no generated manifest was accepted");
}

#[test]
fn random_and_mutated_quantities() {
    let seeds: Vec<Vec<u8>> = corpus("quantities").into_iter().map(|(_, d)| d).collect();
    let dict: &[&[u8]] =
        &[b"m", b"Ki", b"Mi", b"Gi", b"Ti", b"K", b"M", b"G", b"e", b".", b"-", b"+", b"Z", b"T", b":"];
    let mut m = Mutator::new(0x7975_6e62_6961_6e03);
    for i in 0..iterations() {
        let input = m.input(&seeds, dict);
        if std::panic::catch_unwind(|| check_quantities(&input)).is_err() {
            panic!("input #{i} broke a property; add it to the corpus: {:?}", String::from_utf8_lossy(&input));
        }
    }
}
