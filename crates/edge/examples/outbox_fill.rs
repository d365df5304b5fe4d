//! Fills a store-and-forward outbox with what an edge produces while its
//! cloud is unreachable, for the drain benchmark (`scripts/bench-data-drain.sh`,
//! docs/benchmarks.md "Store-and-forward").
//!
//! ```text
//! outbox_fill <outbox dir> [--seconds 3600] [--series 1000] [--rate 10]
//!             [--priority 5] [--end-ms <unix ms>]
//! ```
//!
//! The batches are written by the agent's own [`Shipper`], started on the
//! directory with no cloud connection, so the files are byte for byte what
//! an agent writes during an outage: one file per sealed batch (fsynced,
//! renamed), sealed at `batch_points` (10,000) points. Points are pushed one
//! synthetic second at a time — `series × rate` points per second — so with
//! the defaults (1,000 series at 10 points/s) every batch holds exactly one
//! second of data, as a rule at 10,000 points/s seals them (one batch per
//! priority per second, at most 10,000 points).
//!
//! Data: series `gen{topic="gen/<i>"}` (the key an MQTT rule with
//! `metric: gen` gives a reading on topic `gen/<i>`), timestamps every
//! `1000 / rate` ms over the `seconds` before `--end-ms` (default: now),
//! values a sensor-like signal — a slow sine of ±3 around a per-series
//! level of 15–35 plus mean-reverting noise (σ≈0.15), rounded to 0.1.
//!
//! Prints `batches N points N bytes N` (files, points in their headers,
//! bytes of the files) and the fill time, read back from the directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use yunbian_edge::shipper::{Shipper, ShipperOptions};
use yunbian_tsdb::SeriesKey;

/// xorshift64: a fixed, dependency-free stream of pseudo-random numbers.
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

    /// About N(0, 1) (Irwin–Hall).
    fn gauss(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

struct Args {
    dir: PathBuf,
    seconds: i64,
    series: usize,
    rate: i64,
    priority: u8,
    end_ms: Option<i64>,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args { dir: PathBuf::new(), seconds: 3600, series: 1000, rate: 10, priority: 5, end_ms: None };
    let mut dir = None;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => a.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--series" => a.series = value("--series")?.parse().context("--series")?,
            "--rate" => a.rate = value("--rate")?.parse().context("--rate")?,
            "--priority" => a.priority = value("--priority")?.parse().context("--priority")?,
            "--end-ms" => a.end_ms = Some(value("--end-ms")?.parse().context("--end-ms")?),
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            s => dir = Some(PathBuf::from(s)),
        }
    }
    a.dir = dir.context(
        "usage: outbox_fill <outbox dir> [--seconds N] [--series N] [--rate N] [--priority N] [--end-ms MS]",
    )?;
    if a.rate <= 0 || 1000 % a.rate != 0 || a.seconds <= 0 || a.series == 0 {
        bail!("--rate must divide 1000; --seconds and --series must be positive");
    }
    Ok(a)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Batch files in `dir`: (files, points from their headers, bytes, temporary files).
fn scan(dir: &Path) -> Result<(u64, u64, u64, u64)> {
    let (mut files, mut points, mut bytes, mut tmp) = (0, 0, 0, 0);
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".tmp") {
            tmp += 1;
        }
        if !name.ends_with(".batch") {
            continue;
        }
        // Header: "YOB1", u8 priority, u64 created ms, u64 points, u32 crc.
        let buf = std::fs::read(e.path()).with_context(|| format!("read {name}"))?;
        if buf.len() < 25 || &buf[..4] != b"YOB1" {
            bail!("{name}: not a batch file");
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&buf[13..21]);
        files += 1;
        points += u64::from_le_bytes(n);
        bytes += buf.len() as u64;
    }
    Ok((files, points, bytes, tmp))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let end = a.end_ms.unwrap_or_else(unix_ms) / 1000 * 1000;
    let start_ms = end - a.seconds * 1000;
    let per_second = a.series as u64 * a.rate as u64;
    let opts = ShipperOptions {
        // Never drop while filling: the benchmark wants every point on disk.
        max_bytes: u64::MAX,
        ttl: Duration::ZERO,
        ..ShipperOptions::default()
    };
    let batch = opts.batch_points as u64;
    let expect_batches = (per_second * a.seconds as u64).div_ceil(batch);
    if !per_second.is_multiple_of(batch) && !batch.is_multiple_of(per_second) {
        eprintln!(
            "note: {per_second} points per second do not divide into batches of {batch}; batches straddle seconds"
        );
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    if scan(&a.dir)?.0 > 0 {
        bail!("{} already holds batches: give an empty directory", a.dir.display());
    }
    let shipper = Shipper::start(&a.dir, opts).with_context(|| format!("open the outbox in {}", a.dir.display()))?;

    let keys: Vec<SeriesKey> = (0..a.series)
        .map(|i| SeriesKey::new("gen", [("topic", format!("gen/{i}"))]))
        .collect::<Result<_, _>>()
        .context("series key")?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let level: Vec<f64> = (0..a.series).map(|_| 15.0 + 20.0 * rng.unit()).collect();
    let phase: Vec<f64> = (0..a.series).map(|i| i as f64 * 0.37).collect();
    let mut noise = vec![0.0f64; a.series];
    let step = 1000 / a.rate;
    let t0 = Instant::now();
    let mut waits = 0u64;
    for s in 0..a.seconds {
        for (i, key) in keys.iter().enumerate() {
            for k in 0..a.rate {
                let ts = start_ms + s * 1000 + k * step;
                noise[i] = 0.98 * noise[i] + 0.03 * rng.gauss();
                let day = std::f64::consts::TAU * (ts % 86_400_000) as f64 / 86_400_000.0;
                let v = level[i] + 3.0 * (day + phase[i]).sin() + noise[i];
                let v = (v * 10.0).round() / 10.0;
                // The shipper refuses points when its queue is full (a rule
                // counts that as an error); here we wait for room.
                while let Err(e) = shipper.push(a.priority, key.clone(), ts, v) {
                    if e.contains("stopped") {
                        bail!("{e}");
                    }
                    waits += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
    let pushed = t0.elapsed();
    shipper.stop();
    // `stop` queues Seal and Stop; the thread seals what is open, writes its
    // counters and exits, dropping its end of the queue. A probe queued
    // behind Stop is never read, so pushing one is harmless: it fails with
    // "stopped" once the thread is gone, and then every file is written.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match shipper.push(a.priority, keys[0].clone(), start_ms, 0.0) {
            Err(e) if e.contains("stopped") => break,
            _ if Instant::now() > deadline => bail!("the shipper thread did not stop within 120 s"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let total = t0.elapsed();
    let (files, points, bytes, tmp) = scan(&a.dir)?;
    println!("batches {files} points {points} bytes {bytes}");
    println!(
        "filled {} points ({} series x {} /s x {} s, {} .. {} ms) in {:.1} s (pushed in {:.1} s, {} waits for queue room)",
        per_second * a.seconds as u64,
        a.series,
        a.rate,
        a.seconds,
        start_ms,
        end,
        total.as_secs_f64(),
        pushed.as_secs_f64(),
        waits
    );
    let want = per_second * a.seconds as u64;
    if files != expect_batches || points != want || tmp != 0 {
        bail!("expected {expect_batches} batches of {want} points, found {files} batches of {points} ({tmp} temporary files)");
    }
    Ok(())
}
