//! Rules: stream processing on the edge. A `Rule` is placed on nodes by
//! selector (like an App) and runs on each: records come from a source
//! (device properties, or MQTT topics on the edge bus), pass through steps
//! (CEL `filter`/`map`, windows, deadband, rename, tag), and go to sinks (an
//! edge time series, an MQTT topic, the cloud through store-and-forward, an
//! alert raised in the cloud).
//!
//! The record a step sees, and the CEL variables it can use:
//! `value` (number, bool or string), `ts` (Unix ms), `metric` (string),
//! `tags` (map of strings; `tags.device`, `tags.property` for device
//! sources, `tags.topic` for MQTT sources), `quality` (`good`, `bad`,
//! `uncertain`).
//!
//! Structural checks are here ([`crate::validate`]); CEL expressions are
//! compiled by the rule engine, which the cloud runs at apply time so an
//! error comes back with its position.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kinds::{KindOf, Object};
use crate::meta::Kind;

/// A stream rule.
pub type Rule = Object<RuleSpec, RuleStatus>;

/// Intent for one rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Nodes whose labels contain all these pairs run the rule (empty: every node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Where records come from.
    pub source: RuleSource,
    /// Processing steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RuleStep>,
    /// Where records go (at least one).
    pub sinks: Vec<RuleSink>,
    /// Paused rules are kept but run nowhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Where a rule's records come from: exactly one of `devices`, `mqtt`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSource {
    /// Readings of device properties on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DeviceSource>,
    /// Messages on the edge bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSource>,
}

/// Device readings: devices chosen by name, model or labels (all given
/// conditions must hold; none given: every device on the node).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceSource {
    /// Device names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Device model names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Device labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Properties (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<String>,
}

/// Bus messages: a topic filter and where the value is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttSource {
    /// Topic filter (`+` and `#` allowed).
    pub topic: String,
    /// Where the value is in a JSON payload (empty: the whole payload).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub json_path: String,
    /// Metric name of the records (default: the topic).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metric: String,
    /// Where the reading's time is in a JSON payload, as Unix milliseconds
    /// or an RFC 3339 string (empty: the time the message arrived).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timestamp_path: String,
}

/// Window kinds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// Back-to-back windows of `size`.
    #[default]
    Tumbling,
    /// Windows of `size` starting every `every`.
    Sliding,
}

/// Aggregations of a window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Mean.
    #[default]
    Avg,
    /// Smallest.
    Min,
    /// Largest.
    Max,
    /// Sum.
    Sum,
    /// Number of records.
    Count,
    /// First by time.
    First,
    /// Last by time.
    Last,
    /// Population standard deviation.
    Stddev,
}

/// A window step: records are grouped by series (metric + tags) and
/// aggregated per window; one record per window and series comes out when
/// the window closes (by event time, after `lateness`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowStep {
    /// Tumbling or sliding.
    #[serde(default, rename = "type")]
    pub kind: WindowKind,
    /// Window length (`10s`).
    pub size: String,
    /// Sliding windows: how often one starts (`5s`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub every: String,
    /// What comes out.
    #[serde(default)]
    pub aggregate: Aggregate,
    /// How long after a window's end late records are still taken (default 0s).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lateness: String,
}

/// One processing step: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleStep {
    /// CEL boolean expression; records for which it is false are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// CEL expression whose result becomes the record's `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
    /// A window aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowStep>,
    /// Drop records whose value moved by no more than this since the last
    /// one passed (per series).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    /// New metric name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rename: Option<String>,
    /// Tags to add (or replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<BTreeMap<String, String>>,
}

/// Alert severity.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Needs attention.
    #[default]
    Warning,
    /// Needs action now.
    Critical,
}

/// Raise an Event in the cloud while `when` holds (deduplicated: one event
/// when it starts holding, one when it stops).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertSink {
    /// CEL boolean expression over the record (default `true`: every record
    /// reaching the sink holds).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub when: String,
    /// Severity.
    #[serde(default)]
    pub severity: Severity,
    /// Message; `{value}`, `{metric}` and `{tags.NAME}` are filled in.
    pub message: String,
}

/// One sink: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSink {
    /// Write to the edge time-series store (metric: the record's, or this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsdb: Option<TsdbSink>,
    /// Publish on the edge bus as `{"value", "ts", "metric", "tags"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSink>,
    /// Send to the cloud through the store-and-forward outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudSink>,
    /// Raise an alert in the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertSink>,
}

/// Edge time-series sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TsdbSink {
    /// Metric name override.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metric: String,
}

/// MQTT sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttSink {
    /// Topic (no wildcards); `{metric}` and `{tags.NAME}` are filled in.
    pub topic: String,
    /// Retain the message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain: bool,
}

/// Cloud (store-and-forward) sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudSink {
    /// Higher is kept longer when the outbox must drop (0–9, default 5).
    #[serde(default = "five")]
    pub priority: u8,
}

fn five() -> u8 {
    5
}

/// How a rule runs on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleNodeStatus {
    /// Records taken from the source.
    #[serde(default)]
    pub records_in: u64,
    /// Records written to sinks.
    #[serde(default)]
    pub records_out: u64,
    /// Records whose expression failed.
    #[serde(default)]
    pub errors: u64,
    /// One recent error, with the record it failed on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// Records per second over the last report period.
    #[serde(default)]
    pub rate: f64,
}

/// Observation of a rule: per node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleStatus {
    /// By node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, RuleNodeStatus>,
}

impl KindOf for RuleSpec {
    type Status = RuleStatus;
    const KIND: Kind = Kind::Rule;
}
