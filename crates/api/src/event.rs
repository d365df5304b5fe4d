//! Events: what alert rules raise in the cloud. One Event object per rule,
//! node and series; it is Firing while the rule's condition holds there and
//! Resolved after, and counts how many times it started firing — the
//! deduplication users see (one object, not one per reading).
//!
//! Events are written by the cloud from edge reports, never applied.

use serde::{Deserialize, Serialize};

use crate::kinds::{KindOf, Object};
use crate::meta::Kind;
use crate::rule::Severity;

/// An alert raised by a rule.
pub type Event = Object<EventSpec, EventStatus>;

/// What the event is about.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSpec {
    /// The rule whose alert sink raised it.
    #[serde(default)]
    pub rule: String,
    /// The node the rule ran on.
    #[serde(default)]
    pub node: String,
    /// The series (`metric{tag="v",…}`) the condition held for.
    #[serde(default)]
    pub series: String,
    /// Severity.
    #[serde(default)]
    pub severity: Severity,
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum EventState {
    /// The condition holds.
    #[default]
    Firing,
    /// The condition stopped holding.
    Resolved,
}

/// What happened, and when.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventStatus {
    /// Firing or Resolved.
    #[serde(default)]
    pub state: EventState,
    /// The message of the latest report, filled in.
    #[serde(default)]
    pub message: String,
    /// The value that changed the state.
    #[serde(default)]
    pub value: serde_json::Value,
    /// How many times the condition started holding.
    #[serde(default)]
    pub count: u64,
    /// When it first fired (RFC 3339, edge time).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub first_timestamp: String,
    /// When the latest episode started (RFC 3339, edge time).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub firing_since: String,
    /// When the latest episode ended (RFC 3339, edge time); empty while firing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resolved_timestamp: String,
    /// The latest episode's start in Unix ms (to recognise its reports).
    #[serde(default)]
    pub since_ms: i64,
    /// Sequence number of the node's last report applied (older reports,
    /// from an earlier connection, are ignored).
    #[serde(default)]
    pub observed_seq: u64,
}

impl KindOf for EventSpec {
    type Status = EventStatus;
    const KIND: Kind = Kind::Event;
}
