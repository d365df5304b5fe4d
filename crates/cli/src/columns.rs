//! Which columns `get` shows for each kind, and how a cell is taken from an
//! object.
//!
//! Objects are read as JSON values, not typed structs, so that a server
//! newer than this client (with fields this build does not know) still
//! lists fine. Empty cells show as `<none>`, like kubectl.

use std::collections::BTreeMap;

use serde_json::Value;
use yunbian_api::Kind;

use crate::time::{age_since, format_age, parse_rfc3339};

/// Column headers for a kind; `wide` adds the `-o wide` columns.
pub fn headers(kind: Kind, wide: bool) -> Vec<&'static str> {
    let (base, extra): (&[&str], &[&str]) = match kind {
        Kind::Node => (
            &["NAME", "STATUS", "AGE", "VERSION"],
            &["OS/ARCH", "CPU", "MEMORY", "INSTANCES", "LIMITS", "RTT", "LABELS"],
        ),
        Kind::App => (&["NAME", "READY", "RUNTIME", "AGE"], &["SELECTOR", "MESSAGE"]),
        Kind::AppInstance => (&["NAME", "APP", "NODE", "STATUS", "RESTARTS", "AGE"], &["PID", "EXIT", "REASON"]),
        Kind::Token => (&["NAME", "EXPIRES", "REVOKED", "JOINS", "DESCRIPTION"], &[]),
        Kind::NodeGroup => {
            (&["NAME", "TIER", "SITE", "REGION", "ZONE", "COST", "NODES", "CPU", "MEMORY"], &["SELECTOR", "MEMBERS"])
        }
        Kind::Device => (&["NAME", "MODEL", "NODE", "PROTOCOL", "STATE", "PROPS", "AGE"], &["LAST-ONLINE", "ERROR"]),
        Kind::DeviceModel => (&["NAME", "PROPERTIES", "AGE"], &["TYPES"]),
        Kind::Rule => {
            (&["NAME", "SOURCE", "STEPS", "SINKS", "NODES", "RATE", "ERRORS", "AGE"], &["PER-NODE", "LAST-ERROR"])
        }
        Kind::Event => {
            (&["NAME", "SEVERITY", "STATE", "NODE", "RULE", "COUNT", "SINCE", "MESSAGE"], &["SERIES", "VALUE"])
        }
        Kind::Artifact => (&["NAME", "ARTIFACT", "VERSION", "PLATFORMS", "SIZE", "SIGNED", "AGE"], &["TYPES"]),
    };
    let mut h = base.to_vec();
    if wide {
        h.extend_from_slice(extra);
    }
    h
}

/// The cells of one object, matching [`headers`]; `now` is Unix seconds.
pub fn row(kind: Kind, obj: &Value, wide: bool, now: i64) -> Vec<String> {
    let name = text(obj, "/metadata/name");
    let age = age_since(&text(obj, "/metadata/creationTimestamp"), now);
    let mut cells = match kind {
        Kind::Node => {
            let mut status = text(obj, "/status/phase");
            if status.is_empty() {
                status = "Unknown".into();
            }
            if !text(obj, "/status/diskPressure").is_empty() {
                status.push_str(",DiskPressure");
            }
            if flag(obj, "/spec/unschedulable") {
                status.push_str(",SchedulingDisabled");
            }
            vec![name, status, age, text(obj, "/status/info/agentVersion")]
        }
        Kind::App => {
            let ready = format!("{}/{}", number(obj, "/status/readyReplicas"), number(obj, "/spec/replicas"));
            vec![name, ready, text(obj, "/spec/runtime"), age]
        }
        Kind::AppInstance => vec![
            name,
            text(obj, "/spec/app"),
            text(obj, "/spec/node"),
            instance_status(obj),
            number(obj, "/status/restartCount"),
            age,
        ],
        Kind::Token => vec![
            name,
            expires(&text(obj, "/spec/expires"), now),
            flag(obj, "/spec/revoked").to_string(),
            number(obj, "/status/joins"),
            text(obj, "/spec/description"),
        ],
        Kind::NodeGroup => {
            let tier = text(obj, "/spec/tier");
            vec![
                name,
                if tier.is_empty() { "edge".to_string() } else { tier },
                text(obj, "/spec/site"),
                text(obj, "/spec/region"),
                text(obj, "/spec/zone"),
                text(obj, "/spec/costPerCpuHour"),
                format!("{}/{}", number(obj, "/status/readyNodes"), number(obj, "/status/nodes")),
                format!(
                    "{}/{}",
                    cpu(unsigned(obj, "/status/requested/cpuMillis")),
                    cpu(unsigned(obj, "/status/allocatable/cpuMillis"))
                ),
                format!(
                    "{}/{}",
                    bytes(unsigned(obj, "/status/requested/memoryBytes")),
                    bytes(unsigned(obj, "/status/allocatable/memoryBytes"))
                ),
            ]
        }
        Kind::Device => vec![
            name,
            text(obj, "/spec/model"),
            device_node(obj),
            device_protocol(obj),
            device_state(obj),
            count(obj, "/spec/properties"),
            age,
        ],
        Kind::DeviceModel => vec![name, count(obj, "/spec/properties"), age],
        Kind::Rule => {
            let nodes = obj.pointer("/status/nodes").and_then(Value::as_object);
            let sum = |field: &str| -> f64 {
                nodes.map_or(0.0, |m| m.values().filter_map(|n| n.get(field).and_then(Value::as_f64)).sum())
            };
            let state =
                if flag(obj, "/spec/paused") { "paused".to_string() } else { nodes.map_or(0, |m| m.len()).to_string() };
            vec![
                name,
                rule_source(obj),
                count(obj, "/spec/steps"),
                rule_sinks(obj),
                state,
                format!("{:.1}/s", sum("rate")),
                format!("{}", sum("errors") as u64),
                age,
            ]
        }
        Kind::Event => {
            let since = text(obj, "/status/firingSince");
            vec![
                name,
                text(obj, "/spec/severity"),
                text(obj, "/status/state"),
                text(obj, "/spec/node"),
                text(obj, "/spec/rule"),
                number(obj, "/status/count"),
                if since.is_empty() { since } else { format!("{} ago", age_since(&since, now)) },
                text(obj, "/status/message"),
            ]
        }
        Kind::Artifact => {
            let blobs = obj.pointer("/spec/blobs").and_then(Value::as_object);
            let platforms = blobs.map(|b| b.keys().cloned().collect::<Vec<_>>().join(",")).unwrap_or_default();
            let size: u64 = blobs.map_or(0, |b| b.values().filter_map(|v| v.get("size").and_then(Value::as_u64)).sum());
            let signed = blobs.map_or(0, |b| {
                b.values()
                    .filter(|v| v.get("signatures").and_then(Value::as_array).is_some_and(|s| !s.is_empty()))
                    .count()
            });
            vec![
                name,
                text(obj, "/spec/name"),
                text(obj, "/spec/version"),
                platforms,
                bytes(size),
                format!("{signed}/{}", blobs.map_or(0, |b| b.len())),
                age,
            ]
        }
    };
    if wide {
        match kind {
            Kind::Node => cells.extend([
                os_arch(obj),
                format!("{}/{}", millis(number(obj, "/status/usage/cpuMillis")), number(obj, "/status/info/cpus")),
                format!(
                    "{}/{}",
                    bytes(unsigned(obj, "/status/usage/memoryBytes")),
                    bytes(unsigned(obj, "/status/info/memoryBytes"))
                ),
                number(obj, "/status/usage/instances"),
                if flag(obj, "/status/limitsEnforced") { "enforced" } else { "off" }.to_string(),
                cloud_rtt(obj),
                pairs(obj.pointer("/metadata/labels")),
            ]),
            Kind::NodeGroup => cells.extend([
                pairs(obj.pointer("/spec/selector")),
                obj.pointer("/status/members")
                    .and_then(Value::as_array)
                    .map(|m| m.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            ]),
            Kind::App => {
                cells.extend([pairs(obj.pointer("/spec/placement/nodeSelector")), text(obj, "/status/message")])
            }
            Kind::AppInstance => cells.extend([
                number_opt(obj, "/status/pid"),
                number_opt(obj, "/status/exitCode"),
                text(obj, "/status/reason"),
            ]),
            Kind::Device => {
                let online = text(obj, "/status/lastOnlineTime");
                let last_online = if online.is_empty() { online } else { format!("{} ago", age_since(&online, now)) };
                let mut error = text(obj, "/status/lastError");
                if error.is_empty() {
                    error = text(obj, "/status/message");
                }
                cells.extend([last_online, error]);
            }
            Kind::DeviceModel => cells.push(property_types(obj)),
            Kind::Rule => {
                let nodes = obj.pointer("/status/nodes").and_then(Value::as_object);
                let per_node = nodes
                    .map(|m| {
                        m.iter()
                            .map(|(n, s)| {
                                let rate = s.get("rate").and_then(Value::as_f64).unwrap_or(0.0);
                                let errors = s.get("errors").and_then(Value::as_u64).unwrap_or(0);
                                format!("{n}:{rate:.1}/s,{errors}err")
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let last_error = nodes
                    .and_then(|m| {
                        m.values().find_map(|s| s.get("lastError").and_then(Value::as_str).filter(|e| !e.is_empty()))
                    })
                    .unwrap_or_default()
                    .to_string();
                cells.extend([per_node, last_error]);
            }
            Kind::Event => cells.extend([
                text(obj, "/spec/series"),
                obj.pointer("/status/value").filter(|v| !v.is_null()).map(|v| v.to_string()).unwrap_or_default(),
            ]),
            Kind::Artifact => {
                let types = obj
                    .pointer("/spec/blobs")
                    .and_then(Value::as_object)
                    .map(|b| {
                        b.iter()
                            .map(|(p, v)| format!("{p}={}", v.get("type").and_then(Value::as_str).unwrap_or("?")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                cells.push(types);
            }
            Kind::Token => {}
        }
    }
    cells.into_iter().map(|c| if c.is_empty() { "<none>".to_string() } else { c }).collect()
}

/// A rule's source, short: `devices(model=boiler)`, `mqtt(sensors/#)`.
fn rule_source(obj: &Value) -> String {
    if let Some(t) = obj.pointer("/spec/source/mqtt/topic").and_then(Value::as_str) {
        return format!("mqtt({t})");
    }
    let Some(d) = obj.pointer("/spec/source/devices") else { return String::new() };
    let list = |k: &str| {
        d.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
    };
    let mut parts = Vec::new();
    if let Some(n) = list("names").filter(|s| !s.is_empty()) {
        parts.push(n);
    }
    if let Some(m) = list("models").filter(|s| !s.is_empty()) {
        parts.push(format!("model={m}"));
    }
    let sel = pairs(d.get("selector"));
    if !sel.is_empty() {
        parts.push(sel);
    }
    format!("devices({})", if parts.is_empty() { "*".to_string() } else { parts.join(";") })
}

/// A rule's sinks by kind: `tsdb,cloud,alert`.
fn rule_sinks(obj: &Value) -> String {
    obj.pointer("/spec/sinks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter().filter_map(|s| s.as_object().and_then(|m| m.keys().next().cloned())).collect::<Vec<_>>().join(",")
        })
        .unwrap_or_default()
}

/// An instance's phase, with the reason of a failure (`Failed (OOMKilled)`).
fn instance_status(obj: &Value) -> String {
    let phase = text(obj, "/status/phase");
    let phase = if phase.is_empty() { "Pending".to_string() } else { phase };
    let reason = text(obj, "/status/reason");
    if !reason.is_empty() && matches!(phase.as_str(), "Failed" | "Pending" | "Starting") {
        format!("{phase} ({reason})")
    } else {
        phase
    }
}

/// The node a device runs on: the one the cloud placed it on, else the
/// one its spec names, else `<selector>` (placed by label, not yet placed).
pub fn device_node(obj: &Value) -> String {
    let placed = text(obj, "/status/node");
    if !placed.is_empty() {
        return placed;
    }
    let named = text(obj, "/spec/node");
    if !named.is_empty() {
        return named;
    }
    if obj.pointer("/spec/nodeSelector").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
        "<selector>".into()
    } else {
        String::new()
    }
}

/// The protocol a device is spoken to with (the one key of `spec.protocol`).
pub fn device_protocol(obj: &Value) -> String {
    match obj.pointer("/spec/protocol") {
        Some(Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

/// A device's state, `unknown` until a node reports.
pub fn device_state(obj: &Value) -> String {
    let s = text(obj, "/status/state");
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// The model's properties as `name:type` (`:rw` when writable).
fn property_types(obj: &Value) -> String {
    let Some(Value::Array(props)) = obj.pointer("/spec/properties") else {
        return String::new();
    };
    props
        .iter()
        .map(|p| {
            let mut ty = text(p, "/type");
            if ty.is_empty() {
                ty = "float".into();
            }
            let rw = if text(p, "/accessMode") == "ReadWrite" { ":rw" } else { "" };
            format!("{}:{ty}{rw}", text(p, "/name"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The length of an array field, `0` when absent.
fn count(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer).and_then(Value::as_array).map_or(0, Vec::len).to_string()
}

fn expires(ts: &str, now: i64) -> String {
    if ts.is_empty() {
        return "never".into();
    }
    match parse_rfc3339(ts) {
        Some(t) if t > now => format!("in {}", format_age(t - now)),
        Some(_) => "expired".into(),
        None => ts.to_string(),
    }
}

/// A node's smoothed round trip to the cloud (`12ms`, `1.4ms`), `-` when
/// it has not reported one.
pub fn cloud_rtt(obj: &Value) -> String {
    match obj.pointer("/status/network/cloud/rttMs").and_then(Value::as_f64) {
        Some(ms) => rtt(ms),
        None => "-".into(),
    }
}

/// Milliseconds, one decimal below 10.
pub fn rtt(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

/// CPU millicores as cores when whole (`4`), else millicores (`1500m`).
fn cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// `part` of `whole` in whole percent; `-` when `whole` is zero.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{}%", (part as f64 * 100.0 / whole as f64).round() as u64)
    }
}

/// Headers of `top nodes`.
pub const TOP_NODE_HEADERS: [&str; 8] = ["NAME", "CPU", "CPU%", "MEMORY", "MEMORY%", "INSTANCES", "DISK", "RTT"];

/// One row of `top nodes`: usage against allocatable capacity (the node's
/// own figures when it reports no allocatable), instances, disk used and
/// the round trip to the cloud.
pub fn top_node_row(obj: &Value) -> Vec<String> {
    let or_info = |alloc: &str, info: u64| match unsigned(obj, alloc) {
        0 => info,
        a => a,
    };
    let cpu_alloc = or_info("/status/allocatable/cpuMillis", unsigned(obj, "/status/info/cpus") * 1000);
    let mem_alloc = or_info("/status/allocatable/memoryBytes", unsigned(obj, "/status/info/memoryBytes"));
    let cpu_used = unsigned(obj, "/status/usage/cpuMillis");
    let mem_used = unsigned(obj, "/status/usage/memoryBytes");
    vec![
        text(obj, "/metadata/name"),
        format!("{}/{}", cpu(cpu_used), cpu(cpu_alloc)),
        percent(cpu_used, cpu_alloc),
        format!("{}/{}", bytes(mem_used), bytes(mem_alloc)),
        percent(mem_used, mem_alloc),
        number(obj, "/status/usage/instances"),
        bytes(unsigned(obj, "/status/usage/diskUsedBytes")),
        cloud_rtt(obj),
    ]
}

/// The rows of `get latency`: one per measured path, `FROM TO RTT LOSS`,
/// node pairs first (sorted), then each node's path to the cloud (`TO` is
/// `cloud`). `matrix` is the `/v1/latency` answer.
pub fn latency_rows(matrix: &Value) -> Vec<Vec<String>> {
    let cell = |p: &Value| {
        let rtt_cell = p.get("rttMs").and_then(Value::as_f64).map_or_else(|| "-".to_string(), rtt);
        let loss = p.get("loss").and_then(Value::as_f64).unwrap_or(0.0);
        (rtt_cell, format!("{}%", (loss * 100.0).round() as u64))
    };
    let mut out = Vec::new();
    for (from, row) in matrix.get("nodes").and_then(Value::as_object).into_iter().flatten() {
        for (to, p) in row.as_object().into_iter().flatten() {
            let (r, l) = cell(p);
            out.push(vec![from.clone(), to.clone(), r, l]);
        }
    }
    for (node, p) in matrix.get("cloud").and_then(Value::as_object).into_iter().flatten() {
        let (r, l) = cell(p);
        out.push(vec![node.clone(), "cloud".into(), r, l]);
    }
    out
}

fn os_arch(obj: &Value) -> String {
    let os = text(obj, "/status/info/os");
    let arch = text(obj, "/status/info/arch");
    if os.is_empty() && arch.is_empty() {
        String::new()
    } else {
        format!("{os}/{arch}")
    }
}

/// A string field, or a number or bool shown as text; empty when absent.
pub fn text(obj: &Value, pointer: &str) -> String {
    match obj.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// A numeric field as text, `0` when absent.
fn number(obj: &Value, pointer: &str) -> String {
    match obj.pointer(pointer) {
        Some(Value::Number(n)) => n.to_string(),
        _ => "0".into(),
    }
}

/// A numeric field as text, empty when absent.
fn number_opt(obj: &Value, pointer: &str) -> String {
    match obj.pointer(pointer) {
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn unsigned(obj: &Value, pointer: &str) -> u64 {
    obj.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

fn flag(obj: &Value, pointer: &str) -> bool {
    obj.pointer(pointer).and_then(Value::as_bool).unwrap_or(false)
}

fn millis(m: String) -> String {
    format!("{m}m")
}

/// A string map as `k=v,k2=v2` (sorted by key); empty when absent.
pub fn pairs(map: Option<&Value>) -> String {
    let Some(Value::Object(m)) = map else {
        return String::new();
    };
    let sorted: BTreeMap<&String, String> =
        m.iter().map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect();
    sorted.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Bytes in binary units, one decimal below 10 (`512Mi`, `7.6Gi`, `0`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}")
    } else if value < 10.0 && value.fract() >= 0.05 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn app_row() {
        let app = json!({
            "metadata": {"name": "hello", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"replicas": 2, "runtime": "process", "placement": {"nodeSelector": {"site": "a"}}},
            "status": {"readyReplicas": 1}
        });
        assert_eq!(row(Kind::App, &app, false, 300), ["hello", "1/2", "process", "5m"]);
        assert_eq!(row(Kind::App, &app, true, 300)[4..], ["site=a", "<none>"]);
        assert_eq!(headers(Kind::App, true).len(), row(Kind::App, &app, true, 300).len());
    }

    #[test]
    fn every_kind_matches_its_headers() {
        let empty = json!({});
        for kind in Kind::ALL {
            for wide in [false, true] {
                assert_eq!(headers(kind, wide).len(), row(kind, &empty, wide, 0).len(), "{kind} wide={wide}");
            }
        }
    }

    #[test]
    fn node_and_token_cells() {
        let node = json!({
            "metadata": {"name": "edge-1", "labels": {"site": "a", "arch": "arm"}},
            "spec": {"unschedulable": true},
            "status": {"phase": "Ready", "info": {"os": "linux", "arch": "aarch64", "cpus": 4, "memoryBytes": 8_160_000_000u64},
                       "usage": {"cpuMillis": 120, "memoryBytes": 314_572_800u64, "instances": 3}, "limitsEnforced": true}
        });
        let r = row(Kind::Node, &node, true, 0);
        assert_eq!(r[1], "Ready,SchedulingDisabled");
        assert_eq!(r[4..], ["linux/aarch64", "120m/4", "300Mi/7.6Gi", "3", "enforced", "-", "arch=arm,site=a"]);
        let tok = json!({"metadata": {"name": "abc"}, "spec": {"expires": "1970-01-02T00:00:00Z"}});
        assert_eq!(row(Kind::Token, &tok, false, 0), ["abc", "in 24h", "false", "0", "<none>"]);
        assert_eq!(row(Kind::Token, &tok, false, 90_000)[1], "expired");
    }

    #[test]
    fn device_and_model_rows() {
        let dev = json!({
            "metadata": {"name": "boiler-1", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"model": "boiler", "node": "edge-1", "protocol": {"modbusTcp": {"host": "10.0.0.5"}},
                     "properties": [{"name": "temp"}, {"name": "setpoint"}]},
            "status": {"node": "edge-2", "state": "offline", "lastOnlineTime": "1970-01-01T00:01:00Z",
                       "lastError": "connection refused"}
        });
        assert_eq!(
            row(Kind::Device, &dev, true, 600),
            ["boiler-1", "boiler", "edge-2", "modbusTcp", "offline", "2", "10m", "9m ago", "connection refused"]
        );
        let pending = json!({
            "metadata": {"name": "p"},
            "spec": {"model": "m", "nodeSelector": {"site": "a"}, "protocol": {"virtual": {}}},
            "status": {"message": "no node matches"}
        });
        assert_eq!(
            row(Kind::Device, &pending, true, 0),
            ["p", "m", "<selector>", "virtual", "unknown", "0", "<unknown>", "<none>", "no node matches"]
        );
        let model = json!({
            "metadata": {"name": "boiler", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"properties": [{"name": "temp", "type": "float"},
                                    {"name": "setpoint", "type": "int", "accessMode": "ReadWrite"}, {"name": "x"}]}
        });
        assert_eq!(
            row(Kind::DeviceModel, &model, true, 45),
            ["boiler", "3", "45s", "temp:float,setpoint:int:rw,x:float"]
        );
        assert_eq!(headers(Kind::DeviceModel, false), ["NAME", "PROPERTIES", "AGE"]);
    }

    #[test]
    fn node_rtt_column() {
        let mut node =
            json!({"metadata": {"name": "e1"}, "status": {"network": {"cloud": {"rttMs": 123.4, "loss": 0.0}}}});
        let h = headers(Kind::Node, true);
        let at = h.iter().position(|c| *c == "RTT").expect("RTT column");
        assert_eq!(row(Kind::Node, &node, true, 0)[at], "123ms");
        node["status"]["network"]["cloud"]["rttMs"] = json!(2.25);
        assert_eq!(row(Kind::Node, &node, true, 0)[at], "2.2ms");
        node["status"]["network"]["cloud"] = json!({"loss": 1.0});
        assert_eq!(row(Kind::Node, &node, true, 0)[at], "-");
        assert!(!headers(Kind::Node, false).contains(&"RTT"));
    }

    #[test]
    fn nodegroup_columns() {
        let g = json!({
            "metadata": {"name": "shanghai"},
            "spec": {"selector": {"site": "sh"}, "site": "sh", "region": "cn-east", "zone": "sh-1", "tier": "edge",
                     "costPerCpuHour": 0.12},
            "status": {"nodes": 3, "readyNodes": 2, "members": ["a", "b", "c"],
                       "allocatable": {"cpuMillis": 8000, "memoryBytes": 17_179_869_184u64},
                       "requested": {"cpuMillis": 1500, "memoryBytes": 536_870_912u64}}
        });
        assert_eq!(
            headers(Kind::NodeGroup, false),
            ["NAME", "TIER", "SITE", "REGION", "ZONE", "COST", "NODES", "CPU", "MEMORY"]
        );
        assert_eq!(
            row(Kind::NodeGroup, &g, true, 0),
            ["shanghai", "edge", "sh", "cn-east", "sh-1", "0.12", "2/3", "1500m/8", "512Mi/16Gi", "site=sh", "a,b,c"]
        );
        let bare = json!({"metadata": {"name": "all"}});
        assert_eq!(
            row(Kind::NodeGroup, &bare, false, 0),
            ["all", "edge", "<none>", "<none>", "<none>", "<none>", "0/0", "0/0", "0/0"]
        );
    }

    #[test]
    fn top_node_rows() {
        let node = json!({
            "metadata": {"name": "e1"},
            "status": {"info": {"cpus": 4, "memoryBytes": 8_589_934_592u64},
                       "allocatable": {"cpuMillis": 4000, "memoryBytes": 8_589_934_592u64},
                       "usage": {"cpuMillis": 1000, "memoryBytes": 2_147_483_648u64, "instances": 3, "diskUsedBytes": 1_073_741_824u64},
                       "network": {"cloud": {"rttMs": 40.0}}}
        });
        assert_eq!(top_node_row(&node), ["e1", "1/4", "25%", "2Gi/8Gi", "25%", "3", "1Gi", "40ms"]);
        assert_eq!(top_node_row(&node).len(), TOP_NODE_HEADERS.len());
        // No allocatable yet: the node's own figures; nothing at all: `-`.
        let info_only =
            json!({"metadata": {"name": "e2"}, "status": {"info": {"cpus": 2}, "usage": {"cpuMillis": 500}}});
        assert_eq!(top_node_row(&info_only), ["e2", "500m/2", "25%", "0/0", "-", "0", "0", "-"]);
    }

    #[test]
    fn latency_matrix_rows() {
        let m = json!({
            "nodes": {"a": {"b": {"rttMs": 12.0, "loss": 0.0}, "c": {"loss": 1.0}}, "b": {"a": {"rttMs": 3.456, "loss": 0.25}}},
            "cloud": {"a": {"rttMs": 40.0, "loss": 0.05}}
        });
        assert_eq!(
            latency_rows(&m),
            [
                ["a", "b", "12ms", "0%"],
                ["a", "c", "-", "100%"],
                ["b", "a", "3.5ms", "25%"],
                ["a", "cloud", "40ms", "5%"],
            ]
        );
        assert!(latency_rows(&json!({})).is_empty());
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0");
        assert_eq!(bytes(1023), "1023");
        assert_eq!(bytes(64 << 20), "64Mi");
        assert_eq!(bytes(3 << 29), "1.5Gi");
    }
}
