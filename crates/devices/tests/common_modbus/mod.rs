//! Shared by the Modbus integration tests and the polling benchmark: the
//! pymodbus server process (`tests/peers/modbus_server.py`), the check for
//! the peers' tools, and device/model builders.
//!
//! The server talks over stdout lines (see the script's docstring): `PORT n`
//! when listening, `REQ …` per request received, `VALUES …` in answer to a
//! `get` command on stdin. Because stdout is ordered, a `get` answered means
//! every `REQ` line before it has been read: [`PyServer::requests`] uses that
//! as a barrier so request counts are exact, not timing-dependent.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use yunbian_api::{
    check_device_against_model, AccessMode, Device, DeviceModel, DeviceModelSpec, DeviceSpec, ModbusDataType,
    ModbusTcp, ModbusVisitor, PropertyModel, PropertyType, PropertyVisitor, Protocol, RegisterType,
};
use yunbian_devices::driver::DeviceConfig;

/// How long a peer may take to start before the test fails.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The server script.
pub fn server_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/modbus_server.py")
}

/// Whether python3 with pymodbus (and `socat` when `need_socat`) are here.
/// When they are not: panics under `CI`, else prints `SKIP:` and returns false.
pub fn peers_available(test: &str, need_socat: bool) -> bool {
    let mut missing = Vec::new();
    let py = Command::new("python3")
        .args(["-c", "import pymodbus, sys; sys.exit(0 if pymodbus.__version__.startswith('3.') else 3)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match py {
        Err(_) => missing.push("python3"),
        Ok(s) if !s.success() => missing.push("pymodbus 3.x (pip install 'pymodbus>=3.8,<4')"),
        Ok(_) => {}
    }
    if need_socat {
        let socat = Command::new("socat").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !socat.is_ok_and(|s| s.success()) {
            missing.push("socat (apt-get install socat)");
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: the Modbus test peers are missing: {}", missing.join(", "));
    }
    println!("SKIP: {test}: missing {}", missing.join(", "));
    false
}

/// Output lines of a peer, and a condition to wait on.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A pymodbus server process, killed on drop.
pub struct PyServer {
    child: Child,
    stdin: ChildStdin,
    lines: Arc<Lines>,
    /// Ports it listens on (TCP mode).
    pub ports: Vec<u16>,
    /// Lines already consumed by `get`.
    seen_values: usize,
}

impl PyServer {
    /// Starts `modbus_server.py tcp` with extra `args` and waits for its ports.
    pub fn tcp(args: &[&str]) -> PyServer {
        let mut s = Self::spawn("tcp", args);
        let want = args.iter().position(|a| *a == "--ports").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(1);
        s.wait_for(|lines| lines.iter().filter(|l| l.starts_with("PORT ")).count() >= want, "its ports");
        s.ports = s
            .lines
            .lines
            .lock()
            .expect("lines lock")
            .iter()
            .filter_map(|l| l.strip_prefix("PORT ")?.trim().parse().ok())
            .collect();
        s
    }

    /// Starts `modbus_server.py rtu --serial path` and waits until it is ready.
    pub fn rtu(path: &str) -> PyServer {
        let s = Self::spawn("rtu", &["--serial", path]);
        s.wait_for(|lines| lines.iter().any(|l| l.starts_with("READY")), "READY");
        s
    }

    fn spawn(mode: &str, args: &[&str]) -> PyServer {
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(server_script())
            .arg(mode)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3 modbus_server.py");
        let lines = Arc::new(Lines::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for (stream, prefix) in
            [(Box::new(stdout) as Box<dyn std::io::Read + Send>, ""), (Box::new(stderr), "stderr: ")]
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    lines.lines.lock().expect("lines lock").push(format!("{prefix}{line}"));
                    lines.changed.notify_all();
                }
            });
        }
        let stdin = child.stdin.take().expect("piped stdin");
        PyServer { child, stdin, lines, ports: Vec::new(), seen_values: 0 }
    }

    /// The first port.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// Waits (at most [`START_LIMIT`]) until `cond` holds for the output.
    fn wait_for(&self, cond: impl Fn(&[String]) -> bool, what: &str) {
        let deadline = Instant::now() + START_LIMIT;
        let mut lines = self.lines.lines.lock().expect("lines lock");
        while !cond(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "modbus server did not print {what}; output:\n{}", lines.join("\n"));
            lines = self.lines.changed.wait_timeout(lines, left).expect("lines lock").0;
        }
    }

    /// The datastore's current values (`table`: hr, ir, co, di).
    pub fn get(&mut self, table: &str, address: u16, count: u16) -> Vec<u64> {
        writeln!(self.stdin, "get {table} {address} {count}").expect("write to the server's stdin");
        self.stdin.flush().expect("flush the server's stdin");
        let n = self.seen_values + 1;
        self.wait_for(
            |lines| lines.iter().filter(|l| l.starts_with("VALUES ") || l.starts_with("ERROR")).count() >= n,
            "VALUES",
        );
        self.seen_values = n;
        let lines = self.lines.lines.lock().expect("lines lock");
        let line =
            lines.iter().filter(|l| l.starts_with("VALUES ") || l.starts_with("ERROR")).nth(n - 1).expect("counted");
        assert!(line.starts_with("VALUES "), "get {table} {address} {count}: {line}");
        line.split_whitespace().skip(3).map(|v| v.parse().expect("a number")).collect()
    }

    /// Every `REQ` line so far (exact: a `get` round trip orders them).
    pub fn requests(&mut self) -> Vec<String> {
        self.get("hr", 0, 1);
        self.lines.lines.lock().expect("lines lock").iter().filter(|l| l.starts_with("REQ ")).cloned().collect()
    }

    /// Delays every later response by `ms`.
    pub fn set_delay(&mut self, ms: u64) {
        writeln!(self.stdin, "delay {ms}").expect("write to the server's stdin");
        self.stdin.flush().expect("flush the server's stdin");
        self.wait_for(|lines| lines.iter().any(|l| l == &format!("OK delay {ms}")), "OK delay");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- devices

/// One property of a test device.
#[derive(Clone)]
pub struct Prop {
    /// Name.
    pub name: String,
    /// Model type.
    pub ty: PropertyType,
    /// ReadWrite?
    pub writable: bool,
    /// Where it is.
    pub visitor: ModbusVisitor,
}

/// A read-only property.
pub fn prop(name: &str, ty: PropertyType, register: RegisterType, address: u16, dt: ModbusDataType) -> Prop {
    Prop {
        name: name.into(),
        ty,
        writable: false,
        visitor: ModbusVisitor { register, address, data_type: Some(dt), scale: 1.0, ..Default::default() },
    }
}

impl Prop {
    /// Read-write.
    pub fn rw(mut self) -> Prop {
        self.writable = true;
        self
    }
    /// Scale and offset.
    pub fn scaled(mut self, scale: f64, offset: f64) -> Prop {
        self.visitor.scale = scale;
        self.visitor.offset = offset;
        self
    }
    /// Word order little.
    pub fn little_words(mut self) -> Prop {
        self.visitor.word_order = yunbian_api::Endian::Little;
        self
    }
    /// Byte order little.
    pub fn little_bytes(mut self) -> Prop {
        self.visitor.byte_order = yunbian_api::Endian::Little;
        self
    }
    /// Registers (strings).
    pub fn count(mut self, n: u16) -> Prop {
        self.visitor.count = Some(n);
        self
    }
}

/// A Modbus TCP endpoint on loopback.
pub fn tcp(port: u16, unit_id: u8, timeout: &str) -> Protocol {
    Protocol::ModbusTcp(ModbusTcp { host: "127.0.0.1".into(), port, unit_id, timeout: timeout.into() })
}

/// A device of `props` over `protocol`, checked against its model.
pub fn config(name: &str, protocol: Protocol, props: &[Prop]) -> DeviceConfig {
    let model = DeviceModelSpec {
        description: String::new(),
        properties: props
            .iter()
            .map(|p| PropertyModel {
                name: p.name.clone(),
                ty: p.ty,
                access_mode: if p.writable { AccessMode::ReadWrite } else { AccessMode::ReadOnly },
                ..Default::default()
            })
            .collect(),
    };
    let spec = DeviceSpec {
        model: "test-model".into(),
        node: "edge-1".into(),
        protocol,
        properties: props
            .iter()
            .map(|p| PropertyVisitor { name: p.name.clone(), modbus: Some(p.visitor.clone()), ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let errs = check_device_against_model(&spec, &model);
    assert!(errs.is_empty(), "test device does not match its model: {errs:?}");
    DeviceConfig { device: Arc::new(Device::new(name, spec)), model: Arc::new(DeviceModel::new("test-model", model)) }
}
