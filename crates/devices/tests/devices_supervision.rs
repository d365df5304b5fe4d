//! The mapper host's supervision against real Modbus servers (pymodbus):
//! a slow device never stalls another one, and a server killed mid-poll
//! makes its device go offline and come back online when it returns, with
//! the same host (no agent restart). Readings and state are observed as an
//! app would see them: on the edge bus.

mod common_modbus;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common_modbus::{config, peers_available, prop, tcp, PyServer};
use tokio::sync::mpsc;
use yunbian_api::{DeviceState, ModbusDataType as Dt, PropertyType as Ty, RegisterType as Rt};
use yunbian_devices::bus::{property_topic, state_topic, BusMessage, EdgeBus};
use yunbian_devices::host::HostEvent;
use yunbian_devices::{standard_drivers, DeviceConfig, MapperHost, MemoryBus};

/// A bound for waits that end on behaviour; never what makes a run pass.
const LIMIT: Duration = Duration::from_secs(60);

fn device(name: &str, port: u16, timeout: &str) -> DeviceConfig {
    let mut cfg = config(name, tcp(port, 1, timeout), &[prop("level", Ty::Int, Rt::Input, 0, Dt::Uint16)]);
    let mut d = (*cfg.device).clone();
    d.metadata.name = name.into();
    d.spec.collect_cycle = "100ms".into();
    d.spec.report_cycle = "0s".into();
    cfg.device = Arc::new(d);
    cfg
}

fn host(bus: &MemoryBus) -> (MapperHost, mpsc::Receiver<HostEvent>) {
    let (tx, rx) = mpsc::channel(4096);
    let bus: Arc<dyn EdgeBus> = Arc::new(bus.clone());
    let h = MapperHost::new("edge-1", None, bus.clone(), standard_drivers(bus, None), tx);
    (h, rx)
}

fn state_of(m: &BusMessage) -> Option<DeviceState> {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
    serde_json::from_value(v.get("state")?.clone()).ok()
}

async fn wait_state(rx: &mut mpsc::Receiver<BusMessage>, want: DeviceState) {
    tokio::time::timeout(LIMIT, async {
        while let Some(m) = rx.recv().await {
            if state_of(&m) == Some(want) {
                return;
            }
        }
        panic!("bus subscription ended");
    })
    .await
    .unwrap_or_else(|_| panic!("device never became {want:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_device_does_not_stall_the_others() {
    if !peers_available("a_slow_device_does_not_stall_the_others", false) {
        return;
    }
    let fast_server = PyServer::tcp(&["--quiet"]);
    // Every answer takes 3 s; the device's timeout is 300 ms.
    let slow_server = PyServer::tcp(&["--quiet", "--delay-ms", "3000"]);
    let bus = MemoryBus::new();
    let (host, _events) = host(&bus);
    let mut slow_state = bus.subscribe(&state_topic("slow")).expect("subscribe");
    let mut fast_readings = bus.subscribe(&property_topic("fast", "level")).expect("subscribe");
    host.apply(vec![device("fast", fast_server.port(), "300ms"), device("slow", slow_server.port(), "300ms")]);

    // While the slow device times out, again and again, until it is
    // offline, the fast one keeps publishing new readings.
    let count = Arc::new(AtomicU32::new(0));
    let counter = {
        let count = count.clone();
        tokio::spawn(async move {
            while fast_readings.recv().await.is_some() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_state(&mut slow_state, DeviceState::Offline).await;
    let readings = count.load(Ordering::Relaxed);
    let fast = host.twin("fast").expect("fast twin");
    let slow = host.twin("slow").expect("slow twin");
    host.shutdown();
    counter.abort();
    assert_eq!(fast.state, DeviceState::Online, "{fast:?}");
    assert_eq!(slow.state, DeviceState::Offline, "{slow:?}");
    assert!(slow.last_error.contains("timed out"), "{slow:?}");
    // Three timeouts of 300 ms and two back-offs happened meanwhile; a
    // stalled fast device would have published one reading, or none.
    assert!(readings >= 5, "the fast device published {readings} readings while the slow one failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_poll_goes_offline_and_back_online_without_a_restart() {
    if !peers_available("a_server_killed_mid_poll_goes_offline_and_back_online_without_a_restart", false) {
        return;
    }
    // A port outside the ephemeral range: the server is restarted on it.
    let port_arg = yunbian_faults::ports::free_port().to_string();
    let mut server = PyServer::tcp(&["--quiet", "--port", &port_arg]);
    let port = server.port();
    let bus = MemoryBus::new();
    let (host, _events) = host(&bus);
    let mut state = bus.subscribe(&state_topic("plc")).expect("subscribe");
    host.apply(vec![device("plc", port, "500ms")]);
    wait_state(&mut state, DeviceState::Online).await;
    let before = host.twin("plc").expect("twin");
    assert_eq!(before.twins["level"].reported.as_ref().map(|r| r.value.clone()), Some(serde_json::json!(250)));

    server.kill();
    wait_state(&mut state, DeviceState::Offline).await;
    let down = host.twin("plc").expect("twin");
    let kept = down.twins["level"].reported.clone().expect("last value kept");
    assert_eq!(kept.quality, yunbian_api::Quality::Bad, "{down:?}");
    assert!(!down.last_error.is_empty(), "{down:?}");

    let _back = PyServer::tcp(&["--quiet", "--port", &port_arg]);
    wait_state(&mut state, DeviceState::Online).await;
    let up = host.twin("plc").expect("twin");
    let fresh = up.twins["level"].reported.clone().expect("reading");
    assert_eq!(fresh.quality, yunbian_api::Quality::Good, "{up:?}");
    assert!(fresh.timestamp > kept.timestamp, "a new reading, not the stale one: {up:?}");
    assert!(up.last_error.is_empty(), "{up:?}");
    host.shutdown();
}
