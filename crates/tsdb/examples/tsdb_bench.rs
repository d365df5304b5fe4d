//! Benchmark of the edge time-series store (run by `scripts/bench-tsdb.sh`).
//!
//! ```text
//! tsdb_bench ingest <workdir> [node-exporter-scrapes.txt]
//!     bytes/point and ingest points/s (one thread) for sensor, counter and
//!     (if given) node-exporter data; writes <workdir>/<dataset>.csv and
//!     .om (OpenMetrics) so the script can load the same points into SQLite
//!     and promtool.
//! tsdb_bench query <workdir>   24 h at 10 s × 1,000 series, step 1 min
//! tsdb_bench rss <workdir>     10k active series under a 16 MiB cap
//! ```
//!
//! Data: *sensor* — 20 series × 86,400 points (1 day at 1 s), a daily sine
//! of ±3 °C around 20 °C plus a mean-reverting noise of σ≈0.03, rounded to
//! 0.1; *counter* — 20 series × 86,400 integer counters increasing by a
//! random 0..2×rate each second; *state* — 20 on/off series × 86,400
//! points, each flipping about once a minute (bools stored as 0/1); *node*
//! — every sample of every scrape of
//! prometheus-node-exporter, scrapes stamped 15 s apart.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use yunbian_tsdb::{Aggregation, FsyncPolicy, Options, Selector, SeriesKey, SeriesRef, Store};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

/// Points as `(series, ts, value)`, ordered by time then series.
struct Dataset {
    name: &'static str,
    keys: Vec<SeriesKey>,
    points: Vec<(usize, i64, f64)>,
}

const T0: i64 = 1_700_000_000_000;

fn sensor() -> Dataset {
    let n = 20;
    let keys = (0..n).map(|i| SeriesKey::new("temperature", [("sensor", format!("s{i:02}"))]).expect("key")).collect();
    let mut rng = Rng(7);
    let mut noise = vec![0.0f64; n];
    let mut points = Vec::with_capacity(n * 86_400);
    for s in 0..86_400i64 {
        for (i, e) in noise.iter_mut().enumerate() {
            *e = 0.98 * *e + 0.03 * rng.gauss();
            let phase = i as f64 * 0.3;
            let v = 20.0 + 3.0 * (std::f64::consts::TAU * s as f64 / 86_400.0 + phase).sin() + *e;
            points.push((i, T0 + s * 1000, (v * 10.0).round() / 10.0));
        }
    }
    Dataset { name: "sensor", keys, points }
}

fn counter() -> Dataset {
    let n = 20;
    let keys = (0..n).map(|i| SeriesKey::new("requests_total", [("svc", format!("c{i:02}"))]).expect("key")).collect();
    let mut rng = Rng(11);
    let mut c = vec![0u64; n];
    let mut points = Vec::with_capacity(n * 86_400);
    for s in 0..86_400i64 {
        for (i, v) in c.iter_mut().enumerate() {
            let rate = 1 + (i as u64 * 37) % 200;
            *v += rng.next() % (2 * rate + 1);
            points.push((i, T0 + s * 1000, *v as f64));
        }
    }
    Dataset { name: "counter", keys, points }
}

/// 20 on/off states (a door, a pump) sampled every second, each changing
/// about once a minute: how much a bool costs stored as f64.
fn state() -> Dataset {
    let n = 20;
    let keys = (0..n).map(|i| SeriesKey::new("pump_on", [("pump", format!("p{i:02}"))]).expect("key")).collect();
    let mut rng = Rng(13);
    let mut on = vec![false; n];
    let mut points = Vec::with_capacity(n * 86_400);
    for s in 0..86_400i64 {
        for (i, v) in on.iter_mut().enumerate() {
            if rng.next().is_multiple_of(60) {
                *v = !*v;
            }
            points.push((i, T0 + s * 1000, f64::from(u8::from(*v))));
        }
    }
    Dataset { name: "state", keys, points }
}

/// Scrapes separated by lines `# SCRAPE <n>`; samples `name{labels} value`.
fn node(path: &Path) -> Dataset {
    let f = std::fs::File::open(path).expect("open scrapes");
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut keys = Vec::new();
    let mut points = Vec::new();
    let mut scrape = -1i64;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.expect("read");
        if line.starts_with("# SCRAPE") {
            scrape += 1;
            continue;
        }
        if line.starts_with('#') || line.is_empty() || scrape < 0 {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let id = match ids.get(series) {
            Some(&id) => id,
            None => {
                let Some(k) = parse_series(series) else { continue };
                keys.push(k);
                ids.insert(series.to_string(), keys.len() - 1);
                keys.len() - 1
            }
        };
        points.push((id, T0 + scrape * 15_000, v));
    }
    Dataset { name: "node", keys, points }
}

fn parse_series(s: &str) -> Option<SeriesKey> {
    let Some((name, rest)) = s.split_once('{') else { return SeriesKey::metric(s).ok() };
    let body = rest.strip_suffix('}')?;
    let mut tags = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (k, r) = rest.split_once("=\"")?;
        let mut end = 0;
        let bytes = r.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        tags.push((k.trim_start_matches(',').to_string(), r.get(..end)?.to_string()));
        rest = r.get(end + 1..)?.trim_start_matches(',');
    }
    SeriesKey::new(name, tags).ok()
}

fn opts(fsync: FsyncPolicy) -> Options {
    Options {
        fsync,
        raw_retention_ms: None,
        max_raw_bytes: None,
        rollup_1m_retention_ms: None,
        rollup_1h_retention_ms: None,
        compact_target_bytes: 64 << 20,
        ..Options::default()
    }
}

fn ingest(d: &Dataset, dir: &Path, fsync: FsyncPolicy) -> (f64, u64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let mut store = Store::open(dir, opts(fsync)).expect("open");
    let refs: Vec<SeriesRef> = d.keys.iter().map(|k| store.resolve(k).expect("resolve")).collect();
    let mut batch = Vec::with_capacity(1024);
    let start = Instant::now();
    for chunk in d.points.chunks(1000) {
        batch.clear();
        batch.extend(chunk.iter().map(|&(s, t, v)| (refs[s], t, v)));
        let r = store.append_many(&batch).expect("append");
        assert!(r.rejected.is_empty(), "{:?}", r.rejected.first());
    }
    store.flush().expect("flush");
    store.compact().expect("compact");
    let secs = start.elapsed().as_secs_f64();
    let disk = store.stats().disk_bytes;
    // Verify while we are here: every point comes back.
    let got: usize = store.select(&Selector::all(), 0, i64::MAX).expect("select").iter().map(|s| s.points.len()).sum();
    assert_eq!(got, d.points.len());
    (d.points.len() as f64 / secs, disk, disk as f64 / d.points.len() as f64)
}

fn write_exports(d: &Dataset, dir: &Path) {
    let mut csv = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{}.csv", d.name))).expect("csv"));
    for &(s, t, v) in &d.points {
        writeln!(csv, "{s},{t},{v}").expect("write");
    }
    // OpenMetrics wants each series' samples together.
    let mut om = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{}.om", d.name))).expect("om"));
    let mut by_series: Vec<Vec<(i64, f64)>> = vec![Vec::new(); d.keys.len()];
    for &(s, t, v) in &d.points {
        by_series[s].push((t, v));
    }
    let mut names: Vec<&str> = d.keys.iter().map(|k| k.name()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        writeln!(om, "# TYPE {clean} gauge").expect("write");
        for (s, k) in d.keys.iter().enumerate().filter(|(_, k)| k.name() == name) {
            let tags: Vec<String> = k.tags().iter().map(|(a, b)| format!("{a}={b:?}")).collect();
            for &(t, v) in &by_series[s] {
                let vs = if v.is_nan() { "NaN".to_string() } else { format!("{v}") };
                writeln!(om, "{clean}{{{}}} {vs} {}.{:03}", tags.join(","), t / 1000, t % 1000).expect("write");
            }
        }
    }
    writeln!(om, "# EOF").expect("write");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("ingest");
    let work = Path::new(args.get(2).map(String::as_str).unwrap_or("/tmp/yunbian-tsdb-bench")).to_path_buf();
    std::fs::create_dir_all(&work).expect("workdir");
    match mode {
        "ingest" => {
            let mut sets = vec![sensor(), counter(), state()];
            if let Some(p) = args.get(3) {
                sets.push(node(Path::new(p)));
            }
            println!("dataset,series,points,bytes,bytes_per_point,ingest_pts_per_s_fsync_1s,ingest_pts_per_s_no_fsync");
            for d in &sets {
                let (rate, disk, bpp) = ingest(d, &work.join(format!("store-{}", d.name)), FsyncPolicy::Interval(1000));
                let (rate2, _, _) = ingest(d, &work.join(format!("store-{}-nofsync", d.name)), FsyncPolicy::Never);
                println!("{},{},{},{disk},{bpp:.3},{rate:.0},{rate2:.0}", d.name, d.keys.len(), d.points.len());
                write_exports(d, &work);
            }
        }
        "query" => {
            let dir = work.join("store-query");
            let _ = std::fs::remove_dir_all(&dir);
            let mut store = Store::open(&dir, opts(FsyncPolicy::Never)).expect("open");
            let refs: Vec<SeriesRef> = (0..1000)
                .map(|i| {
                    store.resolve(&SeriesKey::new("cpu", [("host", format!("h{i:04}"))]).expect("key")).expect("r")
                })
                .collect();
            let mut rng = Rng(3);
            let mut batch = Vec::with_capacity(1000);
            for s in 0..8640i64 {
                batch.clear();
                batch.extend(refs.iter().map(|&r| (r, T0 + s * 10_000, (rng.next() % 1000) as f64 / 10.0)));
                store.append_many(&batch).expect("append");
            }
            store.flush().expect("flush");
            store.compact().expect("compact");
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let r = store
                    .select_step(&Selector::metric("cpu"), T0, T0 + 86_400_000, 60_000, Aggregation::Avg)
                    .expect("query");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(r.len(), 1000);
                assert_eq!(r[0].points.len(), 1440);
            }
            times.sort_by(f64::total_cmp);
            let st = store.stats();
            println!(
                "query 24h step 1m avg over 1000 series (8.64M points, {} raw blocks, {} bytes): median {:.1} ms, min {:.1} ms",
                st.raw_blocks, st.disk_bytes, times[2], times[0]
            );
        }
        "rss" => {
            let dir = work.join("store-rss");
            let _ = std::fs::remove_dir_all(&dir);
            let cap = 16 << 20;
            let mut store = Store::open(&dir, Options { memory_cap_bytes: cap, ..opts(FsyncPolicy::Interval(1000)) })
                .expect("open");
            let refs: Vec<SeriesRef> = (0..10_000)
                .map(|i| {
                    store
                        .resolve(
                            &SeriesKey::new(
                                "sensor_value",
                                [("device", format!("dev{i:05}")), ("prop", "temp".into())],
                            )
                            .expect("k"),
                        )
                        .expect("r")
                })
                .collect();
            let mut rng = Rng(5);
            let mut batch = Vec::with_capacity(10_000);
            let start = Instant::now();
            for s in 0..720i64 {
                batch.clear();
                batch.extend(refs.iter().map(|&r| (r, T0 + s * 10_000, (200 + rng.next() % 50) as f64 / 10.0)));
                store.append_many(&batch).expect("append");
            }
            let secs = start.elapsed().as_secs_f64();
            let st = store.stats();
            let rss = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(|l| l.to_string()))
                .unwrap_or_default();
            let hwm = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(|l| l.to_string()))
                .unwrap_or_default();
            println!(
                "rss: 10k series × 720 points (7.2M) in {secs:.1} s; accounted {} B of cap {cap}; head {} B; flushes {} (pressure {}); {rss}; {hwm}",
                st.memory_bytes, st.head_bytes, st.flushes, st.pressure_flushes
            );
        }
        other => eprintln!("unknown mode {other}"),
    }
}
