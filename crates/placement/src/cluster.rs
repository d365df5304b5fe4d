//! The cluster as one controller pass sees it: nodes (sorted by name, so an
//! index order is a name order), groups, the measured latency matrix and
//! where every App's instances are. Built once per pass and shared by all
//! Apps of the pass; [`Cluster::book`] makes each placement visible to the
//! next.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use yunbian_api::Tier;

use crate::{GroupInfo, NodeFacts, Resources};

/// Measured RTTs in ms between nodes (directed; either direction is used
/// when only one is known).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    rtts: BTreeMap<(String, String), f64>,
}

impl Latency {
    /// An empty matrix.
    pub fn new() -> Latency {
        Latency::default()
    }

    /// Records the RTT measured from `from` to `to`. Values that are not a
    /// finite number ≥ 0 are ignored.
    pub fn insert(&mut self, from: &str, to: &str, rtt_ms: f64) {
        if rtt_ms.is_finite() && rtt_ms >= 0.0 {
            self.rtts.insert((from.to_string(), to.to_string()), rtt_ms);
        }
    }

    /// The RTT from `from` to `to`: measured in that direction, else in the
    /// other; 0 from a node to itself.
    pub fn rtt(&self, from: &str, to: &str) -> Option<f64> {
        if from == to {
            return Some(0.0);
        }
        let key = |a: &str, b: &str| (a.to_string(), b.to_string());
        self.rtts.get(&key(from, to)).or_else(|| self.rtts.get(&key(to, from))).copied()
    }

    /// Measurements held.
    pub fn len(&self) -> usize {
        self.rtts.len()
    }

    /// Whether nothing was measured.
    pub fn is_empty(&self) -> bool {
        self.rtts.is_empty()
    }
}

/// Nodes, groups, latencies and instances for one controller pass.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Sorted by name, unique.
    pub(crate) nodes: Vec<NodeFacts>,
    by_name: HashMap<String, usize>,
    /// Sorted by name, unique; groups named by nodes but not described get
    /// default facts (edge, no cost).
    pub(crate) groups: Vec<GroupInfo>,
    group_ids: HashMap<String, u32>,
    /// Group ids of each node, ascending (so in name order).
    pub(crate) node_groups: Vec<Vec<u32>>,
    /// Members of each group, ascending node indexes.
    pub(crate) members: Vec<Vec<usize>>,
    pub(crate) tier: Vec<Tier>,
    /// Interned zone and region of each group (`None` when empty).
    pub(crate) group_zone: Vec<Option<u32>>,
    pub(crate) group_region: Vec<Option<u32>>,
    /// Per node: (peer, RTT between them), sorted by peer; the RTT measured
    /// from the peer to the node when known, else the other direction.
    adjacency: Vec<Vec<(u32, f64)>>,
    latency: Latency,
    /// App → node index → instances of it there.
    pub(crate) instances: HashMap<String, BTreeMap<usize, u32>>,
    rtt_cache: HashMap<(bool, String), Arc<Vec<Option<f64>>>>,
    /// Static verdicts and scores shared by Apps with the same static inputs.
    pub(crate) prepared: HashMap<String, Arc<crate::schedule::Prepared>>,
}

impl Cluster {
    /// Builds the pass's view. Nodes are sorted by name; of two nodes with
    /// the same name the first is kept.
    pub fn new(mut nodes: Vec<NodeFacts>, groups: Vec<GroupInfo>, latency: Latency) -> Cluster {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.dedup_by(|b, a| a.name == b.name);
        let by_name: HashMap<String, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();

        let mut described: BTreeMap<String, GroupInfo> = BTreeMap::new();
        for g in groups {
            described.entry(g.name.clone()).or_insert(g);
        }
        for n in &nodes {
            for g in &n.groups {
                described.entry(g.clone()).or_insert_with(|| GroupInfo { name: g.clone(), ..Default::default() });
            }
        }
        let groups: Vec<GroupInfo> = described.into_values().collect();
        let group_ids: HashMap<String, u32> =
            groups.iter().enumerate().map(|(i, g)| (g.name.clone(), i as u32)).collect();
        let mut members = vec![Vec::new(); groups.len()];
        let mut node_groups = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            let mut ids: Vec<u32> = n.groups.iter().filter_map(|g| group_ids.get(g).copied()).collect();
            ids.sort_unstable();
            ids.dedup();
            for &g in &ids {
                members[g as usize].push(i);
            }
            node_groups.push(ids);
        }
        // A node whose groups are all cloud tier is a cloud node; a node in
        // no group is an edge node.
        let tier = node_groups
            .iter()
            .map(|ids| {
                if !ids.is_empty() && ids.iter().all(|&g| groups[g as usize].tier == Tier::Cloud) {
                    Tier::Cloud
                } else {
                    Tier::Edge
                }
            })
            .collect();
        // Zones and regions interned as domain ids (a zone and a region of
        // the same name stay apart).
        let mut interned: HashMap<String, u32> = HashMap::new();
        let mut intern = |kind: &str, s: &str| -> Option<u32> {
            if s.is_empty() {
                return None;
            }
            let next = interned.len() as u32;
            Some(*interned.entry(format!("{kind}/{s}")).or_insert(next))
        };
        let group_zone = groups.iter().map(|g| intern("zone", &g.zone)).collect();
        let group_region = groups.iter().map(|g| intern("region", &g.region)).collect();

        let mut adjacency: Vec<Vec<(u32, f64)>> = vec![Vec::new(); nodes.len()];
        // Measured towards the node first, so it wins over the reverse.
        for ((from, to), rtt) in &latency.rtts {
            if let (Some(&f), Some(&t)) = (by_name.get(from), by_name.get(to)) {
                if f != t {
                    adjacency[t].push((f as u32, *rtt));
                }
            }
        }
        for ((from, to), rtt) in &latency.rtts {
            if let (Some(&f), Some(&t)) = (by_name.get(from), by_name.get(to)) {
                if f != t {
                    adjacency[f].push((t as u32, *rtt));
                }
            }
        }
        for adj in &mut adjacency {
            // Stable: of two entries for one peer, the first pushed (the
            // measurement towards this node) stays.
            adj.sort_by_key(|(p, _)| *p);
            adj.dedup_by_key(|(p, _)| *p);
        }

        Cluster {
            nodes,
            by_name,
            groups,
            group_ids,
            node_groups,
            members,
            tier,
            group_zone,
            group_region,
            adjacency,
            latency,
            instances: HashMap::new(),
            rtt_cache: HashMap::new(),
            prepared: HashMap::new(),
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.index(name).map(|i| &self.nodes[i])
    }

    /// All nodes, sorted by name.
    pub fn nodes(&self) -> &[NodeFacts] {
        &self.nodes
    }

    /// The group called `name` (described or only named by a node).
    pub fn group(&self, name: &str) -> Option<&GroupInfo> {
        self.group_ids.get(name).map(|&g| &self.groups[g as usize])
    }

    /// The node's tier: cloud when all its groups are cloud tier.
    pub fn tier_of(&self, name: &str) -> Option<Tier> {
        self.index(name).map(|i| self.tier[i])
    }

    /// The measured latencies.
    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn group_id(&self, name: &str) -> Option<u32> {
        self.group_ids.get(name).copied()
    }

    /// Records an existing instance of `app` on `node` (every app's, for
    /// affinity and anti-affinity). Resources are not booked by this; an
    /// unknown node is ignored.
    pub fn record_instance(&mut self, app: &str, node: &str) {
        if let Some(i) = self.index(node) {
            *self.instances.entry(app.to_string()).or_default().entry(i).or_default() += 1;
        }
    }

    pub(crate) fn forget_instance(&mut self, app: &str, node: usize) {
        if let Some(per_node) = self.instances.get_mut(app) {
            if let Some(c) = per_node.get_mut(&node) {
                *c -= 1;
                if *c == 0 {
                    per_node.remove(&node);
                }
            }
        }
    }

    pub(crate) fn add_instance(&mut self, app: &str, node: usize) {
        *self.instances.entry(app.to_string()).or_default().entry(node).or_default() += 1;
    }

    /// Instances of `app` on each node (node index → count).
    pub(crate) fn instances_of(&self, app: &str) -> Option<&BTreeMap<usize, u32>> {
        self.instances.get(app)
    }

    /// Adds `r` to the node's requested resources (unknown node: ignored).
    pub fn book(&mut self, node: &str, r: &Resources) {
        if let Some(i) = self.index(node) {
            self.nodes[i].requested.add(r);
        }
    }

    /// Removes `r` from the node's requested resources, never below zero.
    pub fn release(&mut self, node: &str, r: &Resources) {
        if let Some(i) = self.index(node) {
            self.nodes[i].requested.sub(r);
        }
    }

    pub(crate) fn book_at(&mut self, node: usize, r: &Resources) {
        self.nodes[node].requested.add(r);
    }

    /// RTT to every node from a location (`from_group` true: the median over
    /// the group's measured members; else from the node), cached for the
    /// pass. `None`: no measurement.
    pub(crate) fn rtt_from(&mut self, from_group: bool, location: &str) -> Arc<Vec<Option<f64>>> {
        let key = (from_group, location.to_string());
        if let Some(v) = self.rtt_cache.get(&key) {
            return Arc::clone(v);
        }
        let v = Arc::new(self.compute_rtt_from(from_group, location));
        self.rtt_cache.insert(key, Arc::clone(&v));
        v
    }

    fn compute_rtt_from(&self, from_group: bool, location: &str) -> Vec<Option<f64>> {
        if !from_group {
            let Some(loc) = self.index(location) else {
                return vec![None; self.nodes.len()];
            };
            return (0..self.nodes.len())
                .map(|n| {
                    if n == loc {
                        return Some(0.0);
                    }
                    let adj = &self.adjacency[n];
                    adj.binary_search_by_key(&(loc as u32), |(p, _)| *p).ok().map(|k| adj[k].1)
                })
                .collect();
        }
        let Some(g) = self.group_id(location) else {
            return vec![None; self.nodes.len()];
        };
        let mut member = vec![false; self.nodes.len()];
        for &m in &self.members[g as usize] {
            member[m] = true;
        }
        let mut samples = Vec::new();
        (0..self.nodes.len())
            .map(|n| {
                if member[n] {
                    return Some(0.0);
                }
                samples.clear();
                samples.extend(self.adjacency[n].iter().filter(|(p, _)| member[*p as usize]).map(|(_, r)| *r));
                median(&mut samples)
            })
            .collect()
    }
}

/// The median (mean of the two middle values for an even count).
pub(crate) fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, groups: &[&str]) -> NodeFacts {
        NodeFacts { name: name.into(), groups: groups.iter().map(|g| g.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn nodes_sort_and_tiers_follow_groups() {
        let groups = vec![
            GroupInfo { name: "c".into(), tier: Tier::Cloud, ..Default::default() },
            GroupInfo { name: "e".into(), tier: Tier::Edge, ..Default::default() },
        ];
        let c = Cluster::new(
            vec![node("z", &["c"]), node("a", &["c", "e"]), node("m", &[]), node("a", &["c"])],
            groups,
            Latency::new(),
        );
        let names: Vec<&str> = c.nodes().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "m", "z"]);
        assert_eq!(c.tier_of("z"), Some(Tier::Cloud));
        assert_eq!(c.tier_of("a"), Some(Tier::Edge), "one edge group makes an edge node");
        assert_eq!(c.tier_of("m"), Some(Tier::Edge), "no group: edge");
        assert_eq!(c.tier_of("nope"), None);
    }

    #[test]
    fn rtt_uses_either_direction_and_group_median() {
        let mut l = Latency::new();
        l.insert("a", "x", 10.0);
        l.insert("x", "b", 30.0);
        l.insert("c", "x", 50.0);
        l.insert("x", "c", 70.0);
        l.insert("a", "y", f64::NAN);
        assert_eq!(l.len(), 4, "NaN is ignored");
        assert_eq!(l.rtt("x", "a"), Some(10.0));
        assert_eq!(l.rtt("x", "x"), Some(0.0));
        let mut c = Cluster::new(
            vec![node("a", &["g"]), node("b", &["g"]), node("c", &["g"]), node("x", &[]), node("y", &[])],
            vec![],
            l,
        );
        let from_g = c.rtt_from(true, "g");
        // x: a→x 10, x→b 30, c→x 50 (measured towards x wins over x→c 70).
        assert_eq!(from_g[3], Some(30.0));
        assert_eq!(from_g[0], Some(0.0), "members are at 0");
        assert_eq!(from_g[4], None);
        let from_x = c.rtt_from(false, "x");
        assert_eq!(from_x[..4], [Some(10.0), Some(30.0), Some(70.0), Some(0.0)]);
        assert_eq!(c.rtt_from(false, "nowhere")[0], None);
        let mut even = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(median(&mut even), Some(2.5));
    }

    #[test]
    fn book_release_and_instances() {
        let mut c = Cluster::new(vec![node("a", &[])], vec![], Latency::new());
        let r = Resources { cpu_millis: 100, memory_bytes: 10, extended: [("x/gpu".to_string(), 1)].into() };
        c.book("a", &r);
        c.book("a", &r);
        c.release("a", &r);
        assert_eq!(c.node("a").map(|n| n.requested.clone()), Some(r.clone()));
        c.release("a", &r);
        c.release("a", &r);
        assert_eq!(c.node("a").map(|n| n.requested.cpu_millis), Some(0), "never below zero");
        c.book("missing", &r);
        c.record_instance("db", "a");
        c.record_instance("db", "missing");
        assert_eq!(c.instances_of("db").map(|m| m.len()), Some(1));
    }
}
