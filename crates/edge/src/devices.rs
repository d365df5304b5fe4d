//! The agent's device side: the embedded MQTT broker (the edge bus), the
//! mapper host with the built-in protocol drivers, and the adapter between
//! them.
//!
//! Invariant: the broker and the mappers are optional services of the
//! agent; a port already in use or a broken device configuration is logged
//! and leaves workloads and the cloud connection untouched.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc;
use yunbian_bus::{Broker, BrokerConfig, QoS};
use yunbian_devices::bus::{BusMessage, EdgeBus};
use yunbian_devices::MapperHost;

use crate::agent::DeviceSide;

/// Capacity of each in-agent subscription (messages).
const SUBSCRIPTION_CAPACITY: usize = 4096;

/// What device services the agent runs.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The embedded broker (`None`: no broker; the mappers then use an
    /// in-memory bus that no client can reach).
    pub broker: Option<BrokerConfig>,
    /// Where to serve the local device HTTP API (`None`: not served).
    pub local_api: Option<SocketAddr>,
    /// Store-and-forward limits and pacing (rules' `cloud` sinks).
    pub shipping: crate::shipper::ShipperOptions,
    /// The edge time-series store (rules' `tsdb` sinks): fsync policy,
    /// memory and series caps, retention (docs/design/008-edge-tsdb.md).
    pub tsdb: crate::rules::TsdbOptions,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            broker: Some(BrokerConfig::default()),
            local_api: Some(SocketAddr::from(([127, 0, 0, 1], 7790))),
            shipping: Default::default(),
            tsdb: Default::default(),
        }
    }
}

/// The embedded broker as the mappers' [`EdgeBus`].
pub struct BrokerBus(pub Broker);

impl EdgeBus for BrokerBus {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self.0.publish(topic, payload.into(), QoS::AtMostOnce, retain) {
            tracing::debug!(topic, error = %e, "edge bus: publish refused");
        }
    }

    fn subscribe(&self, filter: &str) -> Result<mpsc::Receiver<BusMessage>, String> {
        let mut sub = self.0.subscribe(filter, SUBSCRIPTION_CAPACITY).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        // Ends (and drops the broker route) as soon as the receiver is
        // dropped, even on a topic nobody publishes to.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    m = sub.recv() => {
                        let Some(m) = m else { return };
                        let msg = BusMessage { topic: m.topic.to_string(), payload: m.payload.to_vec(), retain: m.retain };
                        // A slow receiver holds this forwarder; the broker's
                        // queue for the subscription then fills and the
                        // broker drops and counts (it never blocks the bus).
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Running device services.
pub struct DeviceServices {
    /// The broker, when one runs.
    pub broker: Option<Broker>,
    /// Its listening addresses.
    pub broker_addrs: Vec<SocketAddr>,
    /// The local API address, when served.
    pub local_api: Option<SocketAddr>,
    /// The metrics apps report on the local API
    /// (`POST /v1/instances/{instance}/metrics`), for the process runtime.
    pub app_metrics: yunbian_runtime::AppMetrics,
    rules: Arc<crate::rules::RuleHost>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DeviceServices {
    /// Variables workloads get so they find the bus and the device API:
    /// `YUNBIAN_MQTT` (`host:port` of the first broker listener) and
    /// `YUNBIAN_DEVICE_API` (`http://host:port`).
    pub fn workload_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(a) = self.broker_addrs.first() {
            env.push(("YUNBIAN_MQTT".to_string(), a.to_string()));
        }
        if let Some(a) = self.local_api {
            env.push(("YUNBIAN_DEVICE_API".to_string(), format!("http://{a}")));
        }
        env
    }

    /// Stops the servers (the mapper host stops with the agent).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// A clean stop of the data path: rules stop, and the shipper seals
    /// the batches it was filling and writes them to disk (waiting up to
    /// `timeout`), so a planned stop loses no point.
    pub async fn stop_data(&self, timeout: std::time::Duration) {
        self.rules.shutdown();
        if let Some(s) = self.rules.shipper().cloned() {
            let done = tokio::task::spawn_blocking(move || s.stop_and_wait(timeout)).await.unwrap_or(false);
            if !done {
                tracing::warn!("data outbox did not finish writing within {timeout:?}");
            }
        }
    }
}

/// Starts the broker and the mapper host for node `node` with state under
/// `data_dir`; returns the services and the agent's device side. The rules
/// of the node's last desired view (`desired`) subscribe to the bus before
/// its listeners open, so a client that reconnects the moment the agent
/// restarts publishes to running rules.
pub async fn start_devices(
    node: &str,
    data_dir: &Path,
    opts: &DeviceOptions,
    desired: &[yunbian_sync::DesiredObject],
) -> Result<(DeviceServices, DeviceSide)> {
    let listeners = opts.broker.as_ref().map(|c| c.listeners.clone()).unwrap_or_default();
    let (broker, bus): (Option<Broker>, Arc<dyn EdgeBus>) = match &opts.broker {
        Some(cfg) => match Broker::start(BrokerConfig { listeners: Vec::new(), ..cfg.clone() }).await {
            Ok(b) => (Some(b.clone()), Arc::new(BrokerBus(b))),
            Err(e) => {
                // Workloads and the cloud connection matter more than the bus.
                tracing::error!(node, error = %e, "cannot start the edge MQTT broker; running without it (devices still report to the cloud)");
                (None, Arc::new(yunbian_devices::MemoryBus::new()))
            }
        },
        None => (None, Arc::new(yunbian_devices::MemoryBus::new())),
    };
    let (tx, rx) = mpsc::channel(1024);
    let registry = yunbian_devices::external::ExternalRegistry::new(std::time::Duration::from_secs(10));
    let factory = yunbian_devices::standard_drivers(bus.clone(), Some(registry.clone()));
    let rules = Arc::new(crate::rules::RuleHost::new(data_dir, bus.clone(), opts.shipping.clone(), opts.tsdb.clone()));
    let (initial_rules, initial_devices) = crate::agent::rules_and_devices(desired);
    rules.apply(initial_rules, &initial_devices);
    if let Some(b) = &broker {
        for l in listeners {
            let addr = l.bind;
            if let Err(e) = b.listen(l).await {
                // The in-agent bus (mappers, rules) keeps working; only
                // clients of this listener cannot reach it.
                tracing::error!(node, %addr, error = %e, "cannot open an edge MQTT broker listener; running without it");
            }
        }
    }
    let broker_addrs = broker.as_ref().map(|b| b.local_addrs()).unwrap_or_default();
    if !broker_addrs.is_empty() {
        tracing::info!(node, listen = ?broker_addrs, "edge MQTT broker listening");
    }
    let host = MapperHost::new(node, Some(data_dir.join("devices")), bus, factory, tx);
    let mut tasks = vec![tokio::spawn(host.clone().serve_bus_sets())];
    let app_metrics = yunbian_runtime::AppMetrics::new();
    let local_api = match opts.local_api {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().ok();
                let extra = match rules.tsdb() {
                    Some(db) => crate::data_api::router(db),
                    None => axum::Router::new(),
                }
                .merge(crate::instance_metrics::router(app_metrics.clone()));
                tasks.push(tokio::spawn(yunbian_devices::local_api::serve_tcp_listener_with(host.clone(), l, extra)));
                bound
            }
            Err(e) => {
                tracing::error!(node, %addr, error = %e, "cannot serve the local device API; running without it");
                None
            }
        },
        None => None,
    };
    // The mapper socket path must fit a sockaddr_un (108 bytes).
    let sock = data_dir.join("mapper.sock");
    match yunbian_devices::external::bind_unix(&sock) {
        Ok(l) => tasks.push(tokio::spawn(yunbian_devices::external::serve_unix_listener(host.clone(), registry, l))),
        Err(e) => {
            tracing::error!(node, path = %sock.display(), error = %e, "cannot serve the external mapper socket; external devices stay offline")
        }
    }
    Ok((
        DeviceServices { broker, broker_addrs, local_api, app_metrics, rules: rules.clone(), tasks },
        DeviceSide { host, events: rx, rules: Some(rules) },
    ))
}
