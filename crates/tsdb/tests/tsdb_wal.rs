//! The WAL's fsync policy and size: `Interval` data is synced by
//! `sync_if_due` once the interval has passed, without another append;
//! the head is flushed when the WAL passes `max_wal_bytes`, counting
//! segments replayed at open.

mod common;

use std::time::{Duration, Instant};

use common::{key, test_options, TempDir};
use yunbian_tsdb::{FsyncPolicy, Options, Selector, SeriesRef, Store};

const SERIES: usize = 20;

/// Bytes of the files in `<dir>/wal`.
fn wal_on_disk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("wal"))
        .expect("list wal")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

/// Appends `n` timestamps (1 s apart from `t0`) for every series, one
/// batch per timestamp; returns the size of the largest WAL record seen.
fn write(store: &mut Store, t0: i64, n: i64) -> u64 {
    let refs: Vec<SeriesRef> =
        (0..SERIES).map(|s| store.resolve(&key("m", &[("s", &s.to_string())])).expect("resolve")).collect();
    let mut largest = 0;
    for i in 0..n {
        let ts = t0 + i * 1000;
        let batch: Vec<(SeriesRef, i64, f64)> =
            refs.iter().enumerate().map(|(s, &r)| (r, ts, (s as i64 * 31 + i * 7) as f64 / 10.0)).collect();
        let before = store.stats().wal_bytes;
        let res = store.append_many(&batch).expect("append");
        assert_eq!(res.accepted, SERIES);
        largest = largest.max(store.stats().wal_bytes.saturating_sub(before));
    }
    largest
}

fn count_points(store: &mut Store) -> usize {
    let r = store.select(&Selector::metric("m"), i64::MIN + 1, i64::MAX).expect("select");
    assert_eq!(r.len(), SERIES);
    r.iter().map(|s| s.points.len()).sum()
}

#[test]
fn interval_policy_syncs_after_the_interval_without_another_append() {
    let dir = TempDir::new("wal-interval");
    let opts = Options { fsync: FsyncPolicy::Interval(60_000), ..test_options() };
    let mut store = Store::open(dir.path(), opts).expect("open");
    store.append(&key("m", &[]), 1_000, 1.0).expect("append");
    let st = store.stats();
    // Within the interval of the segment's creation: written, not synced.
    assert_eq!(st.wal_syncs, 0);
    assert!(st.wal_unsynced_bytes > 0, "{st:?}");

    assert!(!store.sync_if_due(Instant::now()).expect("not due"));
    assert_eq!(store.stats().wal_syncs, 0);

    // No further append: the owner's idle call syncs once the interval passed.
    assert!(store.sync_if_due(Instant::now() + Duration::from_secs(61)).expect("due"));
    let st = store.stats();
    assert_eq!(st.wal_syncs, 1);
    assert_eq!(st.wal_unsynced_bytes, 0);

    // Nothing new written: nothing to sync.
    assert!(!store.sync_if_due(Instant::now() + Duration::from_secs(600)).expect("clean"));
    assert_eq!(store.stats().wal_syncs, 1);
}

#[test]
fn sync_if_due_leaves_other_policies_alone() {
    for (policy, syncs_after_append) in [(FsyncPolicy::Never, 0), (FsyncPolicy::Always, 1)] {
        let dir = TempDir::new("wal-policies");
        let mut store = Store::open(dir.path(), Options { fsync: policy, ..test_options() }).expect("open");
        store.append(&key("m", &[]), 1_000, 1.0).expect("append");
        assert_eq!(store.stats().wal_syncs, syncs_after_append, "{policy:?}");
        assert!(!store.sync_if_due(Instant::now() + Duration::from_secs(3600)).expect("sync_if_due"));
        assert_eq!(store.stats().wal_syncs, syncs_after_append, "{policy:?}");
        let unsynced = store.stats().wal_unsynced_bytes;
        assert_eq!(unsynced > 0, policy == FsyncPolicy::Never, "{policy:?}");
    }
}

#[test]
fn the_head_is_flushed_when_the_wal_passes_its_limit() {
    const LIMIT: u64 = 64 << 10;
    // 1000 s of data: far from the 2-hour block span, so only the WAL's
    // size can make blocks.
    let dir = TempDir::new("wal-limit");
    let mut store = Store::open(dir.path(), Options { max_wal_bytes: Some(LIMIT), ..test_options() }).expect("open");
    let batch = write(&mut store, 0, 1000);
    let st = store.stats();
    assert!(st.wal_flushes >= 3, "{st:?}");
    assert_eq!(st.flushes, st.wal_flushes);
    assert!(st.raw_blocks >= 1);
    assert!(st.wal_bytes < LIMIT + batch, "{st:?}");
    assert!(wal_on_disk(dir.path()) < LIMIT + batch);
    assert_eq!(count_points(&mut store), SERIES * 1000);
    drop(store);
    let mut store = Store::open(dir.path(), Options { max_wal_bytes: Some(LIMIT), ..test_options() }).expect("reopen");
    assert_eq!(count_points(&mut store), SERIES * 1000);

    // The same ingest without a limit keeps everything in the WAL.
    let dir = TempDir::new("wal-nolimit");
    let mut store = Store::open(dir.path(), Options { max_wal_bytes: None, ..test_options() }).expect("open");
    write(&mut store, 0, 1000);
    let st = store.stats();
    assert_eq!(st.flushes, 0);
    assert!(st.wal_bytes > 3 * LIMIT, "{st:?}");
}

#[test]
fn segments_replayed_at_open_count_towards_the_limit() {
    const LIMIT: u64 = 64 << 10;
    let dir = TempDir::new("wal-replayed");
    let mut store = Store::open(dir.path(), Options { max_wal_bytes: None, ..test_options() }).expect("open");
    write(&mut store, 0, 1000);
    drop(store);
    let on_disk = wal_on_disk(dir.path());
    assert!(on_disk > 2 * LIMIT);

    let mut store = Store::open(dir.path(), Options { max_wal_bytes: Some(LIMIT), ..test_options() }).expect("reopen");
    assert!(store.stats().wal_bytes >= on_disk);
    // The first append finds the WAL past its limit: the head (replayed
    // points included) becomes a block and the old segments go.
    store.append(&key("m", &[("s", "0")]), 1_000_000, 1.0).expect("append");
    let st = store.stats();
    assert_eq!(st.wal_flushes, 1, "{st:?}");
    assert!(wal_on_disk(dir.path()) < LIMIT);
    assert_eq!(count_points(&mut store), SERIES * 1000 + 1);
}

#[test]
fn the_limit_is_at_most_a_quarter_of_the_raw_size_budget() {
    // 64 MiB allowed, but raw blocks may only take 4 MiB: flush at 1 MiB.
    let dir = TempDir::new("wal-budget");
    let opts = Options { max_wal_bytes: Some(64 << 20), max_raw_bytes: Some(4 << 20), ..test_options() };
    let mut store = Store::open(dir.path(), opts).expect("open");
    let batch = write(&mut store, 0, 6000);
    let st = store.stats();
    assert!(st.wal_flushes >= 1, "{st:?}");
    assert!(st.wal_bytes < (1 << 20) + batch, "{st:?}");
}
