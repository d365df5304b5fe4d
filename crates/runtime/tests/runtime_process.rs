//! End-to-end tests of the process runtime with real processes (`/bin/sh`).
//!
//! Every test uses its own directory under the system temp dir and instance
//! names suffixed with the test process id (cgroup names are global). Timing
//! is never asserted: conditions are polled until they hold or 20 s pass.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use yunbian_api::{
    AppInstance, AppInstanceSpec, AppInstanceStatus, Health, InstancePhase, Probe, ProcessSpec, ResourceList,
    Resources, RestartPolicy, TcpProbe, WorkloadTemplate,
};
use yunbian_runtime::{LogOptions, ProcessRuntime, ProcessRuntimeOptions, Runtime, RuntimeError, StatusUpdate};

const NODE: &str = "edge-1";
const TIMEOUT: Duration = Duration::from_secs(20);

fn temp_dir(tag: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let d = std::env::temp_dir().join(format!("yunbian-rt-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn template(command: &[&str], policy: RestartPolicy) -> WorkloadTemplate {
    WorkloadTemplate {
        process: Some(ProcessSpec { command: command.iter().map(|s| s.to_string()).collect(), ..Default::default() }),
        restart_policy: policy,
        ..Default::default()
    }
}

fn instance(name: &str, t: WorkloadTemplate) -> AppInstance {
    let hash = t.hash();
    AppInstance::new(
        name,
        AppInstanceSpec {
            app: "myapp".into(),
            node: NODE.into(),
            template: t,
            template_hash: hash,
            ..Default::default()
        },
    )
}

fn sh(name: &str, script: &str, policy: RestartPolicy) -> AppInstance {
    instance(name, template(&["sh", "-c", script], policy))
}

fn fast_options() -> ProcessRuntimeOptions {
    ProcessRuntimeOptions {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        stop_grace: Duration::from_secs(2),
        exit_poll_interval: Duration::from_millis(100),
        log_check_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn runtime(dir: &Path) -> (Arc<ProcessRuntime>, mpsc::UnboundedReceiver<StatusUpdate>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let rt = ProcessRuntime::with_options(dir.to_path_buf(), NODE.into(), tx, fast_options()).expect("runtime");
    (rt, rx)
}

/// Polls `f` until it yields a value; fails after [`TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(rt: &ProcessRuntime, name: &str) -> Option<AppInstanceStatus> {
    rt.statuses().await.into_iter().find(|u| u.instance == name).map(|u| u.status)
}

async fn wait_status(
    rt: &ProcessRuntime,
    name: &str,
    what: &str,
    pred: impl Fn(&AppInstanceStatus) -> bool,
) -> AppInstanceStatus {
    eventually(what, || async { status(rt, name).await.filter(|s| pred(s)) }).await
}

/// Receives updates until one for `name` matches.
async fn wait_update(
    rx: &mut mpsc::UnboundedReceiver<StatusUpdate>,
    name: &str,
    pred: impl Fn(&AppInstanceStatus) -> bool,
) -> AppInstanceStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = tokio::time::timeout(left, rx.recv())
            .await
            .expect("timed out waiting for a status update")
            .expect("update channel closed");
        if u.instance == name && pred(&u.status) {
            return u.status;
        }
    }
}

async fn read_logs(rt: &ProcessRuntime, name: &str, tail: Option<usize>) -> String {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let reader = async {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            all.extend_from_slice(&chunk);
        }
        all
    };
    let (res, bytes) = tokio::join!(rt.logs(name, LogOptions { tail, follow: false }, tx), reader);
    res.expect("logs");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(')') {
            Some(i) => !matches!(s[i + 1..].trim_start().chars().next(), Some('Z' | 'X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

async fn wait_dead(pid: u32) {
    eventually(&format!("pid {pid} to die"), || async { (!alive(pid)).then_some(()) }).await;
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_vars_and_working_dir_are_visible() {
    let dir = temp_dir("env");
    let (rt, _rx) = runtime(&dir);
    let name = unique("env");
    let mut inst = sh(
        &name,
        "echo node=$NODE_NAME app=$APP_NAME inst=$INSTANCE_NAME foo=$FOO; echo cwd=$(pwd); echo oops >&2",
        RestartPolicy::Never,
    );
    if let Some(p) = inst.spec.template.process.as_mut() {
        p.env = BTreeMap::from([("FOO".to_string(), "bar".to_string())]);
    }
    rt.ensure(&inst).await.expect("ensure");
    let st = wait_status(&rt, &name, "completion", |s| s.phase == InstancePhase::Stopped).await;
    assert_eq!(st.reason, "Completed");
    assert_eq!(st.exit_code, Some(0));
    assert!(!st.started_at.is_empty() && st.started_at.ends_with('Z'), "{}", st.started_at);
    let log = read_logs(&rt, &name, None).await;
    assert!(log.contains(&format!("node={NODE} app=myapp inst={name} foo=bar")), "{log}");
    assert!(log.contains(&format!("cwd={}", dir.join(&name).join("work").display())), "{log}");
    assert!(log.contains("oops"), "stderr goes to the same log: {log}");
    assert_eq!(rt.log_path(&name), Some(dir.join(&name).join("stdout.log")));
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_always_counts_restarts() {
    let dir = temp_dir("always");
    let (rt, mut rx) = runtime(&dir);
    let name = unique("always");
    rt.ensure(&sh(&name, "echo run; exit 3", RestartPolicy::Always)).await.expect("ensure");
    let failed = wait_update(&mut rx, &name, |s| s.phase == InstancePhase::Failed).await;
    assert_eq!(failed.reason, "Error");
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.pid, None);
    let restarted = wait_update(&mut rx, &name, |s| s.phase == InstancePhase::Starting).await;
    assert_eq!(restarted.restart_count, 1);
    assert!(restarted.pid.is_some());
    wait_status(&rt, &name, "three restarts", |s| s.restart_count >= 3).await;
    rt.remove(&name).await.expect("remove");
    assert!(status(&rt, &name).await.is_none());
    assert!(!dir.join(&name).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_on_failure() {
    let dir = temp_dir("onfailure");
    let (rt, _rx) = runtime(&dir);
    let ok = unique("onfailure-ok");
    let bad = unique("onfailure-bad");
    rt.ensure(&sh(&ok, "exit 0", RestartPolicy::OnFailure)).await.expect("ensure");
    rt.ensure(&sh(&bad, "exit 2", RestartPolicy::OnFailure)).await.expect("ensure");
    wait_status(&rt, &bad, "restart after failure", |s| s.restart_count >= 2).await;
    let st = wait_status(&rt, &ok, "completion", |s| s.phase == InstancePhase::Stopped).await;
    assert_eq!(st.reason, "Completed");
    // Many back-off periods (50 ms) later it is still not restarted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = status(&rt, &ok).await.expect("status");
    assert_eq!((st.phase, st.restart_count), (InstancePhase::Stopped, 0));
    rt.remove(&ok).await.expect("remove");
    rt.remove(&bad).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_never_and_exit_reasons() {
    let dir = temp_dir("never");
    let (rt, _rx) = runtime(&dir);
    let code = unique("never-code");
    let sig = unique("never-signal");
    let missing = unique("never-missing");
    let told = unique("never-told");
    let ok = unique("never-ok");
    rt.ensure(&sh(&code, "exit 7", RestartPolicy::Never)).await.expect("ensure");
    // A workload's own account of its failure; ignored after a clean exit.
    let why = r#"printf 'DiskFull\n/data has 0 bytes\nfree\n' > "$YUNBIAN_TERMINATION_LOG"; exit 5"#;
    rt.ensure(&sh(&told, why, RestartPolicy::Never)).await.expect("ensure");
    rt.ensure(&sh(&ok, r#"echo Fine > "$YUNBIAN_TERMINATION_LOG""#, RestartPolicy::Never)).await.expect("ensure");
    rt.ensure(&sh(&sig, "kill -9 $$", RestartPolicy::Never)).await.expect("ensure");
    rt.ensure(&instance(&missing, template(&["/nonexistent/yunbian-prog"], RestartPolicy::Never)))
        .await
        .expect("ensure reports start failures in the status");

    let st = wait_status(&rt, &code, "exit", |s| s.phase == InstancePhase::Failed).await;
    assert_eq!((st.reason.as_str(), st.exit_code), ("Error", Some(7)));
    let st = wait_status(&rt, &sig, "kill", |s| s.phase == InstancePhase::Failed).await;
    assert_eq!(st.reason, "Signaled");
    assert!(st.message.contains("SIGKILL"), "{}", st.message);
    assert_eq!(st.exit_code, Some(137));
    let st = wait_status(&rt, &missing, "start failure", |s| s.phase == InstancePhase::Failed).await;
    assert_eq!(st.reason, "Error");
    assert!(st.message.contains("cannot start"), "{}", st.message);
    let st = wait_status(&rt, &told, "termination log", |s| s.phase == InstancePhase::Failed).await;
    assert_eq!((st.reason.as_str(), st.exit_code), ("DiskFull", Some(5)), "{st:?}");
    assert_eq!(st.message, "/data has 0 bytes free (exited with code 5)");
    let st = wait_status(&rt, &ok, "clean exit", |s| s.phase == InstancePhase::Stopped).await;
    assert_eq!(st.reason, "Completed");
    rt.remove(&ok).await.expect("remove");

    tokio::time::sleep(Duration::from_millis(600)).await;
    for n in [&code, &sig, &missing, &told] {
        let st = status(&rt, n).await.expect("status");
        assert_eq!((st.phase, st.restart_count), (InstancePhase::Failed, 0), "{n}");
        rt.remove(n).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected() {
    let dir = temp_dir("invalid");
    let (rt, _rx) = runtime(&dir);
    let empty = instance("empty-cmd", template(&[], RestartPolicy::Never));
    assert!(matches!(rt.ensure(&empty).await, Err(RuntimeError::Invalid { .. })));
    let bad_name = sh("../escape", "true", RestartPolicy::Never);
    assert!(matches!(rt.ensure(&bad_name).await, Err(RuntimeError::Invalid { .. })));
    let (tx, _r) = mpsc::channel(1);
    assert!(matches!(rt.logs("nope", LogOptions::default(), tx).await, Err(RuntimeError::NotFound(_))));
    assert!(rt.statuses().await.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts() {
    let dir = temp_dir("liveness");
    let (rt, mut rx) = runtime(&dir);
    let name = unique("liveness");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }; // closed again: nothing listens there
    let mut t = template(&["sleep", "1000"], RestartPolicy::Always);
    t.health = Health {
        liveness: Some(Probe {
            tcp: Some(TcpProbe { port }),
            period_seconds: 1,
            timeout_seconds: 1,
            initial_delay_seconds: 0,
            failure_threshold: 2,
            ..Default::default()
        }),
    };
    rt.ensure(&instance(&name, t)).await.expect("ensure");
    let first = wait_status(&rt, &name, "running", |s| s.phase == InstancePhase::Running).await;
    let first_pid = first.pid.expect("pid");
    let failed = wait_update(&mut rx, &name, |s| s.reason == "LivenessFailed").await;
    assert_eq!(failed.phase, InstancePhase::Failed);
    assert!(failed.message.contains("liveness"), "{}", failed.message);
    wait_dead(first_pid).await;
    let st = wait_status(&rt, &name, "restart", |s| s.restart_count >= 1 && s.phase == InstancePhase::Running).await;
    assert_ne!(st.pid, Some(first_pid));
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kill_is_reported_as_oom() {
    let dir = temp_dir("oom");
    let (rt, _rx) = runtime(&dir);
    let support = rt.limits_support();
    assert!(!support.note.is_empty());
    let v1_here = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").is_file();
    let v2_here = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    if running_as_root() && (v1_here || v2_here) {
        assert!(support.enforced, "root with a cgroup fs must enforce limits: {}", support.note);
    }
    if !support.enforced {
        eprintln!("limits not enforced here ({}); skipping the OOM part", support.note);
        return;
    }
    let name = unique("oom");
    // awk itself (the session leader) grows a string until the limit kills it.
    let mut t = template(
        &["awk", "BEGIN { s = \"0123456789abcdef\"; while (length(s) < 400000000) s = s s; print length(s) }"],
        RestartPolicy::Never,
    );
    t.resources = Resources {
        limits: ResourceList { memory: Some("16Mi".into()), cpu: Some("500m".into()) },
        ..Default::default()
    };
    rt.ensure(&instance(&name, t)).await.expect("ensure");
    if v1_here {
        let limit = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/yunbian/{name}/memory.limit_in_bytes"))
            .expect("memory cgroup");
        assert_eq!(limit.trim(), "16777216");
        let quota =
            std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/yunbian/{name}/cpu.cfs_quota_us")).expect("cpu cgroup");
        assert_eq!(quota.trim(), "50000");
    }
    let st = wait_status(&rt, &name, "oom kill", |s| s.phase == InstancePhase::Failed).await;
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert!(st.message.contains("16Mi"), "{}", st.message);
    rt.remove(&name).await.expect("remove");
    if v1_here {
        assert!(!Path::new(&format!("/sys/fs/cgroup/memory/yunbian/{name}")).exists(), "cgroup removed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_limits_are_not_enforced_but_instances_run() {
    let dir = temp_dir("nocg");
    let empty_root = temp_dir("nocg-root");
    for (opts, expect) in [
        (ProcessRuntimeOptions { cgroups: false, ..fast_options() }, "disabled"),
        (ProcessRuntimeOptions { cgroup_root: empty_root.clone(), ..fast_options() }, "no cgroup"),
    ] {
        let (tx, _rx) = mpsc::unbounded_channel();
        let rt = ProcessRuntime::with_options(dir.clone(), NODE.into(), tx, opts).expect("runtime");
        let support = rt.limits_support();
        assert!(!support.enforced);
        assert!(support.note.contains(expect), "{}", support.note);
        let name = unique("nocg");
        let mut t = template(&["sleep", "1000"], RestartPolicy::Always);
        t.resources.limits.memory = Some("16Mi".into());
        rt.ensure(&instance(&name, t)).await.expect("ensure");
        let st = wait_status(&rt, &name, "running", |s| s.phase == InstancePhase::Running).await;
        assert!(st.pid.is_some_and(alive));
        rt.remove(&name).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty_root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_survive_runtime_drop_and_are_adopted() {
    let dir = temp_dir("adopt");
    let name = unique("adopt");
    let inst = sh(&name, "echo started; exec sleep 1000", RestartPolicy::Always);
    let (a, _rx_a) = runtime(&dir);
    a.ensure(&inst).await.expect("ensure");
    let pid = a.statuses().await[0].status.pid.expect("pid");
    assert!(alive(pid));
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "dropping the runtime must not kill workloads");

    let (b, mut rx_b) = runtime(&dir);
    assert_eq!(b.recover().await.expect("recover"), vec![name.clone()]);
    let st = status(&b, &name).await.expect("status");
    assert_eq!((st.phase, st.pid), (InstancePhase::Running, Some(pid)));
    let reported = wait_update(&mut rx_b, &name, |s| s.phase == InstancePhase::Running).await;
    assert_eq!(reported.pid, Some(pid));
    b.ensure(&inst).await.expect("ensure again");
    assert_eq!(status(&b, &name).await.expect("status").pid, Some(pid), "same hash: untouched");
    assert!(alive(pid));
    assert!(read_logs(&b, &name, None).await.contains("started"));

    // Adopted processes are still supervised: removal stops them.
    b.remove(&name).await.expect("remove");
    wait_dead(pid).await;
    assert!(!dir.join(&name).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_that_died_while_down_is_restarted() {
    let dir = temp_dir("died");
    let name = unique("died");
    let inst = instance(&name, template(&["sleep", "1000"], RestartPolicy::Always));
    let (a, _rx_a) = runtime(&dir);
    a.ensure(&inst).await.expect("ensure");
    let pid = a.statuses().await[0].status.pid.expect("pid");
    drop(a);
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    wait_dead(pid).await;

    let (b, mut rx_b) = runtime(&dir);
    b.recover().await.expect("recover");
    let exited = wait_update(&mut rx_b, &name, |s| s.phase == InstancePhase::Failed).await;
    assert_eq!(exited.reason, "Error");
    assert!(exited.message.contains("exit code unknown"), "{}", exited.message);
    let st = wait_status(&b, &name, "restart", |s| s.phase == InstancePhase::Running && s.restart_count == 1).await;
    assert_ne!(st.pid, Some(pid));
    b.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_is_idempotent_and_replaces_on_template_change() {
    let dir = temp_dir("replace");
    let (rt, _rx) = runtime(&dir);
    let name = unique("replace");
    rt.ensure(&instance(&name, template(&["sleep", "1000"], RestartPolicy::Always))).await.expect("ensure");
    let pid1 = status(&rt, &name).await.and_then(|s| s.pid).expect("pid");
    rt.ensure(&instance(&name, template(&["sleep", "1000"], RestartPolicy::Always))).await.expect("ensure");
    assert_eq!(status(&rt, &name).await.and_then(|s| s.pid), Some(pid1));
    rt.ensure(&instance(&name, template(&["sleep", "2000"], RestartPolicy::Always))).await.expect("ensure");
    let pid2 = status(&rt, &name).await.and_then(|s| s.pid).expect("pid");
    assert_ne!(pid1, pid2);
    wait_dead(pid1).await;
    assert!(alive(pid2));
    rt.remove(&name).await.expect("remove");
    wait_dead(pid2).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_kills_the_whole_process_group() {
    let dir = temp_dir("group");
    let (rt, _rx) = runtime(&dir);
    let name = unique("group");
    rt.ensure(&sh(&name, "sleep 1000 & echo $! > gc.pid; wait", RestartPolicy::Always)).await.expect("ensure");
    let pid = status(&rt, &name).await.and_then(|s| s.pid).expect("pid");
    let gc_file = dir.join(&name).join("work").join("gc.pid");
    let gc: u32 = eventually("grandchild pid", || async {
        std::fs::read_to_string(&gc_file).ok().and_then(|s| s.trim().parse().ok())
    })
    .await;
    assert!(alive(gc));
    rt.remove(&name).await.expect("remove");
    wait_dead(pid).await;
    wait_dead(gc).await;
    assert!(rt.log_path(&name).is_none());
    assert!(!dir.join(&name).exists());
    // Removing again (or something unknown) is fine.
    rt.remove(&name).await.expect("remove again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rotation_caps_file_size() {
    const CAP: u64 = 64 * 1024;
    let dir = temp_dir("rotate");
    let (tx, _rx) = mpsc::unbounded_channel();
    let opts =
        ProcessRuntimeOptions { max_log_bytes: CAP, log_check_interval: Duration::from_millis(50), ..fast_options() };
    let rt = ProcessRuntime::with_options(dir.clone(), NODE.into(), tx, opts).expect("runtime");
    let name = unique("rotate");
    let script = "i=0; while :; do i=$((i+1)); \
        echo \"line $i 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789\"; \
        if [ $((i % 10)) -eq 0 ]; then sleep 0.01; fi; done";
    rt.ensure(&sh(&name, script, RestartPolicy::Always)).await.expect("ensure");
    let log = dir.join(&name).join("stdout.log");
    let old = dir.join(&name).join("stdout.log.1");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eventually("first rotation", || async { (size(&old) > 0).then_some(()) }).await;
    let mut written = 0u64;
    for _ in 0..40 {
        let (cur, prev) = (size(&log), size(&old));
        assert!(cur <= 2 * CAP, "stdout.log is {cur} bytes");
        assert!(prev <= 2 * CAP, "stdout.log.1 is {prev} bytes");
        written = written.max(cur + prev);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written > 0);
    let text = read_logs(&rt, &name, Some(3)).await;
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.starts_with("line ")), "{text}");
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_and_follow() {
    let dir = temp_dir("follow");
    let (rt, _rx) = runtime(&dir);
    let name = unique("follow");
    rt.ensure(&sh(&name, "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.1; done", RestartPolicy::Always))
        .await
        .expect("ensure");
    let rt2 = rt.clone();
    let n2 = name.clone();
    eventually("ticks", || {
        let (rt, n) = (rt2.clone(), n2.clone());
        async move { read_logs(&rt, &n, None).await.contains("tick5\n").then_some(()) }
    })
    .await;

    let tail = read_logs(&rt, &name, Some(2)).await;
    let lines: Vec<u64> =
        tail.lines().map(|l| l.strip_prefix("tick").and_then(|n| n.parse().ok()).expect("tick line")).collect();
    assert_eq!(lines.len(), 2, "{tail}");
    assert_eq!(lines[1], lines[0] + 1);

    let (tx, mut rx) = mpsc::channel(16);
    let follower = {
        let rt = rt.clone();
        let name = name.clone();
        tokio::spawn(async move { rt.logs(&name, LogOptions { tail: Some(1), follow: true }, tx).await })
    };
    let mut seen = String::new();
    let mut first: Option<u64> = None;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let chunk = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), rx.recv())
            .await
            .expect("follow produced output in time")
            .expect("follow still running");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        let ticks: Vec<u64> =
            seen.lines().filter_map(|l| l.strip_prefix("tick").and_then(|n| n.parse().ok())).collect();
        if first.is_none() {
            first = ticks.first().copied();
        }
        if let (Some(f), Some(&last)) = (first, ticks.last()) {
            if last >= f + 5 {
                break;
            }
        }
    }
    drop(rx);
    let res = tokio::time::timeout(TIMEOUT, follower).await.expect("follow ends when the receiver is dropped");
    res.expect("join").expect("logs");
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_escalates_to_sigkill_after_the_grace_period() {
    let dir = temp_dir("grace");
    let (tx, _rx) = mpsc::unbounded_channel();
    let opts = ProcessRuntimeOptions { stop_grace: Duration::from_millis(300), ..fast_options() };
    let rt = ProcessRuntime::with_options(dir.clone(), NODE.into(), tx, opts).expect("runtime");
    let name = unique("grace");
    // SIGTERM is ignored by the shell and, inherited, by its children.
    rt.ensure(&sh(&name, "trap '' TERM; echo ready; while :; do sleep 0.1; done", RestartPolicy::Always))
        .await
        .expect("ensure");
    let pid = status(&rt, &name).await.and_then(|s| s.pid).expect("pid");
    eventually("trap installed", || {
        let rt = rt.clone();
        let name = name.clone();
        async move { read_logs(&rt, &name, None).await.contains("ready").then_some(()) }
    })
    .await;
    rt.remove(&name).await.expect("remove");
    wait_dead(pid).await;
    assert!(!dir.join(&name).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_ignores_corrupt_records() {
    let dir = temp_dir("corrupt");
    let name = unique("broken");
    std::fs::create_dir_all(dir.join(&name)).expect("mkdir");
    std::fs::write(dir.join(&name).join("state.json"), b"{\"version\": 1, \"pid\": ").expect("write");
    std::fs::create_dir_all(dir.join("no-record")).expect("mkdir");
    let (rt, _rx) = runtime(&dir);
    assert!(rt.recover().await.expect("recover").is_empty());
    assert!(rt.statuses().await.is_empty());
    // The name stays usable: ensure starts it afresh.
    rt.ensure(&sh(&name, "exit 0", RestartPolicy::Never)).await.expect("ensure");
    wait_status(&rt, &name, "completion", |s| s.phase == InstancePhase::Stopped).await;
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}
