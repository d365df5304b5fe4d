//! Cut, reset, refuse and heal, as a client on the far side sees them.

mod common;

use std::io::ErrorKind;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use yunbian_faults::LinkProxy;

/// How long a read must stay pending to count as "nothing arrives".
const SILENCE: Duration = Duration::from_secs(1);

#[tokio::test]
async fn cut_blackholes_an_open_connection_without_closing_it() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut client, b"before").await, b"before");

    proxy.cut();
    client.write_all(b"lost").await.expect("writes still succeed");
    let mut buf = [0; 16];
    let read = timeout(SILENCE, client.read(&mut buf)).await;
    assert!(read.is_err(), "read must stay pending (no data, no EOF, no RST): {read:?}");
    eventually("discarded bytes counted", || proxy.stats().bytes_discarded >= 4).await;
    assert_eq!(proxy.stats().open, 1);

    // The same connection carries traffic again; what was cut is gone.
    proxy.heal().expect("heal");
    assert_eq!(round_trip(&mut client, b"after").await, b"after");
}

#[tokio::test]
async fn cut_holds_new_connections_until_heal() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    proxy.cut();
    let mut held = TcpStream::connect(proxy.addr()).await.expect("the kernel still completes the handshake");
    held.write_all(b"lost").await.expect("write");
    let mut buf = [0; 16];
    assert!(timeout(SILENCE, held.read(&mut buf)).await.is_err(), "no answer while cut");
    eventually("discarded bytes counted", || proxy.stats().bytes_discarded >= 4).await;

    proxy.heal().expect("heal");
    let mut fresh = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut fresh, b"fresh").await, b"fresh");
    assert_eq!(round_trip(&mut held, b"held").await, b"held");
}

#[tokio::test]
async fn reset_closes_connections_with_rst() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut client, b"ping").await, b"ping");

    proxy.reset();
    let mut buf = [0; 16];
    let read = timeout(GIVE_UP, client.read(&mut buf)).await.expect("give up");
    assert_eq!(read.expect_err("an RST, not a clean EOF").kind(), ErrorKind::ConnectionReset);
    eventually("connection closed", || proxy.stats().open == 0).await;

    let mut next = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut next, b"next").await, b"next");
}

#[tokio::test]
async fn reset_reaches_connections_held_by_a_cut() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    proxy.cut();
    let mut held = TcpStream::connect(proxy.addr()).await.expect("connect");
    eventually("connection accepted", || proxy.stats().open == 1).await;
    proxy.reset();
    let mut buf = [0; 16];
    let read = timeout(GIVE_UP, held.read(&mut buf)).await.expect("give up");
    assert_eq!(read.expect_err("reset").kind(), ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn refuse_refuses_new_connections_and_keeps_open_ones() {
    let proxy = LinkProxy::start(echo_server().await).expect("start proxy");
    let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut open, b"one").await, b"one");

    proxy.refuse(true).expect("refuse");
    let refused = TcpStream::connect(proxy.addr()).await;
    assert_eq!(refused.expect_err("refused").kind(), ErrorKind::ConnectionRefused);
    assert_eq!(round_trip(&mut open, b"two").await, b"two");

    proxy.refuse(false).expect("accept again");
    let mut again = TcpStream::connect(proxy.addr()).await.expect("connect again");
    assert_eq!(round_trip(&mut again, b"three").await, b"three");

    proxy.refuse(true).expect("refuse");
    proxy.heal().expect("heal lifts refuse");
    let mut healed = TcpStream::connect(proxy.addr()).await.expect("connect after heal");
    assert_eq!(round_trip(&mut healed, b"four").await, b"four");
}

/// An upstream that sends `message`, waits, then closes with an RST.
async fn send_then_reset_server(message: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(message).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = stream.set_zero_linger();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn bytes_in_flight_before_an_upstream_reset_still_arrive_then_the_reset() {
    // The delay keeps the message on the link while the proxy's read of
    // the upstream fails: it must still be delivered, as a network
    // delivers what was sent before an RST (a TLS alert, say), and the
    // client must then see a reset, not a clean end of stream.
    let proxy = LinkProxy::start(send_then_reset_server(b"alert").await).expect("start proxy");
    proxy.set_conditions(yunbian_faults::LinkConditions {
        delay: Duration::from_millis(300),
        ..yunbian_faults::LinkConditions::PERFECT
    });
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut message = [0; 5];
    timeout(GIVE_UP, client.read_exact(&mut message)).await.expect("give up").expect("the bytes sent before the RST");
    assert_eq!(&message, b"alert");
    let mut rest = [0; 1];
    let read = timeout(GIVE_UP, client.read(&mut rest)).await.expect("give up");
    assert_eq!(read.expect_err("an RST, not a clean EOF").kind(), ErrorKind::ConnectionReset);
}
