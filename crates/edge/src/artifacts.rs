//! Pulling artifacts to the edge and keeping them in a size-capped cache
//! (docs/design/012-artifacts.md, "Edge pulling"). The agent's launcher
//! (`crate::launcher`) resolves and pulls what its instances run.
//!
//! # Pull
//!
//! `ensure(name, version)` reads the Artifact object from an
//! [`ArtifactSource`] (the cloud over mTLS: [`CloudSource`]), picks the
//! blob for this node's platform (`linux/amd64` or `linux/arm64` from the
//! CPU, else the `wasi/wasm32` blob), then:
//!
//! 1. every chunk not already on disk and intact is fetched, checked
//!    against its digest as it arrives (a bad chunk is dropped and fetched
//!    again, up to [`CacheOptions::chunk_tries`] times), and written
//!    atomically; chunks already on disk from an interrupted pull are
//!    re-checked and kept, so a pull resumes across agent restarts;
//! 2. the chunks are assembled into the blob file, checked against the
//!    blob's sha256 and size, and renamed into place; the chunk files are
//!    then removed;
//! 3. a `bundle` (tar.gz) is unpacked into a staging directory and renamed
//!    into place; an entry with an absolute path or `..`, or a link
//!    pointing out, refuses the whole bundle. Executables get mode 0755.
//!
//! Progress (bytes present / bytes of the blob) is published in a
//! [`PullProgress`] the caller can read while the pull runs.
//!
//! # On-disk layout
//!
//! ```text
//! <data>/artifacts/chunks/<sha256>        verified chunks of blobs being pulled
//! <data>/artifacts/blobs/<sha256>         assembled, verified blobs (mtime = last use)
//! <data>/artifacts/unpacked/<sha256>/     unpacked bundles
//! <data>/artifacts/tmp/                   partial files and staging; emptied on open
//! ```
//!
//! A file under `chunks/`, `blobs/` or `unpacked/` is complete: everything
//! is written under `tmp/` (or as `*.partial`) and renamed.
//!
//! # Cache
//!
//! The blobs and unpacked bundles together are kept under
//! [`CacheOptions::limit`] bytes. After each pull, and on
//! [`ArtifactCache::collect`], the least recently used blobs (by the blob
//! file's modification time, renewed by every `ensure`) are removed first;
//! blobs marked in use ([`ArtifactCache::mark_in_use`]) and the blob just
//! pulled are never removed.
//!
//! One pull (or collection) runs at a time per cache; callers may start
//! several, they queue. Pulls in parallel can come with P2P and bandwidth
//! limits.
//!
//! Chunks from peers inside a node group: `crate::p2p::PeerSource`, an
//! [`ArtifactSource`] that asks the cloud's tracker first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use yunbian_api::artifact::WASM_PLATFORM;
use yunbian_api::{artifact_object_name, Artifact, ArtifactBlob, ArtifactRef, BlobType};
use yunbian_artifacts::{sha256, BlobManifest, ChunkRef, Digest};

use crate::http;

/// Default cap of the cache: 2 GiB.
pub const DEFAULT_CACHE_LIMIT: u64 = 2 << 30;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The source has no such artifact.
    #[error("artifact {name} version {version} not found")]
    NotFound {
        /// Artifact name.
        name: String,
        /// Version.
        version: String,
    },
    /// The artifact has neither this node's platform nor a wasm blob.
    #[error(
        "artifact {name} version {version} has no blob for {platform} nor a {WASM_PLATFORM} one (it has: {available})"
    )]
    NoBlob {
        /// Artifact name.
        name: String,
        /// Version.
        version: String,
        /// This node's platform.
        platform: String,
        /// The platforms it has, comma-separated.
        available: String,
    },
    /// The Artifact object cannot be used (bad digest, inconsistent sizes).
    #[error("artifact {name}: {message}")]
    Manifest {
        /// Artifact name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The source could not be reached or answered with an error.
    #[error("fetch {what}: {message}")]
    Source {
        /// What was fetched (`chunk <sha256>`, `artifact hello--1-0`).
        what: String,
        /// Why it failed.
        message: String,
    },
    /// A chunk kept arriving with the wrong digest.
    #[error("chunk {digest} arrived corrupt {tries} times (last: sha256 {actual}, {size} bytes); giving up")]
    CorruptChunk {
        /// The digest it should have.
        digest: Digest,
        /// How many times it was fetched.
        tries: u32,
        /// The digest of the last bytes received.
        actual: Digest,
        /// Their length.
        size: usize,
    },
    /// The assembled blob is not the one the artifact names.
    #[error("blob {expected} assembled from verified chunks has sha256 {actual} and {size} bytes (expected {expected_size}): the artifact's chunk list does not match its blob")]
    BlobMismatch {
        /// The blob's sha256 in the artifact.
        expected: Digest,
        /// What the chunks add up to.
        actual: Digest,
        /// The size of the assembled bytes.
        size: u64,
        /// The blob's size in the artifact.
        expected_size: u64,
    },
    /// No artifact carries a blob with this digest.
    #[error("no artifact has a blob with sha256 {0}")]
    NoSuchBlob(String),
    /// The reference pins a digest and this node's blob has another one.
    #[error("artifact {name} version {version}: the {platform} blob has sha256 {actual}, the App pins {pinned}")]
    Pinned {
        /// Artifact name.
        name: String,
        /// Version.
        version: String,
        /// The blob's platform.
        platform: String,
        /// The blob's digest.
        actual: String,
        /// The App's digest.
        pinned: String,
    },
    /// A bundle holds an entry that would land outside its directory.
    #[error("bundle {blob}: entry {entry:?} {reason}; refusing the bundle")]
    UnsafeEntry {
        /// The bundle's sha256.
        blob: Digest,
        /// The entry's path.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A bundle is not a valid tar.gz.
    #[error("bundle {blob}: {message}")]
    Bundle {
        /// The bundle's sha256.
        blob: Digest,
        /// What failed.
        message: String,
    },
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PullError {
    let path = path.display().to_string();
    move |source| PullError::Io { op, path, source }
}

/// What a source can fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// The thing does not exist there.
    NotFound,
    /// Anything else (network, TLS, HTTP error), with the message.
    Failed(String),
    /// Not now: ask again after this long (the cloud's per-site pulls are
    /// used up, or the chunk is on its way to a peer of this site). The
    /// cache fetches other chunks meanwhile.
    Busy(Duration),
}

impl SourceError {
    fn message(self) -> String {
        match self {
            SourceError::NotFound => "not found at the source".into(),
            SourceError::Failed(m) => m,
            SourceError::Busy(wait) => format!("the source is busy; retry in {wait:?}"),
        }
    }
}

/// Where artifacts and chunks come from: the cloud today, peers later, a
/// fake in tests.
#[async_trait::async_trait]
pub trait ArtifactSource: Send + Sync {
    /// The Artifact object named `object` (`hello--1-2-0`).
    async fn artifact(&self, object: &str) -> Result<Artifact, SourceError>;
    /// The Artifact object that carries a blob with this sha256.
    async fn artifact_of_blob(&self, blob: &Digest) -> Result<Artifact, SourceError>;
    /// The bytes of a chunk (not trusted: the caller checks them).
    async fn chunk(&self, digest: &Digest) -> Result<Vec<u8>, SourceError>;
}

/// The cloud, over mTLS with the node's certificate; each URL is tried in
/// turn (replicas of one cloud).
pub struct CloudSource {
    urls: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    /// With a data directory: the identity is read again when its
    /// certificate file changes (a renewal), keyed by its modification time.
    reload: Option<(PathBuf, Mutex<Option<LoadedIdentity>>)>,
}

/// The certificate's modification time, the cloud URLs and the TLS
/// configuration read from a data directory.
type LoadedIdentity = (SystemTime, Vec<String>, Arc<rustls::ClientConfig>);

impl CloudSource {
    /// A source for the node's cloud URLs and mTLS configuration.
    pub fn new(urls: Vec<String>, tls: Arc<rustls::ClientConfig>) -> CloudSource {
        CloudSource { urls, tls, reload: None }
    }

    /// From a node identity.
    pub fn from_identity(identity: &crate::Identity) -> anyhow::Result<CloudSource> {
        Ok(CloudSource::new(identity.config.urls(), identity.tls()?))
    }

    /// From the node identity in `data_dir`, following certificate
    /// renewals and cloud URL changes.
    pub fn from_data_dir(data_dir: &Path) -> anyhow::Result<CloudSource> {
        let id = crate::Identity::read(data_dir)?;
        let mut s = CloudSource::from_identity(&id)?;
        s.reload = Some((data_dir.to_path_buf(), Mutex::new(None)));
        Ok(s)
    }

    /// The URLs and TLS configuration to use now.
    fn current(&self) -> (Vec<String>, Arc<rustls::ClientConfig>) {
        let Some((dir, cached)) = &self.reload else { return (self.urls.clone(), self.tls.clone()) };
        let stamp = std::fs::metadata(dir.join("node.crt")).and_then(|m| m.modified()).ok();
        let mut c = cached.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(t), Some((at, urls, tls))) = (stamp, c.as_ref()) {
            if *at == t {
                return (urls.clone(), tls.clone());
            }
        }
        match crate::Identity::read(dir).and_then(|id| Ok((id.config.urls(), id.tls()?))) {
            Ok((urls, tls)) => {
                if let Some(t) = stamp {
                    *c = Some((t, urls.clone(), tls.clone()));
                }
                (urls, tls)
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-read the node identity for artifact pulls; using the previous one");
                c.as_ref().map(|(_, u, t)| (u.clone(), t.clone())).unwrap_or((self.urls.clone(), self.tls.clone()))
            }
        }
    }

    /// Sends one request to the cloud with the node's certificate, each
    /// URL in turn until one answers; returns the first HTTP answer
    /// (whatever its status), or why none came. For callers that need the
    /// status itself (the P2P tracker routes, a 429 from a busy cloud).
    pub async fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, bytes::Bytes), String> {
        let mut last = "no cloud URL configured".to_string();
        let (urls, tls) = self.current();
        for url in &urls {
            match http::request(url, tls.clone(), method, path, body.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        let mut last = SourceError::Failed("no cloud URL configured".into());
        let (urls, tls) = self.current();
        for url in &urls {
            match http::request(url, tls.clone(), "GET", path, None).await {
                Ok((200, body)) => return Ok(body.to_vec()),
                Ok((404, _)) => return Err(SourceError::NotFound),
                Ok((status, body)) => last = SourceError::Failed(http::error_message(status, &body)),
                Err(e) => last = SourceError::Failed(e),
            }
        }
        Err(last)
    }
}

#[async_trait::async_trait]
impl ArtifactSource for CloudSource {
    async fn artifact(&self, object: &str) -> Result<Artifact, SourceError> {
        let body = self.get(&format!("/v1/artifacts/{object}")).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| SourceError::Failed(format!("artifact {object}: {e}")))?;
        Artifact::from_value(v).map_err(|e| SourceError::Failed(format!("artifact {object}: {e}")))
    }

    async fn artifact_of_blob(&self, blob: &Digest) -> Result<Artifact, SourceError> {
        let body = self.get(&format!("/v1/blobs/{blob}/artifact")).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| SourceError::Failed(format!("artifact of blob {blob}: {e}")))?;
        Artifact::from_value(v).map_err(|e| SourceError::Failed(format!("artifact of blob {blob}: {e}")))
    }

    async fn chunk(&self, digest: &Digest) -> Result<Vec<u8>, SourceError> {
        self.get(&format!("/v1/chunks/{digest}")).await
    }
}

/// An artifact reference resolved to this node's blob.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The Artifact object (with the blob's signatures).
    pub artifact: Artifact,
    /// The platform of the chosen blob.
    pub platform: String,
    /// The chosen blob.
    pub blob: ArtifactBlob,
    /// Whether the object came from the local copy because the source
    /// could not be reached.
    pub offline: bool,
}

impl Resolved {
    /// `name version`, for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.artifact.spec.name, self.artifact.spec.version)
    }
}

/// Bytes of a pull: done (present and verified) and total (the blob's
/// size). Shared with whoever shows `Pulling 37 %`.
#[derive(Debug, Default)]
pub struct PullProgress {
    done: AtomicU64,
    total: AtomicU64,
}

impl PullProgress {
    /// Bytes present and verified.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes of the blob (0 until the artifact is read).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Whole percent done (100 for an empty blob once known).
    pub fn percent(&self) -> u8 {
        let (d, t) = (self.done(), self.total());
        if t == 0 {
            return if d == 0 { 0 } else { 100 };
        }
        (d.min(t) * 100 / t) as u8
    }
}

/// A blob present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlob {
    /// The platform whose blob this is.
    pub platform: String,
    /// What it is.
    pub kind: BlobType,
    /// Its sha256.
    pub sha256: Digest,
    /// Its size.
    pub size: u64,
    /// The blob file (mode 0755 for executables).
    pub path: PathBuf,
    /// Where a bundle is unpacked.
    pub unpacked: Option<PathBuf>,
}

/// What [`ArtifactCache::import_file`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Artifact name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Platforms of its blobs.
    pub platforms: Vec<String>,
    /// Chunks in the file.
    pub chunks: usize,
    /// Chunks the cache did not have yet.
    pub stored: usize,
}

/// Settings of the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Cap of blobs plus unpacked bundles, in bytes.
    pub limit: u64,
    /// Fetches of one chunk before giving up.
    pub chunk_tries: u32,
    /// Pause before fetching a chunk again (multiplied by the attempt).
    pub retry_delay: Duration,
    /// The platform to pull for; `None`: this machine's.
    pub platform: Option<String>,
    /// How long a pull may go without getting a chunk while its source
    /// answers busy ([`SourceError::Busy`]) before it fails.
    pub busy_max_wait: Duration,
}

/// Chunks tried after a busy answer before a pull pauses.
const BUSY_SKIP_AHEAD: usize = 4;

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            limit: DEFAULT_CACHE_LIMIT,
            chunk_tries: 3,
            retry_delay: Duration::from_millis(500),
            platform: None,
            busy_max_wait: Duration::from_secs(600),
        }
    }
}

/// This machine's platform: `linux/amd64`, `linux/arm64`, or `None`.
pub fn host_platform() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("linux/amd64"),
        "aarch64" => Some("linux/arm64"),
        _ => None,
    }
}

/// The edge's artifact cache and puller.
pub struct ArtifactCache {
    root: PathBuf,
    source: Arc<dyn ArtifactSource>,
    opts: CacheOptions,
    in_use: Mutex<HashMap<Digest, usize>>,
    /// Where this agent starts in a blob's chunk list (random per start).
    chunk_offset: usize,
    /// One pull or collection at a time: two pulls sharing a chunk, or a
    /// collection during a pull, never see each other's half-done files.
    busy: tokio::sync::Mutex<()>,
}

impl ArtifactCache {
    /// Opens (creating) `<data_dir>/artifacts` and empties its `tmp/`.
    pub fn open(
        data_dir: &Path,
        source: Arc<dyn ArtifactSource>,
        opts: CacheOptions,
    ) -> Result<ArtifactCache, PullError> {
        let tmp = data_dir.join("artifacts").join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("empty", &tmp))?;
        }
        Self::attach(data_dir, source, opts)
    }

    /// Opens the cache beside a running agent (`yunbian edge import`):
    /// like [`open`](Self::open) but leaves `tmp/` alone, where the agent
    /// may be assembling a blob.
    pub fn attach(
        data_dir: &Path,
        source: Arc<dyn ArtifactSource>,
        opts: CacheOptions,
    ) -> Result<ArtifactCache, PullError> {
        let root = data_dir.join("artifacts");
        for d in ["chunks", "blobs", "unpacked", "refs", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        // Not a security property: any varying number spreads the start.
        let chunk_offset = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize ^ std::process::id() as usize);
        Ok(ArtifactCache {
            root,
            source,
            opts,
            in_use: Mutex::new(HashMap::new()),
            chunk_offset,
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// `<data>/artifacts`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.root.join("chunks").join(d.hex())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.hex())
    }

    fn unpacked_path(&self, d: &Digest) -> PathBuf {
        self.root.join("unpacked").join(d.hex())
    }

    /// Protects a blob from collection (counted: as many
    /// [`unmark_in_use`](Self::unmark_in_use) as marks).
    pub fn mark_in_use(&self, d: &Digest) {
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()).entry(*d).or_default() += 1;
    }

    /// Drops one mark of [`mark_in_use`](Self::mark_in_use).
    pub fn unmark_in_use(&self, d: &Digest) {
        let mut m = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                m.remove(d);
            }
        }
    }

    fn is_in_use(&self, d: &Digest) -> bool {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).contains_key(d)
    }

    /// [`ensure_with`](Self::ensure_with) without watching progress.
    pub async fn ensure(&self, name: &str, version: &str) -> Result<LocalBlob, PullError> {
        self.ensure_with(name, version, &PullProgress::default()).await
    }

    /// Makes this node's blob of `name` `version` present (pulling what is
    /// missing) and returns where it is; renews its last use.
    pub async fn ensure_with(
        &self,
        name: &str,
        version: &str,
        progress: &PullProgress,
    ) -> Result<LocalBlob, PullError> {
        let r = ArtifactRef { name: name.into(), version: version.into(), digest: String::new() };
        let resolved = self.resolve(&r).await?;
        self.pull(&resolved, progress).await
    }

    fn ref_path(&self, r: &ArtifactRef) -> PathBuf {
        let key = match (r.name.is_empty(), r.digest_hex()) {
            (false, _) => artifact_object_name(&r.name, &r.version),
            (true, Some(d)) => format!("sha256-{d}"),
            (true, None) => "none".into(),
        };
        self.root.join("refs").join(format!("{key}.json"))
    }

    /// Reads the artifact a reference names from the source and picks this
    /// node's blob (the pinned one for a digest). The object is kept under
    /// `refs/`, so a node that cannot reach the source (an offline site, an
    /// agent restarted during an outage) resolves from its last copy.
    pub async fn resolve(&self, r: &ArtifactRef) -> Result<Resolved, PullError> {
        self.resolve_for(r, None).await
    }

    /// [`resolve`](Self::resolve), taking the blob of `platform` when given
    /// (`wasi/wasm32` for the wasm runtime) instead of this node's platform
    /// with the wasm blob as fallback. A digest alone must name a blob this
    /// node can run.
    pub async fn resolve_for(&self, r: &ArtifactRef, platform: Option<&str>) -> Result<Resolved, PullError> {
        let shown = r.to_string();
        let pinned = match r.digest_hex() {
            Some(d) => Some(
                d.parse::<Digest>().map_err(|e| PullError::Manifest { name: shown.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        let fetched = match (r.name.is_empty(), pinned) {
            (false, _) => self.source.artifact(&artifact_object_name(&r.name, &r.version)).await,
            (true, Some(d)) => self.source.artifact_of_blob(&d).await,
            (true, None) => {
                return Err(PullError::Manifest { name: shown, message: "the reference names nothing".into() })
            }
        };
        let local = self.ref_path(r);
        let (artifact, offline) = match fetched {
            Ok(a) => {
                let bytes = serde_json::to_vec(&a).map_err(|e| PullError::Io {
                    op: "encode",
                    path: local.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
                let (tmp, out) = (self.root.join("tmp").join(format!("ref-{}.partial", sha256(&bytes))), local.clone());
                blocking(move || write_atomic(&tmp, &out, &bytes, 0o644)).await?;
                (a, false)
            }
            Err(SourceError::NotFound) => {
                // The cloud says it is gone: forget the local copy too.
                let _ = std::fs::remove_file(&local);
                return Err(match pinned {
                    Some(d) if r.name.is_empty() => PullError::NoSuchBlob(d.to_string()),
                    _ => PullError::NotFound { name: r.name.clone(), version: r.version.clone() },
                });
            }
            Err(e @ (SourceError::Failed(_) | SourceError::Busy(_))) => {
                let message = e.message();
                let copy = std::fs::read(&local)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| Artifact::from_value(v).ok());
                match copy {
                    Some(a) => {
                        tracing::info!(artifact = %shown, error = %message, "source unreachable; using the local copy of the artifact");
                        (a, true)
                    }
                    None => return Err(PullError::Source { what: format!("artifact {shown}"), message }),
                }
            }
        };
        let (name, version) = (artifact.spec.name.clone(), artifact.spec.version.clone());
        let host = self.opts.platform.as_deref().or(host_platform()).unwrap_or("unknown");
        let runnable: Vec<&str> = match platform {
            Some(p) => vec![p],
            None => vec![host, WASM_PLATFORM],
        };
        let (platform, blob) = match pinned {
            Some(d) if r.name.is_empty() => {
                let with_digest: Vec<(&String, &ArtifactBlob)> =
                    artifact.spec.blobs.iter().filter(|(_, b)| b.sha256 == d.hex()).collect();
                if with_digest.is_empty() {
                    return Err(PullError::NoSuchBlob(d.to_string()));
                }
                // The first platform this node runs, in its order of preference.
                runnable
                    .iter()
                    .find_map(|p| with_digest.iter().find(|(k, _)| k.as_str() == *p))
                    .map(|(p, b)| ((*p).clone(), (*b).clone()))
                    .ok_or_else(|| PullError::NoBlob {
                        name: name.clone(),
                        version: version.clone(),
                        platform: runnable.join(" or "),
                        available: with_digest.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(", "),
                    })?
            }
            _ => {
                let found = match platform {
                    Some(p) => artifact.spec.blobs.get_key_value(p).map(|(k, v)| (k.as_str(), v)),
                    None => pick_blob(&artifact.spec.blobs, host),
                };
                let (p, b) = found.ok_or_else(|| PullError::NoBlob {
                    name: name.clone(),
                    version: version.clone(),
                    platform: platform.unwrap_or(host).into(),
                    available: artifact.spec.blobs.keys().cloned().collect::<Vec<_>>().join(", "),
                })?;
                if let Some(d) = pinned {
                    if b.sha256 != d.hex() {
                        return Err(PullError::Pinned {
                            name,
                            version,
                            platform: p.into(),
                            actual: b.sha256.clone(),
                            pinned: d.hex(),
                        });
                    }
                }
                (p.to_string(), b.clone())
            }
        };
        Ok(Resolved { artifact, platform, blob, offline })
    }

    /// Loads an export file (`yunbian artifact export`) into the cache, for
    /// a site the registry cannot reach or reaches only slowly: every chunk
    /// is checked against its digest and stored, and the artifact object
    /// becomes the local copy [`resolve`](Self::resolve) falls back to. A
    /// later pull of the artifact then fetches no chunk. A damaged file
    /// stores nothing after the damage and refuses with the reason.
    pub async fn import_file(&self, path: &Path) -> Result<ImportSummary, PullError> {
        let _busy = self.busy.lock().await;
        let bad = |message: String| PullError::Manifest { name: path.display().to_string(), message };
        let f = std::io::BufReader::new(std::fs::File::open(path).map_err(io("open", path))?);
        let (mut reader, header) = yunbian_artifacts::export::ExportReader::open(f).map_err(bad)?;
        let spec: yunbian_api::ArtifactSpec =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        yunbian_api::artifact::check_artifact_name(&spec.name).map_err(|e| bad(format!("name: {e}")))?;
        yunbian_api::artifact::check_version(&spec.version).map_err(|e| bad(format!("version: {e}")))?;
        for (platform, blob) in &spec.blobs {
            manifest_of(&format!("{} ({platform})", spec.name), blob)?;
        }
        reader.expect_chunks(spec.blobs.values().flat_map(|b| b.chunks.iter().map(|c| c.digest.clone())));
        let chunks = reader.remaining();
        let mut stored = 0;
        while let Some((digest, bytes)) = reader.next_chunk().map_err(bad)? {
            let d: Digest = digest.parse().map_err(|e: yunbian_artifacts::DigestParseError| bad(e.to_string()))?;
            let out = self.chunk_path(&d);
            if out.exists() {
                continue;
            }
            let tmp = self.root.join("tmp").join(format!("{d}.partial"));
            blocking(move || write_atomic(&tmp, &out, &bytes, 0o644)).await?;
            stored += 1;
        }
        let object = artifact_object_name(&spec.name, &spec.version);
        let (name, version) = (spec.name.clone(), spec.version.clone());
        let platforms = spec.blobs.keys().cloned().collect();
        let artifact: Artifact = yunbian_api::Object::new(&object, spec);
        let bytes = serde_json::to_vec(&artifact).map_err(|e| bad(e.to_string()))?;
        let r = ArtifactRef { name: name.clone(), version: version.clone(), digest: String::new() };
        let (tmp, out) = (self.root.join("tmp").join(format!("ref-{object}.partial")), self.ref_path(&r));
        blocking(move || write_atomic(&tmp, &out, &bytes, 0o644)).await?;
        Ok(ImportSummary { name, version, platforms, chunks, stored })
    }

    /// Makes a resolved blob present (pulling what is missing) and returns
    /// where it is; renews its last use.
    pub async fn pull(&self, r: &Resolved, progress: &PullProgress) -> Result<LocalBlob, PullError> {
        let manifest = manifest_of(&r.artifact.spec.name, &r.blob)?;
        progress.total.store(manifest.size, Ordering::Relaxed);
        let _busy = self.busy.lock().await;
        let local = self.pull_blob(&manifest, r.blob.kind, progress).await?;
        // Protect what was just pulled while collecting for it.
        self.mark_in_use(&manifest.sha256);
        let collected = self.collect_locked();
        self.unmark_in_use(&manifest.sha256);
        if let Err(e) = collected {
            tracing::warn!(error = %e, "artifact cache collection failed");
        }
        Ok(LocalBlob { platform: r.platform.clone(), ..local })
    }

    async fn pull_blob(
        &self,
        m: &BlobManifest,
        kind: BlobType,
        progress: &PullProgress,
    ) -> Result<LocalBlob, PullError> {
        let path = self.blob_path(&m.sha256);
        let unpacked = matches!(kind, BlobType::Bundle | BlobType::Oci).then(|| self.unpacked_path(&m.sha256));
        let present = std::fs::metadata(&path).is_ok_and(|md| md.len() == m.size);
        if !present {
            // Each agent starts at its own offset, so nodes pulling the
            // same blob together fetch different chunks first and can
            // trade them (docs/design/015). A chunk the source cannot give
            // now goes to the back of the queue; after a few busy answers
            // in a row the pull pauses for the shortest wait asked.
            let n = m.chunks.len().max(1);
            let mut queue: VecDeque<&ChunkRef> =
                (0..m.chunks.len()).map(|i| &m.chunks[(i + self.chunk_offset) % n]).collect();
            let (mut streak, mut pause, mut progressed) = (0usize, Duration::MAX, Instant::now());
            while let Some(c) = queue.pop_front() {
                match self.ensure_chunk(c).await? {
                    None => {
                        progress.done.fetch_add(c.size, Ordering::Relaxed);
                        (streak, pause, progressed) = (0, Duration::MAX, Instant::now());
                    }
                    Some(wait) => {
                        if progressed.elapsed() >= self.opts.busy_max_wait {
                            return Err(PullError::Source {
                                what: format!("chunk {}", c.digest),
                                message: format!(
                                    "the source stayed busy for {:?} (last: retry in {wait:?})",
                                    self.opts.busy_max_wait
                                ),
                            });
                        }
                        queue.push_back(c);
                        streak += 1;
                        pause = pause.min(wait);
                        if streak >= queue.len().min(BUSY_SKIP_AHEAD) {
                            tokio::time::sleep(pause).await;
                            (streak, pause) = (0, Duration::MAX);
                        }
                    }
                }
            }
            let (chunks, tmp, out, m2) = (
                m.chunks.iter().map(|c| self.chunk_path(&c.digest)).collect::<Vec<_>>(),
                self.root.join("tmp"),
                path.clone(),
                m.clone(),
            );
            blocking(move || assemble(&chunks, &m2, &tmp, &out, kind)).await?;
            for c in &m.chunks {
                let _ = std::fs::remove_file(self.chunk_path(&c.digest));
            }
        }
        progress.done.store(m.size, Ordering::Relaxed);
        if let Some(dir) = &unpacked {
            if !dir.is_dir() {
                let (blob, tmp, dir, d) = (path.clone(), self.root.join("tmp"), dir.clone(), m.sha256);
                blocking(move || unpack_bundle(&blob, d, &tmp, &dir)).await?;
            }
        }
        // Last use, for the LRU order.
        // Read-only: a write handle on a running executable would make a
        // concurrent exec of it fail with ETXTBSY.
        let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
        Ok(LocalBlob { platform: String::new(), kind, sha256: m.sha256, size: m.size, path, unpacked })
    }

    /// A chunk on disk and intact: kept if already there, else fetched and
    /// checked (up to `chunk_tries` times). `Some(wait)`: the source is
    /// busy for it; ask again after `wait`.
    async fn ensure_chunk(&self, c: &ChunkRef) -> Result<Option<Duration>, PullError> {
        let path = self.chunk_path(&c.digest);
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.len() as u64 == c.size && sha256(&bytes) == c.digest {
                return Ok(None);
            }
            tracing::warn!(chunk = %c.digest, "a stored chunk failed its check; fetching it again");
            let _ = std::fs::remove_file(&path);
        }
        let tries = self.opts.chunk_tries.max(1);
        let mut last = None;
        for attempt in 1..=tries {
            if attempt > 1 {
                tokio::time::sleep(self.opts.retry_delay * (attempt - 1)).await;
            }
            match self.source.chunk(&c.digest).await {
                Ok(bytes) => {
                    let actual = sha256(&bytes);
                    if actual == c.digest && bytes.len() as u64 == c.size {
                        let tmp = self.root.join("tmp").join(format!("{}.partial", c.digest));
                        let out = path.clone();
                        return blocking(move || write_atomic(&tmp, &out, &bytes, 0o644)).await.map(|()| None);
                    }
                    tracing::warn!(chunk = %c.digest, %actual, attempt, "chunk arrived corrupt; discarded");
                    last =
                        Some(PullError::CorruptChunk { digest: c.digest, tries: attempt, actual, size: bytes.len() });
                }
                Err(SourceError::NotFound) => {
                    last = Some(PullError::Source {
                        what: format!("chunk {}", c.digest),
                        message: "not found at the source".into(),
                    })
                }
                Err(SourceError::Busy(wait)) => return Ok(Some(wait)),
                Err(SourceError::Failed(message)) => {
                    tracing::warn!(chunk = %c.digest, error = %message, attempt, "chunk fetch failed");
                    last = Some(PullError::Source { what: format!("chunk {}", c.digest), message })
                }
            }
        }
        Err(last
            .unwrap_or_else(|| PullError::Source { what: format!("chunk {}", c.digest), message: "no attempt".into() }))
    }

    /// Removes least recently used blobs (and their unpacked bundles) not
    /// in use until the cache fits its limit. Returns the removed digests,
    /// oldest first.
    pub async fn collect(&self) -> Result<Vec<Digest>, PullError> {
        let _busy = self.busy.lock().await;
        self.collect_locked()
    }

    fn collect_locked(&self) -> Result<Vec<Digest>, PullError> {
        let blobs = self.root.join("blobs");
        let mut entries = Vec::new();
        let mut total = 0u64;
        for e in std::fs::read_dir(&blobs).map_err(io("list", &blobs))? {
            let e = e.map_err(io("list", &blobs))?;
            let Some(d) = e.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
            let md = e.metadata().map_err(io("stat", &e.path()))?;
            let size = md.len() + dir_size(&self.unpacked_path(&d));
            let used = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            total += size;
            entries.push((used, d, size));
        }
        entries.sort();
        let mut removed = Vec::new();
        for (_, d, size) in entries {
            if total <= self.opts.limit {
                break;
            }
            if self.is_in_use(&d) {
                continue;
            }
            let unpacked = self.unpacked_path(&d);
            if unpacked.exists() {
                std::fs::remove_dir_all(&unpacked).map_err(io("remove", &unpacked))?;
            }
            let p = self.blob_path(&d);
            std::fs::remove_file(&p).map_err(io("remove", &p))?;
            tracing::info!(blob = %d, bytes = size, "artifact blob collected from the cache");
            total -= size;
            removed.push(d);
        }
        Ok(removed)
    }
}

/// This platform's blob, else the wasm one.
fn pick_blob<'a>(blobs: &'a BTreeMap<String, ArtifactBlob>, platform: &str) -> Option<(&'a str, &'a ArtifactBlob)> {
    blobs.get_key_value(platform).or_else(|| blobs.get_key_value(WASM_PLATFORM)).map(|(k, v)| (k.as_str(), v))
}

/// The blob's chunk list as a checked manifest
/// ([`BlobManifest::from_entries`]: digests parse, sizes fit the fixed
/// chunking), before any chunk of it is fetched or stored.
fn manifest_of(name: &str, blob: &ArtifactBlob) -> Result<BlobManifest, PullError> {
    BlobManifest::from_entries(blob.size, &blob.sha256, blob.chunks.iter().map(|c| (c.digest.as_str(), c.size)))
        .map_err(|e| PullError::Manifest { name: name.into(), message: e.to_string() })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| PullError::Io {
        op: "run",
        path: "blocking task".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PullError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}

/// Writes `bytes` to `tmp`, fsyncs, sets `mode` and renames to `out`.
fn write_atomic(tmp: &Path, out: &Path, bytes: &[u8], mode: u32) -> Result<(), PullError> {
    let mut f = std::fs::File::create(tmp).map_err(io("create", tmp))?;
    f.write_all(bytes).map_err(io("write", tmp))?;
    f.sync_all().map_err(io("sync", tmp))?;
    drop(f);
    set_mode(tmp, mode)?;
    std::fs::rename(tmp, out).map_err(io("rename", tmp))
}

/// Concatenates the chunk files into `out` through a temporary file in
/// `tmp_dir`, checking the whole blob's sha256 and size before the rename;
/// an executable gets mode 0755.
fn assemble(chunks: &[PathBuf], m: &BlobManifest, tmp_dir: &Path, out: &Path, kind: BlobType) -> Result<(), PullError> {
    let tmp = tmp_dir.join(format!("{}.partial", m.sha256));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        for c in chunks {
            let mut r = std::fs::File::open(c).map_err(io("open", c))?;
            loop {
                let n = r.read(&mut buf).map_err(io("read", c))?;
                if n == 0 {
                    break;
                }
                whole.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(io("write", &tmp))?;
                size += n as u64;
            }
        }
        let mut actual = [0u8; 32];
        actual.copy_from_slice(whole.finish().as_ref());
        let actual = Digest(actual);
        if actual != m.sha256 || size != m.size {
            return Err(PullError::BlobMismatch { expected: m.sha256, actual, size, expected_size: m.size });
        }
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        set_mode(&tmp, if kind == BlobType::Executable { 0o755 } else { 0o644 })?;
        std::fs::rename(&tmp, out).map_err(io("rename", &tmp))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Why an entry path is refused, if it is.
fn unsafe_path(p: &Path) -> Option<&'static str> {
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return Some("has an absolute path"),
            Component::ParentDir => return Some("contains `..`"),
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    None
}

/// Unpacks the tar or tar.gz `blob` (a bundle, an OCI image layout) into a staging directory under `tmp_dir`,
/// then renames it to `out`. Any unsafe entry refuses the whole bundle.
fn unpack_bundle(blob: &Path, d: Digest, tmp_dir: &Path, out: &Path) -> Result<(), PullError> {
    let staging = tmp_dir.join(format!("{d}.unpack"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    let result = unpack_into(blob, d, &staging);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    set_mode(&staging, 0o755)?;
    std::fs::rename(&staging, out).map_err(io("rename", &staging))
}

fn unpack_into(blob: &Path, d: Digest, staging: &Path) -> Result<(), PullError> {
    let bundle_err = |e: std::io::Error| PullError::Bundle { blob: d, message: e.to_string() };
    let mut file = std::fs::File::open(blob).map_err(io("open", blob))?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let file = std::fs::File::open(blob).map_err(io("open", blob))?;
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(bundle_err)? {
        let mut entry = entry.map_err(bundle_err)?;
        let path = entry.path().map_err(bundle_err)?.into_owned();
        let shown = path.display().to_string();
        if let Some(reason) = unsafe_path(&path) {
            return Err(PullError::UnsafeEntry { blob: d, entry: shown, reason });
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(bundle_err)?.map(|t| t.into_owned()).unwrap_or_default();
            if let Some(reason) = unsafe_path(&target) {
                return Err(PullError::UnsafeEntry {
                    blob: d,
                    entry: format!("{shown} -> {}", target.display()),
                    reason: if reason.starts_with("has") { "links to an absolute path" } else { "links through `..`" },
                });
            }
        } else if !(kind.is_file()
            || kind.is_dir()
            || kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink())
        {
            return Err(PullError::UnsafeEntry { blob: d, entry: shown, reason: "is not a file, directory or link" });
        }
        let mode = entry.header().mode().unwrap_or(0o644);
        if !entry.unpack_in(staging).map_err(bundle_err)? {
            return Err(PullError::UnsafeEntry { blob: d, entry: shown, reason: "would land outside the bundle" });
        }
        let target = staging.join(&path);
        if kind.is_file() {
            set_mode(&target, if mode & 0o111 != 0 { 0o755 } else { 0o644 })?;
        } else if kind.is_dir() {
            set_mode(&target, 0o755)?;
        }
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
