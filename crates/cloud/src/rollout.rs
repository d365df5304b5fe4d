//! Rollouts: App revisions and the rollout planner (docs/design/019-rollouts.md).
//!
//! Pure: no I/O and no clock (`now` is a parameter), so every rule is
//! table-tested. The App controller, once per App and pass:
//!
//! 1. computes [`revision_hash`] of the App's spec and records it with
//!    [`record_revision`] (a new entry when it changed);
//! 2. marks each instance with the revision it runs ([`InstanceView`]:
//!    the target's number when its template hash is the target's for its
//!    group) and calls [`plan`] with the target and the stable revision
//!    (`status.rollout.stableRevision`);
//! 3. deletes `plan.delete`, places `plan.create` instances of the target
//!    per group with the scheduler, and writes `plan.status`. When
//!    `plan.rollback` is set, it plans again towards the stable revision
//!    (its template from the history through [`spec_at`]).
//!
//! # The model
//!
//! An instance is *available* when Running on a Ready node for at least
//! `minReadySeconds` and not failed. Instances on nodes that are not Ready
//! are *offline*: they are left out of every budget (they cannot be
//! available, and must not block the rollout), and an old one is replaced
//! by the target as soon as the current step allows its group (deleted, and
//! a new one created in its group): the node learns of it when it returns
//! and never runs an intermediate revision.
//!
//! Budgets count online instances: with `D` desired online, at least
//! `D - maxUnavailable` stay available and at most `D + maxSurge` exist.
//! `by: node` and `by: group` count whole domains instead: at most
//! `maxUnavailable` nodes (groups) are disrupted at once, and every old
//! instance of a disrupted domain is replaced together (`maxSurge` does not
//! apply). Missing instances are created whatever the budgets. Canary steps
//! limit which instances may be updated; the step in progress is done when
//! everything it allows is updated and available.
//!
//! # States
//!
//! `status.rollout.revision` names the rollout; a new target revision
//! starts a new rollout (step 0, no failures). `RolledBack` and `Failed`
//! stick to their revision until a newer one is recorded; `Failed` freezes
//! the split as it is, like `spec.rollout.paused` does.

use std::collections::{BTreeMap, BTreeSet};

use yunbian_api::time::{format_rfc3339, parse_rfc3339};
use yunbian_api::{
    AppRevision, AppSpec, CanaryStep, FailurePolicy, GroupOverride, InstancePhase, RolloutPhase, RolloutSpec,
    RolloutStatus, RolloutUnit, WorkloadTemplate,
};

/// Revisions kept in `status.history`.
pub const HISTORY_LIMIT: usize = 10;

// ---------------------------------------------------------------- revisions

/// The hash that identifies an App revision: the template's hash when no
/// override changes a group's template, otherwise a hash over the template
/// and every overridden group's template. Replica counts (of the App or of
/// an override) are not part of it: scaling is not a new revision.
pub fn revision_hash(spec: &AppSpec) -> String {
    let base = spec.template().hash();
    let mut parts = String::new();
    let mut groups: Vec<&GroupOverride> = spec.placement.overrides.iter().filter(|o| changes_template(o)).collect();
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    for o in groups {
        parts.push_str(&format!("|{}={}", o.group, spec.template_for(&o.group).hash()));
    }
    if parts.is_empty() {
        return base;
    }
    format!("{:010x}", fnv1a(format!("{base}{parts}").as_bytes()) & 0xff_ffff_ffff)
}

fn changes_template(o: &GroupOverride) -> bool {
    !o.env.is_empty() || o.args.is_some() || o.artifact_version.is_some()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Records that the App's revision hash is now `hash`.
///
/// Returns the new history (oldest first, at most [`HISTORY_LIMIT`]) and the
/// current revision number. When `hash` is already the newest entry, nothing
/// changes. When it equals an older entry (a template brought back), that
/// entry becomes the newest with a new number, as Kubernetes does.
pub fn record_revision(
    history: &[AppRevision],
    hash: &str,
    template: &WorkloadTemplate,
    overrides: &[GroupOverride],
    generation: u64,
    now_rfc3339: &str,
) -> (Vec<AppRevision>, u64) {
    if let Some(last) = history.last().filter(|r| r.hash == hash) {
        return (history.to_vec(), last.revision);
    }
    let number = history.iter().map(|r| r.revision).max().unwrap_or(0) + 1;
    let overrides: Vec<GroupOverride> = overrides.iter().filter(|o| changes_template(o)).cloned().collect();
    let change = match (history.iter().find(|r| r.hash == hash), history.last()) {
        (Some(earlier), _) => format!("back to revision {}", earlier.revision),
        (None, Some(last)) => describe_change(&last.template, &last.overrides, template, &overrides),
        (None, None) => "created".to_string(),
    };
    let mut next: Vec<AppRevision> = history.iter().filter(|r| r.hash != hash).cloned().collect();
    next.push(AppRevision {
        revision: number,
        hash: hash.to_string(),
        created: now_rfc3339.to_string(),
        generation,
        change,
        template: template.clone(),
        overrides,
    });
    let excess = next.len().saturating_sub(HISTORY_LIMIT);
    next.drain(..excess);
    (next, number)
}

/// A short description of what changed between two revisions
/// (`artifact site-app 1.0 → 2.0; env LEVEL`).
pub fn describe_change(
    old: &WorkloadTemplate,
    old_overrides: &[GroupOverride],
    new: &WorkloadTemplate,
    new_overrides: &[GroupOverride],
) -> String {
    let mut parts = Vec::new();
    if old.artifact != new.artifact {
        let show = |a: &Option<yunbian_api::ArtifactRef>| match a {
            Some(a) if !a.name.is_empty() => format!("{} {}", a.name, a.version).trim().to_string(),
            Some(a) => a.digest.chars().take(19).collect(),
            None => "none".to_string(),
        };
        let (o, n) = (show(&old.artifact), show(&new.artifact));
        match (&old.artifact, &new.artifact) {
            (Some(a), Some(b)) if a.name == b.name && !a.name.is_empty() => {
                parts.push(format!("artifact {} {} → {}", a.name, a.version, b.version))
            }
            _ => parts.push(format!("artifact {o} → {n}")),
        }
    }
    let (op, np) = (old.process.clone().unwrap_or_default(), new.process.clone().unwrap_or_default());
    if op.command != np.command {
        parts.push("command".to_string());
    }
    if op.args != np.args {
        parts.push("args".to_string());
    }
    let keys: BTreeSet<&String> = op.env.keys().chain(np.env.keys()).collect();
    let env: Vec<&str> = keys.into_iter().filter(|k| op.env.get(*k) != np.env.get(*k)).map(String::as_str).collect();
    if !env.is_empty() {
        parts.push(format!("env {}", env.join(",")));
    }
    if op.working_dir != np.working_dir {
        parts.push("workingDir".to_string());
    }
    if old.runtime != new.runtime {
        parts.push(format!("runtime {} → {}", old.runtime.as_str(), new.runtime.as_str()));
    }
    if old.restart_policy != new.restart_policy {
        parts.push("restartPolicy".to_string());
    }
    if old.resources != new.resources {
        parts.push("resources".to_string());
    }
    if old.health != new.health {
        parts.push("health".to_string());
    }
    if old.devices != new.devices {
        parts.push("devices".to_string());
    }
    if old_overrides != new_overrides {
        let groups: BTreeSet<&str> = old_overrides
            .iter()
            .chain(new_overrides)
            .filter(|o| {
                old_overrides.iter().find(|x| x.group == o.group) != new_overrides.iter().find(|x| x.group == o.group)
            })
            .map(|o| o.group.as_str())
            .collect();
        parts.push(format!("overrides {}", groups.into_iter().collect::<Vec<_>>().join(",")));
    }
    if parts.is_empty() {
        "template".to_string()
    } else {
        parts.join("; ")
    }
}

/// `current` with the template and per-group overrides of `revision` put
/// back: what `rollout undo` applies, and what instances of an older
/// revision run (`spec_at(rev, app).template_for(group)`). Placement,
/// replicas (including per-group replica overrides) and the rollout
/// settings stay as in `current`.
pub fn spec_at(revision: &AppRevision, current: &AppSpec) -> AppSpec {
    let t = &revision.template;
    let mut spec = current.clone();
    spec.runtime = t.runtime;
    spec.process = t.process.clone();
    spec.artifact = t.artifact.clone();
    spec.restart_policy = t.restart_policy;
    spec.resources = t.resources.clone();
    spec.health = t.health.clone();
    spec.placement.requirements.resources = t.devices.clone();
    let mut overrides = Vec::new();
    for g in &current.placement.groups {
        let then = revision.overrides.iter().find(|o| &o.group == g);
        let replicas = current.placement.override_for(g).and_then(|o| o.replicas);
        let o = GroupOverride {
            group: g.clone(),
            replicas,
            env: then.map(|o| o.env.clone()).unwrap_or_default(),
            args: then.and_then(|o| o.args.clone()),
            artifact_version: then.and_then(|o| o.artifact_version.clone()),
        };
        if replicas.is_some() || changes_template(&o) {
            overrides.push(o);
        }
    }
    spec.placement.overrides = overrides;
    spec
}

/// Why `rollout undo` cannot go back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoError {
    /// The history holds no revision before the current one.
    #[error("app {app} has no earlier revision to go back to")]
    NothingToUndo {
        /// The App.
        app: String,
    },
    /// The asked revision is not in the history.
    #[error("app {app} has no revision {revision} (known: {known})")]
    UnknownRevision {
        /// The App.
        app: String,
        /// The asked revision.
        revision: u64,
        /// The revisions the history holds, `1, 2, 3`.
        known: String,
    },
    /// The asked revision is the one the App already runs.
    #[error("app {app} is already at revision {revision}")]
    AlreadyCurrent {
        /// The App.
        app: String,
        /// The current revision.
        revision: u64,
    },
}

/// The spec `rollout undo` writes: `current` with the template of revision
/// `to` (default: the one before the current revision). The controller then
/// records it as a new revision, as Kubernetes does.
pub fn undo(app: &str, current: &AppSpec, history: &[AppRevision], to: Option<u64>) -> Result<AppSpec, UndoError> {
    let hash = revision_hash(current);
    let current_pos = history.iter().rposition(|r| r.hash == hash);
    let target = match to {
        Some(n) => history.iter().find(|r| r.revision == n).ok_or_else(|| UndoError::UnknownRevision {
            app: app.to_string(),
            revision: n,
            known: history.iter().map(|r| r.revision.to_string()).collect::<Vec<_>>().join(", "),
        })?,
        None => {
            // The revision before the current one; when the spec changed
            // since the newest entry was recorded, the newest entry.
            let before = match current_pos {
                Some(p) => p.checked_sub(1),
                None => history.len().checked_sub(1),
            };
            before.and_then(|i| history.get(i)).ok_or_else(|| UndoError::NothingToUndo { app: app.to_string() })?
        }
    };
    if target.hash == hash {
        return Err(UndoError::AlreadyCurrent { app: app.to_string(), revision: target.revision });
    }
    Ok(spec_at(target, current))
}

/// What `rollout resume` does to the status: at a `{pause: true}` canary
/// step, the rollout moves on to the next step (started `now_rfc3339`).
/// Returns whether the status changed.
pub fn resume_status(spec: &RolloutSpec, status: &mut RolloutStatus, now_rfc3339: &str) -> bool {
    let steps = spec.canary.as_ref().map(|c| c.steps.as_slice()).unwrap_or_default();
    let at_pause = steps.get(status.step as usize).is_some_and(|s| s.pause == Some(true));
    if !at_pause || status.phase != RolloutPhase::Paused {
        return false;
    }
    status.step += 1;
    status.step_started = now_rfc3339.to_string();
    status.phase = RolloutPhase::Progressing;
    status.message = format!("resumed at step {}/{}", status.step, steps.len());
    true
}

// ---------------------------------------------------------------- planner input

/// What the planner needs to know about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceView {
    /// Instance name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// The group it was placed for (`""` without groups).
    pub group: String,
    /// The revision it runs, as the controller decides it: the target
    /// revision when its template hash is the target's for its group
    /// (an instance whose group's template did not change needs no update),
    /// otherwise the revision it was created for.
    pub revision: u64,
    /// `spec.templateHash`. The planner goes by `revision`; the hash is
    /// what the controller derived it from, kept for logs and debugging.
    pub hash: String,
    /// Reported phase.
    pub phase: InstancePhase,
    /// Seconds since `status.startedAt`, when Running.
    pub running_for_secs: Option<u64>,
    /// Whether its node is Ready.
    pub node_ready: bool,
    /// Failed, or restarted at least once (`restartCount > 0`).
    pub failed: bool,
}

/// Everything one planning pass reads.
#[derive(Debug, Clone)]
pub struct RolloutInput<'a> {
    /// The App's `spec.rollout`, or the default.
    pub spec: &'a RolloutSpec,
    /// `status.rollout` as last written (ignored when it is about another
    /// revision: a new target starts a new rollout).
    pub status: Option<&'a RolloutStatus>,
    /// The revision instances converge to.
    pub target_revision: u64,
    /// The last revision that completed. Equal to the target (or 0) for a
    /// new App or a finished rollout: there is then nothing to protect, so
    /// no canary, no budget for missing instances and no failure policy.
    pub stable_revision: u64,
    /// Instances each group should run (`""` alone without `perGroup`).
    pub desired: &'a BTreeMap<String, u32>,
    /// Every instance of the App, of any revision.
    pub instances: &'a [InstanceView],
    /// Unix seconds.
    pub now: u64,
}

// ---------------------------------------------------------------- planner output

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutPlan {
    /// Instances of `target_revision` to place now, per key of `desired`.
    pub create: BTreeMap<String, u32>,
    /// Instances to delete now (old revision, or surplus), sorted.
    pub delete: Vec<String>,
    /// The status to write (the controller writes it only when it differs).
    pub status: RolloutStatus,
    /// Too many new instances failed with `failurePolicy: rollback`: this
    /// plan changes nothing; the controller makes the stable revision its
    /// target (its template from the history) and plans again with
    /// `status: None` and no canary, keeping this plan's status (phase
    /// `RolledBack`) while the App's revision stays the failed one.
    pub rollback: bool,
}

impl RolloutPlan {
    /// Whether the plan changes no instance.
    pub fn is_idle(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty()
    }
}

// ---------------------------------------------------------------- planner

/// Which instances the step in progress allows to update.
#[derive(Debug, Clone, Default)]
struct Allowance {
    /// Groups that may update entirely (`None`: every group).
    groups: Option<BTreeSet<String>>,
    /// With a percent step: every group may update, up to this many
    /// updated instances in all (the named `groups` first).
    cap: Option<u64>,
    /// No step at all: old instances go only beyond `desired + maxSurge`.
    frozen: bool,
}

impl Allowance {
    fn all() -> Allowance {
        Allowance { groups: None, cap: None, frozen: false }
    }

    fn frozen() -> Allowance {
        Allowance { groups: Some(BTreeSet::new()), cap: None, frozen: true }
    }

    /// The allowance of step `k`, earlier steps included; past the last
    /// step, everything.
    fn at_step(steps: &[CanaryStep], k: usize, desired_total: u64) -> Allowance {
        if k >= steps.len() {
            return Allowance::all();
        }
        let mut groups = BTreeSet::new();
        let mut percent: Option<u32> = None;
        for s in &steps[..=k] {
            groups.extend(s.groups.iter().flatten().cloned());
            if let Some(p) = s.percent {
                percent = Some(percent.map_or(p, |q| q.max(p)));
            }
        }
        let cap = percent.map(|p| (desired_total * u64::from(p)).div_ceil(100));
        Allowance { groups: Some(groups), cap, frozen: false }
    }

    /// Whether every instance of `group` may update.
    fn names(&self, group: &str) -> bool {
        self.groups.as_ref().is_none_or(|g| g.contains(group))
    }
}

/// The actions of converging under one allowance, and how far it is.
#[derive(Debug, Default)]
struct Converge {
    create: BTreeMap<String, u32>,
    delete: Vec<String>,
    /// Everything the allowance permits is updated and available.
    met: bool,
    /// Every instance runs the target, each group has its count, and
    /// every online instance is available.
    complete: bool,
    /// Every instance runs the target and each group has its count.
    placed: bool,
    updated: u32,
    available: u32,
}

/// Decides one pass of an App's rollout. See the module documentation.
pub fn plan(input: &RolloutInput) -> RolloutPlan {
    let spec = input.spec;
    let target = input.target_revision;
    let steps: &[CanaryStep] = spec.canary.as_ref().map(|c| c.steps.as_slice()).unwrap_or_default();
    let n_steps = steps.len() as u32;
    // Something to protect: instances of a revision that completed. The
    // canary applies while any of them (or of another revision) is left.
    let protecting = input.stable_revision != 0 && input.stable_revision != target;
    let canary = protecting && input.instances.iter().any(|i| i.revision != target);
    let prev = input.status.filter(|s| s.revision == target);
    let desired_total: u64 = input.desired.values().map(|d| u64::from(*d)).sum();

    let mut status = match prev {
        Some(p) => p.clone(),
        None => RolloutStatus {
            phase: RolloutPhase::Progressing,
            revision: target,
            step: if canary { 0 } else { n_steps },
            step_started: format_rfc3339(input.now),
            ..Default::default()
        },
    };
    status.stable_revision = input.stable_revision;

    let mut failed: Vec<&str> =
        input.instances.iter().filter(|i| i.revision == target && i.failed).map(|i| i.name.as_str()).collect();
    failed.sort_unstable();
    // Failures count while a rollout runs; failed instances are not deleted
    // by the planner, and one deleted by hand still counted.
    status.failures = if protecting { status.failures.max(failed.len() as u32) } else { 0 };

    let sticky = prev.map(|p| p.phase).filter(|p| matches!(p, RolloutPhase::Failed | RolloutPhase::RolledBack));
    let mut frozen = sticky.is_some() || spec.paused;
    if sticky.is_none() && status.failures > spec.max_failures {
        let mut names = failed.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        if failed.len() > 5 {
            names.push_str(&format!(" and {} more", failed.len() - 5));
        }
        let why = format!(
            "{} new instance(s) failed ({names}), more than maxFailures {}",
            status.failures, spec.max_failures
        );
        if spec.failure_policy == FailurePolicy::Rollback {
            status.phase = RolloutPhase::RolledBack;
            status.message = format!("rolled back to revision {}: {why}", input.stable_revision);
            return RolloutPlan { status, rollback: true, ..Default::default() };
        }
        status.phase = RolloutPhase::Failed;
        status.message = format!("stopped: {why}; apply a fixed template or run `yunbian rollout undo`");
        frozen = true;
    }

    let ctx = Ctx { input };
    let result = if frozen {
        ctx.converge(&Allowance::frozen())
    } else {
        // Advance through every step already met, then act on the first
        // one that is not.
        if !canary {
            status.step = status.step.max(n_steps);
        }
        let mut started = parse_rfc3339(&status.step_started).unwrap_or(input.now);
        loop {
            let k = status.step as usize;
            let result = ctx.converge(&Allowance::at_step(steps, k, desired_total));
            let done = match steps.get(k) {
                None => break result,
                Some(s) if s.pause == Some(true) => false,
                Some(s) => match s.pause_seconds {
                    Some(secs) => result.met && input.now >= started.saturating_add(secs),
                    None => result.met,
                },
            };
            if !done {
                break result;
            }
            status.step += 1;
            started = input.now;
            status.step_started = format_rfc3339(input.now);
        }
    };

    status.updated_replicas = result.updated;
    status.available_replicas = result.available;
    let k = status.step as usize;
    let step_text = if n_steps > 0 { format!(", step {}/{n_steps}", k.min(steps.len())) } else { String::new() };
    let progress = format!("{} of {desired_total} updated, {} available{step_text}", result.updated, result.available);
    match sticky.or((status.phase == RolloutPhase::Failed).then_some(RolloutPhase::Failed)) {
        // Their message names the failed instances; it stays.
        Some(p) => status.phase = p,
        None if spec.paused => {
            status.phase = RolloutPhase::Paused;
            status.message = format!("paused by spec.rollout.paused: {progress}");
        }
        None if k >= steps.len() && (result.complete || (!protecting && result.placed)) => {
            status.phase = RolloutPhase::Complete;
            status.stable_revision = target;
            status.message = format!("revision {target} complete: {progress}");
        }
        None => {
            let step = steps.get(k);
            if step.is_some_and(|s| s.pause == Some(true)) && result.met {
                status.phase = RolloutPhase::Paused;
                status.message =
                    format!("paused at step {}/{n_steps}: run `yunbian rollout resume` to go on; {progress}", k + 1);
            } else if let Some(secs) = step.and_then(|s| s.pause_seconds).filter(|_| result.met) {
                status.phase = RolloutPhase::Progressing;
                status.message = format!("waiting {secs}s at step {}/{n_steps}; {progress}", k + 1);
            } else {
                status.phase = RolloutPhase::Progressing;
                status.message = format!("updating to revision {target}: {progress}");
            }
        }
    }

    let create: BTreeMap<String, u32> = result.create.into_iter().filter(|(_, n)| *n > 0).collect();
    let mut delete = result.delete;
    delete.sort();
    delete.dedup();
    RolloutPlan { create, delete, status, rollback: false }
}

/// One pass's fixed inputs.
struct Ctx<'a> {
    input: &'a RolloutInput<'a>,
}

/// One key of `desired`: its count and its online instances.
#[derive(Debug, Default)]
struct Group<'a> {
    desired: u64,
    /// Desired online: `desired` minus the offline instances kept.
    want: u64,
    upd: Vec<&'a InstanceView>,
    old: Vec<&'a InstanceView>,
    /// Offline instances that stay (updated, or old the step keeps).
    offline: u64,
    /// Instances to create now.
    create: u64,
}

impl Group<'_> {
    fn online(&self) -> u64 {
        (self.upd.len() + self.old.len()) as u64
    }
}

impl<'a> Ctx<'a> {
    fn available(&self, i: &InstanceView) -> bool {
        i.node_ready
            && !i.failed
            && i.phase == InstancePhase::Running
            && i.running_for_secs.unwrap_or(0) >= u64::from(self.input.spec.min_ready_seconds)
    }

    fn updated(&self, i: &InstanceView) -> bool {
        i.revision == self.input.target_revision
    }

    /// The key of `desired` an instance counts towards: its group, or `""`
    /// when the App has one count for all groups.
    fn key_of<'b>(&self, i: &'b InstanceView) -> &'b str {
        if !self.input.desired.contains_key(&i.group) && self.input.desired.contains_key("") {
            ""
        } else {
            &i.group
        }
    }

    /// Whether the step lets `i` update: its group, or its key, is named.
    fn may_update(&self, allow: &Allowance, i: &InstanceView) -> bool {
        allow.names(&i.group) || allow.names(self.key_of(i))
    }

    fn converge(&self, allow: &Allowance) -> Converge {
        let input = self.input;
        let mut out = Converge::default();
        let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
        for (g, d) in input.desired {
            groups.entry(g.as_str()).or_default().desired = u64::from(*d);
        }
        // Unavailable first, then by name: the order instances go in.
        let mut instances: Vec<&InstanceView> = input.instances.iter().collect();
        instances.sort_by(|a, b| (self.available(a), &a.name).cmp(&(self.available(b), &b.name)));

        // Offline instances are outside every budget: kept, replaced by the
        // target at once (delete, and create in their group), or surplus.
        for i in instances.iter().filter(|i| !i.node_ready) {
            let g = groups.entry(self.key_of(i)).or_default();
            if g.offline + g.create >= g.desired {
                out.delete.push(i.name.clone());
            } else if self.updated(i) {
                g.offline += 1;
                out.updated += 1;
            } else if !allow.frozen && self.may_update(allow, i) {
                out.delete.push(i.name.clone());
                g.create += 1;
            } else {
                g.offline += 1;
            }
        }
        for i in instances.iter().filter(|i| i.node_ready) {
            let g = groups.entry(self.key_of(i)).or_default();
            if self.updated(i) {
                g.upd.push(i);
            } else {
                g.old.push(i);
            }
        }
        for g in groups.values_mut() {
            g.want = g.desired.saturating_sub(g.offline + g.create);
            // Scale down: updated instances beyond the count go first
            // (unavailable ones first).
            while g.upd.len() as u64 > g.want {
                out.delete.push(g.upd.remove(0).name.clone());
            }
        }

        // How many updated instances each key ends with at this step.
        let mut goal: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, g) in &groups {
            let n = if allow.names(key) {
                g.want
            } else {
                let may = g.old.iter().filter(|i| self.may_update(allow, i)).count();
                g.want.min((g.upd.len() + may) as u64)
            };
            goal.insert(key, n);
        }
        if let Some(cap) = allow.cap {
            let mut total: u64 = goal.values().sum();
            while total < cap {
                // A key with a hole first, then the least updated share.
                let pick = groups
                    .iter()
                    .filter(|(k, g)| goal[**k] < g.want)
                    .min_by_key(|(k, g)| (g.online() >= g.want, goal[**k] * 1000 / g.want.max(1), **k))
                    .map(|(k, _)| *k);
                let Some(k) = pick else { break };
                *goal.get_mut(k).expect("picked from the map") += 1;
                total += 1;
            }
        }

        // Creates: holes are filled whatever the budget (a new App, a
        // scale-up, a lost instance); beyond them, new instances within the
        // surge budget, keys with a hole first.
        let unit = input.spec.by;
        let want_total: u64 = groups.values().map(|g| g.want).sum();
        let online_total: u64 = groups.values().map(Group::online).sum();
        let surge = match unit {
            RolloutUnit::Instance => input.spec.max_surge.resolve(want_total, true),
            RolloutUnit::Node | RolloutUnit::Group => 0,
        };
        let mut headroom = (want_total + surge).saturating_sub(online_total);
        let mut order: Vec<&str> = groups.keys().copied().collect();
        order.sort_by_key(|k| (groups[k].online() >= groups[k].want, *k));
        for k in order {
            let g = groups.get_mut(k).expect("key from the map");
            let hole = g.want.saturating_sub(g.online());
            let more = goal[k].saturating_sub(g.upd.len() as u64);
            let take = hole.max(more.min(headroom));
            headroom = headroom.saturating_sub(take);
            g.create += take;
        }

        // Old instances beyond what the step keeps old may go, those the
        // step lets update first.
        let mut removable: Vec<&InstanceView> = Vec::new();
        for (k, g) in &groups {
            let keep_old = g.want.saturating_sub(goal[k].max(g.upd.len() as u64 + g.create));
            let extra = (g.old.len() as u64).saturating_sub(keep_old) as usize;
            let mut old = g.old.clone();
            old.sort_by_key(|i| !self.may_update(allow, i));
            removable.extend(old.into_iter().take(extra));
        }
        let available_now =
            groups.values().flat_map(|g| g.upd.iter().chain(&g.old)).filter(|i| self.available(i)).count() as u64;
        if allow.frozen {
            // The split stays as it is; only what exceeds the surge goes.
            let planned: u64 = groups.values().map(|g| g.online() + g.create).sum();
            let over = planned.saturating_sub(want_total + surge) as usize;
            removable.sort_by_key(|i| (self.available(i), i.name.clone()));
            out.delete.extend(removable.iter().take(over).map(|i| i.name.clone()));
            removable.clear();
        }
        match unit {
            RolloutUnit::Instance => {
                let min_available = want_total.saturating_sub(input.spec.max_unavailable.resolve(want_total, false));
                let mut budget = available_now.saturating_sub(min_available);
                // Unavailable old ones cost no availability, but they may
                // be about to become available (old instances still within
                // minReadySeconds): as Kubernetes does, only as many go as
                // leave `min_available` plus the new instances not yet
                // available.
                let creating: u64 = groups.values().map(|g| g.create).sum();
                let new_unavailable =
                    creating + groups.values().flat_map(|g| g.upd.iter()).filter(|i| !self.available(i)).count() as u64;
                let mut cleanup = (online_total + creating).saturating_sub(min_available + new_unavailable);
                // Then keys with a surplus first.
                removable.sort_by_key(|i| {
                    let g = &groups[self.key_of(i)];
                    (self.available(i), g.online() + g.create <= g.want, i.name.clone())
                });
                for i in &removable {
                    let left = if self.available(i) { &mut budget } else { &mut cleanup };
                    if *left == 0 {
                        continue;
                    }
                    *left -= 1;
                    out.delete.push(i.name.clone());
                }
            }
            RolloutUnit::Node | RolloutUnit::Group => {
                // Whole domains: every old instance of at most
                // maxUnavailable disrupted nodes (groups) goes at once.
                let domain = |i: &InstanceView| -> String {
                    if unit == RolloutUnit::Node {
                        i.node.clone()
                    } else {
                        i.group.clone()
                    }
                };
                let mut all: BTreeSet<String> = BTreeSet::new();
                let mut busy: BTreeSet<String> = BTreeSet::new();
                for i in groups.values().flat_map(|g| g.upd.iter().chain(&g.old)) {
                    all.insert(domain(i));
                    if !self.available(i) {
                        busy.insert(domain(i));
                    }
                }
                let max = usize::try_from(input.spec.max_unavailable.resolve(all.len() as u64, false))
                    .unwrap_or(usize::MAX)
                    .max(1);
                let mut candidates: Vec<String> = removable.iter().map(|i| domain(i)).collect();
                candidates.sort();
                candidates.dedup();
                for d in candidates {
                    if busy.len() < max {
                        busy.insert(d);
                    }
                }
                for i in removable.iter().filter(|i| busy.contains(&domain(i))) {
                    out.delete.push(i.name.clone());
                    groups.get_mut(self.key_of(i)).expect("key from the map").create += 1;
                }
            }
        }

        let placed_groups =
            groups.iter().all(|(k, g)| g.old.is_empty() && g.upd.len() as u64 == g.want && goal[k] == g.want);
        let offline_updated = input.instances.iter().filter(|i| !i.node_ready).all(|i| self.updated(i));
        out.create = groups.iter().map(|(k, g)| (k.to_string(), g.create as u32)).collect();
        let idle = out.delete.is_empty() && groups.values().all(|g| g.create == 0);
        let upd_available = groups.values().all(|g| g.upd.iter().all(|i| self.available(i)));
        out.met = idle && upd_available && groups.iter().all(|(k, g)| g.upd.len() as u64 >= goal[k]);
        out.placed = idle && placed_groups && offline_updated;
        out.complete = out.placed && upd_available;
        out.updated += groups.values().map(|g| g.upd.len() as u32).sum::<u32>();
        out.available = groups.values().flat_map(|g| g.upd.iter()).filter(|i| self.available(i)).count() as u32;
        out
    }
}
