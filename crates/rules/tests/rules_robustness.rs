//! `push` and `tick` never panic, whatever the records and the (compiling)
//! spec, and the counters stay consistent.

mod common;

use proptest::prelude::*;
use serde_json::json;
use yunbian_rules::{CompiledRule, Quality, Record, RuleRunner, RunnerConfig, Value};

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>().prop_map(Value::F64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,8}".prop_map(Value::Str),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        prop::sample::select(vec!["m", "n", ""]),
        proptest::collection::btree_map("[a-c]{1}", ".{0,3}", 0..3),
        prop_oneof![any::<i64>(), -100_000i64..100_000],
        value(),
        prop::sample::select(vec![Quality::Good, Quality::Uncertain, Quality::Bad]),
    )
        .prop_map(|(metric, tags, ts_ms, value, quality)| Record {
            metric: metric.into(),
            tags,
            ts_ms,
            value,
            quality,
        })
}

fn step() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        prop::sample::select(vec![
            "value > 1.0",
            "value",
            "tags.a == 'x' || quality == 'bad'",
            "ts % 2 == 0",
            "metric.size() > 0 && value != null",
        ])
        .prop_map(|e| json!({"filter": e})),
        prop::sample::select(vec![
            "value * 2.0",
            "value + 1",
            "string(value)",
            "value / 0",
            "[value]",
            "{'a': value}",
            "tags",
            "ts",
            "-9223372036854775807 - ts",
        ])
        .prop_map(|e| json!({"map": e})),
        (
            prop::sample::select(vec!["avg", "min", "max", "sum", "count", "first", "last", "stddev"]),
            prop::sample::select(vec![
                ("tumbling", "1s", ""),
                ("tumbling", "1ms", ""),
                ("sliding", "10s", "1s"),
                ("sliding", "3ms", "2ms")
            ]),
            prop::sample::select(vec!["", "0", "500ms", "1h"]),
        )
            .prop_map(|(agg, (kind, size, every), lateness)| {
                let mut w = json!({"type": kind, "size": size, "aggregate": agg, "lateness": lateness});
                if !every.is_empty() {
                    w["every"] = json!(every);
                }
                json!({"window": w})
            }),
        prop::sample::select(vec![0.0, 0.5, 1e300]).prop_map(|d| json!({"deadband": d})),
        Just(json!({"rename": "renamed"})),
        Just(json!({"tag": {"a": "x"}})),
    ]
}

fn sinks() -> serde_json::Value {
    json!([
        {"tsdb": {}},
        {"mqtt": {"topic": "o/{tags.a}/{metric}"}},
        {"cloud": {"priority": 3}},
        {"alert": {"when": "value > 0.5", "message": "{value} {tags.b} {oops"}},
        {"alert": {"message": "always"}}
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn push_and_tick_never_panic(
        steps in proptest::collection::vec(step(), 0..5),
        events in proptest::collection::vec((record(), prop_oneof![any::<i64>(), 0i64..200_000], any::<bool>()), 0..60),
    ) {
        let spec = common::spec(json!({"steps": steps, "sinks": sinks()}));
        let compiled = CompiledRule::compile(&spec);
        prop_assert!(compiled.is_ok(), "{:?}", compiled.err());
        let Ok(compiled) = compiled else { return Ok(()) };
        let config = RunnerConfig { max_series: 4, max_windows: 40, ..RunnerConfig::default() };
        let mut r = RuleRunner::with_config(compiled, config);
        for (rec, now, tick) in events {
            if tick {
                r.tick(now);
            } else {
                r.push(rec, now);
            }
        }
        r.tick(i64::MAX);
        r.tick(i64::MIN);
        let s = r.stats();
        // `late` counts records any window dropped; behind a first window,
        // a later one sees the first one's outputs (a sliding window emits
        // several per input), so only a single window bounds it by the input.
        let windows = steps.iter().filter(|st| st.get("window").is_some()).count();
        if windows <= 1 {
            prop_assert!(s.late <= s.records_in);
        }
        prop_assert!(s.last_error.len() <= yunbian_rules::runner::LAST_ERROR_MAX);
        for i in 0..5 {
            prop_assert!(r.open_windows(i) <= 40);
            prop_assert!(r.series_in_step(i) <= 4);
        }
    }
}
