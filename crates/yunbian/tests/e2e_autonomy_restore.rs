//! The cloud is restored from an older backup of its data directory: its
//! revisions go backwards. Connected edges resync from a snapshot marked as
//! a reset: what the backup does not know is removed at the edge, what it
//! knows comes back, and what did not change keeps running untouched.

mod harness;

use std::fs;
use std::path::Path;

use harness::{instance_leaders, pid_alive, s, summary, u, App, Cluster};

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for e in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.expect("dir entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
        }
    }
}

fn sleeper(name: &str) -> App {
    App::new(name).command(&["/bin/sleep", "1000000"])
}

#[test]
fn cloud_restored_from_an_older_backup_resyncs_its_edges() {
    let mut c = Cluster::start("restore");
    c.join("edge-1");
    let agent = c.edge_pid("edge-1");
    c.apply(&sleeper("a").replicas(2).yaml());
    c.apply(&sleeper("c").yaml());
    let a0 = c.wait_running("a", 2);
    let c0 = c.wait_running("c", 1).remove(0);
    let c0_pid = u(&c0, "/status/pid").expect("pid") as u32;

    // The backup: the data directory of a stopped cloud.
    c.kill_cloud();
    let backup = c.dir.join("cloud-backup");
    copy_dir(&c.cloud_dir, &backup);
    c.restart_cloud();
    c.wait_node_ready("edge-1");

    // Life goes on after the backup.
    c.apply(&sleeper("b").replicas(2).yaml());
    let b = c.wait_running("b", 2);
    c.delete_app("c");
    assert!(!pid_alive(c0_pid));

    // Disaster, and the restore.
    c.kill_cloud();
    fs::remove_dir_all(&c.cloud_dir).expect("remove the cloud's data directory");
    copy_dir(&backup, &c.cloud_dir);
    c.restart_cloud();
    c.wait_node_ready("edge-1");

    // b is unknown to the restored cloud: its processes stop at the edge.
    assert!(c.app("b").is_none(), "the restored cloud knows b");
    c.wait_pids_dead("b's processes to stop at the edge", &harness::pids(&b));
    for i in &b {
        assert!(instance_leaders(s(i, "/metadata/name")).is_empty(), "{} still runs", s(i, "/metadata/name"));
    }
    // c is back, under its old instance name, in a new process.
    let c1 = c.wait_running("c", 1).remove(0);
    assert_eq!(s(&c1, "/metadata/name"), s(&c0, "/metadata/name"));
    assert_ne!(u(&c1, "/status/pid"), Some(u64::from(c0_pid)));
    // a did not change: same instances, same processes.
    let a1 = c.wait_running("a", 2);
    for (x, y) in a0.iter().zip(&a1) {
        assert_eq!(s(x, "/metadata/name"), s(y, "/metadata/name"), "{}", summary(&a1));
        assert_eq!(u(x, "/status/pid"), u(y, "/status/pid"), "a was restarted: {}", summary(&a1));
        assert_eq!(instance_leaders(s(x, "/metadata/name")), vec![u(x, "/status/pid").expect("pid") as u32]);
    }

    // New work flows; the agent survived all of it.
    c.apply(&sleeper("d").yaml());
    c.wait_running("d", 1);
    c.assert_edge_running("edge-1");
    assert_eq!(c.edge_pid("edge-1"), agent);
    let log = c.edge_log("edge-1");
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    let b_now = c.instances_of("b").expect("instances");
    assert!(b_now.is_empty(), "the restored cloud has b instances: {}", summary(&b_now));
}
