//! Edge clocks are wrong: one agent runs an hour behind the cloud, another
//! an hour ahead (libfaketime; monotonic time stays real). Both join, stay
//! Ready on their heartbeats, run what they are given and report it.

mod harness;

use std::thread;
use std::time::Duration;

use harness::{eventually, pid_alive, proc_env, s, u, unix_now, App, Cluster, EdgeSetup, WAIT};

/// Prints the workload's idea of the time.
const CLOCK: &str = "while true; do echo \"now $(date +%s)\"; sleep 1; done";

#[test]
fn agents_an_hour_behind_and_ahead_join_stay_ready_and_run_apps() {
    let mut c = Cluster::start("clock-skew");
    let skews = [("behind", "-1h", -3600i64), ("ahead", "+1h", 3600)];
    for (label, offset, _) in skews {
        let node = format!("edge-{label}");
        c.join_with(&node, EdgeSetup::new().faketime(offset).labels(&format!("clock={label}")));
    }
    for (label, _, _) in skews {
        c.apply(&App::new(label).shell(CLOCK).node_selector("clock", label).yaml());
    }
    for (label, offset, skew) in skews {
        let node = format!("edge-{label}");
        let inst = c.wait_running(label, 1).remove(0);
        assert_eq!(s(&inst, "/spec/node"), node);
        // The status came from the skewed agent: its pid is the workload's.
        let pid = u(&inst, "/status/pid").expect("pid") as u32;
        assert!(pid_alive(pid));
        assert_eq!(proc_env(pid, "INSTANCE_NAME").as_deref(), Some(s(&inst, "/metadata/name")));
        assert_eq!(proc_env(pid, "FAKETIME").as_deref(), Some(offset), "not running under faketime");
        // The skew is real: the workload (which inherits the agent's clock)
        // prints a time about an hour off.
        let target = format!("instance/{}", s(&inst, "/metadata/name"));
        let seen = eventually(WAIT, &format!("{label}'s clock in its output"), || {
            let o = c.cli(&["logs", &target, "--tail", "1"]);
            let t = o.stdout.lines().last().and_then(|l| l.strip_prefix("now ")?.trim().parse::<i64>().ok());
            match t {
                Some(t) if o.success() => Ok(t),
                _ => Err(format!("{o:?}")),
            }
        });
        let off = seen - unix_now() as i64;
        println!("[clock] {node}: workload clock is {off:+} s from the test's");
        assert!((off - skew).abs() < 120, "{node}: expected a skew of {skew} s, saw {off} s");
    }

    // Heartbeats keep both Ready for well past the grace period (4 s).
    thread::sleep(Duration::from_secs(10));
    for (label, _, _) in skews {
        let node = format!("edge-{label}");
        let n = c.wait_node_ready(&node);
        assert_eq!(s(&n, "/status/phase"), "Ready");
        let log = c.cloud_log();
        assert!(
            !log.lines().any(|l| l.contains("node phase changed") && l.contains(&format!("node={node} "))),
            "{node} flapped:\n{log}"
        );
        c.assert_edge_running(&node);
    }
    // Changes keep flowing: scale each up, and the new instances report.
    for (label, _, _) in skews {
        c.apply(&App::new(label).replicas(2).shell(CLOCK).node_selector("clock", label).yaml());
    }
    for (label, _, _) in skews {
        let items = c.wait_running(label, 2);
        assert!(items.iter().all(|i| s(i, "/spec/node") == format!("edge-{label}")));
    }
}
