//! Soak: random faults across five real edge agents and three cloud
//! replicas on a real etcd, from one command.
//!
//! ```sh
//! cargo test -p yunbian --features etcd --test soak -- --nocapture                                  # ~90 s (CI)
//! YUNBIAN_SOAK_SECS=1800 cargo test -p yunbian --features etcd --release --test soak -- --nocapture  # 30 min
//! YUNBIAN_SOAK_SEED=1234 cargo test -p yunbian --features etcd --test soak -- --nocapture           # replay a schedule
//! YUNBIAN_SOAK_FAULTS=LongOutage,KillLeader cargo test -p yunbian --features etcd --test soak -- --nocapture  # only these
//! ```
//!
//! Topology: each edge reaches each replica through a link proxy of its own
//! (`edge-k/rN`), and its URL list holds only its three proxies, so a link
//! fault is exactly that edge's link (to one replica, or to all of them).
//! Three apps run `sleep` workloads spread over the edges.
//!
//! Every round draws one fault from a seeded generator (the seed is
//! printed; `YUNBIAN_SOAK_SEED` replays it), holds it for a few seconds,
//! sometimes changes an app meanwhile, heals, and then checks:
//!
//! - **Converged** within [`CONVERGE`]: every node Ready, one live session
//!   per agent across the replicas with nothing left to sync, every app exactly
//!   `replicas` instances with distinct names, all Running with a live pid
//!   whose environment carries the instance name and the app's current
//!   `VERSION`; on the hosts, exactly one workload process per instance and
//!   none for instances that no longer exist.
//! - **No duplicate** at any time: while a fault is held, no instance name
//!   has two live processes.
//! - **No restart without a cause**: an instance that lives on keeps its
//!   node, pid and restart count, unless its node was rebooted in the round.
//!   An instance may vanish only when its app was scaled down (at most by
//!   the decrease) or updated (new template, new instances), or when the
//!   leader logged its eviction, and an eviction is legitimate only for a
//!   node whose links were cut for longer than `--evict-after`.
//!
//! Every fault, heal and check is printed with a timestamp; a violation
//! fails the test with the recent log.

#![cfg(feature = "etcd")]

mod ha;
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use ha::{stamp, Ha, HaOptions, Rng};
use harness::{pid_alive, proc_env, s, u};
use yunbian_faults::LinkConditions;

const EDGES: usize = 5;
const REPLICAS: usize = 3;
/// `--evict-after` of the replicas.
const EVICT_AFTER: Duration = Duration::from_secs(20);
/// Longest wait for the cluster to converge after a fault is healed.
const CONVERGE: Duration = Duration::from_secs(180);
const WORKLOAD: [&str; 2] = ["sleep", "1000000"];

/// What may explain a change seen at the end of a round.
#[derive(Debug, Default)]
struct Causes {
    /// Nodes whose host was rebooted (workloads killed and restarted).
    rebooted: BTreeSet<String>,
    /// Nodes whose links were all cut for longer than `--evict-after`.
    long_outage: BTreeSet<String>,
    /// Apps whose template changed.
    updated: BTreeSet<String>,
    /// Apps scaled down, with the largest decrease in the round.
    scaled_down: BTreeMap<String, usize>,
}

/// One instance as the API reports it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    app: String,
    node: String,
    pid: u32,
    restarts: u64,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    CutEdge,
    PartitionEdgeFromReplica,
    DegradeEdge,
    ResetEdge,
    KillAgent,
    RebootHost,
    KillReplica,
    KillLeader,
    RestartEtcd,
    Scale,
    UpdateEnv,
    LongOutage,
}

const FAULTS: [(Fault, u32); 12] = [
    (Fault::CutEdge, 10),
    (Fault::PartitionEdgeFromReplica, 8),
    (Fault::DegradeEdge, 8),
    (Fault::ResetEdge, 6),
    (Fault::KillAgent, 10),
    (Fault::RebootHost, 8),
    (Fault::KillReplica, 8),
    (Fault::KillLeader, 6),
    (Fault::RestartEtcd, 3),
    (Fault::Scale, 10),
    (Fault::UpdateEnv, 8),
    (Fault::LongOutage, 2),
];

struct App {
    replicas: usize,
    version: u32,
}

struct Soak {
    ha: Ha,
    rng: Rng,
    seed: u64,
    t0: Instant,
    edges: Vec<String>,
    apps: BTreeMap<String, App>,
    /// The instances at the end of the last check.
    seen: BTreeMap<String, Seen>,
    /// Instances the replicas logged as evicted, so far.
    evicted: BTreeSet<String>,
    log: Vec<String>,
    counts: BTreeMap<String, u32>,
    checks: u32,
}

fn link_name(edge: &str, replica: usize) -> String {
    format!("{edge}/r{}", replica + 1)
}

impl Soak {
    fn note(&mut self, what: &str, msg: impl AsRef<str>) {
        let line = format!("[{} +{:7.1}s] {what:<6} {}", stamp(), self.t0.elapsed().as_secs_f64(), msg.as_ref());
        println!("{line}");
        self.log.push(line);
    }

    #[track_caller]
    fn violation(&mut self, msg: impl AsRef<str>) -> ! {
        self.note("FAIL", msg.as_ref());
        let recent = self.log[self.log.len().saturating_sub(60)..].join("\n");
        panic!(
            "soak violation (seed {seed}; replay with YUNBIAN_SOAK_SEED={seed}): {}\n--- soak log (recent)\n{recent}",
            msg.as_ref(),
            seed = self.seed
        );
    }

    fn manifest(&self, name: &str) -> String {
        let a = &self.apps[name];
        harness::App::new(name)
            .replicas(a.replicas as i64)
            .command(&WORKLOAD)
            .env("VERSION", &a.version.to_string())
            .yaml()
    }

    fn setup(&mut self) {
        let token = self.ha.token();
        for k in 0..EDGES {
            let edge = format!("edge-{}", k + 1);
            // Edges start on different replicas: the list is rotated.
            let mut urls = Vec::new();
            for j in 0..REPLICAS {
                let replica = (k + j) % REPLICAS;
                urls.push(self.ha.add_link(&link_name(&edge, replica), replica));
            }
            let labels = format!("site={}", if k < 2 { "a" } else { "b" });
            self.ha.spawn_join(&edge, &urls.join(","), &token, &labels);
            self.edges.push(edge);
        }
        let names: Vec<&str> = self.edges.iter().map(String::as_str).collect();
        self.ha.wait_nodes_ready(&names);
        for (name, replicas) in [("web", 4), ("worker", 3), ("batch", 2)] {
            self.apps.insert(name.to_string(), App { replicas, version: 1 });
            let m = self.manifest(name);
            self.ha.apply(&m);
        }
        self.note(
            "setup",
            format!("{EDGES} edges x {REPLICAS} replicas via link proxies; apps web=4 worker=3 batch=2"),
        );
        self.check("setup", &Causes::default());
    }

    /// Live workload processes of this test, by instance name.
    fn workloads(&self) -> BTreeMap<String, Vec<i32>> {
        let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        let Ok(procs) = yunbian_faults::process::processes() else { return out };
        for p in procs.iter().filter(|p| !p.is_dead()) {
            let Some(inst) = p.env("INSTANCE_NAME") else { continue };
            if ha::cwd_under(p.pid, &self.ha.dir) {
                out.entry(inst.to_string()).or_default().push(p.pid);
            }
        }
        out
    }

    /// Fails if any instance has two live processes.
    fn check_no_duplicates(&mut self) {
        let dups: Vec<(String, Vec<i32>)> = self.workloads().into_iter().filter(|(_, p)| p.len() > 1).collect();
        if !dups.is_empty() {
            self.violation(format!("instances running twice: {dups:?}"));
        }
    }

    /// Holds a fault for `d`, watching for duplicates meanwhile.
    fn hold(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.check_no_duplicates();
            thread::sleep(Duration::from_millis(500).min(until.saturating_duration_since(Instant::now())));
        }
    }

    fn edge(&mut self) -> String {
        self.edges[self.rng.below(self.edges.len())].clone()
    }

    fn links_of(&self, edge: &str) -> Vec<String> {
        (0..REPLICAS).map(|j| link_name(edge, j)).collect()
    }

    /// Scales or updates a random app; records the cause.
    fn change_app(&mut self, update: bool, causes: &mut Causes) {
        let names: Vec<String> = self.apps.keys().cloned().collect();
        let name = names[self.rng.below(names.len())].clone();
        let before = self.apps[&name].replicas;
        if update {
            let app = self.apps.get_mut(&name).expect("app");
            app.version += 1;
            let v = app.version;
            causes.updated.insert(name.clone());
            self.note("change", format!("update {name}: env VERSION={v} (new template)"));
        } else {
            let mut n = before;
            while n == before {
                n = self.rng.range(1, 6) as usize;
            }
            self.apps.get_mut(&name).expect("app").replicas = n;
            if n < before {
                let d = causes.scaled_down.entry(name.clone()).or_default();
                *d = (*d).max(before - n);
            }
            self.note("change", format!("scale {name}: {before} -> {n}"));
        }
        let m = self.manifest(&name);
        self.ha.apply(&m);
    }

    fn round(&mut self, n: u32) {
        let mut causes = Causes::default();
        // `YUNBIAN_SOAK_FAULTS=CutEdge,KillLeader` restricts the draw.
        let only = std::env::var("YUNBIAN_SOAK_FAULTS").unwrap_or_default();
        let weights: Vec<u32> = FAULTS
            .iter()
            .map(|(f, w)| if only.is_empty() || only.split(',').any(|o| o.trim() == format!("{f:?}")) { *w } else { 0 })
            .collect();
        let fault = FAULTS[self.rng.weighted(&weights)].0;
        let hold = Duration::from_millis(self.rng.range(2_000, 10_000));
        *self.counts.entry(format!("{fault:?}")).or_default() += 1;
        // Whether an app also changes while the fault is on.
        let change_meanwhile = self.rng.unit() < 0.3;
        let meanwhile_update = self.rng.unit() < 0.4;
        let apply_meanwhile = |s: &mut Soak, causes: &mut Causes| {
            if change_meanwhile {
                s.change_app(meanwhile_update, causes);
            }
        };
        let heal_links = |s: &mut Soak, edge: &str| {
            for l in s.links_of(edge) {
                s.ha.link(&l).heal().unwrap_or_else(|e| panic!("heal {l}: {e}"));
            }
        };
        match fault {
            Fault::CutEdge => {
                let e = self.edge();
                self.note("fault", format!("round {n}: cut every link of {e} for {hold:?}"));
                for l in self.links_of(&e) {
                    self.ha.link(&l).cut();
                }
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                heal_links(self, &e);
                self.note("heal", format!("links of {e} healed"));
            }
            Fault::PartitionEdgeFromReplica => {
                let e = self.edge();
                let j = self.rng.below(REPLICAS);
                self.note("fault", format!("round {n}: cut {e} <-> r{} for {hold:?}", j + 1));
                self.ha.link(&link_name(&e, j)).cut();
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                self.ha.link(&link_name(&e, j)).heal().expect("heal");
                self.note("heal", format!("{e} <-> r{} healed", j + 1));
            }
            Fault::DegradeEdge => {
                let e = self.edge();
                let c = LinkConditions {
                    delay: Duration::from_millis(self.rng.range(50, 300)),
                    jitter: Duration::from_millis(self.rng.range(0, 100)),
                    bandwidth_bps: None,
                    loss: self.rng.range(0, 10) as f64 / 100.0,
                };
                self.note("fault", format!("round {n}: degrade every link of {e} for {hold:?}: {c:?}"));
                for l in self.links_of(&e) {
                    self.ha.link(&l).set_conditions(c);
                }
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                heal_links(self, &e);
                self.note("heal", format!("links of {e} healed"));
            }
            Fault::ResetEdge => {
                let e = self.edge();
                self.note("fault", format!("round {n}: reset every connection of {e}"));
                for l in self.links_of(&e) {
                    self.ha.link(&l).reset();
                }
                apply_meanwhile(self, &mut causes);
                self.hold(Duration::from_secs(1));
            }
            Fault::KillAgent => {
                let e = self.edge();
                self.note(
                    "fault",
                    format!("round {n}: SIGKILL the agent of {e} for {hold:?} (workloads keep running)"),
                );
                self.ha.kill_edge(&e);
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                self.ha.start_edge(&e);
                self.note("heal", format!("agent of {e} started again"));
            }
            Fault::RebootHost => {
                let e = self.edge();
                self.note(
                    "fault",
                    format!("round {n}: host reboot of {e}: agent and workloads SIGKILLed for {hold:?}"),
                );
                let killed = self.ha.reboot_edge(&e);
                causes.rebooted.insert(e.clone());
                self.note("fault", format!("{e}: killed pids {killed:?}"));
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                self.ha.start_edge(&e);
                self.note("heal", format!("agent of {e} started after the reboot"));
            }
            Fault::KillReplica | Fault::KillLeader => {
                let j = if matches!(fault, Fault::KillLeader) {
                    self.ha.wait_single_leader()
                } else {
                    self.rng.below(REPLICAS)
                };
                let what = if matches!(fault, Fault::KillLeader) { "the leader " } else { "" };
                self.note("fault", format!("round {n}: SIGKILL {what}replica r{} for {hold:?}", j + 1));
                self.ha.kill_replica(j);
                apply_meanwhile(self, &mut causes);
                self.hold(hold);
                self.ha.start_replica(j);
                self.note("heal", format!("replica r{} started again", j + 1));
            }
            Fault::RestartEtcd => {
                self.note("fault", format!("round {n}: etcd SIGKILLed for {hold:?}"));
                self.ha.etcd.stop();
                self.hold(hold);
                self.ha.etcd.restart().unwrap_or_else(|e| panic!("restart etcd: {e}"));
                self.note("heal", "etcd started again");
            }
            Fault::Scale | Fault::UpdateEnv => {
                self.note("fault", format!("round {n}: app change"));
                self.change_app(matches!(fault, Fault::UpdateEnv), &mut causes);
                self.hold(Duration::from_secs(1));
            }
            Fault::LongOutage => {
                let e = self.edge();
                let d = EVICT_AFTER + Duration::from_secs(12);
                self.note("fault", format!("round {n}: cut every link of {e} for {d:?} (> --evict-after)"));
                for l in self.links_of(&e) {
                    self.ha.link(&l).cut();
                }
                causes.long_outage.insert(e.clone());
                apply_meanwhile(self, &mut causes);
                self.hold(d);
                heal_links(self, &e);
                self.note("heal", format!("links of {e} healed"));
            }
        }
        self.check(&format!("round {n}"), &causes);
    }

    /// Instance names the replicas logged as evicted, with their nodes.
    fn evictions(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for i in 0..self.ha.replica_count() {
            // app_pass logs `evicting: node <name> NotReady for more than <n>s; placing it again`.
            let eviction = |l: &&str| l.contains("evicting: node ") && l.contains(" NotReady for more than ");
            for line in self.ha.replica_log(i).lines().filter(eviction) {
                let field =
                    |k: &str| line.split(&format!("{k}=")).nth(1)?.split_whitespace().next().map(str::to_string);
                if let (Some(inst), Some(node)) = (field("instance"), field("node")) {
                    out.insert(inst, node);
                }
            }
        }
        out
    }

    /// One converged observation, or what is not converged yet.
    fn observe(&mut self) -> Result<BTreeMap<String, Seen>, String> {
        for e in self.edges.clone() {
            if !self.ha.edge_running(&e) {
                let log = ha::tail(&self.ha.edge_log(&e), 20);
                self.violation(format!("the agent of {e} exited by itself:\n{log}"));
            }
        }
        if let Some(i) = self.ha.exited_replicas().first() {
            let log = ha::tail(&self.ha.replica_log(*i), 20);
            self.violation(format!("replica r{} exited by itself:\n{log}", i + 1));
        }
        let nodes = self.ha.list("nodes")?;
        let not_ready: Vec<&str> =
            nodes.iter().filter(|n| s(n, "/status/phase") != "Ready").map(|n| s(n, "/metadata/name")).collect();
        if !not_ready.is_empty() || nodes.len() != EDGES {
            return Err(format!("nodes not Ready: {not_ready:?} ({} nodes)", nodes.len()));
        }
        // Every agent has a live, caught-up session on some replica.
        let (mut connected, mut behind) = (0.0, 0.0);
        for i in self.ha.alive() {
            connected += self.ha.metric(i, "yunbian_hub_connected_nodes")?;
            behind += self.ha.metric(i, "yunbian_sync_queue_depth")?;
        }
        if connected != EDGES as f64 || behind != 0.0 {
            return Err(format!("{connected} sessions, {behind} behind their desired view"));
        }
        let items = self.ha.list("instances")?;
        let mut seen = BTreeMap::new();
        for (name, app) in &self.apps {
            let mine: Vec<_> = items.iter().filter(|i| s(i, "/spec/app") == name).collect();
            if mine.len() != app.replicas {
                return Err(format!("{name}: {} instances, want {}", mine.len(), app.replicas));
            }
            for i in mine {
                let inst = s(i, "/metadata/name").to_string();
                let pid = u(i, "/status/pid").unwrap_or(0) as u32;
                if s(i, "/status/phase") != "Running" || pid == 0 || !pid_alive(pid) {
                    return Err(format!("{inst}: {} pid {pid}", s(i, "/status/phase")));
                }
                if proc_env(pid, "INSTANCE_NAME").as_deref() != Some(inst.as_str()) {
                    return Err(format!("{inst}: pid {pid} is not its workload"));
                }
                let v = proc_env(pid, "VERSION").unwrap_or_default();
                if v != app.version.to_string() {
                    return Err(format!("{inst}: workload has VERSION={v}, want {}", app.version));
                }
                let one = Seen {
                    app: name.clone(),
                    node: s(i, "/spec/node").to_string(),
                    pid,
                    restarts: u(i, "/status/restartCount").unwrap_or(0),
                };
                if seen.insert(inst.clone(), one).is_some() {
                    return Err(format!("{inst} listed twice"));
                }
            }
        }
        if items.len() != seen.len() {
            return Err(format!("{} instances of unknown apps", items.len() - seen.len()));
        }
        let procs = self.workloads();
        for (inst, pids) in &procs {
            match seen.get(inst) {
                None => return Err(format!("workload of gone instance {inst} still runs: {pids:?}")),
                Some(s) if pids != &vec![s.pid as i32] => {
                    return Err(format!("{inst}: processes {pids:?}, status pid {}", s.pid));
                }
                Some(_) => {}
            }
        }
        if let Some(missing) = seen.keys().find(|i| !procs.contains_key(*i)) {
            return Err(format!("{missing}: no workload process"));
        }
        Ok(seen)
    }

    fn check(&mut self, label: &str, causes: &Causes) {
        self.checks += 1;
        let t = Instant::now();
        let now = loop {
            self.check_no_duplicates();
            let last = match self.observe() {
                Ok(v) => break v,
                Err(e) => e,
            };
            if t.elapsed() > CONVERGE {
                self.violation(format!("{label}: not converged within {CONVERGE:?} after the heal: {last}"));
            }
            thread::sleep(Duration::from_millis(500));
        };
        let took = t.elapsed();
        let evictions = self.evictions();
        let new_evictions: BTreeMap<String, String> =
            evictions.iter().filter(|(i, _)| !self.evicted.contains(*i)).map(|(i, n)| (i.clone(), n.clone())).collect();
        for (inst, node) in &new_evictions {
            if !causes.long_outage.contains(node) {
                self.violation(format!("{inst} evicted from {node}, whose links were not cut for {EVICT_AFTER:?}"));
            }
        }
        self.evicted.extend(new_evictions.keys().cloned());

        let (mut kept, mut restarted, mut vanished, mut created) = (0, 0, Vec::new(), 0);
        let mut vanished_per_app: BTreeMap<String, usize> = BTreeMap::new();
        for (inst, before) in &self.seen {
            match now.get(inst) {
                Some(after) if after.node != before.node => {
                    let msg = format!("{inst} moved from {} to {}", before.node, after.node);
                    self.violation(msg);
                }
                Some(after) if after.pid != before.pid || after.restarts != before.restarts => {
                    if !causes.rebooted.contains(&after.node) {
                        let msg = format!(
                            "{inst} on {} restarted without a cause: pid {} -> {}, restarts {} -> {}",
                            after.node, before.pid, after.pid, before.restarts, after.restarts
                        );
                        self.violation(msg);
                    }
                    restarted += 1;
                }
                Some(_) => kept += 1,
                None => {
                    vanished.push(inst.clone());
                    if !causes.updated.contains(&before.app) && !new_evictions.contains_key(inst) {
                        *vanished_per_app.entry(before.app.clone()).or_default() += 1;
                    }
                }
            }
        }
        for (app, gone) in &vanished_per_app {
            let allowed = causes.scaled_down.get(app).copied().unwrap_or(0);
            if *gone > allowed {
                let msg =
                    format!("{gone} instances of {app} lost (scale-down allows {allowed}; not updated, not evicted)");
                self.violation(msg);
            }
        }
        for inst in now.keys() {
            if !self.seen.contains_key(inst) {
                created += 1;
            }
        }
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for s in now.values() {
            *per_node.entry(s.node.as_str()).or_default() += 1;
        }
        let msg = format!(
            "{label}: converged in {:.1}s: {} instances {per_node:?}; kept {kept}, restarted {restarted} (rebooted: {:?}), \
             vanished {} (updated {:?}, scaled down {:?}, evicted {:?}), created {created}",
            took.as_secs_f64(),
            now.len(),
            causes.rebooted,
            vanished.len(),
            causes.updated,
            causes.scaled_down,
            new_evictions.keys().collect::<Vec<_>>(),
        );
        self.note("check", msg);
        self.seen = now;
    }
}

#[test]
fn soak_random_faults_across_edges_and_replicas() {
    let secs: u64 = std::env::var("YUNBIAN_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    let seed: u64 =
        std::env::var("YUNBIAN_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(Rng::fresh_seed);
    println!("soak: seed {seed} (replay with YUNBIAN_SOAK_SEED={seed}), faults for {secs}s");
    let opts = HaOptions { evict_after: Some(format!("{}s", EVICT_AFTER.as_secs())), ..HaOptions::default() };
    let Some(ha) = Ha::start("soak", opts) else { return };
    let mut soak = Soak {
        ha,
        rng: Rng::new(seed),
        seed,
        t0: Instant::now(),
        edges: Vec::new(),
        apps: BTreeMap::new(),
        seen: BTreeMap::new(),
        evicted: BTreeSet::new(),
        log: Vec::new(),
        counts: BTreeMap::new(),
        checks: 0,
    };
    soak.setup();
    let faults_from = Instant::now();
    let mut n = 0;
    while faults_from.elapsed() < Duration::from_secs(secs) {
        n += 1;
        soak.round(n);
    }
    soak.ha.assert_replicas_running();
    let summary = format!(
        "{n} rounds, {} checks passed in {:.0}s; faults: {:?}; evictions: {}",
        soak.checks,
        soak.t0.elapsed().as_secs_f64(),
        soak.counts,
        soak.evicted.len()
    );
    soak.note("done", summary);
}
