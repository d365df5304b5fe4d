//! An edge host reboots while its cloud is unreachable: the agent and every
//! workload die together; the agent comes back with no way to the cloud and
//! starts every workload again from its local store. When the link heals,
//! the cloud learns the new pids and nothing is recreated.
//!
//! Prints the time from the agent's start to all N workloads running, for
//! N = 10 and N = 50 (recorded in docs/benchmarks.md).

mod harness;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use harness::{eventually, instance_leaders, pid_alive, s, summary, u, App, Cluster, EdgeSetup, WAIT};

const RECONNECT_WAIT: Duration = Duration::from_secs(150);

#[derive(Clone, Copy, Debug)]
enum Offline {
    /// The link is a blackhole.
    Cut,
    /// Connections to the cloud are refused.
    Refused,
}

/// Reboots a node running `n` workloads while it is offline; returns the
/// time from the agent's start to all of them running again.
fn reboot_offline(n: usize, offline: Offline) -> Duration {
    let mut c = Cluster::start(&format!("reboot-{n}"));
    c.join_with("edge-1", EdgeSetup::new().via_link());
    c.apply(&App::new("fleet").replicas(n as i64).command(&["/bin/sleep", "1000000"]).yaml());
    let before = c.wait_running("fleet", n);
    let names: Vec<String> = before.iter().map(|i| s(i, "/metadata/name").to_string()).collect();

    match offline {
        Offline::Cut => c.link("edge-1").cut(),
        Offline::Refused => {
            c.link("edge-1").refuse(true).expect("refuse");
            c.link("edge-1").reset();
        }
    }
    let killed = c.reboot_edge("edge-1");
    let old: Vec<u32> = harness::pids(&before);
    assert!(old.iter().all(|p| killed.contains(p)), "not every workload died with the host: {killed:?} / {old:?}");

    let t0 = Instant::now();
    c.start_edge("edge-1");
    let mut running: BTreeMap<String, u32> = BTreeMap::new();
    let took = loop {
        for name in &names {
            if !running.contains_key(name) {
                if let Some(p) = instance_leaders(name).into_iter().find(|p| !old.contains(p)) {
                    running.insert(name.clone(), p);
                }
            }
        }
        if running.len() == n {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < WAIT,
            "after {WAIT:?} only {} of {n} workloads run again: {running:?}\nagent log:\n{}",
            running.len(),
            c.edge_log_current("edge-1")
        );
        thread::sleep(Duration::from_millis(20));
    };
    println!(
        "[reboot] N={n} ({offline:?} link): all {n} workloads running {} ms after the agent started",
        took.as_millis()
    );
    c.assert_edge_running("edge-1");

    // Back online: the cloud learns the new pids; nothing is recreated.
    c.link("edge-1").heal().expect("heal");
    eventually(RECONNECT_WAIT, "edge-1 Ready after the heal", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    eventually(WAIT, "the new pids to reach the cloud", || {
        let items = c.instances_of("fleet")?;
        let reported: BTreeMap<String, u32> = items
            .iter()
            .filter(|i| s(i, "/status/phase") == "Running")
            .filter_map(|i| Some((s(i, "/metadata/name").to_string(), u(i, "/status/pid")? as u32)))
            .collect();
        if items.len() == n && reported == running {
            Ok(())
        } else {
            Err(summary(&items))
        }
    });
    // A round trip through the reconnected agent, then nothing changed.
    c.apply(&App::new("probe").yaml());
    c.wait_running("probe", 1);
    for (name, pid) in &running {
        assert_eq!(instance_leaders(name), vec![*pid], "{name} was restarted after the reconnect");
    }
    assert!(old.iter().all(|p| !pid_alive(*p)));
    took
}

#[test]
fn reboot_while_offline_restarts_every_workload_from_the_local_store() {
    // One after the other, alone in this binary, so the figures are not
    // skewed by a neighbour.
    let t10 = reboot_offline(10, Offline::Cut);
    let t50 = reboot_offline(50, Offline::Refused);
    println!("[reboot] summary: N=10 {} ms, N=50 {} ms", t10.as_millis(), t50.as_millis());
}
