//! Raw-bytes helpers for the tests that throw garbage at the agent's HTTP
//! servers (the local API on TCP, the mapper socket on a unix socket).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Deterministic garbage: xorshift bytes from a fixed seed.
pub fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `bytes` on `stream`, closes its write half, and returns what came
/// back before the server closed (at most `patience` of waiting).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: &[u8], patience: Duration) -> Vec<u8> {
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(patience, s.read_to_end(&mut buf)).await.expect("the server answers or closes");
    buf
}

/// The answer is a 4xx response, or nothing (the server closed).
pub fn assert_4xx_or_closed(answer: &[u8], what: &str) {
    if answer.is_empty() {
        return;
    }
    let head = String::from_utf8_lossy(&answer[..answer.len().min(12)]).to_string();
    assert!(head.starts_with("HTTP/1.1 4"), "{what}: expected a 4xx or a closed connection, got {head:?}");
}
