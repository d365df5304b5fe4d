//! Wire messages of the cloud↔edge channel and their codec.
//!
//! Each WebSocket binary frame carries exactly one message, encoded as JSON.
//! [`decode_down`] / [`decode_up`] are the decoders fed by the network: they
//! reject oversize frames and never panic on any input (fuzzed).

use serde::{Deserialize, Serialize};
use yunbian_api::{
    AppInstanceStatus, DeviceStatus, Kind, NetworkStatus, NodeInfo, NodeUsage, RuleNodeStatus, Severity,
};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;

/// Protocol version sent in `Hello`; a cloud refuses versions it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// An object of a node's desired view (today AppInstances; later Configs,
/// Secrets, DeviceModels…).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredObject {
    /// Kind of the object.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Store revision of the object's last change.
    pub revision: u64,
    /// The full object.
    pub value: serde_json::Value,
}

/// One change to a desired view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Change {
    /// Create or replace.
    Upsert {
        /// The object.
        object: DesiredObject,
    },
    /// Remove.
    Remove {
        /// Kind.
        kind: Kind,
        /// Name.
        name: String,
    },
}

/// Something the edge reports upstream through its persisted outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Report {
    /// New observed state of one instance.
    InstanceStatus {
        /// Instance name.
        instance: String,
        /// Its status.
        status: AppInstanceStatus,
    },
    /// New twin and state of one device attached to the node.
    DeviceStatus {
        /// Device name.
        device: String,
        /// Its status (twins without values when the device does not
        /// report them to the cloud).
        status: DeviceStatus,
    },
    /// An alert sink's condition started (`firing`) or stopped holding for
    /// one series.
    Alert {
        /// `<rule>/<sink>:<series>`: a later report of the same alert
        /// supersedes this one (a resolve carries `since_ms`, so an episode
        /// that started and ended while offline is still recorded).
        id: String,
        /// The rule.
        rule: String,
        /// The series, `metric{tag="v",…}`.
        series: String,
        /// Holds (true) or stopped holding (false).
        firing: bool,
        /// Severity.
        severity: Severity,
        /// The message, filled in.
        message: String,
        /// The value that changed the state.
        value: serde_json::Value,
        /// When the episode started (Unix ms, edge time).
        since_ms: i64,
        /// When this state was observed (Unix ms, edge time).
        at_ms: i64,
    },
    /// How a rule runs on the node.
    RuleStatus {
        /// Rule name.
        rule: String,
        /// Counters and rate on this node.
        status: RuleNodeStatus,
    },
}

impl Report {
    /// What the report is the level of: a later report with the same key
    /// supersedes it.
    pub fn key(&self) -> (Kind, &str) {
        match self {
            Report::InstanceStatus { instance, .. } => (Kind::AppInstance, instance),
            Report::DeviceStatus { device, .. } => (Kind::Device, device),
            Report::RuleStatus { rule, .. } => (Kind::Rule, rule),
            Report::Alert { id, .. } => (Kind::Event, id),
        }
    }
}

/// Cloud → edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Down {
    /// The whole desired view at `revision`; objects absent are removed.
    Snapshot {
        /// View revision.
        revision: u64,
        /// Every object of the view.
        objects: Vec<DesiredObject>,
        /// Apply even if older than what the edge has (the cloud's history
        /// went backwards).
        #[serde(default)]
        reset: bool,
    },
    /// Changes that turn the view at `base` into the view at `revision`.
    Delta {
        /// Revision the delta applies on top of.
        base: u64,
        /// Revision after it.
        revision: u64,
        /// The changes, in order.
        changes: Vec<Change>,
    },
    /// Every report with `seq <= upto` is durably stored in the cloud.
    ReportAck {
        /// Cumulative acknowledgement.
        upto: u64,
    },
    /// These data batches are durably stored in the cloud (or were stored
    /// before): the edge may delete them.
    DataAck {
        /// Batch ids.
        ids: Vec<u64>,
    },
    /// Stream an instance's log back with [`Up::LogData`].
    LogRequest {
        /// Stream id chosen by the cloud.
        stream: u64,
        /// Instance name.
        instance: String,
        /// Last N lines only.
        tail: Option<u64>,
        /// Keep streaming.
        follow: bool,
    },
    /// Stop a log stream.
    LogCancel {
        /// Stream id.
        stream: u64,
    },
    /// The cloud refuses the session (version, identity); the edge backs off.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Edge → cloud.
// A heartbeat is built once per interval and encoded at once; boxing its
// facts would save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Up {
    /// First message of every connection.
    Hello {
        /// Protocol version.
        version: u32,
        /// Last desired-view revision the edge applied and persisted.
        applied: u64,
        /// Lowest unacknowledged outbox sequence (the next one to be
        /// assigned when the outbox is empty).
        outbox_first: u64,
    },
    /// The edge applied and persisted the view up to `revision`.
    Ack {
        /// Applied revision.
        revision: u64,
    },
    /// Outbox entries, in sequence order.
    Reports {
        /// `(seq, report)` pairs, strictly increasing seq.
        items: Vec<(u64, Report)>,
    },
    /// Liveness and usage.
    Heartbeat {
        /// Machine facts.
        info: NodeInfo,
        /// Live usage.
        usage: NodeUsage,
        /// Whether limits are enforced, and how.
        limits_enforced: bool,
        /// Explanation.
        limits_note: String,
        /// Why the node is short of disk space; empty when it is not.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        disk_pressure: String,
        /// Round trips and loss the node measured to the cloud and to its
        /// peers (docs/design/018-latency-and-peer-health.md); absent from
        /// agents that do not measure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<Box<NetworkStatus>>,
        /// `host:port` where peers reach the node's peer server (probes,
        /// chunks); an empty host means the connection's source address,
        /// empty means the node serves no peers.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        peer_addr: String,
    },
    /// One store-and-forward data batch (see [`crate::data`]); the cloud
    /// answers with [`Down::DataAck`] once its points are durably stored.
    Data {
        /// Node-unique, increasing batch id.
        id: u64,
        /// The edge's lowest unacknowledged batch id: it will never send an
        /// id below it again.
        first_id: u64,
        /// 0–9.
        priority: u8,
        /// Points in the batch.
        points: u64,
        /// The encoded points (`yunbian_tsdb::batch`).
        #[serde(with = "base64_bytes")]
        payload: Vec<u8>,
    },
    /// A chunk of a log stream.
    LogData {
        /// Stream id.
        stream: u64,
        /// Text.
        data: String,
    },
    /// End of a log stream (error when it failed).
    LogEnd {
        /// Stream id.
        stream: u64,
        /// Why it ended early.
        error: Option<String>,
    },
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes any message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("wire messages always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Decodes a cloud → edge frame.
pub fn decode_down(bytes: &[u8]) -> Result<Down, WireError> {
    decode(bytes)
}

/// Decodes an edge → cloud frame.
pub fn decode_up(bytes: &[u8]) -> Result<Up, WireError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_of_an_agent_that_does_not_measure_still_decodes() {
        let old = br#"{"type":"heartbeat","info":{},"usage":{},"limits_enforced":false,"limits_note":""}"#;
        match decode_up(old).expect("decode") {
            Up::Heartbeat { network, peer_addr, .. } => {
                assert_eq!(network, None);
                assert_eq!(peer_addr, "");
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_heartbeat_carries_the_network_report_and_the_peer_address() {
        let mut network = NetworkStatus::default();
        network.cloud.rtt_ms = Some(12.5);
        network.peers.insert(
            "e2".into(),
            yunbian_api::LinkQuality { rtt_ms: Some(3.0), loss: 0.25, samples: 4, last_seen_secs: Some(1) },
        );
        let hb = Up::Heartbeat {
            info: NodeInfo::default(),
            usage: NodeUsage::default(),
            limits_enforced: false,
            limits_note: String::new(),
            disk_pressure: String::new(),
            network: Some(Box::new(network)),
            peer_addr: ":7444".into(),
        };
        assert_eq!(decode_up(&encode(&hb)).expect("decode"), hb);
    }
}
