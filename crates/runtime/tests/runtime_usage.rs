//! Usage reporting of the process runtime with real processes: CPU and
//! memory measured from this machine's cgroups or `/proc`, app-reported
//! metrics folded in, and statuses re-sent on the status channel.
//!
//! Timing is never asserted: conditions are polled until they hold or 20 s
//! pass. Instance names carry the test process id (cgroup names are global).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use yunbian_api::{
    AppInstance, AppInstanceSpec, AppInstanceStatus, InstancePhase, InstanceUsage, ProcessSpec, RestartPolicy,
    WorkloadTemplate,
};
use yunbian_runtime::{AppMetrics, MetricsReport, ProcessRuntime, ProcessRuntimeOptions, Runtime, StatusUpdate};

const TIMEOUT: Duration = Duration::from_secs(20);

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("yunbian-usage-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn sh(name: &str, script: &str) -> AppInstance {
    let t = WorkloadTemplate {
        process: Some(ProcessSpec { command: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }),
        restart_policy: RestartPolicy::Never,
        ..Default::default()
    };
    let hash = t.hash();
    AppInstance::new(
        name,
        AppInstanceSpec {
            app: "load".into(),
            node: "edge-1".into(),
            template: t,
            template_hash: hash,
            ..Default::default()
        },
    )
}

fn runtime(
    tag: &str,
    opts: ProcessRuntimeOptions,
) -> (Arc<ProcessRuntime>, mpsc::UnboundedReceiver<StatusUpdate>, PathBuf) {
    let dir = temp_dir(tag);
    let (tx, rx) = mpsc::unbounded_channel();
    let opts = ProcessRuntimeOptions { usage_interval: Duration::from_millis(200), ..opts };
    let rt = ProcessRuntime::with_options(dir.clone(), "edge-1".into(), tx, opts).expect("runtime");
    (rt, rx, dir)
}

/// Receives updates until one for `name` matches `pred`.
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

/// Receives updates until one for `name` carries a usage matching `pred`.
async fn wait_usage(
    rx: &mut mpsc::UnboundedReceiver<StatusUpdate>,
    name: &str,
    pred: impl Fn(&InstanceUsage) -> bool,
) -> AppInstanceStatus {
    wait_update(rx, name, |s| s.usage.as_ref().is_some_and(&pred)).await
}

/// A shell whose busy loop runs in a child: CPU is only seen when the
/// instance's processes are summed (or its cgroup counted), not the leader.
const BUSY_CHILD: &str = "(while :; do :; done) & wait";

async fn busy_instance_reports_cpu_and_memory(tag: &str, opts: ProcessRuntimeOptions) {
    let (rt, mut rx, dir) = runtime(tag, opts);
    let name = format!("{tag}-{}", std::process::id());
    rt.ensure(&sh(&name, BUSY_CHILD)).await.expect("ensure");
    let st = wait_usage(&mut rx, &name, |u| u.cpu_millis > 0 && u.memory_bytes > 0).await;
    assert_eq!(st.phase, InstancePhase::Running, "usage rides on the running status: {st:?}");
    assert!(st.pid.is_some());
    // The runtime's view carries the same usage.
    let now = rt.statuses().await.into_iter().find(|s| s.instance == name).expect("known");
    assert!(now.status.usage.is_some_and(|u| u.cpu_millis > 0 && u.memory_bytes > 0));
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_instance_reports_cpu_and_memory_from_its_cgroup_when_available() {
    // Uses the machine's cgroups when they are writable; otherwise this is
    // the `/proc` path again.
    busy_instance_reports_cpu_and_memory("usage-cg", ProcessRuntimeOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_instance_reports_cpu_and_memory_from_proc_without_cgroups() {
    busy_instance_reports_cpu_and_memory("usage-proc", ProcessRuntimeOptions { cgroups: false, ..Default::default() })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_reported_metrics_become_usage_metrics() {
    let metrics = AppMetrics::new();
    let opts = ProcessRuntimeOptions { cgroups: false, app_metrics: metrics.clone(), ..Default::default() };
    let (rt, mut rx, dir) = runtime("usage-metrics", opts);
    let name = format!("usage-metrics-{}", std::process::id());
    let report = |body: &str| MetricsReport::parse(body.as_bytes()).expect("valid report");

    assert!(!metrics.is_tracked(&name));
    assert!(metrics.record(&name, &report(r#"{"queue_depth": 1}"#), Instant::now()).is_err());
    rt.ensure(&sh(&name, "while :; do sleep 1; done")).await.expect("ensure");
    assert!(metrics.is_tracked(&name), "the runtime tracks its instances");
    metrics.record(&name, &report(r#"{"queue_depth": 17, "rps": 230.5}"#), Instant::now()).expect("record");
    let st = wait_usage(&mut rx, &name, |u| u.metrics.get("queue_depth") == Some(&17.0)).await;
    assert_eq!(st.usage.and_then(|u| u.metrics.get("rps").copied()), Some(230.5));

    // A changed value is re-sent.
    metrics.record(&name, &report(r#"{"queue_depth": 3}"#), Instant::now()).expect("record");
    wait_usage(&mut rx, &name, |u| u.metrics.get("queue_depth") == Some(&3.0)).await;

    rt.remove(&name).await.expect("remove");
    assert!(!metrics.is_tracked(&name), "a removed instance refuses reports");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_run_drops_its_usage() {
    let (rt, mut rx, dir) = runtime("usage-exit", ProcessRuntimeOptions { cgroups: false, ..Default::default() });
    let name = format!("usage-exit-{}", std::process::id());
    // Busy until a `stop` file appears in its working directory.
    let script = "(while :; do :; done) & c=$!; while [ ! -e stop ]; do sleep 0.1; done; kill $c; exit 0";
    rt.ensure(&sh(&name, script)).await.expect("ensure");
    wait_usage(&mut rx, &name, |u| u.cpu_millis > 0).await;
    std::fs::write(dir.join(&name).join("work").join("stop"), b"").expect("write stop file");
    let ended = wait_update(&mut rx, &name, |s| s.phase == InstancePhase::Stopped).await;
    assert_eq!(ended.usage, None, "an ended run carries no usage: {ended:?}");
    let now = rt.statuses().await.into_iter().find(|s| s.instance == name).expect("known");
    assert_eq!(now.status.usage, None);
    rt.remove(&name).await.expect("remove");
    let _ = std::fs::remove_dir_all(&dir);
}
