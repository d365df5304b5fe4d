//! Window aggregation, per series, by event time — a state machine driven
//! by records and `now`, with no clock of its own.
//!
//! # Windows
//!
//! A window step of size `S` and period `E` (`E = S` for tumbling windows)
//! has windows starting at every multiple of `E` since the Unix epoch; each
//! covers the **half-open** interval `[start, start + S)`. A record at
//! exactly `start + S` belongs to the next window, not this one. A record
//! belongs to every window that covers it: one for tumbling windows, `S / E`
//! (rounded up or down by alignment) for sliding windows.
//!
//! # Closing
//!
//! Each series (metric + tags) has its own watermark: the greatest event
//! time seen minus `lateness`. Every window whose end is at or before the
//! series' *closed-until* mark is closed; the mark only moves forward, by:
//! - event time, on every record: to the watermark;
//! - processing time, on [`WindowStep::tick`]: to
//!   `max_ts + (now - arrived) - lateness - grace`, where `arrived` is the
//!   processing time at which `max_ts` was seen. So a series that stops
//!   sending still gets its windows closed: a window is emitted at the
//!   latest `grace` after its end plus lateness, counted on the processing
//!   clock from the moment the series last advanced. When the device clock
//!   agrees with ours this is "`end + lateness + grace <= now`"; a device
//!   whose clock is off by an hour is not penalized for it.
//!
//! A closed window emits one record (metric and tags of the series,
//! `ts` = the window's end, the aggregate as value, the worst quality seen)
//! and is forgotten. Windows that received no record emit nothing.
//!
//! # Late records
//!
//! A record is added to every window covering it that is still open. If
//! none is (all have ended at or before the closed-until mark), it is late
//! and dropped ([`PushOutcome::Late`]).
//!
//! # Memory
//!
//! At most `max_series` series and `max_windows` open windows per step; a
//! record that would need more is refused ([`PushOutcome::Refused`]). A
//! series with no open window that has sent nothing for `evict_after_ms` of
//! processing time is forgotten on `tick` (a record for it arriving later
//! starts afresh, so a very late record could then open a window that was
//! already emitted).

use std::collections::{BTreeMap, HashMap};

use yunbian_api::rule::Aggregate;

use crate::compile::WindowShape;
use crate::record::{Quality, Record, Value};
use crate::series::SeriesKey;

/// Limits of one window step.
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits {
    /// Most series tracked at once.
    pub max_series: usize,
    /// Most open windows, all series together.
    pub max_windows: usize,
    /// Processing-time grace before a quiet series' window is closed, ms.
    pub grace_ms: i64,
    /// A series with no open window is forgotten after this much quiet, ms.
    pub evict_after_ms: i64,
}

/// What became of a pushed record.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    /// Added to at least one open window.
    Accepted,
    /// Every window covering it had closed: dropped.
    Late,
    /// A memory cap was reached: dropped.
    Refused,
    /// The aggregate needs a number and the value is not one.
    NotNumeric(&'static str),
}

/// Running aggregate of one window.
#[derive(Debug, Clone)]
struct Acc {
    count: u64,
    sum: f64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    first: Option<(i64, Value)>,
    last: Option<(i64, Value)>,
    quality: Quality,
}

impl Acc {
    fn new() -> Self {
        Acc {
            count: 0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: None,
            last: None,
            quality: Quality::Good,
        }
    }

    fn add(&mut self, agg: Aggregate, ts: i64, value: &Value, x: f64, quality: Quality) {
        self.count += 1;
        self.quality = self.quality.max(quality);
        match agg {
            Aggregate::Avg | Aggregate::Sum => self.sum += x,
            Aggregate::Min => self.min = self.min.min(x),
            Aggregate::Max => self.max = self.max.max(x),
            Aggregate::Stddev => {
                // Welford's online algorithm.
                let d = x - self.mean;
                self.mean += d / self.count as f64;
                self.m2 += d * (x - self.mean);
            }
            Aggregate::First => {
                if self.first.as_ref().is_none_or(|(t, _)| ts < *t) {
                    self.first = Some((ts, value.clone()));
                }
            }
            Aggregate::Last => {
                if self.last.as_ref().is_none_or(|(t, _)| ts >= *t) {
                    self.last = Some((ts, value.clone()));
                }
            }
            Aggregate::Count => {}
        }
    }

    fn result(self, agg: Aggregate) -> Value {
        match agg {
            Aggregate::Avg => Value::F64(self.sum / self.count.max(1) as f64),
            Aggregate::Sum => Value::F64(self.sum),
            Aggregate::Min => Value::F64(self.min),
            Aggregate::Max => Value::F64(self.max),
            Aggregate::Count => Value::I64(i64::try_from(self.count).unwrap_or(i64::MAX)),
            Aggregate::Stddev => Value::F64((self.m2 / self.count.max(1) as f64).max(0.0).sqrt()),
            Aggregate::First => self.first.map_or(Value::F64(f64::NAN), |(_, v)| v),
            Aggregate::Last => self.last.map_or(Value::F64(f64::NAN), |(_, v)| v),
        }
    }
}

/// Whether `agg` needs numeric values.
pub fn needs_number(agg: Aggregate) -> bool {
    !matches!(agg, Aggregate::Count | Aggregate::First | Aggregate::Last)
}

#[derive(Debug)]
struct SeriesWindows {
    /// Greatest event time seen.
    max_ts: i64,
    /// Processing time at which `max_ts` was seen.
    arrived: i64,
    /// Processing time of the last record.
    last_seen: i64,
    /// Windows ending at or before this are closed.
    closed_until: i64,
    /// Open windows by start.
    windows: BTreeMap<i64, Acc>,
}

/// The state of one window step.
#[derive(Debug)]
pub struct WindowStep {
    shape: WindowShape,
    limits: WindowLimits,
    series: HashMap<SeriesKey, SeriesWindows>,
    open: usize,
}

impl WindowStep {
    /// A step with no series yet.
    pub fn new(shape: WindowShape, limits: WindowLimits) -> Self {
        WindowStep { shape, limits, series: HashMap::new(), open: 0 }
    }

    /// The step's aggregate.
    pub fn aggregate(&self) -> Aggregate {
        self.shape.aggregate
    }

    /// Series tracked.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Open windows, all series together.
    pub fn open_windows(&self) -> usize {
        self.open
    }

    /// Adds `record` (event time `record.ts_ms`, processing time `now`);
    /// returns what became of it and the records of the windows it closed.
    /// `record.ts_ms` must be within ±2^60 ms (the runner checks).
    pub fn push(&mut self, record: Record, now: i64) -> (PushOutcome, Vec<Record>) {
        let WindowShape { size_ms: size, every_ms: every, lateness_ms, aggregate } = self.shape;
        let x = match (needs_number(aggregate), record.value.as_f64()) {
            (true, None) => return (PushOutcome::NotNumeric(record.value.type_name()), Vec::new()),
            (_, x) => x.unwrap_or(0.0),
        };
        let ts = record.ts_ms;
        let Record { metric, tags, value, quality, .. } = record;
        let key = SeriesKey { metric, tags };
        let is_new = !self.series.contains_key(&key);
        if is_new && self.series.len() >= self.limits.max_series {
            return (PushOutcome::Refused, Vec::new());
        }
        if is_new {
            let fresh = SeriesWindows {
                max_ts: ts,
                arrived: now,
                last_seen: now,
                closed_until: i64::MIN,
                windows: BTreeMap::new(),
            };
            self.series.insert(key.clone(), fresh);
        }
        let Some(s) = self.series.get_mut(&key) else { return (PushOutcome::Refused, Vec::new()) };
        // Windows covering ts: starts k*every with start <= ts < start + size.
        let last_start = ts.div_euclid(every) * every;
        let first_start = (ts - size).div_euclid(every) * every + every;
        // The first of them still open: end > closed_until, i.e.
        // start >= closed_until - size + 1, rounded up to a window start
        // (in i128: closed_until may be far from ts).
        let min_open = i128::from(s.closed_until) - i128::from(size) + 1;
        let open_from = if min_open <= i128::from(first_start) {
            first_start
        } else {
            let e = i128::from(every);
            let f = i128::from(first_start);
            let up = f + (min_open - f + e - 1).div_euclid(e) * e;
            i64::try_from(up).unwrap_or(i64::MAX)
        };
        let outcome = if open_from > last_start {
            PushOutcome::Late
        } else {
            let mut missing = 0usize;
            let mut start = open_from;
            while start <= last_start {
                if !s.windows.contains_key(&start) {
                    missing += 1;
                }
                start += every;
            }
            if self.open + missing > self.limits.max_windows {
                if is_new {
                    // A refused record leaves no state behind.
                    self.series.remove(&key);
                    return (PushOutcome::Refused, Vec::new());
                }
                PushOutcome::Refused
            } else {
                let mut start = open_from;
                while start <= last_start {
                    s.windows.entry(start).or_insert_with(Acc::new).add(aggregate, ts, &value, x, quality);
                    start += every;
                }
                self.open += missing;
                PushOutcome::Accepted
            }
        };
        s.last_seen = now;
        if ts > s.max_ts {
            s.max_ts = ts;
            s.arrived = now;
        }
        let mut out = Vec::new();
        let mark = s.max_ts - lateness_ms;
        if mark > s.closed_until {
            s.closed_until = mark;
            self.open -= close(s, &key, size, aggregate, &mut out);
        }
        (outcome, out)
    }

    /// Closes, by processing time, the windows of series that went quiet
    /// (see the module docs), forgets series idle for long, and returns the
    /// records of the closed windows ordered by end, then series.
    pub fn tick(&mut self, now: i64) -> Vec<Record> {
        let WindowShape { size_ms: size, lateness_ms, aggregate, .. } = self.shape;
        let mut out = Vec::new();
        let mut closed = 0;
        let grace = self.limits.grace_ms;
        let evict = self.limits.evict_after_ms;
        self.series.retain(|key, s| {
            let idle = now.saturating_sub(s.arrived).max(0);
            let mark = s.max_ts.saturating_add(idle).saturating_sub(lateness_ms).saturating_sub(grace);
            if mark > s.closed_until {
                s.closed_until = mark;
                closed += close(s, key, size, aggregate, &mut out);
            }
            !(s.windows.is_empty() && now.saturating_sub(s.last_seen) > evict)
        });
        self.open -= closed;
        out.sort_by(|a, b| (a.ts_ms, &a.metric, &a.tags).cmp(&(b.ts_ms, &b.metric, &b.tags)));
        out
    }
}

/// Emits and removes the windows of `s` that end at or before
/// `s.closed_until`; returns how many.
fn close(s: &mut SeriesWindows, key: &SeriesKey, size: i64, agg: Aggregate, out: &mut Vec<Record>) -> usize {
    // end = start + size <= closed_until  <=>  start <= closed_until - size
    let Some(limit) = s.closed_until.checked_sub(size) else { return 0 };
    let keep = match limit.checked_add(1) {
        Some(l) => s.windows.split_off(&l),
        None => BTreeMap::new(),
    };
    let done = std::mem::replace(&mut s.windows, keep);
    let n = done.len();
    for (start, acc) in done {
        let quality = acc.quality;
        out.push(Record {
            metric: key.metric.clone(),
            tags: key.tags.clone(),
            ts_ms: start + size,
            value: acc.result(agg),
            quality,
        });
    }
    n
}
