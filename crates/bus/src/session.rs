//! A client's session: what outlives its connection. No I/O; the
//! connection task drives it, `now` is passed in.
//!
//! # Outgoing messages (broker → client)
//!
//! ```text
//!  route() ──enqueue──▶ queue ──fill()──▶ inflight ──PUBACK────────────▶ done   (QoS 1)
//!            (bounded)        (≤ receive    │  └─PUBREC─▶ AwaitComp ─PUBCOMP─▶ done (QoS 2)
//!                              maximum)     └ QoS 0: written, not kept
//! ```
//!
//! `queue` holds at most `max_queued_messages`; when full, the oldest
//! queued QoS 0 message is dropped, and if there is none the new message is
//! dropped (both counted). `inflight` holds at most
//! `min(max_inflight, client's Receive Maximum)` QoS 1/2 messages, in send
//! order; on a resumed session they are all sent again first (PUBLISH with
//! DUP, or PUBREL for those past PUBREC), then the queue drains.
//!
//! # Incoming QoS 2 (client → broker)
//!
//! A QoS 2 PUBLISH is routed when first received and its packet id kept in
//! `incoming_qos2` until PUBREL: a re-sent PUBLISH with an id still there
//! is acknowledged again but not routed again (no duplicates). The set is
//! part of the session, so it survives reconnects.
//!
//! # Lifecycle
//!
//! A session is `online` while a connection owns it (`conn` holds that
//! connection's generation and a kick to end it on takeover). When its
//! connection ends it is kept for its expiry interval (0: removed at once),
//! then removed by the sweeper; a removed session is `ended` and accepts
//! nothing more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::codec::{encode, encode_publish, Ack, Packet, Properties, Protocol, Publish, QoS, SubscriptionOptions};
use crate::stats::{BrokerStats, DropReason};

/// A message as published, shared by every delivery of it.
#[derive(Debug)]
pub(crate) struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 properties to forward: no topic alias, no subscription ids;
    /// message expiry as received (decremented at delivery).
    pub properties: Properties,
    pub received: Instant,
    /// Client id of the publisher (for no-local), `None` from the agent.
    pub publisher: Option<Arc<str>>,
}

impl Msg {
    /// The remaining message expiry at `now`: `Err(())` when expired,
    /// `Ok(None)` when the message never expires.
    pub fn remaining_expiry(&self, now: Instant) -> Result<Option<u32>, ()> {
        match self.properties.message_expiry_interval {
            None => Ok(None),
            Some(e) => {
                let elapsed = now.saturating_duration_since(self.received).as_secs();
                if elapsed >= u64::from(e) {
                    Err(())
                } else {
                    Ok(Some(e - elapsed as u32))
                }
            }
        }
    }
}

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub msg: Arc<Msg>,
    /// min(message QoS, granted QoS).
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Identifiers of the subscriptions that matched (v5).
    pub sub_ids: Vec<u32>,
}

/// Where an in-flight outgoing message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// QoS 2 past PUBREC: PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug)]
pub(crate) struct Inflight {
    pub packet_id: u16,
    pub delivery: Delivery,
    pub stage: Stage,
}

/// A stored subscription of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredSub {
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

/// The connection that owns a session.
#[derive(Debug, Clone)]
pub(crate) struct ConnLink {
    pub generation: u64,
    pub kick: Arc<Notify>,
}

#[derive(Debug)]
pub(crate) struct SessionState {
    pub conn: Option<ConnLink>,
    pub generation: u64,
    pub protocol: Protocol,
    pub subscriptions: HashMap<String, StoredSub>,
    pub queue: VecDeque<Delivery>,
    pub queued_qos0: usize,
    pub inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    pub incoming_qos2: HashSet<u16>,
    /// Seconds the session outlives its connection (`u32::MAX`: never expires).
    pub expiry: u32,
    pub disconnected_at: Option<Instant>,
    /// The client's Receive Maximum.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size.
    pub max_packet_size: u32,
    pub ended: bool,
}

/// A session and the signal that wakes its connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// Notified when something was queued.
    pub wake: Notify,
    /// A connection owns the session (read without the lock by routing).
    pub online: AtomicBool,
}

impl Session {
    pub fn new(client_id: Arc<str>, protocol: Protocol) -> Session {
        Session {
            client_id,
            state: Mutex::new(SessionState {
                conn: None,
                generation: 0,
                protocol,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                queued_qos0: 0,
                inflight: VecDeque::new(),
                next_packet_id: 1,
                incoming_qos2: HashSet::new(),
                expiry: 0,
                disconnected_at: None,
                receive_maximum: u16::MAX,
                max_packet_size: u32::MAX,
                ended: false,
            }),
            wake: Notify::new(),
            online: AtomicBool::new(false),
        }
    }

    /// Locks the state; a poisoned lock (a panic elsewhere) is recovered,
    /// since every update leaves the state consistent.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a delivery (see the module docs for the bound) and wakes the
    /// connection.
    pub fn enqueue(&self, d: Delivery, max_queued: usize, stats: &BrokerStats) {
        {
            let mut st = self.lock();
            if st.ended {
                return;
            }
            if st.conn.is_none() && d.qos == QoS::AtMostOnce {
                stats.drop(DropReason::OfflineQoS0, &self.client_id);
                return;
            }
            if st.queue.len() >= max_queued {
                if st.queued_qos0 > 0 {
                    if let Some(i) = st.queue.iter().position(|q| q.qos == QoS::AtMostOnce) {
                        st.queue.remove(i);
                        st.queued_qos0 -= 1;
                    }
                    stats.drop(DropReason::QueueFullQoS0, &self.client_id);
                } else if d.qos == QoS::AtMostOnce {
                    stats.drop(DropReason::QueueFullQoS0, &self.client_id);
                    return;
                } else {
                    stats.drop(DropReason::QueueFull, &self.client_id);
                    return;
                }
            }
            if d.qos == QoS::AtMostOnce {
                st.queued_qos0 += 1;
            }
            st.queue.push_back(d);
        }
        self.wake.notify_one();
    }
}

impl SessionState {
    fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Builds the PUBLISH of a delivery, or `None` if it expired.
    fn publish_for(&self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> Option<Publish> {
        let expiry = d.msg.remaining_expiry(now).ok()?;
        let properties = if self.protocol == Protocol::V5 {
            let mut p = d.msg.properties.clone();
            p.message_expiry_interval = expiry;
            p.subscription_identifiers.clone_from(&d.sub_ids);
            p
        } else {
            Properties::default()
        };
        Some(Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: d.msg.topic.clone(),
            packet_id,
            properties,
            payload: d.msg.payload.clone(),
        })
    }

    /// Writes everything in flight again (a resumed session): PUBLISH with
    /// DUP for those awaiting PUBACK/PUBREC, PUBREL for those past PUBREC.
    pub fn resend_inflight(&mut self, out: &mut BytesMut, now: Instant) -> u64 {
        let mut n = 0;
        for f in &self.inflight {
            let res = match f.stage {
                Stage::AwaitAck => {
                    // An expired message is still re-sent: its packet id is
                    // taken until the client acknowledges it.
                    let mut p = self.publish_for(&f.delivery, Some(f.packet_id), true, now).unwrap_or_else(|| {
                        let mut p = Publish {
                            dup: true,
                            qos: f.delivery.qos,
                            retain: f.delivery.retain,
                            topic: f.delivery.msg.topic.clone(),
                            packet_id: Some(f.packet_id),
                            properties: Properties::default(),
                            payload: f.delivery.msg.payload.clone(),
                        };
                        if self.protocol == Protocol::V5 {
                            p.properties.message_expiry_interval = Some(0);
                        }
                        p
                    });
                    p.dup = true;
                    encode_publish(&p, self.protocol, out).map(|_| ())
                }
                Stage::AwaitComp => encode(&Packet::PubRel(Ack::new(f.packet_id)), self.protocol, out),
            };
            if res.is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Moves queued deliveries into flight and encodes them into `out`
    /// until `out` reaches `high_water`, the queue is empty, or the
    /// in-flight window is full. Returns the number of PUBLISH written.
    pub fn fill(
        &mut self,
        out: &mut BytesMut,
        high_water: usize,
        max_inflight: u16,
        now: Instant,
        stats: &BrokerStats,
        client_id: &str,
    ) -> u64 {
        let window = usize::from(max_inflight.min(self.receive_maximum));
        let mut written = 0;
        while out.len() < high_water {
            let Some(front) = self.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && self.inflight.len() >= window {
                break;
            }
            let Some(d) = self.queue.pop_front() else { break };
            if d.qos == QoS::AtMostOnce {
                self.queued_qos0 = self.queued_qos0.saturating_sub(1);
            }
            let packet_id = if d.qos == QoS::AtMostOnce { None } else { Some(self.alloc_packet_id()) };
            let Some(p) = self.publish_for(&d, packet_id, false, now) else {
                stats.drop(DropReason::Expired, client_id);
                continue;
            };
            let mark = out.len();
            match encode_publish(&p, self.protocol, out) {
                Ok(size) if size as u64 <= u64::from(self.max_packet_size) => {}
                _ => {
                    out.truncate(mark);
                    stats.drop(DropReason::TooLargeForClient, client_id);
                    continue;
                }
            }
            written += 1;
            if let Some(packet_id) = packet_id {
                self.inflight.push_back(Inflight { packet_id, delivery: d, stage: Stage::AwaitAck });
            }
        }
        written
    }

    /// PUBACK from the client. Returns whether it matched.
    pub fn on_puback(&mut self, packet_id: u16) -> bool {
        match self
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id && f.stage == Stage::AwaitAck && f.delivery.qos == QoS::AtLeastOnce)
        {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// PUBREC from the client: `Some(true)` to answer PUBREL, `Some(false)`
    /// when the client refused the message (v5 reason ≥ 0x80; forgotten),
    /// `None` for an unknown id (answered with PUBREL "not found").
    pub fn on_pubrec(&mut self, packet_id: u16, reason: u8) -> Option<bool> {
        let i = self.inflight.iter().position(|f| f.packet_id == packet_id && f.delivery.qos == QoS::ExactlyOnce)?;
        if reason >= 0x80 {
            self.inflight.remove(i);
            return Some(false);
        }
        if let Some(f) = self.inflight.get_mut(i) {
            f.stage = Stage::AwaitComp;
        }
        Some(true)
    }

    /// PUBCOMP from the client. Returns whether it matched.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> bool {
        match self.inflight.iter().position(|f| f.packet_id == packet_id && f.stage == Stage::AwaitComp) {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        Delivery {
            msg: Arc::new(Msg {
                topic: "t".into(),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: Properties::default(),
                received: Instant::now(),
                publisher: None,
            }),
            qos,
            retain: false,
            sub_ids: vec![],
        }
    }

    #[test]
    fn full_queue_drops_oldest_qos0_then_new_messages() {
        let stats = BrokerStats::default();
        let s = Session::new("c".into(), Protocol::V311);
        s.lock().conn = Some(ConnLink { generation: 1, kick: Arc::new(Notify::new()) });
        s.enqueue(delivery(QoS::AtMostOnce, 0), 2, &stats);
        s.enqueue(delivery(QoS::AtLeastOnce, 1), 2, &stats);
        s.enqueue(delivery(QoS::AtLeastOnce, 2), 2, &stats);
        assert_eq!(stats.dropped(DropReason::QueueFullQoS0), 1);
        s.enqueue(delivery(QoS::AtLeastOnce, 3), 2, &stats);
        assert_eq!(stats.dropped(DropReason::QueueFull), 1);
        let st = s.lock();
        let kept: Vec<u8> = st.queue.iter().map(|d| d.msg.payload[0]).collect();
        assert_eq!(kept, vec![1, 2]);
    }

    #[test]
    fn inflight_window_and_acks() {
        let stats = BrokerStats::default();
        let s = Session::new("c".into(), Protocol::V5);
        s.lock().conn = Some(ConnLink { generation: 1, kick: Arc::new(Notify::new()) });
        for i in 0..3 {
            s.enqueue(delivery(QoS::ExactlyOnce, i), 10, &stats);
        }
        let mut st = s.lock();
        st.receive_maximum = 2;
        let mut out = BytesMut::new();
        assert_eq!(st.fill(&mut out, 1 << 20, 32, Instant::now(), &stats, "c"), 2);
        assert_eq!(st.on_pubrec(1, 0), Some(true));
        assert!(!st.on_puback(1));
        assert!(st.on_pubcomp(1));
        assert_eq!(st.fill(&mut out, 1 << 20, 32, Instant::now(), &stats, "c"), 1);
        let ids: Vec<u16> = st.inflight.iter().map(|f| f.packet_id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(st.resend_inflight(&mut BytesMut::new(), Instant::now()), 2);
    }
}
