//! The rollout planner (`yunbian_cloud::rollout`), pass by pass with a
//! virtual clock: a small simulator applies each plan (deleted instances
//! vanish, created ones start, time passes) and checks the budgets after
//! every pass. Covers rolling with surge and unavailability, `by: node` and
//! `by: group`, every canary step kind, pause and resume,
//! `minReadySeconds`, both failure policies, offline nodes, scaling during
//! a rollout, a stable App (no churn) and a brand-new App; and revisions:
//! hashes, history, undo.

use std::collections::BTreeMap;

use serde_json::json;
use yunbian_api::{
    AppRevision, AppSpec, GroupOverride, InstancePhase, RolloutPhase, RolloutSpec, RolloutStatus, WorkloadTemplate,
};
use yunbian_cloud::rollout::{
    plan, record_revision, resume_status, revision_hash, spec_at, undo, InstanceView, RolloutInput, RolloutPlan,
    UndoError, HISTORY_LIMIT,
};

fn rollout(v: serde_json::Value) -> RolloutSpec {
    serde_json::from_value(v).expect("rollout spec decodes")
}

/// One App's instances and rollout, driven pass by pass.
struct Sim {
    spec: RolloutSpec,
    desired: BTreeMap<String, u32>,
    instances: Vec<InstanceView>,
    status: Option<RolloutStatus>,
    target: u64,
    stable: u64,
    now: u64,
    next: u32,
    /// New instances of the target fail as soon as they start.
    crash: bool,
    /// Nodes by group, where new instances go round-robin.
    nodes: BTreeMap<String, Vec<String>>,
}

impl Sim {
    /// `per_group` instances of revision 1 in each group, all Running for
    /// an hour, and revision 2 the target.
    fn new(spec: RolloutSpec, per_group: &[(&str, u32)]) -> Sim {
        let mut sim = Sim {
            spec,
            desired: per_group.iter().map(|(g, n)| (g.to_string(), *n)).collect(),
            instances: Vec::new(),
            status: Some(RolloutStatus { revision: 1, stable_revision: 1, ..Default::default() }),
            target: 2,
            stable: 1,
            now: 1_000_000,
            next: 0,
            crash: false,
            nodes: BTreeMap::new(),
        };
        for (g, n) in per_group {
            let nodes: Vec<String> = (0..*n).map(|k| format!("{}node{k}", if g.is_empty() { "" } else { g })).collect();
            sim.nodes.insert(g.to_string(), nodes.clone());
            for node in nodes {
                sim.add(g, &node, 1, InstancePhase::Running);
            }
        }
        for i in &mut sim.instances {
            i.running_for_secs = Some(3600);
        }
        sim
    }

    fn add(&mut self, group: &str, node: &str, revision: u64, phase: InstancePhase) {
        self.next += 1;
        self.instances.push(InstanceView {
            name: format!("i{:03}", self.next),
            node: node.to_string(),
            group: group.to_string(),
            revision,
            hash: format!("h{revision}"),
            phase,
            running_for_secs: (phase == InstancePhase::Running).then_some(0),
            node_ready: true,
            failed: false,
        });
    }

    fn plan(&self) -> RolloutPlan {
        plan(&RolloutInput {
            spec: &self.spec,
            status: self.status.as_ref(),
            target_revision: self.target,
            stable_revision: self.stable,
            desired: &self.desired,
            instances: &self.instances,
            now: self.now,
        })
    }

    /// Plans and applies the plan: deletes go, creates start (Pending).
    fn pass(&mut self) -> RolloutPlan {
        let p = self.plan();
        self.instances.retain(|i| !p.delete.contains(&i.name));
        for (g, n) in &p.create {
            for _ in 0..*n {
                // Like a spread scheduler: the group's node with the fewest instances.
                let nodes = self.nodes.get(g).cloned().filter(|n| !n.is_empty());
                let nodes = nodes.unwrap_or_else(|| vec![format!("{g}extra")]);
                let load = |n: &String| self.instances.iter().filter(|i| &i.node == n).count();
                let node = nodes.iter().min_by_key(|n| (load(n), n.as_str())).cloned().expect("a node");
                self.add(g, &node, self.target, InstancePhase::Pending);
            }
        }
        if p.status.phase == RolloutPhase::Complete {
            self.stable = p.status.stable_revision.max(self.target);
        }
        self.status = Some(p.status.clone());
        p
    }

    /// Time passes: pending instances run (or fail), running ones age.
    fn tick(&mut self, secs: u64) {
        self.now += secs;
        let crash = self.crash;
        let target = self.target;
        for i in &mut self.instances {
            if !i.node_ready {
                continue;
            }
            match i.phase {
                InstancePhase::Pending if crash && i.revision == target => {
                    i.phase = InstancePhase::Failed;
                    i.failed = true;
                }
                InstancePhase::Pending => {
                    i.phase = InstancePhase::Running;
                    i.running_for_secs = Some(0);
                }
                InstancePhase::Running => i.running_for_secs = Some(i.running_for_secs.unwrap_or(0) + secs),
                _ => {}
            }
        }
    }

    fn available(&self) -> usize {
        let min_ready = u64::from(self.spec.min_ready_seconds);
        self.instances
            .iter()
            .filter(|i| i.node_ready && !i.failed && i.phase == InstancePhase::Running)
            .filter(|i| i.running_for_secs.unwrap_or(0) >= min_ready)
            .count()
    }

    fn updated(&self) -> usize {
        self.instances.iter().filter(|i| i.revision == self.target).count()
    }

    fn updated_in(&self, group: &str) -> usize {
        self.instances.iter().filter(|i| i.revision == self.target && i.group == group).count()
    }

    /// Passes (10 s apart) until the phase is `until`, checking `each`
    /// after every pass; returns the number of passes.
    fn run_until(&mut self, until: RolloutPhase, mut each: impl FnMut(&Sim, &RolloutPlan)) -> usize {
        for n in 1..=200 {
            let p = self.pass();
            each(self, &p);
            if p.status.phase == until {
                return n;
            }
            self.tick(10);
        }
        panic!("no {until:?} after 200 passes: {:?}", self.status);
    }
}

// ---------------------------------------------------------------- steady states

#[test]
fn a_stable_app_does_not_churn() {
    let mut sim = Sim::new(RolloutSpec::default(), &[("", 4)]);
    sim.target = 1;
    sim.status = Some(RolloutStatus {
        phase: RolloutPhase::Complete,
        revision: 1,
        stable_revision: 1,
        message: "revision 1 complete: 4 of 4 updated, 4 available".into(),
        updated_replicas: 4,
        available_replicas: 4,
        step_started: "2026-01-01T00:00:00Z".into(),
        ..Default::default()
    });
    for _ in 0..3 {
        let p = sim.plan();
        assert!(p.is_idle(), "{p:?}");
        assert_eq!(Some(&p.status), sim.status.as_ref(), "the status is written once, then stays");
        sim.tick(3600);
    }
    // An instance of a completed revision restarting is not a rollout failure.
    sim.instances[0].failed = true;
    let p = sim.plan();
    assert!(p.is_idle() && !p.rollback, "{p:?}");
    assert_eq!(p.status.phase, RolloutPhase::Complete);
}

#[test]
fn a_brand_new_app_gets_every_instance_at_once() {
    let spec =
        rollout(json!({"maxSurge": 0, "maxUnavailable": 1, "canary": {"steps": [{"percent": 10}, {"pause": true}]}}));
    let mut sim = Sim::new(spec, &[("a", 0), ("b", 0)]);
    sim.desired = BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 2)]);
    sim.target = 1;
    sim.stable = 0;
    sim.status = None;
    let p = sim.pass();
    assert_eq!(p.create, BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 2)]), "no budget, no canary");
    assert_eq!(p.status.phase, RolloutPhase::Progressing);
    sim.tick(10);
    let p = sim.pass();
    assert_eq!(p.status.phase, RolloutPhase::Complete, "{p:?}");
    assert!(p.is_idle());
}

// ---------------------------------------------------------------- rolling budgets

#[test]
fn rolling_keeps_within_surge_and_unavailable() {
    for (surge, unavailable, n) in
        [(json!(1), json!(0), 4u32), (json!(0), json!(1), 4), (json!(2), json!(1), 7), (json!("25%"), json!("25%"), 8)]
    {
        let spec = rollout(json!({"maxSurge": surge, "maxUnavailable": unavailable}));
        let max_total = n as usize + spec.max_surge.resolve(u64::from(n), true) as usize;
        let min_avail = n as usize - spec.max_unavailable.resolve(u64::from(n), false) as usize;
        let mut sim = Sim::new(spec, &[("", n)]);
        let passes = sim.run_until(RolloutPhase::Complete, |sim, p| {
            assert!(sim.instances.len() <= max_total, "{} instances > {max_total}: {p:?}", sim.instances.len());
            assert!(sim.available() >= min_avail, "{} available < {min_avail}: {p:?}", sim.available());
        });
        assert!(passes > 1, "a rolling update takes several passes");
        assert_eq!(sim.updated(), n as usize);
        assert_eq!(sim.instances.len(), n as usize);
        assert_eq!(sim.status.as_ref().map(|s| s.stable_revision), Some(2));
    }
}

#[test]
fn the_first_pass_uses_exactly_the_budgets() {
    // Surge 1, unavailable 1: one new instance and one old deleted at once.
    let mut sim = Sim::new(RolloutSpec::default(), &[("", 4)]);
    let p = sim.pass();
    assert_eq!(p.create, BTreeMap::from([(String::new(), 1)]));
    assert_eq!(p.delete.len(), 1);
    // Nothing more until the new one is available.
    let p = sim.pass();
    assert!(p.create.values().sum::<u32>() + p.delete.len() as u32 <= 1, "{p:?}");
}

#[test]
fn min_ready_seconds_gates_progress() {
    let mut sim = Sim::new(rollout(json!({"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 30})), &[("", 3)]);
    let p = sim.pass();
    assert_eq!(p.create, BTreeMap::from([(String::new(), 1)]));
    assert!(p.delete.is_empty());
    sim.tick(10); // Running for 0 s
    sim.tick(20); // 20 s < 30 s
    let p = sim.pass();
    assert!(p.is_idle(), "not available before minReadySeconds: {p:?}");
    assert_eq!(p.status.available_replicas, 0);
    assert_eq!(p.status.updated_replicas, 1);
    sim.tick(10); // 30 s
    let p = sim.pass();
    assert_eq!(p.delete.len(), 1, "an old one goes once the new one is available: {p:?}");
}

#[test]
fn by_node_replaces_whole_nodes() {
    let mut sim = Sim::new(rollout(json!({"by": "node", "maxUnavailable": 1})), &[("", 0)]);
    sim.desired = BTreeMap::from([(String::new(), 6)]);
    for node in ["n1", "n2", "n3"] {
        for _ in 0..2 {
            sim.add("", node, 1, InstancePhase::Running);
        }
    }
    for i in &mut sim.instances {
        i.running_for_secs = Some(3600);
    }
    sim.nodes.insert(String::new(), vec!["n1".into(), "n2".into(), "n3".into()]);
    let node_of: BTreeMap<String, String> = sim.instances.iter().map(|i| (i.name.clone(), i.node.clone())).collect();
    let p = sim.pass();
    let nodes: std::collections::BTreeSet<&String> = p.delete.iter().map(|d| &node_of[d]).collect();
    assert_eq!(p.delete.len(), 2, "both instances of one node: {p:?}");
    assert_eq!(nodes.len(), 1, "one node at a time: {p:?}");
    assert_eq!(p.create, BTreeMap::from([(String::new(), 2)]));
    sim.run_until(RolloutPhase::Complete, |sim, _| {
        let disrupted: std::collections::BTreeSet<&str> =
            sim.instances.iter().filter(|i| i.phase != InstancePhase::Running).map(|i| i.node.as_str()).collect();
        assert!(disrupted.len() <= 1, "{disrupted:?}");
    });
    assert_eq!(sim.updated(), 6);
}

#[test]
fn by_group_moves_one_site_at_a_time() {
    let mut sim = Sim::new(rollout(json!({"by": "group", "maxUnavailable": 1})), &[("a", 2), ("b", 2), ("c", 2)]);
    let p = sim.pass();
    assert_eq!(
        p.create,
        BTreeMap::from([("a".to_string(), 2), ("b".into(), 0), ("c".into(), 0)])
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    );
    assert_eq!(p.delete.len(), 2);
    let mut order = Vec::new();
    sim.run_until(RolloutPhase::Complete, |sim, p| {
        let groups: std::collections::BTreeSet<&String> = p.create.keys().collect();
        assert!(groups.len() <= 1, "one group at a time: {p:?}");
        if let Some(g) = groups.into_iter().next() {
            if order.last() != Some(g) {
                order.push(g.clone());
            }
        }
        let _ = sim;
    });
    assert_eq!(order, vec!["b".to_string(), "c".to_string()]);
}

// ---------------------------------------------------------------- canary

#[test]
fn canary_groups_then_pause_then_resume() {
    let spec = rollout(json!({"canary": {"steps": [{"groups": ["a"]}, {"pause": true}]}}));
    let mut sim = Sim::new(spec.clone(), &[("a", 2), ("b", 2), ("c", 2)]);
    sim.run_until(RolloutPhase::Paused, |sim, _| {
        assert_eq!(sim.updated_in("b") + sim.updated_in("c"), 0, "only group a before the pause");
    });
    assert_eq!(sim.updated_in("a"), 2);
    let st = sim.status.clone().expect("status");
    assert_eq!(st.step, 1);
    assert!(st.message.contains("rollout resume"), "{}", st.message);
    // Paused stays paused, however long.
    for _ in 0..3 {
        sim.tick(3600);
        let p = sim.pass();
        assert!(p.is_idle() && p.status.phase == RolloutPhase::Paused, "{p:?}");
    }
    let mut st = sim.status.clone().expect("status");
    assert!(resume_status(&spec, &mut st, "2026-01-01T00:00:00Z"));
    assert_eq!(st.step, 2);
    sim.status = Some(st);
    sim.run_until(RolloutPhase::Complete, |_, _| {});
    assert_eq!(sim.updated(), 6);
}

#[test]
fn canary_percent_updates_a_share() {
    let spec =
        rollout(json!({"maxSurge": 1, "maxUnavailable": 0, "canary": {"steps": [{"percent": 20}, {"pause": true}]}}));
    let mut sim = Sim::new(spec, &[("", 10)]);
    sim.run_until(RolloutPhase::Paused, |sim, _| assert!(sim.updated() <= 2, "at most ceil(20% of 10)"));
    assert_eq!(sim.updated(), 2);
    assert_eq!(sim.instances.len(), 10);
    // 25% of 10 rounds up to 3.
    let spec = rollout(json!({"canary": {"steps": [{"percent": 25}, {"pause": true}]}}));
    let mut sim = Sim::new(spec, &[("", 10)]);
    sim.run_until(RolloutPhase::Paused, |_, _| {});
    assert_eq!(sim.updated(), 3);
}

#[test]
fn canary_pause_seconds_waits_since_the_step_started() {
    let spec = rollout(json!({"canary": {"steps": [{"percent": 50}, {"pauseSeconds": 60}]}}));
    let mut sim = Sim::new(spec, &[("", 4)]);
    // Run until the 50% step is met and the wait has begun.
    let mut waiting_since = None;
    for _ in 0..50 {
        let p = sim.pass();
        if p.status.message.starts_with("waiting 60s") {
            waiting_since = Some((sim.now, p.status.step_started.clone()));
            break;
        }
        sim.tick(10);
    }
    let (since, started) = waiting_since.expect("reaches the pauseSeconds step");
    assert_eq!(sim.updated(), 2);
    assert_eq!(yunbian_api::time::parse_rfc3339(&started), Some(since));
    sim.now = since + 59;
    let p = sim.pass();
    assert!(p.is_idle(), "59 s: still waiting: {p:?}");
    sim.now = since + 60;
    let p = sim.pass();
    assert!(!p.is_idle(), "60 s: goes on: {p:?}");
    assert_eq!(p.status.step, 2);
    sim.run_until(RolloutPhase::Complete, |_, _| {});
}

#[test]
fn spec_paused_stops_everything() {
    let mut sim = Sim::new(rollout(json!({"paused": true})), &[("", 3)]);
    let p = sim.pass();
    assert!(p.is_idle(), "{p:?}");
    assert_eq!(p.status.phase, RolloutPhase::Paused);
    assert!(p.status.message.contains("spec.rollout.paused"), "{}", p.status.message);
    // A missing instance is still replaced while paused.
    sim.instances.pop();
    let p = sim.pass();
    assert_eq!(p.create.values().sum::<u32>(), 1);
    assert!(p.delete.is_empty());
    sim.spec.paused = false;
    sim.run_until(RolloutPhase::Complete, |_, _| {});
}

// ---------------------------------------------------------------- failures

#[test]
fn failures_beyond_max_roll_back() {
    let mut sim = Sim::new(rollout(json!({"maxFailures": 1})), &[("", 4)]);
    sim.crash = true;
    let mut rolled = None;
    for _ in 0..20 {
        let p = sim.pass();
        if p.rollback {
            rolled = Some(p);
            break;
        }
        sim.tick(10);
    }
    let p = rolled.expect("rolls back");
    assert!(p.is_idle(), "the controller plans the way back: {p:?}");
    assert_eq!(p.status.phase, RolloutPhase::RolledBack);
    assert_eq!(p.status.failures, 2);
    let failed: Vec<String> = sim.instances.iter().filter(|i| i.failed).map(|i| i.name.clone()).collect();
    for f in &failed {
        assert!(p.status.message.contains(f), "{} names {f}", p.status.message);
    }
    assert!(p.status.message.contains("rolled back to revision 1"), "{}", p.status.message);

    // The controller plans towards the stable revision, without a status.
    let mut back = Sim { target: 1, status: None, crash: false, ..sim };
    let p = back.pass();
    assert!(!p.rollback);
    for f in &failed {
        assert!(p.delete.contains(f), "failed instances go first, at no cost: {p:?}");
    }
    back.run_until(RolloutPhase::Complete, |_, _| {});
    assert_eq!(back.updated(), 4, "every instance on revision 1 again");
}

#[test]
fn failures_within_max_do_not_act() {
    let mut sim = Sim::new(rollout(json!({"maxFailures": 1, "maxSurge": 1, "maxUnavailable": 0})), &[("", 3)]);
    sim.crash = true;
    sim.pass();
    sim.tick(10);
    let p = sim.pass();
    assert_eq!(p.status.failures, 1);
    assert!(!p.rollback);
    assert_eq!(p.status.phase, RolloutPhase::Progressing);
}

#[test]
fn failure_policy_pause_freezes_the_rollout() {
    let mut sim = Sim::new(rollout(json!({"failurePolicy": "pause", "maxSurge": 1, "maxUnavailable": 0})), &[("", 3)]);
    sim.crash = true;
    sim.pass();
    sim.tick(10);
    let p = sim.pass();
    assert!(!p.rollback);
    assert_eq!(p.status.phase, RolloutPhase::Failed, "{p:?}");
    assert!(p.status.message.contains("rollout undo"), "{}", p.status.message);
    assert!(p.is_idle());
    // Even if the instance recovers, the rollout stays stopped.
    for i in sim.instances.iter_mut().filter(|i| i.revision == 2) {
        i.failed = false;
        i.phase = InstancePhase::Running;
        i.running_for_secs = Some(1000);
    }
    sim.tick(3600);
    let p = sim.pass();
    assert_eq!(p.status.phase, RolloutPhase::Failed);
    assert!(p.is_idle(), "{p:?}");
    // A new revision starts a new rollout.
    sim.target = 3;
    sim.crash = false;
    let p = sim.pass();
    assert_eq!(p.status.phase, RolloutPhase::Progressing);
    assert_eq!(p.status.failures, 0);
}

// ---------------------------------------------------------------- offline nodes, scaling

#[test]
fn offline_nodes_get_the_target_directly_and_do_not_block() {
    let mut sim = Sim::new(rollout(json!({"maxSurge": 0, "maxUnavailable": 1, "minReadySeconds": 3600})), &[("", 4)]);
    let offline = sim.instances[3].name.clone();
    sim.instances[3].node_ready = false;
    sim.instances[3].phase = InstancePhase::Running;
    let p = sim.pass();
    assert!(p.delete.contains(&offline), "the offline node's old instance goes at once: {p:?}");
    // Its replacement plus nothing beyond the budget of 1 online.
    let online_deleted = p.delete.iter().filter(|d| **d != offline).count();
    assert!(online_deleted <= 1, "{p:?}");
    // An offline node that already has the target is left alone, and the
    // rollout completes without it coming back.
    let mut sim = Sim::new(RolloutSpec::default(), &[("", 3)]);
    sim.instances[2].revision = 2;
    sim.instances[2].node_ready = false;
    sim.instances[2].phase = InstancePhase::Pending;
    sim.run_until(RolloutPhase::Complete, |sim, p| {
        assert!(sim.instances.iter().any(|i| !i.node_ready), "the offline instance stays: {p:?}");
    });
    assert_eq!(sim.instances.len(), 3);
}

#[test]
fn offline_nodes_wait_for_a_canary_to_reach_their_group() {
    let spec = rollout(json!({"canary": {"steps": [{"groups": ["a"]}, {"pause": true}]}}));
    let mut sim = Sim::new(spec, &[("a", 2), ("b", 2)]);
    let b_offline = sim.instances.iter().position(|i| i.group == "b").expect("b");
    sim.instances[b_offline].node_ready = false;
    let name = sim.instances[b_offline].name.clone();
    sim.run_until(RolloutPhase::Paused, |_, p| assert!(!p.delete.contains(&name), "{p:?}"));
}

#[test]
fn scaling_during_a_rollout() {
    let mut sim = Sim::new(RolloutSpec::default(), &[("", 4)]);
    sim.pass();
    sim.tick(10);
    sim.desired.insert(String::new(), 7);
    let p = sim.pass();
    assert!(p.create.values().sum::<u32>() >= 3, "a scale-up fills the new places at once: {p:?}");
    sim.tick(10);
    sim.desired.insert(String::new(), 2);
    sim.run_until(RolloutPhase::Complete, |_, _| {});
    assert_eq!(sim.instances.len(), 2);
    assert_eq!(sim.updated(), 2);
}

// ---------------------------------------------------------------- revisions

fn app(version: &str) -> AppSpec {
    serde_json::from_value(json!({
        "replicas": 3,
        "artifact": {"name": "site-app", "version": version},
        "placement": {"groups": ["a", "b"], "perGroup": {"replicas": 1}}
    }))
    .expect("app decodes")
}

#[test]
fn revision_hash_covers_template_and_overrides_not_replicas() {
    let plain = app("1.0");
    assert_eq!(revision_hash(&plain), plain.template().hash(), "no override: the template's own hash");
    let mut scaled = plain.clone();
    scaled.replicas = 9;
    scaled.placement.per_group = Some(yunbian_api::PerGroup { replicas: 4 });
    scaled.placement.overrides.push(GroupOverride { group: "a".into(), replicas: Some(2), ..Default::default() });
    assert_eq!(revision_hash(&scaled), revision_hash(&plain), "scaling is not a revision");
    let mut env = plain.clone();
    env.placement.overrides.push(GroupOverride {
        group: "a".into(),
        env: BTreeMap::from([("LEVEL".into(), "debug".into())]),
        ..Default::default()
    });
    assert_ne!(revision_hash(&env), revision_hash(&plain));
    assert_ne!(revision_hash(&app("2.0")), revision_hash(&plain));
}

fn record(history: &[AppRevision], spec: &AppSpec, generation: u64) -> (Vec<AppRevision>, u64) {
    record_revision(
        history,
        &revision_hash(spec),
        &spec.template(),
        &spec.placement.overrides,
        generation,
        "2026-01-01T00:00:00Z",
    )
}

#[test]
fn history_records_changes_and_renumbers_a_return() {
    let (h, r) = record(&[], &app("1.0"), 1);
    assert_eq!((h.len(), r), (1, 1));
    assert_eq!(h[0].change, "created");
    let (same, r) = record(&h, &app("1.0"), 2);
    assert_eq!((same.clone(), r), (h.clone(), 1), "same template: nothing new");
    let (h, r) = record(&h, &app("2.0"), 3);
    assert_eq!(r, 2);
    assert_eq!(h[1].change, "artifact site-app 1.0 → 2.0");
    let (h, r) = record(&h, &app("1.0"), 4);
    assert_eq!(r, 3, "an old template comes back with a new number");
    assert_eq!(h.iter().map(|x| x.revision).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(h[1].change, "back to revision 1");
    let mut h = h;
    for v in 0..20 {
        h = record(&h, &app(&format!("3.{v}")), 10 + v).0;
    }
    assert_eq!(h.len(), HISTORY_LIMIT);
    assert_eq!(h.last().map(|x| x.revision), Some(23));
    assert!(h.windows(2).all(|w| w[0].revision < w[1].revision), "oldest first");
}

#[test]
fn undo_goes_back_and_says_why_it_cannot() {
    let (h, _) = record(&[], &app("1.0"), 1);
    assert_eq!(undo("web", &app("1.0"), &h, None), Err(UndoError::NothingToUndo { app: "web".into() }));
    let (h, _) = record(&h, &app("2.0"), 2);
    let mut current = app("2.0");
    current.replicas = 5;
    let back = undo("web", &current, &h, None).expect("undo to 1");
    assert_eq!(back.artifact.as_ref().map(|a| a.version.as_str()), Some("1.0"));
    assert_eq!(back.replicas, 5, "the count is not part of a revision");
    assert_eq!(revision_hash(&back), h[0].hash);
    assert_eq!(undo("web", &current, &h, Some(1)).expect("to 1"), back);
    assert_eq!(undo("web", &current, &h, Some(2)), Err(UndoError::AlreadyCurrent { app: "web".into(), revision: 2 }));
    let e = undo("web", &current, &h, Some(7)).expect_err("unknown");
    assert_eq!(e.to_string(), "app web has no revision 7 (known: 1, 2)");
}

#[test]
fn spec_at_restores_group_overrides_and_keeps_counts() {
    let mut then = app("1.0");
    then.placement.overrides.push(GroupOverride {
        group: "a".into(),
        args: Some(vec!["--old".into()]),
        ..Default::default()
    });
    let (h, _) = record(&[], &then, 1);
    let mut now = app("2.0");
    now.placement.overrides.push(GroupOverride { group: "b".into(), replicas: Some(3), ..Default::default() });
    let s = spec_at(&h[0], &now);
    assert_eq!(s.placement.override_for("a").and_then(|o| o.args.clone()), Some(vec!["--old".to_string()]));
    assert_eq!(s.placement.override_for("b").and_then(|o| o.replicas), Some(3));
    assert_eq!(revision_hash(&s), h[0].hash);
    let _ = WorkloadTemplate::default();
}

#[test]
fn resume_moves_past_a_pause_step_only() {
    let spec = rollout(json!({"canary": {"steps": [{"percent": 10}, {"pause": true}, {"pauseSeconds": 5}]}}));
    let mut st = RolloutStatus { phase: RolloutPhase::Paused, step: 1, ..Default::default() };
    assert!(resume_status(&spec, &mut st, "2026-01-01T00:00:00Z"));
    assert_eq!((st.step, st.phase), (2, RolloutPhase::Progressing));
    assert!(!resume_status(&spec, &mut st, "2026-01-01T00:00:00Z"), "not at a pause step");
    let mut at_percent = RolloutStatus { phase: RolloutPhase::Progressing, step: 0, ..Default::default() };
    assert!(!resume_status(&spec, &mut at_percent, "x"));
}

#[test]
fn a_canary_has_nothing_to_do_when_no_old_instance_is_left() {
    // `rollout undo` to the template the instances already run (after a
    // rollback): a new revision number, the same instances, no pause.
    let spec = rollout(json!({"canary": {"steps": [{"groups": ["a"]}, {"pause": true}]}}));
    let mut sim = Sim::new(spec, &[("a", 1), ("b", 1)]);
    for i in &mut sim.instances {
        i.revision = 2;
    }
    let p = sim.pass();
    assert!(p.is_idle(), "{p:?}");
    assert_eq!(p.status.phase, RolloutPhase::Complete, "{p:?}");
    assert_eq!(p.status.stable_revision, 2);
}

#[test]
fn a_pause_in_the_middle_of_a_rollout_holds_the_split() {
    let mut sim = Sim::new(rollout(json!({"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 5})), &[("", 2)]);
    let p = sim.pass();
    assert_eq!(p.create.values().sum::<u32>(), 1);
    sim.spec.paused = true;
    for _ in 0..10 {
        sim.tick(10);
        let p = sim.pass();
        assert!(p.is_idle(), "{p:?}");
        assert_eq!(p.status.phase, RolloutPhase::Paused);
    }
    assert_eq!((sim.updated(), sim.instances.len()), (1, 3), "the surge instance stays, the old ones too");
}

#[test]
fn old_instances_still_warming_up_are_not_killed() {
    // The previous rollout just finished: the old instances run for 1 s of
    // the 5 minReadySeconds. Unavailable, but not to be swept away.
    let mut sim = Sim::new(rollout(json!({"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 5})), &[("", 2)]);
    for i in &mut sim.instances {
        i.running_for_secs = Some(1);
    }
    let p = sim.pass();
    assert_eq!(p.create.values().sum::<u32>(), 1, "{p:?}");
    assert!(p.delete.is_empty(), "{p:?}");
    sim.run_until(RolloutPhase::Complete, |sim, p| {
        assert!(sim.instances.len() <= 3, "{p:?}");
    });
}

/// xorshift64*: a small seeded generator, so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

#[test]
fn random_rollouts_keep_their_budgets_finish_and_then_stay_still() {
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let groups: Vec<String> = (0..1 + rng.below(3)).map(|g| format!("g{g}")).collect();
        let per_group: Vec<(&str, u32)> = groups.iter().map(|g| (g.as_str(), 1 + rng.below(4) as u32)).collect();
        let by = ["instance", "node", "group"][rng.below(3) as usize];
        let (surge, unavailable) = match rng.below(3) {
            0 => (json!(rng.below(3)), json!(1 + rng.below(2))),
            1 => (json!(1 + rng.below(2)), json!(rng.below(2))),
            _ => (json!("25%"), json!("50%")),
        };
        let mut steps = Vec::new();
        for _ in 0..rng.below(3) {
            steps.push(match rng.below(3) {
                0 => json!({"groups": [groups[rng.below(groups.len() as u64) as usize]]}),
                1 => json!({"percent": 1 + rng.below(60)}),
                _ => json!({"pauseSeconds": rng.below(30)}),
            });
        }
        let spec = rollout(json!({
            "by": by, "maxSurge": surge, "maxUnavailable": unavailable,
            "minReadySeconds": rng.below(15), "canary": {"steps": steps},
        }));
        let context = format!("seed {seed}: {spec:?} {per_group:?}");
        let desired: u32 = per_group.iter().map(|(_, n)| n).sum();
        let max_total = desired as usize + spec.max_surge.resolve(u64::from(desired), true) as usize;
        let min_avail =
            (desired as usize).saturating_sub(spec.max_unavailable.resolve(u64::from(desired), false) as usize);
        let by_instance = spec.by == yunbian_api::RolloutUnit::Instance;
        let mut sim = Sim::new(spec, &per_group);
        let mut desired = desired;
        if seed % 2 == 0 {
            sim.run_until(RolloutPhase::Complete, |sim, p| {
                assert!(sim.instances.len() <= max_total.max(desired as usize), "{context}: too many: {p:?}");
                if by_instance {
                    assert!(sim.available() >= min_avail, "{context}: too few available: {p:?}");
                }
            });
        } else {
            // Events on the way: a node goes offline, a group is rescaled.
            let offline = rng.below(sim.instances.len() as u64) as usize;
            let rescaled = groups[rng.below(groups.len() as u64) as usize].clone();
            let count = rng.below(5) as u32;
            let mut done = false;
            for n in 0..300 {
                if n == 2 {
                    let k = offline.min(sim.instances.len() - 1);
                    sim.instances[k].node_ready = false;
                }
                if n == 4 {
                    desired = desired - sim.desired[&rescaled] + count;
                    sim.desired.insert(rescaled.clone(), count);
                }
                if sim.pass().status.phase == RolloutPhase::Complete && n > 4 {
                    done = true;
                    break;
                }
                sim.tick(10);
            }
            assert!(done, "{context}: no Complete with an offline node and a rescale: {:?}", sim.status);
        }
        assert_eq!(sim.updated(), desired as usize, "{context}");
        assert_eq!(sim.instances.len(), desired as usize, "{context}");
        for _ in 0..3 {
            sim.tick(60);
            let p = sim.pass();
            assert!(p.is_idle() && p.status.phase == RolloutPhase::Complete, "{context}: churn after Complete: {p:?}");
        }
    }
}
