//! The agent's main loop.
//!
//! One task owns the protocol state ([`EdgeSession`]) and the local store
//! and consumes a single closed [`Event`] enum: connection up/down, frames
//! from the cloud, status changes from the runtime, timer ticks. A
//! connection task keeps the mTLS WebSocket to the cloud alive with
//! jittered back-off; a reconciler task converges the runtime towards the
//! desired view. Neither of them blocks the main loop.
//!
//! Architecture invariant: the agent keeps every workload running while the
//! cloud is unreachable. Desired state comes from the local store at start;
//! nothing is stopped because a connection failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use yunbian_api::{AppInstance, Device, DeviceModel, Kind, NodeGroupSpec};
use yunbian_devices::host::HostEvent;
use yunbian_devices::{DeviceConfig, MapperHost};
use yunbian_runtime::{LogOptions, Runtime, StatusUpdate};
use yunbian_sync::wire::{decode_down, encode, MAX_FRAME};
use yunbian_sync::{DesiredObject, Down, EdgeAction, EdgeSession, Report, SessionConfig, Up};

use crate::identity::{unix_now, Identity};
use crate::launcher::Launcher;
use crate::local_store::LocalStore;
use crate::node_info;

/// Everything the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// A connection is up; frames for it go into this sender.
    Connected(mpsc::Sender<Vec<u8>>),
    /// The connection is gone.
    Disconnected,
    /// A frame from the cloud.
    Frame(Vec<u8>),
    /// The runtime observed a change.
    Status(StatusUpdate),
    /// A log stream ended (stream id).
    LogDone(u64),
    /// A device mapper has something to report.
    Device(HostEvent),
    /// A rule raised or resolved an alert.
    Alert(Report),
    /// Timer.
    Tick,
}

/// Agent tunables.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Heartbeat interval (the cloud's grace period is several of these).
    pub heartbeat: Duration,
    /// Protocol timers.
    pub session: SessionConfig,
    /// Where node info measures disk usage.
    pub data_dir: PathBuf,
    /// Renew the certificate after this fraction of its lifetime (0.7–0.9).
    pub renew_at: f64,
    /// Report machine facts (false for simulated nodes, which report fixed ones).
    pub real_node_info: bool,
    /// Round trips to the cloud and to peers, reported with each heartbeat
    /// (its probe period is the cloud ping period).
    pub network: Arc<crate::probe::NetworkMonitor>,
}

impl AgentConfig {
    /// Defaults for an agent whose data lives in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        AgentConfig {
            heartbeat: Duration::from_secs(5),
            session: SessionConfig::default(),
            data_dir,
            renew_at: 0.8,
            real_node_info: true,
            network: Arc::new(crate::probe::NetworkMonitor::default()),
        }
    }
}

/// Live figures the agent exposes on its metrics port.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// 1 while connected.
    pub connected: AtomicBool,
    /// Desired instances.
    pub instances: AtomicU64,
    /// Unacknowledged reports.
    pub outbox: AtomicU64,
    /// Applied revision.
    pub applied: AtomicU64,
    /// Successful connections since start.
    pub connects: AtomicU64,
    /// The store-and-forward outbox (refreshed on every agent tick).
    pub data_outbox: std::sync::Mutex<Option<yunbian_api::DataOutboxStatus>>,
}

impl AgentStats {
    /// Prometheus text.
    pub fn render(&self) -> String {
        use yunbian_telemetry::metric;
        let mut out = String::new();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            &mut out,
            "yunbian_edge_connected",
            "gauge",
            "1 while the cloud connection is up.",
            u8::from(self.connected.load(Ordering::Relaxed)),
        );
        metric(&mut out, "yunbian_edge_instances", "gauge", "Instances in the desired view.", l(&self.instances));
        metric(
            &mut out,
            "yunbian_edge_outbox_depth",
            "gauge",
            "Reports not yet acknowledged by the cloud.",
            l(&self.outbox),
        );
        metric(&mut out, "yunbian_edge_applied_revision", "gauge", "Desired-view revision applied.", l(&self.applied));
        metric(&mut out, "yunbian_edge_connects_total", "counter", "Connections established.", l(&self.connects));
        let data = self.data_outbox.lock().map(|d| d.clone()).unwrap_or_default();
        if let Some(d) = data {
            for (name, kind, help, v) in [
                ("yunbian_edge_data_queued_batches", "gauge", "Data batches waiting for the cloud.", d.queued_batches),
                ("yunbian_edge_data_queued_points", "gauge", "Points in them.", d.queued_points),
                ("yunbian_edge_data_queued_bytes", "gauge", "Their bytes.", d.queued_bytes),
                (
                    "yunbian_edge_data_oldest_age_seconds",
                    "gauge",
                    "Age of the oldest queued batch.",
                    d.oldest_age_seconds,
                ),
                ("yunbian_edge_data_acked_points_total", "counter", "Points the cloud acknowledged.", d.acked_points),
                (
                    "yunbian_edge_data_dropped_expired_points_total",
                    "counter",
                    "Points dropped: batch older than the TTL.",
                    d.dropped_expired_points,
                ),
                (
                    "yunbian_edge_data_dropped_full_points_total",
                    "counter",
                    "Points dropped: outbox over its size limit.",
                    d.dropped_full_points,
                ),
                (
                    "yunbian_edge_data_dropped_disk_points_total",
                    "counter",
                    "Points dropped: disk full or corrupt batch.",
                    d.dropped_disk_points,
                ),
            ] {
                metric(&mut out, name, kind, help, v);
            }
        }
        yunbian_telemetry::process_metrics(&mut out);
        out
    }
}

fn instances_of(objects: &[DesiredObject]) -> BTreeMap<String, AppInstance> {
    objects
        .iter()
        .filter(|o| o.kind == Kind::AppInstance)
        .filter_map(|o| match serde_json::from_value::<AppInstance>(o.value.clone()) {
            Ok(i) => Some((o.name.clone(), i)),
            Err(e) => {
                tracing::warn!(instance = %o.name, error = %e, "desired instance does not decode; ignored");
                None
            }
        })
        .collect()
}

/// Device, device-model and rule objects of a desired view.
type DeviceObjects = BTreeMap<(Kind, String), DesiredObject>;

fn device_objects_of(objects: &[DesiredObject]) -> DeviceObjects {
    objects
        .iter()
        .filter(|o| matches!(o.kind, Kind::Device | Kind::DeviceModel | Kind::Rule | Kind::NodeGroup))
        .map(|o| ((o.kind, o.name.clone()), o.clone()))
        .collect()
}

/// The devices to run: every Device of the view whose model is in the view too.
fn device_configs(objects: &DeviceObjects) -> Vec<DeviceConfig> {
    let mut models = HashMap::new();
    for ((kind, name), o) in objects {
        if *kind == Kind::DeviceModel {
            match serde_json::from_value::<DeviceModel>(o.value.clone()) {
                Ok(m) => {
                    models.insert(name.clone(), Arc::new(m));
                }
                Err(e) => tracing::warn!(model = %name, error = %e, "desired device model does not decode; ignored"),
            }
        }
    }
    let mut out = Vec::new();
    for ((kind, name), o) in objects {
        if *kind != Kind::Device {
            continue;
        }
        match serde_json::from_value::<Device>(o.value.clone()) {
            Ok(d) => match models.get(&d.spec.model) {
                Some(m) => out.push(DeviceConfig { device: Arc::new(d), model: m.clone() }),
                None => {
                    tracing::warn!(device = %name, model = %d.spec.model, "device model not in the desired view; device not started")
                }
            },
            Err(e) => tracing::warn!(device = %name, error = %e, "desired device does not decode; ignored"),
        }
    }
    out
}

/// The device side of an agent: the mapper host and its reports.
pub struct DeviceSide {
    /// Runs the mappers.
    pub host: MapperHost,
    /// Twin reports from the mappers.
    pub events: mpsc::Receiver<HostEvent>,
    /// Runs the node's stream rules.
    pub rules: Option<Arc<crate::rules::RuleHost>>,
}

/// How often rules' per-node status goes to the cloud.
const RULE_STATUS_EVERY: Duration = Duration::from_secs(10);

/// The node's groups in a desired view.
pub(crate) fn groups_of_view(objects: &[DesiredObject]) -> Vec<(String, NodeGroupSpec)> {
    groups_of(&device_objects_of(objects))
}

/// The node's groups in the view, by name (their trust policy and site). A
/// group that does not decode (a newer cloud's fields) becomes one that
/// requires a signature by no key: the trust policy fails closed, never
/// open.
fn groups_of(objects: &DeviceObjects) -> Vec<(String, NodeGroupSpec)> {
    objects
        .iter()
        .filter(|((kind, _), _)| *kind == Kind::NodeGroup)
        .map(|((_, name), o)| match o.value.get("spec").cloned().map(serde_json::from_value::<NodeGroupSpec>) {
            Some(Ok(g)) => (name.clone(), g),
            other => {
                tracing::error!(group = %name, error = ?other.map(|r| r.err()), "desired node group does not decode; refusing every artifact until it does");
                let fail_closed = NodeGroupSpec {
                    trust: Some(yunbian_api::TrustSpec { require_signature: true, keys: Vec::new() }),
                    ..Default::default()
                };
                (name.clone(), fail_closed)
            }
        })
        .collect()
}

/// The rules and device configurations of a desired view (what the rule
/// host runs before the agent's loop starts).
pub(crate) fn rules_and_devices(objects: &[DesiredObject]) -> (Vec<yunbian_api::Rule>, Vec<DeviceConfig>) {
    let d = device_objects_of(objects);
    (rules_of(&d), device_configs(&d))
}

fn rules_of(objects: &DeviceObjects) -> Vec<yunbian_api::Rule> {
    objects
        .iter()
        .filter(|((k, _), _)| *k == Kind::Rule)
        .filter_map(|((_, name), o)| match serde_json::from_value::<yunbian_api::Rule>(o.value.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(rule = %name, error = %e, "desired rule does not decode; ignored");
                None
            }
        })
        .collect()
}

/// What runs the node's instances: the runtime, and the launcher that
/// prepares instances for it (artifact pulls, shims).
pub struct Workloads {
    /// The runtime.
    pub runtime: Arc<dyn Runtime>,
    /// The launcher.
    pub launcher: Arc<Launcher>,
}

/// Runs an agent until the process ends.
pub async fn run_agent(
    cfg: AgentConfig,
    identity: Identity,
    store: Arc<LocalStore>,
    workloads: Workloads,
    mut status_rx: mpsc::UnboundedReceiver<StatusUpdate>,
    stats: Arc<AgentStats>,
    devices: Option<DeviceSide>,
) -> Result<()> {
    let Workloads { runtime, launcher } = workloads;
    let node = identity.config.name.clone();
    let restored = store.restore().context("read the local store")?;
    let mut session = EdgeSession::new(cfg.session, restored.applied, restored.outbox, restored.next_seq);
    let mut desired = instances_of(&restored.desired);
    let mut device_objects = device_objects_of(&restored.desired);
    let (host, mut host_events, rules) = match devices {
        Some(d) => (Some(d.host), Some(d.events), d.rules),
        None => (None, None, None),
    };
    let apply_devices = |objects: &DeviceObjects| {
        launcher.set_groups(&groups_of(objects));
        let configs = device_configs(objects);
        if let Some(r) = &rules {
            r.apply(rules_of(objects), &configs);
        }
        if let Some(h) = &host {
            h.apply(configs);
        }
    };
    apply_devices(&device_objects);
    let shipper = rules.as_ref().and_then(|r| r.shipper());
    let mut last_rule_status = Instant::now();
    tracing::info!(node = %node, applied = restored.applied, instances = desired.len(), "agent starting from local state");

    let adopted = runtime.recover().await.context("recover workloads")?;
    if !adopted.is_empty() {
        tracing::info!(node = %node, count = adopted.len(), "runtime re-adopted instances");
    }
    let (desired_tx, desired_rx) = watch::channel((desired.clone(), session.applied() > 0));
    let reconciler = tokio::spawn(reconcile_runtime(runtime.clone(), launcher.clone(), desired_rx));

    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(1024);
    let identity = Arc::new(RwLock::new(identity));
    let reconnect = Arc::new(Notify::new());
    let conn = tokio::spawn(run_connection(identity.clone(), ev_tx.clone(), reconnect.clone(), cfg.network.clone()));
    {
        let ev_tx = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(s) = status_rx.recv().await {
                if ev_tx.send(Event::Status(s)).await.is_err() {
                    return;
                }
            }
        });
    }
    if let Some(mut rx) = rules.as_ref().and_then(|r| r.take_alerts()) {
        let ev_tx = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if ev_tx.send(Event::Alert(r)).await.is_err() {
                    return;
                }
            }
        });
    }
    if let Some(mut rx) = host_events.take() {
        let ev_tx = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if ev_tx.send(Event::Device(e)).await.is_err() {
                    return;
                }
            }
        });
    }
    {
        let ev_tx = ev_tx.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(250));
            loop {
                t.tick().await;
                if ev_tx.send(Event::Tick).await.is_err() {
                    return;
                }
            }
        });
    }

    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64;
    let mut out: Option<mpsc::Sender<Vec<u8>>> = None;
    let mut logs: HashMap<u64, JoinHandle<()>> = HashMap::new();
    let mut last_heartbeat: Option<Instant> = None;
    let mut cpu = node_info::CpuSampler::default();
    let (runtimes, unavailable) = if runtime.name() == "process" {
        (launcher.options().runtimes(), launcher.options().unavailable_runtimes())
    } else {
        (vec![runtime.name()], BTreeMap::new())
    };
    // Said once per start, and on the node for as long as it lasts: a
    // runtime left out (crun missing) is why instances needing it are not
    // placed here.
    for (rt, why) in &unavailable {
        tracing::warn!(node = %node, runtime = %rt, reason = %why, "runtime unavailable on this node; it is not offered");
    }
    let mut info =
        if cfg.real_node_info { node_info::node_info(&cfg.data_dir, &runtimes) } else { simulated_info(&runtimes) };
    info.unavailable_runtimes = unavailable;
    let mut renewing: Option<JoinHandle<Result<Identity>>> = None;
    let mut last_renew_attempt = 0u64;
    let mut store_failure: Option<String> = None;
    let mut rehello_at: Option<Instant> = None;

    let result = loop {
        let Some(ev) = ev_rx.recv().await else { break Ok(()) };
        let actions = match ev {
            Event::Connected(tx) => {
                out = Some(tx.clone());
                stats.connected.store(true, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                last_heartbeat = None;
                rehello_at = None;
                let actions = session.on_connected(now());
                // The Hello goes first: data batches follow it on the same queue.
                let mut ignored = false;
                let r = execute(&store, &mut desired, &mut device_objects, &mut ignored, actions, out.as_ref());
                if let Some(s) = shipper {
                    s.connected(tx);
                }
                if let Err(e) = r {
                    tracing::warn!(node = %node, error = %e, "hello");
                }
                continue;
            }
            Event::Disconnected => {
                if let Some(s) = shipper {
                    s.disconnected();
                }
                out = None;
                stats.connected.store(false, Ordering::Relaxed);
                session.on_disconnected();
                for (_, h) in logs.drain() {
                    h.abort();
                }
                continue;
            }
            Event::Frame(bytes) => match decode_down(&bytes) {
                Ok(Down::LogRequest { stream, instance, tail, follow }) => {
                    if let Some(tx) = &out {
                        let opts = LogOptions { tail: tail.map(|t| t as usize), follow };
                        logs.insert(
                            stream,
                            spawn_log(runtime.clone(), instance, opts, stream, tx.clone(), ev_tx.clone()),
                        );
                    }
                    continue;
                }
                Ok(Down::LogCancel { stream }) => {
                    if let Some(h) = logs.remove(&stream) {
                        h.abort();
                    }
                    continue;
                }
                Ok(Down::DataAck { ids }) => {
                    if let Some(s) = shipper {
                        s.acked(ids);
                    }
                    continue;
                }
                Ok(Down::Refused { reason }) => {
                    tracing::error!(node = %node, %reason, "cloud refused the session");
                    continue;
                }
                Ok(down) => session.on_down(down, now()),
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "bad frame from cloud; reconnecting");
                    reconnect.notify_one();
                    continue;
                }
            },
            Event::Status(s) => {
                if !desired.contains_key(&s.instance) {
                    continue; // removed meanwhile: nobody upstream wants it
                }
                session.report(Report::InstanceStatus { instance: s.instance, status: s.status }, now())
            }
            Event::LogDone(stream) => {
                logs.remove(&stream);
                continue;
            }
            Event::Device(HostEvent::Status { device, status }) => {
                if !device_objects.contains_key(&(Kind::Device, device.clone())) {
                    continue; // detached meanwhile
                }
                session.report(Report::DeviceStatus { device, status }, now())
            }
            Event::Alert(report) => session.report(report, now()),
            Event::Tick => {
                if let Some(tx) = &out {
                    if last_heartbeat.is_none_or(|t| t.elapsed() >= cfg.heartbeat) {
                        let limits = runtime.limits_support();
                        let mut usage = if cfg.real_node_info {
                            node_info::node_usage(&cfg.data_dir, &mut cpu, info.cpus, desired.len() as u32)
                        } else {
                            yunbian_api::NodeUsage { instances: desired.len() as u32, ..Default::default() }
                        };
                        usage.data_outbox = shipper.map(|s| s.status());
                        let mut disk_pressure = if cfg.real_node_info {
                            node_info::disk_pressure(&cfg.data_dir).unwrap_or_default()
                        } else {
                            String::new()
                        };
                        if let Some(e) = &store_failure {
                            if !disk_pressure.is_empty() {
                                disk_pressure.push_str("; ");
                            }
                            disk_pressure.push_str(&format!("local store write failed: {e}"));
                        }
                        let hb = Up::Heartbeat {
                            // With the devices the plugins registered now.
                            info: launcher.node_info(&info),
                            usage,
                            limits_enforced: limits.enforced,
                            limits_note: limits.note,
                            disk_pressure,
                            network: Some(Box::new(cfg.network.snapshot(Instant::now()))),
                            peer_addr: cfg.network.peer_addr(),
                        };
                        if tx.try_send(encode(&hb)).is_ok() {
                            last_heartbeat = Some(Instant::now());
                        }
                    }
                }
                // Certificate rotation.
                if let Some(h) = renewing.take_if(|h| h.is_finished()) {
                    match h.await {
                        Ok(Ok(new_identity)) => {
                            tracing::info!(node = %node, "certificate renewed; reconnecting with it");
                            if let Ok(mut id) = identity.write() {
                                *id = new_identity;
                            }
                            reconnect.notify_one();
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(node = %node, error = %format!("{e:#}"), "certificate renewal failed; will retry")
                        }
                        Err(e) => tracing::warn!(node = %node, error = %e, "renewal task"),
                    }
                } else if renewing.is_none() && out.is_some() {
                    let due = identity
                        .read()
                        .ok()
                        .and_then(|id| id.renew_due(cfg.renew_at).ok())
                        .is_some_and(|at| unix_now() >= at && unix_now() >= last_renew_attempt + 10);
                    if due {
                        last_renew_attempt = unix_now();
                        let mut id =
                            identity.read().map(|i| i.clone()).map_err(|_| anyhow::anyhow!("identity lock"))?;
                        renewing = Some(tokio::spawn(async move {
                            id.renew().await?;
                            Ok(id)
                        }));
                    }
                }
                if let Some(r) = rules.as_ref().filter(|_| last_rule_status.elapsed() >= RULE_STATUS_EVERY) {
                    last_rule_status = Instant::now();
                    let mut acts = Vec::new();
                    for (rule, status) in r.statuses() {
                        acts.extend(session.report(Report::RuleStatus { rule, status }, now()));
                    }
                    let mut ignored = false;
                    if let Err(e) = execute(&store, &mut desired, &mut device_objects, &mut ignored, acts, out.as_ref())
                    {
                        tracing::warn!(node = %node, error = %e, "queue rule statuses");
                    }
                }
                if out.is_some() && rehello_at.is_some_and(|t| Instant::now() >= t) {
                    rehello_at = None;
                    session.on_connected(now())
                } else {
                    session.on_tick(now())
                }
            }
        };
        let writes = actions.iter().any(|a| !matches!(a, EdgeAction::Send(_)));
        let mut devices_changed = false;
        let result = execute(&store, &mut desired, &mut device_objects, &mut devices_changed, actions, out.as_ref());
        if devices_changed {
            apply_devices(&device_objects);
        }
        if result.is_ok() && writes && store_failure.take().is_some() {
            // Statuses observed while the outbox could not be written were
            // lost with the rolled-back transactions: report every
            // instance's current status again.
            tracing::info!(node = %node, "local store writable again; re-reporting instance statuses");
            for s in runtime.statuses().await {
                if !desired.contains_key(&s.instance) {
                    continue;
                }
                let report = Report::InstanceStatus { instance: s.instance, status: s.status };
                let actions = session.report(report, now());
                let mut ignored = false;
                if let Err(e) = execute(&store, &mut desired, &mut device_objects, &mut ignored, actions, out.as_ref())
                {
                    tracing::warn!(node = %node, error = %e, "re-report statuses; will retry");
                    store_failure = Some(e.to_string());
                    (session, desired) = reload(&store, cfg.session)?;
                    rehello_at = Some(Instant::now() + Duration::from_secs(2));
                    break;
                }
            }
            if let Some(h) = &host {
                h.report_all();
            }
        }
        match result {
            Ok(true) => {
                stats.instances.store(desired.len() as u64, Ordering::Relaxed);
                let _ = desired_tx.send((desired.clone(), session.applied() > 0));
            }
            Ok(false) => {}
            Err(e) => {
                // Could not persist: acknowledge nothing, rebuild the session
                // from what is on disk, and start over with a new connection.
                // A full disk lands here: the transaction was rolled back, the
                // store is intact, workloads keep running on the last view,
                // and the heartbeat reports DiskPressure until a write works.
                tracing::error!(node = %node, error = %e, "local store write failed; resyncing");
                store_failure = Some(e.to_string());
                (session, desired) = reload(&store, cfg.session)?;
                // Start the protocol over from what is on disk, on the same
                // connection (dropping it would make the node flap NotReady
                // for as long as the disk stays full), after a pause.
                rehello_at = Some(Instant::now() + Duration::from_secs(2));
            }
        }
        stats.outbox.store(session.outbox_len() as u64, Ordering::Relaxed);
        stats.applied.store(session.applied(), Ordering::Relaxed);
        if let (Some(s), Ok(mut d)) = (shipper, stats.data_outbox.lock()) {
            *d = Some(s.status());
        }
    };
    conn.abort();
    reconciler.abort();
    if let Some(h) = &host {
        h.shutdown();
    }
    if let Some(r) = &rules {
        r.shutdown();
    }
    result
}

fn simulated_info(runtimes: &[&str]) -> yunbian_api::NodeInfo {
    yunbian_api::NodeInfo {
        hostname: "sim".into(),
        os: "linux".into(),
        arch: std::env::consts::ARCH.into(),
        cpus: 4,
        memory_bytes: 8 << 30,
        disk_bytes: 64 << 30,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        runtimes: runtimes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Executes protocol actions in order. Returns whether the desired view
/// changed. Stops at the first persistence failure, so nothing after it
/// (in particular no acknowledgement) is sent.
fn execute(
    store: &LocalStore,
    desired: &mut BTreeMap<String, AppInstance>,
    devices: &mut DeviceObjects,
    devices_changed: &mut bool,
    actions: Vec<EdgeAction>,
    out: Option<&mpsc::Sender<Vec<u8>>>,
) -> Result<bool> {
    let mut changed = false;
    for a in actions {
        match a {
            EdgeAction::Send(up) => {
                if let Some(tx) = out {
                    // A full queue means a stuck connection: the protocol
                    // retransmits what is lost.
                    let _ = tx.try_send(encode(&up));
                }
            }
            EdgeAction::ApplySnapshot { revision, objects } => {
                store.apply_snapshot(revision, &objects)?;
                *desired = instances_of(&objects);
                let next = device_objects_of(&objects);
                if next != *devices {
                    *devices = next;
                    *devices_changed = true;
                }
                changed = true;
            }
            EdgeAction::ApplyDelta { revision, changes } => {
                store.apply_delta(revision, &changes)?;
                for c in &changes {
                    match c {
                        yunbian_sync::Change::Upsert { object } if object.kind == Kind::AppInstance => {
                            desired.extend(instances_of(std::slice::from_ref(object)));
                        }
                        yunbian_sync::Change::Remove { kind: Kind::AppInstance, name } => {
                            desired.remove(name);
                        }
                        yunbian_sync::Change::Upsert { object }
                            if matches!(
                                object.kind,
                                Kind::Device | Kind::DeviceModel | Kind::Rule | Kind::NodeGroup
                            ) =>
                        {
                            devices.insert((object.kind, object.name.clone()), object.clone());
                            *devices_changed = true;
                        }
                        yunbian_sync::Change::Remove {
                            kind: kind @ (Kind::Device | Kind::DeviceModel | Kind::Rule | Kind::NodeGroup),
                            name,
                        } => {
                            devices.remove(&(*kind, name.clone()));
                            *devices_changed = true;
                        }
                        _ => {}
                    }
                }
                changed = true;
            }
            EdgeAction::PersistReport { seq, report } => store.push_report(seq, &report)?,
            EdgeAction::TrimOutbox { upto } => store.trim_outbox(upto)?,
        }
    }
    Ok(changed)
}

fn spawn_log(
    runtime: Arc<dyn Runtime>,
    instance: String,
    opts: LogOptions,
    stream: u64,
    out: mpsc::Sender<Vec<u8>>,
    ev_tx: mpsc::Sender<Event>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let reader = {
            let runtime = runtime.clone();
            let instance = instance.clone();
            tokio::spawn(async move { runtime.logs(&instance, opts, tx).await })
        };
        let mut failed = false;
        while let Some(chunk) = rx.recv().await {
            // Logs never take the last slots of the connection's queue:
            // heartbeats, acks and reports must always fit.
            while out.capacity() < LOG_RESERVE {
                if out.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let data = String::from_utf8_lossy(&chunk).into_owned();
            if out.send(encode(&Up::LogData { stream, data })).await.is_err() {
                failed = true;
                break;
            }
        }
        let error = match reader.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if !failed {
            let _ = out.send(encode(&Up::LogEnd { stream, error })).await;
        }
        let _ = ev_tx.send(Event::LogDone(stream)).await;
    })
}

/// Queue slots of a connection that log streaming leaves free.
const LOG_RESERVE: usize = 1024;

/// A connection that brought nothing (not even a pong) for this long is
/// considered dead (a NAT mapping dropped, a cloud host gone without RST).
const DEAD_AFTER: Duration = Duration::from_secs(45);

/// Longest wait between connection attempts. With the connect timeout it
/// bounds how long a node takes to notice that its link is back (a link cut
/// as a blackhole hangs attempts until the timeout).
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Longest wait for TCP + TLS, and again for the WebSocket upgrade. A
/// weak link (2 s RTT, 10 % loss, 64 kbit/s: several round trips, a
/// certificate chain, a retransmission or two) needs well over 10 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Re-opens the local store after a failed write (redb refuses everything
/// after an I/O error until re-opened) and rebuilds the session and the
/// desired instances from what is on disk.
fn reload(store: &LocalStore, cfg: SessionConfig) -> Result<(EdgeSession, BTreeMap<String, AppInstance>)> {
    if let Err(e) = store.reopen() {
        tracing::error!(error = %e, "re-open the local store");
    }
    let r = store.restore().context("re-read the local store")?;
    Ok((EdgeSession::new(cfg, r.applied, r.outbox, r.next_seq), instances_of(&r.desired)))
}

/// The desired instances, and whether they are known: a node that never
/// synced (a fresh or rebuilt local store) does not know what it should run
/// yet, and must not stop what the runtime re-adopted until the cloud says.
type DesiredState = (BTreeMap<String, AppInstance>, bool);

/// Converges the runtime towards the desired instances, level-triggered:
/// on every change of the view and every 10 s.
async fn reconcile_runtime(runtime: Arc<dyn Runtime>, launcher: Arc<Launcher>, mut rx: watch::Receiver<DesiredState>) {
    let woken = launcher.woken();
    loop {
        let (want, known) = rx.borrow_and_update().clone();
        // What the runtime runs now (even before the first sync, so an
        // adopted instance is never reported as waiting for its pull).
        let have: Vec<String> = runtime.statuses().await.into_iter().map(|s| s.instance).collect();
        let mut running: HashSet<&str> = have.iter().map(String::as_str).collect();
        if known {
            for name in have.iter().filter(|n| !want.contains_key(*n)) {
                // `remove` returns once the instance has stopped.
                match runtime.remove(name).await {
                    Ok(()) => {
                        running.remove(name.as_str());
                    }
                    Err(e) => tracing::warn!(instance = %name, error = %e, "remove instance"),
                }
            }
            launcher.release_devices(|i| want.contains_key(i));
        }
        // Pull state and blob marks go with instances neither desired nor
        // running: an instance being stopped keeps its files (a bundle it
        // reads from) until it is gone.
        running.extend(want.keys().map(String::as_str));
        launcher.retain(&running);
        for inst in want.values() {
            // Held back while its artifact is pulled (the launcher reports
            // the progress unless the runtime already runs the instance),
            // then run as a process.
            let Some(inst) = launcher.prepare(inst, have.contains(&inst.metadata.name)) else {
                let name = &inst.metadata.name;
                if launcher.refused(name) && have.contains(name) {
                    // The trust policy tightened, or the runtime went away.
                    tracing::warn!(instance = %name, "stopping an instance this node no longer accepts");
                    if let Err(e) = runtime.remove(name).await {
                        tracing::warn!(instance = %name, error = %e, "remove instance");
                    }
                    launcher.resend(name);
                }
                continue;
            };
            let name = &inst.metadata.name;
            match runtime.ensure(&inst).await {
                Ok(()) if launcher.take_handed(name) => {
                    // The launcher's last word was a pull status; the
                    // runtime's current one replaces it.
                    if let Some(s) = runtime.statuses().await.into_iter().find(|s| &s.instance == name) {
                        launcher.forward(s);
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e, "start instance");
                    launcher.start_failed(name, e.to_string());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = rx.changed() => {}
            _ = woken.notified() => {}
        }
    }
}

/// Keeps a WebSocket to the cloud open, reconnecting with jittered
/// exponential back-off (0.5 s doubling to 15 s, reset after a connection
/// that lasted). With several cloud URLs (replicas) each attempt goes to the
/// next one, and a lost connection is retried at once on another replica.
///
/// A certificate that expired (by the local clock, or as the cloud says) is
/// renewed before connecting; the cloud accepts it for renewal within its
/// grace. Past the grace the agent says, once a minute, what to run.
///
/// Every probe period of `network` it pings the cloud; the pong gives the
/// round trip ([`crate::probe`]).
async fn run_connection(
    identity: Arc<RwLock<Identity>>,
    ev_tx: mpsc::Sender<Event>,
    reconnect: Arc<Notify>,
    network: Arc<crate::probe::NetworkMonitor>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut rng = Jitter::seeded();
    let mut next_url = 0usize;
    let mut expired_hint_at: Option<Instant> = None;
    let mut renew_warned_at: Option<Instant> = None;
    let mut cloud_says_expired = false;
    // The cloud's TLS refused the certificate itself: only past its grace
    // (within it the handshake passes and the hub answers 401).
    let mut refused_past_grace = false;
    loop {
        let id = match identity.read() {
            Ok(i) => i.clone(),
            Err(_) => return,
        };
        let urls = id.config.urls();
        let url = urls.get(next_url % urls.len().max(1)).cloned().unwrap_or_default();
        next_url = next_url.wrapping_add(1);
        let expired = cloud_says_expired || id.not_after().is_ok_and(|t| unix_now() >= t);
        if expired {
            let mut renewed = id.clone();
            match renewed.renew().await {
                Ok(()) => {
                    tracing::info!(node = %id.config.name, "expired certificate renewed");
                    cloud_says_expired = false;
                    refused_past_grace = false;
                    if let Ok(mut w) = identity.write() {
                        *w = renewed;
                    }
                    continue;
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    // The renewal request itself often loses the TLS alert:
                    // under TLS 1.3 the client writes its request before it
                    // reads the server's refusal, and the server's close
                    // then arrives as a reset. The hub connection's
                    // handshake error below carries it reliably.
                    let past_grace = refused_past_grace || tls_refused_as_expired(&e);
                    let every = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if past_grace && every(expired_hint_at) {
                        expired_hint_at = Some(Instant::now());
                        tracing::error!(
                            node = %id.config.name,
                            error = %e,
                            "the node certificate expired longer ago than the cloud's renewal grace; {}",
                            yunbian_api::rejoin_hint(&id.config.name, &id.config.cloud, Some(&id.dir.display().to_string()))
                        );
                    } else if !past_grace && every(renew_warned_at) {
                        renew_warned_at = Some(Instant::now());
                        tracing::warn!(node = %id.config.name, error = %e, "cannot renew the certificate yet");
                    }
                }
            }
        }
        let began = Instant::now();
        match connect(&id, &url).await {
            Ok(ws) => {
                cloud_says_expired = false;
                refused_past_grace = false;
                let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4096);
                if ev_tx.send(Event::Connected(tx)).await.is_err() {
                    return;
                }
                let (mut sink, mut stream) = ws.split();
                let mut ping = tokio::time::interval(network.every());
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last_rx = Instant::now();
                let reason = loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(Message::Binary(b))) => {
                                last_rx = Instant::now();
                                if ev_tx.send(Event::Frame(b.to_vec())).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(Message::Close(_))) | None => break "closed by cloud".to_string(),
                            Some(Ok(Message::Pong(p))) => {
                                last_rx = Instant::now();
                                network.pong(&p, last_rx);
                            }
                            Some(Ok(_)) => last_rx = Instant::now(),
                            Some(Err(e)) => break format!("read: {e}"),
                        },
                        _ = ping.tick() => {
                            if last_rx.elapsed() > DEAD_AFTER {
                                break format!("nothing from the cloud for {}s", DEAD_AFTER.as_secs());
                            }
                            let payload = network.ping_payload(Instant::now());
                            if let Err(e) = sink.send(Message::Ping(payload.into())).await {
                                break format!("write: {e}");
                            }
                        }
                        f = rx.recv() => match f {
                            Some(bytes) => {
                                if let Err(e) = sink.send(Message::Binary(bytes.into())).await {
                                    break format!("write: {e}");
                                }
                            }
                            None => break "agent stopped".to_string(),
                        },
                        _ = reconnect.notified() => break "reconnect requested".to_string(),
                    }
                };
                let _ = sink.send(Message::Close(None)).await;
                network.cloud_disconnected();
                tracing::info!(node = %id.config.name, %url, %reason, "disconnected from cloud");
                if ev_tx.send(Event::Disconnected).await.is_err() {
                    return;
                }
                if began.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(500);
                }
                if urls.len() > 1 {
                    // Another replica is probably alive: try it at once.
                    tokio::time::sleep(Duration::from_millis(100).mul_f64(1.0 + rng.next_f64())).await;
                    continue;
                }
            }
            Err(e) => {
                // An expired certificate, or one the cloud replaced (a
                // renewal whose answer was lost: the cloud still renews
                // with the old one, see `Pin::OrPrevious`): renew first.
                cloud_says_expired =
                    e.to_lowercase().replace(' ', "").contains("certificateexpired") || e.contains("no longer valid");
                refused_past_grace = tls_refused_as_expired(&e);
                tracing::warn!(node = %id.config.name, %url, error = %e, retry_in = ?backoff, "cannot connect to cloud");
                if urls.len() > 1 && !next_url.is_multiple_of(urls.len()) {
                    // Not every replica tried yet in this round.
                    continue;
                }
            }
        }
        // Full jitter on the upper half: avoids reconnect storms after a cloud restart.
        let wait = backoff / 2 + backoff.mul_f64(rng.next_f64() / 2.0);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether an error is the cloud's TLS refusing the client certificate as
/// expired, which its verifier does only past the renewal grace.
fn tls_refused_as_expired(error: &str) -> bool {
    error.to_lowercase().replace(' ', "").contains("alert:certificateexpired")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(id: &Identity, url: &str) -> Result<Ws, String> {
    let tls = id.tls().map_err(|e| format!("{e:#}"))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, crate::http::connect_tls(url, tls))
        .await
        .map_err(|_| "connect timed out".to_string())??;
    let (host, port) = crate::http::host_port(url)?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let req = format!("wss://{host}:{port}/v1/hub").into_client_request().map_err(|e| e.to_string())?;
    // Small buffers: sync traffic is small messages, and the simulator runs
    // thousands of these connections in one process.
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_FRAME * 2);
    let (ws, _) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::client_async_with_config(req, stream, Some(cfg)))
            .await
            .map_err(|_| "websocket handshake timed out".to_string())?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let body = resp.body().as_deref().unwrap_or_default();
                    format!(
                        "cloud refused the connection: {}",
                        crate::http::error_message(resp.status().as_u16(), body)
                    )
                }
                e => format!("websocket: {e}"),
            })?;
    Ok(ws)
}

/// xorshift jitter seeded from the clock and pid (no rand dependency).
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(t ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::tls_refused_as_expired;

    #[test]
    fn only_the_tls_alert_means_past_the_grace() {
        assert!(tls_refused_as_expired("websocket: IO error: received fatal alert: CertificateExpired"));
        assert!(tls_refused_as_expired(
            "request /v1/renew: connection error: received fatal alert: CertificateExpired"
        ));
        // Within the grace the handshake passes and the hub answers 401.
        assert!(!tls_refused_as_expired(
            "cloud refused the connection: node certificate expired at 2026-11-22T04:54:19Z; renew it (POST /v1/renew)"
        ));
        assert!(!tls_refused_as_expired(
            "request /v1/renew: connection error: Connection reset by peer (os error 104)"
        ));
    }
}
