//! The store-and-forward shipper against real files: batches are sealed,
//! persisted, sent when connected, deleted once acknowledged, survive a
//! restart, respect the size limit's drop policy, and a corrupt batch file
//! is quarantined and counted.

use std::time::Duration;

use tokio::sync::mpsc;
use yunbian_edge::shipper::{Shipper, ShipperOptions};
use yunbian_sync::wire::{decode_up, Up};
use yunbian_tsdb::SeriesKey;

/// A fresh directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("yunbian-shipper-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test setup");
        TempDir(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts() -> ShipperOptions {
    ShipperOptions { batch_interval: Duration::from_millis(50), ..Default::default() }
}

fn key(i: u32) -> SeriesKey {
    SeriesKey::new("temp", [("device", format!("d{i}"))]).expect("test setup")
}

fn batch_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("test setup")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".batch"))
        .collect();
    v.sort();
    v
}

/// Waits for the next data frame on the connection.
async fn next_data(rx: &mut mpsc::Receiver<Vec<u8>>) -> (u64, u64, u64, Vec<u8>) {
    let frame = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a frame in time").expect("open");
    match decode_up(&frame).expect("decodes") {
        Up::Data { id, first_id, points, payload, .. } => (id, first_id, points, payload),
        other => panic!("unexpected {other:?}"),
    }
}

/// Polls `f` every 50 ms; gives up after 60 s (a loaded CI machine runs
/// this binary's tests side by side: never a performance bound).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1_200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn batches_are_persisted_sent_acked_and_deleted() {
    let dir = TempDir::new();
    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    for t in 0..100 {
        s.push(5, key(t % 3), 1_000 + i64::from(t), f64::from(t)).expect("test setup");
    }
    s.seal();
    eventually("a batch file", || batch_files(dir.path()).len() == 1).await;
    // Disconnected: nothing is sent; the backlog is visible.
    eventually("status", || s.status().queued_points == 100).await;
    let (tx, mut rx) = mpsc::channel(16);
    s.connected(tx);
    let (id, first_id, points, payload) = next_data(&mut rx).await;
    assert_eq!((first_id, points), (id, 100));
    let series = yunbian_tsdb::batch::decode(&payload).expect("test setup");
    assert_eq!(series.len(), 3);
    assert_eq!(series.iter().map(|s| s.points.len()).sum::<usize>(), 100);
    s.acked(vec![id]);
    eventually("the file deleted", || batch_files(dir.path()).is_empty()).await;
    eventually("acked counted", || s.status().acked_points == 100 && s.status().queued_batches == 0).await;
    s.stop();
}

#[tokio::test]
async fn unacknowledged_batches_survive_a_restart_and_are_sent_again() {
    let dir = TempDir::new();
    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    let (tx, mut rx) = mpsc::channel(16);
    s.connected(tx);
    s.push(1, key(0), 5_000, 1.5).expect("test setup");
    s.seal();
    let (id, ..) = next_data(&mut rx).await;
    // The cloud never acknowledges; the agent dies.
    s.stop();
    drop(s);
    // Stopping writes the counters last.
    eventually("the thread to stop", || dir.path().join("counters").exists()).await;
    let files = batch_files(dir.path());
    assert_eq!(files, vec![format!("{id:020}.batch")]);

    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    eventually("restored backlog", || s.status().queued_batches == 1).await;
    let (tx, mut rx) = mpsc::channel(16);
    s.connected(tx);
    let (again, first_id, points, _) = next_data(&mut rx).await;
    assert_eq!((again, first_id, points), (id, id, 1));
    // New batches get ids above the old ones.
    s.push(1, key(0), 6_000, 2.5).expect("test setup");
    s.seal();
    let (next, first_id, ..) = next_data(&mut rx).await;
    assert!(next > id && first_id == id, "{next} {first_id} {id}");
    s.acked(vec![id, next]);
    eventually("all deleted", || batch_files(dir.path()).is_empty()).await;
    s.stop();
}

#[tokio::test]
async fn over_the_size_limit_the_lowest_priority_oldest_batch_is_dropped_and_counted() {
    let dir = TempDir::new();
    // Each batch of 200 random-ish values is a few hundred bytes, which
    // take one 4 KiB block on disk: the limit counts blocks.
    let s = Shipper::start(dir.path(), ShipperOptions { max_bytes: 3 * 4096, ..opts() }).expect("test setup");
    let batch = |s: &Shipper, prio: u8, base: i64| {
        for t in 0..200 {
            s.push(prio, key(0), base + t, ((t * 7_919) % 1_000) as f64 * 1.37).expect("test setup");
        }
        s.seal();
    };
    batch(&s, 9, 0);
    eventually("first batch", || s.status().queued_batches == 1).await;
    assert_eq!(s.status().queued_bytes, 4096);
    let mut base = 1_000;
    while s.status().dropped_full_points == 0 {
        batch(&s, 1, base);
        base += 1_000;
        eventually("sealed", || {
            s.status().queued_points + s.status().dropped_full_points == (base as u64 / 1_000) * 200
        })
        .await;
    }
    let st = s.status();
    assert!(st.queued_bytes <= 3 * 4096, "{st:?}");
    assert_eq!(st.dropped_full_points % 200, 0, "whole batches: {st:?}");
    // The high-priority batch (the oldest) stays; low-priority ones went.
    let files = batch_files(dir.path());
    let oldest = std::fs::read(dir.path().join(&files[0])).expect("test setup");
    assert_eq!(oldest[4], 9, "priority byte of the oldest kept batch");
    assert!(files[1..].iter().all(|f| std::fs::read(dir.path().join(f)).expect("test setup")[4] == 1));
    s.stop();
}

#[tokio::test]
async fn a_corrupt_batch_file_is_quarantined_and_counted_as_lost_to_the_disk() {
    let dir = TempDir::new();
    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    for t in 0..10 {
        s.push(5, key(0), 1_000 + t, 1.0).expect("test setup");
    }
    s.seal();
    eventually("a batch file", || batch_files(dir.path()).len() == 1).await;
    s.stop();
    eventually("stopped", || std::fs::read_to_string(dir.path().join("counters")).is_ok()).await;
    let f = dir.path().join(&batch_files(dir.path())[0]);
    let mut bytes = std::fs::read(&f).expect("test setup");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&f, bytes).expect("test setup");
    // A stray temporary file from a kill mid-write is removed.
    std::fs::write(dir.path().join(".00000000000000000001.tmp"), b"half").expect("test setup");

    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(batch_files(dir.path()).is_empty());
    assert!(!dir.path().join(".00000000000000000001.tmp").exists());
    let q: Vec<_> = std::fs::read_dir(dir.path().join("quarantine")).expect("test setup").flatten().collect();
    assert_eq!(q.len(), 1);
    eventually("the loss counted", || s.status().dropped_disk_points == 10).await;
    assert!(s.status().last_error.contains("quarantined"), "{:?}", s.status());
    assert_eq!(s.status().queued_batches, 0);
    s.stop();
}

#[tokio::test]
async fn ids_never_go_below_the_reserved_mark_even_with_the_clock_behind() {
    let dir = TempDir::new();
    // As if an earlier run (with a clock far ahead) reserved ids up to here.
    let mark: u64 = 4_000_000_000_000_000;
    std::fs::write(dir.path().join("next-id"), format!("{mark}\n")).expect("test setup");
    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    let (tx, mut rx) = mpsc::channel(16);
    s.connected(tx);
    s.push(1, key(0), 1_000, 1.0).expect("push");
    s.seal();
    let (id, ..) = next_data(&mut rx).await;
    assert!(id >= mark, "{id} < {mark}");
    // The mark moved past the ids in use, durably.
    let now_mark: u64 = std::fs::read_to_string(dir.path().join("next-id")).expect("mark").trim().parse().expect("num");
    assert!(now_mark > id, "{now_mark} <= {id}");
    s.stop();
}

#[tokio::test]
async fn a_planned_stop_writes_the_batch_being_filled() {
    let dir = TempDir::new();
    // A long batch interval: only the stop seals it.
    let s = Shipper::start(dir.path(), ShipperOptions { batch_interval: Duration::from_secs(3600), ..opts() })
        .expect("test setup");
    for t in 0..25 {
        s.push(3, key(1), 10_000 + t, 0.5).expect("push");
    }
    assert!(s.stop_and_wait(Duration::from_secs(10)), "the thread finished");
    assert_eq!(batch_files(dir.path()).len(), 1);
    let s = Shipper::start(dir.path(), opts()).expect("test setup");
    eventually("restored", || s.status().queued_points == 25).await;
    s.stop();
}

#[tokio::test]
async fn a_bandwidth_limit_paces_the_backlog_without_stalling_it() {
    let dir = TempDir::new();
    let rate = 64 * 1024;
    let s = Shipper::start(dir.path(), ShipperOptions { bandwidth: rate, batch_points: 1_000, ..opts() })
        .expect("test setup");
    // 24 batches of 1,000 incompressible points (about 12 KiB each).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for t in 0..24_000i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(5, key((t / 1_000) as u32), t, f64::from_bits(x >> 2)).expect("push");
    }
    eventually("all sealed", || s.status().queued_batches == 24).await;
    let total = s.status().queued_bytes;
    let (tx, mut rx) = mpsc::channel(64);
    s.connected(tx);
    let start = tokio::time::Instant::now();
    let mut got = 0u64;
    let mut bytes_early = 0u64;
    let mut ids = Vec::new();
    while got < 24 {
        let frame = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the backlog keeps moving (no stall)")
            .expect("open");
        if start.elapsed() < Duration::from_millis(500) {
            bytes_early += frame.len() as u64;
        }
        let Up::Data { id, .. } = decode_up(&frame).expect("decodes") else { panic!("not data") };
        ids.push(id);
        got += 1;
        s.acked(vec![id]);
    }
    // Within the first half second: at most the burst, half a second's
    // rate and one batch of debt — far from the whole backlog.
    assert!(bytes_early <= rate + rate / 2 + 20_000, "{bytes_early} bytes in 0.5 s at {rate} B/s");
    assert!(bytes_early < total, "{bytes_early} of {total}");
    ids.dedup();
    assert_eq!(ids.len(), 24, "each batch sent once");
    s.stop();
}
