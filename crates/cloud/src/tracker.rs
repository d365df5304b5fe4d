//! The P2P tracker and the cloud's chunk egress limits
//! (docs/design/015-p2p-distribution.md).
//!
//! Edges serve the artifact chunks they hold to each other over mTLS; the
//! cloud only tells a node which peers hold a chunk, and serves the chunk
//! itself when no peer can.
//!
//! # Routes (node client certificate, [`ArtifactReader::Node`])
//!
//! - `POST /v1/p2p/announce` `{addr, site, chunks, removed, full}`: what the
//!   node can serve and where. `full: true` replaces the node's set;
//!   otherwise `chunks` are added and `removed` dropped (a delta). A delta
//!   from a node this replica holds no full set for answers 409, and the
//!   node sends its full set. An `addr` whose host is empty or unspecified
//!   (`:7444`, `0.0.0.0:7444`) gets the connection's source address.
//! - `GET /v1/p2p/peers/{sha256}` → `{peers: [{node, addr, site}]}`, best
//!   first: peers on the asker's (non-empty) site, then the others; within
//!   a tier the order is a hash of (asker, chunk, peer), so askers spread
//!   over holders. The asker, peers not re-announced within
//!   [`TrackerConfig::entry_ttl`], and peers reported bad recently are left
//!   out; at most [`MAX_PEERS`].
//! - `POST /v1/p2p/report` `{peer, chunk, problem: corrupt|unreachable}`:
//!   a `corrupt` peer is left out for that chunk for
//!   [`TrackerConfig::corrupt_ttl`]; an `unreachable` one for every chunk
//!   for [`TrackerConfig::unreachable_ttl`]. Both are counted per peer.
//!   A peer that never announced to this replica answers 404.
//! - `GET /v1/p2p/status` (admin token): nodes, chunk holders, report
//!   counters and the cloud pull limiter, as JSON.
//!
//! # Cloud pulls
//!
//! `GET /v1/chunks/{sha256}` by a node goes through [`Tracker::admit_cloud_pull`]:
//!
//! - **One copy per site** ([`TrackerConfig::copy_hold`], 10 s): while the
//!   chunk is on its way from the cloud to another node of the asker's site,
//!   or reached it less than `copy_hold` ago, and the tracker would offer
//!   that node, the answer is 429 with `Retry-After: 1` naming it: it will
//!   announce the chunk and serve it.
//! - **Slots per site**: at most [`TrackerConfig::cloud_pulls_per_site`]
//!   (default 2) chunk downloads from the cloud run at once per site (the
//!   site the node announced); beyond that, 429 with `Retry-After`. A node
//!   that announced no site (in no group) or never announced (P2P off)
//!   counts alone (`node:<name>`): it has nobody to share a copy with, so a
//!   limit shared by all such nodes would only queue them behind each other.
//!
//! Either way the edge fetches other chunks and asks the tracker again
//! later. The bytes of admitted pulls are paced by one token bucket shared
//! by all node pulls ([`TrackerConfig::egress_bytes_per_sec`], default
//! unlimited). Admin reads (exports) are neither limited nor counted.
//!
//! # State
//!
//! Everything here is in memory and **per replica**: with several cloud
//! replicas each keeps its own peer table (from the announces it received)
//! and its own limits. A node announces to the replica its cloud URL list
//! reaches first, and re-announces in full when a replica does not know it
//! (409), so a failover rebuilds the table within one announce period.
//! Nothing is written to the store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use yunbian_api::ApiErrorBody;
use yunbian_artifacts::Digest;

use crate::api::{Admin, ApiError, ApiState, ArtifactReader, Peer};

/// Most peers returned for one chunk.
pub const MAX_PEERS: usize = 8;

/// Most chunks one node may announce.
pub const MAX_CHUNKS_PER_NODE: usize = 200_000;

/// Reports kept for the status page.
const RECENT_REPORTS: usize = 100;

/// Slice of a paced chunk response.
const EGRESS_SLICE: usize = 64 << 10;

/// Settings of the tracker and the cloud's chunk egress.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerConfig {
    /// A node's announced chunks are forgotten when it has not announced
    /// for this long (default 5 min; edges announce every 60 s).
    pub entry_ttl: Duration,
    /// A peer reported to have served a corrupt chunk is not offered for
    /// that chunk for this long (default 15 min).
    pub corrupt_ttl: Duration,
    /// A peer reported unreachable is not offered at all for this long
    /// (default 1 min).
    pub unreachable_ttl: Duration,
    /// Bytes per second the cloud sends to nodes for chunks, all together
    /// (`None`: unlimited).
    pub egress_bytes_per_sec: Option<u64>,
    /// Chunk downloads from the cloud at once per site (`None`: unlimited).
    pub cloud_pulls_per_site: Option<usize>,
    /// Chunk downloads from the cloud at once for all nodes together
    /// (`None`: unlimited). Each holds its chunk (up to 4 MiB) in memory
    /// while it is paced, so this bounds that memory however many sites
    /// (or nodes in no site, which count alone) pull at once.
    pub cloud_pulls_total: Option<usize>,
    /// `Retry-After` of a refused cloud pull.
    pub busy_retry_after: Duration,
    /// One copy per site: while a chunk is on its way from the cloud to a
    /// node of a site, or arrived there less than this long ago, other
    /// nodes of that site asking the cloud for it are told to wait for that
    /// node (429, `Retry-After: 1`) instead of being served another copy.
    /// The holder must announce it within this time (edges announce every
    /// 2 s while they pull). `Duration::ZERO` turns it off.
    pub copy_hold: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            entry_ttl: Duration::from_secs(300),
            corrupt_ttl: Duration::from_secs(900),
            unreachable_ttl: Duration::from_secs(60),
            egress_bytes_per_sec: None,
            // Measured: without a limit, nodes pulling together all take
            // the same chunks from the cloud (docs/design/015).
            cloud_pulls_per_site: Some(2),
            // 1 GiB of chunk buffers at most.
            cloud_pulls_total: Some(256),
            busy_retry_after: Duration::from_secs(2),
            copy_hold: Duration::from_secs(10),
        }
    }
}

// ------------------------------------------------------------ peer table

/// A peer that holds a chunk, as the tracker offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOffer {
    /// Node name (the CN its peer server's certificate must carry).
    pub node: String,
    /// `host:port` of its peer server.
    pub addr: String,
    /// Its site (`""`: none).
    pub site: String,
}

/// What a reporter says about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Problem {
    /// The bytes did not hash to the chunk's digest.
    Corrupt,
    /// The peer could not be reached or answered with an error.
    Unreachable,
}

/// Why an announce was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// A delta came for a node with no full announce on this replica.
    #[error("this cloud replica has no full announce from node {0}; send the full set")]
    NeedFull(String),
    /// The node would hold more than [`MAX_CHUNKS_PER_NODE`] chunks.
    #[error("node {node} would announce {count} chunks; at most {MAX_CHUNKS_PER_NODE}")]
    TooMany {
        /// The node.
        node: String,
        /// Chunks it would hold.
        count: usize,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct ReportCounts {
    corrupt: u64,
    unreachable: u64,
}

#[derive(Debug)]
struct NodeEntry {
    addr: String,
    site: String,
    last_seen: Instant,
    chunks: HashSet<Digest>,
}

#[derive(Debug, Clone)]
struct Report {
    at: Instant,
    reporter: String,
    peer: String,
    chunk: Digest,
    problem: Problem,
}

/// Who holds which chunk, and who was reported bad: the tracker's state,
/// without I/O and with `now` passed in, so tests drive the clock.
#[derive(Debug)]
pub struct PeerTable {
    cfg: TrackerConfig,
    nodes: HashMap<String, NodeEntry>,
    holders: HashMap<Digest, HashSet<String>>,
    /// (peer, chunk) → not offered until.
    corrupt: HashMap<(String, Digest), Instant>,
    /// peer → not offered until.
    unreachable: HashMap<String, Instant>,
    counts: BTreeMap<String, ReportCounts>,
    recent: VecDeque<Report>,
    last_purge: Option<Instant>,
}

impl PeerTable {
    /// An empty table.
    pub fn new(cfg: TrackerConfig) -> PeerTable {
        PeerTable {
            cfg,
            nodes: HashMap::new(),
            holders: HashMap::new(),
            corrupt: HashMap::new(),
            unreachable: HashMap::new(),
            counts: BTreeMap::new(),
            recent: VecDeque::new(),
            last_purge: None,
        }
    }

    /// Records an announce from `node`; returns how many chunks it holds.
    #[allow(clippy::too_many_arguments)]
    pub fn announce(
        &mut self,
        node: &str,
        addr: &str,
        site: &str,
        full: bool,
        chunks: &[Digest],
        removed: &[Digest],
        now: Instant,
    ) -> Result<usize, AnnounceError> {
        self.purge(now);
        let known =
            self.nodes.get(node).is_some_and(|e| now.saturating_duration_since(e.last_seen) <= self.cfg.entry_ttl);
        if !full && !known {
            return Err(AnnounceError::NeedFull(node.into()));
        }
        let mut set: HashSet<Digest> =
            if full { HashSet::new() } else { self.nodes.get(node).map(|e| e.chunks.clone()).unwrap_or_default() };
        set.extend(chunks.iter().copied());
        for d in removed {
            set.remove(d);
        }
        if set.len() > MAX_CHUNKS_PER_NODE {
            return Err(AnnounceError::TooMany { node: node.into(), count: set.len() });
        }
        self.forget_node(node);
        for d in &set {
            self.holders.entry(*d).or_default().insert(node.to_string());
        }
        let count = set.len();
        self.nodes.insert(
            node.to_string(),
            NodeEntry { addr: addr.to_string(), site: site.to_string(), last_seen: now, chunks: set },
        );
        Ok(count)
    }

    fn forget_node(&mut self, node: &str) {
        if let Some(old) = self.nodes.remove(node) {
            for d in old.chunks {
                if let Some(h) = self.holders.get_mut(&d) {
                    h.remove(node);
                    if h.is_empty() {
                        self.holders.remove(&d);
                    }
                }
            }
        }
    }

    /// Drops expired nodes and reports, at most twice per entry TTL.
    fn purge(&mut self, now: Instant) {
        if self.last_purge.is_some_and(|t| now.saturating_duration_since(t) < self.cfg.entry_ttl / 2) {
            return;
        }
        self.last_purge = Some(now);
        let ttl = self.cfg.entry_ttl;
        let expired: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            self.forget_node(&n);
        }
        self.corrupt.retain(|_, until| *until > now);
        self.unreachable.retain(|_, until| *until > now);
    }

    /// The site `node` announced, if its entry is live.
    pub fn site_of(&self, node: &str, now: Instant) -> Option<&str> {
        self.nodes
            .get(node)
            .filter(|e| now.saturating_duration_since(e.last_seen) <= self.cfg.entry_ttl)
            .map(|e| e.site.as_str())
    }

    /// Whether `node` may be offered for `chunk` now: it announced within
    /// [`TrackerConfig::entry_ttl`] and was not reported unreachable, or
    /// corrupt for this chunk, recently.
    pub fn can_serve(&self, node: &str, chunk: &Digest, now: Instant) -> bool {
        self.site_of(node, now).is_some()
            && self.unreachable.get(node).is_none_or(|until| *until <= now)
            && self.corrupt.get(&(node.to_string(), *chunk)).is_none_or(|until| *until <= now)
    }

    /// Peers holding `chunk` for `asker`, best first (see the module docs).
    pub fn peers(&self, asker: &str, chunk: &Digest, now: Instant) -> Vec<PeerOffer> {
        let Some(holders) = self.holders.get(chunk) else { return Vec::new() };
        let my_site = self.site_of(asker, now).unwrap_or("");
        let mut out: Vec<(bool, u64, PeerOffer)> = holders
            .iter()
            .filter(|n| n.as_str() != asker && self.can_serve(n, chunk, now))
            .filter_map(|n| self.nodes.get(n).map(|e| (n, e)))
            .map(|(n, e)| {
                let other_site = my_site.is_empty() || e.site != my_site;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (asker, chunk.0, n.as_str()).hash(&mut h);
                (other_site, h.finish(), PeerOffer { node: n.clone(), addr: e.addr.clone(), site: e.site.clone() })
            })
            .collect();
        out.sort_by(|a, b| (a.0, a.1, &a.2.node).cmp(&(b.0, b.1, &b.2.node)));
        out.into_iter().take(MAX_PEERS).map(|(_, _, p)| p).collect()
    }

    /// Records a report by `reporter` about `peer`; returns for how long the
    /// peer is left out (for the chunk, or altogether), or `None` for a peer
    /// that never announced here (not recorded: names nobody announced
    /// cannot grow the table).
    pub fn report(
        &mut self,
        reporter: &str,
        peer: &str,
        chunk: Digest,
        problem: Problem,
        now: Instant,
    ) -> Option<Duration> {
        if !self.nodes.contains_key(peer) {
            return None;
        }
        let c = self.counts.entry(peer.to_string()).or_default();
        let ttl = match problem {
            Problem::Corrupt => {
                c.corrupt += 1;
                self.corrupt.insert((peer.to_string(), chunk), now + self.cfg.corrupt_ttl);
                self.cfg.corrupt_ttl
            }
            Problem::Unreachable => {
                c.unreachable += 1;
                self.unreachable.insert(peer.to_string(), now + self.cfg.unreachable_ttl);
                self.cfg.unreachable_ttl
            }
        };
        if self.recent.len() == RECENT_REPORTS {
            self.recent.pop_front();
        }
        self.recent.push_back(Report { at: now, reporter: reporter.into(), peer: peer.into(), chunk, problem });
        Some(ttl)
    }

    /// Corrupt and unreachable reports received about `peer`.
    pub fn report_counts(&self, peer: &str) -> (u64, u64) {
        self.counts.get(peer).map_or((0, 0), |c| (c.corrupt, c.unreachable))
    }

    /// The table as JSON, for the status route.
    pub fn status(&self, now: Instant) -> Value {
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs();
        let mut names: Vec<&String> = self.nodes.keys().chain(self.counts.keys()).collect();
        names.sort();
        names.dedup();
        let nodes: Vec<Value> = names
            .into_iter()
            .map(|n| {
                let (corrupt, unreachable) = self.report_counts(n);
                let mut v = json!({
                    "node": n,
                    "reports": {"corrupt": corrupt, "unreachable": unreachable},
                });
                if let Some(e) = self.nodes.get(n) {
                    v["addr"] = json!(e.addr);
                    v["site"] = json!(e.site);
                    v["chunks"] = json!(e.chunks.len());
                    v["lastSeenSecondsAgo"] = json!(ago(e.last_seen));
                    v["expired"] = json!(now.saturating_duration_since(e.last_seen) > self.cfg.entry_ttl);
                }
                v
            })
            .collect();
        let total = self.counts.values().fold(ReportCounts::default(), |a, c| ReportCounts {
            corrupt: a.corrupt + c.corrupt,
            unreachable: a.unreachable + c.unreachable,
        });
        let recent: Vec<Value> = self
            .recent
            .iter()
            .rev()
            .map(|r| {
                json!({
                    "secondsAgo": ago(r.at),
                    "reporter": r.reporter,
                    "peer": r.peer,
                    "chunk": r.chunk.hex(),
                    "problem": match r.problem { Problem::Corrupt => "corrupt", Problem::Unreachable => "unreachable" },
                })
            })
            .collect();
        json!({
            "nodes": nodes,
            "chunks": self.holders.len(),
            "reports": {"corrupt": total.corrupt, "unreachable": total.unreachable, "recent": recent},
        })
    }
}

// ------------------------------------------------------- cloud pull limits

pub use yunbian_artifacts::rate::TokenBucket;

/// Why a cloud pull was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusyReason {
    /// The site already runs this many cloud pulls
    /// ([`TrackerConfig::cloud_pulls_per_site`]).
    SiteLimit(usize),
    /// The cloud already runs this many pulls for all nodes together
    /// ([`TrackerConfig::cloud_pulls_total`]).
    TotalLimit(usize),
    /// The chunk is on its way to, or just reached, this node of the same
    /// site; it will be offered as a peer ([`TrackerConfig::copy_hold`]).
    CopyOnItsWay(String),
}

/// A cloud pull refused: the node should ask the tracker for peers again
/// after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudBusy {
    /// The asker's site, or `node:<name>` for a node in no site.
    pub site: String,
    /// Why.
    pub why: BusyReason,
    /// When to try again.
    pub retry_after: Duration,
}

impl IntoResponse for CloudBusy {
    fn into_response(self) -> Response {
        let secs = self.retry_after.as_secs().max(1);
        let site = match self.site.strip_prefix("node:") {
            Some(node) => format!("node {node} (in no site)"),
            None => format!("site {}", self.site),
        };
        let message = match &self.why {
            BusyReason::TotalLimit(limit) => format!(
                "{limit} chunk downloads from the cloud already run for all nodes; ask the tracker for peers or retry in {secs} s"
            ),
            BusyReason::SiteLimit(limit) => format!(
                "{limit} chunk downloads from the cloud already run for {site}; ask the tracker for peers or retry in {secs} s"
            ),
            BusyReason::CopyOnItsWay(peer) => format!(
                "this chunk is on its way from the cloud to {peer} on {site}; ask the tracker for peers again in {secs} s"
            ),
        };
        let body = ApiErrorBody { code: 429, message, details: vec![format!("retryAfter={secs}")] };
        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", secs.to_string())], Json(body)).into_response()
    }
}

/// The node of a site that is getting, or just got, a chunk from the cloud.
#[derive(Debug, Clone)]
struct SiteCopy {
    node: String,
    /// Pull id, so a finished pull does not touch a later one's record.
    pull: u64,
    /// When the pull was admitted.
    started: Instant,
    /// `None` while the bytes are on their way.
    arrived: Option<Instant>,
}

/// Longest a copy on its way makes others wait: a holder whose connection
/// hangs (its host lost power mid-body) stops being waited for after this.
const IN_TRANSIT_MAX: Duration = Duration::from_secs(120);

impl SiteCopy {
    /// Whether other nodes of the site still wait for this copy.
    fn fresh(&self, hold: Duration, now: Instant) -> bool {
        match self.arrived {
            Some(at) => now.saturating_duration_since(at) < hold,
            None => now.saturating_duration_since(self.started) < IN_TRANSIT_MAX,
        }
    }
}

#[derive(Debug, Default)]
struct PullCounts {
    in_flight: HashMap<String, usize>,
    /// Sum of `in_flight`.
    running: usize,
    /// (site, chunk) → the copy that other nodes of the site wait for.
    copies: HashMap<(String, Digest), SiteCopy>,
    /// Size of `copies` at which stale records are swept next.
    sweep_at: usize,
    next_pull: u64,
    refused: u64,
    deferred: u64,
    chunks: u64,
    bytes: u64,
    per_node: BTreeMap<String, (u64, u64)>,
}

impl PullCounts {
    /// Drops the copies nobody waits for any more.
    fn expire(&mut self, hold: Duration, now: Instant) {
        self.copies.retain(|_, c| c.fresh(hold, now));
        // Sweep again only once the map has doubled: O(1) per admit.
        self.sweep_at = (2 * self.copies.len()).max(COPIES_SWEEP_AT);
    }
}

/// What an asker of the cloud is: its node, its announced site (`None`:
/// it never announced, so no copy is held back from it), and the chunk.
#[derive(Debug, Clone, Copy)]
pub struct PullRequest<'a> {
    /// The node.
    pub node: &'a str,
    /// Its site as announced to the tracker.
    pub site: Option<&'a str>,
    /// The chunk.
    pub chunk: &'a Digest,
}

/// The per-site concurrency limit, the one-copy-per-site rule and the
/// egress bucket of cloud pulls.
#[derive(Debug)]
pub struct CloudPulls {
    per_site: Option<usize>,
    total: Option<usize>,
    retry_after: Duration,
    copy_hold: Duration,
    egress: Option<Arc<Mutex<TokenBucket>>>,
    counts: Mutex<PullCounts>,
}

/// Copies remembered before expired ones are swept.
const COPIES_SWEEP_AT: usize = 4096;

impl CloudPulls {
    /// Limits from the configuration.
    pub fn new(cfg: &TrackerConfig) -> CloudPulls {
        CloudPulls {
            per_site: cfg.cloud_pulls_per_site,
            total: cfg.cloud_pulls_total,
            retry_after: cfg.busy_retry_after,
            copy_hold: cfg.copy_hold,
            egress: cfg.egress_bytes_per_sec.map(|r| Arc::new(Mutex::new(TokenBucket::new(r, Instant::now())))),
            counts: Mutex::new(PullCounts::default()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, PullCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one pull, or refuses it: when another node of the asker's
    /// site is getting (or just got) the chunk and `can_serve` says that
    /// node can serve it, or when the site's pulls are used up.
    pub fn admit(
        self: &Arc<Self>,
        req: PullRequest<'_>,
        can_serve: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Result<CloudPullPermit, CloudBusy> {
        let mut c = self.counts();
        let site = req.site.unwrap_or("");
        let key = (site.to_string(), *req.chunk);
        // Only nodes of a named site share a copy: nodes in no group are
        // not near each other (the peer order treats them so too).
        let one_copy = !site.is_empty() && !self.copy_hold.is_zero();
        if one_copy {
            if c.copies.len() >= c.sweep_at.max(COPIES_SWEEP_AT) {
                c.expire(self.copy_hold, now);
            }
            if let Some(copy) = c.copies.get(&key) {
                if copy.fresh(self.copy_hold, now) && copy.node != req.node && can_serve(&copy.node) {
                    let peer = copy.node.clone();
                    c.deferred += 1;
                    return Err(CloudBusy {
                        site: site.into(),
                        why: BusyReason::CopyOnItsWay(peer),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
        if let Some(limit) = self.total.filter(|&l| c.running >= l) {
            c.refused += 1;
            return Err(CloudBusy {
                site: site.to_string(),
                why: BusyReason::TotalLimit(limit),
                retry_after: self.retry_after,
            });
        }
        let bucket = if site.is_empty() { format!("node:{}", req.node) } else { site.to_string() };
        let running = c.in_flight.get(&bucket).copied().unwrap_or(0);
        if let Some(limit) = self.per_site {
            if running >= limit {
                c.refused += 1;
                return Err(CloudBusy {
                    site: bucket,
                    why: BusyReason::SiteLimit(limit),
                    retry_after: self.retry_after,
                });
            }
        }
        *c.in_flight.entry(bucket.clone()).or_default() += 1;
        c.running += 1;
        c.next_pull += 1;
        let pull = c.next_pull;
        // Only a node that announced (and so serves peers) is waited for.
        let copy = one_copy.then(|| {
            c.copies.insert(key.clone(), SiteCopy { node: req.node.to_string(), pull, started: now, arrived: None });
            key
        });
        Ok(CloudPullPermit { pulls: self.clone(), node: req.node.into(), site: bucket, pull, copy, sent: false })
    }

    /// Pulls running for `site`.
    pub fn in_flight(&self, site: &str) -> usize {
        self.counts().in_flight.get(site).copied().unwrap_or(0)
    }

    fn status(&self) -> Value {
        let mut c = self.counts();
        c.expire(self.copy_hold, Instant::now());
        let per_node: BTreeMap<&String, Value> =
            c.per_node.iter().map(|(n, (chunks, bytes))| (n, json!({"chunks": chunks, "bytes": bytes}))).collect();
        json!({
            "pullsPerSite": self.per_site,
            "pullsTotal": self.total,
            "running": c.running,
            "inFlight": c.in_flight,
            "refused": c.refused,
            "deferredToPeers": c.deferred,
            "copiesHeld": c.copies.len(),
            "chunksServed": c.chunks,
            "bytesServed": c.bytes,
            "perNode": per_node,
        })
    }
}

/// One admitted cloud pull; its site's slot is freed when this is dropped
/// (after the response body was sent, or the connection died). A pull
/// whose body was not sent completely takes its site copy with it, so the
/// next asker is served.
#[derive(Debug)]
pub struct CloudPullPermit {
    pulls: Arc<CloudPulls>,
    node: String,
    site: String,
    pull: u64,
    copy: Option<(String, Digest)>,
    sent: bool,
}

impl Drop for CloudPullPermit {
    fn drop(&mut self) {
        let mut guard = self.pulls.counts();
        let c = &mut *guard;
        if let Some(n) = c.in_flight.get_mut(&self.site) {
            c.running -= 1;
            *n -= 1;
            if *n == 0 {
                c.in_flight.remove(&self.site);
            }
        }
        if let Some(key) = self.copy.take() {
            if c.copies.get(&key).is_some_and(|copy| copy.pull == self.pull) {
                if self.sent {
                    if let Some(copy) = c.copies.get_mut(&key) {
                        copy.arrived = Some(Instant::now());
                    }
                } else {
                    c.copies.remove(&key);
                }
            }
        }
    }
}

impl CloudPullPermit {
    /// The response for a chunk: its bytes, paced by the egress bucket,
    /// holding the permit until they are sent.
    pub fn respond(self, bytes: Vec<u8>) -> Response {
        let len = bytes.len();
        {
            let mut c = self.pulls.counts();
            c.chunks += 1;
            c.bytes += len as u64;
            let e = c.per_node.entry(self.node.clone()).or_default();
            e.0 += 1;
            e.1 += len as u64;
        }
        let egress = self.pulls.egress.clone();
        let bytes = Bytes::from(bytes);
        let stream = futures_util::stream::unfold((bytes, 0usize, self), move |(bytes, at, mut permit)| {
            let egress = egress.clone();
            async move {
                if at >= bytes.len() {
                    return None; // the permit is dropped here
                }
                let end = (at + EGRESS_SLICE).min(bytes.len());
                if let Some(bucket) = &egress {
                    let wait =
                        bucket.lock().unwrap_or_else(|e| e.into_inner()).reserve((end - at) as u64, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                // The last slice is handed to the connection: the copy
                // counts as there (with a content length, the body may not
                // be polled again). If the holder dies before reading it,
                // its site waits at most `copy_hold`, or less once it is
                // reported unreachable.
                permit.sent |= end == bytes.len();
                Some((Ok::<Bytes, std::convert::Infallible>(bytes.slice(at..end)), (bytes, end, permit)))
            }
        });
        (
            [("content-type", "application/octet-stream".to_string()), ("content-length", len.to_string())],
            Body::from_stream(stream),
        )
            .into_response()
    }
}

// ---------------------------------------------------------------- tracker

/// The tracker of one cloud replica: the peer table and the cloud pull
/// limits.
#[derive(Debug)]
pub struct Tracker {
    table: Mutex<PeerTable>,
    pulls: Arc<CloudPulls>,
    cfg: TrackerConfig,
}

impl Tracker {
    /// A tracker with this configuration.
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker { table: Mutex::new(PeerTable::new(cfg.clone())), pulls: Arc::new(CloudPulls::new(&cfg)), cfg }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PeerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a read of `chunk`: `None` for the admin (not limited), a
    /// permit for a node (see [`CloudPulls::admit`]), or the refusal.
    pub fn admit_cloud_pull(
        &self,
        reader: &ArtifactReader,
        chunk: &Digest,
    ) -> Result<Option<CloudPullPermit>, CloudBusy> {
        match reader {
            ArtifactReader::Admin => Ok(None),
            ArtifactReader::Node(node) => {
                let now = Instant::now();
                // Lock order: the table, then the pull counts.
                let table = self.table();
                let req = PullRequest { node, site: table.site_of(node, now), chunk };
                self.pulls.admit(req, |holder| table.can_serve(holder, chunk, now), now).map(Some)
            }
        }
    }

    /// The cloud pull limiter.
    pub fn cloud_pulls(&self) -> &Arc<CloudPulls> {
        &self.pulls
    }
}

/// A chunk read's response: paced and counted for a node, plain for the
/// admin (called by `GET /v1/chunks/{sha256}`).
pub fn chunk_response(permit: Option<CloudPullPermit>, bytes: Vec<u8>) -> Response {
    match permit {
        Some(p) => p.respond(bytes),
        None => ([("content-type", "application/octet-stream")], bytes).into_response(),
    }
}

type St = State<Arc<ApiState>>;

/// The tracker routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/p2p/announce", post(announce))
        .route("/v1/p2p/peers/{digest}", get(peers))
        .route("/v1/p2p/report", post(report))
        .route("/v1/p2p/status", get(status))
}

fn node_only(reader: ArtifactReader) -> Result<String, ApiError> {
    match reader {
        ArtifactReader::Node(n) => Ok(n),
        ArtifactReader::Admin => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "the p2p routes take a node client certificate"))
        }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn parse_digests(field: &str, list: &[String]) -> Result<Vec<Digest>, ApiError> {
    list.iter().enumerate().map(|(i, s)| s.parse::<Digest>().map_err(|e| bad(format!("{field}[{i}]: {e}")))).collect()
}

/// `host:port` with an empty or unspecified host replaced by `seen` (the
/// connection's source address).
pub(crate) fn peer_addr(announced: &str, seen: &str) -> Result<String, ApiError> {
    let (host, port) =
        announced.rsplit_once(':').ok_or_else(|| bad(format!("addr: {announced:?} is not host:port")))?;
    let port: u16 =
        port.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad(format!("addr: bad port in {announced:?}")))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let unspecified = bare.is_empty() || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    if !unspecified {
        if host.len() > 253 || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(bad(format!("addr: bad host in {announced:?}")));
        }
        return Ok(format!("{host}:{port}"));
    }
    let ip = seen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .map_err(|_| bad(format!("addr: {announced:?} has no host and the connection's address is unknown")))?;
    Ok(std::net::SocketAddr::new(ip, port).to_string())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnnounceBody {
    addr: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    chunks: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    full: bool,
}

fn json_body<T: serde::de::DeserializeOwned>(what: &str, body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body).map_err(|e| bad(format!("{what}: {e}")))
}

async fn announce(
    State(s): St,
    reader: ArtifactReader,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let node = node_only(reader)?;
    let b: AnnounceBody = json_body("announce", body)?;
    if b.site.len() > 253 {
        return Err(bad("site: longer than 253 bytes"));
    }
    let addr = peer_addr(&b.addr, &peer.address)?;
    let (chunks, removed) = (parse_digests("chunks", &b.chunks)?, parse_digests("removed", &b.removed)?);
    let result = s.tracker.table().announce(&node, &addr, &b.site, b.full, &chunks, &removed, Instant::now());
    match result {
        Ok(count) => Ok(Json(json!({"node": node, "addr": addr, "site": b.site, "chunks": count})).into_response()),
        Err(e @ AnnounceError::NeedFull(_)) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
        Err(e @ AnnounceError::TooMany { .. }) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())),
    }
}

async fn peers(State(s): St, reader: ArtifactReader, Path(d): Path<String>) -> Result<Json<Value>, ApiError> {
    let node = node_only(reader)?;
    let d: Digest = d.parse().map_err(|e: yunbian_artifacts::DigestParseError| bad(e.to_string()))?;
    let offers = s.tracker.table().peers(&node, &d, Instant::now());
    let list: Vec<Value> =
        offers.into_iter().map(|p| json!({"node": p.node, "addr": p.addr, "site": p.site})).collect();
    Ok(Json(json!({ "chunk": d.hex(), "peers": list })))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReportBody {
    peer: String,
    chunk: String,
    problem: Problem,
}

async fn report(
    State(s): St,
    reader: ArtifactReader,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let node = node_only(reader)?;
    let b: ReportBody = json_body("report", body)?;
    let chunk: Digest = b.chunk.parse().map_err(|e: yunbian_artifacts::DigestParseError| bad(format!("chunk: {e}")))?;
    if b.peer == node {
        return Err(bad("peer: a node cannot report itself"));
    }
    if b.peer.is_empty() || b.peer.len() > 253 {
        return Err(bad("peer: not a node name"));
    }
    let ttl = s.tracker.table().report(&node, &b.peer, chunk, b.problem, Instant::now()).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("peer {} has not announced to this cloud replica", b.peer))
    })?;
    tracing::warn!(reporter = %node, peer = %b.peer, %chunk, problem = ?b.problem, "p2p peer reported");
    Ok(Json(json!({"peer": b.peer, "excludedForSeconds": ttl.as_secs()})))
}

async fn status(State(s): St, _admin: Admin) -> Json<Value> {
    let mut v = s.tracker.table().status(Instant::now());
    v["cloud"] = s.tracker.pulls.status();
    v["config"] = json!({
        "entryTtlSeconds": s.tracker.cfg.entry_ttl.as_secs(),
        "corruptTtlSeconds": s.tracker.cfg.corrupt_ttl.as_secs(),
        "unreachableTtlSeconds": s.tracker.cfg.unreachable_ttl.as_secs(),
        "egressBytesPerSecond": s.tracker.cfg.egress_bytes_per_sec,
        "cloudPullsPerSite": s.tracker.cfg.cloud_pulls_per_site,
        "copyHoldSeconds": s.tracker.cfg.copy_hold.as_secs(),
    });
    v["scope"] = json!("this cloud replica");
    Json(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn names(p: &[PeerOffer]) -> Vec<&str> {
        p.iter().map(|o| o.node.as_str()).collect()
    }

    #[test]
    fn same_site_peers_come_first_and_the_asker_is_left_out() {
        let now = Instant::now();
        let mut t = PeerTable::new(TrackerConfig::default());
        for (n, site) in [("x1", "other"), ("a1", "plant"), ("x2", "other"), ("a2", "plant"), ("me", "plant")] {
            t.announce(n, &format!("{n}:7444"), site, true, &[d(1)], &[], now).expect("announce");
        }
        t.announce("nosite", "nosite:7444", "", true, &[d(1)], &[], now).expect("announce");
        let p = t.peers("me", &d(1), now);
        assert_eq!(p.len(), 5);
        let first: HashSet<&str> = names(&p[..2]).into_iter().collect();
        assert_eq!(first, HashSet::from(["a1", "a2"]), "{p:?}");
        assert!(!names(&p).contains(&"me"));
        // A node without a site has no preference; nothing for an unheld chunk.
        assert_eq!(t.peers("nosite", &d(1), now).len(), 5);
        assert!(t.peers("me", &d(2), now).is_empty());
        // The order within a tier is stable for one asker.
        assert_eq!(t.peers("me", &d(1), now), p);
    }

    #[test]
    fn entries_expire_unless_announced_again_and_deltas_need_a_full_set() {
        let now = Instant::now();
        let cfg = TrackerConfig { entry_ttl: Duration::from_secs(60), ..Default::default() };
        let mut t = PeerTable::new(cfg);
        assert_eq!(
            t.announce("a", "a:1", "", false, &[d(1)], &[], now),
            Err(AnnounceError::NeedFull("a".into())),
            "a delta before any full announce"
        );
        t.announce("a", "a:1", "", true, &[d(1), d(2)], &[], now).expect("full");
        t.announce("a", "a:1", "", false, &[d(3)], &[d(1)], now + Duration::from_secs(30)).expect("delta");
        let at = now + Duration::from_secs(31);
        assert!(t.peers("b", &d(1), at).is_empty(), "removed by the delta");
        assert_eq!(names(&t.peers("b", &d(3), at)), ["a"]);
        // 61 s after the last announce the entry is gone.
        let later = now + Duration::from_secs(92);
        assert!(t.peers("b", &d(3), later).is_empty());
        assert!(matches!(t.announce("a", "a:1", "", false, &[], &[], later), Err(AnnounceError::NeedFull(_))));
        // A full announce replaces the set.
        t.announce("a", "a:1", "", true, &[d(4)], &[], later).expect("full");
        assert!(t.peers("b", &d(2), later).is_empty());
        assert_eq!(names(&t.peers("b", &d(4), later)), ["a"]);
    }

    #[test]
    fn reported_peers_are_left_out_for_a_while_and_counted() {
        let now = Instant::now();
        let cfg = TrackerConfig {
            corrupt_ttl: Duration::from_secs(100),
            unreachable_ttl: Duration::from_secs(10),
            entry_ttl: Duration::from_secs(1000),
            ..Default::default()
        };
        let mut t = PeerTable::new(cfg);
        for n in ["a", "b"] {
            t.announce(n, "h:1", "s", true, &[d(1), d(2)], &[], now).expect("announce");
        }
        assert_eq!(t.report("c", "a", d(1), Problem::Corrupt, now), Some(Duration::from_secs(100)));
        assert_eq!(t.report("c", "nobody", d(1), Problem::Corrupt, now), None, "unknown peers are not recorded");
        assert_eq!(names(&t.peers("c", &d(1), now)), ["b"], "a is out for the corrupt chunk");
        assert_eq!(t.peers("c", &d(2), now).len(), 2, "but not for the others");
        t.report("c", "b", d(2), Problem::Unreachable, now);
        assert!(names(&t.peers("c", &d(2), now)) == ["a"]);
        assert!(t.peers("c", &d(1), now).is_empty());
        let later = now + Duration::from_secs(11);
        assert_eq!(names(&t.peers("c", &d(1), later)), ["b"], "unreachable ends first");
        assert_eq!(t.peers("c", &d(1), now + Duration::from_secs(101)).len(), 2);
        assert_eq!(t.report_counts("a"), (1, 0));
        assert_eq!(t.report_counts("b"), (0, 1));
        let s = t.status(now);
        assert_eq!(s["reports"]["corrupt"], 1);
        assert_eq!(s["reports"]["recent"][1]["peer"], "a");
    }

    fn pull<'a>(node: &'a str, site: &'a str, chunk: &'a Digest) -> PullRequest<'a> {
        PullRequest { node, site: Some(site), chunk }
    }

    #[test]
    fn cloud_pulls_are_limited_per_site() {
        let cfg = TrackerConfig { cloud_pulls_per_site: Some(2), ..Default::default() };
        let pulls = Arc::new(CloudPulls::new(&cfg));
        let now = Instant::now();
        let yes = |_: &str| true;
        let a = pulls.admit(pull("n1", "plant", &d(1)), yes, now).expect("first");
        let _b = pulls.admit(pull("n2", "plant", &d(2)), yes, now).expect("second");
        let busy = pulls.admit(pull("n3", "plant", &d(3)), yes, now).expect_err("third");
        assert_eq!((busy.site.as_str(), &busy.why), ("plant", &BusyReason::SiteLimit(2)));
        let _other = pulls.admit(pull("n4", "depot", &d(4)), yes, now).expect("another site has its own slots");
        assert_eq!(pulls.in_flight("plant"), 2);
        // Nodes in no site, or that never announced, count alone.
        let alone: Vec<_> = (0..3u8)
            .flat_map(|i| {
                let node = format!("x{i}");
                let site = if i == 0 { None } else { Some("") };
                (0..2u8).map(move |k| (node.clone(), site, k))
            })
            .map(|(node, site, k)| {
                pulls.admit(PullRequest { node: &node, site, chunk: &d(10 + k) }, yes, now).expect("own slots")
            })
            .collect();
        let busy_alone = pulls.admit(pull("x1", "", &d(20)), yes, now).expect_err("x1's slots are used");
        assert_eq!((busy_alone.site.as_str(), &busy_alone.why), ("node:x1", &BusyReason::SiteLimit(2)));
        assert_eq!((pulls.in_flight("node:x0"), pulls.in_flight("")), (2, 0));
        drop(alone);
        assert_eq!(pulls.in_flight("node:x0"), 0);
        // And all together at most `cloud_pulls_total`.
        let cfg = TrackerConfig { cloud_pulls_per_site: Some(2), cloud_pulls_total: Some(3), ..Default::default() };
        let capped = Arc::new(CloudPulls::new(&cfg));
        let first = capped.admit(pull("a", "s1", &d(1)), yes, now).expect("a");
        let _b = capped.admit(pull("b", "s2", &d(2)), yes, now).expect("b");
        let _c = capped.admit(pull("c", "", &d(3)), yes, now).expect("c");
        let full = capped.admit(pull("e", "s3", &d(4)), yes, now).expect_err("three run");
        assert_eq!(full.why, BusyReason::TotalLimit(3));
        drop(first);
        let _e = capped.admit(pull("e", "s3", &d(4)), yes, now).expect("a slot freed");
        drop(a);
        assert_eq!(pulls.in_flight("plant"), 1);
        let _c = pulls.admit(pull("n3", "plant", &d(3)), yes, now).expect("a slot freed");
        let r = busy.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
        let unlimited =
            Arc::new(CloudPulls::new(&TrackerConfig { cloud_pulls_per_site: None, ..TrackerConfig::default() }));
        let held: Vec<_> = (0..100u8)
            .map(|i| unlimited.admit(pull(&format!("n{i}"), "s", &d(i)), yes, now).expect("unlimited"))
            .collect();
        assert_eq!(unlimited.in_flight("s"), 100);
        drop(held);
        assert_eq!(unlimited.in_flight("s"), 0);
    }

    #[tokio::test]
    async fn a_site_gets_one_copy_and_waits_for_its_holder() {
        let cfg = TrackerConfig { cloud_pulls_per_site: None, ..Default::default() };
        let pulls = Arc::new(CloudPulls::new(&cfg));
        let (x, now) = (d(7), Instant::now());
        let (yes, no) = (|_: &str| true, |_: &str| false);
        let first = pulls.admit(pull("a", "plant", &x), yes, now).expect("the site's first copy");
        let wait = pulls.admit(pull("b", "plant", &x), yes, now).expect_err("a is getting it");
        assert_eq!(wait.why, BusyReason::CopyOnItsWay("a".into()));
        assert_eq!(wait.retry_after, Duration::from_secs(1));
        let msg = wait.into_response();
        assert_eq!(msg.status(), StatusCode::TOO_MANY_REQUESTS);
        // The same node asking again is served (it lost its connection).
        drop(pulls.admit(pull("a", "plant", &x), yes, now).expect("the holder itself"));
        // That retry's failure took the record with it: the first pull no
        // longer makes others wait... until somebody holds it again.
        let again = pulls.admit(pull("b", "plant", &x), yes, now).expect("nobody holds it now");
        drop(first);
        drop(again);
        // A holder the tracker would not offer (unreachable, expired) is not
        // waited for (the asker becomes the holder); other sites and nodes
        // without a site are served.
        let unusable = pulls.admit(pull("a", "plant", &x), yes, now).expect("a again");
        drop(pulls.admit(pull("b", "plant", &x), no, now).expect("a cannot serve"));
        drop(unusable);
        let held = pulls.admit(pull("a", "plant", &x), yes, now).expect("a again");
        drop(pulls.admit(pull("c", "depot", &x), yes, now).expect("another site"));
        drop(pulls.admit(PullRequest { node: "e", site: None, chunk: &x }, yes, now).expect("never announced"));
        // Nodes in no group share no copy: they are not near each other.
        let _f = pulls.admit(pull("f", "", &x), yes, now).expect("no site");
        drop(pulls.admit(pull("g", "", &x), yes, now).expect("no site either"));
        // A copy still on its way after IN_TRANSIT_MAX (a hung connection)
        // is not waited for.
        let hung = pulls.admit(pull("h", "plant", &d(9)), yes, now).expect("h");
        pulls.admit(pull("i", "plant", &d(9)), yes, now).expect_err("h is getting it");
        drop(pulls.admit(pull("i", "plant", &d(9)), yes, now + IN_TRANSIT_MAX).expect("h hangs"));
        drop(hung);
        // A copy whose bytes all went out is waited for during copy_hold.
        let body = axum::body::to_bytes(held.respond(vec![1; 100_000]).into_body(), usize::MAX).await.expect("body");
        assert_eq!(body.len(), 100_000);
        let after = Instant::now();
        let wait = pulls.admit(pull("b", "plant", &x), yes, after).expect_err("a has it");
        assert_eq!(wait.why, BusyReason::CopyOnItsWay("a".into()));
        drop(pulls.admit(pull("b", "plant", &d(8)), yes, after).expect("another chunk"));
        let later = after + cfg.copy_hold + Duration::from_secs(1);
        drop(pulls.admit(pull("b", "plant", &x), yes, later).expect("a never announced it"));
        let s = pulls.status();
        assert_eq!(s["deferredToPeers"], 3);
        assert_eq!(s["chunksServed"], 1);
        // Turned off, every node is served.
        let off = Arc::new(CloudPulls::new(&TrackerConfig { copy_hold: Duration::ZERO, ..cfg }));
        let _a = off.admit(pull("a", "plant", &x), yes, now).expect("a");
        let _b = off.admit(pull("b", "plant", &x), yes, now).expect("b, copy_hold 0");
    }

    #[test]
    fn announced_addresses_without_a_host_take_the_connection_address() {
        assert_eq!(peer_addr(":7444", "10.0.0.5:51234").expect("addr"), "10.0.0.5:7444");
        assert_eq!(peer_addr("0.0.0.0:7444", "10.0.0.5:51234").expect("addr"), "10.0.0.5:7444");
        assert_eq!(peer_addr("[::]:7444", "[fe80::1]:5").expect("addr"), "[fe80::1]:7444");
        assert_eq!(peer_addr("edge-1.plant:7444", "10.0.0.5:1").expect("addr"), "edge-1.plant:7444");
        assert!(peer_addr("edge-1", "10.0.0.5:1").is_err());
        assert!(peer_addr("h:0", "10.0.0.5:1").is_err());
        assert!(peer_addr(":7444", "").is_err());
    }
}
