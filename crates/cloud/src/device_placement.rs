//! Places devices that name a `nodeSelector` instead of a node: the device
//! controller picks one Ready node whose labels match (the one with the
//! fewest such devices, then by name: deterministic), records it in
//! `status.node`, and moves the device when that node is deleted, stops
//! matching, or stays NotReady past the eviction delay. The node view
//! builder then routes the device to the chosen node (and away from the
//! old one, which stops its mapper on reconnect).
//!
//! Level-triggered and idempotent, run by the leader next to the App
//! controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use yunbian_api::{selector_matches, Device, DeviceSpec, Kind, Node, NodePhase};
use yunbian_store::{Store, StoreError};

use crate::controllers::ControllerConfig;
use crate::objects::update_status;

/// One pass over every `nodeSelector` device.
pub async fn reconcile_devices(store: &Arc<dyn Store>, cfg: &ControllerConfig) -> Result<(), StoreError> {
    let (devices, _) = store.list(Kind::Device).await?;
    let (nodes, _) = store.list(Kind::Node).await?;
    let nodes: Vec<Node> = nodes.iter().filter_map(|o| Node::from_value((*o.value).clone()).ok()).collect();
    let devices: Vec<Device> = devices.iter().filter_map(|o| Device::from_value((*o.value).clone()).ok()).collect();
    let now = crate::objects::unix_now();
    let lost = |n: &Node| {
        n.status.phase == NodePhase::NotReady
            && cfg.evict_after.is_some_and(|after| {
                yunbian_api::time::parse_rfc3339(&n.status.last_transition)
                    .is_some_and(|t| now >= t.saturating_add(after.as_secs()))
            })
    };
    let by_name: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.metadata.name.as_str(), n)).collect();
    let ready: BTreeSet<&str> =
        nodes.iter().filter(|n| n.status.phase == NodePhase::Ready).map(|n| n.metadata.name.as_str()).collect();
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for d in &devices {
        let node = if d.spec.node.is_empty() { &d.status.node } else { &d.spec.node };
        *load.entry(node.clone()).or_default() += 1;
    }
    for d in devices.iter().filter(|d| d.spec.node.is_empty() && !d.spec.node_selector.is_empty()) {
        let current = by_name.get(d.status.node.as_str()).copied();
        let keep = current.is_some_and(|n| selector_matches(&d.spec.node_selector, &n.metadata.labels) && !lost(n));
        if keep {
            continue;
        }
        let pick = nodes
            .iter()
            .filter(|n| ready.contains(n.metadata.name.as_str()))
            .filter(|n| selector_matches(&d.spec.node_selector, &n.metadata.labels))
            .min_by_key(|n| (load.get(&n.metadata.name).copied().unwrap_or(0), n.metadata.name.clone()))
            .map(|n| n.metadata.name.clone());
        let (node, message) = match (pick, current) {
            (Some(n), _) => (n, String::new()),
            // Lost, and nowhere else to go: stay (it may come back) and say so.
            (None, Some(c)) if selector_matches(&d.spec.node_selector, &c.metadata.labels) => (
                c.metadata.name.clone(),
                format!("node {} is lost and no other Ready node matches spec.nodeSelector", c.metadata.name),
            ),
            (None, _) => (String::new(), "no Ready node matches spec.nodeSelector".to_string()),
        };
        if node == d.status.node && message == d.status.message {
            continue;
        }
        if !node.is_empty() {
            *load.entry(node.clone()).or_default() += 1;
            tracing::info!(device = %d.metadata.name, from = %d.status.node, to = %node, "device placed");
        }
        let r = update_status::<DeviceSpec>(store, &d.metadata.name, |o| {
            if !o.spec.node.is_empty() {
                return false;
            }
            if o.status.node != node {
                // Nobody reports for the new node yet.
                o.status.state = yunbian_api::DeviceState::Unknown;
            }
            o.status.node = node.clone();
            o.status.message = message.clone();
            true
        })
        .await;
        match r {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
