//! Records: what flows through a rule. A record is one reading of one
//! series — a metric plus a sorted set of tags — at an event time in Unix
//! milliseconds, with a scalar [`Value`] and a [`Quality`].

use std::collections::BTreeMap;
use std::fmt;

/// A scalar value: what a device property or a JSON payload carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A floating-point number.
    F64(f64),
    /// An integer.
    I64(i64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl Value {
    /// The value as a number, if it is one (`F64` or `I64`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::I64(v) => Some(*v as f64),
            Value::Bool(_) | Value::Str(_) => None,
        }
    }

    /// The name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::F64(_) => "double",
            Value::I64(_) => "int",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
        }
    }

    /// The value as JSON (a non-finite float becomes `null`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::from(self)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::F64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(v) => f.write_str(v),
        }
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I64(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

impl From<&Value> for serde_json::Value {
    fn from(v: &Value) -> Self {
        match v {
            Value::F64(x) => {
                serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Value::I64(x) => serde_json::Value::from(*x),
            Value::Bool(x) => serde_json::Value::Bool(*x),
            Value::Str(x) => serde_json::Value::String(x.clone()),
        }
    }
}

/// Why a JSON value is not a scalar [`Value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// JSON `null`, an array or an object.
    #[error("expected a number, bool or string, got {0}")]
    NotScalar(&'static str),
    /// An unsigned integer too large for i64 and not exactly a double.
    #[error("number {0} is out of range")]
    OutOfRange(String),
}

impl TryFrom<&serde_json::Value> for Value {
    type Error = ValueError;

    fn try_from(v: &serde_json::Value) -> Result<Self, Self::Error> {
        match v {
            serde_json::Value::Bool(b) => Ok(Value::Bool(*b)),
            serde_json::Value::String(s) => Ok(Value::Str(s.clone())),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(Value::I64(i))
                } else if let Some(f) = n.as_f64() {
                    Ok(Value::F64(f))
                } else {
                    Err(ValueError::OutOfRange(n.to_string()))
                }
            }
            serde_json::Value::Null => Err(ValueError::NotScalar("null")),
            serde_json::Value::Array(_) => Err(ValueError::NotScalar("an array")),
            serde_json::Value::Object(_) => Err(ValueError::NotScalar("an object")),
        }
    }
}

impl TryFrom<serde_json::Value> for Value {
    type Error = ValueError;

    fn try_from(v: serde_json::Value) -> Result<Self, Self::Error> {
        Value::try_from(&v)
    }
}

/// How much a reading can be trusted (OPC UA's three classes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quality {
    /// A valid reading.
    #[default]
    Good,
    /// A reading of doubtful accuracy.
    Uncertain,
    /// A reading known to be wrong (or missing).
    Bad,
}

impl Quality {
    /// The name CEL expressions see: `good`, `uncertain`, `bad`.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Uncertain => "uncertain",
            Quality::Bad => "bad",
        }
    }
}

/// One reading of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Metric name.
    pub metric: String,
    /// Tags (sorted); with the metric they name the series.
    pub tags: BTreeMap<String, String>,
    /// Event time, Unix milliseconds.
    pub ts_ms: i64,
    /// The reading.
    pub value: Value,
    /// How much it can be trusted.
    pub quality: Quality,
}

impl Record {
    /// A good-quality record without tags.
    pub fn new(metric: impl Into<String>, ts_ms: i64, value: impl Into<Value>) -> Self {
        Record { metric: metric.into(), tags: BTreeMap::new(), ts_ms, value: value.into(), quality: Quality::Good }
    }

    /// Adds (or replaces) a tag.
    pub fn with_tag(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(name.into(), value.into());
        self
    }

    /// Sets the quality.
    pub fn with_quality(mut self, quality: Quality) -> Self {
        self.quality = quality;
        self
    }

    /// The series name, Prometheus-style: `metric{a="1",b="2"}`.
    pub fn series_name(&self) -> String {
        let mut s = self.metric.clone();
        if !self.tags.is_empty() {
            s.push('{');
            for (i, (k, v)) in self.tags.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(k);
                s.push_str("=\"");
                s.push_str(v);
                s.push('"');
            }
            s.push('}');
        }
        s
    }

    /// The record as the JSON document MQTT sinks publish:
    /// `{"value", "ts", "metric", "tags"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let tags: serde_json::Map<String, serde_json::Value> =
            self.tags.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        serde_json::json!({
            "value": self.value.to_json(),
            "ts": self.ts_ms,
            "metric": self.metric,
            "tags": tags,
        })
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ts={} value={:?} quality={}", self.series_name(), self.ts_ms, self.value, self.quality.as_str())
    }
}
