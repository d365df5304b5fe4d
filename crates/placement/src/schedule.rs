//! [`schedule`]: all of one App's placement decisions in one call.
//!
//! 1. **Existing instances.** Each is matched to its target; it must move
//!    when its node is gone or lost or no longer passes the filters that
//!    [`Filter::evicts`] (selector, groups, runtime, arch, os). Instances on
//!    not-ready nodes that are not lost stay and count as placed.
//! 2. **Surplus.** A target with more instances than it wants loses the
//!    worst placed: on unready nodes first, then on cloud-tier nodes, then
//!    in the most loaded spread domain, then on the most crowded node.
//! 3. **New placements**, per target: the static filters run once per
//!    node, the nodes that pass go into a max-heap keyed by (spread
//!    domain, weighted score, name). Popping the top re-runs the dynamic
//!    filters (a failure drops the node: bookings only grow) and re-scores
//!    it; scores only fall as instances are placed, so a node whose score
//!    fell is pushed back and the first node whose score still holds is the
//!    best. Each placement is O(log n) heap work plus the plugins.
//! 4. **Fallback**: with `fallback: cloud`, what the edge cannot take goes
//!    to cloud-tier nodes, and instances already on cloud-tier nodes get a
//!    make-before-break replacement on the edge when it has room.
//!
//! A hard spread (`placement.spread`) keys the heap on the domain's count
//! first, so the least-loaded domain with a fitting node is always chosen;
//! that satisfies any `maxSkew` whenever it can be satisfied, and when it
//! cannot (the least-loaded domains are full) the instance still goes to the
//! least-loaded domain that fits, and the message says so.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use yunbian_api::{NodeRejection, PlacementMode, Tier, TopologyKey};

use crate::context::{Context, Placed, Ranges, Term};
use crate::filter::{self, Filter, TierAllowed};
use crate::score::{self, Score};
use crate::{Bind, Cluster, Decision, Request, Target, MAX_REJECTIONS};

/// Heap entry: (spread key, total score, name order, static score part).
type Entry = (i64, i64, Reverse<usize>, i64);

/// Decides where `req`'s instances run. Books the created instances into
/// `cluster` (and releases the evicted ones) before returning, so the next
/// App of the pass sees them.
pub fn schedule(cluster: &mut Cluster, req: &Request) -> Decision {
    let mut run = Run::new(cluster, req);
    run.classify_existing(cluster);
    if run.every_node {
        run.place_every_node(cluster);
    } else {
        run.evict_surplus(cluster);
        for t in 0..run.targets.len() {
            run.place_target(cluster, t);
        }
    }
    run.finish(cluster)
}

/// One target's working state.
struct TargetState {
    target: Target,
    /// Kept instances: (instance, node index).
    kept: Vec<(String, usize)>,
    /// Its static verdicts, once evaluated.
    prepared: Option<Arc<Prepared>>,
    unplaced: u32,
}

/// Candidates of one placement round (edge or cloud) and what their spread
/// and latency/cost ranges are.
struct Round {
    candidates: Candidates,
    ranges: Ranges,
    fallback_phase: bool,
    /// Instance counts of the eligible spread domains: count → domains.
    levels: BTreeMap<u32, u32>,
    /// Eligible spread domains, ascending.
    eligible: Arc<Vec<u32>>,
    skew_noted: bool,
}

/// The heap(s) of one round.
enum Candidates {
    /// One heap keyed by (the node's spread count, score, name): without a
    /// hard spread, or spreading by node (only the booked node's key
    /// changes).
    Flat(BinaryHeap<Entry>),
    /// Spreading by group, zone or region: a heap of nodes per domain (key
    /// (0, score, name)) and a heap of domains keyed by (−count, best
    /// score, its node). Booking changes one domain's key, not the keys of
    /// all its nodes.
    ByDomain { domains: BinaryHeap<(i64, i64, Reverse<usize>, u32)>, nodes: HashMap<u32, BinaryHeap<Entry>> },
}

/// The static part of one target's candidates: the static filters' verdicts
/// and the static scores. Computed once per App and target, and shared by
/// the Apps of a pass whose static inputs are the same (see
/// [`Run::signature`]), as kube-scheduler's equivalence classes did.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Nodes the target may use at all, ascending.
    members: Vec<usize>,
    /// Candidates of the edge round (and explicitly wanted cloud nodes).
    edge: Phase,
    /// Cloud-tier nodes usable only as fallback.
    cloud: Phase,
    /// Why each fallback node is not used when the edge fits.
    cloud_reasons: Vec<Arc<str>>,
    /// Members failing a static filter, ascending.
    rejected: Vec<(usize, Arc<str>)>,
}

/// Candidates of one round with their static scores and ranges.
#[derive(Debug, Default)]
struct Phase {
    nodes: Vec<usize>,
    static_scores: Vec<i64>,
    ranges: Ranges,
    eligible: Arc<Vec<u32>>,
}

struct Run<'r, 'a> {
    req: &'r Request<'a>,
    every_node: bool,
    targets: Vec<TargetState>,
    affinity: Vec<Term>,
    anti_affinity: Vec<Term>,
    rtt: Option<Arc<Vec<Option<f64>>>>,
    /// Group ids of `placement.groups`, ascending.
    app_groups: Vec<u32>,
    placed: Placed,
    /// Instances per spread domain (hard spread only).
    spread_counts: HashMap<u32, u32>,
    static_scores: Vec<(&'static dyn Score, i64)>,
    dynamic_scores: Vec<(&'static dyn Score, i64)>,
    lead: &'static dyn Score,
    /// Dynamic rejections (first reason per node).
    rejections: BTreeMap<usize, String>,
    /// Static rejections: the prepared targets used, and whether their
    /// fallback nodes went unused (then their tier reason counts).
    static_rejections: Vec<(Arc<Prepared>, bool)>,
    /// Static filters ran for some target: report nodes outside the groups.
    evaluated: bool,
    /// Kept instance → the node of its replacement (fallback return).
    replaced: BTreeMap<String, String>,
    decision: Decision,
    notes: Vec<String>,
}

impl<'r, 'a> Run<'r, 'a> {
    fn new(cluster: &mut Cluster, req: &'r Request<'a>) -> Self {
        let p = req.placement;
        let every_node = p.mode == PlacementMode::EveryNode;
        let mut targets: Vec<TargetState> = Vec::new();
        if every_node {
            targets.push(TargetState { target: Target::default(), kept: Vec::new(), prepared: None, unplaced: 0 });
        } else {
            for t in &req.targets {
                match targets.iter_mut().find(|s| s.target.group == t.group) {
                    Some(s) => s.target.count = s.target.count.saturating_add(t.count),
                    None => {
                        targets.push(TargetState { target: t.clone(), kept: Vec::new(), prepared: None, unplaced: 0 })
                    }
                }
            }
        }
        if targets.is_empty() && !every_node {
            // No target: nothing wanted, so every existing instance is surplus.
            targets.push(TargetState { target: Target::default(), kept: Vec::new(), prepared: None, unplaced: 0 });
        }
        let rtt = p.latency.as_ref().and_then(|l| {
            if !l.from_group.is_empty() {
                Some(cluster.rtt_from(true, &l.from_group))
            } else if !l.from_node.is_empty() {
                Some(cluster.rtt_from(false, &l.from_node))
            } else {
                None
            }
        });
        let mut app_groups: Vec<u32> = p.groups.iter().filter_map(|g| cluster.group_id(g)).collect();
        app_groups.sort_unstable();
        let weights = score::weights(p.policy);
        Run {
            req,
            every_node,
            targets,
            affinity: p.affinity.iter().map(|t| Term::resolve(cluster, req.app, t)).collect(),
            anti_affinity: p.anti_affinity.iter().map(|t| Term::resolve(cluster, req.app, t)).collect(),
            rtt,
            app_groups,
            placed: Placed::default(),
            spread_counts: HashMap::new(),
            static_scores: weights.iter().filter(|(s, _)| !s.dynamic()).copied().collect(),
            dynamic_scores: weights.iter().filter(|(s, _)| s.dynamic()).copied().collect(),
            lead: weights[0].0,
            rejections: BTreeMap::new(),
            static_rejections: Vec::new(),
            evaluated: false,
            replaced: BTreeMap::new(),
            decision: Decision::default(),
            notes: Vec::new(),
        }
    }

    fn ctx<'c>(&'c self, cluster: &'c Cluster, target_group: &'c str, ranges: Ranges, fallback: bool) -> Context<'c> {
        Context {
            cluster,
            request: self.req,
            target_group,
            placed: &self.placed,
            affinity: &self.affinity,
            anti_affinity: &self.anti_affinity,
            rtt: self.rtt.as_deref().map(Vec::as_slice),
            ranges,
            fallback_phase: fallback,
        }
    }

    fn reject(&mut self, node: usize, reason: String) {
        self.rejections.entry(node).or_insert(reason);
    }

    /// The node's spread domain for `key`: the node; its first group among
    /// the App's groups (or overall); that group's zone or region.
    fn domain(&self, cluster: &Cluster, key: TopologyKey, node: usize) -> Option<u32> {
        if key == TopologyKey::Node {
            return Some(node as u32);
        }
        let groups = &cluster.node_groups[node];
        let group = if self.app_groups.is_empty() {
            groups.first().copied()
        } else {
            groups.iter().copied().find(|g| self.app_groups.binary_search(g).is_ok())
        }?;
        match key {
            TopologyKey::Group => Some(group),
            TopologyKey::Zone => cluster.group_zone[group as usize],
            TopologyKey::Region => cluster.group_region[group as usize],
            TopologyKey::Node => unreachable!("handled above"),
        }
    }

    fn hard_spread_domain(&self, cluster: &Cluster, node: usize) -> Option<u32> {
        self.req.placement.spread.and_then(|s| self.domain(cluster, s.by, node))
    }

    // ------------------------------------------------------------ existing

    fn classify_existing(&mut self, cluster: &mut Cluster) {
        let mut existing: Vec<&crate::Existing> = self.req.existing.iter().collect();
        existing.sort_by(|a, b| a.instance.cmp(&b.instance));
        existing.dedup_by(|b, a| a.instance == b.instance);
        let single = self.every_node || (self.targets.len() == 1 && self.targets[0].target.group.is_empty());
        for e in existing {
            let t = if single { Some(0) } else { self.targets.iter().position(|s| s.target.group == e.group) };
            let Some(t) = t.filter(|&t| t < self.targets.len()) else {
                let why = if e.group.is_empty() {
                    "placed without a group; the placement now places per group".to_string()
                } else {
                    format!("group {} is no longer a target of the placement", e.group)
                };
                self.evict(cluster, &e.instance, cluster.index(&e.node), why);
                continue;
            };
            let Some(n) = cluster.index(&e.node) else {
                self.decision.evict.push((e.instance.clone(), format!("node {} is gone", e.node)));
                continue;
            };
            if cluster.nodes[n].lost {
                self.evict(cluster, &e.instance, Some(n), format!("node {} is lost", e.node));
                continue;
            }
            let group = self.targets[t].target.group.clone();
            let misfit = {
                let ctx = self.ctx(cluster, &group, Ranges::default(), false);
                let node = ctx.node(n);
                filter::STATIC.iter().filter(|f| f.evicts()).find_map(|f| f.filter(&ctx, node).err())
            };
            if let Some(r) = misfit {
                self.evict(cluster, &e.instance, Some(n), format!("node {} no longer matches {r}", e.node));
                continue;
            }
            if self.every_node && self.placed.on_node(n) > 0 {
                let why = format!("node {} already runs another instance (everyNode runs one per node)", e.node);
                self.evict(cluster, &e.instance, Some(n), why);
                continue;
            }
            self.placed.add(cluster, n);
            if let Some(d) = self.hard_spread_domain(cluster, n) {
                *self.spread_counts.entry(d).or_default() += 1;
            }
            self.targets[t].kept.push((e.instance.clone(), n));
        }
    }

    /// Records an eviction and gives back what the instance held.
    fn evict(&mut self, cluster: &mut Cluster, instance: &str, node: Option<usize>, why: String) {
        if let Some(n) = node {
            let name = cluster.nodes[n].name.clone();
            cluster.release(&name, &self.req.resources);
            cluster.forget_instance(self.req.app, n);
        }
        self.decision.evict.push((instance.to_string(), why));
    }

    fn evict_surplus(&mut self, cluster: &mut Cluster) {
        for t in 0..self.targets.len() {
            let want = self.targets[t].target.count as usize;
            let have = self.targets[t].kept.len();
            if have <= want {
                continue;
            }
            // Max-heap of "how badly placed"; the parts only fall as others
            // go, so a popped entry whose key still holds is the worst.
            let key = |run: &Self, cluster: &Cluster, n: usize| {
                let f = &cluster.nodes[n];
                (
                    !f.ready || f.unschedulable,
                    cluster.tier[n] == Tier::Cloud,
                    run.hard_spread_domain(cluster, n).and_then(|d| run.spread_counts.get(&d).copied()).unwrap_or(0),
                    run.placed.on_node(n),
                )
            };
            let kept = std::mem::take(&mut self.targets[t].kept);
            let mut heap: BinaryHeap<_> =
                kept.iter().enumerate().map(|(i, (name, n))| (key(self, cluster, *n), name.clone(), i)).collect();
            let mut gone = vec![false; kept.len()];
            let mut left = have - want;
            while left > 0 {
                let Some((k, name, i)) = heap.pop() else { break };
                let n = kept[i].1;
                let now = key(self, cluster, n);
                if now < k {
                    heap.push((now, name, i));
                    continue;
                }
                let (unready, cloud, _, _) = now;
                let why = if unready {
                    format!("surplus ({have} for {want} wanted): node {} is not ready", cluster.nodes[n].name)
                } else if cloud {
                    format!(
                        "surplus ({have} for {want} wanted): on cloud node {}; the edge has the rest",
                        cluster.nodes[n].name
                    )
                } else {
                    format!("surplus ({have} for {want} wanted): the most crowded placement")
                };
                self.placed.remove(cluster, n);
                if let Some(d) = self.hard_spread_domain(cluster, n) {
                    if let Some(c) = self.spread_counts.get_mut(&d) {
                        *c = c.saturating_sub(1);
                    }
                }
                self.evict(cluster, &name, Some(n), why);
                gone[i] = true;
                left -= 1;
            }
            self.targets[t].kept = kept.into_iter().zip(gone).filter(|(_, g)| !g).map(|(k, _)| k).collect();
        }
    }

    // ------------------------------------------------------------ new placements

    /// Nodes the target may use at all: members of its group, of any of
    /// `placement.groups`, or every node.
    fn members(&self, cluster: &Cluster, target_group: &str) -> Vec<usize> {
        if !target_group.is_empty() {
            return cluster.group_id(target_group).map(|g| cluster.members[g as usize].clone()).unwrap_or_default();
        }
        if self.req.placement.groups.is_empty() {
            return (0..cluster.nodes.len()).collect();
        }
        let mut v: Vec<usize> =
            self.app_groups.iter().flat_map(|&g| cluster.members[g as usize].iter().copied()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// What makes two Apps' static verdicts and scores the same: `None`
    /// when the App has (anti-)affinity terms to other Apps, whose
    /// instances change as the pass goes on.
    fn signature(&self, t: usize) -> Option<String> {
        let p = self.req.placement;
        if self.affinity.iter().chain(&self.anti_affinity).any(|t| !t.is_self) {
            return None;
        }
        let r = &p.requirements;
        Some(format!(
            "{:?}|{}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{:?}|{}",
            p.node_selector,
            self.targets[t].target.group,
            p.groups,
            self.req.runtime,
            r.arch,
            r.os,
            self.req.platforms,
            r.min_free_disk,
            p.latency,
            p.fallback.is_some(),
            p.spread.map(|s| s.by),
            p.policy,
            self.every_node
        ))
    }

    /// Runs the static filters over the target's members and scores the
    /// nodes that pass (or takes both from the pass's cache).
    fn prepare(&mut self, cluster: &mut Cluster, t: usize) -> Arc<Prepared> {
        self.evaluated = true;
        let key = self.signature(t);
        if let Some(p) = key.as_ref().and_then(|k| cluster.prepared.get(k)) {
            return Arc::clone(p);
        }
        let prepared = Arc::new(self.compute_prepared(cluster, t));
        if let Some(k) = key {
            cluster.prepared.insert(k, Arc::clone(&prepared));
        }
        prepared
    }

    fn compute_prepared(&self, cluster: &Cluster, t: usize) -> Prepared {
        let group = &self.targets[t].target.group;
        let members = self.members(cluster, group);
        let fallback = self.req.placement.fallback.is_some() && !self.every_node;
        let spread = self.req.placement.spread.filter(|_| !self.every_node);
        let mut out = Prepared::default();
        let (mut edge, mut cloud) = (Vec::new(), Vec::new());
        let ctx = self.ctx(cluster, group, Ranges::default(), false);
        for &n in &members {
            let node = ctx.node(n);
            if let Some(r) = filter::STATIC.iter().find_map(|f| f.filter(&ctx, node).err()) {
                out.rejected.push((n, r.into()));
                continue;
            }
            if let Some(s) = spread {
                if self.domain(cluster, s.by, n).is_none() {
                    out.rejected.push((n, format!("no {} (spread by {})", s.by.as_str(), s.by.as_str()).into()));
                    continue;
                }
            }
            match TierAllowed.filter(&ctx, node) {
                Ok(()) => edge.push(n),
                Err(r) if fallback && cluster.tier[n] == Tier::Cloud => {
                    cloud.push(n);
                    out.cloud_reasons.push(r.into());
                }
                Err(r) => out.rejected.push((n, r.into())),
            }
        }
        out.edge = self.phase(cluster, t, edge, false);
        out.cloud = self.phase(cluster, t, cloud, true);
        out.members = members;
        out
    }

    fn phase(&self, cluster: &Cluster, t: usize, nodes: Vec<usize>, fallback_phase: bool) -> Phase {
        let ranges = self.ranges(cluster, &nodes);
        let ctx = self.ctx(cluster, &self.targets[t].target.group, ranges, fallback_phase);
        let static_scores = nodes
            .iter()
            .map(|&n| {
                let node = ctx.node(n);
                self.static_scores.iter().map(|(s, w)| w * s.score(&ctx, node)).sum()
            })
            .collect();
        let mut eligible: Vec<u32> = nodes.iter().filter_map(|&n| self.hard_spread_domain(cluster, n)).collect();
        eligible.sort_unstable();
        eligible.dedup();
        Phase { nodes, static_scores, ranges, eligible: Arc::new(eligible) }
    }

    fn ranges(&self, cluster: &Cluster, cands: &[usize]) -> Ranges {
        let ctx = self.ctx(cluster, "", Ranges::default(), false);
        let range = |vals: &mut dyn Iterator<Item = f64>| {
            vals.fold(None, |acc: Option<(f64, f64)>, v| Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v)))))
        };
        Ranges {
            rtt: range(&mut cands.iter().filter_map(|&n| ctx.rtt(n))),
            cost: range(&mut cands.iter().filter_map(|&n| ctx.cost(n).map(|(c, _)| c))),
        }
    }

    fn spread_key(&self, cluster: &Cluster, n: usize) -> i64 {
        match self.hard_spread_domain(cluster, n) {
            Some(d) => -i64::from(self.spread_counts.get(&d).copied().unwrap_or(0)),
            None => 0,
        }
    }

    fn dynamic_score(&self, ctx: &Context, n: usize) -> i64 {
        let node = ctx.node(n);
        self.dynamic_scores.iter().map(|(s, w)| w * s.score(ctx, node)).sum()
    }

    fn round(&self, cluster: &Cluster, t: usize, phase: &Phase, fallback_phase: bool) -> Round {
        let ctx = self.ctx(cluster, &self.targets[t].target.group, phase.ranges, fallback_phase);
        let spread = self.req.placement.spread.map(|s| s.by);
        let entries = phase.nodes.iter().zip(&phase.static_scores);
        let candidates = if spread.is_none() || spread == Some(TopologyKey::Node) {
            Candidates::Flat(
                entries
                    .map(|(&n, &st)| (self.spread_key(cluster, n), st + self.dynamic_score(&ctx, n), Reverse(n), st))
                    .collect(),
            )
        } else {
            let mut nodes: HashMap<u32, BinaryHeap<Entry>> = HashMap::new();
            for (&n, &st) in entries {
                if let Some(d) = self.hard_spread_domain(cluster, n) {
                    nodes.entry(d).or_default().push((0, st + self.dynamic_score(&ctx, n), Reverse(n), st));
                }
            }
            let domains = nodes
                .iter()
                .filter_map(|(&d, h)| {
                    let &(_, score, node, _) = h.peek()?;
                    Some((-i64::from(self.spread_counts.get(&d).copied().unwrap_or(0)), score, node, d))
                })
                .collect();
            Candidates::ByDomain { domains, nodes }
        };
        let mut levels = BTreeMap::new();
        if spread.is_some() {
            for d in phase.eligible.iter() {
                *levels.entry(self.spread_counts.get(d).copied().unwrap_or(0)).or_default() += 1;
            }
        }
        Round {
            candidates,
            ranges: phase.ranges,
            fallback_phase,
            levels,
            eligible: Arc::clone(&phase.eligible),
            skew_noted: false,
        }
    }

    /// Pops the best valid entry of a lazily re-scored heap: nodes failing
    /// a dynamic filter are dropped (bookings only grow), nodes whose key
    /// fell go back with their current key. `flat`: the key leads with the
    /// node's spread count.
    fn settle(
        &mut self,
        cluster: &Cluster,
        group: &str,
        round: (Ranges, bool),
        heap: &mut BinaryHeap<Entry>,
        flat: bool,
    ) -> Option<Entry> {
        loop {
            let (key, total, Reverse(n), st) = heap.pop()?;
            let ctx = self.ctx(cluster, group, round.0, round.1);
            let node = ctx.node(n);
            if let Some(r) = filter::DYNAMIC.iter().find_map(|f| f.filter(&ctx, node).err()) {
                self.reject(n, r);
                continue;
            }
            let now = (if flat { self.spread_key(cluster, n) } else { 0 }, st + self.dynamic_score(&ctx, n));
            if now < (key, total) {
                heap.push((now.0, now.1, Reverse(n), st));
                continue;
            }
            return Some((key, total, Reverse(n), st));
        }
    }

    /// Picks the best node of the round and books one instance there.
    /// Returns the node and why it was chosen.
    fn pick(&mut self, cluster: &mut Cluster, t: usize, round: &mut Round) -> Option<(usize, String)> {
        let group = self.targets[t].target.group.clone();
        let params = (round.ranges, round.fallback_phase);
        let mut candidates = std::mem::replace(&mut round.candidates, Candidates::Flat(BinaryHeap::new()));
        let picked = match &mut candidates {
            Candidates::Flat(heap) => self.settle(cluster, &group, params, heap, true).map(|e| (e, None)),
            Candidates::ByDomain { domains, nodes } => loop {
                let Some((key, score, node, d)) = domains.pop() else { break None };
                let Some(heap) = nodes.get_mut(&d) else { continue };
                let Some(e) = self.settle(cluster, &group, params, heap, false) else { continue };
                let now = (-i64::from(self.spread_counts.get(&d).copied().unwrap_or(0)), e.1, e.2);
                if now < (key, score, node) {
                    heap.push(e);
                    domains.push((now.0, now.1, now.2, d));
                    continue;
                }
                break Some((e, Some(d)));
            },
        };
        let result = picked.map(|((_, _, Reverse(n), st), domain)| {
            let reason = self.accept(cluster, &group, round, n);
            let ctx = self.ctx(cluster, &group, params.0, params.1);
            let score = st + self.dynamic_score(&ctx, n);
            match (&mut candidates, domain) {
                (Candidates::Flat(heap), _) => heap.push((self.spread_key(cluster, n), score, Reverse(n), st)),
                (Candidates::ByDomain { domains, nodes }, Some(d)) => {
                    if let Some(heap) = nodes.get_mut(&d) {
                        heap.push((0, score, Reverse(n), st));
                        if let Some(&(_, best, node, _)) = heap.peek() {
                            let count = self.spread_counts.get(&d).copied().unwrap_or(0);
                            domains.push((-i64::from(count), best, node, d));
                        }
                    }
                }
                (Candidates::ByDomain { .. }, None) => {}
            }
            (n, reason)
        });
        round.candidates = candidates;
        result
    }

    /// Books one instance on `n` and says why it went there.
    fn accept(&mut self, cluster: &mut Cluster, group: &str, round: &mut Round, n: usize) -> String {
        let mut reason = {
            let ctx = self.ctx(cluster, group, round.ranges, round.fallback_phase);
            self.lead.explain(&ctx, ctx.node(n))
        };
        if let (Some(s), Some(d)) = (self.req.placement.spread, self.hard_spread_domain(cluster, n)) {
            let count = self.spread_counts.get(&d).copied().unwrap_or(0);
            let min = round.levels.keys().next().copied().unwrap_or(0);
            if count + 1 - min.min(count + 1) > s.max_skew {
                reason.push_str(&format!("; spread by {} cannot keep maxSkew {}", s.by.as_str(), s.max_skew));
                if !round.skew_noted {
                    round.skew_noted = true;
                    self.notes.push(format!(
                        "spread by {} cannot keep maxSkew {}: the less loaded domains have no node that fits, so instances went to the least loaded one that does",
                        s.by.as_str(),
                        s.max_skew
                    ));
                }
            }
            if round.eligible.binary_search(&d).is_ok() {
                if let Some(c) = round.levels.get_mut(&count) {
                    *c -= 1;
                    if *c == 0 {
                        round.levels.remove(&count);
                    }
                }
                *round.levels.entry(count + 1).or_default() += 1;
            }
            *self.spread_counts.entry(d).or_default() += 1;
        }
        cluster.book_at(n, &self.req.resources);
        cluster.add_instance(self.req.app, n);
        self.placed.add(cluster, n);
        reason
    }

    /// The group a new instance is placed for.
    fn bind_group(&self, cluster: &Cluster, t: usize, n: usize) -> String {
        let g = &self.targets[t].target.group;
        if !g.is_empty() || self.app_groups.is_empty() {
            return g.clone();
        }
        cluster.node_groups[n]
            .iter()
            .find(|g| self.app_groups.binary_search(g).is_ok())
            .map(|&g| cluster.groups[g as usize].name.clone())
            .unwrap_or_default()
    }

    fn bind(&mut self, cluster: &Cluster, t: usize, n: usize, reason: String, replaces: Option<String>) {
        let group = self.bind_group(cluster, t, n);
        self.decision.create.push(Bind { node: cluster.nodes[n].name.clone(), group, reason, replaces });
    }

    /// Instances kept on cloud-tier nodes only because of the fallback.
    fn fallback_instances(&self, cluster: &Cluster, t: usize) -> Vec<(String, usize)> {
        if self.req.placement.fallback.is_none() {
            return Vec::new();
        }
        let group = &self.targets[t].target.group;
        let ctx = self.ctx(cluster, group, Ranges::default(), false);
        self.targets[t]
            .kept
            .iter()
            .filter(|(_, n)| cluster.tier[*n] == Tier::Cloud && TierAllowed.filter(&ctx, ctx.node(*n)).is_err())
            .cloned()
            .collect()
    }

    fn place_target(&mut self, cluster: &mut Cluster, t: usize) {
        let want = (self.targets[t].target.count as usize).saturating_sub(self.targets[t].kept.len());
        let mut on_cloud = self.fallback_instances(cluster, t);
        if want == 0 && on_cloud.is_empty() {
            return;
        }
        let prepared = self.prepare(cluster, t);
        self.targets[t].prepared = Some(Arc::clone(&prepared));
        let mut round = self.round(cluster, t, &prepared.edge, false);
        let mut left = want;
        while left > 0 {
            let Some((n, reason)) = self.pick(cluster, t, &mut round) else { break };
            self.bind(cluster, t, n, reason, None);
            left -= 1;
        }
        if left == 0 {
            // Fallback return: make-before-break moves to the edge.
            on_cloud.sort();
            for (instance, from) in on_cloud {
                let Some((n, reason)) = self.pick(cluster, t, &mut round) else { break };
                let from = cluster.nodes[from].name.clone();
                let reason = format!("back to the edge, replacing {instance} on {from}: {reason}");
                self.replaced.insert(instance.clone(), cluster.nodes[n].name.clone());
                self.bind(cluster, t, n, reason, Some(instance));
            }
        }
        let fallback_round = left > 0 && !prepared.cloud.nodes.is_empty();
        self.static_rejections.push((Arc::clone(&prepared), !fallback_round));
        if fallback_round {
            let why = self.summary(&prepared.members, |n| cluster.tier[n] == Tier::Edge);
            let why = if why.is_empty() { "no edge nodes".to_string() } else { why };
            let mut round = self.round(cluster, t, &prepared.cloud, true);
            while left > 0 {
                let Some((n, reason)) = self.pick(cluster, t, &mut round) else { break };
                self.bind(cluster, t, n, format!("fallback: no edge node fits ({why}); {reason}"), None);
                left -= 1;
            }
        }
        self.targets[t].unplaced = left as u32;
    }

    fn place_every_node(&mut self, cluster: &mut Cluster) {
        let prepared = self.prepare(cluster, 0);
        self.static_rejections.push((Arc::clone(&prepared), true));
        self.targets[0].prepared = Some(Arc::clone(&prepared));
        let eligible = prepared.edge.nodes.len();
        let mut misfits = Vec::new();
        for &n in &prepared.edge.nodes {
            if self.placed.on_node(n) > 0 {
                continue;
            }
            let misfit = {
                let ctx = self.ctx(cluster, "", Ranges::default(), false);
                let node = ctx.node(n);
                filter::DYNAMIC.iter().find_map(|f| f.filter(&ctx, node).err())
            };
            if let Some(r) = misfit {
                self.reject(n, r);
                misfits.push(n);
                continue;
            }
            cluster.book_at(n, &self.req.resources);
            cluster.add_instance(self.req.app, n);
            self.placed.add(cluster, n);
            self.bind(cluster, 0, n, "everyNode: one instance on every node that passes the filters".into(), None);
        }
        self.targets[0].unplaced = misfits.len() as u32;
        if !misfits.is_empty() {
            let why = self.summary(&misfits, |_| true);
            self.notes.push(format!("{} of {eligible} eligible nodes cannot run an instance: {why}", misfits.len()));
        }
    }

    /// Why the node was rejected: a static reason first, then a dynamic one.
    fn reason(&self, n: usize) -> Option<&str> {
        for (p, with_cloud) in &self.static_rejections {
            if let Ok(i) = p.rejected.binary_search_by_key(&n, |(m, _)| *m) {
                return Some(&p.rejected[i].1);
            }
            if *with_cloud {
                if let Ok(i) = p.cloud.nodes.binary_search(&n) {
                    return Some(&p.cloud_reasons[i]);
                }
            }
        }
        self.rejections.get(&n).map(String::as_str)
    }

    /// The first `limit` rejected nodes by name that do not host the App,
    /// each with its first reason.
    fn first_rejections(&self, limit: usize) -> Vec<(usize, &str)> {
        let free = |n: &usize| self.placed.on_node(*n) == 0;
        let mut all: Vec<(usize, &str)> = Vec::new();
        for (p, with_cloud) in &self.static_rejections {
            all.extend(p.rejected.iter().filter(|(n, _)| free(n)).take(limit).map(|(n, r)| (*n, &**r)));
            if *with_cloud {
                let cloud = p.cloud.nodes.iter().zip(&p.cloud_reasons).filter(|(n, _)| free(n));
                all.extend(cloud.take(limit).map(|(n, r)| (*n, &**r)));
            }
        }
        all.extend(self.rejections.iter().filter(|(n, _)| free(n)).take(limit).map(|(n, r)| (*n, r.as_str())));
        all.sort_by_key(|(n, _)| *n);
        all.dedup_by_key(|(n, _)| *n);
        all.truncate(limit);
        all
    }

    /// `3 insufficient memory, 1 not ready`: the rejection categories of
    /// the given nodes, most frequent first.
    fn summary(&self, nodes: &[usize], include: impl Fn(usize) -> bool) -> String {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for &n in nodes {
            if !include(n) {
                continue;
            }
            if let Some(r) = self.reason(n) {
                *counts.entry(filter::category(r)).or_default() += 1;
            }
        }
        let mut v: Vec<(&str, u32)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.iter().map(|(c, k)| format!("{k} {c}")).collect::<Vec<_>>().join(", ")
    }

    // ------------------------------------------------------------ result

    fn groups_phrase(&self, target_group: &str) -> String {
        if !target_group.is_empty() {
            format!("not in group {target_group}")
        } else {
            format!("not in groups [{}]", self.req.placement.groups.join(" "))
        }
    }

    fn finish(mut self, cluster: &Cluster) -> Decision {
        let total = cluster.nodes.len();
        let mut messages = Vec::new();
        for t in 0..self.targets.len() {
            let s = &self.targets[t];
            if s.unplaced == 0 || self.every_node {
                continue;
            }
            let members = match &s.prepared {
                Some(p) => p.members.clone(),
                None => self.members(cluster, &s.target.group),
            };
            let mut why = self.summary(&members, |_| true);
            let outside = total - members.len();
            if outside > 0 {
                let phrase = format!("{outside} {}", self.groups_phrase(&s.target.group));
                why = if why.is_empty() { phrase } else { format!("{why}, {phrase}") };
            }
            if why.is_empty() {
                why = "no nodes".to_string();
            }
            let prefix = if s.target.group.is_empty() { String::new() } else { format!("group {}: ", s.target.group) };
            messages.push(format!("{prefix}0/{total} nodes available: {why}"));
        }
        messages.append(&mut self.notes);
        self.decision.message = messages.join("; ");
        self.decision.unplaced = self.targets.iter().fold(0u32, |a, t| a.saturating_add(t.unplaced));

        // Kept instances and why they are where they are.
        let mut kept: Vec<(String, usize, usize)> = Vec::new();
        for (t, s) in self.targets.iter().enumerate() {
            kept.extend(s.kept.iter().map(|(i, n)| (i.clone(), *n, t)));
        }
        kept.sort();
        for (instance, n, t) in &kept {
            let node = &cluster.nodes[*n];
            let group = &self.targets[*t].target.group;
            let ctx = self.ctx(cluster, group, Ranges::default(), false);
            let why = if let Some(to) = self.replaced.get(instance) {
                format!("kept on {} until its replacement on {to} is Running", node.name)
            } else if !node.ready {
                let r = if node.not_ready_reason.is_empty() { "NotReady" } else { node.not_ready_reason.as_str() };
                format!("kept on {}: not ready ({r}) but not lost", node.name)
            } else if cluster.tier[*n] == Tier::Cloud && TierAllowed.filter(&ctx, ctx.node(*n)).is_err() {
                format!("kept on {}: fallback: no edge node had room", node.name)
            } else {
                format!("kept on {} (still passes the filters): {}", node.name, self.lead.explain(&ctx, ctx.node(*n)))
            };
            self.decision.explanations.push((instance.clone(), why));
        }
        self.decision.keep = kept.into_iter().map(|(i, _, _)| i).collect();
        self.decision.evict.sort();

        // Rejections: nodes not hosting the App, first by name.
        let mut out: Vec<(usize, String)> = Vec::new();
        // Per-group targets restrict nodes to their groups, else
        // `placement.groups` does.
        let target_groups: Vec<&str> =
            self.targets.iter().map(|t| t.target.group.as_str()).filter(|g| !g.is_empty()).collect();
        let mut scope: Vec<u32> = target_groups.iter().filter_map(|g| cluster.group_id(g)).collect();
        let outside_reason = match target_groups.as_slice() {
            [one] => Some(format!("not in group {one}")),
            [] if self.req.placement.groups.is_empty() => None,
            [] => {
                scope = self.app_groups.clone();
                Some(self.groups_phrase(""))
            }
            many => Some(format!("not in groups [{}]", many.join(" "))),
        };
        scope.sort_unstable();
        let inside = |n: usize| cluster.node_groups[n].iter().any(|g| scope.binary_search(g).is_ok());
        let first = self.first_rejections(MAX_REJECTIONS);
        let mut rej = first.iter().peekable();
        let mut next_outside = 0usize;
        while out.len() < MAX_REJECTIONS {
            // Next node outside the groups, when those are reported.
            let outside = match (&outside_reason, self.evaluated) {
                (Some(_), true) => {
                    while next_outside < total && inside(next_outside) {
                        next_outside += 1;
                    }
                    (next_outside < total).then_some(next_outside)
                }
                _ => None,
            };
            match (rej.peek(), outside) {
                (Some(&&(n, _)), Some(o)) if o < n => {
                    out.push((o, outside_reason.clone().unwrap_or_default()));
                    next_outside += 1;
                }
                (Some(_), _) => {
                    let &(n, r) = rej.next().expect("peeked");
                    out.push((n, r.to_string()));
                }
                (None, Some(o)) => {
                    out.push((o, outside_reason.clone().unwrap_or_default()));
                    next_outside += 1;
                }
                (None, None) => break,
            }
        }
        self.decision.rejections =
            out.into_iter().map(|(n, reason)| NodeRejection { node: cluster.nodes[n].name.clone(), reason }).collect();
        self.decision
    }
}
