//! Test support for several cloud replicas on a real etcd (`e2e_ha.rs`,
//! `soak.rs`): an etcd of the test's own, `yunbian cloud` replicas sharing
//! one key prefix, real edge agents, `yunbian sim` fleets, link proxies, and
//! the replicas' metrics.
//!
//! ```ignore
//! let Some(mut ha) = Ha::start("trust", HaOptions::default()) else { return }; // etcd missing: skipped
//! let token = ha.token();
//! ha.spawn_join("n1", &ha.urls(), &token, "site=a");  // agent knows every replica
//! ha.wait_nodes_ready(&["n1"]);
//! let leader = ha.wait_single_leader();               // `yunbian_cloud_leader` 1 on exactly one
//! ha.kill_replica(leader);                            // SIGKILL
//! ha.start_replica(leader);                           // same port, same data dir
//! ```
//!
//! Builds on the single-cloud harness (`crate::harness`) for its process
//! and JSON helpers only. Everything started here is killed (SIGKILL) on
//! drop: sims, agents, every process whose working directory lies in the
//! test directory (workloads outlive their agents), the replicas, then
//! etcd. The directory is removed when the test passed and kept, with log
//! tails printed, when it failed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use yunbian_faults::LinkProxy;
use yunbian_store::etcd::testing::EtcdServer;

use crate::harness::{eventually, run, s, strip_ansi, Out, BIN};

/// Give-up limit for anything the cluster does on its own (generous: a
/// debug build on a shared two-core machine).
pub const WAIT: Duration = Duration::from_secs(120);
/// Longest a single CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Wall-clock time of day, `HH:MM:SS.mmm` UTC, for logs.
pub fn stamp() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    format!("{:02}:{:02}:{:02}.{:03}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60, d.subsec_millis())
}

/// Whether the working directory of `pid` lies under `dir`.
pub fn cwd_under(pid: i32, dir: &Path) -> bool {
    fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
}

fn log_file(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn read_log(path: &Path) -> String {
    strip_ansi(&String::from_utf8_lossy(&fs::read(path).unwrap_or_default()))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------ random

/// SplitMix64: a seeded, replayable generator for fault schedules.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A seed from the clock and the pid.
    pub fn fresh_seed() -> u64 {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        let mut r = Rng(nanos ^ (u64::from(std::process::id()) << 32));
        r.next_u64()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform index below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn with the given weights.
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let mut x = self.next_u64() % total.max(1);
        for (i, w) in weights.iter().enumerate() {
            if x < u64::from(*w) {
                return i;
            }
            x -= u64::from(*w);
        }
        weights.len() - 1
    }
}

// ------------------------------------------------------------------ metrics

/// The value of metric `name` in Prometheus text, summed over label sets;
/// `None` when absent.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// `GET path` over HTTPS from `127.0.0.1:port`, trusting only `ca_pem`,
/// with a bearer token; the body of a 200 answer.
pub fn https_get(port: u16, ca_pem: &str, token: &str, path: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| format!("CA PEM: {e}"))?).map_err(|e| format!("add CA: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").map_err(|e| format!("server name: {e}"))?.to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS client: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(10)));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A server that closes without close_notify: keep what came.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(format!("{status}: {body}"));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ------------------------------------------------------------------ cluster

/// Options of every replica.
#[derive(Debug, Clone)]
pub struct HaOptions {
    pub replicas: usize,
    pub heartbeat: String,
    pub grace: String,
    pub evict_after: Option<String>,
}

impl Default for HaOptions {
    fn default() -> Self {
        HaOptions { replicas: 3, heartbeat: "1s".into(), grace: "4s".into(), evict_after: None }
    }
}

/// One `yunbian cloud` replica.
#[derive(Debug)]
pub struct Replica {
    /// `--replica-id`: r1, r2, …
    pub id: String,
    pub dir: PathBuf,
    /// Bound on first start, reused on every restart.
    pub port: u16,
    pub url: String,
    child: Option<Child>,
    starts: u32,
}

impl Replica {
    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin.yaml")
    }
}

/// One real edge agent.
#[derive(Debug)]
pub struct HaEdge {
    pub name: String,
    pub dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// One `yunbian sim` process.
#[derive(Debug)]
pub struct Sim {
    pub log: PathBuf,
    child: Option<Child>,
}

/// An etcd, cloud replicas on it, and what runs against them.
pub struct Ha {
    pub dir: PathBuf,
    pub etcd: EtcdServer,
    /// `--etcd-prefix` of every replica.
    pub prefix: String,
    opts: HaOptions,
    replicas: Vec<Replica>,
    edges: BTreeMap<String, HaEdge>,
    sims: Vec<Sim>,
    files: AtomicU32,
    /// Runs link proxies and etcd client calls.
    pub rt: tokio::runtime::Runtime,
    links: BTreeMap<String, LinkProxy>,
}

impl Ha {
    /// Starts etcd and `opts.replicas` replicas, each answering the CLI;
    /// `None` when etcd is not installed (reported as skipped; a panic under
    /// CI).
    pub fn start(test: &str, opts: HaOptions) -> Option<Ha> {
        let etcd = EtcdServer::start_or_skip(test)?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "yunbian-ha-{test}-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime for link proxies and etcd calls");
        let mut ha = Ha {
            dir,
            etcd,
            prefix: format!("/yunbian-e2e/{test}"),
            opts,
            replicas: Vec::new(),
            edges: BTreeMap::new(),
            sims: Vec::new(),
            files: AtomicU32::new(0),
            rt,
            links: BTreeMap::new(),
        };
        for i in 0..ha.opts.replicas {
            let id = format!("r{}", i + 1);
            ha.replicas.push(Replica {
                dir: ha.dir.join(&id),
                id,
                // Outside the ephemeral range, so restarts find it free.
                port: yunbian_faults::ports::free_port(),
                url: String::new(),
                child: None,
                starts: 0,
            });
            ha.start_replica(i);
        }
        Some(ha)
    }

    // -------------------------------------------------------- replicas

    pub fn replica(&self, i: usize) -> &Replica {
        &self.replicas[i]
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// Every replica's URL, comma-separated (what agents are given).
    pub fn urls(&self) -> String {
        self.replicas.iter().map(|r| r.url.clone()).collect::<Vec<_>>().join(",")
    }

    /// `host:port` of etcd, as `--store etcd://` takes it.
    pub fn etcd_hostport(&self) -> String {
        self.etcd.endpoint().trim_start_matches("http://").to_string()
    }

    /// Starts replica `i` (on its old port after the first start) and waits
    /// until it answers `get nodes`.
    pub fn start_replica(&mut self, i: usize) {
        let etcd = self.etcd_hostport();
        let opts = self.opts.clone();
        let prefix = self.prefix.clone();
        let log_dir = self.dir.clone();
        let r = &mut self.replicas[i];
        assert!(r.child.is_none(), "replica {} is already running", r.id);
        r.starts += 1;
        let log = log_dir.join(format!("replica-{}.{}.log", r.id, r.starts));
        let listen = format!("127.0.0.1:{}", r.port);
        let mut cmd = Command::new(BIN);
        cmd.arg("cloud").arg("--data-dir").arg(&r.dir);
        cmd.args(["--listen", &listen, "--store", &format!("etcd://{etcd}"), "--etcd-prefix", &prefix]);
        cmd.args(["--replica-id", &r.id, "--heartbeat", &opts.heartbeat, "--grace", &opts.grace]);
        if let Some(e) = &opts.evict_after {
            cmd.args(["--evict-after", e]);
        }
        cmd.env("YUNBIAN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        r.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn replica {}: {e}", r.id)));
        let first = r.url.is_empty();
        if first {
            let admin = r.admin();
            let url = eventually(WAIT, &format!("replica r{} to write admin.yaml", i + 1), || {
                self.check_replica_alive(i)?;
                let text = fs::read_to_string(&admin).map_err(|e| format!("{}: {e}", admin.display()))?;
                let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| format!("admin.yaml: {e}"))?;
                match v.get("server").and_then(serde_yaml::Value::as_str) {
                    Some(url) if url.starts_with("https://") => Ok(url.to_string()),
                    _ => Err(format!("no server: in admin.yaml yet: {text}")),
                }
            });
            let port = url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok());
            let r = &mut self.replicas[i];
            r.port = port.unwrap_or_else(|| panic!("no port in {url}"));
            r.url = url;
        }
        eventually(WAIT, &format!("replica r{} to answer `get nodes`", i + 1), || {
            self.check_replica_alive(i)?;
            let o = self.cli(i, &["get", "nodes"]);
            if o.success() {
                Ok(())
            } else {
                Err(format!("{o:?}"))
            }
        });
    }

    /// Panics (with its log) if replica `i` was started and has exited.
    fn check_replica_alive(&mut self, i: usize) -> Result<(), String> {
        let exited = self.replicas[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(st) = exited {
            panic!("replica r{} exited ({st}); log:\n{}", i + 1, tail(&self.replica_log(i), 40));
        }
        Ok(())
    }

    /// Whether replica `i` runs (started and not exited).
    pub fn replica_running(&mut self, i: usize) -> bool {
        self.replicas[i].child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Replicas that were started (and not killed here) but have exited.
    pub fn exited_replicas(&mut self) -> Vec<usize> {
        (0..self.replicas.len()).filter(|i| self.replicas[*i].child.is_some() && !self.replica_running(*i)).collect()
    }

    /// Panics unless every started replica is still running.
    #[track_caller]
    pub fn assert_replicas_running(&mut self) {
        for i in 0..self.replicas.len() {
            if self.replicas[i].child.is_some() && !self.replica_running(i) {
                panic!("replica r{} exited; log:\n{}", i + 1, tail(&self.replica_log(i), 40));
            }
        }
    }

    /// SIGKILLs replica `i`.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            kill_child(&mut c);
        }
    }

    /// Stops replica `i` cleanly with `signal` (`INT` as Ctrl-C sends,
    /// `TERM` as systemd's stop sends) and waits for it to exit; panics if it
    /// does not within [`WAIT`].
    pub fn stop_replica(&mut self, i: usize, signal: &str) {
        if let Some(mut c) = self.replicas[i].child.take() {
            let _ = Command::new("kill").args([&format!("-{signal}"), &c.id().to_string()]).status();
            let t0 = Instant::now();
            while matches!(c.try_wait(), Ok(None)) {
                if t0.elapsed() > WAIT {
                    kill_child(&mut c);
                    panic!("replica r{} did not exit on SIG{signal}", i + 1);
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The value of `{prefix}/leader` in etcd: the replica holding
    /// leadership as etcd sees it, `None` when nobody does.
    pub fn leader_key_holder(&self) -> Option<String> {
        let key = format!("{}/leader", self.prefix);
        self.rt.block_on(async {
            let mut client = etcd_client::Client::connect(self.etcd.endpoints(), None)
                .await
                .unwrap_or_else(|e| panic!("connect to etcd: {e}"));
            let resp = client.get(key.as_str(), None).await.unwrap_or_else(|e| panic!("get {key}: {e}"));
            resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
    }

    /// Indexes of running replicas.
    pub fn alive(&mut self) -> Vec<usize> {
        (0..self.replicas.len()).filter(|i| self.replica_running(*i)).collect()
    }

    /// Everything replica `i` wrote, all runs.
    pub fn replica_log(&self, i: usize) -> String {
        let r = &self.replicas[i];
        (1..=r.starts).map(|n| read_log(&self.dir.join(format!("replica-{}.{n}.log", r.id)))).collect()
    }

    /// What the current run of replica `i` wrote.
    pub fn replica_log_current(&self, i: usize) -> String {
        let r = &self.replicas[i];
        read_log(&self.dir.join(format!("replica-{}.{}.log", r.id, r.starts)))
    }

    /// The `term=N` of each "leading: controllers started" line of replica
    /// `i` (all runs), in order.
    pub fn leading_terms(&self, i: usize) -> Vec<u64> {
        self.replica_log(i)
            .lines()
            .filter(|l| l.contains("leading: controllers started"))
            .filter_map(|l| l.split("term=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// The admin token and CA of replica `i`'s admin.yaml.
    pub fn admin_credentials(&self, i: usize) -> (String, String) {
        let path = self.replicas[i].admin();
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("admin.yaml: {e}"));
        let field = |k: &str| v.get(k).and_then(serde_yaml::Value::as_str).unwrap_or_default().to_string();
        (field("token"), field("ca"))
    }

    /// `GET /metrics` of replica `i`.
    pub fn metrics(&self, i: usize) -> Result<String, String> {
        let (token, ca) = self.admin_credentials(i);
        https_get(self.replicas[i].port, &ca, &token, "/metrics")
    }

    /// Metric `name` of replica `i`.
    pub fn metric(&self, i: usize, name: &str) -> Result<f64, String> {
        let text = self.metrics(i)?;
        metric(&text, name).ok_or_else(|| format!("no {name} in the metrics of r{}", i + 1))
    }

    /// Running replicas reporting `yunbian_cloud_leader 1`; an error if a
    /// running replica's metrics cannot be read.
    pub fn leaders(&mut self) -> Result<Vec<usize>, String> {
        let mut out = Vec::new();
        for i in self.alive() {
            if self.metric(i, "yunbian_cloud_leader")? >= 1.0 {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Waits until exactly one running replica leads; returns it.
    #[track_caller]
    pub fn wait_single_leader(&mut self) -> usize {
        eventually(WAIT, "exactly one replica to report yunbian_cloud_leader 1", || match self.leaders()? {
            l if l.len() == 1 => Ok(l[0]),
            l => Err(format!("leaders: {:?}", l.iter().map(|i| format!("r{}", i + 1)).collect::<Vec<_>>())),
        })
    }

    /// `yunbian_hub_connected_nodes` of each running replica (0 when its
    /// metrics cannot be read).
    pub fn connected_per_replica(&mut self) -> BTreeMap<usize, u64> {
        let mut out = BTreeMap::new();
        for i in self.alive() {
            out.insert(i, self.metric(i, "yunbian_hub_connected_nodes").map_or(0, |v| v as u64));
        }
        out
    }

    // -------------------------------------------------------- CLI

    /// `yunbian --config <replica i's admin.yaml> ARGS`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(self.replicas[i].admin()).args(args).env("NO_COLOR", "1").env_remove("YUNBIAN_CONFIG");
        run(cmd, CLI_TIMEOUT)
    }

    /// The first running replica (for the CLI).
    pub fn any(&mut self) -> usize {
        *self.alive().first().expect("no replica is running")
    }

    /// A new join token (through replica `i`).
    pub fn token_via(&self, i: usize) -> String {
        let o = self.cli(i, &["token", "create", "--ttl", "2h"]);
        let t = o.ok().trim().to_string();
        assert!(t.starts_with("YB1."), "token create printed {o:?}");
        t
    }

    pub fn token(&mut self) -> String {
        let i = self.any();
        self.token_via(i)
    }

    /// Writes `text` to a fresh file in the test directory.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let p = self.dir.join(format!("{n}-{name}"));
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// `apply -f` through replica `i`.
    pub fn try_apply_via(&self, i: usize, manifest: &str) -> Out {
        let p = self.write_file("manifest.yaml", manifest);
        self.cli(i, &["apply", "-f", &p.to_string_lossy()])
    }

    /// `apply -f` through any running replica, retried until it succeeds.
    #[track_caller]
    pub fn apply(&mut self, manifest: &str) {
        eventually(WAIT, "apply to succeed", || {
            let i = self.any();
            let o = self.try_apply_via(i, manifest);
            if o.success() {
                Ok(())
            } else {
                Err(format!("{o:?}"))
            }
        });
    }

    /// `get KIND -o json` items through replica `i`.
    pub fn list_via(&self, i: usize, kind: &str) -> Result<Vec<Value>, String> {
        let o = self.cli(i, &["get", kind, "-o", "json"]);
        if !o.success() {
            return Err(format!("get {kind} via r{}: {o:?}", i + 1));
        }
        let v: Value = serde_json::from_str(&o.stdout).map_err(|e| format!("get {kind}: {e}: {o:?}"))?;
        v.get("items").and_then(Value::as_array).cloned().ok_or_else(|| format!("no items: {o:?}"))
    }

    /// `get KIND -o json` items through any running replica.
    pub fn list(&mut self, kind: &str) -> Result<Vec<Value>, String> {
        let i = self.any();
        self.list_via(i, kind)
    }

    /// Instances of `app`.
    pub fn instances_of(&mut self, app: &str) -> Result<Vec<Value>, String> {
        Ok(self.list("instances")?.into_iter().filter(|i| s(i, "/spec/app") == app).collect())
    }

    /// Waits until `app` has exactly `n` instances with distinct names, all
    /// Running (process runtime: with a live pid); returns them.
    #[track_caller]
    pub fn wait_app_exact(&mut self, app: &str, n: usize) -> Vec<Value> {
        eventually(WAIT, &format!("exactly {n} Running instances of {app}"), || {
            let items = self.instances_of(app)?;
            let names: std::collections::BTreeSet<&str> = items.iter().map(|i| s(i, "/metadata/name")).collect();
            if names.len() != items.len() {
                return Err(format!("duplicate names among {} instances", items.len()));
            }
            let running = items
                .iter()
                .filter(|i| s(i, "/status/phase") == "Running")
                // Fake runtimes (simulated nodes) report made-up pids.
                .filter(|i| {
                    s(i, "/spec/template/runtime") != "process"
                        || crate::harness::u(i, "/status/pid").is_some_and(|p| crate::harness::pid_alive(p as u32))
                })
                .count();
            if items.len() == n && running == n {
                Ok(items)
            } else {
                Err(format!("{} instances, {running} Running", items.len()))
            }
        })
    }

    /// Waits until every node in `names` is Ready (through any replica).
    #[track_caller]
    pub fn wait_nodes_ready(&mut self, names: &[&str]) -> Vec<Value> {
        eventually(WAIT, &format!("nodes {names:?} to be Ready"), || {
            let nodes = self.list("nodes")?;
            let not: Vec<String> = names
                .iter()
                .filter(|n| !nodes.iter().any(|x| s(x, "/metadata/name") == **n && s(x, "/status/phase") == "Ready"))
                .map(|n| n.to_string())
                .collect();
            if not.is_empty() {
                Ok(nodes)
            } else {
                Err(format!("not Ready: {not:?}"))
            }
        })
    }

    /// Waits until `n` nodes whose name starts with `prefix` are Ready.
    #[track_caller]
    pub fn wait_ready_count(&mut self, prefix: &str, n: usize) {
        eventually(WAIT, &format!("{n} nodes {prefix}* to be Ready"), || {
            let nodes = self.list("nodes")?;
            let ready = nodes
                .iter()
                .filter(|x| s(x, "/metadata/name").starts_with(prefix) && s(x, "/status/phase") == "Ready")
                .count();
            if ready == n {
                Ok(())
            } else {
                Err(format!("{ready}/{n} Ready"))
            }
        })
    }

    // -------------------------------------------------------- edges

    /// Starts `edge join --cloud URLS` (then the agent) without waiting.
    pub fn spawn_join(&mut self, name: &str, urls: &str, token: &str, labels: &str) {
        let dir = self.dir.join(format!("edge-{name}"));
        let e = self.edges.entry(name.to_string()).or_insert_with(|| HaEdge {
            name: name.into(),
            dir: dir.clone(),
            child: None,
            starts: 0,
        });
        let mut cmd = edge_command(&self.dir, e);
        cmd.args(["edge", "join", "--cloud", urls, "--token", token, "--name", name, "--data-dir"]).arg(&dir);
        cmd.args(["--labels", labels, "--heartbeat", "1s", "--metrics-listen", "127.0.0.1:0"]);
        e.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn edge join: {e}")));
    }

    /// Starts the agent of the joined edge `name` again.
    pub fn start_edge(&mut self, name: &str) {
        let e = self.edges.get_mut(name).unwrap_or_else(|| panic!("no edge {name}"));
        assert!(e.child.is_none(), "edge {name} is running");
        let mut cmd = edge_command(&self.dir, e);
        cmd.args(["edge", "--data-dir"]).arg(&e.dir).args(["--heartbeat", "1s", "--metrics-listen", "127.0.0.1:0"]);
        e.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn edge: {e}")));
    }

    /// SIGKILLs the agent of `name` (its workloads keep running).
    pub fn kill_edge(&mut self, name: &str) {
        if let Some(mut c) = self.edges.get_mut(name).and_then(|e| e.child.take()) {
            kill_child(&mut c);
        }
    }

    /// A host reboot: SIGKILLs the agent of `name` and every workload it
    /// runs (its descendants and every process whose working directory lies
    /// in its data directory), frozen first. Returns the pids killed once
    /// all are gone.
    pub fn reboot_edge(&mut self, name: &str) -> Vec<i32> {
        let e = self.edges.get_mut(name).unwrap_or_else(|| panic!("no edge {name}"));
        let dir = e.dir.clone();
        let agent = e.child.take();
        let agent_pid = agent.as_ref().map_or(0, |c| c.id() as i32);
        let killed = yunbian_faults::process::kill_with_descendants(agent_pid, |p| cwd_under(p.pid, &dir))
            .unwrap_or_else(|e| panic!("kill edge host {name}: {e}"));
        if let Some(mut c) = agent {
            kill_child(&mut c);
        }
        if !yunbian_faults::process::wait_dead(&killed, WAIT) {
            panic!("processes of edge host {name} survived SIGKILL: {killed:?}");
        }
        killed
    }

    /// Whether the agent of `name` runs.
    pub fn edge_running(&mut self, name: &str) -> bool {
        self.edges.get_mut(name).and_then(|e| e.child.as_mut()).is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn edge(&self, name: &str) -> &HaEdge {
        self.edges.get(name).unwrap_or_else(|| panic!("no edge {name}"))
    }

    pub fn edge_names(&self) -> Vec<String> {
        self.edges.keys().cloned().collect()
    }

    /// Everything agent `name` wrote, all runs.
    pub fn edge_log(&self, name: &str) -> String {
        let e = self.edge(name);
        (1..=e.starts).map(|n| read_log(&self.dir.join(format!("edge-{name}.{n}.log")))).collect()
    }

    // -------------------------------------------------------- links

    /// A new link proxy named `name` forwarding to replica `i`.
    pub fn add_link(&mut self, name: &str, i: usize) -> String {
        let upstream = SocketAddr::from(([127, 0, 0, 1], self.replicas[i].port));
        let _enter = self.rt.enter();
        let proxy = LinkProxy::start(upstream).unwrap_or_else(|e| panic!("start link proxy: {e}"));
        let url = format!("https://{}", proxy.addr());
        self.links.insert(name.to_string(), proxy);
        url
    }

    pub fn link(&self, name: &str) -> &LinkProxy {
        self.links.get(name).unwrap_or_else(|| panic!("no link {name}"))
    }

    // -------------------------------------------------------- simulator

    /// Starts `yunbian sim` with `nodes` nodes named `<prefix>NNNNN` against
    /// `urls`; returns its index. Killed on drop.
    pub fn start_sim(&mut self, prefix: &str, nodes: usize, urls: &str, labels: &str) -> usize {
        let token = self.token();
        let log = self.dir.join(format!("sim-{prefix}{}.log", self.sims.len()));
        let mut cmd = Command::new(BIN);
        cmd.args(["sim", "--cloud", urls, "--token", &token, "--nodes", &nodes.to_string(), "--prefix", prefix]);
        cmd.args(["--labels", labels, "--heartbeat", "1s"]);
        cmd.env("YUNBIAN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn sim: {e}"));
        self.sims.push(Sim { log, child: Some(child) });
        self.sims.len() - 1
    }

    /// Panics (with its log) unless sim `i` still runs.
    #[track_caller]
    pub fn assert_sim_running(&mut self, i: usize) {
        let st = self.sims[i].child.as_mut().map(|c| c.try_wait());
        if !matches!(st, Some(Ok(None))) {
            panic!("the simulator is not running ({st:?}); log:\n{}", tail(&self.sim_log(i), 40));
        }
    }

    pub fn sim_log(&self, i: usize) -> String {
        read_log(&self.sims[i].log)
    }
}

fn edge_command(test_dir: &Path, e: &mut HaEdge) -> Command {
    e.starts += 1;
    let log = test_dir.join(format!("edge-{}.{}.log", e.name, e.starts));
    let mut cmd = Command::new(BIN);
    cmd.env("YUNBIAN_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_file(&log))
        .stderr(log_file(&log));
    cmd
}

impl Drop for Ha {
    fn drop(&mut self) {
        let failed = thread::panicking();
        for sim in &mut self.sims {
            if let Some(mut c) = sim.child.take() {
                kill_child(&mut c);
            }
        }
        for e in self.edges.values_mut() {
            if let Some(mut c) = e.child.take() {
                kill_child(&mut c);
            }
        }
        // Workloads outlive their agents; they all run in the test directory.
        let dir = self.dir.clone();
        let _ = yunbian_faults::process::kill_matching(|p| cwd_under(p.pid, &dir));
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                kill_child(&mut c);
            }
        }
        self.links.clear();
        if failed {
            let mut msg = format!("\n==== test failed; kept {}\n", self.dir.display());
            for i in 0..self.replicas.len() {
                msg.push_str(&format!("---- replica r{} log (tail)\n{}\n", i + 1, tail(&self.replica_log(i), 30)));
            }
            for name in self.edges.keys() {
                msg.push_str(&format!("---- edge {name} log (tail)\n{}\n", tail(&self.edge_log(name), 20)));
            }
            let _ = std::io::stderr().write_all(msg.as_bytes());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
