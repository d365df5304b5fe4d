//! A long cloud outage, as an edge site sees it: the link to the cloud is
//! cut (a blackhole: no FIN, no RST) for a stretch. The agent keeps every
//! workload running, restarts a crashing one by its restart policy, its
//! workloads keep logging; when the link heals the node is Ready again,
//! nothing is restarted or recreated because of the reconnect, and the
//! statuses queued during the outage reach the cloud.

mod harness;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use harness::{eventually, instance_leaders, pid_alive, s, summary, u, unix_now, App, Cluster, EdgeSetup, WAIT};

/// Longest an agent may take to notice a healed link after a long
/// blackhole: its dead-connection check (45 s), a handshake that the cut
/// swallowed (up to 15 s) and the reconnect back-off (up to 30 s). A
/// give-up limit, not a performance goal.
const RECONNECT_WAIT: Duration = Duration::from_secs(150);

/// Prints `tick <unix time>` every second.
const TICKER: &str = "while true; do echo \"tick $(date +%s)\"; sleep 1; done";

/// A workload that records each start (`<pid> <unix time>`) in `starts`
/// and exits 3 while the file `trigger` exists.
fn flaky_script(starts: &Path, trigger: &Path) -> String {
    format!(
        "echo \"$$ $(date +%s)\" >> {starts}; echo \"start $$\"; \
         while true; do if [ -e {trigger} ]; then echo crash; exit 3; fi; sleep 0.2; done",
        starts = starts.display(),
        trigger = trigger.display()
    )
}

/// `(pid, unix time)` of each start recorded by [`flaky_script`].
fn starts(path: &Path) -> Vec<(u32, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (p, t) = l.split_once(' ')?;
            Some((p.parse().ok()?, t.trim().parse().ok()?))
        })
        .collect()
}

/// Cuts edge-1's link for `outage` with a steady app (2 replicas), a
/// crash-looping app and another edge that keeps its link; checks
/// everything the module doc promises.
fn outage(test: &str, outage: Duration) {
    let mut c = Cluster::start(test);
    c.join_with("edge-1", EdgeSetup::new().via_link().labels("site=a"));
    c.join_with("edge-2", EdgeSetup::new().labels("site=b"));
    let starts_file = c.dir.join("flaky-starts");
    let trigger = c.dir.join("flaky-crash");
    c.apply(&App::new("steady").replicas(2).shell(TICKER).node_selector("site", "a").yaml());
    c.apply(&App::new("flaky").shell(&flaky_script(&starts_file, &trigger)).node_selector("site", "a").yaml());
    let steady = c.wait_running("steady", 2);
    let flaky = c.wait_running("flaky", 1).remove(0);
    let flaky_name = s(&flaky, "/metadata/name").to_string();
    assert_eq!(u(&flaky, "/status/restartCount").unwrap_or(0), 0, "{flaky}");
    let steady_procs: Vec<(String, Vec<u32>)> = steady
        .iter()
        .map(|i| {
            let name = s(i, "/metadata/name").to_string();
            let procs = instance_leaders(&name);
            (name, procs)
        })
        .collect();
    let agent = c.edge_pid("edge-1");

    // ---- the outage
    let t_cut = unix_now();
    let cut_at = Instant::now();
    c.link("edge-1").cut();
    c.wait_node_phase("edge-1", "NotReady");

    // The crash loop goes on without the cloud: three restarts or more.
    std::fs::write(&trigger, "").expect("create the crash trigger");
    eventually(WAIT, "flaky to be restarted 3 times during the outage", || {
        let st = starts(&starts_file);
        if st.len() >= 4 {
            Ok(())
        } else {
            Err(format!("starts: {st:?}"))
        }
    });
    std::fs::remove_file(&trigger).expect("remove the crash trigger");
    thread::sleep(Duration::from_millis(500));
    // A start after the trigger went away stays up (back-off may delay it).
    let (flaky_pid, _) = eventually(WAIT, "flaky to run again, stably", || {
        let st = starts(&starts_file);
        match st.last() {
            Some(&(pid, t)) if pid_alive(pid) => Ok((pid, t)),
            last => Err(format!("last start {last:?} is not alive; starts: {st:?}")),
        }
    });
    let flaky_restarts = starts(&starts_file).len() as u64 - 1;

    // New work still flows to the node that kept its link.
    c.apply(&App::new("elsewhere").node_selector("site", "b").yaml());
    c.wait_running("elsewhere", 1);

    while cut_at.elapsed() < outage {
        for (name, procs) in &steady_procs {
            assert_eq!(&instance_leaders(name), procs, "{name} changed during the outage");
        }
        c.assert_edge_running("edge-1");
        assert_eq!(c.edge_pid("edge-1"), agent);
        thread::sleep(Duration::from_secs(2));
    }
    let in_outage: Vec<(u32, u64)> =
        starts(&starts_file).into_iter().filter(|(_, t)| *t >= t_cut && *t <= unix_now()).collect();
    assert!(in_outage.len() >= 3, "the restart policy did not act during the outage: {in_outage:?}");
    let stats = c.link("edge-1").stats();
    assert!(stats.bytes_discarded > 0, "nothing crossed the cut link: {stats:?}");

    // ---- heal
    let t_heal = unix_now();
    let healed_at = Instant::now();
    c.link("edge-1").heal().expect("heal the link");
    let ready = eventually(RECONNECT_WAIT, "edge-1 Ready again after the heal", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" {
            Ok(healed_at.elapsed())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    println!("[{test}] outage {:?}: edge-1 Ready {:.1} s after the heal", outage, ready.as_secs_f64());

    // The queued statuses arrive: flaky's restart count and pid are the
    // ones of the outage.
    eventually(WAIT, "flaky's status from the outage to reach the cloud", || {
        let items = c.instances_of("flaky")?;
        match items.as_slice() {
            [i] if s(i, "/metadata/name") == flaky_name
                && s(i, "/status/phase") == "Running"
                && u(i, "/status/pid") == Some(u64::from(flaky_pid))
                && u(i, "/status/restartCount") == Some(flaky_restarts) =>
            {
                Ok(())
            }
            _ => Err(format!("want pid {flaky_pid} restarts {flaky_restarts}: {}", summary(&items))),
        }
    });

    // A round trip through the reconnected agent: whatever the resync
    // would have done to the workloads is done once this app runs.
    c.apply(&App::new("after").node_selector("site", "a").yaml());
    c.wait_running("after", 1);
    let now = c.wait_running("steady", 2);
    for (before, after) in steady.iter().zip(&now) {
        assert_eq!(s(before, "/metadata/name"), s(after, "/metadata/name"), "recreated: {}", summary(&now));
        assert_eq!(u(before, "/status/pid"), u(after, "/status/pid"), "restarted: {}", summary(&now));
        assert_eq!(u(before, "/status/restartCount"), u(after, "/status/restartCount"), "restarted: {}", summary(&now));
    }
    for (name, procs) in &steady_procs {
        assert_eq!(&instance_leaders(name), procs, "{name} changed after the reconnect");
    }
    assert!(pid_alive(flaky_pid), "flaky was restarted by the reconnect");
    assert_eq!(starts(&starts_file).len() as u64, flaky_restarts + 1, "flaky started again after the heal");
    c.assert_edge_running("edge-1");
    assert_eq!(c.edge_pid("edge-1"), agent, "the agent was restarted");

    // The logs kept going through the outage, with no gap.
    let target = format!("instance/{}", s(&steady[0], "/metadata/name"));
    let o = c.cli(&["logs", &target, "--tail", "100000"]);
    let ticks: Vec<u64> = o
        .ok()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .filter(|t| *t >= t_cut && *t <= t_heal)
        .collect();
    assert!(
        ticks.first().is_some_and(|t| *t <= t_cut + 2) && ticks.last().is_some_and(|t| *t + 2 >= t_heal),
        "ticks do not span the outage {t_cut}..{t_heal}: {ticks:?}"
    );
    let gap = ticks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(gap <= 5, "the workload's output stopped for {gap} s during the outage: {ticks:?}");
    let log = c.edge_log("edge-1");
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

#[test]
fn long_outage_keeps_workloads_and_delivers_queued_statuses() {
    // Past the agent's 45 s dead-connection check, so it also goes through
    // reconnect attempts into the blackhole.
    outage("outage", Duration::from_secs(55));
}

/// The same with a real three-minute outage (runs in CI: about 4 minutes,
/// alongside the other test of this file).
#[test]
fn soak_three_minute_outage() {
    outage("outage-soak", Duration::from_secs(180));
}
