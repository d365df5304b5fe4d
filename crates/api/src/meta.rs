//! Object metadata and the closed set of kinds.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The only API version this build speaks.
pub const API_VERSION: &str = "yunbian.io/v1";

/// Metadata common to every object. The server owns `uid`,
/// `resourceVersion`, `generation` and `creationTimestamp`; values sent by a
/// client for them are ignored on create.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// DNS-label-like name, unique per kind.
    #[serde(default)]
    pub name: String,
    /// Identifying labels used by selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Unique id assigned at creation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Store revision of the last write to this object (0 = never stored).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resource_version: u64,
    /// Incremented on every change of `spec`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creation_timestamp: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Every kind of object the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// An enrolled edge machine.
    Node,
    /// A named set of nodes chosen by label selector.
    NodeGroup,
    /// A join token.
    Token,
    /// A replicated application.
    App,
    /// One replica of an App placed on one node.
    AppInstance,
    /// A kind of device: its properties.
    DeviceModel,
    /// One device attached to a node, with its twin.
    Device,
    /// A stream rule run on the edge.
    Rule,
    /// An alert raised by a rule (written by the cloud, never applied).
    Event,
    /// A published artifact: name, version, one blob per platform.
    Artifact,
}

impl Kind {
    /// All kinds, in a stable order.
    pub const ALL: [Kind; 10] = [
        Kind::Node,
        Kind::NodeGroup,
        Kind::Token,
        Kind::App,
        Kind::AppInstance,
        Kind::DeviceModel,
        Kind::Device,
        Kind::Rule,
        Kind::Event,
        Kind::Artifact,
    ];

    /// The plural path segment used by the REST API (`/v1/<plural>`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::NodeGroup => "nodegroups",
            Kind::Token => "tokens",
            Kind::App => "apps",
            Kind::AppInstance => "instances",
            Kind::DeviceModel => "devicemodels",
            Kind::Device => "devices",
            Kind::Rule => "rules",
            Kind::Event => "events",
            Kind::Artifact => "artifacts",
        }
    }

    /// The `kind:` string of manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::NodeGroup => "NodeGroup",
            Kind::Token => "Token",
            Kind::App => "App",
            Kind::AppInstance => "AppInstance",
            Kind::DeviceModel => "DeviceModel",
            Kind::Device => "Device",
            Kind::Rule => "Rule",
            Kind::Event => "Event",
            Kind::Artifact => "Artifact",
        }
    }

    /// Lower-case singular name used in messages (`app hello not found`).
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::NodeGroup => "nodegroup",
            Kind::Token => "token",
            Kind::App => "app",
            Kind::AppInstance => "instance",
            Kind::DeviceModel => "devicemodel",
            Kind::Device => "device",
            Kind::Rule => "rule",
            Kind::Event => "event",
            Kind::Artifact => "artifact",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a kind name nobody serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?} (known: nodes, nodegroups, tokens, apps, instances, devicemodels, devices, rules, events, artifacts)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the manifest name, the plural, the singular and short forms,
    /// case-insensitively: `App`, `apps`, `app`, `instances`, `inst`, `ng`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let k = match s.to_ascii_lowercase().as_str() {
            "node" | "nodes" | "no" => Kind::Node,
            "nodegroup" | "nodegroups" | "ng" => Kind::NodeGroup,
            "token" | "tokens" => Kind::Token,
            "app" | "apps" => Kind::App,
            "appinstance" | "appinstances" | "instance" | "instances" | "inst" => Kind::AppInstance,
            "devicemodel" | "devicemodels" | "dm" => Kind::DeviceModel,
            "device" | "devices" | "dev" => Kind::Device,
            "rule" | "rules" => Kind::Rule,
            "event" | "events" | "ev" => Kind::Event,
            "artifact" | "artifacts" | "art" => Kind::Artifact,
            _ => return Err(UnknownKind(s.to_string())),
        };
        Ok(k)
    }
}
