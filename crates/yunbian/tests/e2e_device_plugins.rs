//! Device plugins end to end: the real `yunbian plugin fake` registers GPUs
//! at a real agent's socket; the node reports them and their extended
//! resource; an App asking for `yunbian.io/gpu` gets its devices in its
//! environment and status, waits while none is free, and keeps its
//! devices across an agent restart; health changes reach the node. `yunbian plugin nvidia` without `nvidia-smi` registers
//! nothing and says so once.

mod harness;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use harness::{eventually, proc_env, s, u, Cluster, Guard, BIN, WAIT};
use serde_json::Value;

const GPU: &str = "yunbian.io/gpu";

/// An App running a shell loop on one node, asking for `gpus` GPUs.
fn gpu_app(name: &str, gpus: u64) -> String {
    let app = serde_json::json!({
        "apiVersion": "yunbian.io/v1",
        "kind": "App",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "runtime": "process",
            "process": {"command": ["/bin/sh", "-c", "while true; do sleep 1; done"]},
            "placement": {"requirements": {"resources": {GPU: gpus}}},
        },
    });
    serde_json::to_string_pretty(&app).expect("manifest")
}

/// Starts `yunbian plugin ARGS`, logging to `log`.
fn plugin(args: &[&str], log: &Path) -> Guard {
    let file = fs::File::create(log).expect("plugin log");
    let err = file.try_clone().expect("plugin log");
    let child = Command::new(BIN)
        .arg("plugin")
        .args(args)
        .env("NO_COLOR", "1")
        .env("YUNBIAN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn the plugin");
    Guard(child)
}

/// `(id, healthy, allocatedTo)` of the node's devices and its extended
/// allocatable of `yunbian.io/gpu`.
fn node_devices(node: &Value) -> (Vec<(String, bool, String)>, Option<u64>) {
    let devices = node
        .pointer("/status/info/devices")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        s(d, "/id").to_string(),
                        d.get("healthy").and_then(Value::as_bool).unwrap_or(false),
                        s(d, "/allocatedTo").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let extended = node.pointer("/status/allocatable/extended").and_then(|e| e.get(GPU)).and_then(Value::as_u64);
    (devices, extended)
}

#[test]
fn fake_gpus_reach_the_node_and_apps_get_them() {
    let mut c = Cluster::builder("device-plugins").start();
    c.join("n1");
    let socket = c.edge("n1").dir.join("device-plugins.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let health = c.dir.join("unhealthy");

    // Without nvidia-smi the NVIDIA plugin registers nothing, and says so once.
    let nvidia_log = c.dir.join("nvidia.log");
    let mut nvidia = plugin(
        &["nvidia", "--socket", socket, "--interval", "200ms", "--nvidia-smi", "/nonexistent/nvidia-smi"],
        &nvidia_log,
    );

    let fake_log = c.dir.join("fake.log");
    let health_arg = health.to_str().expect("utf-8 path");
    let _fake = plugin(
        &["fake", "--socket", socket, "--count", "2", "--interval", "1s", "--unhealthy-file", health_arg],
        &fake_log,
    );

    let node = eventually(WAIT, "the node to report two healthy GPUs", || {
        let n = c.node("n1").ok_or("no node")?;
        match node_devices(&n) {
            (d, Some(2)) if d.len() == 2 && d.iter().all(|(_, h, _)| *h) => Ok(n),
            other => Err(format!("{other:?}; plugin log: {}", fs::read_to_string(&fake_log).unwrap_or_default())),
        }
    });
    let first = &node["status"]["info"]["devices"][0];
    assert_eq!((s(first, "/resource"), s(first, "/model")), (GPU, "Yunbian Fake Accelerator"), "{node}");
    assert_eq!(u(first, "/memoryBytes"), Some(1 << 30));

    // A device turns unhealthy and back: the node reports it, with one GPU
    // less to place meanwhile.
    fs::write(&health, "1").expect("write the health file");
    eventually(WAIT, "the node to report GPU 0 unhealthy", || {
        let n = c.node("n1").ok_or("no node")?;
        match node_devices(&n) {
            (d, Some(1)) if d.first().is_some_and(|(id, h, _)| id == "0" && !h) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    fs::write(&health, "0").expect("write the health file");
    eventually(WAIT, "the node to report both GPUs healthy again", || {
        let n = c.node("n1").ok_or("no node")?;
        match node_devices(&n) {
            (d, Some(2)) if d.iter().all(|(_, h, _)| *h) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // An App asking for one GPU gets the lowest id, in its environment and status.
    c.apply(&gpu_app("infer-a", 1));
    let a = c.wait_running("infer-a", 1).remove(0);
    let a_name = s(&a, "/metadata/name").to_string();
    let pid = u(&a, "/status/pid").expect("pid") as u32;
    assert_eq!(proc_env(pid, "YUNBIAN_DEVICES_YUNBIAN_IO_GPU").as_deref(), Some("0"));
    assert_eq!(proc_env(pid, "FAKE_VISIBLE_DEVICES").as_deref(), Some("0"));
    assert_eq!(a["status"]["devices"], serde_json::json!({GPU: ["0"]}), "{a}");
    eventually(WAIT, "the node to show the GPU allocated", || {
        let n = c.node("n1").ok_or("no node")?;
        let (d, _) = node_devices(&n);
        if d.first().is_some_and(|(id, _, to)| id == "0" && *to == a_name) {
            Ok(())
        } else {
            Err(format!("{d:?}"))
        }
    });

    // An App asking for two waits while only one is free: either the
    // scheduler holds it back or the node does (InsufficientDevices).
    c.apply(&gpu_app("infer-b", 2));
    eventually(WAIT, "infer-b to be held back for want of GPUs", || {
        let items = c.instances_of("infer-b")?;
        let on_node = items.iter().any(|i| s(i, "/status/reason") == "InsufficientDevices");
        let app = c.app("infer-b").ok_or("no app")?;
        let unplaced = items.iter().all(|i| s(i, "/spec/node").is_empty()) && app["status"].to_string().contains(GPU);
        if on_node || unplaced {
            Ok(())
        } else {
            Err(format!("instances {}; app status {}", harness::summary(&items), app["status"]))
        }
    });

    // Once infer-a is gone its GPU is free, and infer-b gets both.
    c.delete_app("infer-a");
    let b = c.wait_running("infer-b", 1).remove(0);
    let pid = u(&b, "/status/pid").expect("pid") as u32;
    assert_eq!(proc_env(pid, "YUNBIAN_DEVICES_YUNBIAN_IO_GPU").as_deref(), Some("0,1"));
    assert_eq!(b["status"]["devices"], serde_json::json!({GPU: ["0", "1"]}), "{b}");

    // The agent restarts: the workload is re-adopted with its grant, read
    // back from the agent's state file, and the node still names it.
    let b_name = s(&b, "/metadata/name").to_string();
    c.kill_edge("n1");
    c.start_edge("n1");
    eventually(WAIT, "the restarted agent to report infer-b's GPUs", || {
        if !c.edge_log_current("n1").contains("device-plugin state restored") {
            return Err("the restarted agent has not restored its device-plugin state yet".into());
        }
        let n = c.node("n1").ok_or("no node")?;
        let (d, _) = node_devices(&n);
        if s(&n, "/status/phase") == "Ready" && d.len() == 2 && d.iter().all(|(_, _, to)| *to == b_name) {
            Ok(())
        } else {
            Err(format!("{} {d:?}", s(&n, "/status/phase")))
        }
    });
    let after = c.wait_running("infer-b", 1).remove(0);
    assert_eq!(u(&after, "/status/pid"), Some(u64::from(pid)), "re-adopted, not restarted: {after}");
    assert_eq!(after["status"]["devices"], serde_json::json!({GPU: ["0", "1"]}), "{after}");

    let _ = nvidia.0.kill();
    let _ = nvidia.0.wait();
    let log = fs::read_to_string(&nvidia_log).unwrap_or_default();
    assert_eq!(log.matches("registering nothing").count(), 1, "{log}");
    assert!(log.contains("/nonexistent/nvidia-smi is not installed"), "{log}");
}
