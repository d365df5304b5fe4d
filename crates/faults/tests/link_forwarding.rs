//! A healthy `LinkProxy` forwards faithfully and cleans up when dropped.

mod common;

use std::io::ErrorKind;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use yunbian_faults::LinkProxy;

#[tokio::test]
async fn round_trip_through_proxy() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut client, b"hello").await, b"hello");
    // Counters are bumped just after the write, so the reply can beat them.
    eventually("counters updated", || proxy.stats().bytes_to_client == 5).await;
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.open), (1, 1));
    assert_eq!((stats.bytes_to_upstream, stats.bytes_to_client), (5, 5));
    assert_eq!(stats.bytes_discarded, 0);
}

#[tokio::test]
async fn large_payload_arrives_intact() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let data = pattern(4 << 20);
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let received = echo_all(client, data.clone()).await;
    assert_eq!(received.len(), data.len());
    assert!(received == data, "payload corrupted in transit");
    eventually("connection closed", || proxy.stats().open == 0).await;
}

#[tokio::test]
async fn set_upstream_redirects_new_connections_only() {
    let proxy = LinkProxy::start(greeting_server(b"A").await).expect("start proxy");
    let mut first = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut greeting = [0; 1];
    first.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"A");

    proxy.set_upstream(greeting_server(b"B").await);
    let mut second = TcpStream::connect(proxy.addr()).await.expect("connect");
    second.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"B");
    assert_eq!(round_trip(&mut first, b"still A").await, b"still A");
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    let proxy = LinkProxy::start(closed_port().await).expect("start proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut buf = [0; 8];
    let read = timeout(GIVE_UP, client.read(&mut buf)).await.expect("give up");
    assert_eq!(read.expect_err("reset").kind(), ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn dropping_the_proxy_closes_connections_and_the_listener() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let addr = proxy.addr();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut client, b"x").await, b"x");
    let clone = proxy.clone();
    drop(proxy);
    assert_eq!(round_trip(&mut client, b"clone keeps it alive").await, b"clone keeps it alive");

    drop(clone);
    let mut buf = [0; 8];
    let read = timeout(GIVE_UP, client.read(&mut buf)).await.expect("give up");
    assert!(matches!(read, Ok(0) | Err(_)), "connection still open: {read:?}");
    let connect = TcpStream::connect(addr).await;
    assert_eq!(connect.expect_err("refused").kind(), ErrorKind::ConnectionRefused);
}
