//! Deterministic simulation of the sync protocol.
//!
//! One cloud and one edge exchange messages over a virtual network that
//! loses, duplicates, delays and reorders them; connections drop, the edge
//! and the cloud restart (keeping only what they persisted), the cloud's
//! delta log is compacted. Meanwhile the cloud changes the node's desired
//! view and the edge produces status reports. After the faults stop, the
//! test checks that:
//! - the edge's persisted desired view equals the cloud's view,
//! - every report was acknowledged, none was applied twice, and the cloud
//!   holds, for each instance, the last status the edge reported.
//!
//! Each seed is printed on failure; replay one with
//! `YUNBIAN_SIM_SEED=<seed> cargo test -p yunbian-sync --test sync_simulation`.
//! `YUNBIAN_SIM_SEEDS=<n>` changes how many seeds run (default 400).

use std::collections::{BTreeMap, BTreeSet};

use yunbian_api::{AppInstanceStatus, Kind};
use yunbian_sync::{
    Change, CloudAction, CloudSession, DesiredObject, Down, EdgeAction, EdgeSession, NodeView, Report, SessionConfig,
    Up,
};

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Fault rates of one seed, in per mille.
struct Faults {
    loss: u64,
    dup: u64,
    disconnect: u64,
    edge_crash: u64,
    cloud_crash: u64,
    compact: u64,
    max_delay: u64,
}

struct Net<T> {
    queue: Vec<(u64, u64, T)>, // (deliver_at, tiebreak, msg)
    counter: u64,
}

impl<T: Clone> Net<T> {
    fn new() -> Self {
        Net { queue: Vec::new(), counter: 0 }
    }
    fn send(&mut self, rng: &mut Rng, f: Option<&Faults>, now: u64, msg: T) {
        let copies = match f {
            Some(f) if rng.chance(f.loss) => 0,
            Some(f) if rng.chance(f.dup) => 2,
            _ => 1,
        };
        for _ in 0..copies {
            let delay = 1 + f.map_or(0, |f| rng.below(f.max_delay));
            self.counter += 1;
            self.queue.push((now + delay, self.counter, msg.clone()));
        }
    }
    fn due(&mut self, now: u64) -> Vec<T> {
        let mut due: Vec<(u64, u64, T)> = Vec::new();
        let mut keep = Vec::new();
        for e in self.queue.drain(..) {
            if e.0 <= now {
                due.push(e);
            } else {
                keep.push(e);
            }
        }
        self.queue = keep;
        due.sort_by_key(|e| (e.0, e.1));
        due.into_iter().map(|e| e.2).collect()
    }
    fn clear(&mut self) {
        self.queue.clear();
    }
}

/// What the edge keeps on disk.
#[derive(Default, Clone)]
struct EdgeDisk {
    applied: u64,
    desired: BTreeMap<String, serde_json::Value>,
    outbox: BTreeMap<u64, Report>,
    next_seq: u64,
}

/// What the cloud keeps in its store.
#[derive(Default)]
struct CloudDisk {
    revision: u64,
    objects: BTreeMap<String, serde_json::Value>,
    statuses: BTreeMap<String, (u64, AppInstanceStatus)>,
    applied_seqs: Vec<u64>,
}

struct World {
    rng: Rng,
    now: u64,
    cfg: SessionConfig,
    cloud: CloudDisk,
    view: NodeView,
    cloud_session: Option<CloudSession>,
    edge_disk: EdgeDisk,
    edge: EdgeSession,
    connected: bool,
    reconnect_at: u64,
    down: Net<Down>,
    up: Net<Up>,
    /// Last status the edge reported, per instance.
    last_reported: BTreeMap<String, AppInstanceStatus>,
    counter: u64,
}

fn rebuild_view(cloud: &CloudDisk) -> NodeView {
    let mut v = NodeView::new(cloud.revision, 64);
    for (name, value) in &cloud.objects {
        v.seed(obj(name, value.clone(), cloud.revision));
    }
    v
}

fn obj(name: &str, value: serde_json::Value, revision: u64) -> DesiredObject {
    DesiredObject { kind: Kind::AppInstance, name: name.to_string(), revision, value }
}

impl World {
    fn new(seed: u64) -> Self {
        let cfg = SessionConfig { retransmit_ms: 200, max_batch: 8, max_outbox: 10_000 };
        let cloud = CloudDisk::default();
        let view = rebuild_view(&cloud);
        World {
            rng: Rng(seed),
            now: 0,
            cfg,
            cloud,
            view,
            cloud_session: None,
            edge_disk: EdgeDisk { next_seq: 1, ..Default::default() },
            edge: EdgeSession::new(cfg, 0, Vec::new(), 1),
            connected: false,
            reconnect_at: 0,
            down: Net::new(),
            up: Net::new(),
            last_reported: BTreeMap::new(),
            counter: 0,
        }
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.cloud_session = None;
        self.edge.on_disconnected();
        self.down.clear();
        self.up.clear();
        self.reconnect_at = self.now + 1 + self.rng.below(300);
    }

    fn run_edge(&mut self, actions: Vec<EdgeAction>, f: Option<&Faults>) {
        for a in actions {
            match a {
                EdgeAction::Send(m) => {
                    if self.connected {
                        self.up.send(&mut self.rng, f, self.now, m);
                    }
                }
                EdgeAction::ApplySnapshot { revision, objects } => {
                    self.edge_disk.desired = objects.into_iter().map(|o| (o.name, o.value)).collect();
                    self.edge_disk.applied = revision;
                }
                EdgeAction::ApplyDelta { revision, changes } => {
                    for c in changes {
                        match c {
                            Change::Upsert { object } => {
                                self.edge_disk.desired.insert(object.name, object.value);
                            }
                            Change::Remove { name, .. } => {
                                self.edge_disk.desired.remove(&name);
                            }
                        }
                    }
                    self.edge_disk.applied = revision;
                }
                EdgeAction::PersistReport { seq, report } => {
                    self.edge_disk.outbox.insert(seq, report);
                    self.edge_disk.next_seq = seq + 1;
                }
                EdgeAction::TrimOutbox { upto } => {
                    self.edge_disk.outbox = self.edge_disk.outbox.split_off(&(upto + 1));
                }
            }
        }
    }

    fn run_cloud(&mut self, actions: Vec<CloudAction>, f: Option<&Faults>) {
        for a in actions {
            match a {
                CloudAction::Send(m) => {
                    if self.connected {
                        self.down.send(&mut self.rng, f, self.now, m);
                    }
                }
                CloudAction::PersistReports(items) => {
                    for (seq, report) in items {
                        let Report::InstanceStatus { instance, status } = report else {
                            panic!("the simulation reports only instance statuses")
                        };
                        let entry = self.cloud.statuses.get(&instance);
                        if entry.is_none_or(|(s, _)| *s < seq) {
                            self.cloud.statuses.insert(instance, (seq, status));
                            self.cloud.applied_seqs.push(seq);
                        }
                    }
                }
                CloudAction::Synced(_) => {}
                CloudAction::Close(reason) => panic!("cloud closed the session: {reason}"),
            }
        }
    }

    fn cloud_change(&mut self, f: Option<&Faults>) {
        // Revisions are global: other nodes' writes make gaps.
        self.cloud.revision += 1 + self.rng.below(3);
        let rev = self.cloud.revision;
        let name = format!("inst-{}", self.rng.below(8));
        self.counter += 1;
        let change = if self.rng.chance(300) {
            self.cloud.objects.remove(&name);
            Change::Remove { kind: Kind::AppInstance, name }
        } else {
            let value = serde_json::json!({ "v": self.counter });
            self.cloud.objects.insert(name.clone(), value.clone());
            Change::Upsert { object: obj(&name, value, rev) }
        };
        if self.view.apply(rev, vec![change]).is_some() {
            if let Some(s) = self.cloud_session.as_mut() {
                let acts = s.on_view_changed(&self.view, self.now);
                self.run_cloud(acts, f);
            }
        }
    }

    fn edge_report(&mut self, f: Option<&Faults>) {
        self.counter += 1;
        let instance = format!("inst-{}", self.rng.below(8));
        let status = AppInstanceStatus { restart_count: self.counter as u32, ..Default::default() };
        self.last_reported.insert(instance.clone(), status.clone());
        let acts = self.edge.report(Report::InstanceStatus { instance, status }, self.now);
        self.run_edge(acts, f);
    }

    fn step(&mut self, f: Option<&Faults>) {
        self.now += 5;
        if let Some(f) = f {
            if self.connected && self.rng.chance(f.disconnect) {
                self.disconnect();
            }
            if self.rng.chance(f.edge_crash) {
                // Everything not on disk is gone.
                self.disconnect();
                let d = &self.edge_disk;
                self.edge = EdgeSession::new(
                    self.cfg,
                    d.applied,
                    d.outbox.iter().map(|(s, r)| (*s, r.clone())).collect(),
                    d.next_seq,
                );
            }
            if self.rng.chance(f.cloud_crash) {
                self.disconnect();
                self.view = rebuild_view(&self.cloud);
            }
            if self.rng.chance(f.compact) {
                self.view.compact();
            }
            if self.rng.chance(60) {
                self.cloud_change(Some(f));
            }
            if self.rng.chance(60) {
                self.edge_report(Some(f));
            }
        }
        if !self.connected && self.now >= self.reconnect_at {
            self.connected = true;
            self.cloud_session = Some(CloudSession::new(self.cfg));
            let acts = self.edge.on_connected(self.now);
            self.run_edge(acts, f);
        }
        for m in self.down.due(self.now) {
            let acts = self.edge.on_down(m, self.now);
            self.run_edge(acts, f);
        }
        for m in self.up.due(self.now) {
            if let Some(s) = self.cloud_session.as_mut() {
                let acts = s.on_up(m, &self.view, self.now);
                self.run_cloud(acts, f);
            }
        }
        let acts = self.edge.on_tick(self.now);
        self.run_edge(acts, f);
        if let Some(s) = self.cloud_session.as_mut() {
            let acts = s.on_tick(&self.view, self.now);
            self.run_cloud(acts, f);
        }
    }

    fn converged(&self) -> bool {
        self.edge_disk.applied == self.view.revision()
            && self.edge_disk.desired == self.cloud.objects
            && self.edge_disk.outbox.is_empty()
    }
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut w = World::new(seed);
    let mut frng = Rng(seed ^ 0xDEAD_BEEF);
    let faults = Faults {
        loss: frng.below(300),
        dup: frng.below(200),
        disconnect: frng.below(8),
        edge_crash: frng.below(4),
        cloud_crash: frng.below(3),
        compact: frng.below(10),
        max_delay: 1 + frng.below(120),
    };
    for _ in 0..3_000 {
        w.step(Some(&faults));
    }
    // Heal: no more faults or changes; the protocol must converge.
    for _ in 0..4_000 {
        w.step(None);
        if w.converged() {
            break;
        }
    }
    if !w.converged() {
        return Err(format!(
            "did not converge: edge applied {} (cloud view {}), edge objects {:?} vs cloud {:?}, outbox {}",
            w.edge_disk.applied,
            w.view.revision(),
            w.edge_disk.desired.keys().collect::<Vec<_>>(),
            w.cloud.objects.keys().collect::<Vec<_>>(),
            w.edge_disk.outbox.len()
        ));
    }
    let unique: BTreeSet<u64> = w.cloud.applied_seqs.iter().copied().collect();
    if unique.len() != w.cloud.applied_seqs.len() {
        return Err("a report was applied twice".into());
    }
    for (inst, status) in &w.last_reported {
        match w.cloud.statuses.get(inst) {
            Some((_, s)) if s == status => {}
            other => {
                return Err(format!("instance {inst}: cloud has {other:?}, edge last reported {status:?}"));
            }
        }
    }
    Ok(())
}

#[test]
fn sync_converges_under_faults() {
    if let Ok(seed) = std::env::var("YUNBIAN_SIM_SEED") {
        let seed: u64 = seed.parse().expect("YUNBIAN_SIM_SEED must be a number");
        if let Err(e) = run_seed(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let n: u64 = std::env::var("YUNBIAN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let mut failures = Vec::new();
    for seed in 0..n {
        if let Err(e) = run_seed(seed) {
            failures.push(format!("seed {seed}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed (replay with YUNBIAN_SIM_SEED=<seed>):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn resume_sends_only_the_delta() {
    let cfg = SessionConfig::default();
    let mut view = NodeView::new(0, 100);
    for i in 1..=10u64 {
        view.apply(i, vec![Change::Upsert { object: obj(&format!("o{i}"), serde_json::json!(i), i) }]);
    }
    let mut s = CloudSession::new(cfg);
    let acts = s.on_up(Up::Hello { version: 1, applied: 7, outbox_first: 1 }, &view, 0);
    let deltas: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            CloudAction::Send(Down::Delta { base, revision, .. }) => Some((*base, *revision)),
            CloudAction::Send(Down::Snapshot { .. }) => panic!("snapshot where a delta suffices"),
            _ => None,
        })
        .collect();
    // The three logged deltas go as one (the last change of each object).
    assert_eq!(deltas, vec![(7, 10)]);

    // After compaction the same resume needs a snapshot.
    view.compact();
    let mut s = CloudSession::new(cfg);
    let acts = s.on_up(Up::Hello { version: 1, applied: 7, outbox_first: 1 }, &view, 0);
    assert!(acts.iter().any(|a| matches!(a, CloudAction::Send(Down::Snapshot { revision: 10, .. }))));
}

#[test]
fn wrong_protocol_version_is_refused() {
    let view = NodeView::new(0, 10);
    let mut s = CloudSession::new(SessionConfig::default());
    let acts = s.on_up(Up::Hello { version: 99, applied: 0, outbox_first: 1 }, &view, 0);
    assert!(matches!(acts.last(), Some(CloudAction::Close(_))));
}

#[test]
fn edge_ahead_of_cloud_gets_a_reset_snapshot() {
    let mut view = NodeView::new(0, 10);
    view.apply(3, vec![Change::Upsert { object: obj("a", serde_json::json!(1), 3) }]);
    let mut cloud = CloudSession::new(SessionConfig::default());
    let acts = cloud.on_up(Up::Hello { version: 1, applied: 50, outbox_first: 1 }, &view, 0);
    let snap = acts
        .into_iter()
        .find_map(|a| match a {
            CloudAction::Send(d @ Down::Snapshot { .. }) => Some(d),
            _ => None,
        })
        .expect("a snapshot");
    assert!(matches!(snap, Down::Snapshot { revision: 3, reset: true, .. }));
    let mut edge = EdgeSession::new(SessionConfig::default(), 50, Vec::new(), 1);
    let acts = edge.on_down(snap, 0);
    assert!(acts.iter().any(|a| matches!(a, EdgeAction::ApplySnapshot { revision: 3, .. })));
    assert_eq!(edge.applied(), 3);
}

#[test]
fn hostile_sequence_numbers_do_not_overflow() {
    let view = NodeView::new(0, 10);
    let mut s = CloudSession::new(SessionConfig::default());
    let _ = s.on_up(Up::Hello { version: 1, applied: 0, outbox_first: u64::MAX }, &view, 0);
    let report = Report::InstanceStatus { instance: "x".into(), status: AppInstanceStatus::default() };
    let items = vec![(u64::MAX - 1, report.clone()), (u64::MAX, report)];
    let acts = s.on_up(Up::Reports { items }, &view, 0);
    assert!(acts.iter().all(|a| !matches!(a, CloudAction::Close(_))));
}
