//! The agent's rule host: runs every Rule placed on this node. Each rule is
//! one task that subscribes to its source on the edge bus (device readings
//! are on `yunbian/devices/<device>/properties/<property>`; MQTT sources on
//! their own topics), feeds records to a [`RuleRunner`], ticks it every
//! second, and executes its outputs: points into the edge time-series
//! store, messages onto the bus, points into the store-and-forward
//! [`Shipper`] (`cloud` sinks).
//!
//! Alerts (`alert` sinks) become [`Report::Alert`]s the agent queues in its
//! persisted report outbox, so they reach the cloud across outages.
//!
//! Run-time errors (an expression or aggregate failing on a record, a sink
//! refusing a point) are counted in the rule's status with the latest as a
//! sample, and logged at most once per rule every [`ERROR_LOG_EVERY`] with
//! the count since the previous line.
//!
//! Invariant: a rule that fails to compile, or a sink that fails, is a
//! counted error in that rule's status; it never stops the agent or other
//! rules.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use yunbian_api::{Rule, RuleNodeStatus};
use yunbian_devices::bus::EdgeBus;
use yunbian_devices::DeviceConfig;
use yunbian_rules::{CompiledRule, Output, Quality, Record, RuleRunner, RuleStats, Value};
use yunbian_sync::Report;

use crate::shipper::{Shipper, ShipperOptions};

pub use yunbian_tsdb::{FsyncPolicy, Options as TsdbOptions};

/// Points queued for the tsdb writer thread (beyond it, points are dropped
/// and counted as the rule's errors).
const TSDB_QUEUE: usize = 65_536;
/// How often the writer applies retention.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// At most one log line of a rule's run-time errors this often.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// `--tsdb-fsync`: `always`, `never` or `interval:<duration>` (`interval:1s`).
pub fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s.trim() {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => {
            let Some(d) = other.strip_prefix("interval:") else {
                return Err(format!("{s:?}: use always, never or interval:<duration> (e.g. interval:1s)"));
            };
            match yunbian_api::time::parse_duration_ms(d)? {
                0 => Err(format!("{s:?}: the interval must be above 0 (for a sync per batch, use always)")),
                ms => Ok(FsyncPolicy::Interval(ms)),
            }
        }
    }
}

/// `--tsdb-memory-cap`: a quantity such as `32Mi`, at least 1Mi (below
/// that the head would be flushed every few points).
pub fn parse_memory_cap(s: &str) -> Result<usize, String> {
    let b = yunbian_api::quantity::parse_memory_bytes(s)?;
    if b < 1 << 20 {
        return Err(format!("{s:?}: the edge store needs at least 1Mi"));
    }
    usize::try_from(b).map_err(|_| format!("{s:?} is too large"))
}

/// `--tsdb-max-series`: a count of series, at least 1.
pub fn parse_max_series(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("the edge store needs room for at least 1 series".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of series")),
    }
}

/// Where a rule's sink errors are counted (shared with the writer thread).
#[derive(Clone, Default)]
struct SinkErrors {
    count: Arc<AtomicU64>,
    last: Arc<Mutex<String>>,
}

impl SinkErrors {
    fn add(&self, e: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last) = e;
    }
}

type TsdbWrite = (yunbian_tsdb::SeriesKey, i64, f64, SinkErrors);

/// The edge time-series store, owned by one writer thread: rule tasks
/// queue points (never blocking the async runtime: appends may flush,
/// fsync and compact), the thread appends them and applies retention;
/// queries lock the store from blocking threads.
#[derive(Clone)]
pub struct EdgeTsdb {
    store: Arc<Mutex<yunbian_tsdb::Store>>,
    tx: std::sync::mpsc::SyncSender<TsdbWrite>,
}

impl EdgeTsdb {
    /// Opens the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, opts: TsdbOptions) -> Result<EdgeTsdb, yunbian_tsdb::Error> {
        // An idle writer wakes at least this often, so data written before
        // a silence is synced about when the fsync interval says.
        let idle = match opts.fsync {
            FsyncPolicy::Interval(ms) => Duration::from_millis(ms.clamp(1, 1000)),
            _ => Duration::from_secs(1),
        };
        let store = Arc::new(Mutex::new(yunbian_tsdb::Store::open(dir, opts)?));
        let (tx, rx) = std::sync::mpsc::sync_channel::<TsdbWrite>(TSDB_QUEUE);
        let s = store.clone();
        let spawned = std::thread::Builder::new().name("edge-tsdb".into()).spawn(move || {
            let mut last_retention = Instant::now();
            loop {
                let first = match rx.recv_timeout(idle) {
                    Ok(w) => Some(w),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        if let Err(e) = lock(&s).sync() {
                            tracing::warn!(error = %e, "edge tsdb: sync");
                        }
                        return;
                    }
                };
                let mut batch: Vec<TsdbWrite> = first.into_iter().collect();
                while batch.len() < 10_000 {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let mut store = lock(&s);
                // One WAL record for what was queued (a record per point
                // would cost ~26 B of WAL each).
                let mut refs = Vec::with_capacity(batch.len());
                let mut owners = Vec::with_capacity(batch.len());
                for (key, ts, v, errs) in batch {
                    match store.resolve(&key) {
                        Ok(r) => {
                            refs.push((r, ts, v));
                            owners.push(errs);
                        }
                        Err(e) => errs.add(format!("tsdb sink: {e}")),
                    }
                }
                match store.append_many(&refs) {
                    Ok(res) => {
                        for (i, e) in res.rejected {
                            if let Some(errs) = owners.get(i) {
                                errs.add(format!("tsdb sink: {e}"));
                            }
                        }
                    }
                    Err(e) => {
                        for errs in &owners {
                            errs.add(format!("tsdb sink: {e}"));
                        }
                    }
                }
                if last_retention.elapsed() >= RETENTION_EVERY {
                    last_retention = Instant::now();
                    if let Err(e) = store.apply_retention(unix_ms()) {
                        tracing::warn!(error = %e, "edge tsdb: retention");
                    }
                }
                // Appends sync under `Interval` only when another append
                // comes: after a burst and then silence, this does.
                if let Err(e) = store.sync_if_due(Instant::now()) {
                    tracing::warn!(error = %e, "edge tsdb: sync");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the edge tsdb writer thread");
        }
        Ok(EdgeTsdb { store, tx })
    }

    /// The store, for queries (lock it only from blocking threads).
    pub fn store(&self) -> Arc<Mutex<yunbian_tsdb::Store>> {
        self.store.clone()
    }

    fn write(&self, w: TsdbWrite) -> Result<(), String> {
        self.tx.try_send(w).map_err(|_| "tsdb sink: the writer is behind; point dropped".to_string())
    }
}

/// Devices the rule tasks may read: name → (model, labels).
type DeviceIndex = Arc<Mutex<HashMap<String, (String, BTreeMap<String, String>)>>>;

struct Running {
    /// (uid, generation) of the spec it runs: a rule deleted and created
    /// again restarts even at the same generation.
    version: (String, u64),
    stats: Arc<Mutex<(RuleStats, String)>>,
    task: tokio::task::JoinHandle<()>,
    /// `records_in` at the last status, and when.
    last: (u64, std::time::Instant),
}

/// Alert reports queued for the agent before the rules count errors.
const ALERT_QUEUE: usize = 1024;

/// Runs the node's rules.
pub struct RuleHost {
    state_dir: std::path::PathBuf,
    alerts: tokio::sync::mpsc::Sender<Report>,
    alerts_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Report>>>,
    bus: Arc<dyn EdgeBus>,
    tsdb: Option<EdgeTsdb>,
    shipper: Option<Shipper>,
    devices: DeviceIndex,
    running: Mutex<HashMap<String, Running>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl RuleHost {
    /// A host whose tsdb sink writes under `data_dir/tsdb` (a store opened
    /// with `tsdb`) and whose cloud sink queues into the outbox in
    /// `data_dir/outbox` (a store that cannot be opened is logged; its
    /// sinks then count errors).
    pub fn new(data_dir: &Path, bus: Arc<dyn EdgeBus>, shipping: ShipperOptions, tsdb: TsdbOptions) -> Self {
        let tsdb = match EdgeTsdb::open(&data_dir.join("tsdb"), tsdb) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the edge time-series store; rules' tsdb sinks will fail");
                None
            }
        };
        let shipper = match Shipper::start(&data_dir.join("outbox"), shipping) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the data outbox; rules' cloud sinks will fail");
                None
            }
        };
        let (alerts, alerts_rx) = tokio::sync::mpsc::channel(ALERT_QUEUE);
        RuleHost {
            state_dir: data_dir.join("rules"),
            alerts,
            alerts_rx: Mutex::new(Some(alerts_rx)),
            bus,
            tsdb,
            shipper,
            devices: Arc::new(Mutex::new(HashMap::new())),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The alert reports rules raise (taken once, by the agent).
    pub fn take_alerts(&self) -> Option<tokio::sync::mpsc::Receiver<Report>> {
        lock(&self.alerts_rx).take()
    }

    /// The store-and-forward shipper, when its outbox opened.
    pub fn shipper(&self) -> Option<&Shipper> {
        self.shipper.as_ref()
    }

    /// The edge time-series store, when open.
    pub fn tsdb(&self) -> Option<Arc<Mutex<yunbian_tsdb::Store>>> {
        self.tsdb.as_ref().map(|t| t.store())
    }

    /// Makes the running rules exactly `rules`; `devices` are the node's
    /// devices (for device sources chosen by model or labels).
    pub fn apply(&self, rules: Vec<Rule>, devices: &[DeviceConfig]) {
        {
            let mut idx = lock(&self.devices);
            idx.clear();
            for d in devices {
                idx.insert(d.name().to_string(), (d.device.spec.model.clone(), d.device.metadata.labels.clone()));
            }
        }
        let mut running = lock(&self.running);
        let keep: std::collections::HashSet<&str> = rules.iter().map(|r| r.name()).collect();
        running.retain(|name, r| {
            let k = keep.contains(name.as_str());
            if !k {
                r.task.abort();
                // Its alerts die with it (the cloud resolves the rule's events).
                let _ = std::fs::remove_file(self.state_dir.join(format!("{name}.alerts.json")));
                tracing::info!(rule = %name, "rule stopped");
            }
            k
        });
        for rule in rules {
            let name = rule.name().to_string();
            let version = (rule.metadata.uid.clone(), rule.metadata.generation);
            if running.get(&name).is_some_and(|r| r.version == version && !r.task.is_finished()) {
                continue;
            }
            if let Some(old) = running.remove(&name) {
                old.task.abort();
            }
            let stats = Arc::new(Mutex::new((RuleStats::default(), String::new())));
            let task = match prepare(&rule, &self.bus) {
                Ok(p) => tokio::spawn(run_rule(rule, p, self.sinks(), self.devices.clone(), stats.clone())),
                Err(e) => {
                    lock(&stats).1 = e;
                    tokio::spawn(async {})
                }
            };
            tracing::info!(rule = %name, "rule started");
            running.insert(name, Running { version, stats, task, last: (0, std::time::Instant::now()) });
        }
    }

    /// Each rule's status on this node (rates since the previous call).
    pub fn statuses(&self) -> Vec<(String, RuleNodeStatus)> {
        let mut running = lock(&self.running);
        let now = std::time::Instant::now();
        running
            .iter_mut()
            .map(|(name, r)| {
                let (s, compile_error) = lock(&r.stats).clone();
                let secs = now.duration_since(r.last.1).as_secs_f64().max(0.001);
                let rate = (s.records_in.saturating_sub(r.last.0)) as f64 / secs;
                r.last = (s.records_in, now);
                let last_error = if compile_error.is_empty() { s.last_error.clone() } else { compile_error };
                let status = RuleNodeStatus {
                    records_in: s.records_in,
                    records_out: s.records_out,
                    errors: s.errors,
                    last_error,
                    rate: (rate * 10.0).round() / 10.0,
                };
                (name.clone(), status)
            })
            .collect()
    }

    fn sinks(&self) -> Sinks {
        Sinks {
            bus: self.bus.clone(),
            tsdb: self.tsdb.clone(),
            shipper: self.shipper.clone(),
            alerts: self.alerts.clone(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// Stops every rule, and seals and persists what the shipper holds.
    pub fn shutdown(&self) {
        for (_, r) in lock(&self.running).drain() {
            r.task.abort();
        }
        if let Some(s) = &self.shipper {
            s.stop();
        }
    }
}

/// Topic filters and record making for a rule's source.
enum Source {
    Devices { names: Vec<String>, models: Vec<String>, selector: BTreeMap<String, String>, properties: Vec<String> },
    Mqtt { path: String, metric: String, ts_path: String },
}

fn quality_of(q: &str) -> Quality {
    match q {
        "bad" => Quality::Bad,
        "uncertain" => Quality::Uncertain,
        _ => Quality::Good,
    }
}

impl Source {
    fn record(&self, topic: &str, payload: &[u8], devices: &DeviceIndex) -> Result<Option<Record>, String> {
        match self {
            Source::Devices { names, models, selector, properties } => {
                let parts: Vec<&str> = topic.split('/').collect();
                let ["yunbian", "devices", device, "properties", property] = parts.as_slice() else {
                    return Ok(None);
                };
                if (!names.is_empty() && !names.iter().any(|n| n == device))
                    || (!properties.is_empty() && !properties.iter().any(|p| p == property))
                {
                    return Ok(None);
                }
                let model = {
                    let idx = lock(devices);
                    let Some((model, labels)) = idx.get(*device) else { return Ok(None) };
                    if (!models.is_empty() && !models.contains(model))
                        || !yunbian_api::selector_matches(selector, labels)
                    {
                        return Ok(None);
                    }
                    model.clone()
                };
                if payload.is_empty() {
                    return Ok(None);
                }
                let v: serde_json::Value =
                    serde_json::from_slice(payload).map_err(|e| format!("reading on {topic} is not JSON: {e}"))?;
                let value = Value::try_from(&v["value"]).map_err(|e| format!("reading on {topic}: {e}"))?;
                let mut tags = BTreeMap::new();
                tags.insert("device".to_string(), device.to_string());
                tags.insert("property".to_string(), property.to_string());
                tags.insert("model".to_string(), model);
                Ok(Some(Record {
                    metric: property.to_string(),
                    tags,
                    ts_ms: v["ts"].as_i64().unwrap_or_else(unix_ms),
                    value,
                    quality: quality_of(v["quality"].as_str().unwrap_or("good")),
                }))
            }
            Source::Mqtt { path, metric, ts_path } => {
                let raw = yunbian_devices::mqtt::extract_raw(payload, path)?;
                let value = Value::try_from(&raw).map_err(|e| format!("message on {topic}: {e}"))?;
                let ts_ms = if ts_path.is_empty() {
                    unix_ms()
                } else {
                    let t = yunbian_devices::mqtt::extract_raw(payload, ts_path)?;
                    timestamp_of(&t).ok_or_else(|| {
                        format!("message on {topic}: {ts_path} is {t}, not Unix milliseconds or RFC 3339")
                    })?
                };
                let mut tags = BTreeMap::new();
                tags.insert("topic".to_string(), topic.to_string());
                let metric = if metric.is_empty() { topic.to_string() } else { metric.clone() };
                Ok(Some(Record { metric, tags, ts_ms, value, quality: Quality::Good }))
            }
        }
    }
}

/// A reading's time from JSON: Unix milliseconds (integer) or RFC 3339.
fn timestamp_of(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        serde_json::Value::String(s) => {
            s.parse::<i64>().ok().or_else(|| yunbian_api::time::parse_rfc3339_signed(s).map(|secs| secs * 1000))
        }
        _ => None,
    }
}

/// One firing alert of a rule, as persisted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FiringAlert {
    sink: usize,
    metric: String,
    tags: BTreeMap<String, String>,
    since: i64,
}

impl FiringAlert {
    fn series(&self) -> yunbian_rules::SeriesKey {
        yunbian_rules::SeriesKey { metric: self.metric.clone(), tags: self.tags.clone() }
    }
}

/// The sink index of an alert key `sinks[<i>]:<series>`.
fn alert_sink_index(key: &str) -> usize {
    key.strip_prefix("sinks[").and_then(|k| k.split(']').next()).and_then(|i| i.parse().ok()).unwrap_or(usize::MAX)
}

/// A rule's firing alerts on disk: `<data-dir>/rules/<rule>.alerts.json`,
/// for the rule's uid (a rule deleted and created again starts clean).
#[derive(serde::Serialize, serde::Deserialize)]
struct AlertState {
    uid: String,
    alerts: BTreeMap<String, FiringAlert>,
}

impl AlertState {
    fn path(dir: &Path, rule: &Rule) -> std::path::PathBuf {
        dir.join(format!("{}.alerts.json", rule.name()))
    }

    fn load(path: &Path, rule: &Rule) -> HashMap<String, FiringAlert> {
        let Ok(text) = std::fs::read(path) else { return HashMap::new() };
        match serde_json::from_slice::<AlertState>(&text) {
            Ok(s) if s.uid == rule.metadata.uid => s.alerts.into_iter().collect(),
            Ok(_) => HashMap::new(),
            Err(e) => {
                tracing::warn!(rule = %rule.name(), error = %e, "alert state unreadable; starting without it");
                HashMap::new()
            }
        }
    }

    fn save(path: &Path, rule: &Rule, firing: &HashMap<String, FiringAlert>) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let state = AlertState {
            uid: rule.metadata.uid.clone(),
            alerts: firing.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&state).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    }
}

/// Where a rule's outputs go.
#[derive(Clone)]
struct Sinks {
    bus: Arc<dyn EdgeBus>,
    tsdb: Option<EdgeTsdb>,
    shipper: Option<Shipper>,
    alerts: tokio::sync::mpsc::Sender<Report>,
    /// Where rules keep their firing alerts.
    state_dir: std::path::PathBuf,
}

/// A rule ready to run: compiled, its source decoded, and already
/// subscribed to the bus — so nothing published after [`RuleHost::apply`]
/// returns is missed, not even before its task first runs.
struct Prepared {
    compiled: CompiledRule,
    source: Source,
    rx: tokio::sync::mpsc::Receiver<yunbian_devices::bus::BusMessage>,
}

fn prepare(rule: &Rule, bus: &Arc<dyn EdgeBus>) -> Result<Prepared, String> {
    let compiled = CompiledRule::compile(&rule.spec).map_err(|errs| {
        let text = errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
        tracing::error!(rule = %rule.name(), errors = %text, "rule does not compile; not running it");
        format!("does not compile: {text}")
    })?;
    let (filter, source) = match (&rule.spec.source.devices, &rule.spec.source.mqtt) {
        (Some(d), _) => (
            "yunbian/devices/+/properties/+".to_string(),
            Source::Devices {
                names: d.names.clone(),
                models: d.models.clone(),
                selector: d.selector.clone(),
                properties: d.properties.clone(),
            },
        ),
        (None, Some(m)) => (
            m.topic.clone(),
            Source::Mqtt { path: m.json_path.clone(), metric: m.metric.clone(), ts_path: m.timestamp_path.clone() },
        ),
        (None, None) => return Err("no source".into()),
    };
    let rx = bus.subscribe(&filter).map_err(|e| format!("cannot subscribe to {filter}: {e}"))?;
    Ok(Prepared { compiled, source, rx })
}

async fn run_rule(rule: Rule, p: Prepared, sinks: Sinks, devices: DeviceIndex, stats: Arc<Mutex<(RuleStats, String)>>) {
    let name = rule.name().to_string();
    let Prepared { compiled, source, mut rx } = p;
    let mut runner = RuleRunner::new(compiled);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let sink = SinkErrors::default();
    // Firing alerts, by alert key: restored from the last run of this rule
    // (so a condition that cleared while the agent was down still resolves).
    let state = AlertState::path(&sinks.state_dir, &rule);
    let mut firing = AlertState::load(&state, &rule);
    firing.retain(|_, a| runner.restore_firing(a.sink, a.series()));
    let mut error_log = ErrorLog::new(ERROR_LOG_EVERY);
    // The runner's errors at the last log line: its sample is newer news
    // than the sinks' when they moved since.
    let mut runner_errors_logged = 0;
    loop {
        let outputs = tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return };
                // Retained readings are old news when a rule (re)starts.
                if m.retain {
                    continue;
                }
                match source.record(&m.topic, &m.payload, &devices) {
                    Ok(Some(rec)) => runner.push(rec, unix_ms()),
                    Ok(None) => continue,
                    Err(e) => {
                        sink.add(format!("source: {e}"));
                        Vec::new()
                    }
                }
            }
            _ = tick.tick() => runner.tick(unix_ms()),
        };
        let alerted = outputs.iter().any(|o| matches!(o, Output::Alert { .. }));
        for o in outputs {
            if let Err(e) = execute(o, &sinks, &sink, &name, &mut firing) {
                sink.add(e);
            }
        }
        if alerted {
            if let Err(e) = AlertState::save(&state, &rule, &firing) {
                sink.add(format!("alert state: {e}"));
            }
        }
        let mut s = runner.stats();
        let runner_errors = s.errors;
        s.errors += sink.count.load(Ordering::Relaxed);
        if let Some(n) = error_log.due(Instant::now(), s.errors) {
            let sample =
                if runner_errors > runner_errors_logged { s.last_error.clone() } else { lock(&sink.last).clone() };
            runner_errors_logged = runner_errors;
            tracing::warn!(rule = %name, errors = n, total = s.errors, sample = %sample, "rule run-time errors; the records they hit were dropped");
        }
        if s.last_error.is_empty() {
            s.last_error = lock(&sink.last).clone();
        }
        lock(&stats).0 = s;
    }
}

/// Rate limit of a rule's error log: a line when errors were counted since
/// the previous one, at most one per `every` (the first error is logged at
/// once).
struct ErrorLog {
    every: Duration,
    last_line: Option<Instant>,
    /// The error count the last line covered.
    logged: u64,
}

impl ErrorLog {
    fn new(every: Duration) -> Self {
        ErrorLog { every, last_line: None, logged: 0 }
    }

    /// Given the rule's error count so far, whether to log a line now, and
    /// if so how many errors it reports (those since the previous line).
    fn due(&mut self, now: Instant, errors: u64) -> Option<u64> {
        if errors <= self.logged || self.last_line.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            return None;
        }
        let n = errors - self.logged;
        self.logged = errors;
        self.last_line = Some(now);
        Some(n)
    }
}

/// A record's value as a stored number: booleans are 0/1, strings are an error.
fn numeric(value: &Value, sink: &str) -> Result<f64, String> {
    match value {
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        v => v.as_f64().ok_or_else(|| format!("{sink} sink: {v} is not a number")),
    }
}

fn execute(
    o: Output,
    sinks: &Sinks,
    errs: &SinkErrors,
    rule: &str,
    firing: &mut HashMap<String, FiringAlert>,
) -> Result<(), String> {
    match o {
        Output::Tsdb { metric, tags, ts_ms, value } => {
            let store = sinks.tsdb.as_ref().ok_or("tsdb sink: the edge time-series store is not open")?;
            let v = numeric(&value, "tsdb")?;
            let key = yunbian_tsdb::SeriesKey::new(metric, tags).map_err(|e| format!("tsdb sink: {e}"))?;
            store.write((key, ts_ms, v, errs.clone()))
        }
        Output::Mqtt { topic, payload, retain } => {
            sinks.bus.publish(&topic, payload, retain);
            Ok(())
        }
        Output::Cloud { priority, record } => {
            let shipper = sinks.shipper.as_ref().ok_or("cloud sink: the data outbox is not open")?;
            let v = numeric(&record.value, "cloud")?;
            let key =
                yunbian_tsdb::SeriesKey::new(record.metric, record.tags).map_err(|e| format!("cloud sink: {e}"))?;
            shipper.push(priority, key, record.ts_ms, v)
        }
        Output::Alert { key, firing: holds, severity, message, record } => {
            let at_ms = record.ts_ms;
            let since_ms = if holds {
                let sink = alert_sink_index(&key);
                let series = (record.metric.clone(), record.tags.clone());
                firing
                    .entry(key.clone())
                    .or_insert(FiringAlert { sink, metric: series.0, tags: series.1, since: at_ms })
                    .since
            } else {
                firing.remove(&key).map_or(at_ms, |a| a.since)
            };
            let report = Report::Alert {
                id: format!("{rule}/{key}"),
                rule: rule.to_string(),
                series: record.series_name(),
                firing: holds,
                severity,
                message,
                value: record.value.to_json(),
                since_ms,
                at_ms,
            };
            sinks.alerts.try_send(report).map_err(|_| "alert sink: the agent is behind; alert dropped".to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device of the index: name, model, labels.
    type TestDevice<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

    fn index(devices: &[TestDevice<'_>]) -> DeviceIndex {
        let idx = devices
            .iter()
            .map(|(name, model, labels)| {
                let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                (name.to_string(), (model.to_string(), labels))
            })
            .collect();
        Arc::new(Mutex::new(idx))
    }

    /// Three devices: two pumps (site a and b) and a meter on site a.
    fn site() -> DeviceIndex {
        index(&[
            ("pump-1", "pump", &[("site", "a"), ("line", "1")]),
            ("pump-2", "pump", &[("site", "b"), ("line", "1")]),
            ("meter-1", "meter", &[("site", "a")]),
        ])
    }

    fn devices(names: &[&str], models: &[&str], selector: &[(&str, &str)], properties: &[&str]) -> Source {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Source::Devices {
            names: strings(names),
            models: strings(models),
            selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            properties: strings(properties),
        }
    }

    const READING: &[u8] = br#"{"value": 21.5, "ts": 1700000000000, "quality": "uncertain"}"#;

    fn topic(device: &str, property: &str) -> String {
        format!("yunbian/devices/{device}/properties/{property}")
    }

    /// The devices whose `temp` reading the source turns into a record.
    fn matched(source: &Source, idx: &DeviceIndex) -> Vec<String> {
        ["pump-1", "pump-2", "meter-1", "unknown"]
            .into_iter()
            .filter(|d| source.record(&topic(d, "temp"), READING, idx).expect("reading").is_some())
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_device_source_by_names_takes_only_those_devices() {
        let idx = site();
        let src = devices(&["pump-2", "meter-1", "unknown"], &[], &[], &[]);
        // A named device the node does not have gives nothing.
        assert_eq!(matched(&src, &idx), ["pump-2", "meter-1"]);
        let rec = src.record(&topic("pump-2", "temp"), READING, &idx).expect("ok").expect("record");
        assert_eq!(rec.metric, "temp");
        let tags: Vec<(&str, &str)> = rec.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(tags, [("device", "pump-2"), ("model", "pump"), ("property", "temp")]);
        assert_eq!(rec.ts_ms, 1_700_000_000_000);
        assert_eq!(rec.value, Value::F64(21.5));
        assert_eq!(rec.quality, Quality::Uncertain);
    }

    #[test]
    fn a_device_source_by_selector_takes_devices_whose_labels_match() {
        let idx = site();
        assert_eq!(matched(&devices(&[], &[], &[("site", "a")], &[]), &idx), ["pump-1", "meter-1"]);
        assert_eq!(matched(&devices(&[], &[], &[("site", "a"), ("line", "1")], &[]), &idx), ["pump-1"]);
        assert!(matched(&devices(&[], &[], &[("site", "c")], &[]), &idx).is_empty());
        // Names, models and selector all have to hold.
        assert_eq!(matched(&devices(&["pump-1", "pump-2"], &[], &[("site", "b")], &[]), &idx), ["pump-2"]);
        assert_eq!(matched(&devices(&[], &["pump"], &[("line", "1")], &[]), &idx), ["pump-1", "pump-2"]);
        assert!(matched(&devices(&[], &["meter"], &[("line", "1")], &[]), &idx).is_empty());
        // An empty source takes every device the node has.
        assert_eq!(matched(&devices(&[], &[], &[], &[]), &idx), ["pump-1", "pump-2", "meter-1"]);
    }

    #[test]
    fn a_device_source_keeps_only_its_properties() {
        let idx = site();
        let src = devices(&[], &[], &[("site", "a")], &["temp", "pressure"]);
        let props: Vec<&str> = ["temp", "pressure", "speed"]
            .into_iter()
            .filter(|p| src.record(&topic("pump-1", p), READING, &idx).expect("reading").is_some())
            .collect();
        assert_eq!(props, ["temp", "pressure"]);
        // A property of a device the selector leaves out gives nothing.
        assert!(src.record(&topic("pump-2", "temp"), READING, &idx).expect("reading").is_none());
    }

    #[test]
    fn a_device_source_ignores_other_topics_and_refuses_bad_readings() {
        let idx = site();
        let src = devices(&["pump-1"], &[], &[], &[]);
        for t in ["yunbian/devices/pump-1/status", "yunbian/devices/pump-1/properties/temp/x", "other/pump-1"] {
            assert!(src.record(t, READING, &idx).expect("ignored").is_none(), "{t}");
        }
        // A cleared retained reading (empty payload) is not a record.
        assert!(src.record(&topic("pump-1", "temp"), b"", &idx).expect("empty").is_none());
        let err = src.record(&topic("pump-1", "temp"), b"21.5 C", &idx).expect_err("not JSON");
        assert!(err.contains("not JSON"), "{err}");
        let err = src.record(&topic("pump-1", "temp"), br#"{"value": [1]}"#, &idx).expect_err("not a scalar");
        assert!(err.contains("pump-1"), "{err}");
        // Readings of devices the source does not take are not checked.
        assert!(src.record(&topic("pump-2", "temp"), b"21.5 C", &idx).expect("not ours").is_none());
    }

    #[test]
    fn error_lines_are_rate_limited_per_rule() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut log = ErrorLog::new(s(10));
        assert_eq!(log.due(t0, 0), None, "no error, no line");
        assert_eq!(log.due(t0, 1), Some(1), "the first error is logged at once");
        assert_eq!(log.due(t0 + s(1), 5), None);
        assert_eq!(log.due(t0 + s(9), 40), None);
        assert_eq!(log.due(t0 + s(10), 41), Some(40), "the count since the last line");
        assert_eq!(log.due(t0 + s(30), 41), None, "nothing new, nothing logged");
        assert_eq!(log.due(t0 + s(31), 42), Some(1), "quiet for 10 s: logged at once");
        assert_eq!(log.due(t0 + s(35), 50), None);
    }

    #[test]
    fn tsdb_flags_parse_or_say_what_is_expected() {
        assert_eq!(parse_fsync("always"), Ok(FsyncPolicy::Always));
        assert_eq!(parse_fsync("never"), Ok(FsyncPolicy::Never));
        assert_eq!(parse_fsync("interval:1s"), Ok(FsyncPolicy::Interval(1000)));
        assert_eq!(parse_fsync("interval:250ms"), Ok(FsyncPolicy::Interval(250)));
        for bad in ["sometimes", "interval", "interval:", "interval:soon", "interval:0s", "1s"] {
            let e = parse_fsync(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_fsync("often").expect_err("bad").contains("interval:<duration>"));
        assert!(parse_fsync("interval:0").expect_err("zero").contains("always"));
        assert_eq!(parse_memory_cap("32Mi"), Ok(32 << 20));
        assert!(parse_memory_cap("512Ki").expect_err("small").contains("1Mi"));
        assert!(parse_memory_cap("lots").is_err());
        assert_eq!(parse_max_series("100000"), Ok(100_000));
        assert!(parse_max_series("0").is_err());
        assert!(parse_max_series("-1").is_err());
    }

    #[test]
    fn an_idle_writer_syncs_interval_data_without_another_point() {
        let dir = std::env::temp_dir().join(format!("yunbian-edge-tsdb-idle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = TsdbOptions { fsync: FsyncPolicy::Interval(300), ..TsdbOptions::default() };
        let tsdb = EdgeTsdb::open(&dir, opts).expect("open");
        let key = yunbian_tsdb::SeriesKey::new("temp", BTreeMap::<String, String>::new()).expect("key");
        // One point, then silence: no append comes to sync it.
        tsdb.write((key, unix_ms(), 21.5, SinkErrors::default())).expect("queued");
        let deadline = Instant::now() + Duration::from_secs(10);
        let synced = loop {
            let st = lock(&tsdb.store()).stats();
            if st.points_appended == 1 && st.wal_syncs >= 1 && st.wal_unsynced_bytes == 0 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_dir_all(&dir);
        assert!(synced, "the point was not synced by the idle writer");
    }
}
