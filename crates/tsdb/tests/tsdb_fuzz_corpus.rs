//! Replays the `tsdb_block_decode` and `tsdb_wal_read` fuzz corpora
//! (`fuzz/corpus/…`) through the checks the libFuzzer targets run
//! (`yunbian_tsdb::fuzzing`), then a fixed stream of mutated inputs (bit
//! flips, truncations, splices), so the decoders are exercised on every
//! `cargo test`. `YUNBIAN_FUZZ_ITERS=<n>` changes the number of mutations
//! (default 20000).

use std::path::{Path, PathBuf};

use yunbian_tsdb::fuzzing::{check_batch, check_block, check_chunk_roundtrip, check_wal};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has seeds", dir.display());
    files.iter().map(|p| std::fs::read(p).expect("read seed")).collect()
}

fn iterations() -> usize {
    std::env::var("YUNBIAN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        for _ in 0..1 + self.next() % 4 {
            if b.is_empty() {
                b.push(self.next() as u8);
                continue;
            }
            let i = (self.next() as usize) % b.len();
            match self.next() % 5 {
                0 => b[i] ^= 1 << (self.next() % 8),
                1 => b[i] = self.next() as u8,
                2 => b.truncate(i),
                3 => b.insert(i, self.next() as u8),
                _ => {
                    let j = (self.next() as usize) % b.len();
                    b.swap(i, j);
                }
            }
        }
        b
    }
}

#[test]
fn block_corpus_and_mutations_never_panic() {
    let seeds = corpus("tsdb_block_decode");
    let mut m = Mutator(0x9e37_79b9_7f4a_7c15);
    for s in &seeds {
        check_block(s);
    }
    for i in 0..iterations() {
        check_block(&m.mutate(&seeds[i % seeds.len()]));
    }
}

#[test]
fn batch_corpus_and_mutations_never_panic() {
    let seeds = corpus("tsdb_batch_decode");
    let mut m = Mutator(0x6a09_e667_f3bc_c908);
    for s in &seeds {
        check_batch(s);
        assert!(yunbian_tsdb::batch::decode(s).is_ok(), "seeds are valid batches");
    }
    for i in 0..iterations() {
        check_batch(&m.mutate(&seeds[i % seeds.len()]));
    }
}

#[test]
fn wal_corpus_and_mutations_never_panic() {
    let seeds = corpus("tsdb_wal_read");
    let mut m = Mutator(0x2545_f491_4f6c_dd1d);
    for s in &seeds {
        check_wal(s);
    }
    for i in 0..iterations() {
        check_wal(&m.mutate(&seeds[i % seeds.len()]));
    }
}

#[test]
fn chunk_roundtrip_on_random_points() {
    let mut m = Mutator(42);
    for _ in 0..iterations() / 10 {
        let n = (m.next() % 400) as usize;
        let data: Vec<u8> = (0..n).map(|_| m.next() as u8).collect();
        check_chunk_roundtrip(&data);
    }
}
