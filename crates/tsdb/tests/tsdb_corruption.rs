//! Corruption: flipped bytes in blocks are caught by checksums (on open or
//! on read) and the block is moved to `quarantine/`; torn or corrupt WAL
//! tails are truncated; a corrupt `meta` file is ignored. The store always
//! opens and never panics.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{key, test_options, TempDir};
use yunbian_tsdb::{Options, Selector, Store};

fn opts() -> Options {
    Options { auto_compact: false, ..test_options() }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: usize) {
    let mut b = fs::read(path).expect("read");
    let i = at % b.len();
    b[i] ^= 0x5a;
    fs::write(path, b).expect("write");
}

/// Three blocks of 100 points each (0..100 s, 100..200 s, 200..300 s).
fn three_blocks(dir: &Path) {
    let mut s = Store::open(dir, opts()).expect("open");
    let k = key("m", &[("a", "1")]);
    for blk in 0..3i64 {
        for i in 0..100 {
            let t = (blk * 100 + i) * 1000;
            s.append(&k, t, t as f64 / 1000.0).expect("append");
        }
        s.flush().expect("flush");
    }
}

fn count(s: &mut Store) -> usize {
    s.select(&Selector::all(), 0, i64::MAX).expect("select").iter().map(|p| p.points.len()).sum()
}

#[test]
fn corrupt_block_is_quarantined_on_open() {
    let dir = TempDir::new("corrupt-open");
    three_blocks(dir.path());
    let blocks = files(&dir.path().join("blocks"), "blk");
    assert_eq!(blocks.len(), 3);
    flip(&blocks[1], 100);
    let mut s = Store::open(dir.path(), opts()).expect("opens with a corrupt block");
    assert_eq!(s.stats().quarantined_blocks, 1);
    assert_eq!(s.stats().raw_blocks, 2);
    assert_eq!(files(&dir.path().join("quarantine"), "blk").len(), 1);
    assert_eq!(count(&mut s), 200);
}

#[test]
fn corrupt_entry_is_quarantined_on_read() {
    let dir = TempDir::new("corrupt-read");
    three_blocks(dir.path());
    let mut s = Store::open(dir.path(), opts()).expect("open");
    let blocks = files(&dir.path().join("blocks"), "blk");
    // Damage an entry byte (after the 44-byte header) while the store is open.
    flip(&blocks[2], 50);
    assert_eq!(count(&mut s), 200, "the damaged block reads as nothing");
    assert_eq!(s.stats().quarantined_blocks, 1);
    assert_eq!(count(&mut s), 200);
    drop(s);
    let s = Store::open(dir.path(), opts()).expect("reopen");
    assert_eq!(s.stats().raw_blocks, 2);
}

#[test]
fn any_single_byte_flip_or_truncation_of_a_block_never_panics() {
    let dir = TempDir::new("flip-all");
    three_blocks(dir.path());
    let blocks = files(&dir.path().join("blocks"), "blk");
    let original = fs::read(&blocks[0]).expect("read");
    for i in 0..original.len() {
        let mut b = original.clone();
        b[i] ^= 1 << (i % 8);
        fs::write(&blocks[0], &b).expect("write");
        let mut s = Store::open(dir.path(), opts()).expect("opens");
        assert_eq!(s.stats().quarantined_blocks, 1, "flip at {i} is detected");
        assert_eq!(count(&mut s), 200);
        drop(s);
        let q = files(&dir.path().join("quarantine"), "blk");
        fs::rename(&q[0], &blocks[0]).expect("restore");
    }
    for len in (0..original.len()).step_by(7) {
        fs::write(&blocks[0], &original[..len]).expect("truncate");
        let s = Store::open(dir.path(), opts()).expect("opens");
        assert_eq!(s.stats().quarantined_blocks, 1, "truncation to {len} is detected");
        drop(s);
        let q = files(&dir.path().join("quarantine"), "blk");
        fs::rename(&q[0], &blocks[0]).expect("restore");
    }
    fs::write(&blocks[0], &original).expect("restore");
    let mut s = Store::open(dir.path(), opts()).expect("opens");
    assert_eq!(count(&mut s), 300);
}

fn wal_store(dir: &Path) {
    let mut s = Store::open(dir, opts()).expect("open");
    let k = key("w", &[]);
    let r = s.resolve(&k).expect("resolve");
    for b in 0..100i64 {
        let batch: Vec<_> = (0..10).map(|i| (r, b * 10_000 + i * 1000, (b * 10 + i) as f64)).collect();
        s.append_many(&batch).expect("append");
    }
}

#[test]
fn torn_wal_tail_is_truncated() {
    let dir = TempDir::new("wal-torn");
    wal_store(dir.path());
    let wal = files(&dir.path().join("wal"), "wal");
    let last = wal.last().expect("a segment with data");
    let len = fs::metadata(last).expect("meta").len();
    let f = fs::OpenOptions::new().write(true).open(last).expect("open");
    f.set_len(len - 5).expect("truncate");
    drop(f);
    let mut s = Store::open(dir.path(), opts()).expect("opens with a torn tail");
    assert!(s.stats().wal_truncated_bytes > 0);
    assert_eq!(count(&mut s), 990, "every whole batch survives");
    // Writing goes on, and survives another restart.
    s.append(&key("w", &[]), 2_000_000, 1.0).expect("append after repair");
    drop(s);
    let mut s = Store::open(dir.path(), opts()).expect("reopen");
    assert_eq!(s.stats().wal_truncated_bytes, 0);
    assert_eq!(count(&mut s), 991);
}

#[test]
fn corrupt_wal_record_drops_it_and_what_follows() {
    let dir = TempDir::new("wal-flip");
    wal_store(dir.path());
    let wal = files(&dir.path().join("wal"), "wal");
    let seg = wal.last().expect("segment");
    let len = fs::metadata(seg).expect("meta").len() as usize;
    flip(seg, len / 2);
    let mut s = Store::open(dir.path(), opts()).expect("opens with a corrupt WAL");
    assert!(s.stats().wal_truncated_bytes > 0);
    let n = count(&mut s);
    assert!(n > 300 && n < 1000 && n.rem_euclid(10) == 0, "a prefix of whole batches survives: {n}");
}

#[test]
fn corrupt_meta_is_ignored() {
    let dir = TempDir::new("meta");
    three_blocks(dir.path());
    let mut s = Store::open(dir.path(), opts()).expect("open");
    s.apply_retention(1_000_000).expect("retention");
    drop(s);
    fs::write(dir.path().join("meta"), b"garbage").expect("write");
    let mut s = Store::open(dir.path(), opts()).expect("opens");
    assert_eq!(count(&mut s), 300);
}
