//! The mapper host: one supervised task per device, the desired-value book,
//! and the bridge between the devices, the edge bus and the agent.
//!
//! Device task (state machine, one per device):
//! ```text
//!   Connecting ──ok──▶ Collecting ◀─┐   every collectCycle: read all properties,
//!      ▲   │                        │   publish new readings, run pending writes
//!      │   └─fail─▶ back-off ───────┘   (write, read back, verify), report the
//!      └──────── device-level error ◀┘   twin when due
//! ```
//! Every driver call is bounded by a timeout; a device-level failure
//! disconnects, counts towards offline and reconnects with back-off (from
//! the collect cycle up to 30 s). The task never blocks on another device.
//!
//! Desired values: the cloud's `spec.desired` and local sets (MQTT
//! `…/set`, the local HTTP API) meet in the [`DesiredBook`]: a cloud value
//! replaces the current one only when the cloud's value for that property
//! changed; a local set replaces it at once. Versions only grow per
//! property. The book is persisted in the agent's data directory, so a
//! restart does not write an old cloud value over a newer local one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use yunbian_api::{check_desired_write, DesiredTwin, DeviceState, DeviceStatus, Protocol, Quality};

use crate::bus::{parse_set_topic, property_topic, state_topic, EdgeBus};
use crate::driver::{duration_ms, unix_ms, DeviceConfig, Driver, DriverError, Reading, WriteError};
use crate::twin::{write_verified, TwinState};

/// Longest back-off between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Collections a written value may take to show up before it is written again.
const VERIFY_CYCLES: u32 = 3;
/// Wait after a refused write before trying again.
const WRITE_RETRY: Duration = Duration::from_secs(5);

/// Builds a driver for a device (the agent plugs in the protocols it has).
pub type DriverFactory = Arc<dyn Fn(&DeviceConfig) -> Result<Box<dyn Driver>, DriverError> + Send + Sync>;

/// What the host tells the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    /// A twin report for the cloud.
    Status {
        /// Device name.
        device: String,
        /// Its status.
        status: DeviceStatus,
    },
}

/// Why a local desired write was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetError {
    /// The device is not on this node.
    #[error("device {0:?} is not attached to this node")]
    NoDevice(String),
    /// The model refuses the value.
    #[error("{0}")]
    Invalid(String),
}

/// One device as listed by the local API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSummary {
    /// Name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Protocol name.
    pub protocol: String,
    /// State.
    pub state: DeviceState,
}

/// Desired values of one device and where they came from (persisted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredBook {
    /// The cloud's `spec.desired` as last seen.
    pub cloud_seen: BTreeMap<String, serde_json::Value>,
    /// The desired value of each property.
    pub current: BTreeMap<String, DesiredTwin>,
    /// Highest version ever given to each property (kept when a value is
    /// dropped, so versions never go back below an observed one).
    #[serde(default)]
    pub high_water: BTreeMap<String, u64>,
}

impl DesiredBook {
    /// Takes in the cloud's desired values at `generation`; returns whether
    /// anything changed.
    pub fn apply_cloud(&mut self, desired: &BTreeMap<String, serde_json::Value>, generation: u64) -> bool {
        let mut changed = false;
        for (p, v) in desired {
            if self.cloud_seen.get(p) == Some(v) {
                continue;
            }
            let version = self.next_version(p, generation.max(1));
            self.current.insert(p.clone(), DesiredTwin { value: v.clone(), version, source: "cloud".into() });
            self.cloud_seen.insert(p.clone(), v.clone());
            changed = true;
        }
        let gone: Vec<String> = self.cloud_seen.keys().filter(|p| !desired.contains_key(*p)).cloned().collect();
        for p in gone {
            self.cloud_seen.remove(&p);
            if self.current.get(&p).is_some_and(|d| d.source == "cloud") {
                self.current.remove(&p);
            }
            changed = true;
        }
        changed
    }

    /// The next version of `property`: at least `floor`, above every
    /// version it had.
    fn next_version(&mut self, property: &str, floor: u64) -> u64 {
        let had = self.current.get(property).map_or(0, |d| d.version);
        let seen = self.high_water.get(property).copied().unwrap_or(0).max(had);
        let v = floor.max(seen + 1);
        self.high_water.insert(property.to_string(), v);
        v
    }

    /// A local set; returns the new version.
    pub fn apply_local(&mut self, property: &str, value: serde_json::Value, generation: u64) -> u64 {
        let version = self.next_version(property, generation + 1);
        self.current.insert(property.to_string(), DesiredTwin { value, version, source: "local".into() });
        version
    }
}

struct DeviceEntry {
    cfg: DeviceConfig,
    twin: Arc<Mutex<TwinState>>,
    book: Arc<Mutex<DesiredBook>>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

struct Inner {
    node: String,
    state_dir: Option<PathBuf>,
    bus: Arc<dyn EdgeBus>,
    factory: DriverFactory,
    events: mpsc::Sender<HostEvent>,
    devices: Mutex<HashMap<String, DeviceEntry>>,
}

/// Runs the mappers of the devices attached to this node.
#[derive(Clone)]
pub struct MapperHost {
    inner: Arc<Inner>,
}

/// The spec without `desired`: a change here restarts the device's task.
fn wiring_of(cfg: &DeviceConfig) -> serde_json::Value {
    let mut spec = serde_json::to_value(&cfg.device.spec).unwrap_or_default();
    if let Some(m) = spec.as_object_mut() {
        m.remove("desired");
    }
    serde_json::json!({"spec": spec, "model": cfg.model.spec})
}

fn props_of(cfg: &DeviceConfig) -> Vec<(String, f64)> {
    let spec = &cfg.device.spec;
    spec.properties.iter().map(|p| (p.name.clone(), p.deadband.unwrap_or(spec.deadband))).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug in this module; the
    // data (a twin, a book) stays usable, so recover rather than poison the host.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MapperHost {
    /// A host for `node`; `state_dir` keeps the desired books (none: memory only).
    pub fn new(
        node: &str,
        state_dir: Option<PathBuf>,
        bus: Arc<dyn EdgeBus>,
        factory: DriverFactory,
        events: mpsc::Sender<HostEvent>,
    ) -> Self {
        if let Some(d) = &state_dir {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::warn!(dir = %d.display(), error = %e, "devices: cannot create state directory; desired values are kept in memory only");
            }
        }
        MapperHost {
            inner: Arc::new(Inner {
                node: node.to_string(),
                state_dir,
                bus,
                factory,
                events,
                devices: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Listens for `…/properties/<p>/set` on the bus and turns each into a
    /// local desired write, answering on `…/set/result`. Runs until the bus
    /// subscription ends.
    pub async fn serve_bus_sets(self) {
        let mut rx = match self.inner.bus.subscribe("yunbian/devices/+/properties/+/set") {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "devices: cannot subscribe to set topics");
                return;
            }
        };
        while let Some(m) = rx.recv().await {
            let Some((device, property)) = parse_set_topic(&m.topic) else { continue };
            let result_topic = format!("{}/result", m.topic);
            let answer = match parse_set_payload(&m.payload) {
                Err(e) => serde_json::json!({"status": "rejected", "error": e}),
                Ok(value) => match self.set_local(device, property, value) {
                    Ok(version) => serde_json::json!({"status": "accepted", "version": version}),
                    Err(e) => serde_json::json!({"status": "rejected", "error": e.to_string()}),
                },
            };
            self.inner.bus.publish(&result_topic, answer.to_string().into_bytes(), false);
        }
    }

    /// Makes the running devices exactly `devices`: starts new ones,
    /// restarts those whose wiring changed, updates desired values of the
    /// others, stops the rest.
    pub fn apply(&self, devices: Vec<DeviceConfig>) {
        let mut map = lock(&self.inner.devices);
        let keep: std::collections::HashSet<String> = devices.iter().map(|c| c.name().to_string()).collect();
        let gone: Vec<String> = map.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for name in gone {
            if let Some(e) = map.remove(&name) {
                e.task.abort();
                tracing::info!(device = %name, "device detached");
                self.inner.bus.publish(&state_topic(&name), Vec::new(), true);
                // The desired book stays: a device that comes back (a model
                // re-applied, a move undone) must not have its local sets
                // overwritten by the cloud's older values. Books are tiny.
            }
        }
        for cfg in devices {
            let name = cfg.name().to_string();
            let generation = cfg.device.metadata.generation;
            match map.get_mut(&name) {
                Some(e) if wiring_of(&e.cfg) == wiring_of(&cfg) && !e.task.is_finished() => {
                    e.cfg = cfg;
                    lock(&e.twin).set_generation(generation);
                    self.sync_desired(&name, e, generation);
                }
                Some(e) => {
                    e.task.abort();
                    lock(&e.twin).reshape(props_of(&cfg), cfg.device.spec.report_cycle_ms(), generation);
                    e.cfg = cfg;
                    self.sync_desired(&name, e, generation);
                    e.task = self.spawn(&e.cfg, e.twin.clone(), e.book.clone(), e.wake.clone());
                    tracing::info!(device = %name, "device reconfigured");
                }
                None => {
                    let twin = Arc::new(Mutex::new(TwinState::new(
                        &self.inner.node,
                        props_of(&cfg),
                        cfg.device.spec.report_cycle_ms(),
                    )));
                    lock(&twin).reshape(props_of(&cfg), cfg.device.spec.report_cycle_ms(), generation);
                    let book = Arc::new(Mutex::new(self.load_book(&name)));
                    let wake = Arc::new(Notify::new());
                    let task = self.spawn(&cfg, twin.clone(), book.clone(), wake.clone());
                    let mut e = DeviceEntry { cfg, twin, book, wake, task };
                    self.sync_desired(&name, &mut e, generation);
                    tracing::info!(device = %name, protocol = e.cfg.device.spec.protocol.name(), "device attached");
                    map.insert(name, e);
                }
            }
        }
    }

    fn sync_desired(&self, name: &str, e: &mut DeviceEntry, generation: u64) {
        let mut book = lock(&e.book);
        if book.apply_cloud(&e.cfg.device.spec.desired, generation) {
            self.save_book(name, &book);
        }
        let mut twin = lock(&e.twin);
        for p in &e.cfg.device.spec.properties {
            match book.current.get(&p.name) {
                Some(d) => twin.set_desired(&p.name, d.clone()),
                None => twin.clear_desired(&p.name),
            }
        }
        e.wake.notify_one();
    }

    /// A desired value set on the edge; returns its version.
    pub fn set_local(&self, device: &str, property: &str, value: serde_json::Value) -> Result<u64, SetError> {
        let map = lock(&self.inner.devices);
        let e = map.get(device).ok_or_else(|| SetError::NoDevice(device.to_string()))?;
        check_desired_write(&e.cfg.device.spec, &e.cfg.model.spec, property, &value).map_err(SetError::Invalid)?;
        let mut book = lock(&e.book);
        let version = book.apply_local(property, value, e.cfg.device.metadata.generation);
        self.save_book(device, &book);
        if let Some(d) = book.current.get(property) {
            lock(&e.twin).set_desired(property, d.clone());
        }
        e.wake.notify_one();
        Ok(version)
    }

    /// An external mapper says `property` of `device` now holds `value` (its
    /// `observedDesired` acknowledgement): when that is the current desired
    /// value, its version counts as observed at once, as a verified
    /// read-back would. Returns that version (also when it was observed
    /// already); `None` when the device, property or value do not match.
    pub fn acknowledge_write(&self, device: &str, property: &str, value: &serde_json::Value) -> Option<u64> {
        let map = lock(&self.inner.devices);
        let e = map.get(device)?;
        let mut twin = lock(&e.twin);
        let desired = twin.desired(property)?.clone();
        if !write_verified(&desired.value, value) {
            return None;
        }
        let pending = twin.pending_writes().iter().any(|(p, _, v)| p == property && *v == desired.version);
        if pending {
            twin.on_write_observed(property, desired.version);
            drop(twin);
            let topic = format!("{}/set/result", property_topic(device, property));
            let payload = serde_json::json!({"status": "applied", "version": desired.version, "error": ""});
            self.inner.bus.publish(&topic, payload.to_string().into_bytes(), false);
            // The task reports the observed version at its next turn.
            e.wake.notify_one();
        }
        Some(desired.version)
    }

    /// Devices on this node.
    pub fn list(&self) -> Vec<DeviceSummary> {
        let map = lock(&self.inner.devices);
        let mut v: Vec<DeviceSummary> = map
            .values()
            .map(|e| DeviceSummary {
                name: e.cfg.name().to_string(),
                model: e.cfg.device.spec.model.clone(),
                protocol: e.cfg.device.spec.protocol.name().to_string(),
                state: lock(&e.twin).state(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The local twin of a device (always with values).
    pub fn twin(&self, device: &str) -> Option<DeviceStatus> {
        let map = lock(&self.inner.devices);
        map.get(device).map(|e| lock(&e.twin).local())
    }

    /// The configuration of a device (for external mappers and the local API).
    pub fn config(&self, device: &str) -> Option<DeviceConfig> {
        lock(&self.inner.devices).get(device).map(|e| e.cfg.clone())
    }

    /// Configurations of every device, optionally only those of one protocol.
    pub fn configs(&self) -> Vec<DeviceConfig> {
        let mut v: Vec<DeviceConfig> = lock(&self.inner.devices).values().map(|e| e.cfg.clone()).collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Re-sends every twin in full (after the cloud lost them, say).
    pub fn report_all(&self) {
        let map = lock(&self.inner.devices);
        for e in map.values() {
            lock(&e.twin).requeue();
            e.wake.notify_one();
        }
    }

    /// Stops every device task.
    pub fn shutdown(&self) {
        for (_, e) in lock(&self.inner.devices).drain() {
            e.task.abort();
        }
    }

    fn book_path(&self, device: &str) -> Option<PathBuf> {
        Some(self.inner.state_dir.as_ref()?.join(format!("{device}.desired.json")))
    }

    fn load_book(&self, device: &str) -> DesiredBook {
        let Some(p) = self.book_path(device) else { return DesiredBook::default() };
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(device, error = %e, "devices: unreadable desired book; starting from the cloud's values");
                DesiredBook::default()
            }),
            Err(_) => DesiredBook::default(),
        }
    }

    fn save_book(&self, device: &str, book: &DesiredBook) {
        let Some(p) = self.book_path(device) else { return };
        let tmp = p.with_extension("json.tmp");
        let bytes = serde_json::to_vec(book).unwrap_or_default();
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            if let Some(dir) = p.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        let r = write();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(device, error = %e, "devices: cannot persist desired values (kept in memory)");
        }
    }

    fn spawn(
        &self,
        cfg: &DeviceConfig,
        twin: Arc<Mutex<TwinState>>,
        book: Arc<Mutex<DesiredBook>>,
        wake: Arc<Notify>,
    ) -> JoinHandle<()> {
        let task = DeviceTask {
            cfg: cfg.clone(),
            twin,
            book,
            wake,
            bus: self.inner.bus.clone(),
            events: self.inner.events.clone(),
            factory: self.inner.factory.clone(),
        };
        tokio::spawn(async move { task.run().await })
    }
}

/// Parses a `…/set` payload: a JSON value, or `{"value": …}`, or bare text.
pub fn parse_set_payload(payload: &[u8]) -> Result<serde_json::Value, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?.trim();
    if text.is_empty() {
        return Err("empty payload".into());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut m)) if m.contains_key("value") => Ok(m.remove("value").unwrap_or_default()),
        Ok(v) => Ok(v),
        Err(_) => Ok(serde_json::Value::String(text.to_string())),
    }
}

fn protocol_timeout_ms(p: &Protocol) -> u64 {
    match p {
        Protocol::ModbusTcp(t) => duration_ms(&t.timeout, 1_000),
        Protocol::ModbusRtu(r) => duration_ms(&r.timeout, 1_000),
        Protocol::Opcua(o) => duration_ms(&o.timeout, 2_000),
        Protocol::Mqtt(_) | Protocol::Virtual(_) => 1_000,
        Protocol::External(_) => 5_000,
    }
}

struct DeviceTask {
    cfg: DeviceConfig,
    twin: Arc<Mutex<TwinState>>,
    book: Arc<Mutex<DesiredBook>>,
    wake: Arc<Notify>,
    bus: Arc<dyn EdgeBus>,
    events: mpsc::Sender<HostEvent>,
    factory: DriverFactory,
}

enum Verify {
    /// Written at (unix ms); waiting for a reading taken after that time
    /// to show the value (version, collections left, written at).
    Waiting(u64, u32, u64),
    /// Refused; try again after this time (unix ms).
    RetryAt(u64, u64),
}

impl DeviceTask {
    fn name(&self) -> &str {
        self.cfg.name()
    }

    async fn run(self) {
        let name = self.name().to_string();
        let span = tracing::info_span!("device", device = %name);
        let _g = span.enter();
        drop(_g);
        let collect = Duration::from_millis(self.cfg.device.spec.collect_cycle_ms());
        let op_timeout = Duration::from_millis(protocol_timeout_ms(&self.cfg.device.spec.protocol));
        // One read may be several requests (batches); bound the whole read.
        let read_timeout =
            (op_timeout * (self.cfg.device.spec.properties.len() as u32 + 1)).min(Duration::from_secs(60));
        let mut driver = match (self.factory)(&self.cfg) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(device = %name, error = %e, "device cannot be driven");
                self.fail(&e.to_string()).await;
                self.report(true).await;
                return;
            }
        };
        let mut connected = false;
        let mut backoff = collect.max(Duration::from_millis(500));
        let mut verify: HashMap<String, Verify> = HashMap::new();
        loop {
            if !connected {
                match tokio::time::timeout(op_timeout.max(Duration::from_secs(1)) * 2, driver.connect()).await {
                    Ok(Ok(())) => {
                        connected = true;
                        backoff = collect.max(Duration::from_millis(500));
                        tracing::debug!(device = %name, "connected");
                    }
                    Ok(Err(e)) => self.fail(&e.to_string()).await,
                    Err(_) => self.fail(&DriverError::Timeout(op_timeout.as_millis() as u64 * 2).to_string()).await,
                }
                if !connected {
                    self.report(false).await;
                    self.sleep_or_wake(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            let started = tokio::time::Instant::now();
            match tokio::time::timeout(read_timeout, driver.read(&[])).await {
                Ok(Ok(reads)) => self.observe(reads),
                Ok(Err(e)) => {
                    self.fail(&e.to_string()).await;
                    driver.disconnect().await;
                    connected = false;
                }
                Err(_) => {
                    self.fail(&DriverError::Timeout(read_timeout.as_millis() as u64).to_string()).await;
                    driver.disconnect().await;
                    connected = false;
                }
            }
            if connected {
                if let Err(e) = self.run_writes(driver.as_mut(), &mut verify, op_timeout).await {
                    self.fail(&e.to_string()).await;
                    driver.disconnect().await;
                    connected = false;
                }
            }
            self.report(false).await;
            if !connected {
                self.sleep_or_wake(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            let next = collect.saturating_sub(started.elapsed());
            self.sleep_or_wake(next).await;
        }
    }

    /// Sleeps `d`, waking early for a new desired value; also sends a twin
    /// report that falls due meanwhile.
    async fn sleep_or_wake(&self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let due = {
                let to_cloud = self.cfg.device.spec.report_to_cloud;
                lock(&self.twin).next_report_in(unix_ms(), to_cloud)
            };
            let until = match due {
                Some(ms) => deadline.min(tokio::time::Instant::now() + Duration::from_millis(ms)),
                None => deadline,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = self.wake.notified() => {
                    return;
                }
            }
            self.report(false).await;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }

    fn observe(&self, reads: Vec<crate::driver::PropertyRead>) {
        let now = unix_ms();
        let observed = lock(&self.twin).on_read(now, reads);
        for (prop, r) in &observed.readings {
            self.publish_reading(prop, r);
        }
        if let Some(s) = observed.state_changed {
            self.publish_state(s, "");
            tracing::info!(device = %self.name(), state = s.as_str(), "device state");
        }
    }

    fn publish_reading(&self, prop: &str, r: &Reading) {
        let payload = serde_json::json!({"value": r.value, "ts": r.ts_ms, "quality": r.quality.as_str()});
        self.bus.publish(&property_topic(self.name(), prop), payload.to_string().into_bytes(), true);
    }

    fn publish_state(&self, s: DeviceState, error: &str) {
        let payload = serde_json::json!({"state": s.as_str(), "ts": unix_ms(), "error": error});
        self.bus.publish(&state_topic(self.name()), payload.to_string().into_bytes(), true);
    }

    fn publish_set_result(&self, prop: &str, status: &str, version: u64, error: &str) {
        let topic = format!("{}/set/result", property_topic(self.name(), prop));
        let payload = serde_json::json!({"status": status, "version": version, "error": error});
        self.bus.publish(&topic, payload.to_string().into_bytes(), false);
    }

    async fn fail(&self, error: &str) {
        let changed = lock(&self.twin).on_failure(error.to_string());
        if let Some(s) = changed {
            tracing::warn!(device = %self.name(), error, "device offline");
            self.publish_state(s, error);
            // Readings keep their value but lose their quality.
            let status = lock(&self.twin).local();
            for (prop, t) in &status.twins {
                if let Some(r) = &t.reported {
                    let reading = Reading { value: r.value.clone(), ts_ms: r.timestamp, quality: Quality::Bad };
                    self.publish_reading(prop, &reading);
                }
            }
        } else {
            tracing::debug!(device = %self.name(), error, "collection failed");
        }
    }

    async fn report(&self, force_values: bool) {
        let to_cloud = self.cfg.device.spec.report_to_cloud;
        let status = {
            let mut t = lock(&self.twin);
            if force_values {
                Some(t.snapshot(to_cloud))
            } else {
                t.poll_report(unix_ms(), to_cloud)
            }
        };
        if let Some(status) = status {
            // Never wait for the agent: a full queue means the report is
            // sent again later (the twin is a level), and this device keeps
            // collecting meanwhile.
            if self.events.try_send(HostEvent::Status { device: self.name().to_string(), status }).is_err() {
                lock(&self.twin).requeue();
            }
        }
    }

    async fn run_writes(
        &self,
        driver: &mut dyn Driver,
        verify: &mut HashMap<String, Verify>,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let pending = lock(&self.twin).pending_writes();
        verify.retain(|p, _| pending.iter().any(|(q, _, _)| q == p));
        for (prop, value, version) in pending {
            let now = unix_ms();
            match verify.get_mut(&prop) {
                Some(Verify::Waiting(v, left, written_at)) if *v == version => {
                    let reported = lock(&self.twin).local().twins.get(&prop).and_then(|t| t.reported.clone());
                    let fresh = reported.as_ref().is_some_and(|r| {
                        r.quality == Quality::Good && r.timestamp >= *written_at && write_verified(&value, &r.value)
                    });
                    if fresh {
                        self.observed(&prop, version);
                        verify.remove(&prop);
                        continue;
                    }
                    *left = left.saturating_sub(1);
                    if *left > 0 {
                        continue;
                    }
                }
                Some(Verify::RetryAt(v, at)) if *v == version && now < *at => continue,
                _ => {}
            }
            // Check again against the model before touching the device.
            if let Err(e) = check_desired_write(&self.cfg.device.spec, &self.cfg.model.spec, &prop, &value) {
                lock(&self.twin).on_write_failed(&prop, e.clone());
                self.publish_set_result(&prop, "failed", version, &e);
                verify.insert(prop, Verify::RetryAt(version, u64::MAX));
                continue;
            }
            let written_at = unix_ms();
            match tokio::time::timeout(timeout, driver.write(&prop, &value)).await {
                Err(_) => return Err(DriverError::Timeout(timeout.as_millis() as u64)),
                Ok(Err(WriteError::Device(e))) => return Err(e),
                Ok(Err(WriteError::Refused(e))) => {
                    tracing::warn!(device = %self.name(), property = %prop, error = %e, "write refused");
                    lock(&self.twin).on_write_failed(&prop, format!("write refused: {e}"));
                    self.publish_set_result(&prop, "failed", version, &e);
                    verify.insert(prop, Verify::RetryAt(version, now + WRITE_RETRY.as_millis() as u64));
                    continue;
                }
                Ok(Ok(())) => {}
            }
            // Read back.
            let back = match tokio::time::timeout(timeout, driver.read(std::slice::from_ref(&prop))).await {
                Err(_) => return Err(DriverError::Timeout(timeout.as_millis() as u64)),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(reads)) => reads,
            };
            let verified = back.iter().any(|r| {
                r.property == prop
                    && matches!(&r.result, Ok(Some(reading)) if reading.quality == Quality::Good
                        && reading.ts_ms >= written_at
                        && write_verified(&value, &reading.value))
            });
            self.observe(back);
            if verified {
                self.observed(&prop, version);
                verify.remove(&prop);
            } else {
                verify.insert(prop, Verify::Waiting(version, VERIFY_CYCLES, written_at));
            }
        }
        Ok(())
    }

    fn observed(&self, prop: &str, version: u64) {
        lock(&self.twin).on_write_observed(prop, version);
        let local = lock(&self.book).current.get(prop).is_some_and(|d| d.version == version);
        if local {
            tracing::info!(device = %self.name(), property = %prop, version, "desired value applied");
        }
        self.publish_set_result(prop, "applied", version, "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn desired_book_versions_grow_and_cloud_wins_only_on_change() {
        let mut b = DesiredBook::default();
        let mut d = BTreeMap::new();
        d.insert("sp".to_string(), json!(10));
        assert!(b.apply_cloud(&d, 4));
        assert_eq!(b.current["sp"].version, 4);
        let v = b.apply_local("sp", json!(20), 4);
        assert_eq!(v, 5);
        // A later generation that does not change sp keeps the local value.
        assert!(!b.apply_cloud(&d, 6));
        assert_eq!(b.current["sp"].value, json!(20));
        // A changed cloud value wins, with a higher version.
        d.insert("sp".to_string(), json!(30));
        assert!(b.apply_cloud(&d, 5));
        assert_eq!((b.current["sp"].value.clone(), b.current["sp"].version), (json!(30), 6));
        // Removed from the cloud: a cloud value is dropped.
        assert!(b.apply_cloud(&BTreeMap::new(), 7));
        assert!(b.current.is_empty());
        // Set again at a generation below versions already used (and maybe
        // observed): the version still goes up.
        d.insert("sp".to_string(), json!(40));
        assert!(b.apply_cloud(&d, 3));
        assert_eq!(b.current["sp"].version, 7);
    }

    #[test]
    fn set_payloads() {
        assert_eq!(parse_set_payload(b"42"), Ok(json!(42)));
        assert_eq!(parse_set_payload(br#"{"value": true}"#), Ok(json!(true)));
        assert_eq!(parse_set_payload(b"on"), Ok(json!("on")));
        assert!(parse_set_payload(b"  ").is_err());
        assert!(parse_set_payload(b"\xff").is_err());
    }
}
