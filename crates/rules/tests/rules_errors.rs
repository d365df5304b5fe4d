//! Run-time errors: a broken expression, a non-boolean filter, a value a
//! window cannot aggregate are counted with a sample, and the rule keeps
//! running.

mod common;

use common::{points, rec, runner};
use serde_json::json;
use yunbian_rules::Record;

#[test]
fn a_failing_map_is_counted_and_the_rule_keeps_running() {
    let mut r = runner(json!([{"map": "value / (value - 1.0) * double(tags.n)"}]));
    // tags.n missing: no such key.
    assert!(r.push(rec("a", 0, 2.0), 0).is_empty());
    let s = r.stats();
    assert_eq!(s.errors, 1);
    assert!(s.last_error.starts_with("spec.steps[0].map: "), "{}", s.last_error);
    assert!(s.last_error.contains("record: m{s=\"a\"} ts=0 value=F64(2.0)"), "{}", s.last_error);
    // The next good record goes through.
    let out = points(r.push(rec("a", 1, 3.0).with_tag("n", "2"), 0));
    assert_eq!(out.len(), 1);
    assert_eq!(r.stats().errors, 1);
    assert_eq!(r.stats().records_out, 1);
}

#[test]
fn a_filter_that_is_not_boolean_is_a_run_time_error() {
    let mut r = runner(json!([{"filter": "value"}]));
    assert!(r.push(rec("a", 0, 1.0), 0).is_empty());
    assert_eq!(r.stats().errors, 1);
    assert!(r.stats().last_error.contains("result must be a bool, got double"), "{}", r.stats().last_error);
    // A bool value passes the same filter.
    assert_eq!(r.push(Record::new("m", 0, true), 0).len(), 1);
}

#[test]
fn a_type_error_in_a_filter_is_a_run_time_error() {
    let mut r = runner(json!([{"filter": "value > 10"}]));
    // CEL has no implicit int/double comparison in every implementation;
    // whatever this one does, a string never compares to a number.
    r.push(Record::new("m", 0, "hot"), 0);
    assert_eq!(r.stats().errors, 1);
    r.push(Record::new("m", 0, 11i64), 0);
    assert_eq!(r.stats().records_out, 1);
}

#[test]
fn a_numeric_aggregate_of_a_string_is_an_error_for_that_record() {
    let mut r = runner(json!([{"window": {"size": "10s", "aggregate": "avg"}}]));
    r.push(rec("a", 0, 2.0), 0);
    r.push(Record::new("m", 1, "x").with_tag("s", "a"), 0);
    r.push(rec("a", 2, 4.0), 0);
    assert_eq!(r.stats().errors, 1);
    assert!(r.stats().last_error.starts_with("spec.steps[0].window: aggregate needs a number, got string"));
    assert_eq!(points(r.push(rec("a", 10_000, 0.0), 0)), vec![("a".into(), 10_000, 3.0)]);
}

#[test]
fn last_error_is_truncated() {
    let mut r = runner(json!([{"filter": "value"}]));
    r.push(Record::new("m", 0, "é".repeat(2_000)), 0);
    let e = r.stats().last_error;
    assert!(e.len() <= yunbian_rules::runner::LAST_ERROR_MAX, "{}", e.len());
    assert!(e.ends_with("..."));
}

#[test]
fn a_timestamp_out_of_range_is_an_error() {
    let mut r = runner(json!([{"window": {"size": "10s"}}]));
    r.push(rec("a", i64::MAX, 1.0), 0);
    r.push(rec("a", i64::MIN, 1.0), 0);
    assert_eq!(r.stats().errors, 2);
}
