//! The chunk store: where chunks live, by digest.
//!
//! [`ChunkStore`] is the seam for other backends. Its operations map one to
//! one onto an S3-compatible object store (one object per chunk, key
//! `sha256/<digest>`): `has` = HEAD, `touch` = a copy-in-place that renews
//! the last-modified time, `put` = PUT (the digest is checked before the
//! upload and again by the backend's checksum), `get` = GET, `delete` =
//! DELETE (with the age check done just before), `list` = ListObjectsV2.
//!
//! # On-disk layout of [`FsChunkStore`]
//!
//! ```text
//! <cloud data dir>/blobs/
//!   sha256/<first 2 hex digits>/<64 hex digits>   one file per chunk, its bytes
//!   tmp/<digest>.<pid>.<n>.tmp                    chunks being written
//! ```
//!
//! A chunk is written to `tmp/`, fsynced, renamed into place and the
//! directory fsynced, so a chunk file is either absent or complete. Files
//! left in `tmp/` by a crash are removed when the store opens. The file's
//! modification time is the chunk's last use (put, touch), which the
//! garbage collector's grace period reads. Every `get` checks the bytes
//! against the digest; a chunk that fails is removed, so the next push
//! uploads it again.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::digest::Digest;
use crate::{sha256, ArtifactError, Result, CHUNK_SIZE};

/// What the store knows about one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The chunk's digest.
    pub digest: Digest,
    /// Its length.
    pub size: u64,
    /// When it was last written or touched.
    pub modified: SystemTime,
}

/// What a `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was stored.
    Created,
    /// It was already there (its time was renewed).
    AlreadyPresent,
}

/// A content-addressed store of chunks.
#[async_trait::async_trait]
pub trait ChunkStore: Send + Sync {
    /// The chunk's size and time, if present. Changes nothing.
    async fn has(&self, digest: &Digest) -> Result<Option<ChunkInfo>>;
    /// Renews the chunk's time, so a garbage collection within the grace
    /// period keeps it; `false` if absent.
    async fn touch(&self, digest: &Digest) -> Result<bool>;
    /// Stores `bytes` under `digest` after checking they hash to it.
    async fn put(&self, digest: &Digest, bytes: Vec<u8>) -> Result<PutOutcome>;
    /// The chunk's bytes, checked against the digest; `None` if absent.
    async fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>>;
    /// Removes the chunk; with `unless_touched_since`, only if its time is
    /// older (checked just before removing). `true` if removed.
    async fn delete(&self, digest: &Digest, unless_touched_since: Option<SystemTime>) -> Result<bool>;
    /// Every chunk.
    async fn list(&self) -> Result<Vec<ChunkInfo>>;
}

/// Chunks as files under one directory (see the module docs for the layout).
#[derive(Clone)]
pub struct FsChunkStore {
    inner: Arc<FsInner>,
}

struct FsInner {
    root: PathBuf,
    seq: AtomicU64,
}

impl std::fmt::Debug for FsChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsChunkStore").field("root", &self.inner.root).finish()
    }
}

impl FsChunkStore {
    /// Opens (creating) the store at `root` (`<data dir>/blobs`) and
    /// removes half-written chunks a crash left in `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsChunkStore> {
        let root = root.into();
        let tmp = root.join("tmp");
        fs::create_dir_all(root.join("sha256")).map_err(ArtifactError::io("create", &root))?;
        fs::create_dir_all(&tmp).map_err(ArtifactError::io("create", &tmp))?;
        for e in fs::read_dir(&tmp).map_err(ArtifactError::io("read directory", &tmp))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(FsChunkStore { inner: Arc::new(FsInner { root, seq: AtomicU64::new(0) }) })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the chunk `digest` lives.
    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        self.inner.chunk_path(digest)
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&FsInner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| ArtifactError::Task(e.to_string()))?
    }
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl FsInner {
    fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    fn info(&self, digest: &Digest) -> Result<Option<ChunkInfo>> {
        let p = self.chunk_path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(ChunkInfo {
                digest: *digest,
                size: m.len(),
                modified: m.modified().map_err(ArtifactError::io("stat", &p))?,
            })),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(ArtifactError::io("stat", &p)(e)),
        }
    }

    fn touch(&self, digest: &Digest) -> Result<bool> {
        let p = self.chunk_path(digest);
        match File::options().write(true).open(&p) {
            Ok(f) => {
                f.set_modified(SystemTime::now()).map_err(ArtifactError::io("touch", &p))?;
                Ok(true)
            }
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(ArtifactError::io("touch", &p)(e)),
        }
    }

    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<PutOutcome> {
        if bytes.len() > CHUNK_SIZE {
            return Err(ArtifactError::ChunkTooLarge { size: bytes.len() });
        }
        let actual = sha256(bytes);
        if actual != *digest {
            return Err(ArtifactError::DigestMismatch { expected: *digest, actual });
        }
        let path = self.chunk_path(digest);
        // Present and intact: keep it (and mark it used). Present but damaged
        // (truncated, bit rot): replaced below by these verified bytes, so
        // pushing again repairs it.
        let intact = match fs::read(&path) {
            Ok(stored) => sha256(&stored) == *digest,
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(ArtifactError::io("read chunk", &path)(e)),
        };
        if intact && self.touch(digest)? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let dir = path.parent().expect("a chunk path has a fan-out directory");
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(ArtifactError::io("create", dir))?;
            // The new fan-out directory's entry must survive a power loss too.
            let parent = dir.parent().expect("fan-out directories have a parent");
            File::open(parent).and_then(|d| d.sync_all()).map_err(ArtifactError::io("sync", parent))?;
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{digest}.{}.{n}.tmp", std::process::id()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(ArtifactError::io("write chunk", &path)(e));
        }
        Ok(PutOutcome::Created)
    }

    fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let p = self.chunk_path(digest);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(ArtifactError::io("read chunk", &p)(e)),
        };
        let actual = sha256(&bytes);
        if actual != *digest {
            // Bit rot or tampering: drop it so the next push replaces it.
            let _ = fs::remove_file(&p);
            return Err(ArtifactError::DigestMismatch { expected: *digest, actual });
        }
        Ok(Some(bytes))
    }

    fn delete(&self, digest: &Digest, unless_touched_since: Option<SystemTime>) -> Result<bool> {
        if let Some(cutoff) = unless_touched_since {
            match self.info(digest)? {
                None => return Ok(false),
                Some(i) if i.modified >= cutoff => return Ok(false),
                Some(_) => {}
            }
        }
        let p = self.chunk_path(digest);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(ArtifactError::io("remove chunk", &p)(e)),
        }
    }

    fn list(&self) -> Result<Vec<ChunkInfo>> {
        let base = self.root.join("sha256");
        let mut out = Vec::new();
        for fan in fs::read_dir(&base).map_err(ArtifactError::io("read directory", &base))?.flatten() {
            let Ok(entries) = fs::read_dir(fan.path()) else { continue };
            for e in entries.flatten() {
                let Some(d) = e.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
                if let Some(info) = self.info(&d)? {
                    out.push(info);
                }
            }
        }
        out.sort_by_key(|i| i.digest);
        Ok(out)
    }
}

#[async_trait::async_trait]
impl ChunkStore for FsChunkStore {
    async fn has(&self, digest: &Digest) -> Result<Option<ChunkInfo>> {
        let d = *digest;
        self.blocking(move |s| s.info(&d)).await
    }

    async fn touch(&self, digest: &Digest) -> Result<bool> {
        let d = *digest;
        self.blocking(move |s| s.touch(&d)).await
    }

    async fn put(&self, digest: &Digest, bytes: Vec<u8>) -> Result<PutOutcome> {
        let d = *digest;
        self.blocking(move |s| s.put(&d, &bytes)).await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let d = *digest;
        self.blocking(move |s| s.get(&d)).await
    }

    async fn delete(&self, digest: &Digest, unless_touched_since: Option<SystemTime>) -> Result<bool> {
        let d = *digest;
        self.blocking(move |s| s.delete(&d, unless_touched_since)).await
    }

    async fn list(&self) -> Result<Vec<ChunkInfo>> {
        self.blocking(|s| s.list()).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("yunbian-artifacts-{name}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn put_get_has_delete_list() {
        let dir = TempDir::new("basic");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let data = b"hello chunk".to_vec();
        let d = sha256(&data);
        assert_eq!(store.has(&d).await.expect("has"), None);
        assert_eq!(store.get(&d).await.expect("get"), None);
        assert_eq!(store.put(&d, data.clone()).await.expect("put"), PutOutcome::Created);
        assert_eq!(store.put(&d, data.clone()).await.expect("put"), PutOutcome::AlreadyPresent);
        assert_eq!(store.get(&d).await.expect("get"), Some(data.clone()));
        assert_eq!(store.has(&d).await.expect("has").map(|i| i.size), Some(data.len() as u64));
        assert_eq!(store.list().await.expect("list").len(), 1);
        assert!(store.delete(&d, None).await.expect("delete"));
        assert!(!store.delete(&d, None).await.expect("delete again"));
        assert!(store.list().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn put_refuses_wrong_digest_and_oversized_chunks() {
        let dir = TempDir::new("refuse");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let d = sha256(b"one");
        assert!(matches!(store.put(&d, b"two".to_vec()).await, Err(ArtifactError::DigestMismatch { .. })));
        let big = vec![0u8; CHUNK_SIZE + 1];
        assert!(matches!(store.put(&sha256(&big), big).await, Err(ArtifactError::ChunkTooLarge { .. })));
        assert!(store.list().await.expect("list").is_empty());
        assert_eq!(fs::read_dir(dir.0.join("blobs/tmp")).expect("tmp").count(), 0, "nothing half-written");
    }

    #[tokio::test]
    async fn corrupted_chunk_is_detected_and_dropped() {
        let dir = TempDir::new("corrupt");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let data = vec![7u8; 1000];
        let d = sha256(&data);
        store.put(&d, data.clone()).await.expect("put");
        let p = store.chunk_path(&d);
        let mut bad = data.clone();
        bad[500] ^= 1;
        fs::write(&p, &bad).expect("corrupt");
        assert!(matches!(store.get(&d).await, Err(ArtifactError::DigestMismatch { .. })));
        assert_eq!(store.has(&d).await.expect("has"), None, "dropped, so a push uploads it again");
        assert_eq!(store.put(&d, data).await.expect("put"), PutOutcome::Created);
    }

    #[tokio::test]
    async fn pushing_again_repairs_a_damaged_chunk() {
        let dir = TempDir::new("repair");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let data = vec![9u8; 3000];
        let d = sha256(&data);
        store.put(&d, data.clone()).await.expect("put");
        // Truncated on disk (a crash of the disk, not of ours).
        fs::write(store.chunk_path(&d), &data[..100]).expect("truncate");
        assert_eq!(store.put(&d, data.clone()).await.expect("put"), PutOutcome::Created, "replaced");
        assert_eq!(store.get(&d).await.expect("get"), Some(data.clone()));
        assert_eq!(store.put(&d, data).await.expect("put"), PutOutcome::AlreadyPresent);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_removed_on_open_and_never_listed() {
        let dir = TempDir::new("crash");
        let root = dir.0.join("blobs");
        let store = FsChunkStore::open(&root).expect("open");
        let data = vec![1u8; 10];
        let d = sha256(&data);
        // A crash between write and rename leaves only a temporary file.
        fs::write(root.join("tmp").join(format!("{d}.1.0.tmp")), &data[..5]).expect("half");
        assert_eq!(store.has(&d).await.expect("has"), None);
        assert!(store.list().await.expect("list").is_empty());
        drop(store);
        let store = FsChunkStore::open(&root).expect("reopen");
        assert_eq!(fs::read_dir(root.join("tmp")).expect("tmp").count(), 0);
        assert_eq!(store.put(&d, data).await.expect("put"), PutOutcome::Created);
    }

    #[tokio::test]
    async fn delete_with_cutoff_keeps_recently_touched_chunks() {
        let dir = TempDir::new("cutoff");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let data = vec![2u8; 10];
        let d = sha256(&data);
        store.put(&d, data).await.expect("put");
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        assert!(!store.delete(&d, Some(past)).await.expect("kept"));
        let p = store.chunk_path(&d);
        File::options().write(true).open(&p).expect("open").set_modified(past).expect("age it");
        assert!(store.touch(&d).await.expect("touch"));
        assert!(!store.delete(&d, Some(past + std::time::Duration::from_secs(1))).await.expect("kept"));
        File::options().write(true).open(&p).expect("open").set_modified(past).expect("age it");
        assert!(store.delete(&d, Some(past + std::time::Duration::from_secs(1))).await.expect("removed"));
    }
}
