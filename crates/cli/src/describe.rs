//! `describe`: one object as a human, multi-line text — metadata as
//! aligned fields, `spec` and `status` as indented YAML, and a table of
//! related objects (an app's or a node's instances, a group's nodes, a
//! model's devices).
//!
//! Devices and device models are shown as fields and tables instead of
//! YAML: a device's connection and state, then one row per property twin
//! (reported value, its quality and age, the desired value the node works
//! on and whether it has been written); a model's properties as a table.

use serde_json::Value;
use yunbian_api::Kind;

use crate::columns::{device_node, device_protocol, device_state, pairs, text};
use crate::table::Table;
use crate::time::{age_since, format_age};

/// Objects shown under the description, with the kind of their rows.
#[derive(Debug, Clone)]
pub struct Related {
    /// Section title (`Instances`, `Nodes`).
    pub title: &'static str,
    /// Kind of `items`.
    pub kind: Kind,
    /// The objects.
    pub items: Vec<Value>,
}

/// The full description of `obj` at `now` (Unix seconds).
pub fn describe(kind: Kind, obj: &Value, related: Option<&Related>, now: i64) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        let value = if value.is_empty() { "<none>".to_string() } else { value };
        out.push_str(&format!("{:<18}{value}\n", format!("{label}:")));
    };
    let created = text(obj, "/metadata/creationTimestamp");
    field("Name", text(obj, "/metadata/name"));
    field("Kind", kind.as_str().to_string());
    field("Labels", pairs(obj.pointer("/metadata/labels")));
    field("Annotations", pairs(obj.pointer("/metadata/annotations")));
    field(
        "Created",
        if created.is_empty() { String::new() } else { format!("{created} ({} ago)", age_since(&created, now)) },
    );
    field("UID", text(obj, "/metadata/uid"));
    field("Resource Version", text(obj, "/metadata/resourceVersion"));
    field("Generation", text(obj, "/metadata/generation"));
    if kind == Kind::Node {
        let hb = text(obj, "/status/lastHeartbeat");
        if !hb.is_empty() {
            field("Last Heartbeat", format!("{hb} ({} ago)", age_since(&hb, now)));
        }
        // What is wrong, and what to do about it, before the details.
        for (label, pointer) in [("Reason", "/status/reason"), ("Disk Pressure", "/status/diskPressure")] {
            let v = text(obj, pointer);
            if !v.is_empty() {
                field(label, v);
            }
        }
        if let Some(d) = obj.pointer("/status/usage/dataOutbox") {
            field("Data Outbox", data_outbox(d));
        }
    }
    match kind {
        Kind::Device => {
            device_fields(obj, now, &mut field);
            out.push_str(&device_twins(obj, now));
        }
        Kind::DeviceModel => {
            field("Description", text(obj, "/spec/description"));
            out.push_str(&model_properties(obj));
        }
        Kind::App => {
            if let Some(v) = obj.get("spec") {
                out.push_str(&yaml_section("Spec", v));
            }
            // Placement, rejections and history read better as tables.
            let mut status = obj.get("status").cloned().unwrap_or(Value::Null);
            let mut take = |k: &str| status.as_object_mut().and_then(|m| m.remove(k));
            let placements = take("placements");
            let rejections = take("rejections");
            let _history = take("history");
            let rollout = take("rollout");
            out.push_str(&yaml_section("Status", &status));
            out.push_str(&app_placement(placements.as_ref(), rejections.as_ref(), rollout.as_ref()));
        }
        _ => {
            for section in ["spec", "status"] {
                if let Some(v) = obj.get(section) {
                    out.push_str(&yaml_section(&title_case(section), v));
                }
            }
        }
    }
    if let Some(rel) = related {
        out.push_str(&format!("{}:\n", rel.title));
        if rel.items.is_empty() {
            out.push_str("  <none>\n");
        } else {
            out.push_str(&indent(&related_table(rel, now).render(), "  "));
        }
    }
    out
}

/// Why each instance of an App is where it is, why other nodes were not
/// chosen, and the rollout's progress.
fn app_placement(placements: Option<&Value>, rejections: Option<&Value>, rollout: Option<&Value>) -> String {
    let mut out = String::new();
    let rows = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
    let placements = rows(placements);
    out.push_str("Placement:\n");
    if placements.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(&["INSTANCE", "NODE", "GROUP", "WHY"]);
        for p in &placements {
            let group = text(p, "/group");
            t.push(vec![
                text(p, "/instance"),
                text(p, "/node"),
                if group.is_empty() { "-".into() } else { group },
                text(p, "/reason"),
            ]);
        }
        out.push_str(&indent(&t.render(), "  "));
    }
    let rejections = rows(rejections);
    if !rejections.is_empty() {
        out.push_str("Not Chosen:\n");
        for r in &rejections {
            out.push_str(&format!("  node {}: {}\n", text(r, "/node"), text(r, "/reason")));
        }
    }
    if let Some(r) = rollout {
        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        let mut line = format!(
            "{}, revision {} (stable {}), step {}, {} updated, {} available",
            text(r, "/phase"),
            n("revision"),
            n("stableRevision"),
            n("step"),
            n("updatedReplicas"),
            n("availableReplicas"),
        );
        if n("failures") > 0 {
            line.push_str(&format!(", {} failed", n("failures")));
        }
        let msg = text(r, "/message");
        if !msg.is_empty() {
            line.push_str(&format!(": {msg}"));
        }
        out.push_str(&format!("{:<18}{line}\n", "Rollout:"));
    }
    out
}

/// A node's store-and-forward backlog and counters, on one line.
fn data_outbox(d: &Value) -> String {
    let n = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
    let limit = match n("bandwidthLimit") {
        0 => "no bandwidth limit".to_string(),
        b => format!("limit {}/s", yunbian_api::quantity::format_bytes(b)),
    };
    let mut s = format!(
        "{} batches ({} points, {}), oldest {}s; {} points acked; dropped: {} expired, {} over size, {} disk full; {limit}",
        n("queuedBatches"),
        n("queuedPoints"),
        yunbian_api::quantity::format_bytes(n("queuedBytes")),
        n("oldestAgeSeconds"),
        n("ackedPoints"),
        n("droppedExpiredPoints"),
        n("droppedFullPoints"),
        n("droppedDiskPoints"),
    );
    if let Some(e) = d.get("lastError").and_then(Value::as_str).filter(|e| !e.is_empty()) {
        s.push_str(&format!("; last error: {e}"));
    }
    s
}

/// A device's connection, cycles and state, as fields.
fn device_fields(obj: &Value, now: i64, field: &mut impl FnMut(&str, String)) {
    field("Model", text(obj, "/spec/model"));
    field("Node", device_node(obj));
    let selector = pairs(obj.pointer("/spec/nodeSelector"));
    if !selector.is_empty() {
        field("Node Selector", selector);
    }
    let protocol = device_protocol(obj);
    let endpoint =
        obj.pointer(&format!("/spec/protocol/{protocol}")).map(|p| endpoint(&protocol, p)).unwrap_or_default();
    field("Protocol", format!("{protocol} {endpoint}").trim().to_string());
    let cycle = |pointer: &str, default: &str| {
        let c = text(obj, pointer);
        if c.is_empty() {
            default.to_string()
        } else {
            c
        }
    };
    let mut cycles = format!(
        "collect every {}, report at most every {}",
        cycle("/spec/collectCycle", yunbian_api::DEFAULT_COLLECT_CYCLE),
        cycle("/spec/reportCycle", yunbian_api::DEFAULT_REPORT_CYCLE)
    );
    if obj.pointer("/spec/reportToCloud").and_then(Value::as_bool) == Some(false) {
        cycles.push_str(" (not reported to the cloud)");
    }
    field("Cycles", cycles);
    field("State", device_state(obj));
    let online = text(obj, "/status/lastOnlineTime");
    field(
        "Last Online",
        if online.is_empty() { online } else { format!("{online} ({} ago)", age_since(&online, now)) },
    );
    field("Last Error", text(obj, "/status/lastError"));
    let message = text(obj, "/status/message");
    if !message.is_empty() {
        field("Message", message);
    }
    let observed = obj.pointer("/status/observedGeneration").and_then(Value::as_u64).unwrap_or(0);
    let generation = obj.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
    field(
        "Observed Gen",
        match observed {
            0 => String::new(),
            o if o < generation => format!("{o} (generation {generation} not applied yet)"),
            o => o.to_string(),
        },
    );
}

/// Where a protocol reaches the device, from `spec.protocol.<name>`.
fn endpoint(protocol: &str, p: &Value) -> String {
    let or = |pointer: &str, default: &str| {
        let v = text(p, pointer);
        if v.is_empty() {
            default.to_string()
        } else {
            v
        }
    };
    match protocol {
        "modbusTcp" => format!("{}:{} unit {}", text(p, "/host"), or("/port", "502"), or("/unitId", "1")),
        "modbusRtu" => {
            let parity = match text(p, "/parity").as_str() {
                "even" => "E",
                "odd" => "O",
                _ => "N",
            };
            format!(
                "{} {} {}{parity}{} unit {}",
                text(p, "/serialPort"),
                or("/baudRate", "9600"),
                or("/dataBits", "8"),
                or("/stopBits", "1"),
                or("/unitId", "1")
            )
        }
        "opcua" => {
            let policy = or("/securityPolicy", "None");
            let mode = or("/securityMode", "None");
            let mut s = text(p, "/endpoint");
            if policy != "None" || mode != "None" {
                s.push_str(&format!(" ({policy}, {mode})"));
            }
            if p.pointer("/subscribe").and_then(Value::as_bool) == Some(true) {
                s.push_str(" subscribed");
            }
            s
        }
        "mqtt" => match text(p, "/offlineAfter").as_str() {
            "" | "0" => "edge broker".to_string(),
            after => format!("edge broker, offline after {after} of silence"),
        },
        "virtual" => format!("seed {}", or("/seed", "0")),
        "external" => format!("mapper {}", text(p, "/mapper")),
        _ => String::new(),
    }
}

/// A value as shown in tables and streams: strings without quotes, other
/// JSON as JSON, long values cut.
pub fn show_value(v: &Value) -> String {
    const MAX: usize = 40;
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX - 1).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// The age of a reading taken at `ts_ms` (Unix milliseconds) at `now`
/// (Unix seconds).
pub fn reading_age(ts_ms: u64, now: i64) -> String {
    if ts_ms == 0 {
        return "<unknown>".into();
    }
    let ts = i64::try_from(ts_ms / 1000).unwrap_or(i64::MAX);
    format_age(now - ts)
}

/// Property names of a device in a stable order: its visitors in spec
/// order, then twins and desired values of any other name.
fn device_property_names(obj: &Value) -> Vec<String> {
    let mut names: Vec<String> = obj
        .pointer("/spec/properties")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(|p| text(p, "/name")).filter(|n| !n.is_empty()).collect())
        .unwrap_or_default();
    for pointer in ["/status/twins", "/spec/desired"] {
        if let Some(m) = obj.pointer(pointer).and_then(Value::as_object) {
            for k in m.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    names
}

/// The `Twins:` section: one row per property.
fn device_twins(obj: &Value, now: i64) -> String {
    let names = device_property_names(obj);
    if names.is_empty() {
        return format!("{:<18}<none>\n", "Twins:");
    }
    let mut t = Table::new(&["PROPERTY", "REPORTED", "QUALITY", "AGE-OF-READING", "DESIRED", "OBSERVED", "ERROR"]);
    for name in names {
        let twin = obj.pointer("/status/twins").and_then(|t| t.get(&name)).cloned().unwrap_or(Value::Null);
        let (reported, quality, age) = match twin.get("reported") {
            Some(r) if !r.is_null() => {
                let quality = text(r, "/quality");
                (
                    r.get("value").map(show_value).unwrap_or_default(),
                    if quality.is_empty() { "good".to_string() } else { quality },
                    reading_age(r.get("timestamp").and_then(Value::as_u64).unwrap_or(0), now),
                )
            }
            _ => Default::default(),
        };
        let observed = twin.get("observedDesired").and_then(Value::as_u64).unwrap_or(0);
        let spec_desired = obj.pointer("/spec/desired").and_then(|d| d.get(&name));
        let (desired, state) = match twin.get("desired").filter(|d| !d.is_null()) {
            Some(d) => {
                let version = d.get("version").and_then(Value::as_u64).unwrap_or(0);
                let source = text(d, "/source");
                let mut s = format!("{}@{version}", d.get("value").map(show_value).unwrap_or_default());
                if !source.is_empty() {
                    s.push_str(&format!(" ({source})"));
                }
                (s, if observed >= version { "✓".to_string() } else { "pending".to_string() })
            }
            None => match spec_desired {
                Some(v) => (format!("{} (not sent yet)", show_value(v)), "pending".to_string()),
                None => Default::default(),
            },
        };
        let cells = [name, reported, quality, age, desired, state, text(&twin, "/error")];
        t.push(cells.into_iter().map(|c| if c.is_empty() { "-".to_string() } else { c }).collect());
    }
    format!("Twins:\n{}", indent(&t.render(), "  "))
}

/// The `Properties:` section of a model.
fn model_properties(obj: &Value) -> String {
    let props = obj.pointer("/spec/properties").and_then(Value::as_array).cloned().unwrap_or_default();
    if props.is_empty() {
        return format!("{:<18}<none>\n", "Properties:");
    }
    let mut t = Table::new(&["NAME", "TYPE", "UNIT", "ACCESS", "MIN", "MAX", "DESCRIPTION"]);
    for p in &props {
        let or = |pointer: &str, default: &str| {
            let v = text(p, pointer);
            if v.is_empty() {
                default.to_string()
            } else {
                v
            }
        };
        t.push(vec![
            text(p, "/name"),
            or("/type", "float"),
            or("/unit", "-"),
            or("/accessMode", "ReadOnly"),
            bound(p.get("minimum")),
            bound(p.get("maximum")),
            text(p, "/description"),
        ]);
    }
    format!("Properties:\n{}", indent(&t.render(), "  "))
}

/// A property's minimum or maximum: `-20` rather than `-20.0`, `-` when
/// absent.
fn bound(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => x.to_string(),
        None => "-".into(),
    }
}

fn related_table(rel: &Related, now: i64) -> Table {
    let mut items: Vec<&Value> = rel.items.iter().collect();
    items.sort_by_key(|v| text(v, "/metadata/name"));
    let mut t = Table::new(&crate::columns::headers(rel.kind, false));
    for v in items {
        t.push(crate::columns::row(rel.kind, v, false, now));
    }
    t
}

fn yaml_section(title: &str, v: &Value) -> String {
    let empty = match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        _ => false,
    };
    if empty {
        return format!("{:<18}<none>\n", format!("{title}:"));
    }
    let yaml = serde_yaml::to_string(v).unwrap_or_else(|e| format!("<cannot render: {e}>\n"));
    format!("{title}:\n{}", indent(&yaml, "  "))
}

fn title_case(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{prefix}{l}\n") }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn app_with_instances() {
        let app = json!({
            "apiVersion": "yunbian.io/v1", "kind": "App",
            "metadata": {"name": "hello", "labels": {"team": "x"}, "creationTimestamp": "1970-01-01T00:00:00Z", "generation": 2},
            "spec": {"replicas": 2, "runtime": "process"},
            "status": {"readyReplicas": 1}
        });
        let inst = json!({"metadata": {"name": "hello-abc"}, "spec": {"app": "hello", "node": "edge-1"},
                          "status": {"phase": "Running", "restartCount": 1}});
        let rel = Related { title: "Instances", kind: Kind::AppInstance, items: vec![inst] };
        let d = describe(Kind::App, &app, Some(&rel), 60);
        assert!(d.starts_with("Name:             hello\nKind:             App\nLabels:           team=x\n"), "{d}");
        assert!(d.contains("Created:          1970-01-01T00:00:00Z (60s ago)\n"), "{d}");
        assert!(d.contains("Generation:       2\n"), "{d}");
        assert!(d.contains("Spec:\n  replicas: 2\n  runtime: process\n"), "{d}");
        assert!(d.contains("Status:\n  readyReplicas: 1\n"), "{d}");
        assert!(d.contains("Placement:\n  <none>\n"), "{d}");
        assert!(d.contains("Instances:\n  NAME        APP     NODE     STATUS    RESTARTS   AGE\n"), "{d}");
        assert!(d.contains("  hello-abc   hello   edge-1   Running   1          <unknown>\n"), "{d}");
    }

    #[test]
    fn app_placement_and_rejections() {
        let app = json!({
            "metadata": {"name": "svc"},
            "spec": {"replicas": 1},
            "status": {
                "readyReplicas": 1,
                "placements": [{"instance": "svc-1", "node": "e1", "group": "ga", "reason": "cheapest group ga (0.01/cpu-h)"}],
                "rejections": [{"node": "e7", "reason": "insufficient memory (requests 256Mi, free 120Mi)"}],
                "rollout": {"phase": "Progressing", "revision": 3, "stableRevision": 2, "step": 1, "updatedReplicas": 1, "message": "step 1: groups [ga]"}
            }
        });
        let d = describe(Kind::App, &app, None, 0);
        assert!(d.contains("Status:\n  readyReplicas: 1\n"), "{d}");
        assert!(!d.contains("placements:"), "{d}");
        assert!(
            d.contains("  INSTANCE   NODE   GROUP   WHY\n  svc-1      e1     ga      cheapest group ga (0.01/cpu-h)\n"),
            "{d}"
        );
        assert!(d.contains("Not Chosen:\n  node e7: insufficient memory (requests 256Mi, free 120Mi)\n"), "{d}");
        assert!(d.contains("Rollout:          Progressing, revision 3 (stable 2), step 1, 1 updated, 0 available: step 1: groups [ga]\n"), "{d}");
    }

    #[test]
    fn device_with_twins() {
        let dev = json!({
            "apiVersion": "yunbian.io/v1", "kind": "Device",
            "metadata": {"name": "boiler-1", "creationTimestamp": "1970-01-01T00:00:00Z", "generation": 4},
            "spec": {"model": "boiler", "node": "edge-1", "protocol": {"modbusTcp": {"host": "10.0.0.5", "port": 5020}},
                     "collectCycle": "500ms",
                     "properties": [{"name": "temp"}, {"name": "setpoint"}, {"name": "mode"}, {"name": "fan"}],
                     "desired": {"setpoint": 42, "mode": "eco", "fan": true}},
            "status": {"node": "edge-1", "state": "online", "lastOnlineTime": "1970-01-01T00:01:00Z",
                       "observedGeneration": 3,
                       "twins": {
                           "temp": {"reported": {"value": 21.5, "timestamp": 110_000, "quality": "good"}},
                           "setpoint": {"reported": {"value": 40, "timestamp": 100_000, "quality": "uncertain"},
                                        "desired": {"value": 42, "version": 4, "source": "cloud"}, "observedDesired": 3,
                                        "error": "write timed out"},
                           "mode": {"desired": {"value": "eco", "version": 3, "source": "cloud"}, "observedDesired": 3}
                       }}
        });
        let d = describe(Kind::Device, &dev, None, 120);
        assert!(d.contains("Model:            boiler\nNode:             edge-1\n"), "{d}");
        assert!(d.contains("Protocol:         modbusTcp 10.0.0.5:5020 unit 1\n"), "{d}");
        assert!(d.contains("Cycles:           collect every 500ms, report at most every 10s\n"), "{d}");
        assert!(d.contains("State:            online\nLast Online:      1970-01-01T00:01:00Z (60s ago)\n"), "{d}");
        assert!(d.contains("Last Error:       <none>\n"), "{d}");
        assert!(d.contains("Observed Gen:     3 (generation 4 not applied yet)\n"), "{d}");
        assert!(!d.contains("Spec:"), "{d}");
        let twins = d.split_once("Twins:\n").expect("twins section").1;
        assert_eq!(
            twins,
            "  PROPERTY   REPORTED   QUALITY     AGE-OF-READING   DESIRED               OBSERVED   ERROR\n\
             \x20 temp       21.5       good        10s              -                     -          -\n\
             \x20 setpoint   40         uncertain   20s              42@4 (cloud)          pending    write timed out\n\
             \x20 mode       -          -           -                eco@3 (cloud)         ✓          -\n\
             \x20 fan        -          -           -                true (not sent yet)   pending    -\n"
        );
    }

    #[test]
    fn device_endpoints() {
        let rtu = json!({"serialPort": "/dev/ttyUSB0", "parity": "even", "unitId": 7});
        assert_eq!(endpoint("modbusRtu", &rtu), "/dev/ttyUSB0 9600 8E1 unit 7");
        let ua = json!({"endpoint": "opc.tcp://plc:4840", "securityPolicy": "Basic256Sha256", "securityMode": "Sign"});
        assert_eq!(endpoint("opcua", &ua), "opc.tcp://plc:4840 (Basic256Sha256, Sign)");
        assert_eq!(endpoint("mqtt", &json!({"offlineAfter": "30s"})), "edge broker, offline after 30s of silence");
        assert_eq!(endpoint("external", &json!({"mapper": "bacnet"})), "mapper bacnet");
        let sel = json!({"metadata": {"name": "d"}, "spec": {"model": "m", "nodeSelector": {"site": "a"}, "protocol": {"virtual": {}}},
                         "status": {"message": "no Ready node matches the selector"}});
        let d = describe(Kind::Device, &sel, None, 0);
        assert!(
            d.contains("Node:             <selector>\nNode Selector:    site=a\nProtocol:         virtual seed 0\n"),
            "{d}"
        );
        assert!(d.contains("Message:          no Ready node matches the selector\n"), "{d}");
        assert!(d.contains("Observed Gen:     <none>\nTwins:            <none>\n"), "{d}");
        assert_eq!(show_value(&json!("a".repeat(50))), format!("{}…", "a".repeat(39)));
        assert_eq!(show_value(&json!([1, 2])), "[1,2]");
    }

    #[test]
    fn model_with_devices() {
        let model = json!({
            "metadata": {"name": "boiler"},
            "spec": {"description": "a boiler", "properties": [
                {"name": "temp", "type": "float", "unit": "°C", "minimum": -20.0, "maximum": 120.5, "description": "water temperature"},
                {"name": "setpoint", "type": "int", "accessMode": "ReadWrite"}
            ]}
        });
        let dev = json!({"metadata": {"name": "boiler-1"}, "spec": {"model": "boiler", "node": "edge-1", "protocol": {"virtual": {}}}});
        let rel = Related { title: "Devices", kind: Kind::Device, items: vec![dev] };
        let d = describe(Kind::DeviceModel, &model, Some(&rel), 0);
        assert!(d.contains("Description:      a boiler\n"), "{d}");
        assert!(
            d.contains(
                "Properties:\n\
                 \x20 NAME       TYPE    UNIT   ACCESS      MIN   MAX     DESCRIPTION\n\
                 \x20 temp       float   °C     ReadOnly    -20   120.5   water temperature\n\
                 \x20 setpoint   int     -      ReadWrite   -     -\n"
            ),
            "{d}"
        );
        assert!(d.contains("Devices:\n  NAME       MODEL    NODE     PROTOCOL   STATE     PROPS   AGE\n"), "{d}");
    }

    #[test]
    fn empty_sections() {
        let d = describe(Kind::Token, &json!({"metadata": {"name": "t"}, "spec": {}}), None, 0);
        assert!(d.contains("Spec:             <none>\n"), "{d}");
        let rel = Related { title: "Nodes", kind: Kind::Node, items: vec![] };
        let d = describe(Kind::NodeGroup, &json!({"metadata": {"name": "g"}}), Some(&rel), 0);
        assert!(d.ends_with("Nodes:\n  <none>\n"), "{d}");
    }
}
