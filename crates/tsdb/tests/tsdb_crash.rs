//! Crash safety: a child process (this test binary, re-run as
//! `crash_child`) writes batches with `FsyncPolicy::Always`, flushing and
//! compacting as it goes, and prints `ack <batch>` after each batch is
//! acknowledged. The parent SIGKILLs it at random points — after a random
//! number of acks, or right when it announces a flush + compaction —
//! reopens the store and checks that every acknowledged batch is there
//! with its exact values, that at most the one batch in flight is
//! additionally there (whole or not at all), and that no block is corrupt.
//! Then it starts the next child on the same directory.
//!
//! `YUNBIAN_TSDB_CRASH_SEED=<n>` replays a run; `…_ROUNDS` changes its length.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{key, TempDir};
use yunbian_tsdb::{FsyncPolicy, Options, Selector, SeriesKey, Store};

const SERIES: usize = 8;

fn options() -> Options {
    Options {
        fsync: FsyncPolicy::Always,
        block_duration_ms: 20_000,
        out_of_order_window_ms: 0,
        compact_min_blocks: 2,
        compact_target_bytes: 4096,
        raw_retention_ms: None,
        max_raw_bytes: None,
        rollup_1m_retention_ms: None,
        rollup_1h_retention_ms: None,
        ..Options::default()
    }
}

fn series_key(s: usize) -> SeriesKey {
    key("crash", &[("s", &s.to_string())])
}

fn value(s: usize, b: i64) -> f64 {
    ((s as i64 * 7 + b * 13) % 1000) as f64 / 10.0
}

/// The child: does nothing unless started by `sigkill_at_random_points`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("YUNBIAN_TSDB_CRASH_DIR") else { return };
    let start: i64 = std::env::var("YUNBIAN_TSDB_CRASH_START").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut store = Store::open(&dir, options()).expect("child opens the store");
    let refs: Vec<_> = (0..SERIES).map(|s| store.resolve(&series_key(s)).expect("resolve")).collect();
    let mut out = std::io::stdout().lock();
    for b in start..start + 2000 {
        let batch: Vec<_> = refs.iter().enumerate().map(|(s, &r)| (r, b * 1000, value(s, b))).collect();
        let res = store.append_many(&batch).expect("append");
        assert!(res.rejected.is_empty(), "rejected: {:?}", res.rejected);
        writeln!(out, "ack {b}").expect("stdout");
        out.flush().expect("stdout");
        if b % 37 == 0 {
            writeln!(out, "compact {b}").expect("stdout");
            out.flush().expect("stdout");
            store.flush().expect("flush");
            store.compact().expect("compact");
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_point() {
    let seed: u64 = std::env::var("YUNBIAN_TSDB_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1234);
    let rounds: usize = std::env::var("YUNBIAN_TSDB_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    println!("crash test seed {seed} rounds {rounds}");
    let mut rng = Rng(seed | 1);
    let dir = TempDir::new("crash");
    let exe = std::env::current_exe().expect("test binary path");
    let mut next_batch: i64 = 0;
    for round in 0..rounds {
        let during_compaction = rng.next() & 1 == 0;
        let kill_after = 1 + rng.next() % 120;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("YUNBIAN_TSDB_CRASH_DIR", dir.path())
            .env("YUNBIAN_TSDB_CRASH_START", next_batch.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acked: Option<i64> = None;
        let mut acks = 0;
        let mut compacts = 0;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(b) = line.strip_prefix("ack ") {
                acked = Some(b.parse().expect("batch number"));
                acks += 1;
                if !during_compaction && acks >= kill_after {
                    break;
                }
            } else if line.starts_with("compact ") {
                compacts += 1;
                if during_compaction && compacts > kill_after % 3 {
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL child");
        let status = child.wait().expect("wait child");
        // The child may have run ahead of what we read: its later acks are
        // still in the pipe.
        for line in lines.map_while(Result::ok) {
            if let Some(b) = line.strip_prefix("ack ") {
                acked = Some(b.parse().expect("batch number"));
            }
        }
        println!(
            "round {round}: killed ({}) after {acks} acks, {compacts} compactions, status {status}",
            if during_compaction { "in compaction" } else { "in writes" }
        );

        let mut store = Store::open(dir.path(), options()).expect("store opens after SIGKILL");
        let stats = store.stats();
        assert_eq!(stats.quarantined_blocks, 0, "round {round}: no block is corrupt");
        let got = store.select(&Selector::metric("crash"), 0, i64::MAX).expect("select");
        let last_acked = acked.unwrap_or(next_batch - 1);
        if last_acked >= 0 {
            assert_eq!(got.len(), SERIES, "round {round}: every series is there");
        }
        let mut present_max = None;
        for sp in &got {
            let s: usize = sp.key.tag("s").parse().expect("series tag");
            // Batches are contiguous from 0, with exact values.
            for (i, &(t, v)) in sp.points.iter().enumerate() {
                assert_eq!(t, i as i64 * 1000, "round {round}: series {s} has no gap");
                assert_eq!(v, value(s, i as i64), "round {round}: series {s} batch {i} value");
            }
            let n = sp.points.len() as i64;
            assert!(n > last_acked, "round {round}: series {s} lost acknowledged batch {last_acked} (has {n})");
            assert!(n - 1 <= last_acked + 1, "round {round}: series {s} has batches never written");
            present_max = Some(present_max.map_or(n - 1, |m: i64| {
                assert_eq!(m, n - 1, "round {round}: the batch in flight is whole or absent");
                m
            }));
        }
        next_batch = present_max.map_or(0, |m| m + 1);
        drop(store);
    }
}
