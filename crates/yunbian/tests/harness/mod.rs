//! End-to-end test support: a cloud and edge agents as real `yunbian`
//! processes on loopback, each test in its own temporary directory.
//!
//! ```ignore
//! let mut c = Cluster::builder("deploy").start();   // cloud up, CLI answers
//! c.join("n1");                                      // agent joined and Ready
//! c.apply(&App::new("web").replicas(2).shell("sleep 100").yaml());
//! let running = c.wait_running("web", 2);
//! c.delete_app("web");                               // instances and pids gone
//! ```
//!
//! Faults (see `yunbian_faults`): an edge joined with
//! [`EdgeSetup::via_link`] reaches the cloud through a [`LinkProxy`] the
//! test controls ([`Cluster::link`]: cut, refuse, delay, loss, heal);
//! [`EdgeSetup::faketime`] runs the agent with its clock shifted
//! (libfaketime); [`Cluster::reboot_edge`] kills an agent with all its
//! workloads, as a host reboot does; [`Cluster::mount_tmpfs`] puts an edge's
//! data directory on a small tmpfs that the test can fill.
//!
//! ```ignore
//! let mut c = Cluster::builder("outage").start();
//! c.join_with("n1", EdgeSetup::new().via_link());
//! c.link("n1").cut();                                // blackhole
//! c.link("n1").heal().unwrap();
//! ```
//!
//! Everything started here is killed on drop (SIGKILL), including the
//! workloads whose pids were seen in instance statuses (they run in their
//! own sessions and outlive agents) and every process whose working
//! directory lies in the test directory. The directory is removed when the
//! test passed and kept (with log tails printed) when it failed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use yunbian_faults::{LinkProxy, TmpfsMount};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_yunbian");

/// Default wait for anything the cluster does on its own.
pub const WAIT: Duration = Duration::from_secs(60);
/// Options of every agent started here: a fast heartbeat, and agent
/// metrics on a port of their own (never a shared default port).
pub const EDGE_RUN_ARGS: [&str; 10] = [
    "--heartbeat",
    "1s",
    "--metrics-listen",
    "127.0.0.1:0",
    "--mqtt-listen",
    "127.0.0.1:0",
    "--device-api-listen",
    "off",
    "--p2p-listen",
    "127.0.0.1:0",
];

/// Longest a single CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ waiting

/// Polls `f` every 150 ms until it answers `Ok`, and returns that value.
/// Panics after `timeout` with `what` and the last `Err` (the last
/// observed state).
#[track_caller]
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t0 = Instant::now();
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if t0.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        thread::sleep(Duration::from_millis(150));
    }
}

/// `len` pseudo-random bytes (xorshift from `seed`, non-zero), so no two
/// artifact chunks are alike.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Seconds since the Unix epoch (the test's real clock).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ------------------------------------------------------------------ processes

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code (-1 when killed by a signal or by the timeout).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Stdout of a successful command; panics with everything otherwise.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success(), "command failed: {self:?}");
        &self.stdout
    }

    /// Stderr of a failed command; panics when it succeeded.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(!self.success(), "command should have failed: {self:?}");
        &self.stderr
    }

    /// The lines of stderr starting with `error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("error:")).collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs `cmd` to completion with piped output; kills it after `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Out {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut so = child.stdout.take().expect("stdout piped");
    let mut se = child.stderr.take().expect("stderr piped");
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let t0 = Instant::now();
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(st)) => break (Some(st), false),
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                break (child.wait().ok(), true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let mut stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    if timed_out {
        stderr.push_str(&format!("\n[harness: killed after {timeout:?}]"));
    }
    Out { code: status.and_then(|s: ExitStatus| s.code()).unwrap_or(-1), stdout, stderr }
}

/// `yunbian ARGS` with no config.
pub fn yunbian(args: &[&str]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("NO_COLOR", "1").env_remove("YUNBIAN_CONFIG");
    run(cmd, CLI_TIMEOUT)
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        kill_child(&mut self.0);
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => proc_state(&stat) != Some('Z'),
        Err(_) => false,
    }
}

/// Pids of live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if proc_state(&stat) == Some('Z') {
            continue;
        }
        if stat_field(&stat, 4).and_then(|f| f.parse::<u32>().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// `/proc/PID/stat`: the state letter (after the `(comm)`).
fn proc_state(stat: &str) -> Option<char> {
    stat_field(stat, 2).and_then(|s| s.chars().next())
}

/// `/proc/PID/stat` field `n` (1-based as in proc(5)); `comm` may hold spaces.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The environment variable `key` of a live process, if readable.
pub fn proc_env(pid: u32, key: &str) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string)
    })
}

/// Whether the working directory of `pid` lies under `dir`.
pub fn cwd_under(pid: i32, dir: &Path) -> bool {
    fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
}

/// Live processes whose environment says they belong to `instance`
/// (`INSTANCE_NAME`), children of the workload included.
pub fn instance_processes(instance: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_alive(*pid) && proc_env(*pid, "INSTANCE_NAME").as_deref() == Some(instance))
        .collect();
    out.sort_unstable();
    out
}

/// The live workload processes of `instance`: processes of its
/// environment (`INSTANCE_NAME`) that lead their session, as every
/// workload the runtime starts does (its children are not counted).
pub fn instance_leaders(instance: &str) -> Vec<u32> {
    instance_processes(instance)
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| stat_field(&st, 6).and_then(|f| f.parse::<u32>().ok()))
                == Some(*pid)
        })
        .collect()
}

/// SIGKILLs the workload `pid` (and its process group) if it is still the
/// process of `instance`: never a recycled pid.
fn kill_workload(pid: u32, instance: &str) {
    if !pid_alive(pid) || proc_env(pid, "INSTANCE_NAME").as_deref() != Some(instance) {
        return;
    }
    let _ = Command::new("kill").args(["-9", "--", &format!("-{pid}")]).stderr(Stdio::null()).status();
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
}

/// Log text without ANSI colour sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_log(path: &Path) -> String {
    strip_ansi(&String::from_utf8_lossy(&fs::read(path).unwrap_or_default()))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn log_file(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------ JSON

/// String at a JSON pointer, or "".
pub fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Unsigned number at a JSON pointer.
pub fn u(v: &Value, pointer: &str) -> Option<u64> {
    v.pointer(pointer).and_then(Value::as_u64)
}

/// The `status.pid` of each instance that has one.
pub fn pids(items: &[Value]) -> Vec<u32> {
    items.iter().filter_map(|i| u(i, "/status/pid")).map(|p| p as u32).collect()
}

/// `metadata.name` of each object.
pub fn names(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| s(i, "/metadata/name").to_string()).collect()
}

/// `name phase pid restarts reason` of each instance, for messages.
pub fn summary(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|i| {
            format!(
                "{} on {} {} pid={:?} restarts={:?} reason={:?}",
                s(i, "/metadata/name"),
                s(i, "/spec/node"),
                s(i, "/status/phase"),
                u(i, "/status/pid"),
                u(i, "/status/restartCount"),
                s(i, "/status/reason"),
            )
        })
        .collect();
    format!("[{}]", parts.join("; "))
}

// ------------------------------------------------------------------ apps

/// A process-runtime App manifest.
#[derive(Debug, Clone)]
pub struct App {
    name: String,
    replicas: i64,
    command: Vec<String>,
    restart: String,
    memory_limit: Option<String>,
    env: BTreeMap<String, String>,
    node_selector: BTreeMap<String, String>,
    /// `runtime: fake` (simulated nodes) instead of a process.
    fake: bool,
}

impl App {
    pub fn new(name: &str) -> App {
        App {
            name: name.into(),
            replicas: 1,
            command: vec!["/bin/sh".into(), "-c".into(), "while true; do sleep 1; done".into()],
            restart: "Always".into(),
            memory_limit: None,
            env: BTreeMap::new(),
            node_selector: BTreeMap::new(),
            fake: false,
        }
    }
    /// For simulated nodes (`yunbian sim`): `runtime: fake`, no process.
    pub fn fake(mut self) -> App {
        self.fake = true;
        self
    }
    pub fn replicas(mut self, n: i64) -> App {
        self.replicas = n;
        self
    }
    /// `/bin/sh -c SCRIPT`.
    pub fn shell(mut self, script: &str) -> App {
        self.command = vec!["/bin/sh".into(), "-c".into(), script.into()];
        self
    }
    pub fn command(mut self, argv: &[&str]) -> App {
        self.command = argv.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn restart_policy(mut self, p: &str) -> App {
        self.restart = p.into();
        self
    }
    pub fn memory_limit(mut self, m: &str) -> App {
        self.memory_limit = Some(m.into());
        self
    }
    /// An environment variable of the process (`process.env`).
    pub fn env(mut self, key: &str, value: &str) -> App {
        self.env.insert(key.into(), value.into());
        self
    }
    /// Only nodes labelled `key=value` (`placement.nodeSelector`).
    pub fn node_selector(mut self, key: &str, value: &str) -> App {
        self.node_selector.insert(key.into(), value.into());
        self
    }
    /// The manifest (JSON is YAML).
    pub fn yaml(&self) -> String {
        let mut spec = serde_json::json!({
            "replicas": self.replicas,
            "runtime": "process",
            "process": {"command": self.command},
            "restartPolicy": self.restart,
        });
        if let Some(m) = &self.memory_limit {
            spec["resources"] = serde_json::json!({"limits": {"memory": m}});
        }
        if !self.env.is_empty() {
            spec["process"]["env"] = serde_json::json!(self.env);
        }
        if !self.node_selector.is_empty() {
            spec["placement"] = serde_json::json!({"nodeSelector": self.node_selector});
        }
        if self.fake {
            spec =
                serde_json::json!({"replicas": self.replicas, "runtime": "fake", "placement": spec.get("placement")});
            if spec["placement"].is_null() {
                spec.as_object_mut().map(|o| o.remove("placement"));
            }
        }
        let app = serde_json::json!({
            "apiVersion": "yunbian.io/v1",
            "kind": "App",
            "metadata": {"name": self.name},
            "spec": spec,
        });
        serde_json::to_string_pretty(&app).expect("manifest")
    }
}

// ------------------------------------------------------------------ cluster

/// Options of the cloud process.
#[derive(Debug, Clone)]
pub struct Builder {
    test: String,
    heartbeat: String,
    grace: String,
    node_cert_ttl: Option<String>,
    node_cert_grace: Option<String>,
    evict_after: Option<String>,
}

impl Builder {
    pub fn heartbeat(mut self, d: &str) -> Builder {
        self.heartbeat = d.into();
        self
    }
    pub fn grace(mut self, d: &str) -> Builder {
        self.grace = d.into();
        self
    }
    pub fn node_cert_ttl(mut self, d: &str) -> Builder {
        self.node_cert_ttl = Some(d.into());
        self
    }
    /// `--node-cert-grace`: how long after expiry a node may still renew.
    pub fn node_cert_grace(mut self, d: &str) -> Builder {
        self.node_cert_grace = Some(d.into());
        self
    }
    /// `--evict-after`: instances of a node NotReady this long are re-placed
    /// (`0s`: never).
    pub fn evict_after(mut self, d: &str) -> Builder {
        self.evict_after = Some(d.into());
        self
    }

    /// Makes the test directory, starts the cloud and waits until the CLI
    /// can list nodes.
    pub fn start(self) -> Cluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "yunbian-e2e-{}-{}-{}-{nanos:x}",
            self.test,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut c = Cluster {
            cloud_dir: dir.join("cloud"),
            admin: dir.join("cloud").join("admin.yaml"),
            dir,
            opts: self,
            cloud: None,
            cloud_starts: 0,
            url: String::new(),
            edges: BTreeMap::new(),
            workloads: Mutex::new(BTreeMap::new()),
            files: 0,
            links: BTreeMap::new(),
            peer_links: BTreeMap::new(),
            mounts: Vec::new(),
            rt: None,
        };
        // A port chosen now, outside the ephemeral range, so a restart
        // finds it free again (see `free_port`).
        c.spawn_cloud(&format!("127.0.0.1:{}", free_port()));
        c
    }
}

/// How an edge agent is joined and run.
#[derive(Debug, Clone)]
pub struct EdgeSetup {
    link: bool,
    peer_link: bool,
    /// The peer server's port and the address of the proxy in front of it.
    peer_ports: Option<(u16, SocketAddr)>,
    faketime: Option<String>,
    labels: String,
    heartbeat: String,
    mqtt: Option<String>,
    device_api: Option<String>,
    extra: Vec<String>,
}

impl Default for EdgeSetup {
    fn default() -> Self {
        EdgeSetup {
            link: false,
            peer_link: false,
            peer_ports: None,
            faketime: None,
            labels: "site=a".into(),
            heartbeat: "1s".into(),
            mqtt: None,
            device_api: None,
            extra: Vec::new(),
        }
    }
}

impl EdgeSetup {
    /// Direct to the cloud, labels `site=a`, heartbeat 1 s, real clock.
    pub fn new() -> EdgeSetup {
        EdgeSetup::default()
    }
    /// Join and run through a [`LinkProxy`] of its own (see [`Cluster::link`]).
    pub fn via_link(mut self) -> EdgeSetup {
        self.link = true;
        self
    }
    /// Serves peers (probes, chunks) behind a [`LinkProxy`] of its own,
    /// which the agent advertises (`--p2p-advertise`): see
    /// [`Cluster::peer_link`].
    pub fn via_peer_link(mut self) -> EdgeSetup {
        self.peer_link = true;
        self
    }
    /// Runs the agent (and so its workloads) with its clock shifted by
    /// `offset` (libfaketime's `FAKETIME`, e.g. `-1h`, `+1h`); monotonic
    /// time stays real.
    pub fn faketime(mut self, offset: &str) -> EdgeSetup {
        self.faketime = Some(offset.into());
        self
    }
    /// Node labels `k=v,k2=v2` (default `site=a`).
    pub fn labels(mut self, labels: &str) -> EdgeSetup {
        self.labels = labels.into();
        self
    }
    /// Runs the agent's MQTT broker on `addr` (default: a free port nobody is told about).
    pub fn mqtt(mut self, addr: &str) -> EdgeSetup {
        self.mqtt = Some(addr.into());
        self
    }
    /// Serves the agent's local device and data API on `addr` (default: off).
    pub fn device_api(mut self, addr: &str) -> EdgeSetup {
        self.device_api = Some(addr.into());
        self
    }
    /// Extra arguments for the agent (`--mqtt-site-listen …`).
    pub fn args(mut self, args: &[&str]) -> EdgeSetup {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// The agent's `--heartbeat` (default 1s).
    pub fn heartbeat(mut self, d: &str) -> EdgeSetup {
        self.heartbeat = d.into();
        self
    }
}

/// The shared library of Debian's `libfaketime` package.
pub fn libfaketime() -> Option<PathBuf> {
    let multiarch = format!("/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1", std::env::consts::ARCH);
    [multiarch.as_str(), "/usr/lib/faketime/libfaketime.so.1"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// One edge agent process and its data directory.
#[derive(Debug)]
pub struct Edge {
    pub name: String,
    pub dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    setup: EdgeSetup,
}

/// A cloud process, its edge agents, and the directory they live in.
pub struct Cluster {
    pub dir: PathBuf,
    pub cloud_dir: PathBuf,
    /// `admin.yaml` of the cloud.
    pub admin: PathBuf,
    /// The cloud URL as written to admin.yaml.
    pub url: String,
    opts: Builder,
    cloud: Option<Child>,
    cloud_starts: u32,
    edges: BTreeMap<String, Edge>,
    /// Workload pids seen in instance statuses, with their instance names.
    workloads: Mutex<BTreeMap<u32, String>>,
    files: u32,
    /// The link proxy of each edge joined [`EdgeSetup::via_link`].
    links: BTreeMap<String, LinkProxy>,
    /// The proxy in front of the peer server of each edge joined
    /// [`EdgeSetup::via_peer_link`].
    peer_links: BTreeMap<String, LinkProxy>,
    /// Data directories on tmpfs, unmounted after everything is killed.
    mounts: Vec<TmpfsMount>,
    /// Runs the link proxies.
    rt: Option<tokio::runtime::Runtime>,
}

impl Cluster {
    pub fn builder(test: &str) -> Builder {
        Builder {
            test: test.into(),
            heartbeat: "1s".into(),
            grace: "4s".into(),
            node_cert_ttl: None,
            node_cert_grace: None,
            evict_after: None,
        }
    }

    /// A cluster with default options.
    pub fn start(test: &str) -> Cluster {
        Cluster::builder(test).start()
    }

    // -------------------------------------------------------- cloud process

    fn spawn_cloud(&mut self, listen: &str) {
        self.cloud_starts += 1;
        let log = self.dir.join(format!("cloud.{}.log", self.cloud_starts));
        let mut cmd = Command::new(BIN);
        cmd.arg("cloud").arg("--data-dir").arg(&self.cloud_dir).args([
            "--listen",
            listen,
            "--heartbeat",
            &self.opts.heartbeat,
            "--grace",
            &self.opts.grace,
        ]);
        if let Some(ttl) = &self.opts.node_cert_ttl {
            cmd.args(["--node-cert-ttl", ttl]);
        }
        if let Some(g) = &self.opts.node_cert_grace {
            cmd.args(["--node-cert-grace", g]);
        }
        if let Some(e) = &self.opts.evict_after {
            cmd.args(["--evict-after", e]);
        }
        cmd.env("YUNBIAN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        self.cloud = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn cloud: {e}")));
        // With port 0 the cloud writes the bound URL into admin.yaml.
        eventually(WAIT, "the cloud to write admin.yaml", || {
            self.check_cloud_alive()?;
            let text = fs::read_to_string(&self.admin).map_err(|e| format!("{}: {e}", self.admin.display()))?;
            let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| format!("admin.yaml: {e}"))?;
            match v.get("server").and_then(serde_yaml::Value::as_str) {
                Some(url) if url.starts_with("https://") => {
                    self.url = url.to_string();
                    Ok(())
                }
                _ => Err(format!("no server: in admin.yaml yet: {text}")),
            }
        });
        // admin.yaml can exist before the server answers.
        eventually(WAIT, "the cloud to answer `get nodes`", || {
            self.check_cloud_alive()?;
            let o = self.cli(&["get", "nodes"]);
            if o.success() {
                Ok(())
            } else {
                Err(format!("{o:?}"))
            }
        });
    }

    fn check_cloud_alive(&mut self) -> Result<(), String> {
        if let Some(child) = self.cloud.as_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the cloud exited ({st}); log:\n{}", tail(&self.cloud_log(), 40));
            }
        }
        Ok(())
    }

    /// The port the cloud listens on.
    pub fn port(&self) -> u16 {
        let hostport = self.url.trim_start_matches("https://").trim_end_matches('/');
        hostport.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {}", self.url))
    }

    /// SIGKILLs the cloud.
    pub fn kill_cloud(&mut self) {
        if let Some(mut c) = self.cloud.take() {
            kill_child(&mut c);
        }
    }

    /// Starts the cloud again on the same data directory and port.
    pub fn restart_cloud(&mut self) {
        assert!(self.cloud.is_none(), "kill the cloud first");
        let listen = format!("127.0.0.1:{}", self.port());
        let url = self.url.clone();
        self.spawn_cloud(&listen);
        assert_eq!(self.url, url, "the cloud URL changed across the restart");
    }

    /// Everything the cloud wrote to stderr, all runs.
    pub fn cloud_log(&self) -> String {
        (1..=self.cloud_starts).map(|n| read_log(&self.dir.join(format!("cloud.{n}.log")))).collect::<Vec<_>>().join("")
    }

    /// What the current (latest) cloud process wrote.
    pub fn cloud_log_current(&self) -> String {
        read_log(&self.dir.join(format!("cloud.{}.log", self.cloud_starts)))
    }

    // -------------------------------------------------------- CLI

    /// `yunbian --config admin.yaml ARGS`.
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&self.admin).args(args).env("NO_COLOR", "1").env_remove("YUNBIAN_CONFIG");
        run(cmd, CLI_TIMEOUT)
    }

    /// The command line of `yunbian --config admin.yaml ARGS`, not started.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&self.admin).args(args).env("NO_COLOR", "1").env_remove("YUNBIAN_CONFIG");
        cmd
    }

    /// A new join token (`token create --ttl TTL`).
    pub fn token(&self, ttl: &str) -> String {
        let o = self.cli(&["token", "create", "--ttl", ttl]);
        let t = o.ok().trim().to_string();
        assert!(t.starts_with("YB1.") && !t.contains(char::is_whitespace), "token create printed {o:?}");
        t
    }

    /// Writes `text` to a fresh file in the test directory.
    pub fn write_file(&mut self, name: &str, text: &str) -> PathBuf {
        self.files += 1;
        let p = self.dir.join(format!("{}-{name}", self.files));
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// `apply -f` of a manifest; returns the CLI outcome.
    pub fn try_apply(&mut self, manifest: &str) -> Out {
        let p = self.write_file("manifest.yaml", manifest);
        let path = p.to_string_lossy().into_owned();
        self.cli(&["apply", "-f", &path])
    }

    #[track_caller]
    pub fn apply(&mut self, manifest: &str) {
        let o = self.try_apply(manifest);
        o.ok();
    }

    /// `get KIND -o json` items; records workload pids.
    #[track_caller]
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let o = self.cli(&["get", kind, "-o", "json"]);
        let v = o.json();
        let items = v.get("items").and_then(Value::as_array).cloned().unwrap_or_else(|| panic!("no items: {o:?}"));
        if kind.starts_with("inst") {
            self.record(&items);
        }
        items
    }

    /// Like [`list`](Self::list) but a failure is an `Err` (for `eventually`).
    pub fn try_list(&self, kind: &str) -> Result<Vec<Value>, String> {
        let o = self.cli(&["get", kind, "-o", "json"]);
        if !o.success() {
            return Err(format!("get {kind}: {o:?}"));
        }
        let v: Value = serde_json::from_str(&o.stdout).map_err(|e| format!("get {kind}: {e}: {o:?}"))?;
        let items = v.get("items").and_then(Value::as_array).cloned().ok_or_else(|| format!("no items: {o:?}"))?;
        if kind.starts_with("inst") {
            self.record(&items);
        }
        Ok(items)
    }

    fn record(&self, items: &[Value]) {
        if let Ok(mut w) = self.workloads.lock() {
            for i in items {
                if let Some(pid) = u(i, "/status/pid") {
                    w.insert(pid as u32, s(i, "/metadata/name").to_string());
                }
            }
        }
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.list("nodes")
    }

    pub fn instances(&self) -> Vec<Value> {
        self.list("instances")
    }

    /// Instances of `app`.
    pub fn instances_of(&self, app: &str) -> Result<Vec<Value>, String> {
        Ok(self.try_list("instances")?.into_iter().filter(|i| s(i, "/spec/app") == app).collect())
    }

    /// `get KIND NAME -o json`: `None` when it does not exist.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let o = self.cli(&["get", kind, name, "-o", "json"]);
        if o.success() {
            Some(o.json())
        } else if o.stderr.contains("not found") {
            None
        } else {
            panic!("get {kind} {name}: {o:?}")
        }
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.get("node", name)
    }

    pub fn app(&self, name: &str) -> Option<Value> {
        self.get("app", name)
    }

    // -------------------------------------------------------- waiting on state

    /// Waits until node `name` is Ready and has reported its node info
    /// (`status.info.cpus > 0`); returns it.
    ///
    /// Ready alone is not enough: the cloud marks a node Ready as soon as
    /// its hub connection opens, before the first heartbeat carrying the
    /// node info is stored (see `node_is_not_ready_before_its_first_heartbeat`
    /// in e2e_hub_garbage.rs), so for a moment a Ready node has empty info
    /// and zero allocatable resources.
    #[track_caller]
    pub fn wait_node_ready(&self, name: &str) -> Value {
        eventually(WAIT, &format!("node {name} to be Ready with its node info"), || {
            let nodes = self.try_list("nodes")?;
            let n = nodes.iter().find(|n| s(n, "/metadata/name") == name);
            match n {
                Some(n) if s(n, "/status/phase") == "Ready" && u(n, "/status/info/cpus").is_some_and(|c| c > 0) => {
                    Ok(n.clone())
                }
                Some(n) => Err(format!("{}", n["status"])),
                None => Err(format!("no node {name}; nodes: {nodes:?}")),
            }
        })
    }

    #[track_caller]
    pub fn wait_node_phase(&self, name: &str, phase: &str) -> Value {
        eventually(WAIT, &format!("node {name} to be {phase}"), || {
            let nodes = self.try_list("nodes")?;
            let n = nodes.iter().find(|n| s(n, "/metadata/name") == name);
            match n {
                Some(n) if s(n, "/status/phase") == phase => Ok(n.clone()),
                Some(n) => Err(format!("phase {:?}: {}", s(n, "/status/phase"), n["status"])),
                None => Err(format!("no node {name}; nodes: {nodes:?}")),
            }
        })
    }

    /// Waits until `app` has exactly `n` instances, all Running with a live
    /// pid; returns them sorted by name.
    #[track_caller]
    pub fn wait_running(&self, app: &str, n: usize) -> Vec<Value> {
        eventually(WAIT, &format!("{n} Running instances of {app}"), || {
            let mut items = self.instances_of(app)?;
            items.sort_by(|a, b| s(a, "/metadata/name").cmp(s(b, "/metadata/name")));
            let ok = items.len() == n
                && items.iter().all(|i| {
                    s(i, "/status/phase") == "Running" && u(i, "/status/pid").is_some_and(|p| pid_alive(p as u32))
                });
            if ok {
                Ok(items)
            } else {
                Err(summary(&items))
            }
        })
    }

    /// Waits until none of `pids` (nor anything in their process groups)
    /// is alive.
    #[track_caller]
    pub fn wait_pids_dead(&self, what: &str, pids: &[u32]) {
        eventually(WAIT, what, || {
            let alive: Vec<(u32, Vec<u32>)> =
                pids.iter().map(|p| (*p, group_members(*p))).filter(|(p, g)| pid_alive(*p) || !g.is_empty()).collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive (pid, group members): {alive:?}"))
            }
        });
    }

    /// Deletes `app` and waits until its instances are gone and every
    /// workload pid seen for them is dead (with its process group).
    #[track_caller]
    pub fn delete_app(&self, app: &str) {
        let before = self.instances_of(app).unwrap_or_default();
        self.cli(&["delete", "app", app]).ok();
        eventually(WAIT, &format!("the instances of {app} to be deleted"), || {
            let items = self.instances_of(app)?;
            if items.is_empty() {
                Ok(())
            } else {
                Err(summary(&items))
            }
        });
        let names: Vec<String> = before.iter().map(|i| s(i, "/metadata/name").to_string()).collect();
        let pids: Vec<u32> = self
            .workloads
            .lock()
            .map(|w| w.iter().filter(|(_, n)| names.contains(n)).map(|(p, _)| *p).collect())
            .unwrap_or_default();
        self.wait_pids_dead(&format!("the workloads of {app} to stop"), &pids);
    }

    // -------------------------------------------------------- edges

    /// Joins node `name` (labels `site=a`) with a fresh token, leaves the
    /// agent running, and waits until the node is Ready.
    #[track_caller]
    pub fn join(&mut self, name: &str) -> Value {
        self.join_with(name, EdgeSetup::new())
    }

    /// Like [`join`](Self::join), set up as `setup` says.
    #[track_caller]
    pub fn join_with(&mut self, name: &str, setup: EdgeSetup) -> Value {
        let token = self.token("1h");
        self.spawn_join_with(name, &token, setup);
        self.wait_node_ready(name)
    }

    /// The cloud's socket address (what link proxies forward to).
    pub fn cloud_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The link between edge `name` and the cloud (joined
    /// [`EdgeSetup::via_link`]).
    pub fn link(&self, name: &str) -> &LinkProxy {
        self.links.get(name).unwrap_or_else(|| panic!("edge {name} was not joined via a link"))
    }

    /// The URL edge `name` joins with: its link proxy's, or the cloud's.
    fn edge_url(&mut self, name: &str, link: bool) -> String {
        if !link {
            return self.url.clone();
        }
        if !self.links.contains_key(name) {
            let proxy = self.start_proxy(self.cloud_addr());
            self.links.insert(name.to_string(), proxy);
        }
        format!("https://{}", self.link(name).addr())
    }

    /// A [`LinkProxy`] to `upstream`, run by the cluster's proxy runtime.
    fn start_proxy(&mut self, upstream: SocketAddr) -> LinkProxy {
        let rt = self.rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime for link proxies")
        });
        let _enter = rt.enter();
        LinkProxy::start(upstream).unwrap_or_else(|e| panic!("start link proxy: {e}"))
    }

    /// The proxy in front of edge `name`'s peer server (joined
    /// [`EdgeSetup::via_peer_link`]): its delay is what every peer's probes
    /// of `name` (and their answers) go through.
    pub fn peer_link(&self, name: &str) -> &LinkProxy {
        self.peer_links.get(name).unwrap_or_else(|| panic!("edge {name} was not joined via a peer link"))
    }

    /// Picks the peer server port of edge `name` and starts the proxy in
    /// front of it.
    fn start_peer_link(&mut self, name: &str) -> (u16, SocketAddr) {
        let port = free_port();
        let proxy = self.start_proxy(SocketAddr::from(([127, 0, 0, 1], port)));
        let addr = proxy.addr();
        self.peer_links.insert(name.to_string(), proxy);
        (port, addr)
    }

    fn edge_cmd(&mut self, name: &str, setup: Option<EdgeSetup>) -> (Command, PathBuf) {
        let dir = self.dir.join(format!("edge-{name}"));
        let e = self.edges.entry(name.to_string()).or_insert_with(|| Edge {
            name: name.into(),
            dir: dir.clone(),
            child: None,
            starts: 0,
            setup: EdgeSetup::new(),
        });
        assert!(e.child.is_none(), "edge {name} is already running");
        if let Some(setup) = setup {
            e.setup = setup;
        }
        e.starts += 1;
        let log = self.dir.join(format!("edge-{name}.{}.log", e.starts));
        let mut cmd = Command::new(BIN);
        cmd.env("YUNBIAN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        if let Some(offset) = &e.setup.faketime {
            let lib = libfaketime().expect("libfaketime is not installed (Debian package `faketime`; see .ci/run)");
            cmd.env("LD_PRELOAD", lib).env("FAKETIME", offset).env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        (cmd, dir)
    }

    /// Agent options (`edge` and `edge join`) of `setup`.
    fn run_args(setup: &EdgeSetup) -> Vec<String> {
        let mut v = vec!["--heartbeat".into(), setup.heartbeat.clone()];
        v.extend(EDGE_RUN_ARGS[2..].iter().map(|s| s.to_string()));
        if let Some(m) = &setup.mqtt {
            v[5] = m.clone();
        }
        if let Some(a) = &setup.device_api {
            v[7] = a.clone();
        }
        if let Some((port, proxy)) = setup.peer_ports {
            v[9] = format!("127.0.0.1:{port}");
            v.extend(["--p2p-advertise".to_string(), proxy.to_string()]);
        }
        v.extend(setup.extra.iter().cloned());
        v
    }

    /// Starts `edge join` (which then runs the agent) without waiting.
    pub fn spawn_join(&mut self, name: &str, token: &str) {
        self.spawn_join_with(name, token, EdgeSetup::new());
    }

    /// Starts `edge join` as `setup` says, without waiting.
    pub fn spawn_join_with(&mut self, name: &str, token: &str, mut setup: EdgeSetup) {
        if setup.peer_link && setup.peer_ports.is_none() {
            setup.peer_ports = Some(self.start_peer_link(name));
        }
        let url = self.edge_url(name, setup.link);
        let labels = setup.labels.clone();
        let run_args = Cluster::run_args(&setup);
        let (mut cmd, dir) = self.edge_cmd(name, Some(setup));
        cmd.args(["edge", "join", "--cloud", &url, "--token", token, "--name", name, "--data-dir"])
            .arg(&dir)
            .args(["--labels", &labels])
            .args(run_args);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn edge join: {e}"));
        self.edge_mut(name).child = Some(child);
    }

    /// Runs `yunbian ARGS --data-dir DIR <agent options>` as the agent of
    /// the known edge `name` (same setup, same log numbering), e.g. the
    /// `edge join … --force` a hint told the operator to run.
    pub fn spawn_edge_argv(&mut self, name: &str, args: &[String]) {
        let run_args = Cluster::run_args(&self.edge(name).setup);
        let (mut cmd, dir) = self.edge_cmd(name, None);
        cmd.args(args).arg("--data-dir").arg(&dir).args(run_args);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn edge {args:?}: {e}"));
        self.edge_mut(name).child = Some(child);
    }

    /// Runs `edge join` that is expected to fail, to completion, in its own
    /// data directory; returns its outcome.
    pub fn join_expect_exit(&mut self, name: &str, token: &str) -> Out {
        self.files += 1;
        let dir = self.dir.join(format!("refused-{}-{name}", self.files));
        let mut cmd = Command::new(BIN);
        cmd.args(["edge", "join", "--cloud", &self.url, "--token", token, "--name", name, "--data-dir"])
            .arg(&dir)
            .args(["--labels", "site=a"])
            .args(EDGE_RUN_ARGS)
            .env("YUNBIAN_LOG", "info")
            .env("NO_COLOR", "1");
        let mut o = run(cmd, CLI_TIMEOUT);
        o.stderr = strip_ansi(&o.stderr);
        o
    }

    fn edge_mut(&mut self, name: &str) -> &mut Edge {
        self.edges.get_mut(name).unwrap_or_else(|| panic!("no edge {name}"))
    }

    pub fn edge(&self, name: &str) -> &Edge {
        self.edges.get(name).unwrap_or_else(|| panic!("no edge {name}"))
    }

    /// SIGKILLs the agent of `name` (its workloads keep running).
    pub fn kill_edge(&mut self, name: &str) {
        if let Some(mut c) = self.edge_mut(name).child.take() {
            kill_child(&mut c);
        }
    }

    /// Starts the agent of an already joined node: `edge --data-dir E`
    /// (with the setup it was joined with).
    pub fn start_edge(&mut self, name: &str) {
        let run_args = Cluster::run_args(&self.edge(name).setup);
        let (mut cmd, dir) = self.edge_cmd(name, None);
        cmd.arg("edge").arg("--data-dir").arg(&dir).args(run_args);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn edge: {e}"));
        self.edge_mut(name).child = Some(child);
    }

    /// An edge host reboot: SIGKILLs the agent of `name` together with every
    /// workload it runs (its descendants, and every process whose working
    /// directory lies in the edge's data directory: workloads re-adopted
    /// after an agent restart are no longer its children), frozen first so
    /// nothing escapes by forking. Returns the pids killed (agent included)
    /// once none of them is alive.
    pub fn reboot_edge(&mut self, name: &str) -> Vec<u32> {
        let dir = self.edge(name).dir.clone();
        let agent = self.edge_mut(name).child.take();
        let agent_pid = agent.as_ref().map_or(0, |c| c.id() as i32);
        let killed = yunbian_faults::process::kill_with_descendants(agent_pid, |p| cwd_under(p.pid, &dir))
            .unwrap_or_else(|e| panic!("kill edge host {name}: {e}"));
        if let Some(mut c) = agent {
            kill_child(&mut c);
        }
        let killed: Vec<u32> = killed.into_iter().map(|p| p as u32).collect();
        eventually(WAIT, &format!("the processes of edge host {name} to die"), || {
            let alive: Vec<u32> = killed.iter().copied().filter(|p| pid_alive(*p)).collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive: {alive:?}"))
            }
        });
        killed
    }

    /// Mounts a tmpfs of `size` bytes as the data directory of edge `name`
    /// (before it joins). It is unmounted when the cluster is dropped, after
    /// every process is killed.
    pub fn mount_tmpfs(&mut self, name: &str, size: u64) -> &TmpfsMount {
        let dir = self.dir.join(format!("edge-{name}"));
        let m = TmpfsMount::mount(&dir, size).unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", dir.display()));
        self.mounts.push(m);
        self.mounts.last().expect("just pushed")
    }

    /// The tmpfs mounted for edge `name`.
    pub fn tmpfs(&self, name: &str) -> &TmpfsMount {
        let dir = self.dir.join(format!("edge-{name}"));
        self.mounts.iter().find(|m| m.path() == dir).unwrap_or_else(|| panic!("no tmpfs for edge {name}"))
    }

    /// Panics if the agent of `name` has exited.
    #[track_caller]
    pub fn assert_edge_running(&mut self, name: &str) {
        let e = self.edge_mut(name);
        let st = e.child.as_mut().map(|c| c.try_wait());
        match st {
            Some(Ok(None)) => {}
            other => panic!("agent {name} is not running ({other:?}); log:\n{}", tail(&self.edge_log(name), 40)),
        }
    }

    /// The OS pid of the agent process of `name`.
    pub fn edge_pid(&self, name: &str) -> Option<u32> {
        self.edge(name).child.as_ref().map(Child::id)
    }

    /// Everything agent `name` wrote, all runs.
    pub fn edge_log(&self, name: &str) -> String {
        let e = self.edge(name);
        (1..=e.starts).map(|n| read_log(&self.dir.join(format!("edge-{name}.{n}.log")))).collect::<Vec<_>>().join("")
    }

    /// What the latest run of agent `name` wrote.
    pub fn edge_log_current(&self, name: &str) -> String {
        let e = self.edge(name);
        read_log(&self.dir.join(format!("edge-{name}.{}.log", e.starts)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = thread::panicking();
        for e in self.edges.values_mut() {
            if let Some(mut c) = e.child.take() {
                kill_child(&mut c);
            }
        }
        // Whatever still runs in the test directory (workloads started
        // while the cloud could not hear about them included).
        let dir = self.dir.clone();
        let _ = yunbian_faults::process::kill_matching(|p| cwd_under(p.pid, &dir));
        // Workloads outlive agents: kill those still running (only if the
        // pid still belongs to the instance we saw).
        if let Ok(w) = self.workloads.lock() {
            for (pid, inst) in w.iter() {
                kill_workload(*pid, inst);
                for cg in ["memory", "cpu"] {
                    let _ = fs::remove_dir(format!("/sys/fs/cgroup/{cg}/yunbian/{inst}"));
                }
            }
        }
        self.kill_cloud();
        self.links.clear();
        self.mounts.clear();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        if failed {
            let mut msg = format!(
                "\n==== test failed; kept {}\n---- cloud log (tail)\n{}\n",
                self.dir.display(),
                tail(&self.cloud_log(), 40)
            );
            for name in self.edges.keys() {
                msg.push_str(&format!("---- edge {name} log (tail)\n{}\n", tail(&self.edge_log(name), 25)));
            }
            let _ = std::io::stderr().write_all(msg.as_bytes());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A free TCP port on 127.0.0.1 for a server started later, outside the
/// kernel's ephemeral range so no outgoing connection takes it meanwhile
/// (see [`yunbian_faults::ports`]).
pub fn free_port() -> u16 {
    yunbian_faults::ports::free_port()
}

/// Whether `tool` is on PATH; under CI its absence fails the test (CI
/// installs it), elsewhere the test is skipped with a loud line.
pub fn have_tool(tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{tool} is missing: .ci/run installs it");
        eprintln!("SKIP: {tool} is not installed");
    }
    found
}
