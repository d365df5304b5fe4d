//! Limits: the series cap and the memory cap reject new series with a
//! clear error while existing series keep accepting points; memory
//! pressure flushes the head early and keeps accounted memory under the cap.

mod common;

use common::{key, test_options, TempDir};
use yunbian_tsdb::{Error, Options, Selector, Store};

#[test]
fn series_cap_rejects_new_series_only() {
    let dir = TempDir::new("card");
    let mut s = Store::open(dir.path(), Options { max_series: 10, ..test_options() }).expect("open");
    for i in 0..10 {
        s.append(&key("m", &[("i", &i.to_string())]), 1000, 1.0).expect("within cap");
    }
    match s.append(&key("m", &[("i", "10")]), 1000, 1.0) {
        Err(e @ Error::SeriesLimit { limit: 10, .. }) => {
            assert!(e.to_string().contains("series limit reached (10)"), "{e}");
        }
        other => panic!("expected SeriesLimit, got {other:?}"),
    }
    s.append(&key("m", &[("i", "3")]), 2000, 2.0).expect("existing series still accepted");
    let st = s.stats();
    assert_eq!(st.series, 10);
    assert_eq!(st.rejected_series_limit, 1);
    // The cap holds after a restart too, and series on disk are kept.
    drop(s);
    let mut s = Store::open(dir.path(), Options { max_series: 10, ..test_options() }).expect("reopen");
    assert_eq!(s.series(&Selector::all()).len(), 10);
    assert!(matches!(s.append(&key("m", &[("i", "11")]), 1000, 1.0), Err(Error::SeriesLimit { .. })));
}

#[test]
fn memory_cap_flushes_early_then_rejects_new_series() {
    let dir = TempDir::new("memcap");
    let cap = 256 << 10;
    let opts = Options { memory_cap_bytes: cap, auto_compact: true, ..test_options() };
    let mut s = Store::open(dir.path(), opts).expect("open");
    let long = "x".repeat(200);
    let mut created = 0;
    let err = loop {
        let k = key("m", &[("id", &format!("{created}")), ("pad", &long)]);
        match s.append(&k, 1000, created as f64) {
            Ok(()) => created += 1,
            Err(e) => break e,
        }
        assert!(created < 100_000, "the cap never triggered");
    };
    match &err {
        Error::MemoryCap { cap: c, used, .. } => {
            assert_eq!(*c, cap);
            assert!(*used <= cap);
        }
        other => panic!("expected MemoryCap, got {other:?}"),
    }
    assert!(err.to_string().contains("memory cap reached"), "{err}");
    let st = s.stats();
    assert_eq!(st.rejected_memory_cap, 1);
    assert!(st.memory_bytes <= cap, "{} > {cap}", st.memory_bytes);
    assert!(created > 100);

    // Existing series keep accepting, a lot: the head is flushed under pressure.
    let k0 = key("m", &[("id", "0"), ("pad", &long)]);
    let r = s.resolve(&k0).expect("existing series resolves past the cap");
    for chunk in 0..200i64 {
        let batch: Vec<_> = (0..500).map(|i| (r, 2000 + (chunk * 500 + i) * 1000, (i % 17) as f64 * 0.7)).collect();
        let res = s.append_many(&batch).expect("append");
        assert!(res.rejected.is_empty());
        assert!(s.stats().memory_bytes <= cap + cap / 4, "memory stays near the cap: {}", s.stats().memory_bytes);
    }
    let st = s.stats();
    assert!(st.pressure_flushes > 0 || st.flushes > 0, "{st:?}");
    let got = s.select(&Selector::all().with(yunbian_tsdb::TagMatcher::eq("id", "0")), 0, i64::MAX).expect("q");
    assert_eq!(got[0].points.len(), 1 + 200 * 500);
}

/// With many series, what a flush cannot free (series, block indexes, one
/// open chunk per series written) can pass the pressure mark by itself.
/// Pressure flushes must then still wait for points to accumulate, not
/// come once per batch (each writing a block of one point per series),
/// and a new series past the cap must be refused without a flush that
/// cannot make room.
#[test]
fn pressure_does_not_flush_once_per_batch_when_the_floor_is_past_the_mark() {
    let dir = TempDir::new("floor");
    let cap = 1 << 20;
    let opts = Options { memory_cap_bytes: cap, auto_compact: false, ..test_options() };
    let mut s = Store::open(dir.path(), opts).expect("open");
    let long = "y".repeat(150);
    let mut refs = Vec::new();
    for i in 0..2_000 {
        let k = key("m", &[("id", &i.to_string()), ("pad", &long)]);
        match s.resolve(&k) {
            Ok(r) => refs.push(r),
            Err(_) => break,
        }
    }
    assert!(refs.len() > 1_000, "{} series", refs.len());
    // Blocks, each with an index entry per series, until the rest of the
    // store alone is past the mark (75 % of the cap).
    let mut t = 0i64;
    let batch = |s: &mut Store, t: &mut i64| {
        *t += 1000;
        let points: Vec<_> = refs.iter().map(|r| (*r, *t, 20.5)).collect();
        let res = s.append_many(&points).expect("append");
        assert!(res.rejected.is_empty());
    };
    while s.stats().memory_bytes - s.stats().head_bytes < cap * 3 / 4 {
        batch(&mut s, &mut t);
        s.flush().expect("flush");
        assert!(s.stats().raw_blocks < 100, "{:?}", s.stats());
    }
    let before = s.stats();
    for _ in 0..100 {
        batch(&mut s, &mut t);
    }
    let after = s.stats();
    // 100 batches of one point per series: a few hundred KiB of encoded
    // points at most, so a handful of pressure flushes at a sixteenth of
    // the cap each; once per batch before the fix.
    let flushed = after.pressure_flushes - before.pressure_flushes;
    assert!(flushed <= 10, "{flushed} pressure flushes for 100 batches: {after:?}");
    assert_eq!(after.points_appended - before.points_appended, 100 * refs.len() as u64);

    // A new series: refused, and no flush was made for it when flushing
    // the head could not bring memory under the cap.
    let flushes = s.stats().flushes;
    let head = s.stats().head_bytes;
    let k = key("m", &[("id", "new"), ("pad", &"z".repeat(cap))]);
    assert!(matches!(s.resolve(&k), Err(Error::MemoryCap { .. })));
    assert_eq!(s.stats().flushes, flushes, "a flush that could not make room");
    assert_eq!(s.stats().head_bytes, head);
}
