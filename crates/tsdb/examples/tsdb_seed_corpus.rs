//! Writes the seed corpora of the `tsdb_wal_read` and `tsdb_block_decode`
//! fuzz targets from a real store:
//! `cargo run -p yunbian-tsdb --example tsdb_seed_corpus`.

use std::path::Path;

use yunbian_tsdb::{FsyncPolicy, Options, SeriesKey, Store};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let dir = std::env::temp_dir().join(format!("yunbian-tsdb-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = Options { fsync: FsyncPolicy::Never, auto_compact: false, ..Options::default() };
    let mut s = Store::open(&dir, opts).expect("open");
    let keys = [
        SeriesKey::new("temp", [("room", "a")]).expect("key"),
        SeriesKey::new("counter", [("dev", "x"), ("k", "v")]).expect("key"),
        SeriesKey::metric("noise").expect("key"),
    ];
    for i in 0..60i64 {
        s.append(&keys[0], i * 1000, 20.0 + (i % 7) as f64 / 10.0).expect("a");
        s.append(&keys[1], i * 1000 + (i % 3), (i * i) as f64).expect("b");
        s.append(&keys[2], i * 997, (i as f64).sin()).expect("c");
    }
    s.append(&keys[0], 30_500, f64::NAN).expect("ooo");
    let wal = std::fs::read_dir(dir.join("wal")).expect("wal").next().expect("segment").expect("entry").path();
    std::fs::create_dir_all(root.join("tsdb_wal_read")).expect("mkdir");
    std::fs::copy(&wal, root.join("tsdb_wal_read/seed-3-series")).expect("copy wal");
    s.flush().expect("flush");
    s.apply_retention(40_000 + 7 * 24 * 3_600_000).expect("rollup");
    std::fs::create_dir_all(root.join("tsdb_block_decode")).expect("mkdir");
    for e in std::fs::read_dir(dir.join("blocks")).expect("blocks") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        std::fs::copy(&p, root.join("tsdb_block_decode").join(format!("seed-{name}"))).expect("copy block");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Store-and-forward batches: a small mixed one and an empty one.
    let mut b = yunbian_tsdb::batch::BatchBuilder::new();
    for i in 0..40i64 {
        b.push(&keys[0], i * 1000, 20.0 + (i % 7) as f64 / 10.0);
        b.push(&keys[1], i * 1000, (i * i) as f64);
        b.push(&keys[2], i * 997, (i as f64).sin());
    }
    std::fs::create_dir_all(root.join("tsdb_batch_decode")).expect("mkdir");
    std::fs::write(root.join("tsdb_batch_decode/seed-3-series"), b.finish().0).expect("batch seed");
    let empty = yunbian_tsdb::batch::BatchBuilder::new().finish().0;
    std::fs::write(root.join("tsdb_batch_decode/seed-empty"), empty).expect("batch seed");
}
