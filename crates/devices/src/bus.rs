//! What the device side needs from the edge message bus, as a trait, so the
//! mappers do not depend on the broker's implementation (the agent adapts
//! the embedded broker; tests use [`MemoryBus`]).
//!
//! Topics (all under `yunbian/devices/<device>/`):
//! - `properties/<property>` — every new reading, JSON
//!   `{"value": …, "ts": <unix ms>, "quality": "good"|"bad"|"uncertain"}`,
//!   retained, so a subscriber gets the latest value at once;
//! - `properties/<property>/set` — written by apps: a desired value (the
//!   JSON value itself, or `{"value": …}`);
//! - `properties/<property>/set/result` — the outcome of each `set`:
//!   `{"status": "accepted"|"applied"|"failed"|"rejected", "version": n, "error": "…"}`;
//! - `state` — `{"state": "online"|"offline", "ts": …, "error": "…"}`, retained.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// Prefix of every device topic.
pub const TOPIC_PREFIX: &str = "yunbian/devices";

/// A message from the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct BusMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// A retained message delivered at subscribe time (it may be old).
    pub retain: bool,
}

/// The edge message bus as the device side uses it.
pub trait EdgeBus: Send + Sync + 'static {
    /// Publishes (QoS 0 inside the agent; `retain` keeps it for later subscribers).
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool);
    /// Subscribes to a topic filter (`+`/`#` wildcards); messages arrive on
    /// the receiver until it is dropped. Bounded: a receiver that does not
    /// keep up loses messages, never blocks the bus.
    fn subscribe(&self, filter: &str) -> Result<mpsc::Receiver<BusMessage>, String>;
}

/// Topic of a property's readings.
pub fn property_topic(device: &str, property: &str) -> String {
    format!("{TOPIC_PREFIX}/{device}/properties/{property}")
}

/// Topic of a device's state.
pub fn state_topic(device: &str) -> String {
    format!("{TOPIC_PREFIX}/{device}/state")
}

/// `(device, property)` of a `…/properties/<p>/set` topic.
pub fn parse_set_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(TOPIC_PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (device, props, property, set) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (props == "properties" && set == "set" && parts.next().is_none() && !device.is_empty() && !property.is_empty())
        .then_some((device, property))
}

/// Whether an MQTT topic filter matches a topic.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

type Subscribers = Vec<(String, mpsc::Sender<BusMessage>)>;

/// An in-memory bus (tests, and agents started without a broker).
#[derive(Clone, Default)]
pub struct MemoryBus {
    subs: Arc<Mutex<Subscribers>>,
    retained: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// The retained payload of `topic`.
    pub fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.retained.lock().ok()?.get(topic).cloned()
    }
}

impl EdgeBus for MemoryBus {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        if retain {
            if let Ok(mut r) = self.retained.lock() {
                r.insert(topic.to_string(), payload.clone());
            }
        }
        let Ok(mut subs) = self.subs.lock() else { return };
        subs.retain(|(_, tx)| !tx.is_closed());
        for (filter, tx) in subs.iter() {
            if filter_matches(filter, topic) {
                let _ = tx.try_send(BusMessage { topic: topic.to_string(), payload: payload.clone(), retain: false });
            }
        }
    }

    fn subscribe(&self, filter: &str) -> Result<mpsc::Receiver<BusMessage>, String> {
        let (tx, rx) = mpsc::channel(1024);
        if let Ok(r) = self.retained.lock() {
            for (topic, payload) in r.iter().filter(|(t, _)| filter_matches(filter, t)) {
                let _ = tx.try_send(BusMessage { topic: topic.clone(), payload: payload.clone(), retain: true });
            }
        }
        self.subs.lock().map_err(|_| "bus lock poisoned".to_string())?.push((filter.to_string(), tx));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(parse_set_topic("yunbian/devices/d1/properties/sp/set"), Some(("d1", "sp")));
        assert_eq!(parse_set_topic("yunbian/devices/d1/properties/sp"), None);
        assert_eq!(parse_set_topic("yunbian/devices/d1/properties/sp/set/result"), None);
        assert!(filter_matches("yunbian/devices/+/properties/+/set", "yunbian/devices/a/properties/b/set"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
    }
}
