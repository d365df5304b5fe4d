//! Write path, queries and reopen: points come back from the head, from
//! blocks and from the WAL after a restart; selectors, step aggregation,
//! latest values and the out-of-order policy behave as documented.

mod common;

use common::{key, test_options, TempDir};
use yunbian_tsdb::{Aggregation, Error, Selector, Store, TagMatcher};

fn fill(store: &mut Store) {
    for i in 0..100i64 {
        store.append(&key("temp", &[("room", "a")]), i * 1000, 20.0 + (i % 10) as f64 / 10.0).expect("append a");
        store.append(&key("temp", &[("room", "b")]), i * 1000, 30.5).expect("append b");
        store.append(&key("hum", &[("room", "a")]), i * 1000, i as f64).expect("append hum");
    }
}

fn check(store: &mut Store) {
    let r = store.select(&Selector::metric("temp"), 0, 100_000).expect("select");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].key, key("temp", &[("room", "a")]));
    assert_eq!(r[0].points.len(), 100);
    assert_eq!(r[0].points[13], (13_000, 20.3));
    assert!(r[1].points.iter().all(|p| p.1 == 30.5));

    let r = store.select(&Selector::all().with(TagMatcher::ne("room", "a")), 5_000, 7_000).expect("select ne");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].points, vec![(5_000, 30.5), (6_000, 30.5)]);

    let sel = Selector::all().with(TagMatcher::re("room", "a|c").expect("regex"));
    assert_eq!(store.series(&sel), vec![key("hum", &[("room", "a")]), key("temp", &[("room", "a")])]);

    let r = store.select_step(&Selector::metric("hum"), 0, 100_000, 10_000, Aggregation::Avg).expect("step");
    assert_eq!(r[0].points.len(), 10);
    assert_eq!(r[0].points[0], (0, 4.5));
    assert_eq!(r[0].points[9], (90_000, 94.5));
    let r = store.select_step(&Selector::metric("hum"), 0, 100_000, 30_000, Aggregation::Count).expect("count");
    assert_eq!(r[0].points, vec![(0, 30.0), (30_000, 30.0), (60_000, 30.0), (90_000, 10.0)]);
    for (agg, want) in
        [(Aggregation::Min, 0.0), (Aggregation::Max, 29.0), (Aggregation::Sum, 435.0), (Aggregation::Last, 29.0)]
    {
        let r = store.select_step(&Selector::metric("hum"), 0, 30_000, 30_000, agg).expect("agg");
        assert_eq!(r[0].points, vec![(0, want)], "{agg:?}");
    }

    let l = store.latest(&Selector::metric("hum")).expect("latest");
    assert_eq!(l, vec![(key("hum", &[("room", "a")]), 99_000, 99.0)]);
}

#[test]
fn head_blocks_and_wal_answer_the_same() {
    let dir = TempDir::new("basic");
    let mut s = Store::open(dir.path(), test_options()).expect("open");
    fill(&mut s);
    check(&mut s);
    drop(s);
    // WAL replay.
    let mut s = Store::open(dir.path(), test_options()).expect("reopen");
    assert_eq!(s.stats().head_points, 300);
    check(&mut s);
    s.flush().expect("flush");
    assert_eq!(s.stats().raw_blocks, 1);
    assert_eq!(s.stats().head_points, 0);
    check(&mut s);
    drop(s);
    // From the block only.
    let mut s = Store::open(dir.path(), test_options()).expect("reopen 2");
    assert_eq!(s.stats().head_points, 0);
    check(&mut s);
}

#[test]
fn out_of_order_within_window_is_accepted_and_last_write_wins() {
    let dir = TempDir::new("ooo");
    let mut opts = test_options();
    opts.out_of_order_window_ms = 10_000;
    let mut s = Store::open(dir.path(), opts.clone()).expect("open");
    let k = key("m", &[]);
    for t in [10_000, 20_000, 15_000, 20_000, 12_000] {
        s.append(&k, t, t as f64).expect("in window");
    }
    s.append(&k, 20_000, 1.0).expect("overwrite newest");
    s.append(&k, 15_000, 2.0).expect("overwrite older");
    match s.append(&k, 10_000, 0.0) {
        Err(Error::OutOfOrder { ts: 10_000, oldest_allowed: 10_001, .. }) => {}
        other => panic!("expected OutOfOrder, got {other:?}"),
    }
    let want = vec![(10_000, 10_000.0), (12_000, 12_000.0), (15_000, 2.0), (20_000, 1.0)];
    assert_eq!(s.select(&Selector::all(), 0, i64::MAX).expect("q")[0].points, want);
    s.flush().expect("flush");
    s.append(&k, 15_000, 3.0).expect("still in window after flush");
    let want2 = vec![(10_000, 10_000.0), (12_000, 12_000.0), (15_000, 3.0), (20_000, 1.0)];
    assert_eq!(s.select(&Selector::all(), 0, i64::MAX).expect("q")[0].points, want2);
    drop(s);
    let mut s = Store::open(dir.path(), opts).expect("reopen");
    assert_eq!(s.select(&Selector::all(), 0, i64::MAX).expect("q")[0].points, want2);
    assert_eq!(s.latest(&Selector::all()).expect("latest"), vec![(k.clone(), 20_000, 1.0)]);
    assert_eq!(s.stats().rejected_out_of_order, 0, "counters are per open");
}

#[test]
fn head_spanning_block_duration_is_flushed() {
    let dir = TempDir::new("span");
    let mut opts = test_options();
    opts.block_duration_ms = 60_000;
    opts.auto_compact = false;
    let mut s = Store::open(dir.path(), opts).expect("open");
    let k = key("m", &[]);
    for t in 0..600 {
        s.append(&k, t * 1000, 1.5).expect("append");
    }
    let st = s.stats();
    assert_eq!(st.flushes, 9);
    assert_eq!(st.raw_blocks, 9);
    let r = s.select(&Selector::all(), 0, i64::MAX).expect("q");
    assert_eq!(r[0].points.len(), 600);
    assert_eq!(s.compact().expect("compact"), 1, "one run of 9 small blocks, below the target size");
    assert_eq!(s.stats().raw_blocks, 1);
    let r = s.select(&Selector::all(), 0, i64::MAX).expect("q");
    assert_eq!(r[0].points.len(), 600);
}
