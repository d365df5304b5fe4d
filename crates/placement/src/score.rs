//! Score plugins: among the nodes that pass the filters, which is best?
//!
//! Each plugin scores a node (higher is better; most range over
//! 0..=[`MAX_SCORE`]); the policy's weights ([`weights`]) sum them. Scores
//! may only fall as this call places instances (more instances on a node,
//! more of it requested), which lets the scheduler keep candidates in a
//! heap and re-score lazily. Ties break by node name.
//!
//! | policy      | weights                                                        |
//! |-------------|----------------------------------------------------------------|
//! | balanced    | NodeSpread 2, LeastRequested 1, AffinityPreference 1           |
//! | latency     | LowestLatency 4, NodeSpread 1, LeastRequested 1, Affinity… 1   |
//! | cost        | LowestCost 4, NodeSpread 1, LeastRequested 1, Affinity… 1      |
//! | reliability | Reliability 2, NodeSpread 3, LeastRequested 1, Affinity… 1     |

use yunbian_api::PlacementPolicy;

use crate::context::{Context, NodeRef};
use crate::quantity;

/// The best score of a plugin; [`NodeSpread`] goes below 0.
pub const MAX_SCORE: i64 = 1_000_000;

/// One score plugin.
pub trait Score: Sync {
    /// Short name (`LeastRequested`).
    fn name(&self) -> &'static str;
    /// Whether the score changes as this call places instances (it may
    /// only fall).
    fn dynamic(&self) -> bool {
        false
    }
    /// The node's score; higher is better.
    fn score(&self, ctx: &Context, node: NodeRef) -> i64;
    /// Why this plugin likes the node, for the policy it leads
    /// (`least loaded (cpu 12%, memory 30%)`).
    fn explain(&self, ctx: &Context, node: NodeRef) -> String;
}

/// Fewer instances of the App on the node: −MAX per instance.
pub struct NodeSpread;
/// Lowest requested share of cpu and memory after placing.
pub struct LeastRequested;
/// Lowest RTT from the latency location, relative to the other candidates;
/// nodes without a measurement rank last.
pub struct LowestLatency;
/// Lowest `costPerCpuHour` of the node's groups, relative to the other
/// candidates; unknown cost ranks last.
pub struct LowestCost;
/// Long uptime (up to a week) and few failures in 24 h.
pub struct Reliability;
/// More instances of the `affinity` Apps nearby.
pub struct AffinityPreference;

/// Plugins and weights for a policy; the first one leads (its explanation
/// is the placement's reason).
pub fn weights(policy: PlacementPolicy) -> &'static [(&'static dyn Score, i64)] {
    static BALANCED: [(&dyn Score, i64); 3] = [(&LeastRequested, 1), (&NodeSpread, 2), (&AffinityPreference, 1)];
    static LATENCY: [(&dyn Score, i64); 4] =
        [(&LowestLatency, 4), (&NodeSpread, 1), (&LeastRequested, 1), (&AffinityPreference, 1)];
    static COST: [(&dyn Score, i64); 4] =
        [(&LowestCost, 4), (&NodeSpread, 1), (&LeastRequested, 1), (&AffinityPreference, 1)];
    static RELIABILITY: [(&dyn Score, i64); 4] =
        [(&Reliability, 2), (&NodeSpread, 3), (&LeastRequested, 1), (&AffinityPreference, 1)];
    match policy {
        PlacementPolicy::Balanced => &BALANCED,
        PlacementPolicy::Latency => &LATENCY,
        PlacementPolicy::Cost => &COST,
        PlacementPolicy::Reliability => &RELIABILITY,
    }
}

/// `value` in `range` mapped to MAX/10..=MAX, lower values scoring higher;
/// `None` (unknown) scores 0.
fn lower_is_better(value: Option<f64>, range: Option<(f64, f64)>) -> i64 {
    let (Some(v), Some((lo, hi))) = (value, range) else { return 0 };
    if hi <= lo {
        return MAX_SCORE;
    }
    let rel = ((hi - v) / (hi - lo)).clamp(0.0, 1.0);
    MAX_SCORE / 10 + (rel * (MAX_SCORE - MAX_SCORE / 10) as f64) as i64
}

/// `part/whole` in MAX units (whole 0: full when part > 0).
fn share(part: u64, whole: u64) -> i64 {
    if whole == 0 {
        return if part == 0 { 0 } else { MAX_SCORE };
    }
    let scaled = match part.checked_mul(MAX_SCORE as u64) {
        Some(p) => p / whole,
        None => (part as u128 * MAX_SCORE as u128 / whole as u128).min(u64::MAX as u128) as u64,
    };
    scaled.min(MAX_SCORE as u64) as i64
}

impl Score for NodeSpread {
    fn name(&self) -> &'static str {
        "NodeSpread"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn score(&self, ctx: &Context, node: NodeRef) -> i64 {
        -(ctx.placed.on_node(node.index) as i64) * MAX_SCORE
    }
    fn explain(&self, ctx: &Context, node: NodeRef) -> String {
        format!("{} instance(s) of {} on the node", ctx.placed.on_node(node.index), ctx.request.app)
    }
}

impl Score for LeastRequested {
    fn name(&self) -> &'static str {
        "LeastRequested"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn score(&self, ctx: &Context, node: NodeRef) -> i64 {
        let (n, r) = (node.facts, &ctx.request.resources);
        let cpu = share(n.requested.cpu_millis.saturating_add(r.cpu_millis), n.allocatable.cpu_millis);
        let mem = share(n.requested.memory_bytes.saturating_add(r.memory_bytes), n.allocatable.memory_bytes);
        MAX_SCORE - (cpu + mem) / 2
    }
    fn explain(&self, _: &Context, node: NodeRef) -> String {
        let n = node.facts;
        format!(
            "least loaded (cpu {}, memory {})",
            quantity::percent(n.requested.cpu_millis, n.allocatable.cpu_millis),
            quantity::percent(n.requested.memory_bytes, n.allocatable.memory_bytes)
        )
    }
}

impl Score for LowestLatency {
    fn name(&self) -> &'static str {
        "LowestLatency"
    }
    fn score(&self, ctx: &Context, node: NodeRef) -> i64 {
        lower_is_better(ctx.rtt(node.index), ctx.ranges.rtt)
    }
    fn explain(&self, ctx: &Context, node: NodeRef) -> String {
        let loc = ctx.location();
        match (ctx.rtt(node.index), ctx.ranges.rtt) {
            (Some(rtt), Some((lo, _))) if rtt <= lo => format!("lowest RTT from {loc} ({rtt:.1} ms)"),
            (Some(rtt), Some((lo, _))) => {
                format!("low RTT from {loc} ({rtt:.1} ms; the nearest, {lo:.1} ms, are full or spread)")
            }
            (Some(rtt), None) => format!("RTT from {loc} {rtt:.1} ms"),
            _ => format!("no RTT measured from {loc} (ranked last)"),
        }
    }
}

impl Score for LowestCost {
    fn name(&self) -> &'static str {
        "LowestCost"
    }
    fn score(&self, ctx: &Context, node: NodeRef) -> i64 {
        lower_is_better(ctx.cost(node.index).map(|(c, _)| c), ctx.ranges.cost)
    }
    fn explain(&self, ctx: &Context, node: NodeRef) -> String {
        match (ctx.cost(node.index), ctx.ranges.cost) {
            (Some((c, g)), Some((lo, _))) if c <= lo => format!("cheapest group {g} ({c}/cpu-h)"),
            (Some((c, g)), Some((lo, _))) => {
                format!("group {g} ({c}/cpu-h; the cheapest, {lo}/cpu-h, are full or spread)")
            }
            (Some((c, g)), None) => format!("group {g} ({c}/cpu-h)"),
            _ => "no group cost known (ranked last)".to_string(),
        }
    }
}

/// Uptime that earns the full uptime half of [`Reliability`].
const WEEK_SECS: u64 = 7 * 86_400;

impl Score for Reliability {
    fn name(&self) -> &'static str {
        "Reliability"
    }
    fn score(&self, _: &Context, node: NodeRef) -> i64 {
        let n = node.facts;
        let up = share(n.uptime_secs.min(WEEK_SECS), WEEK_SECS);
        let failures = MAX_SCORE / (1 + i64::from(n.recent_failures));
        (up + failures) / 2
    }
    fn explain(&self, _: &Context, node: NodeRef) -> String {
        let n = node.facts;
        format!("reliable (up {}, {} failures in 24h)", quantity::duration(n.uptime_secs), n.recent_failures)
    }
}

impl Score for AffinityPreference {
    fn name(&self) -> &'static str {
        "AffinityPreference"
    }
    fn score(&self, ctx: &Context, node: NodeRef) -> i64 {
        let (mut sum, mut terms) = (0, 0);
        for t in ctx.affinity.iter().filter(|t| !t.is_self) {
            sum += MAX_SCORE * i64::from(t.count_near(ctx, node.index).min(4)) / 4;
            terms += 1;
        }
        if terms == 0 {
            0
        } else {
            sum / terms
        }
    }
    fn explain(&self, ctx: &Context, node: NodeRef) -> String {
        let near: Vec<String> = ctx
            .affinity
            .iter()
            .filter(|t| !t.is_self)
            .map(|t| format!("{} {}", t.count_near(ctx, node.index), t.app))
            .collect();
        format!("next to {}", near.join(", "))
    }
}
