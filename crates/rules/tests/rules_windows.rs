//! Windows: the half-open convention at boundaries, late and out-of-order
//! records, sliding overlap, closing quiet series on `tick`, and every
//! aggregate against a naive model.

mod common;

use common::{cloud, points, rec, runner};
use proptest::prelude::*;
use serde_json::json;
use yunbian_rules::{Record, RuleRunner, Value};

fn tumbling(agg: &str, lateness: &str) -> RuleRunner {
    runner(json!([{"window": {"size": "10s", "aggregate": agg, "lateness": lateness}}]))
}

#[test]
fn a_record_at_a_window_end_belongs_to_the_next_window() {
    let mut r = tumbling("sum", "");
    assert!(r.push(rec("a", 0, 1.0), 0).is_empty());
    assert!(r.push(rec("a", 9_999, 2.0), 0).is_empty());
    // ts 10_000 is the end of [0, 10000): it opens [10000, 20000) and its
    // event time closes the first window.
    assert_eq!(points(r.push(rec("a", 10_000, 4.0), 0)), vec![("a".into(), 10_000, 3.0)]);
    assert_eq!(points(r.push(rec("a", 20_000, 8.0), 0)), vec![("a".into(), 20_000, 4.0)]);
    assert_eq!(r.stats().late, 0);
}

#[test]
fn negative_timestamps_follow_the_same_alignment() {
    let mut r = tumbling("count", "");
    r.push(rec("a", -10_000, 1.0), 0);
    r.push(rec("a", -1, 1.0), 0);
    let out = cloud(r.push(rec("a", 0, 1.0), 0));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].ts_ms, &out[0].value), (0, &Value::I64(2)));
}

#[test]
fn out_of_order_records_within_lateness_are_counted_in_their_window() {
    let mut r = tumbling("sum", "5s");
    r.push(rec("a", 1_000, 1.0), 0);
    r.push(rec("a", 12_000, 10.0), 0); // watermark 7_000: [0,10s) still open
    r.push(rec("a", 9_000, 2.0), 0); // out of order, within lateness
    assert!(r.push(rec("a", 14_999, 20.0), 0).is_empty()); // watermark 9_999
    assert_eq!(points(r.push(rec("a", 15_000, 40.0), 0)), vec![("a".into(), 10_000, 3.0)]);
    // 9_500 now falls in a closed window: late.
    assert!(r.push(rec("a", 9_500, 100.0), 0).is_empty());
    assert_eq!(r.stats().late, 1);
    // Beyond lateness by far.
    r.push(rec("a", -50_000, 100.0), 0);
    assert_eq!(r.stats().late, 2);
    // Within lateness in the current window: still taken.
    r.push(rec("a", 10_500, 1.0), 0);
    assert_eq!(points(r.push(rec("a", 25_000, 0.0), 0)), vec![("a".into(), 20_000, 71.0)]);
    assert_eq!(r.stats().late, 2);
}

#[test]
fn without_lateness_an_older_record_in_the_open_window_is_taken_but_a_closed_one_is_late() {
    let mut r = tumbling("count", "");
    r.push(rec("a", 15_000, 1.0), 0);
    r.push(rec("a", 11_000, 1.0), 0); // same open window [10s,20s): taken
    r.push(rec("a", 9_000, 1.0), 0); // [0,10s) closed by watermark 15s: late
    assert_eq!(r.stats().late, 1);
    let out = cloud(r.push(rec("a", 20_000, 1.0), 0));
    assert_eq!(out[0].value, Value::I64(2));
}

#[test]
fn series_have_their_own_watermarks() {
    let mut r = tumbling("count", "");
    r.push(rec("a", 0, 1.0), 0);
    r.push(rec("b", 50_000, 1.0), 0);
    // b's progress does not close a's window, nor make a's records late.
    r.push(rec("a", 5_000, 1.0), 0);
    assert_eq!(r.stats().late, 0);
    let out = cloud(r.push(rec("a", 10_000, 1.0), 0));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].tags["s"].as_str(), &out[0].value), ("a", &Value::I64(2)));
}

#[test]
fn sliding_windows_take_a_record_in_every_window_covering_it() {
    let mut r = runner(json!([{"window": {"type": "sliding", "size": "10s", "every": "5s", "aggregate": "sum"}}]));
    r.push(rec("a", 1_000, 1.0), 0); // [-5s,5s) and [0s,10s)
    r.push(rec("a", 6_000, 2.0), 0); // closes [-5s,5s); in [0,10s) and [5s,15s)
    r.push(rec("a", 12_000, 4.0), 0); // closes [0,10s)=3; in [5,15) [10,20)
    let out = points(r.push(rec("a", 30_000, 0.0), 0));
    assert_eq!(
        out,
        vec![("a".into(), 15_000, 6.0), ("a".into(), 20_000, 4.0)],
        "windows ending at or before 30s, in order of end"
    );
    assert_eq!(r.open_windows(0), 2, "[25s,35s) and [30s,40s) hold the last record");
}

#[test]
fn sliding_late_record_goes_to_the_windows_still_open() {
    let mut r = runner(json!([{"window": {"type": "sliding", "size": "10s", "every": "5s", "aggregate": "count"}}]));
    r.push(rec("a", 1_000, 1.0), 0);
    let first = points(r.push(rec("a", 10_000, 1.0), 0)); // closes [-5,5) and [0,10)
    assert_eq!(first, vec![("a".into(), 5_000, 1.0), ("a".into(), 10_000, 1.0)]);
    // 7s is covered by [0,10s) (closed) and [5s,15s) (open): taken by the second.
    r.push(rec("a", 7_000, 1.0), 0);
    assert_eq!(r.stats().late, 0);
    let out = points(r.push(rec("a", 15_000, 1.0), 0));
    assert_eq!(out, vec![("a".into(), 15_000, 2.0)]);
}

#[test]
fn tick_closes_the_windows_of_a_quiet_series() {
    // grace 2s (default), lateness 1s.
    let mut r = tumbling("avg", "1s");
    r.push(rec("a", 1_000, 1.0), 1_000);
    r.push(rec("a", 9_000, 3.0), 9_000);
    assert!(r.tick(12_999).is_empty(), "end 10s + lateness 1s + grace 2s not yet passed");
    assert_eq!(points(r.tick(13_000)), vec![("a".into(), 10_000, 2.0)]);
    assert!(r.tick(60_000).is_empty(), "emitted once");
    // The window is closed now: a record for it is late.
    r.push(rec("a", 9_500, 3.0), 60_000);
    assert_eq!(r.stats().late, 1);
}

#[test]
fn tick_counts_processing_time_from_when_the_series_last_advanced() {
    // The device clock is an hour behind ours: its windows still close
    // grace + lateness after their end, as the device sees time.
    let hour = 3_600_000;
    let mut r = tumbling("count", "");
    r.push(rec("a", 5_000, 1.0), 5_000 + hour);
    assert!(r.tick(9_000 + hour).is_empty());
    let out = points(r.tick(12_000 + hour));
    assert_eq!(out, vec![("a".into(), 10_000, 1.0)]);
}

#[test]
fn idle_series_without_windows_are_forgotten_on_tick() {
    let mut r = tumbling("count", "");
    r.push(rec("a", 0, 1.0), 0);
    r.tick(20_000);
    assert_eq!(r.series_in_step(0), 1);
    r.tick(20_000 + 3_600_001);
    assert_eq!(r.series_in_step(0), 0);
}

#[test]
fn first_last_and_count_take_any_value_type() {
    let mut first = tumbling("first", "");
    let mut last = tumbling("last", "");
    for r in [&mut first, &mut last] {
        r.push(Record::new("m", 5_000, "b"), 0);
        r.push(Record::new("m", 1_000, "a"), 0);
        r.push(Record::new("m", 9_000, "c"), 0);
    }
    assert_eq!(cloud(first.push(Record::new("m", 10_000, "z"), 0))[0].value, Value::from("a"));
    assert_eq!(cloud(last.push(Record::new("m", 10_000, "z"), 0))[0].value, Value::from("c"));
}

/// The naive model: every window and series, from all records at once.
fn model(records: &[(u8, i64, f64)], size: i64, every: i64, agg: &str, closed_by: i64) -> Vec<(String, i64, f64)> {
    let mut out = Vec::new();
    let mut series: Vec<u8> = records.iter().map(|r| r.0).collect();
    series.sort();
    series.dedup();
    for s in series {
        let mine: Vec<(i64, f64)> = records.iter().filter(|r| r.0 == s).map(|r| (r.1, r.2)).collect();
        let mut starts: Vec<i64> = mine
            .iter()
            .flat_map(|(ts, _)| {
                let last = ts.div_euclid(every) * every;
                (0..).map(move |k| last - k * every).take_while(move |st| st + size > *ts)
            })
            .collect();
        starts.sort();
        starts.dedup();
        for st in starts {
            let end = st + size;
            if end > closed_by {
                continue;
            }
            let w: Vec<(i64, f64)> = mine.iter().copied().filter(|(ts, _)| *ts >= st && *ts < end).collect();
            let xs: Vec<f64> = w.iter().map(|p| p.1).collect();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let v = match agg {
                "avg" => mean,
                "sum" => xs.iter().sum(),
                "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "count" => n,
                "stddev" => (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt(),
                "first" => w.iter().min_by_key(|p| p.0).map(|p| p.1).unwrap_or(f64::NAN),
                "last" => w.iter().max_by_key(|p| p.0).map(|p| p.1).unwrap_or(f64::NAN),
                _ => unreachable!(),
            };
            out.push((format!("s{s}"), end, v));
        }
    }
    out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Records in time order (ties allowed) through every aggregate, tumbling
    /// and sliding; a final tick closes every window. The engine's output
    /// equals the naive model's.
    #[test]
    fn aggregates_match_a_naive_model(
        recs in proptest::collection::vec((0u8..4, 0i64..60_000, -1_000.0f64..1_000.0), 1..80),
        agg in prop::sample::select(vec!["avg", "sum", "min", "max", "count", "stddev", "first", "last"]),
        sliding in any::<bool>(),
    ) {
        let mut recs = recs;
        recs.sort_by_key(|r| r.1);
        let (size, every) = if sliding { (10_000, 2_500) } else { (10_000, 10_000) };
        let step = if sliding {
            json!({"window": {"type": "sliding", "size": "10s", "every": "2500ms", "aggregate": agg}})
        } else {
            json!({"window": {"size": "10s", "aggregate": agg}})
        };
        let mut r = runner(json!([step]));
        let mut got = Vec::new();
        for (s, ts, v) in &recs {
            got.extend(points(r.push(common::rec(&format!("s{s}"), *ts, *v), 0)));
        }
        got.extend(points(r.tick(i64::MAX / 4)));
        got.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let want = model(&recs, size, every, agg, i64::MAX);
        prop_assert_eq!(got.len(), want.len(), "got {:?} want {:?}", got, want);
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!((&g.0, g.1), (&w.0, w.1));
            prop_assert!(close(g.2, w.2), "{} vs {} in {:?}", g.2, w.2, g);
        }
        prop_assert_eq!(r.stats().late, 0);
    }

    /// Out-of-order records within lateness give the same windows as sorted
    /// ones.
    #[test]
    fn shuffles_within_lateness_do_not_change_the_result(
        recs in proptest::collection::vec((0u8..3, 0i64..60_000, -100.0f64..100.0), 1..60),
        seed in any::<u64>(),
    ) {
        let mut sorted = recs.clone();
        sorted.sort_by_key(|r| r.1);
        // Displace each record by less than the lateness (5s): sort by a
        // jittered time.
        let mut shuffled = sorted.clone();
        let mut x = seed | 1;
        let mut jitter = |_: &(u8, i64, f64)| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x % 4_000) as i64 };
        let mut keyed: Vec<(i64, (u8, i64, f64))> = shuffled.drain(..).map(|r| (r.1 + jitter(&r), r)).collect();
        keyed.sort_by_key(|k| k.0);
        let shuffled: Vec<_> = keyed.into_iter().map(|k| k.1).collect();
        let mut outs = Vec::new();
        for input in [&sorted, &shuffled] {
            let mut r = runner(json!([{"window": {"size": "10s", "aggregate": "sum", "lateness": "5s"}}]));
            let mut got = Vec::new();
            for (s, ts, v) in input.iter() {
                got.extend(points(r.push(common::rec(&format!("s{s}"), *ts, *v), 0)));
            }
            got.extend(points(r.tick(i64::MAX / 4)));
            got.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            prop_assert_eq!(r.stats().late, 0);
            outs.push(got);
        }
        prop_assert_eq!(outs[0].len(), outs[1].len());
        for (a, b) in outs[0].iter().zip(&outs[1]) {
            prop_assert_eq!((&a.0, a.1), (&b.0, b.1));
            prop_assert!(close(a.2, b.2));
        }
    }
}
