//! Apps that run artifacts, end to end through the `yunbian` binary with a
//! real cloud and agent: an executable artifact runs with its arguments; a
//! bundle pulled over a slow link reports `Pulling N %`, survives a cut of
//! the link mid-pull, and runs from its unpacked directory; an agent
//! restart leaves the adopted instances Running; a trust policy on a NodeGroup
//! refuses unsigned artifacts (and stops one already running), and the
//! instance runs once the publisher signs it. An OCI image and a wasm
//! module run through their shims, and both survive a SIGKILL of the agent
//! and its restart: same processes, no restart, and the wasm service keeps
//! answering (its request count goes on) while the agent is down.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{eventually, s, Cluster, EdgeSetup};
use yunbian_faults::LinkConditions;

const WAIT: Duration = Duration::from_secs(90);

fn sh(script: &str, dir: &Path) {
    let st = Command::new("sh").arg("-c").arg(script).current_dir(dir).status().expect("sh");
    assert!(st.success(), "{script}");
}

fn artifact_app(name: &str, artifact: &str, version: &str, process: &str) -> String {
    format!(
        "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  artifact: {{name: {artifact}, version: \"{version}\"}}\n  process: {process}\n"
    )
}

/// Waits until the app's instance's status satisfies `f`; returns it.
#[track_caller]
fn wait_instance(c: &Cluster, app: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    eventually(WAIT, what, || {
        let items = c.instances_of(app)?;
        match items.first() {
            Some(i) if f(i) => Ok(i.clone()),
            other => Err(format!("{other:?}")),
        }
    })
}

fn logs_contain(c: &Cluster, app: &str, want: &str) {
    eventually(WAIT, &format!("{app} logs {want:?}"), || {
        let o = c.cli(&["logs", &format!("app/{app}"), "--tail", "20"]);
        if o.stdout.contains(want) {
            Ok(())
        } else {
            Err(format!("{o:?}"))
        }
    });
}

#[test]
fn apps_run_pulled_artifacts_under_the_trust_policy() {
    let mut c = Cluster::start("artifact-apps");
    c.join_with("e1", EdgeSetup::new().via_link());
    let work = c.dir.join("work");
    std::fs::create_dir_all(work.join("bundle/bin")).expect("mkdir");
    let p = |f: &str| work.join(f).display().to_string();

    // An "executable" artifact (a script is enough for exec).
    std::fs::write(work.join("tool"), "#!/bin/sh\necho \"tool says $1 on $NODE_NAME\"\nexec sleep 3600\n")
        .expect("write");
    let arch = if cfg!(target_arch = "aarch64") { "linux/arm64" } else { "linux/amd64" };
    c.cli(&[
        "artifact",
        "push",
        &p("tool"),
        "--name",
        "tool",
        "--version",
        "1.0",
        "--type",
        "executable",
        "--platform",
        arch,
    ])
    .ok();
    c.apply(&artifact_app("exe", "tool", "1.0", "{args: [hello]}"));
    let i = wait_instance(&c, "exe", "exe Running", |i| s(i, "/status/phase") == "Running");
    assert_eq!(s(&i, "/spec/node"), "e1");
    let exe_pid = harness::u(&i, "/status/pid").expect("pid") as u32;
    logs_contain(&c, "exe", "tool says hello on e1");

    // A 12 MiB bundle over a 16 Mbit/s link: the instance says how far the
    // pull is, then runs the bundle's program from the bundle's directory.
    std::fs::write(
        work.join("bundle/bin/run.sh"),
        "#!/bin/sh\necho \"bundle says $GREETING from $(pwd) bundle=$YUNBIAN_BUNDLE_DIR\"\nexec sleep 3600\n",
    )
    .expect("write");
    let noise = harness::noise(12 << 20, 0x2545_f491_4f6c_dd1d);
    std::fs::write(work.join("bundle/data.bin"), noise).expect("write");
    sh("chmod +x bundle/bin/run.sh && tar czf app.tar.gz -C bundle bin data.bin", &work);
    c.cli(&["artifact", "push", &p("app.tar.gz"), "--name", "site-app", "--version", "2.0"]).ok();
    c.link("e1").set_conditions(LinkConditions {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        bandwidth_bps: Some(16_000_000),
        loss: 0.0,
    });
    c.apply(&artifact_app("bundled", "site-app", "2.0", "{command: [bin/run.sh], env: {GREETING: hi}}"));
    let pulling = wait_instance(&c, "bundled", "a Pulling status with a percentage", |i| {
        let m = s(i, "/status/message");
        s(i, "/status/reason") == "Pulling" && m.contains(" % of site-app 2.0") && !m.starts_with("Pulling 0 %")
    });
    assert_eq!(s(&pulling, "/status/phase"), "Pending", "{pulling}");
    // The link is cut mid-pull (a blackhole, then every connection reset):
    // the pull fails over to retries and finishes from the chunks it has
    // once the link is back.
    c.link("e1").cut();
    std::thread::sleep(Duration::from_secs(3));
    c.link("e1").reset();
    c.link("e1").heal().expect("heal the link");
    c.link("e1").set_conditions(LinkConditions::PERFECT);
    wait_instance(&c, "bundled", "bundled Running", |i| s(i, "/status/phase") == "Running");
    logs_contain(&c, "bundled", "bundle says hi from ");
    let o = c.cli(&["logs", "app/bundled", "--tail", "5"]);
    let line = o.stdout.lines().find(|l| l.contains("bundle says")).expect("line").to_string();
    let (cwd, bundle) = line.split_once(" bundle=").expect("two paths");
    assert!(cwd.ends_with(bundle) && bundle.contains("/artifacts/unpacked/"), "{line}");

    // An agent restart: the adopted instances stay Running in the cloud
    // (their blobs are resolved again, and that is no reason to report them
    // as waiting for a pull).
    c.kill_edge("e1");
    c.start_edge("e1");
    c.wait_node_ready("e1");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        for app in ["exe", "bundled"] {
            let i = c.instances_of(app).expect("instances").into_iter().next().expect("one");
            assert_eq!(s(&i, "/status/phase"), "Running", "{app} after the agent restart: {i}");
        }
    }

    // A trust policy: every node requires a signature by the release key.
    let key = work.join("release.key");
    let out = c.cli(&["artifact", "keygen", "--out", &key.display().to_string()]);
    let public = out.ok().lines().find_map(|l| l.strip_prefix("public key: ")).map(str::trim).map(String::from);
    let public = public.unwrap_or_else(|| panic!("public key line in {out:?}"));
    c.apply(&format!(
        "apiVersion: yunbian.io/v1\nkind: NodeGroup\nmetadata: {{name: everyone}}\nspec:\n  selector: {{}}\n  trust:\n    requireSignature: true\n    keys: [{{name: release, publicKey: \"{public}\"}}]\n"
    ));
    // The running unsigned instances are stopped, and say why.
    let refused = wait_instance(&c, "exe", "exe refused", |i| s(i, "/status/reason") == "SignatureRequired");
    assert_eq!(s(&refused, "/status/phase"), "Failed", "{refused}");
    assert!(s(&refused, "/status/message").contains("tool 1.0"), "{refused}");
    eventually(WAIT, "the unsigned tool stopped", || {
        if harness::pid_alive(exe_pid) {
            Err(format!("pid {exe_pid} still alive"))
        } else {
            Ok(())
        }
    });
    // Signed by an untrusted key: refused with that reason.
    let rogue = work.join("rogue.key");
    c.cli(&["artifact", "keygen", "--out", &rogue.display().to_string()]).ok();
    c.cli(&["artifact", "sign", "tool", "--version", "1.0", "--key", &rogue.display().to_string()]).ok();
    wait_instance(&c, "exe", "exe untrusted", |i| s(i, "/status/reason") == "UntrustedSigner");
    // Signed by the release key: runs again.
    c.cli(&["artifact", "sign", "tool", "--version", "1.0", "--key", &key.display().to_string()]).ok();
    wait_instance(&c, "exe", "exe Running when signed", |i| s(i, "/status/phase") == "Running");
    logs_contain(&c, "exe", "tool says hello on e1");
}

fn http_get(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn oci_images_and_wasm_modules_run_through_their_shims() {
    let mut c = Cluster::start("artifact-shims");
    let node = c.join("e1");
    let runtimes = node.pointer("/status/info/runtimes").map(|r| r.to_string()).unwrap_or_default();
    assert!(runtimes.contains("oci") && runtimes.contains("wasm"), "the node offers both: {runtimes}");
    let work = c.dir.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");

    // An OCI image built from Debian's busybox-static, pushed as a layout.
    let layout = work.join("layout");
    yunbian_runtime::oci::testing::build_busybox_layout(
        &layout,
        &["sh", "-c", "echo \"container says $GREETING from $NODE_NAME in $(cat /etc/hostname)\"; echo kept > /data/out; exec sleep 3600"],
    )
    .expect("build the image");
    let tarball = work.join("bb.tar.gz");
    yunbian_runtime::oci::testing::write_layout_tarball(&layout, &tarball).expect("tarball");
    let out =
        c.cli(&["artifact", "push", &tarball.display().to_string(), "--name", "bb", "--version", "1", "--type", "oci"]);
    assert!(out.ok().contains(": oci "), "{out:?}");
    c.apply(
        "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {name: box}\nspec:\n  runtime: oci\n  artifact: {name: bb, version: \"1\"}\n  process: {env: {GREETING: hi}}\n  resources: {limits: {memory: 64Mi}}\n",
    );
    wait_instance(&c, "box", "box Running", |i| s(i, "/status/phase") == "Running");
    logs_contain(&c, "box", "container says hi from e1");

    // The sample wasm app: an HTTP service counting requests.
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/apps/wasm-hello/wasm-hello.wasm");
    let out = c.cli(&["artifact", "push", &module.display().to_string(), "--name", "hello-wasm", "--version", "1"]);
    assert!(out.ok().contains("wasm"), "{out:?}");
    let port = harness::free_port();
    c.apply(&format!(
        "apiVersion: yunbian.io/v1\nkind: App\nmetadata: {{name: hello}}\nspec:\n  runtime: wasm\n  artifact: {{name: hello-wasm, version: \"1\"}}\n  process: {{env: {{PORT: \"{port}\", HOST: 127.0.0.1}}}}\n  resources: {{limits: {{memory: 64Mi, cpu: 500m}}}}\n"
    ));
    wait_instance(&c, "hello", "hello Running", |i| s(i, "/status/phase") == "Running");
    let first = eventually(WAIT, "the wasm service answers", || http_get(port));
    assert!(first.contains("\"node\":\"e1\"") && first.contains("\"requests\":1"), "{first}");
    let second = http_get(port).expect("second request");
    assert!(second.contains("\"requests\":2"), "{second}");
    logs_contain(&c, "hello", "wasm-hello: node e1");
    let info = c.node("e1").expect("node e1");
    assert!(info.pointer("/status/info/unavailableRuntimes").is_none(), "nothing is unavailable here: {info}");

    // The agent is SIGKILLed: the shims (and the container they run) are
    // workloads of their own and keep running without it.
    let before: Vec<Shim> = ["box", "hello"].into_iter().map(|app| Shim::of(&c, app)).collect();
    let (boxed, hello) = (&before[0], &before[1]);
    assert!(boxed.processes.len() >= 2, "the oci shim and its container: {boxed:?}");
    c.kill_edge("e1");
    std::thread::sleep(Duration::from_secs(2));
    for shim in &before {
        shim.assert_alive("with the agent down");
    }
    let third = http_get(port).expect("a request with the agent down");
    assert!(third.contains("\"requests\":3"), "the wasm service answers on, counting: {third}");

    // The agent starts again and adopts both: same pids, Running, no
    // restart, and the service's count goes on from where it was.
    c.start_edge("e1");
    c.wait_node_ready("e1");
    eventually(WAIT, "the restarted agent re-adopted both shims", || {
        let log = c.edge_log_current("e1");
        match log.lines().find(|l| l.contains("runtime re-adopted instances")) {
            Some(l) if l.contains("count=2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        for shim in &before {
            shim.assert_same(&c);
        }
    }
    let fourth = http_get(port).expect("a request after the agent restart");
    assert!(fourth.contains("\"requests\":4"), "the count was not reset: {fourth}");
    let o = c.cli(&["logs", "app/hello", "--tail", "50"]);
    assert_eq!(o.ok().matches("wasm-hello: node e1, listening").count(), 1, "the module started once: {o:?}");
    logs_contain(&c, "box", "container says hi from e1");
    assert_eq!(hello.processes, vec![hello.pid], "the wasm shim is the instance's only process");
}

/// One shim instance as the cloud reports it, and its processes on the node.
#[derive(Debug)]
struct Shim {
    app: String,
    instance: String,
    /// The shim's pid (`status.pid`).
    pid: u32,
    restarts: u64,
    /// Every live process of the instance: the shim, and for oci the
    /// container's processes.
    processes: Vec<u32>,
}

impl Shim {
    fn of(c: &Cluster, app: &str) -> Shim {
        let i = wait_instance(c, app, &format!("{app} Running"), |i| s(i, "/status/phase") == "Running");
        let instance = s(&i, "/metadata/name").to_string();
        let pid = harness::u(&i, "/status/pid").unwrap_or_else(|| panic!("{app} has a pid: {i}")) as u32;
        let processes = harness::instance_processes(&instance);
        assert!(processes.contains(&pid), "{app}: the shim {pid} is among {processes:?}");
        Shim {
            app: app.into(),
            instance,
            pid,
            restarts: harness::u(&i, "/status/restartCount").unwrap_or(0),
            processes,
        }
    }

    #[track_caller]
    fn assert_alive(&self, when: &str) {
        let dead: Vec<u32> = self.processes.iter().copied().filter(|p| !harness::pid_alive(*p)).collect();
        assert!(dead.is_empty(), "{} {when}: processes {dead:?} of {:?} died", self.app, self.processes);
    }

    /// Same instance, pid and restart count in the cloud, Running, and the
    /// same processes on the node.
    #[track_caller]
    fn assert_same(&self, c: &Cluster) {
        let i = c.instances_of(&self.app).expect("instances").into_iter().next().expect("one instance");
        assert_eq!(s(&i, "/metadata/name"), self.instance, "{i}");
        assert_eq!(s(&i, "/status/phase"), "Running", "{} after the agent restart: {i}", self.app);
        assert_eq!(harness::u(&i, "/status/pid"), Some(self.pid as u64), "{i}");
        assert_eq!(harness::u(&i, "/status/restartCount").unwrap_or(0), self.restarts, "{i}");
        self.assert_alive("after the agent restart");
        assert_eq!(
            harness::instance_processes(&self.instance),
            self.processes,
            "{}: no process came or went",
            self.app
        );
    }
}
