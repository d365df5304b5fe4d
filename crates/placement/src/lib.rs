//! Global placement: decides on which nodes an App's instances run.
//!
//! The scheduler follows the Kubernetes scheduler framework in miniature:
//! **filter** plugins ([`filter`]) say whether a node may take an instance
//! (and why not, in words a user reads in `yunbian describe app`), **score**
//! plugins ([`score`]) rank the nodes that pass, with weights chosen by the
//! App's `placement.policy`, and **bind** books the instance's resources on
//! the chosen node in the [`Cluster`], so the next placement — of the same
//! App or of the next App in the same controller pass — sees it.
//!
//! All of one App's placements are decided together by [`schedule`]: which
//! existing instances stay, which must move and why, where new ones go, and
//! which cloud-tier fallback instances can move back to the edge.
//!
//! **Invariant: sans-IO and deterministic.** No clock, no randomness, no
//! hash-map iteration order in any result: the same [`Cluster`] and
//! [`Request`] always give the same [`Decision`]. Ties break by node name.
//! docs/design/016-placement.md describes the plugins, weights and costs.

#![forbid(unsafe_code)]

mod cluster;
mod context;
pub mod filter;
pub mod quantity;
mod schedule;
pub mod score;
pub mod synthetic;

use std::collections::BTreeMap;

pub use cluster::{Cluster, Latency};
pub use context::{Context, NodeRef, Placed};
pub use schedule::schedule;

/// An amount of each resource: what an instance requests, what a node has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Extended resources from device plugins (`yunbian.io/gpu` → 2).
    pub extended: BTreeMap<String, u64>,
}

impl Resources {
    /// Adds `other` to `self` (saturating).
    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        for (k, v) in &other.extended {
            let e = self.extended.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
    }

    /// Subtracts `other` from `self`, never below zero.
    pub fn sub(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        for (k, v) in &other.extended {
            if let Some(e) = self.extended.get_mut(k) {
                *e = e.saturating_sub(*v);
            }
        }
    }
}

/// A NodeGroup as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Edge or cloud.
    pub tier: yunbian_api::Tier,
    /// Site name.
    pub site: String,
    /// Region (empty when unset).
    pub region: String,
    /// Zone (empty when unset).
    pub zone: String,
    /// Price of one CPU for one hour, when known.
    pub cost_per_cpu_hour: Option<f64>,
}

/// A node as the scheduler sees it, built by the controller from the Node
/// object and the instances placed on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Names of the NodeGroups it belongs to (sorted).
    pub groups: Vec<String>,
    /// Phase Ready (CloudUnreachable counts as not ready for new placements).
    pub ready: bool,
    /// The controller decided the node is lost for this pass: its instances
    /// must move.
    pub lost: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Why it is not ready, for explanations
    /// (`NotReady: no heartbeat within the grace period`).
    pub not_ready_reason: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Runtimes its agent offers (`process`, `oci`, `wasm`, `fake`).
    pub runtimes: Vec<String>,
    /// What it can give to instances.
    pub allocatable: Resources,
    /// Booked by instances already placed (all apps).
    pub requested: Resources,
    /// Free bytes on its data filesystem.
    pub disk_free_bytes: u64,
    /// Seconds since it last became Ready.
    pub uptime_secs: u64,
    /// Losses in the last 24 h.
    pub recent_failures: u32,
}

/// One of the App's current instances (of the revision being placed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Instance name.
    pub instance: String,
    /// Its node.
    pub node: String,
    /// The group it was placed for (empty without groups).
    pub group: String,
}

/// How many instances a target wants: `group` empty = anywhere the
/// placement allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// The group whose members must run them, or empty.
    pub group: String,
    /// Instances wanted.
    pub count: u32,
}

/// What to place: one App, all of its targets at once.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// App name.
    pub app: &'a str,
    /// `spec.placement`.
    pub placement: &'a yunbian_api::Placement,
    /// Per instance: cpu/memory requests plus
    /// `placement.requirements.resources`.
    pub resources: Resources,
    /// Runtime the instances need (empty: any).
    pub runtime: &'a str,
    /// The platforms the App's artifact has a blob for (`linux/amd64`,
    /// `wasi/wasm32`); `None`: no artifact, or one not pushed yet.
    pub platforms: Option<Vec<String>>,
    /// Instances wanted per group; ignored for `mode: everyNode` (one per
    /// eligible node).
    pub targets: Vec<Target>,
    /// This App's current instances (of the revision being placed),
    /// including replacements that are not Running yet. An instance that
    /// such a replacement `replaces` is best left out (the controller
    /// deletes it once the replacement runs): passed in, it makes the
    /// target one too many, and being on a cloud-tier node it is the
    /// surplus evicted.
    pub existing: Vec<Existing>,
}

/// A new placement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bind {
    /// The chosen node.
    pub node: String,
    /// The target group (or, without `perGroup`, the node's first matching
    /// group; empty when it has none).
    pub group: String,
    /// Why this node (`lowest RTT from clients (3.1 ms)`).
    pub reason: String,
    /// `Some(old)`: a make-before-break move (fallback return); the
    /// controller deletes `old` only after the new instance is Running.
    pub replaces: Option<String>,
}

/// Everything [`schedule`] decided for one App.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Existing instances that stay (sorted).
    pub keep: Vec<String>,
    /// Existing instances that must go, with why
    /// (`node e7 no longer matches requirements.arch (...)`).
    pub evict: Vec<(String, String)>,
    /// New placements.
    pub create: Vec<Bind>,
    /// Instances wanted that fit nowhere.
    pub unplaced: u32,
    /// Why each kept instance is where it is: (instance, reason).
    pub explanations: Vec<(String, String)>,
    /// Why other nodes were not chosen; at most [`MAX_REJECTIONS`], sorted
    /// by node.
    pub rejections: Vec<yunbian_api::NodeRejection>,
    /// `0/12 nodes available: 3 insufficient memory, 9 not in groups [a b]`
    /// when something is unplaced, and notes on constraints that could not
    /// hold; else empty.
    pub message: String,
}

/// Most node rejections one [`Decision`] reports.
pub const MAX_REJECTIONS: usize = 50;
