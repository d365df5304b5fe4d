//! The latency matrix and its routes
//! (docs/design/018-latency-and-peer-health.md).
//!
//! - `GET /v1/latency[?node=N]` (admin token): `{"nodes": {from: {to:
//!   {rttMs, loss}}}, "cloud": {node: {rttMs, loss}}}` — the latest report
//!   of every node this replica serves, completed by `status.network` of
//!   the Node objects for the others (written at each node's status
//!   write). With `node`, only the rows and columns of that node.
//! - `GET /v1/nodes/{name}/probe-targets` (the node's own client
//!   certificate): `{"targets": [{node, addr}]}`, the peers `name` probes
//!   ([`crate::health::probe_targets`]) that serve peers.
//!
//! [`LatencyMatrix`] is the type later work (an overlay network choosing
//! relays and routes) reads: `hub.latency_matrix()` in process, or the
//! route over HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use yunbian_api::{Kind, NetworkStatus};

use crate::api::{Admin, ApiError, ApiState, ArtifactReader};

/// Round trip and loss of one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathLatency {
    /// Smoothed round trip, milliseconds (absent: never answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Share of recent probes lost, 0–1.
    #[serde(default)]
    pub loss: f64,
}

/// Measured round trips between nodes, and from each node to the cloud.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMatrix {
    /// `from → to → path`, as `from` measured it.
    pub nodes: BTreeMap<String, BTreeMap<String, PathLatency>>,
    /// `node → path` to the cloud.
    pub cloud: BTreeMap<String, PathLatency>,
}

impl LatencyMatrix {
    /// Adds (replaces) what `node` reported.
    pub fn insert_report(&mut self, node: &str, report: &NetworkStatus) {
        let path = |q: &yunbian_api::LinkQuality| PathLatency { rtt_ms: q.rtt_ms, loss: q.loss };
        if report.cloud.samples > 0 || report.cloud.rtt_ms.is_some() {
            self.cloud.insert(node.to_string(), path(&report.cloud));
        }
        let row: BTreeMap<String, PathLatency> = report.peers.iter().map(|(p, q)| (p.clone(), path(q))).collect();
        if row.is_empty() {
            self.nodes.remove(node);
        } else {
            self.nodes.insert(node.to_string(), row);
        }
    }

    /// Whether `node` has any entry.
    pub fn has(&self, node: &str) -> bool {
        self.nodes.contains_key(node) || self.cloud.contains_key(node)
    }

    /// The round trip `from` measured to `to`.
    pub fn rtt(&self, from: &str, to: &str) -> Option<f64> {
        self.nodes.get(from)?.get(to)?.rtt_ms
    }

    /// `(from, to, rtt ms)` of every measured pair.
    pub fn pairs(&self) -> Vec<(String, String, f64)> {
        let mut out = Vec::new();
        for (from, row) in &self.nodes {
            for (to, p) in row {
                if let Some(r) = p.rtt_ms {
                    out.push((from.clone(), to.clone(), r));
                }
            }
        }
        out
    }

    /// Only what concerns `node`: its row, its column, its cloud path.
    pub fn about(&self, node: &str) -> LatencyMatrix {
        let mut m = LatencyMatrix::default();
        for (from, row) in &self.nodes {
            let kept: BTreeMap<String, PathLatency> = if from == node {
                row.clone()
            } else {
                row.iter().filter(|(to, _)| *to == node).map(|(t, p)| (t.clone(), *p)).collect()
            };
            if !kept.is_empty() {
                m.nodes.insert(from.clone(), kept);
            }
        }
        if let Some(c) = self.cloud.get(node) {
            m.cloud.insert(node.to_string(), *c);
        }
        m
    }
}

/// The latency routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/latency", get(latency)).route("/v1/nodes/{name}/probe-targets", get(probe_targets))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyQuery {
    #[serde(default)]
    node: Option<String>,
}

async fn latency(
    State(s): State<Arc<ApiState>>,
    _admin: Admin,
    Query(q): Query<LatencyQuery>,
) -> Result<Json<LatencyMatrix>, ApiError> {
    let mut m = s.hub.latency_matrix();
    // Nodes served by other replicas: their last written report.
    let (nodes, _) = s.store.list(Kind::Node).await?;
    for n in nodes {
        if m.has(&n.name) {
            continue;
        }
        let Some(v) = n.value.pointer("/status/network") else { continue };
        if let Ok(report) = serde_json::from_value::<NetworkStatus>(v.clone()) {
            m.insert_report(&n.name, &report);
        }
    }
    Ok(Json(match q.node {
        Some(n) => m.about(&n),
        None => m,
    }))
}

async fn probe_targets(
    State(s): State<Arc<ApiState>>,
    reader: ArtifactReader,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match reader {
        ArtifactReader::Node(n) if n == name => {}
        ArtifactReader::Node(n) => {
            return Err(ApiError::new(StatusCode::FORBIDDEN, format!("node {n} cannot ask for the targets of {name}")))
        }
        ArtifactReader::Admin => {}
    }
    let targets = s.hub.probe_targets(&name).await?;
    let targets: Vec<serde_json::Value> =
        targets.into_iter().map(|(node, addr)| serde_json::json!({"node": node, "addr": addr})).collect();
    Ok(Json(serde_json::json!({ "targets": targets })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::LinkQuality;

    fn q(rtt: f64) -> LinkQuality {
        LinkQuality { rtt_ms: Some(rtt), loss: 0.1, samples: 5, last_seen_secs: Some(0) }
    }

    #[test]
    fn reports_fill_rows_and_the_cloud_column() {
        let mut m = LatencyMatrix::default();
        let mut a = NetworkStatus { cloud: q(20.0), ..Default::default() };
        a.peers.insert("b".into(), q(3.0));
        a.peers.insert("c".into(), q(9.0));
        m.insert_report("a", &a);
        let mut b = NetworkStatus::default();
        b.peers.insert("a".into(), q(4.0));
        m.insert_report("b", &b);
        assert_eq!(m.rtt("a", "c"), Some(9.0));
        assert_eq!(m.rtt("b", "a"), Some(4.0));
        assert_eq!(m.rtt("c", "a"), None);
        assert_eq!(m.cloud.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(m.pairs().len(), 3);
        let about_c = m.about("c");
        assert_eq!(about_c.rtt("a", "c"), Some(9.0));
        assert!(!about_c.nodes.contains_key("b"));
        assert!(about_c.cloud.is_empty());
        let json = serde_json::to_value(&m).expect("json");
        assert_eq!(json["nodes"]["a"]["b"]["rttMs"], 3.0);
        assert_eq!(json["cloud"]["a"]["loss"], 0.1);
        // A newer report replaces the row.
        m.insert_report("a", &NetworkStatus { cloud: q(20.0), ..Default::default() });
        assert!(!m.nodes.contains_key("a"));
    }
}
