//! Loopback ports for test servers that must be started on a port chosen
//! in advance (etcd, the cloud, a sample app).
//!
//! The usual trick — bind port 0, read the port, release it — hands out a
//! port from the kernel's *ephemeral* range, which is exactly where the
//! kernel also picks the source ports of outgoing connections. On a busy
//! test machine the released port is soon the local end of somebody's
//! connection, and the server that was meant to take it fails with
//! "address already in use".
//!
//! [`free_port`] therefore picks at random *below* the ephemeral range
//! (read from `/proc/sys/net/ipv4/ip_local_port_range`), where the kernel
//! never allocates on its own, never hands the same port out twice in one
//! process, and checks that the port can be bound right now. Only another
//! process doing the same can still collide, which the random choice over
//! thousands of ports makes rare; a caller that can restart its server
//! should still retry on "address already in use" with a new port.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::rng::Rng;

/// How many ports below the ephemeral range are candidates.
const SPAN: u16 = 12_000;
/// The lowest port ever chosen (stays clear of well-known services).
const FLOOR: u16 = 10_000;

/// The first port of the kernel's ephemeral range (32768 when unknown),
/// read once per process.
fn ephemeral_start() -> u16 {
    static START: OnceLock<u16> = OnceLock::new();
    *START.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(32_768)
    })
}

/// A TCP port on 127.0.0.1 that is free now, outside the kernel's
/// ephemeral range and not returned before by this process (see the module
/// docs). Falls back to a kernel-chosen port when the ephemeral range
/// leaves no room below it.
///
/// # Panics
/// When no loopback port can be bound at all.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let start = ephemeral_start();
    let low = start.saturating_sub(SPAN).max(FLOOR);
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let given = given.get_or_insert_with(HashSet::new);
    if low < start {
        let mut rng = Rng::from_entropy();
        let span = u64::from(start - low);
        for _ in 0..1_000 {
            let port = low + (rng.next_u64() % span) as u16;
            if given.contains(&port) {
                continue;
            }
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: the kernel's choice, but never one
    // handed out before (a stopped server may be about to take it again).
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
        let port = listener.local_addr().expect("read the bound port").port();
        if given.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let start = ephemeral_start();
        let mut seen = HashSet::new();
        for _ in 0..500 {
            let port = free_port();
            assert!(seen.insert(port), "port {port} handed out twice");
            if start.saturating_sub(FLOOR) >= 1_000 {
                assert!(port < start, "port {port} is in the ephemeral range starting at {start}");
            }
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free");
        }
    }
}
