//! Steps and sinks: filter/map, deadband, rename, tag, the MQTT payload,
//! alert deduplication and message templating.

mod common;

use common::{cloud, points, rec, runner, spec};
use serde_json::json;
use yunbian_api::Severity;
use yunbian_rules::{CompiledRule, Output, Record, RuleRunner, Value};

fn with_sinks(steps: serde_json::Value, sinks: serde_json::Value) -> RuleRunner {
    let s = spec(json!({"steps": steps, "sinks": sinks}));
    RuleRunner::new(CompiledRule::compile(&s).expect("compiles"))
}

#[test]
fn filter_and_map_see_every_variable() {
    let mut r = runner(json!([
        {"filter": "quality == 'good' && tags.s == 'a' && metric == 'm' && ts >= 0"},
        {"map": "value * 2.0 + double(ts)"}
    ]));
    assert_eq!(points(r.push(rec("a", 10, 1.5), 0)), vec![("a".into(), 10, 13.0)]);
    assert!(r.push(rec("b", 10, 1.5), 0).is_empty());
    assert!(r.push(rec("a", 10, 1.5).with_quality(yunbian_rules::Quality::Bad), 0).is_empty());
    let s = r.stats();
    assert_eq!((s.records_in, s.records_out, s.errors), (3, 1, 0));
}

#[test]
fn map_may_change_the_value_type() {
    let mut r = runner(json!([{"map": "value > 20.0 ? 'hot' : 'ok'"}]));
    assert_eq!(cloud(r.push(rec("a", 0, 25.0), 0))[0].value, Value::from("hot"));
    let mut r = runner(json!([{"map": "int(value)"}]));
    assert_eq!(cloud(r.push(rec("a", 0, 25.7), 0))[0].value, Value::I64(25));
}

#[test]
fn deadband_passes_only_moves_beyond_the_band_per_series() {
    let mut r = runner(json!([{"deadband": 0.5}]));
    let mut got = Vec::new();
    for (s, ts, v) in [("a", 0, 10.0), ("a", 1, 10.3), ("a", 2, 10.5), ("b", 3, 10.2), ("a", 4, 10.51), ("a", 5, 10.0)]
    {
        got.extend(points(r.push(rec(s, ts, v), 0)));
    }
    // 10.3 and 10.5 moved by <= 0.5 from 10.0; 10.51 moved by more; 10.0 moved
    // by 0.51 from 10.51 (the last passed, not the last seen).
    let want: Vec<(String, i64, f64)> =
        vec![("a".into(), 0, 10.0), ("b".into(), 3, 10.2), ("a".into(), 4, 10.51), ("a".into(), 5, 10.0)];
    assert_eq!(got, want);
}

#[test]
fn deadband_on_non_numbers_passes_changes() {
    let mut r = runner(json!([{"deadband": 1.0}]));
    let mut n = 0;
    for v in ["on", "on", "off", "off", "on"] {
        n += cloud(r.push(Record::new("m", 0, v), 0)).len();
    }
    assert_eq!(n, 3);
}

#[test]
fn rename_and_tag_change_the_series() {
    let mut r = runner(json!([{"rename": "temp_c"}, {"tag": {"s": "z", "site": "north"}}]));
    let out = cloud(r.push(rec("a", 0, 1.0), 0));
    assert_eq!(out[0].series_name(), "temp_c{s=\"z\",site=\"north\"}");
}

#[test]
fn sinks_get_the_record_in_their_form() {
    let mut r = with_sinks(
        json!([]),
        json!([
            {"tsdb": {"metric": "stored"}},
            {"mqtt": {"topic": "out/{tags.s}/{metric}", "retain": true}},
            {"cloud": {"priority": 7}}
        ]),
    );
    let out = r.push(rec("a", 1_000, 2.5), 0);
    assert_eq!(out.len(), 3);
    match &out[0] {
        Output::Tsdb { metric, tags, ts_ms, value } => {
            assert_eq!((metric.as_str(), tags["s"].as_str(), *ts_ms, value), ("stored", "a", 1_000, &Value::F64(2.5)))
        }
        o => panic!("{o:?}"),
    }
    match &out[1] {
        Output::Mqtt { topic, payload, retain } => {
            assert_eq!(topic, "out/a/m");
            assert!(*retain);
            let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
            assert_eq!(v, json!({"value": 2.5, "ts": 1000, "metric": "m", "tags": {"s": "a"}}));
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(&out[2], Output::Cloud { priority: 7, .. }));
}

#[test]
fn an_mqtt_topic_missing_a_tag_is_an_error_not_a_publication() {
    let mut r = with_sinks(json!([]), json!([{"mqtt": {"topic": "out/{tags.device}"}}, {"cloud": {}}]));
    let out = r.push(rec("a", 0, 1.0), 0);
    assert_eq!(out.len(), 1, "the cloud sink still gets it");
    assert_eq!(r.stats().errors, 1);
    assert!(r.stats().last_error.starts_with("spec.sinks[0].mqtt.topic: record has no tag \"device\""));
}

fn alerts(out: Vec<Output>) -> Vec<(String, bool, String)> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Alert { key, firing, message, severity, .. } => {
                assert_eq!(severity, Severity::Critical);
                Some((key, firing, message))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn an_alert_fires_once_while_it_holds_and_resolves_once() {
    let mut r = with_sinks(
        json!([]),
        json!([{"alert": {"when": "value > 80.0", "severity": "critical",
                          "message": "{metric} on {tags.s} is {value} {tags.none}"}}]),
    );
    let mut got = Vec::new();
    for (s, v) in
        [("a", 70.0), ("a", 85.0), ("a", 90.0), ("b", 95.0), ("a", 99.0), ("a", 60.0), ("a", 50.0), ("a", 81.5)]
    {
        got.extend(alerts(r.push(rec(s, 0, v), 0)));
    }
    let key = |s: &str| format!("sinks[0]:m{{s=\"{s}\"}}");
    assert_eq!(
        got,
        vec![
            (key("a"), true, "m on a is 85 ".to_string()),
            (key("b"), true, "m on b is 95 ".to_string()),
            (key("a"), false, "m on a is 60 ".to_string()),
            (key("a"), true, "m on a is 81.5 ".to_string()),
        ]
    );
}

#[test]
fn a_restored_firing_alert_resolves_on_the_first_record_that_clears_it() {
    let sinks =
        json!([{"cloud": {}}, {"alert": {"when": "value > 80.0", "severity": "critical", "message": "{value}"}}]);
    let mut r = with_sinks(json!([]), sinks);
    let a = yunbian_rules::SeriesKey::of(&rec("a", 0, 0.0));
    assert!(!r.restore_firing(0, a.clone()), "sink 0 is not an alert");
    assert!(r.restore_firing(1, a));
    // Still holding: nothing new to say.
    assert!(alerts(r.push(rec("a", 0, 90.0), 0)).is_empty());
    assert_eq!(
        alerts(r.push(rec("a", 0, 10.0), 0)),
        vec![("sinks[1]:m{s=\"a\"}".to_string(), false, "10".to_string())]
    );
}

#[test]
fn an_alert_after_a_window_fires_on_the_aggregate() {
    let mut r = with_sinks(
        json!([{"window": {"size": "10s", "aggregate": "avg"}}]),
        json!([{"cloud": {}}, {"alert": {"when": "value > 50.0", "severity": "critical", "message": "avg {value}"}}]),
    );
    r.push(rec("a", 0, 40.0), 0);
    r.push(rec("a", 5_000, 80.0), 0);
    let out = r.push(rec("a", 10_000, 0.0), 0);
    assert_eq!(alerts(out), vec![("sinks[1]:m{s=\"a\"}".to_string(), true, "avg 60".to_string())]);
}
