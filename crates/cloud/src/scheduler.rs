//! The first scheduler: filter nodes by readiness, `nodeSelector` and fit of
//! cpu/memory requests against allocatable minus what is already placed;
//! score by spreading an App's instances across nodes, then by least
//! requested share. Pure functions, no I/O.

use std::collections::{BTreeMap, BTreeSet};

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Ready and schedulable.
    pub schedulable: bool,
    /// Allocatable millicores.
    pub cpu_allocatable: u64,
    /// Allocatable bytes.
    pub memory_allocatable: u64,
    /// Millicores requested by instances already placed.
    pub cpu_used: u64,
    /// Bytes requested by instances already placed.
    pub memory_used: u64,
    /// Instances of the App being placed, already on this node.
    pub same_app: u32,
    /// Runtimes the node's agent offers (`process`, `fake`).
    pub runtimes: Vec<String>,
}

/// What one instance needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Millicores.
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
    /// Required labels.
    pub selector: BTreeMap<String, String>,
    /// Runtime the instance needs.
    pub runtime: String,
}

/// Why nothing fits, counted per reason (`2 not ready, 1 insufficient memory`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unschedulable {
    /// Reason → number of nodes.
    pub reasons: BTreeMap<&'static str, u32>,
    /// Nodes considered.
    pub nodes: u32,
}

impl std::fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        write!(
            f,
            "0/{} nodes available: {}",
            self.nodes,
            if parts.is_empty() { "no nodes".into() } else { parts.join(", ") }
        )
    }
}

/// Why a node can never take this request, whatever is placed meanwhile.
fn static_misfit(req: &Request, n: &Candidate) -> Option<&'static str> {
    if !n.schedulable {
        Some("not ready or unschedulable")
    } else if !yunbian_api::selector_matches(&req.selector, &n.labels) {
        Some("node selector mismatch")
    } else if !req.runtime.is_empty() && !n.runtimes.contains(&req.runtime) {
        Some("runtime not offered")
    } else {
        None
    }
}

/// Why a node cannot take the request now, given what is booked on it.
fn resource_misfit(req: &Request, n: &Candidate) -> Option<&'static str> {
    if n.cpu_used + req.cpu > n.cpu_allocatable {
        Some("insufficient cpu")
    } else if n.memory_used + req.memory > n.memory_allocatable {
        Some("insufficient memory")
    } else {
        None
    }
}

/// Score of a node for the request; lower is better: fewest instances of
/// the same App (spread), then least requested share after placing
/// (per mille, cpu + memory), then position (candidates come sorted by name).
fn score(req: &Request, n: &Candidate, index: usize) -> (u32, u64, usize) {
    let share = |used: u64, req: u64, alloc: u64| (used + req).saturating_mul(1000) / alloc.max(1);
    let load = share(n.cpu_used, req.cpu, n.cpu_allocatable) + share(n.memory_used, req.memory, n.memory_allocatable);
    (n.same_app, load, index)
}

/// Places `count` instances of one request and books each on its node, so
/// later placements see it. Returns the chosen node indexes, and why the
/// rest could not be placed when fewer than `count` fit.
///
/// Nodes are filtered once (readiness, selector, runtime), then kept in a
/// min-heap by score: each placement is O(log nodes), not O(nodes). A node
/// whose resources no longer fit is dropped for good (booking only grows).
pub fn place_many(req: &Request, nodes: &mut [Candidate], count: usize) -> (Vec<usize>, Option<Unschedulable>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let mut why = Unschedulable { nodes: nodes.len() as u32, ..Default::default() };
    let mut heap = BinaryHeap::new();
    for (i, n) in nodes.iter().enumerate() {
        match static_misfit(req, n) {
            Some(r) => *why.reasons.entry(r).or_default() += 1,
            None => heap.push(Reverse(score(req, n, i))),
        }
    }
    let mut chosen = Vec::with_capacity(count.min(nodes.len().max(1) * 64));
    while chosen.len() < count {
        let Some(Reverse((_, _, i))) = heap.pop() else { break };
        let n = &mut nodes[i];
        if let Some(r) = resource_misfit(req, n) {
            *why.reasons.entry(r).or_default() += 1;
            continue;
        }
        n.cpu_used += req.cpu;
        n.memory_used += req.memory;
        n.same_app += 1;
        chosen.push(i);
        heap.push(Reverse(score(req, n, i)));
    }
    let unplaced = (chosen.len() < count).then_some(why);
    (chosen, unplaced)
}

/// Places one instance: returns the index of the chosen node and books the
/// request on it, so the next call sees it.
pub fn place(req: &Request, nodes: &mut [Candidate]) -> Result<usize, Unschedulable> {
    match place_many(req, nodes, 1) {
        (v, _) if !v.is_empty() => Ok(v[0]),
        (_, why) => Err(why.unwrap_or_default()),
    }
}

/// Chooses which of an App's instances to remove when scaling down: those
/// on unschedulable nodes first, then those on the most crowded nodes.
/// `instances` is `(name, node, running)`; returns the names to delete.
pub fn pick_victims(
    instances: &[(String, String, bool)],
    excess: usize,
    ready_nodes: &BTreeSet<String>,
) -> Vec<String> {
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for (_, node, _) in instances {
        *per_node.entry(node.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<&(String, String, bool)> = instances.iter().collect();
    ranked.sort_by_key(|(name, node, running)| {
        (
            ready_nodes.contains(node),
            *running,
            std::cmp::Reverse(per_node.get(node.as_str()).copied().unwrap_or(0)),
            std::cmp::Reverse(name.clone()),
        )
    });
    ranked.into_iter().take(excess).map(|(n, _, _)| n.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, site: &str, cpu: u64, mem: u64) -> Candidate {
        Candidate {
            name: name.into(),
            labels: [("site".to_string(), site.to_string())].into(),
            schedulable: true,
            cpu_allocatable: cpu,
            memory_allocatable: mem,
            cpu_used: 0,
            memory_used: 0,
            same_app: 0,
            runtimes: vec!["process".into()],
        }
    }

    #[test]
    fn spreads_and_respects_selector_and_fit() {
        let mut nodes =
            vec![node("a", "x", 1000, 1 << 30), node("b", "x", 1000, 1 << 30), node("c", "y", 1000, 1 << 30)];
        let req = Request {
            cpu: 400,
            memory: 1 << 20,
            selector: [("site".into(), "x".into())].into(),
            runtime: "process".into(),
        };
        let picks: Vec<usize> = (0..4).map(|_| place(&req, &mut nodes).expect("fits")).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        // a and b have 800m used: a fifth 400m request fits nowhere.
        let err = place(&req, &mut nodes).expect_err("full");
        assert_eq!(err.to_string(), "0/3 nodes available: 2 insufficient cpu, 1 node selector mismatch");
    }

    #[test]
    fn place_many_matches_one_by_one() {
        let mk = || -> Vec<Candidate> {
            (0..50)
                .map(|i| {
                    let mut n = node(&format!("n{i:03}"), if i % 3 == 0 { "y" } else { "x" }, 1000 + i * 10, 1 << 30);
                    n.cpu_used = (i * 37) % 500;
                    n
                })
                .collect()
        };
        let req = Request {
            cpu: 100,
            memory: 1 << 20,
            selector: [("site".into(), "x".into())].into(),
            runtime: "process".into(),
        };
        let (mut a, mut b) = (mk(), mk());
        let (many, why) = place_many(&req, &mut a, 400);
        let mut single = Vec::new();
        while let Ok(i) = place(&req, &mut b) {
            single.push(i);
        }
        assert_eq!(many, single[..many.len()].to_vec());
        assert_eq!(many.len(), single.len());
        assert!(why.is_some(), "400 do not fit");
        assert_eq!(a, b);
    }

    #[test]
    fn runtime_must_be_offered() {
        let mut nodes = vec![node("a", "x", 1000, 1 << 30)];
        let req = Request { runtime: "fake".into(), ..Default::default() };
        let err = place(&req, &mut nodes).expect_err("no fake runtime");
        assert_eq!(err.to_string(), "0/1 nodes available: 1 runtime not offered");
    }

    #[test]
    fn not_ready_nodes_are_skipped() {
        let mut nodes = vec![node("a", "x", 1000, 1 << 30)];
        nodes[0].schedulable = false;
        assert!(place(&Request::default(), &mut nodes).is_err());
    }

    #[test]
    fn victims_prefer_unready_then_crowded() {
        let ready: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let inst = vec![
            ("i1".to_string(), "a".to_string(), true),
            ("i2".to_string(), "a".to_string(), true),
            ("i3".to_string(), "b".to_string(), true),
            ("i4".to_string(), "gone".to_string(), true),
        ];
        assert_eq!(pick_victims(&inst, 2, &ready), vec!["i4".to_string(), "i2".to_string()]);
    }
}
