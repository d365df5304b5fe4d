//! Workloads outlive their agent, and the cloud can die and come back:
//! agents and instances carry on without re-joining.

mod harness;

use harness::{eventually, pid_alive, s, u, App, Cluster, WAIT};

const SLEEPER: &str = "while true; do echo alive; sleep 1; done";

#[test]
fn agent_restart_adopts_running_workload() {
    let mut c = Cluster::start("survive-agent");
    c.join("edge-1");
    let app = App::new("keep").shell(SLEEPER);
    c.apply(&app.clone().replicas(1).yaml());
    let before = c.wait_running("keep", 1).remove(0);
    let name = s(&before, "/metadata/name").to_string();
    let pid = u(&before, "/status/pid").expect("pid") as u32;
    let restarts = u(&before, "/status/restartCount");

    c.kill_edge("edge-1");
    assert!(pid_alive(pid), "the workload died with its agent");
    // The cloud notices the agent is gone; the workload does not care.
    c.wait_node_phase("edge-1", "NotReady");
    assert!(pid_alive(pid), "the workload died while its agent was down");

    c.start_edge("edge-1");
    c.wait_node_ready("edge-1");
    eventually(WAIT, "the restarted agent to re-adopt the instance", || {
        let log = c.edge_log_current("edge-1");
        let line = log.lines().find(|l| l.contains("recovered instance") && l.contains(&name));
        match line {
            Some(l) if l.contains("adopted=true") => Ok(()),
            Some(l) => Err(format!("not adopted: {l}")),
            None => Err(format!("no `recovered instance` line for {name} in:\n{log}")),
        }
    });
    // A round trip through the restarted agent: anything it reported about
    // the old instance before the new one runs has arrived by then.
    c.apply(&app.clone().replicas(2).yaml());
    let after = c.wait_running("keep", 2);
    let same =
        after.iter().find(|i| s(i, "/metadata/name") == name).unwrap_or_else(|| panic!("{name} gone: {after:?}"));
    assert_eq!(u(same, "/status/pid"), Some(u64::from(pid)), "pid changed: {same}");
    assert_eq!(u(same, "/status/restartCount"), restarts, "restarted: {same}");
    assert_eq!(s(same, "/status/phase"), "Running", "{same}");
    assert!(pid_alive(pid), "pid {pid} is gone");
    c.assert_edge_running("edge-1");

    c.delete_app("keep");
}

#[test]
fn cloud_restart_on_same_port_keeps_everything() {
    let mut c = Cluster::start("survive-cloud");
    c.join("edge-1");
    let agent_pid = c.edge_pid("edge-1");
    let app = App::new("keep").shell(SLEEPER);
    c.apply(&app.clone().replicas(1).yaml());
    let before = c.wait_running("keep", 1).remove(0);
    let name = s(&before, "/metadata/name").to_string();
    let pid = u(&before, "/status/pid").expect("pid") as u32;

    c.kill_cloud();
    // The agent sees the cloud go; the workload keeps running.
    eventually(WAIT, "the agent to notice the cloud is gone", || {
        let log = c.edge_log("edge-1");
        if log.contains("disconnected from cloud") || log.contains("cannot connect to cloud") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(pid_alive(pid), "the workload died with the cloud");
    c.assert_edge_running("edge-1");

    c.restart_cloud();
    // State survived the restart.
    assert!(c.app("keep").is_some(), "app lost across the restart");
    let listed = c.instances_of("keep").expect("instances");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(s(&listed[0], "/metadata/name"), name);
    assert_eq!(u(&listed[0], "/status/pid"), Some(u64::from(pid)));
    // The same agent process reconnects with its certificate: no re-join.
    eventually(WAIT, "edge-1 to reconnect to the restarted cloud", || {
        let log = c.cloud_log_current();
        if log.lines().any(|l| l.contains("edge connected") && l.contains("edge-1")) {
            Ok(())
        } else {
            Err(log)
        }
    });
    c.wait_node_ready("edge-1");
    let nodes = c.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert!(!c.cloud_log_current().contains("node joined"), "a node re-joined:\n{}", c.cloud_log_current());
    assert_eq!(c.edge_pid("edge-1"), agent_pid, "the agent was restarted");
    c.assert_edge_running("edge-1");

    // New work still reaches the node.
    c.apply(&app.clone().replicas(2).yaml());
    let after = c.wait_running("keep", 2);
    assert!(after.iter().all(|i| s(i, "/spec/node") == "edge-1"), "{after:?}");
    let same =
        after.iter().find(|i| s(i, "/metadata/name") == name).unwrap_or_else(|| panic!("{name} gone: {after:?}"));
    assert_eq!(u(same, "/status/pid"), Some(u64::from(pid)), "{same}");
    assert!(pid_alive(pid));

    c.delete_app("keep");
}

#[test]
fn changes_made_while_the_agent_is_down_apply_when_it_returns() {
    let mut c = Cluster::start("survive-offline");
    c.join("edge-1");
    let app = App::new("keep").shell(SLEEPER);
    c.apply(&app.clone().replicas(2).yaml());
    let before = c.wait_running("keep", 2);

    c.kill_edge("edge-1");
    c.wait_node_phase("edge-1", "NotReady");
    // Scale down while the node cannot hear it.
    c.apply(&app.clone().replicas(1).yaml());
    let kept = eventually(WAIT, "the cloud to drop one instance", || {
        let items = c.instances_of("keep")?;
        if items.len() == 1 {
            Ok(items[0].clone())
        } else {
            Err(harness::summary(&items))
        }
    });
    let kept_name = s(&kept, "/metadata/name").to_string();
    let gone: Vec<u32> = before
        .iter()
        .filter(|i| s(i, "/metadata/name") != kept_name)
        .filter_map(|i| u(i, "/status/pid"))
        .map(|p| p as u32)
        .collect();
    assert_eq!(gone.len(), 1, "{before:?} / kept {kept_name}");
    // Nobody on the node has been told yet.
    assert!(harness::pids(&before).iter().all(|p| pid_alive(*p)), "a workload stopped without its agent");

    c.start_edge("edge-1");
    c.wait_node_ready("edge-1");
    c.wait_pids_dead("the scaled-away workload to be stopped by the returning agent", &gone);
    let now = c.wait_running("keep", 1);
    assert_eq!(s(&now[0], "/metadata/name"), kept_name);
    assert_eq!(u(&now[0], "/status/pid"), u(&kept, "/status/pid"), "the kept instance was restarted");

    c.delete_app("keep");
}

#[test]
fn node_that_does_not_return_after_a_cloud_restart_is_not_ready() {
    let mut c = Cluster::start("survive-missing");
    c.join("edge-1");
    c.kill_cloud();
    c.kill_edge("edge-1");
    c.restart_cloud();
    // The stored status said Ready; nobody is connected now.
    let n = c.wait_node_phase("edge-1", "NotReady");
    assert!(!s(&n, "/status/reason").is_empty(), "NotReady without a reason: {n}");
    c.start_edge("edge-1");
    c.wait_node_ready("edge-1");
}

/// Live processes whose environment says they are `instance`.
fn processes_of(instance: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_alive(*pid) && harness::proc_env(*pid, "INSTANCE_NAME").as_deref() == Some(instance))
        .collect()
}

/// An edge host reboot while the cloud is unreachable: the agent and every
/// workload die; the agent comes back with no route to the cloud and starts
/// every workload again from its local store.
#[test]
fn reboot_while_cloud_is_down_restarts_workloads_from_the_local_store() {
    let mut c = Cluster::start("survive-reboot");
    c.join("edge-1");
    let app = App::new("keep").shell(SLEEPER);
    c.apply(&app.replicas(2).yaml());
    let before = c.wait_running("keep", 2);
    let names: Vec<String> = before.iter().map(|i| s(i, "/metadata/name").to_string()).collect();
    let old_pids: Vec<u32> = before.iter().filter_map(|i| u(i, "/status/pid")).map(|p| p as u32).collect();

    c.kill_cloud();
    c.kill_edge("edge-1");
    for pid in &old_pids {
        let _ = std::process::Command::new("kill").args(["-9", "--", &format!("-{pid}")]).status();
    }
    eventually(WAIT, "the workloads to die with the host", || {
        let alive: Vec<u32> = old_pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still alive: {alive:?}"))
        }
    });

    c.start_edge("edge-1"); // the cloud is still down
    for name in &names {
        eventually(WAIT, &format!("{name} running again without the cloud"), || {
            let pids = processes_of(name);
            match pids.iter().find(|p| !old_pids.contains(p)) {
                Some(_) => Ok(()),
                None => Err(format!("no new process for {name} (found {pids:?})")),
            }
        });
    }
    c.assert_edge_running("edge-1");

    // Back online: the node reports in, nothing is recreated.
    c.restart_cloud();
    c.wait_node_ready("edge-1");
    let after = c.wait_running("keep", 2);
    let mut after_names: Vec<String> = after.iter().map(|i| s(i, "/metadata/name").to_string()).collect();
    after_names.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(after_names, expected, "instances were recreated instead of kept");
    c.delete_app("keep");
}
