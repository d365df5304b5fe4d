//! Memory limits are enforced on the node and an OOM kill is reported.

mod harness;

use std::process::Command;

use harness::{eventually, s, summary, u, App, Cluster, WAIT};

/// The real python3 binary (not a pyenv shim script), if there is one.
fn python3() -> Option<String> {
    let o = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    let p = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (o.status.success() && !p.is_empty()).then_some(p)
}

#[test]
fn memory_hog_is_oom_killed() {
    let mut c = Cluster::start("limits");
    let node = c.join("edge-1");
    let note = s(&node, "/status/limitsNote").to_string();
    assert!(!note.is_empty(), "the node explains its limits support: {node}");
    // CI runs on the same kind of machine: limits must be enforced here.
    assert_eq!(
        node.pointer("/status/limitsEnforced").and_then(|v| v.as_bool()),
        Some(true),
        "resource limits are not enforced on this node: {note}"
    );

    let argv: Vec<String> = match python3() {
        Some(py) => vec![py, "-c".into(), "b = bytearray(200 * 1024 * 1024); import time; time.sleep(30)".into()],
        None => vec![
            "awk".into(),
            "BEGIN { s = \"0123456789abcdef\"; while (length(s) < 400000000) s = s s; print length(s) }".into(),
        ],
    };
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    c.apply(&App::new("hog").command(&argv).restart_policy("Never").memory_limit("16Mi").replicas(1).yaml());

    let inst = eventually(WAIT, "the hog to be OOM-killed", || {
        let items = c.instances_of("hog")?;
        match items.first() {
            Some(i) if items.len() == 1 && s(i, "/status/phase") == "Failed" => Ok(i.clone()),
            _ => Err(summary(&items)),
        }
    });
    assert_eq!(s(&inst, "/status/reason"), "OOMKilled", "{inst}");
    assert!(s(&inst, "/status/message").contains("16Mi"), "{inst}");
    // restartPolicy Never: it stays failed.
    assert_eq!(u(&inst, "/status/restartCount"), Some(0), "{inst}");
    let o = c.cli(&["get", "instances"]);
    assert!(o.ok().contains("OOMKilled"), "{o:?}");

    let cgroup = format!("/sys/fs/cgroup/memory/yunbian/{}", s(&inst, "/metadata/name"));
    c.delete_app("hog");
    if note.starts_with("cgroup v1") {
        eventually(WAIT, "the instance's memory cgroup to be removed", || {
            if std::path::Path::new(&cgroup).exists() {
                Err(format!("{cgroup} still exists"))
            } else {
                Ok(())
            }
        });
    }
}

/// `(module (func (export "_start") (loop $l (br $l))))`: a WASI command
/// that never ends and never calls the host.
const ENDLESS_LOOP_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
    0x03, 0x02, 0x01, 0x00, // function 0 has type 0
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export "_start"
    0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
];

#[test]
fn an_endless_wasm_loop_is_stopped_and_the_reason_reported() {
    let mut c = Cluster::start("wasm-cpu");
    c.join("edge-1");
    let module = c.dir.join("spin.wasm");
    std::fs::write(&module, ENDLESS_LOOP_WASM).expect("write the module");
    c.cli(&["artifact", "push", &module.display().to_string(), "--name", "spin", "--version", "1"]).ok();
    c.apply(
        "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {name: spin}\nspec:\n  runtime: wasm\n  \
         artifact: {name: spin, version: \"1\"}\n  restartPolicy: Never\n  \
         resources: {limits: {cpu: 200m}}\n  wasm: {cpuStopAfter: 3s}\n",
    );
    let inst = eventually(WAIT, "the loop to be stopped", || {
        let items = c.instances_of("spin")?;
        match items.first() {
            Some(i) if items.len() == 1 && s(i, "/status/phase") == "Failed" => Ok(i.clone()),
            _ => Err(summary(&items)),
        }
    });
    assert_eq!(s(&inst, "/status/reason"), "CPULimitExceeded", "{inst}");
    let message = s(&inst, "/status/message");
    assert!(message.contains("whole CPU share (200m) without a break"), "{inst}");
    assert!(message.contains("exited with code 134"), "{inst}");
    assert_eq!(u(&inst, "/status/restartCount"), Some(0), "{inst}");
}
