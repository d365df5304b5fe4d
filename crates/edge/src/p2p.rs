//! P2P artifact distribution between agents
//! (docs/design/015-p2p-distribution.md).
//!
//! Agents serve the chunks in their artifact cache to each other over
//! mTLS; the cloud's tracker (`yunbian_cloud::tracker`) says which peers
//! hold a chunk, same-site peers first, and the cloud serves a chunk only
//! when no peer could.
//!
//! # Parts
//!
//! - [`LocalChunks`]: what this node can serve, read from its cache
//!   (`<data>/artifacts/`): chunk files under `chunks/` (a pull in
//!   progress), and the chunks of assembled blobs under `blobs/<sha256>`,
//!   located through the Artifact objects the cache keeps in `refs/*.json`
//!   (a blob's chunk list gives each chunk's offset and size). Every chunk
//!   is checked against its digest before it is served.
//! - The peer server ([`start_peer_server`]): HTTPS with mandatory client
//!   certificates verified against the cluster CA; the server presents the
//!   node's own certificate. `GET /p2p/chunks/{sha256}` → 200 with the
//!   bytes, 404 if this node cannot serve it, 503 with `Retry-After` when
//!   [`PeerServerLimits::max_uploads`] are running. Uploads are paced by
//!   one token bucket ([`PeerServerLimits::upload_bytes_per_sec`]).
//!   `GET /v1/probe` → 200 `ok` at once: the latency probe of group peers
//!   ([`crate::probe`], docs/design/018-latency-and-peer-health.md).
//! - [`PeerSource`], an [`ArtifactSource`]: for each chunk it asks the
//!   tracker (`GET /v1/p2p/peers/{sha256}`), tries the peers in the order
//!   given, checks the bytes against the digest itself (so it knows which
//!   peer sent bad bytes), reports a corrupt or unreachable peer (`POST
//!   /v1/p2p/report`) and tries the next one; only when no peer had it does
//!   it fetch from the cloud. A cloud that answers 429/503 (the site's
//!   concurrent pulls are used up, or another node of the site is getting
//!   that chunk and will serve it) gives [`SourceError::Busy`] with its
//!   `Retry-After`: the cache fetches other chunks and comes back to this
//!   one, asking the tracker again, for at most
//!   [`crate::artifacts::CacheOptions::busy_max_wait`] without progress. Downloads are paced by
//!   [`PeerSourceOptions::download_bytes_per_sec`]. Artifact objects always
//!   come from the cloud.
//! - The announcer ([`spawn_announcer`]): every period, and when poked,
//!   tells the tracker what this node holds (`POST /v1/p2p/announce`): the
//!   full set first, then deltas; the full set again every tenth round,
//!   after an error, and when the tracker does not know the node (409:
//!   another cloud replica, or a restarted one).
//!
//! Peers authenticate each other with their node certificates: the client
//! checks that the server's certificate chains to the cluster CA and names
//! the node the tracker offered (the TLS server name is the node name); the
//! server accepts any current certificate of the cluster CA.
//!
//! # Wiring it into the agent
//!
//! In `crate::start`, with `dir` the data directory:
//!
//! ```text
//! let cloud = Arc::new(CloudSource::from_data_dir(&dir)?);
//! let source = Arc::new(p2p::PeerSource::from_data_dir(cloud.clone(), &dir, p2p::PeerSourceOptions::default())?);
//! let cache = ArtifactCache::open(&dir, source, opts.artifacts.clone())?;        // instead of the CloudSource
//! let (addr, server) = p2p::start_peer_server(&dir, "0.0.0.0:7444", p2p::PeerServerLimits::default()).await?;
//! let announcer = p2p::spawn_announcer(cloud, &dir, format!(":{}", addr.port()), site, p2p::ANNOUNCE_EVERY);
//! // when the NodeGroups in the view change:  announcer.set_site(p2p::site_of_groups(groups))
//! // after each pull (launcher) or cache collection:  announcer.poke()
//! ```
//!
//! An `addr` with an empty host makes the tracker use the address the
//! announce came from; set a `host:port` when peers must use another one
//! (NAT). A port in use should be logged, not fatal: the node then pulls
//! from peers and the cloud but serves nobody.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use yunbian_api::{Artifact, NodeGroupSpec};
use yunbian_artifacts::{sha256, Digest, CHUNK_SIZE};

use crate::artifacts::{ArtifactSource, CloudSource, SourceError};
use crate::http;

/// The peer server's default port.
pub const DEFAULT_PEER_PORT: u16 = 7444;

/// How often the announcer re-announces by default (the tracker forgets a
/// node after 5 minutes without one).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(60);

/// Every this many announce rounds the full set is sent, not a delta.
const FULL_EVERY: u64 = 10;

/// Time allowed for a peer's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections the peer server holds at once.
const MAX_CONNECTIONS: usize = 256;

/// Slice of a paced response.
const SLICE: usize = 64 << 10;

/// A missing chunk makes the index be read again, at most this often.
const RESCAN_AFTER_MISS: Duration = Duration::from_secs(2);

/// Origins of recent chunks kept by a [`PeerSource`].
const ORIGINS_KEPT: usize = 4096;

// ------------------------------------------------------------ rate limits

pub use yunbian_artifacts::rate::TokenBucket;

/// A shared pacing limit, or none.
#[derive(Debug, Clone, Default)]
pub struct RateLimit(Option<Arc<Mutex<TokenBucket>>>);

impl RateLimit {
    /// `bytes_per_sec`, or unlimited for `None`.
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimit {
        RateLimit(bytes_per_sec.map(|r| Arc::new(Mutex::new(TokenBucket::new(r, Instant::now())))))
    }

    /// How long to wait before moving `n` bytes now (zero when unlimited).
    pub fn reserve(&self, n: u64) -> Duration {
        match &self.0 {
            Some(b) => b.lock().unwrap_or_else(|e| e.into_inner()).reserve(n, Instant::now()),
            None => Duration::ZERO,
        }
    }

    /// Waits until `n` bytes may move.
    pub async fn pace(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `bytes` as a response body in slices, each paced by `limit`; `hold`
/// is dropped once the body is sent (or abandoned).
fn paced_body<H: Send + 'static>(bytes: Bytes, limit: RateLimit, hold: H) -> Body {
    let stream = futures_util::stream::unfold((bytes, 0usize, hold), move |(bytes, at, hold)| {
        let limit = limit.clone();
        async move {
            if at >= bytes.len() {
                return None;
            }
            let end = (at + SLICE).min(bytes.len());
            limit.pace((end - at) as u64).await;
            Some((Ok::<Bytes, std::convert::Infallible>(bytes.slice(at..end)), (bytes, end, hold)))
        }
    });
    Body::from_stream(stream)
}

// ------------------------------------------------------------ local chunks

/// Where a chunk this node can serve is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkLocation {
    /// A chunk file of a pull in progress.
    File(PathBuf),
    /// A slice of an assembled blob.
    Slice {
        /// The blob file.
        blob: PathBuf,
        /// Where the chunk starts.
        offset: u64,
        /// Its length.
        size: u64,
    },
}

#[derive(Debug, Default)]
struct ChunkIndex {
    map: HashMap<Digest, ChunkLocation>,
    scanned: Option<Instant>,
}

/// The chunks this node can serve, from its artifact cache (see the module
/// docs). The index is rebuilt by [`rescan`](Self::rescan), and on a miss
/// at most every two seconds.
#[derive(Debug)]
pub struct LocalChunks {
    root: PathBuf,
    index: Mutex<ChunkIndex>,
}

impl LocalChunks {
    /// The chunks of the cache in `<data_dir>/artifacts` (not read yet).
    pub fn new(data_dir: &Path) -> LocalChunks {
        LocalChunks { root: data_dir.join("artifacts"), index: Mutex::new(ChunkIndex::default()) }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, ChunkIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the cache again (blocking file I/O); returns how many chunks
    /// it can serve.
    pub fn rescan(&self) -> usize {
        let map = scan(&self.root);
        let n = map.len();
        *self.index() = ChunkIndex { map, scanned: Some(Instant::now()) };
        n
    }

    /// Every chunk it can serve, sorted (as of the last scan).
    pub fn held(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.index().map.keys().copied().collect();
        v.sort();
        v
    }

    /// Where `d` is, reading the cache again on a miss if the last scan is
    /// older than two seconds (blocking file I/O).
    pub fn locate(&self, d: &Digest) -> Option<ChunkLocation> {
        let stale = {
            let idx = self.index();
            if let Some(l) = idx.map.get(d) {
                return Some(l.clone());
            }
            idx.scanned.is_none_or(|t| t.elapsed() >= RESCAN_AFTER_MISS)
        };
        if stale {
            self.rescan();
            return self.index().map.get(d).cloned();
        }
        None
    }

    /// The bytes of `d`, checked against it (blocking file I/O). `None`:
    /// not here, gone meanwhile, or damaged (then dropped from the index).
    pub fn read_verified(&self, d: &Digest) -> Option<Vec<u8>> {
        let loc = self.locate(d)?;
        let bytes = match read_location(&loc) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(chunk = %d, error = %e, "chunk vanished from the cache");
                self.index().map.remove(d);
                return None;
            }
        };
        if sha256(&bytes) != *d {
            tracing::warn!(chunk = %d, location = ?loc, "a cached chunk failed its check; not serving it");
            self.index().map.remove(d);
            return None;
        }
        Some(bytes)
    }
}

fn read_location(loc: &ChunkLocation) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    match loc {
        ChunkLocation::File(p) => {
            let f = std::fs::File::open(p)?;
            let mut buf = Vec::new();
            f.take(CHUNK_SIZE as u64 + 1).read_to_end(&mut buf)?;
            Ok(buf)
        }
        ChunkLocation::Slice { blob, offset, size } => {
            let mut f = std::fs::File::open(blob)?;
            f.seek(SeekFrom::Start(*offset))?;
            let mut buf = vec![0u8; *size as usize];
            f.read_exact(&mut buf)?;
            Ok(buf)
        }
    }
}

/// The chunk index of the cache at `root`: chunk files, then slices of the
/// blobs that the kept Artifact objects describe and that are present with
/// their full size.
fn scan(root: &Path) -> HashMap<Digest, ChunkLocation> {
    let mut map = HashMap::new();
    if let Ok(rd) = std::fs::read_dir(root.join("chunks")) {
        for e in rd.flatten() {
            let Some(d) = e.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
            if e.file_type().is_ok_and(|t| t.is_file()) {
                map.insert(d, ChunkLocation::File(e.path()));
            }
        }
    }
    let Ok(rd) = std::fs::read_dir(root.join("refs")) else { return map };
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let artifact = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| Artifact::from_value(v).ok());
        let Some(a) = artifact else { continue };
        for blob in a.spec.blobs.values() {
            let Ok(sha) = blob.sha256.parse::<Digest>() else { continue };
            let file = root.join("blobs").join(sha.hex());
            if !std::fs::metadata(&file).is_ok_and(|m| m.is_file() && m.len() == blob.size) {
                continue;
            }
            let mut offset = 0u64;
            for c in &blob.chunks {
                let Ok(d) = c.digest.parse::<Digest>() else { break };
                if c.size > CHUNK_SIZE as u64 || offset + c.size > blob.size {
                    break;
                }
                map.entry(d).or_insert(ChunkLocation::Slice { blob: file.clone(), offset, size: c.size });
                offset += c.size;
            }
        }
    }
    map
}

// ------------------------------------------------------------- TLS

fn node_files(data_dir: &Path) -> Result<(String, String, String)> {
    let id = crate::Identity::read(data_dir)?;
    Ok((id.ca, id.cert, id.key))
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("parse certificate PEM")
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).context("add the cluster CA")?;
    }
    Ok(Arc::new(roots))
}

/// Verifies client certificates against the cluster CA (required).
fn node_cert_verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, yunbian_pki::provider())
        .build()
        .context("node certificate verifier")
}

/// The peer server's TLS: the node's certificate, clients must present a
/// certificate of the cluster CA.
pub fn peer_server_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parse the node key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(yunbian_pki::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(node_cert_verifier(ca_pem)?)
        .with_single_cert(certs(cert_pem)?, key)
        .context("peer server certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS of a peer client: presents the node's certificate; accepts a
/// server whose certificate chains to the cluster CA and whose CN is the
/// server name asked for (the peer's node name).
pub fn peer_client_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parse the node key")?;
    let verifier = Arc::new(PeerCertVerifier { inner: node_cert_verifier(ca_pem)? });
    let mut cfg = rustls::ClientConfig::builder_with_provider(yunbian_pki::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs(cert_pem)?, key)
        .context("peer client certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A peer's server certificate is a node certificate (client-auth usage,
/// no subject alternative names): checked like a client certificate
/// against the cluster CA, then its CN against the node name.
#[derive(Debug)]
struct PeerCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ServerCertVerifier for PeerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let (cn, _) = yunbian_pki::cert_identity(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let expected = match server_name {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            other => other.to_str().into_owned(),
        };
        if cn != expected {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
                expected: server_name.to_owned(),
                presented: vec![cn],
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS configuration built from the node's files, built again when
/// `node.crt` changes (a renewal).
struct Reloading<T> {
    dir: PathBuf,
    build: fn(&str, &str, &str) -> Result<Arc<T>>,
    current: Mutex<(Option<SystemTime>, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(dir: &Path, build: fn(&str, &str, &str) -> Result<Arc<T>>) -> Result<Reloading<T>> {
        let stamp = std::fs::metadata(dir.join("node.crt")).and_then(|m| m.modified()).ok();
        let (ca, cert, key) = node_files(dir)?;
        Ok(Reloading { dir: dir.to_path_buf(), build, current: Mutex::new((stamp, build(&ca, &cert, &key)?)) })
    }

    fn get(&self) -> Arc<T> {
        let stamp = std::fs::metadata(self.dir.join("node.crt")).and_then(|m| m.modified()).ok();
        let mut c = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_some() && stamp != c.0 {
            match node_files(&self.dir).and_then(|(ca, cert, key)| (self.build)(&ca, &cert, &key)) {
                Ok(cfg) => *c = (stamp, cfg),
                Err(e) => tracing::warn!(error = %e, "re-read the node identity for p2p; using the previous one"),
            }
        }
        c.1.clone()
    }
}

/// The peer client TLS of the node identity in `data_dir`, built again
/// after a renewal (what [`crate::probe::PeerProber`] connects with).
pub fn reloading_client_tls(data_dir: &Path) -> Result<crate::probe::ClientTls> {
    let r = Reloading::new(data_dir, peer_client_tls)?;
    Ok(Arc::new(move || r.get()))
}

// ------------------------------------------------------------- peer server

/// Limits of the peer server.
#[derive(Debug, Clone)]
pub struct PeerServerLimits {
    /// Bytes per second sent to peers, all together (`None`: unlimited).
    pub upload_bytes_per_sec: Option<u64>,
    /// Chunks sent at once; more get 503 with `Retry-After`.
    pub max_uploads: usize,
}

impl Default for PeerServerLimits {
    fn default() -> Self {
        PeerServerLimits { upload_bytes_per_sec: None, max_uploads: 8 }
    }
}

struct ServerState {
    chunks: Arc<LocalChunks>,
    upload: RateLimit,
    uploads: Arc<tokio::sync::Semaphore>,
    max_uploads: usize,
}

/// The peer server's routes over `chunks`.
pub fn peer_router(chunks: Arc<LocalChunks>, limits: &PeerServerLimits) -> Router {
    let state = Arc::new(ServerState {
        chunks,
        upload: RateLimit::new(limits.upload_bytes_per_sec),
        uploads: Arc::new(tokio::sync::Semaphore::new(limits.max_uploads.max(1))),
        max_uploads: limits.max_uploads.max(1),
    });
    Router::new()
        .route("/p2p/chunks/{digest}", get(serve_chunk))
        // Latency probes of group peers (crate::probe): answered at once,
        // outside the upload slots.
        .route("/v1/probe", get(|| async { "ok" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such path") })
        .with_state(state)
}

fn text(code: StatusCode, message: String) -> Response {
    let body = yunbian_api::ApiErrorBody { code: code.as_u16(), message, details: Vec::new() };
    (code, axum::Json(body)).into_response()
}

async fn serve_chunk(State(s): State<Arc<ServerState>>, UrlPath(d): UrlPath<String>) -> Response {
    let d: Digest = match d.parse() {
        Ok(d) => d,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let Ok(slot) = s.uploads.clone().try_acquire_owned() else {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, format!("{} chunks are being sent; retry", s.max_uploads));
        r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return r;
    };
    let chunks = s.chunks.clone();
    let read = tokio::task::spawn_blocking(move || chunks.read_verified(&d)).await;
    match read {
        Ok(Some(bytes)) => {
            let len = bytes.len();
            (
                [("content-type", "application/octet-stream".to_string()), ("content-length", len.to_string())],
                paced_body(Bytes::from(bytes), s.upload.clone(), slot),
            )
                .into_response()
        }
        Ok(None) => text(StatusCode::NOT_FOUND, format!("chunk {d} is not here")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("read chunk {d}: {e}")),
    }
}

/// Serves `app` over mTLS with the node identity in `data_dir` on
/// `listen`; returns the bound address and the accept task. The
/// certificate is read again when `node.crt` changes.
pub async fn serve_peer_router(data_dir: &Path, listen: &str, app: Router) -> Result<(SocketAddr, JoinHandle<()>)> {
    let tls = Arc::new(Reloading::new(data_dir, peer_server_tls)?);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    let addr = listener.local_addr().context("local address")?;
    let task = tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "p2p accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many p2p connections; closing a new one");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
            let app = app.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "p2p tls handshake"),
                    Err(_) => return tracing::debug!(%peer, "p2p tls handshake timed out"),
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "p2p connection ended");
                }
            });
        }
    });
    tracing::info!(%addr, "p2p peer server listening");
    Ok((addr, task))
}

/// Starts the peer server for the cache in `data_dir` (see the module docs).
pub async fn start_peer_server(
    data_dir: &Path,
    listen: &str,
    limits: PeerServerLimits,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let chunks = Arc::new(LocalChunks::new(data_dir));
    let c = chunks.clone();
    tokio::task::spawn_blocking(move || c.rescan()).await.context("scan the artifact cache")?;
    serve_peer_router(data_dir, listen, peer_router(chunks, &limits)).await
}

// ------------------------------------------------------------ peer client

/// A peer that holds a chunk, as the tracker offers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerOffer {
    /// Node name: its certificate's CN.
    pub node: String,
    /// `host:port` of its peer server.
    pub addr: String,
    /// Its site.
    #[serde(default)]
    pub site: String,
}

#[derive(Debug, Deserialize)]
struct PeersAnswer {
    peers: Vec<PeerOffer>,
}

/// Why a fetch from a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerFetchError {
    /// The peer does not have it (any more).
    #[error("the peer does not have it")]
    NotFound,
    /// The peer sent more bytes than a chunk can have.
    #[error("the peer sent more than {CHUNK_SIZE} bytes")]
    TooLarge,
    /// All its upload slots are taken (503): no fault of the peer.
    #[error("the peer is busy: {0}")]
    Busy(String),
    /// Connection, TLS, HTTP or timeout.
    #[error("{0}")]
    Failed(String),
}

/// Fetches chunk `d` from `peer`, pacing the download by `limit`; the
/// bytes are not checked.
pub async fn fetch_from_peer(
    tls: Arc<rustls::ClientConfig>,
    peer: &PeerOffer,
    d: &Digest,
    limit: &RateLimit,
    timeout: Duration,
) -> Result<Vec<u8>, PeerFetchError> {
    let failed = |m: String| PeerFetchError::Failed(m);
    let name = ServerName::try_from(peer.node.clone()).map_err(|e| failed(format!("node name {}: {e}", peer.node)))?;
    let fetch = async {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(peer.addr.as_str()))
            .await
            .map_err(|_| failed(format!("connect to {} timed out", peer.addr)))?
            .map_err(|e| failed(format!("connect to {}: {e}", peer.addr)))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| failed(format!("TLS with {} at {}: {}", peer.node, peer.addr, http::chain(&e))))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("http handshake: {}", http::chain(&e))))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("/p2p/chunks/{d}"))
            .header("host", peer.addr.as_str())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| failed(format!("request: {}", http::chain(&e))))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(PeerFetchError::NotFound),
            503 => {
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                return Err(PeerFetchError::Busy(http::error_message(503, &body)));
            }
            s => {
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                return Err(failed(http::error_message(s, &body)));
            }
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| failed(format!("read: {}", http::chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > CHUNK_SIZE {
                    return Err(PeerFetchError::TooLarge);
                }
                limit.pace(data.len() as u64).await;
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| failed(format!("fetch from {} timed out", peer.node)))?
}

// ------------------------------------------------------------- PeerSource

/// Settings of a [`PeerSource`].
#[derive(Debug, Clone)]
pub struct PeerSourceOptions {
    /// Bytes per second downloaded, from peers and the cloud together
    /// (`None`: unlimited).
    pub download_bytes_per_sec: Option<u64>,
    /// Peers tried per chunk before the cloud.
    pub peers_per_chunk: usize,
    /// Time allowed for one chunk from one peer.
    pub peer_timeout: Duration,
    /// Pause asked for after a busy answer (429/503) without
    /// `Retry-After`; the cache ([`crate::artifacts::CacheOptions::busy_max_wait`])
    /// decides how long to keep asking.
    pub cloud_busy_backoff: Duration,
}

impl Default for PeerSourceOptions {
    fn default() -> Self {
        PeerSourceOptions {
            download_bytes_per_sec: None,
            peers_per_chunk: 3,
            peer_timeout: Duration::from_secs(120),
            cloud_busy_backoff: Duration::from_secs(1),
        }
    }
}

/// Where a chunk came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOrigin {
    /// A peer, by node name.
    Peer(String),
    /// The cloud.
    Cloud,
}

/// Counters of a [`PeerSource`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSourceStats {
    /// Chunks that came from peers.
    pub from_peers: u64,
    /// Chunks that came from the cloud.
    pub from_cloud: u64,
    /// Chunks peers sent with the wrong digest (or too many bytes).
    pub corrupt_from_peers: u64,
    /// Fetches from peers that failed otherwise.
    pub peer_failures: u64,
    /// Reports sent to the tracker.
    pub reports_sent: u64,
    /// Busy answers (429/503) from the cloud.
    pub cloud_busy: u64,
}

#[derive(Debug, Default)]
struct Counters {
    from_peers: AtomicU64,
    from_cloud: AtomicU64,
    corrupt: AtomicU64,
    peer_failures: AtomicU64,
    reports: AtomicU64,
    cloud_busy: AtomicU64,
}

enum ClientTls {
    Fixed(Arc<rustls::ClientConfig>),
    Reloading(Reloading<rustls::ClientConfig>),
}

/// An [`ArtifactSource`] that takes chunks from peers the tracker names
/// and from the cloud only when no peer could (see the module docs).
pub struct PeerSource {
    cloud: Arc<CloudSource>,
    tls: ClientTls,
    download: RateLimit,
    opts: PeerSourceOptions,
    counters: Counters,
    origins: Mutex<VecDeque<(Digest, ChunkOrigin)>>,
}

impl PeerSource {
    /// A source over `cloud` using `peer_tls` (see [`peer_client_tls`]).
    pub fn new(cloud: Arc<CloudSource>, peer_tls: Arc<rustls::ClientConfig>, opts: PeerSourceOptions) -> PeerSource {
        PeerSource {
            cloud,
            tls: ClientTls::Fixed(peer_tls),
            download: RateLimit::new(opts.download_bytes_per_sec),
            opts,
            counters: Counters::default(),
            origins: Mutex::new(VecDeque::new()),
        }
    }

    /// A source with the node identity in `data_dir`, following
    /// certificate renewals.
    pub fn from_data_dir(cloud: Arc<CloudSource>, data_dir: &Path, opts: PeerSourceOptions) -> Result<PeerSource> {
        let tls = Reloading::new(data_dir, peer_client_tls)?;
        let mut s = PeerSource::new(cloud, tls.get(), opts);
        s.tls = ClientTls::Reloading(tls);
        Ok(s)
    }

    fn tls(&self) -> Arc<rustls::ClientConfig> {
        match &self.tls {
            ClientTls::Fixed(t) => t.clone(),
            ClientTls::Reloading(r) => r.get(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> PeerSourceStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerSourceStats {
            from_peers: l(&c.from_peers),
            from_cloud: l(&c.from_cloud),
            corrupt_from_peers: l(&c.corrupt),
            peer_failures: l(&c.peer_failures),
            reports_sent: l(&c.reports),
            cloud_busy: l(&c.cloud_busy),
        }
    }

    /// Where the last chunks came from, oldest first (at most 4096).
    pub fn origins(&self) -> Vec<(Digest, ChunkOrigin)> {
        self.origins.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    fn served(&self, d: &Digest, origin: ChunkOrigin) {
        let mut o = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        if o.len() == ORIGINS_KEPT {
            o.pop_front();
        }
        o.push_back((*d, origin));
    }

    /// The peers the tracker offers for `d` (none if it cannot be asked).
    pub async fn peers(&self, d: &Digest) -> Vec<PeerOffer> {
        match self.cloud.call("GET", &format!("/v1/p2p/peers/{d}"), None).await {
            Ok((200, body)) => match serde_json::from_slice::<PeersAnswer>(&body) {
                Ok(a) => a.peers,
                Err(e) => {
                    tracing::warn!(chunk = %d, error = %e, "tracker answer unreadable; no peers");
                    Vec::new()
                }
            },
            Ok((status, body)) => {
                tracing::debug!(chunk = %d, error = %http::error_message(status, &body), "tracker refused; no peers");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(chunk = %d, error = %e, "tracker unreachable; no peers");
                Vec::new()
            }
        }
    }

    async fn report(&self, peer: &str, d: &Digest, problem: &str) {
        let body = serde_json::json!({"peer": peer, "chunk": d.hex(), "problem": problem});
        let body = serde_json::to_vec(&body).unwrap_or_default();
        match self.cloud.call("POST", "/v1/p2p/report", Some(body)).await {
            Ok((200, _)) => {
                self.counters.reports.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, body)) => {
                tracing::warn!(%peer, chunk = %d, error = %http::error_message(status, &body), "p2p report refused")
            }
            Err(e) => tracing::warn!(%peer, chunk = %d, error = %e, "p2p report not sent"),
        }
    }

    /// Tries the offered peers in order; the first intact copy.
    async fn try_peers(&self, d: &Digest, offers: &[PeerOffer]) -> Option<Vec<u8>> {
        for p in offers.iter().take(self.opts.peers_per_chunk.max(1)) {
            match fetch_from_peer(self.tls(), p, d, &self.download, self.opts.peer_timeout).await {
                Ok(bytes) if sha256(&bytes) == *d => {
                    self.counters.from_peers.fetch_add(1, Ordering::Relaxed);
                    self.served(d, ChunkOrigin::Peer(p.node.clone()));
                    tracing::debug!(chunk = %d, peer = %p.node, "chunk from a peer");
                    return Some(bytes);
                }
                Ok(bytes) => {
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %d, peer = %p.node, actual = %sha256(&bytes), size = bytes.len(),
                        "a peer sent a corrupt chunk; reporting it and trying elsewhere");
                    self.report(&p.node, d, "corrupt").await;
                }
                Err(PeerFetchError::TooLarge) => {
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %d, peer = %p.node, "a peer sent more than a chunk; reporting it");
                    self.report(&p.node, d, "corrupt").await;
                }
                Err(PeerFetchError::NotFound | PeerFetchError::Busy(_)) => {
                    // Collected since its last announce, or serving others:
                    // not a fault, so not reported.
                    self.counters.peer_failures.fetch_add(1, Ordering::Relaxed);
                }
                Err(PeerFetchError::Failed(m)) => {
                    self.counters.peer_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %d, peer = %p.node, error = %m, "peer fetch failed; reporting it unreachable");
                    self.report(&p.node, d, "unreachable").await;
                }
            }
        }
        None
    }
}

/// `retryAfter=N` (seconds) in an API error's details.
fn retry_after(body: &[u8]) -> Option<Duration> {
    let e: yunbian_api::ApiErrorBody = serde_json::from_slice(body).ok()?;
    e.details.iter().find_map(|d| d.strip_prefix("retryAfter=")?.parse().ok()).map(Duration::from_secs)
}

#[async_trait::async_trait]
impl ArtifactSource for PeerSource {
    async fn artifact(&self, object: &str) -> Result<Artifact, SourceError> {
        self.cloud.artifact(object).await
    }

    async fn artifact_of_blob(&self, blob: &Digest) -> Result<Artifact, SourceError> {
        self.cloud.artifact_of_blob(blob).await
    }

    async fn chunk(&self, d: &Digest) -> Result<Vec<u8>, SourceError> {
        let offers = self.peers(d).await;
        if let Some(bytes) = self.try_peers(d, &offers).await {
            return Ok(bytes);
        }
        match self.cloud.call("GET", &format!("/v1/chunks/{d}"), None).await {
            Ok((200, body)) => {
                self.download.pace(body.len() as u64).await;
                self.counters.from_cloud.fetch_add(1, Ordering::Relaxed);
                self.served(d, ChunkOrigin::Cloud);
                Ok(body.to_vec())
            }
            Ok((404, _)) => Err(SourceError::NotFound),
            Ok((status @ (429 | 503), body)) => {
                // The site's cloud pulls are used up, or a peer of this
                // site is getting this chunk: the cache asks again later
                // (the tracker first) and fetches other chunks meanwhile.
                self.counters.cloud_busy.fetch_add(1, Ordering::Relaxed);
                let wait = retry_after(&body).unwrap_or(self.opts.cloud_busy_backoff);
                tracing::debug!(chunk = %d, ?wait, error = %http::error_message(status, &body), "cloud busy");
                Err(SourceError::Busy(wait))
            }
            Ok((status, body)) => Err(SourceError::Failed(http::error_message(status, &body))),
            Err(e) => Err(SourceError::Failed(e)),
        }
    }
}

// -------------------------------------------------------------- announcer

/// What a node in these groups announces as its site, the key of the
/// tracker's same-site preference and per-site limits: the smallest
/// non-empty `site` of its groups (a node is expected to be in at most one
/// group with a site); without one, `group:` and the smallest group name,
/// so that each group is limited on its own; `""` in no group.
pub fn site_of_groups<'a>(groups: impl IntoIterator<Item = &'a (String, NodeGroupSpec)>) -> String {
    let groups: Vec<&(String, NodeGroupSpec)> = groups.into_iter().collect();
    if let Some(site) = groups.iter().map(|(_, g)| g.site.as_str()).filter(|s| !s.is_empty()).min() {
        return site.to_string();
    }
    groups.iter().map(|(name, _)| name.as_str()).min().map(|n| format!("group:{n}")).unwrap_or_default()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AnnounceBody<'a> {
    addr: &'a str,
    site: &'a str,
    chunks: Vec<String>,
    removed: Vec<String>,
    full: bool,
}

/// The announcer task (see [`spawn_announcer`]).
pub struct Announcer {
    poke: Arc<Notify>,
    site: Arc<Mutex<String>>,
    announced: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Announcer {
    /// Announces now (after a pull or a collection).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Changes the site (the node's groups changed) and announces.
    pub fn set_site(&self, site: String) {
        let mut s = self.site.lock().unwrap_or_else(|e| e.into_inner());
        if *s != site {
            *s = site;
            drop(s);
            self.poke();
        }
    }

    /// Announces the tracker accepted so far.
    pub fn announced(&self) -> u64 {
        self.announced.load(Ordering::Relaxed)
    }

    /// Stops the task.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Announces the chunks of the cache in `data_dir` to the tracker every
/// `every` and on [`Announcer::poke`], as served at `addr` (`host:port`, or
/// `:port` for the address the cloud sees), at `site`.
pub fn spawn_announcer(
    cloud: Arc<CloudSource>,
    data_dir: &Path,
    addr: String,
    site: String,
    every: Duration,
) -> Announcer {
    let poke = Arc::new(Notify::new());
    let site = Arc::new(Mutex::new(site));
    let announced = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(LocalChunks::new(data_dir));
    let (p, s, a) = (poke.clone(), site.clone(), announced.clone());
    let task = tokio::spawn(async move {
        // What the tracker holds for us, if it holds our full set.
        let mut sent: Option<(String, HashSet<Digest>)> = None;
        let mut round = 0u64;
        loop {
            round += 1;
            let c = chunks.clone();
            let now: HashSet<Digest> = match tokio::task::spawn_blocking(move || {
                c.rescan();
                c.held()
            })
            .await
            {
                Ok(v) => v.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "scan the artifact cache for p2p");
                    HashSet::new()
                }
            };
            let site_now = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // The full set every FULL_EVERY rounds as well: a replica this
            // node left and came back to may hold an old set within its TTL.
            let mut full = round.is_multiple_of(FULL_EVERY) || !matches!(&sent, Some((st, _)) if *st == site_now);
            for _attempt in 0..2 {
                let hex = |it: &mut dyn Iterator<Item = &Digest>| it.map(Digest::hex).collect::<Vec<_>>();
                let body = match (&sent, full) {
                    (Some((_, old)), false) => AnnounceBody {
                        addr: &addr,
                        site: &site_now,
                        chunks: hex(&mut now.difference(old)),
                        removed: hex(&mut old.difference(&now)),
                        full: false,
                    },
                    _ => AnnounceBody {
                        addr: &addr,
                        site: &site_now,
                        chunks: hex(&mut now.iter()),
                        removed: vec![],
                        full: true,
                    },
                };
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                match cloud.call("POST", "/v1/p2p/announce", Some(bytes)).await {
                    Ok((200, _)) => {
                        sent = Some((site_now.clone(), now.clone()));
                        a.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(chunks = now.len(), full, "p2p chunks announced");
                        break;
                    }
                    Ok((409, _)) if !full => {
                        // This replica does not know us: the full set now.
                        full = true;
                    }
                    Ok((status, body)) => {
                        tracing::warn!(error = %http::error_message(status, &body), "p2p announce refused");
                        sent = None;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "p2p announce not sent");
                        sent = None;
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(every, p.notified()).await;
        }
    });
    Announcer { poke, site, announced, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_is_the_smallest_non_empty_one_else_the_group() {
        let g = |name: &str, site: &str| (name.to_string(), NodeGroupSpec { site: site.into(), ..Default::default() });
        assert_eq!(site_of_groups(&[g("x", ""), g("b", "plant-b"), g("a", "plant-a")]), "plant-a");
        assert_eq!(site_of_groups(&[g("line-2", ""), g("line-1", "")]), "group:line-1");
        assert_eq!(site_of_groups(&[]), "");
    }

    #[test]
    fn retry_after_is_read_from_the_error_details() {
        let body = br#"{"code":429,"message":"busy","details":["retryAfter=3"]}"#;
        assert_eq!(retry_after(body), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(br#"{"code":503,"message":"x"}"#), None);
        assert_eq!(retry_after(b"garbage"), None);
    }
}
