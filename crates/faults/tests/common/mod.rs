//! Loopback peers and helpers shared by the link tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Give-up timeout for anything that should happen: never a performance bound.
pub const GIVE_UP: Duration = Duration::from_secs(30);

/// A server that echoes every byte back until the client closes.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// A server that greets every connection with `greeting`, then echoes.
pub async fn greeting_server(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind greeting server");
    let addr = listener.local_addr().expect("greeting server address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(greeting).await.is_ok() {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
        }
    });
    addr
}

/// A server that reads `expect` bytes, then answers with one byte `k`.
pub async fn sink_server(expect: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink server");
    let addr = listener.local_addr().expect("sink server address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; expect];
                if stream.read_exact(&mut buf).await.is_ok() {
                    let _ = stream.write_all(b"k").await;
                }
            });
        }
    });
    addr
}

/// An address nothing listens on (free now, outside the ephemeral range,
/// so no outgoing connection takes it as its source port meanwhile).
pub async fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], yunbian_faults::ports::free_port()))
}

/// Writes `message` and reads the same number of bytes back.
pub async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut reply = vec![0; message.len()];
    timeout(GIVE_UP, stream.read_exact(&mut reply))
        .await
        .expect("reply within the give-up timeout")
        .expect("read reply");
    reply
}

/// Deterministic, non-repeating test data.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x1234_5678_9abc_def0_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `data` through `stream` while reading everything that comes back.
pub async fn echo_all(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.expect("write payload");
        write.shutdown().await.expect("shutdown write");
    });
    let mut received = Vec::new();
    timeout(GIVE_UP, read.read_to_end(&mut received))
        .await
        .expect("echo within the give-up timeout")
        .expect("read echo");
    writer.await.expect("writer task");
    received
}

/// Polls `condition` until it holds; panics after the give-up timeout.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + GIVE_UP;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
