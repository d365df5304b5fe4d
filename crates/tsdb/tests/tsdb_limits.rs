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
    // Series up to 40 % of the cap; block indexes do the rest.
    let mut refs = Vec::new();
    while s.stats().memory_bytes < cap * 2 / 5 {
        let k = key("m", &[("id", &refs.len().to_string()), ("pad", &long)]);
        refs.push(s.resolve(&k).expect("room for the series"));
    }
    assert!(refs.len() > 300, "{} series", refs.len());
    let mut t = 0i64;
    let batch = |s: &mut Store, t: &mut i64| {
        *t += 1000;
        // Values that do not repeat, so points cost bytes.
        let points: Vec<_> = refs
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, *t, ((*t / 1000 * 7919 + i as i64 * 104_729) % 100_000) as f64 * 0.1))
            .collect();
        let res = s.append_many(&points).expect("append");
        assert!(res.rejected.is_empty());
    };
    // Blocks, each with an index entry per series, until the rest of the
    // store alone is past the mark (75 % of the cap).
    let mut built = 0;
    while s.stats().memory_bytes - s.stats().head_bytes < cap * 3 / 4 {
        batch(&mut s, &mut t);
        s.flush().expect("flush");
        built += 1;
        assert!(built < 1_000, "{:?}", s.stats());
    }
    assert!(built > 1, "the indexes did not take the store past the mark");
    let before = s.stats();
    let batches = 300;
    for _ in 0..batches {
        batch(&mut s, &mut t);
        assert!(s.stats().memory_bytes < cap * 3 / 2, "{:?}", s.stats());
    }
    let after = s.stats();
    let written = (after.points_appended - before.points_appended) as f64;
    assert_eq!(written as u64, batches * refs.len() as u64);
    // Pressure flushes come per sixteenth of the cap of points (tens of
    // KiB here), so some, but far fewer than one per batch (as before).
    let flushed = after.pressure_flushes - before.pressure_flushes;
    assert!(flushed >= 1, "no pressure flush at all: {after:?}");
    assert!(flushed <= batches / 10, "{flushed} pressure flushes for {batches} batches: {after:?}");

    // A new series with the store past the cap after a flush: refused, and
    // no flush made for it.
    let mut n = 0;
    let err = loop {
        let k = key("m", &[("id", &format!("new-{n}")), ("pad", &long)]);
        match s.resolve(&k) {
            Ok(r) => {
                // Fill the rest of the cap with indexes.
                s.append_many(&[(r, t, 1.0)]).expect("append");
                batch(&mut s, &mut t);
                s.flush().expect("flush");
                n += 1;
                assert!(n < 1_000, "never refused: {:?}", s.stats());
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::MemoryCap { .. }), "{err}");
    batch(&mut s, &mut t);
    let flushes = s.stats().flushes;
    for i in 0..20 {
        let k = key("m", &[("id", &format!("refused-{i}")), ("pad", &long)]);
        assert!(matches!(s.resolve(&k), Err(Error::MemoryCap { .. })));
    }
    assert_eq!(s.stats().flushes, flushes, "flushes that could not make room");
}
