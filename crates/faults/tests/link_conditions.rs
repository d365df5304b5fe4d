//! Delay, jitter, bandwidth and loss: lower bounds and integrity, never
//! upper bounds on time.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use yunbian_faults::{LinkConditions, LinkProxy};

#[tokio::test]
async fn delay_applies_to_each_direction() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    proxy.set_conditions(LinkConditions { delay: Duration::from_millis(200), ..LinkConditions::PERFECT });
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let start = Instant::now();
    assert_eq!(round_trip(&mut client, b"ping").await, b"ping");
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
}

#[tokio::test]
async fn conditions_apply_to_open_connections() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut client, b"fast").await, b"fast");
    proxy.set_conditions(LinkConditions { delay: Duration::from_millis(150), ..LinkConditions::PERFECT });
    let start = Instant::now();
    assert_eq!(round_trip(&mut client, b"slow").await, b"slow");
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());
}

#[tokio::test]
async fn jitter_never_reorders() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    proxy.set_conditions(LinkConditions {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(40),
        ..LinkConditions::PERFECT
    });
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut read, mut write) = client.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..200_u32 {
            write.write_all(&i.to_be_bytes()).await.expect("write");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        write
    });
    let mut received = vec![0; 800];
    timeout(GIVE_UP, read.read_exact(&mut received)).await.expect("give up").expect("read");
    let expected: Vec<u8> = (0..200_u32).flat_map(u32::to_be_bytes).collect();
    assert_eq!(received, expected);
    drop(writer.await.expect("writer"));
}

#[tokio::test]
async fn bandwidth_limit_paces_a_transfer() {
    const LEN: usize = 64 * 1024;
    let proxy = LinkProxy::start(sink_server(LEN).await).expect("start proxy");
    proxy.set_conditions(LinkConditions { bandwidth_bps: Some(256_000), ..LinkConditions::PERFECT });
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let start = Instant::now();
    client.write_all(&pattern(LEN)).await.expect("write");
    let mut ack = [0; 1];
    timeout(GIVE_UP, client.read_exact(&mut ack)).await.expect("give up").expect("ack");
    // 64 KiB is 524 288 bits: about 2 s at 256 kbit/s.
    assert!(start.elapsed() >= Duration::from_millis(1500), "{:?}", start.elapsed());
    assert_eq!(proxy.stats().bytes_to_upstream, LEN as u64);
}

#[tokio::test]
async fn loss_delivers_every_byte_in_order() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    proxy.set_seed(42);
    proxy.set_conditions(LinkConditions { loss: 0.3, ..LinkConditions::PERFECT });
    let data = pattern(128 * 1024);
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let start = Instant::now();
    let received = echo_all(client, data.clone()).await;
    assert!(received == data, "bytes lost or reordered");
    // About 180 segments at 30 % loss: some segment waited for an RTO.
    assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
}
