//! Changes made in the cloud while a node's link is cut reach the node when
//! the link heals, each applied exactly once; and an instance the cloud
//! re-placed elsewhere while its node was away is stopped at that node when
//! it comes back (fencing).

mod harness;

use std::thread;
use std::time::Duration;

use harness::{eventually, instance_leaders, pid_alive, proc_env, s, summary, u, App, Cluster, EdgeSetup, Out, WAIT};

const RECONNECT_WAIT: Duration = Duration::from_secs(150);

fn sleeper(name: &str) -> App {
    App::new(name).command(&["/bin/sleep", "1000000"])
}

/// `started` lines of the agent's log for `instance`.
fn starts_logged(c: &Cluster, node: &str, instance: &str) -> usize {
    let needle = format!("instance={instance} ");
    c.edge_log(node).lines().filter(|l| l.contains(" started ") && l.contains(&needle)).count()
}

fn wait_ready_after_heal(c: &Cluster, node: &str) {
    eventually(RECONNECT_WAIT, &format!("{node} Ready after the heal"), || {
        let n = c.node(node).ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
}

#[test]
fn changes_made_during_an_outage_apply_exactly_once() {
    let mut c = Cluster::start("offline-changes");
    c.join_with("edge-1", EdgeSetup::new().via_link());
    c.apply(&sleeper("upd").env("GREETING", "hi").yaml());
    c.apply(&sleeper("scale").replicas(3).yaml());
    c.apply(&sleeper("gone").replicas(2).yaml());
    c.apply(&sleeper("same").yaml());
    let upd0 = c.wait_running("upd", 1).remove(0);
    let scale0 = c.wait_running("scale", 3);
    let gone0 = c.wait_running("gone", 2);
    let same0 = c.wait_running("same", 1).remove(0);
    let pid = |i: &serde_json::Value| u(i, "/status/pid").expect("pid") as u32;
    let name = |i: &serde_json::Value| s(i, "/metadata/name").to_string();

    c.link("edge-1").cut();
    c.wait_node_phase("edge-1", "NotReady");
    c.apply(&sleeper("upd").env("GREETING", "bye").yaml());
    c.apply(&sleeper("scale").replicas(1).yaml());
    c.cli(&["delete", "app", "gone"]).ok();
    eventually(WAIT, "the cloud to take in the changes", || {
        let upd = c.instances_of("upd")?;
        let scale = c.instances_of("scale")?;
        let gone = c.instances_of("gone")?;
        // The new `upd` waits for a Ready node: the old one is gone.
        if upd.iter().all(|i| name(i) != name(&upd0)) && scale.len() == 1 && gone.is_empty() {
            Ok(())
        } else {
            Err(format!("upd {} scale {} gone {}", summary(&upd), summary(&scale), summary(&gone)))
        }
    });
    let kept = c.instances_of("scale").expect("instances").remove(0);
    // Nobody told the node yet: everything it had still runs.
    let all0: Vec<u32> = [&upd0, &same0].into_iter().chain(&scale0).chain(&gone0).map(pid).collect();
    thread::sleep(Duration::from_secs(2));
    assert!(all0.iter().all(|p| pid_alive(*p)), "a workload stopped while its node was cut off");
    c.assert_edge_running("edge-1");

    c.link("edge-1").heal().expect("heal");
    wait_ready_after_heal(&c, "edge-1");

    // upd: replaced once, with the new environment.
    let upd1 = c.wait_running("upd", 1).remove(0);
    assert_ne!(name(&upd1), name(&upd0));
    assert_eq!(proc_env(pid(&upd1), "GREETING").as_deref(), Some("bye"), "{upd1}");
    c.wait_pids_dead("the old upd to stop", &[pid(&upd0)]);
    // scale: exactly the kept instance, untouched.
    let scale1 = c.wait_running("scale", 1).remove(0);
    assert_eq!(name(&scale1), name(&kept));
    let scale_gone: Vec<u32> = scale0.iter().filter(|i| name(i) != name(&kept)).map(pid).collect();
    assert_eq!(scale_gone.len(), 2);
    c.wait_pids_dead("the scaled-away instances to stop", &scale_gone);
    let kept_pid = scale0.iter().find(|i| name(i) == name(&kept)).map(pid).expect("kept was running");
    assert_eq!(pid(&scale1), kept_pid, "the kept instance was restarted");
    // gone: its processes stopped.
    c.wait_pids_dead("the deleted app's processes to stop", &gone0.iter().map(pid).collect::<Vec<_>>());
    // same: untouched.
    let same1 = c.wait_running("same", 1).remove(0);
    assert_eq!((name(&same1), pid(&same1)), (name(&same0), pid(&same0)));

    // Exactly once: past a full reconcile period of the agent (10 s) and a
    // round trip through it, nothing was started again.
    thread::sleep(Duration::from_secs(11));
    c.apply(&sleeper("probe").yaml());
    c.wait_running("probe", 1);
    for (inst, p) in [(&upd1, pid(&upd1)), (&scale1, kept_pid), (&same1, pid(&same0))] {
        assert_eq!(instance_leaders(&name(inst)), vec![p], "{} runs other processes than {p}", name(inst));
        assert_eq!(starts_logged(&c, "edge-1", &name(inst)), 1, "{} started more than once", name(inst));
    }
    assert!(c.instances_of("gone").expect("instances").is_empty());
    for i in scale0.iter().chain(&gone0).chain([&upd0]) {
        if name(i) != name(&kept) {
            assert!(instance_leaders(&name(i)).is_empty(), "{} still runs", name(i));
        }
    }
    let now = c.wait_running("upd", 1).remove(0);
    assert_eq!((name(&now), u(&now, "/status/restartCount")), (name(&upd1), Some(0)), "{now}");
}

#[test]
fn instance_replaced_while_its_node_was_away_is_stopped_there_on_reconnect() {
    let mut c = Cluster::builder("offline-fencing").evict_after("5s").start();
    c.join_with("edge-1", EdgeSetup::new().via_link());
    c.join_with("edge-2", EdgeSetup::new().via_link());
    c.apply(&sleeper("fenced").yaml());
    let first = c.wait_running("fenced", 1).remove(0);
    let (away, other) = if s(&first, "/spec/node") == "edge-1" { ("edge-1", "edge-2") } else { ("edge-2", "edge-1") };
    let old_pid = u(&first, "/status/pid").expect("pid") as u32;

    c.link(away).cut();
    c.wait_node_phase(away, "NotReady");
    let moved = eventually(WAIT, "the instance to be re-placed on the other node", || {
        let items = c.instances_of("fenced")?;
        match items.as_slice() {
            [i] if s(i, "/spec/node") == other
                && s(i, "/status/phase") == "Running"
                && u(i, "/status/pid").is_some_and(|p| pid_alive(p as u32)) =>
            {
                Ok(i.clone())
            }
            _ => Err(summary(&items)),
        }
    });
    assert_ne!(s(&moved, "/metadata/name"), s(&first, "/metadata/name"));
    // The node that is away cannot know: it keeps its copy running.
    assert!(pid_alive(old_pid), "the cut-off node stopped its copy by itself");
    let log = c.cloud_log();
    assert!(log.lines().any(|l| l.contains("evicting") && l.contains(away)), "no eviction logged:\n{log}");

    c.link(away).heal().expect("heal");
    wait_ready_after_heal(&c, away);
    c.wait_pids_dead("the old copy to be stopped at the returning node", &[old_pid]);
    assert!(instance_leaders(s(&first, "/metadata/name")).is_empty());
    let now = c.wait_running("fenced", 1).remove(0);
    assert_eq!(s(&now, "/metadata/name"), s(&moved, "/metadata/name"));
    assert_eq!(u(&now, "/status/pid"), u(&moved, "/status/pid"), "the re-placed copy was restarted");
    let out: Out = c.cli(&["get", "instances"]);
    assert_eq!(out.ok().lines().filter(|l| l.starts_with("fenced-")).count(), 1, "{out:?}");
}
