//! Broker counters: lock-free atomics updated on the hot path, read as a
//! [`BrokerStatsSnapshot`].
//!
//! Every limit hit and every message dropped increments one
//! [`DropReason`] counter and is logged at `warn` level at most once per
//! [`LOG_WINDOW`] per reason (with the running total), so a flood of drops
//! cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// At most one log line per drop reason per window.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Why a message, a connection, a subscription or a session was dropped or
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A client's queue was full: its oldest queued QoS 0 message was dropped.
    QueueFullQoS0,
    /// A client's queue was full of QoS 1/2 messages: the new one was dropped.
    QueueFull,
    /// A QoS 0 message for a disconnected session (not queued, by design).
    OfflineQoS0,
    /// The message expiry interval passed before delivery.
    Expired,
    /// The message exceeds the maximum packet size the client accepts.
    TooLargeForClient,
    /// An in-process subscription's channel was full.
    LocalSubscriberFull,
    /// A retained message was not stored (count or byte limit).
    RetainedLimit,
    /// A connection was refused: too many connections.
    MaxConnections,
    /// A stored offline session was discarded to make room for a new one.
    SessionEvicted,
    /// A subscription was refused: too many for that client.
    MaxSubscriptions,
    /// A client sent more unacknowledged QoS 2 messages than allowed.
    ReceiveMaximumExceeded,
    /// A packet larger than the maximum packet size arrived.
    PacketTooLarge,
    /// A malformed packet or protocol violation closed a connection.
    ProtocolError,
    /// A CONNECT was refused for bad credentials or a missing certificate.
    AuthFailed,
    /// A client sent nothing for 1.5 times its keep alive.
    KeepAliveTimeout,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 15] = [
        DropReason::QueueFullQoS0,
        DropReason::QueueFull,
        DropReason::OfflineQoS0,
        DropReason::Expired,
        DropReason::TooLargeForClient,
        DropReason::LocalSubscriberFull,
        DropReason::RetainedLimit,
        DropReason::MaxConnections,
        DropReason::SessionEvicted,
        DropReason::MaxSubscriptions,
        DropReason::ReceiveMaximumExceeded,
        DropReason::PacketTooLarge,
        DropReason::ProtocolError,
        DropReason::AuthFailed,
        DropReason::KeepAliveTimeout,
    ];

    /// A stable snake_case name (for metrics and logs).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFullQoS0 => "queue_full_qos0",
            DropReason::QueueFull => "queue_full",
            DropReason::OfflineQoS0 => "offline_qos0",
            DropReason::Expired => "expired",
            DropReason::TooLargeForClient => "too_large_for_client",
            DropReason::LocalSubscriberFull => "local_subscriber_full",
            DropReason::RetainedLimit => "retained_limit",
            DropReason::MaxConnections => "max_connections",
            DropReason::SessionEvicted => "session_evicted",
            DropReason::MaxSubscriptions => "max_subscriptions",
            DropReason::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            DropReason::PacketTooLarge => "packet_too_large",
            DropReason::ProtocolError => "protocol_error",
            DropReason::AuthFailed => "auth_failed",
            DropReason::KeepAliveTimeout => "keep_alive_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const REASONS: usize = DropReason::ALL.len();

/// The live counters.
#[derive(Debug)]
pub struct BrokerStats {
    started: Instant,
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    drops: [AtomicU64; REASONS],
    /// Milliseconds since `started` of the last log line, per reason
    /// (`u64::MAX`: never logged).
    last_log: [AtomicU64; REASONS],
}

impl Default for BrokerStats {
    fn default() -> Self {
        BrokerStats {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            last_log: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
        }
    }
}

impl BrokerStats {
    /// Counts one drop and logs it if this reason was not logged in the
    /// last [`LOG_WINDOW`].
    pub fn drop(&self, reason: DropReason, detail: &str) {
        self.drop_n(reason, 1, detail)
    }

    /// Counts `n` drops of one reason.
    pub fn drop_n(&self, reason: DropReason, n: u64, detail: &str) {
        let total = self.drops[reason.index()].fetch_add(n, Relaxed) + n;
        let now = self.started.elapsed().as_millis() as u64;
        let slot = &self.last_log[reason.index()];
        let last = slot.load(Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= LOG_WINDOW.as_millis() as u64;
        if due && slot.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            tracing::warn!(reason = reason.name(), total, detail, "mqtt broker dropped or refused");
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// The count for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Relaxed)
    }

    pub(crate) fn snapshot(&self) -> BrokerStatsSnapshot {
        BrokerStatsSnapshot {
            connections: self.connections.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            drops: std::array::from_fn(|i| self.drops[i].load(Relaxed)),
            sessions: 0,
            subscriptions: 0,
            retained_messages: 0,
            retained_bytes: 0,
        }
    }
}

/// A point-in-time copy of the counters and gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatsSnapshot {
    /// Connections open now (after CONNECT or still handshaking).
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// PUBLISH packets received (from sockets and [`crate::Broker::publish`]).
    pub messages_in: u64,
    /// PUBLISH packets sent to clients and messages handed to local subscribers.
    pub messages_out: u64,
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Sessions kept (connected or not).
    pub sessions: u64,
    /// Subscriptions (client and in-process).
    pub subscriptions: u64,
    /// Retained messages stored.
    pub retained_messages: u64,
    /// Bytes of retained topics and payloads stored.
    pub retained_bytes: u64,
    drops: [u64; REASONS],
}

impl BrokerStatsSnapshot {
    /// The count of drops for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Every reason with its count.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[r.index()]))
    }

    /// All drops together.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}
