//! The shim: the body of `yunbian shim oci`, the process the process runtime
//! supervises for an `oci` instance, and crun detection.
//!
//! Sequence ([`run_shim`]):
//! 1. `crun delete -f <id>`: a container left by a shim that was killed.
//! 2. `crun create --bundle <bundle> --pid-file … <id>`, with the shim's
//!    stdin/stdout/stderr, which the container inherits: its output goes
//!    straight to the instance's log file, through no pipe of ours. crun
//!    exits after creating; the shim is a *child subreaper*, so the
//!    container's init becomes its child.
//! 3. `crun start <id>`, then wait for the init to exit (`waitpid`, woken
//!    by SIGCHLD). SIGTERM and SIGINT to the shim are forwarded to the
//!    init, once each (the init is in its own session, so a signal to the
//!    shim's process group reaches it only through the shim); if it has not
//!    exited `stop_grace` after the first one, it gets SIGKILL. An init is
//!    pid 1 of its namespace and ignores signals it has no handler for.
//! 4. `crun delete -f <id>`, and the init's status is returned: its exit
//!    code, or 128 + the signal that killed it (137 for an OOM kill).
//!
//! Cgroups ([`ShimCgroups`]): by default crun runs with
//! `--cgroup-manager=disabled`, so the container stays in the shim's own
//! cgroups. Under the process runtime these are the instance's cgroups,
//! with the instance's memory and cpu limits, its OOM counter and its
//! straggler killing — the same as for a native process. `Cgroupfs` lets
//! crun create `/yunbian-oci/<id>` and apply `linux.resources` from
//! `config.json` itself (for a shim run outside the process runtime).
//!
//! Hybrid cgroup hosts (v1 controllers under a tmpfs `/sys/fs/cgroup`, a
//! cgroup2 at `/sys/fs/cgroup/unified`): crun refuses to run at all — with
//! any cgroup manager — if the v2 hierarchy has a controller, as it has
//! when a controller such as `hugetlb` is not mounted as v1. The shim then
//! runs each crun command through `unshare --mount` with the unified
//! hierarchy unmounted in that private mount namespace only, so crun sees a
//! plain v1 host, which is how the process runtime uses it too.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::signal::unix::{signal, SignalKind};

use super::{validate_container_id, OciError};

/// Default crun state directory (`crun --root`).
pub const DEFAULT_STATE_ROOT: &str = "/run/yunbian/crun";

/// Who puts the container into cgroups. See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShimCgroups {
    /// crun manages no cgroups: the container stays in the shim's.
    #[default]
    Inherit,
    /// crun creates `/yunbian-oci/<id>` and applies `config.json`'s limits.
    Cgroupfs,
}

/// How to run one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimOptions {
    /// The prepared bundle (`config.json` and `rootfs/`).
    pub bundle: PathBuf,
    /// The container id.
    pub id: String,
    /// The crun binary; `crun` from `PATH` when `None`.
    pub crun: Option<PathBuf>,
    /// crun's state directory. Default [`DEFAULT_STATE_ROOT`].
    pub state_root: PathBuf,
    /// Cgroup handling. Default [`ShimCgroups::Inherit`].
    pub cgroups: ShimCgroups,
    /// Time between a forwarded SIGTERM/SIGINT and SIGKILL. Default 3 s,
    /// below the process runtime's 5 s stop grace, so that the shim ends
    /// and deletes the container itself before it is killed.
    pub stop_grace: Duration,
}

impl ShimOptions {
    /// Options with the defaults.
    pub fn new(bundle: impl Into<PathBuf>, id: impl Into<String>) -> ShimOptions {
        ShimOptions {
            bundle: bundle.into(),
            id: id.into(),
            crun: None,
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            cgroups: ShimCgroups::Inherit,
            stop_grace: Duration::from_secs(3),
        }
    }
}

/// Whether a usable crun is installed: `crun --version` runs. `Ok` says
/// which version and where (and how hybrid cgroups are worked around);
/// `Err` says what is missing.
pub fn detect_crun(path: Option<&Path>) -> Result<String, String> {
    let bin = resolve_crun(path).map_err(|e| e.to_string())?;
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim();
    if !first.starts_with("crun version") {
        return Err(format!("{} --version does not look like crun: {first:?}", bin.display()));
    }
    let mut note = format!("{first} ({})", bin.display());
    if hybrid_with_v2_controllers() {
        let unshare = find_in_path("unshare")
            .ok_or_else(|| format!("{note}, but this host has hybrid cgroups with controllers on cgroup v2, which crun refuses, and `unshare` (util-linux), needed to work around it, is not installed"))?;
        note.push_str(&format!(
            "; hybrid cgroups with controllers on v2: crun runs through {} with /sys/fs/cgroup/unified unmounted",
            unshare.display()
        ));
    }
    Ok(note)
}

/// The shim body. See the module docs. Blocks until the container has
/// exited and been deleted; returns the code the shim should exit with.
///
/// Meant to be the whole of a dedicated process: it makes the process a
/// child subreaper and handles its SIGTERM and SIGINT. It must be called
/// outside any Tokio runtime.
pub fn run_shim(opts: &ShimOptions) -> Result<i32, OciError> {
    validate_container_id(&opts.id)?;
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(OciError::Invalid("run_shim blocks its thread: call it outside a Tokio runtime".into()));
    }
    if !opts.bundle.join("config.json").is_file() {
        return Err(OciError::Invalid(format!(
            "bundle {} has no config.json (prepare_bundle first)",
            opts.bundle.display()
        )));
    }
    let crun = Crun::locate(opts)?;
    fs::create_dir_all(&opts.state_root)
        .and_then(|()| fs::set_permissions(&opts.state_root, fs::Permissions::from_mode(0o700)))
        .map_err(|e| OciError::io(format!("create {}", opts.state_root.display()), e))?;
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| OciError::io("become a child subreaper", e.into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OciError::io("start the shim's event loop", e))?;
    rt.block_on(supervise(&crun, opts))
}

async fn supervise(crun: &Crun, opts: &ShimOptions) -> Result<i32, OciError> {
    let sig = |kind: SignalKind, name: &str| signal(kind).map_err(|e| OciError::io(format!("handle {name}"), e));
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut chld = sig(SignalKind::child(), "SIGCHLD")?;
    let id = opts.id.as_str();

    crun.delete_force(id)?;
    let pid_file = opts.bundle.join("init.pid");
    let _ = fs::remove_file(&pid_file);
    if let Err(e) = crun.create(&opts.bundle, id, &pid_file) {
        let _ = crun.delete_force(id);
        return Err(e);
    }
    let pid = match read_pid(&pid_file) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = crun.delete_force(id);
            return Err(e);
        }
    };
    // Asked to stop while the container was being created: never start it.
    // (The yield lets the event loop deliver signals that already arrived.)
    tokio::task::yield_now().await;
    let early = tokio::select! {
        biased;
        _ = term.recv() => Some(libc::SIGTERM),
        _ = int.recv() => Some(libc::SIGINT),
        _ = std::future::ready(()) => None,
    };
    if let Some(s) = early {
        crun.delete_force(id)?;
        let _ = reap(pid);
        return Ok(128 + s);
    }
    if let Err(e) = crun.start(id) {
        let _ = crun.delete_force(id);
        let _ = reap(pid);
        return Err(e);
    }
    tracing::info!(container = id, pid = pid.as_raw_nonzero().get(), "container started");

    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let status = loop {
        if let Some(status) = try_reap(pid)? {
            break status;
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            _ = chld.recv() => {}
            _ = tick.tick() => {}
            _ = term.recv() => forward(pid, Signal::TERM, &mut kill_at, opts.stop_grace),
            _ = int.recv() => forward(pid, Signal::INT, &mut kill_at, opts.stop_grace),
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                tracing::info!(container = id, "stop grace over, sending SIGKILL");
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                kill_at = None;
            }
        }
    };
    let code = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 128,
    };
    let mut deleted = crun.delete_force(id);
    for _ in 0..3 {
        if deleted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        deleted = crun.delete_force(id);
    }
    let _ = fs::remove_file(&pid_file);
    deleted?;
    tracing::info!(container = id, code, "container exited");
    Ok(code)
}

fn forward(pid: Pid, sig: Signal, kill_at: &mut Option<tokio::time::Instant>, grace: Duration) {
    let _ = rustix::process::kill_process(pid, sig);
    if kill_at.is_none() {
        *kill_at = Some(tokio::time::Instant::now() + grace);
    }
}

/// The init's status if it has ended.
fn try_reap(pid: Pid) -> Result<Option<rustix::process::WaitStatus>, OciError> {
    match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
        Ok(Some((_, st))) if st.exited() || st.signaled() => Ok(Some(st)),
        Ok(_) => Ok(None),
        Err(e) => Err(OciError::io(format!("wait for the container's init (pid {})", pid.as_raw_nonzero()), e.into())),
    }
}

/// Waits (briefly) for an init killed by `crun delete -f`, so no zombie stays.
fn reap(pid: Pid) -> Result<(), OciError> {
    for _ in 0..50 {
        if try_reap(pid)?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn read_pid(path: &Path) -> Result<Pid, OciError> {
    let text = fs::read_to_string(path).map_err(|e| OciError::io(format!("read {}", path.display()), e))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| OciError::Crun(format!("crun wrote no valid pid to {}: {text:?}", path.display())))
}

/// How to invoke crun on this host.
struct Crun {
    bin: PathBuf,
    root: PathBuf,
    manager: &'static str,
    /// `unshare`, when crun must run without the unified hierarchy.
    unshare: Option<PathBuf>,
}

impl Crun {
    fn locate(opts: &ShimOptions) -> Result<Crun, OciError> {
        let bin = resolve_crun(opts.crun.as_deref())?;
        let unshare = if hybrid_with_v2_controllers() {
            Some(find_in_path("unshare").ok_or_else(|| {
                OciError::Crun(
                    "this host has hybrid cgroups with controllers on cgroup v2, which crun refuses; \
                     `unshare` (util-linux) is needed to work around it"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let manager = match opts.cgroups {
            ShimCgroups::Inherit => "disabled",
            ShimCgroups::Cgroupfs => "cgroupfs",
        };
        Ok(Crun { bin, root: opts.state_root.clone(), manager, unshare })
    }

    /// `crun --root … --cgroup-manager=… <extra global> <args>`, wrapped when needed.
    fn command(&self, global: &[String], args: &[&str]) -> Command {
        let mut cmd = match &self.unshare {
            Some(unshare) => {
                let mut c = Command::new(unshare);
                c.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                    .arg("umount -l /sys/fs/cgroup/unified && exec \"$@\"")
                    .arg("crun")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("--root").arg(&self.root).arg(format!("--cgroup-manager={}", self.manager));
        cmd.args(global).args(args);
        cmd
    }

    /// Runs a crun command with its output captured.
    fn run(&self, args: &[&str]) -> Result<(), OciError> {
        let out = self
            .command(&[], args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| OciError::io(format!("run {} {}", self.bin.display(), args.join(" ")), e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(OciError::Crun(format!(
            "crun {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    /// Deletes the container if crun knows it (killing it first).
    fn delete_force(&self, id: &str) -> Result<(), OciError> {
        if !self.root.join(id).exists() {
            return Ok(());
        }
        self.run(&["delete", "--force", id])
    }

    /// `crun create`, with the shim's stdio for the container and crun's
    /// own messages in `<bundle>/crun.log`.
    fn create(&self, bundle: &Path, id: &str, pid_file: &Path) -> Result<(), OciError> {
        let log = bundle.join("crun.log");
        let _ = fs::remove_file(&log);
        let (Some(bundle_s), Some(pid_s), Some(log_s)) = (bundle.to_str(), pid_file.to_str(), log.to_str()) else {
            return Err(OciError::Invalid(format!("bundle path {} is not UTF-8", bundle.display())));
        };
        let status = self
            .command(&[format!("--log=file:{log_s}")], &["create", "--bundle", bundle_s, "--pid-file", pid_s, id])
            .status()
            .map_err(|e| OciError::io(format!("run {} create", self.bin.display()), e))?;
        if status.success() {
            return Ok(());
        }
        let message = fs::read_to_string(&log).unwrap_or_default();
        let message =
            message.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
        Err(OciError::Crun(format!("crun create {id} failed ({status}): {}", message.trim())))
    }

    fn start(&self, id: &str) -> Result<(), OciError> {
        self.run(&["start", id])
    }
}

/// The crun binary: `path` if given (it must exist), else `crun` in `PATH`.
fn resolve_crun(path: Option<&Path>) -> Result<PathBuf, OciError> {
    match path {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) => {
            Err(OciError::Crun(format!("crun not found at {} (install crun: apt-get install crun)", p.display())))
        }
        None => find_in_path("crun")
            .ok_or_else(|| OciError::Crun("crun not found in PATH (install crun: apt-get install crun)".into())),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A hybrid cgroup host whose v2 hierarchy has controllers (crun refuses those).
fn hybrid_with_v2_controllers() -> bool {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return false; // pure v2
    }
    match fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers") {
        Ok(s) => !s.trim().is_empty(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => false,
    }
}
