//! Broker configuration: listeners (address, TLS, authentication) and the
//! [`Limits`] that bound its memory.
//!
//! Passwords are never stored in clear: a [`PasswordHash`] is
//! PBKDF2-HMAC-SHA256 with a random 16-byte salt, and is verified with
//! `ring::pbkdf2::verify` (constant time). A user name that does not exist
//! still costs one verification, so timing does not reveal which names
//! exist.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use ring::{pbkdf2, rand::SecureRandom};

use crate::BusError;

/// The whole broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Sockets to listen on (at least one; an in-process-only broker can
    /// pass none).
    pub listeners: Vec<ListenerConfig>,
    /// Memory and resource limits.
    pub limits: Limits,
}

impl Default for BrokerConfig {
    /// One plaintext, anonymous listener on 127.0.0.1:1883.
    fn default() -> Self {
        BrokerConfig {
            listeners: vec![ListenerConfig::plain(SocketAddr::from(([127, 0, 0, 1], 1883)))],
            limits: Limits::default(),
        }
    }
}

/// One listening socket.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind (port 0: any free port, see `Broker::local_addrs`).
    pub bind: SocketAddr,
    /// TLS; `None` for plain TCP.
    pub tls: Option<TlsConfig>,
    /// How clients authenticate.
    pub auth: Auth,
}

impl ListenerConfig {
    /// A plain TCP listener accepting anonymous clients.
    pub fn plain(bind: SocketAddr) -> ListenerConfig {
        ListenerConfig { bind, tls: None, auth: Auth::Anonymous }
    }
}

/// TLS settings of a listener (PEM text).
#[derive(Clone)]
pub struct TlsConfig {
    /// The server certificate chain, leaf first.
    pub cert_chain_pem: String,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// CA certificates for client certificates. When set, every client
    /// must present a certificate signed by one of them, and its subject
    /// common name becomes the client's user name (the CONNECT user name
    /// and password are then not checked).
    pub client_ca_pem: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("client_ca", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

/// How a listener authenticates clients.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// Anyone may connect; user name and password are ignored.
    #[default]
    Anonymous,
    /// A CONNECT must carry a known user name and its password.
    Password(Users),
}

/// User names and their password hashes.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: HashMap<String, PasswordHash>,
}

impl Users {
    /// No users.
    pub fn new() -> Users {
        Users::default()
    }

    /// Adds (or replaces) a user with a clear-text password, hashed here.
    pub fn with_password(mut self, user: &str, password: &str) -> Result<Users, BusError> {
        self.users.insert(user.to_owned(), PasswordHash::new(password.as_bytes())?);
        Ok(self)
    }

    /// Adds (or replaces) a user with a stored hash.
    pub fn with_hash(mut self, user: &str, hash: PasswordHash) -> Users {
        self.users.insert(user.to_owned(), hash);
        self
    }

    /// Whether `user` exists and `password` is theirs (constant time in
    /// the password; an unknown user costs the same work).
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => h.verify(password),
            None => {
                let _ = dummy_hash().verify(password);
                false
            }
        }
    }
}

fn dummy_hash() -> &'static PasswordHash {
    static DUMMY: std::sync::OnceLock<PasswordHash> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| PasswordHash { iterations: PasswordHash::ITERATIONS, salt: [0; 16], hash: [0; 32] })
}

/// A salted PBKDF2-HMAC-SHA256 password hash, written as
/// `pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    iterations: u32,
    salt: [u8; 16],
    hash: [u8; 32],
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

impl PasswordHash {
    /// Iterations used for new hashes (a connect costs a few milliseconds).
    pub const ITERATIONS: u32 = 20_000;

    /// Hashes `password` with a fresh random salt.
    pub fn new(password: &[u8]) -> Result<PasswordHash, BusError> {
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| BusError::Random)?;
        let mut hash = [0u8; 32];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, Self::iters(Self::ITERATIONS), &salt, password, &mut hash);
        Ok(PasswordHash { iterations: Self::ITERATIONS, salt, hash })
    }

    fn iters(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    /// Whether `password` matches (constant-time comparison).
    pub fn verify(&self, password: &[u8]) -> bool {
        pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, Self::iters(self.iterations), &self.salt, password, &self.hash)
            .is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pbkdf2-sha256${}${}${}", self.iterations, hex(&self.salt), hex(&self.hash))
    }
}

impl FromStr for PasswordHash {
    type Err = BusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BusError::Config("password hash: expected pbkdf2-sha256$<iterations>$<salt>$<hash>".into());
        let mut parts = s.split('$');
        if parts.next() != Some("pbkdf2-sha256") {
            return Err(bad());
        }
        let iterations: u32 = parts.next().and_then(|p| p.parse().ok()).filter(|&n| n > 0).ok_or_else(bad)?;
        let salt = parts.next().and_then(unhex::<16>).ok_or_else(bad)?;
        let hash = parts.next().and_then(unhex::<32>).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PasswordHash { iterations, salt, hash })
    }
}

/// Bounds on everything the broker keeps in memory. Each limit hit is
/// counted in `BrokerStats` under a [`crate::DropReason`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections (further ones are closed at accept).
    pub max_connections: usize,
    /// Largest packet accepted, fixed header included (also advertised to
    /// v5 clients as Maximum Packet Size).
    pub max_packet_size: usize,
    /// QoS 1/2 messages in flight to one client (lowered further by the
    /// client's Receive Maximum), and QoS 2 messages from one client
    /// awaiting PUBREL (advertised as our Receive Maximum).
    pub max_inflight: u16,
    /// Messages queued for one client beyond those in flight (while it is
    /// slow or offline). When full, the oldest queued QoS 0 message is
    /// dropped; when there is none, the new message is dropped.
    pub max_queued_messages: usize,
    /// Retained messages stored.
    pub max_retained_messages: usize,
    /// Bytes of retained topics and payloads stored.
    pub max_retained_bytes: usize,
    /// Subscriptions of one client.
    pub max_subscriptions_per_client: usize,
    /// Sessions kept (connected and offline); past it the offline session
    /// disconnected longest ago is discarded.
    pub max_sessions: usize,
    /// Topic aliases a v5 client may set (Topic Alias Maximum; 0: none).
    pub max_topic_aliases: u16,
    /// Longest session expiry granted to a client, in seconds (v3.1.1
    /// persistent sessions get this).
    pub max_session_expiry: u32,
    /// Time a new connection has to complete TLS and send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_packet_size: 1024 * 1024,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_retained_messages: 10_000,
            max_retained_bytes: 16 * 1024 * 1024,
            max_subscriptions_per_client: 128,
            max_sessions: 2048,
            max_topic_aliases: 64,
            max_session_expiry: 7 * 24 * 3600,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trips_and_verifies() {
        let h = PasswordHash::new(b"secret").expect("hash");
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"Secret"));
        let parsed: PasswordHash = h.to_string().parse().expect("parse");
        assert_eq!(parsed, h);
        assert!("pbkdf2-sha256$0$00$00".parse::<PasswordHash>().is_err());
        let users = Users::new().with_password("alice", "pw").expect("users");
        assert!(users.verify("alice", b"pw"));
        assert!(!users.verify("alice", b"px"));
        assert!(!users.verify("bob", b"pw"));
    }
}
