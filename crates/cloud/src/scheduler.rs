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

/// Places one instance: returns the index of the chosen node and books the
/// request on it, so the next call sees it.
pub fn place(req: &Request, nodes: &mut [Candidate]) -> Result<usize, Unschedulable> {
    let mut why = Unschedulable { nodes: nodes.len() as u32, ..Default::default() };
    let mut best: Option<(usize, (u32, u64, &str))> = None;
    for (i, n) in nodes.iter().enumerate() {
        let reason = if !n.schedulable {
            Some("not ready or unschedulable")
        } else if !yunbian_api::selector_matches(&req.selector, &n.labels) {
            Some("node selector mismatch")
        } else if !req.runtime.is_empty() && !n.runtimes.contains(&req.runtime) {
            Some("runtime not offered")
        } else if n.cpu_used + req.cpu > n.cpu_allocatable {
            Some("insufficient cpu")
        } else if n.memory_used + req.memory > n.memory_allocatable {
            Some("insufficient memory")
        } else {
            None
        };
        if let Some(r) = reason {
            *why.reasons.entry(r).or_default() += 1;
            continue;
        }
        // Per-mille share requested after placing, cpu and memory summed.
        let share = |used: u64, req: u64, alloc: u64| (used + req).saturating_mul(1000) / alloc.max(1);
        let load =
            share(n.cpu_used, req.cpu, n.cpu_allocatable) + share(n.memory_used, req.memory, n.memory_allocatable);
        let score = (n.same_app, load, n.name.as_str());
        if best.as_ref().is_none_or(|(_, b)| score < *b) {
            best = Some((i, score));
        }
    }
    let (i, _) = best.ok_or(why)?;
    let n = &mut nodes[i];
    n.cpu_used += req.cpu;
    n.memory_used += req.memory;
    n.same_app += 1;
    Ok(i)
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
