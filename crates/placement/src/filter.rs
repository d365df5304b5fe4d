//! Filter plugins: may this node take one more instance of the App?
//!
//! A rejection is a sentence a user reads in `yunbian describe app`, in
//! the form `category (detail)`: `insufficient memory (requests 256Mi,
//! free 120Mi)`. The category (the text before ` (`) is what the summary
//! message counts: `0/12 nodes available: 3 insufficient memory`.
//!
//! Static filters depend only on the node and on other Apps, so they run
//! once per App and node; dynamic ones ([`Filter::dynamic`]) change as this
//! call places instances and run each time a node is picked. Filters with
//! [`Filter::evicts`] also apply to running instances: a node that stops
//! passing them makes its instances move.

use yunbian_api::{Tier, TopologyKey};

use crate::context::{Context, NodeRef};
use crate::quantity;

/// One filter plugin.
pub trait Filter: Sync {
    /// Short name (`NodeReady`).
    fn name(&self) -> &'static str;
    /// Whether the answer can change as this call places instances.
    fn dynamic(&self) -> bool {
        false
    }
    /// Whether an instance already on a node that fails it must move.
    fn evicts(&self) -> bool {
        false
    }
    /// `Ok` when the node may take an instance, else the reason.
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String>;
}

/// Ready, not lost and not cordoned.
pub struct NodeReady;
/// Labels contain `placement.nodeSelector`.
pub struct NodeSelector;
/// Member of the target group, or of any of `placement.groups`.
pub struct Groups;
/// Offers the App's runtime.
pub struct RuntimeOffered;
/// `requirements.arch`.
pub struct Arch;
/// `requirements.os`.
pub struct Os;
/// The App's artifact has a blob for the node's platform (or a wasm one).
pub struct ArtifactPlatform;
/// `requirements.minFreeDisk`.
pub struct MinFreeDisk;
/// `latency.maxLatencyMs` from the latency location.
pub struct MaxLatency;
/// Next to at least one instance of each `affinity` App.
pub struct Affinity;
/// Away from the instances of each `antiAffinity` App (other Apps; see
/// [`SelfAntiAffinity`]).
pub struct AntiAffinity;
/// Edge nodes; cloud nodes only when a target group is a cloud group, or
/// as `fallback: cloud`.
pub struct TierAllowed;
/// Free CPU ≥ the request.
pub struct Cpu;
/// Free memory ≥ the request.
pub struct Memory;
/// Free extended resources ≥ the request.
pub struct Extended;
/// An App listing itself in `antiAffinity` keeps its instances apart.
pub struct SelfAntiAffinity;

/// Static filters, in the order they run (the first failure is the reason).
pub static STATIC: [&dyn Filter; 11] = [
    &NodeReady,
    &NodeSelector,
    &Groups,
    &RuntimeOffered,
    &Arch,
    &Os,
    &ArtifactPlatform,
    &MinFreeDisk,
    &MaxLatency,
    &Affinity,
    &AntiAffinity,
];

/// Dynamic filters, run each time a node is picked.
pub static DYNAMIC: [&dyn Filter; 4] = [&Cpu, &Memory, &Extended, &SelfAntiAffinity];

/// The category of a reason: the text before ` (`.
pub fn category(reason: &str) -> &str {
    reason.split_once(" (").map_or(reason, |(c, _)| c)
}

fn list(v: &[String]) -> String {
    v.join(", ")
}

/// `have` is one of `want` (empty: anything), or why not.
fn listed(field: &str, have: &str, want: &[String]) -> Result<(), String> {
    if want.is_empty() || want.iter().any(|w| w == have) {
        Ok(())
    } else {
        Err(format!("{field} (node is {have:?}, wants {})", list(want)))
    }
}

impl Filter for NodeReady {
    fn name(&self) -> &'static str {
        "NodeReady"
    }
    fn filter(&self, _: &Context, node: NodeRef) -> Result<(), String> {
        let n = node.facts;
        if n.lost {
            Err("lost (its instances are moving)".into())
        } else if !n.ready {
            let why = if n.not_ready_reason.is_empty() { "NotReady" } else { n.not_ready_reason.as_str() };
            Err(format!("not ready ({why})"))
        } else if n.unschedulable {
            Err("cordoned (spec.unschedulable)".into())
        } else {
            Ok(())
        }
    }
}

impl Filter for NodeSelector {
    fn name(&self) -> &'static str {
        "NodeSelector"
    }
    fn evicts(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        for (k, v) in &ctx.request.placement.node_selector {
            match node.facts.labels.get(k) {
                Some(have) if have == v => {}
                Some(have) => return Err(format!("node selector mismatch ({k}={have}, wants {k}={v})")),
                None => return Err(format!("node selector mismatch (no label {k}, wants {k}={v})")),
            }
        }
        Ok(())
    }
}

impl Filter for Groups {
    fn name(&self) -> &'static str {
        "Groups"
    }
    fn evicts(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let wanted: &[String] = &ctx.request.placement.groups;
        if !ctx.target_group.is_empty() {
            if node.facts.groups.iter().any(|g| g == ctx.target_group) {
                return Ok(());
            }
            return Err(format!("not in group {}", ctx.target_group));
        }
        if wanted.is_empty() || wanted.iter().any(|w| node.facts.groups.contains(w)) {
            Ok(())
        } else {
            Err(format!("not in groups [{}]", wanted.join(" ")))
        }
    }
}

impl Filter for RuntimeOffered {
    fn name(&self) -> &'static str {
        "RuntimeOffered"
    }
    fn evicts(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let rt = ctx.request.runtime;
        if rt.is_empty() || node.facts.runtimes.iter().any(|r| r == rt) {
            Ok(())
        } else {
            Err(format!("runtime {rt} not offered (offers {})", list(&node.facts.runtimes)))
        }
    }
}

impl Filter for Arch {
    fn name(&self) -> &'static str {
        "Arch"
    }
    fn evicts(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        listed("requirements.arch", &node.facts.arch, &ctx.request.placement.requirements.arch)
    }
}

impl Filter for Os {
    fn name(&self) -> &'static str {
        "Os"
    }
    fn evicts(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        listed("requirements.os", &node.facts.os, &ctx.request.placement.requirements.os)
    }
}

/// A node's artifact platform (`linux/amd64`), as edges pick blobs.
pub fn node_platform(os: &str, arch: &str) -> String {
    let arch = match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", if os.is_empty() { "linux" } else { os })
}

impl Filter for ArtifactPlatform {
    fn name(&self) -> &'static str {
        "ArtifactPlatform"
    }
    // Placement only: a registry between two pushes (one platform each) or
    // an artifact deleted and pushed again must not evict running
    // instances; a node that lacks its blob reports it on the instance.
    fn evicts(&self) -> bool {
        false
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let Some(have) = &ctx.request.platforms else { return Ok(()) };
        let platform = node_platform(&node.facts.os, &node.facts.arch);
        if have.iter().any(|p| *p == platform || p == yunbian_api::artifact::WASM_PLATFORM) {
            Ok(())
        } else {
            Err(format!("the artifact has no blob for {platform} (has {})", list(have)))
        }
    }
}

impl Filter for MinFreeDisk {
    fn name(&self) -> &'static str {
        "MinFreeDisk"
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let want = ctx.request.placement.requirements.min_free_disk_bytes();
        if node.facts.disk_free_bytes >= want {
            Ok(())
        } else {
            Err(format!(
                "insufficient disk (requirements.minFreeDisk {}, free {})",
                quantity::bytes(want),
                quantity::bytes(node.facts.disk_free_bytes)
            ))
        }
    }
}

impl Filter for MaxLatency {
    fn name(&self) -> &'static str {
        "MaxLatency"
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let Some(max) = ctx.request.placement.latency.as_ref().and_then(|l| l.max_latency_ms) else {
            return Ok(());
        };
        match ctx.rtt(node.index) {
            None => Err(format!("no RTT measured from {}", ctx.location())),
            Some(rtt) if rtt > max => {
                Err(format!("RTT above maxLatencyMs {max} ({rtt:.1} ms from {})", ctx.location()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Where a term looks: `on this node`, `in its groups`.
fn near(key: TopologyKey) -> &'static str {
    match key {
        TopologyKey::Node => "on this node",
        _ => "in its groups",
    }
}

impl Filter for Affinity {
    fn name(&self) -> &'static str {
        "Affinity"
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        // A term naming the App itself cannot hold for its first instance;
        // spread and the scores decide its own co-location instead.
        for t in ctx.affinity.iter().filter(|t| !t.is_self) {
            if !t.anywhere {
                return Err(format!("affinity with {} ({} has no instances anywhere)", t.app, t.app));
            }
            if t.count_near(ctx, node.index) == 0 {
                return Err(format!("affinity with {} (none {})", t.app, near(t.by)));
            }
        }
        Ok(())
    }
}

fn anti(ctx: &Context, node: NodeRef, want_self: bool) -> Result<(), String> {
    for t in ctx.anti_affinity.iter().filter(|t| t.is_self == want_self) {
        if t.count_near(ctx, node.index) > 0 {
            return Err(format!("anti-affinity with {} (one runs {})", t.app, near(t.by)));
        }
    }
    Ok(())
}

impl Filter for AntiAffinity {
    fn name(&self) -> &'static str {
        "AntiAffinity"
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        anti(ctx, node, false)
    }
}

impl Filter for SelfAntiAffinity {
    fn name(&self) -> &'static str {
        "SelfAntiAffinity"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        anti(ctx, node, true)
    }
}

impl TierAllowed {
    /// Whether the App names a cloud-tier group the node is in (the target
    /// group, or one of `placement.groups`): then cloud nodes are wanted.
    fn explicitly_cloud(ctx: &Context, node: NodeRef) -> bool {
        let c = ctx.cluster;
        let named = |g: &str| {
            c.group(g).is_some_and(|info| info.tier == Tier::Cloud) && node.facts.groups.iter().any(|n| n == g)
        };
        if !ctx.target_group.is_empty() {
            named(ctx.target_group)
        } else {
            ctx.request.placement.groups.iter().any(|g| named(g))
        }
    }
}

impl Filter for TierAllowed {
    fn name(&self) -> &'static str {
        "Tier"
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let tier = ctx.cluster.tier[node.index];
        match (ctx.fallback_phase, tier) {
            (false, Tier::Edge) => Ok(()),
            (false, Tier::Cloud) if Self::explicitly_cloud(ctx, node) => Ok(()),
            (false, Tier::Cloud) if ctx.request.placement.fallback.is_some() => {
                Err("tier cloud (only when no edge node fits: fallback: cloud)".into())
            }
            (false, Tier::Cloud) => Err("tier cloud (edge only without fallback: cloud)".into()),
            (true, Tier::Cloud) => Ok(()),
            (true, Tier::Edge) => Err("tier edge (the fallback round places on cloud nodes)".into()),
        }
    }
}

/// `want` fits in what `allocatable` has left after `requested`, or why not.
fn fits(what: &str, want: u64, allocatable: u64, requested: u64, show: fn(u64) -> String) -> Result<(), String> {
    let free = allocatable.saturating_sub(requested);
    if want <= free {
        Ok(())
    } else {
        Err(format!("insufficient {what} (requests {}, free {})", show(want), show(free)))
    }
}

impl Filter for Cpu {
    fn name(&self) -> &'static str {
        "Cpu"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let (a, r) = (&node.facts.allocatable, &node.facts.requested);
        fits("cpu", ctx.request.resources.cpu_millis, a.cpu_millis, r.cpu_millis, quantity::cpu)
    }
}

impl Filter for Memory {
    fn name(&self) -> &'static str {
        "Memory"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        let (a, r) = (&node.facts.allocatable, &node.facts.requested);
        fits("memory", ctx.request.resources.memory_bytes, a.memory_bytes, r.memory_bytes, quantity::bytes)
    }
}

impl Filter for Extended {
    fn name(&self) -> &'static str {
        "Extended"
    }
    fn dynamic(&self) -> bool {
        true
    }
    fn filter(&self, ctx: &Context, node: NodeRef) -> Result<(), String> {
        for (k, want) in &ctx.request.resources.extended {
            let have = node.facts.allocatable.extended.get(k).copied().unwrap_or(0);
            let used = node.facts.requested.extended.get(k).copied().unwrap_or(0);
            fits(k, *want, have, used, |n| n.to_string())?;
        }
        Ok(())
    }
}
