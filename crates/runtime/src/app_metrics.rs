//! Metrics that apps report about themselves (`queue_depth: 17`), kept per
//! instance until the runtime folds them into the instance's
//! [`InstanceUsage`](yunbian_api::InstanceUsage) for autoscaling.
//!
//! An app posts a flat JSON object of numbers to the agent's local API
//! (`POST /v1/instances/{instance}/metrics`); [`MetricsReport::parse`]
//! turns the body into names and values that cannot be wrong, and
//! [`AppMetrics::record`] stores them. The runtime reads the live values
//! with [`AppMetrics::current`].
//!
//! Rules:
//! - a body is at most [`MAX_BODY_BYTES`] and names at most
//!   [`MAX_METRICS`] metrics;
//! - a name is 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_.:-]`;
//! - a value is a finite JSON number;
//! - the latest value of each metric wins; a metric not reported for
//!   [`METRIC_TTL`] is dropped; an instance holds at most [`MAX_METRICS`]
//!   live metrics (a report that would exceed it is refused whole);
//! - only instances the runtime knows ([`AppMetrics::track`]) accept
//!   reports; forgetting an instance drops its metrics.
//!
//! Time is passed in (`now`), so the expiry is tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest accepted report body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most metrics in one report, and most live metrics per instance.
pub const MAX_METRICS: usize = 32;
/// Longest metric name.
pub const MAX_NAME_LEN: usize = 64;
/// A metric not reported again within this time is dropped.
pub const METRIC_TTL: Duration = Duration::from_secs(60);

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// The runtime does not know the instance.
    #[error("instance {0:?} is not known on this node")]
    UnknownInstance(String),
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("body is {0} bytes; at most {MAX_BODY_BYTES} are accepted")]
    TooLarge(usize),
    /// The body is not a JSON object.
    #[error("body must be a JSON object of metric names to numbers: {0}")]
    NotAnObject(String),
    /// More than [`MAX_METRICS`] metrics (in the report, or live for the
    /// instance once it would be recorded).
    #[error("{0} metrics; at most {MAX_METRICS} per instance")]
    TooMany(usize),
    /// A name outside `[A-Za-z0-9_.:-]{1,64}`.
    #[error("metric name {0:?} is invalid: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . : -")]
    BadName(String),
    /// A value that is not a finite number.
    #[error("metric {name:?}: {value} is not a finite number")]
    BadValue {
        /// The metric.
        name: String,
        /// The JSON it was given.
        value: String,
    },
}

impl MetricsError {
    /// Whether the error is about the instance rather than the body (an
    /// HTTP API answers 404 instead of 400).
    pub fn is_unknown_instance(&self) -> bool {
        matches!(self, MetricsError::UnknownInstance(_))
    }
}

/// A metric name that satisfies `[A-Za-z0-9_.:-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricName(String);

impl MetricName {
    /// Checks `name`.
    pub fn parse(name: &str) -> Result<MetricName, MetricsError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(MetricName(name.to_string()))
        } else {
            // Never echo an unbounded name back.
            let shown: String = name.chars().take(MAX_NAME_LEN + 1).collect();
            Err(MetricsError::BadName(shown))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One parsed report: valid names and finite values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsReport {
    values: Vec<(MetricName, f64)>,
}

impl MetricsReport {
    /// Parses a report body: `{"queue_depth": 17, "rps": 230.5}`.
    pub fn parse(body: &[u8]) -> Result<MetricsReport, MetricsError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(MetricsError::TooLarge(body.len()));
        }
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| MetricsError::NotAnObject(e.to_string()))?;
        if map.len() > MAX_METRICS {
            return Err(MetricsError::TooMany(map.len()));
        }
        let mut values = Vec::with_capacity(map.len());
        for (name, value) in map {
            let name = MetricName::parse(&name)?;
            let v = value.as_f64().filter(|v| v.is_finite()).ok_or_else(|| {
                let mut shown = value.to_string();
                shown.truncate(64);
                MetricsError::BadValue { name: name.0.clone(), value: shown }
            })?;
            values.push((name, v));
        }
        values.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(MetricsReport { values })
    }

    /// The metrics, by name.
    pub fn values(&self) -> &[(MetricName, f64)] {
        &self.values
    }

    /// Number of metrics.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the report names no metric.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The live metrics of one instance: value and when it was reported.
#[derive(Debug, Default)]
struct InstanceMetrics {
    values: BTreeMap<String, (f64, Instant)>,
}

impl InstanceMetrics {
    fn expire(&mut self, now: Instant) {
        self.values.retain(|_, (_, at)| now.saturating_duration_since(*at) < METRIC_TTL);
    }
}

/// The metrics apps report, shared by the agent's local API (which records
/// them) and the runtime (which reads them). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AppMetrics {
    inner: Arc<Mutex<HashMap<String, InstanceMetrics>>>,
}

impl AppMetrics {
    /// An empty registry (no instance known).
    pub fn new() -> AppMetrics {
        AppMetrics::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, InstanceMetrics>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime knows `instance`: reports for it are accepted.
    pub fn track(&self, instance: &str) {
        let mut map = self.lock();
        if !map.contains_key(instance) {
            map.insert(instance.to_string(), InstanceMetrics::default());
        }
    }

    /// The runtime forgot `instance`: its metrics are dropped and reports
    /// for it refused.
    pub fn untrack(&self, instance: &str) {
        self.lock().remove(instance);
    }

    /// Whether reports for `instance` are accepted.
    pub fn is_tracked(&self, instance: &str) -> bool {
        self.lock().contains_key(instance)
    }

    /// Records a report for `instance` at `now`. Refused whole when the
    /// instance is unknown or it would hold more than [`MAX_METRICS`] live
    /// metrics.
    pub fn record(&self, instance: &str, report: &MetricsReport, now: Instant) -> Result<(), MetricsError> {
        let mut map = self.lock();
        let metrics = map.get_mut(instance).ok_or_else(|| MetricsError::UnknownInstance(instance.to_string()))?;
        metrics.expire(now);
        let added = report.values.iter().filter(|(n, _)| !metrics.values.contains_key(n.as_str())).count();
        if metrics.values.len() + added > MAX_METRICS {
            return Err(MetricsError::TooMany(metrics.values.len() + added));
        }
        for (name, value) in &report.values {
            metrics.values.insert(name.0.clone(), (*value, now));
        }
        Ok(())
    }

    /// The live metrics of `instance` at `now` (empty when unknown);
    /// metrics older than [`METRIC_TTL`] are dropped on the way.
    pub fn current(&self, instance: &str, now: Instant) -> BTreeMap<String, f64> {
        let mut map = self.lock();
        let Some(metrics) = map.get_mut(instance) else { return BTreeMap::new() };
        metrics.expire(now);
        metrics.values.iter().map(|(k, (v, _))| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_reports() {
        let r = MetricsReport::parse(br#"{"queue_depth": 17, "rps": 230.5, "a.b:c-d_E9": -1e3}"#).expect("valid");
        let got: Vec<(&str, f64)> = r.values().iter().map(|(n, v)| (n.as_str(), *v)).collect();
        assert_eq!(got, vec![("a.b:c-d_E9", -1000.0), ("queue_depth", 17.0), ("rps", 230.5)]);
        assert!(MetricsReport::parse(b"{}").expect("empty object").is_empty());
    }

    #[test]
    fn refuses_bad_reports() {
        let bad = |body: &[u8]| MetricsReport::parse(body).expect_err("must be refused");
        assert!(matches!(bad(b""), MetricsError::NotAnObject(_)));
        assert!(matches!(bad(b"[1,2]"), MetricsError::NotAnObject(_)));
        assert!(matches!(bad(br#"{"x": NaN}"#), MetricsError::NotAnObject(_)));
        assert!(matches!(bad(br#"{"x": 1e999}"#), MetricsError::NotAnObject(_)));
        assert_eq!(bad(br#"{"x": "NaN"}"#), MetricsError::BadValue { name: "x".into(), value: "\"NaN\"".into() });
        assert!(matches!(bad(br#"{"x": null}"#), MetricsError::BadValue { .. }));
        assert!(matches!(bad(br#"{"x": {"y": 1}}"#), MetricsError::BadValue { .. }));
        assert_eq!(bad(br#"{"a b": 1}"#), MetricsError::BadName("a b".into()));
        assert_eq!(bad(br#"{"": 1}"#), MetricsError::BadName(String::new()));
        assert!(matches!(bad("{\"é\": 1}".as_bytes()), MetricsError::BadName(_)));
        let long = format!(r#"{{"{}": 1}}"#, "x".repeat(MAX_NAME_LEN + 1));
        assert!(matches!(bad(long.as_bytes()), MetricsError::BadName(_)));
        let ok_len = format!(r#"{{"{}": 1}}"#, "x".repeat(MAX_NAME_LEN));
        assert!(MetricsReport::parse(ok_len.as_bytes()).is_ok());
        let many: Vec<String> = (0..=MAX_METRICS).map(|i| format!("\"m{i}\": {i}")).collect();
        let many = format!("{{{}}}", many.join(","));
        assert_eq!(bad(many.as_bytes()), MetricsError::TooMany(MAX_METRICS + 1));
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(bad(&huge), MetricsError::TooLarge(MAX_BODY_BYTES + 1));
    }

    #[test]
    fn keeps_latest_values_of_tracked_instances_and_expires_them() {
        let m = AppMetrics::new();
        let t0 = Instant::now();
        let report = |body: &str| MetricsReport::parse(body.as_bytes()).expect("valid");
        assert!(m.record("a", &report(r#"{"q": 1}"#), t0).expect_err("unknown").is_unknown_instance());
        m.track("a");
        m.record("a", &report(r#"{"q": 1, "r": 2}"#), t0).expect("record");
        m.record("a", &report(r#"{"q": 5}"#), t0 + Duration::from_secs(30)).expect("record");
        let now = m.current("a", t0 + Duration::from_secs(40));
        assert_eq!(now, BTreeMap::from([("q".to_string(), 5.0), ("r".to_string(), 2.0)]));
        // `r` was last reported at t0: gone after the TTL; `q` stays.
        let later = m.current("a", t0 + METRIC_TTL + Duration::from_secs(1));
        assert_eq!(later, BTreeMap::from([("q".to_string(), 5.0)]));
        assert!(m.current("a", t0 + Duration::from_secs(30) + METRIC_TTL).is_empty());
        m.untrack("a");
        assert!(!m.is_tracked("a"));
        assert!(m.current("a", t0).is_empty());
    }

    #[test]
    fn caps_live_metrics_per_instance() {
        let m = AppMetrics::new();
        m.track("a");
        let t0 = Instant::now();
        let body = |from: usize, n: usize| {
            let parts: Vec<String> = (from..from + n).map(|i| format!("\"m{i}\": {i}")).collect();
            MetricsReport::parse(format!("{{{}}}", parts.join(",")).as_bytes()).expect("valid")
        };
        m.record("a", &body(0, 30), t0).expect("30 metrics");
        assert_eq!(m.record("a", &body(30, 3), t0), Err(MetricsError::TooMany(33)));
        assert_eq!(m.current("a", t0).len(), 30, "a refused report changes nothing");
        m.record("a", &body(28, 4), t0).expect("2 updated, 2 new");
        // Once the old ones expire there is room again.
        m.record("a", &body(100, 3), t0 + METRIC_TTL).expect("after expiry");
        assert_eq!(m.current("a", t0 + METRIC_TTL).len(), 3);
    }
}
