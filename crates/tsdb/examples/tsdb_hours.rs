//! The store over hours of simulated time: 10,000 series, one point each
//! per simulated second (10k points/s), the agent's default options but
//! for the memory cap; retention every 10 simulated minutes. Every half
//! hour it prints accounted memory, head, blocks, disk, refused series and
//! the wall-clock time so far, then tries one new series at the end. It
//! shows what the 20-minute agent run cannot: block indexes (16 B per series
//! per block) accumulating under the cap over hours.
//!
//! ```sh
//! cargo run --release -p yunbian-tsdb --example tsdb_hours -- DIR [HOURS=6] [CAP_BYTES=8388608]
//! ```
use std::time::Instant;
use yunbian_tsdb::{FsyncPolicy, Options, SeriesKey, Store};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let hours: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(6);
    let cap: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8 << 20);
    let _ = std::fs::remove_dir_all(&dir);
    let opts = Options { memory_cap_bytes: cap, fsync: FsyncPolicy::Never, ..Options::default() };
    let mut s = Store::open(&dir, opts).expect("open");
    let n = 10_000;
    let keys: Vec<SeriesKey> = (0..n).map(|i| SeriesKey::new("m", [("s", format!("s{i:05}"))]).expect("key")).collect();
    let refs: Vec<_> = keys.iter().map(|k| s.resolve(k).expect("resolve")).collect();
    let t0: i64 = 1_700_000_000_000;
    let start = Instant::now();
    let mut batch = Vec::with_capacity(n);
    let mut x = 1u64;
    for sec in 0..hours * 3600 {
        let ts = t0 + sec * 1000;
        batch.clear();
        for (i, r) in refs.iter().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 20.0 + ((i as f64) * 0.01) + ((x % 7) as f64) * 0.1;
            batch.push((*r, ts, (v * 10.0).round() / 10.0));
        }
        s.append_many(&batch).expect("append");
        if sec % 600 == 0 {
            s.apply_retention(ts).expect("retention");
        }
        if sec % 1800 == 0 {
            let st = s.stats();
            println!("t={:>5.2}h mem={:.1}MiB head={:.1}MiB raw_blocks={} rollup_blocks={} disk={:.0}MiB rejected_cap={} wall={:.0}s",
                sec as f64 / 3600.0, st.memory_bytes as f64 / 1048576.0, st.head_bytes as f64 / 1048576.0,
                st.raw_blocks, st.rollup_blocks, st.disk_bytes as f64 / 1048576.0, st.rejected_memory_cap, start.elapsed().as_secs_f64());
        }
    }
    // A new series at the end: accepted?
    let k = SeriesKey::new("m", [("s", "new")]).expect("key");
    println!("new series: {:?}", s.resolve(&k).map(|_| ()));
    let st = s.stats();
    println!(
        "final mem={:.1}MiB raw_blocks={} rollup_blocks={}",
        st.memory_bytes as f64 / 1048576.0,
        st.raw_blocks,
        st.rollup_blocks
    );
}
