//! `yunbian-bus`: the MQTT broker embedded in the edge agent.
//!
//! Devices and workloads on a node talk MQTT 3.1.1 or MQTT 5 to it over
//! TCP or TLS; the agent itself publishes and subscribes in-process through
//! [`Broker`] (no socket). Design, limits and what of MQTT 5 is absent:
//! `docs/design/005-edge-bus.md`.
//!
//! Modules:
//! - [`codec`]: sans-IO packet encoder/decoder (fed by the network; fuzzed).
//! - [`topic`]: topic names, filters, matching, shared subscriptions.
//! - [`config`]: listeners, TLS, password hashes, [`Limits`].
//! - [`stats`]: counters and drop reasons.
//! - `session`, `router`, `broker`: sessions (queues, in-flight windows),
//!   the subscription trie, retained messages, routing.
//! - `connection`, `listener`: the tasks that own sockets.
//! - [`fuzzing`]: the per-input check shared by the fuzz target and tests.
//!
//! **Invariants:** a bad peer gets a closed connection, never a panic; a
//! slow subscriber never blocks a publisher or another subscriber (its
//! queue is bounded and drops are counted); every limit is in [`Limits`]
//! and every hit is counted in [`BrokerStatsSnapshot`].

#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
pub mod fuzzing;
pub mod stats;
pub mod topic;

mod broker;
mod connection;
mod listener;
mod router;
mod session;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use codec::{Properties, Protocol, QoS};
pub use config::{Auth, BrokerConfig, Limits, ListenerConfig, PasswordHash, TlsConfig, Users};
pub use stats::{BrokerStatsSnapshot, DropReason};

use broker::Shared;

/// Errors of the broker's API.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A listener could not bind its address.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TLS material could not be loaded (bad PEM, key/cert mismatch, …).
    #[error("tls: {0}")]
    Tls(String),
    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A topic name is empty, too long, or has wildcards.
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    /// A topic filter is malformed.
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
    /// The broker is shutting down.
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The system random generator failed.
    #[error("system random generator failed")]
    Random,
}

/// A message delivered to an in-process subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name it was published to.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Delivery QoS (in-process subscriptions are granted QoS 2).
    pub qos: QoS,
    /// Set for retained messages sent at subscribe time.
    pub retain: bool,
    /// MQTT 5 properties as published (message expiry decremented).
    pub properties: Properties,
}

/// The embedded broker. Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    addrs: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

impl Broker {
    /// Binds every listener and starts serving.
    pub async fn start(cfg: BrokerConfig) -> Result<Broker, BusError> {
        if cfg.limits.max_packet_size < 16 || cfg.limits.max_queued_messages == 0 || cfg.limits.max_inflight == 0 {
            return Err(BusError::Config(
                "limits: max_packet_size >= 16, max_queued_messages >= 1, max_inflight >= 1".into(),
            ));
        }
        let shared = Shared::new(cfg.limits);
        let mut addrs = Vec::with_capacity(cfg.listeners.len());
        for l in cfg.listeners {
            match listener::start(shared.clone(), l).await {
                Ok(a) => addrs.push(a),
                Err(e) => {
                    shared.shutdown.send_replace(true);
                    return Err(e);
                }
            }
        }
        // Session expiry sweeper.
        let sweeper = shared.clone();
        let guard = shared.task_guard();
        // Subscribed before the task runs, so a shutdown that comes first is seen.
        let mut shutdown = sweeper.shutdown.subscribe();
        tokio::spawn(async move {
            let _guard = guard;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if *shutdown.borrow_and_update() {
                    return;
                }
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = tick.tick() => sweeper.sweep_sessions(tokio::time::Instant::now()),
                }
            }
        });
        Ok(Broker { shared, addrs: Arc::new(std::sync::Mutex::new(addrs)) })
    }

    /// Binds one more listener (e.g. once in-process subscribers are in
    /// place, so no client publishes before they listen).
    pub async fn listen(&self, l: ListenerConfig) -> Result<SocketAddr, BusError> {
        let a = listener::start(self.shared.clone(), l).await?;
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).push(a);
        Ok(a)
    }

    /// The addresses the listeners are bound to, in configuration order
    /// (with the real port where port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes a message from inside the agent. Never blocks: a
    /// subscriber whose queue is full loses it (counted).
    pub fn publish(&self, topic: &str, payload: Bytes, qos: QoS, retain: bool) -> Result<(), BusError> {
        self.shared.publish_local(topic, payload, qos, retain, Properties::default())
    }

    /// [`Broker::publish`] with MQTT 5 properties (forwarded to v5
    /// subscribers; topic alias and subscription identifiers are ignored).
    pub fn publish_with_properties(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
    ) -> Result<(), BusError> {
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        self.shared.publish_local(topic, payload, qos, retain, properties)
    }

    /// Subscribes in-process. At most `capacity` messages wait in the
    /// subscription; past that, new ones are dropped (counted as
    /// [`DropReason::LocalSubscriberFull`]). Retained messages matching
    /// the filter are delivered first. Dropping the subscription
    /// unsubscribes.
    pub fn subscribe(&self, filter: &str, capacity: usize) -> Result<LocalSubscription, BusError> {
        let (id, rx) = self.shared.subscribe_local(filter, capacity)?;
        Ok(LocalSubscription { rx, id, filter: filter.to_owned(), shared: Arc::downgrade(&self.shared) })
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> BrokerStatsSnapshot {
        self.shared.snapshot()
    }

    /// Stops accepting, disconnects every client (v5: reason 0x8B), ends
    /// in-process subscriptions (`recv` returns `None`), and waits up to
    /// five seconds for every task to end.
    pub async fn shutdown(self) {
        self.shared.shutdown.send_replace(true);
        self.shared.clear_router();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.shared.tasks_ended()).await;
    }
}

/// An in-process subscription (see [`Broker::subscribe`]).
#[derive(Debug)]
pub struct LocalSubscription {
    rx: mpsc::Receiver<Message>,
    id: u64,
    filter: String,
    shared: Weak<Shared>,
}

impl LocalSubscription {
    /// The next message; `None` once the broker has shut down.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// The filter subscribed to.
    pub fn filter(&self) -> &str {
        &self.filter
    }
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.unsubscribe_local(self.id, &self.filter);
        }
    }
}
