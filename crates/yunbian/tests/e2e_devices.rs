//! Devices end to end: a real cloud and agents, models and devices applied
//! with the CLI, twins reported to the cloud, desired values written and
//! verified, the edge bus driven by Debian's mosquitto clients, a device
//! mapped from MQTT topics, model-aware validation, and a `nodeSelector`
//! device moving when its node is lost.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{eventually, free_port, have_tool, run, s, Cluster, EdgeSetup, WAIT};
use serde_json::Value;

const MODEL: &str = r#"apiVersion: yunbian.io/v1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  properties:
    - {name: temp, type: float, unit: "°C"}
    - {name: setpoint, type: float, accessMode: ReadWrite, minimum: 0, maximum: 100}
"#;

fn virtual_device(name: &str, placement: &str) -> String {
    format!(
        r#"apiVersion: yunbian.io/v1
kind: Device
metadata: {{name: {name}}}
spec:
  model: thermostat
  {placement}
  protocol: {{virtual: {{seed: 7}}}}
  collectCycle: 200ms
  reportCycle: 500ms
  properties:
    - {{name: temp, virtual: {{generator: randomWalk, start: 20, step: 0.5, min: 0, max: 40}}}}
    - {{name: setpoint, virtual: {{generator: constant, value: 20}}}}
"#
    )
}

fn twin<'a>(d: &'a Value, prop: &str) -> &'a Value {
    &d["status"]["twins"][prop]
}

fn device(c: &Cluster, name: &str) -> Result<Value, String> {
    c.get("devices", name).ok_or_else(|| format!("device {name} not found"))
}

/// The first `n` lines `yunbian ARGS` prints (it runs until killed).
fn watch_lines(c: &Cluster, args: &[&str], n: usize) -> Vec<String> {
    use std::io::BufRead;
    let mut child = c
        .cli_command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the watch");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < n {
        match rx.recv_timeout(WAIT) {
            Ok(l) => lines.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("{args:?} printed only {lines:?}: {e}");
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// `GET http://addr path` → (status, body), plain HTTP/1.1.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let code = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn mosquitto(tool: &str, port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args);
    let o = run(cmd, Duration::from_secs(20));
    assert!(o.success(), "{tool} {args:?}: {o:?}");
    o.ok().to_string()
}

/// Publishes `payload` to `topic` every half second until the subscriber
/// thread `sub` has finished (it exits on its message count or timeout).
fn publish_until_done<T>(sub: &std::thread::JoinHandle<T>, port: u16, topic: &str, payload: &str) {
    std::thread::sleep(Duration::from_millis(500));
    while !sub.is_finished() {
        mosquitto("mosquitto_pub", port, &["-t", topic, "-m", payload]);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn twins_desired_values_and_the_edge_bus() {
    let mut c = Cluster::start("devices");
    let port = free_port();
    c.join_with("edge-1", EdgeSetup::new().mqtt(&format!("127.0.0.1:{port}")));

    // A device whose model does not exist yet is refused with the path.
    let o = c.try_apply(&virtual_device("t1", "node: edge-1"));
    assert!(!o.success() && o.err().contains("spec.model"), "{o:?}");
    c.apply(MODEL);
    c.apply(&virtual_device("t1", "node: edge-1"));

    // The twin reaches the cloud: online, with good readings.
    let d = eventually(WAIT, "t1 online with a reading", || {
        let d = device(&c, "t1")?;
        let ok = s(&d, "/status/state") == "online"
            && twin(&d, "temp")["reported"]["quality"] == "good"
            && twin(&d, "temp")["reported"]["value"].is_number();
        ok.then_some(d.clone()).ok_or_else(|| format!("{:#}", d["status"]))
    });
    assert_eq!(s(&d, "/status/node"), "edge-1", "{d}");
    let o = c.cli(&["get", "devices"]);
    assert!(o.success() && o.ok().contains("t1") && o.ok().contains("online"), "{o:?}");
    let o = c.cli(&["describe", "device", "t1"]);
    assert!(o.success() && o.ok().contains("setpoint") && o.ok().contains("temp"), "{o:?}");

    // `device watch` streams readings as the cloud receives them.
    let lines = watch_lines(&c, &["device", "watch", "t1", "--property", "temp", "-o", "json"], 3);
    let mut stamps = Vec::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert_eq!((v["device"].as_str(), v["property"].as_str()), (Some("t1"), Some("temp")), "{l}");
        assert!(v["value"].is_number() && v["quality"] == "good", "{l}");
        stamps.push(v["ts"].as_u64().expect("ts"));
    }
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "each line is a newer reading: {stamps:?}");

    // Desired values: written on the device, verified by read-back, observed.
    let o = c.cli(&["device", "set", "t1", "setpoint=42.5", "--wait=30s"]);
    assert!(o.success(), "{o:?}");
    let d = device(&c, "t1").expect("device");
    let t = twin(&d, "setpoint");
    assert_eq!(t["desired"]["value"], 42.5, "{t}");
    assert!(t["observedDesired"].as_u64() >= t["desired"]["version"].as_u64(), "{t}");
    eventually(WAIT, "the read-back value reported", || {
        let d = device(&c, "t1")?;
        (twin(&d, "setpoint")["reported"]["value"] == 42.5).then_some(()).ok_or_else(|| format!("{:#}", d["status"]))
    });
    // The model says no, with the reason, and nothing is written.
    let o = c.cli(&["device", "set", "t1", "temp=1"]);
    assert!(!o.success() && o.err().contains("ReadOnly"), "{o:?}");
    let o = c.cli(&["device", "set", "t1", "setpoint=500"]);
    assert!(!o.success() && o.err().contains("maximum"), "{o:?}");
    // So does apply, with field paths.
    let bad = virtual_device("t2", "node: edge-1").replace("value: 20}}", "value: 20}}\n  desired: {temp: 3}");
    let o = c.try_apply(&bad);
    assert!(!o.success() && o.err().contains("spec.desired[temp]") && o.err().contains("ReadOnly"), "{o:?}");

    if !have_tool("mosquitto_sub") {
        return;
    }
    // Every reading is on the edge bus, retained, as {value, ts, quality}.
    let msg = mosquitto("mosquitto_sub", port, &["-t", "yunbian/devices/t1/properties/temp", "-C", "1", "-W", "10"]);
    let v: Value = serde_json::from_str(msg.trim()).expect("reading is JSON");
    assert!(v["value"].is_number() && v["ts"].is_u64() && v["quality"] == "good", "{v}");
    let state = mosquitto("mosquitto_sub", port, &["-t", "yunbian/devices/t1/state", "-C", "1", "-W", "10"]);
    assert!(state.contains("\"online\""), "{state}");

    // A write to …/set is a desired change: answered on …/set/result,
    // applied on the device and reported to the cloud as a local value.
    let results = std::thread::spawn(move || {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "yunbian/devices/t1/properties/setpoint/set/result",
        ])
        .args(["-C", "2", "-W", "20"]);
        run(cmd, Duration::from_secs(30))
    });
    // Results are not retained: publish until the subscriber (which may
    // subscribe late on a loaded machine) has its two (setting 55 again
    // changes nothing).
    publish_until_done(&results, port, "yunbian/devices/t1/properties/setpoint/set", "55");
    let r = results.join().expect("subscriber thread");
    assert!(r.success(), "{r:?}");
    assert!(r.ok().contains("\"accepted\"") && r.ok().contains("\"applied\""), "{}", r.ok());
    eventually(WAIT, "the local set reported to the cloud", || {
        let d = device(&c, "t1")?;
        let t = twin(&d, "setpoint");
        let ok = t["desired"]["value"] == 55 && t["desired"]["source"] == "local" && t["reported"]["value"] == 55.0;
        ok.then_some(()).ok_or_else(|| format!("{t}"))
    });
    // An invalid set is rejected on the bus, with the model's reason.
    let results = std::thread::spawn(move || {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "yunbian/devices/t1/properties/temp/set/result"])
            .args(["-C", "1", "-W", "20"]);
        run(cmd, Duration::from_secs(30))
    });
    publish_until_done(&results, port, "yunbian/devices/t1/properties/temp/set", "3");
    let r = results.join().expect("subscriber thread");
    assert!(r.ok().contains("\"rejected\"") && r.ok().contains("ReadOnly"), "{r:?}");

    // A device mapped from MQTT topics: a sensor publishing JSON.
    c.apply(
        r#"apiVersion: yunbian.io/v1
kind: Device
metadata: {name: m1}
spec:
  model: thermostat
  node: edge-1
  protocol: {mqtt: {}}
  collectCycle: 200ms
  reportCycle: 500ms
  properties:
    - {name: temp, mqtt: {topic: sensors/m1, jsonPath: data.t}}
"#,
    );
    eventually(WAIT, "m1 maps the sensor's topic", || {
        // Keep publishing: the mapper subscribes when it starts.
        mosquitto("mosquitto_pub", port, &["-t", "sensors/m1", "-m", r#"{"data": {"t": 21.5}}"#]);
        let d = device(&c, "m1")?;
        (twin(&d, "temp")["reported"]["value"] == 21.5).then_some(()).ok_or_else(|| format!("{:#}", d["status"]))
    });
}

#[test]
fn a_selector_device_moves_when_its_node_is_lost() {
    let mut c = Cluster::builder("devices-move").grace("3s").evict_after("4s").start();
    c.join_with("edge-1", EdgeSetup::new().labels("site=plant"));
    c.join_with("edge-2", EdgeSetup::new().labels("site=plant"));
    c.apply(MODEL);
    c.apply(&virtual_device("v1", "nodeSelector: {site: plant}"));
    let first = eventually(WAIT, "v1 placed and online", || {
        let d = device(&c, "v1")?;
        (s(&d, "/status/state") == "online").then(|| s(&d, "/status/node").to_string()).ok_or_else(|| format!("{d}"))
    });
    let other = if first == "edge-1" { "edge-2" } else { "edge-1" };
    c.kill_edge(&first);
    eventually(Duration::from_secs(60), "v1 moved to the other node and online there", || {
        let d = device(&c, "v1")?;
        let ok = s(&d, "/status/node") == other && s(&d, "/status/state") == "online";
        ok.then_some(()).ok_or_else(|| format!("{:#}", d["status"]))
    });
}

#[test]
fn the_site_listener_needs_a_password() {
    if !have_tool("mosquitto_pub") {
        return;
    }
    let mut c = Cluster::start("devices-site-bus");
    let site = free_port();
    let passwords = c.write_file("mqtt-passwords", "# user:password\nsensor-7:s3cret\n");
    let site_addr = format!("127.0.0.1:{site}");
    let pw = passwords.display().to_string();
    c.join_with("edge-1", EdgeSetup::new().args(&["--mqtt-site-listen", &site_addr, "--mqtt-passwords", &pw]));
    let publish = |extra: &[&str]| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &site.to_string(), "-t", "sensors/x", "-m", "1"]).args(extra);
        run(cmd, Duration::from_secs(20))
    };
    eventually(WAIT, "the right password is accepted", || {
        let o = publish(&["-u", "sensor-7", "-P", "s3cret"]);
        o.success().then_some(()).ok_or_else(|| format!("{o:?}"))
    });
    let wrong = publish(&["-u", "sensor-7", "-P", "guess"]);
    assert!(!wrong.success(), "a wrong password must be refused: {wrong:?}");
    let anonymous = publish(&[]);
    assert!(!anonymous.success(), "anonymous clients must be refused on the site listener: {anonymous:?}");
}

#[test]
fn a_rule_windows_device_readings_onto_the_bus_and_reports_per_node() {
    if !have_tool("mosquitto_sub") {
        return;
    }
    let mut c = Cluster::start("devices-rules");
    let port = free_port();
    let api = format!("127.0.0.1:{}", free_port());
    c.join_with("edge-1", EdgeSetup::new().mqtt(&format!("127.0.0.1:{port}")).device_api(&api));
    c.apply(MODEL);
    c.apply(&virtual_device("t1", "node: edge-1"));

    // CEL is checked at apply time, with the position of the error.
    let bad = r#"apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: bad}
spec:
  source: {devices: {models: [thermostat]}}
  steps: [{filter: "value >> 3"}]
  sinks: [{tsdb: {}}]
"#;
    let o = c.try_apply(bad);
    assert!(!o.success() && o.err().contains("spec.steps[0].filter: 1:"), "{o:?}");
    // Events cannot be applied: alert rules raise them.
    let o = c.try_apply("apiVersion: yunbian.io/v1\nkind: Event\nmetadata: {name: e}\nspec: {}\n");
    assert!(!o.success() && o.err().contains("raised by alert rules"), "{o:?}");

    c.apply(
        r#"apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: temp-avg}
spec:
  source: {devices: {models: [thermostat], properties: [temp]}}
  steps:
    - filter: "quality == 'good'"
    - window: {size: 1s, aggregate: avg}
    - rename: temp_avg_1s
  sinks:
    - mqtt: {topic: "rules/{tags.device}/temp_avg"}
    - tsdb: {}
"#,
    );
    let msg = mosquitto("mosquitto_sub", port, &["-t", "rules/t1/temp_avg", "-C", "2", "-W", "30"]);
    for line in msg.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["metric"], "temp_avg_1s", "{v}");
        assert_eq!(v["tags"]["device"], "t1", "{v}");
        assert!(v["value"].as_f64().is_some_and(|x| (0.0..=40.0).contains(&x)), "{v}");
        assert_eq!(v["ts"].as_i64().map(|t| t % 1000), Some(0), "a 1 s window ends on a second: {v}");
    }
    // The tsdb sink wrote the same windows into the edge store, which apps
    // query over the agent's local API.
    let (code, body) = http_get(&api, "/v1/query?q=temp_avg_1s%7Bdevice%3D%22t1%22%7D&since=10m");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let points = v["series"][0]["points"].as_array().cloned().unwrap_or_default();
    assert!(!points.is_empty() && v["series"][0]["tags"]["model"] == "thermostat", "{v}");
    assert!(points.iter().all(|p| p[0].as_i64().is_some_and(|t| t % 1000 == 0)), "{v}");
    let (code, body) = http_get(&api, "/v1/query?q=temp_avg_1s%7Bdevice%3D%22t1%22&since=10m");
    assert_eq!(code, 400, "a broken selector is a 400: {body}");

    // Per-node throughput reaches the cloud and `get rules`.
    eventually(Duration::from_secs(60), "rule status from edge-1", || {
        let r = c.get("rules", "temp-avg").ok_or("no rule")?;
        let n = &r["status"]["nodes"]["edge-1"];
        (n["recordsIn"].as_u64() > Some(0) && n["recordsOut"].as_u64() > Some(0))
            .then_some(())
            .ok_or_else(|| format!("{r}"))
    });
    let o = c.cli(&["get", "rules", "-o", "wide"]);
    assert!(o.success() && o.ok().contains("temp-avg") && o.ok().contains("edge-1:"), "{o:?}");
}
