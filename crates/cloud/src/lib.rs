//! `yunbian cloud`: the control plane.
//!
//! [`start`] wires the parts together: the state store, the credentials in
//! the data directory, the hub (edge connections and desired views), the
//! controllers (apps, node lifecycle) and the HTTPS API. It returns a
//! [`CloudHandle`] so the demo and tests can run a cloud in-process.
//!
//! Architecture invariant: everything the cloud knows lives in the store;
//! in-memory state (views, heartbeats) is rebuilt from it or from the edges
//! after a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use yunbian_store::{Coordinator, RedbStore, Store};

pub mod api;
pub mod app_pass;
pub mod artifacts;
pub mod autoscale;
pub mod bootstrap;
pub mod controllers;
pub mod data_store;
pub mod device_placement;
pub mod device_views;
pub mod events;
pub mod health;
pub mod hub;
pub mod latency;
pub mod metrics;
pub mod objects;
pub mod rollout;
pub mod rollout_routes;
pub mod rule_views;
pub mod server;
pub mod tracker;

pub use hub::HubConfig;

/// Settings of one cloud.
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// Where the store and credentials live.
    pub data_dir: PathBuf,
    /// Address to listen on (`127.0.0.1:7443`, `0.0.0.0:7443`, port 0 for any).
    pub listen: String,
    /// URL clients use; default `https://<listen>`.
    pub advertise: Option<String>,
    /// Hub timers and heartbeat grace.
    pub hub: HubConfig,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Duration,
    /// How long after expiry a node certificate can still be renewed (a
    /// node offline while its certificate ran out recovers by itself).
    pub node_cert_grace: Duration,
    /// App controller settings (eviction).
    pub controllers: controllers::ControllerConfig,
    /// Where the state lives.
    pub store: StoreConfig,
    /// This replica's name in leader election and presence (default: its URL).
    pub replica_id: Option<String>,
    /// Artifact chunks no artifact references are collected once unused
    /// for this long (protects pushes in progress; default 1 h).
    pub artifact_gc_grace: Duration,
    /// The P2P tracker and the cloud's chunk egress limits
    /// (docs/design/015-p2p-distribution.md; default: unlimited).
    pub p2p: tracker::TrackerConfig,
}

/// The state store backend.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// redb in the data directory: one replica.
    Embedded,
    /// etcd v3: any number of replicas.
    #[cfg(feature = "etcd")]
    Etcd {
        /// `host:port` of each member.
        endpoints: Vec<String>,
        /// Key prefix of this cluster.
        prefix: String,
    },
}

impl StoreConfig {
    /// Parses `--store`: `embedded` or `etcd://HOST:PORT[,HOST:PORT…]`.
    pub fn parse(s: &str, etcd_prefix: &str) -> Result<StoreConfig, String> {
        if s == "embedded" || s.is_empty() {
            return Ok(StoreConfig::Embedded);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!("--store {s:?}: expected `embedded` or `etcd://HOST:PORT[,HOST:PORT…]`"));
        };
        let endpoints: Vec<String> =
            rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(|e| format!("http://{e}")).collect();
        if endpoints.is_empty() {
            return Err(format!("--store {s:?}: no etcd endpoint"));
        }
        #[cfg(feature = "etcd")]
        {
            Ok(StoreConfig::Etcd { endpoints, prefix: etcd_prefix.to_string() })
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = (endpoints, etcd_prefix);
            Err("this build has no etcd support (build with `--features etcd`)".to_string())
        }
    }
}

impl CloudOptions {
    /// Defaults for a data dir and listen address.
    pub fn new(data_dir: impl Into<PathBuf>, listen: impl Into<String>) -> Self {
        CloudOptions {
            data_dir: data_dir.into(),
            listen: listen.into(),
            advertise: None,
            hub: HubConfig::default(),
            node_cert_ttl: Duration::from_secs(30 * 86_400),
            node_cert_grace: Duration::from_secs(30 * 86_400),
            controllers: controllers::ControllerConfig::default(),
            store: StoreConfig::Embedded,
            replica_id: None,
            artifact_gc_grace: artifacts::DEFAULT_GC_GRACE,
            p2p: tracker::TrackerConfig::default(),
        }
    }
}

/// A running cloud.
pub struct CloudHandle {
    /// Bound address.
    pub addr: SocketAddr,
    /// URL for clients.
    pub url: String,
    /// Path of the generated admin.yaml.
    pub admin_config: PathBuf,
    /// The store (for tests and the demo).
    pub store: Arc<dyn Store>,
    tasks: Vec<JoinHandle<()>>,
}

impl CloudHandle {
    /// Stops every task of this cloud.
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Stops cleanly: ends every task, which drops a held leadership, and
    /// gives the store a moment to release it (the etcd lease is revoked,
    /// so another replica leads at once instead of after the lease TTL).
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// Resolves when the server task has ended (only on a fatal error),
    /// leaving the handle usable.
    pub async fn server_stopped(&self) {
        loop {
            if self.tasks.last().is_none_or(|t| t.is_finished()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the server task ends (it only ends on a fatal error).
    pub async fn wait(mut self) {
        if let Some(server) = self.tasks.pop() {
            let _ = server.await;
        }
    }
}

impl Drop for CloudHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the configured state store.
async fn open_store(opts: &CloudOptions) -> Result<(Arc<dyn Store>, Arc<dyn Coordinator>)> {
    match &opts.store {
        StoreConfig::Embedded => {
            let path = opts.data_dir.join("store.redb");
            std::fs::create_dir_all(&opts.data_dir)
                .with_context(|| format!("create data dir {}", opts.data_dir.display()))?;
            let store = tokio::task::spawn_blocking(move || RedbStore::open(&path, Default::default()))
                .await
                .context("store open task")?
                .context("open the state store")?;
            Ok((store.clone(), store))
        }
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd { endpoints, prefix } => {
            let store = yunbian_store::etcd::EtcdStore::connect(endpoints, prefix, Default::default())
                .await
                .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?;
            Ok((store.clone(), store))
        }
    }
}

/// Starts a cloud replica; returns once it is listening.
pub async fn start(opts: CloudOptions) -> Result<CloudHandle> {
    let listener =
        tokio::net::TcpListener::bind(&opts.listen).await.with_context(|| format!("listen on {}", opts.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let url = opts.advertise.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        format!("https://{host}:{}", addr.port())
    });
    let (store, coord) = open_store(&opts).await?;
    let creds = bootstrap::init(&opts.data_dir, &addr.to_string(), &url, coord.as_ref()).await?;
    let replica = opts.replica_id.clone().unwrap_or_else(|| url.clone());

    let metrics = Arc::new(metrics::Metrics::default());
    let hub_cfg = HubConfig { cert_grace: opts.node_cert_grace, url: url.clone(), ..opts.hub };
    let hub = hub::Hub::new(store.clone(), metrics.clone(), hub_cfg);
    let data = data_store::start(&opts.data_dir, &hub).await;
    let tls =
        yunbian_pki::server_config(&creds.server_cert, &creds.server_key, creds.ca.cert_pem(), opts.node_cert_grace)
            .context("server TLS configuration")?;
    let chunks =
        yunbian_artifacts::FsChunkStore::open(opts.data_dir.join("blobs")).context("open the artifact chunk store")?;
    let registry = Arc::new(artifacts::ArtifactRegistry { chunks: Arc::new(chunks), gc_grace: opts.artifact_gc_grace });
    let state = Arc::new(api::ApiState {
        store: store.clone(),
        hub: hub.clone(),
        ca_fingerprint: creds.ca.fingerprint().context("CA fingerprint")?,
        ca: creds.ca,
        admin_token_hash: creds.admin_token_hash,
        metrics: metrics.clone(),
        node_cert_ttl: opts.node_cert_ttl,
        data,
        artifacts: registry.clone(),
        tracker: Arc::new(tracker::Tracker::new(opts.p2p.clone())),
    });
    let app = api::router(state);
    let tasks = vec![
        tokio::spawn(hub.clone().run_view_builder()),
        tokio::spawn(artifacts::run_gc(registry, store.clone())),
        tokio::spawn(hub.clone().run_housekeeping(coord.clone(), replica.clone())),
        tokio::spawn(lead(coord.clone(), replica.clone(), hub.clone(), metrics.clone(), opts.controllers)),
        tokio::spawn(server::serve(listener, tls, app)),
    ];
    tracing::info!(%addr, %url, %replica, admin = %creds.admin_config.display(), "cloud listening");
    Ok(CloudHandle { addr, url, admin_config: creds.admin_config, store, tasks })
}

/// Campaigns for leadership, forever: while this replica leads, the App
/// controller and the node lifecycle controller run, writing through the
/// fenced store (a deposed leader's writes fail); when leadership is lost
/// they stop, and the replica campaigns again. Every replica serves the API
/// and edges all along.
async fn lead(
    coord: Arc<dyn Coordinator>,
    replica: String,
    hub: Arc<hub::Hub>,
    metrics: Arc<metrics::Metrics>,
    cfg: controllers::ControllerConfig,
) {
    loop {
        let mut leadership = match coord.campaign(&replica).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader election: cannot campaign; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(%replica, term = leadership.term, "leading: controllers started");
        metrics.leader.store(1, std::sync::atomic::Ordering::Relaxed);
        let store = leadership.store.clone();
        // A JoinSet, so the controllers also end when this task is aborted
        // (a clean stop): the fenced store they hold is then dropped, which
        // gives the leadership up at once instead of after the lease TTL.
        let mut controllers = tokio::task::JoinSet::new();
        let signals: Arc<dyn app_pass::NodeSignals> = hub.clone();
        controllers.spawn(controllers::run_app_controller(store.clone(), metrics.clone(), cfg, signals));
        controllers.spawn(hub.clone().run_node_lifecycle(store, coord.clone()));
        drop(leadership.store);
        while !*leadership.lost.borrow_and_update() {
            if leadership.lost.changed().await.is_err() {
                break;
            }
        }
        controllers.shutdown().await;
        metrics.leader.store(0, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%replica, term = leadership.term, "leadership lost: controllers stopped");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
