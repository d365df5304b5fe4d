//! The edge puller and cache against a fake source: a pull cut half-way
//! resumes (across a reopen, i.e. an agent restart) fetching only the
//! missing chunks; a corrupt chunk is discarded and fetched again, and
//! refused after the tries; a chunk list that does not add up to the blob
//! is refused; bundles unpack with modes, and a `../` or absolute entry
//! refuses the bundle; the wasm blob is the fallback; the cache collects
//! least recently used blobs first and never one in use.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use yunbian_api::{Artifact, ArtifactBlob, ArtifactRef, ArtifactSpec, BlobType, ChunkEntry, Object};
use yunbian_artifacts::{sha256, BlobManifest, Digest, CHUNK_SIZE};
use yunbian_edge::artifacts::{ArtifactCache, ArtifactSource, CacheOptions, PullError, PullProgress, SourceError};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("yunbian-edge-art-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test setup");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A source in memory that can serve corrupt copies and stop serving.
#[derive(Default)]
struct FakeSource {
    artifacts: Mutex<HashMap<String, Artifact>>,
    chunks: Mutex<HashMap<Digest, Vec<u8>>>,
    /// Corrupt copies still to serve, per chunk.
    corrupt: Mutex<HashMap<Digest, u32>>,
    /// Chunk fetches still allowed before every fetch fails (None: no limit).
    budget: Mutex<Option<usize>>,
    /// Busy answers still to give, per chunk.
    busy: Mutex<HashMap<Digest, u32>>,
    /// Every chunk fetch, in order.
    fetched: Mutex<Vec<Digest>>,
    /// Artifact reads fail as if the link were down.
    unreachable: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl ArtifactSource for FakeSource {
    async fn artifact(&self, object: &str) -> Result<Artifact, SourceError> {
        if self.unreachable.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SourceError::Failed("link down".into()));
        }
        self.artifacts.lock().expect("lock").get(object).cloned().ok_or(SourceError::NotFound)
    }

    async fn artifact_of_blob(&self, blob: &Digest) -> Result<Artifact, SourceError> {
        if self.unreachable.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SourceError::Failed("link down".into()));
        }
        let all = self.artifacts.lock().expect("lock");
        let mut found: Vec<&Artifact> =
            all.values().filter(|a| a.spec.blobs.values().any(|b| b.sha256 == blob.hex())).collect();
        found.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        found.first().map(|a| (*a).clone()).ok_or(SourceError::NotFound)
    }

    async fn chunk(&self, d: &Digest) -> Result<Vec<u8>, SourceError> {
        self.fetched.lock().expect("lock").push(*d);
        if let Some(b) = self.budget.lock().expect("lock").as_mut() {
            if *b == 0 {
                return Err(SourceError::Failed("link cut".into()));
            }
            *b -= 1;
        }
        if let Some(n) = self.busy.lock().expect("lock").get_mut(d).filter(|n| **n > 0) {
            *n -= 1;
            return Err(SourceError::Busy(Duration::from_millis(20)));
        }
        let mut bytes = self.chunks.lock().expect("lock").get(d).cloned().ok_or(SourceError::NotFound)?;
        if let Some(n) = self.corrupt.lock().expect("lock").get_mut(d) {
            if *n > 0 {
                *n -= 1;
                bytes[0] ^= 0xff;
            }
        }
        Ok(bytes)
    }
}

impl FakeSource {
    /// Publishes `bytes` as `name` 1.0 for the platforms given.
    fn publish(&self, name: &str, blobs: &[(&str, BlobType, &[u8])]) -> Vec<Digest> {
        let mut map = BTreeMap::new();
        let mut out = Vec::new();
        for (platform, kind, bytes) in blobs {
            let m = BlobManifest::of_bytes(bytes);
            for (c, data) in m.chunks.iter().zip(bytes.chunks(CHUNK_SIZE)) {
                self.chunks.lock().expect("lock").insert(c.digest, data.to_vec());
            }
            map.insert(
                platform.to_string(),
                ArtifactBlob {
                    kind: *kind,
                    size: m.size,
                    sha256: m.sha256.hex(),
                    chunks: m.chunks.iter().map(|c| ChunkEntry { digest: c.digest.hex(), size: c.size }).collect(),
                    signatures: Vec::new(),
                },
            );
            out.push(m.sha256);
        }
        let spec = ArtifactSpec { name: name.into(), version: "1.0".into(), blobs: map };
        let object = format!("{name}--1-0");
        self.artifacts.lock().expect("lock").insert(object.clone(), Object::new(&object, spec));
        out
    }

    fn fetches(&self) -> usize {
        self.fetched.lock().expect("lock").len()
    }
}

fn opts(limit: u64) -> CacheOptions {
    CacheOptions {
        limit,
        chunk_tries: 3,
        retry_delay: Duration::ZERO,
        platform: Some("linux/amd64".into()),
        ..Default::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed as usize) % 251) as u8).collect()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[tokio::test]
async fn a_cut_pull_resumes_after_a_restart_with_only_the_missing_chunks() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let bytes = pattern(2 * CHUNK_SIZE + 100, 3);
    src.publish("tool", &[("linux/amd64", BlobType::Executable, &bytes)]);
    *src.budget.lock().expect("lock") = Some(1);

    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");
    let progress = PullProgress::default();
    let e = cache.ensure_with("tool", "1.0", &progress).await.expect_err("the link is cut after one chunk");
    assert!(matches!(e, PullError::Source { .. }), "{e}");
    assert!(e.to_string().contains("link cut"), "{e}");
    assert_eq!(progress.total(), bytes.len() as u64);
    // One chunk is done: a full one or the short last one (each agent
    // starts at its own offset in the chunk list).
    assert!([CHUNK_SIZE as u64, 100].contains(&progress.done()), "{}", progress.done());
    assert_eq!(files(&cache.root().join("chunks")).len(), 1, "the verified chunk is kept");
    assert!(files(&cache.root().join("blobs")).is_empty());
    drop(cache);

    // The agent restarts; the link is back.
    *src.budget.lock().expect("lock") = None;
    let before = src.fetches();
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("reopen");
    let progress = PullProgress::default();
    let blob = cache.ensure_with("tool", "1.0", &progress).await.expect("resumed");
    assert_eq!(src.fetches() - before, 2, "only the two missing chunks are fetched");
    assert_eq!(progress.percent(), 100);
    assert_eq!(std::fs::read(&blob.path).expect("read"), bytes);
    assert_eq!(blob.sha256, sha256(&bytes));
    assert_eq!((blob.platform.as_str(), blob.kind, blob.unpacked.clone()), ("linux/amd64", BlobType::Executable, None));
    assert_eq!(mode(&blob.path), 0o755, "executables are executable");
    assert!(files(&cache.root().join("chunks")).is_empty(), "chunk files go once the blob is assembled");
    assert!(files(&cache.root().join("tmp")).is_empty());

    // Present: nothing is fetched again.
    let before = src.fetches();
    cache.ensure("tool", "1.0").await.expect("present");
    assert_eq!(src.fetches(), before);
}

#[tokio::test]
async fn a_damaged_chunk_left_on_disk_is_fetched_again() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let bytes = pattern(CHUNK_SIZE + 10, 4);
    src.publish("tool", &[("linux/amd64", BlobType::Executable, &bytes)]);
    *src.budget.lock().expect("lock") = Some(1);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");
    cache.ensure("tool", "1.0").await.expect_err("cut");
    let kept = cache.root().join("chunks").join(&files(&cache.root().join("chunks"))[0]);
    std::fs::write(&kept, b"damaged on disk").expect("damage");
    *src.budget.lock().expect("lock") = None;
    let before = src.fetches();
    let blob = cache.ensure("tool", "1.0").await.expect("pulled");
    assert_eq!(src.fetches() - before, 2, "the damaged chunk and the missing one");
    assert_eq!(std::fs::read(&blob.path).expect("read"), bytes);
}

#[tokio::test]
async fn a_corrupt_chunk_is_discarded_and_fetched_again_then_refused() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let bytes = pattern(1000, 5);
    src.publish("tool", &[("linux/amd64", BlobType::Executable, &bytes)]);
    let d = sha256(&bytes);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");

    src.corrupt.lock().expect("lock").insert(d, 2);
    let blob = cache.ensure("tool", "1.0").await.expect("third try is good");
    assert_eq!(src.fetches(), 3);
    assert_eq!(std::fs::read(&blob.path).expect("read"), bytes);

    let dir2 = TempDir::new();
    let cache = ArtifactCache::open(&dir2.0, src.clone(), opts(u64::MAX)).expect("open");
    src.corrupt.lock().expect("lock").insert(d, 5);
    let e = cache.ensure("tool", "1.0").await.expect_err("always corrupt");
    assert!(matches!(e, PullError::CorruptChunk { tries: 3, .. }), "{e}");
    assert!(e.to_string().contains(&format!("chunk {d} arrived corrupt 3 times")), "{e}");
    assert!(files(&cache.root().join("chunks")).is_empty(), "nothing corrupt is kept");
    assert!(files(&cache.root().join("blobs")).is_empty());
}

#[tokio::test]
async fn a_chunk_list_that_is_not_the_blob_is_refused() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let bytes = pattern(1000, 6);
    src.publish("tool", &[("linux/amd64", BlobType::Executable, &bytes)]);
    // The artifact claims another blob digest for the same chunks.
    let other = sha256(b"something else");
    src.artifacts
        .lock()
        .expect("lock")
        .get_mut("tool--1-0")
        .expect("published")
        .spec
        .blobs
        .get_mut("linux/amd64")
        .expect("blob")
        .sha256 = other.hex();
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");
    let e = cache.ensure("tool", "1.0").await.expect_err("mismatch");
    assert!(matches!(e, PullError::BlobMismatch { expected, .. } if expected == other), "{e}");
    assert!(files(&cache.root().join("blobs")).is_empty());
    assert!(files(&cache.root().join("tmp")).is_empty());

    let e = cache.ensure("missing", "1.0").await.expect_err("not published");
    assert!(matches!(e, PullError::NotFound { .. }), "{e}");
}

/// A tar.gz with raw entry names (so `../` and `/` can be written).
fn tar_gz(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_gnu_mut().expect("gnu header").name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if name.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
        }
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

#[tokio::test]
async fn bundles_unpack_with_modes_and_escaping_entries_refuse_them() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let good =
        tar_gz(&[("app/", 0o755, b""), ("app/run", 0o750, b"#!/bin/sh\necho hi\n"), ("app/conf.txt", 0o600, b"x=1\n")]);
    let evil = tar_gz(&[("ok.txt", 0o644, b"fine"), ("../evil.txt", 0o644, b"escaped")]);
    let abs = tar_gz(&[("/tmp/yunbian-abs-entry", 0o644, b"escaped")]);
    src.publish("good", &[("linux/amd64", BlobType::Bundle, &good)]);
    src.publish("evil", &[("linux/amd64", BlobType::Bundle, &evil)]);
    src.publish("abs", &[("linux/amd64", BlobType::Bundle, &abs)]);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");

    let blob = cache.ensure("good", "1.0").await.expect("unpacks");
    let root = blob.unpacked.clone().expect("a bundle is unpacked");
    assert_eq!(root, cache.root().join("unpacked").join(sha256(&good).hex()));
    assert_eq!(std::fs::read(root.join("app/run")).expect("read"), b"#!/bin/sh\necho hi\n");
    assert_eq!(mode(&root.join("app/run")), 0o755);
    assert_eq!(mode(&root.join("app/conf.txt")), 0o644);
    assert_eq!(mode(&blob.path), 0o644, "the bundle itself is not executable");

    for (name, reason) in [("evil", "contains `..`"), ("abs", "has an absolute path")] {
        let e = cache.ensure(name, "1.0").await.expect_err("refused");
        assert!(matches!(e, PullError::UnsafeEntry { .. }), "{e}");
        assert!(e.to_string().contains(reason), "{e}");
    }
    assert!(!cache.root().join("unpacked/evil.txt").exists());
    assert!(!dir.0.join("artifacts/evil.txt").exists());
    assert!(!Path::new("/tmp/yunbian-abs-entry").exists());
    assert_eq!(files(&cache.root().join("unpacked")), vec![sha256(&good).hex()], "nothing of a refused bundle stays");
    assert!(files(&cache.root().join("tmp")).is_empty());
}

#[tokio::test]
async fn the_wasm_blob_is_the_fallback() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let wasm = b"\0asm\x01\0\0\0".to_vec();
    let arm = pattern(100, 9);
    src.publish("mod", &[("linux/arm64", BlobType::Executable, &arm), ("wasi/wasm32", BlobType::Wasm, &wasm)]);
    src.publish("armonly", &[("linux/arm64", BlobType::Executable, &arm)]);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");
    let blob = cache.ensure("mod", "1.0").await.expect("wasm");
    assert_eq!((blob.platform.as_str(), blob.kind), ("wasi/wasm32", BlobType::Wasm));
    let e = cache.ensure("armonly", "1.0").await.expect_err("no blob");
    assert!(e.to_string().contains("no blob for linux/amd64 nor a wasi/wasm32 one (it has: linux/arm64)"), "{e}");
}

#[tokio::test]
async fn the_cache_collects_least_recently_used_first_and_never_in_use() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let mut digest = HashMap::new();
    for (i, n) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let d = src.publish(n, &[("linux/amd64", BlobType::Executable, &pattern(1000, i as u8))]);
        digest.insert(n, d[0]);
    }
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(2500)).expect("open");
    let present = || {
        let mut v: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|n| cache.root().join("blobs").join(digest[n].hex()).exists())
            .collect();
        v.sort();
        v
    };
    let step = || tokio::time::sleep(Duration::from_millis(20));
    cache.ensure("a", "1.0").await.expect("a");
    step().await;
    cache.ensure("b", "1.0").await.expect("b");
    step().await;
    cache.ensure("a", "1.0").await.expect("a used again");
    step().await;
    cache.ensure("c", "1.0").await.expect("c");
    assert_eq!(present(), ["a", "c"], "b was the least recently used");

    step().await;
    cache.mark_in_use(&digest["a"]);
    cache.ensure("d", "1.0").await.expect("d");
    assert_eq!(present(), ["a", "d"], "a is older than c but in use");

    // Over the limit with everything in use: nothing is collected.
    cache.mark_in_use(&digest["d"]);
    let cache2 = ArtifactCache::open(&dir.0, src.clone(), opts(100)).expect("reopen smaller");
    cache2.mark_in_use(&digest["a"]);
    cache2.mark_in_use(&digest["d"]);
    assert!(cache2.collect().await.expect("collect").is_empty());
    cache2.unmark_in_use(&digest["a"]);
    assert_eq!(cache2.collect().await.expect("collect"), vec![digest["a"]]);
    assert_eq!(present(), ["d"]);
}

fn reference(name: &str, digest: Option<&Digest>) -> ArtifactRef {
    ArtifactRef {
        name: name.into(),
        version: if name.is_empty() { String::new() } else { "1.0".into() },
        digest: digest.map(|d| format!("sha256:{d}")).unwrap_or_default(),
    }
}

#[tokio::test]
async fn references_by_digest_pin_and_resolve_offline_from_the_last_copy() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let amd = b"amd64 build".to_vec();
    let arm = b"arm64 build".to_vec();
    let wasm = b"\0asm module".to_vec();
    let d = src.publish(
        "tool",
        &[
            ("linux/amd64", BlobType::Executable, &amd),
            ("linux/arm64", BlobType::Executable, &arm),
            ("wasi/wasm32", BlobType::Wasm, &wasm),
        ],
    );
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(1 << 30)).expect("open");

    // A digest alone picks that blob, if this node can run it.
    let r = cache.resolve(&reference("", Some(&d[0]))).await.expect("by digest");
    assert_eq!((r.platform.as_str(), r.artifact.spec.name.as_str(), r.offline), ("linux/amd64", "tool", false));
    let b = cache.pull(&r, &PullProgress::default()).await.expect("pull");
    assert_eq!(std::fs::read(&b.path).expect("blob"), amd);
    let r = cache.resolve(&reference("", Some(&d[2]))).await.expect("the wasm blob by digest");
    assert_eq!(r.platform, "wasi/wasm32");
    match cache.resolve(&reference("", Some(&d[1]))).await {
        Err(PullError::NoBlob { available, .. }) => assert_eq!(available, "linux/arm64"),
        other => panic!("an arm64 blob is not for this amd64 node: {other:?}"),
    }
    // The wasm runtime takes the wasm blob, not the node's platform's.
    let r = cache.resolve_for(&reference("tool", None), Some("wasi/wasm32")).await.expect("wasm");
    assert_eq!(r.blob.sha256, d[2].hex());

    // A name with a pin: the node's blob must be the pinned one.
    let r = cache.resolve(&reference("tool", Some(&d[0]))).await.expect("pinned");
    assert_eq!(r.blob.sha256, d[0].hex());
    match cache.resolve(&reference("tool", Some(&d[1]))).await {
        Err(PullError::Pinned { platform, pinned, .. }) => {
            assert_eq!((platform.as_str(), pinned), ("linux/amd64", d[1].hex()));
        }
        other => panic!("expected a pin mismatch, got {other:?}"),
    }
    let unknown = sha256(b"nothing");
    assert!(matches!(cache.resolve(&reference("", Some(&unknown))).await, Err(PullError::NoSuchBlob(_))));

    // The link goes down: references resolved before come from the local
    // copy (across a reopen, i.e. an agent restart); others fail clearly.
    src.unreachable.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(cache);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(1 << 30)).expect("reopen");
    let r = cache.resolve(&reference("tool", None)).await.expect("offline copy");
    assert!(r.offline);
    assert_eq!(r.blob.sha256, d[0].hex());
    let r = cache.resolve(&reference("", Some(&d[0]))).await.expect("offline copy by digest");
    assert!(r.offline);
    match cache.resolve(&reference("other", None)).await {
        Err(PullError::Source { message, .. }) => assert!(message.contains("link down"), "{message}"),
        other => panic!("expected a source error, got {other:?}"),
    }

    // Deleted in the cloud: the local copy is forgotten too.
    src.unreachable.store(false, std::sync::atomic::Ordering::Relaxed);
    src.artifacts.lock().expect("lock").clear();
    assert!(matches!(cache.resolve(&reference("tool", None)).await, Err(PullError::NotFound { .. })));
    src.unreachable.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(cache.resolve(&reference("tool", None)).await, Err(PullError::Source { .. })));
}

#[tokio::test]
async fn an_imported_export_file_runs_without_the_source() {
    let (dir, other) = (TempDir::new(), TempDir::new());
    let src = Arc::new(FakeSource::default());
    let bytes: Vec<u8> = (0..(CHUNK_SIZE * 2 + 100)).map(|i| (i % 251) as u8).collect();
    src.publish("offline", &[("linux/amd64", BlobType::Executable, &bytes)]);
    let artifact = src.artifacts.lock().expect("lock").get("offline--1-0").cloned().expect("published");
    // The export file, as `yunbian artifact export` writes it.
    let mut file = Vec::new();
    let header = serde_json::to_vec(&artifact.spec).expect("header");
    yunbian_artifacts::export::write_header(&mut file, &header).expect("write");
    for (c, data) in artifact.spec.blobs["linux/amd64"].chunks.iter().zip(bytes.chunks(CHUNK_SIZE)) {
        yunbian_artifacts::export::write_chunk(&mut file, &c.digest, data).expect("write");
    }
    let path = other.0.join("offline.ybax");
    std::fs::write(&path, &file).expect("write");

    // A site that cannot reach the source imports the file, then runs it.
    src.unreachable.store(true, std::sync::atomic::Ordering::Relaxed);
    *src.budget.lock().expect("lock") = Some(0);
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(1 << 30)).expect("open");
    let summary = cache.import_file(&path).await.expect("import");
    assert_eq!((summary.name.as_str(), summary.chunks, summary.stored), ("offline", 3, 3));
    let r = cache.resolve(&reference("offline", None)).await.expect("resolved from the imported copy");
    assert!(r.offline);
    let b = cache.pull(&r, &PullProgress::default()).await.expect("pull from the imported chunks");
    assert_eq!(std::fs::read(&b.path).expect("blob"), bytes);
    assert_eq!(src.fetches(), 0, "no chunk came from the source");

    // A damaged file is refused with the reason.
    let mut damaged = file.clone();
    let at = damaged.len() - 10;
    damaged[at] ^= 0xff;
    std::fs::write(&path, &damaged).expect("write");
    match ArtifactCache::open(&other.0.join("c2"), src.clone(), opts(1 << 30)).expect("open").import_file(&path).await {
        Err(PullError::Manifest { message, .. }) => assert!(message.contains("does not match"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_busy_chunk_goes_to_the_back_of_the_queue_and_a_source_busy_too_long_fails_the_pull() {
    let dir = TempDir::new();
    let src = Arc::new(FakeSource::default());
    let bytes = pattern(3 * CHUNK_SIZE + 100, 9);
    src.publish("tool", &[("linux/amd64", BlobType::Executable, &bytes)]);
    let chunks: Vec<Digest> = BlobManifest::of_bytes(&bytes).chunks.iter().map(|c| c.digest).collect();
    assert_eq!(chunks.len(), 4);
    // Every chunk is busy twice before it is served: no try is used up.
    src.busy.lock().expect("lock").extend(chunks.iter().map(|d| (*d, 2)));
    let cache = ArtifactCache::open(&dir.0, src.clone(), opts(u64::MAX)).expect("open");
    let blob = cache.ensure("tool", "1.0").await.expect("pull despite busy answers");
    assert_eq!(std::fs::read(&blob.path).expect("read"), bytes);
    let fetched = src.fetched.lock().expect("lock").clone();
    assert_eq!(fetched.len(), 12, "2 busy answers and 1 fetch per chunk: {fetched:?}");
    // After a busy answer the pull asks for another chunk, not the same one.
    assert!(fetched.windows(2).all(|w| w[0] != w[1]), "{fetched:?}");

    // A source that stays busy fails the pull after busy_max_wait without
    // progress, naming the chunk; nothing is assembled.
    let dir2 = TempDir::new();
    src.busy.lock().expect("lock").insert(chunks[2], u32::MAX);
    let short = CacheOptions { busy_max_wait: Duration::from_millis(300), ..opts(u64::MAX) };
    let cache = ArtifactCache::open(&dir2.0, src.clone(), short).expect("open");
    let err = cache.ensure("tool", "1.0").await.expect_err("always busy");
    let msg = err.to_string();
    assert!(msg.contains(&chunks[2].to_string()) && msg.contains("stayed busy"), "{msg}");
    assert!(files(&cache.root().join("blobs")).is_empty(), "no blob assembled");
}
