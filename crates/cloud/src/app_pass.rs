//! One pass of the App controller, without I/O: from the listed Apps,
//! AppInstances, Nodes and NodeGroups (and what the hub knows about node
//! liveness and latency) to the instances to delete and create and the App
//! statuses to write.
//!
//! For each App, in name order:
//! 1. **Revision.** The App's template (with its per-group overrides) is
//!    recorded in `status.history`; a changed template is a new revision.
//! 2. **Lost nodes.** Instances on a node silent for `onNodeLost.after`
//!    that its group peers do not see either are deleted (and so placed
//!    again); `keep` leaves them; without `onNodeLost`, the cluster-wide
//!    `evict_after` on NotReady nodes applies. The node stops them when it
//!    returns (fencing: their removal is the first thing it receives).
//! 3. **Rollout.** Instances of an older revision are replaced as
//!    `spec.rollout` allows (`rollout::plan`); without `spec.rollout`, at once.
//! 4. **Placement.** The scheduler (`yunbian_placement::schedule`) keeps,
//!    evicts and creates the current revision's instances per target (one per
//!    group with `perGroup`), booking capacity in a cluster view shared by
//!    all Apps of the pass. A `fallback: cloud` instance whose edge
//!    replacement is Running is deleted (make before break).
//! 5. **Status.** Counts, why each instance is where it is, why other nodes
//!    were rejected, the rollout and the autoscaler's state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use yunbian_api::{
    AppInstance, AppInstanceSpec, AppSpec, AppStatus, ArtifactSpec, InstancePhase, NodeGroupSpec, NodeLostAction,
    NodePhase, NodeSpec, Object, PlacementDecision, PlacementMode, RolloutPhase, RolloutSpec, RolloutStatus,
};
use yunbian_placement as placement;

use crate::autoscale;
use crate::controllers::ControllerConfig;
use crate::rollout;

/// Label of an instance created to replace another (a `fallback: cloud`
/// instance moving back to the edge): the old one is deleted once this one
/// is Running.
pub const REPLACES_LABEL: &str = "replaces";
/// Most placement explanations and rejections kept in an App's status.
const MAX_EXPLANATIONS: usize = 100;

/// What the App controller learns from the hub about nodes, beyond their
/// stored status.
pub trait NodeSignals: Send + Sync {
    /// How long the node has gone without a heartbeat on any replica;
    /// `None` while it is heard (or not known yet).
    fn silent_for(&self, node: &str) -> Option<Duration>;
    /// Whether a majority of the node's group peers still reach it.
    fn seen_by_peers(&self, node: &str) -> bool;
    /// Measured round trips between nodes: (from, to, milliseconds).
    fn latency(&self) -> Vec<(String, String, f64)>;
    /// Whether any node is silent now (the controller then looks more often).
    fn any_silent(&self) -> bool;
}

/// Signals read from node statuses alone (no hub): silence starts when the
/// node turned NotReady, and no latency is known.
#[derive(Debug, Default)]
pub struct StatusSignals;

impl NodeSignals for StatusSignals {
    fn silent_for(&self, _node: &str) -> Option<Duration> {
        None
    }
    fn seen_by_peers(&self, _node: &str) -> bool {
        false
    }
    fn latency(&self) -> Vec<(String, String, f64)> {
        Vec::new()
    }
    fn any_silent(&self) -> bool {
        false
    }
}

/// The hub's view: silence and peers' verdicts from the leader's node
/// lifecycle loop, latency from the nodes' reports.
impl NodeSignals for crate::hub::Hub {
    fn silent_for(&self, node: &str) -> Option<Duration> {
        self.liveness().silent_for(node)
    }
    fn seen_by_peers(&self, node: &str) -> bool {
        self.liveness().verdict(node) == crate::health::Verdict::SeenByMajority
    }
    fn latency(&self) -> Vec<(String, String, f64)> {
        self.latency_snapshot()
    }
    fn any_silent(&self) -> bool {
        self.liveness().any_silent()
    }
}

/// Silence shorter than this is not acted on: the lifecycle loop judges
/// silence once a tick from presence records published every couple of
/// seconds, so a node that just connected (or joined) can look silent for a
/// moment after the hub already heard it.
const MIN_SILENCE: Duration = Duration::from_secs(5);

/// How long the hub has not heard `node`, when that is long enough to matter.
fn silent(input: &PassInput, node: &str) -> Option<Duration> {
    input.signals.silent_for(node).filter(|d| *d >= MIN_SILENCE)
}

type Typed<S> = Arc<Object<S, <S as yunbian_api::KindOf>::Status>>;

/// Everything a pass reads.
pub struct PassInput<'a> {
    /// Every App.
    pub apps: &'a [Typed<AppSpec>],
    /// Every AppInstance.
    pub instances: &'a [Typed<AppInstanceSpec>],
    /// Every Node.
    pub nodes: &'a [Typed<NodeSpec>],
    /// Every NodeGroup.
    pub groups: &'a [Typed<NodeGroupSpec>],
    /// Every Artifact (which platforms an App's artifact has).
    pub artifacts: &'a [Typed<ArtifactSpec>],
    /// Liveness and latency from the hub.
    pub signals: &'a dyn NodeSignals,
    /// Controller settings.
    pub cfg: &'a ControllerConfig,
    /// Unix seconds.
    pub now: u64,
}

/// The platforms an instance of `spec` can run on, as edges pick blobs:
/// those of the artifact's blobs (with a digest, only the blobs with that
/// digest; for `runtime: wasm`, only the wasm blob), over the App's version
/// and every group's version override. `None` without an artifact or while
/// one of them names nothing pushed (the node then reports it).
fn artifact_platforms(spec: &AppSpec, artifacts: &[Typed<ArtifactSpec>]) -> Option<Vec<String>> {
    let r = spec.artifact.as_ref()?;
    let digest = r.digest.strip_prefix("sha256:").unwrap_or(&r.digest);
    let versions: BTreeSet<&str> = std::iter::once(r.version.as_str())
        .chain(spec.placement.overrides.iter().filter_map(|o| o.artifact_version.as_deref()))
        .collect();
    let mut blobs: Vec<(&String, &yunbian_api::ArtifactBlob)> = Vec::new();
    if r.name.is_empty() {
        blobs.extend(artifacts.iter().flat_map(|a| a.spec.blobs.iter()));
    } else {
        for v in &versions {
            let object = yunbian_api::artifact::artifact_object_name(&r.name, v);
            blobs.extend(artifacts.iter().find(|a| a.metadata.name == object)?.spec.blobs.iter());
        }
    }
    // A pin applies to the App's own version only; an override drops it.
    let pinned = |b: &yunbian_api::ArtifactBlob| {
        digest.is_empty() || versions.len() > 1 || b.sha256.eq_ignore_ascii_case(digest)
    };
    let wasm_only = spec.runtime == yunbian_api::RuntimeKind::Wasm;
    let mut out: Vec<String> = blobs
        .into_iter()
        .filter(|(p, b)| pinned(b) && (!wasm_only || p.as_str() == yunbian_api::artifact::WASM_PLATFORM))
        .map(|(p, _)| p.clone())
        .collect();
    if r.name.is_empty() && out.is_empty() {
        return None; // a digest nothing carries (yet)
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// What a pass decided.
#[derive(Debug, Default)]
pub struct PassOutput {
    /// Instances to delete.
    pub deletes: Vec<String>,
    /// Instances to create (JSON objects without server metadata).
    pub creates: Vec<Value>,
    /// App statuses that changed.
    pub statuses: Vec<(String, AppStatus)>,
}

/// How long `node` has been without heartbeat, from the hub when it knows,
/// else from the node's status (NotReady since its last transition).
fn silence(input: &PassInput, node: &Object<NodeSpec, yunbian_api::NodeStatus>) -> Option<u64> {
    if let Some(d) = silent(input, &node.metadata.name) {
        return Some(d.as_secs());
    }
    if node.status.phase != NodePhase::NotReady {
        return None;
    }
    let since = yunbian_api::time::parse_rfc3339(&node.status.last_transition)?;
    Some(input.now.saturating_sub(since))
}

/// Group membership: a node is in every group whose selector its labels match.
fn memberships(
    nodes: &[Typed<NodeSpec>],
    groups: &[Typed<NodeGroupSpec>],
) -> (BTreeMap<String, Vec<String>>, Vec<placement::GroupInfo>) {
    let mut of_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut infos = Vec::with_capacity(groups.len());
    for g in groups {
        infos.push(placement::GroupInfo {
            name: g.metadata.name.clone(),
            tier: g.spec.tier,
            site: g.spec.site.clone(),
            region: g.spec.region.clone(),
            zone: g.spec.zone.clone(),
            cost_per_cpu_hour: g.spec.cost_per_cpu_hour,
        });
        for n in nodes {
            if yunbian_api::selector_matches(&g.spec.selector, &n.metadata.labels) {
                of_node.entry(n.metadata.name.clone()).or_default().push(g.metadata.name.clone());
            }
        }
    }
    for v in of_node.values_mut() {
        v.sort();
    }
    (of_node, infos)
}

/// What one instance of `template` books on its node.
fn resources_of(t: &yunbian_api::WorkloadTemplate) -> placement::Resources {
    placement::Resources {
        cpu_millis: t.resources.requests.cpu_millis(),
        memory_bytes: t.resources.requests.memory_bytes(),
        extended: t.devices.clone(),
    }
}

/// Builds the cluster view: every node with its groups, facts and the
/// capacity booked by the instances that stay.
fn cluster_view(input: &PassInput, staying: &[&Typed<AppInstanceSpec>]) -> placement::Cluster {
    let (of_node, groups) = memberships(input.nodes, input.groups);
    let mut booked: HashMap<&str, placement::Resources> = HashMap::new();
    for i in staying {
        let r = resources_of(&i.spec.template);
        let b = booked.entry(i.spec.node.as_str()).or_default();
        b.cpu_millis += r.cpu_millis;
        b.memory_bytes += r.memory_bytes;
        for (k, v) in r.extended {
            *b.extended.entry(k).or_default() += v;
        }
    }
    let day_ago = input.now.saturating_sub(86_400);
    let nodes = input
        .nodes
        .iter()
        .map(|n| {
            let s = &n.status;
            let ready_since = yunbian_api::time::parse_rfc3339(if s.ready_since.is_empty() {
                &s.last_transition
            } else {
                &s.ready_since
            });
            placement::NodeFacts {
                name: n.metadata.name.clone(),
                labels: n.metadata.labels.clone(),
                groups: of_node.get(&n.metadata.name).cloned().unwrap_or_default(),
                // A node the hub has not heard for a while takes nothing new.
                ready: s.phase == NodePhase::Ready && silent(input, &n.metadata.name).is_none(),
                lost: false,
                unschedulable: n.spec.unschedulable,
                not_ready_reason: if s.reason.is_empty() {
                    s.phase.as_str().to_string()
                } else {
                    format!("{}: {}", s.phase.as_str(), s.reason)
                },
                arch: s.info.arch.clone(),
                os: s.info.os.clone(),
                runtimes: s.info.runtimes.clone(),
                allocatable: placement::Resources {
                    cpu_millis: s.allocatable.cpu_millis,
                    memory_bytes: s.allocatable.memory_bytes,
                    extended: s.allocatable.extended.clone(),
                },
                requested: booked.remove(n.metadata.name.as_str()).unwrap_or_default(),
                disk_free_bytes: s.info.disk_bytes.saturating_sub(s.usage.disk_used_bytes),
                uptime_secs: match (s.phase, ready_since) {
                    (NodePhase::Ready, Some(t)) => input.now.saturating_sub(t),
                    _ => 0,
                },
                recent_failures: s.recent_failures.iter().filter(|t| **t >= day_ago).count() as u32,
            }
        })
        .collect();
    let mut latency = placement::Latency::default();
    for (from, to, ms) in input.signals.latency() {
        latency.insert(&from, &to, ms);
    }
    placement::Cluster::new(nodes, groups, latency)
}

/// How many instances each target wants: one target per group with
/// `perGroup`, else one target `""` with the App's replicas (or the
/// autoscaler's count).
fn targets(spec: &AppSpec, replicas: u32) -> BTreeMap<String, u32> {
    let p = &spec.placement;
    match &p.per_group {
        Some(pg) => p
            .groups
            .iter()
            .map(|g| {
                let n = p.override_for(g).and_then(|o| o.replicas).unwrap_or(pg.replicas);
                (g.clone(), u32::try_from(n.max(0)).unwrap_or(0))
            })
            .collect(),
        None => [(String::new(), replicas)].into(),
    }
}

fn instance_name(app: &str) -> String {
    // Keep within 63 characters.
    let prefix: String = app.chars().take(52).collect();
    format!("{prefix}-{}", yunbian_pki::random_hex(4))
}

/// Runs one pass.
pub fn plan(input: &PassInput) -> PassOutput {
    let mut out = PassOutput::default();
    let node_by_name: HashMap<&str, &Typed<NodeSpec>> =
        input.nodes.iter().map(|n| (n.metadata.name.as_str(), n)).collect();
    let app_by_name: HashMap<&str, &Typed<AppSpec>> =
        input.apps.iter().map(|a| (a.metadata.name.as_str(), a)).collect();

    // Instances whose App or node is gone, and those on nodes lost for
    // their App's policy.
    let mut by_app: BTreeMap<&str, Vec<&Typed<AppInstanceSpec>>> = BTreeMap::new();
    let mut staying: Vec<&Typed<AppInstanceSpec>> = Vec::new();
    for i in input.instances {
        let (Some(app), Some(node)) = (app_by_name.get(i.spec.app.as_str()), node_by_name.get(i.spec.node.as_str()))
        else {
            out.deletes.push(i.metadata.name.clone());
            continue;
        };
        if let Some(why) = lost(input, app, node) {
            tracing::info!(instance = %i.metadata.name, node = %i.spec.node, "evicting: {why}; placing it again");
            out.deletes.push(i.metadata.name.clone());
            continue;
        }
        by_app.entry(i.spec.app.as_str()).or_default().push(i);
        staying.push(i);
    }
    let mut cluster = cluster_view(input, &staying);
    for i in &staying {
        cluster.record_instance(&i.spec.app, &i.spec.node);
    }

    for app in input.apps {
        let name = app.metadata.name.as_str();
        let insts = by_app.remove(name).unwrap_or_default();
        plan_app(input, &mut cluster, app, &insts, &node_by_name, &mut out);
    }
    out.deletes.sort();
    out.deletes.dedup();
    out
}

/// Why the node of an instance of `app` counts as lost, if it does.
fn lost(input: &PassInput, app: &Typed<AppSpec>, node: &Typed<NodeSpec>) -> Option<String> {
    match node.status.phase {
        // A node whose peers still see it keeps its instances.
        NodePhase::CloudUnreachable => return None,
        // Ready in the store, and heard (or not known silent) by the hub.
        NodePhase::Ready if silent(input, &node.metadata.name).is_none() => return None,
        _ => {}
    }
    match &app.spec.on_node_lost {
        Some(p) if p.action == NodeLostAction::Keep => None,
        Some(p) => {
            let after = p.after_ms().div_ceil(1000);
            let silent = silence(input, node)?;
            (silent >= after && !input.signals.seen_by_peers(&node.metadata.name)).then(|| {
                format!("node {} lost: no heartbeat for {silent}s (onNodeLost.after {})", node.metadata.name, p.after)
            })
        }
        None => {
            let after = input.cfg.evict_after?.as_secs();
            if node.status.phase != NodePhase::NotReady {
                return None;
            }
            let since = yunbian_api::time::parse_rfc3339(&node.status.last_transition)?;
            (input.now >= since.saturating_add(after))
                .then(|| format!("node {} NotReady for more than {after}s", node.metadata.name))
        }
    }
}

/// Plans one App.
fn plan_app(
    input: &PassInput,
    cluster: &mut placement::Cluster,
    app: &Typed<AppSpec>,
    insts: &[&Typed<AppInstanceSpec>],
    nodes: &HashMap<&str, &Typed<NodeSpec>>,
    out: &mut PassOutput,
) {
    let name = app.metadata.name.as_str();
    let now_rfc = yunbian_api::time::format_rfc3339(input.now);

    // 1. Revision.
    let hash = rollout::revision_hash(&app.spec);
    let (history, revision) = rollout::record_revision(
        &app.status.history,
        &hash,
        &app.spec.template(),
        &app.spec.placement.overrides,
        app.metadata.generation,
        &now_rfc,
    );
    let last = app.status.rollout.clone().unwrap_or_default();
    let mut stable = if last.stable_revision == 0 { revision } else { last.stable_revision };
    // A rolled-back revision stays rolled back until the template changes.
    let rolled_back = last.phase == RolloutPhase::RolledBack
        && last.revision == revision
        && stable != revision
        && history.iter().any(|r| r.revision == stable);
    let mut target_rev = if rolled_back { stable } else { revision };
    let mut spec = if rolled_back {
        history
            .iter()
            .find(|r| r.revision == stable)
            .map(|r| rollout::spec_at(r, &app.spec))
            .unwrap_or_else(|| app.spec.clone())
    } else {
        app.spec.clone()
    };

    // Autoscaling sets the replica count within [min, max].
    let (replicas, autoscale_status) = match &app.spec.autoscale {
        Some(a) => {
            let mut s = autoscale::decide(a, app.status.autoscale.as_ref(), app.spec.replicas, insts, input.now);
            // The live average moves every pass; while the decision stands
            // and it moved less than 10 %, keep what was written (one store
            // write per App per pass otherwise).
            if let Some(prev) = &app.status.autoscale {
                let same_decision =
                    (prev.desired_replicas, prev.pending_replicas, &prev.pending_since, &prev.last_scale)
                        == (s.desired_replicas, s.pending_replicas, &s.pending_since, &s.last_scale);
                let close = match (prev.current, s.current) {
                    (Some(a), Some(b)) => (a - b).abs() <= 0.1 * a.abs().max(b.abs()),
                    (None, None) => true,
                    _ => false,
                };
                if same_decision && close {
                    s.current = prev.current;
                    s.message = prev.message.clone();
                }
            }
            (s.desired_replicas, Some(s))
        }
        None => (u32::try_from(app.spec.replicas.max(0)).unwrap_or(0), None),
    };
    // everyNode: as many as it runs (the scheduler adds joining nodes).
    let every_node = app.spec.placement.mode == PlacementMode::EveryNode;
    let replicas = if every_node { insts.len() as u32 } else { replicas };
    let mut desired = targets(&spec, replicas);

    // 2-3. Rollout: which instances are of the target revision.
    let rollout_spec = app.spec.rollout.clone();
    let views = |spec: &AppSpec, target_rev: u64| -> Vec<rollout::InstanceView> {
        insts
            .iter()
            .map(|i| {
                let current = i.spec.template_hash == spec.template_for(&i.spec.group).hash();
                instance_view(
                    i,
                    if current { target_rev } else { i.spec.revision.min(target_rev.saturating_sub(1)) },
                    target_rev,
                    nodes,
                    input.now,
                )
            })
            .collect()
    };
    let mut iv = views(&spec, target_rev);
    let mut rollout_status: Option<RolloutStatus> = None;
    let mut rollout_deletes: Vec<String> = Vec::new();
    let mut rollout_creates: Option<BTreeMap<String, u32>> = None;
    let old_exist = iv.iter().any(|v| v.revision != target_rev);
    match &rollout_spec {
        Some(rs) => {
            let mut p = rollout::plan(&rollout::RolloutInput {
                spec: rs,
                status: Some(&last),
                target_revision: target_rev,
                stable_revision: stable,
                desired: &desired,
                instances: &iv,
                now: input.now,
            });
            let stable_spec = history.iter().find(|r| r.revision == stable).map(|r| rollout::spec_at(r, &app.spec));
            if p.rollback && !rolled_back && stable_spec.is_none() {
                // Nothing to go back to: stop where it is.
                p.create.clear();
                p.delete.clear();
                p.rollback = false;
                p.status.phase = RolloutPhase::Failed;
                p.status.message = format!(
                    "{}; revision {stable} is no longer in the history, so it cannot be rolled back to",
                    p.status.message
                );
            }
            if let (true, false, Some(stable_spec)) = (p.rollback, rolled_back, stable_spec) {
                tracing::warn!(app = name, revision, stable, "rollout failed: rolling back");
                let failed_status = p.status.clone();
                target_rev = stable;
                spec = stable_spec;
                desired = targets(&spec, replicas);
                iv = views(&spec, target_rev);
                p = rollout::plan(&rollout::RolloutInput {
                    spec: &RolloutSpec { canary: None, paused: false, ..rs.clone() },
                    status: None,
                    target_revision: target_rev,
                    stable_revision: stable,
                    desired: &desired,
                    instances: &iv,
                    now: input.now,
                });
                p.status = RolloutStatus {
                    phase: RolloutPhase::RolledBack,
                    revision,
                    stable_revision: stable,
                    ..failed_status
                };
            } else if rolled_back {
                p.status = RolloutStatus {
                    phase: RolloutPhase::RolledBack,
                    revision,
                    stable_revision: stable,
                    ..last.clone()
                };
            }
            if p.status.phase == RolloutPhase::Complete && !rolled_back {
                stable = target_rev;
                p.status.stable_revision = stable;
            }
            rollout_deletes = p.delete;
            rollout_creates = Some(p.create);
            rollout_status = Some(p.status);
        }
        _ => {
            // No rollout settings: an old revision is replaced at once.
            for v in iv.iter().filter(|v| v.revision != target_rev) {
                rollout_deletes.push(v.name.clone());
            }
            stable = target_rev;
            if app.spec.rollout.is_some() || app.status.rollout.is_some() {
                rollout_status = Some(RolloutStatus {
                    phase: RolloutPhase::Complete,
                    revision,
                    stable_revision: stable,
                    ..Default::default()
                });
            }
        }
    }
    let deleting: BTreeSet<&str> = rollout_deletes.iter().map(String::as_str).collect();
    for i in insts.iter().filter(|i| deleting.contains(i.metadata.name.as_str())) {
        cluster.release(&i.spec.node, &resources_of(&i.spec.template));
    }
    out.deletes.extend(rollout_deletes.iter().cloned());

    // An old instance on a node that is away (not lost) is replaced in
    // place: the node gets the target revision when it returns, and only
    // that (a reconnecting node is sent the final state of its view).
    let mut in_place: Vec<AppInstance> = Vec::new();
    for i in insts.iter().filter(|i| deleting.contains(i.metadata.name.as_str())) {
        let away = nodes.get(i.spec.node.as_str()).is_some_and(|n| n.status.phase != NodePhase::Ready);
        if !away {
            continue;
        }
        if let Some(creates) = rollout_creates.as_mut() {
            let key = if desired.contains_key(&i.spec.group) { i.spec.group.as_str() } else { "" };
            match creates.get_mut(key) {
                Some(c) if *c > 0 => *c -= 1,
                _ => continue,
            }
        }
        let t = spec.template_for(&i.spec.group);
        let spec_i = AppInstanceSpec {
            app: name.to_string(),
            node: i.spec.node.clone(),
            template_hash: t.hash(),
            template: t,
            group: i.spec.group.clone(),
            revision: target_rev,
        };
        cluster.book(&spec_i.node, &resources_of(&spec_i.template));
        let mut inst: AppInstance = Object::new(instance_name(name), spec_i);
        inst.metadata.labels.insert("app".into(), name.to_string());
        in_place.push(inst);
    }

    // 4. Placement of the target revision.
    let current: Vec<&&Typed<AppInstanceSpec>> = insts
        .iter()
        .zip(iv.iter())
        .filter(|(i, v)| v.revision == target_rev && !deleting.contains(i.metadata.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    // Make before break: a replacement that is Running retires the
    // instance it replaces; until then the old one stays, outside what the
    // scheduler counts (else it would be surplus and go at once).
    let by_name: HashMap<&str, &&Typed<AppInstanceSpec>> =
        insts.iter().map(|i| (i.metadata.name.as_str(), i)).collect();
    let min_ready = app.spec.rollout.as_ref().map_or(0, |r| u64::from(r.min_ready_seconds));
    let mut retired: BTreeSet<String> = BTreeSet::new();
    let mut held: BTreeSet<String> = BTreeSet::new();
    for i in &current {
        if let Some(old) = i.metadata.labels.get(REPLACES_LABEL) {
            if !by_name.contains_key(old.as_str()) {
                continue;
            }
            // Available, not merely started: Running for minReadySeconds
            // without a restart.
            let v = instance_view(i, target_rev, target_rev, nodes, input.now);
            if v.running_for_secs.is_some_and(|t| t >= min_ready) && i.status.restart_count == 0 {
                retired.insert(old.clone());
            } else {
                held.insert(old.clone());
            }
        }
    }
    for old in &retired {
        if let Some(o) = by_name.get(old.as_str()) {
            cluster.release(&o.spec.node, &resources_of(&o.spec.template));
        }
        out.deletes.push(old.clone());
    }
    let current: Vec<&&Typed<AppInstanceSpec>> =
        current.into_iter().filter(|i| !retired.contains(&i.metadata.name)).collect();

    // During a rollout, the planner says how many new instances each group gets now.
    let place_targets: Vec<placement::Target> = match &rollout_creates {
        Some(creates) if old_exist => desired
            .keys()
            .map(|g| {
                let have = current
                    .iter()
                    .filter(|i| !held.contains(&i.metadata.name))
                    .filter(|i| &i.spec.group == g || g.is_empty())
                    .count()
                    + in_place.iter().filter(|i| &i.spec.group == g || g.is_empty()).count();
                placement::Target { group: g.clone(), count: have as u32 + creates.get(g).copied().unwrap_or(0) }
            })
            .collect(),
        _ => desired.iter().map(|(g, n)| placement::Target { group: g.clone(), count: *n }).collect(),
    };
    let template = spec.template();
    let mut req_resources = resources_of(&template);
    req_resources.extended = spec.placement.requirements.resources.clone();
    let request = placement::Request {
        app: name,
        placement: &spec.placement,
        resources: req_resources,
        runtime: template.runtime.as_str(),
        platforms: artifact_platforms(&spec, input.artifacts),
        targets: place_targets,
        existing: current
            .iter()
            .filter(|i| !held.contains(&i.metadata.name))
            .map(|i| (&i.metadata, &i.spec))
            .chain(in_place.iter().map(|i| (&i.metadata, &i.spec)))
            // everyNode: a node still holding an old instance is taken; the
            // rollout replaces it there.
            .chain(
                insts
                    .iter()
                    .zip(iv.iter())
                    .filter(|(i, v)| {
                        every_node && v.revision != target_rev && !deleting.contains(i.metadata.name.as_str())
                    })
                    .map(|(i, _)| (&i.metadata, &i.spec)),
            )
            .map(|(m, sp)| placement::Existing {
                instance: m.name.clone(),
                node: sp.node.clone(),
                group: sp.group.clone(),
            })
            .collect(),
    };
    let decision = placement::schedule(cluster, &request);
    let mut placements: Vec<PlacementDecision> = Vec::new();
    let previous: HashMap<&str, &PlacementDecision> =
        app.status.placements.iter().map(|p| (p.instance.as_str(), p)).collect();
    let explained: HashMap<&str, &str> = decision.explanations.iter().map(|(i, r)| (i.as_str(), r.as_str())).collect();
    let evicted: BTreeSet<&str> = decision.evict.iter().map(|(i, _)| i.as_str()).collect();
    for (inst, why) in &decision.evict {
        tracing::info!(app = name, instance = %inst, "moving: {why}");
        out.deletes.push(inst.clone());
    }
    for i in current.iter().filter(|i| !evicted.contains(i.metadata.name.as_str())) {
        let reason = previous
            .get(i.metadata.name.as_str())
            .map(|p| p.reason.clone())
            .or_else(|| explained.get(i.metadata.name.as_str()).map(|r| r.to_string()))
            .unwrap_or_else(|| "placed before".to_string());
        placements.push(PlacementDecision {
            instance: i.metadata.name.clone(),
            node: i.spec.node.clone(),
            group: i.spec.group.clone(),
            reason,
        });
    }
    for b in &decision.create {
        let t = spec.template_for(&b.group);
        let spec_i = AppInstanceSpec {
            app: name.to_string(),
            node: b.node.clone(),
            template_hash: t.hash(),
            template: t,
            group: b.group.clone(),
            revision: target_rev,
        };
        let mut inst: AppInstance = Object::new(instance_name(name), spec_i);
        inst.metadata.labels.insert("app".into(), name.to_string());
        if let Some(old) = &b.replaces {
            inst.metadata.labels.insert(REPLACES_LABEL.into(), old.clone());
        }
        placements.push(PlacementDecision {
            instance: inst.metadata.name.clone(),
            node: b.node.clone(),
            group: b.group.clone(),
            reason: b.reason.clone(),
        });
        out.creates.push(inst.to_value());
    }
    for inst in in_place {
        if evicted.contains(inst.metadata.name.as_str()) {
            continue;
        }
        placements.push(PlacementDecision {
            instance: inst.metadata.name.clone(),
            node: inst.spec.node.clone(),
            group: inst.spec.group.clone(),
            reason: format!(
                "revision {target_rev} in place of the old instance: node {} is away and gets it when it returns",
                inst.spec.node
            ),
        });
        out.creates.push(inst.to_value());
    }
    placements.sort_by(|a, b| a.instance.cmp(&b.instance));
    placements.truncate(MAX_EXPLANATIONS);

    // 5. Status.
    let want: u32 = if spec.placement.mode == PlacementMode::EveryNode {
        (current.len() - evicted.len().min(current.len()) + decision.create.len()) as u32 + decision.unplaced
    } else {
        desired.values().sum()
    };
    let scheduled = current.len() - evicted.len().min(current.len()) + decision.create.len();
    let ready_count = insts
        .iter()
        .filter(|i| i.status.phase == InstancePhase::Running)
        .filter(|i| {
            nodes
                .get(i.spec.node.as_str())
                .is_some_and(|n| matches!(n.status.phase, NodePhase::Ready | NodePhase::CloudUnreachable))
        })
        .count();
    // Rejections explain the last placement decision: a pass that placed
    // nothing keeps those of the pass that did.
    let decided = !decision.create.is_empty() || decision.unplaced > 0 || !decision.evict.is_empty();
    let mut rejections =
        if decided || !decision.rejections.is_empty() { decision.rejections } else { app.status.rejections.clone() };
    rejections.truncate(50);
    let mut history = history;
    if let Some(rs) = rollout_status.as_mut() {
        rs.revision = revision;
        if rs.stable_revision == 0 {
            rs.stable_revision = stable;
        }
        // A rollout that waits for instances no node can take says so,
        // rather than looking as if it were moving.
        if decision.unplaced > 0 && rs.phase == RolloutPhase::Progressing {
            rs.message = format!(
                "{}; blocked: {} instance(s) cannot be placed: {}",
                rs.message, decision.unplaced, decision.message
            );
        }
    }
    if history.is_empty() {
        history = app.status.history.clone();
    }
    let status = AppStatus {
        replicas: want,
        scheduled_replicas: scheduled as u32,
        ready_replicas: ready_count as u32,
        observed_generation: app.metadata.generation,
        message: decision.message,
        placements,
        rejections,
        rollout: rollout_status,
        history,
        autoscale: autoscale_status,
    };
    if status != app.status {
        out.statuses.push((name.to_string(), status));
    }
}

/// The rollout planner's view of one instance.
fn instance_view(
    i: &Typed<AppInstanceSpec>,
    revision: u64,
    target: u64,
    nodes: &HashMap<&str, &Typed<NodeSpec>>,
    now: u64,
) -> rollout::InstanceView {
    let running_for_secs = (i.status.phase == InstancePhase::Running)
        .then(|| yunbian_api::time::parse_rfc3339(&i.status.started_at).map(|t| now.saturating_sub(t)))
        .flatten();
    rollout::InstanceView {
        name: i.metadata.name.clone(),
        node: i.spec.node.clone(),
        group: i.spec.group.clone(),
        revision,
        hash: i.spec.template_hash.clone(),
        phase: i.status.phase,
        running_for_secs,
        node_ready: nodes.get(i.spec.node.as_str()).is_some_and(|n| n.status.phase == NodePhase::Ready),
        // Only instances made for this revision count as its failures (an
        // unchanged group's instance that restarted last week does not).
        failed: i.spec.revision == target && (i.status.phase == InstancePhase::Failed || i.status.restart_count > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use yunbian_api::{App, Node, NodeGroup};

    struct Sim {
        apps: Vec<Typed<AppSpec>>,
        insts: Vec<Typed<AppInstanceSpec>>,
        nodes: Vec<Typed<NodeSpec>>,
        groups: Vec<Typed<NodeGroupSpec>>,
        artifacts: Vec<Typed<ArtifactSpec>>,
        now: u64,
    }

    /// Silence known to the hub, per node.
    struct Silent(BTreeMap<String, u64>);
    impl NodeSignals for Silent {
        fn silent_for(&self, node: &str) -> Option<Duration> {
            self.0.get(node).map(|s| Duration::from_secs(*s))
        }
        fn seen_by_peers(&self, _node: &str) -> bool {
            false
        }
        fn latency(&self) -> Vec<(String, String, f64)> {
            Vec::new()
        }
        fn any_silent(&self) -> bool {
            !self.0.is_empty()
        }
    }

    fn node(name: &str, site: &str) -> Typed<NodeSpec> {
        let mut n: Node = Object::new(name, NodeSpec::default());
        n.metadata.labels.insert("site".into(), site.into());
        n.status.phase = NodePhase::Ready;
        n.status.allocatable.cpu_millis = 4000;
        n.status.allocatable.memory_bytes = 8 << 30;
        n.status.info.runtimes = vec!["process".into()];
        n.status.info.arch = "x86_64".into();
        n.status.info.os = "linux".into();
        Arc::new(n)
    }

    fn app(name: &str, spec: serde_json::Value) -> Typed<AppSpec> {
        let mut base = json!({"replicas": 1, "process": {"command": ["/bin/true"]}});
        base.as_object_mut().expect("test data").extend(spec.as_object().expect("test data").clone());
        let mut a: App = Object::new(name, serde_json::from_value(base).expect("app spec"));
        a.metadata.generation = 1;
        Arc::new(a)
    }

    impl Sim {
        fn new(nodes: Vec<Typed<NodeSpec>>, apps: Vec<Typed<AppSpec>>) -> Sim {
            let g = |n: &str, site: &str, tier: &str| {
                let g: NodeGroup = Object::new(
                    n,
                    serde_json::from_value(json!({"selector": {"site": site}, "tier": tier})).expect("test data"),
                );
                Arc::new(g)
            };
            Sim {
                apps,
                insts: Vec::new(),
                nodes,
                groups: vec![g("ga", "a", "edge"), g("gk", "k", "cloud")],
                artifacts: Vec::new(),
                now: 1_000_000,
            }
        }

        /// One pass, applied: deletes and creates done, statuses written,
        /// new instances Running at once.
        fn pass(&mut self, signals: &dyn NodeSignals) -> PassOutput {
            let out = self.pass_pending(signals);
            self.start_all();
            out
        }

        /// Every Pending instance starts.
        fn start_all(&mut self) {
            let now = yunbian_api::time::format_rfc3339(self.now);
            for i in self.insts.iter_mut().filter(|i| i.status.phase == InstancePhase::Pending) {
                let i = Arc::make_mut(i);
                i.status.phase = InstancePhase::Running;
                i.status.started_at = now.clone();
            }
        }

        /// One pass, applied, leaving new instances Pending.
        fn pass_pending(&mut self, signals: &dyn NodeSignals) -> PassOutput {
            let cfg = ControllerConfig::default();
            let out = plan(&PassInput {
                apps: &self.apps,
                instances: &self.insts,
                nodes: &self.nodes,
                groups: &self.groups,
                artifacts: &self.artifacts,
                signals,
                cfg: &cfg,
                now: self.now,
            });
            self.insts.retain(|i| !out.deletes.contains(&i.metadata.name));
            for v in &out.creates {
                let i: AppInstance = Object::from_value(v.clone()).expect("instance");
                self.insts.push(Arc::new(i));
            }
            for (name, st) in &out.statuses {
                let a = self.apps.iter_mut().find(|a| &a.metadata.name == name).expect("test data");
                Arc::make_mut(a).status = st.clone();
            }
            self.now += 5;
            out
        }

        fn nodes_of(&self, app: &str) -> Vec<String> {
            let mut v: Vec<String> =
                self.insts.iter().filter(|i| i.spec.app == app).map(|i| i.spec.node.clone()).collect();
            v.sort();
            v
        }
    }

    #[test]
    fn a_stable_cluster_does_not_churn() {
        let mut sim = Sim::new(
            vec![node("a1", "a"), node("a2", "a"), node("k1", "k")],
            vec![
                app("web", json!({"replicas": 3, "placement": {"spread": {"by": "node"}}})),
                app("site", json!({"placement": {"groups": ["ga"], "perGroup": {"replicas": 1}}})),
                app("every", json!({"placement": {"mode": "everyNode", "groups": ["ga"]}})),
            ],
        );
        let first = sim.pass(&StatusSignals);
        assert_eq!(first.creates.len(), 3 + 1 + 2, "{:?}", sim.nodes_of("web"));
        assert_eq!(sim.nodes_of("every"), ["a1", "a2"]);
        for pass in 0..3 {
            let out = sim.pass(&StatusSignals);
            assert!(out.creates.is_empty() && out.deletes.is_empty(), "churn: {out:?}");
            // The second pass sees the instances Running (ready counts change).
            if pass > 0 {
                assert!(out.statuses.is_empty(), "status rewritten on a stable cluster: {:?}", out.statuses);
            }
        }
    }

    #[test]
    fn on_node_lost_moves_keeps_or_waits_for_peers() {
        let mut sim = Sim::new(
            vec![node("a1", "a"), node("a2", "a")],
            vec![
                app("move", json!({"placement": {"nodeSelector": {"site": "a"}}, "onNodeLost": {"after": "10s"}})),
                app("stay", json!({"placement": {"nodeSelector": {"site": "a"}}, "onNodeLost": {"action": "keep"}})),
            ],
        );
        sim.pass(&StatusSignals);
        let home = sim.nodes_of("move")[0].clone();
        let stay_home = sim.nodes_of("stay")[0].clone();
        // Silent for less than `after`: nothing moves.
        let short = Silent([(home.clone(), 5), (stay_home.clone(), 5)].into());
        let out = sim.pass(&short);
        assert!(out.deletes.is_empty() && out.creates.is_empty(), "{out:?}");
        // Past `after`: the instance of `move` is placed again elsewhere; `stay` stays.
        let long = Silent([(home.clone(), 11), (stay_home.clone(), 11)].into());
        for n in sim.nodes.iter_mut().filter(|n| n.metadata.name == home || n.metadata.name == stay_home) {
            Arc::make_mut(n).status.phase = NodePhase::NotReady;
        }
        sim.pass(&long);
        assert_eq!(sim.nodes_of("stay"), [stay_home]);
        let moved = sim.nodes_of("move");
        assert_eq!(moved.len(), 1);
        assert_ne!(moved[0], home, "a lost node got the replacement");
        // A node its peers still reach (CloudUnreachable) keeps everything.
        let mut sim = Sim::new(
            vec![node("a1", "a"), node("a2", "a")],
            vec![app("move", json!({"placement": {"nodeSelector": {"site": "a"}}, "onNodeLost": {"after": "10s"}}))],
        );
        sim.pass(&StatusSignals);
        let home = sim.nodes_of("move")[0].clone();
        for n in sim.nodes.iter_mut().filter(|n| n.metadata.name == home) {
            Arc::make_mut(n).status.phase = NodePhase::CloudUnreachable;
        }
        sim.pass(&Silent([(home.clone(), 60)].into()));
        assert_eq!(sim.nodes_of("move"), [home]);
    }

    #[test]
    fn a_template_change_without_rollout_settings_replaces_at_once_and_records_revisions() {
        let mut sim = Sim::new(vec![node("a1", "a"), node("a2", "a")], vec![app("web", json!({"replicas": 2}))]);
        sim.pass(&StatusSignals);
        let old: Vec<String> = sim.insts.iter().map(|i| i.metadata.name.clone()).collect();
        let mut a = (*sim.apps[0]).clone();
        a.spec.process.as_mut().expect("test data").command = vec!["/bin/false".into()];
        a.metadata.generation = 2;
        sim.apps[0] = Arc::new(a);
        let out = sim.pass(&StatusSignals);
        let mut deleted = out.deletes.clone();
        deleted.sort();
        let mut old_sorted = old.clone();
        old_sorted.sort();
        assert_eq!(deleted, old_sorted);
        assert_eq!(out.creates.len(), 2);
        let st = &sim.apps[0].status;
        assert_eq!(st.history.iter().map(|r| r.revision).collect::<Vec<_>>(), [1, 2]);
        assert!(sim.insts.iter().all(|i| i.spec.revision == 2), "{:?}", sim.insts);
    }

    #[test]
    fn fallback_to_the_cloud_tier_returns_make_before_break() {
        let mut sim = Sim::new(
            vec![node("a1", "a"), node("k1", "k")],
            vec![app("svc", json!({"placement": {"fallback": "cloud"}, "onNodeLost": {"after": "10s"}}))],
        );
        sim.pass(&StatusSignals);
        assert_eq!(sim.nodes_of("svc"), ["a1"]);
        Arc::make_mut(&mut sim.nodes[0]).status.phase = NodePhase::NotReady;
        sim.pass(&Silent([("a1".to_string(), 30)].into()));
        assert_eq!(sim.nodes_of("svc"), ["k1"]);
        let reason = &sim.apps[0].status.placements[0].reason;
        assert!(reason.contains("fallback"), "{reason}");
        // The edge returns: a replacement is created first, the cloud one
        // stays while it is not Running (however many passes that takes).
        Arc::make_mut(&mut sim.nodes[0]).status.phase = NodePhase::Ready;
        let out = sim.pass_pending(&StatusSignals);
        assert!(out.deletes.is_empty(), "{out:?}");
        assert_eq!(out.creates.len(), 1);
        for _ in 0..3 {
            let out = sim.pass_pending(&StatusSignals);
            assert!(out.deletes.is_empty() && out.creates.is_empty(), "{out:?}");
            assert_eq!(sim.nodes_of("svc"), ["a1", "k1"]);
        }
        // It runs: the cloud one goes.
        sim.start_all();
        sim.pass(&StatusSignals);
        assert_eq!(sim.nodes_of("svc"), ["a1"]);
        let out = sim.pass(&StatusSignals);
        assert!(out.creates.is_empty() && out.deletes.is_empty(), "{out:?}");
    }

    #[test]
    fn a_node_away_during_a_rollout_gets_the_target_revision_in_place() {
        let spec = json!({
            "replicas": 2,
            "placement": {"antiAffinity": [{"app": "web"}]},
            "rollout": {"maxUnavailable": 1, "maxSurge": 0},
        });
        let mut sim = Sim::new(vec![node("a1", "a"), node("a2", "a")], vec![app("web", spec)]);
        sim.pass(&StatusSignals);
        assert_eq!(sim.nodes_of("web"), ["a1", "a2"]);
        Arc::make_mut(&mut sim.nodes[1]).status.phase = NodePhase::NotReady;
        for (generation, cmd) in [(2, "/bin/false"), (3, "/bin/echo")] {
            let mut a = (*sim.apps[0]).clone();
            a.spec.process.as_mut().expect("process").command = vec![cmd.into()];
            a.metadata.generation = generation;
            sim.apps[0] = Arc::new(a);
            for _ in 0..6 {
                sim.pass(&StatusSignals);
            }
            let on_a2: Vec<u64> = sim.insts.iter().filter(|i| i.spec.node == "a2").map(|i| i.spec.revision).collect();
            assert_eq!(on_a2, [generation], "the away node holds only the newest revision");
            let on_a1: Vec<u64> = sim.insts.iter().filter(|i| i.spec.node == "a1").map(|i| i.spec.revision).collect();
            assert_eq!(on_a1, [generation]);
        }
        let st = sim.apps[0].status.rollout.clone().expect("rollout status");
        assert_eq!(st.revision, 3, "{st:?}");
    }

    #[test]
    fn instances_go_only_where_the_artifact_has_a_blob() {
        let blob = |sha: &str| yunbian_api::ArtifactBlob { sha256: sha.repeat(64), ..Default::default() };
        let artifact = |version: &str, platforms: &[(&str, &str)]| {
            let spec = ArtifactSpec {
                name: "tool".into(),
                version: version.into(),
                blobs: platforms.iter().map(|(p, sha)| (p.to_string(), blob(sha))).collect(),
            };
            let a: yunbian_api::Artifact =
                Object::new(yunbian_api::artifact::artifact_object_name("tool", version), spec);
            Arc::new(a)
        };
        let mut arm = (*node("a1", "a")).clone();
        arm.status.info.arch = "aarch64".into();
        arm.metadata.labels.insert("cpu".into(), "arm".into());
        let nodes = vec![Arc::new(arm), node("a2", "a")];
        let by_name = app("by-name", json!({"replicas": 2, "artifact": {"name": "tool", "version": "1"}}));
        let by_digest = app("by-digest", json!({"artifact": {"digest": format!("sha256:{}", "b".repeat(64))}}));
        let later = app(
            "not-pushed",
            json!({"artifact": {"name": "tool", "version": "9"}, "placement": {"nodeSelector": {"cpu": "arm"}}}),
        );
        let on_arm = app(
            "on-arm",
            json!({"artifact": {"name": "tool", "version": "3"}, "placement": {"nodeSelector": {"cpu": "arm"}}}),
        );
        let mut sim = Sim::new(nodes, vec![by_name, by_digest, later, on_arm]);
        sim.artifacts = vec![
            artifact("1", &[("linux/amd64", "a")]),
            artifact("2", &[("linux/amd64", "b")]),
            artifact("3", &[("linux/amd64", "d")]),
        ];
        sim.pass(&StatusSignals);
        // amd64 only: both instances on the x86_64 node, and the arm64 node
        // says why not there.
        assert_eq!(sim.nodes_of("by-name"), ["a2", "a2"]);
        let st = &sim.apps[0].status;
        let why = st.rejections.iter().find(|r| r.node == "a1").map(|r| r.reason.as_str());
        assert_eq!(why, Some("the artifact has no blob for linux/arm64 (has linux/amd64)"), "{st:?}");
        assert_eq!(sim.nodes_of("by-digest"), ["a2"]);
        // Not pushed yet: no constraint (the node reports the missing artifact).
        assert_eq!(sim.nodes_of("not-pushed"), ["a1"]);
        assert!(sim.nodes_of("on-arm").is_empty(), "{:?}", sim.apps[3].status);
        // A wasm blob runs everywhere.
        sim.artifacts[2] = artifact("3", &[("linux/amd64", "d"), ("wasi/wasm32", "c")]);
        sim.pass(&StatusSignals);
        assert_eq!(sim.nodes_of("on-arm"), ["a1"]);
        // An artifact that loses the running platform (pushed again, one
        // platform at a time) evicts nothing.
        sim.artifacts[0] = artifact("1", &[("linux/arm64", "e")]);
        let out = sim.pass(&StatusSignals);
        assert!(out.deletes.is_empty(), "{out:?}");
        assert_eq!(sim.nodes_of("by-name"), ["a2", "a2"]);
    }

    #[test]
    fn a_rollout_waiting_for_an_unplaceable_group_says_why() {
        // Group gk (site k) has no node: its instance can never be placed.
        let spec = json!({
            "placement": {"groups": ["ga", "gk"], "perGroup": {"replicas": 1}},
            "rollout": {"maxUnavailable": 1, "maxSurge": 0},
        });
        let mut sim = Sim::new(vec![node("a1", "a")], vec![app("site", spec)]);
        sim.pass(&StatusSignals);
        let mut a = (*sim.apps[0]).clone();
        a.spec.process.as_mut().expect("process").command = vec!["/bin/false".into()];
        a.metadata.generation = 2;
        sim.apps[0] = Arc::new(a);
        for _ in 0..6 {
            sim.pass(&StatusSignals);
        }
        // The missing instance uses up maxUnavailable: ga keeps revision 1.
        assert_eq!(sim.nodes_of("site"), ["a1"]);
        let st = sim.apps[0].status.rollout.clone().expect("rollout status");
        assert_eq!(st.phase, RolloutPhase::Progressing, "{st:?}");
        assert!(st.message.contains("blocked: 1 instance(s) cannot be placed: "), "{}", st.message);
    }

    #[test]
    fn every_node_with_rollout_settings_is_stable_and_replaces_node_by_node() {
        let spec = json!({"placement": {"mode": "everyNode"}, "rollout": {"maxUnavailable": 1, "maxSurge": 0}});
        let mut sim = Sim::new(vec![node("a1", "a"), node("a2", "a"), node("a3", "a")], vec![app("ds", spec)]);
        sim.pass(&StatusSignals);
        assert_eq!(sim.nodes_of("ds"), ["a1", "a2", "a3"]);
        for _ in 0..3 {
            let out = sim.pass(&StatusSignals);
            assert!(out.creates.is_empty() && out.deletes.is_empty(), "churn: {out:?}");
        }
        let mut a = (*sim.apps[0]).clone();
        a.spec.process.as_mut().expect("process").command = vec!["/bin/false".into()];
        a.metadata.generation = 2;
        sim.apps[0] = Arc::new(a);
        for _ in 0..12 {
            sim.pass(&StatusSignals);
            // Never two instances on a node, never more than one node without one.
            let nodes = sim.nodes_of("ds");
            let mut dedup = nodes.clone();
            dedup.dedup();
            assert_eq!(nodes, dedup, "two instances on a node");
            assert!(nodes.len() >= 2, "more than maxUnavailable down: {nodes:?}");
        }
        assert_eq!(sim.nodes_of("ds"), ["a1", "a2", "a3"]);
        assert!(sim.insts.iter().all(|i| i.spec.revision == 2), "{:?}", sim.insts);
    }
}
