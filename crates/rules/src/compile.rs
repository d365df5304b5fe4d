//! Compiling a [`RuleSpec`] into a [`CompiledRule`]: CEL expressions parsed
//! and checked, durations parsed, windows turned into
//! [`WindowShape`]s. Structural checks (exactly one field per step, names,
//! topics) are `yunbian_api::validate`'s; compile reports what it cannot
//! run, with the field path and, for expressions, the position in the
//! expression. The cloud calls [`compile_errors`] at apply time.

use std::collections::BTreeMap;
use std::fmt;

use yunbian_api::rule::{Aggregate, RuleSpec, Severity, WindowKind};
use yunbian_api::time::parse_duration_ms;

use crate::expr::{ExprError, Expression};

/// A rule that can run: every expression compiled, every duration parsed.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Sinks.
    pub sinks: Vec<Sink>,
}

/// One compiled step.
#[derive(Debug, Clone)]
pub enum Step {
    /// Keep records for which the expression is true.
    Filter(Expression),
    /// Replace the value with the expression's result.
    Map(Expression),
    /// Aggregate per series and window.
    Window(WindowShape),
    /// Drop records that moved by no more than this since the last one passed.
    Deadband(f64),
    /// New metric name.
    Rename(String),
    /// Tags to add or replace.
    Tag(BTreeMap<String, String>),
}

/// Windows of `size_ms` starting every `every_ms` (equal for tumbling
/// windows), aligned to the Unix epoch; each covers the half-open interval
/// `[start, start + size_ms)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowShape {
    /// Window length, ms (> 0).
    pub size_ms: i64,
    /// Distance between window starts, ms (0 < every ≤ size).
    pub every_ms: i64,
    /// How far behind the newest event time a record may still be taken, ms.
    pub lateness_ms: i64,
    /// What comes out.
    pub aggregate: Aggregate,
}

/// One compiled sink.
#[derive(Debug, Clone)]
pub enum Sink {
    /// The edge time-series store; `metric` overrides the record's.
    Tsdb {
        /// Metric override (`None`: the record's).
        metric: Option<String>,
    },
    /// A topic on the edge bus.
    Mqtt {
        /// Topic template (`{metric}`, `{tags.NAME}`).
        topic: String,
        /// Retain flag.
        retain: bool,
    },
    /// Store-and-forward to the cloud.
    Cloud {
        /// Outbox priority (0–9).
        priority: u8,
    },
    /// An alert, deduplicated per series while `when` holds.
    Alert {
        /// Condition (`None`: always).
        when: Option<Expression>,
        /// Severity.
        severity: Severity,
        /// Message template (`{value}`, `{metric}`, `{tags.NAME}`).
        message: String,
    },
}

/// Something in a spec the engine cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {line}:{column}: {message}")]
pub struct CompileError {
    /// Field path, e.g. `spec.steps[2].filter`.
    pub path: String,
    /// 1-based line in the expression (1 for fields that are not expressions).
    pub line: u32,
    /// 1-based column in the expression, in characters (1 for fields that are
    /// not expressions).
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

impl CompileError {
    fn field(path: String, message: impl fmt::Display) -> Self {
        CompileError { path, line: 1, column: 1, message: message.to_string() }
    }

    fn expr(path: &str, e: ExprError) -> Self {
        CompileError { path: path.to_string(), line: e.line, column: e.column, message: e.message }
    }
}

/// Compiles `spec` and returns every error as one line
/// `spec.steps[0].filter: 1:9: message` (empty: the rule compiles). What the
/// cloud returns at apply time.
pub fn compile_errors(spec: &RuleSpec) -> Vec<String> {
    match CompiledRule::compile(spec) {
        Ok(_) => Vec::new(),
        Err(errs) => errs.iter().map(ToString::to_string).collect(),
    }
}

/// Longest window size, period or lateness: 2^50 ms (about 35,000 years),
/// so that window arithmetic on event times cannot overflow.
pub const MAX_DURATION_MS: i64 = 1 << 50;

fn duration(path: String, s: &str, min: i64, errs: &mut Vec<CompileError>) -> i64 {
    match parse_duration_ms(s) {
        Ok(ms) => match i64::try_from(ms) {
            Ok(ms) if ms >= min && ms <= MAX_DURATION_MS => ms,
            _ => {
                errs.push(CompileError::field(
                    path,
                    format!("must be a duration from {min}ms to 2^50 ms (35,000 years)"),
                ));
                0
            }
        },
        Err(m) => {
            errs.push(CompileError::field(path, m));
            0
        }
    }
}

impl CompiledRule {
    /// Compiles every step and sink of `spec`; all errors are returned, not
    /// only the first.
    pub fn compile(spec: &RuleSpec) -> Result<CompiledRule, Vec<CompileError>> {
        let mut errs = Vec::new();
        let mut steps = Vec::with_capacity(spec.steps.len());
        for (i, st) in spec.steps.iter().enumerate() {
            let p = format!("spec.steps[{i}]");
            let set = st.filter.is_some() as u8
                + st.map.is_some() as u8
                + st.window.is_some() as u8
                + st.deadband.is_some() as u8
                + st.rename.is_some() as u8
                + st.tag.is_some() as u8;
            if set != 1 {
                errs.push(CompileError::field(
                    p,
                    "exactly one of filter, map, window, deadband, rename, tag must be set",
                ));
                continue;
            }
            if let Some(src) = &st.filter {
                let path = format!("{p}.filter");
                match Expression::compile(src) {
                    Ok(e) => steps.push(Step::Filter(e)),
                    Err(es) => errs.extend(es.into_iter().map(|e| CompileError::expr(&path, e))),
                }
            } else if let Some(src) = &st.map {
                let path = format!("{p}.map");
                match Expression::compile(src) {
                    Ok(e) => steps.push(Step::Map(e)),
                    Err(es) => errs.extend(es.into_iter().map(|e| CompileError::expr(&path, e))),
                }
            } else if let Some(w) = &st.window {
                let before = errs.len();
                let size_ms = duration(format!("{p}.window.size"), &w.size, 1, &mut errs);
                let every_ms = match w.kind {
                    WindowKind::Tumbling => {
                        if !w.every.is_empty() {
                            errs.push(CompileError::field(
                                format!("{p}.window.every"),
                                "applies to sliding windows only",
                            ));
                        }
                        size_ms
                    }
                    WindowKind::Sliding => {
                        let every = duration(format!("{p}.window.every"), &w.every, 1, &mut errs);
                        if errs.len() == before && (every > size_ms || size_ms / every > 1_000) {
                            errs.push(CompileError::field(
                                format!("{p}.window.every"),
                                "must be <= size, with at most 1000 windows overlapping",
                            ));
                        }
                        every
                    }
                };
                let lateness_ms = if w.lateness.is_empty() {
                    0
                } else {
                    duration(format!("{p}.window.lateness"), &w.lateness, 0, &mut errs)
                };
                if errs.len() == before {
                    steps.push(Step::Window(WindowShape { size_ms, every_ms, lateness_ms, aggregate: w.aggregate }));
                }
            } else if let Some(d) = st.deadband {
                if d.is_finite() && d >= 0.0 {
                    steps.push(Step::Deadband(d));
                } else {
                    errs.push(CompileError::field(format!("{p}.deadband"), "must be a finite number >= 0"));
                }
            } else if let Some(r) = &st.rename {
                steps.push(Step::Rename(r.clone()));
            } else if let Some(t) = &st.tag {
                steps.push(Step::Tag(t.clone()));
            }
        }
        let mut sinks = Vec::with_capacity(spec.sinks.len());
        if spec.sinks.is_empty() {
            errs.push(CompileError::field("spec.sinks".into(), "at least one sink is required"));
        }
        for (i, sk) in spec.sinks.iter().enumerate() {
            let p = format!("spec.sinks[{i}]");
            let set =
                sk.tsdb.is_some() as u8 + sk.mqtt.is_some() as u8 + sk.cloud.is_some() as u8 + sk.alert.is_some() as u8;
            if set != 1 {
                errs.push(CompileError::field(p, "exactly one of tsdb, mqtt, cloud, alert must be set"));
                continue;
            }
            if let Some(t) = &sk.tsdb {
                sinks.push(Sink::Tsdb { metric: (!t.metric.is_empty()).then(|| t.metric.clone()) });
            } else if let Some(m) = &sk.mqtt {
                sinks.push(Sink::Mqtt { topic: m.topic.clone(), retain: m.retain });
            } else if let Some(c) = &sk.cloud {
                if c.priority > 9 {
                    errs.push(CompileError::field(format!("{p}.cloud.priority"), "must be 0-9"));
                }
                sinks.push(Sink::Cloud { priority: c.priority.min(9) });
            } else if let Some(a) = &sk.alert {
                let when = if a.when.trim().is_empty() {
                    None
                } else {
                    let path = format!("{p}.alert.when");
                    match Expression::compile(&a.when) {
                        Ok(e) => Some(e),
                        Err(es) => {
                            errs.extend(es.into_iter().map(|e| CompileError::expr(&path, e)));
                            None
                        }
                    }
                };
                sinks.push(Sink::Alert { when, severity: a.severity, message: a.message.clone() });
            }
        }
        if errs.is_empty() {
            Ok(CompiledRule { steps, sinks })
        } else {
            Err(errs)
        }
    }
}
