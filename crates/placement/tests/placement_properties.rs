//! Properties over random clusters and placements: placements never break
//! the requirements, anti-affinity or (when it can hold) the spread, and a
//! decision applied and scheduled again changes nothing.

mod support;

use std::collections::BTreeMap;

use proptest::prelude::*;
use support::*;
use yunbian_api::{
    AppAffinity, Fallback, LatencySpec, Placement, PlacementMode, PlacementPolicy, Spread, Tier, TopologyKey,
};
use yunbian_placement::{
    schedule, Cluster, Decision, Existing, GroupInfo, Latency, NodeFacts, Request, Resources, Target,
};

const GROUPS: [&str; 4] = ["g0", "g1", "g2", "g3"];

fn groups() -> Vec<GroupInfo> {
    vec![
        group_at("g0", "z0", "r0", Some(0.02)),
        group_at("g1", "z0", "r0", Some(0.05)),
        group_at("g2", "z1", "r1", None),
        GroupInfo { tier: Tier::Cloud, ..group_at("g3", "z2", "r1", Some(0.5)) },
    ]
}

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<NodeFacts>,
    rtts: Vec<(usize, usize, f64)>,
    placement: Placement,
    per_group: Option<Vec<u32>>,
    count: u32,
    every_node: bool,
    /// (node index, target index) of this App's current instances.
    existing: Vec<(usize, usize)>,
    want: Resources,
}

fn arb_node(i: usize) -> impl Strategy<Value = NodeFacts> {
    (
        prop::option::of(0..4usize),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.05),
        prop::sample::select(vec![1000u64, 2000, 4000]),
        0..=100u64,
        0..3u64,
        0..3u32,
        0..2usize,
    )
        .prop_map(move |(g, arm, ready, cordoned, lost, cpu, used_pct, gpus, failures, site)| {
            let mut n = node(&format!("n{i:02}"));
            if let Some(g) = g {
                n.groups = vec![GROUPS[g].to_string()];
            }
            if arm {
                n.arch = "aarch64".into();
            }
            n.ready = ready;
            n.unschedulable = cordoned;
            n.lost = lost;
            n.allocatable = res(cpu, cpu * MI);
            n.requested = res(cpu * used_pct / 100, cpu * MI * used_pct / 100);
            if gpus > 0 {
                n.allocatable.extended.insert("yunbian.io/gpu".into(), gpus);
            }
            n.recent_failures = failures;
            n.uptime_secs = (i as u64 * 7919) % 700_000;
            n.labels.insert("site".into(), format!("s{site}"));
            n
        })
}

fn arb_world(ample: bool) -> impl Strategy<Value = World> {
    (1..24usize)
        .prop_flat_map(move |n| {
            let nodes = (0..n).map(arb_node).collect::<Vec<_>>();
            (
                nodes,
                prop::collection::vec((0..n, 0..n, 0.5..80.0f64), 0..(n * 3)),
                prop::sample::select(vec![
                    PlacementPolicy::Balanced,
                    PlacementPolicy::Latency,
                    PlacementPolicy::Cost,
                    PlacementPolicy::Reliability,
                ]),
                prop::option::of((0..4usize, 1..3u32)),
                (prop::bool::weighted(0.2), prop::bool::weighted(0.3), prop::bool::weighted(0.2)),
                (prop::bool::weighted(0.3), prop::bool::weighted(0.2), prop::bool::weighted(0.1)),
                (0..14u32, prop::collection::vec(0..5u32, 2)),
                prop::collection::vec((0..n, 0..2usize), 0..10),
                (100..900u64, 0..2u64),
            )
        })
        .prop_map(
            move |(
                mut nodes,
                rtts,
                policy,
                spread,
                (selector, arch, anti_self),
                (with_groups, per_group, every_node),
                (count, group_counts),
                existing,
                (cpu, gpus),
            )| {
                let mut p = Placement { policy, ..Default::default() };
                if policy == PlacementPolicy::Latency {
                    p.latency = Some(LatencySpec {
                        from_group: "g0".into(),
                        max_latency_ms: Some(60.0).filter(|_| !ample),
                        ..Default::default()
                    });
                }
                p.spread = spread.map(|(by, max_skew)| Spread {
                    by: [TopologyKey::Node, TopologyKey::Group, TopologyKey::Zone, TopologyKey::Region][by],
                    max_skew,
                });
                let mut want = res(cpu, cpu * MI / 2);
                if ample {
                    for n in &mut nodes {
                        n.ready = true;
                        n.unschedulable = false;
                        n.lost = false;
                        n.allocatable = res(1 << 40, 1 << 50);
                        n.requested = res(0, 0);
                    }
                    return World {
                        nodes,
                        rtts,
                        placement: p,
                        per_group: None,
                        count,
                        every_node: false,
                        existing: vec![],
                        want,
                    };
                }
                if selector {
                    p.node_selector = [("site".to_string(), "s0".to_string())].into();
                }
                if arch {
                    p.requirements.arch = vec!["x86_64".into()];
                }
                if anti_self {
                    p.anti_affinity = vec![AppAffinity { app: "web".into(), by: TopologyKey::Node }];
                }
                if gpus > 0 {
                    want.extended.insert("yunbian.io/gpu".into(), gpus);
                    p.requirements.resources.insert("yunbian.io/gpu".into(), gpus);
                }
                p.fallback = (policy != PlacementPolicy::Latency).then_some(Fallback::Cloud);
                let mut per = None;
                if with_groups || per_group {
                    p.groups = vec!["g0".into(), "g3".into()];
                    if per_group && !every_node {
                        per = Some(group_counts);
                    }
                }
                if every_node {
                    p.mode = PlacementMode::EveryNode;
                    p.spread = None;
                }
                World { nodes, rtts, placement: p, per_group: per, count, every_node, existing, want }
            },
        )
}

impl World {
    fn targets(&self) -> Vec<Target> {
        match &self.per_group {
            Some(counts) => {
                self.placement.groups.iter().zip(counts).map(|(g, c)| Target { group: g.clone(), count: *c }).collect()
            }
            None if self.every_node => vec![],
            None => vec![Target { group: String::new(), count: self.count }],
        }
    }

    /// A fresh cluster with `instances` (node name → count) booked.
    fn cluster(&self, instances: &BTreeMap<String, u32>) -> Cluster {
        let mut l = Latency::new();
        for (a, b, rtt) in &self.rtts {
            l.insert(&self.nodes[*a].name, &self.nodes[*b].name, *rtt);
        }
        let mut c = Cluster::new(self.nodes.clone(), groups(), l);
        for (n, k) in instances {
            for _ in 0..*k {
                c.book(n, &self.want);
                c.record_instance("web", n);
            }
        }
        c
    }

    fn initial_existing(&self) -> Vec<Existing> {
        let targets = self.targets();
        self.existing
            .iter()
            .enumerate()
            .map(|(i, (n, t))| Existing {
                instance: format!("old-{i:02}"),
                node: self.nodes[*n].name.clone(),
                group: targets.get(*t).map(|t| t.group.clone()).unwrap_or_default(),
            })
            .collect()
    }

    fn request<'a>(&'a self, existing: Vec<Existing>) -> Request<'a> {
        Request {
            app: "web",
            placement: &self.placement,
            resources: self.want.clone(),
            runtime: "process",
            platforms: None,
            targets: self.targets(),
            existing,
        }
    }
}

fn per_node(existing: &[Existing]) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for e in existing {
        *m.entry(e.node.clone()).or_default() += 1;
    }
    m
}

/// What the world looks like once the decision is carried out: kept
/// instances (minus those a move replaced) and created ones.
fn applied(before: &[Existing], d: &Decision) -> Vec<Existing> {
    let replaced: Vec<&str> = d.create.iter().filter_map(|b| b.replaces.as_deref()).collect();
    let mut out: Vec<Existing> = before
        .iter()
        .filter(|e| d.keep.contains(&e.instance) && !replaced.contains(&e.instance.as_str()))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.instance.cmp(&b.instance));
    out.dedup_by(|b, a| a.instance == b.instance);
    for (i, b) in d.create.iter().enumerate() {
        out.push(Existing { instance: format!("new-{i:03}"), node: b.node.clone(), group: b.group.clone() });
    }
    out
}

fn domain(w: &World, by: TopologyKey, n: &NodeFacts) -> Option<String> {
    let gs = groups();
    let g = n.groups.first().and_then(|g| gs.iter().find(|x| &x.name == g));
    match by {
        TopologyKey::Node => Some(n.name.clone()),
        TopologyKey::Group => g.map(|g| g.name.clone()),
        TopologyKey::Zone => g.map(|g| g.zone.clone()).filter(|z| !z.is_empty()),
        TopologyKey::Region => g.map(|g| g.region.clone()).filter(|z| !z.is_empty()),
    }
    .filter(|_| w.nodes.iter().any(|m| m.name == n.name))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn placements_respect_requirements_and_anti_affinity(w in arb_world(false)) {
        let existing = w.initial_existing();
        let mut c = w.cluster(&per_node(&existing));
        let d = schedule(&mut c, &w.request(existing.clone()));
        let after = per_node(&applied(&existing, &d));
        let p = &w.placement;
        for b in &d.create {
            let n = c.node(&b.node).expect("created on a known node");
            prop_assert!(n.ready && !n.unschedulable && !n.lost, "{b:?} on an unusable node");
            prop_assert!(p.node_selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)), "{b:?} selector");
            prop_assert!(p.requirements.arch.is_empty() || p.requirements.arch.contains(&n.arch), "{b:?} arch");
            prop_assert!(p.groups.is_empty() || p.groups.iter().any(|g| n.groups.contains(g)), "{b:?} groups");
            if !b.group.is_empty() {
                prop_assert!(n.groups.contains(&b.group), "{b:?} outside its group");
            }
            prop_assert!(n.requested.cpu_millis <= n.allocatable.cpu_millis, "{b:?} cpu overbooked");
            prop_assert!(n.requested.memory_bytes <= n.allocatable.memory_bytes, "{b:?} memory overbooked");
            for (k, v) in &n.requested.extended {
                prop_assert!(*v <= n.allocatable.extended.get(k).copied().unwrap_or(0), "{b:?} {k} overbooked");
            }
            if c.tier_of(&b.node) == Some(Tier::Cloud) && !p.groups.contains(&"g3".to_string()) {
                prop_assert!(b.reason.starts_with("fallback: "), "{b:?} on the cloud without fallback");
            }
            if !p.anti_affinity.is_empty() {
                prop_assert_eq!(after.get(&b.node).copied(), Some(1), "{:?} shares a node (anti-affinity)", b);
            }
        }
        if w.every_node {
            for (n, k) in &after {
                if d.create.iter().any(|b| &b.node == n) {
                    prop_assert_eq!(*k, 1, "everyNode put two on {}", n);
                }
            }
        }
        prop_assert!(d.rejections.len() <= yunbian_placement::MAX_REJECTIONS);
        prop_assert!(d.rejections.windows(2).all(|r| r[0].node < r[1].node));
        prop_assert_eq!(d.unplaced == 0 || !d.message.is_empty(), true, "unplaced without a message");
    }

    #[test]
    fn a_stable_input_produces_no_moves(w in arb_world(false)) {
        let existing = w.initial_existing();
        let mut c = w.cluster(&per_node(&existing));
        let first = schedule(&mut c, &w.request(existing.clone()));
        let now = applied(&existing, &first);
        let mut fresh = w.cluster(&per_node(&now));
        let second = schedule(&mut fresh, &w.request(now.clone()));
        prop_assert!(second.evict.is_empty(), "second pass evicts {:?}\nfirst: {first:#?}", second.evict);
        prop_assert!(second.create.is_empty(), "second pass creates {:?}\nfirst: {first:#?}", second.create);
        prop_assert_eq!(second.keep.len(), now.len());
    }

    #[test]
    fn spread_holds_when_it_can(w in arb_world(true)) {
        let Some(spread) = w.placement.spread else { return Ok(()) };
        let mut c = w.cluster(&BTreeMap::new());
        let d = schedule(&mut c, &w.request(vec![]));
        prop_assert!(!d.message.contains("maxSkew"), "{}", d.message);
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for n in &w.nodes {
            if let Some(dom) = domain(&w, spread.by, n) {
                // Cloud nodes are fallback only; with room at the edge they are not eligible.
                if c.tier_of(&n.name) == Some(Tier::Edge) {
                    counts.entry(dom).or_default();
                }
            }
        }
        for b in &d.create {
            let n = c.node(&b.node).expect("known");
            let dom = domain(&w, spread.by, n).expect("placed nodes have a domain");
            *counts.entry(dom).or_default() += 1;
        }
        if let (Some(max), Some(min)) = (counts.values().max(), counts.values().min()) {
            prop_assert!(max - min <= spread.max_skew, "{counts:?} with maxSkew {}", spread.max_skew);
        }
    }
}
