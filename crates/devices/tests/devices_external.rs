//! External mappers over the unix socket: the protocol as a mapper sees it
//! (registration, the devices long-poll, readings pushes, all-or-nothing
//! refusals, acknowledgements), the real Python example mapper driving a
//! simulated tcp-line device end to end, and garbage on the socket.
//!
//! Tests that run Python need `python3`: without it they print `SKIP:` and
//! pass, unless `CI` is set, where they fail.

mod common_raw;

use common_raw::{assert_4xx_or_closed, garbage};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use yunbian_api::*;
use yunbian_devices::external::{serve_unix, ExternalRegistry};
use yunbian_devices::host::MapperHost;
use yunbian_devices::{standard_drivers, DeviceConfig, MemoryBus};

/// Upper bound for any wait in these tests (a hang fails the test; nothing
/// measures how long things take).
const PATIENCE: Duration = Duration::from_secs(40);

fn python3() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some("python3");
    }
    if std::env::var_os("CI").is_some() {
        panic!("python3 is required for this test (CI is set): install python3");
    }
    println!("SKIP: python3 not found; the external mapper test needs it");
    None
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mappers")
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let d = std::env::temp_dir().join(format!("yb-ext-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn model() -> DeviceModel {
    DeviceModel::new(
        "thermostat",
        DeviceModelSpec {
            description: String::new(),
            properties: vec![
                PropertyModel { name: "temperature".into(), ty: PropertyType::Float, ..Default::default() },
                PropertyModel {
                    name: "setpoint".into(),
                    ty: PropertyType::Float,
                    access_mode: AccessMode::ReadWrite,
                    maximum: Some(100.0),
                    ..Default::default()
                },
            ],
        },
    )
}

fn external_device(name: &str, config: Value) -> DeviceConfig {
    let visitor = |p: &str, ext: Value| PropertyVisitor { name: p.into(), external: Some(ext), ..Default::default() };
    let device = Device::new(
        name,
        DeviceSpec {
            model: "thermostat".into(),
            node: "n1".into(),
            protocol: Protocol::External(ExternalConnection { mapper: "tcp-line".into(), config }),
            properties: vec![visitor("temperature", json!({"name": "temp"})), visitor("setpoint", json!({}))],
            collect_cycle: "200ms".into(),
            ..Default::default()
        },
    );
    DeviceConfig { device: Arc::new(device), model: Arc::new(model()) }
}

struct Agent {
    host: MapperHost,
    socket: PathBuf,
    _dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.host.shutdown();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// A host with the standard drivers and the mapper socket.
async fn start_agent(tag: &str, heartbeat: Duration) -> Agent {
    let dir = temp_dir(tag);
    let registry = ExternalRegistry::new(heartbeat);
    let bus = Arc::new(MemoryBus::new());
    let (tx, mut rx) = mpsc::channel(256);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let host = MapperHost::new("n1", None, bus.clone(), standard_drivers(bus, Some(registry.clone())), tx);
    let socket = dir.join("mapper.sock");
    let server = serve_unix(host.clone(), registry, socket.clone());
    tokio::spawn(async move {
        if let Err(e) = server.await {
            panic!("mapper socket: {e}");
        }
    });
    eventually("the mapper socket", || std::os::unix::net::UnixStream::connect(&socket).ok()).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).expect("socket exists").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    Agent { host, socket, _dir: dir }
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One request with `Connection: close`; returns the status and JSON body.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A server refusing a large body may close before reading all of it.
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time");
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let s = UnixStream::connect(socket).await.expect("connect to the mapper socket");
    let body = body.map(|b| b.to_string());
    request(s, method, path, body.as_deref()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapper_protocol_over_the_socket() {
    let agent = start_agent("proto", Duration::from_secs(5)).await;
    let sock = agent.socket.as_path();
    agent.host.apply(vec![external_device("boiler", json!({"host": "127.0.0.1", "port": 1}))]);

    // No mapper yet: the device cannot connect, and says why.
    eventually("the no-mapper error", || {
        let t = agent.host.twin("boiler")?;
        t.last_error.contains("no external mapper \"tcp-line\" is registered").then_some(())
    })
    .await;
    let (code, err) = call(sock, "GET", "/v1/mappers/tcp-line/devices", None).await;
    assert_eq!((code, err["code"].clone()), (404, json!(404)), "{err}");

    // Register; bad names are refused.
    let (code, err) = call(sock, "POST", "/v1/mappers", Some(json!({"name": "no spaces"}))).await;
    assert_eq!(code, 400, "{err}");
    let (code, err) = call(sock, "POST", "/v1/mappers", Some(json!({"name": "x", "colour": "red"}))).await;
    assert_eq!(code, 400, "unknown fields are refused: {err}");
    let (code, reg) =
        call(sock, "POST", "/v1/mappers", Some(json!({"name": "tcp-line", "protocols": ["tcp-line"]}))).await;
    assert_eq!(code, 200, "{reg}");
    assert_eq!(reg, json!({"mapper": "tcp-line", "heartbeatSeconds": 5}));

    // The device list: model, spec without desired, the external settings.
    let (code, list) = call(sock, "GET", "/v1/mappers/tcp-line/devices", None).await;
    assert_eq!(code, 200, "{list}");
    let v0 = list["version"].as_u64().expect("version");
    let d = &list["devices"][0];
    assert_eq!(d["name"], json!("boiler"));
    assert_eq!(d["spec"]["protocol"]["external"]["config"], json!({"host": "127.0.0.1", "port": 1}));
    assert_eq!(d["spec"]["properties"][0]["external"], json!({"name": "temp"}));
    assert_eq!(d["collectCycleMs"], json!(200));
    assert_eq!(d["model"]["properties"][1]["accessMode"], json!("ReadWrite"));
    assert_eq!(d["desired"], json!({}));
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1));

    // Nothing changed: the long-poll waits (capped at the heartbeat) and
    // answers with the same version.
    let (code, same) = call(sock, "GET", &format!("/v1/mappers/tcp-line/devices?since={v0}&wait=1s"), None).await;
    assert_eq!((code, same["version"].as_u64()), (200, Some(v0)));

    // Registered but silent about the device: still not online.
    assert_ne!(agent.host.twin("boiler").expect("twin").state, DeviceState::Online);

    // A push with any problem is refused whole, saying what is wrong.
    let bad = json!({"readings": [
        {"property": "temperature", "value": 20.5, "ts": 1000},
        {"property": "humidity", "value": 40},
        {"property": "setpoint", "value": "warm"},
        {"property": "setpoint"}
    ], "state": "online"});
    let (code, err) = call(sock, "POST", "/v1/devices/boiler/readings", Some(bad)).await;
    assert_eq!(code, 400, "{err}");
    let details: Vec<String> = serde_json::from_value(err["details"].clone()).expect("details");
    assert_eq!(details.len(), 3, "{details:?}");
    assert!(
        details[0].starts_with("readings[1].property: device \"boiler\" has no property \"humidity\""),
        "{details:?}"
    );
    assert!(details[1].contains("readings[2].value: \"warm\" is not a value of type float"), "{details:?}");
    assert!(details[2].contains("readings[3].value: missing"), "{details:?}");
    assert_ne!(agent.host.twin("boiler").expect("twin").state, DeviceState::Online, "nothing was applied");
    let (code, _) = call(sock, "POST", "/v1/devices/ghost/readings", Some(json!({"readings": []}))).await;
    assert_eq!(code, 404);
    let (code, _) =
        call(sock, "POST", "/v1/devices/boiler/readings", Some(json!({"readings": [], "state": "sideways"}))).await;
    assert_eq!(code, 400);

    // A good push: online, the value in the twin with the mapper's timestamp.
    let good = json!({"readings": [{"property": "temperature", "value": 20.5, "ts": 1_000}], "state": "online"});
    let (code, ok) = call(sock, "POST", "/v1/devices/boiler/readings", Some(good)).await;
    assert_eq!(code, 200, "{ok}");
    assert_eq!(ok, json!({"accepted": 1, "acknowledged": []}));
    eventually("the pushed reading in the twin", || {
        let t = agent.host.twin("boiler")?;
        let r = t.twins.get("temperature")?.reported.clone()?;
        (t.state == DeviceState::Online && r.value == json!(20.5) && r.timestamp == 1_000).then_some(())
    })
    .await;

    // A desired value set on the edge reaches the mapper through the
    // long-poll, which answers early with a new version.
    let poll = {
        let sock = sock.to_path_buf();
        tokio::spawn(async move {
            call(&sock, "GET", &format!("/v1/mappers/tcp-line/devices?since={v0}&wait=30s"), None).await
        })
    };
    let version = agent.host.set_local("boiler", "setpoint", json!(42.5)).expect("set");
    // Keep the mapper alive while the host writes (the poll is a heartbeat).
    let (desired, list) = loop {
        let (code, list) = call(sock, "GET", "/v1/mappers/tcp-line/devices", None).await;
        assert_eq!(code, 200);
        if let Some(d) = list["devices"][0]["desired"].get("setpoint") {
            break (d.clone(), list);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(desired["value"], json!(42.5));
    let mapper_version = desired["version"].as_u64().expect("version");
    assert!(list["version"].as_u64() > Some(v0));
    let (code, early) = tokio::time::timeout(PATIENCE, poll).await.expect("long-poll answers").expect("poll task");
    assert_eq!(code, 200);
    assert_ne!(early["version"].as_u64(), Some(v0), "the long-poll answered because something changed");

    // The mapper acknowledges the version it applied: observed at once.
    let ack = json!({"readings": [], "observedDesired": {"setpoint": mapper_version}});
    let (code, ok) = call(sock, "POST", "/v1/devices/boiler/readings", Some(ack)).await;
    assert_eq!(code, 200, "{ok}");
    assert_eq!(ok["acknowledged"], json!(["setpoint"]));
    let t = agent.host.twin("boiler").expect("twin");
    assert_eq!(t.twins["setpoint"].observed_desired, version);

    // The mapper says the device is offline: offline after the usual failures.
    let off = json!({"state": "offline", "error": "connection refused"});
    let beat = async {
        loop {
            let (code, _) = call(sock, "POST", "/v1/devices/boiler/readings", Some(off.clone())).await;
            assert_eq!(code, 200);
            if agent.host.twin("boiler").is_some_and(|t| t.state == DeviceState::Offline) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PATIENCE, beat).await.expect("offline in time");
    let t = agent.host.twin("boiler").expect("twin");
    assert!(t.last_error.contains("reports the device offline: connection refused"), "{}", t.last_error);

    // Mappers are listed with their devices.
    let (code, mappers) = call(sock, "GET", "/v1/mappers", None).await;
    assert_eq!(code, 200);
    assert_eq!(mappers[0]["name"], json!("tcp-line"));
    assert_eq!(mappers[0]["devices"], json!(["boiler"]));

    // A detached device disappears from the mapper's list.
    agent.host.apply(vec![]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (code, list) = call(sock, "GET", "/v1/mappers/tcp-line/devices", None).await;
        assert_eq!(code, 200);
        if list["devices"] == json!([]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the detached device stays listed: {list}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn spawn_python(py: &str, script: &str, args: &[&str]) -> Child {
    Command::new(py)
        .arg("-u")
        .arg(examples().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"))
}

/// Asks the simulated device directly (its own protocol).
async fn ask_device(port: u16, line: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the device");
    s.write_all(format!("{line}\n").as_bytes()).await.expect("send");
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, r.read_line(&mut answer)).await.expect("device answers").expect("read");
    answer.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mapper_drives_a_tcp_line_device() {
    let Some(py) = python3() else { return };
    let agent = start_agent("py", Duration::from_secs(1)).await;

    let mut device =
        spawn_python(py, "tcp_line_device.py", &["--port", "0", "--prop", "temp=21.5", "--prop", "setpoint=20"]).await;
    let mut out = BufReader::new(device.stdout.take().expect("device stdout")).lines();
    let first = tokio::time::timeout(PATIENCE, out.next_line())
        .await
        .expect("device starts")
        .expect("read")
        .unwrap_or_default();
    let port: u16 = first
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("device said {first:?}"));

    agent.host.apply(vec![external_device("boiler", json!({"host": "127.0.0.1", "port": port}))]);
    let sock = agent.socket.to_str().expect("utf-8 path").to_string();
    let mut mapper = spawn_python(py, "tcp_line_mapper.py", &["--socket", &sock]).await;

    // Readings arrive and the device is online.
    eventually("the device online with the device's temperature", || {
        let t = agent.host.twin("boiler")?;
        let temp = t.twins.get("temperature")?.reported.clone()?;
        (t.state == DeviceState::Online && temp.value == json!(21.5)).then_some(())
    })
    .await;

    // A desired value reaches the device and is observed.
    let version = agent.host.set_local("boiler", "setpoint", json!(42.5)).expect("set");
    eventually("observedDesired to reach the local version", || {
        let t = agent.host.twin("boiler")?;
        let s = t.twins.get("setpoint")?;
        (s.observed_desired >= version).then_some(())
    })
    .await;
    assert_eq!(ask_device(port, "GET setpoint").await, "42.5", "the device holds the written value");
    let set_line = tokio::time::timeout(PATIENCE, out.next_line()).await.expect("device logs the SET").expect("read");
    assert_eq!(set_line.as_deref(), Some("SET setpoint 42.5"));
    eventually("the new setpoint read back", || {
        let t = agent.host.twin("boiler")?;
        (t.twins.get("setpoint")?.reported.as_ref()?.value == json!(42.5)).then_some(())
    })
    .await;

    // The device goes away: the mapper reports it offline.
    device.kill().await.expect("kill device");
    eventually("offline while the device is gone", || {
        let t = agent.host.twin("boiler")?;
        (t.state == DeviceState::Offline && t.last_error.contains("reports the device offline")).then_some(())
    })
    .await;

    // The mapper dies: its heartbeats stop and the device stays offline
    // with the mapper named as the reason.
    mapper.kill().await.expect("kill mapper");
    eventually("offline because the mapper is gone", || {
        let t = agent.host.twin("boiler")?;
        (t.state == DeviceState::Offline && t.last_error.contains("missed its heartbeats")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mapper_death_takes_an_online_device_offline() {
    let Some(py) = python3() else { return };
    let agent = start_agent("death", Duration::from_secs(1)).await;
    let mut device =
        spawn_python(py, "tcp_line_device.py", &["--port", "0", "--prop", "temp=19", "--prop", "setpoint=5"]).await;
    let mut out = BufReader::new(device.stdout.take().expect("device stdout")).lines();
    let first = tokio::time::timeout(PATIENCE, out.next_line())
        .await
        .expect("device starts")
        .expect("read")
        .unwrap_or_default();
    let port: u16 = first
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("device said {first:?}"));
    agent.host.apply(vec![external_device("boiler", json!({"host": "127.0.0.1", "port": port}))]);
    let sock = agent.socket.to_str().expect("utf-8 path").to_string();
    let mut mapper = spawn_python(py, "tcp_line_mapper.py", &["--socket", &sock]).await;
    eventually("online", || (agent.host.twin("boiler")?.state == DeviceState::Online).then_some(())).await;
    mapper.kill().await.expect("kill mapper");
    eventually("offline after the mapper died", || {
        let t = agent.host.twin("boiler")?;
        (t.state == DeviceState::Offline && t.last_error.contains("missed its heartbeats")).then_some(())
    })
    .await;
    let t = agent.host.twin("boiler").expect("twin");
    assert_eq!(
        t.twins["temperature"].reported.as_ref().map(|r| r.quality),
        Some(Quality::Bad),
        "last value kept, quality bad"
    );
}

async fn send_raw(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let s = UnixStream::connect(socket).await.expect("connect");
    common_raw::exchange(s, bytes, PATIENCE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_mapper_socket_gets_errors_and_it_keeps_serving() {
    let agent = start_agent("garbage", Duration::from_secs(5)).await;
    let sock = agent.socket.as_path();
    agent.host.apply(vec![external_device("boiler", json!({}))]);
    for seed in 1..=20u64 {
        let answer = send_raw(sock, &garbage(seed, 50 + seed as usize * 131)).await;
        assert_4xx_or_closed(&answer, &format!("random bytes, seed {seed}"));
    }
    for bytes in [
        &b"POST /v1/map"[..],
        b"POST /v1/mappers HTTP/1.1\r\nHost: x\r\nContent-Len",
        b"POST /v1/mappers HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"name\":",
        b"POST /v1/devices/boiler/readings HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n\xff\xfe\x00garbag",
        b"GET /v1/mappers/tcp-line/devices?since=-1 HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let answer = send_raw(sock, bytes).await;
        assert_4xx_or_closed(&answer, &String::from_utf8_lossy(bytes));
    }
    // Huge bodies: refused.
    let mut s = UnixStream::connect(sock).await.expect("connect");
    let head = "POST /v1/devices/boiler/readings HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1073741824\r\n\r\n";
    s.write_all(head.as_bytes()).await.expect("send head");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 413"), "{:?}", String::from_utf8_lossy(&buf));
    let big = json!({"readings": [{"property": "temperature", "value": 1, "error": "x".repeat(200_000)}]});
    let (code, err) = call(sock, "POST", "/v1/devices/boiler/readings", Some(big)).await;
    assert_eq!(code, 413, "{err}");
    // Bad JSON, wrong shapes.
    let (code, _) = call(sock, "POST", "/v1/mappers", Some(json!([1, 2]))).await;
    assert_eq!(code, 400);
    let (code, _) = call(sock, "POST", "/v1/devices/boiler/readings", Some(json!({"readings": "all of them"}))).await;
    assert_eq!(code, 400);

    // Still serving.
    let (code, reg) = call(sock, "POST", "/v1/mappers", Some(json!({"name": "tcp-line"}))).await;
    assert_eq!(code, 200, "{reg}");
    let (code, list) = call(sock, "GET", "/v1/mappers/tcp-line/devices", None).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["devices"][0]["name"], json!("boiler"));
}
