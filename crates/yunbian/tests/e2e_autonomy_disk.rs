//! Disk faults at the edge: the data directory's file system fills up, or
//! the local store file is damaged while the agent is down.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use harness::{eventually, instance_leaders, s, summary, u, App, Cluster, WAIT};

fn sleeper(name: &str) -> App {
    App::new(name).command(&["/bin/sleep", "1000000"])
}

/// Files the agent moved aside as corrupt.
fn quarantined(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("state.redb.corrupt-"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The STATUS column of `get nodes` for `node`.
fn status_column(c: &Cluster, node: &str) -> String {
    let o = c.cli(&["get", "nodes"]);
    let text = o.ok();
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    let col = header.iter().position(|h| *h == "STATUS").unwrap_or_else(|| panic!("no STATUS column: {text}"));
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .and_then(|l| l.split_whitespace().nth(col))
        .unwrap_or_else(|| panic!("no row for {node}: {text}"))
        .to_string()
}

/// Joins edge-1 with its data directory on a 32 MiB tmpfs, runs `keep`,
/// fills the file system and waits until the node reports DiskPressure
/// (and is still Ready). Returns `keep`'s instance name and pid.
fn fill_disk(c: &mut Cluster) -> (String, u32) {
    c.mount_tmpfs("edge-1", 32 << 20);
    c.join("edge-1");
    c.apply(&sleeper("keep").yaml());
    let keep = c.wait_running("keep", 1).remove(0);
    assert!(s(&c.node("edge-1").expect("node"), "/status/diskPressure").is_empty());

    c.tmpfs("edge-1").fill(0).expect("fill the tmpfs");
    let pressure = eventually(WAIT, "edge-1 to report DiskPressure", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        let p = s(&n, "/status/diskPressure").to_string();
        if !p.is_empty() && s(&n, "/status/phase") == "Ready" {
            Ok(p)
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    println!("[disk] pressure: {pressure}");
    assert_eq!(status_column(c, "edge-1"), "Ready,DiskPressure");
    (s(&keep, "/metadata/name").to_string(), u(&keep, "/status/pid").expect("pid") as u32)
}

/// Restarts edge-1's agent and waits until it has read `n` instances from
/// its store, which it must not have found corrupt.
fn restart_reads_store(c: &mut Cluster, n: usize) {
    restart_reads_store_after(c, n, |_| {});
}

/// [`restart_reads_store`], running `between` while the agent is down.
fn restart_reads_store_after(c: &mut Cluster, n: usize, between: impl FnOnce(&mut Cluster)) {
    let dir = c.edge("edge-1").dir.clone();
    c.kill_edge("edge-1");
    between(c);
    c.start_edge("edge-1");
    eventually(WAIT, "the restarted agent to read its store", || {
        let log = c.edge_log_current("edge-1");
        match log.lines().find(|l| l.contains("agent starting from local state")) {
            Some(l) if l.contains(&format!("instances={n}")) => Ok(()),
            Some(l) => Err(l.to_string()),
            None => Err(log),
        }
    });
    assert!(quarantined(&dir).is_empty(), "the store was found corrupt: {:?}", quarantined(&dir));
    assert!(!c.edge_log_current("edge-1").contains("corrupt"), "{}", c.edge_log_current("edge-1"));
    c.wait_node_ready("edge-1");
}

/// Fills edge-1's disk (see [`fill_disk`]) and applies a change too big
/// for the store's spare pages (400 KB of environment: redb's file is
/// sparse on tmpfs, so new pages need space), so that the agent cannot
/// persist it; waits
/// until the node says so. Returns `keep`'s name and pid, and the value of
/// the change's big variable.
fn change_on_full_disk(c: &mut Cluster) -> (String, u32, String) {
    let (keep_name, keep_pid) = fill_disk(c);
    let big = "x".repeat(100_000);
    let app = ["BIG", "BIG2", "BIG3", "BIG4"].iter().fold(sleeper("late"), |a, k| a.env(k, &big));
    c.apply(&app.yaml());
    eventually(WAIT, "the agent to report the failed store write", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/diskPressure").contains("local store write failed") {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    thread::sleep(Duration::from_secs(3));
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid], "the workload did not survive the full disk");
    assert_eq!(s(&c.node("edge-1").expect("node"), "/status/phase"), "Ready");
    c.assert_edge_running("edge-1");
    (keep_name, keep_pid, big)
}

/// Waits until `late` (from [`change_on_full_disk`]) runs with its big
/// variable and the disk pressure is gone; returns its pid.
fn late_applied(c: &Cluster, big: &str) -> u32 {
    let late = c.wait_running("late", 1).remove(0);
    let late_pid = u(&late, "/status/pid").expect("pid") as u32;
    assert_eq!(harness::proc_env(late_pid, "BIG").map(|v| v.len()), Some(big.len()));
    eventually(WAIT, "DiskPressure to clear", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/diskPressure").is_empty() {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    assert_eq!(status_column(c, "edge-1"), "Ready");
    late_pid
}

#[test]
fn full_disk_keeps_workloads_running_and_leaves_the_store_intact() {
    let mut c = Cluster::start("disk-full");
    let (keep_name, keep_pid, big) = change_on_full_disk(&mut c);

    // Space returns. The failed write left the store file intact: a
    // restarted agent opens it as it is (not quarantined), adopts the
    // workload and applies the change. (Without a restart, see
    // `change_made_on_a_full_disk_applies_once_space_returns`.)
    // Freed while the agent is down: a running one would retry the change
    // at once (and the restart would then read two instances).
    restart_reads_store_after(&mut c, 1, |c| c.tmpfs("edge-1").unfill().expect("unfill"));
    let late_pid = late_applied(&c, &big);
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid], "keep was restarted");

    // And once more, with both.
    restart_reads_store(&mut c, 2);
    c.apply(&sleeper("after").yaml());
    c.wait_running("after", 1);
    let late = c.wait_running("late", 1).remove(0);
    assert_eq!(instance_leaders(s(&late, "/metadata/name")), vec![late_pid], "late was restarted");
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid], "keep was restarted");
}

#[test]
fn change_made_on_a_full_disk_applies_once_space_returns() {
    let mut c = Cluster::start("disk-full-recover");
    let (keep_name, keep_pid, big) = change_on_full_disk(&mut c);
    c.tmpfs("edge-1").unfill().expect("unfill");
    late_applied(&c, &big);
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid]);
    c.assert_edge_running("edge-1");
}

/// Applies a small change on edge-1's full disk (it fits the store's spare
/// pages, so the instance starts while the disk is full and its state
/// record cannot be written yet) and waits until its process runs. Returns
/// `keep`'s name and pid, and `late`'s.
fn start_on_full_disk(c: &mut Cluster) -> (String, u32, String, u32) {
    let (keep_name, keep_pid) = fill_disk(c);
    c.apply(&sleeper("late").yaml());
    let late_name = eventually(WAIT, "late to be placed", || match c.instances_of("late")?.as_slice() {
        [i] => Ok(s(i, "/metadata/name").to_string()),
        other => Err(summary(other)),
    });
    let late_pid = eventually(WAIT, "late to start on the full disk", || match instance_leaders(&late_name)[..] {
        [p] => Ok(p),
        ref other => Err(format!("{other:?}\n{}", c.edge_log("edge-1"))),
    });
    (keep_name, keep_pid, late_name, late_pid)
}

#[test]
fn instance_started_on_a_full_disk_is_adopted_after_an_agent_restart() {
    let mut c = Cluster::start("disk-full-record");
    let (keep_name, keep_pid, late_name, late_pid) = start_on_full_disk(&mut c);
    c.tmpfs("edge-1").unfill().expect("unfill");
    let persisted = format!("state persisted again instance={late_name}");
    eventually(WAIT, "the runtime to write late's state record once space returned", || {
        let log = c.edge_log("edge-1");
        if log.contains(&persisted) {
            Ok(())
        } else {
            Err(log)
        }
    });

    // A restarted agent adopts it: one process, the same.
    restart_reads_store(&mut c, 2);
    c.apply(&sleeper("after").yaml());
    c.wait_running("after", 1);
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid], "keep was restarted");
    assert_eq!(instance_leaders(&late_name), vec![late_pid], "late runs twice, or was restarted");
    let late = c.wait_running("late", 1).remove(0);
    assert_eq!(u(&late, "/status/pid"), Some(u64::from(late_pid)));
}

#[test]
fn agent_restarted_on_a_full_disk_does_not_run_an_instance_twice() {
    let mut c = Cluster::start("disk-full-restart");
    let (keep_name, keep_pid, late_name, late_pid) = start_on_full_disk(&mut c);
    // The agent restarts before any space returns.
    c.kill_edge("edge-1");
    c.start_edge("edge-1");
    c.wait_node_ready("edge-1");
    thread::sleep(Duration::from_secs(3));
    c.tmpfs("edge-1").unfill().expect("unfill");
    c.apply(&sleeper("after").yaml());
    c.wait_running("after", 1);
    assert_eq!(instance_leaders(&keep_name), vec![keep_pid], "keep was restarted");
    assert_eq!(instance_leaders(&late_name), vec![late_pid], "late runs twice, or was restarted");
}

#[test]
fn status_observed_on_a_full_disk_reaches_the_cloud_when_space_returns() {
    let mut c = Cluster::start("disk-full-status");
    let (_, _, late_name, late_pid) = start_on_full_disk(&mut c);
    c.tmpfs("edge-1").unfill().expect("unfill");
    let late = c.wait_running("late", 1).remove(0);
    assert_eq!(s(&late, "/metadata/name"), late_name);
    assert_eq!(u(&late, "/status/pid"), Some(u64::from(late_pid)));
}

/// How the cloud stands when an edge rebuilds its store.
#[derive(Clone, Copy, PartialEq)]
enum Cloud {
    /// Restarted since the apps were deployed (a cloud that has ever
    /// restarted since the node's instances were placed: its views start
    /// at a revision above 0, so an empty edge gets a snapshot).
    Restarted,
    /// Running since the cluster was created.
    Fresh,
}

/// Damages `state.redb` while the agent is down and checks that the agent
/// quarantines it (unless `quarantine` is false: a file cut to nothing is
/// an empty store to redb), keeps running and rebuilds from the cloud, with
/// the workloads untouched.
fn damaged_store(test: &str, cloud: Cloud, quarantine: bool, damage: impl FnOnce(&Path)) {
    let mut c = Cluster::start(test);
    c.join("edge-1");
    for app in ["one", "two", "three"] {
        c.apply(&sleeper(app).yaml());
    }
    c.apply(&sleeper("keep").replicas(2).yaml());
    let before = c.wait_running("keep", 2);
    let others: Vec<serde_json::Value> =
        ["one", "two", "three"].iter().map(|a| c.wait_running(a, 1).remove(0)).collect();
    if cloud == Cloud::Restarted {
        c.kill_cloud();
        c.restart_cloud();
        c.wait_node_ready("edge-1");
    }
    let dir = c.edge("edge-1").dir.clone();
    let store = dir.join("state.redb");

    c.kill_edge("edge-1");
    damage(&store);
    c.start_edge("edge-1");
    let agent = c.edge_pid("edge-1");
    let aside = usize::from(quarantine);
    eventually(WAIT, "the agent to start on a new store", || {
        let log = c.edge_log_current("edge-1");
        let said = !quarantine || log.contains("the local store is corrupt");
        if said && quarantined(&dir).len() == aside && log.contains("agent starting from local state") {
            Ok(())
        } else {
            Err(format!("{:?}\n{log}", quarantined(&dir)))
        }
    });
    c.wait_node_ready("edge-1");
    // Same instances, same processes: re-adopted, not restarted.
    let after = eventually(WAIT, "the instances to be reported again", || {
        let items = c.instances_of("keep")?;
        let same = items.len() == 2
            && before.iter().zip(&items).all(|(x, y)| {
                s(x, "/metadata/name") == s(y, "/metadata/name")
                    && u(x, "/status/pid") == u(y, "/status/pid")
                    && u(x, "/status/restartCount") == u(y, "/status/restartCount")
            });
        if same {
            Ok(items)
        } else {
            Err(format!("before {} now {}", summary(&before), summary(&items)))
        }
    });
    for i in &others {
        let name = s(i, "/metadata/name");
        let pid = u(i, "/status/pid").expect("pid") as u32;
        assert_eq!(instance_leaders(name), vec![pid], "{name} was restarted");
    }
    let log = c.edge_log_current("edge-1");
    assert!(!log.contains("removed instance"), "the agent removed a workload it had re-adopted:\n{log}");
    // Rebuilt from the cloud: changes apply on top of it.
    c.apply(&sleeper("keep").replicas(3).yaml());
    let three = c.wait_running("keep", 3);
    for i in &after {
        let name = s(i, "/metadata/name");
        let now = three.iter().find(|j| s(j, "/metadata/name") == name).expect("kept");
        assert_eq!(u(now, "/status/pid"), u(i, "/status/pid"), "{name} restarted");
        assert_eq!(instance_leaders(name).len(), 1);
    }
    // No crash loop: the same agent process, still up.
    thread::sleep(Duration::from_secs(2));
    c.assert_edge_running("edge-1");
    assert_eq!(c.edge_pid("edge-1"), agent);
    // The rebuilt store opens cleanly next time.
    c.kill_edge("edge-1");
    c.start_edge("edge-1");
    eventually(WAIT, "the agent to start from the rebuilt store", || {
        let log = c.edge_log_current("edge-1");
        match log.lines().find(|l| l.contains("agent starting from local state")) {
            Some(l) if l.contains("instances=6") => Ok(()),
            Some(l) => Err(l.to_string()),
            None => Err(log),
        }
    });
    assert_eq!(quarantined(&dir).len(), aside, "quarantined again");
    c.wait_node_ready("edge-1");
    c.wait_running("keep", 3);
}

#[test]
fn garbage_store_is_quarantined_and_rebuilt_from_the_cloud() {
    damaged_store("disk-garbage", Cloud::Restarted, true, |store| {
        let len = fs::metadata(store).expect("state.redb").len() as usize;
        yunbian_faults::garbage_file(store, len).expect("garbage");
    });
}

/// A store file cut to nothing is a new, empty store to redb: nothing to
/// quarantine, and the agent rebuilds from the cloud all the same.
#[test]
fn emptied_store_is_rebuilt_from_the_cloud() {
    damaged_store("disk-emptied", Cloud::Restarted, false, |store| {
        yunbian_faults::truncate_file(store, 0).expect("truncate");
    });
}

#[test]
fn truncated_store_is_quarantined_and_rebuilt_from_the_cloud() {
    damaged_store("disk-truncated", Cloud::Restarted, true, |store| {
        let len = fs::metadata(store).expect("state.redb").len();
        yunbian_faults::truncate_file(store, len / 3).expect("truncate");
    });
}

#[test]
fn store_rebuilt_against_a_cloud_that_never_restarted_keeps_workloads() {
    damaged_store("disk-garbage-fresh", Cloud::Fresh, true, |store| {
        let len = fs::metadata(store).expect("state.redb").len() as usize;
        yunbian_faults::garbage_file(store, len).expect("garbage");
    });
}
