//! Deploying, scaling and deleting an app on two real nodes; CLI errors.

mod harness;

use std::collections::BTreeSet;

use harness::{eventually, names, pid_alive, pids, proc_env, s, u, yunbian, App, Cluster, WAIT};

const LOOP: &str = "while true; do echo \"hello from $NODE_NAME app=$APP_NAME inst=$INSTANCE_NAME\"; sleep 0.5; done";

#[test]
fn deploy_scale_and_delete() {
    let mut c = Cluster::start("deploy");
    c.join("edge-1");
    c.join("edge-2");
    let app = App::new("echo").shell(LOOP);

    c.apply(&app.clone().replicas(2).yaml());
    let two = c.wait_running("echo", 2);
    for i in &two {
        let node = s(i, "/spec/node");
        assert!(node == "edge-1" || node == "edge-2", "{i}");
        let pid = u(i, "/status/pid").expect("pid") as u32;
        // The workload really is a process with the documented environment.
        assert_eq!(proc_env(pid, "NODE_NAME").as_deref(), Some(node), "pid {pid}");
        assert_eq!(proc_env(pid, "APP_NAME").as_deref(), Some("echo"), "pid {pid}");
        assert_eq!(proc_env(pid, "INSTANCE_NAME").as_deref(), Some(s(i, "/metadata/name")), "pid {pid}");
        assert_eq!(u(i, "/status/restartCount"), Some(0), "{i}");
    }
    // The scheduler spreads an app's instances across nodes.
    let spread: BTreeSet<&str> = two.iter().map(|i| s(i, "/spec/node")).collect();
    assert_eq!(spread.len(), 2, "both nodes get one: {}", harness::summary(&two));
    // The App controller writes its status a moment after the instances'.
    eventually(WAIT, "readyReplicas 2", || {
        let a = c.app("echo").ok_or("no app")?;
        (u(&a, "/status/readyReplicas") == Some(2)).then_some(()).ok_or_else(|| format!("{a}"))
    });

    // Logs of the app carry each instance's own output, with its node name.
    eventually(WAIT, "app logs from both instances", || {
        let o = c.cli(&["logs", "app/echo", "--tail", "5"]);
        if !o.success() {
            return Err(format!("{o:?}"));
        }
        for i in &two {
            let name = s(i, "/metadata/name");
            let want = format!("[{name}] hello from {} app=echo inst={name}", s(i, "/spec/node"));
            if !o.stdout.lines().any(|l| l == want) {
                return Err(format!("no line {want:?} in {:?}", o.stdout));
            }
        }
        Ok(())
    });

    // Scale up: the two keep running untouched, one more appears.
    c.apply(&app.clone().replicas(3).yaml());
    let three = c.wait_running("echo", 3);
    for old in &two {
        let same = three.iter().find(|i| s(i, "/metadata/name") == s(old, "/metadata/name"));
        let same = same.unwrap_or_else(|| panic!("{} was replaced on scale-up: {three:?}", old["metadata"]["name"]));
        assert_eq!(u(same, "/status/pid"), u(old, "/status/pid"), "pid changed on scale-up");
    }

    // Scale to zero: every instance and process goes away.
    c.apply(&app.clone().replicas(0).yaml());
    eventually(WAIT, "no instances of echo", || {
        let items = c.instances_of("echo")?;
        if items.is_empty() {
            Ok(())
        } else {
            Err(harness::summary(&items))
        }
    });
    c.wait_pids_dead("the workloads scaled away", &pids(&three));
    let app_obj = c.app("echo").expect("app exists");
    assert_eq!(u(&app_obj, "/spec/replicas"), Some(0), "{app_obj}");

    // Back to two, then delete the app.
    c.apply(&app.clone().replicas(2).yaml());
    let again = c.wait_running("echo", 2);
    let old: BTreeSet<String> = names(&three).into_iter().collect();
    assert!(names(&again).iter().all(|n| !old.contains(n)), "new instances expected: {again:?}");
    let last = pids(&again);
    c.delete_app("echo");
    for p in last {
        assert!(!pid_alive(p), "pid {p} survived the delete");
    }
    assert!(c.app("echo").is_none(), "app still exists");
}

#[test]
fn cli_errors() {
    let mut c = Cluster::start("deploy-errors");

    let bad = App::new("bad").replicas(-1).yaml();
    let o = c.try_apply(&bad);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("spec.replicas: must be >= 0"), "{o:?}");
    assert_eq!(o.error_lines().len(), 1, "{o:?}");
    assert!(c.app("bad").is_none(), "an invalid app was created");

    let o = c.cli(&["get", "app", "nosuch"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("app nosuch not found"), "{o:?}");

    // Optimistic concurrency: an update based on a stale resourceVersion is
    // refused with 409 and changes nothing.
    let zero = App::new("occ").replicas(0).yaml();
    c.apply(&zero);
    let rv = c.app("occ").and_then(|a| a.pointer("/metadata/resourceVersion").and_then(|v| v.as_u64())).expect("rv");
    c.apply(&App::new("occ").replicas(0).shell("exit 0").yaml()); // moves the object past `rv`
    let mut stale: serde_json::Value = serde_yaml::from_str(&zero).expect("yaml");
    stale["metadata"]["resourceVersion"] = serde_json::json!(rv);
    stale["spec"]["replicas"] = serde_json::json!(0);
    stale["metadata"]["labels"] = serde_json::json!({"stale": "yes"});
    let o = c.try_apply(&serde_json::to_string(&stale).expect("json"));
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("was modified"), "{o:?}");
    let labels = c.app("occ").and_then(|a| a.pointer("/metadata/labels/stale").cloned());
    assert!(labels.is_none(), "a stale write was applied");

    // A config pointing at a port nothing listens on.
    let port = harness::free_port();
    let text = std::fs::read_to_string(&c.admin).expect("admin.yaml");
    let dead = text.replace(&c.url, &format!("https://127.0.0.1:{port}"));
    assert_ne!(dead, text);
    let cfg = c.write_file("dead.yaml", &dead);
    let cfg = cfg.to_string_lossy().into_owned();
    let o = yunbian(&["--config", &cfg, "get", "nodes"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("cannot reach cloud at"), "{o:?}");
    assert_eq!(o.error_lines().len(), 1, "{o:?}");
}
