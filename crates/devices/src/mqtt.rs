//! The driver of `protocol: mqtt`: a device that publishes its values on
//! the edge broker. Each property names a topic and a JSON path; `read`
//! returns the latest value seen on each (timestamped when it arrived, so
//! the twin never takes an old message for a new reading); a desired value
//! is published on the property's `setTopic` and verified by the next value
//! the device publishes.
//!
//! JSON paths are dotted keys with optional indices: `temp`, `data.temp`,
//! `$.data.values[0]`; an empty path takes the whole payload, which may
//! also be a bare number, `true`/`false` or text.

use std::sync::Arc;

use tokio::sync::mpsc;
use yunbian_api::{PropertyType, Protocol, Quality};

use crate::bus::{BusMessage, EdgeBus};
use crate::driver::{duration_ms, unix_ms, DeviceConfig, Driver, DriverError, PropertyRead, Reading, WriteError};

struct MqttProperty {
    topic: String,
    path: Vec<PathStep>,
    set_topic: String,
    ty: PropertyType,
    latest: Option<Result<Reading, String>>,
}

#[derive(Debug, Clone, PartialEq)]
enum PathStep {
    Key(String),
    Index(usize),
}

/// Parses `a.b[2].c` (an optional leading `$.` or `$` is ignored).
fn parse_path(p: &str) -> Result<Vec<PathStep>, String> {
    let p = p.strip_prefix('$').unwrap_or(p);
    let p = p.strip_prefix('.').unwrap_or(p);
    let mut steps = Vec::new();
    if p.is_empty() {
        return Ok(steps);
    }
    for part in p.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(PathStep::Key(key.to_string()));
        } else if rest.is_empty() {
            return Err(format!("empty segment in JSON path {p:?}"));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| format!("unclosed '[' in JSON path {p:?}"))?;
            let idx = r[..end].parse().map_err(|_| format!("bad index in JSON path {p:?}"))?;
            steps.push(PathStep::Index(idx));
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("unexpected {rest:?} in JSON path {p:?}"));
        }
    }
    Ok(steps)
}

/// Extracts the value at `path_text` from a payload, untyped (a bare
/// payload that is not JSON is text).
pub fn extract_raw(payload: &[u8], path_text: &str) -> Result<serde_json::Value, String> {
    let path = parse_path(path_text)?;
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
    let doc: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) if path.is_empty() => serde_json::Value::String(text.trim().to_string()),
        Err(e) => return Err(format!("payload is not JSON: {e}")),
    };
    let mut v = &doc;
    for step in &path {
        v = match step {
            PathStep::Key(k) => v.get(k.as_str()),
            PathStep::Index(i) => v.get(*i),
        }
        .ok_or_else(|| format!("JSON path {path_text:?} not found in payload"))?;
    }
    Ok(v.clone())
}

/// Extracts the property value from a payload and types it as the model says.
pub fn extract(payload: &[u8], path_text: &str, ty: PropertyType) -> Result<serde_json::Value, String> {
    coerce(&extract_raw(payload, path_text)?, ty)
}

fn coerce(v: &serde_json::Value, ty: PropertyType) -> Result<serde_json::Value, String> {
    let bad = || format!("{v} is not a {}", ty.as_str());
    Ok(match ty {
        PropertyType::Float => serde_json::json!(match v {
            serde_json::Value::String(s) => s.trim().parse::<f64>().map_err(|_| bad())?,
            other => other.as_f64().ok_or_else(bad)?,
        }),
        PropertyType::Int => serde_json::json!(match v {
            serde_json::Value::String(s) => s.trim().parse::<i64>().map_err(|_| bad())?,
            other => other
                .as_i64()
                .or_else(|| other.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(bad)?,
        }),
        PropertyType::Bool => serde_json::json!(match v {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            serde_json::Value::String(s) if s == "true" || s == "on" || s == "1" => true,
            serde_json::Value::String(s) if s == "false" || s == "off" || s == "0" => false,
            _ => return Err(bad()),
        }),
        PropertyType::String => match v {
            serde_json::Value::String(_) => v.clone(),
            other => serde_json::Value::String(other.to_string()),
        },
        PropertyType::Bytes => {
            if PropertyType::Bytes.accepts(v) {
                v.clone()
            } else {
                return Err(bad());
            }
        }
    })
}

/// The driver of `protocol: mqtt`.
pub struct MqttDriver {
    bus: Arc<dyn EdgeBus>,
    props: Vec<(String, MqttProperty)>,
    subs: Vec<mpsc::Receiver<BusMessage>>,
    offline_after_ms: u64,
    last_message_ms: u64,
}

impl MqttDriver {
    /// A driver reading the device's topics from `bus`.
    pub fn new(cfg: &DeviceConfig, bus: Arc<dyn EdgeBus>) -> Result<Self, DriverError> {
        let Protocol::Mqtt(conn) = &cfg.device.spec.protocol else {
            return Err(DriverError::Config("protocol is not mqtt".into()));
        };
        let mut props = Vec::new();
        for v in &cfg.device.spec.properties {
            let m = v
                .mqtt
                .as_ref()
                .ok_or_else(|| DriverError::Config(format!("property {} has no mqtt visitor", v.name)))?;
            let path = parse_path(&m.json_path).map_err(DriverError::Config)?;
            let ty = cfg.model.spec.property(&v.name).map(|p| p.ty).unwrap_or_default();
            props.push((
                v.name.clone(),
                MqttProperty { topic: m.topic.clone(), path, set_topic: m.set_topic.clone(), ty, latest: None },
            ));
        }
        let offline_after_ms = if conn.offline_after.is_empty() { 0 } else { duration_ms(&conn.offline_after, 0) };
        Ok(MqttDriver { bus, props, subs: Vec::new(), offline_after_ms, last_message_ms: 0 })
    }

    fn drain(&mut self) {
        let mut got: Vec<BusMessage> = Vec::new();
        for rx in &mut self.subs {
            while let Ok(m) = rx.try_recv() {
                got.push(m);
            }
        }
        if got.is_empty() {
            return;
        }
        let now = unix_ms();
        for m in got {
            // A retained message is the last value the device published,
            // at some unknown time: good enough as a first value (marked
            // uncertain), but neither proof of life nor a new reading.
            if !m.retain {
                self.last_message_ms = now;
            }
            for (_, p) in self.props.iter_mut().filter(|(_, p)| p.topic == m.topic) {
                if m.retain && p.latest.is_some() {
                    continue;
                }
                let text = path_text(&p.path);
                let quality = if m.retain { Quality::Uncertain } else { Quality::Good };
                p.latest = Some(extract(&m.payload, &text, p.ty).map(|value| Reading {
                    value,
                    ts_ms: now.max(p.latest_ts() + 1),
                    quality,
                }));
            }
        }
    }
}

impl MqttProperty {
    fn latest_ts(&self) -> u64 {
        match &self.latest {
            Some(Ok(r)) => r.ts_ms,
            _ => 0,
        }
    }
}

fn path_text(steps: &[PathStep]) -> String {
    let mut s = String::new();
    for st in steps {
        match st {
            PathStep::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            PathStep::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

#[async_trait::async_trait]
impl Driver for MqttDriver {
    async fn connect(&mut self) -> Result<(), DriverError> {
        // Subscriptions outlive "disconnects" (a silent device): the bus is
        // local, and subscribing again would replay retained messages as if
        // the device had just spoken.
        if !self.subs.is_empty() {
            return Ok(());
        }
        let mut topics: Vec<&str> = self.props.iter().map(|(_, p)| p.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for t in topics {
            self.subs.push(self.bus.subscribe(t).map_err(DriverError::Connect)?);
        }
        self.last_message_ms = unix_ms();
        Ok(())
    }

    async fn read(&mut self, only: &[String]) -> Result<Vec<PropertyRead>, DriverError> {
        self.drain();
        if self.offline_after_ms > 0 && unix_ms().saturating_sub(self.last_message_ms) > self.offline_after_ms {
            return Err(DriverError::Timeout(self.offline_after_ms));
        }
        let mut out = Vec::new();
        for (name, p) in &self.props {
            if !only.is_empty() && !only.contains(name) {
                continue;
            }
            let result = match &p.latest {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r.clone())),
                Some(Err(e)) => Err(e.clone()),
            };
            out.push(PropertyRead { property: name.clone(), result });
        }
        Ok(out)
    }

    async fn write(&mut self, property: &str, value: &serde_json::Value) -> Result<(), WriteError> {
        let (_, p) = self
            .props
            .iter()
            .find(|(n, _)| n == property)
            .ok_or_else(|| WriteError::Refused(format!("no such property {property:?}")))?;
        if p.set_topic.is_empty() {
            return Err(WriteError::Refused(format!("property {property:?} has no setTopic")));
        }
        self.bus.publish(&p.set_topic, value.to_string().into_bytes(), false);
        Ok(())
    }

    async fn disconnect(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_paths() {
        let p = br#"{"data": {"values": [1.5, 2.5], "on": "true"}, "t": 21}"#;
        assert_eq!(extract(p, "t", PropertyType::Float), Ok(json!(21.0)));
        assert_eq!(extract(p, "$.data.values[1]", PropertyType::Float), Ok(json!(2.5)));
        assert_eq!(extract(p, "data.on", PropertyType::Bool), Ok(json!(true)));
        assert_eq!(extract(b"42", "", PropertyType::Int), Ok(json!(42)));
        assert_eq!(extract(b"running", "", PropertyType::String), Ok(json!("running")));
        assert!(extract(p, "data.missing", PropertyType::Float).is_err());
        assert!(extract(b"\xff\xfe", "", PropertyType::Float).is_err());
        assert!(extract(b"{\"t\": \"hot\"}", "t", PropertyType::Float).is_err());
        assert!(parse_path("a[").is_err());
        assert!(parse_path("a..b").is_err());
    }

    fn cfg(offline_after: &str) -> DeviceConfig {
        use yunbian_api::*;
        let model = DeviceModel::new(
            "m",
            DeviceModelSpec {
                description: String::new(),
                properties: vec![PropertyModel { name: "t".into(), ty: PropertyType::Float, ..Default::default() }],
            },
        );
        let device = Device::new(
            "d",
            DeviceSpec {
                model: "m".into(),
                node: "n".into(),
                protocol: Protocol::Mqtt(MqttConnection { offline_after: offline_after.into() }),
                properties: vec![PropertyVisitor {
                    name: "t".into(),
                    mqtt: Some(MqttVisitor { topic: "s/d".into(), json_path: "t".into(), set_topic: String::new() }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        DeviceConfig { device: Arc::new(device), model: Arc::new(model) }
    }

    fn value(reads: &[PropertyRead]) -> Option<(serde_json::Value, Quality, u64)> {
        match &reads.first()?.result {
            Ok(Some(r)) => Some((r.value.clone(), r.quality, r.ts_ms)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn retained_values_are_uncertain_and_not_proof_of_life() {
        let bus = crate::bus::MemoryBus::new();
        bus.publish("s/d", br#"{"t": 1.5}"#.to_vec(), true);
        let mut d = MqttDriver::new(&cfg("1ms"), Arc::new(bus.clone())).expect("driver");
        d.connect().await.expect("connect");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // The retained value is a first value, uncertain; it does not make
        // a silent device alive.
        assert!(matches!(d.read(&[]).await, Err(DriverError::Timeout(1))));
        d.disconnect().await;
        d.connect().await.expect("reconnect");
        let first = d.read(&[]).await;
        assert!(first.is_err(), "still silent after a reconnect: {first:?}");
        // A live message is a good, new reading.
        bus.publish("s/d", br#"{"t": 2.5}"#.to_vec(), false);
        let r = d.read(&[]).await.expect("alive");
        let (v, q, _) = value(&r).expect("value");
        assert_eq!((v, q), (serde_json::json!(2.5), Quality::Good));
    }

    #[tokio::test]
    async fn a_retained_first_value_is_kept_as_uncertain() {
        let bus = crate::bus::MemoryBus::new();
        bus.publish("s/d", br#"{"t": 1.5}"#.to_vec(), true);
        let mut d = MqttDriver::new(&cfg(""), Arc::new(bus.clone())).expect("driver");
        d.connect().await.expect("connect");
        let (v, q, ts) = value(&d.read(&[]).await.expect("read")).expect("value");
        assert_eq!((v, q), (serde_json::json!(1.5), Quality::Uncertain));
        // Reading again without a new message returns the same timestamp:
        // the twin does not take it for a new reading.
        let (_, _, ts2) = value(&d.read(&[]).await.expect("read")).expect("value");
        assert_eq!(ts, ts2);
    }
}
