//! `yunbian edge`: the edge agent.
//!
//! [`join`](identity::join) enrolls a node; [`start`] runs an agent from a
//! data directory with the process runtime; [`start_simulated`] runs one
//! with the fake runtime and an in-memory store (for `yunbian sim`).
//!
//! Architecture invariants:
//! - The agent opens the connection (NAT-friendly); the cloud never dials in.
//! - The agent keeps every workload running while the cloud is unreachable,
//!   from the desired state in its local store.
//! - The node's private key never leaves the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use yunbian_runtime::{FakeRuntime, ProcessRuntime, Runtime};

pub mod agent;
pub mod artifacts;
pub mod data_api;
pub mod device_plugins;
pub mod devices;
pub mod http;
pub mod identity;
pub mod instance_metrics;
pub mod launcher;
pub mod local_store;
pub mod node_info;
pub mod p2p;
pub mod probe;
pub mod rules;
pub mod shipper;

pub use agent::{AgentConfig, AgentStats};
pub use identity::{enroll, join, Identity, JoinToken};

/// Options of a real agent.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Data directory (identity, local store, instances).
    pub data_dir: PathBuf,
    /// Where to serve `/metrics` (plain HTTP), if anywhere.
    pub metrics_listen: Option<String>,
    /// Protocol and heartbeat settings.
    pub agent: AgentConfig,
    /// Edge broker, device mappers and the local device API.
    pub devices: devices::DeviceOptions,
    /// The artifact cache (size cap, platform).
    pub artifacts: artifacts::CacheOptions,
    /// Which runtimes beside `process` this agent offers (shim executable,
    /// wasm, crun); the node name, environment and cache paths are filled in.
    pub launcher: launcher::LauncherOptions,
    /// Serving chunks to peers and pulling from them.
    pub p2p: P2pOptions,
    /// Where device plugins register (docs/design/017-device-plugins.md);
    /// `None`: no plugin socket (instances asking for devices wait).
    pub device_plugin_socket: Option<PathBuf>,
}

/// P2P artifact distribution settings of an agent.
#[derive(Debug, Clone, Default)]
pub struct P2pOptions {
    /// Where to serve chunks and latency probes to peers (mTLS); `None`:
    /// do not serve (pulls still use peers; no peer probes).
    pub listen: Option<String>,
    /// `host:port` peers should use to reach the peer server (NAT, a
    /// proxy); `None`: the bound port, at the address the cloud sees.
    pub advertise: Option<String>,
    /// Upload limits of the peer server.
    pub upload: p2p::PeerServerLimits,
    /// Download limit and peer timeouts.
    pub download: p2p::PeerSourceOptions,
}

impl EdgeOptions {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        EdgeOptions {
            device_plugin_socket: Some(data_dir.join(device_plugins::SOCKET_FILE)),
            agent: AgentConfig::new(data_dir.clone()),
            data_dir,
            metrics_listen: None,
            devices: devices::DeviceOptions::default(),
            artifacts: artifacts::CacheOptions::default(),
            launcher: launcher::LauncherOptions::default(),
            p2p: P2pOptions::default(),
        }
    }
}

/// A running agent.
pub struct EdgeHandle {
    /// Node name.
    pub name: String,
    /// Metrics address, when serving.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Live figures.
    pub stats: Arc<AgentStats>,
    /// Edge broker and device API, when running.
    pub devices: Option<devices::DeviceServices>,
    task: tokio::task::JoinHandle<Result<()>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// The peer chunk server, stopped with the agent.
    peer_task: Option<tokio::task::JoinHandle<()>>,
    /// The device-plugin socket and its watcher, stopped with the agent.
    plugin_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The peer prober, stopped with the agent.
    probe_task: Option<tokio::task::JoinHandle<()>>,
}

impl EdgeHandle {
    /// The agent task, to wait on it without giving up the handle.
    pub fn task_mut(&mut self) -> &mut tokio::task::JoinHandle<Result<()>> {
        &mut self.task
    }

    /// Waits for the agent to end (it only ends on a fatal error).
    pub async fn wait(self) -> Result<()> {
        self.task.await.context("agent task")?
    }

    /// A planned stop (SIGTERM, Ctrl-C): rules stop and the data outbox
    /// writes what it was batching, then the agent stops. Workloads keep
    /// running, as on any agent restart.
    pub async fn shutdown(&self) {
        if let Some(d) = &self.devices {
            d.stop_data(std::time::Duration::from_secs(5)).await;
        }
        self.stop();
    }

    /// Stops the agent task. Workloads keep running.
    pub fn stop(&self) {
        self.task.abort();
        if let Some(m) = &self.metrics_task {
            m.abort();
        }
        if let Some(p) = &self.peer_task {
            p.abort();
        }
        for t in &self.plugin_tasks {
            t.abort();
        }
        if let Some(p) = &self.probe_task {
            p.abort();
        }
        if let Some(d) = &self.devices {
            d.stop();
        }
    }
}

/// Starts the agent of a joined node in `opts.data_dir`.
pub async fn start(opts: EdgeOptions) -> Result<EdgeHandle> {
    let identity = Identity::load(&opts.data_dir)?;
    let store = open_store(&opts.data_dir)?;
    let desired = store.restore().map(|r| r.desired).unwrap_or_default();
    let (services, side) =
        devices::start_devices(&identity.config.name, &opts.data_dir, &opts.devices, &desired).await?;
    let registry = device_plugins::DeviceRegistry::open(&opts.data_dir, Default::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = statuses_with_devices(registry.clone(), rx);
    let runtime_opts = yunbian_runtime::ProcessRuntimeOptions {
        node_env: services.workload_env(),
        app_metrics: services.app_metrics.clone(),
        ..Default::default()
    };
    let runtime: Arc<dyn Runtime> = ProcessRuntime::with_options(
        opts.data_dir.join("instances"),
        identity.config.name.clone(),
        tx.clone(),
        runtime_opts,
    )
    .context("start the process runtime")?;
    let limits = runtime.limits_support();
    tracing::info!(node = %identity.config.name, enforced = limits.enforced, note = %limits.note, "resource limits");
    // Chunks come from peers the cloud's tracker names, the cloud only when
    // no peer has them (docs/design/015-p2p-distribution.md).
    let cloud = Arc::new(artifacts::CloudSource::from_data_dir(&opts.data_dir)?);
    let source = Arc::new(p2p::PeerSource::from_data_dir(cloud.clone(), &opts.data_dir, opts.p2p.download.clone())?);
    let cache = artifacts::ArtifactCache::open(&opts.data_dir, source, opts.artifacts.clone())
        .context("open the artifact cache")?;
    let launch = launcher::LauncherOptions {
        node: identity.config.name.clone(),
        node_env: services.workload_env(),
        wasm_cache: opts.data_dir.join("wasm-cache"),
        oci_dir: opts.data_dir.join("oci"),
        ..opts.launcher.clone()
    };
    tracing::info!(node = %identity.config.name, runtimes = ?launch.runtimes(), oci = ?launch.oci, "workload runtimes");
    let launcher = launcher::Launcher::new(Some(Arc::new(cache)), launch, tx);
    launcher.set_devices(registry.clone());
    let plugin_tasks = start_device_plugins(opts.device_plugin_socket.as_deref(), registry, &launcher);
    let mut peer_task = None;
    let mut probe_task = None;
    if let Some(listen) = &opts.p2p.listen {
        // Serving peers is worth no refusal to run workloads.
        match p2p::start_peer_server(&opts.data_dir, listen, opts.p2p.upload.clone()).await {
            Ok((addr, server)) => {
                peer_task = Some(server);
                tracing::info!(node = %identity.config.name, %addr, "serving artifact chunks to peers");
                let groups = agent::groups_of_view(&desired);
                let site = p2p::site_of_groups(&groups);
                let advertised = opts.p2p.advertise.clone().unwrap_or_else(|| format!(":{}", addr.port()));
                opts.agent.network.set_peer_addr(advertised.clone());
                match probe::PeerProber::from_data_dir(&opts.data_dir, opts.agent.network.clone()) {
                    Ok(prober) => {
                        let me = identity.config.name.clone();
                        probe_task = Some(tokio::spawn(probe::run_prober(me, cloud.clone(), prober)));
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot probe peers"),
                }
                let announcer = p2p::spawn_announcer(cloud, &opts.data_dir, advertised, site, p2p::ANNOUNCE_EVERY);
                launcher.set_announcer(Arc::new(announcer));
            }
            Err(e) => {
                tracing::warn!(%listen, error = %e, "cannot serve artifact chunks to peers; pulling without serving")
            }
        }
    }
    let mut h = spawn(
        identity,
        store,
        agent::Workloads { runtime, launcher },
        rx,
        opts.agent,
        opts.metrics_listen.as_deref(),
        Some(side),
    )
    .await?;
    h.devices = Some(services);
    h.peer_task = peer_task;
    h.plugin_tasks = plugin_tasks;
    h.probe_task = probe_task;
    Ok(h)
}

/// Starts a simulated agent: real identity, channel and protocol; fake
/// runtime; in-memory local store.
pub async fn start_simulated(identity: Identity, agent: AgentConfig) -> Result<EdgeHandle> {
    start_simulated_with_load(identity, agent, None).await
}

/// Like [`start_simulated`]; with a load, its instances report their share
/// of it as `usage` every `interval` (when it changed noticeably), so
/// autoscaling can be exercised in simulation.
pub async fn start_simulated_with_load(
    identity: Identity,
    agent: AgentConfig,
    load: Option<(yunbian_runtime::SyntheticLoad, std::time::Duration)>,
) -> Result<EdgeHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let runtime: Arc<dyn Runtime> = match load {
        Some((load, interval)) => {
            let fake = FakeRuntime::with_load(tx.clone(), load, interval);
            // Ends by itself once the agent (and so the runtime) is gone.
            fake.spawn_usage_reporter();
            fake
        }
        None => FakeRuntime::new(tx.clone()),
    };
    let store = Arc::new(local_store::LocalStore::in_memory());
    let launcher = launcher::Launcher::new(None, launcher::LauncherOptions::default(), tx);
    spawn(identity, store, agent::Workloads { runtime, launcher }, rx, agent, None, None).await
}

/// Instance statuses as the agent reports them: with the devices each
/// instance holds (`status.devices`), whoever produced the status.
fn statuses_with_devices(
    registry: Arc<device_plugins::DeviceRegistry>,
    mut from: mpsc::UnboundedReceiver<yunbian_runtime::StatusUpdate>,
) -> mpsc::UnboundedReceiver<yunbian_runtime::StatusUpdate> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut u) = from.recv().await {
            u.status.devices = registry.held_by(&u.instance);
            if tx.send(u).is_err() {
                return;
            }
        }
    });
    rx
}

/// Serves the device-plugin socket at `socket` (a socket that cannot be
/// bound is logged: workloads without devices still run) and has the
/// launcher look at waiting instances again on every device change.
fn start_device_plugins(
    socket: Option<&Path>,
    registry: Arc<device_plugins::DeviceRegistry>,
    launcher: &Arc<launcher::Launcher>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut changes = registry.subscribe();
    let wake = launcher.woken();
    tasks.push(tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            wake.notify_one();
        }
    }));
    if let Some(path) = socket {
        match device_plugins::bind(path) {
            Ok(listener) => {
                tracing::info!(socket = %path.display(), "device plugins register at this socket");
                tasks.push(tokio::spawn(device_plugins::serve(registry, listener)));
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot serve the device-plugin socket; no devices will be registered")
            }
        }
    }
    tasks
}

/// Opens the local store. A store file that cannot be opened or read back
/// (truncated, garbage, a corrupt record) is moved aside as
/// `state.redb.corrupt-<unix time>` and replaced by an empty one: the agent
/// then keeps the workloads the runtime re-adopts and rebuilds its desired
/// state from the cloud's snapshot, instead of failing at every start. Only
/// the newest three quarantined files are kept. A store that fails for want
/// of disk space or permission is left alone: that is not corruption.
fn open_store(dir: &Path) -> Result<Arc<local_store::LocalStore>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("state.redb");
    let attempt = local_store::LocalStore::open(&path).and_then(|s| s.restore().map(|_| s));
    match attempt {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) if e.is_corruption() => {
            let aside = dir.join(format!("state.redb.corrupt-{}", identity::unix_now()));
            tracing::error!(
                store = %path.display(),
                moved_to = %aside.display(),
                error = %e,
                "the local store is corrupt; moving it aside and rebuilding from the cloud"
            );
            std::fs::rename(&path, &aside).with_context(|| format!("move aside {}", path.display()))?;
            prune_quarantine(dir, 3);
            Ok(Arc::new(local_store::LocalStore::open(&path).context("create a new local store")?))
        }
        Err(e) => Err(anyhow::Error::new(e).context("open the local store")),
    }
}

fn prune_quarantine(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut aside: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("state.redb.corrupt-")))
        .collect();
    aside.sort();
    let excess = aside.len().saturating_sub(keep);
    for p in &aside[..excess] {
        let _ = std::fs::remove_file(p);
    }
}

/// The edge time-series store's gauges and counters.
fn tsdb_metrics(out: &mut String, st: &yunbian_tsdb::Stats) {
    use yunbian_telemetry::metric;
    metric(out, "yunbian_edge_tsdb_series", "gauge", "Series in the edge store.", st.series);
    metric(
        out,
        "yunbian_edge_tsdb_memory_bytes",
        "gauge",
        "Memory the edge store accounts against its cap (head, series, indexes).",
        st.memory_bytes,
    );
    metric(out, "yunbian_edge_tsdb_disk_bytes", "gauge", "Bytes of the edge store's blocks.", st.disk_bytes);
    metric(out, "yunbian_edge_tsdb_wal_bytes", "gauge", "Bytes of the edge store's write-ahead log.", st.wal_bytes);
    metric(out, "yunbian_edge_tsdb_points_appended_total", "counter", "Points appended.", st.points_appended);
    let refused = st.rejected_out_of_order + st.rejected_too_old + st.rejected_memory_cap + st.rejected_series_limit;
    metric(out, "yunbian_edge_tsdb_points_rejected_total", "counter", "Points refused (order, age, caps).", refused);
}

async fn spawn(
    identity: Identity,
    store: Arc<local_store::LocalStore>,
    workloads: agent::Workloads,
    rx: mpsc::UnboundedReceiver<yunbian_runtime::StatusUpdate>,
    agent: AgentConfig,
    metrics_listen: Option<&str>,
    devices: Option<agent::DeviceSide>,
) -> Result<EdgeHandle> {
    let name = identity.config.name.clone();
    let stats = Arc::new(AgentStats::default());
    let tsdb = devices.as_ref().and_then(|d| d.rules.as_ref()).and_then(|r| r.tsdb());
    let (metrics_addr, metrics_task) = match metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().ok();
                if let Some(a) = bound {
                    tracing::info!(node = %name, "agent metrics at http://{a}/metrics");
                }
                let s = stats.clone();
                let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                    let mut out = s.render();
                    // Never wait for the writer (a flush may hold the store):
                    // a scrape that finds it busy goes without these.
                    if let Some(Ok(db)) = tsdb.as_ref().map(|db| db.try_lock()) {
                        tsdb_metrics(&mut out, &db.stats());
                    }
                    out
                });
                (bound, Some(tokio::spawn(yunbian_telemetry::serve_metrics(l, render))))
            }
            Err(e) => {
                // Metrics are not worth refusing to run workloads for.
                tracing::warn!(%addr, error = %e, "cannot serve metrics; running without them");
                (None, None)
            }
        },
        None => (None, None),
    };
    let task = tokio::spawn(agent::run_agent(agent, identity, store, workloads, rx, stats.clone(), devices));
    Ok(EdgeHandle {
        name,
        metrics_addr,
        stats,
        devices: None,
        task,
        metrics_task,
        peer_task: None,
        probe_task: None,
        plugin_tasks: Vec::new(),
    })
}
