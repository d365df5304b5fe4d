//! Compiling rules: CEL syntax errors and unknown variables come back with
//! the field path and the position in the expression.

mod common;

use common::spec;
use serde_json::json;
use yunbian_rules::{compile_errors, CompiledRule};

#[test]
fn a_syntax_error_has_its_path_and_position() {
    let s = spec(json!({"steps": [{"filter": "value > > 3"}], "sinks": [{"cloud": {}}]}));
    let errs = CompiledRule::compile(&s).expect_err("syntax error");
    println!("{errs:?}");
    assert_eq!(errs[0].path, "spec.steps[0].filter");
    assert_eq!((errs[0].line, errs[0].column), (1, 9));
    let lines = compile_errors(&s);
    assert!(lines[0].starts_with("spec.steps[0].filter: 1:9: "), "{lines:?}");
}

#[test]
fn a_syntax_error_on_a_later_line() {
    let s = spec(json!({"steps": [{"map": "value *\n  (2 +"}], "sinks": [{"cloud": {}}]}));
    let errs = CompiledRule::compile(&s).expect_err("syntax error");
    println!("{errs:?}");
    assert_eq!(errs[0].path, "spec.steps[0].map");
    assert_eq!(errs[0].line, 2);
}

#[test]
fn an_unknown_variable_is_a_compile_error_with_its_position() {
    let s = spec(json!({
        "steps": [{"filter": "value > 1"}, {"map": "value * scale"}],
        "sinks": [{"alert": {"when": "tags.exists(k, k == 'x') && temp > 3", "message": "m"}}]
    }));
    let errs = CompiledRule::compile(&s).expect_err("unknown variables");
    println!("{errs:?}");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0].path, "spec.steps[1].map");
    assert_eq!((errs[0].line, errs[0].column), (1, 9));
    assert!(errs[0].message.contains("'scale'"), "{}", errs[0].message);
    assert_eq!(errs[1].path, "spec.sinks[0].alert.when");
    assert_eq!((errs[1].line, errs[1].column), (1, 29));
    assert!(errs[1].message.contains("'temp'"));
}

#[test]
fn every_variable_and_macro_variables_compile() {
    let s = spec(json!({
        "steps": [
            {"filter": "quality == 'good' && metric.startsWith('t') && ts > 0 && has(tags.device)"},
            {"filter": "tags.all(k, tags[k] != '') && [1, 2].map(x, x * 2).size() == 2 && type(value) == double"},
            {"map": "value * 2.0"}
        ],
        "sinks": [{"alert": {"when": "value > 3.0", "message": "{metric} is {value}"}}]
    }));
    CompiledRule::compile(&s).expect("compiles");
    assert!(compile_errors(&s).is_empty());
}

#[test]
fn all_errors_are_reported_not_only_the_first() {
    let s = spec(json!({
        "steps": [
            {"filter": "("},
            {"window": {"size": "ten seconds"}},
            {"window": {"type": "sliding", "size": "10s", "every": "20s"}},
            {"deadband": -1.0}
        ],
        "sinks": [{"cloud": {"priority": 12}}]
    }));
    let lines = compile_errors(&s);
    for want in [
        "spec.steps[0].filter: 1:",
        "spec.steps[1].window.size: 1:1: invalid duration",
        "spec.steps[2].window.every: 1:1: must be <= size",
        "spec.steps[3].deadband: 1:1: must be a finite number",
        "spec.sinks[0].cloud.priority: 1:1: must be 0-9",
    ] {
        assert!(lines.iter().any(|l| l.starts_with(want)), "{want} not in {lines:#?}");
    }
}
