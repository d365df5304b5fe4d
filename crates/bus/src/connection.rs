//! One client connection: the task that reads packets, drives the
//! session, and writes responses and deliveries.
//!
//! # States
//!
//! ```text
//! accepted ──CONNECT (within connect_timeout)──▶ authenticated ──CONNACK──▶ open ──▶ closed
//!    │                 │ refused: CONNACK with a failure code, close           │
//!    └─ garbage / timeout / not CONNECT: close                                 │
//!   open ends by: DISCONNECT from the client · EOF or I/O error · malformed    │
//!   packet or protocol error (v5: DISCONNECT with the reason) · keep alive     │
//!   (nothing received for 1.5 × keep alive) · takeover by a new connection     │
//!   with the same client id (v5: 0x8E) · broker shutdown (v5: 0x8B)  ──────────┘
//! ```
//!
//! On close the session is released (kept for its expiry interval), and
//! the will is published unless the client sent a normal DISCONNECT; a v5
//! will delay postpones it, and a reconnect within the delay cancels it.
//!
//! # Flow control
//!
//! One task, one output buffer. Responses are appended as packets are
//! handled; deliveries are pulled from the session queue only while the
//! buffer is below [`HIGH_WATER`], so a slow reader leaves its backlog in
//! its bounded session queue (where the drop policy applies), never in an
//! unbounded buffer. Reading stops while the buffer is above
//! [`HARD_LIMIT`] (a client that sends but never reads).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::{Opened, Shared, StatsAdd};
use crate::codec::{
    decode, encode, reason, Ack, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, Properties, Protocol,
    Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::config::Auth;
use crate::session::{Msg, Session};
use crate::stats::{BrokerStats, DropReason};
use crate::topic::SubscriptionFilter;

/// Deliveries are taken from the session queue while the output buffer
/// is smaller than this.
pub const HIGH_WATER: usize = 64 * 1024;
/// The socket is not read while the output buffer is larger than this.
pub const HARD_LIMIT: usize = 1024 * 1024;

/// What the listener knows about a connection.
pub(crate) struct ConnParams {
    pub peer: SocketAddr,
    pub auth: Arc<Auth>,
    /// Common name of a verified client certificate.
    pub cert_user: Option<String>,
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client: publish the will only with reason 0x04.
    ClientDisconnect { with_will: bool, session_expiry: Option<u32> },
    /// EOF or an I/O error.
    Closed,
    /// Keep alive expired.
    KeepAlive,
    /// Malformed packet or protocol error: the v5 reason code.
    Protocol(u8),
    /// A new connection took the session.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

/// Serves one connection until it ends.
pub(crate) async fn serve<S>(shared: Arc<Shared>, stream: S, params: ConnParams)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    let max = shared.limits.max_packet_size;
    let first =
        tokio::time::timeout(shared.limits.connect_timeout, read_connect(&mut rd, &mut inbuf, max, &shared.stats))
            .await;
    let connect = match first {
        Ok(Ok(c)) => c,
        Ok(Err(Some(e))) => {
            tracing::debug!(peer = %params.peer, error = %e, "mqtt: bad first packet");
            if let DecodeError::UnsupportedProtocolLevel(_) = e {
                // Answer in the v3.1.1 format every client understands.
                let _ = wr.write_all(&[0x20, 0x02, 0x00, reason::V3_UNACCEPTABLE_PROTOCOL]).await;
            } else if let DecodeError::PacketTooLarge { .. } = e {
                shared.stats.drop(DropReason::PacketTooLarge, &params.peer.to_string());
            } else {
                shared.stats.drop(DropReason::ProtocolError, &params.peer.to_string());
            }
            let _ = wr.shutdown().await;
            return;
        }
        Ok(Err(None)) | Err(_) => return,
    };
    let mut conn = match Conn::accept(shared, *connect, &params) {
        Ok(c) => c,
        Err(refusal) => {
            let _ = wr.write_all(&refusal).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let end = conn.run(&mut rd, &mut wr, inbuf).await;
    conn.finish(end, &mut wr).await;
}

/// Reads until a whole CONNECT arrived. `Err(None)`: EOF or I/O error.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    inbuf: &mut BytesMut,
    max: usize,
    stats: &BrokerStats,
) -> Result<Box<Connect>, Option<DecodeError>> {
    loop {
        match decode(inbuf, None, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(Some(DecodeError::ExpectedConnect)),
            Ok(None) => {}
            Err(e) => return Err(Some(e)),
        }
        inbuf.reserve(4096);
        match rd.read_buf(inbuf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => BrokerStats::add(&stats.bytes_in, n as u64),
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    session: Arc<Session>,
    client_id: Arc<str>,
    protocol: Protocol,
    generation: u64,
    kick: Arc<Notify>,
    will: Option<LastWill>,
    aliases: HashMap<u16, String>,
    keep_alive: Option<Duration>,
    out: BytesMut,
    /// Session expiry asked for at CONNECT (v5: 0 may not be raised at DISCONNECT).
    connect_expiry: u32,
}

fn connack(protocol: Protocol, code_v3: u8, code_v5: u8) -> BytesMut {
    let mut out = BytesMut::new();
    let code = if protocol == Protocol::V5 { code_v5 } else { code_v3 };
    let p = Packet::ConnAck(ConnAck { session_present: false, code, properties: Properties::default() });
    // A fixed-size packet: encoding cannot fail.
    let _ = encode(&p, protocol, &mut out);
    out
}

fn random_suffix() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

impl Conn {
    /// Authenticates the CONNECT and opens the session. `Err` carries the
    /// refusing CONNACK to send.
    fn accept(shared: Arc<Shared>, c: Connect, params: &ConnParams) -> Result<Conn, BytesMut> {
        let protocol = c.protocol;
        let v5 = protocol == Protocol::V5;
        let peer = params.peer.to_string();
        if c.properties.authentication_method.is_some() {
            shared.stats.drop(DropReason::AuthFailed, &peer);
            return Err(connack(protocol, reason::V3_NOT_AUTHORIZED, reason::BAD_AUTHENTICATION_METHOD));
        }
        let username = match (&params.cert_user, &*params.auth) {
            (Some(cn), _) => Some(cn.clone()),
            (None, Auth::Anonymous) => c.username.clone(),
            (None, Auth::Password(users)) => match (&c.username, &c.password) {
                (Some(u), Some(p)) if users.verify(u, p) => Some(u.clone()),
                _ => {
                    shared.stats.drop(DropReason::AuthFailed, &peer);
                    tracing::info!(peer = %params.peer, user = c.username.as_deref().unwrap_or(""), "mqtt: bad user name or password");
                    return Err(connack(protocol, reason::V3_NOT_AUTHORIZED, reason::BAD_USERNAME_OR_PASSWORD));
                }
            },
        };
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if !v5 && !c.clean_start {
                return Err(connack(protocol, reason::V3_IDENTIFIER_REJECTED, reason::CLIENT_ID_NOT_VALID));
            }
            let id = format!("yb-auto-{:016x}", random_suffix());
            if v5 {
                assigned = Some(id.clone());
            }
            id
        } else {
            c.client_id.clone()
        };
        let kick = Arc::new(Notify::new());
        let (session, present, generation) =
            match shared.open_session(&client_id, c.clean_start, protocol, kick.clone()) {
                Opened::Ok(s, present, g) => (s, present, g),
                Opened::Full => {
                    shared.stats.drop(DropReason::MaxConnections, "sessions full");
                    return Err(connack(protocol, reason::V3_SERVER_UNAVAILABLE, reason::QUOTA_EXCEEDED));
                }
            };
        let limits = &shared.limits;
        let asked_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = asked_expiry.min(limits.max_session_expiry);
        let mut out = BytesMut::with_capacity(4096);
        {
            let mut st = session.lock();
            st.expiry = expiry;
            st.receive_maximum = c.properties.receive_maximum.unwrap_or(u16::MAX);
            st.max_packet_size = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
            let mut properties = Properties::default();
            if v5 {
                properties.assigned_client_identifier = assigned;
                properties.receive_maximum = Some(limits.max_inflight.max(1));
                properties.maximum_packet_size = u32::try_from(limits.max_packet_size).ok();
                properties.topic_alias_maximum = Some(limits.max_topic_aliases);
                properties.retain_available = Some(1);
                properties.wildcard_subscription_available = Some(1);
                properties.subscription_identifier_available = Some(1);
                properties.shared_subscription_available = Some(1);
                if expiry != asked_expiry {
                    properties.session_expiry_interval = Some(expiry);
                }
            }
            let ack = Packet::ConnAck(ConnAck { session_present: present, code: reason::SUCCESS, properties });
            let _ = encode(&ack, protocol, &mut out);
            if present {
                st.resend_inflight(&mut out, Instant::now());
            }
        }
        tracing::debug!(peer = %params.peer, client = %client_id, user = username.as_deref().unwrap_or(""),
            ?protocol, session_present = present, "mqtt: client connected");
        let keep_alive = (c.keep_alive > 0).then(|| Duration::from_millis(u64::from(c.keep_alive) * 1500));
        Ok(Conn {
            client_id: session.client_id.clone(),
            shared,
            session,
            protocol,
            generation,
            kick,
            will: c.will,
            aliases: HashMap::new(),
            keep_alive,
            out,
            connect_expiry: asked_expiry,
        })
    }

    async fn run<R, W>(&mut self, rd: &mut R, wr: &mut W, mut inbuf: BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut shutdown = self.shared.shutdown.subscribe();
        if *shutdown.borrow_and_update() {
            return End::Shutdown;
        }
        let period = self.keep_alive.unwrap_or(Duration::from_secs(24 * 3600));
        let mut last_rx = Instant::now();
        let sleep = tokio::time::sleep(period);
        tokio::pin!(sleep);
        // Packets that arrived together with the CONNECT.
        if let Err(end) = self.process_input(&mut inbuf) {
            return end;
        }
        loop {
            if self.out.len() < HIGH_WATER {
                let n = self.session.lock().fill(
                    &mut self.out,
                    HIGH_WATER,
                    self.shared.limits.max_inflight,
                    Instant::now(),
                    &self.shared.stats,
                    &self.client_id,
                );
                if n > 0 {
                    StatsAdd::messages_out(&self.shared.stats, n);
                }
            }
            if inbuf.capacity() - inbuf.len() < 2048 {
                inbuf.reserve(16 * 1024);
            }
            tokio::select! {
                biased;
                _ = self.kick.notified() => return End::TakenOver,
                _ = shutdown.changed() => return End::Shutdown,
                r = wr.write(&self.out), if !self.out.is_empty() => match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.out.advance(n);
                        BrokerStats::add(&self.shared.stats.bytes_out, n as u64);
                    }
                },
                r = rd.read_buf(&mut inbuf), if self.out.len() < HARD_LIMIT => match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        BrokerStats::add(&self.shared.stats.bytes_in, n as u64);
                        last_rx = Instant::now();
                        if let Err(end) = self.process_input(&mut inbuf) {
                            return end;
                        }
                    }
                },
                _ = self.session.wake.notified(), if self.out.len() < HIGH_WATER => {}
                _ = &mut sleep, if self.keep_alive.is_some() => {
                    let deadline = last_rx + period;
                    if Instant::now() >= deadline {
                        self.shared.stats.drop(DropReason::KeepAliveTimeout, &self.client_id);
                        return End::KeepAlive;
                    }
                    sleep.as_mut().reset(deadline);
                }
            }
        }
    }

    fn process_input(&mut self, inbuf: &mut BytesMut) -> Result<(), End> {
        loop {
            match decode(inbuf, Some(self.protocol), self.shared.limits.max_packet_size) {
                Ok(None) => return Ok(()),
                Ok(Some(p)) => self.handle(p)?,
                Err(e) => {
                    let reason = if let DecodeError::PacketTooLarge { .. } = e {
                        DropReason::PacketTooLarge
                    } else {
                        DropReason::ProtocolError
                    };
                    self.shared.stats.drop(reason, &self.client_id);
                    tracing::debug!(client = %self.client_id, error = %e, "mqtt: closing on bad packet");
                    return Err(End::Protocol(e.reason_code()));
                }
            }
        }
    }

    fn send(&mut self, p: &Packet) {
        // Responses are built from decoded input: every field fits.
        let _ = encode(p, self.protocol, &mut self.out);
    }

    fn protocol_error(&self, what: &str) -> End {
        self.shared.stats.drop(DropReason::ProtocolError, &self.client_id);
        tracing::debug!(client = %self.client_id, what, "mqtt: protocol error");
        End::Protocol(reason::PROTOCOL_ERROR)
    }

    fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => {
                self.session.lock().on_puback(a.packet_id);
                Ok(())
            }
            Packet::PubRec(a) => {
                let res = self.session.lock().on_pubrec(a.packet_id, a.reason);
                match res {
                    Some(true) => self.send(&Packet::PubRel(Ack::new(a.packet_id))),
                    Some(false) => {}
                    None => {
                        let mut rel = Ack::new(a.packet_id);
                        rel.reason = reason::PACKET_ID_NOT_FOUND;
                        self.send(&Packet::PubRel(rel));
                    }
                }
                Ok(())
            }
            Packet::PubRel(a) => {
                let known = self.session.lock().incoming_qos2.remove(&a.packet_id);
                let mut comp = Ack::new(a.packet_id);
                if !known {
                    comp.reason = reason::PACKET_ID_NOT_FOUND;
                }
                self.send(&Packet::PubComp(comp));
                Ok(())
            }
            Packet::PubComp(a) => {
                self.session.lock().on_pubcomp(a.packet_id);
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => Err(End::ClientDisconnect {
                with_will: d.reason == reason::DISCONNECT_WITH_WILL,
                session_expiry: d.properties.session_expiry_interval,
            }),
            Packet::Auth(_) => Err(self.protocol_error("AUTH without enhanced authentication")),
            Packet::Connect(_) => Err(self.protocol_error("second CONNECT")),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(self.protocol_error("server-only packet from a client"))
            }
        }
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<(), End> {
        let limits = &self.shared.limits;
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias > limits.max_topic_aliases {
                self.shared.stats.drop(DropReason::ProtocolError, &self.client_id);
                return Err(End::Protocol(reason::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(self.protocol_error("unknown topic alias")),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if p.qos == QoS::ExactlyOnce {
            let Some(id) = p.packet_id else { return Err(self.protocol_error("QoS 2 without packet id")) };
            let duplicate = {
                let mut st = self.session.lock();
                if st.incoming_qos2.contains(&id) {
                    true
                } else if st.incoming_qos2.len() >= usize::from(limits.max_inflight.max(1)) {
                    drop(st);
                    self.shared.stats.drop(DropReason::ReceiveMaximumExceeded, &self.client_id);
                    return Err(End::Protocol(reason::RECEIVE_MAXIMUM_EXCEEDED));
                } else {
                    st.incoming_qos2.insert(id);
                    false
                }
            };
            if !duplicate {
                self.route(p.topic, p.payload, p.qos, p.retain, p.properties);
            }
            self.send(&Packet::PubRec(Ack::new(id)));
            return Ok(());
        }
        let ack = p.packet_id;
        self.route(p.topic, p.payload, p.qos, p.retain, p.properties);
        if let (QoS::AtLeastOnce, Some(id)) = (p.qos, ack) {
            self.send(&Packet::PubAck(Ack::new(id)));
        }
        Ok(())
    }

    fn route(&self, topic: String, payload: bytes::Bytes, qos: QoS, retain: bool, mut properties: Properties) {
        properties.subscription_identifiers.clear();
        properties.topic_alias = None;
        let msg = Msg {
            topic,
            payload,
            qos,
            retain,
            properties,
            received: Instant::now(),
            publisher: Some(self.client_id.clone()),
        };
        self.shared.route(Arc::new(msg));
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let v5 = self.protocol == Protocol::V5;
        let sub_id = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for (filter, options) in &s.filters {
            let shared_sub =
                matches!(crate::topic::parse_subscription_filter(filter), Some(SubscriptionFilter::Shared(_)));
            if shared_sub && options.no_local {
                return Err(self.protocol_error("no-local on a shared subscription"));
            }
            match self.shared.subscribe_session(&self.session, filter, *options, sub_id) {
                Some(r) => {
                    codes.push(options.qos as u8);
                    retained.extend(r);
                }
                None => codes.push(if v5 { reason::QUOTA_EXCEEDED } else { reason::V3_SUBACK_FAILURE }),
            }
        }
        self.send(&Packet::SubAck(SubAck { packet_id: s.packet_id, properties: Properties::default(), codes }));
        for d in retained {
            self.session.enqueue(d, self.shared.limits.max_queued_messages, &self.shared.stats);
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let had = self.shared.unsubscribe_session(&self.session, f);
            codes.push(if had { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        if self.protocol != Protocol::V5 {
            codes.clear();
        }
        self.send(&Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, properties: Properties::default(), codes }));
    }

    /// Says goodbye (v5), flushes, releases the session, handles the will.
    async fn finish<W: AsyncWrite + Unpin>(mut self, end: End, wr: &mut W) {
        tracing::debug!(client = %self.client_id, ?end, "mqtt: connection ended");
        let goodbye = match end {
            End::Protocol(r) => Some(r),
            End::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            End::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::ClientDisconnect { .. } | End::Closed => None,
        };
        if let (Some(r), Protocol::V5) = (goodbye, self.protocol) {
            self.send(&Packet::Disconnect(Disconnect { reason: r, properties: Properties::default() }));
        }
        if !matches!(end, End::Closed) && !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;

        if let End::ClientDisconnect { session_expiry: Some(e), .. } = end {
            // v5: a session that expired at once cannot be revived at DISCONNECT.
            if self.connect_expiry != 0 || e == 0 {
                self.session.lock().expiry = e.min(self.shared.limits.max_session_expiry);
            }
        }
        let expiry = self.session.lock().expiry;
        let generation = self.generation;
        self.shared.close_session(&self.session, generation);
        let publish_will = match end {
            End::ClientDisconnect { with_will, .. } => with_will,
            End::Shutdown => false,
            _ => true,
        };
        let Some(will) = self.will.take().filter(|_| publish_will) else { return };
        let delay = will.properties.will_delay_interval.unwrap_or(0).min(expiry);
        let shared = self.shared.clone();
        if delay == 0 {
            publish_will_now(&shared, will);
            return;
        }
        let session = self.session.clone();
        let guard = shared.task_guard();
        let mut shutdown = shared.shutdown.subscribe();
        if *shutdown.borrow_and_update() {
            return;
        }
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                _ = shutdown.changed() => return,
            }
            let reconnected = {
                let st = session.lock();
                !st.ended && st.generation != generation
            };
            if !reconnected {
                publish_will_now(&shared, will);
            }
        });
    }
}

fn publish_will_now(shared: &Shared, will: LastWill) {
    let mut properties = will.properties;
    properties.will_delay_interval = None;
    let msg = Msg {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        properties,
        received: Instant::now(),
        publisher: None,
    };
    shared.route(Arc::new(msg));
}
