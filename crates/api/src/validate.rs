//! Validation: every error, each with the path of the field it is about.

use std::fmt;

use crate::device::*;
use crate::kinds::*;
use crate::meta::ObjectMeta;
use crate::quantity::{parse_cpu_millis, parse_memory_bytes};
use crate::rule::*;

/// One problem with one field (`spec.replicas: must be >= 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, `spec.process.command`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects field errors while walking an object.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
}

/// Types that can check themselves.
pub trait Validate {
    /// Appends every problem found, with field paths under `path`.
    fn validate(&self, path: &str, errs: &mut Errors);

    /// All problems of a whole object (path root is empty).
    fn errors(&self) -> Vec<FieldError> {
        let mut e = Errors::default();
        self.validate("", &mut e);
        e.0
    }
}

pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Names are DNS labels: 1–63 of `a-z0-9-`, starting and ending alphanumeric.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !name.chars().all(ok_char) {
        return Err(format!("{name:?} must consist of lower-case letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must start and end with a letter or digit"));
    }
    Ok(())
}

fn check_label_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 253 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn check_label_value(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

pub(crate) fn check_labels(path: &str, labels: &std::collections::BTreeMap<String, String>, errs: &mut Errors) {
    for (k, v) in labels {
        if !check_label_key(k) {
            errs.add(format!("{path}[{k}]"), "invalid label key");
        }
        if !check_label_value(v) {
            errs.add(format!("{path}[{k}]"), format!("invalid label value {v:?}"));
        }
    }
}

impl Validate for ObjectMeta {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Err(m) = check_name(&self.name) {
            errs.add(join(path, "name"), m);
        }
        check_labels(&join(path, "labels"), &self.labels, errs);
    }
}

impl<S: Validate + KindOf> Validate for Object<S, S::Status> {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.api_version != crate::API_VERSION {
            errs.add(join(path, "apiVersion"), format!("must be {}", crate::API_VERSION));
        }
        if self.kind != S::KIND.as_str() {
            errs.add(join(path, "kind"), format!("must be {}", S::KIND.as_str()));
        }
        self.metadata.validate(&join(path, "metadata"), errs);
        self.spec.validate(&join(path, "spec"), errs);
    }
}

impl Validate for NodeSpec {
    fn validate(&self, _path: &str, _errs: &mut Errors) {}
}

impl Validate for NodeGroupSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        check_labels(&join(path, "selector"), &self.selector, errs);
        if let Some(c) = self.cost_per_cpu_hour {
            if !(c.is_finite() && c >= 0.0) {
                errs.add(join(path, "costPerCpuHour"), "must be a number >= 0");
            }
        }
        if let Some(t) = &self.trust {
            if t.require_signature && t.keys.is_empty() {
                errs.add(join(path, "trust.keys"), "must list at least one key when requireSignature is true");
            }
            for (i, k) in t.keys.iter().enumerate() {
                if k.public_key.len() != 64 || !k.public_key.chars().all(|c| c.is_ascii_hexdigit()) {
                    errs.add(
                        join(path, &format!("trust.keys[{i}].publicKey")),
                        "must be an ed25519 public key: 64 hex digits",
                    );
                }
            }
        }
    }
}

impl Validate for TokenSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.secret_hash.len() != 64 || !self.secret_hash.chars().all(|c| c.is_ascii_hexdigit()) {
            errs.add(join(path, "secretHash"), "must be 64 hex digits");
        }
    }
}

impl Validate for ResourceList {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Some(c) = &self.cpu {
            if let Err(m) = parse_cpu_millis(c) {
                errs.add(join(path, "cpu"), m);
            }
        }
        if let Some(m) = &self.memory {
            if let Err(msg) = parse_memory_bytes(m) {
                errs.add(join(path, "memory"), msg);
            }
        }
    }
}

impl Validate for Resources {
    fn validate(&self, path: &str, errs: &mut Errors) {
        self.requests.validate(&join(path, "requests"), errs);
        self.limits.validate(&join(path, "limits"), errs);
        let (rc, lc) = (self.requests.cpu_millis(), self.limits.cpu_millis());
        if self.limits.cpu.is_some() && rc > lc {
            errs.add(join(path, "requests.cpu"), "must be <= limits.cpu");
        }
        let (rm, lm) = (self.requests.memory_bytes(), self.limits.memory_bytes());
        if self.limits.memory.is_some() && rm > lm {
            errs.add(join(path, "requests.memory"), "must be <= limits.memory");
        }
        if self.limits.memory.is_some() && lm < 1 << 20 {
            errs.add(join(path, "limits.memory"), "must be at least 1Mi");
        }
        if self.limits.cpu.is_some() && lc < 10 {
            errs.add(join(path, "limits.cpu"), "must be at least 10m");
        }
    }
}

impl Validate for Probe {
    fn validate(&self, path: &str, errs: &mut Errors) {
        let n = self.tcp.is_some() as u8 + self.http.is_some() as u8 + self.exec.is_some() as u8;
        if n != 1 {
            errs.add(path, "exactly one of tcp, http, exec must be set");
        }
        if let Some(t) = &self.tcp {
            if t.port == 0 {
                errs.add(join(path, "tcp.port"), "must be 1-65535");
            }
        }
        if let Some(h) = &self.http {
            if h.port == 0 {
                errs.add(join(path, "http.port"), "must be 1-65535");
            }
            if !h.path.starts_with('/') {
                errs.add(join(path, "http.path"), "must start with '/'");
            }
        }
        if let Some(e) = &self.exec {
            if e.command.is_empty() {
                errs.add(join(path, "exec.command"), "must not be empty");
            }
        }
        if self.period_seconds == 0 {
            errs.add(join(path, "periodSeconds"), "must be >= 1");
        }
        if self.timeout_seconds == 0 {
            errs.add(join(path, "timeoutSeconds"), "must be >= 1");
        }
        if self.failure_threshold == 0 {
            errs.add(join(path, "failureThreshold"), "must be >= 1");
        }
    }
}

impl Validate for WorkloadTemplate {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Some(a) = &self.artifact {
            for (field, message) in a.errors() {
                let at =
                    if field.is_empty() { join(path, "artifact") } else { join(path, &format!("artifact.{field}")) };
                errs.add(at, message);
            }
        }
        let has_artifact = self.artifact.is_some();
        match (self.runtime, &self.process) {
            (RuntimeKind::Process, None) if !has_artifact => {
                errs.add(join(path, "process"), "is required when runtime is process (or give an artifact)")
            }
            (RuntimeKind::Wasm | RuntimeKind::Oci, _) if !has_artifact => errs.add(
                join(path, "artifact"),
                format!("is required when runtime is {} (the module or image to run)", self.runtime.as_str()),
            ),
            (RuntimeKind::Fake, _) | (_, None) => {}
            (_, Some(p)) => {
                // With an artifact, the command may be empty (an executable
                // artifact runs itself; a wasm module or image has its own
                // entry point) and may name a file inside a bundle.
                if p.command.is_empty() && !has_artifact {
                    errs.add(join(path, "process.command"), "must not be empty");
                } else if p.command.first().is_some_and(|c| c.is_empty()) {
                    errs.add(join(path, "process.command[0]"), "must not be empty");
                }
                for k in p.env.keys() {
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        errs.add(join(path, &format!("process.env[{k}]")), "invalid variable name");
                    }
                }
                if !p.working_dir.is_empty() && !p.working_dir.starts_with('/') {
                    errs.add(join(path, "process.workingDir"), "must be an absolute path");
                }
            }
        }
        self.resources.validate(&join(path, "resources"), errs);
        if let Some(l) = &self.health.liveness {
            l.validate(&join(path, "health.liveness"), errs);
        }
        if let Some(w) = &self.wasm {
            if self.runtime != RuntimeKind::Wasm {
                errs.add(join(path, "wasm"), "applies only to runtime: wasm");
            }
            if !w.cpu_stop_after.is_empty() {
                match crate::time::parse_duration_ms(&w.cpu_stop_after) {
                    Ok(ms) if (1_000..=86_400_000).contains(&ms) => {}
                    Ok(_) => errs.add(join(path, "wasm.cpuStopAfter"), "must be between 1s and 24h"),
                    Err(e) => errs.add(join(path, "wasm.cpuStopAfter"), e),
                }
            }
        }
    }
}

impl Validate for AppSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.replicas < 0 {
            errs.add(join(path, "replicas"), "must be >= 0");
        } else if self.replicas > 100_000 {
            errs.add(join(path, "replicas"), "must be <= 100000");
        }
        self.template().validate(path, errs);
        self.placement.validate(&join(path, "placement"), errs);
        if let Some(n) = &self.on_node_lost {
            n.validate(&join(path, "onNodeLost"), errs);
        }
        if let Some(a) = &self.autoscale {
            a.validate(&join(path, "autoscale"), errs);
            if self.placement.mode == crate::placement::PlacementMode::EveryNode {
                errs.add(join(path, "autoscale"), "does not apply to placement.mode: everyNode");
            }
            if self.placement.per_group.is_some() {
                errs.add(join(path, "autoscale"), "does not apply to placement.perGroup (it scales replicas)");
            }
        }
        if let Some(r) = &self.rollout {
            r.validate(&join(path, "rollout"), errs);
            if self.placement.mode == crate::placement::PlacementMode::EveryNode
                && r.max_unavailable.resolve(100, false) == 0
            {
                // One instance per node leaves no room to surge: the old one must go first.
                errs.add(join(path, "rollout.maxUnavailable"), "must be >= 1 with placement.mode: everyNode");
            }
        }
    }
}

impl Validate for AppInstanceSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Err(m) = check_name(&self.app) {
            errs.add(join(path, "app"), m);
        }
        if let Err(m) = check_name(&self.node) {
            errs.add(join(path, "node"), m);
        }
        self.template.validate(&join(path, "template"), errs);
    }
}

impl Validate for DeviceModelSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.properties.iter().enumerate() {
            let pp = join(path, &format!("properties[{i}]"));
            if let Err(m) = check_property_name(&p.name) {
                errs.add(join(&pp, "name"), m);
            } else if !seen.insert(p.name.as_str()) {
                errs.add(join(&pp, "name"), format!("duplicate property {:?}", p.name));
            }
            let numeric = matches!(p.ty, PropertyType::Int | PropertyType::Float);
            if !numeric && (p.minimum.is_some() || p.maximum.is_some()) {
                errs.add(join(&pp, "minimum"), format!("minimum/maximum apply to numbers, not {}", p.ty.as_str()));
            }
            if let (Some(lo), Some(hi)) = (p.minimum, p.maximum) {
                if lo > hi {
                    errs.add(join(&pp, "maximum"), "must be >= minimum");
                }
            }
        }
    }
}

/// Property names: 1–63 of letters, digits, `_` and `-` (they become MQTT
/// topic levels and map keys).
pub fn check_property_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1-63 characters".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("{name:?} must consist of letters, digits, '_' and '-'"));
    }
    Ok(())
}

fn check_duration(path: &str, value: &str, min_ms: u64, errs: &mut Errors) {
    match crate::time::parse_duration_ms(value) {
        Ok(ms) if ms < min_ms => errs.add(path, format!("must be at least {min_ms}ms")),
        Ok(_) => {}
        Err(e) => errs.add(path, e),
    }
}

fn check_topic(path: &str, topic: &str, errs: &mut Errors) {
    if topic.is_empty() || topic.len() > 1024 {
        errs.add(path, "must be 1-1024 bytes");
    } else if topic.contains(['+', '#', '\0']) {
        errs.add(path, "must not contain wildcards (+, #) or NUL");
    }
}

impl Validate for DeviceSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Err(m) = check_name(&self.model) {
            errs.add(join(path, "model"), m);
        }
        match (self.node.is_empty(), self.node_selector.is_empty()) {
            (true, true) => errs.add(join(path, "node"), "one of node or nodeSelector is required"),
            (false, false) => errs.add(join(path, "nodeSelector"), "must not be set together with node"),
            (false, true) => {
                if let Err(m) = check_name(&self.node) {
                    errs.add(join(path, "node"), m);
                }
            }
            (true, false) => check_labels(&join(path, "nodeSelector"), &self.node_selector, errs),
        }
        check_duration(&join(path, "collectCycle"), &self.collect_cycle, 10, errs);
        check_duration(&join(path, "reportCycle"), &self.report_cycle, 0, errs);
        if !(self.deadband >= 0.0 && self.deadband.is_finite()) {
            errs.add(join(path, "deadband"), "must be a finite number >= 0");
        }
        let proto = join(path, "protocol");
        match &self.protocol {
            Protocol::ModbusTcp(t) => {
                if t.host.is_empty() {
                    errs.add(join(&proto, "modbusTcp.host"), "must not be empty");
                }
                if t.port == 0 {
                    errs.add(join(&proto, "modbusTcp.port"), "must be 1-65535");
                }
                check_duration(&join(&proto, "modbusTcp.timeout"), &t.timeout, 10, errs);
            }
            Protocol::ModbusRtu(r) => {
                if !r.serial_port.starts_with('/') {
                    errs.add(join(&proto, "modbusRtu.serialPort"), "must be an absolute device path");
                }
                if r.baud_rate == 0 {
                    errs.add(join(&proto, "modbusRtu.baudRate"), "must be > 0");
                }
                if !(5..=8).contains(&r.data_bits) {
                    errs.add(join(&proto, "modbusRtu.dataBits"), "must be 5-8");
                }
                if !(1..=2).contains(&r.stop_bits) {
                    errs.add(join(&proto, "modbusRtu.stopBits"), "must be 1 or 2");
                }
                if r.unit_id == 0 || r.unit_id > 247 {
                    errs.add(join(&proto, "modbusRtu.unitId"), "must be 1-247");
                }
                check_duration(&join(&proto, "modbusRtu.timeout"), &r.timeout, 10, errs);
            }
            Protocol::Opcua(o) => {
                if !o.endpoint.starts_with("opc.tcp://") {
                    errs.add(join(&proto, "opcua.endpoint"), "must start with opc.tcp://");
                }
                if (o.security_policy == SecurityPolicy::None) != (o.security_mode == SecurityMode::None) {
                    errs.add(
                        join(&proto, "opcua.securityMode"),
                        "securityPolicy None goes with securityMode None, and only with it",
                    );
                }
                if o.username.is_empty() && !o.password.is_empty() {
                    errs.add(join(&proto, "opcua.username"), "is required with password");
                }
                if o.certificate_file.is_empty() != o.private_key_file.is_empty() {
                    errs.add(join(&proto, "opcua.privateKeyFile"), "certificateFile and privateKeyFile go together");
                }
                check_duration(&join(&proto, "opcua.timeout"), &o.timeout, 10, errs);
            }
            Protocol::Mqtt(m) => {
                if !m.offline_after.is_empty() {
                    check_duration(&join(&proto, "mqtt.offlineAfter"), &m.offline_after, 0, errs);
                }
            }
            Protocol::Virtual(_) => {}
            Protocol::External(e) => {
                if let Err(m) = check_property_name(&e.mapper) {
                    errs.add(join(&proto, "external.mapper"), m);
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, v) in self.properties.iter().enumerate() {
            let pp = join(path, &format!("properties[{i}]"));
            if let Err(m) = check_property_name(&v.name) {
                errs.add(join(&pp, "name"), m);
            } else if !seen.insert(v.name.as_str()) {
                errs.add(join(&pp, "name"), format!("duplicate property {:?}", v.name));
            }
            let (want, set) = match &self.protocol {
                Protocol::ModbusTcp(_) | Protocol::ModbusRtu(_) => ("modbus", v.modbus.is_some()),
                Protocol::Opcua(_) => ("opcua", v.opcua.is_some()),
                Protocol::Mqtt(_) => ("mqtt", v.mqtt.is_some()),
                Protocol::Virtual(_) => ("virtual", v.generator.is_some()),
                Protocol::External(_) => ("external", true),
            };
            let count = v.modbus.is_some() as u8
                + v.opcua.is_some() as u8
                + v.mqtt.is_some() as u8
                + v.generator.is_some() as u8
                + v.external.is_some() as u8;
            if !set {
                errs.add(join(&pp, want), format!("is required for protocol {}", self.protocol.name()));
            } else if count > 1 || (want == "external" && count == 1 && v.external.is_none()) {
                errs.add(
                    pp.clone(),
                    format!("only the {want} visitor may be set for protocol {}", self.protocol.name()),
                );
            }
            if let Some(d) = v.deadband {
                if !(d >= 0.0 && d.is_finite()) {
                    errs.add(join(&pp, "deadband"), "must be a finite number >= 0");
                }
            }
            if let Some(m) = &v.modbus {
                let q = m.quantity();
                if m.data_type() == ModbusDataType::String && m.count.is_none() {
                    errs.add(join(&pp, "modbus.count"), "is required for dataType string");
                }
                if q == 0 || q > 125 {
                    errs.add(join(&pp, "modbus.count"), "must be 1-125 registers");
                } else if m.address as u32 + q as u32 > 65_536 {
                    errs.add(join(&pp, "modbus.address"), "address + registers must be <= 65536");
                }
                if !(m.scale.is_finite() && m.scale != 0.0) {
                    errs.add(join(&pp, "modbus.scale"), "must be a finite number other than 0");
                }
                if !m.offset.is_finite() {
                    errs.add(join(&pp, "modbus.offset"), "must be finite");
                }
            }
            if let Some(o) = &v.opcua {
                if o.node_id.is_empty() {
                    errs.add(join(&pp, "opcua.nodeId"), "must not be empty");
                }
            }
            if let Some(m) = &v.mqtt {
                check_topic(&join(&pp, "mqtt.topic"), &m.topic, errs);
                if !m.set_topic.is_empty() {
                    check_topic(&join(&pp, "mqtt.setTopic"), &m.set_topic, errs);
                }
            }
            if let Some(g) = &v.generator {
                match g {
                    Generator::Sine { period, .. } => check_duration(&join(&pp, "virtual.period"), period, 1, errs),
                    Generator::Step { values, period } => {
                        if values.is_empty() {
                            errs.add(join(&pp, "virtual.values"), "must not be empty");
                        }
                        check_duration(&join(&pp, "virtual.period"), period, 1, errs);
                    }
                    Generator::RandomWalk { min, max, step, .. } => {
                        if min > max {
                            errs.add(join(&pp, "virtual.max"), "must be >= min");
                        }
                        if step.is_nan() || *step < 0.0 {
                            errs.add(join(&pp, "virtual.step"), "must be >= 0");
                        }
                    }
                    Generator::Constant { .. } => {}
                }
            }
        }
        for name in self.desired.keys() {
            if self.visitor(name).is_none() {
                errs.add(join(path, &format!("desired[{name}]")), "property has no visitor in spec.properties");
            }
        }
    }
}

impl Validate for RuleSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        check_labels(&join(path, "nodeSelector"), &self.node_selector, errs);
        let src = join(path, "source");
        match (&self.source.devices, &self.source.mqtt) {
            (None, None) | (Some(_), Some(_)) => errs.add(&src, "exactly one of devices, mqtt must be set"),
            (Some(d), None) => {
                for (i, n) in d.names.iter().enumerate() {
                    if let Err(m) = check_name(n) {
                        errs.add(join(&src, &format!("devices.names[{i}]")), m);
                    }
                }
                for (i, n) in d.models.iter().enumerate() {
                    if let Err(m) = check_name(n) {
                        errs.add(join(&src, &format!("devices.models[{i}]")), m);
                    }
                }
                check_labels(&join(&src, "devices.selector"), &d.selector, errs);
                for (i, p) in d.properties.iter().enumerate() {
                    if let Err(m) = check_property_name(p) {
                        errs.add(join(&src, &format!("devices.properties[{i}]")), m);
                    }
                }
            }
            (None, Some(m)) => {
                if m.topic.is_empty() || m.topic.len() > 1024 || m.topic.contains('\0') {
                    errs.add(join(&src, "mqtt.topic"), "must be 1-1024 bytes without NUL");
                } else if m.topic.split('/').any(|l| (l.contains('+') || l.contains('#')) && l.len() > 1)
                    || m.topic.split('/').rev().skip(1).any(|l| l == "#")
                {
                    errs.add(join(&src, "mqtt.topic"), "wildcards must fill a whole level, and # must be last");
                }
            }
        }
        for (i, st) in self.steps.iter().enumerate() {
            let sp = join(path, &format!("steps[{i}]"));
            let n = st.filter.is_some() as u8
                + st.map.is_some() as u8
                + st.window.is_some() as u8
                + st.deadband.is_some() as u8
                + st.rename.is_some() as u8
                + st.tag.is_some() as u8;
            if n != 1 {
                errs.add(&sp, "exactly one of filter, map, window, deadband, rename, tag must be set");
            }
            for (field, expr) in [("filter", &st.filter), ("map", &st.map)] {
                if expr.as_ref().is_some_and(|e| e.trim().is_empty()) {
                    errs.add(join(&sp, field), "must not be empty");
                }
            }
            if let Some(w) = &st.window {
                check_duration(&join(&sp, "window.size"), &w.size, 1, errs);
                match (w.kind, w.every.is_empty()) {
                    (WindowKind::Sliding, true) => {
                        errs.add(join(&sp, "window.every"), "is required for sliding windows")
                    }
                    (WindowKind::Tumbling, false) => {
                        errs.add(join(&sp, "window.every"), "applies to sliding windows only")
                    }
                    (WindowKind::Sliding, false) => {
                        check_duration(&join(&sp, "window.every"), &w.every, 1, errs);
                        let size = crate::time::parse_duration_ms(&w.size).unwrap_or(0);
                        let every = crate::time::parse_duration_ms(&w.every).unwrap_or(0);
                        if every > size {
                            errs.add(join(&sp, "window.every"), "must be <= size");
                        } else if every > 0 && size / every > 1_000 {
                            errs.add(join(&sp, "window.every"), "at most 1000 windows may overlap");
                        }
                    }
                    (WindowKind::Tumbling, true) => {}
                }
                if !w.lateness.is_empty() {
                    check_duration(&join(&sp, "window.lateness"), &w.lateness, 0, errs);
                }
            }
            if let Some(d) = st.deadband {
                if !(d.is_finite() && d >= 0.0) {
                    errs.add(join(&sp, "deadband"), "must be a finite number >= 0");
                }
            }
            if let Some(r) = &st.rename {
                if let Err(m) = check_metric_name(r) {
                    errs.add(join(&sp, "rename"), m);
                }
            }
            if let Some(t) = &st.tag {
                check_labels(&join(&sp, "tag"), t, errs);
            }
        }
        if self.sinks.is_empty() {
            errs.add(join(path, "sinks"), "at least one sink is required");
        }
        for (i, sk) in self.sinks.iter().enumerate() {
            let sp = join(path, &format!("sinks[{i}]"));
            let n =
                sk.tsdb.is_some() as u8 + sk.mqtt.is_some() as u8 + sk.cloud.is_some() as u8 + sk.alert.is_some() as u8;
            if n != 1 {
                errs.add(&sp, "exactly one of tsdb, mqtt, cloud, alert must be set");
            }
            if let Some(t) = &sk.tsdb {
                if !t.metric.is_empty() {
                    if let Err(m) = check_metric_name(&t.metric) {
                        errs.add(join(&sp, "tsdb.metric"), m);
                    }
                }
            }
            if let Some(m) = &sk.mqtt {
                check_topic(&join(&sp, "mqtt.topic"), &m.topic, errs);
                // `{…}` placeholders can become anything: match them as `+`.
                let concrete: String = {
                    let mut out = String::new();
                    let mut depth = 0;
                    for c in m.topic.chars() {
                        match c {
                            '{' => depth += 1,
                            '}' if depth > 0 => {
                                depth -= 1;
                                if depth == 0 {
                                    out.push('\u{1}');
                                }
                            }
                            _ if depth == 0 => out.push(c),
                            _ => {}
                        }
                    }
                    out
                };
                let source_filter = match (&self.source.mqtt, &self.source.devices) {
                    (Some(s), _) => Some(s.topic.as_str()),
                    (None, Some(_)) => Some("yunbian/devices/+/properties/+"),
                    _ => None,
                };
                if source_filter.is_some_and(|f| topic_may_match(f, &concrete)) {
                    errs.add(join(&sp, "mqtt.topic"), "matches the rule's own source: the rule would feed itself");
                }
            }
            if let Some(c) = &sk.cloud {
                if c.priority > 9 {
                    errs.add(join(&sp, "cloud.priority"), "must be 0-9");
                }
            }
            if let Some(a) = &sk.alert {
                if a.message.trim().is_empty() {
                    errs.add(join(&sp, "alert.message"), "must not be empty");
                }
            }
        }
    }
}

/// Whether MQTT filter `filter` can match `topic`, where `\u{1}` in the
/// topic stands for any text (a `{…}` placeholder).
fn topic_may_match(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b || b.contains('\u{1}') => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Metric names: 1–200 of letters, digits, `_`, `:`, `.` and `-`, not
/// starting with a digit.
pub fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("must be 1-200 characters".into());
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("{name:?} must not start with a digit"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c)) {
        return Err(format!("{name:?} must consist of letters, digits, '_', ':', '.' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("edge-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Edge").is_err());
        assert!(check_name("-a").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn app_errors_carry_paths() {
        let mut app = App::new("x", AppSpec { replicas: -1, ..Default::default() });
        app.spec.resources.limits.memory = Some("lots".into());
        let errs: Vec<String> = app.errors().iter().map(|e| e.to_string()).collect();
        assert!(errs.contains(&"spec.replicas: must be >= 0".to_string()), "{errs:?}");
        assert!(
            errs.contains(&"spec.process: is required when runtime is process (or give an artifact)".to_string()),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.starts_with("spec.resources.limits.memory:")), "{errs:?}");
    }

    #[test]
    fn wasm_settings_need_the_wasm_runtime_and_a_sane_duration() {
        use crate::artifact::ArtifactRef;
        use crate::kinds::WasmSpec;
        let artifact = Some(ArtifactRef { name: "m".into(), version: "1".into(), ..Default::default() });
        let errs = |runtime: RuntimeKind, after: &str| -> Vec<String> {
            let wasm = Some(WasmSpec { cpu_stop_after: after.into() });
            let spec = AppSpec { runtime, artifact: artifact.clone(), wasm, ..Default::default() };
            App::new("x", spec).errors().iter().map(|e| e.to_string()).collect()
        };
        assert!(errs(RuntimeKind::Wasm, "30s").is_empty(), "{:?}", errs(RuntimeKind::Wasm, "30s"));
        assert!(errs(RuntimeKind::Wasm, "").is_empty());
        assert_eq!(errs(RuntimeKind::Oci, "30s"), ["spec.wasm: applies only to runtime: wasm"]);
        assert_eq!(errs(RuntimeKind::Wasm, "10ms"), ["spec.wasm.cpuStopAfter: must be between 1s and 24h"]);
        assert_eq!(errs(RuntimeKind::Wasm, "2d"), ["spec.wasm.cpuStopAfter: must be between 1s and 24h"]);
        let bad = errs(RuntimeKind::Wasm, "soon");
        assert!(bad.len() == 1 && bad[0].starts_with("spec.wasm.cpuStopAfter: "), "{bad:?}");
        // It reaches the instances' template.
        let spec = AppSpec { wasm: Some(WasmSpec { cpu_stop_after: "1m".into() }), ..Default::default() };
        assert_eq!(spec.template().wasm.map(|w| w.cpu_stop_after).as_deref(), Some("1m"));
    }

    #[test]
    fn artifact_references_and_runtimes_are_checked() {
        use crate::artifact::ArtifactRef;
        let errs =
            |spec: AppSpec| -> Vec<String> { App::new("x", spec).errors().iter().map(|e| e.to_string()).collect() };
        // wasm and oci need an artifact; process takes one instead of a command.
        let e = errs(AppSpec { runtime: RuntimeKind::Wasm, ..Default::default() });
        assert!(e.iter().any(|e| e.starts_with("spec.artifact: is required when runtime is wasm")), "{e:?}");
        let art = |name: &str, version: &str, digest: &str| {
            Some(ArtifactRef { name: name.into(), version: version.into(), digest: digest.into() })
        };
        assert_eq!(errs(AppSpec { artifact: art("tool", "1.0", ""), ..Default::default() }), Vec::<String>::new());
        let e =
            errs(AppSpec { runtime: RuntimeKind::Oci, artifact: art("", "", &"a".repeat(64)), ..Default::default() });
        assert!(e.is_empty(), "{e:?}");
        let e = errs(AppSpec { artifact: art("tool", "", "sha256:xyz"), ..Default::default() });
        assert!(e.contains(&"spec.artifact.version: is required with name".to_string()), "{e:?}");
        assert!(e.iter().any(|e| e.starts_with("spec.artifact.digest: must be a sha256 digest")), "{e:?}");
        let e = errs(AppSpec { artifact: art("", "", ""), ..Default::default() });
        assert!(e.contains(&"spec.artifact: needs name and version, or digest".to_string()), "{e:?}");
        let e = errs(AppSpec { artifact: art("Bad--Name", "1-0", ""), ..Default::default() });
        assert!(
            e.iter().any(|e| e.starts_with("spec.artifact.name:"))
                && e.iter().any(|e| e.starts_with("spec.artifact.version:")),
            "{e:?}"
        );
    }

    #[test]
    fn rule_errors_carry_paths() {
        let y = r#"
source: {devices: {models: [boiler]}, mqtt: {topic: "a/#"}}
steps:
  - {filter: "value > 1", map: "value"}
  - window: {type: sliding, size: 10s}
  - rename: "9bad"
sinks:
  - {cloud: {priority: 12}}
  - {mqtt: {topic: "out/+"}}
"#;
        let v: serde_json::Value = serde_yaml::from_str(y).expect("yaml");
        let spec: RuleSpec = serde_json::from_value(v).expect("shape");
        let mut e = Errors::default();
        spec.validate("spec", &mut e);
        let errs: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        for want in [
            "spec.source: exactly one of devices, mqtt",
            "spec.steps[0]: exactly one of",
            "spec.steps[1].window.every: is required for sliding windows",
            "spec.steps[2].rename:",
            "spec.sinks[0].cloud.priority: must be 0-9",
            "spec.sinks[1].mqtt.topic: must not contain wildcards",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want} not in {errs:?}");
        }
        // A rule must not publish where it reads.
        let y = r#"
source: {devices: {}}
sinks: [{mqtt: {topic: "yunbian/devices/{tags.device}/properties/avg"}}, {mqtt: {topic: "rules/avg"}}]
"#;
        let v: serde_json::Value = serde_yaml::from_str(y).expect("yaml");
        let spec: RuleSpec = serde_json::from_value(v).expect("shape");
        let mut e = Errors::default();
        spec.validate("spec", &mut e);
        let errs: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs, ["spec.sinks[0].mqtt.topic: matches the rule's own source: the rule would feed itself"]);
    }
}
