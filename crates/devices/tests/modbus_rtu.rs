//! The Modbus RTU driver over a serial line: a `socat` pseudo-terminal pair,
//! the pymodbus RTU server (`tests/peers/modbus_server.py rtu`) on one end
//! and [`ModbusDriver`] on the other.
//!
//! Without python3 + pymodbus + socat the test prints `SKIP:` and passes,
//! unless `CI` is set, where it fails.

mod common_modbus;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common_modbus::{config, peers_available, prop, PyServer};
use serde_json::json;
use yunbian_api::{ModbusDataType as Dt, ModbusRtu, PropertyType as Ty, Protocol, RegisterType as Rt};
use yunbian_devices::driver::{Driver, PropertyRead};
use yunbian_devices::modbus::ModbusDriver;

/// A `socat` pty pair linked at `<dir>/driver` and `<dir>/device`; killed
/// and its directory removed on drop.
struct PtyPair {
    child: Child,
    dir: PathBuf,
}

impl PtyPair {
    fn start() -> PtyPair {
        let dir = std::env::temp_dir().join(format!("yunbian-modbus-rtu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the pty directory");
        let end = |name: &str| format!("pty,raw,echo=0,link={}", dir.join(name).display());
        let child = Command::new("socat")
            .args(["-d", "-d", &end("driver"), &end("device")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        let pair = PtyPair { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(pair.path("driver").exists() && pair.path("device").exists()) {
            assert!(Instant::now() < deadline, "socat did not create the pty pair in {}", pair.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        pair
    }

    fn path(&self, end: &str) -> PathBuf {
        self.dir.join(end)
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn value(reads: &[PropertyRead], name: &str) -> Result<serde_json::Value, String> {
    let r = reads.iter().find(|r| r.property == name).unwrap_or_else(|| panic!("no {name}"));
    match &r.result {
        Ok(Some(reading)) => Ok(reading.value.clone()),
        Ok(None) => Err("no value".into()),
        Err(e) => Err(e.clone()),
    }
}

fn rtu(path: &Path) -> Protocol {
    Protocol::ModbusRtu(ModbusRtu {
        serial_port: path.display().to_string(),
        baud_rate: 115_200,
        unit_id: 1,
        timeout: "2s".into(),
        data_bits: 8,
        stop_bits: 1,
        ..Default::default()
    })
}

#[tokio::test]
async fn reads_and_writes_over_a_serial_line() {
    if !peers_available("reads_and_writes_over_a_serial_line", true) {
        return;
    }
    let pair = PtyPair::start();
    let mut server = PyServer::rtu(&pair.path("device").display().to_string());
    let props = vec![
        prop("u16", Ty::Int, Rt::Holding, 0, Dt::Uint16),
        prop("i32", Ty::Int, Rt::Holding, 2, Dt::Int32),
        prop("f32_little", Ty::Float, Rt::Holding, 8, Dt::Float32).little_words().scaled(2.0, 1.0),
        prop("setpoint", Ty::Int, Rt::Holding, 10, Dt::Uint16).rw(),
        prop("level", Ty::Float, Rt::Holding, 11, Dt::Float32).rw(),
        prop("temp", Ty::Float, Rt::Input, 0, Dt::Uint16).scaled(0.1, 0.0),
        prop("coil0", Ty::Bool, Rt::Coil, 0, Dt::Bool),
        prop("pump", Ty::Bool, Rt::Coil, 4, Dt::Bool).rw(),
        prop("bad", Ty::Int, Rt::Holding, 100, Dt::Uint16),
    ];
    let mut d = ModbusDriver::new(&config("rtu-plc", rtu(&pair.path("driver")), &props)).expect("driver");
    d.connect().await.expect("open the serial port");
    let reads = tokio::time::timeout(Duration::from_secs(30), d.read(&[])).await.expect("read ends").expect("read");
    assert_eq!(value(&reads, "u16"), Ok(json!(1234)));
    assert_eq!(value(&reads, "i32"), Ok(json!(-100_000)));
    assert_eq!(value(&reads, "f32_little"), Ok(json!(21.0)));
    assert_eq!(value(&reads, "setpoint"), Ok(json!(0)));
    assert_eq!(value(&reads, "temp"), Ok(json!(25.0)));
    assert_eq!(value(&reads, "coil0"), Ok(json!(true)));
    assert_eq!(value(&reads, "pump"), Ok(json!(false)));
    assert!(value(&reads, "bad").is_err_and(|e| e.contains("Illegal data address")), "{reads:?}");

    d.write("setpoint", &json!(4321)).await.expect("write a register");
    d.write("level", &json!(-2.25)).await.expect("write two registers");
    d.write("pump", &json!(true)).await.expect("write a coil");
    let back = d.read(&["setpoint".into(), "level".into(), "pump".into()]).await.expect("read back");
    assert_eq!(value(&back, "setpoint"), Ok(json!(4321)));
    assert_eq!(value(&back, "level"), Ok(json!(-2.25)));
    assert_eq!(value(&back, "pump"), Ok(json!(true)));
    // -2.25 = 0xC0100000.
    assert_eq!(server.get("hr", 10, 3), [4321, 0xC010, 0x0000]);
    assert_eq!(server.get("co", 4, 1), [1]);
    let reqs = server.requests();
    assert!(reqs.iter().any(|r| r == "REQ fc=16 unit=1 addr=11 count=2"), "{reqs:#?}");
    d.disconnect().await;
}
