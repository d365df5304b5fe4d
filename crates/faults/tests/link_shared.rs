//! Shared bandwidth: every connection of a proxy, and of several proxies,
//! takes from one bucket. Asserts upper bounds on throughput (never more
//! than the rate plus one bucket), which a slow machine cannot break, and
//! integrity; never an upper bound on time.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use yunbian_faults::{Bandwidth, Direction, LinkProxy, SharedLink};

/// 8 Mbit/s: 1 MB/s.
const RATE_BPS: u64 = 8_000_000;
const LEN: usize = 256 * 1024;

/// Every read of every receiver: when, and how many bytes.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<(Instant, usize)>>>);

impl Arrivals {
    fn record(&self, n: usize) {
        self.0.lock().expect("arrivals").push((Instant::now(), n));
    }

    fn total(&self) -> usize {
        self.0.lock().expect("arrivals").iter().map(|a| a.1).sum()
    }

    /// The bytes received by any instant never exceed what `bandwidth`
    /// could have let through since `start`: one bucket plus the rate.
    fn assert_never_faster_than(&self, bandwidth: &Bandwidth, start: Instant) {
        let mut arrivals = self.0.lock().expect("arrivals").clone();
        arrivals.sort_by_key(|a| a.0);
        let mut received = 0_u128;
        for (at, n) in arrivals {
            received += n as u128;
            let elapsed = (at - start).as_nanos();
            let allowed =
                u128::from(bandwidth.burst()) + elapsed * u128::from(bandwidth.rate_bps()) / 8 / 1_000_000_000;
            assert!(
                received <= allowed + 1,
                "{received} B received {elapsed} ns after the start; the link allows {allowed}"
            );
        }
    }
}

/// Reads until end of stream, recording each read.
async fn receive_all(mut from: impl AsyncRead + Unpin, arrivals: Arrivals) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = timeout(GIVE_UP, from.read(&mut buf)).await.expect("give up").expect("read");
        if n == 0 {
            return received;
        }
        arrivals.record(n);
        received.extend_from_slice(&buf[..n]);
    }
}

/// A server that reads each connection to its end, records the arrivals,
/// and sends back whether it got `pattern(LEN)` (`y`/`n`).
async fn recording_sink(arrivals: Arrivals) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let intact = receive_all(read, arrivals).await == pattern(LEN);
                let _ = write.write_all(if intact { b"y" } else { b"n" }).await;
            });
        }
    });
    addr
}

/// A server that sends `pattern(LEN)` to every connection, then closes.
async fn source_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind source");
    let addr = listener.local_addr().expect("source address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(&pattern(LEN)).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `pattern(LEN)` through `proxy` to a recording sink; true if the
/// sink got it intact.
async fn upload(proxy: SocketAddr) -> bool {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    write.write_all(&pattern(LEN)).await.expect("write");
    write.shutdown().await.expect("shutdown");
    let mut verdict = [0; 1];
    timeout(GIVE_UP, read.read_exact(&mut verdict)).await.expect("give up").expect("verdict");
    verdict == *b"y"
}

#[tokio::test]
async fn two_connections_share_one_bucket() {
    let arrivals = Arrivals::default();
    let proxy = LinkProxy::start(recording_sink(arrivals.clone()).await).expect("start proxy");
    let bandwidth = Bandwidth::new(RATE_BPS);
    proxy.attach(Direction::ToUpstream, &bandwidth);
    // Attaching again changes nothing.
    proxy.attach(Direction::ToUpstream, &bandwidth);
    assert_eq!(proxy.attached(Direction::ToUpstream), std::slice::from_ref(&bandwidth));
    assert!(proxy.attached(Direction::ToClient).is_empty());

    let start = Instant::now();
    let (a, b) = tokio::join!(upload(proxy.addr()), upload(proxy.addr()));
    let elapsed = start.elapsed();
    assert!(a && b, "both transfers intact");
    assert_eq!(arrivals.total(), 2 * LEN);
    assert_eq!(bandwidth.bytes(), 2 * LEN as u64);
    arrivals.assert_never_faster_than(&bandwidth, start);
    // Together, twice one connection's worth: 512 KiB at 1 MB/s, less one
    // bucket, is at least 0.5 s (each alone, with its own 8 Mbit/s, would
    // have taken half of that).
    let floor = Duration::from_secs_f64(((2 * LEN) as f64 - bandwidth.burst() as f64) / 1e6);
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
}

#[tokio::test]
async fn busy_connections_take_turns() {
    let arrivals = [Arrivals::default(), Arrivals::default()];
    let sinks = [recording_sink(arrivals[0].clone()).await, recording_sink(arrivals[1].clone()).await];
    let proxies = sinks.map(|sink| LinkProxy::start(sink).expect("start proxy"));
    // One bucket, two proxies: a node's uplink used by two kinds of traffic.
    let bandwidth = Bandwidth::new(RATE_BPS);
    for proxy in &proxies {
        proxy.attach(Direction::ToUpstream, &bandwidth);
    }
    let first_done = Arc::new(Mutex::new(None));
    let transfer = |i: usize| {
        let (addr, arrivals, first_done) = (proxies[i].addr(), arrivals.clone(), Arc::clone(&first_done));
        async move {
            let intact = upload(addr).await;
            // When the first finishes, how far the other got.
            let other = arrivals[1 - i].total();
            first_done.lock().expect("first").get_or_insert(other);
            intact
        }
    };
    let start = Instant::now();
    let (a, b) = tokio::join!(transfer(0), transfer(1));
    assert!(a && b, "both transfers intact");
    let all =
        Arrivals(Arc::new(Mutex::new(arrivals.iter().flat_map(|a| a.0.lock().expect("arrivals").clone()).collect())));
    all.assert_never_faster_than(&bandwidth, start);
    assert_eq!(bandwidth.bytes(), 2 * LEN as u64);
    // First come, first served, one segment per connection at a time: the
    // other transfer is far along when the first one ends (about all of it
    // in theory; a quarter is plenty to rule out one-after-the-other).
    let other = first_done.lock().expect("first").expect("a transfer finished");
    assert!(other >= LEN / 4, "the other transfer had {other} of {LEN} bytes");
}

#[tokio::test]
async fn a_node_link_is_shared_by_its_cloud_and_peer_proxies() {
    // The node is the client of its cloud proxy (it uploads to a sink) and
    // the upstream of its peer proxy (peers download from it): both are its
    // uplink.
    let link = SharedLink::symmetric(RATE_BPS);
    let uploads = Arrivals::default();
    let cloud = LinkProxy::start(recording_sink(uploads.clone()).await).expect("start cloud proxy");
    cloud.attach_client_link(&link);
    let peer = LinkProxy::start(source_server().await).expect("start peer proxy");
    peer.attach_upstream_link(&link);
    assert_eq!(cloud.attached(Direction::ToUpstream), std::slice::from_ref(&link.up));
    assert_eq!(peer.attached(Direction::ToClient), std::slice::from_ref(&link.up));
    assert_eq!(peer.attached(Direction::ToUpstream), std::slice::from_ref(&link.down));

    let downloads = Arrivals::default();
    let start = Instant::now();
    let download = async {
        let stream = TcpStream::connect(peer.addr()).await.expect("connect peer");
        receive_all(stream, downloads.clone()).await
    };
    let (intact, served) = tokio::join!(upload(cloud.addr()), download);
    assert!(intact, "upload intact");
    assert!(served == pattern(LEN), "download intact");
    let all = Arrivals(Arc::new(Mutex::new(
        [&uploads, &downloads].iter().flat_map(|a| a.0.lock().expect("arrivals").clone()).collect(),
    )));
    all.assert_never_faster_than(&link.up, start);
    assert_eq!(link.up.bytes(), 2 * LEN as u64);
    // Down: only the sink's one-byte verdict, once it has crossed.
    eventually("verdict counted", || link.down.bytes() == 1).await;
}

#[tokio::test]
async fn attach_reaches_open_connections_heal_keeps_it_detach_lifts_it() {
    let arrivals = Arrivals::default();
    let proxy = LinkProxy::start(recording_sink(arrivals.clone()).await).expect("start proxy");
    let stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    // Open and idle, then limited.
    write.write_all(&pattern(LEN)[..1]).await.expect("write");
    eventually("first byte through", || arrivals.total() == 1).await;
    let bandwidth = Bandwidth::new(RATE_BPS);
    proxy.attach(Direction::ToUpstream, &bandwidth);
    proxy.heal().expect("heal");
    assert_eq!(proxy.attached(Direction::ToUpstream), std::slice::from_ref(&bandwidth));
    let start = Instant::now();
    write.write_all(&pattern(LEN)[1..]).await.expect("write");
    write.shutdown().await.expect("shutdown");
    let mut verdict = [0; 1];
    timeout(GIVE_UP, read.read_exact(&mut verdict)).await.expect("give up").expect("verdict");
    assert_eq!(verdict, *b"y");
    assert_eq!(bandwidth.bytes(), LEN as u64 - 1);
    let after_attach = Arrivals(Arc::new(Mutex::new(
        arrivals.0.lock().expect("arrivals").iter().copied().filter(|a| a.0 >= start).collect(),
    )));
    after_attach.assert_never_faster_than(&bandwidth, start);

    proxy.detach_all();
    assert!(proxy.attached(Direction::ToUpstream).is_empty());
    assert!(upload(proxy.addr()).await);
    assert_eq!(bandwidth.bytes(), LEN as u64 - 1, "nothing reserved once detached");
}
