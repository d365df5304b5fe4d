//! Memory caps: series and open windows are bounded; what a cap refuses is
//! counted, and room freed by closing windows is used again.

mod common;

use common::{points, rec, runner_with, spec};
use serde_json::json;
use yunbian_rules::{CompiledRule, Output, RuleRunner, RunnerConfig};

fn config(max_series: usize, max_windows: usize) -> RunnerConfig {
    RunnerConfig { max_series, max_windows, ..RunnerConfig::default() }
}

#[test]
fn window_series_are_capped() {
    let mut r = runner_with(json!([{"window": {"size": "10s", "aggregate": "count"}}]), config(3, 1_000));
    for i in 0..10 {
        r.push(rec(&format!("s{i}"), 0, 1.0), 0);
    }
    assert_eq!(r.series_in_step(0), 3);
    assert_eq!(r.stats().dropped, 7);
    // Known series still go through.
    r.push(rec("s0", 1, 1.0), 0);
    assert_eq!(r.stats().dropped, 7);
    let out = points(r.tick(100_000));
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].2, 2.0);
}

#[test]
fn open_windows_are_capped_and_freed_by_closing() {
    let mut r = runner_with(
        json!([{"window": {"type": "sliding", "size": "10s", "every": "1s", "aggregate": "count"}}]),
        config(100, 25),
    );
    r.push(rec("a", 0, 1.0), 0); // 10 windows
    r.push(rec("b", 0, 1.0), 0); // 20
    r.push(rec("c", 0, 1.0), 0); // would be 30: refused
    assert_eq!(r.open_windows(0), 20);
    assert_eq!(r.stats().dropped, 1);
    // Closing windows frees room.
    assert_eq!(r.tick(100_000).len(), 20);
    assert_eq!(r.open_windows(0), 0);
    assert_eq!(r.series_in_step(0), 2, "the refused record left no state");
    r.push(rec("c", 100_000, 1.0), 100_000);
    assert_eq!(r.stats().dropped, 1);
    assert_eq!(r.open_windows(0), 10);
}

#[test]
fn deadband_series_are_capped_and_idle_ones_forgotten() {
    let mut r = runner_with(json!([{"deadband": 1.0}]), RunnerConfig { evict_after_ms: 60_000, ..config(2, 10) });
    for i in 0..5 {
        r.push(rec(&format!("s{i}"), 0, 1.0), 0);
    }
    assert_eq!(r.stats().dropped, 3);
    assert_eq!(r.series_in_step(0), 2);
    r.tick(60_001);
    assert_eq!(r.series_in_step(0), 0);
    r.push(rec("s4", 0, 1.0), 60_001);
    assert_eq!(r.stats().dropped, 3);
}

#[test]
fn firing_alerts_are_capped() {
    let s = spec(json!({"sinks": [{"alert": {"when": "value > 1.0", "message": "hot"}}]}));
    let mut r = RuleRunner::with_config(CompiledRule::compile(&s).expect("compiles"), config(2, 10));
    let mut fired = 0;
    for i in 0..4 {
        fired += r.push(rec(&format!("s{i}"), 0, 5.0), 0).iter().filter(|o| matches!(o, Output::Alert { .. })).count();
    }
    assert_eq!(fired, 2);
    assert_eq!(r.stats().dropped, 2);
    // Resolving one makes room for another.
    r.push(rec("s0", 0, 0.0), 0);
    assert_eq!(r.push(rec("s3", 0, 5.0), 0).len(), 1);
}
