//! A runtime that runs nothing.
//!
//! [`FakeRuntime`] is used by the simulator (thousands of simulated nodes in
//! one process), so it is deliberately cheap: a map behind a mutex, no tasks,
//! no files. `ensure` records the instance and reports `Starting` then
//! `Running` with a made-up pid; `remove` forgets it.
//!
//! To exercise autoscaling in simulation, a [`SyntheticLoad`] shared by the
//! fake runtimes of all simulated nodes says how much work each App has:
//! every running instance reports an even share of its App's total as its
//! `usage` (so adding replicas lowers each one's CPU, as with real load
//! balancing). Usage is reported like the process runtime does — only when
//! it changed noticeably, at most once per interval — by
//! [`FakeRuntime::report_usage`], called by the task of
//! [`FakeRuntime::spawn_usage_reporter`] or directly by a test.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use yunbian_api::{AppInstance, AppInstanceStatus, InstancePhase, InstanceUsage};

use crate::usage::UsageGate;
use crate::{LimitsSupport, LogOptions, Runtime, RuntimeError, StatusUpdate};

/// First fake pid handed out.
const FIRST_FAKE_PID: u32 = 100_000;

/// How much work one App has, in total over its running instances.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppLoad {
    /// CPU, millicores.
    pub cpu_millis: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// App metrics (`queue_depth`).
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Default)]
struct LoadBook {
    apps: HashMap<String, AppLoad>,
    /// Running instances per App, over every runtime sharing the book.
    running: HashMap<String, u64>,
}

/// Synthetic load of simulated Apps, shared by many [`FakeRuntime`]s.
/// Each running instance of an App uses `total / running instances` of
/// every figure of its [`AppLoad`]; an App without a load reports none.
#[derive(Debug, Clone, Default)]
pub struct SyntheticLoad {
    book: Arc<Mutex<LoadBook>>,
}

impl SyntheticLoad {
    /// No App has any load.
    pub fn new() -> SyntheticLoad {
        SyntheticLoad::default()
    }

    fn lock(&self) -> MutexGuard<'_, LoadBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the total load of `app`.
    pub fn set(&self, app: &str, load: AppLoad) {
        self.lock().apps.insert(app.to_string(), load);
    }

    /// Removes the load of `app` (its instances stop reporting usage).
    pub fn clear(&self, app: &str) {
        self.lock().apps.remove(app);
    }

    /// Running instances of `app` over every runtime sharing this load.
    pub fn running(&self, app: &str) -> u64 {
        self.lock().running.get(app).copied().unwrap_or(0)
    }

    /// What one running instance of `app` uses now.
    pub fn share(&self, app: &str) -> Option<InstanceUsage> {
        let book = self.lock();
        let load = book.apps.get(app)?;
        let n = book.running.get(app).copied().unwrap_or(0).max(1);
        Some(InstanceUsage {
            cpu_millis: load.cpu_millis / n,
            memory_bytes: load.memory_bytes / n,
            metrics: load.metrics.iter().map(|(k, v)| (k.clone(), v / n as f64)).collect(),
        })
    }

    fn started(&self, app: &str) {
        *self.lock().running.entry(app.to_string()).or_default() += 1;
    }

    fn stopped(&self, app: &str) {
        let mut book = self.lock();
        if let Some(n) = book.running.get_mut(app) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                book.running.remove(app);
            }
        }
    }
}

/// One recorded instance.
#[derive(Debug)]
struct Entry {
    hash: String,
    app: String,
    status: AppInstanceStatus,
    gate: UsageGate,
}

/// A runtime that records instances and pretends they run.
#[derive(Debug)]
pub struct FakeRuntime {
    updates: mpsc::UnboundedSender<StatusUpdate>,
    instances: Mutex<HashMap<String, Entry>>,
    next_pid: AtomicU32,
    load: Option<SyntheticLoad>,
    usage_interval: Duration,
}

impl FakeRuntime {
    /// A fake runtime reporting status changes on `updates`; its instances
    /// report no usage.
    pub fn new(updates: mpsc::UnboundedSender<StatusUpdate>) -> Arc<FakeRuntime> {
        Self::build(updates, None, Duration::from_secs(10))
    }

    /// A fake runtime whose instances report their share of `load`, at
    /// most once per `usage_interval`.
    pub fn with_load(
        updates: mpsc::UnboundedSender<StatusUpdate>,
        load: SyntheticLoad,
        usage_interval: Duration,
    ) -> Arc<FakeRuntime> {
        Self::build(updates, Some(load), usage_interval)
    }

    fn build(
        updates: mpsc::UnboundedSender<StatusUpdate>,
        load: Option<SyntheticLoad>,
        usage_interval: Duration,
    ) -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            updates,
            instances: Mutex::new(HashMap::new()),
            next_pid: AtomicU32::new(FIRST_FAKE_PID),
            load,
            usage_interval,
        })
    }

    /// Puts every instance's share of the synthetic load into its status,
    /// sending the ones that changed noticeably since their last report
    /// (and were last reported at least one interval before `now`).
    /// Returns how many were sent. Without a load, nothing happens.
    pub fn report_usage(&self, now: Instant) -> usize {
        let Some(load) = &self.load else { return 0 };
        let mut sent = 0;
        let mut map = self.lock();
        for (name, e) in map.iter_mut() {
            let Some(usage) = load.share(&e.app) else { continue };
            if e.gate.offer(&usage, now, self.usage_interval) {
                e.status.usage = Some(usage);
                // Under the lock, so reports of one instance keep their order.
                self.send(name, &e.status);
                sent += 1;
            }
        }
        sent
    }

    /// Calls [`report_usage`](Self::report_usage) every usage interval
    /// until the runtime is dropped. Needs a Tokio runtime.
    pub fn spawn_usage_reporter(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<FakeRuntime> = Arc::downgrade(self);
        let every = self.usage_interval.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let at = tick.tick().await.into_std();
                let Some(rt) = weak.upgrade() else { return };
                rt.report_usage(at);
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self, app: &str) {
        if let Some(load) = &self.load {
            load.stopped(app);
        }
    }

    fn send(&self, instance: &str, status: &AppInstanceStatus) {
        // A closed channel only means nobody listens any more.
        let _ = self.updates.send(StatusUpdate { instance: instance.to_string(), status: status.clone() });
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn recover(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.lock().keys().cloned().collect())
    }

    async fn ensure(&self, instance: &AppInstance) -> Result<(), RuntimeError> {
        let name = instance.metadata.name.as_str();
        if name.is_empty() {
            return Err(RuntimeError::Invalid { instance: String::new(), message: "instance has no name".into() });
        }
        let hash = if instance.spec.template_hash.is_empty() {
            instance.spec.template.hash()
        } else {
            instance.spec.template_hash.clone()
        };
        let mut status = {
            let mut map = self.lock();
            if map.get(name).is_some_and(|e| e.hash == hash) {
                return Ok(());
            }
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
            let status = AppInstanceStatus {
                phase: InstancePhase::Starting,
                pid: Some(pid),
                started_at: crate::clock::now_rfc3339(),
                ..Default::default()
            };
            let mut running = status.clone();
            running.phase = InstancePhase::Running;
            let app = instance.spec.app.clone();
            let entry = Entry { hash, app: app.clone(), status: running, gate: UsageGate::default() };
            if let Some(old) = map.insert(name.to_string(), entry) {
                self.stopped(&old.app);
            }
            if let Some(load) = &self.load {
                load.started(&app);
            }
            status
        };
        self.send(name, &status);
        status.phase = InstancePhase::Running;
        self.send(name, &status);
        Ok(())
    }

    async fn remove(&self, instance: &str) -> Result<(), RuntimeError> {
        if let Some(old) = self.lock().remove(instance) {
            self.stopped(&old.app);
        }
        Ok(())
    }

    async fn statuses(&self) -> Vec<StatusUpdate> {
        self.lock().iter().map(|(name, e)| StatusUpdate { instance: name.clone(), status: e.status.clone() }).collect()
    }

    async fn logs(&self, instance: &str, _opts: LogOptions, out: mpsc::Sender<Vec<u8>>) -> Result<(), RuntimeError> {
        if !self.lock().contains_key(instance) {
            return Err(RuntimeError::NotFound(instance.to_string()));
        }
        let _ = out.send(b"fake runtime: no output\n".to_vec()).await;
        Ok(())
    }

    fn limits_support(&self) -> LimitsSupport {
        LimitsSupport { enforced: false, note: "fake runtime: nothing runs, limits are not enforced".into() }
    }

    fn log_path(&self, _instance: &str) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::AppInstanceSpec;

    fn instance(name: &str, hash: &str) -> AppInstance {
        instance_of("a", name, hash)
    }

    fn instance_of(app: &str, name: &str, hash: &str) -> AppInstance {
        let mut i = AppInstance::new(
            name,
            AppInstanceSpec { app: app.into(), node: "n".into(), template_hash: hash.into(), ..Default::default() },
        );
        i.metadata.name = name.into();
        i
    }

    #[tokio::test]
    async fn ensure_reports_starting_then_running_and_is_idempotent() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let rt = FakeRuntime::new(tx);
        rt.ensure(&instance("x", "h1")).await.expect("ensure");
        let a = rx.recv().await.expect("starting");
        let b = rx.recv().await.expect("running");
        assert_eq!(a.status.phase, InstancePhase::Starting);
        assert_eq!(b.status.phase, InstancePhase::Running);
        assert!(b.status.pid.is_some());
        rt.ensure(&instance("x", "h1")).await.expect("ensure again");
        assert!(rx.try_recv().is_err(), "same hash must be a no-op");
        rt.ensure(&instance("x", "h2")).await.expect("replace");
        let c = rx.recv().await.expect("starting");
        assert_ne!(c.status.pid, b.status.pid);
        assert_eq!(rt.statuses().await.len(), 1);

        let (ltx, mut lrx) = mpsc::channel(4);
        rt.logs("x", LogOptions::default(), ltx).await.expect("logs");
        assert_eq!(lrx.recv().await.expect("chunk"), b"fake runtime: no output\n".to_vec());

        rt.remove("x").await.expect("remove");
        assert!(rt.statuses().await.is_empty());
        let (ltx, _lrx) = mpsc::channel(4);
        assert!(matches!(rt.logs("x", LogOptions::default(), ltx).await, Err(RuntimeError::NotFound(_))));
        assert!(!rt.limits_support().enforced);
    }

    #[tokio::test]
    async fn synthetic_load_is_shared_by_the_running_instances_of_an_app() {
        let load = SyntheticLoad::new();
        let every = Duration::from_secs(10);
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        // Two simulated nodes sharing one load.
        let n1 = FakeRuntime::with_load(tx1, load.clone(), every);
        let n2 = FakeRuntime::with_load(tx2, load.clone(), every);
        let t0 = Instant::now();
        n1.ensure(&instance_of("web", "web-1", "h")).await.expect("ensure");
        n1.ensure(&instance_of("db", "db-1", "h")).await.expect("ensure");
        while rx1.try_recv().is_ok() {}
        assert_eq!(n1.report_usage(t0), 0, "no load set: no usage");

        load.set(
            "web",
            AppLoad { cpu_millis: 1200, memory_bytes: 600 << 20, metrics: BTreeMap::from([("rps".into(), 300.0)]) },
        );
        assert_eq!(n1.report_usage(t0), 1);
        let u = rx1.try_recv().expect("usage update");
        assert_eq!(u.instance, "web-1");
        assert_eq!(u.status.phase, InstancePhase::Running);
        let usage = u.status.usage.expect("usage");
        assert_eq!((usage.cpu_millis, usage.memory_bytes), (1200, 600 << 20));
        assert_eq!(usage.metrics.get("rps"), Some(&300.0));

        // A second replica on the other node halves each one's share; the
        // first reports it once an interval has passed.
        n2.ensure(&instance_of("web", "web-2", "h")).await.expect("ensure");
        while rx2.try_recv().is_ok() {}
        assert_eq!(load.running("web"), 2);
        assert_eq!(n1.report_usage(t0 + Duration::from_secs(5)), 0, "at most once per interval");
        assert_eq!(n1.report_usage(t0 + every), 1);
        let u = rx1.try_recv().expect("usage update");
        assert_eq!(u.status.usage.map(|u| u.cpu_millis), Some(600));
        assert_eq!(n2.report_usage(t0 + every), 1);
        assert_eq!(rx2.try_recv().expect("usage").status.usage.map(|u| u.cpu_millis), Some(600));
        assert_eq!(n1.report_usage(t0 + 2 * every), 0, "unchanged: not re-sent");
        let st = n1.statuses().await.into_iter().find(|s| s.instance == "web-1").expect("web-1");
        assert_eq!(st.status.usage.map(|u| u.memory_bytes), Some(300 << 20));

        // Replacing an instance does not count it twice; removing it does.
        n2.ensure(&instance_of("web", "web-2", "h2")).await.expect("replace");
        assert_eq!(load.running("web"), 2);
        n2.remove("web-2").await.expect("remove");
        assert_eq!(load.running("web"), 1);
        assert_eq!(n1.report_usage(t0 + 3 * every), 1);
        assert_eq!(rx1.try_recv().expect("usage").status.usage.map(|u| u.cpu_millis), Some(1200));
    }

    #[tokio::test]
    async fn the_reporter_task_reports_and_ends_with_the_runtime() {
        let load = SyntheticLoad::new();
        load.set("web", AppLoad { cpu_millis: 500, ..Default::default() });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let rt = FakeRuntime::with_load(tx, load, Duration::from_millis(20));
        rt.ensure(&instance_of("web", "web-1", "h")).await.expect("ensure");
        let task = rt.spawn_usage_reporter();
        let usage = loop {
            let u = rx.recv().await.expect("update");
            if let Some(usage) = u.status.usage {
                break usage;
            }
        };
        assert_eq!(usage.cpu_millis, 500);
        drop(rt);
        task.await.expect("reporter ends once the runtime is gone");
    }
}
