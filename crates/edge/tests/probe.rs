//! Peer latency probes over real sockets: nodes joined to an in-process
//! cloud, their real mTLS peer servers, and a TCP relay in between that
//! delays or swallows bytes:
//!
//! - a probe's round trip includes the delay the relay adds in each
//!   direction, and probes reuse one connection;
//! - a peer that stops answering counts as lost, and answers again once
//!   the path heals;
//! - the cloud's probe-target route answers a node for itself only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yunbian_cli::{Client, ClientConfig};
use yunbian_edge::artifacts::CloudSource;
use yunbian_edge::p2p::{self, PeerServerLimits};
use yunbian_edge::probe::{fetch_targets, NetworkMonitor, PeerProber, ProbeTarget};

struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("yunbian-edge-probe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test setup");
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP relay that holds every chunk for `delay` before passing it on,
/// and drops everything while `swallow` is set.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    swallow: Arc<AtomicBool>,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    swallow: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        tokio::time::sleep(delay).await;
        if swallow.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    async fn start(upstream: SocketAddr, delay: Duration) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let swallow = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), swallow.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, delay, s.clone()));
                tokio::spawn(pipe(sr, cw, delay, s.clone()));
            }
        });
        Relay { addr, accepted, swallow }
    }
}

/// A cloud and joined nodes with their peer servers.
struct Nodes {
    dir: TestDir,
    _cloud: yunbian_cloud::CloudHandle,
    url: String,
    admin: Client,
}

impl Nodes {
    async fn start(tag: &str) -> Nodes {
        let dir = TestDir::new(tag);
        let opts = yunbian_cloud::CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0");
        let cloud = yunbian_cloud::start(opts).await.expect("cloud");
        let admin = Client::new(ClientConfig::load(Some(&cloud.admin_config)).expect("config")).expect("client");
        let url = cloud.url.clone();
        Nodes { dir, _cloud: cloud, url, admin }
    }

    /// Joins `name` and serves its peer routes; returns its data directory
    /// and peer server address.
    async fn node(&self, name: &str) -> (PathBuf, SocketAddr) {
        let token = self.admin.create_token(0, "").await.expect("token");
        let dir = self.dir.0.join(name);
        yunbian_edge::join(&dir, &self.url, &token.parse().expect("token"), name, &BTreeMap::new(), false)
            .await
            .expect("join");
        let (addr, _server) =
            p2p::start_peer_server(&dir, "127.0.0.1:0", PeerServerLimits::default()).await.expect("peer server");
        (dir, addr)
    }
}

fn prober(dir: &std::path::Path, timeout: Duration) -> (PeerProber, Arc<NetworkMonitor>) {
    let monitor = Arc::new(NetworkMonitor::new(Duration::from_secs(1)));
    let tls = p2p::reloading_client_tls(dir).expect("peer tls");
    (PeerProber::new(tls, monitor.clone(), timeout), monitor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_measures_the_delay_of_the_path_on_one_connection() {
    let nodes = Nodes::start("delay").await;
    let (a_dir, _) = nodes.node("a").await;
    let (_, b_addr) = nodes.node("b").await;
    let (_, c_addr) = nodes.node("c").await;
    let delay = Duration::from_millis(60);
    let relay = Relay::start(b_addr, delay).await;
    let (mut prober, monitor) = prober(&a_dir, Duration::from_secs(5));
    let targets = vec![
        ProbeTarget { node: "b".into(), addr: relay.addr.to_string() },
        ProbeTarget { node: "c".into(), addr: c_addr.to_string() },
    ];
    for _ in 0..4 {
        prober.round(&targets).await;
    }
    let s = monitor.snapshot(Instant::now());
    let b = s.peers["b"];
    let c = s.peers["c"];
    assert_eq!((b.samples, b.loss, c.samples, c.loss), (4, 0.0, 4, 0.0), "{s:?}");
    let b_rtt = b.rtt_ms.expect("b answered");
    // The request and the response each wait `delay` in the relay.
    assert!(b_rtt >= 2.0 * delay.as_millis() as f64, "rtt to b {b_rtt} ms");
    assert!(c.rtt_ms.expect("c answered") < b_rtt, "{s:?}");
    assert_eq!(b.last_seen_secs, Some(0));
    // Kept alive: every probe to b went over one connection.
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    // A target dropped from the list is forgotten.
    prober.round(&targets[1..]).await;
    assert!(!monitor.snapshot(Instant::now()).peers.contains_key("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_counts_as_lost_until_the_path_heals() {
    let nodes = Nodes::start("lost").await;
    let (a_dir, _) = nodes.node("a").await;
    let (_, b_addr) = nodes.node("b").await;
    let relay = Relay::start(b_addr, Duration::ZERO).await;
    // The timeout covers TCP and mTLS set-up too (first probe, reconnect):
    // long enough for a loaded machine, short enough for the lost ones.
    let (mut prober, monitor) = prober(&a_dir, Duration::from_millis(1500));
    let targets = vec![ProbeTarget { node: "b".into(), addr: relay.addr.to_string() }];
    prober.round(&targets).await;
    relay.swallow.store(true, Ordering::SeqCst);
    prober.round(&targets).await;
    prober.round(&targets).await;
    let b = monitor.snapshot(Instant::now()).peers["b"];
    assert_eq!(b.samples, 3);
    assert!((b.loss - 2.0 / 3.0).abs() < 1e-9, "{b:?}");
    assert!(b.rtt_ms.is_some(), "the first probe's round trip is kept");
    // A peer that is not there at all.
    let gone = vec![ProbeTarget { node: "b".into(), addr: "127.0.0.1:1".into() }];
    prober.round(&gone).await;
    assert_eq!(monitor.snapshot(Instant::now()).peers["b"].samples, 4);
    relay.swallow.store(false, Ordering::SeqCst);
    prober.round(&targets).await;
    let b = monitor.snapshot(Instant::now()).peers["b"];
    assert_eq!((b.samples, b.last_seen_secs), (5, Some(0)), "{b:?}");
    assert!((b.loss - 3.0 / 5.0).abs() < 1e-9, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_names_another_node_is_not_a_successful_probe() {
    let nodes = Nodes::start("name").await;
    let (a_dir, _) = nodes.node("a").await;
    let (_, b_addr) = nodes.node("b").await;
    let (mut prober, monitor) = prober(&a_dir, Duration::from_secs(5));
    // b's server presents b's certificate, not c's.
    prober.round(&[ProbeTarget { node: "c".into(), addr: b_addr.to_string() }]).await;
    let c = monitor.snapshot(Instant::now()).peers["c"];
    assert_eq!((c.samples, c.loss, c.rtt_ms), (1, 1.0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_names_probe_targets_to_the_node_itself_only() {
    let nodes = Nodes::start("targets").await;
    let (a_dir, _) = nodes.node("a").await;
    nodes.node("b").await;
    let cloud = CloudSource::from_data_dir(&a_dir).expect("cloud source");
    // No group, no peer address known yet: nothing to probe.
    assert_eq!(fetch_targets(&cloud, "a").await.expect("targets of a"), Vec::<ProbeTarget>::new());
    let e = fetch_targets(&cloud, "b").await.expect_err("a asks for b's targets");
    assert!(e.contains("cannot ask for the targets of b"), "{e}");
}
