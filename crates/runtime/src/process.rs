//! The process runtime: runs each instance as a native process tree on the
//! edge host.
//!
//! Design:
//! - Each known instance has a *slot* (its paths, last status, and the handle
//!   of its supervisor task). Operations on one instance (`ensure`, `remove`)
//!   are serialised by the slot's async lock; different instances proceed
//!   independently.
//! - A *supervisor* task per instance (see `supervisor`) owns the running
//!   process: it waits for exit, runs liveness probes, applies the restart
//!   policy with back-off, reports every status change and persists it to
//!   `state.json` so a restarted agent can re-adopt the process (`recover`).
//! - Workloads write to `stdout.log` directly (`O_APPEND`, no pipes), run in
//!   their own session/process group and, when cgroups are usable, in their
//!   own cgroup with the template's memory/cpu limits. They never depend on
//!   the agent: dropping the [`ProcessRuntime`] stops its background tasks but
//!   leaves every workload running.
//! - A background task rotates logs (copytruncate) above a size cap.
//! - Another samples what each running instance uses (CPU, memory, the
//!   metrics the app reports) into its status `usage` (see `usage`).

mod cgroup;
mod logs;
mod probe;
mod procfs;
mod state;
mod supervisor;
mod sys;
mod usage;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use yunbian_api::{AppInstance, AppInstanceStatus, InstancePhase, RestartPolicy, RuntimeKind};

use crate::{AppMetrics, LimitsSupport, LogOptions, Runtime, RuntimeError, StatusUpdate};
use cgroup::Cgroups;
use state::InstancePaths;
use supervisor::{Begin, Command};

/// Tunables of the [`ProcessRuntime`].
#[derive(Debug, Clone)]
pub struct ProcessRuntimeOptions {
    /// `stdout.log` is rotated (copy to `stdout.log.1`, truncate) above this
    /// size. Default 10 MiB.
    pub max_log_bytes: u64,
    /// How often log sizes are checked. Default 1 s.
    pub log_check_interval: Duration,
    /// Time between SIGTERM and SIGKILL when stopping. Default 5 s.
    pub stop_grace: Duration,
    /// First restart delay; doubles on each quick failure. Default 1 s.
    pub backoff_initial: Duration,
    /// Largest restart delay. Default 60 s.
    pub backoff_max: Duration,
    /// A run at least this long resets the back-off. Default 60 s.
    pub backoff_reset_after: Duration,
    /// How often adopted (not our child) processes are checked for exit.
    /// Default 500 ms.
    pub exit_poll_interval: Duration,
    /// Whether to use cgroups for limits at all. Default true.
    pub cgroups: bool,
    /// Where cgroup hierarchies are mounted. Default `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// Name of the parent cgroup of all instances. Default `yunbian`.
    pub cgroup_parent: String,
    /// Environment every workload gets from its node (where the edge bus
    /// and the device API listen), after the instance's own variables.
    pub node_env: Vec<(String, String)>,
    /// How often each running instance's usage is sampled (and at most
    /// how often it is re-reported). Default 10 s; zero: never.
    pub usage_interval: Duration,
    /// Where the metrics apps report about themselves are kept; the
    /// agent's local API records into the same handle. The runtime tracks
    /// its instances there, so reports for unknown instances are refused.
    /// Default: a registry of its own.
    pub app_metrics: AppMetrics,
}

impl Default for ProcessRuntimeOptions {
    fn default() -> Self {
        ProcessRuntimeOptions {
            max_log_bytes: 10 * 1024 * 1024,
            log_check_interval: Duration::from_secs(1),
            stop_grace: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_reset_after: Duration::from_secs(60),
            exit_poll_interval: Duration::from_millis(500),
            cgroups: true,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "yunbian".to_string(),
            node_env: Vec::new(),
            usage_interval: usage::DEFAULT_INTERVAL,
            app_metrics: AppMetrics::new(),
        }
    }
}

/// State shared by the runtime and its tasks.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub node_name: String,
    pub opts: ProcessRuntimeOptions,
    pub cgroups: Cgroups,
    pub updates: mpsc::UnboundedSender<StatusUpdate>,
    pub boot_id: String,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Shared {
    fn slots(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots().get(name).cloned()
    }

    fn slot_or_insert(&self, name: &str) -> Arc<Slot> {
        self.slots()
            .entry(name.to_string())
            .or_insert_with(|| {
                self.opts.app_metrics.track(name);
                Arc::new(Slot::new(InstancePaths::new(&self.dir, name)))
            })
            .clone()
    }

    /// Whether `slot` is still the map's slot for `name`.
    fn is_current(&self, name: &str, slot: &Arc<Slot>) -> bool {
        self.slots().get(name).is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    fn forget(&self, name: &str, slot: &Arc<Slot>) {
        let mut map = self.slots();
        if map.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(name);
            self.opts.app_metrics.untrack(name);
        }
    }
}

/// One known instance.
pub(crate) struct Slot {
    pub paths: InstancePaths,
    /// Serialises ensure/remove; holds the supervisor while one exists.
    op: tokio::sync::Mutex<Option<Handle>>,
    /// Last reported status.
    pub status: Mutex<AppInstanceStatus>,
    /// Set once removed (ends log followers).
    pub removed: AtomicBool,
}

impl Slot {
    fn new(paths: InstancePaths) -> Slot {
        Slot {
            paths,
            op: tokio::sync::Mutex::new(None),
            status: Mutex::new(AppInstanceStatus::default()),
            removed: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> MutexGuard<'_, AppInstanceStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running supervisor.
pub(crate) struct Handle {
    /// Template hash it runs.
    pub hash: String,
    pub cmds: mpsc::UnboundedSender<Command>,
    pub task: JoinHandle<()>,
}

/// Runs instances as native processes. See the module documentation.
pub struct ProcessRuntime {
    shared: Arc<Shared>,
    /// Dropped with the runtime: tells every background task to stop
    /// (workloads keep running).
    shutdown: watch::Sender<()>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("dir", &self.shared.dir)
            .field("node_name", &self.shared.node_name)
            .finish_non_exhaustive()
    }
}

fn io_err(context: impl Into<String>, source: io::Error) -> RuntimeError {
    RuntimeError::Io { context: context.into(), source }
}

impl ProcessRuntime {
    /// A runtime keeping its records under `dir` (created if missing), with
    /// default options. Must be called within a Tokio runtime.
    pub fn new(
        dir: PathBuf,
        node_name: String,
        updates: mpsc::UnboundedSender<StatusUpdate>,
    ) -> Result<Arc<ProcessRuntime>, RuntimeError> {
        Self::with_options(dir, node_name, updates, ProcessRuntimeOptions::default())
    }

    /// Like [`ProcessRuntime::new`], with explicit options.
    pub fn with_options(
        dir: PathBuf,
        node_name: String,
        updates: mpsc::UnboundedSender<StatusUpdate>,
        opts: ProcessRuntimeOptions,
    ) -> Result<Arc<ProcessRuntime>, RuntimeError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io_err("process runtime needs a Tokio runtime", io::Error::other(e)))?;
        fs::create_dir_all(&dir).map_err(|e| io_err(format!("create {}", dir.display()), e))?;
        let cgroups = if opts.cgroups {
            Cgroups::detect(&opts.cgroup_root, &opts.cgroup_parent)
        } else {
            Cgroups::disabled("cgroups disabled by configuration; limits are not enforced")
        };
        let support = cgroups.support();
        tracing::info!(enforced = support.enforced, "process runtime limits: {}", support.note);
        let shared = Arc::new(Shared {
            dir,
            node_name,
            opts,
            cgroups,
            updates,
            boot_id: procfs::boot_id(),
            slots: Mutex::new(HashMap::new()),
        });
        let (shutdown, _) = watch::channel(());
        handle.spawn(rotate_logs(shared.clone(), shutdown.subscribe()));
        handle.spawn(usage::sample_usage(shared.clone(), shutdown.subscribe()));
        Ok(Arc::new(ProcessRuntime { shared, shutdown }))
    }

    /// The registry of app-reported metrics this runtime reads (the one
    /// given in its options).
    pub fn app_metrics(&self) -> AppMetrics {
        self.shared.opts.app_metrics.clone()
    }

    async fn launch(
        &self,
        slot: &Arc<Slot>,
        inst: AppInstance,
        hash: String,
        restart_count: u32,
        begin: Begin,
    ) -> Handle {
        supervisor::launch(
            self.shared.clone(),
            slot.clone(),
            inst,
            hash,
            restart_count,
            begin,
            self.shutdown.subscribe(),
        )
        .await
    }
}

/// Asks a supervisor to stop its process and waits until it did.
async fn stop_handle(shared: &Shared, paths: &InstancePaths, h: Handle) {
    let (tx, rx) = oneshot::channel();
    let acknowledged = h.cmds.send(Command::Stop(tx)).is_ok() && rx.await.is_ok();
    let _ = h.task.await;
    if !acknowledged {
        // The supervisor ended unexpectedly; make sure nothing survives.
        supervisor::kill_recorded(shared, paths).await;
    }
}

/// Validates an instance for this runtime.
fn validate(inst: &AppInstance) -> Result<(), RuntimeError> {
    let name = inst.metadata.name.as_str();
    let invalid = |message: String| RuntimeError::Invalid { instance: name.to_string(), message };
    if !state::valid_name(name) {
        return Err(invalid(format!("invalid instance name {name:?} (letters, digits, '-', '_', '.')")));
    }
    let t = &inst.spec.template;
    if t.runtime != RuntimeKind::Process {
        return Err(invalid(format!("runtime {} is not the process runtime", t.runtime.as_str())));
    }
    match &t.process {
        Some(p) if p.command.first().is_some_and(|c| !c.is_empty()) => Ok(()),
        Some(_) => Err(invalid("process.command is empty".into())),
        None => Err(invalid("no process section".into())),
    }
}

fn effective_hash(inst: &AppInstance) -> String {
    if inst.spec.template_hash.is_empty() {
        inst.spec.template.hash()
    } else {
        inst.spec.template_hash.clone()
    }
}

/// Whether a finished run with this status is restarted under `policy`.
pub(crate) fn restarts(policy: RestartPolicy, succeeded: bool) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !succeeded,
        RestartPolicy::Never => false,
    }
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn recover(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = &self.shared.dir;
        let entries = fs::read_dir(dir).map_err(|e| io_err(format!("read {}", dir.display()), e))?;
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !state::valid_name(&name) || !entry.path().is_dir() {
                continue;
            }
            if self.shared.slot(&name).is_some() {
                names.push(name);
                continue;
            }
            let paths = InstancePaths::new(dir, &name);
            let rec = match state::load(&paths.state) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(instance = %name, "ignoring instance directory: {e}");
                    continue;
                }
            };
            if rec.instance.metadata.name != name {
                tracing::warn!(instance = %name, "ignoring record naming another instance {:?}", rec.instance.metadata.name);
                continue;
            }
            if let Err(e) = validate(&rec.instance) {
                tracing::warn!(instance = %name, "ignoring record with unusable spec: {e}");
                continue;
            }
            let slot = self.shared.slot_or_insert(&name);
            let mut op = slot.op.lock().await;
            if op.is_some() {
                names.push(name);
                continue;
            }
            let live = match (rec.pid, rec.start_time) {
                (Some(pid), Some(st)) => {
                    (rec.boot_id.is_empty() || rec.boot_id == self.shared.boot_id) && procfs::is_same_live(pid, st)
                }
                _ => false,
            };
            let begin = if live {
                Begin::Adopt {
                    pid: rec.pid.unwrap_or_default(),
                    start_time: rec.start_time.unwrap_or_default(),
                    started_unix: rec.started_unix,
                    status: rec.status.clone(),
                }
            } else if rec.pid.is_some()
                || matches!(rec.status.phase, InstancePhase::Pending | InstancePhase::Starting | InstancePhase::Running)
            {
                Begin::DiedWhileDown { status: rec.status.clone() }
            } else {
                let succeeded = rec.status.exit_code == Some(0) && rec.status.reason == "Completed";
                Begin::Ended {
                    restart: restarts(rec.instance.spec.template.restart_policy, succeeded),
                    status: rec.status.clone(),
                }
            };
            tracing::info!(instance = %name, adopted = live, pid = ?rec.pid, "recovered instance");
            let handle = self.launch(&slot, rec.instance, rec.template_hash, rec.status.restart_count, begin).await;
            *op = Some(handle);
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    async fn ensure(&self, instance: &AppInstance) -> Result<(), RuntimeError> {
        validate(instance)?;
        let name = instance.metadata.name.as_str();
        let hash = effective_hash(instance);
        loop {
            let slot = self.shared.slot_or_insert(name);
            let mut op = slot.op.lock().await;
            if !self.shared.is_current(name, &slot) {
                continue; // removed while we waited; use the new slot
            }
            if op.as_ref().is_some_and(|h| h.hash == hash) {
                return Ok(());
            }
            if let Some(old) = op.take() {
                tracing::info!(instance = %name, from = %old.hash, to = %hash, "template changed, replacing");
                stop_handle(&self.shared, &slot.paths, old).await;
            }
            let prepared = fs::create_dir_all(&slot.paths.work)
                .map_err(|e| io_err(format!("create {}", slot.paths.work.display()), e));
            if let Err(e) = prepared {
                self.shared.forget(name, &slot);
                return Err(e);
            }
            let mut begin = Begin::Spawn;
            if !slot.paths.state.exists() {
                // No record, yet a process of this instance may be running:
                // one started while the disk was full (its record never
                // written) by an agent that has since restarted. Adopt it
                // when it is a session leader in the instance's work
                // directory (how the runtime starts workloads); stop
                // anything else there, so the instance never runs twice.
                if let Some((pid, start_time)) = find_unrecorded(&self.shared, name, &slot.paths) {
                    tracing::info!(instance = %name, pid, "adopting an unrecorded process of this instance");
                    let status =
                        AppInstanceStatus { phase: InstancePhase::Running, pid: Some(pid), ..Default::default() };
                    begin = Begin::Adopt { pid, start_time, started_unix: 0, status };
                }
            }
            let handle = self.launch(&slot, instance.clone(), hash, 0, begin).await;
            *op = Some(handle);
            return Ok(());
        }
    }

    async fn remove(&self, instance: &str) -> Result<(), RuntimeError> {
        if !state::valid_name(instance) {
            return Err(RuntimeError::Invalid {
                instance: instance.to_string(),
                message: "invalid instance name".into(),
            });
        }
        let paths = InstancePaths::new(&self.shared.dir, instance);
        let Some(slot) = self.shared.slot(instance) else {
            // Not known (e.g. never recovered): stop a recorded survivor and
            // delete what is left.
            if paths.dir.exists() {
                supervisor::kill_recorded(&self.shared, &paths).await;
                supervisor::delete_instance(&self.shared, instance, &paths).await;
            }
            return Ok(());
        };
        let mut op = slot.op.lock().await;
        if let Some(h) = op.take() {
            stop_handle(&self.shared, &slot.paths, h).await;
        }
        slot.removed.store(true, Ordering::SeqCst);
        supervisor::delete_instance(&self.shared, instance, &slot.paths).await;
        self.shared.forget(instance, &slot);
        drop(op);
        tracing::info!(instance, "removed instance");
        Ok(())
    }

    async fn statuses(&self) -> Vec<StatusUpdate> {
        let slots: Vec<(String, Arc<Slot>)> = self.shared.slots().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut out: Vec<StatusUpdate> = slots
            .into_iter()
            .filter(|(_, s)| !s.removed.load(Ordering::SeqCst))
            .map(|(instance, s)| StatusUpdate { instance, status: s.status().clone() })
            .collect();
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }

    async fn logs(&self, instance: &str, opts: LogOptions, out: mpsc::Sender<Vec<u8>>) -> Result<(), RuntimeError> {
        let slot = self.shared.slot(instance).ok_or_else(|| RuntimeError::NotFound(instance.to_string()))?;
        let paths = slot.paths.clone();
        let read_paths = paths.clone();
        let (data, pos) = tokio::task::spawn_blocking(move || logs::read_retained(&read_paths, opts.tail))
            .await
            .map_err(|e| io_err("read log", io::Error::other(e)))?
            .map_err(|e| io_err(format!("read {}", paths.log.display()), e))?;
        if !logs::send_chunks(&out, &data).await || !opts.follow {
            return Ok(());
        }
        let mut shutdown = self.shutdown.subscribe();
        let gone = || slot.removed.load(Ordering::SeqCst);
        tokio::select! {
            r = logs::follow(&paths, pos, &out, gone) => r.map_err(|e| io_err(format!("follow {}", paths.log.display()), e)),
            _ = shutdown.changed() => Ok(()),
        }
    }

    fn limits_support(&self) -> LimitsSupport {
        self.shared.cgroups.support()
    }

    fn log_path(&self, instance: &str) -> Option<PathBuf> {
        self.shared.slot(instance).map(|s| s.paths.log.clone())
    }
}

/// Periodically rotates every instance's log above the size cap.
async fn rotate_logs(shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(shared.opts.log_check_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let paths: Vec<InstancePaths> =
            shared.slots().values().filter(|s| !s.removed.load(Ordering::SeqCst)).map(|s| s.paths.clone()).collect();
        let max = shared.opts.max_log_bytes;
        let done = tokio::task::spawn_blocking(move || {
            for p in paths {
                match logs::rotate_if_needed(&p, max) {
                    Ok(true) => tracing::debug!(log = %p.log.display(), "rotated log"),
                    Ok(false) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(log = %p.log.display(), "log rotation failed: {e}"),
                }
            }
        })
        .await;
        if let Err(e) = done {
            tracing::warn!("log rotation task failed: {e}");
        }
    }
}

/// The session leader of an instance that has no record (running in its
/// work directory), as (pid, start time); every other process of the
/// instance (in its cgroup or work directory) is SIGKILLed.
fn find_unrecorded(shared: &Shared, name: &str, paths: &InstancePaths) -> Option<(u32, u64)> {
    let mut pids: Vec<u32> = shared.cgroups.instance(name).map(|cg| cg.pids()).unwrap_or_default();
    pids.extend(procfs::pids_with_cwd_under(&paths.work));
    pids.sort_unstable();
    pids.dedup();
    let leader = pids
        .iter()
        .filter_map(|p| procfs::read_stat(*p).map(|st| (*p, st)))
        .find(|(p, st)| st.session == *p && st.is_live())
        .map(|(p, st)| (p, st.start_time));
    for pid in pids {
        let in_leaders_session = leader.is_some_and(|(l, _)| procfs::read_stat(pid).is_some_and(|st| st.session == l));
        if !in_leaders_session {
            tracing::warn!(instance = %name, pid, "stopping a stray process of this instance");
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
    leader
}
