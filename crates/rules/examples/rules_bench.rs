//! Rule engine throughput on one core: records/s through
//! filter → map → 10 s tumbling avg → cloud sink, for 1,000 series.
//!
//! ```sh
//! cargo run --release -p yunbian-rules --example rules_bench [-- RECORDS]
//! ```
//!
//! Each series sends one record per second of event time; the source's
//! work (cloning the series' metric and tags into a record) is included.

use std::collections::BTreeMap;
use std::time::Instant;

use yunbian_rules::{CompiledRule, Output, Record, RuleRunner, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(2_000_000);
    let spec: yunbian_api::RuleSpec = serde_json::from_value(serde_json::json!({
        "source": {"devices": {}},
        "steps": [
            {"filter": "quality == 'good' && value > -1000.0"},
            {"map": "value * 1.8 + 32.0"},
            {"window": {"size": "10s", "aggregate": "avg"}}
        ],
        "sinks": [{"cloud": {"priority": 5}}]
    }))?;
    let rule = CompiledRule::compile(&spec).map_err(|e| format!("{e:?}"))?;
    let mut runner = RuleRunner::new(rule);
    let series = 1_000u64;
    let tags: Vec<BTreeMap<String, String>> = (0..series)
        .map(|i| {
            BTreeMap::from([
                ("device".to_string(), format!("boiler-{i}")),
                ("property".to_string(), "temperature".to_string()),
            ])
        })
        .collect();
    let mut outputs = 0u64;
    let mut checksum = 0.0f64;
    let start = Instant::now();
    let mut n = 0u64;
    'outer: for second in 0.. {
        let ts = 1_700_000_000_000i64 + second * 1_000;
        for (i, t) in tags.iter().enumerate() {
            if n == total {
                break 'outer;
            }
            n += 1;
            let v = 20.0 + ((n.wrapping_mul(2_654_435_761) % 1_000) as f64) / 100.0;
            let rec = Record {
                metric: "temperature".to_string(),
                tags: t.clone(),
                ts_ms: ts,
                value: Value::F64(v + i as f64 * 0.001),
                quality: yunbian_rules::Quality::Good,
            };
            for o in runner.push(rec, ts) {
                if let Output::Cloud { record, .. } = o {
                    outputs += 1;
                    checksum += record.value.as_f64().unwrap_or(0.0);
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let s = runner.stats();
    println!(
        "{n} records, {series} series, {outputs} window records out in {elapsed:.2} s: {:.0} records/s (errors {}, late {}, checksum {checksum:.1})",
        n as f64 / elapsed,
        s.errors,
        s.late
    );
    Ok(())
}
