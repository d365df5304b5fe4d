//! Which Rules and NodeGroups each node's desired view holds: a Rule that
//! is not paused goes to every node whose labels contain its `nodeSelector`,
//! a NodeGroup to every node its `selector` matches (an empty selector:
//! every node), including nodes that join or are relabelled later. A node
//! learns its groups' settings (the artifact trust policy, its site) this
//! way. Objects travel without status (per-node throughput reports and
//! group counts must not produce view deltas).
//!
//! Pure bookkeeping, like [`crate::device_views`]: store objects in,
//! per-node view changes out.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use yunbian_api::{selector_matches, Kind};
use yunbian_store::StoredObject;
use yunbian_sync::{Change, DesiredObject};

use crate::device_views::{without_status, NodeChanges};

#[derive(Debug, Clone)]
struct RoutedRule {
    selector: BTreeMap<String, String>,
    paused: bool,
    generation: u64,
    object: DesiredObject,
    nodes: BTreeSet<String>,
}

/// Routing of rules to node views.
#[derive(Debug, Default)]
pub struct RuleRouting {
    rules: HashMap<(Kind, String), RoutedRule>,
    /// Labels of every node.
    nodes: HashMap<String, BTreeMap<String, String>>,
}

fn labels_of(o: &StoredObject) -> BTreeMap<String, String> {
    o.value
        .pointer("/metadata/labels")
        .and_then(|l| l.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn rule_of(o: &StoredObject) -> RoutedRule {
    let path = if o.kind == Kind::NodeGroup { "/spec/selector" } else { "/spec/nodeSelector" };
    let selector = o
        .value
        .pointer(path)
        .and_then(|l| l.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    RoutedRule {
        selector,
        paused: o.value.pointer("/spec/paused").and_then(|p| p.as_bool()).unwrap_or(false),
        generation: o.value.pointer("/metadata/generation").and_then(|g| g.as_u64()).unwrap_or(0),
        object: without_status(o),
        nodes: BTreeSet::new(),
    }
}

impl RuleRouting {
    fn members(&self, r: &RoutedRule) -> BTreeSet<String> {
        if r.paused {
            return BTreeSet::new();
        }
        self.nodes.iter().filter(|(_, l)| selector_matches(&r.selector, l)).map(|(n, _)| n.clone()).collect()
    }

    /// Builds the routing from listings (rules and node groups together).
    pub fn build(rules: &[StoredObject], nodes: &[StoredObject]) -> Self {
        let mut r = RuleRouting {
            rules: HashMap::new(),
            nodes: nodes.iter().map(|n| (n.name.clone(), labels_of(n))).collect(),
        };
        for o in rules {
            let mut rr = rule_of(o);
            rr.nodes = r.members(&rr);
            r.rules.insert((o.kind, o.name.clone()), rr);
        }
        r
    }

    /// The nodes rule `name` is placed on.
    pub fn placed_on(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.rules.get(&(Kind::Rule, name.to_string())).map(|r| &r.nodes)
    }

    /// Every node's rule objects.
    pub fn wanted(&self) -> HashMap<String, Vec<DesiredObject>> {
        let mut out: HashMap<String, Vec<DesiredObject>> = HashMap::new();
        for r in self.rules.values() {
            for n in &r.nodes {
                out.entry(n.clone()).or_default().push(r.object.clone());
            }
        }
        out
    }

    /// A rule was added or modified (`Some`) or deleted (`None`).
    pub fn on_rule(&mut self, name: &str, object: Option<&StoredObject>) -> NodeChanges {
        self.on_object(Kind::Rule, name, object)
    }

    /// A rule or node group was added or modified (`Some`) or deleted (`None`).
    pub fn on_object(&mut self, kind: Kind, name: &str, object: Option<&StoredObject>) -> NodeChanges {
        let mut out = NodeChanges::new();
        let key = (kind, name.to_string());
        let prev = self.rules.remove(&key);
        let old_nodes = prev.as_ref().map(|p| p.nodes.clone()).unwrap_or_default();
        let Some(o) = object else {
            for n in old_nodes {
                out.entry(n).or_default().push(Change::Remove { kind, name: name.to_string() });
            }
            return out;
        };
        let mut next = rule_of(o);
        next.nodes = self.members(&next);
        let changed = prev.as_ref().is_none_or(|p| p.generation != next.generation);
        for n in old_nodes.difference(&next.nodes) {
            out.entry(n.clone()).or_default().push(Change::Remove { kind, name: name.to_string() });
        }
        for n in &next.nodes {
            if changed || !old_nodes.contains(n) {
                out.entry(n.clone()).or_default().push(Change::Upsert { object: next.object.clone() });
            }
        }
        if !changed {
            // Status-only change: keep the object the nodes already have.
            if let Some(p) = prev {
                next.object = p.object;
            }
        }
        self.rules.insert(key, next);
        out
    }

    /// A node was added or modified (`Some`) or deleted (`None`): rules
    /// follow its labels.
    pub fn on_node(&mut self, name: &str, object: Option<&StoredObject>) -> NodeChanges {
        let mut out = NodeChanges::new();
        let labels = object.map(labels_of);
        if self.nodes.get(name) == labels.as_ref() {
            return out; // a status change (heartbeat), or nothing new
        }
        match labels {
            Some(l) => {
                self.nodes.insert(name.to_string(), l);
            }
            None => {
                self.nodes.remove(name);
            }
        }
        let node_labels = self.nodes.get(name).cloned();
        for ((kind, rule), r) in self.rules.iter_mut() {
            let member = !r.paused && node_labels.as_ref().is_some_and(|l| selector_matches(&r.selector, l));
            let was = r.nodes.contains(name);
            if member && !was {
                r.nodes.insert(name.to_string());
                out.entry(name.to_string()).or_default().push(Change::Upsert { object: r.object.clone() });
            } else if !member && was {
                r.nodes.remove(name);
                // Also for a deleted node: its view lives on, and a node
                // joining again under the name must not inherit the rule.
                out.entry(name.to_string()).or_default().push(Change::Remove { kind: *kind, name: rule.clone() });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn node(name: &str, site: &str) -> StoredObject {
        StoredObject {
            kind: Kind::Node,
            name: name.into(),
            revision: 1,
            value: Arc::new(
                json!({"metadata": {"name": name, "labels": {"site": site}}, "status": {"phase": "Ready"}}),
            ),
        }
    }

    fn rule(name: &str, site: Option<&str>, generation: u64, paused: bool) -> StoredObject {
        let selector = site.map(|s| json!({"site": s})).unwrap_or(json!({}));
        StoredObject {
            kind: Kind::Rule,
            name: name.into(),
            revision: generation,
            value: Arc::new(json!({
                "metadata": {"name": name, "generation": generation},
                "spec": {"nodeSelector": selector, "paused": paused},
                "status": {"nodes": {}}
            })),
        }
    }

    fn group(name: &str, site: Option<&str>, generation: u64) -> StoredObject {
        let selector = site.map(|s| json!({"site": s})).unwrap_or(json!({}));
        StoredObject {
            kind: Kind::NodeGroup,
            name: name.into(),
            revision: generation,
            value: Arc::new(json!({
                "metadata": {"name": name, "generation": generation},
                "spec": {"selector": selector, "trust": {"requireSignature": false}},
                "status": {"nodes": 1}
            })),
        }
    }

    #[test]
    fn node_groups_go_to_their_members_beside_rules_of_the_same_name() {
        let mut r = RuleRouting::build(&[group("site-a", Some("a"), 1)], &[node("a1", "a"), node("b1", "b")]);
        let wanted = r.wanted();
        assert_eq!(wanted.get("a1").map(|v| v.len()), Some(1));
        assert!(!wanted.contains_key("b1"));
        // A rule named like the group is routed independently.
        let c = r.on_rule("site-a", Some(&rule("site-a", Some("b"), 1, false)));
        assert_eq!(ops(&c, "b1"), vec!["+site-a"]);
        assert!(!c.contains_key("a1"));
        // Cluster-wide (empty selector) groups reach every node, and a
        // relabelled node leaves its old group.
        let c = r.on_object(Kind::NodeGroup, "all", Some(&group("all", None, 1)));
        assert_eq!((ops(&c, "a1"), ops(&c, "b1")), (vec!["+all".to_string()], vec!["+all".to_string()]));
        let c = r.on_node("a1", Some(&node("a1", "b")));
        assert!(c.get("a1").is_some_and(|v| v
            .iter()
            .any(|ch| matches!(ch, Change::Remove { kind: Kind::NodeGroup, name } if name == "site-a"))));
        let c = r.on_object(Kind::NodeGroup, "all", None);
        assert!(c
            .get("b1")
            .is_some_and(|v| v.iter().any(|ch| matches!(ch, Change::Remove { kind: Kind::NodeGroup, .. }))));
        assert_eq!(r.placed_on("site-a").map(|n| n.len()), Some(2));
    }

    fn ops(c: &NodeChanges, node: &str) -> Vec<String> {
        c.get(node)
            .map(|v| {
                v.iter()
                    .map(|c| match c {
                        Change::Upsert { object } => format!("+{}", object.name),
                        Change::Remove { name, .. } => format!("-{name}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn rules_follow_selectors_labels_and_pauses() {
        let mut r = RuleRouting::build(&[], &[node("a1", "a"), node("b1", "b")]);
        let c = r.on_rule("avg", Some(&rule("avg", Some("a"), 1, false)));
        assert_eq!(ops(&c, "a1"), ["+avg"]);
        assert!(ops(&c, "b1").is_empty());
        // Everywhere when the selector is empty.
        let c = r.on_rule("all", Some(&rule("all", None, 1, false)));
        assert_eq!((ops(&c, "a1"), ops(&c, "b1")), (vec!["+all".to_string()], vec!["+all".to_string()]));
        // A node joining site a gets the rule; a heartbeat changes nothing.
        let c = r.on_node("a2", Some(&node("a2", "a")));
        assert_eq!(ops(&c, "a2").len(), 2);
        assert!(r.on_node("a2", Some(&node("a2", "a"))).is_empty());
        // Relabelled away: removed.
        let c = r.on_node("a2", Some(&node("a2", "b")));
        assert_eq!(ops(&c, "a2"), ["-avg"]);
        // A status-only change of the rule routes nothing; a spec change reaches its nodes.
        assert!(r.on_rule("avg", Some(&rule("avg", Some("a"), 1, false))).is_empty());
        let c = r.on_rule("avg", Some(&rule("avg", Some("a"), 2, false)));
        assert_eq!(ops(&c, "a1"), ["+avg"]);
        // Paused: removed everywhere; deleted: removed from where it was.
        let c = r.on_rule("avg", Some(&rule("avg", Some("a"), 3, true)));
        assert_eq!(ops(&c, "a1"), ["-avg"]);
        let c = r.on_rule("all", None);
        assert_eq!((ops(&c, "a1"), ops(&c, "b1")), (vec!["-all".to_string()], vec!["-all".to_string()]));
        assert!(r.wanted().is_empty());
    }
}
