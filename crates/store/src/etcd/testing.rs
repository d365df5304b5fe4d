//! A real etcd for tests (cargo feature `etcd`), shared by the store's,
//! the cloud's and the end-to-end tests.
//!
//! [`EtcdServer::start`] runs the etcd binary (`/usr/bin/etcd`, or the one
//! named by `YUNBIAN_ETCD_BIN`) as a single-member cluster on free loopback
//! ports (outside the kernel's ephemeral range, see
//! [`yunbian_faults::ports`]), with its data in a fresh directory (under `/dev/shm` when there is
//! one, so fsyncs are cheap), and waits until it reports healthy.
//!
//! etcd runs under a small `sh` supervisor whose standard input is a pipe
//! from the test process: when the pipe closes — on [`EtcdServer::stop`], on
//! drop, or because the test process died, even by `SIGKILL` — the
//! supervisor kills etcd with `SIGKILL` (and, unless stopping for a
//! restart, deletes the data directory). No etcd outlives its test binary,
//! which is what makes [`EtcdServer::shared`] (never dropped) safe.
//!
//! Tests that need etcd call [`EtcdServer::shared`] or
//! [`EtcdServer::start_or_skip`]: without the binary they print
//! `SKIPPED: etcd not installed …` and return, except under CI (`CI` set),
//! where they panic, because CI must run them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, CompactionOptions, GetOptions};
use yunbian_faults::ports::free_port;

use crate::StoreError;

/// Where the etcd binary is unless `YUNBIAN_ETCD_BIN` says otherwise.
pub const DEFAULT_BINARY: &str = "/usr/bin/etcd";
/// Longest wait for a started etcd to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The supervisor: `$0` is the directory, `$1` the log file, the rest the
/// etcd command line. See the module docs.
const SUPERVISOR: &str = r#"
dir=$0; log=$1; shift
exec 3<&0
"$@" >>"$log" 2>&1 </dev/null &
pid=$!
(
  read -r cmd <&3
  kill -9 "$pid" 2>/dev/null
  if [ "$cmd" != keep ]; then sleep 0.2; rm -rf "$dir"; fi
) &
exec 3<&-
wait "$pid"
"#;

/// A running (or stopped) single-member etcd on loopback.
#[derive(Debug)]
pub struct EtcdServer {
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    running: Option<Running>,
    /// Launches so far: each writes its own log, so an error shows only
    /// what that launch printed.
    launches: u32,
}

#[derive(Debug)]
struct Running {
    supervisor: Child,
    /// Closing it stops etcd.
    stdin: Option<ChildStdin>,
}

fn binary() -> PathBuf {
    std::env::var_os("YUNBIAN_ETCD_BIN").map_or_else(|| PathBuf::from(DEFAULT_BINARY), PathBuf::from)
}

/// How many times [`EtcdServer::start`] picks new ports when etcd finds
/// one taken.
const PORT_ATTEMPTS: usize = 4;

/// Whether etcd on `port` answers `/health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    if conn.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = conn.take(64 * 1024).read_to_string(&mut answer);
    answer.contains(r#""health":"true""#)
}

/// A key prefix no other test (or test process) uses, for one store.
pub fn unique_prefix(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("/yunbian-test/{label}-{}-{nanos}-{n}", std::process::id())
}

/// Reports a test that cannot run without etcd: panics under CI, else
/// prints a loud line (even when the harness captures output).
fn skip(test: &str) {
    let binary = binary();
    if std::env::var_os("CI").is_some() {
        panic!("etcd not installed ({}), but CI must run {test}: install etcd-server", binary.display());
    }
    // Written to the process's stderr directly: the test harness captures
    // `eprintln!`, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED: etcd not installed ({}): {test} did not run", binary.display());
}

impl EtcdServer {
    /// Whether the etcd binary is installed.
    pub fn available() -> bool {
        binary().is_file()
    }

    /// Starts a fresh etcd and waits until it is healthy.
    pub fn start() -> Result<EtcdServer, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = base.join(format!("yunbian-etcd-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut server =
            EtcdServer { dir, client_port: free_port(), peer_port: free_port(), running: None, launches: 0 };
        // Ports are chosen outside the ephemeral range, but another test
        // process may still have taken one since: try new ones.
        let mut attempt = 1;
        loop {
            match server.launch() {
                Err(e) if attempt < PORT_ATTEMPTS && server.lost_a_port(&e) => {
                    attempt += 1;
                    let _ = std::fs::remove_dir_all(server.dir.join("data"));
                    server.client_port = free_port();
                    server.peer_port = free_port();
                }
                other => return other.map(|()| server),
            }
        }
    }

    /// [`EtcdServer::start`], or `None` after reporting `test` as skipped
    /// when etcd is not installed (a panic under CI).
    pub fn start_or_skip(test: &str) -> Option<EtcdServer> {
        if !Self::available() {
            skip(test);
            return None;
        }
        Some(Self::start().unwrap_or_else(|e| panic!("start etcd for {test}: {e}")))
    }

    /// One etcd for the whole test process (give each store its own
    /// [`unique_prefix`]), started on first use; `None` after reporting
    /// `test` as skipped when etcd is not installed (a panic under CI).
    pub fn shared(test: &str) -> Option<&'static EtcdServer> {
        static SHARED: OnceLock<Option<EtcdServer>> = OnceLock::new();
        let server = SHARED.get_or_init(|| {
            Self::available().then(|| Self::start().unwrap_or_else(|e| panic!("start the shared etcd: {e}")))
        });
        if server.is_none() {
            skip(test);
        }
        server.as_ref()
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// [`EtcdServer::endpoint`] as the list `EtcdStore::connect` takes.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// Kills etcd (`SIGKILL`), keeping its data for [`EtcdServer::restart`].
    pub fn stop(&mut self) {
        self.halt(true);
    }

    /// Starts etcd again on the same ports and data, and waits until it is
    /// healthy. Stops it first if it is running.
    pub fn restart(&mut self) -> Result<(), String> {
        self.halt(true);
        self.launch()
    }

    /// Revokes the lease the value of `key` is attached to, as if its holder
    /// had died and the lease expired. Returns whether there was one.
    pub async fn revoke_lease_of(&self, key: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let resp = client.get(key, None).await.map_err(|e| StoreError::Backend(format!("get {key}: {e}")))?;
        let Some(lease) = resp.kvs().first().map(|kv| kv.lease()).filter(|l| *l != 0) else { return Ok(false) };
        client.lease_revoke(lease).await.map_err(|e| StoreError::Backend(format!("revoke lease: {e}")))?;
        Ok(true)
    }

    /// Compacts etcd's history up to its current revision; returns it.
    pub async fn compact(&self) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let resp = client
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| StoreError::Backend(format!("read revision: {e}")))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        client
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .map_err(|e| StoreError::Backend(format!("compact: {e}")))?;
        Ok(u64::try_from(revision).unwrap_or(0))
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let connect = Client::connect(self.endpoints(), None);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(StoreError::Backend(format!("connect to etcd: {e}"))),
            Err(_) => Err(StoreError::Backend("connect to etcd: timed out".to_string())),
        }
    }

    /// Whether a launch error says one of this server's ports was taken.
    fn lost_a_port(&self, error: &str) -> bool {
        error.contains("address already in use")
            && [self.client_port, self.peer_port].iter().any(|p| error.contains(&format!("127.0.0.1:{p}")))
    }

    fn launch(&mut self) -> Result<(), String> {
        self.launches += 1;
        let log = self.dir.join(format!("etcd.{}.log", self.launches));
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(SUPERVISOR).arg(&self.dir).arg(&log).arg(binary());
        cmd.arg("--name").arg("test");
        cmd.arg("--data-dir").arg(self.dir.join("data"));
        cmd.arg("--listen-client-urls").arg(&client).arg("--advertise-client-urls").arg(&client);
        cmd.arg("--listen-peer-urls").arg(&peer).arg("--initial-advertise-peer-urls").arg(&peer);
        cmd.arg("--initial-cluster").arg(format!("test={peer}")).arg("--initial-cluster-state").arg("new");
        cmd.arg("--logger").arg("zap").arg("--log-level").arg("warn");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut supervisor = cmd.spawn().map_err(|e| format!("spawn etcd: {e}"))?;
        let stdin = supervisor.stdin.take();
        self.running = Some(Running { supervisor, stdin });

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = self.running.as_mut().and_then(|r| r.supervisor.try_wait().ok().flatten());
            // Healthy only while ours runs: an etcd of another test process
            // that holds our client port would answer too.
            if exited.is_none() && healthy(self.client_port) {
                return Ok(());
            }
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String =
                    log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                self.halt(true);
                let why = if exited.is_some() { "exited" } else { "did not become healthy" };
                return Err(format!("etcd on port {} {why}; log:\n{tail}", self.client_port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd (if running) and waits until it is gone; `keep` keeps the
    /// data directory.
    fn halt(&mut self, keep: bool) {
        let Some(mut running) = self.running.take() else { return };
        if let Some(mut stdin) = running.stdin.take() {
            if keep {
                let _ = stdin.write_all(b"keep\n");
            }
            // Dropping it closes the pipe.
        }
        if let Err(e) = running.supervisor.wait() {
            eprintln!("wait for the etcd supervisor: {e}");
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.halt(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
