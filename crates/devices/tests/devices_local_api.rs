//! The local device API over real TCP: list, device, property twin, desired
//! writes with and without `?wait=`, model errors as JSON, 404s, and garbage
//! that gets 4xx (or a closed connection) while the server keeps serving.

mod common_raw;

use common_raw::{assert_4xx_or_closed, garbage};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use yunbian_api::*;
use yunbian_devices::host::MapperHost;
use yunbian_devices::{local_api, standard_drivers, DeviceConfig, MemoryBus};

/// Upper bound for any wait in these tests (a hung server fails the test;
/// nothing measures how long things take).
const PATIENCE: Duration = Duration::from_secs(30);

fn virtual_device() -> DeviceConfig {
    let model = DeviceModel::new(
        "thermostat",
        DeviceModelSpec {
            description: String::new(),
            properties: vec![
                PropertyModel { name: "temperature".into(), ty: PropertyType::Float, ..Default::default() },
                PropertyModel {
                    name: "setpoint".into(),
                    ty: PropertyType::Float,
                    access_mode: AccessMode::ReadWrite,
                    minimum: Some(0.0),
                    maximum: Some(100.0),
                    ..Default::default()
                },
            ],
        },
    );
    let constant = |name: &str, v: Value| PropertyVisitor {
        name: name.into(),
        generator: Some(Generator::Constant { value: v }),
        ..Default::default()
    };
    let device = Device::new(
        "vd1",
        DeviceSpec {
            model: "thermostat".into(),
            node: "n1".into(),
            protocol: Protocol::Virtual(VirtualDevice { seed: 1 }),
            properties: vec![constant("temperature", json!(21.5)), constant("setpoint", json!(20.0))],
            collect_cycle: "100ms".into(),
            ..Default::default()
        },
    );
    DeviceConfig { device: Arc::new(device), model: Arc::new(model) }
}

struct Fixture {
    host: MapperHost,
    addr: std::net::SocketAddr,
}

async fn start() -> Fixture {
    let bus = Arc::new(MemoryBus::new());
    let (tx, mut rx) = mpsc::channel(256);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let host = MapperHost::new("n1", None, bus.clone(), standard_drivers(bus, None), tx);
    host.apply(vec![virtual_device()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(local_api::serve_tcp_listener(host.clone(), listener));
    Fixture { host, addr }
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
        "{method} {path} HTTP/1.1\r\nHost: local\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time").expect("read answer");
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(buf);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    request(TcpStream::connect(addr).await.expect("connect"), method, path, body).await
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_device_and_property_twins() {
    let f = start().await;
    eventually("the virtual device online", || (f.host.twin("vd1")?.state == DeviceState::Online).then_some(())).await;

    let (code, list) = call(f.addr, "GET", "/v1/devices", None).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list, json!([{"name": "vd1", "model": "thermostat", "protocol": "virtual", "state": "online"}]));

    let (code, dev) = call(f.addr, "GET", "/v1/devices/vd1", None).await;
    assert_eq!(code, 200, "{dev}");
    assert_eq!(
        (dev["name"].clone(), dev["model"].clone(), dev["protocol"].clone()),
        (json!("vd1"), json!("thermostat"), json!("virtual"))
    );
    assert_eq!(dev["status"]["state"], json!("online"));
    assert_eq!(dev["status"]["twins"]["temperature"]["reported"]["value"], json!(21.5));

    let (code, twin) = call(f.addr, "GET", "/v1/devices/vd1/properties/temperature", None).await;
    assert_eq!(code, 200, "{twin}");
    assert_eq!(twin["reported"]["value"], json!(21.5));
    assert_eq!(twin["reported"]["quality"], json!("good"));

    let (code, err) = call(f.addr, "GET", "/v1/devices/ghost", None).await;
    assert_eq!(code, 404);
    assert_eq!(err["code"], json!(404));
    assert!(err["message"].as_str().unwrap_or("").contains("ghost"), "{err}");
    let (code, _) = call(f.addr, "GET", "/v1/devices/vd1/properties/ghost", None).await;
    assert_eq!(code, 404);
    let (code, err) = call(f.addr, "GET", "/v2/nothing", None).await;
    assert_eq!((code, err["code"].clone()), (404, json!(404)));
    let (code, err) = call(f.addr, "DELETE", "/v1/devices", None).await;
    assert_eq!((code, err["code"].clone()), (405, json!(405)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_writes_are_versioned_observed_and_checked_against_the_model() {
    let f = start().await;

    // Waiting for the outcome: the virtual device holds what is written.
    let (code, ans) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired?wait=20s", Some("55")).await;
    assert_eq!(code, 200, "{ans}");
    let v1 = ans["version"].as_u64().expect("version");
    assert_eq!(ans["outcome"], json!("applied"), "{ans}");
    assert!(ans["observedDesired"].as_u64().expect("observedDesired") >= v1, "{ans}");
    eventually("the written value read back", || {
        (f.host.twin("vd1")?.twins.get("setpoint")?.reported.as_ref()?.value == json!(55)).then_some(())
    })
    .await;

    // Without waiting, `{"value": …}` form: a higher version, observed later.
    let (code, ans) =
        call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired", Some(r#"{"value": 60.5}"#)).await;
    assert_eq!(code, 200, "{ans}");
    let v2 = ans["version"].as_u64().expect("version");
    assert!(v2 > v1, "versions grow: {v1} then {v2}");
    assert!(ans.get("outcome").is_none(), "{ans}");
    eventually("observedDesired to reach the second version", || {
        let t = f.host.twin("vd1")?;
        let s = t.twins.get("setpoint")?;
        (s.observed_desired >= v2 && s.reported.as_ref()?.value == json!(60.5)).then_some(())
    })
    .await;
    let (_, twin) = call(f.addr, "GET", "/v1/devices/vd1/properties/setpoint", None).await;
    assert_eq!(twin["desired"]["value"], json!(60.5));
    assert_eq!(twin["desired"]["source"], json!("local"));
    assert_eq!(twin["observedDesired"], json!(v2));

    // The model's refusals, as the cloud words them.
    let (code, err) = call(f.addr, "PUT", "/v1/devices/vd1/properties/temperature/desired", Some("30")).await;
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["code"], json!(400));
    assert!(err["message"].as_str().unwrap_or("").contains("ReadOnly"), "{err}");
    let (code, err) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired", Some("500")).await;
    assert_eq!(code, 400);
    assert!(err["message"].as_str().unwrap_or("").contains("above the maximum 100"), "{err}");
    let (code, err) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired", Some(r#""hot""#)).await;
    assert_eq!(code, 400);
    assert!(err["message"].as_str().unwrap_or("").contains("not a value of type float"), "{err}");
    let (code, _) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired", Some("{not json")).await;
    assert_eq!(code, 400);
    let (code, _) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired", None).await;
    assert_eq!(code, 400);
    let (code, _) = call(f.addr, "PUT", "/v1/devices/vd1/properties/setpoint/desired?wait=soon", Some("1")).await;
    assert_eq!(code, 400);
    let (code, err) = call(f.addr, "PUT", "/v1/devices/ghost/properties/setpoint/desired", Some("1")).await;
    assert_eq!((code, err["code"].clone()), (404, json!(404)));
    // Nothing refused changed the desired value.
    assert_eq!(f.host.twin("vd1").expect("twin").twins["setpoint"].desired.as_ref().map(|d| d.version), Some(v2));
}

/// Sends `bytes` then closes the write half; returns what came back.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.expect("connect");
    common_raw::exchange(s, bytes, PATIENCE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_errors_and_the_server_keeps_serving() {
    let f = start().await;
    for seed in 1..=20u64 {
        let answer = send_raw(f.addr, &garbage(seed, 64 + seed as usize * 97)).await;
        assert_4xx_or_closed(&answer, &format!("random bytes, seed {seed}"));
    }
    // Truncated request line, truncated headers, truncated body.
    for bytes in [
        &b"PUT /v1/devi"[..],
        b"PUT /v1/devices/vd1/properties/setpoint/desired HTTP/1.1\r\nHost: x\r\nContent-Le",
        b"PUT /v1/devices/vd1/properties/setpoint/desired HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"value\":",
        b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ] {
        let answer = send_raw(f.addr, bytes).await;
        assert_4xx_or_closed(&answer, &String::from_utf8_lossy(bytes));
    }
    // A declared huge body is refused before it is read.
    let (code, err) = {
        let mut s = TcpStream::connect(f.addr).await.expect("connect");
        let head = "PUT /v1/devices/vd1/properties/setpoint/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 104857600\r\n\r\n";
        s.write_all(head.as_bytes()).await.expect("send head");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time");
        parse_response(&buf)
    };
    assert_eq!(code, 413, "{err}");
    assert!(err["message"].as_str().unwrap_or("").contains("65536"), "{err}");
    // A chunked body past the limit: refused (or cut off), never buffered whole.
    {
        let mut s = TcpStream::connect(f.addr).await.expect("connect");
        let head =
            "PUT /v1/devices/vd1/properties/setpoint/desired HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).await;
        let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "1".repeat(16 * 1024));
        for _ in 0..16 {
            if s.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("answer in time");
        assert_4xx_or_closed(&buf, "chunked huge body");
    }
    // Still serving, and nothing above changed the desired value.
    let (code, list) = call(f.addr, "GET", "/v1/devices", None).await;
    assert_eq!(code, 200, "{list}");
    assert!(f.host.twin("vd1").expect("twin").twins["setpoint"].desired.is_none());
}
