//! Running a compiled rule: a sans-IO state machine. The caller pushes
//! records with the current processing time, calls [`RuleRunner::tick`]
//! now and then (every second is plenty), and carries out the
//! [`Output`]s; the runner reads no clock and does no I/O.
//!
//! A record goes through the steps in order; a window step holds it and
//! later emits one record per closed window, which continues with the step
//! after the window. What comes out of the last step goes to every sink.
//!
//! Nothing a record carries stops the rule: an expression that fails on a
//! record, a value a window cannot aggregate, a topic that cannot be filled
//! in, are counted in [`RuleStats::errors`] with a sample in
//! [`RuleStats::last_error`], and that record goes no further.
//!
//! # Alerts
//!
//! An alert sink keeps the set of series for which its condition holds. A
//! record of a series not in the set for which `when` is true gives one
//! `Output::Alert { firing: true }`; a record of a series in the set for
//! which `when` is false gives one `firing: false` (resolved). Records in
//! between give nothing. A `when` that fails to evaluate leaves the state
//! as it was.
//!
//! # Memory
//!
//! Every per-series state (window series, deadband series, firing alerts)
//! is capped by [`RunnerConfig::max_series`] per step or sink, and open
//! windows by [`RunnerConfig::max_windows`] per window step; what a cap
//! refuses is counted in [`RuleStats::dropped`].

use std::collections::{HashMap, HashSet};

use yunbian_api::rule::Severity;

use crate::compile::{CompiledRule, Sink, Step};
use crate::record::{Record, Value};
use crate::series::SeriesKey;
use crate::window::{needs_number, PushOutcome, WindowLimits, WindowStep};

/// Event times must be within ±2^60 ms of the epoch (± 36 million years);
/// others are errors, so window arithmetic cannot overflow.
pub const MAX_ABS_TS_MS: i64 = 1 << 60;

/// Most bytes kept of [`RuleStats::last_error`].
pub const LAST_ERROR_MAX: usize = 512;

/// Limits and timings of a runner.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Most series each stateful step (window, deadband) or alert sink
    /// tracks.
    pub max_series: usize,
    /// Most open windows per window step, all series together.
    pub max_windows: usize,
    /// Processing-time grace before `tick` closes a quiet series' window
    /// (after its end plus lateness), ms.
    pub grace_ms: i64,
    /// Series with no open window (windows) or no record (deadband) for
    /// this long are forgotten on `tick`, ms.
    pub evict_after_ms: i64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig { max_series: 10_000, max_windows: 100_000, grace_ms: 2_000, evict_after_ms: 3_600_000 }
    }
}

/// Counters of a runner since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Records pushed.
    pub records_in: u64,
    /// Records that reached the sinks (after the last step).
    pub records_out: u64,
    /// Records an expression, aggregate or sink failed on.
    pub errors: u64,
    /// Records dropped by a window because every window covering them had
    /// closed.
    pub late: u64,
    /// Records (or alerts) refused because a memory cap was reached.
    pub dropped: u64,
    /// The latest error: where, what, and the record (at most
    /// [`LAST_ERROR_MAX`] bytes).
    pub last_error: String,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Append a point to the edge time-series store.
    Tsdb {
        /// Metric name.
        metric: String,
        /// Tags.
        tags: std::collections::BTreeMap<String, String>,
        /// Timestamp, Unix ms.
        ts_ms: i64,
        /// Value.
        value: Value,
    },
    /// Publish on the edge bus.
    Mqtt {
        /// Topic, filled in.
        topic: String,
        /// JSON `{"value","ts","metric","tags"}`.
        payload: Vec<u8>,
        /// Retain flag.
        retain: bool,
    },
    /// Put into the store-and-forward outbox.
    Cloud {
        /// Outbox priority (0–9).
        priority: u8,
        /// The record.
        record: Record,
    },
    /// Raise (`firing`) or resolve an alert.
    Alert {
        /// Identity, unique within the rule: `sinks[i]:metric{tags}`.
        key: String,
        /// True when the condition started holding, false when it stopped.
        firing: bool,
        /// Severity.
        severity: Severity,
        /// Message, filled in.
        message: String,
        /// The record that changed the state.
        record: Record,
    },
}

#[derive(Debug)]
enum StepState {
    Stateless,
    Window(WindowStep),
    Deadband(HashMap<SeriesKey, (Value, i64)>),
}

/// Mutable state, apart from the compiled rule so both can be borrowed.
#[derive(Debug)]
struct State {
    config: RunnerConfig,
    steps: Vec<StepState>,
    /// Firing series per sink (empty for sinks that are not alerts).
    firing: Vec<HashSet<SeriesKey>>,
    stats: RuleStats,
}

/// Runs one compiled rule.
#[derive(Debug)]
pub struct RuleRunner {
    rule: CompiledRule,
    state: State,
}

impl RuleRunner {
    /// A runner with the default limits.
    pub fn new(rule: CompiledRule) -> Self {
        Self::with_config(rule, RunnerConfig::default())
    }

    /// A runner with the given limits.
    pub fn with_config(rule: CompiledRule, config: RunnerConfig) -> Self {
        let config =
            RunnerConfig { grace_ms: config.grace_ms.max(0), evict_after_ms: config.evict_after_ms.max(0), ..config };
        let limits = WindowLimits {
            max_series: config.max_series,
            max_windows: config.max_windows,
            grace_ms: config.grace_ms,
            evict_after_ms: config.evict_after_ms,
        };
        let steps = rule
            .steps
            .iter()
            .map(|s| match s {
                Step::Window(shape) => StepState::Window(WindowStep::new(*shape, limits)),
                Step::Deadband(_) => StepState::Deadband(HashMap::new()),
                _ => StepState::Stateless,
            })
            .collect();
        let firing = rule.sinks.iter().map(|_| HashSet::new()).collect();
        RuleRunner { rule, state: State { config, steps, firing, stats: RuleStats::default() } }
    }

    /// The compiled rule.
    pub fn rule(&self) -> &CompiledRule {
        &self.rule
    }

    /// Counters so far.
    pub fn stats(&self) -> RuleStats {
        self.state.stats.clone()
    }

    /// Marks `series` as firing in alert sink `sink` (state restored after a
    /// restart: the next record of the series for which the condition does
    /// not hold resolves it). False when `sink` is not an alert sink or its
    /// series cap is reached.
    pub fn restore_firing(&mut self, sink: usize, series: SeriesKey) -> bool {
        if !matches!(self.rule.sinks.get(sink), Some(Sink::Alert { .. })) {
            return false;
        }
        let cap = self.state.config.max_series;
        match self.state.firing.get_mut(sink) {
            Some(f) if f.len() < cap || f.contains(&series) => {
                f.insert(series);
                true
            }
            _ => false,
        }
    }

    /// Series tracked by the stateful step at `index` (0 for stateless steps).
    pub fn series_in_step(&self, index: usize) -> usize {
        match self.state.steps.get(index) {
            Some(StepState::Window(w)) => w.series_count(),
            Some(StepState::Deadband(d)) => d.len(),
            _ => 0,
        }
    }

    /// Open windows of the window step at `index` (0 for other steps).
    pub fn open_windows(&self, index: usize) -> usize {
        match self.state.steps.get(index) {
            Some(StepState::Window(w)) => w.open_windows(),
            _ => 0,
        }
    }

    /// Takes one record from the source at processing time `now_ms`.
    pub fn push(&mut self, record: Record, now_ms: i64) -> Vec<Output> {
        let mut out = Vec::new();
        self.state.stats.records_in += 1;
        if !(-MAX_ABS_TS_MS..=MAX_ABS_TS_MS).contains(&record.ts_ms) {
            self.state.error("source", "ts out of range (more than 2^60 ms from the epoch)", &record);
            return out;
        }
        run(&self.rule, &mut self.state, record, 0, now_ms, &mut out);
        out
    }

    /// Advances processing time to `now_ms`: closes the windows of quiet
    /// series and forgets idle state (see [`crate::window`]).
    pub fn tick(&mut self, now_ms: i64) -> Vec<Output> {
        let mut out = Vec::new();
        let evict = self.state.config.evict_after_ms;
        for i in 0..self.rule.steps.len() {
            let emitted = match &mut self.state.steps[i] {
                StepState::Window(w) => w.tick(now_ms),
                StepState::Deadband(d) => {
                    d.retain(|_, (_, seen)| now_ms.saturating_sub(*seen) <= evict);
                    continue;
                }
                StepState::Stateless => continue,
            };
            for r in emitted {
                run(&self.rule, &mut self.state, r, i + 1, now_ms, &mut out);
            }
        }
        out
    }
}

impl State {
    fn error(&mut self, path: &str, message: impl std::fmt::Display, record: &Record) {
        self.stats.errors += 1;
        let mut s = format!("{path}: {message}; record: {record}");
        if s.len() > LAST_ERROR_MAX {
            let mut cut = LAST_ERROR_MAX - 3;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        self.stats.last_error = s;
    }
}

/// Runs `rec` through the steps from `from` on, then the sinks.
fn run(rule: &CompiledRule, st: &mut State, mut rec: Record, from: usize, now: i64, out: &mut Vec<Output>) {
    for i in from..rule.steps.len() {
        match &rule.steps[i] {
            Step::Filter(e) => match e.eval_bool(&rec) {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) => return st.error(&format!("spec.steps[{i}].filter"), err, &rec),
            },
            Step::Map(e) => match e.eval(&rec) {
                Ok(v) => rec.value = v,
                Err(err) => return st.error(&format!("spec.steps[{i}].map"), err, &rec),
            },
            Step::Window(_) => {
                let StepState::Window(w) = &mut st.steps[i] else { return };
                if needs_number(w.aggregate()) && rec.value.as_f64().is_none() {
                    let msg = format!("aggregate needs a number, got {}", rec.value.type_name());
                    return st.error(&format!("spec.steps[{i}].window"), msg, &rec);
                }
                let (outcome, emitted) = w.push(rec, now);
                match outcome {
                    PushOutcome::Accepted => {}
                    PushOutcome::Late => st.stats.late += 1,
                    PushOutcome::Refused => st.stats.dropped += 1,
                    PushOutcome::NotNumeric(_) => st.stats.errors += 1,
                }
                for r in emitted {
                    run(rule, st, r, i + 1, now, out);
                }
                return;
            }
            Step::Deadband(band) => {
                let max_series = st.config.max_series;
                let StepState::Deadband(seen) = &mut st.steps[i] else { return };
                let key = SeriesKey::of(&rec);
                match seen.get_mut(&key) {
                    Some((last, at)) => {
                        *at = now;
                        let moved = match (last.as_f64(), rec.value.as_f64()) {
                            (Some(a), Some(b)) => (b - a).abs() > *band || (a.is_nan() != b.is_nan()),
                            _ => *last != rec.value,
                        };
                        if !moved {
                            return;
                        }
                        *last = rec.value.clone();
                    }
                    None => {
                        if seen.len() >= max_series {
                            st.stats.dropped += 1;
                            return;
                        }
                        seen.insert(key, (rec.value.clone(), now));
                    }
                }
            }
            Step::Rename(name) => rec.metric.clone_from(name),
            Step::Tag(tags) => {
                for (k, v) in tags {
                    rec.tags.insert(k.clone(), v.clone());
                }
            }
        }
    }
    sink(rule, st, rec, out);
}

fn sink(rule: &CompiledRule, st: &mut State, rec: Record, out: &mut Vec<Output>) {
    st.stats.records_out += 1;
    let n = rule.sinks.len();
    let mut rec = Some(rec);
    for (i, s) in rule.sinks.iter().enumerate() {
        // The last sink takes the record, the others a copy.
        let r = if i + 1 == n { rec.take() } else { rec.clone() };
        let Some(r) = r else { return };
        match s {
            Sink::Tsdb { metric } => out.push(Output::Tsdb {
                metric: metric.clone().unwrap_or(r.metric),
                tags: r.tags,
                ts_ms: r.ts_ms,
                value: r.value,
            }),
            Sink::Mqtt { topic, retain } => match render_topic(topic, &r) {
                Ok(topic) => {
                    let payload = serde_json::to_vec(&r.to_json()).unwrap_or_default();
                    out.push(Output::Mqtt { topic, payload, retain: *retain });
                }
                Err(m) => st.error(&format!("spec.sinks[{i}].mqtt.topic"), m, &r),
            },
            Sink::Cloud { priority } => out.push(Output::Cloud { priority: *priority, record: r }),
            Sink::Alert { when, severity, message } => {
                let holds = match when {
                    None => true,
                    Some(e) => match e.eval_bool(&r) {
                        Ok(b) => b,
                        Err(err) => {
                            st.error(&format!("spec.sinks[{i}].alert.when"), err, &r);
                            continue;
                        }
                    },
                };
                let max_series = st.config.max_series;
                let Some(firing) = st.firing.get_mut(i) else { continue };
                let key = SeriesKey::of(&r);
                let change = if holds && !firing.contains(&key) {
                    if firing.len() >= max_series {
                        st.stats.dropped += 1;
                        continue;
                    }
                    firing.insert(key);
                    true
                } else {
                    !holds && firing.remove(&key)
                };
                if change {
                    out.push(Output::Alert {
                        key: format!("sinks[{i}]:{}", r.series_name()),
                        firing: holds,
                        severity: *severity,
                        message: render_message(message, &r),
                        record: r,
                    });
                }
            }
        }
    }
}

/// Fills `{value}`, `{metric}`, `{ts}`, `{quality}` and `{tags.NAME}` in;
/// `missing` decides what a tag the record lacks becomes.
fn render(
    template: &str,
    r: &Record,
    missing: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut s = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        s.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            s.push_str(&rest[open..]);
            return Ok(s);
        };
        let name = &after[..close];
        match name {
            "value" => s.push_str(&r.value.to_string()),
            "metric" => s.push_str(&r.metric),
            "ts" => s.push_str(&r.ts_ms.to_string()),
            "quality" => s.push_str(r.quality.as_str()),
            _ => match name.strip_prefix("tags.") {
                Some(tag) => match r.tags.get(tag) {
                    Some(v) => s.push_str(v),
                    None => s.push_str(&missing(tag)?),
                },
                None => {
                    s.push('{');
                    s.push_str(name);
                    s.push('}');
                }
            },
        }
        rest = &after[close + 1..];
    }
    s.push_str(rest);
    Ok(s)
}

/// An alert message: a tag the record lacks becomes empty.
fn render_message(template: &str, r: &Record) -> String {
    render(template, r, &mut |_| Ok(String::new())).unwrap_or_default()
}

/// An MQTT topic: a tag the record lacks, or a filled-in topic that is not a
/// valid topic name, is an error.
fn render_topic(template: &str, r: &Record) -> Result<String, String> {
    let t = render(template, r, &mut |tag| Err(format!("record has no tag {tag:?}")))?;
    if t.is_empty() || t.len() > 65_535 || t.contains(['+', '#', '\0']) {
        return Err(format!("filled-in topic {t:?} is not a valid topic name"));
    }
    Ok(t)
}
