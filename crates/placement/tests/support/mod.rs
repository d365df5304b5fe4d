//! Builders shared by the placement tests: nodes with sensible defaults,
//! groups, clusters and requests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use yunbian_api::{Placement, Tier};
use yunbian_placement::{Cluster, Existing, GroupInfo, Latency, NodeFacts, Request, Resources, Target};

pub const MI: u64 = 1 << 20;
pub const GI: u64 = 1 << 30;

/// A Ready linux/x86_64 node with 4 cpu, 8Gi, 100Gi free disk, up a day.
pub fn node(name: &str) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        ready: true,
        arch: "x86_64".into(),
        os: "linux".into(),
        runtimes: vec!["process".into()],
        allocatable: Resources { cpu_millis: 4000, memory_bytes: 8 * GI, extended: BTreeMap::new() },
        disk_free_bytes: 100 * GI,
        uptime_secs: 86_400,
        ..Default::default()
    }
}

/// `node` in the given groups.
pub fn node_in(name: &str, groups: &[&str]) -> NodeFacts {
    let mut n = node(name);
    n.groups = groups.iter().map(|g| g.to_string()).collect();
    n.groups.sort();
    n
}

pub fn group(name: &str, tier: Tier) -> GroupInfo {
    GroupInfo { name: name.into(), tier, site: name.into(), ..Default::default() }
}

pub fn group_at(name: &str, zone: &str, region: &str, cost: Option<f64>) -> GroupInfo {
    GroupInfo {
        name: name.into(),
        zone: zone.into(),
        region: region.into(),
        cost_per_cpu_hour: cost,
        ..group(name, Tier::Edge)
    }
}

pub fn cluster(nodes: Vec<NodeFacts>, groups: Vec<GroupInfo>) -> Cluster {
    Cluster::new(nodes, groups, Latency::new())
}

pub fn res(cpu_millis: u64, memory_bytes: u64) -> Resources {
    Resources { cpu_millis, memory_bytes, extended: BTreeMap::new() }
}

/// A request for `count` instances anywhere the placement allows.
pub fn request<'a>(app: &'a str, placement: &'a Placement, count: u32) -> Request<'a> {
    Request {
        app,
        placement,
        resources: res(100, 64 * MI),
        runtime: "process",
        platforms: None,
        targets: vec![Target { group: String::new(), count }],
        existing: Vec::new(),
    }
}

pub fn existing(instance: &str, node: &str, group: &str) -> Existing {
    Existing { instance: instance.into(), node: node.into(), group: group.into() }
}

/// Nodes of the created binds, in order.
pub fn created_nodes(d: &yunbian_placement::Decision) -> Vec<String> {
    d.create.iter().map(|b| b.node.clone()).collect()
}
