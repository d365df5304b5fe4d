//! The App controller: turns each App (intent) into AppInstances placed on
//! nodes, and summarises what the nodes report (observation) into the App's
//! status. Level-triggered and idempotent: every pass reads the whole state
//! and converges it, so running it twice, or after a crash, is harmless.
//!
//! A pass runs on any change of Apps, AppInstances or Nodes (debounced) and
//! at least every few seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;
use yunbian_api::KindOf;
use yunbian_api::{AppInstanceSpec, AppSpec, ArtifactSpec, Kind, NodeGroupSpec, NodeSpec, Object};
use yunbian_store::{Store, StoreError, StoredObject};

use crate::app_pass::{NodeSignals, PassOutput};
use crate::metrics::Metrics;
use crate::objects::{decode, stamp_new, update_status};

/// Writes issued concurrently by one pass. Each store commit costs an
/// fsync (hundreds of ms on slow disks), so the whole set should fit in a
/// few group commits: this matches the store's largest batch.
const PARALLEL_WRITES: usize = 4096;

/// Settings of the App controller.
#[derive(Debug, Clone, Copy)]
pub struct ControllerConfig {
    /// Instances on a node NotReady for this long are deleted, and so
    /// re-placed on ready nodes; the node stops them when it reconnects
    /// (it receives their removal before anything else). `None`: never, the
    /// instances wait for their node however long it is away.
    pub evict_after: Option<Duration>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig { evict_after: Some(Duration::from_secs(300)) }
    }
}

/// Runs the App controller forever.
pub async fn run_app_controller(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    cfg: ControllerConfig,
    signals: Arc<dyn NodeSignals>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // The watchers live exactly as long as this controller: aborting it (a
    // lost leadership) drops the set, which aborts them and releases their
    // watches and their hold on the fenced store.
    let mut watchers = tokio::task::JoinSet::new();
    for kind in [Kind::App, Kind::AppInstance, Kind::Node, Kind::NodeGroup, Kind::Device] {
        let store = store.clone();
        let tx = tx.clone();
        watchers.spawn(async move {
            let mut failing = false;
            loop {
                let from = store.revision();
                match store.watch(Some(kind), from).await {
                    Ok(mut w) => {
                        failing = false;
                        // Node status changes every heartbeat period (usage);
                        // only what scheduling reads may trigger a pass.
                        let mut seen: HashMap<String, String> = HashMap::new();
                        while let Some(ev) = w.recv().await {
                            let Ok(ev) = ev else { break };
                            if matches!(kind, Kind::Node | Kind::Device)
                                && ev.event != yunbian_store::EventType::Deleted
                            {
                                let key = if kind == Kind::Node {
                                    scheduling_key(&ev.object.value)
                                } else {
                                    device_key(&ev.object.value)
                                };
                                if seen.get(&ev.object.name) == Some(&key) {
                                    continue;
                                }
                                seen.insert(ev.object.name.clone(), key);
                            }
                            let _ = tx.try_send(());
                        }
                    }
                    Err(e) => {
                        // Once per outage, not once per retry.
                        if !failing {
                            tracing::warn!(error = %e, ?kind, "controller watch; retrying");
                        }
                        failing = true;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let mut cache = DecodeCache::default();
    loop {
        let t0 = Instant::now();
        if let Err(e) = reconcile_apps(&store, &mut cache, &cfg, signals.as_ref()).await {
            tracing::warn!(error = %e, "app reconcile pass failed");
        }
        if let Err(e) = crate::device_placement::reconcile_devices(&store, &cfg).await {
            tracing::warn!(error = %e, "device placement pass failed");
        }
        let took = t0.elapsed();
        metrics.reconcile("app", took);
        // Wait for a change or the periodic resync, then let a burst settle
        // for at least as long as a pass takes, so that passes never use
        // more than half a core however fast changes arrive.
        // A silent node may cross its Apps' `onNodeLost.after` at any
        // moment: look every second while one is.
        let resync = if signals.any_silent() { Duration::from_secs(1) } else { Duration::from_secs(5) };
        let _ = tokio::time::timeout(resync, rx.recv()).await;
        tokio::time::sleep(Duration::from_millis(20).max(took)).await;
        while rx.try_recv().is_ok() {}
    }
}

/// The parts of a Node the scheduler and the App controller read.
/// What device placement reads of a Device (twin reports must not trigger passes).
fn device_key(device: &Value) -> String {
    format!(
        "{}|{}",
        device.pointer("/metadata/generation").and_then(|v| v.as_u64()).unwrap_or(0),
        device.pointer("/status/node").and_then(|v| v.as_str()).unwrap_or_default()
    )
}

fn scheduling_key(node: &Value) -> String {
    let p = |ptr: &str| node.pointer(ptr).map(|v| v.to_string()).unwrap_or_default();
    [
        p("/metadata/labels"),
        p("/spec"),
        p("/status/phase"),
        p("/status/allocatable"),
        p("/status/info/runtimes"),
        p("/status/info/arch"),
        p("/status/info/os"),
    ]
    .join("|")
}

/// Typed objects of one kind from the previous pass, reused while their
/// revision is unchanged: at 10k nodes, decoding everything on every pass
/// was the controller's main cost.
struct Decoded<S: KindOf> {
    map: HashMap<String, (u64, Typed<S>)>,
}

type Typed<S> = Arc<Object<S, <S as KindOf>::Status>>;

impl<S: KindOf> Default for Decoded<S> {
    fn default() -> Self {
        Decoded { map: HashMap::new() }
    }
}

impl<S: KindOf> Decoded<S> {
    fn refresh(&mut self, objs: &[StoredObject]) -> Vec<Typed<S>> {
        let mut next = HashMap::with_capacity(objs.len());
        let mut out = Vec::with_capacity(objs.len());
        for o in objs {
            let d = match self.map.remove(&o.name) {
                Some((rev, d)) if rev == o.revision => d,
                _ => match decode::<S>(o) {
                    Ok(d) => Arc::new(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping undecodable object");
                        continue;
                    }
                },
            };
            out.push(d.clone());
            next.insert(o.name.clone(), (o.revision, d));
        }
        self.map = next;
        out
    }
}

/// The controller's decode caches.
#[derive(Default)]
pub struct DecodeCache {
    apps: Decoded<AppSpec>,
    insts: Decoded<AppInstanceSpec>,
    nodes: Decoded<NodeSpec>,
    groups: Decoded<NodeGroupSpec>,
    artifacts: Decoded<ArtifactSpec>,
}

/// One full reconcile pass over every App (see [`crate::app_pass`]).
pub async fn reconcile_apps(
    store: &Arc<dyn Store>,
    cache: &mut DecodeCache,
    cfg: &ControllerConfig,
    signals: &dyn NodeSignals,
) -> Result<(), StoreError> {
    let (apps, _) = store.list(Kind::App).await?;
    let (insts, _) = store.list(Kind::AppInstance).await?;
    let (nodes, _) = store.list(Kind::Node).await?;
    let (groups, _) = store.list(Kind::NodeGroup).await?;
    let (artifacts, _) = store.list(Kind::Artifact).await?;

    let apps = cache.apps.refresh(&apps);
    let insts = cache.insts.refresh(&insts);
    let nodes = cache.nodes.refresh(&nodes);
    let groups = cache.groups.refresh(&groups);
    let artifacts = cache.artifacts.refresh(&artifacts);

    let out = crate::app_pass::plan(&crate::app_pass::PassInput {
        apps: &apps,
        instances: &insts,
        nodes: &nodes,
        groups: &groups,
        artifacts: &artifacts,
        signals,
        cfg,
        now: crate::objects::unix_now(),
    });
    let PassOutput { deletes, creates, statuses } = out;
    for chunk in deletes.chunks(PARALLEL_WRITES) {
        let r = join_all(chunk.iter().map(|n| store.delete(Kind::AppInstance, n, None))).await;
        for e in r.into_iter().filter_map(Result::err) {
            if !matches!(e, StoreError::NotFound { .. }) {
                tracing::warn!(error = %e, "delete instance");
            }
        }
    }
    for chunk in creates.chunks(PARALLEL_WRITES) {
        let r = join_all(chunk.iter().map(|v| {
            let mut v = v.clone();
            stamp_new(&mut v);
            let name = v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
            async move { store.create(Kind::AppInstance, &name, v).await }
        }))
        .await;
        for e in r.into_iter().filter_map(Result::err) {
            tracing::warn!(error = %e, "create instance");
        }
    }
    for (name, status) in statuses {
        let r = update_status::<AppSpec>(store, &name, |a| {
            // The spec changed since the pass read it (an apply, a rollout
            // pause/resume/undo, which also sets status): the next pass
            // decides from the new spec; writing this one would undo it.
            if a.status == status || a.metadata.generation != status.observed_generation {
                return false;
            }
            a.status = status.clone();
            true
        })
        .await;
        if let Err(e) = r {
            if !matches!(e, StoreError::NotFound { .. }) {
                tracing::warn!(app = %name, error = %e, "write app status");
            }
        }
    }
    Ok(())
}
