//! Helpers shared by the rule tests: specs from JSON, records, outputs.

#![allow(dead_code)]

use yunbian_api::RuleSpec;
use yunbian_rules::{CompiledRule, Output, Record, RuleRunner, RunnerConfig, Value};

/// A spec from JSON, with an MQTT source filled in when absent.
pub fn spec(mut v: serde_json::Value) -> RuleSpec {
    if v.get("source").is_none() {
        v["source"] = serde_json::json!({"mqtt": {"topic": "t/#"}});
    }
    serde_json::from_value(v).expect("test spec has the right shape")
}

/// A runner for `steps` with a single cloud sink.
pub fn runner(steps: serde_json::Value) -> RuleRunner {
    runner_with(steps, RunnerConfig::default())
}

/// Like [`runner`], with limits.
pub fn runner_with(steps: serde_json::Value, config: RunnerConfig) -> RuleRunner {
    let s = spec(serde_json::json!({"steps": steps, "sinks": [{"cloud": {}}]}));
    let c = CompiledRule::compile(&s).expect("test rule compiles");
    RuleRunner::with_config(c, config)
}

/// A record of metric `m` with tag `s` = `series`.
pub fn rec(series: &str, ts: i64, v: f64) -> Record {
    Record::new("m", ts, v).with_tag("s", series)
}

/// The records of the cloud outputs.
pub fn cloud(out: Vec<Output>) -> Vec<Record> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Cloud { record, .. } => Some(record),
            _ => None,
        })
        .collect()
}

/// `(series tag, ts, value as f64)` of the cloud outputs.
pub fn points(out: Vec<Output>) -> Vec<(String, i64, f64)> {
    cloud(out)
        .into_iter()
        .map(|r| (r.tags.get("s").cloned().unwrap_or_default(), r.ts_ms, r.value.as_f64().unwrap_or(f64::NAN)))
        .collect()
}

/// A value as f64 for comparisons.
pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}
