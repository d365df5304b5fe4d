//! Rollouts end to end, through the `yunbian` binary with a real cloud and
//! real agents on this machine: a canary that updates one site, pauses,
//! and goes on after `rollout resume`; an automatic rollback when the new
//! version crashes; `rollout pause`, `rollout undo` (also to a given
//! revision) and `rollout history`.
//!
//! Which version an instance runs is read from its live process's
//! environment (`VERSION`), not from the instance object.

mod harness;

use std::time::Duration;

use harness::{eventually, pid_alive, proc_env, run, s, summary, u, Cluster, EdgeSetup};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

fn group(name: &str, site: &str) -> String {
    json!({
        "apiVersion": "yunbian.io/v1", "kind": "NodeGroup", "metadata": {"name": name},
        "spec": {"selector": {"site": site}, "site": site},
    })
    .to_string()
}

/// An App whose process sleeps with `VERSION` in its environment; `spec`
/// is merged in.
fn app(name: &str, version: &str, spec: Value) -> String {
    let mut base = json!({
        "replicas": 1,
        "runtime": "process",
        "process": {"command": ["/bin/sh", "-c", "while true; do sleep 1; done"], "env": {"VERSION": version}},
        "restartPolicy": "Always",
    });
    if let (Some(o), Some(e)) = (base.as_object_mut(), spec.as_object()) {
        o.extend(e.clone());
    }
    json!({"apiVersion": "yunbian.io/v1", "kind": "App", "metadata": {"name": name}, "spec": base}).to_string()
}

/// The version each Running instance's live process runs: (node,
/// version), sorted.
fn versions(c: &Cluster, app: &str) -> Result<Vec<(String, String)>, String> {
    versions_of(&c.instances_of(app)?, |_| true)
}

/// Waits until the instances of `app` run exactly `want` (node, version).
fn wait_versions(c: &Cluster, app: &str, want: &[(&str, &str)], what: &str) {
    let mut want: Vec<(String, String)> = want.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    want.sort();
    eventually(WAIT, what, || {
        let got = versions(c, app)?;
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    });
}

fn rollout_phase(c: &Cluster, app: &str) -> String {
    c.app(app).map(|a| s(&a, "/status/rollout/phase").to_string()).unwrap_or_default()
}

fn wait_phase(c: &Cluster, app: &str, phase: &str) -> Value {
    eventually(WAIT, &format!("{app}: rollout {phase}"), || {
        let a = c.app(app).ok_or("no app")?;
        let observed = u(&a, "/status/observedGeneration") >= u(&a, "/metadata/generation");
        if observed && s(&a, "/status/rollout/phase") == phase {
            Ok(a)
        } else {
            Err(format!("{}", a.pointer("/status/rollout").cloned().unwrap_or_default()))
        }
    })
}

#[test]
fn a_canary_updates_one_site_pauses_and_goes_on_after_resume() {
    let mut c = Cluster::start("rollout-canary");
    for (n, site) in [("a1", "a"), ("b1", "b"), ("c1", "c")] {
        c.join_with(n, EdgeSetup::new().labels(&format!("site={site}")));
    }
    for (g, site) in [("ga", "a"), ("gb", "b"), ("gc", "c")] {
        c.apply(&group(g, site));
    }
    let spec = json!({
        "placement": {"groups": ["ga", "gb", "gc"], "perGroup": {"replicas": 1}},
        "rollout": {"canary": {"steps": [{"groups": ["ga"]}, {"pause": true}]}},
    });
    c.apply(&app("web", "1", spec.clone()));
    wait_versions(&c, "web", &[("a1", "1"), ("b1", "1"), ("c1", "1")], "web 1 everywhere");
    wait_phase(&c, "web", "Complete");

    c.apply(&app("web", "2", spec));
    let a = wait_phase(&c, "web", "Paused");
    assert_eq!(u(&a, "/status/rollout/step"), Some(1), "{a}");
    wait_versions(&c, "web", &[("a1", "2"), ("b1", "1"), ("c1", "1")], "only site a on 2");
    let status = c.cli(&["rollout", "status", "app/web"]);
    assert!(status.ok().contains("Paused") && status.ok().contains("step:       1/2"), "{}", status.ok());
    // It stays there.
    std::thread::sleep(Duration::from_secs(3));
    assert!(versions(&c, "web").expect("running").contains(&("b1".into(), "1".into())));
    assert_eq!(rollout_phase(&c, "web"), "Paused");

    let resumed = c.cli(&["rollout", "resume", "app/web"]);
    assert!(resumed.ok().contains("resumed"), "{}", resumed.ok());
    let watch = run(c.cli_command(&["rollout", "status", "app/web", "--watch"]), WAIT);
    assert!(watch.ok().contains("Complete"), "{}", watch.ok());
    wait_versions(&c, "web", &[("a1", "2"), ("b1", "2"), ("c1", "2")], "web 2 everywhere");

    let history = c.cli(&["rollout", "history", "app/web"]);
    let lines: Vec<&str> = history.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{}", history.ok());
    assert!(lines[1].starts_with("1 ") && lines[1].contains("created"), "{}", history.ok());
    assert!(
        lines[2].starts_with("2 ") && lines[2].contains("env VERSION") && lines[2].ends_with("current"),
        "{}",
        history.ok()
    );
}

#[test]
fn a_crashing_version_is_rolled_back_automatically() {
    let mut c = Cluster::start("rollout-rollback");
    for n in ["n1", "n2", "n3"] {
        c.join(n);
    }
    let rollout = json!({"replicas": 3, "rollout": {"maxSurge": 1, "maxUnavailable": 0}});
    c.apply(&app("api", "1", rollout.clone()));
    eventually(WAIT, "api 1 on three nodes", || {
        let v = versions(&c, "api")?;
        (v.len() == 3 && v.iter().all(|(_, x)| x == "1")).then_some(()).ok_or(format!("{v:?}"))
    });
    wait_phase(&c, "api", "Complete");

    // Version 2 exits with status 3 at once.
    let mut crashing = rollout.clone();
    crashing["process"] = json!({"command": ["/bin/sh", "-c", "exit 3"], "env": {"VERSION": "2"}});
    c.apply(&app("api", "2", crashing));
    let watch = run(c.cli_command(&["rollout", "status", "app/api", "--watch"]), WAIT);
    assert!(!watch.success(), "a rollback ends the watch with exit code 1: {watch:?}");
    assert!(watch.stderr.contains("RolledBack"), "{watch:?}");
    let a = wait_phase(&c, "api", "RolledBack");
    let message = s(&a, "/status/rollout/message");
    assert!(message.contains("rolled back to revision 1") && message.contains("failed"), "{a}");
    // Back to three instances of version 1, the crashing one gone.
    eventually(WAIT, "api 1 on three nodes again", || {
        let v = versions(&c, "api")?;
        (v.len() == 3 && v.iter().all(|(_, x)| x == "1")).then_some(()).ok_or(format!("{v:?}"))
    });
    let history = c.cli(&["rollout", "history", "app/api"]);
    assert!(history.ok().contains("current (rolled back)"), "{}", history.ok());
    assert!(history.ok().contains("stable (running)"), "{}", history.ok());
}

/// Waits until `app` runs `n` instances, all of `version`.
fn wait_all(c: &Cluster, app: &str, n: usize, version: &str) {
    eventually(WAIT, &format!("{app}: {n} instances of version {version}"), || {
        let v = versions(c, app)?;
        (v.len() == n && v.iter().all(|(_, x)| x == version)).then_some(()).ok_or(format!("{v:?}"))
    });
}

#[test]
fn pause_undo_history_and_their_errors() {
    let mut c = Cluster::start("rollout-undo");
    c.join("n1");
    c.join("n2");
    let spec = json!({"replicas": 2, "rollout": {"maxSurge": 1, "maxUnavailable": 0}});
    for v in ["1", "2"] {
        c.apply(&app("svc", v, spec.clone()));
        wait_all(&c, "svc", 2, v);
        wait_phase(&c, "svc", "Complete");
    }

    // Paused in the middle of a rollout: each new instance needs 5 s to
    // count, so the pause lands before the second old one goes. (`apply`
    // replaces the spec, and so clears a pause: pause after applying.)
    c.apply(&app(
        "svc",
        "3",
        json!({"replicas": 2, "rollout": {"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 5}}),
    ));
    let o = c.cli(&["rollout", "pause", "app/svc"]);
    assert!(o.ok().contains("paused"), "{}", o.ok());
    let o = c.cli(&["rollout", "pause", "svc"]);
    assert!(o.ok().contains("already paused"), "{}", o.ok());
    wait_phase(&c, "svc", "Paused");
    std::thread::sleep(Duration::from_secs(8));
    let v = versions(&c, "svc").unwrap_or_default();
    let a = c.app("svc").unwrap_or_default();
    assert!(
        v.iter().any(|(_, x)| x == "2"),
        "paused before replacing every instance: {v:?}; {}; {}",
        a.pointer("/status").cloned().unwrap_or_default(),
        summary(&c.instances_of("svc").unwrap_or_default())
    );
    assert_eq!(rollout_phase(&c, "svc"), "Paused");
    let o = c.cli(&["rollout", "resume", "app/svc"]);
    assert!(o.ok().contains("resumed"), "{}", o.ok());
    wait_all(&c, "svc", 2, "3");
    wait_phase(&c, "svc", "Complete");
    let o = c.cli(&["rollout", "resume", "app/svc"]);
    assert!(o.ok().contains("not paused"), "{}", o.ok());

    // Undo: the previous template comes back as a new revision.
    let o = c.cli(&["rollout", "undo", "app/svc"]);
    assert!(o.ok().contains("revision 2"), "{}", o.ok());
    wait_all(&c, "svc", 2, "2");
    wait_phase(&c, "svc", "Complete");
    let history = c.cli(&["rollout", "history", "app/svc"]);
    let revisions: Vec<&str> = history.ok().lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(revisions, ["1", "3", "4"], "{}", history.ok());
    assert!(history.ok().lines().last().is_some_and(|l| l.contains("back to revision 2")), "{}", history.ok());

    let o = c.cli(&["rollout", "undo", "app/svc", "--to-revision", "1"]);
    assert!(o.ok().contains("revision 1"), "{}", o.ok());
    wait_all(&c, "svc", 2, "1");

    // Errors say what is wrong.
    let o = c.cli(&["rollout", "undo", "app/svc", "--to-revision", "99"]);
    assert!(o.err().contains("app svc has no revision 99"), "{o:?}");
    let o = c.cli(&["rollout", "undo", "app/nope"]);
    assert!(o.err().contains("app nope not found"), "{o:?}");
    let o = c.cli(&["rollout", "status", "node/n1"]);
    assert!(o.err().contains("rollouts are about apps"), "{o:?}");
}

#[test]
fn a_rollout_goes_on_across_an_offline_node_which_gets_only_the_final_revision() {
    let mut c = Cluster::builder("rollout-offline").heartbeat("1s").grace("3s").evict_after("10m").start();
    for n in ["n1", "n2", "n3"] {
        c.join(n);
    }
    let spec = json!({"replicas": 3, "rollout": {"maxSurge": 1, "maxUnavailable": 0}});
    c.apply(&app("site", "1", spec.clone()));
    wait_versions(&c, "site", &[("n1", "1"), ("n2", "1"), ("n3", "1")], "site 1 on every node");
    wait_phase(&c, "site", "Complete");
    let on_n3 = c.instances_of("site").expect("instances").into_iter().find(|i| s(i, "/spec/node") == "n3");
    let old_pid = on_n3.as_ref().and_then(|i| u(i, "/status/pid")).expect("pid on n3") as u32;

    // n3's agent goes away (its workload keeps running); two revisions
    // roll out meanwhile, neither waiting for it: n1 and n2 run each, and
    // n3's share is replaced in place, to be run when it returns.
    c.kill_edge("n3");
    c.wait_node_phase("n3", "NotReady");
    let mut on_n3_names = Vec::new();
    for v in ["2", "3"] {
        c.apply(&app("site", v, spec.clone()));
        let held = eventually(WAIT, &format!("site {v} on n1 and n2, and waiting for n3"), || {
            let items = c.instances_of("site")?;
            let online: Vec<(String, String)> = versions_of(&items, |n| n != "n3")?;
            let on_n3: Vec<&Value> = items.iter().filter(|i| s(i, "/spec/node") == "n3").collect();
            let n3_version =
                on_n3.iter().map(|i| s(i, "/spec/template/process/env/VERSION").to_string()).collect::<Vec<_>>();
            let want: Vec<(String, String)> = ["n1", "n2"].iter().map(|n| (n.to_string(), v.to_string())).collect();
            (online == want && n3_version == [v])
                .then(|| on_n3[0].clone())
                .ok_or(format!("{online:?} n3: {n3_version:?}"))
        });
        on_n3_names.push(s(&held, "/metadata/name").to_string());
        wait_phase(&c, "site", "Complete");
    }
    assert!(pid_alive(old_pid), "the offline node's workload ran on by itself");

    // Back: n3 stops its old instance, runs revision 3, and never started revision 2.
    c.start_edge("n3");
    c.wait_node_ready("n3");
    c.wait_pids_dead("n3's revision 1", &[old_pid]);
    wait_all(&c, "site", 3, "3");
    let log = c.edge_log("n3");
    assert!(!log.contains(&on_n3_names[0]), "n3 started the revision-2 instance {}:\n{log}", on_n3_names[0]);
    let v = versions(&c, "site").expect("running");
    assert_eq!(v.len(), 3, "{v:?}");
}

/// (node, version) of the Running instances on the nodes `keep` accepts.
fn versions_of(items: &[Value], keep: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for i in items.iter().filter(|i| keep(s(i, "/spec/node"))) {
        let pid = u(i, "/status/pid")
            .filter(|p| s(i, "/status/phase") == "Running" && pid_alive(*p as u32))
            .ok_or_else(|| format!("not all Running: {}", summary(items)))?;
        let v = proc_env(pid as u32, "VERSION").ok_or_else(|| format!("no VERSION in pid {pid}"))?;
        out.push((s(i, "/spec/node").to_string(), v));
    }
    out.sort();
    Ok(out)
}
