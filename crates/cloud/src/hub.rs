//! The hub: every edge node's desired view, its live connection, its
//! heartbeats, and log streams routed through the connection.
//!
//! The view builder watches the store and keeps one [`NodeView`] per node
//! (AppInstances whose `spec.node` is the node, and the node's Devices with
//! their DeviceModels — see [`crate::device_views`] — all without status:
//! status changes do not disturb the edge). Each connection runs a
//! [`CloudSession`] (the sans-IO protocol) and executes its actions.
//!
//! Invariants:
//! - The hub lock is never held across an `.await`.
//! - A node's connection is identified only by its verified client
//!   certificate; a node only writes the status of instances placed on it.
//! - A newer connection of the same node replaces the older one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use tokio::sync::{mpsc, Notify};
use yunbian_api::{
    AppInstanceSpec, DeviceSpec, Kind, NetworkStatus, NodeGroupSpec, NodeGroupStatus, NodeInfo, NodePhase, NodeSpec,
    NodeUsage, RuleSpec,
};
use yunbian_store::{Coordinator, EventType, Store, StoreError, StoredObject};
use yunbian_sync::wire::{decode_up, encode};
use yunbian_sync::{Change, CloudAction, CloudSession, DesiredObject, Down, NodeView, Report, SessionConfig, Up};

use crate::data_store::{DataStore, DataStoreError, Ingested};
use crate::device_views::DeviceRouting;
use crate::events::AlertReport;
use crate::health::{Liveness, PeerReport, PresenceRecord, RemoteReport, Verdict, VerdictRule};
use crate::latency::LatencyMatrix;
use crate::metrics::Metrics;
use crate::objects::{self, now_rfc3339, update_status};
use crate::rule_views::RuleRouting;

/// Deltas kept per node for resuming without a snapshot.
const VIEW_LOG: usize = 1024;

/// Hub tunables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Protocol timers.
    pub session: SessionConfig,
    /// Expected heartbeat interval of edges (sent to nobody; used for grace).
    pub heartbeat: Duration,
    /// A node with no heartbeat for this long is NotReady and its connection closed.
    pub grace: Duration,
    /// How often unchanged node status (usage) is written to the store;
    /// changes of phase, info or limits are written at once.
    pub status_interval: Duration,
    /// How long after expiry a node certificate can still be renewed.
    pub cert_grace: Duration,
    /// This cloud's URL(s), for the re-join hint of nodes past the grace.
    pub url: String,
    /// The agents' probe period (peer probes, cloud pings): how recent a
    /// peer's success must be to count in a verdict.
    pub probe: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            session: SessionConfig::default(),
            heartbeat: Duration::from_secs(5),
            grace: Duration::from_secs(20),
            status_interval: Duration::from_secs(60),
            cert_grace: Duration::from_secs(30 * 86_400),
            url: String::new(),
            probe: Duration::from_secs(2),
        }
    }
}

struct Link {
    conn: u64,
    notify: Arc<Notify>,
    control: mpsc::Sender<Down>,
}

#[derive(Default)]
struct Live {
    last_heartbeat: Option<Instant>,
    last_status_write: Option<Instant>,
    info: NodeInfo,
    usage: NodeUsage,
    limits: (bool, String),
    address: String,
    disk_pressure: String,
    synced: u64,
    /// The node's latest network report and when it came.
    network: Option<(NetworkStatus, Instant)>,
    /// Cloud RTT in the last status write of `network`.
    network_written: Option<f64>,
    /// Where peers reach the node (resolved `host:port`); empty: nowhere.
    peer_addr: String,
}

#[derive(Default)]
struct Inner {
    views: HashMap<String, NodeView>,
    base_revision: u64,
    /// instance → (node, generation) of what is in the views.
    placed: HashMap<String, (String, u64)>,
    links: HashMap<String, Link>,
    live: HashMap<String, Live>,
    devices: DeviceRouting,
    /// Store revisions of the Device and DeviceModel listings the routing
    /// was built from.
    device_listed: (u64, u64),
    rules: RuleRouting,
    /// Store revisions of the Rule and Node listings.
    rule_listed: (u64, u64),
}

impl Inner {
    fn view_mut(&mut self, node: &str) -> &mut NodeView {
        let base = self.base_revision;
        self.views.entry(node.to_string()).or_insert_with(|| NodeView::new(base, VIEW_LOG))
    }
}

/// Errors the API layer maps to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The node has no live connection.
    #[error("node {0} is not connected")]
    NotConnected(String),
}

/// The hub.
pub struct Hub {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    cfg: HubConfig,
    inner: Mutex<Inner>,
    logs: Mutex<HashMap<u64, (String, mpsc::Sender<String>)>>,
    next_id: AtomicU64,
    started: Instant,
    /// Set once the views were built from the store; connections before
    /// that would be served an empty view.
    views_ready: std::sync::atomic::AtomicBool,
    /// Where store-and-forward data goes (set once at start).
    data: std::sync::OnceLock<Arc<dyn DataStore>>,
    /// Per node: held while one of its batches is checked and stored, so
    /// two connections of one node never store the same batch twice.
    data_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Silence and peer verdicts per node (written by the lifecycle loop).
    liveness: Arc<Liveness>,
    /// Identifies this hub's presence record among the replicas'.
    hub_id: String,
    /// What the other replicas' presence records say (refreshed by
    /// housekeeping).
    remote: Mutex<RemoteView>,
    /// What probe targets are chosen from, and when it was built.
    targets: tokio::sync::Mutex<Option<(Instant, Arc<TargetDirectory>)>>,
}

/// Group member lists and peer addresses, rebuilt at most every 5 s so
/// that a target request costs O(targets), not O(nodes).
#[derive(Debug, Default)]
struct TargetDirectory {
    /// Sorted member lists of groups with more than one member.
    groups: Vec<Vec<String>>,
    /// Sorted names of the nodes that serve peers.
    serving: Vec<String>,
    /// Their addresses.
    addrs: HashMap<String, String>,
}

/// The other replicas' presence records, merged.
#[derive(Debug, Default)]
struct RemoteView {
    /// Nodes another replica serves.
    served: std::collections::HashSet<String>,
    /// Their peer addresses.
    peer_addrs: HashMap<String, String>,
    /// Reports about silent nodes, with when the record was read.
    peer_views: HashMap<String, Vec<(RemoteReport, Instant)>>,
}

/// How long probe-target group lists are reused.
const GROUPS_TTL: Duration = Duration::from_secs(5);

/// A cloud RTT that moved by more than this share (and by more than
/// [`RTT_FLOOR_MS`]: loopback jitter is no change) is written at once.
const RTT_CHANGE: f64 = 0.2;
const RTT_FLOOR_MS: f64 = 2.0;

/// Recent failures kept on a Node, and for how long.
const FAILURES_KEPT: usize = 16;
const FAILURES_FOR_SECS: u64 = 86_400;

/// Appends `now` to a node's recent failures, keeping the last 24 h and at
/// most 16.
fn record_failure(failures: &mut Vec<u64>, now: u64) {
    failures.retain(|t| now.saturating_sub(*t) < FAILURES_FOR_SECS);
    failures.push(now);
    let excess = failures.len().saturating_sub(FAILURES_KEPT);
    failures.drain(..excess);
}

/// A data batch on its way from a connection to the data store.
struct DataIn {
    id: u64,
    first_id: u64,
    points: u64,
    payload: Vec<u8>,
}

/// Batches a connection queues for its data task; past it the connection
/// waits (an edge keeps at most its window in flight).
const DATA_QUEUE: usize = 16;
/// Most points one batch may claim: checked before decoding, so a node
/// cannot make the cloud decode an outsize batch (edges seal at 10,000).
const MAX_BATCH_POINTS: u64 = 200_000;

/// Node and generation of an instance (cheap: no copy of the object).
fn placement_of(o: &StoredObject) -> Option<(String, u64)> {
    let node = o.value.pointer("/spec/node")?.as_str()?.to_string();
    let generation = o.value.pointer("/metadata/generation").and_then(|g| g.as_u64()).unwrap_or(0);
    Some((node, generation))
}

/// The object as the edge gets it: without status.
fn desired_value(o: &StoredObject) -> DesiredObject {
    let mut value = (*o.value).clone();
    if let Some(m) = value.as_object_mut() {
        m.remove("status");
    }
    DesiredObject { kind: o.kind, name: o.name.clone(), revision: o.revision, value }
}

fn desired_of(o: &StoredObject) -> Option<(String, u64, DesiredObject)> {
    let (node, generation) = placement_of(o)?;
    Some((node, generation, desired_value(o)))
}

/// Seeds the views with `wanted` (first listing), or adds to `per_node`
/// what makes each view's objects of `kinds` match it. Objects are
/// compared by generation: a status report changes an object's revision,
/// not what its node runs.
fn merge_wanted(
    inner: &mut Inner,
    wanted: HashMap<String, Vec<DesiredObject>>,
    kinds: &[Kind],
    first: bool,
    per_node: &mut HashMap<String, Vec<Change>>,
) {
    if first {
        for (node, objs) in wanted {
            let view = inner.view_mut(&node);
            for o in objs {
                view.seed(o);
            }
        }
        return;
    }
    let generation = |o: &DesiredObject| o.value.pointer("/metadata/generation").and_then(|g| g.as_u64());
    let mut nodes: std::collections::HashSet<String> = inner.views.keys().cloned().collect();
    nodes.extend(wanted.keys().cloned());
    for node in nodes {
        let want: HashMap<(Kind, String), DesiredObject> = wanted
            .get(&node)
            .map(|v| v.iter().map(|o| ((o.kind, o.name.clone()), o.clone())).collect())
            .unwrap_or_default();
        let have: HashMap<(Kind, String), Option<u64>> = inner
            .view_mut(&node)
            .objects()
            .into_iter()
            .filter(|o| kinds.contains(&o.kind))
            .map(|o| ((o.kind, o.name.clone()), generation(&o)))
            .collect();
        let changes = per_node.entry(node.clone()).or_default();
        for (kind, name) in have.keys() {
            if !want.contains_key(&(*kind, name.clone())) {
                changes.push(Change::Remove { kind: *kind, name: name.clone() });
            }
        }
        for (k, o) in want {
            if have.get(&k) != Some(&generation(&o)) {
                changes.push(Change::Upsert { object: o });
            }
        }
    }
}

impl Hub {
    /// A hub over `store`. Call [`Hub::run_view_builder`] to fill it.
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, cfg: HubConfig) -> Arc<Self> {
        Arc::new(Hub {
            store,
            metrics,
            cfg,
            inner: Mutex::new(Inner::default()),
            logs: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            views_ready: std::sync::atomic::AtomicBool::new(false),
            data: std::sync::OnceLock::new(),
            data_locks: Mutex::new(HashMap::new()),
            liveness: Arc::new(Liveness::default()),
            hub_id: format!("{:016x}", {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
                );
                h.finish()
            }),
            remote: Mutex::new(RemoteView::default()),
            targets: tokio::sync::Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("hub lock poisoned")
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Builds the views from a listing, then follows the store forever
    /// (relisting when the watch falls behind).
    pub async fn run_view_builder(self: Arc<Self>) {
        let mut first = true;
        loop {
            // Instances first: the watch starts at their listing's revision,
            // and device events already in the later listings are skipped by
            // the routing (same placement and generation).
            let listed = async {
                let (items, rev) = self.store.list(Kind::AppInstance).await?;
                let devices = self.store.list(Kind::Device).await?;
                let models = self.store.list(Kind::DeviceModel).await?;
                let mut rules = self.store.list(Kind::Rule).await?;
                let groups = self.store.list(Kind::NodeGroup).await?;
                // Routed together, as one listing at the earlier revision:
                // events between the two listings are replayed, which is
                // harmless (an unchanged object routes to no change); the
                // later revision would skip them.
                rules.0.extend(groups.0);
                rules.1 = rules.1.min(groups.1);
                let nodes = self.store.list(Kind::Node).await?;
                Ok::<_, StoreError>((items, devices, models, rules, nodes, rev))
            };
            let (items, devices, models, rules, nodes, rev) = match listed.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "hub: list instances and devices");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut per_node = self.resync(items, rev, first);
            self.resync_devices(devices, models, rev, first, &mut per_node);
            self.resync_rules(rules, nodes, rev, first, &mut per_node);
            self.apply_resync(rev, per_node);
            first = false;
            self.views_ready.store(true, Ordering::Release);
            let mut watch = match self.store.watch(None, rev).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "hub: watch instances; relisting");
                    // The list worked but the watch did not: do not spin.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(ev) = watch.recv().await {
                match ev {
                    Ok(ev) => match ev.object.kind {
                        Kind::AppInstance => self.on_instance_event(ev.revision, ev.event, &ev.object),
                        Kind::Device | Kind::DeviceModel => self.on_device_event(ev.revision, ev.event, &ev.object),
                        Kind::Rule | Kind::NodeGroup | Kind::Node => {
                            self.on_rule_event(ev.revision, ev.event, &ev.object)
                        }
                        _ => {}
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "hub: instance watch ended; relisting");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Device part of a (re)listing: seeds the views the first time,
    /// otherwise adds to `per_node` what makes each view match the listing.
    fn resync_devices(
        &self,
        (devices, device_rev): (Vec<StoredObject>, u64),
        (models, model_rev): (Vec<StoredObject>, u64),
        rev: u64,
        first: bool,
        per_node: &mut HashMap<String, Vec<Change>>,
    ) {
        let routing = DeviceRouting::build(&devices, &models);
        let wanted = routing.wanted();
        let mut inner = self.lock();
        // Events up to a kind's listing revision are already in it: the
        // watch (from `rev`, the instances' listing) replays them.
        inner.device_listed = (device_rev.max(rev), model_rev.max(rev));
        inner.devices = routing;
        merge_wanted(&mut inner, wanted, &[Kind::Device, Kind::DeviceModel], first, per_node);
    }

    /// Rule part of a (re)listing (rules follow node labels).
    fn resync_rules(
        &self,
        (rules, rule_rev): (Vec<StoredObject>, u64),
        (nodes, node_rev): (Vec<StoredObject>, u64),
        rev: u64,
        first: bool,
        per_node: &mut HashMap<String, Vec<Change>>,
    ) {
        let routing = RuleRouting::build(&rules, &nodes);
        let wanted = routing.wanted();
        let mut inner = self.lock();
        inner.rule_listed = (rule_rev.max(rev), node_rev.max(rev));
        inner.rules = routing;
        merge_wanted(&mut inner, wanted, &[Kind::Rule, Kind::NodeGroup], first, per_node);
    }

    fn on_rule_event(&self, rev: u64, ev: EventType, o: &StoredObject) {
        let mut touched = Vec::new();
        {
            let mut inner = self.lock();
            let listed = if o.kind == Kind::Node { inner.rule_listed.1 } else { inner.rule_listed.0 };
            if rev <= listed {
                return;
            }
            let object = (ev != EventType::Deleted).then_some(o);
            let changes = match o.kind {
                Kind::Rule | Kind::NodeGroup => inner.rules.on_object(o.kind, &o.name, object),
                _ => inner.rules.on_node(&o.name, object),
            };
            for (node, c) in changes {
                if inner.view_mut(&node).apply(rev, c).is_some() {
                    touched.push(node);
                }
            }
        }
        for n in touched {
            self.poke(&n);
        }
    }

    /// Applies a relisting's changes, one delta per node at the listing's
    /// revision.
    fn apply_resync(&self, rev: u64, per_node: HashMap<String, Vec<Change>>) {
        let mut changed = Vec::new();
        {
            let mut inner = self.lock();
            for (node, changes) in per_node {
                if changes.is_empty() {
                    continue;
                }
                if inner.view_mut(&node).apply(rev, changes).is_some() {
                    changed.push(node);
                }
            }
        }
        for n in changed {
            self.poke(&n);
        }
    }

    fn on_device_event(&self, rev: u64, ev: EventType, o: &StoredObject) {
        let mut touched = Vec::new();
        {
            let mut inner = self.lock();
            let listed = if o.kind == Kind::Device { inner.device_listed.0 } else { inner.device_listed.1 };
            if rev <= listed {
                return; // already in the listing the views were built from
            }
            let object = (ev != EventType::Deleted).then_some(o);
            let changes = match o.kind {
                Kind::Device => inner.devices.on_device(&o.name, object),
                _ => inner.devices.on_model(&o.name, object),
            };
            for (node, c) in changes {
                if inner.view_mut(&node).apply(rev, c).is_some() {
                    touched.push(node);
                }
            }
        }
        for n in touched {
            self.poke(&n);
        }
    }

    /// Instance part of a (re)listing: seeds the views the first time,
    /// otherwise returns what makes each view match the listing.
    fn resync(&self, items: Vec<StoredObject>, rev: u64, first: bool) -> HashMap<String, Vec<Change>> {
        let mut per_node: HashMap<String, Vec<Change>> = HashMap::new();
        {
            let mut inner = self.lock();
            if first {
                inner.base_revision = rev;
            }
            let mut want: HashMap<String, (String, u64, DesiredObject)> = HashMap::new();
            for o in &items {
                if let Some(d) = desired_of(o) {
                    want.insert(o.name.clone(), d);
                }
            }
            if first {
                for (name, (node, generation, obj)) in want {
                    inner.view_mut(&node).seed(obj);
                    inner.placed.insert(name, (node, generation));
                }
                return per_node;
            }
            // Diff the views against the fresh listing.
            let old: Vec<(String, (String, u64))> = inner.placed.drain().collect();
            for (name, (node, generation)) in &old {
                match want.get(name) {
                    Some((n, g, _)) if n == node && g == generation => {}
                    _ => per_node
                        .entry(node.clone())
                        .or_default()
                        .push(Change::Remove { kind: Kind::AppInstance, name: name.clone() }),
                }
            }
            let old: HashMap<String, (String, u64)> = old.into_iter().collect();
            for (name, (node, generation, obj)) in want {
                if old.get(&name) != Some(&(node.clone(), generation)) {
                    per_node.entry(node.clone()).or_default().push(Change::Upsert { object: obj });
                }
                inner.placed.insert(name, (node, generation));
            }
        }
        per_node
    }

    fn on_instance_event(&self, rev: u64, ev: EventType, o: &StoredObject) {
        let mut touched = Vec::new();
        {
            let mut inner = self.lock();
            let prev = inner.placed.get(&o.name).cloned();
            match ev {
                EventType::Deleted => {
                    if let Some((node, _)) = prev {
                        inner.placed.remove(&o.name);
                        let c = Change::Remove { kind: o.kind, name: o.name.clone() };
                        if inner.view_mut(&node).apply(rev, vec![c]).is_some() {
                            touched.push(node);
                        }
                    }
                }
                EventType::Added | EventType::Modified => {
                    let Some((node, generation)) = placement_of(o) else { return };
                    if prev.as_ref() == Some(&(node.clone(), generation)) {
                        return; // status-only change
                    }
                    let obj = desired_value(o);
                    if let Some((old_node, _)) = prev.filter(|(n, _)| *n != node) {
                        let c = Change::Remove { kind: o.kind, name: o.name.clone() };
                        if inner.view_mut(&old_node).apply(rev, vec![c]).is_some() {
                            touched.push(old_node);
                        }
                    }
                    inner.placed.insert(o.name.clone(), (node.clone(), generation));
                    if inner.view_mut(&node).apply(rev, vec![Change::Upsert { object: obj }]).is_some() {
                        touched.push(node);
                    }
                }
            }
        }
        for n in touched {
            self.poke(&n);
        }
    }

    fn poke(&self, node: &str) {
        if let Some(l) = self.lock().links.get(node) {
            l.notify.notify_one();
        }
    }

    /// Whether the views are built and edges may be served.
    pub fn is_ready(&self) -> bool {
        self.views_ready.load(Ordering::Acquire)
    }

    /// Whether `node` has a live connection.
    pub fn is_connected(&self, node: &str) -> bool {
        self.lock().links.contains_key(node)
    }

    /// Names of connected nodes whose last heartbeat is within the grace period.
    pub fn ready_nodes(&self) -> HashMap<String, bool> {
        let inner = self.lock();
        inner
            .live
            .iter()
            .map(|(n, l)| {
                let ok = inner.links.contains_key(n) && l.last_heartbeat.is_some_and(|t| t.elapsed() < self.cfg.grace);
                (n.clone(), ok)
            })
            .collect()
    }

    /// Grace period.
    pub fn grace(&self) -> Duration {
        self.cfg.grace
    }

    /// Keeps `node`'s latest network report (in memory: it reaches the
    /// store with the node's status writes) and where peers reach it.
    fn note_network(&self, node: &str, network: Option<Box<NetworkStatus>>, peer_addr: &str) {
        let mut inner = self.lock();
        let l = inner.live.entry(node.to_string()).or_default();
        if let Some(n) = network {
            l.network = Some((*n, Instant::now()));
        }
        l.peer_addr = if peer_addr.is_empty() {
            String::new()
        } else {
            match crate::tracker::peer_addr(peer_addr, &l.address) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(node, addr = peer_addr, error = ?e, "peer address ignored");
                    String::new()
                }
            }
        };
    }

    /// The latency matrix of the nodes this replica serves (their latest
    /// reports). `GET /v1/latency` completes it from the store.
    pub fn latency_matrix(&self) -> LatencyMatrix {
        let inner = self.lock();
        let mut m = LatencyMatrix::default();
        for (node, l) in &inner.live {
            if let Some((n, _)) = &l.network {
                m.insert_report(node, n);
            }
        }
        m
    }

    /// `(from, to, rtt ms)` of every measured node pair this replica knows:
    /// the cheap accessor for placement.
    pub fn latency_snapshot(&self) -> Vec<(String, String, f64)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (from, l) in &inner.live {
            let Some((n, _)) = &l.network else { continue };
            for (to, q) in &n.peers {
                if let Some(r) = q.rtt_ms {
                    out.push((from.clone(), to.clone(), r));
                }
            }
        }
        out
    }

    /// Silence and peer verdicts per node, as the node lifecycle loop last
    /// judged them (docs/design/018-latency-and-peer-health.md).
    pub fn liveness(&self) -> Arc<Liveness> {
        self.liveness.clone()
    }

    /// The peers `node` probes that serve peers, with their addresses:
    /// [`crate::health::probe_targets`] over the member lists of the
    /// NodeGroups (read from the store at most every 5 s) and this and the
    /// other replicas' peer addresses. The sample rotates every minute.
    pub async fn probe_targets(&self, node: &str) -> Result<Vec<(String, String)>, StoreError> {
        let dir = {
            let mut cache = self.targets.lock().await;
            match cache.as_ref().filter(|(t, _)| t.elapsed() < GROUPS_TTL) {
                Some((_, d)) => d.clone(),
                None => {
                    let (items, _) = self.store.list(Kind::NodeGroup).await?;
                    let mut groups: Vec<Vec<String>> = items
                        .iter()
                        .filter_map(|g| objects::decode::<NodeGroupSpec>(g).ok())
                        .map(|g| {
                            let mut m = g.status.members;
                            m.sort();
                            m
                        })
                        .collect();
                    groups.retain(|m| m.len() > 1);
                    let addrs = self.peer_addresses();
                    let mut serving: Vec<String> = addrs.keys().cloned().collect();
                    serving.sort();
                    let d = Arc::new(TargetDirectory { groups, serving, addrs });
                    *cache = Some((Instant::now(), d.clone()));
                    d
                }
            }
        };
        let mine: Vec<&[String]> = dir
            .groups
            .iter()
            .filter(|m| m.binary_search_by(|x| x.as_str().cmp(node)).is_ok())
            .map(Vec::as_slice)
            .collect();
        let round = objects::unix_now() / 60;
        Ok(crate::health::probe_targets(node, &mine, &dir.serving, round)
            .into_iter()
            .filter_map(|n| dir.addrs.get(&n).map(|a| (n, a.clone())))
            .collect())
    }

    /// Peer addresses of the nodes the other replicas serve, and of every
    /// node this one heard from (a node whose cloud link is down must stay
    /// a target of its peers: they are the ones who can still see it).
    fn peer_addresses(&self) -> HashMap<String, String> {
        let mut out = self.remote.lock().expect("remote view lock").peer_addrs.clone();
        let inner = self.lock();
        for (n, l) in &inner.live {
            if !l.peer_addr.is_empty() {
                out.insert(n.clone(), l.peer_addr.clone());
            }
        }
        out
    }

    /// Updates the connected-nodes and sync-queue-depth gauges. O(nodes):
    /// called from the periodic node loop and on scrape, never per message.
    pub fn refresh_gauges(&self) {
        let inner = self.lock();
        let behind = inner
            .links
            .keys()
            .filter(|n| {
                let synced = inner.live.get(*n).map_or(0, |l| l.synced);
                inner.views.get(*n).is_some_and(|v| v.revision() > synced)
            })
            .count();
        self.metrics.sync_queue_depth.store(behind as u64, Ordering::Relaxed);
        self.metrics.connected_nodes.store(inner.links.len() as u64, Ordering::Relaxed);
    }

    /// Opens a log stream from `instance` on `node`.
    pub fn open_log(
        &self,
        node: &str,
        instance: &str,
        tail: Option<u64>,
        follow: bool,
    ) -> Result<mpsc::Receiver<String>, HubError> {
        let control = self
            .lock()
            .links
            .get(node)
            .map(|l| l.control.clone())
            .ok_or_else(|| HubError::NotConnected(node.to_string()))?;
        let stream = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        self.logs.lock().expect("log map lock").insert(stream, (node.to_string(), tx));
        let req = Down::LogRequest { stream, instance: instance.to_string(), tail, follow };
        if control.try_send(req).is_err() {
            self.logs.lock().expect("log map lock").remove(&stream);
            return Err(HubError::NotConnected(node.to_string()));
        }
        Ok(rx)
    }

    /// Sets where store-and-forward data is stored. Until it is set, data
    /// batches are not acknowledged (edges keep them).
    pub fn set_data_store(&self, store: Arc<dyn DataStore>) {
        if self.data.set(store).is_err() {
            tracing::warn!("data store set twice; keeping the first");
        }
    }

    /// Stores the batches a connection receives, one at a time and in
    /// order, and acknowledges each once stored (or known).
    async fn run_data(self: Arc<Self>, node: String, mut rx: mpsc::Receiver<DataIn>, control: mpsc::Sender<Down>) {
        while let Some(b) = rx.recv().await {
            let Some(store) = self.data.get().cloned() else {
                tracing::warn!(node = %node, "no data store: batch {} kept by the edge", b.id);
                continue;
            };
            let lock = self.data_locks.lock().expect("data locks").entry(node.clone()).or_default().clone();
            // Held by the blocking call itself, so the node's next batch
            // waits for this one even if this task is aborted meanwhile.
            let held = lock.lock_owned().await;
            let n = node.clone();
            let id = b.id;
            let result = tokio::task::spawn_blocking(move || {
                let _held = held;
                if b.points > MAX_BATCH_POINTS {
                    return Err(DataStoreError::Malformed(format!(
                        "{} points in one batch (at most {MAX_BATCH_POINTS})",
                        b.points
                    )));
                }
                let series =
                    yunbian_tsdb::batch::decode(&b.payload).map_err(|e| DataStoreError::Malformed(e.to_string()))?;
                let got: u64 = series.iter().map(|s| s.points.len() as u64).sum();
                if got != b.points {
                    return Err(DataStoreError::Malformed(format!("{got} points, header says {}", b.points)));
                }
                store.ingest(&n, b.id, b.first_id, series)
            })
            .await;
            let m = &self.metrics;
            let ack = match result {
                Ok(Ok(Ingested::Stored { accepted, rejected })) => {
                    m.data_batches_stored.fetch_add(1, Ordering::Relaxed);
                    m.data_points_stored.fetch_add(accepted, Ordering::Relaxed);
                    if rejected > 0 {
                        m.data_points_rejected.fetch_add(rejected, Ordering::Relaxed);
                        tracing::warn!(node = %node, batch = id, rejected, "points of a batch refused by the data store");
                    }
                    true
                }
                Ok(Ok(Ingested::Duplicate)) => {
                    m.data_batches_duplicate.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Ok(Err(DataStoreError::Malformed(e))) => {
                    // Sending it again cannot help: acknowledge, count, log.
                    m.data_batches_malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(node = %node, batch = id, error = %e, "malformed data batch dropped");
                    true
                }
                Ok(Err(e)) => {
                    m.data_store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %node, batch = id, error = %e, "data batch not stored; the edge will resend it");
                    false
                }
                Err(e) => {
                    m.data_store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(node = %node, batch = id, error = %e, "data ingest task failed");
                    false
                }
            };
            if ack && control.send(Down::DataAck { ids: vec![id] }).await.is_err() {
                return; // connection gone; the edge sends it again and we answer Duplicate
            }
        }
    }

    /// Serves one authenticated node connection until it ends.
    pub async fn serve(self: Arc<Self>, node: String, address: String, cert_expiry: u64, mut ws: WebSocket) {
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let (control_tx, mut control_rx) = mpsc::channel::<Down>(256);
        let (data_tx, data_rx) = mpsc::channel::<DataIn>(DATA_QUEUE);
        // Acks have their own channel: the control channel's only sender
        // must stay the link map's, so a newer connection that replaces the
        // link ends this one.
        let (ack_tx, mut ack_rx) = mpsc::channel::<Down>(DATA_QUEUE * 2);
        let data_task = tokio::spawn(self.clone().run_data(node.clone(), data_rx, ack_tx));
        {
            let mut inner = self.lock();
            inner.links.insert(node.clone(), Link { conn, notify: notify.clone(), control: control_tx });
            let live = inner.live.entry(node.clone()).or_default();
            live.address = address;
            // `last_heartbeat` is left alone: Ready needs a heartbeat (which
            // carries node info), not just a connection, so a node that never
            // reported its capacity cannot look Ready; a reconnecting node
            // keeps its last one and does not flap.
            live.last_status_write = None;
        }
        tracing::info!(node = %node, "edge connected");
        let expiry = yunbian_api::time::format_rfc3339(cert_expiry);
        let _ = update_status::<NodeSpec>(&self.store, &node, |n| {
            if n.status.certificate_expiry == expiry {
                return false;
            }
            n.status.certificate_expiry = expiry.clone();
            true
        })
        .await;

        let mut session = CloudSession::new(self.cfg.session);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_heard = Instant::now();
        let reason: String = loop {
            let actions = tokio::select! {
                msg = ws.recv() => {
                    let bytes = match msg {
                        Some(Ok(Message::Binary(b))) => b,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => break "closed by edge".into(),
                        Some(Ok(Message::Text(_))) => break "text frame on binary protocol".into(),
                        Some(Err(e)) => break format!("read: {e}"),
                    };
                    let up = match decode_up(&bytes) {
                        Ok(up) => up,
                        Err(e) => break format!("bad message: {e}"),
                    };
                    last_heard = Instant::now();
                    match up {
                        Up::Heartbeat { info, usage, limits_enforced, limits_note, disk_pressure, network, peer_addr } => {
                            self.note_network(&node, network, &peer_addr);
                            self.heartbeat(&node, info, usage, (limits_enforced, limits_note), disk_pressure).await;
                            continue;
                        }
                        Up::LogData { stream, data } => {
                            if !self.log_data(&node, stream, data) {
                                vec![CloudAction::Send(Down::LogCancel { stream })]
                            } else {
                                continue;
                            }
                        }
                        Up::LogEnd { stream, error } => {
                            self.log_end(&node, stream, error);
                            continue;
                        }
                        Up::Data { id, first_id, points, payload, .. } => {
                            // Back-pressure, not loss: a full queue (a slow
                            // store) holds this connection's reads, and TCP
                            // then holds the edge.
                            if data_tx.send(DataIn { id, first_id, points, payload }).await.is_err() {
                                break "data task ended".into();
                            }
                            continue;
                        }
                        up => {
                            let now = self.now_ms();
                            let mut inner = self.lock();
                            let view = inner.view_mut(&node);
                            session.on_up(up, view, now)
                        }
                    }
                }
                _ = notify.notified() => {
                    let now = self.now_ms();
                    let mut inner = self.lock();
                    session.on_view_changed(inner.view_mut(&node), now)
                }
                Some(a) = ack_rx.recv() => vec![CloudAction::Send(a)],
                c = control_rx.recv() => match c {
                    Some(d) => vec![CloudAction::Send(d)],
                    None => break "replaced by a newer connection".into(),
                },
                _ = tick.tick() => {
                    if last_heard.elapsed() > self.cfg.grace {
                        break "heartbeat timeout".into();
                    }
                    let now = self.now_ms();
                    let mut inner = self.lock();
                    session.on_tick(inner.view_mut(&node), now)
                }
            };
            if let Err(r) = self.execute(&node, actions, &mut ws).await {
                break r;
            }
        };
        tracing::info!(node = %node, reason = %reason, "edge disconnected");
        drop(data_tx);
        data_task.abort();
        let _ = ws.send(Message::Close(None)).await;
        {
            let mut inner = self.lock();
            if inner.links.get(&node).is_some_and(|l| l.conn == conn) {
                inner.links.remove(&node);
            }
        }
        // End this node's log streams, unless a newer connection serves it
        // (its streams are its own).
        let replaced = self.lock().links.get(&node).is_some_and(|l| l.conn != conn);
        if !replaced {
            self.logs.lock().expect("log map lock").retain(|_, (n, _)| *n != node);
        }
    }

    async fn execute(&self, node: &str, actions: Vec<CloudAction>, ws: &mut WebSocket) -> Result<(), String> {
        for a in actions {
            match a {
                CloudAction::Send(d) => {
                    ws.send(Message::Binary(encode(&d).into())).await.map_err(|e| format!("write: {e}"))?;
                    self.metrics.sync_messages_sent.fetch_add(1, Ordering::Relaxed);
                }
                CloudAction::PersistReports(items) => {
                    self.apply_reports(node, items).await.map_err(|e| format!("store reports: {e}"))?;
                }
                CloudAction::Synced(rev) => {
                    if let Some(l) = self.lock().live.get_mut(node) {
                        l.synced = rev;
                    }
                }
                CloudAction::Close(reason) => return Err(reason),
            }
        }
        Ok(())
    }

    async fn apply_reports(&self, node: &str, items: Vec<(u64, Report)>) -> Result<(), StoreError> {
        for (seq, report) in items {
            match report {
                Report::InstanceStatus { instance, status } => {
                    let r = update_status::<AppInstanceSpec>(&self.store, &instance, |o| {
                        if o.spec.node != node {
                            tracing::warn!(node, instance = %instance, "status for an instance of another node ignored");
                            return false;
                        }
                        if o.status.observed_seq >= seq {
                            return false;
                        }
                        o.status = status.clone();
                        o.status.observed_seq = seq;
                        true
                    })
                    .await;
                    match r {
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Report::RuleStatus { rule, status } => {
                    let members = self.lock().rules.placed_on(&rule).cloned().unwrap_or_default();
                    if !members.contains(node) {
                        tracing::debug!(node, rule = %rule, "status of a rule not placed on the node ignored");
                        self.metrics.reports_applied.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let r = update_status::<RuleSpec>(&self.store, &rule, |o| {
                        // Nodes the rule left (unselected, paused, deleted) drop out.
                        let before = o.status.nodes.len();
                        o.status.nodes.retain(|n, _| members.contains(n));
                        if o.status.nodes.get(node) == Some(&status) && o.status.nodes.len() == before {
                            return false;
                        }
                        o.status.nodes.insert(node.to_string(), status.clone());
                        true
                    })
                    .await;
                    match r {
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Report::Alert { rule, series, firing, severity, message, value, since_ms, at_ms, .. } => {
                    let members = self.lock().rules.placed_on(&rule).cloned().unwrap_or_default();
                    if !members.contains(node) {
                        tracing::debug!(node, rule = %rule, "alert of a rule not placed on the node ignored");
                    } else {
                        let r = AlertReport { rule, series, firing, severity, message, value, since_ms, at_ms, seq };
                        crate::events::record_alert(&self.store, node, &r).await?;
                    }
                }
                Report::DeviceStatus { device, status } => {
                    let r = update_status::<DeviceSpec>(&self.store, &device, |o| {
                        let assigned =
                            if o.spec.node.is_empty() { o.status.node.as_str() } else { o.spec.node.as_str() };
                        if assigned != node {
                            tracing::warn!(node, device = %device, "status for a device of another node ignored");
                            return false;
                        }
                        if o.status.reported_by == node && o.status.observed_seq >= seq {
                            return false;
                        }
                        let message = std::mem::take(&mut o.status.message);
                        o.status = status.clone();
                        o.status.node = node.to_string();
                        o.status.message = message;
                        o.status.observed_seq = seq;
                        o.status.reported_by = node.to_string();
                        true
                    })
                    .await;
                    match r {
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            self.metrics.reports_applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn heartbeat(
        &self,
        node: &str,
        info: NodeInfo,
        usage: NodeUsage,
        limits: (bool, String),
        disk_pressure: String,
    ) {
        let write = {
            let mut inner = self.lock();
            let synced = inner.live.get(node).map_or(0, |l| l.synced);
            let l = inner.live.entry(node.to_string()).or_default();
            l.synced = synced;
            l.last_heartbeat = Some(Instant::now());
            // Usage (instance count included) is refreshed every
            // `status_interval`: writing it on every change would double
            // the store writes of a fleet-wide rollout.
            // Written at once (not at the next status interval): a drop, a
            // new error, and the backlog emptying or starting.
            let drops = |u: &NodeUsage| {
                u.data_outbox.as_ref().map(|d| {
                    (
                        d.dropped_expired_points,
                        d.dropped_full_points,
                        d.dropped_disk_points,
                        d.last_error.clone(),
                        d.queued_batches == 0,
                    )
                })
            };
            // The network report alone is written when the status write
            // is due, or when the cloud RTT moved by more than 20 %.
            let rtt = l.network.as_ref().and_then(|(n, _)| n.cloud.rtt_ms);
            let rtt_moved = match (rtt, l.network_written) {
                (Some(now), Some(was)) => (now - was).abs() > (was * RTT_CHANGE).max(RTT_FLOOR_MS),
                (Some(_), None) => true,
                _ => false,
            };
            let changed = rtt_moved
                || l.info != info
                || l.limits != limits
                || l.disk_pressure != disk_pressure
                || drops(&l.usage) != drops(&usage);
            if l.disk_pressure != disk_pressure {
                if disk_pressure.is_empty() {
                    tracing::info!(node, "disk pressure cleared");
                } else {
                    tracing::warn!(node, reason = %disk_pressure, "node under disk pressure");
                }
            }
            l.info = info;
            l.usage = usage;
            l.limits = limits;
            l.disk_pressure = disk_pressure;
            let due = l.last_status_write.is_none_or(|t| t.elapsed() >= self.cfg.status_interval);
            if changed || due {
                l.last_status_write = Some(Instant::now());
                l.network_written = rtt;
            }
            (changed || due).then(|| {
                (
                    l.info.clone(),
                    l.usage.clone(),
                    l.limits.clone(),
                    l.address.clone(),
                    l.synced,
                    l.disk_pressure.clone(),
                    l.network.as_ref().map(|(n, _)| n.clone()),
                )
            })
        };
        if let Some((info, usage, limits, address, synced, disk_pressure, network)) = write {
            let r = update_status::<NodeSpec>(&self.store, node, |n| {
                if n.status.phase != NodePhase::Ready {
                    n.status.last_transition = now_rfc3339();
                    n.status.ready_since = now_rfc3339();
                }
                if n.status.ready_since.is_empty() {
                    n.status.ready_since = now_rfc3339();
                }
                if network.is_some() {
                    n.status.network = network.clone();
                }
                n.status.phase = NodePhase::Ready;
                n.status.reason = String::new();
                n.status.allocatable.cpu_millis = u64::from(info.cpus) * 1000;
                n.status.allocatable.memory_bytes = info.memory_bytes;
                // Extended resources: the healthy devices of the node's
                // device plugins, per resource (allocated ones included).
                n.status.allocatable.extended.clear();
                for d in info.devices.iter().filter(|d| d.healthy) {
                    *n.status.allocatable.extended.entry(d.resource.clone()).or_default() += 1;
                }
                n.status.info = info.clone();
                n.status.usage = usage.clone();
                n.status.limits_enforced = limits.0;
                n.status.limits_note = limits.1.clone();
                n.status.address = address.clone();
                n.status.synced_revision = synced;
                n.status.disk_pressure = disk_pressure.clone();
                n.status.last_heartbeat = now_rfc3339();
                true
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(node, error = %e, "write node status");
            }
        }
    }

    /// Forwards log data of `node`'s stream; false when the stream is gone
    /// or its reader cannot keep up (the stream is then cancelled: the
    /// connection loop never waits for a log reader).
    fn log_data(&self, node: &str, stream: u64, data: String) -> bool {
        let mut logs = self.logs.lock().expect("log map lock");
        let Some((owner, tx)) = logs.get(&stream) else { return false };
        if owner != node {
            tracing::warn!(node, stream, "log data for another node's stream ignored");
            return true;
        }
        if tx.try_send(data).is_ok() {
            return true;
        }
        logs.remove(&stream);
        false
    }

    fn log_end(&self, node: &str, stream: u64, error: Option<String>) {
        let mut logs = self.logs.lock().expect("log map lock");
        if logs.get(&stream).is_some_and(|(owner, _)| owner == node) {
            if let (Some((_, tx)), Some(e)) = (logs.remove(&stream), error) {
                let _ = tx.try_send(format!("error: {e}\n"));
            }
        }
    }

    /// Drops log streams whose reader is gone and tells their nodes to stop
    /// (a quiet `logs -f` whose client left would otherwise linger).
    fn reap_log_streams(&self) {
        let gone: Vec<(u64, String)> = {
            let mut logs = self.logs.lock().expect("log map lock");
            let gone = logs.iter().filter(|(_, (_, tx))| tx.is_closed()).map(|(id, (n, _))| (*id, n.clone())).collect();
            logs.retain(|_, (_, tx)| !tx.is_closed());
            gone
        };
        let inner = self.lock();
        for (stream, node) in gone {
            if let Some(l) = inner.links.get(&node) {
                let _ = l.control.try_send(Down::LogCancel { stream });
            }
        }
    }

    /// Recomputes every NodeGroup's membership counts.
    /// Returns every group's sorted member list.
    async fn update_node_groups(&self, store: &Arc<dyn Store>, nodes: &[StoredObject]) -> Vec<Vec<String>> {
        let mut lists = Vec::new();
        let Ok((groups, _)) = store.list(Kind::NodeGroup).await else { return lists };
        if groups.is_empty() {
            return lists;
        }
        let Ok((insts, _)) = store.list(Kind::AppInstance).await else { return lists };
        let mut per_node: HashMap<String, yunbian_api::Allocatable> = HashMap::new();
        for i in &insts {
            let node = i.value.pointer("/spec/node").and_then(|v| v.as_str()).unwrap_or_default();
            let req = |f: &str| {
                i.value
                    .pointer(&format!("/spec/template/resources/requests/{f}"))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            let list = yunbian_api::ResourceList { cpu: req("cpu"), memory: req("memory") };
            let a = per_node.entry(node.to_string()).or_default();
            a.cpu_millis += list.cpu_millis();
            a.memory_bytes += list.memory_bytes();
        }
        let instances = &per_node;
        let nodes: Vec<_> = nodes.iter().filter_map(|n| objects::decode::<NodeSpec>(n).ok()).collect();
        for g in groups {
            let Ok(group) = objects::decode::<NodeGroupSpec>(&g) else { continue };
            let members: Vec<_> = nodes
                .iter()
                .filter(|n| yunbian_api::selector_matches(&group.spec.selector, &n.metadata.labels))
                .collect();
            let ready: Vec<_> = members.iter().filter(|n| n.status.phase == NodePhase::Ready).collect();
            let mut allocatable = yunbian_api::Allocatable::default();
            for n in &ready {
                allocatable.cpu_millis += n.status.allocatable.cpu_millis;
                allocatable.memory_bytes += n.status.allocatable.memory_bytes;
                for (k, v) in &n.status.allocatable.extended {
                    *allocatable.extended.entry(k.clone()).or_default() += v;
                }
            }
            let mut names: Vec<String> = members.iter().map(|n| n.metadata.name.clone()).collect();
            names.sort();
            let requested = requested_on(&names, instances);
            lists.push(names.clone());
            let want = NodeGroupStatus {
                nodes: members.len() as u32,
                ready_nodes: ready.len() as u32,
                members: names,
                allocatable,
                requested,
            };
            if group.status != want {
                let _ = update_status::<NodeGroupSpec>(store, &g.name, |o| {
                    o.status = want.clone();
                    true
                })
                .await;
            }
        }
        lists
    }

    /// Reads the other replicas' presence records into the remote view.
    async fn refresh_remote(&self, coord: &Arc<dyn Coordinator>) {
        let records = match coord.presences().await {
            Ok(p) => p,
            Err(e) => return tracing::debug!(error = %e, "read presences"),
        };
        let now = Instant::now();
        let mut view = RemoteView::default();
        for (_, data) in records {
            let rec = PresenceRecord::parse(&data);
            if rec.hub == self.hub_id {
                continue;
            }
            view.served.extend(rec.nodes);
            view.peer_addrs.extend(rec.peer_addrs);
            for (target, reports) in rec.peer_views {
                view.peer_views.entry(target).or_default().extend(reports.into_iter().map(|r| (r, now)));
            }
        }
        *self.remote.lock().expect("remote view lock") = view;
    }

    /// This replica's presence record: the nodes it serves with a recent
    /// heartbeat, their peer addresses, and what they report about nodes
    /// no replica hears (bounded by the silent nodes and their peers).
    fn presence_record(&self) -> PresenceRecord {
        let ready: std::collections::HashSet<String> =
            self.ready_nodes().into_iter().filter(|(_, ok)| *ok).map(|(n, _)| n).collect();
        let remote_served = self.remote.lock().expect("remote view lock").served.clone();
        let inner = self.lock();
        let mut rec = PresenceRecord { hub: self.hub_id.clone(), ..Default::default() };
        for (n, l) in &inner.live {
            if !l.peer_addr.is_empty() {
                rec.peer_addrs.insert(n.clone(), l.peer_addr.clone());
            }
        }
        for n in &ready {
            let Some(l) = inner.live.get(n) else { continue };
            let Some((net, at)) = &l.network else { continue };
            for (target, q) in &net.peers {
                if ready.contains(target) || remote_served.contains(target) {
                    continue;
                }
                rec.peer_views.entry(target.clone()).or_default().push(RemoteReport {
                    reporter: n.clone(),
                    age_ms: at.elapsed().as_millis() as u64,
                    last_seen_secs: q.last_seen_secs,
                });
            }
        }
        rec.nodes = ready.into_iter().collect();
        rec.nodes.sort();
        rec
    }

    /// Why a node without heartbeat is NotReady; an expired certificate
    /// says whether the node can still renew it and, if not, what to run.
    fn not_ready_reason(&self, n: &StoredObject) -> String {
        let now = crate::objects::unix_now();
        let expiry = n.value.pointer("/status/certificateExpiry").and_then(|e| e.as_str()).unwrap_or_default();
        match yunbian_api::time::parse_rfc3339(expiry) {
            Some(t) if t <= now && now < t.saturating_add(self.cfg.cert_grace.as_secs()) => format!(
                "no heartbeat within the grace period; certificate expired at {expiry}, the node renews it when it reconnects"
            ),
            Some(t) if t <= now => format!(
                "certificate expired at {expiry}, longer ago than the renewal grace ({}): {}",
                human_duration(self.cfg.cert_grace),
                yunbian_api::rejoin_hint(&n.name, &self.cfg.url, None)
            ),
            _ => "no heartbeat within the grace period".to_string(),
        }
    }

    /// Per-replica duties, every replica: gauges, reaping log streams whose
    /// reader left, closing connections of deleted nodes, and publishing
    /// which nodes this replica serves with a recent heartbeat (its
    /// presence record, which the leader's lifecycle controller reads).
    pub async fn run_housekeeping(self: Arc<Self>, coord: Arc<dyn Coordinator>, replica: String) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat.min(Duration::from_secs(2)));
        let mut published: Option<Vec<u8>> = None;
        let mut last_publish = Instant::now();
        let mut last_event_expiry: Option<Instant> = None;
        loop {
            tick.tick().await;
            self.refresh_gauges();
            self.reap_log_streams();
            if last_event_expiry.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
                last_event_expiry = Some(Instant::now());
                let ttl = crate::events::RESOLVED_TTL_SECS;
                match crate::events::expire_resolved(&self.store, objects::unix_now(), ttl).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(events = n, "deleted events resolved more than 7 days ago"),
                    Err(e) => tracing::warn!(error = %e, "housekeeping: expire events"),
                }
            }
            self.refresh_remote(&coord).await;
            let data = serde_json::to_vec(&self.presence_record()).unwrap_or_default();
            // Republish unchanged data now and then: a store that lost the
            // record (etcd restarted, lease expired) gets it back.
            if published.as_ref() != Some(&data) || last_publish.elapsed() >= Duration::from_secs(10) {
                match coord.set_presence(&replica, data.clone()).await {
                    Ok(()) => {
                        published = Some(data);
                        last_publish = Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "publish presence"),
                }
            }
            match self.store.list(Kind::Node).await {
                Ok((nodes, rev)) => {
                    self.metrics.store_revision.store(rev, Ordering::Relaxed);
                    // A deleted node loses its connection (its certificate
                    // stays valid until expiry, but the hub refuses it
                    // without a Node).
                    let names: std::collections::HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
                    self.lock().links.retain(|n, _| {
                        let keep = names.contains(n.as_str());
                        if !keep {
                            tracing::info!(node = %n, "node deleted; closing its connection");
                        }
                        keep
                    });
                }
                Err(e) => tracing::warn!(error = %e, "housekeeping: list nodes"),
            }
        }
    }

    /// The node lifecycle controller (leader only; `store` is the fenced
    /// store): a node is Ready while some replica serves it with recent
    /// heartbeats (the replicas' presence records) or its last heartbeat,
    /// written by whichever replica serves it, is within the grace period;
    /// NotReady after that. A node silent for two heartbeat periods that a
    /// majority of its group peers still reach is CloudUnreachable instead
    /// ([`crate::health::verdict`]). Records `readySince` and
    /// `recentFailures`, and publishes silence and verdicts through
    /// [`Hub::liveness`]. Idempotent; writes only changes.
    pub async fn run_node_lifecycle(self: Arc<Self>, store: Arc<dyn Store>, coord: Arc<dyn Coordinator>) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(self.cfg.heartbeat.min(Duration::from_secs(2)));
        // Nodes no replica hears and this hub never heard: since when.
        let mut unheard: HashMap<String, Instant> = HashMap::new();
        let rule = VerdictRule::new(self.cfg.probe, self.cfg.heartbeat);
        loop {
            tick.tick().await;
            let t0 = Instant::now();
            let records = match coord.presences().await {
                Ok(p) => p,
                Err(e) => {
                    // Without presences, judging nodes would mark healthy
                    // ones NotReady: skip the pass.
                    tracing::warn!(error = %e, "node lifecycle: read presences");
                    continue;
                }
            };
            let now = Instant::now();
            let mut served = std::collections::HashSet::new();
            let mut remote_served = std::collections::HashSet::new();
            let mut remote_views: HashMap<String, Vec<RemoteReport>> = HashMap::new();
            for (_, data) in records {
                let rec = PresenceRecord::parse(&data);
                if rec.hub != self.hub_id {
                    remote_served.extend(rec.nodes.iter().cloned());
                    for (target, reports) in rec.peer_views {
                        remote_views.entry(target).or_default().extend(reports);
                    }
                }
                served.extend(rec.nodes);
            }
            let nodes = match store.list(Kind::Node).await {
                Ok((n, _)) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "node lifecycle: list nodes");
                    continue;
                }
            };
            let groups = self.update_node_groups(&store, &nodes).await;
            // Member → its groups: O(members), not O(members²).
            let mut groups_of: HashMap<&str, Vec<usize>> = HashMap::new();
            for (i, members) in groups.iter().enumerate() {
                for m in members {
                    groups_of.entry(m.as_str()).or_default().push(i);
                }
            }
            let phase_of = |n: &StoredObject| match n.value.pointer("/status/phase").and_then(|p| p.as_str()) {
                Some("Ready") => NodePhase::Ready,
                Some("NotReady") => NodePhase::NotReady,
                Some("CloudUnreachable") => NodePhase::CloudUnreachable,
                _ => NodePhase::Unknown,
            };
            let phases: HashMap<&str, NodePhase> = nodes.iter().map(|n| (n.name.as_str(), phase_of(n))).collect();
            // When this hub last heard each node.
            let heard: HashMap<String, Instant> =
                self.lock().live.iter().filter_map(|(n, l)| Some((n.clone(), l.last_heartbeat?))).collect();
            unheard
                .retain(|n, _| phases.contains_key(n.as_str()) && !remote_served.contains(n) && !heard.contains_key(n));
            let mut silent_since: HashMap<String, Instant> = HashMap::new();
            let mut verdicts: HashMap<String, Verdict> = HashMap::new();
            let unix = crate::objects::unix_now();
            for n in &nodes {
                // Read only what is needed: decoding every node on every
                // tick is the dominant cost at 10k+ nodes.
                let phase = phase_of(n);
                let since = if remote_served.contains(&n.name) {
                    None
                } else if let Some(t) = heard.get(&n.name) {
                    (now.saturating_duration_since(*t) > self.cfg.heartbeat).then_some(*t)
                } else {
                    Some(*unheard.entry(n.name.clone()).or_insert(now))
                };
                let silent_for = since.map(|t| now.saturating_duration_since(t));
                if let Some(t) = since {
                    silent_since.insert(n.name.clone(), t);
                }
                let fresh_heartbeat = n
                    .value
                    .pointer("/status/lastHeartbeat")
                    .and_then(|h| h.as_str())
                    .and_then(yunbian_api::time::parse_rfc3339)
                    .is_some_and(|t| unix < t.saturating_add(self.cfg.grace.as_secs().max(1)));
                let is_ready = served.contains(&n.name) || (phase == NodePhase::Ready && fresh_heartbeat);
                let mut seen_by_peers = None;
                if let (Some(since), true) = (since, silent_for.is_some_and(|d| d >= self.cfg.heartbeat * 2)) {
                    // The latest report of each group peer about it: this
                    // hub's, then the other replicas'.
                    let peers: std::collections::HashSet<&str> = groups_of
                        .get(n.name.as_str())
                        .into_iter()
                        .flatten()
                        .flat_map(|i| groups[*i].iter().map(String::as_str))
                        .filter(|p| *p != n.name)
                        .collect();
                    let is_peer = |r: &str| peers.contains(r);
                    let mut about: Vec<PeerReport> = {
                        let inner = self.lock();
                        peers
                            .iter()
                            .filter_map(|r| {
                                let (net, at) = inner.live.get(*r)?.network.as_ref()?;
                                Some(PeerReport {
                                    reporter: r.to_string(),
                                    reporter_phase: phases.get(r).copied().unwrap_or_default(),
                                    received: *at,
                                    last_seen_secs: net.peers.get(&n.name)?.last_seen_secs,
                                })
                            })
                            .collect()
                    };
                    for r in remote_views.get(&n.name).into_iter().flatten() {
                        if is_peer(&r.reporter) && !about.iter().any(|a| a.reporter == r.reporter) {
                            about.push(PeerReport {
                                reporter: r.reporter.clone(),
                                reporter_phase: NodePhase::Ready,
                                received: now.checked_sub(Duration::from_millis(r.age_ms)).unwrap_or(now),
                                last_seen_secs: r.last_seen_secs,
                            });
                        }
                    }
                    let v = crate::health::verdict(&about, since, now, &rule);
                    verdicts.insert(n.name.clone(), v);
                    if v == Verdict::SeenByMajority {
                        seen_by_peers = Some(crate::health::tally(&about, since, now, &rule));
                    }
                }
                let facts = crate::health::NodeFacts {
                    silent_for,
                    seen_by_peers,
                    within_grace: is_ready,
                    settled: started.elapsed() >= self.cfg.grace,
                };
                let Some((want, reason)) =
                    crate::health::judge(&facts, self.cfg.heartbeat, || self.not_ready_reason(n))
                else {
                    continue;
                };
                let have_reason = n.value.pointer("/status/reason").and_then(|r| r.as_str()).unwrap_or_default();
                if crate::health::needs_write(phase, have_reason, want, &reason) {
                    if phase != want {
                        tracing::info!(node = %n.name, phase = ?want, %reason, "node phase changed");
                    }
                    let _ = update_status::<NodeSpec>(&store, &n.name, |o| {
                        if o.status.phase != want {
                            o.status.last_transition = now_rfc3339();
                            match want {
                                // A loss of a node that was up (a node that
                                // never reported is no failure).
                                NodePhase::NotReady
                                    if matches!(o.status.phase, NodePhase::Ready | NodePhase::CloudUnreachable) =>
                                {
                                    record_failure(&mut o.status.recent_failures, unix)
                                }
                                NodePhase::Ready => o.status.ready_since = now_rfc3339(),
                                _ => {}
                            }
                        }
                        o.status.phase = want;
                        o.status.reason = reason.clone();
                        true
                    })
                    .await;
                }
            }
            self.liveness.set(silent_since, verdicts);
            self.metrics.reconcile("node", t0.elapsed());
        }
    }
}

/// The requests of the instances placed on `nodes`, summed.
fn requested_on(nodes: &[String], per_node: &HashMap<String, yunbian_api::Allocatable>) -> yunbian_api::Allocatable {
    let mut sum = yunbian_api::Allocatable::default();
    for a in nodes.iter().filter_map(|n| per_node.get(n)) {
        sum.cpu_millis += a.cpu_millis;
        sum.memory_bytes += a.memory_bytes;
    }
    sum
}

/// `30d`, `12h`, `90m`, `5s`: the largest unit that divides it exactly.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= secs && s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub on `store`, serving `nodes` (connected, heartbeat now).
    fn hub_serving(store: &Arc<yunbian_store::RedbStore>, nodes: &[&str]) -> Arc<Hub> {
        let hub = Hub::new(store.clone(), Arc::new(Metrics::default()), HubConfig::default());
        let mut inner = hub.lock();
        for (i, n) in nodes.iter().enumerate() {
            let (control, _) = mpsc::channel(1);
            inner.links.insert(n.to_string(), Link { conn: i as u64, notify: Arc::new(Notify::new()), control });
            let l = inner.live.entry(n.to_string()).or_default();
            l.last_heartbeat = Some(Instant::now());
            l.address = format!("10.0.0.{}:40000", i + 1);
        }
        drop(inner);
        hub
    }

    #[tokio::test]
    async fn replicas_share_peer_addresses_and_what_their_nodes_see_of_silent_ones() {
        let dir = std::env::temp_dir().join(format!("yunbian-hub-presence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let store = yunbian_store::RedbStore::open(&dir.join("s.redb"), Default::default()).expect("store");
        let coord: Arc<dyn Coordinator> = store.clone();
        let a = hub_serving(&store, &["n1"]);
        let b = hub_serving(&store, &["n2"]);
        // n1 (on replica a) reached n3 a moment ago; n3 is served by nobody.
        let mut network = NetworkStatus::default();
        network.peers.insert(
            "n3".into(),
            yunbian_api::LinkQuality { rtt_ms: Some(2.0), loss: 0.0, samples: 3, last_seen_secs: Some(0) },
        );
        network.peers.insert("n2".into(), yunbian_api::LinkQuality::default());
        a.note_network("n1", Some(Box::new(network)), ":7444");
        b.note_network("n2", None, "n2.example:7444");
        b.lock().live.entry("n3".into()).or_default().peer_addr = "10.0.0.3:7444".into();

        coord.set_presence("b", serde_json::to_vec(&b.presence_record()).expect("encode")).await.expect("publish b");
        a.refresh_remote(&coord).await;
        let rec = a.presence_record();
        assert_eq!(rec.nodes, vec!["n1"]);
        assert_eq!(rec.peer_addrs.get("n1").map(String::as_str), Some("10.0.0.1:7444"), "the host is the connection's");
        let views = rec.peer_views.get("n3").expect("a view of n3");
        assert_eq!((views[0].reporter.as_str(), views[0].last_seen_secs), ("n1", Some(0)));
        assert!(!rec.peer_views.contains_key("n2"), "n2 is served (by b): no view needed");
        coord.set_presence("a", serde_json::to_vec(&rec).expect("encode")).await.expect("publish a");

        // b reads a's record (and skips its own).
        b.refresh_remote(&coord).await;
        {
            let remote = b.remote.lock().expect("remote");
            assert!(remote.served.contains("n1") && !remote.served.contains("n2"));
            assert_eq!(remote.peer_addrs.get("n1").map(String::as_str), Some("10.0.0.1:7444"));
            assert_eq!(remote.peer_views.get("n3").map(Vec::len), Some(1));
        }
        // A group of the three: b names n1 (a's node) and n3 as n2's targets.
        let group = serde_json::json!({
            "apiVersion": "yunbian.io/v1", "kind": "NodeGroup", "metadata": {"name": "g"},
            "spec": {"selector": {"site": "a"}}, "status": {"members": ["n1", "n2", "n3"]}
        });
        store.create(Kind::NodeGroup, "g", group).await.expect("group");
        let targets = b.probe_targets("n2").await.expect("targets");
        assert_eq!(
            targets,
            vec![("n3".to_string(), "10.0.0.3:7444".to_string()), ("n1".to_string(), "10.0.0.1:7444".to_string())]
        );
        // The matrix: n1's row, here on a.
        assert_eq!(a.latency_matrix().rtt("n1", "n3"), Some(2.0));
        assert_eq!(a.latency_snapshot(), vec![("n1".to_string(), "n3".to_string(), 2.0)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recent_failures_keep_the_last_day_and_at_most_sixteen() {
        let day = FAILURES_FOR_SECS;
        let mut f = vec![10, 20];
        record_failure(&mut f, day + 15);
        assert_eq!(f, vec![20, day + 15], "older than a day: dropped");
        let mut f: Vec<u64> = (0..16).map(|i| day + i).collect();
        record_failure(&mut f, day + 100);
        assert_eq!(f.len(), FAILURES_KEPT);
        assert_eq!((f[0], f[15]), (day + 1, day + 100));
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(human_duration(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(human_duration(Duration::from_secs(12 * 3_600)), "12h");
        assert_eq!(human_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(human_duration(Duration::from_secs(5)), "5s");
        assert_eq!(human_duration(Duration::from_secs(0)), "0s");
    }
}
