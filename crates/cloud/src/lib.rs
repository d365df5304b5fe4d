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
use yunbian_store::{RedbStore, Store};

pub mod api;
pub mod bootstrap;
pub mod controllers;
pub mod hub;
pub mod metrics;
pub mod objects;
pub mod scheduler;
pub mod server;

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

/// Starts a cloud; returns once it is listening.
pub async fn start(opts: CloudOptions) -> Result<CloudHandle> {
    let listener =
        tokio::net::TcpListener::bind(&opts.listen).await.with_context(|| format!("listen on {}", opts.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let url = opts.advertise.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        format!("https://{host}:{}", addr.port())
    });
    let listen = addr.to_string();
    let data_dir = opts.data_dir.clone();
    let creds = tokio::task::spawn_blocking(move || bootstrap::init(&data_dir, &listen, &url).map(|c| (c, url)))
        .await
        .context("credential set-up task")??;
    let (creds, url) = creds;
    let store_path = opts.data_dir.join("store.redb");
    let store: Arc<dyn Store> = tokio::task::spawn_blocking(move || RedbStore::open(&store_path, Default::default()))
        .await
        .context("store open task")?
        .context("open the state store")?;

    let metrics = Arc::new(metrics::Metrics::default());
    let hub_cfg = HubConfig { cert_grace: opts.node_cert_grace, url: url.clone(), ..opts.hub };
    let hub = hub::Hub::new(store.clone(), metrics.clone(), hub_cfg);
    let tls = yunbian_pki::server_config(
        &creds.server_cert,
        &creds.server_key,
        creds.ca.cert_pem(),
        opts.node_cert_grace,
    )
        .context("server TLS configuration")?;
    let state = Arc::new(api::ApiState {
        store: store.clone(),
        hub: hub.clone(),
        ca_fingerprint: creds.ca.fingerprint().context("CA fingerprint")?,
        ca: creds.ca,
        admin_token_hash: creds.admin_token_hash,
        metrics: metrics.clone(),
        node_cert_ttl: opts.node_cert_ttl,
    });
    let app = api::router(state);
    let tasks = vec![
        tokio::spawn(hub.clone().run_view_builder()),
        tokio::spawn(hub.clone().run_node_lifecycle()),
        tokio::spawn(controllers::run_app_controller(store.clone(), metrics.clone(), opts.controllers)),
        tokio::spawn(server::serve(listener, tls, app)),
    ];
    tracing::info!(%addr, %url, admin = %creds.admin_config.display(), "cloud listening");
    Ok(CloudHandle { addr, url, admin_config: creds.admin_config, store, tasks })
}
