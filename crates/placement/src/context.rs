//! What filter and score plugins see: the cluster, the App's request, the
//! target being placed and this App's instances so far in the call.

use std::collections::HashMap;

use yunbian_api::TopologyKey;

use crate::{Cluster, NodeFacts, Request};

/// A node handed to a plugin: its index in the cluster (name order) and
/// its facts.
#[derive(Debug, Clone, Copy)]
pub struct NodeRef<'a> {
    /// Index in [`Cluster::nodes`].
    pub index: usize,
    /// The node.
    pub facts: &'a NodeFacts,
}

/// Where this App's instances are while one call decides: the kept ones
/// and those created so far.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    per_node: HashMap<usize, u32>,
    per_group: HashMap<u32, u32>,
}

impl Placed {
    /// Instances on the node.
    pub fn on_node(&self, node: usize) -> u32 {
        if self.per_node.is_empty() {
            return 0;
        }
        self.per_node.get(&node).copied().unwrap_or(0)
    }

    /// Instances in the group (by group id).
    pub(crate) fn in_group(&self, group: u32) -> u32 {
        self.per_group.get(&group).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, cluster: &Cluster, node: usize) {
        *self.per_node.entry(node).or_default() += 1;
        for &g in &cluster.node_groups[node] {
            *self.per_group.entry(g).or_default() += 1;
        }
    }

    pub(crate) fn remove(&mut self, cluster: &Cluster, node: usize) {
        let dec = |c: Option<&mut u32>| {
            if let Some(c) = c {
                *c = c.saturating_sub(1);
            }
        };
        dec(self.per_node.get_mut(&node));
        for &g in &cluster.node_groups[node] {
            dec(self.per_group.get_mut(&g));
        }
    }
}

/// An affinity or anti-affinity term, resolved against the cluster once
/// per App.
#[derive(Debug, Clone)]
pub(crate) struct Term {
    pub app: String,
    pub by: TopologyKey,
    /// The App names itself: counted from [`Placed`], which changes as
    /// instances are placed.
    pub is_self: bool,
    /// Instances of the other App per group id (for `by: group`).
    pub groups: HashMap<u32, u32>,
    /// The other App has instances somewhere.
    pub anywhere: bool,
}

impl Term {
    pub(crate) fn resolve(cluster: &Cluster, app: &str, term: &yunbian_api::AppAffinity) -> Term {
        let is_self = term.app == app;
        let mut groups = HashMap::new();
        let mut anywhere = false;
        if let Some(per_node) = cluster.instances_of(&term.app) {
            for (&n, &c) in per_node {
                anywhere |= c > 0;
                if term.by != TopologyKey::Node {
                    for &g in &cluster.node_groups[n] {
                        *groups.entry(g).or_default() += c;
                    }
                }
            }
        }
        Term { app: term.app.clone(), by: term.by, is_self, groups, anywhere }
    }

    /// Instances of the other App (or, for a self term, of this App) in
    /// the node's domain.
    pub(crate) fn count_near(&self, ctx: &Context, node: usize) -> u32 {
        match (self.is_self, self.by) {
            (true, TopologyKey::Node) => ctx.placed.on_node(node),
            (true, _) => ctx.cluster.node_groups[node].iter().map(|&g| ctx.placed.in_group(g)).sum(),
            (false, TopologyKey::Node) => {
                ctx.cluster.instances_of(&self.app).and_then(|m| m.get(&node)).copied().unwrap_or(0)
            }
            (false, _) => ctx.cluster.node_groups[node].iter().map(|g| self.groups.get(g).copied().unwrap_or(0)).sum(),
        }
    }
}

/// Ranges over the candidates of one placement round, so latency and cost
/// scores compare nodes with each other.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ranges {
    pub rtt: Option<(f64, f64)>,
    pub cost: Option<(f64, f64)>,
}

/// What plugins see.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The pass's cluster, with every booking so far.
    pub cluster: &'a Cluster,
    /// The App being placed.
    pub request: &'a Request<'a>,
    /// The target group (empty: any of `placement.groups`).
    pub target_group: &'a str,
    /// This App's instances so far.
    pub placed: &'a Placed,
    pub(crate) affinity: &'a [Term],
    pub(crate) anti_affinity: &'a [Term],
    /// RTT from `placement.latency`'s location, per node index.
    pub(crate) rtt: Option<&'a [Option<f64>]>,
    pub(crate) ranges: Ranges,
    /// Placing on cloud-tier nodes because no edge node fits.
    pub(crate) fallback_phase: bool,
}

impl<'a> Context<'a> {
    /// The node at `index`.
    pub fn node(&self, index: usize) -> NodeRef<'a> {
        NodeRef { index, facts: &self.cluster.nodes[index] }
    }

    /// The measured RTT from the latency location to the node.
    pub fn rtt(&self, node: usize) -> Option<f64> {
        self.rtt.and_then(|r| r.get(node).copied().flatten())
    }

    /// Where latency is measured from, for messages (`clients`, `node e1`).
    pub fn location(&self) -> String {
        match &self.request.placement.latency {
            Some(l) if !l.from_group.is_empty() => l.from_group.clone(),
            Some(l) => format!("node {}", l.from_node),
            None => "nowhere".to_string(),
        }
    }

    /// The cheapest `costPerCpuHour` among the node's groups, and that
    /// group's name.
    pub fn cost(&self, node: usize) -> Option<(f64, &'a str)> {
        let c = self.cluster;
        c.node_groups[node]
            .iter()
            .filter_map(|&g| c.groups[g as usize].cost_per_cpu_hour.map(|p| (p, c.groups[g as usize].name.as_str())))
            .filter(|(p, _)| p.is_finite())
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }
}
