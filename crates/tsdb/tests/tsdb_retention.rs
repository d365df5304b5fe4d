//! Retention: by age and by total raw bytes the raw watermark rises, points
//! at or before it are rolled up into 1-minute and 1-hour aggregates that
//! step queries keep answering; rollups have their own retention; the
//! watermark survives restarts and rejects points that would land before it.

mod common;

use common::{key, test_options, TempDir};
use yunbian_tsdb::{Aggregation, Error, Options, Selector, Store};

const H: i64 = 3_600_000;

fn fill(s: &mut Store, hours: i64) {
    let k = key("t", &[("d", "1")]);
    let r = s.resolve(&k).expect("resolve");
    // One point every 10 s: 360 per hour, value = minute of the hour.
    for h in 0..hours {
        let batch: Vec<_> = (0..360).map(|i| (r, h * H + i * 10_000, ((i / 6) % 60) as f64)).collect();
        s.append_many(&batch).expect("append");
    }
}

#[test]
fn age_retention_rolls_up_and_step_queries_still_answer() {
    let dir = TempDir::new("ret-age");
    let opts = Options { raw_retention_ms: Some(2 * H), block_duration_ms: H, ..test_options() };
    let mut s = Store::open(dir.path(), opts.clone()).expect("open");
    fill(&mut s, 6);
    s.flush().expect("flush");
    s.apply_retention(6 * H).expect("retention");
    assert_eq!(s.raw_watermark(), 4 * H);
    // Raw points are gone before the watermark…
    let raw = s.select(&Selector::all(), 0, 6 * H).expect("raw");
    assert_eq!(raw[0].points.first().map(|p| p.0), Some(4 * H + 10_000));
    // …but 1-minute steps come from rollups, exactly.
    let step = s.select_step(&Selector::all(), 0, 6 * H, 60_000, Aggregation::Count).expect("step");
    assert_eq!(step[0].points.len(), 6 * 60);
    assert!(step[0].points.iter().all(|p| p.1 == 6.0), "6 points per minute everywhere");
    let avg = s.select_step(&Selector::all(), 0, H, 60_000, Aggregation::Avg).expect("avg");
    assert_eq!(avg[0].points[7], (7 * 60_000, 7.0));
    let hourly = s.select_step(&Selector::all(), 0, 6 * H, H, Aggregation::Sum).expect("sum");
    assert_eq!(hourly[0].points.len(), 6);
    assert!(hourly[0].points.iter().all(|p| p.1 == 6.0 * (0..60).sum::<i64>() as f64));
    // Steps finer than a minute only see raw data.
    let fine = s.select_step(&Selector::all(), 0, 6 * H, 10_000, Aggregation::Count).expect("fine");
    assert_eq!(fine[0].points.len(), 2 * 360 - 1);
    // Too old now.
    assert!(matches!(s.append(&key("t", &[("d", "1")]), 4 * H, 1.0), Err(Error::TooOld { .. })));
    drop(s);
    let mut s = Store::open(dir.path(), opts).expect("reopen");
    assert_eq!(s.raw_watermark(), 4 * H);
    let step = s.select_step(&Selector::all(), 0, 6 * H, 60_000, Aggregation::Count).expect("step");
    assert_eq!(step[0].points.len(), 6 * 60);
}

#[test]
fn size_retention_keeps_raw_bytes_under_the_limit() {
    let dir = TempDir::new("ret-size");
    let opts = Options { max_raw_bytes: Some(600), block_duration_ms: H, auto_compact: false, ..test_options() };
    let mut s = Store::open(dir.path(), opts).expect("open");
    fill(&mut s, 12);
    s.flush().expect("flush");
    let before = s.stats();
    assert!(before.raw_blocks >= 6);
    s.apply_retention(0).expect("retention");
    let st = s.stats();
    assert!(st.raw_blocks < before.raw_blocks, "{before:?} {st:?}");
    assert!(st.raw_watermark > 0);
    let raw = s.select(&Selector::all(), 0, i64::MAX).expect("raw");
    assert!(raw[0].points.iter().all(|p| p.0 > st.raw_watermark));
    assert!(matches!(s.append(&key("t", &[("d", "1")]), st.raw_watermark, 1.0), Err(Error::TooOld { .. })));
    let count = s.select_step(&Selector::all(), 0, 12 * H, H, Aggregation::Count).expect("count");
    assert_eq!(count[0].points.len(), 12);
    assert!(count[0].points.iter().all(|p| p.1 == 360.0), "{:?}", count[0].points);
}

#[test]
fn hourly_rollups_outlive_minute_rollups() {
    let dir = TempDir::new("ret-1h");
    let opts = Options {
        raw_retention_ms: Some(H),
        rollup_1m_retention_ms: Some(3 * H),
        rollup_1h_retention_ms: Some(100 * H),
        block_duration_ms: H,
        ..test_options()
    };
    let mut s = Store::open(dir.path(), opts).expect("open");
    fill(&mut s, 4);
    s.flush().expect("flush");
    s.apply_retention(4 * H).expect("retention"); // raw ≤ 3h rolled up
    s.apply_retention(10 * H).expect("retention later"); // 1-min rollups with hi ≤ 7h deleted
    let minute = s.select_step(&Selector::all(), 0, 3 * H, 60_000, Aggregation::Count).expect("minute");
    assert!(minute.is_empty(), "1-minute rollups are gone");
    let hour = s.select_step(&Selector::all(), 0, 3 * H, H, Aggregation::Count).expect("hour");
    assert_eq!(hour[0].points, vec![(0, 360.0), (H, 360.0), (2 * H, 360.0)]);
    assert!(s.stats().rollup_blocks >= 1);
}
