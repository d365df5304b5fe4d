//! Shared helpers of the bus integration tests: starting a broker on a
//! free port, finding real peers (mosquitto clients, python paho-mqtt),
//! a raw MQTT client built on the crate's codec, and TLS material.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yunbian_bus::codec::{decode, encode, ConnAck, Connect, Packet, Properties, Protocol};
use yunbian_bus::{Broker, BrokerConfig, Limits, ListenerConfig};

/// Upper bound for anything a test waits for: a hang fails the test
/// instead of blocking CI. Tests never assert on durations.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn plain_listener() -> ListenerConfig {
    ListenerConfig::plain(SocketAddr::from(([127, 0, 0, 1], 0)))
}

pub async fn start_with(listeners: Vec<ListenerConfig>, limits: Limits) -> Broker {
    Broker::start(BrokerConfig { listeners, limits }).await.expect("start broker")
}

pub async fn start_plain() -> (Broker, SocketAddr) {
    let b = start_with(vec![plain_listener()], Limits::default()).await;
    let addr = b.local_addrs()[0];
    (b, addr)
}

/// Finds `bin` on PATH. Missing: panics under CI, else prints `SKIP:` and
/// returns `None`.
pub fn require_bin(bin: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()));
    if found.is_none() {
        missing(&format!("{bin} not found on PATH (apt-get install -y mosquitto mosquitto-clients)"), test);
    }
    found
}

/// A python3 that can `import paho.mqtt` (2.x), or `None` (SKIP) / panic (CI).
pub fn require_paho(test: &str) -> Option<PathBuf> {
    let py = require_bin("python3", test)?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith('2') else 1)"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        missing("python3 module paho-mqtt 2.x is missing (pip install paho-mqtt)", test);
        return None;
    }
    Some(py)
}

fn missing(what: &str, test: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: required peer missing under CI: {what}");
    }
    println!("SKIP: {test}: {what}");
}

pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Runs a command to completion (bounded by [`PATIENCE`]); returns
/// (success, stdout, stderr).
pub async fn run(cmd: &Path, args: &[&str]) -> (bool, String, String) {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", cmd.display()));
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish", cmd.display()))
        .expect("wait for child");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `cond` until it holds; panics with `what` after [`PATIENCE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A minimal MQTT client on the crate's codec, for raw protocol tests.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    pub version: Protocol,
}

pub fn connect_packet(client_id: &str, version: Protocol, clean: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

impl RawClient {
    pub async fn tcp(addr: SocketAddr, version: Protocol) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect to broker");
        RawClient { stream, buf: BytesMut::new(), version }
    }

    pub async fn connect(addr: SocketAddr, c: Connect) -> (RawClient, ConnAck) {
        let mut client = RawClient::tcp(addr, c.protocol).await;
        client.send(&Packet::Connect(Box::new(c))).await;
        match client.recv().await {
            Some(Packet::ConnAck(a)) => (client, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, self.version, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write to broker");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next packet; `None` when the broker closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(PATIENCE, self.recv_inner()).await.expect("broker answered in time")
    }

    async fn recv_inner(&mut self) -> Option<Packet> {
        loop {
            match decode(&mut self.buf, Some(self.version), usize::MAX) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => panic!("broker sent an undecodable packet: {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Whether the broker has closed the connection (reads until EOF,
    /// skipping a v5 DISCONNECT).
    pub async fn closed_by_broker(&mut self) -> bool {
        loop {
            match self.recv().await {
                None => return true,
                Some(Packet::Disconnect(_)) => continue,
                Some(other) => panic!("expected the connection to close, got {other:?}"),
            }
        }
    }
}

/// CA, server and client certificates for TLS tests, written as PEM files
/// in a fresh directory.
pub struct TlsFiles {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TlsFiles {
    pub fn generate(client_cn: &str) -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
            SanType,
        };
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "yunbian bus test CA");
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");

        let server_key = KeyPair::generate().expect("server key");
        let mut sp = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        sp.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &ca, &ca_key).expect("server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut cp = CertificateParams::new(Vec::<String>::new()).expect("client params");
        cp.distinguished_name.push(DnType::CommonName, client_cn);
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = cp.signed_by(&client_key, &ca, &ca_key).expect("client cert");

        let dir = std::env::temp_dir().join(format!("yunbian-bus-tls-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("create tls dir");
        let files = TlsFiles {
            dir,
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        for (name, text) in
            [("ca.pem", &files.ca_pem), ("client.pem", &files.client_cert_pem), ("client.key", &files.client_key_pem)]
        {
            std::fs::write(files.dir.join(name), text).expect("write pem");
        }
        files
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}
