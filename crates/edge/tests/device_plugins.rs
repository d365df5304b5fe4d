//! The device-plugin interface over a real unix socket: registration,
//! health, expiry, allocation and release, persistence across a restart of
//! the registry, the launcher's use of grants, and garbage on the socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use yunbian_api::fuzzing::Mutator;
use yunbian_api::{AppInstance, AppInstanceSpec, InstancePhase, ProcessSpec, RuntimeKind, WorkloadTemplate};
use yunbian_edge::device_plugins::{
    self, AllocateError, ClientError, DeviceRegistry, PluginClient, PluginDevice, Registration, RegistryOptions,
    MAX_BODY,
};
use yunbian_edge::launcher::{Launcher, LauncherOptions};

const GPU: &str = "yunbian.io/gpu";

/// A fresh directory under the system's temp dir.
fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("yunbian-devplug-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the test dir");
    d
}

/// A clock the test moves by hand (milliseconds).
fn manual_clock() -> (Arc<AtomicU64>, RegistryOptions) {
    let now = Arc::new(AtomicU64::new(0));
    let n = now.clone();
    let opts = RegistryOptions { clock: Some(Arc::new(move || n.load(Ordering::SeqCst))), ..Default::default() };
    (now, opts)
}

/// Serves `registry` at `<dir>/device-plugins.sock`.
fn serve(registry: Arc<DeviceRegistry>, dir: &Path) -> (PluginClient, tokio::task::JoinHandle<()>) {
    let path = dir.join(device_plugins::SOCKET_FILE);
    let listener = device_plugins::bind(&path).expect("bind the socket");
    let task = tokio::spawn(device_plugins::serve(registry, listener));
    (PluginClient::new(path), task)
}

fn registration(name: &str, health: &[bool]) -> Registration {
    Registration {
        name: name.into(),
        resource: GPU.into(),
        env: "NVIDIA_VISIBLE_DEVICES".into(),
        devices: health
            .iter()
            .enumerate()
            .map(|(i, h)| PluginDevice {
                id: i.to_string(),
                model: "NVIDIA A2".into(),
                memory_bytes: 16 << 30,
                healthy: *h,
            })
            .collect(),
    }
}

fn wants(n: u64) -> BTreeMap<String, u64> {
    [(GPU.to_string(), n)].into()
}

fn healthy_ids(devices: &[yunbian_api::HardwareDevice]) -> Vec<String> {
    devices.iter().filter(|d| d.healthy).map(|d| d.id.clone()).collect()
}

#[tokio::test]
async fn plugins_register_change_health_and_expire_over_the_socket() {
    let dir = temp_dir("register");
    let (now, opts) = manual_clock();
    let registry = DeviceRegistry::open(&dir, opts);
    let (client, _server) = serve(registry.clone(), &dir);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join(device_plugins::SOCKET_FILE)).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only the agent's user may connect");
    let mut changes = registry.subscribe();

    let r = client.register(&registration("nvidia", &[true, true, false])).await.expect("register");
    assert_eq!((r.devices, r.healthy, r.renew_every_seconds, r.expire_after_seconds), (3, 2, 10, 30));
    assert!(changes.has_changed().expect("registry alive"), "a registration wakes waiters");
    changes.mark_unchanged();
    let devices = client.devices().await.expect("devices");
    assert_eq!(devices.len(), 3);
    assert_eq!(healthy_ids(&devices), ["0", "1"]);
    assert_eq!((devices[0].model.as_str(), devices[0].memory_bytes), ("NVIDIA A2", 16 << 30));

    // The same registration again is a heartbeat, not a change.
    now.store(20_000, Ordering::SeqCst);
    client.register(&registration("nvidia", &[true, true, false])).await.expect("re-register");
    assert!(!changes.has_changed().expect("registry alive"));
    // A health change is.
    client.register(&registration("nvidia", &[false, true, true])).await.expect("health change");
    assert!(changes.has_changed().expect("registry alive"));
    assert_eq!(healthy_ids(&registry.devices()), ["1", "2"]);

    // Another plugin cannot take the resource while the owner is alive.
    let e = client.register(&registration("other", &[true])).await.expect_err("taken");
    assert!(matches!(&e, ClientError::Refused { code: 409, message, .. } if message.contains("nvidia")), "{e}");

    // Silent past the expiry: every device unhealthy, the plugin says expired.
    now.store(50_001, Ordering::SeqCst);
    assert!(healthy_ids(&client.devices().await.expect("devices")).is_empty());
    let plugins: Vec<device_plugins::PluginView> =
        client.call(Method::GET, "/v1/plugins", None).await.expect("plugins");
    assert_eq!(plugins.len(), 1);
    assert!(plugins[0].expired && plugins[0].last_seen_ms_ago == 30_001, "{plugins:?}");
    // Back: healthy again.
    client.register(&registration("nvidia", &[false, true, true])).await.expect("revive");
    assert_eq!(healthy_ids(&client.devices().await.expect("devices")), ["1", "2"]);

    // Unregistered: its devices are gone.
    client.unregister("nvidia").await.expect("unregister");
    assert!(client.devices().await.expect("devices").is_empty());
    let e = client.unregister("nvidia").await.expect_err("gone");
    assert!(matches!(e, ClientError::Refused { code: 404, .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn grants_go_lowest_first_are_freed_and_survive_a_restart() {
    let dir = temp_dir("grants");
    let (now, opts) = manual_clock();
    let registry = DeviceRegistry::open(&dir, opts.clone());
    let (client, server) = serve(registry.clone(), &dir);
    client.register(&registration("nvidia", &[true, false, true, true])).await.expect("register");

    let a = registry.allocate("infer-a", &wants(2)).expect("room for two");
    assert_eq!(a[GPU].ids, ["0", "2"], "lowest healthy ids; 1 is unhealthy");
    let b = registry.allocate("infer-b", &wants(1)).expect("room for one");
    assert_eq!(b[GPU].ids, ["3"]);
    let Err(AllocateError::Insufficient(short)) = registry.allocate("infer-c", &wants(1)) else {
        panic!("nothing should be left")
    };
    assert_eq!((short[0].free, short[0].unhealthy, short[0].allocated), (0, 1, 3));
    let allocations: BTreeMap<String, device_plugins::Grants> = client.allocations().await.expect("allocations");
    assert_eq!(allocations.keys().collect::<Vec<_>>(), ["infer-a", "infer-b"]);
    let holders: Vec<(String, String)> =
        client.devices().await.expect("devices").into_iter().map(|d| (d.id, d.allocated_to)).collect();
    assert_eq!(holders[0], ("0".to_string(), "infer-a".to_string()));
    assert_eq!(holders[3], ("3".to_string(), "infer-b".to_string()));

    // The agent restarts: a new registry on the same directory.
    server.abort();
    drop(registry);
    now.store(1_000_000, Ordering::SeqCst);
    let registry = DeviceRegistry::open(&dir, opts);
    assert_eq!(registry.held_by("infer-a"), BTreeMap::from([(GPU.to_string(), vec!["0".into(), "2".into()])]));
    assert_eq!(
        registry.allocate("infer-b", &wants(1)).expect("its grant").get(GPU).map(|g| g.env.as_str()),
        Some("NVIDIA_VISIBLE_DEVICES")
    );
    // Restored plugins count as just seen, until they fall silent.
    assert_eq!(healthy_ids(&registry.devices()), ["0", "2", "3"]);
    now.store(1_030_001, Ordering::SeqCst);
    assert!(healthy_ids(&registry.devices()).is_empty());
    // Grants stand while the plugin is away: adopted instances keep theirs.
    assert_eq!(registry.allocate("infer-a", &wants(2)).expect("sticky")[GPU].ids, ["0", "2"]);

    // Released when no longer desired: the freed device goes to the next.
    let (client, _server) = serve(registry.clone(), &dir);
    client.register(&registration("nvidia", &[true, false, true, true])).await.expect("back");
    registry.release_unless(|i| i == "infer-b");
    assert_eq!(registry.allocate("infer-c", &wants(2)).expect("room again")[GPU].ids, ["0", "2"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_state_file_that_cannot_be_read_is_moved_aside() {
    let dir = temp_dir("corrupt");
    std::fs::write(dir.join(device_plugins::STATE_FILE), b"{\"version\": 1, \"grants\": [garbage").expect("write");
    let registry = DeviceRegistry::open(&dir, RegistryOptions::default());
    assert!(registry.all_grants().is_empty());
    assert!(!dir.join(device_plugins::STATE_FILE).exists());
    let aside = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("device-plugins.json.corrupt-"));
    assert!(aside, "the unreadable file is kept for inspection");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends raw bytes on a new connection; what came back before it closed.
async fn raw_exchange(path: &Path, bytes: &[u8]) -> String {
    let mut s = tokio::net::UnixStream::connect(path).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn garbage_bad_json_and_huge_bodies_get_clear_errors() {
    let dir = temp_dir("garbage");
    let registry = DeviceRegistry::open(&dir, RegistryOptions::default());
    let (client, _server) = serve(registry.clone(), &dir);
    let socket = dir.join(device_plugins::SOCKET_FILE);

    let answer = raw_exchange(&socket, b"\x00\x01\x02 not http at all\r\n\r\n").await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    let post = |body: &'static [u8]| client.raw(Method::POST, "/v1/plugins", Bytes::from_static(body));
    let (code, body) = post(b"{not json").await.expect("answered");
    assert_eq!(code, 400);
    let err: yunbian_api::ApiErrorBody = serde_json::from_slice(&body).expect("a JSON error");
    assert!(err.message.contains("not a valid registration"), "{err:?}");
    let (code, _) = post(b"").await.expect("answered");
    assert_eq!(code, 400);
    let (code, body) =
        post(br#"{"name":"x","resource":"yunbian.io/gpu","devices":[],"extra":1}"#).await.expect("answered");
    assert_eq!(code, 400, "unknown fields are refused");
    assert!(String::from_utf8_lossy(&body).contains("extra"));
    let (code, body) =
        post(br#"{"name":"BAD","resource":"gpu","devices":[{"id":"a,b","healthy":true}]}"#).await.expect("answered");
    assert_eq!(code, 400);
    let err: yunbian_api::ApiErrorBody = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(err.details.len(), 3, "every problem is named: {err:?}");

    // Too big, declared…
    let (code, _) =
        client.raw(Method::POST, "/v1/plugins", Bytes::from(vec![b' '; MAX_BODY + 1])).await.expect("answered");
    assert_eq!(code, 413);
    // …or streamed in chunks without a length.
    let mut req = b"POST /v1/plugins HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        req.extend(std::iter::repeat_n(b' ', 64 * 1024));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&socket, &req).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");

    let (code, _) = client.raw(Method::GET, "/v1/nothing", Bytes::new()).await.expect("answered");
    assert_eq!(code, 404);
    let (code, _) = client.raw(Method::PUT, "/v1/devices", Bytes::new()).await.expect("answered");
    assert_eq!(code, 405);

    // After all that the server still serves.
    client.register(&registration("nvidia", &[true])).await.expect("register");
    assert_eq!(client.devices().await.expect("devices").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

fn gpu_instance(name: &str, n: u64) -> AppInstance {
    let template = WorkloadTemplate {
        runtime: RuntimeKind::Process,
        process: Some(ProcessSpec { command: vec!["/bin/true".into()], ..Default::default() }),
        devices: wants(n),
        ..Default::default()
    };
    AppInstance::new(
        name,
        AppInstanceSpec {
            app: "infer".into(),
            node: "n".into(),
            template,
            template_hash: "h".into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn the_launcher_waits_for_devices_and_hands_their_variables_to_the_workload() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let launcher = Launcher::new(None, LauncherOptions::default(), tx);
    // No device-plugin interface at all: the instance waits and says why.
    assert_eq!(launcher.prepare(&gpu_instance("infer-1", 2), false), None);
    let u = rx.try_recv().expect("a status");
    assert_eq!((u.status.phase, u.status.reason.as_str()), (InstancePhase::Pending, "InsufficientDevices"));

    let (_, opts) = manual_clock();
    let registry = DeviceRegistry::in_memory(opts);
    launcher.set_devices(registry.clone());
    registry.register(registration("nvidia", &[true])).expect("register");
    assert_eq!(launcher.prepare(&gpu_instance("infer-1", 2), false), None);
    let u = rx.try_recv().expect("a status");
    assert_eq!(u.status.reason, "InsufficientDevices");
    assert_eq!(
        u.status.message,
        "needs 2 yunbian.io/gpu, 1 free (1 registered: 0 unhealthy, 0 allocated to other instances)"
    );
    // The node reports its devices with each heartbeat.
    let info = launcher.node_info(&yunbian_api::NodeInfo { cpus: 4, ..Default::default() });
    assert_eq!((info.cpus, info.devices.len()), (4, 1));

    // A second device appears: the instance gets both, in its environment.
    registry.register(registration("nvidia", &[true, true])).expect("register");
    let ready = launcher.prepare(&gpu_instance("infer-1", 2), false).expect("devices granted");
    let env = &ready.spec.template.process.as_ref().expect("process").env;
    assert_eq!(env.get("YUNBIAN_DEVICES_YUNBIAN_IO_GPU").map(String::as_str), Some("0,1"));
    assert_eq!(env.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str), Some("0,1"));
    assert!(launcher.take_handed("infer-1"), "the runtime's status replaces the wait");
    assert_eq!(registry.held_by("infer-1")[GPU], ["0", "1"]);

    // No longer desired: its devices are free for the next.
    launcher.release_devices(|i| i == "infer-2");
    assert!(registry.held_by("infer-1").is_empty());
    assert!(launcher.prepare(&gpu_instance("infer-2", 1), false).is_some());
    assert_eq!(registry.held_by("infer-2")[GPU], ["0"]);
}

/// Tokens of the registration format, for the mutator to insert.
const DICT: &[&[u8]] = &[
    b"\"name\"",
    b"\"resource\"",
    b"\"env\"",
    b"\"devices\"",
    b"\"id\"",
    b"\"healthy\"",
    b"\"memoryBytes\"",
    b"true",
    b"false",
    b"null",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"a,b\"",
    b"\"YUNBIAN_X\"",
    b"18446744073709551615",
    b"-1",
    b"\"yunbian.io/gpu\"",
];

const SEEDS: [&str; 3] = [
    r#"{"name":"nvidia","resource":"yunbian.io/gpu","env":"NVIDIA_VISIBLE_DEVICES","devices":[{"id":"0","model":"NVIDIA A2","memoryBytes":16106127360,"healthy":true},{"id":"1","healthy":false}]}"#,
    r#"{"name":"npu","resource":"example.com/npu","devices":[{"id":"10","healthy":true},{"id":"2","healthy":true},{"id":"GPU-a","healthy":true}]}"#,
    r#"{"name":"x","resource":"a/b","devices":[]}"#,
];

#[test]
fn mutated_registrations_never_break_the_table() {
    let seeds: Vec<Vec<u8>> = SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let mut m = Mutator::new(0x9e37_79b9_7f4a_7c15);
    for seed in &seeds {
        device_plugins::fuzzing::check_registration(seed);
    }
    for _ in 0..30_000 {
        device_plugins::fuzzing::check_registration(&m.input(&seeds, DICT));
    }
}

#[tokio::test]
async fn mutated_requests_on_the_socket_get_answers_and_the_server_lives() {
    let dir = temp_dir("mutated");
    let registry = DeviceRegistry::open(&dir, RegistryOptions::default());
    let (client, _server) = serve(registry, &dir);
    let seeds: Vec<Vec<u8>> = SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let mut m = Mutator::new(0x2545_f491_4f6c_dd1d);
    for _ in 0..300 {
        let body = Bytes::from(m.input(&seeds, DICT));
        let (code, answer) = client.raw(Method::POST, "/v1/plugins", body.clone()).await.expect("answered");
        assert!(matches!(code, 200 | 400 | 409), "{code} for {body:?}: {answer:?}");
        if code != 200 {
            let e: yunbian_api::ApiErrorBody = serde_json::from_slice(&answer).expect("a JSON error");
            assert!(!e.message.is_empty());
        }
    }
    // Still serving (a resource no mutation of the seeds can name).
    let mut last = registration("final", &[true, true]);
    last.resource = "final.test/dev".into();
    assert_eq!(client.register(&last).await.expect("registered").healthy, 2);
    let _ = std::fs::remove_dir_all(&dir);
}
