//! App-reported metrics over the agent's real local API on loopback
//! (`POST /v1/instances/{instance}/metrics`, served by `start_devices`):
//! good reports, every kind of bad one, unknown instances, and a report
//! that reaches an instance's `status.usage` through the process runtime.
//!
//! No timing is asserted: conditions are polled until they hold or 20 s pass.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use yunbian_api::{AppInstance, AppInstanceSpec, ProcessSpec, RestartPolicy, WorkloadTemplate};
use yunbian_edge::devices::{start_devices, DeviceOptions, DeviceServices};
use yunbian_runtime::{ProcessRuntime, ProcessRuntimeOptions, Runtime};

const PATIENCE: Duration = Duration::from_secs(20);

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("yunbian-lam-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// The node's device services with the local API on an ephemeral port.
async fn local_api(dir: &std::path::Path) -> (DeviceServices, SocketAddr) {
    let opts =
        DeviceOptions { broker: None, local_api: Some(SocketAddr::from(([127, 0, 0, 1], 0))), ..Default::default() };
    let (services, _side) = start_devices("n1", dir, &opts, &[]).await.expect("start device services");
    let addr = services.local_api.expect("local API served");
    (services, addr)
}

/// One POST with `Connection: close`; the status and the JSON body.
async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: local\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time").expect("read answer");
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_validated_and_recorded() {
    let dir = temp_dir("validate");
    let (services, addr) = local_api(&dir).await;
    let metrics = services.app_metrics.clone();
    let path = "/v1/instances/web-1/metrics";

    let (code, body) = post(addr, path, r#"{"queue_depth": 17}"#).await;
    assert_eq!(code, 404, "an instance the runtime does not know: {body}");
    assert_eq!(body["code"], 404);
    assert!(body["message"].as_str().is_some_and(|m| m.contains("web-1")), "{body}");

    metrics.track("web-1");
    let (code, body) = post(addr, path, r#"{"queue_depth": 17, "rps": 230.5}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, serde_json::json!({"instance": "web-1", "accepted": 2}));
    let now = metrics.current("web-1", Instant::now());
    assert_eq!(now.get("queue_depth"), Some(&17.0));
    assert_eq!(now.get("rps"), Some(&230.5));

    let many: Vec<String> = (0..33).map(|i| format!("\"m{i}\": {i}")).collect();
    let many = format!("{{{}}}", many.join(","));
    let huge = format!(r#"{{"x": 1, "pad": "{}"}}"#, "y".repeat(20 * 1024));
    for (bad, why) in [
        (r#"{"queue depth": 1}"#, "a space in a name"),
        (r#"{"q/d": 1}"#, "a slash in a name"),
        (r#"{"x": NaN}"#, "NaN is not JSON"),
        (r#"{"x": "NaN"}"#, "a string"),
        (r#"{"x": 1e999}"#, "out of range"),
        (r#"{"x": null}"#, "null"),
        (r#"[1, 2]"#, "not an object"),
        ("", "no body"),
        ("{", "truncated"),
        (many.as_str(), "33 metrics"),
    ] {
        let (code, body) = post(addr, path, bad).await;
        assert_eq!(code, 400, "{why}: {body}");
        assert_eq!(body["code"], 400, "{why}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{why}: {body}");
    }
    let (code, body) = post(addr, path, &huge).await;
    assert_eq!(code, 413, "{body}");
    // Nothing bad was recorded.
    let now = metrics.current("web-1", Instant::now());
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now.get("queue_depth"), Some(&17.0));

    let (code, _) = post(addr, "/v1/instances/web-1/nope", "{}").await;
    assert_eq!(code, 404);
    services.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_reaches_the_instance_status_through_the_runtime() {
    let dir = temp_dir("status");
    let (services, addr) = local_api(&dir).await;
    let env = services.workload_env();
    assert!(env.iter().any(|(k, v)| k == "YUNBIAN_DEVICE_API" && v == &format!("http://{addr}")), "{env:?}");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = ProcessRuntimeOptions {
        cgroups: false,
        usage_interval: Duration::from_millis(200),
        app_metrics: services.app_metrics.clone(),
        node_env: env,
        ..Default::default()
    };
    let rt = ProcessRuntime::with_options(dir.join("instances"), "n1".into(), tx, opts).expect("runtime");
    let name = format!("worker-{}", std::process::id());
    let t = WorkloadTemplate {
        process: Some(ProcessSpec {
            command: vec!["sh".into(), "-c".into(), "while :; do sleep 1; done".into()],
            ..Default::default()
        }),
        restart_policy: RestartPolicy::Never,
        ..Default::default()
    };
    let hash = t.hash();
    let inst = AppInstance::new(
        &name,
        AppInstanceSpec {
            app: "worker".into(),
            node: "n1".into(),
            template: t,
            template_hash: hash,
            ..Default::default()
        },
    );
    rt.ensure(&inst).await.expect("ensure");
    let (code, body) = post(addr, &format!("/v1/instances/{name}/metrics"), r#"{"queue_depth": 42}"#).await;
    assert_eq!(code, 200, "{body}");

    let deadline = Instant::now() + PATIENCE;
    let usage = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = tokio::time::timeout(left, rx.recv()).await.expect("a usage update in time").expect("channel open");
        // The first usage may predate the report; the one after carries it.
        if let Some(usage) = u.status.usage.filter(|us| u.instance == name && us.metrics.contains_key("queue_depth")) {
            break usage;
        }
    };
    assert_eq!(usage.metrics.get("queue_depth"), Some(&42.0), "{usage:?}");
    assert!(usage.memory_bytes > 0, "{usage:?}");

    rt.remove(&name).await.expect("remove");
    let (code, _) = post(addr, &format!("/v1/instances/{name}/metrics"), r#"{"queue_depth": 1}"#).await;
    assert_eq!(code, 404, "a removed instance refuses reports");
    services.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
