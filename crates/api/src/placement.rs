//! Global placement: where an App's instances go (`spec.placement`), what
//! happens when their node is lost (`spec.onNodeLost`), how their number
//! follows load (`spec.autoscale`) and how a new version reaches them
//! (`spec.rollout`), plus what the cloud reports back about each of these.
//!
//! These are types only; the scheduler (`yunbian-placement`), the App
//! controller and the rollout planner give them meaning.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{check_labels, check_name, join, Errors, Validate};

// ---------------------------------------------------------------- NodeGroup facts

/// Where a group's nodes run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// At the edge, near the devices (the default).
    #[default]
    Edge,
    /// In a cloud region: the fallback for `fallback: cloud`.
    Cloud,
}

impl Tier {
    /// The tier's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
        }
    }
}

// ---------------------------------------------------------------- Placement

/// How many instances an App runs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PlacementMode {
    /// `replicas` instances (or `perGroup.replicas` per group).
    #[default]
    Replicas,
    /// One instance on every selected node, including nodes that join later.
    EveryNode,
}

/// What the scheduler optimises once the filters have passed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PlacementPolicy {
    /// Spread, then least requested share.
    #[default]
    Balanced,
    /// Lowest measured RTT from `latency.fromGroup` / `latency.fromNode`.
    Latency,
    /// Lowest `costPerCpuHour` of the node's groups.
    Cost,
    /// Long uptime, few recent failures, and spread.
    Reliability,
}

/// The topology level a spread or an (anti-)affinity is counted at.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum TopologyKey {
    /// The node.
    #[default]
    Node,
    /// The NodeGroup (for a node in several, its first group by name among
    /// the App's `groups`, or overall).
    Group,
    /// The group's `zone`.
    Zone,
    /// The group's `region`.
    Region,
}

impl TopologyKey {
    /// The key's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyKey::Node => "node",
            TopologyKey::Group => "group",
            TopologyKey::Zone => "zone",
            TopologyKey::Region => "region",
        }
    }
}

/// `spread: {by: zone, maxSkew: 1}`: instance counts of the domains may
/// differ by at most `maxSkew`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spread {
    /// The domain.
    #[serde(default)]
    pub by: TopologyKey,
    /// Largest allowed difference between two domains' counts (default 1).
    #[serde(default = "one_u32")]
    pub max_skew: u32,
}

impl Default for Spread {
    fn default() -> Self {
        Spread { by: TopologyKey::Node, max_skew: 1 }
    }
}

fn one_u32() -> u32 {
    1
}

/// An affinity or anti-affinity term: with (or away from) the instances of
/// another App, counted per node or per group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppAffinity {
    /// The other App.
    pub app: String,
    /// `node` (the default) or `group`.
    #[serde(default)]
    pub by: TopologyKey,
}

/// What a node must have.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirements {
    /// Accepted CPU architectures (`x86_64`, `aarch64`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Accepted operating systems (`linux`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub os: Vec<String>,
    /// Extended resources each instance needs (`yunbian.io/gpu: 2`), from
    /// the nodes' device plugins. The node allocates them to the instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, u64>,
    /// Free disk the node must have on its data filesystem (`10Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_disk: Option<String>,
}

impl Requirements {
    /// `minFreeDisk` in bytes (0 when unset or invalid; validation rejects invalid).
    pub fn min_free_disk_bytes(&self) -> u64 {
        self.min_free_disk.as_deref().and_then(|m| crate::quantity::parse_memory_bytes(m).ok()).unwrap_or(0)
    }
}

/// `latency: {fromGroup: clients, maxLatencyMs: 50}` for `policy: latency`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySpec {
    /// Measure from the members of this group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_group: String,
    /// Measure from this node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_node: String,
    /// Nodes farther than this (measured) are rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<f64>,
}

/// Where instances go when the edge cannot take them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Fallback {
    /// `tier: cloud` nodes, until the edge can take the instances back.
    Cloud,
}

/// `perGroup: {replicas: 2}`: the same number of instances in every group
/// of `groups`, as one unit per site.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerGroup {
    /// Instances per group.
    pub replicas: i64,
}

/// What one group runs differently.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupOverride {
    /// The group (one of `placement.groups`).
    pub group: String,
    /// Instances in this group instead of `perGroup.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Environment set or replaced in this group.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Arguments instead of `process.args`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Artifact version instead of `artifact.version` (the digest pin, if
    /// any, is dropped: the edge resolves the version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_version: Option<String>,
}

/// Where an App's instances may go and how they are chosen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Only nodes whose labels contain all these pairs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Only members of these NodeGroups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The same number of instances in each of `groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_group: Option<PerGroup>,
    /// Per-group differences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<GroupOverride>,
    /// `replicas` (default) or `everyNode`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: PlacementMode,
    /// Keep instance counts even across domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// Run next to these Apps' instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<AppAffinity>,
    /// Never share a node (or group) with these Apps' instances; an App
    /// listing itself keeps its own instances apart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<AppAffinity>,
    /// What a node must have.
    #[serde(default, skip_serializing_if = "is_default")]
    pub requirements: Requirements,
    /// What to optimise.
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: PlacementPolicy,
    /// Settings of `policy: latency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySpec>,
    /// Where to go when no edge node fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Placement {
    /// The override for `group`, if any.
    pub fn override_for(&self, group: &str) -> Option<&GroupOverride> {
        self.overrides.iter().find(|o| o.group == group)
    }
}

// ---------------------------------------------------------------- onNodeLost

/// What happens to an App's instances when their node is lost.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum NodeLostAction {
    /// Replace them on other nodes (the default).
    #[default]
    Reschedule,
    /// Leave them: the node runs them on its own and will be back.
    Keep,
}

/// `onNodeLost: {action: reschedule, after: 10s}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnNodeLost {
    /// Reschedule or keep.
    #[serde(default)]
    pub action: NodeLostAction,
    /// How long heartbeats must be missing (default `10s`).
    #[serde(default = "ten_seconds")]
    pub after: String,
}

impl Default for OnNodeLost {
    fn default() -> Self {
        OnNodeLost { action: NodeLostAction::Reschedule, after: ten_seconds() }
    }
}

impl OnNodeLost {
    /// `after` in milliseconds (10 s when invalid; validation rejects invalid).
    pub fn after_ms(&self) -> u64 {
        crate::time::parse_duration_ms(&self.after).unwrap_or(10_000)
    }
}

fn ten_seconds() -> String {
    "10s".to_string()
}

// ---------------------------------------------------------------- autoscale

/// `autoscale: {min: 1, max: 10, metric: cpu, target: 70}`.
///
/// `metric` is `cpu` (percent of the instance's CPU request), `memory`
/// (percent of its memory request) or the name of a metric the app reports
/// (averaged over instances, compared with `target` as is).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest instances.
    pub min: i64,
    /// Most instances.
    pub max: i64,
    /// `cpu`, `memory` or a custom metric name.
    pub metric: String,
    /// The per-instance value to hold.
    pub target: f64,
    /// How long a lower recommendation must hold before scaling down
    /// (default `60s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_window: Option<String>,
    /// How long a higher recommendation must hold before scaling up
    /// (default `0s`: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_window: Option<String>,
}

// ---------------------------------------------------------------- rollout

/// A count or a percentage of replicas (`1`, `"25%"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrPercent {
    /// An absolute count.
    Int(i64),
    /// A percentage, `"25%"`.
    Percent(String),
}

impl IntOrPercent {
    /// The count for `total` replicas; percentages round up when `round_up`
    /// (surge) and down otherwise (unavailable), as Kubernetes does.
    pub fn resolve(&self, total: u64, round_up: bool) -> u64 {
        match self {
            IntOrPercent::Int(n) => u64::try_from(*n).unwrap_or(0),
            IntOrPercent::Percent(p) => {
                let pct: u64 = p.trim_end_matches('%').trim().parse().unwrap_or(0);
                let x = total.saturating_mul(pct);
                if round_up {
                    x.div_ceil(100)
                } else {
                    x / 100
                }
            }
        }
    }

    fn check(&self, path: &str, errs: &mut Errors) {
        match self {
            IntOrPercent::Int(n) if *n < 0 => errs.add(path, "must be >= 0"),
            IntOrPercent::Percent(p) => {
                let ok = p.ends_with('%') && p.trim_end_matches('%').parse::<u32>().is_ok_and(|n| n <= 100);
                if !ok {
                    errs.add(path, format!("{p:?} must be a count or a percentage from 0% to 100%"));
                }
            }
            _ => {}
        }
    }
}

/// The unit a rolling update counts `maxUnavailable` and `maxSurge` in.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RolloutUnit {
    /// Instances, anywhere (the default).
    #[default]
    Instance,
    /// Whole nodes: the instances of at most that many nodes at a time.
    Node,
    /// Whole groups: one site at a time (with `maxUnavailable: 1`).
    Group,
}

/// What happens when more than `maxFailures` new instances fail.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FailurePolicy {
    /// Go back to the last revision that completed (the default).
    #[default]
    Rollback,
    /// Stop where it is (phase Failed); `yunbian rollout undo` or a new
    /// template moves on.
    Pause,
}

/// One canary step: move a set of groups or a share of the instances to
/// the new revision, or pause.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStep {
    /// Update the instances in these groups (and those of earlier steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// Update this share of all instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Wait for `yunbian rollout resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    /// Wait this long, then go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_seconds: Option<u64>,
}

/// `canary: {steps: [...]}`. After the last step, the rest is rolled.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<CanaryStep>,
}

/// The only strategy: replace old instances with new ones a few at a time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RolloutStrategy {
    /// Rolling update.
    #[default]
    Rolling,
}

/// How a new revision replaces the running one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// `rolling`.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Old instances that may be down at once (default 1).
    #[serde(default = "one_int")]
    pub max_unavailable: IntOrPercent,
    /// New instances above the desired count (default 1).
    #[serde(default = "one_int")]
    pub max_surge: IntOrPercent,
    /// What `maxUnavailable` and `maxSurge` count.
    #[serde(default, skip_serializing_if = "is_default")]
    pub by: RolloutUnit,
    /// Canary steps before the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// A new instance counts as available after Running (and live) this long.
    #[serde(default)]
    pub min_ready_seconds: u32,
    /// Rollback (default) or pause.
    #[serde(default, skip_serializing_if = "is_default")]
    pub failure_policy: FailurePolicy,
    /// New instances that may fail before `failurePolicy` acts (default 0).
    #[serde(default)]
    pub max_failures: u32,
    /// Set by `yunbian rollout pause`: no further step is taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

fn one_int() -> IntOrPercent {
    IntOrPercent::Int(1)
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            strategy: RolloutStrategy::Rolling,
            max_unavailable: one_int(),
            max_surge: one_int(),
            by: RolloutUnit::Instance,
            canary: None,
            min_ready_seconds: 0,
            failure_policy: FailurePolicy::Rollback,
            max_failures: 0,
            paused: false,
        }
    }
}

// ---------------------------------------------------------------- App status parts

/// Why one instance is where it is (`yunbian describe app`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementDecision {
    /// The instance.
    pub instance: String,
    /// Its node.
    pub node: String,
    /// The group it was placed for (empty without groups).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Why this node (`lowest RTT from clients: 3.1 ms`, `fallback: no edge node fits`).
    pub reason: String,
}

/// Why a node was not chosen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeRejection {
    /// The node.
    pub node: String,
    /// `insufficient memory (requests 256Mi, free 120Mi)`.
    pub reason: String,
}

/// How far a rollout is.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum RolloutPhase {
    /// Every instance runs the current revision.
    #[default]
    Complete,
    /// Replacing instances.
    Progressing,
    /// Waiting at a pause step or for `rollout resume`.
    Paused,
    /// Too many new instances failed; back on the stable revision.
    RolledBack,
    /// Too many new instances failed and `failurePolicy: pause` stopped it.
    Failed,
}

/// The rollout's progress (`yunbian rollout status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutStatus {
    /// Phase.
    #[serde(default)]
    pub phase: RolloutPhase,
    /// The revision being rolled out (the App's current template).
    #[serde(default)]
    pub revision: u64,
    /// The last revision that completed.
    #[serde(default)]
    pub stable_revision: u64,
    /// Index of the canary step in progress (steps count from 0; equal to
    /// the number of steps when the canary is over).
    #[serde(default)]
    pub step: u32,
    /// RFC 3339 time the current step started (for `pauseSeconds`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub step_started: String,
    /// Instances on the current revision.
    #[serde(default)]
    pub updated_replicas: u32,
    /// Of those, available (Running for `minReadySeconds`).
    #[serde(default)]
    pub available_replicas: u32,
    /// New instances that failed during this rollout.
    #[serde(default)]
    pub failures: u32,
    /// Human detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One revision of an App's template (`yunbian rollout history`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppRevision {
    /// 1, 2, 3, … in order of creation.
    pub revision: u64,
    /// The App's template hash at this revision.
    pub hash: String,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created: String,
    /// The App's metadata.generation that created it.
    #[serde(default)]
    pub generation: u64,
    /// What changed (`artifact site-app 1.0 → 2.0`), when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub change: String,
    /// The template, so `rollout undo` can bring it back.
    #[serde(default)]
    pub template: crate::kinds::WorkloadTemplate,
    /// The per-group overrides in force at this revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<GroupOverride>,
}

/// What the autoscaler saw and decided.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscaleStatus {
    /// Replicas the autoscaler set.
    #[serde(default)]
    pub desired_replicas: u32,
    /// The metric's current per-instance average (absent without samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<f64>,
    /// RFC 3339 time of the last scale.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_scale: String,
    /// Why the count is what it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time a recommendation different from `desiredReplicas`
    /// first appeared (the stabilisation window runs from here).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pending_since: String,
    /// The count to scale to when the window has passed: the lowest
    /// recommendation seen since `pendingSince` when scaling up, the highest
    /// when scaling down (so a short dip or spike does not move it).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub pending_replicas: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

// ---------------------------------------------------------------- Node facts

/// An accelerator or other device a node reports (from its device plugins).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardwareDevice {
    /// The extended resource it counts towards (`yunbian.io/gpu`).
    pub resource: String,
    /// The plugin's id for it (`GPU-8e6c…`, `0`).
    pub id: String,
    /// Vendor and model (`NVIDIA A2`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Device memory, bytes (0 when unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_bytes: u64,
    /// Whether the plugin reports it usable.
    #[serde(default)]
    pub healthy: bool,
    /// The instance it is allocated to, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub allocated_to: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Measured round trip and loss on one path.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkQuality {
    /// Smoothed RTT, milliseconds (absent before the first answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Share of recent probes that got no answer, 0–1.
    #[serde(default)]
    pub loss: f64,
    /// Probes sent in the current window.
    #[serde(default)]
    pub samples: u32,
    /// Seconds since the peer last answered (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_secs: Option<u64>,
}

/// A node's view of the network: the cloud and the peers it probes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkStatus {
    /// The path to the cloud (measured over the node's session).
    #[serde(default)]
    pub cloud: LinkQuality,
    /// Peers by node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<String, LinkQuality>,
}

// ---------------------------------------------------------------- validation

impl Validate for Placement {
    fn validate(&self, path: &str, errs: &mut Errors) {
        check_labels(&join(path, "nodeSelector"), &self.node_selector, errs);
        let mut seen = std::collections::BTreeSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if let Err(m) = check_name(g) {
                errs.add(join(path, &format!("groups[{i}]")), m);
            } else if !seen.insert(g.as_str()) {
                errs.add(join(path, &format!("groups[{i}]")), format!("duplicate group {g:?}"));
            }
        }
        if let Some(pg) = &self.per_group {
            if self.groups.is_empty() {
                errs.add(join(path, "perGroup"), "needs placement.groups");
            }
            if !(0..=10_000).contains(&pg.replicas) {
                errs.add(join(path, "perGroup.replicas"), "must be from 0 to 10000");
            }
            if self.mode == PlacementMode::EveryNode {
                errs.add(join(path, "perGroup"), "does not apply to mode: everyNode");
            }
        }
        let mut overridden = std::collections::BTreeSet::new();
        for (i, o) in self.overrides.iter().enumerate() {
            let p = join(path, &format!("overrides[{i}]"));
            if !self.groups.contains(&o.group) {
                errs.add(join(&p, "group"), format!("{:?} is not one of placement.groups", o.group));
            } else if !overridden.insert(o.group.as_str()) {
                errs.add(join(&p, "group"), format!("{:?} is overridden twice", o.group));
            }
            if let Some(r) = o.replicas {
                if self.per_group.is_none() {
                    errs.add(join(&p, "replicas"), "needs placement.perGroup");
                } else if !(0..=10_000).contains(&r) {
                    errs.add(join(&p, "replicas"), "must be from 0 to 10000");
                }
            }
            for k in o.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    errs.add(join(&p, "env"), format!("{k:?} is not a valid variable name"));
                }
            }
            if let Some(v) = &o.artifact_version {
                if v.is_empty() {
                    errs.add(join(&p, "artifactVersion"), "must not be empty");
                }
            }
        }
        if let Some(s) = &self.spread {
            if s.max_skew == 0 {
                errs.add(join(path, "spread.maxSkew"), "must be >= 1");
            }
        }
        for (field, terms) in [("affinity", &self.affinity), ("antiAffinity", &self.anti_affinity)] {
            for (i, a) in terms.iter().enumerate() {
                let p = join(path, &format!("{field}[{i}]"));
                if let Err(m) = check_name(&a.app) {
                    errs.add(join(&p, "app"), m);
                }
                if !matches!(a.by, TopologyKey::Node | TopologyKey::Group) {
                    errs.add(join(&p, "by"), "must be node or group");
                }
            }
        }
        for (k, n) in &self.requirements.resources {
            let p = join(path, &format!("requirements.resources.{k}"));
            if !k.contains('/') || k.starts_with('/') || k.ends_with('/') {
                errs.add(&p, "extended resources are named domain/name (yunbian.io/gpu)");
            }
            if *n == 0 {
                errs.add(&p, "must be >= 1");
            }
        }
        if let Some(d) = &self.requirements.min_free_disk {
            if let Err(m) = crate::quantity::parse_memory_bytes(d) {
                errs.add(join(path, "requirements.minFreeDisk"), m);
            }
        }
        match (&self.policy, &self.latency) {
            (PlacementPolicy::Latency, None) => {
                errs.add(join(path, "latency"), "policy: latency needs latency.fromGroup or latency.fromNode")
            }
            (_, Some(l)) => {
                let p = join(path, "latency");
                if self.policy != PlacementPolicy::Latency {
                    errs.add(&p, "applies only to policy: latency");
                }
                match (l.from_group.is_empty(), l.from_node.is_empty()) {
                    (true, true) => errs.add(&p, "needs fromGroup or fromNode"),
                    (false, false) => errs.add(&p, "fromGroup and fromNode exclude each other"),
                    _ => {}
                }
                if let Some(m) = l.max_latency_ms {
                    if !(m.is_finite() && m > 0.0) {
                        errs.add(join(&p, "maxLatencyMs"), "must be a positive number");
                    }
                }
            }
            _ => {}
        }
    }
}

impl Validate for OnNodeLost {
    fn validate(&self, path: &str, errs: &mut Errors) {
        match crate::time::parse_duration_ms(&self.after) {
            Ok(ms) if ms < 1_000 => errs.add(join(path, "after"), "must be at least 1s"),
            Ok(_) => {}
            Err(e) => errs.add(join(path, "after"), e),
        }
    }
}

impl Validate for Autoscale {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.min < 1 {
            // From zero no instance reports the metric that would scale it up.
            errs.add(join(path, "min"), "must be >= 1 (an App scaled to zero reports nothing to scale it up again)");
        }
        if self.max < 1 || self.max > 100_000 {
            errs.add(join(path, "max"), "must be from 1 to 100000");
        } else if self.max < self.min {
            errs.add(join(path, "max"), "must be >= min");
        }
        if self.metric.is_empty() {
            errs.add(join(path, "metric"), "must be cpu, memory or a metric name");
        } else if !self.metric.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c)) {
            errs.add(join(path, "metric"), "must consist of letters, digits, '_', '-', '.' and ':'");
        }
        if !(self.target.is_finite() && self.target > 0.0) {
            errs.add(join(path, "target"), "must be a positive number");
        }
        for (field, w) in [("scaleDownWindow", &self.scale_down_window), ("scaleUpWindow", &self.scale_up_window)] {
            if let Some(w) = w {
                if let Err(e) = crate::time::parse_duration_ms(w) {
                    errs.add(join(path, field), e);
                }
            }
        }
    }
}

impl Validate for RolloutSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        self.max_unavailable.check(&join(path, "maxUnavailable"), errs);
        self.max_surge.check(&join(path, "maxSurge"), errs);
        if self.max_unavailable.resolve(100, false) == 0 && self.max_surge.resolve(100, true) == 0 {
            errs.add(join(path, "maxSurge"), "maxUnavailable and maxSurge must not both be 0");
        }
        if let Some(c) = &self.canary {
            for (i, s) in c.steps.iter().enumerate() {
                let p = join(path, &format!("canary.steps[{i}]"));
                let set = [s.groups.is_some(), s.percent.is_some(), s.pause.is_some() || s.pause_seconds.is_some()];
                if set.iter().filter(|b| **b).count() != 1 {
                    errs.add(&p, "must have exactly one of groups, percent, pause or pauseSeconds");
                }
                if s.pause.is_some() && s.pause_seconds.is_some() {
                    errs.add(&p, "pause and pauseSeconds exclude each other");
                }
                if s.pause == Some(false) {
                    errs.add(join(&p, "pause"), "must be true (leave the step out for no pause)");
                }
                if let Some(pc) = s.percent {
                    if !(1..=100).contains(&pc) {
                        errs.add(join(&p, "percent"), "must be from 1 to 100");
                    }
                }
                if let Some(gs) = &s.groups {
                    if gs.is_empty() {
                        errs.add(join(&p, "groups"), "must list at least one group");
                    }
                    for (j, g) in gs.iter().enumerate() {
                        if let Err(m) = check_name(g) {
                            errs.add(join(&p, &format!("groups[{j}]")), m);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of<T: Validate>(v: &T) -> Vec<String> {
        v.errors().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn placement_errors_have_field_paths() {
        let p: Placement = serde_json::from_value(serde_json::json!({
            "groups": ["a", "a", "B"],
            "perGroup": {"replicas": -1},
            "overrides": [{"group": "c", "env": {"X=": "1"}}],
            "spread": {"by": "zone", "maxSkew": 0},
            "antiAffinity": [{"app": "db", "by": "zone"}],
            "requirements": {"resources": {"gpu": 0}, "minFreeDisk": "lots"},
            "policy": "latency"
        }))
        .expect("decodes");
        let e = errors_of(&p);
        for want in [
            "groups[1]: duplicate group \"a\"",
            "groups[2]:",
            "perGroup.replicas: must be from 0 to 10000",
            "overrides[0].group: \"c\" is not one of placement.groups",
            "overrides[0].env:",
            "spread.maxSkew: must be >= 1",
            "antiAffinity[0].by: must be node or group",
            "requirements.resources.gpu: extended resources are named domain/name (yunbian.io/gpu)",
            "requirements.resources.gpu: must be >= 1",
            "requirements.minFreeDisk:",
            "latency: policy: latency needs latency.fromGroup or latency.fromNode",
        ] {
            assert!(e.iter().any(|x| x.starts_with(want)), "missing {want:?} in {e:#?}");
        }
    }

    #[test]
    fn unknown_fields_and_values_are_refused() {
        assert!(serde_json::from_value::<Placement>(serde_json::json!({"policy": "cheapest"})).is_err());
        assert!(serde_json::from_value::<Placement>(serde_json::json!({"spred": {}})).is_err());
        assert!(serde_json::from_value::<Placement>(serde_json::json!({"mode": "everyNode"})).is_ok());
        assert!(serde_json::from_value::<Placement>(serde_json::json!({"fallback": "cloud"})).is_ok());
    }

    #[test]
    fn rollout_defaults_and_checks() {
        let r: RolloutSpec = serde_json::from_value(serde_json::json!({})).expect("decodes");
        assert_eq!(r, RolloutSpec::default());
        let r: RolloutSpec = serde_json::from_value(serde_json::json!({
            "maxUnavailable": "150%",
            "maxSurge": 0,
            "canary": {"steps": [{"percent": 0}, {"groups": ["a"], "pause": true}, {"pause": false}, {}]}
        }))
        .expect("decodes");
        let e = errors_of(&r);
        for want in [
            "maxUnavailable: \"150%\" must be a count or a percentage",
            "canary.steps[0].percent: must be from 1 to 100",
            "canary.steps[1]: must have exactly one of",
            "canary.steps[2].pause: must be true",
            "canary.steps[3]: must have exactly one of",
        ] {
            assert!(e.iter().any(|x| x.starts_with(want)), "missing {want:?} in {e:#?}");
        }
    }

    #[test]
    fn app_level_combinations_are_refused() {
        let app: crate::kinds::AppSpec = serde_json::from_value(serde_json::json!({
            "placement": {"mode": "everyNode", "groups": ["g"], "perGroup": {"replicas": 1}},
            "autoscale": {"min": 0, "max": 3, "metric": "cpu", "target": 50},
            "rollout": {"maxUnavailable": 0, "maxSurge": 1},
        }))
        .expect("decodes");
        let e = errors_of(&app);
        for want in [
            "placement.perGroup: does not apply to mode: everyNode",
            "autoscale.min: must be >= 1",
            "autoscale: does not apply to placement.mode: everyNode",
            "autoscale: does not apply to placement.perGroup",
            "rollout.maxUnavailable: must be >= 1 with placement.mode: everyNode",
        ] {
            assert!(e.iter().any(|x| x.starts_with(want)), "missing {want:?} in {e:#?}");
        }
    }

    #[test]
    fn int_or_percent_rounds_like_kubernetes() {
        assert_eq!(IntOrPercent::Percent("25%".into()).resolve(10, true), 3);
        assert_eq!(IntOrPercent::Percent("25%".into()).resolve(10, false), 2);
        assert_eq!(IntOrPercent::Int(2).resolve(10, false), 2);
    }

    #[test]
    fn autoscale_and_node_lost_checks() {
        let a = Autoscale { min: 3, max: 2, metric: "cpu".into(), target: 0.0, ..Default::default() };
        let e = errors_of(&a);
        assert!(e.iter().any(|x| x == "max: must be >= min"), "{e:?}");
        assert!(e.iter().any(|x| x == "target: must be a positive number"), "{e:?}");
        let n = OnNodeLost { after: "500ms".into(), ..Default::default() };
        assert_eq!(errors_of(&n), vec!["after: must be at least 1s".to_string()]);
        assert_eq!(OnNodeLost::default().after_ms(), 10_000);
    }
}
