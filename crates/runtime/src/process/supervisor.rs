//! The supervisor task of one instance: spawns (or adopts) its process,
//! waits for it to exit, runs the liveness probe, classifies exits
//! (`Completed`, `Error`, `Signaled`, `OOMKilled`, `LivenessFailed`),
//! restarts per policy with exponential back-off, and reports and persists
//! every status change.
//!
//! It stops on [`Command::Stop`] (terminating the process: SIGTERM to the
//! group, SIGKILL after the grace period) or, leaving the process running,
//! when the runtime is dropped.

use std::fs;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use yunbian_api::{AppInstance, AppInstanceStatus, InstancePhase};

use super::cgroup::InstanceCgroup;
use super::probe::{self, ExecContext};
use super::state::{self, InstancePaths, StateRecord, STATE_VERSION};
use super::{procfs, restarts, sys, Handle, Shared, Slot};
use crate::clock;
use crate::StatusUpdate;

/// Requests to a supervisor.
pub(crate) enum Command {
    /// Terminate the process, then acknowledge and end.
    Stop(oneshot::Sender<()>),
}

/// How a supervisor begins.
pub(crate) enum Begin {
    /// Start a new process now.
    Spawn,
    /// Re-adopt a process that survived an agent restart.
    Adopt { pid: u32, start_time: u64, started_unix: i64, status: AppInstanceStatus },
    /// The recorded process died while the agent was down.
    DiedWhileDown { status: AppInstanceStatus },
    /// The last run ended (and was reported) before the agent went down.
    Ended { restart: bool, status: AppInstanceStatus },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ExitKind {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// Not our child: the code cannot be known.
    Unknown,
    /// Could not be started.
    SpawnFailed(String),
}

/// A finished run.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub exit: ExitKind,
    /// Set when killed because the liveness probe failed.
    pub liveness: Option<String>,
    /// Whether the cgroup saw an OOM kill during the run.
    pub oom: bool,
    pub ran_for: Duration,
}

impl Outcome {
    fn succeeded(&self) -> bool {
        self.exit == ExitKind::Code(0) && self.liveness.is_none() && !self.oom
    }
}

/// The process of the current run.
enum Proc {
    /// Our child: exit status known.
    Child(tokio::process::Child),
    /// Adopted after an agent restart: watched through `/proc`.
    Adopted,
}

struct Running {
    proc: Proc,
    pid: u32,
    start_time: u64,
    started: Instant,
    oom_base: u64,
}

impl Running {
    /// Waits for the process to end (cancel safe).
    async fn wait(&mut self, poll: Duration) -> ExitKind {
        if let Proc::Child(child) = &mut self.proc {
            match child.wait().await {
                Ok(st) => return exit_kind(st),
                Err(e) => {
                    tracing::warn!(pid = self.pid, "waiting for child failed, polling /proc instead: {e}");
                    self.proc = Proc::Adopted;
                }
            }
        }
        loop {
            if !procfs::is_same_live(self.pid, self.start_time) {
                return ExitKind::Unknown;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Signals the process group, if the process is still the one we started.
    fn signal_group(&self, sig: i32) {
        let ours = match self.proc {
            // Not yet reaped, so the pid cannot have been reused.
            Proc::Child(_) => true,
            Proc::Adopted => procfs::is_same_live(self.pid, self.start_time),
        };
        if ours {
            if let Err(e) = sys::killpg(self.pid, sig) {
                tracing::debug!(pid = self.pid, "killpg {}: {e}", sys::signal_name(sig));
            }
        }
    }
}

fn exit_kind(st: ExitStatus) -> ExitKind {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitKind::Code(c),
        (None, Some(s)) => ExitKind::Signal(s),
        (None, None) => ExitKind::Unknown,
    }
}

/// Starts a supervisor. The first spawn (or adoption) happens before this
/// returns, so the status already carries the pid.
pub(crate) async fn launch(
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    inst: AppInstance,
    hash: String,
    restart_count: u32,
    begin: Begin,
    shutdown: watch::Receiver<()>,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let cgroup = shared.cgroups.instance(&inst.metadata.name);
    let mut sup = Supervisor {
        shared,
        slot,
        inst,
        hash: hash.clone(),
        cgroup,
        cmds: rx,
        shutdown,
        restart_count,
        backoff_step: 0,
        pid: None,
        start_time: None,
        started_unix: 0,
        status: AppInstanceStatus::default(),
        unsaved: false,
        restart_now: false,
    };
    if !matches!(begin, Begin::Adopt { .. }) {
        sup.setup_cgroup();
    }
    let next = sup.begin(begin);
    let task = tokio::spawn(sup.run(next));
    Handle { hash, cmds: tx, task }
}

enum Next {
    Spawn,
    Supervise(Running),
    Exited(Outcome),
    Idle,
}

struct Supervisor {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    inst: AppInstance,
    hash: String,
    cgroup: Option<InstanceCgroup>,
    cmds: mpsc::UnboundedReceiver<Command>,
    shutdown: watch::Receiver<()>,
    restart_count: u32,
    backoff_step: u32,
    pid: Option<u32>,
    start_time: Option<u64>,
    started_unix: i64,
    status: AppInstanceStatus,
    /// The last record could not be written (full disk): retried while the
    /// process runs, so a later agent can still adopt it.
    unsaved: bool,
    /// The next restart skips the back-off: the process died while the
    /// agent was down (most often a host reboot), not in front of us.
    restart_now: bool,
}

impl Supervisor {
    fn name(&self) -> &str {
        &self.inst.metadata.name
    }

    /// Creates the cgroup and writes the template's limits; without it the
    /// instance runs unconfined.
    fn setup_cgroup(&mut self) {
        if let Some(cg) = &self.cgroup {
            let limits = &self.inst.spec.template.resources.limits;
            if let Err(e) = cg.setup(limits.memory_bytes(), limits.cpu_millis()) {
                tracing::warn!(instance = %self.name(), "cannot set limits, running without them: {e}");
                self.cgroup = None;
            }
        }
    }

    /// The synchronous first step.
    fn begin(&mut self, begin: Begin) -> Next {
        match begin {
            Begin::Spawn => match self.spawn() {
                Ok(r) => Next::Supervise(r),
                Err(msg) => Next::Exited(self.spawn_failed(msg)),
            },
            Begin::Adopt { pid, start_time, started_unix, status } => {
                self.pid = Some(pid);
                self.start_time = Some(start_time);
                self.started_unix = started_unix;
                let ran = clock::unix_secs(SystemTime::now()).saturating_sub(started_unix).max(0);
                let started =
                    Instant::now().checked_sub(Duration::from_secs(ran.unsigned_abs())).unwrap_or_else(Instant::now);
                let oom_base = self.cgroup.as_ref().map_or(0, InstanceCgroup::oom_kills);
                self.set_status(AppInstanceStatus {
                    phase: InstancePhase::Running,
                    pid: Some(pid),
                    restart_count: self.restart_count,
                    started_at: status.started_at,
                    ..Default::default()
                });
                Next::Supervise(Running { proc: Proc::Adopted, pid, start_time, started, oom_base })
            }
            Begin::DiedWhileDown { status } => {
                self.status = status;
                self.restart_now = true;
                Next::Exited(Outcome { exit: ExitKind::Unknown, liveness: None, oom: false, ran_for: Duration::ZERO })
            }
            Begin::Ended { restart, status } => {
                self.set_status(status);
                if restart {
                    self.restart_count += 1;
                    Next::Spawn
                } else {
                    Next::Idle
                }
            }
        }
    }

    async fn run(mut self, mut next: Next) {
        loop {
            next = match next {
                Next::Spawn => match self.spawn() {
                    Ok(r) => Next::Supervise(r),
                    Err(msg) => Next::Exited(self.spawn_failed(msg)),
                },
                Next::Supervise(r) => match self.supervise(r).await {
                    Some(o) => Next::Exited(o),
                    None => return,
                },
                Next::Exited(o) => {
                    self.report_exit(&o);
                    if !restarts(self.inst.spec.template.restart_policy, o.succeeded()) {
                        Next::Idle
                    } else if self.backoff(o.ran_for).await {
                        self.restart_count += 1;
                        Next::Spawn
                    } else {
                        return;
                    }
                }
                Next::Idle => {
                    self.idle().await;
                    return;
                }
            }
        }
    }

    fn spawn_failed(&self, msg: String) -> Outcome {
        tracing::warn!(instance = %self.name(), "{msg}");
        Outcome { exit: ExitKind::SpawnFailed(msg), liveness: None, oom: false, ran_for: Duration::ZERO }
    }

    /// Environment given to the workload (and exec probes).
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .inst
            .spec
            .template
            .process
            .as_ref()
            .map(|p| p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        env.push(("NODE_NAME".into(), self.shared.node_name.clone()));
        env.push(("APP_NAME".into(), self.inst.spec.app.clone()));
        env.push(("INSTANCE_NAME".into(), self.inst.metadata.name.clone()));
        env.push((crate::termination::ENV.into(), self.slot.paths.termination.display().to_string()));
        env.extend(self.shared.opts.node_env.iter().cloned());
        env
    }

    fn working_dir(&self) -> std::path::PathBuf {
        let paths = &self.slot.paths;
        match self.inst.spec.template.process.as_ref().map(|p| p.working_dir.as_str()) {
            Some(d) if !d.is_empty() => paths.work.join(d), // absolute `d` replaces the base
            _ => paths.work.clone(),
        }
    }

    /// Starts a process and reports Starting, then Running.
    fn spawn(&mut self) -> Result<Running, String> {
        let Some(spec) = self.inst.spec.template.process.clone() else {
            return Err("no process section".into());
        };
        let Some((prog, lead)) = spec.command.split_first() else {
            return Err("process.command is empty".into());
        };
        let paths = self.slot.paths.clone();
        fs::create_dir_all(&paths.work).map_err(|e| format!("cannot create {}: {e}", paths.work.display()))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| format!("cannot open {}: {e}", paths.log.display()))?;
        let log_err = log.try_clone().map_err(|e| format!("cannot open {}: {e}", paths.log.display()))?;
        // A message from an earlier run must not explain this one's end.
        let _ = fs::remove_file(&paths.termination);
        let cwd = self.working_dir();

        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(lead)
            .args(&spec.args)
            .envs(self.env())
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(false);
        let procs = self.cgroup.as_ref().map(InstanceCgroup::procs_files).unwrap_or_default();
        sys::detach_and_join(&mut cmd, procs);
        let oom_base = self.cgroup.as_ref().map_or(0, InstanceCgroup::oom_kills);
        let child = cmd.spawn().map_err(|e| format!("cannot start {prog:?} in {}: {e}", cwd.display()))?;
        drop(cmd); // closes our copies of the log and cgroup files
        let Some(pid) = child.id() else {
            return Err(format!("{prog:?} exited before its pid could be read"));
        };
        if let Some(cg) = &self.cgroup {
            // Normally already joined before exec; this is the fallback.
            if let Err(e) = cg.add_pid(pid) {
                tracing::debug!(instance = %self.name(), "{e}");
            }
        }
        let start_time = procfs::read_stat(pid).map_or(0, |s| s.start_time);
        self.pid = Some(pid);
        self.start_time = Some(start_time);
        self.started_unix = clock::unix_secs(SystemTime::now());
        let started_at = clock::rfc3339_from_unix(self.started_unix);
        tracing::info!(instance = %self.name(), pid, restarts = self.restart_count, "started");
        let starting = AppInstanceStatus {
            phase: InstancePhase::Starting,
            pid: Some(pid),
            restart_count: self.restart_count,
            started_at,
            ..Default::default()
        };
        self.set_status(starting.clone());
        self.set_status(AppInstanceStatus { phase: InstancePhase::Running, ..starting });
        Ok(Running { proc: Proc::Child(child), pid, start_time, started: Instant::now(), oom_base })
    }

    /// Watches a run until it ends (`Some`) or the supervisor must stop
    /// (`None`; on Stop the process was terminated, on shutdown it is left
    /// running).
    async fn supervise(&mut self, mut running: Running) -> Option<Outcome> {
        let poll = self.shared.opts.exit_poll_interval;
        let probe = self.inst.spec.template.health.liveness.clone();
        let ctx = ExecContext { cwd: self.working_dir(), env: self.env() };
        enum Ev {
            Exit(ExitKind),
            Liveness(String),
            Stop(oneshot::Sender<()>),
            Detach,
            RetrySave,
        }
        loop {
            let ev = {
                let unsaved = self.unsaved;
                let retry = async {
                    if unsaved {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                let liveness = async {
                    match &probe {
                        Some(p) => probe::watch(p, &ctx).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    exit = running.wait(poll) => Ev::Exit(exit),
                    why = liveness => Ev::Liveness(why),
                    cmd = self.cmds.recv() => match cmd {
                        Some(Command::Stop(reply)) => Ev::Stop(reply),
                        None => Ev::Detach,
                    },
                    _ = self.shutdown.changed() => Ev::Detach,
                    _ = retry => Ev::RetrySave,
                }
            };
            return match ev {
                Ev::RetrySave => {
                    self.persist();
                    continue;
                }
                Ev::Exit(exit) => Some(self.finish(&running, exit, None)),
                Ev::Liveness(why) => {
                    tracing::warn!(instance = %self.name(), pid = running.pid, "{why}; killing");
                    let exit = self.terminate(&mut running).await;
                    Some(self.finish(&running, exit, Some(why)))
                }
                Ev::Stop(reply) => {
                    self.terminate(&mut running).await;
                    self.cleanup_leftovers(&running);
                    let _ = reply.send(());
                    None
                }
                Ev::Detach => None,
            };
        }
    }

    /// SIGTERM to the group, SIGKILL after the grace period; waits for exit.
    async fn terminate(&self, running: &mut Running) -> ExitKind {
        let poll = self.shared.opts.exit_poll_interval.min(Duration::from_millis(100));
        running.signal_group(libc::SIGTERM);
        match tokio::time::timeout(self.shared.opts.stop_grace, running.wait(poll)).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(instance = %self.name(), pid = running.pid, "grace period over, sending SIGKILL");
                running.signal_group(libc::SIGKILL);
                running.wait(poll).await
            }
        }
    }

    /// Kills what the run left behind (other members of its process group
    /// or cgroup).
    fn cleanup_leftovers(&self, running: &Running) {
        if matches!(running.proc, Proc::Child(_)) {
            // Just reaped: its pid stays reserved while group members live.
            let _ = sys::killpg(running.pid, libc::SIGKILL);
        }
        if let Some(cg) = &self.cgroup {
            for pid in cg.pids() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    fn finish(&self, running: &Running, exit: ExitKind, liveness: Option<String>) -> Outcome {
        self.cleanup_leftovers(running);
        let oom = match &self.cgroup {
            Some(cg) => exit != ExitKind::Code(0) && cg.oom_kills() > running.oom_base,
            None => false,
        };
        Outcome { exit, liveness, oom, ran_for: running.started.elapsed() }
    }

    fn report_exit(&mut self, o: &Outcome) {
        let (phase, reason, message, exit_code) = self.classify(o);
        tracing::info!(instance = %self.name(), %reason, "{message}");
        self.pid = None;
        self.start_time = None;
        let started_at = self.status.started_at.clone();
        self.set_status(AppInstanceStatus {
            phase,
            reason,
            message,
            exit_code,
            restart_count: self.restart_count,
            pid: None,
            started_at,
            ..Default::default()
        });
    }

    fn classify(&self, o: &Outcome) -> (InstancePhase, String, String, Option<i32>) {
        let (phase, reason, message, code) = self.classify_exit(o);
        if o.liveness.is_some() || o.oom || matches!(o.exit, ExitKind::Code(0) | ExitKind::SpawnFailed(_)) {
            return (phase, reason.to_string(), message, code);
        }
        // The workload's own account of a failure (a wasm guest stopped at
        // its limits, for one) says more than the exit code.
        match crate::termination::read(&self.slot.paths.termination) {
            Some(t) => (phase, t.reason, format!("{} ({message})", t.message), code),
            None => (phase, reason.to_string(), message, code),
        }
    }

    fn classify_exit(&self, o: &Outcome) -> (InstancePhase, &'static str, String, Option<i32>) {
        let code = match &o.exit {
            ExitKind::Code(c) => Some(*c),
            ExitKind::Signal(s) => Some(128 + s),
            _ => None,
        };
        if let Some(why) = &o.liveness {
            return (InstancePhase::Failed, "LivenessFailed", format!("{why}; process killed"), code);
        }
        if o.oom {
            let limits = &self.inst.spec.template.resources.limits;
            let limit = match &limits.memory {
                Some(m) => format!("{m} ({} bytes)", limits.memory_bytes()),
                None => "of the cgroup".to_string(),
            };
            return (
                InstancePhase::Failed,
                "OOMKilled",
                format!("killed by the kernel OOM killer: memory limit {limit} exceeded"),
                code,
            );
        }
        match &o.exit {
            ExitKind::Code(0) => (InstancePhase::Stopped, "Completed", "exited with code 0".into(), code),
            ExitKind::Code(c) => (InstancePhase::Failed, "Error", format!("exited with code {c}"), code),
            ExitKind::Signal(s) => {
                (InstancePhase::Failed, "Signaled", format!("killed by signal {s} ({})", sys::signal_name(*s)), code)
            }
            ExitKind::Unknown => (
                InstancePhase::Failed,
                "Error",
                "exited while agent was down or not our child; exit code unknown".into(),
                None,
            ),
            ExitKind::SpawnFailed(msg) => (InstancePhase::Failed, "Error", msg.clone(), None),
        }
    }

    /// Waits before a restart. `false` when stopped or shut down meanwhile.
    async fn backoff(&mut self, ran_for: Duration) -> bool {
        if std::mem::take(&mut self.restart_now) {
            return true;
        }
        let opts = &self.shared.opts;
        if ran_for >= opts.backoff_reset_after {
            self.backoff_step = 0;
        }
        let delay = opts.backoff_initial.saturating_mul(1 << self.backoff_step.min(20)).min(opts.backoff_max);
        self.backoff_step = self.backoff_step.saturating_add(1);
        tracing::debug!(instance = %self.name(), ?delay, "restarting after back-off");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            cmd = self.cmds.recv() => {
                if let Some(Command::Stop(reply)) = cmd {
                    let _ = reply.send(());
                }
                false
            }
            _ = self.shutdown.changed() => false,
        }
    }

    /// Nothing runs; waits to be stopped.
    async fn idle(&mut self) {
        tokio::select! {
            cmd = self.cmds.recv() => {
                if let Some(Command::Stop(reply)) = cmd {
                    let _ = reply.send(());
                }
            }
            _ = self.shutdown.changed() => {}
        }
    }

    /// Records, persists and reports a status.
    fn set_status(&mut self, status: AppInstanceStatus) {
        self.status = status.clone();
        self.persist();
        let mut current = self.slot.status();
        *current = status.clone();
        // Sent under the status lock, as usage reports are, so a usage
        // report of the previous state cannot overtake this change.
        let _ = self.shared.updates.send(StatusUpdate { instance: self.name().to_string(), status });
    }

    /// Writes `state.json` from the current state.
    fn persist(&mut self) {
        let rec = StateRecord {
            version: STATE_VERSION,
            instance: self.inst.clone(),
            template_hash: self.hash.clone(),
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.shared.boot_id.clone(),
            started_unix: self.started_unix,
            status: self.status.clone(),
        };
        match state::save(&self.slot.paths, &rec) {
            Ok(()) => {
                if std::mem::take(&mut self.unsaved) {
                    tracing::info!(instance = %self.name(), "state persisted again");
                }
            }
            Err(e) => {
                if !self.unsaved {
                    tracing::warn!(instance = %self.name(), "cannot persist state (retrying while it runs): {e}");
                }
                self.unsaved = true;
            }
        }
    }
}

/// Terminates the process recorded in `state.json` if it is still the one
/// recorded (used when no supervisor owns it).
pub(crate) async fn kill_recorded(shared: &Shared, paths: &InstancePaths) {
    let Ok(rec) = state::load(&paths.state) else {
        return;
    };
    let (Some(pid), Some(st)) = (rec.pid, rec.start_time) else {
        return;
    };
    if !procfs::is_same_live(pid, st) {
        return;
    }
    let _ = sys::killpg(pid, libc::SIGTERM);
    let deadline = Instant::now() + shared.opts.stop_grace;
    while Instant::now() < deadline && procfs::is_same_live(pid, st) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if procfs::is_same_live(pid, st) {
        let _ = sys::killpg(pid, libc::SIGKILL);
    }
}

/// Deletes an instance's cgroup (killing stragglers) and directory.
pub(crate) async fn delete_instance(shared: &Shared, name: &str, paths: &InstancePaths) {
    if let Some(cg) = shared.cgroups.instance(name) {
        for _ in 0..100 {
            for pid in cg.pids() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            match cg.remove() {
                Ok(()) => break,
                Err(_) if cg.exists() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => break,
            }
        }
        if cg.exists() {
            tracing::warn!(instance = name, "could not remove cgroup");
        }
    }
    remove_dir(paths.dir.as_path()).await;
}

async fn remove_dir(dir: &Path) {
    for attempt in 0..5 {
        match fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 4 => {
                tracing::warn!(dir = %dir.display(), "cannot delete instance directory: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_requires_clean_exit() {
        let ok = Outcome { exit: ExitKind::Code(0), liveness: None, oom: false, ran_for: Duration::ZERO };
        assert!(ok.succeeded());
        assert!(!Outcome { exit: ExitKind::Code(1), ..ok.clone() }.succeeded());
        assert!(!Outcome { exit: ExitKind::Signal(9), ..ok.clone() }.succeeded());
        assert!(!Outcome { liveness: Some("x".into()), ..ok.clone() }.succeeded());
        assert!(!Outcome { exit: ExitKind::Unknown, ..ok }.succeeded());
    }
}
