//! Latency measurement: round trips and loss to the cloud and to peers
//! (docs/design/018-latency-and-peer-health.md).
//!
//! # What is measured
//!
//! - **Cloud**: on the agent's own WebSocket session. Every probe period the
//!   connection task sends a WebSocket Ping whose payload is
//!   [`PING_MAGIC`] followed by a big-endian sequence number
//!   ([`NetworkMonitor::ping_payload`]); the cloud's WebSocket layer echoes
//!   it in a Pong, and [`NetworkMonitor::pong`] turns the echo into a round
//!   trip. A ping without its pong within [`answer_window`] (or outstanding
//!   when the connection ends) counts as lost.
//! - **Peers**: [`PeerProber`] sends `GET /v1/probe` to each target's peer
//!   server (the mTLS P2P server, [`crate::p2p`]) on a kept-alive
//!   connection, so the time is one request/response round trip, not TCP
//!   and TLS set-up. Targets come from the cloud
//!   (`GET /v1/nodes/{me}/probe-targets`): the members of the node's
//!   groups (at most 32 per group) and a rotating sample of 4 other nodes;
//!   whatever the cloud answers, at most [`MAX_PROBES_PER_ROUND`] are probed
//!   per period.
//!
//! # Estimates
//!
//! [`RttEstimator`] keeps a smoothed round trip (EWMA, weight
//! [`EWMA_WEIGHT`] on the newest sample, the first sample taken as is), the
//! outcome of the last [`LOSS_WINDOW`] probes (loss = lost / probes) and
//! the time of the last answer. Sans-IO: `now` comes in; the tests drive
//! it with made-up instants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use yunbian_api::{LinkQuality, NetworkStatus};

use crate::artifacts::CloudSource;

/// Default probe period (cloud pings and peer probes).
pub const DEFAULT_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Weight of the newest sample in the smoothed round trip.
pub const EWMA_WEIGHT: f64 = 0.3;

/// Probes whose outcome makes up the loss figure.
pub const LOSS_WINDOW: usize = 20;

/// Peers probed per period at most, whatever the targets.
pub const MAX_PROBES_PER_ROUND: usize = 64;

/// First bytes of the agent's RTT pings (other pings are not ours).
pub const PING_MAGIC: &[u8; 4] = b"ybrt";

/// Pings kept waiting for their pong at most.
const MAX_OUTSTANDING: usize = 64;

/// How often the probe targets are asked for again.
const TARGETS_EVERY: Duration = Duration::from_secs(15);

/// The longest a ping or probe may wait for its answer before it counts
/// as lost, for a probe period `every`: two periods, at least 3 s.
pub fn answer_window(every: Duration) -> Duration {
    (every * 2).max(Duration::from_secs(3))
}

// ------------------------------------------------------------ estimator

/// Smoothed round trip and recent loss of one path.
#[derive(Debug, Clone, Default)]
pub struct RttEstimator {
    srtt_ms: Option<f64>,
    outcomes: VecDeque<bool>,
    last_answer: Option<Instant>,
}

impl RttEstimator {
    fn record(&mut self, ok: bool) {
        if self.outcomes.len() == LOSS_WINDOW {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(ok);
    }

    /// A probe answered after `rtt`, at `now`.
    pub fn answered(&mut self, rtt: Duration, now: Instant) {
        let ms = rtt.as_secs_f64() * 1000.0;
        self.srtt_ms = Some(match self.srtt_ms {
            Some(s) => s + EWMA_WEIGHT * (ms - s),
            None => ms,
        });
        self.last_answer = Some(now);
        self.record(true);
    }

    /// A probe got no answer.
    pub fn lost(&mut self) {
        self.record(false);
    }

    /// Smoothed round trip in milliseconds (none before the first answer).
    pub fn srtt_ms(&self) -> Option<f64> {
        self.srtt_ms
    }

    /// The figures as reported at `now`.
    pub fn quality(&self, now: Instant) -> LinkQuality {
        let lost = self.outcomes.iter().filter(|ok| !**ok).count();
        let samples = self.outcomes.len();
        LinkQuality {
            rtt_ms: self.srtt_ms.map(|r| (r * 100.0).round() / 100.0),
            loss: if samples == 0 { 0.0 } else { lost as f64 / samples as f64 },
            samples: samples as u32,
            last_seen_secs: self.last_answer.map(|t| now.saturating_duration_since(t).as_secs()),
        }
    }
}

// ------------------------------------------------------------ cloud pings

/// The cloud path: pings waiting for their pong, and the estimate.
#[derive(Debug, Default)]
struct CloudPings {
    next_seq: u64,
    outstanding: VecDeque<(u64, Instant)>,
    rtt: RttEstimator,
}

impl CloudPings {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(_, sent)) = self.outstanding.front() {
            if now.saturating_duration_since(sent) < window {
                break;
            }
            self.outstanding.pop_front();
            self.rtt.lost();
        }
    }
}

/// What the agent measured, shared by the connection task (cloud pings),
/// the peer prober and the heartbeat.
#[derive(Debug)]
pub struct NetworkMonitor {
    every: Duration,
    cloud: Mutex<CloudPings>,
    peers: Mutex<BTreeMap<String, RttEstimator>>,
    peer_addr: Mutex<String>,
}

impl Default for NetworkMonitor {
    fn default() -> Self {
        NetworkMonitor::new(DEFAULT_PROBE_EVERY)
    }
}

impl NetworkMonitor {
    /// A monitor probing every `every`.
    pub fn new(every: Duration) -> NetworkMonitor {
        NetworkMonitor {
            every: every.max(Duration::from_millis(100)),
            cloud: Mutex::new(CloudPings::default()),
            peers: Mutex::new(BTreeMap::new()),
            peer_addr: Mutex::new(String::new()),
        }
    }

    /// The probe period.
    pub fn every(&self) -> Duration {
        self.every
    }

    fn cloud(&self) -> std::sync::MutexGuard<'_, CloudPings> {
        self.cloud.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RttEstimator>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The payload of the next cloud ping, sent at `now`.
    pub fn ping_payload(&self, now: Instant) -> Vec<u8> {
        let mut c = self.cloud();
        c.expire(now, answer_window(self.every));
        let seq = c.next_seq;
        c.next_seq += 1;
        if c.outstanding.len() == MAX_OUTSTANDING {
            c.outstanding.pop_front();
            c.rtt.lost();
        }
        c.outstanding.push_back((seq, now));
        let mut p = PING_MAGIC.to_vec();
        p.extend_from_slice(&seq.to_be_bytes());
        p
    }

    /// A pong arrived at `now`; true when it answered one of our pings.
    pub fn pong(&self, payload: &[u8], now: Instant) -> bool {
        let Some(seq) = payload
            .strip_prefix(PING_MAGIC.as_slice())
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_be_bytes)
        else {
            return false;
        };
        let mut c = self.cloud();
        let Some(i) = c.outstanding.iter().position(|(s, _)| *s == seq) else { return false };
        // Pongs come back in order: pings sent before this one were lost.
        for _ in 0..i {
            c.outstanding.pop_front();
            c.rtt.lost();
        }
        let Some((_, sent)) = c.outstanding.pop_front() else { return false };
        c.rtt.answered(now.saturating_duration_since(sent), now);
        true
    }

    /// The connection ended: pings still waiting are lost.
    pub fn cloud_disconnected(&self) {
        let mut c = self.cloud();
        while c.outstanding.pop_front().is_some() {
            c.rtt.lost();
        }
    }

    /// Peer `node` answered a probe after `rtt`.
    pub fn peer_answered(&self, node: &str, rtt: Duration, now: Instant) {
        self.peers().entry(node.to_string()).or_default().answered(rtt, now);
    }

    /// Peer `node` did not answer a probe.
    pub fn peer_lost(&self, node: &str) {
        self.peers().entry(node.to_string()).or_default().lost();
    }

    /// Forgets peers that are no longer targets.
    pub fn retain_peers(&self, keep: &[String]) {
        self.peers().retain(|n, _| keep.contains(n));
    }

    /// Sets where peers reach this node's peer server (`host:port`, empty
    /// host: the address the cloud sees).
    pub fn set_peer_addr(&self, addr: String) {
        *self.peer_addr.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// Where peers reach this node; empty when it serves none.
    pub fn peer_addr(&self) -> String {
        self.peer_addr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The report for the heartbeat.
    pub fn snapshot(&self, now: Instant) -> NetworkStatus {
        let cloud = {
            let mut c = self.cloud();
            c.expire(now, answer_window(self.every));
            c.rtt.quality(now)
        };
        let peers = self.peers().iter().map(|(n, e)| (n.clone(), e.quality(now))).collect();
        NetworkStatus { cloud, peers }
    }
}

// ------------------------------------------------------------ peer probes

/// A node to probe, as the cloud names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTarget {
    /// Node name (the CN its peer server presents).
    pub node: String,
    /// `host:port` of its peer server.
    pub addr: String,
}

/// The cloud's answer to `GET /v1/nodes/{me}/probe-targets`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeTargets {
    /// Nodes to probe.
    pub targets: Vec<ProbeTarget>,
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

/// A kept-alive connection to one peer.
struct ProbeConn {
    addr: String,
    sender: Sender,
}

/// Where the prober's TLS comes from (read again after a renewal).
pub type ClientTls = Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>;

/// Probes peers over their mTLS peer server, keeping one connection per peer.
pub struct PeerProber {
    tls: ClientTls,
    monitor: Arc<NetworkMonitor>,
    timeout: Duration,
    conns: HashMap<String, ProbeConn>,
}

impl PeerProber {
    /// A prober recording into `monitor`; a probe waits `timeout` at most.
    pub fn new(tls: ClientTls, monitor: Arc<NetworkMonitor>, timeout: Duration) -> PeerProber {
        PeerProber { tls, monitor, timeout, conns: HashMap::new() }
    }

    /// A prober with the node identity in `data_dir`.
    pub fn from_data_dir(data_dir: &Path, monitor: Arc<NetworkMonitor>) -> anyhow::Result<PeerProber> {
        let tls = crate::p2p::reloading_client_tls(data_dir)?;
        let timeout = answer_window(monitor.every());
        Ok(PeerProber::new(tls, monitor, timeout))
    }

    /// Probes every target once (the first [`MAX_PROBES_PER_ROUND`]), all
    /// at once, and records the outcomes; forgets the others.
    pub async fn round(&mut self, targets: &[ProbeTarget]) {
        let targets = &targets[..targets.len().min(MAX_PROBES_PER_ROUND)];
        let names: Vec<String> = targets.iter().map(|t| t.node.clone()).collect();
        self.conns.retain(|n, _| names.contains(n));
        self.monitor.retain_peers(&names);
        let probes = targets.iter().map(|t| {
            let conn = self.conns.remove(&t.node).filter(|c| c.addr == t.addr && !c.sender.is_closed());
            let tls = (self.tls)();
            let timeout = self.timeout;
            async move {
                let r = tokio::time::timeout(timeout, probe(tls, t, conn)).await;
                let r = r.unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())));
                (t, r)
            }
        });
        let results = futures_util::future::join_all(probes).await;
        let now = Instant::now();
        for (t, r) in results {
            match r {
                Ok((rtt, conn)) => {
                    self.monitor.peer_answered(&t.node, rtt, now);
                    self.conns.insert(t.node.clone(), conn);
                }
                Err(e) => {
                    tracing::debug!(peer = %t.node, addr = %t.addr, error = %e, "probe failed");
                    self.monitor.peer_lost(&t.node);
                }
            }
        }
    }
}

/// Connects to `t` (TCP, TLS naming the node, HTTP/1.1).
async fn connect(tls: Arc<rustls::ClientConfig>, t: &ProbeTarget) -> Result<ProbeConn, String> {
    let name = ServerName::try_from(t.node.clone()).map_err(|e| format!("node name {}: {e}", t.node))?;
    let tcp = tokio::net::TcpStream::connect(t.addr.as_str()).await.map_err(|e| format!("connect {}: {e}", t.addr))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {}", t.node, crate::http::chain(&e)))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake: {}", crate::http::chain(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(ProbeConn { addr: t.addr.clone(), sender })
}

/// One round trip to `t`, over `conn` if it is still open, else over a new
/// connection (whose set-up is not timed).
async fn probe(
    tls: Arc<rustls::ClientConfig>,
    t: &ProbeTarget,
    conn: Option<ProbeConn>,
) -> Result<(Duration, ProbeConn), String> {
    let mut conn = match conn {
        Some(c) => c,
        None => connect(tls, t).await?,
    };
    conn.sender.ready().await.map_err(|e| format!("connection: {}", crate::http::chain(&e)))?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri("/v1/probe")
        .header("host", t.addr.as_str())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    let resp = conn.sender.send_request(req).await.map_err(|e| format!("request: {}", crate::http::chain(&e)))?;
    let status = resp.status().as_u16();
    // The body is a few bytes; reading it keeps the connection reusable.
    use http_body_util::BodyExt;
    let _ = resp.into_body().collect().await.map_err(|e| format!("read: {}", crate::http::chain(&e)))?;
    let rtt = sent.elapsed();
    if status != 200 {
        return Err(format!("probe answered {status}"));
    }
    Ok((rtt, conn))
}

/// Runs the prober of node `me` until aborted: asks the cloud for targets
/// every 15 s (every 5 s while it has none), probes them every period.
pub async fn run_prober(me: String, cloud: Arc<CloudSource>, mut prober: PeerProber) {
    let every = prober.monitor.every();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut targets: Vec<ProbeTarget> = Vec::new();
    let mut asked: Option<Instant> = None;
    loop {
        tick.tick().await;
        let due = match asked {
            None => true,
            Some(t) if targets.is_empty() => t.elapsed() >= Duration::from_secs(5),
            Some(t) => t.elapsed() >= TARGETS_EVERY,
        };
        if due {
            asked = Some(Instant::now());
            match fetch_targets(&cloud, &me).await {
                Ok(t) => targets = t,
                // Keep probing the last targets: peers matter most when
                // the cloud is out of reach.
                Err(e) => tracing::debug!(node = %me, error = %e, "probe targets"),
            }
        }
        prober.round(&targets).await;
    }
}

/// Asks the cloud which peers `me` probes.
pub async fn fetch_targets(cloud: &CloudSource, me: &str) -> Result<Vec<ProbeTarget>, String> {
    let (status, body) = cloud.call("GET", &format!("/v1/nodes/{me}/probe-targets"), None).await?;
    if status != 200 {
        return Err(crate::http::error_message(status, &body));
    }
    let t: ProbeTargets = serde_json::from_slice(&body).map_err(|e| format!("probe targets: {e}"))?;
    Ok(t.targets.into_iter().filter(|t| t.node != me).take(MAX_PROBES_PER_ROUND).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_sample_is_taken_as_is_then_smoothed() {
        let t0 = Instant::now();
        let mut e = RttEstimator::default();
        assert_eq!(e.quality(t0), LinkQuality::default());
        e.answered(ms(100), t0);
        assert_eq!(e.srtt_ms(), Some(100.0));
        e.answered(ms(200), t0);
        assert!((e.srtt_ms().expect("srtt") - 130.0).abs() < 1e-9);
        // Converges on a new level.
        for _ in 0..40 {
            e.answered(ms(200), t0);
        }
        assert!((e.srtt_ms().expect("srtt") - 200.0).abs() < 0.1);
    }

    #[test]
    fn loss_counts_the_last_window_of_probes_only() {
        let t0 = Instant::now();
        let mut e = RttEstimator::default();
        e.answered(ms(10), t0);
        e.lost();
        e.lost();
        e.answered(ms(10), t0);
        let q = e.quality(t0 + Duration::from_secs(7));
        assert_eq!(q.samples, 4);
        assert!((q.loss - 0.5).abs() < 1e-9);
        assert_eq!(q.last_seen_secs, Some(7));
        for _ in 0..LOSS_WINDOW {
            e.answered(ms(10), t0);
        }
        let q = e.quality(t0);
        assert_eq!(q.samples as usize, LOSS_WINDOW);
        assert_eq!(q.loss, 0.0);
    }

    #[test]
    fn a_pong_gives_the_round_trip_of_its_ping() {
        let m = NetworkMonitor::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let p = m.ping_payload(t0);
        assert!(m.pong(&p, t0 + ms(40)));
        let s = m.snapshot(t0 + ms(40));
        assert_eq!(s.cloud.rtt_ms, Some(40.0));
        assert_eq!(s.cloud.samples, 1);
        assert_eq!(s.cloud.loss, 0.0);
        // The same pong twice, an empty one and a foreign one are ignored.
        assert!(!m.pong(&p, t0 + ms(50)));
        assert!(!m.pong(&[], t0 + ms(50)));
        assert!(!m.pong(b"ybrtxx", t0 + ms(50)));
        assert_eq!(m.snapshot(t0 + ms(50)).cloud.samples, 1);
    }

    #[test]
    fn pings_without_pong_count_as_lost() {
        let m = NetworkMonitor::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let first = m.ping_payload(t0);
        let second = m.ping_payload(t0 + ms(2000));
        // The second answered: the first, sent before it, is lost.
        assert!(m.pong(&second, t0 + ms(2010)));
        assert!(!m.pong(&first, t0 + ms(2020)));
        let s = m.snapshot(t0 + ms(2020));
        assert_eq!(s.cloud.samples, 2);
        assert!((s.cloud.loss - 0.5).abs() < 1e-9);
        // Unanswered past the window.
        m.ping_payload(t0 + ms(4000));
        let s = m.snapshot(t0 + ms(4000) + answer_window(Duration::from_secs(2)));
        assert_eq!(s.cloud.samples, 3);
        // Outstanding at a disconnect.
        m.ping_payload(t0 + ms(9000));
        m.cloud_disconnected();
        assert_eq!(m.snapshot(t0 + ms(9000)).cloud.samples, 4);
    }

    #[test]
    fn peers_that_are_no_longer_targets_are_forgotten() {
        let m = NetworkMonitor::default();
        let t0 = Instant::now();
        m.peer_answered("a", ms(5), t0);
        m.peer_lost("b");
        assert_eq!(m.snapshot(t0).peers.len(), 2);
        m.retain_peers(&["a".to_string()]);
        let s = m.snapshot(t0);
        assert_eq!(s.peers.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(s.peers["a"].rtt_ms, Some(5.0));
    }
}
