//! The OPC UA driver against a real peer: a python `asyncua` server
//! (`tests/peers/opcua_server.py`), driven only through the [`Driver`] trait.
//!
//! Every test starts its own server on a free port. Waits on the peer are
//! bounded loops on observed behaviour (a value changed, an error came);
//! their limits only turn a hang into a failure, nothing asserts durations.
//!
//! When python3 or asyncua is missing, the tests print `SKIP:` and pass,
//! except under `CI`, where they fail saying what is missing.

#![cfg(feature = "opcua")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use yunbian_api::device::{OpcuaConnection, OpcuaVisitor, SecurityMode, SecurityPolicy};
use yunbian_api::{
    check_device_against_model, AccessMode, Device, DeviceModel, DeviceModelSpec, DeviceSpec, PropertyModel,
    PropertyType, PropertyVisitor, Protocol, Quality,
};
use yunbian_devices::driver::{DeviceConfig, Driver, DriverError, PropertyRead, WriteError};
use yunbian_devices::opcua::OpcuaDriver;

/// Longest a peer may take to start, or a bounded wait may last, before the
/// test fails (a guard against hangs, not a performance assertion).
const LIMIT: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/opcua_server.py")
}

/// Whether python3 with asyncua is here; panics under `CI` when it is not.
fn peer_available(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import asyncua"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: the OPC UA test peer needs python3 with asyncua (pip install asyncua)");
    }
    println!("SKIP: {test}: python3 with asyncua is missing (pip install asyncua)");
    false
}

/// A running asyncua server, killed on drop.
struct Peer {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
}

impl Peer {
    /// Starts on a port outside the ephemeral range, so a restart on the
    /// same port finds it free.
    fn start(args: &[&str]) -> Peer {
        Self::start_on(yunbian_faults::ports::free_port(), args.iter().map(|s| s.to_string()).collect())
    }

    fn start_on(port: u16, args: Vec<String>) -> Peer {
        let mut child = Command::new("python3")
            .arg(script())
            .arg("--port")
            .arg(port.to_string())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        let mut peer = Peer { child, port: 0, lines, args };
        let start = Instant::now();
        loop {
            let ready =
                peer.lines.lock().expect("lines").iter().find_map(|l| l.strip_prefix("READY ").map(str::to_owned));
            if let Some(p) = ready {
                peer.port = p.trim().parse().expect("port number");
                return peer;
            }
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!("the OPC UA peer exited before it was ready: {status}");
            }
            assert!(start.elapsed() < LIMIT, "the OPC UA peer did not get ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/yunbian/", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new server on the same port with the same arguments.
    fn restart(mut self) -> Peer {
        self.kill();
        let (port, args) = (self.port, std::mem::take(&mut self.args));
        // The port may linger a moment after the kill; retry the start.
        let start = Instant::now();
        loop {
            let child = std::panic::catch_unwind(|| Peer::start_on(port, args.clone()));
            match child {
                Ok(p) => return p,
                Err(_) if start.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    /// Waits until the server printed `line` (its own view of a write).
    async fn saw(&self, line: &str) {
        let start = Instant::now();
        while !self.lines.lock().expect("lines").iter().any(|l| l == line) {
            let seen = self.lines.lock().expect("lines").clone();
            assert!(start.elapsed() < LIMIT, "the server never printed {line:?}; it printed {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One property of the test device: name, model type, node id, writable.
struct Prop(&'static str, PropertyType, &'static str, bool);

fn config(conn: OpcuaConnection, collect_cycle: &str, props: &[Prop]) -> DeviceConfig {
    let model = DeviceModelSpec {
        description: String::new(),
        properties: props
            .iter()
            .map(|p| PropertyModel {
                name: p.0.into(),
                ty: p.1,
                access_mode: if p.3 { AccessMode::ReadWrite } else { AccessMode::ReadOnly },
                ..Default::default()
            })
            .collect(),
    };
    let spec = DeviceSpec {
        model: "opcua-model".into(),
        node: "edge-1".into(),
        protocol: Protocol::Opcua(conn),
        properties: props
            .iter()
            .map(|p| PropertyVisitor {
                name: p.0.into(),
                opcua: Some(OpcuaVisitor { node_id: p.2.into() }),
                ..Default::default()
            })
            .collect(),
        collect_cycle: collect_cycle.into(),
        ..Default::default()
    };
    let errs = check_device_against_model(&spec, &model);
    assert!(errs.is_empty(), "test device does not match its model: {errs:?}");
    DeviceConfig {
        device: Arc::new(Device::new("plc-1", spec)),
        model: Arc::new(DeviceModel::new("opcua-model", model)),
    }
}

fn conn(peer: &Peer) -> OpcuaConnection {
    OpcuaConnection { endpoint: peer.endpoint(), timeout: "5s".into(), ..Default::default() }
}

fn all_types() -> Vec<Prop> {
    use PropertyType::*;
    vec![
        Prop("sbyte", Int, "ns=2;s=SByte", false),
        Prop("byte", Int, "ns=2;s=Byte", false),
        Prop("int16", Int, "ns=2;s=Int16", false),
        Prop("uint16", Int, "ns=2;s=UInt16", false),
        Prop("int32", Int, "ns=2;s=Int32", false),
        Prop("uint32", Int, "ns=2;s=UInt32", false),
        Prop("int64", Int, "ns=2;s=Int64", false),
        Prop("uint64", Int, "ns=2;s=UInt64", false),
        Prop("float", Float, "ns=2;s=Float", false),
        Prop("double", Float, "ns=2;s=Double", false),
        Prop("bool", Bool, "ns=2;s=Bool", false),
        Prop("string", String, "ns=2;s=String", false),
        Prop("bytes", Bytes, "ns=2;s=Bytes", false),
        Prop("uncertain", Float, "ns=2;s=Uncertain", false),
    ]
}

fn value_of<'a>(reads: &'a [PropertyRead], name: &str) -> &'a Value {
    let r = reads.iter().find(|r| r.property == name).unwrap_or_else(|| panic!("no read of {name}: {reads:?}"));
    match &r.result {
        Ok(Some(reading)) => &reading.value,
        other => panic!("{name}: expected a value, got {other:?}"),
    }
}

async fn connected(cfg: &DeviceConfig) -> OpcuaDriver {
    let mut d = OpcuaDriver::new(cfg).expect("driver");
    d.connect().await.expect("connect");
    d
}

/// Reads `name` until `pred` holds for its value (bounded). A subscribed
/// property has no value (`Ok(None)`) until its first notification.
async fn read_until(d: &mut OpcuaDriver, name: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let reads = d.read(&[]).await.expect("read");
        let read = reads.iter().find(|r| r.property == name).expect("asked property");
        let v = match &read.result {
            Ok(None) => Value::Null,
            Ok(Some(reading)) => reading.value.clone(),
            Err(e) => panic!("{name}: {e}"),
        };
        if !v.is_null() && pred(&v) {
            return v;
        }
        assert!(start.elapsed() < LIMIT, "{name} never reached the expected value; last {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_every_type_in_one_batch() {
    if !peer_available("reads_every_type_in_one_batch") {
        return;
    }
    let peer = Peer::start(&[]);
    let cfg = config(conn(&peer), "1s", &all_types());
    let mut d = connected(&cfg).await;
    let reads = d.read(&[]).await.expect("read");
    assert_eq!(reads.len(), all_types().len(), "one entry per property, in order");
    let expect = [
        ("sbyte", json!(-8)),
        ("byte", json!(200)),
        ("int16", json!(-1234)),
        ("uint16", json!(54321)),
        ("int32", json!(-123456)),
        ("uint32", json!(4_000_000_000u64)),
        ("int64", json!(-9_000_000_000i64)),
        ("uint64", json!(9_000_000_000u64)),
        ("float", json!(1.5)),
        ("double", json!(2.25)),
        ("bool", json!(true)),
        ("string", json!("hello")),
        ("bytes", json!([1, 2, 255])),
        ("uncertain", json!(9.5)),
    ];
    for ((name, want), read) in expect.iter().zip(&reads) {
        assert_eq!(&read.property, name, "order kept");
        let reading = read.result.as_ref().expect("ok").as_ref().expect("a value");
        assert_eq!(&reading.value, want, "{name}");
        assert!(reading.ts_ms > 1_600_000_000_000, "{name}: ts_ms is Unix ms: {}", reading.ts_ms);
        let quality = if *name == "uncertain" { Quality::Uncertain } else { Quality::Good };
        assert_eq!(reading.quality, quality, "{name}");
    }
    assert!(value_of(&reads, "int32").is_i64() && value_of(&reads, "double").is_f64());

    // A subset, in the order asked.
    let some = d.read(&["string".into(), "byte".into()]).await.expect("read some");
    assert_eq!(some.iter().map(|r| r.property.as_str()).collect::<Vec<_>>(), ["string", "byte"]);
    d.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_id_is_a_property_error_only() {
    if !peer_available("wrong_node_id_is_a_property_error_only") {
        return;
    }
    let peer = Peer::start(&[]);
    for (subscribe, cycle) in [(false, "1s"), (true, "100ms")] {
        let props = [
            Prop("good", PropertyType::Int, "ns=2;s=Int32", false),
            Prop("ghost", PropertyType::Int, "ns=2;s=NoSuchNode", false),
            Prop("text", PropertyType::String, "ns=2;s=String", false),
            // A type the node cannot carry: a property error too.
            Prop("mistyped", PropertyType::Bool, "ns=2;s=String", false),
        ];
        let cfg = config(OpcuaConnection { subscribe, ..conn(&peer) }, cycle, &props);
        let mut d = connected(&cfg).await;
        // Subscribed values arrive with the first publish.
        read_until(&mut d, "good", |v| v == &json!(-123456)).await;
        let reads = d.read(&[]).await.expect("device stays online");
        let ghost = reads[1].result.as_ref().expect_err("ghost is a property error");
        assert!(ghost.contains("BadNodeIdUnknown"), "subscribe={subscribe}: {ghost}");
        assert_eq!(value_of(&reads, "text"), &json!("hello"));
        let mistyped = reads[3].result.as_ref().expect_err("mistyped");
        assert!(mistyped.contains("String") && mistyped.contains("bool"), "{mistyped}");
        d.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_and_subscribed_reads_follow_a_changing_counter() {
    if !peer_available("polled_and_subscribed_reads_follow_a_changing_counter") {
        return;
    }
    let peer = Peer::start(&[]);
    for subscribe in [false, true] {
        let props = [
            Prop("counter", PropertyType::Int, "ns=2;s=Counter", false),
            Prop("fixed", PropertyType::Int, "ns=2;s=Int32", false),
        ];
        let cfg = config(OpcuaConnection { subscribe, ..conn(&peer) }, "100ms", &props);
        let mut d = connected(&cfg).await;
        let first = read_until(&mut d, "counter", |v| v.is_i64()).await;
        let first = first.as_i64().expect("int");
        let later = read_until(&mut d, "counter", |v| v.as_i64().is_some_and(|n| n > first)).await;
        assert!(later.as_i64().expect("int") > first, "subscribe={subscribe}");
        if subscribe {
            // An unchanged value comes again with the same timestamp.
            let ts = |reads: &[PropertyRead]| match &reads[1].result {
                Ok(Some(r)) => (r.value.clone(), r.ts_ms),
                other => panic!("fixed: {other:?}"),
            };
            let a = ts(&d.read(&[]).await.expect("read"));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let b = ts(&d.read(&[]).await.expect("read"));
            assert_eq!(a, b, "a value that did not change keeps its timestamp");
        }
        d.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_converts_to_the_node_type_and_reads_back() {
    if !peer_available("write_converts_to_the_node_type_and_reads_back") {
        return;
    }
    let peer = Peer::start(&[]);
    for subscribe in [false, true] {
        let props = [
            Prop("setpoint", PropertyType::Float, "ns=2;s=SetpointDouble", true),
            Prop("mode", PropertyType::Int, "ns=2;s=ModeInt32", true),
            Prop("label", PropertyType::String, "ns=2;s=LabelString", true),
            Prop("flag", PropertyType::Bool, "ns=2;s=FlagBool", true),
            Prop("small", PropertyType::Int, "ns=2;s=SmallByte", true),
            Prop("fixed", PropertyType::Int, "ns=2;s=ReadOnlyInt", true),
            Prop("ghost", PropertyType::Int, "ns=2;s=NoSuchNode", true),
        ];
        let cfg = config(OpcuaConnection { subscribe, ..conn(&peer) }, "100ms", &props);
        let mut d = connected(&cfg).await;
        let n = if subscribe { 2 } else { 1 };
        // A JSON integer to a Double node, and to an Int32 node.
        d.write("setpoint", &json!(40 + n)).await.expect("write setpoint");
        d.write("mode", &json!(6 + n)).await.expect("write mode");
        d.write("label", &json!(format!("run{n}"))).await.expect("write label");
        d.write("flag", &json!(n == 1)).await.expect("write flag");
        d.write("small", &json!(10 + n)).await.expect("write small");
        // The supervisor's verification read sees the written values at once.
        let names: Vec<String> = ["setpoint", "mode", "label", "flag", "small"].map(String::from).to_vec();
        let back = d.read(&names).await.expect("read back");
        assert_eq!(value_of(&back, "setpoint"), &json!((40 + n) as f64));
        assert_eq!(value_of(&back, "mode"), &json!(6 + n));
        assert_eq!(value_of(&back, "label"), &json!(format!("run{n}")));
        assert_eq!(value_of(&back, "flag"), &json!(n == 1));
        assert_eq!(value_of(&back, "small"), &json!(10 + n));
        // The server saw the writes with its own types.
        peer.saw(&format!("CHANGED SetpointDouble {}.0", 40 + n)).await;
        peer.saw(&format!("CHANGED ModeInt32 {}", 6 + n)).await;
        peer.saw(&format!("CHANGED LabelString 'run{n}'")).await;
        peer.saw(&format!("CHANGED FlagBool {}", if n == 1 { "True" } else { "False" })).await;

        // Refusals: out of range for the node's type, read-only node, unknown node.
        match d.write("small", &json!(300)).await {
            Err(WriteError::Refused(why)) => assert!(why.contains("out of range for Byte"), "{why}"),
            other => panic!("300 to a Byte node: {other:?}"),
        }
        match d.write("fixed", &json!(1)).await {
            Err(WriteError::Refused(why)) => assert!(why.starts_with("Bad"), "status name: {why}"),
            other => panic!("read-only node: {other:?}"),
        }
        match d.write("ghost", &json!(1)).await {
            Err(WriteError::Refused(why)) => assert!(why.contains("BadNodeIdUnknown"), "{why}"),
            other => panic!("unknown node: {other:?}"),
        }
        // Still online after refusals.
        assert_eq!(value_of(&d.read(&["mode".into()]).await.expect("read"), "mode"), &json!(6 + n));
        d.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_loss_is_a_device_error_and_the_same_driver_reconnects() {
    if !peer_available("server_loss_is_a_device_error_and_the_same_driver_reconnects") {
        return;
    }
    for subscribe in [false, true] {
        let mut peer = Peer::start(&[]);
        let props = [Prop("counter", PropertyType::Int, "ns=2;s=Counter", false)];
        let cfg = config(OpcuaConnection { subscribe, ..conn(&peer) }, "100ms", &props);
        let mut d = connected(&cfg).await;
        read_until(&mut d, "counter", |v| v.is_i64()).await;

        peer.kill();
        let start = Instant::now();
        let err = loop {
            match d.read(&[]).await {
                Err(e) => break e,
                Ok(_) => {
                    assert!(start.elapsed() < LIMIT, "reads kept succeeding after the server was killed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert!(matches!(err, DriverError::Io(_) | DriverError::Timeout(_)), "subscribe={subscribe}: {err:?}");
        // Writes fail at the device level too, never as a refusal.
        assert!(matches!(d.write("counter", &json!(1)).await, Err(WriteError::Device(_))));
        // While the server is down, connecting fails with a device-level error.
        d.disconnect().await;
        let refused = d.connect().await.expect_err("no server");
        assert!(matches!(refused, DriverError::Connect(_) | DriverError::Timeout(_)), "{refused:?}");

        let _peer = peer.restart();
        let start = Instant::now();
        loop {
            d.disconnect().await;
            match d.connect().await {
                Ok(()) => break,
                Err(e) => {
                    assert!(start.elapsed() < LIMIT, "never reconnected: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // The restarted server counts from zero again; any value will do.
        read_until(&mut d, "counter", |v| v.is_i64()).await;
        d.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password() {
    if !peer_available("username_and_password") {
        return;
    }
    let peer = Peer::start(&["--user", "alice", "--password", "s3cret"]);
    let props = [Prop("int32", PropertyType::Int, "ns=2;s=Int32", false)];
    let login = |user: &str, password: &str| {
        config(OpcuaConnection { username: user.into(), password: password.into(), ..conn(&peer) }, "1s", &props)
    };

    let mut d = connected(&login("alice", "s3cret")).await;
    assert_eq!(value_of(&d.read(&[]).await.expect("read"), "int32"), &json!(-123456));
    d.disconnect().await;

    for (user, password) in [("alice", "wrong"), ("mallory", "s3cret"), ("", "")] {
        let mut d = OpcuaDriver::new(&login(user, password)).expect("driver");
        match d.connect().await {
            Err(DriverError::Connect(why)) => {
                assert!(why.contains("refused"), "user {user:?}: {why}");
                if !user.is_empty() {
                    assert!(why.contains("user name, password or certificate"), "says why: {why}");
                }
            }
            other => panic!("user {user:?} password {password:?}: expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic256sha256_sign_and_sign_and_encrypt() {
    if !peer_available("basic256sha256_sign_and_sign_and_encrypt") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("yunbian-opcua-test-{}", std::process::id()));
    let peer = Peer::start(&["--secure", dir.to_str().expect("utf-8 temp dir")]);
    let props = [Prop("string", PropertyType::String, "ns=2;s=String", false)];
    for mode in [SecurityMode::Sign, SecurityMode::SignAndEncrypt] {
        let cfg = config(
            OpcuaConnection {
                security_policy: SecurityPolicy::Basic256Sha256,
                security_mode: mode,
                // The first connect may create the client's key pair.
                timeout: "20s".into(),
                ..conn(&peer)
            },
            "1s",
            &props,
        );
        let mut d = connected(&cfg).await;
        assert_eq!(value_of(&d.read(&[]).await.expect("read"), "string"), &json!("hello"), "{mode:?}");
        d.disconnect().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
