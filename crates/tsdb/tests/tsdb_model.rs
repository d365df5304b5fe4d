//! Model-based property test: random sequences of appends (in and out of
//! order, overwrites, too old), flushes, compactions, age retention with
//! rollups, reopens and queries, checked against a `BTreeMap` model.
//!
//! The model states the store's contract: a point is accepted iff it is
//! newer than the raw watermark and than the series' newest timestamp minus
//! the out-of-order window; the last write of a timestamp wins; retention
//! at `now` moves the watermark to `now - raw_retention_ms` and folds the
//! points at or before it into 1-minute buckets, which step queries (step a
//! multiple of 1 min, start aligned) then report exactly like raw points.
//! Failing cases are saved under `proptest-regressions/` and committed.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{key, test_options, TempDir};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use yunbian_tsdb::agg::AggState;
use yunbian_tsdb::{Aggregation, Options, Selector, SeriesKey, Store, TagMatcher};

const WINDOW: i64 = 20_000;
const RETENTION: i64 = 100_000;

#[derive(Debug, Clone)]
enum Op {
    Append(usize, i64, f64),
    Batch(Vec<(usize, i64, f64)>),
    Flush,
    Compact,
    Retention(i64),
    Reopen,
    Select(usize, i64, i64),
    Step(usize, i64, i64, i64, usize),
    Latest(usize),
}

fn keys() -> Vec<SeriesKey> {
    vec![key("m", &[("a", "0")]), key("m", &[("a", "1")]), key("n", &[("a", "0")]), key("n", &[("b", "x")])]
}

fn selector(i: usize) -> Selector {
    match i {
        0 => Selector::all(),
        1 => Selector::metric("m"),
        2 => Selector::all().with(TagMatcher::eq("a", "0")),
        3 => Selector::all().with(TagMatcher::ne("a", "0")),
        _ => Selector::all().with(TagMatcher::re("a", "0|1").expect("regex")),
    }
}

const AGGS: [Aggregation; 6] =
    [Aggregation::Avg, Aggregation::Min, Aggregation::Max, Aggregation::Sum, Aggregation::Count, Aggregation::Last];

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![(-1000i32..1000).prop_map(|v| f64::from(v) / 10.0), (0i32..50).prop_map(f64::from), (-100.0f64..100.0),]
}

fn ts() -> impl Strategy<Value = i64> {
    // Mostly on a 1 s grid, sometimes off it.
    prop_oneof![(0i64..400).prop_map(|s| s * 1000), 0i64..400_000]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0usize..4, ts(), value()).prop_map(|(s, t, v)| Op::Append(s, t, v)),
        6 => prop::collection::vec((0usize..4, ts(), value()), 1..20).prop_map(Op::Batch),
        2 => Just(Op::Flush),
        2 => Just(Op::Compact),
        2 => (0i64..600_000).prop_map(Op::Retention),
        2 => Just(Op::Reopen),
        3 => (0usize..5, 0i64..400_000, 0i64..400_000).prop_map(|(s, a, b)| Op::Select(s, a.min(b), a.max(b) + 1)),
        3 => (0usize..5, 0i64..6, 1i64..8, 1i64..3, 0usize..6)
            .prop_map(|(s, a, n, st, g)| Op::Step(s, a * 60_000, (a + n) * 60_000, st * 60_000, g)),
        1 => (0usize..5).prop_map(Op::Latest),
    ]
}

#[derive(Default)]
struct Model {
    points: BTreeMap<usize, BTreeMap<i64, f64>>,
    max_ts: HashMap<usize, i64>,
    low: Option<i64>,
    rolled: BTreeMap<usize, BTreeMap<i64, AggState>>,
}

impl Model {
    fn accepts(&self, s: usize, t: i64) -> bool {
        self.low.is_none_or(|l| t > l) && self.max_ts.get(&s).is_none_or(|&m| t > m - WINDOW)
    }
    fn append(&mut self, s: usize, t: i64, v: f64) {
        self.points.entry(s).or_default().insert(t, v);
        let m = self.max_ts.entry(s).or_insert(t);
        *m = (*m).max(t);
    }
    fn retention(&mut self, now: i64) {
        let target = now - RETENTION;
        if self.low.is_some_and(|l| l >= target) {
            return;
        }
        for (s, pts) in &mut self.points {
            let keep = pts.split_off(&(target + 1));
            for (&t, &v) in pts.iter() {
                let b = t.div_euclid(60_000) * 60_000;
                self.rolled
                    .entry(*s)
                    .or_default()
                    .entry(b)
                    .and_modify(|a| a.add(b, v))
                    .or_insert(AggState::point(b, v));
            }
            *pts = keep;
        }
        self.low = Some(target);
    }
}

fn options() -> Options {
    Options {
        out_of_order_window_ms: WINDOW,
        block_duration_ms: 60_000,
        compact_min_blocks: 2,
        compact_target_bytes: 2048,
        raw_retention_ms: Some(RETENTION),
        ..test_options()
    }
}

fn close(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = TempDir::new("model");
    let keys = keys();
    let mut store = Store::open(dir.path(), options()).expect("open");
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(s, t, v) => {
                let want = model.accepts(s, t);
                let got = store.append(&keys[s], t, v);
                prop_assert_eq!(got.is_ok(), want, "append {} {} {}: {:?}", s, t, v, got);
                if want {
                    model.append(s, t, v);
                }
            }
            Op::Batch(b) => {
                let refs: Vec<_> =
                    b.iter().map(|&(s, t, v)| (store.resolve(&keys[s]).expect("resolve"), t, v)).collect();
                let res = store.append_many(&refs).expect("batch");
                let rejected: Vec<usize> = res.rejected.iter().map(|r| r.0).collect();
                let mut want = Vec::new();
                for (i, &(s, t, v)) in b.iter().enumerate() {
                    if model.accepts(s, t) {
                        model.append(s, t, v);
                    } else {
                        want.push(i);
                    }
                }
                prop_assert_eq!(rejected, want);
            }
            Op::Flush => store.flush().expect("flush"),
            Op::Compact => {
                store.compact().expect("compact");
            }
            Op::Retention(now) => {
                store.apply_retention(now).expect("retention");
                model.retention(now);
                prop_assert_eq!(Some(store.raw_watermark()).filter(|&w| w != i64::MIN), model.low);
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(dir.path(), options()).expect("reopen");
                prop_assert_eq!(store.stats().quarantined_blocks, 0);
            }
            Op::Select(si, a, b) => {
                let sel = selector(si);
                let got = store.select(&sel, a, b).expect("select");
                let mut want = Vec::new();
                for (s, pts) in &model.points {
                    if !sel.matches(&keys[*s]) {
                        continue;
                    }
                    let p: Vec<(i64, f64)> = pts.range(a..b).map(|(&t, &v)| (t, v)).collect();
                    if !p.is_empty() {
                        want.push((keys[*s].clone(), p));
                    }
                }
                want.sort_by(|x, y| x.0.cmp(&y.0));
                prop_assert_eq!(got.len(), want.len(), "select {} [{}, {})", si, a, b);
                for (g, (k, p)) in got.iter().zip(&want) {
                    prop_assert_eq!(&g.key, k);
                    prop_assert_eq!(g.points.len(), p.len());
                    for (x, y) in g.points.iter().zip(p) {
                        prop_assert_eq!(x.0, y.0);
                        prop_assert_eq!(x.1.to_bits(), y.1.to_bits());
                    }
                }
            }
            Op::Step(si, a, b, step, g) => {
                let sel = selector(si);
                let agg = AGGS[g];
                let got = store.select_step(&sel, a, b, step, agg).expect("step");
                let mut want = Vec::new();
                for (s, k) in keys.iter().enumerate() {
                    if !sel.matches(k) {
                        continue;
                    }
                    let mut buckets: BTreeMap<i64, AggState> = BTreeMap::new();
                    let mut put = |t: i64, st: AggState| {
                        if t >= a && t < b {
                            let bt = a + (t - a) / step * step;
                            buckets.entry(bt).and_modify(|x| x.merge(&st)).or_insert(st);
                        }
                    };
                    for (&t, st) in model.rolled.get(&s).into_iter().flatten() {
                        put(t, *st);
                    }
                    for (&t, &v) in model.points.get(&s).into_iter().flatten() {
                        put(t, AggState::point(t, v));
                    }
                    if !buckets.is_empty() {
                        want.push((
                            k.clone(),
                            buckets.into_iter().map(|(t, st)| (t, st.value(agg))).collect::<Vec<_>>(),
                        ));
                    }
                }
                want.sort_by(|x, y| x.0.cmp(&y.0));
                prop_assert_eq!(got.len(), want.len(), "step {} {:?}", si, agg);
                for (gp, (k, p)) in got.iter().zip(&want) {
                    prop_assert_eq!(&gp.key, k);
                    prop_assert_eq!(gp.points.len(), p.len(), "{} {:?}", k, agg);
                    for (x, y) in gp.points.iter().zip(p) {
                        prop_assert_eq!(x.0, y.0);
                        prop_assert!(close(x.1, y.1), "{} {:?} at {}: store {} model {}", k, agg, x.0, x.1, y.1);
                    }
                }
            }
            Op::Latest(si) => {
                let sel = selector(si);
                let got = store.latest(&sel).expect("latest");
                let mut want: Vec<(SeriesKey, i64, f64)> = model
                    .points
                    .iter()
                    .filter(|(s, _)| sel.matches(&keys[**s]))
                    .filter_map(|(s, p)| p.iter().next_back().map(|(&t, &v)| (keys[*s].clone(), t, v)))
                    .collect();
                want.sort_by(|x, y| x.0.cmp(&y.0));
                prop_assert_eq!(got, want);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/tsdb_model.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
