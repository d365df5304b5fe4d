//! Spec and status types of every kind.
//!
//! `spec` is intent (written by users and controllers), `status` is
//! observation (written by the cloud's controllers and the node agents). The
//! two are never mixed: an `apply` replaces `spec` and keeps `status`.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::meta::{Kind, ObjectMeta, API_VERSION};
use crate::placement::Placement;

/// A typed object of one kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S, St> {
    /// Always `yunbian.io/v1`.
    pub api_version: String,
    /// The kind's manifest name.
    pub kind: String,
    /// Name, labels, revisions.
    pub metadata: ObjectMeta,
    /// Desired state.
    #[serde(default)]
    pub spec: S,
    /// Observed state.
    #[serde(default)]
    pub status: St,
}

/// Binds a spec/status pair to its [`Kind`].
pub trait KindOf: Serialize + DeserializeOwned + Default + Clone + PartialEq {
    /// The status type paired with this spec.
    type Status: Serialize + DeserializeOwned + Default + Clone + PartialEq;
    /// The kind this spec belongs to.
    const KIND: Kind;
}

impl<S: KindOf> Object<S, S::Status> {
    /// A new object with default status.
    pub fn new(name: impl Into<String>, spec: S) -> Self {
        Object {
            api_version: API_VERSION.to_string(),
            kind: S::KIND.as_str().to_string(),
            metadata: ObjectMeta { name: name.into(), ..Default::default() },
            spec,
            status: Default::default(),
        }
    }

    /// Decodes a stored or received JSON value of this kind.
    pub fn from_value(v: serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(v)
    }

    /// Encodes to a JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("objects always serialize: no non-string map keys")
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

/// An enrolled edge node.
pub type Node = Object<NodeSpec, NodeStatus>;
/// A group of nodes.
pub type NodeGroup = Object<NodeGroupSpec, NodeGroupStatus>;
/// A join token.
pub type Token = Object<TokenSpec, TokenStatus>;
/// A replicated application.
pub type App = Object<AppSpec, AppStatus>;
/// One replica of an App on one node.
pub type AppInstance = Object<AppInstanceSpec, AppInstanceStatus>;

// ---------------------------------------------------------------- Node

/// Desired state of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// When true the scheduler places nothing new on the node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

/// Node readiness as seen by the cloud.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum NodePhase {
    /// Never heard from.
    #[default]
    Unknown,
    /// Connected and heartbeating.
    Ready,
    /// Missed heartbeats beyond the grace period.
    NotReady,
    /// Missed heartbeats, but a majority of its group peers still reach
    /// it: only the cloud link is down. Its instances stay where they are.
    CloudUnreachable,
}

impl NodePhase {
    /// The phase's name as shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Unknown => "Unknown",
            NodePhase::Ready => "Ready",
            NodePhase::NotReady => "NotReady",
            NodePhase::CloudUnreachable => "CloudUnreachable",
        }
    }
}

/// Static facts about the node's machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInfo {
    /// Host name.
    #[serde(default)]
    pub hostname: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    #[serde(default)]
    pub arch: String,
    /// Kernel release.
    #[serde(default)]
    pub kernel: String,
    /// Logical CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Total memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Size of the filesystem holding the agent's data directory, in bytes.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Version of the `yunbian` agent.
    #[serde(default)]
    pub agent_version: String,
    /// Runtimes the agent offers (`process`, `fake`, `wasm`, `oci`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// Runtimes this agent knows but cannot offer on this machine, each
    /// with the reason (`oci: crun not found in PATH (install crun: …)`).
    /// Such a runtime is absent from `runtimes`, so the scheduler places
    /// no instance of it here; this says why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unavailable_runtimes: BTreeMap<String, String>,
    /// CPU model name (`Intel(R) Xeon(R) …`), when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_model: String,
    /// Accelerators and other devices registered by device plugins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::placement::HardwareDevice>,
    /// Unix seconds the machine booted (0 when unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub boot_time: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Live usage figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeUsage {
    /// CPU in use over the last interval, millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in use, bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Disk in use on the data filesystem, bytes.
    #[serde(default)]
    pub disk_used_bytes: u64,
    /// Instances the agent is running.
    #[serde(default)]
    pub instances: u32,
    /// The store-and-forward data outbox (absent on nodes without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_outbox: Option<DataOutboxStatus>,
}

/// Backlog and counters of a node's store-and-forward data outbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataOutboxStatus {
    /// Batches waiting for the cloud's acknowledgement.
    #[serde(default)]
    pub queued_batches: u64,
    /// Their bytes.
    #[serde(default)]
    pub queued_bytes: u64,
    /// Points in them.
    #[serde(default)]
    pub queued_points: u64,
    /// Age of the oldest queued batch, seconds (0 when empty).
    #[serde(default)]
    pub oldest_age_seconds: u64,
    /// Points the cloud acknowledged since the outbox was created.
    #[serde(default)]
    pub acked_points: u64,
    /// Points dropped because their batch outlived the TTL.
    #[serde(default)]
    pub dropped_expired_points: u64,
    /// Points dropped because the outbox was over its size limit (lowest
    /// priority first, then oldest).
    #[serde(default)]
    pub dropped_full_points: u64,
    /// Points dropped because their batch could not be written to disk.
    #[serde(default)]
    pub dropped_disk_points: u64,
    /// The configured upload limit, bytes per second (0: none).
    #[serde(default)]
    pub bandwidth_limit: u64,
    /// The last error writing or reading the outbox, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

/// Capacity the scheduler may hand out.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Allocatable {
    /// Millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Extended resources from device plugins (`yunbian.io/gpu: 2`): healthy devices.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extended: BTreeMap<String, u64>,
}

/// Observed state of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// Ready / NotReady / Unknown.
    #[serde(default)]
    pub phase: NodePhase,
    /// Why the phase is what it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Machine facts.
    #[serde(default)]
    pub info: NodeInfo,
    /// Schedulable capacity.
    #[serde(default)]
    pub allocatable: Allocatable,
    /// Live usage.
    #[serde(default)]
    pub usage: NodeUsage,
    /// Whether resource limits are enforced (cgroups available to the agent).
    #[serde(default)]
    pub limits_enforced: bool,
    /// Human explanation of how (or why not) limits are enforced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub limits_note: String,
    /// RFC 3339 time of the last heartbeat the cloud saw.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_heartbeat: String,
    /// When `phase` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition: String,
    /// Why the node is short of disk space (the DiskPressure condition);
    /// empty when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disk_pressure: String,
    /// RFC 3339 expiry of the node's current certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_expiry: String,
    /// SHA-256 of the node's current certificate. Only that certificate
    /// may connect or renew: a name deleted and joined again does not
    /// accept the old machine's certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_fingerprint: String,
    /// SHA-256 of the certificate that the current one renewed, accepted
    /// for renewing only and only until the current one is first used: a
    /// renewal whose answer was lost leaves the node holding the old one.
    /// Cleared by a join.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_certificate_fingerprint: String,
    /// Remote address of the node's current connection.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Desired-view revision the node last acknowledged.
    #[serde(default)]
    pub synced_revision: u64,
    /// Round trips and loss to the cloud and to probed peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::placement::NetworkStatus>,
    /// Unix seconds of the node's recent losses (NotReady transitions),
    /// newest last, at most 16: the reliability policy's failure count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_failures: Vec<u64>,
    /// RFC 3339 time the node last became Ready (its uptime as a member).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ready_since: String,
}

impl KindOf for NodeSpec {
    type Status = NodeStatus;
    const KIND: Kind = Kind::Node;
}

// ---------------------------------------------------------------- NodeGroup

/// A set of nodes chosen by labels.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroupSpec {
    /// Nodes whose labels contain all these pairs belong to the group (an
    /// empty selector: every node, for cluster-wide settings).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The site the group's nodes are at; peers on the same site are
    /// preferred for artifact chunks.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
    /// Region (`cn-east`), for spreading and reporting.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Zone within the region.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// `edge` (default) or `cloud`: cloud groups take `fallback: cloud` instances.
    #[serde(default)]
    pub tier: crate::placement::Tier,
    /// What a CPU-hour costs on the group's nodes (any currency, used to compare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_cpu_hour: Option<f64>,
    /// Which artifact publishers the group's nodes accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustSpec>,
}

/// A trust policy for artifacts. A node in several groups accepts the keys
/// of all of them, and requires a signature if any of them does.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustSpec {
    /// Refuse artifacts without a valid signature by one of `keys`.
    #[serde(default)]
    pub require_signature: bool,
    /// Trusted publisher keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<TrustedKey>,
}

/// A trusted publisher key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedKey {
    /// A name for messages (`release-team`).
    #[serde(default)]
    pub name: String,
    /// The ed25519 public key, 64 hex digits (`yunbian artifact keygen`
    /// prints it).
    pub public_key: String,
}

/// Observed membership of a group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroupStatus {
    /// Member nodes.
    #[serde(default)]
    pub nodes: u32,
    /// Members that are Ready.
    #[serde(default)]
    pub ready_nodes: u32,
    /// Member names (sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Allocatable capacity of the Ready members.
    #[serde(default)]
    pub allocatable: Allocatable,
    /// Requests of the instances placed on the members.
    #[serde(default)]
    pub requested: Allocatable,
}

impl KindOf for NodeGroupSpec {
    type Status = NodeGroupStatus;
    const KIND: Kind = Kind::NodeGroup;
}

// ---------------------------------------------------------------- Token

/// A join token. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    /// Hex SHA-256 of the secret part of the token.
    #[serde(default)]
    pub secret_hash: String,
    /// RFC 3339 expiry; empty means never.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expires: String,
    /// Revoked tokens are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    /// What the token is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Token usage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenStatus {
    /// Nodes joined with this token.
    #[serde(default)]
    pub joins: u32,
}

impl KindOf for TokenSpec {
    type Status = TokenStatus;
    const KIND: Kind = Kind::Token;
}

// ---------------------------------------------------------------- App

/// Which runtime runs an App's instances.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A native process on the edge host.
    #[default]
    Process,
    /// A WebAssembly (WASI) module, run by wasmtime in a shim process.
    Wasm,
    /// An OCI image, run by crun in a shim process.
    Oci,
    /// A simulated workload (used by `yunbian sim`); never started for real.
    Fake,
}

impl RuntimeKind {
    /// The runtime's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Wasm => "wasm",
            RuntimeKind::Oci => "oci",
            RuntimeKind::Fake => "fake",
        }
    }
}

/// How to run a native process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessSpec {
    /// Program and leading arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Further arguments appended to `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; default is the instance's own directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
}

/// When a stopped instance is started again.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always restart, whatever the exit code.
    #[default]
    Always,
    /// Restart only after a non-zero exit or a kill.
    OnFailure,
    /// Never restart.
    Never,
}

/// CPU and memory quantities.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceList {
    /// CPU (`100m`, `0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory (`64Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

impl ResourceList {
    /// CPU in millicores (0 when unset or invalid; validation rejects invalid).
    pub fn cpu_millis(&self) -> u64 {
        self.cpu.as_deref().and_then(|c| crate::quantity::parse_cpu_millis(c).ok()).unwrap_or(0)
    }

    /// Memory in bytes (0 when unset or invalid; validation rejects invalid).
    pub fn memory_bytes(&self) -> u64 {
        self.memory.as_deref().and_then(|m| crate::quantity::parse_memory_bytes(m).ok()).unwrap_or(0)
    }
}

/// Requests (for scheduling) and limits (enforced by the runtime).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(default)]
    pub requests: ResourceList,
    /// What the runtime enforces.
    #[serde(default)]
    pub limits: ResourceList,
}

/// TCP connect probe.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpProbe {
    /// Port on 127.0.0.1.
    pub port: u16,
}

/// HTTP GET probe; 2xx and 3xx are healthy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProbe {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Path, default `/`.
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_path() -> String {
    "/".to_string()
}

/// Command probe; exit 0 is healthy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecProbe {
    /// Program and arguments.
    pub command: Vec<String>,
}

/// A liveness probe: exactly one of `tcp`, `http`, `exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// Seconds between probes (default 10).
    #[serde(default = "default_period")]
    pub period_seconds: u32,
    /// Seconds a probe may take (default 1).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    /// Seconds after start before the first probe (default 0).
    #[serde(default)]
    pub initial_delay_seconds: u32,
    /// Consecutive failures before the instance is restarted (default 3).
    #[serde(default = "default_failures")]
    pub failure_threshold: u32,
}

fn default_period() -> u32 {
    10
}
fn default_timeout() -> u32 {
    1
}
fn default_failures() -> u32 {
    3
}

/// Health checking.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    /// Restart the instance when this fails `failureThreshold` times in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

/// What every instance of an App runs: the part of the App spec copied into
/// each AppInstance, so an edge node needs nothing but its instances.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadTemplate {
    /// Runtime to use.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Process runtime settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    /// The artifact to run: an executable or bundle (process runtime), a
    /// module (wasm) or an image (oci).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<crate::artifact::ArtifactRef>,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Health probes.
    #[serde(default)]
    pub health: Health,
    /// Extended resources each instance is allocated by its node's device
    /// plugins (`yunbian.io/gpu: 1`), from `placement.requirements.resources`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, u64>,
    /// Settings of the wasm runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSpec>,
}

/// Settings of the wasm runtime (`runtime: wasm` only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmSpec {
    /// Stop a guest that has used its whole CPU share (`resources.limits.cpu`,
    /// else one core) without a break for this long (`30s`, `2m`): an
    /// endless loop. The instance fails with reason `CPULimitExceeded` and
    /// the restart policy applies. Unset: the guest is only held to its
    /// limit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_stop_after: String,
}

impl WorkloadTemplate {
    /// A stable short hash of the template; instances whose hash differs
    /// from their App's are replaced.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("templates always serialize");
        // FNV-1a 64: stable across builds and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{:010x}", h & 0xff_ffff_ffff)
    }
}

/// Desired state of an App.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppSpec {
    /// Number of instances (signed so that `-1` is reported, not misparsed).
    #[serde(default = "one")]
    pub replicas: i64,
    /// Runtime to use.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Process runtime settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    /// The artifact to run: an executable or bundle (process runtime), a
    /// module (wasm) or an image (oci).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<crate::artifact::ArtifactRef>,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Health probes.
    #[serde(default)]
    pub health: Health,
    /// Where to run it.
    #[serde(default)]
    pub placement: Placement,
    /// What happens when a node running instances is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_node_lost: Option<crate::placement::OnNodeLost>,
    /// Replicas following load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::placement::Autoscale>,
    /// How a new template replaces the running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::placement::RolloutSpec>,
    /// Settings of the wasm runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSpec>,
}

impl AppSpec {
    /// The part of the spec every instance carries.
    pub fn template(&self) -> WorkloadTemplate {
        WorkloadTemplate {
            runtime: self.runtime,
            process: self.process.clone(),
            artifact: self.artifact.clone(),
            restart_policy: self.restart_policy,
            resources: self.resources.clone(),
            health: self.health.clone(),
            devices: self.placement.requirements.resources.clone(),
            wasm: self.wasm.clone(),
        }
    }

    /// The template an instance in `group` runs: the App's template with the
    /// group's override (env, args, artifact version) applied.
    pub fn template_for(&self, group: &str) -> WorkloadTemplate {
        let mut t = self.template();
        let Some(o) = self.placement.override_for(group) else { return t };
        if !o.env.is_empty() || o.args.is_some() {
            let p = t.process.get_or_insert_with(ProcessSpec::default);
            for (k, v) in &o.env {
                p.env.insert(k.clone(), v.clone());
            }
            if let Some(a) = &o.args {
                p.args = a.clone();
            }
        }
        if let (Some(v), Some(a)) = (&o.artifact_version, t.artifact.as_mut()) {
            if &a.version != v {
                a.version = v.clone();
                a.digest.clear();
            }
        }
        t
    }
}

fn one() -> i64 {
    1
}

/// Observed state of an App.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppStatus {
    /// Desired replicas.
    #[serde(default)]
    pub replicas: u32,
    /// Instances placed on a node.
    #[serde(default)]
    pub scheduled_replicas: u32,
    /// Instances Running.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Generation the controller last acted on.
    #[serde(default)]
    pub observed_generation: u64,
    /// Why replicas are missing, if they are.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Why each instance is where it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<crate::placement::PlacementDecision>,
    /// Why other nodes were not chosen (at most 50, the rest counted in `message`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejections: Vec<crate::placement::NodeRejection>,
    /// The rollout in progress or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::placement::RolloutStatus>,
    /// Template revisions, oldest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<crate::placement::AppRevision>,
    /// What the autoscaler decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::placement::AutoscaleStatus>,
}

impl KindOf for AppSpec {
    type Status = AppStatus;
    const KIND: Kind = Kind::App;
}

// ---------------------------------------------------------------- AppInstance

/// Desired state of one replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppInstanceSpec {
    /// Owning App.
    pub app: String,
    /// Node it is placed on.
    pub node: String,
    /// What to run (copied from the App).
    #[serde(default)]
    pub template: WorkloadTemplate,
    /// `template.hash()` at creation.
    #[serde(default)]
    pub template_hash: String,
    /// The NodeGroup the instance was placed for (empty without `placement.groups`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The App revision the template belongs to (0 before revisions existed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
}

/// Lifecycle of an instance as reported by its node.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum InstancePhase {
    /// Not yet started on the node (or not yet placed).
    #[default]
    Pending,
    /// Started, not yet known healthy.
    Starting,
    /// Running.
    Running,
    /// Exited or killed and not (yet) restarted.
    Failed,
    /// Stopped on purpose or exited cleanly with no restart.
    Stopped,
}

impl InstancePhase {
    /// The phase's name as shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            InstancePhase::Pending => "Pending",
            InstancePhase::Starting => "Starting",
            InstancePhase::Running => "Running",
            InstancePhase::Failed => "Failed",
            InstancePhase::Stopped => "Stopped",
        }
    }
}

/// Observed state of one replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppInstanceStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: InstancePhase,
    /// Machine-readable reason (`OOMKilled`, `Error`, `Completed`, `LivenessFailed`, `BackOff`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Exit code of the last run, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Times the runtime restarted it.
    #[serde(default)]
    pub restart_count: u32,
    /// Process id (process runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// RFC 3339 start of the current run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    /// Edge outbox sequence of the report this status came from; reports
    /// with a lower sequence are stale and ignored.
    #[serde(default)]
    pub observed_seq: u64,
    /// Resource use and app-reported metrics (for autoscaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<InstanceUsage>,
    /// Device ids the node allocated to it, per extended resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, Vec<String>>,
}

/// What one instance uses, as its node measured it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceUsage {
    /// CPU over the last interval, millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Resident memory, bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Metrics the app reported (`queue_depth: 17`), latest value each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl KindOf for AppInstanceSpec {
    type Status = AppInstanceStatus;
    const KIND: Kind = Kind::AppInstance;
}

/// Whether `labels` contain every pair of `selector`.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
