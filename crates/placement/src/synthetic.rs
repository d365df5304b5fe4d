//! A synthetic cluster and App mix for measuring the scheduler
//! (`yunbian bench scheduler`, and `cargo run --release -p
//! yunbian-placement --example throughput` for the crate alone). The
//! callers measure the time; this module has no clock.
//!
//! Nodes come in groups of 100 (every 20th group is cloud tier), groups sit
//! in 10 zones and 3 regions with different CPU prices, nodes are a quarter
//! to a half busy, and every node has a few RTT measurements to the first
//! group (the clients) and to peers. The Apps cycle through: unconstrained,
//! latency with `maxLatencyMs`, cost over three groups, reliability with a
//! zone spread, per-group with self anti-affinity, and a node spread with
//! self anti-affinity. The same arguments always give the same workload.

use yunbian_api::{
    AppAffinity, Fallback, LatencySpec, PerGroup, Placement, PlacementPolicy, Spread, Tier, TopologyKey,
};

use yunbian_api::fuzzing::Mutator;

use crate::{schedule, Cluster, GroupInfo, Latency, NodeFacts, Request, Resources, Target};

/// Which policies the Apps use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// All Apps `balanced`.
    Balanced,
    /// All Apps `latency` (from the clients group).
    Latency,
    /// All Apps `cost`.
    Cost,
    /// All Apps `reliability`.
    Reliability,
    /// The four in turn.
    Mixed,
}

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Mix, String> {
        Ok(match s {
            "balanced" => Mix::Balanced,
            "latency" => Mix::Latency,
            "cost" => Mix::Cost,
            "reliability" => Mix::Reliability,
            "mixed" => Mix::Mixed,
            _ => return Err(format!("unknown policy {s:?} (balanced, latency, cost, reliability, mixed)")),
        })
    }
}

/// Nodes per group.
pub const GROUP_SIZE: usize = 100;

/// One App of the workload.
#[derive(Debug, Clone)]
pub struct SyntheticApp {
    /// Name.
    pub name: String,
    /// Its placement.
    pub placement: Placement,
    /// Its targets.
    pub targets: Vec<Target>,
}

/// A cluster and the Apps to place on it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Nodes, groups and latencies.
    pub nodes: Vec<NodeFacts>,
    /// The groups.
    pub groups: Vec<GroupInfo>,
    /// Measured RTTs.
    pub latency: Latency,
    /// Apps, in the order they are placed.
    pub apps: Vec<SyntheticApp>,
    /// What each instance requests.
    pub resources: Resources,
}

/// What one pass placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Instances placed.
    pub placed: u64,
    /// Instances that fit nowhere.
    pub unplaced: u64,
}

/// A number in `0..n` (0 when `n` is 0) from the workload's generator.
fn below(rng: &mut Mutator, n: u64) -> u64 {
    rng.below(n.max(1) as usize) as u64
}

fn group_name(i: usize) -> String {
    format!("g{i:04}")
}

impl Workload {
    /// `nodes` nodes and Apps totalling about `placements` instances.
    pub fn new(nodes: usize, placements: usize, mix: Mix) -> Workload {
        let mut rng = Mutator::new(0x5EED);
        let n_groups = nodes.div_ceil(GROUP_SIZE).max(1);
        let groups: Vec<GroupInfo> = (0..n_groups)
            .map(|g| GroupInfo {
                name: group_name(g),
                tier: if g % 20 == 19 { Tier::Cloud } else { Tier::Edge },
                site: format!("site-{g}"),
                region: format!("r{}", g % 3),
                zone: format!("z{}", g % 10),
                cost_per_cpu_hour: (g % 11 != 10).then_some(0.01 + (g % 7) as f64 * 0.01),
            })
            .collect();
        let node_list: Vec<NodeFacts> = (0..nodes)
            .map(|i| {
                let cpu = 8000;
                let mem = 16u64 << 30;
                let busy = 25 + below(&mut rng, 26);
                NodeFacts {
                    name: format!("node-{i:06}"),
                    labels: [("sim".to_string(), "true".to_string())].into(),
                    groups: vec![group_name(i / GROUP_SIZE)],
                    ready: i % 97 != 0,
                    not_ready_reason: if i % 97 == 0 { "NotReady: no heartbeat".into() } else { String::new() },
                    arch: if i % 10 == 3 { "aarch64".into() } else { "x86_64".into() },
                    os: "linux".into(),
                    runtimes: vec!["process".into()],
                    allocatable: Resources { cpu_millis: cpu, memory_bytes: mem, extended: Default::default() },
                    requested: Resources {
                        cpu_millis: cpu * busy / 100,
                        memory_bytes: mem / 100 * busy,
                        extended: Default::default(),
                    },
                    disk_free_bytes: 50 << 30,
                    uptime_secs: below(&mut rng, 30 * 86_400),
                    recent_failures: (below(&mut rng, 10) / 7) as u32,
                    ..Default::default()
                }
            })
            .collect();
        let mut latency = Latency::new();
        let clients = GROUP_SIZE.min(nodes);
        for i in 0..nodes {
            let name = &node_list[i].name;
            for _ in 0..3 {
                let c = below(&mut rng, clients as u64) as usize;
                latency.insert(&node_list[c].name, name, 1.0 + below(&mut rng, 800) as f64 / 10.0);
            }
            for _ in 0..4 {
                let peer = below(&mut rng, nodes as u64) as usize;
                latency.insert(name, &node_list[peer].name, 1.0 + below(&mut rng, 1000) as f64 / 10.0);
            }
        }
        let mut apps = Vec::new();
        let mut total = 0usize;
        let mut k = 0usize;
        while total < placements {
            let policy = match mix {
                Mix::Balanced => PlacementPolicy::Balanced,
                Mix::Latency => PlacementPolicy::Latency,
                Mix::Cost => PlacementPolicy::Cost,
                Mix::Reliability => PlacementPolicy::Reliability,
                Mix::Mixed => [
                    PlacementPolicy::Balanced,
                    PlacementPolicy::Latency,
                    PlacementPolicy::Cost,
                    PlacementPolicy::Reliability,
                ][k % 4],
            };
            let mut p = Placement { policy, ..Default::default() };
            if policy == PlacementPolicy::Latency {
                p.latency = Some(LatencySpec {
                    from_group: group_name(0),
                    max_latency_ms: k.is_multiple_of(2).then_some(40.0),
                    ..Default::default()
                });
            }
            let pick_group = |rng: &mut Mutator| group_name(below(rng, n_groups as u64) as usize);
            let mut targets = vec![Target { group: String::new(), count: 20 }];
            match k % 6 {
                0 => {}
                1 => p.requirements.arch = vec!["x86_64".into()],
                2 => {
                    p.groups = (0..3).map(|_| pick_group(&mut rng)).collect();
                    p.groups.sort();
                    p.groups.dedup();
                    p.fallback = Some(Fallback::Cloud);
                    targets[0].count = 30;
                }
                3 => p.spread = Some(Spread { by: TopologyKey::Zone, max_skew: 1 }),
                4 => {
                    p.groups = (0..2).map(|_| pick_group(&mut rng)).collect();
                    p.groups.sort();
                    p.groups.dedup();
                    p.per_group = Some(PerGroup { replicas: 5 });
                    p.anti_affinity = vec![AppAffinity { app: format!("app-{k}"), by: TopologyKey::Node }];
                    targets = p.groups.iter().map(|g| Target { group: g.clone(), count: 5 }).collect();
                }
                _ => {
                    p.spread = Some(Spread { by: TopologyKey::Node, max_skew: 1 });
                    p.anti_affinity = vec![AppAffinity { app: format!("app-{k}"), by: TopologyKey::Node }];
                    targets[0].count = 10;
                }
            }
            let left = placements - total;
            let mut sum: usize = targets.iter().map(|t| t.count as usize).sum();
            if sum > left {
                targets.truncate(1);
                targets[0].count = left as u32;
                sum = left;
            }
            total += sum;
            apps.push(SyntheticApp { name: format!("app-{k}"), placement: p, targets });
            k += 1;
        }
        Workload {
            nodes: node_list,
            groups,
            latency,
            apps,
            resources: Resources { cpu_millis: 100, memory_bytes: 128 << 20, extended: Default::default() },
        }
    }

    /// The cluster of one controller pass.
    pub fn cluster(&self) -> Cluster {
        Cluster::new(self.nodes.clone(), self.groups.clone(), self.latency.clone())
    }

    /// Schedules every App once, in order, as one controller pass does.
    pub fn schedule_all(&self, cluster: &mut Cluster) -> Outcome {
        let mut out = Outcome::default();
        for app in &self.apps {
            let req = Request {
                app: &app.name,
                placement: &app.placement,
                resources: self.resources.clone(),
                runtime: "process",
                platforms: None,
                targets: app.targets.clone(),
                existing: Vec::new(),
            };
            let d = schedule(cluster, &req);
            out.placed += d.create.len() as u64;
            out.unplaced += u64::from(d.unplaced);
        }
        out
    }
}
