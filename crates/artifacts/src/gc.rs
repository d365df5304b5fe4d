//! Garbage collection of chunks: mark (the caller says which digests
//! artifacts reference) and sweep (remove the rest), safe against pushes
//! running at the same time.
//!
//! A push uploads chunks first and creates the Artifact that references
//! them last, so for a while a chunk is wanted but referenced by nothing.
//! The sweep therefore only removes a chunk that is unreferenced **and** has
//! not been written or touched for `grace`; uploading a chunk, finding it
//! present (`HEAD`) and creating an Artifact that uses it all touch it. The
//! order matters and [`sweep`] enforces it: chunks are listed first, the
//! references read after, and each chunk's age is checked again just before
//! it is removed, so a chunk touched after the listing is kept.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::digest::Digest;
use crate::store::ChunkStore;
use crate::Result;

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Chunks in the store when the sweep started.
    pub scanned: usize,
    /// Chunks some artifact references.
    pub referenced: usize,
    /// Unreferenced chunks kept because they were used within the grace period.
    pub kept_recent: usize,
    /// Chunks removed.
    pub removed: usize,
    /// Bytes removed.
    pub removed_bytes: u64,
}

/// Removes every chunk that `references` does not return and that nobody
/// used within `grace` of `now`. `references` is called after the chunks
/// are listed (see the module docs).
pub async fn sweep<F, Fut>(
    store: &dyn ChunkStore,
    now: SystemTime,
    grace: Duration,
    references: F,
) -> Result<SweepReport>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<HashSet<Digest>>>,
{
    let listed = store.list().await?;
    let referenced = references().await?;
    let cutoff = now.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = SweepReport { scanned: listed.len(), ..Default::default() };
    for c in listed {
        if referenced.contains(&c.digest) {
            report.referenced += 1;
        } else if c.modified >= cutoff {
            report.kept_recent += 1;
        } else if store.delete(&c.digest, Some(cutoff)).await? {
            report.removed += 1;
            report.removed_bytes += c.size;
        } else {
            report.kept_recent += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::TempDir;
    use crate::{sha256, FsChunkStore};

    #[tokio::test]
    async fn removes_only_old_unreferenced_chunks() {
        let dir = TempDir::new("gc");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100]).collect();
        for c in &chunks {
            store.put(&sha256(c), c.clone()).await.expect("put");
        }
        let digests: Vec<Digest> = chunks.iter().map(|c| sha256(c)).collect();
        let later = SystemTime::now() + Duration::from_secs(7200);
        // Chunk 3 is touched "now + 2h" by a concurrent push: recent at the sweep.
        let p = store.chunk_path(&digests[3]);
        std::fs::File::options().write(true).open(&p).expect("open").set_modified(later).expect("touch");
        let keep: HashSet<Digest> = [digests[0]].into_iter().collect();
        let report = sweep(&store, later + Duration::from_secs(1), Duration::from_secs(60), || async { Ok(keep) })
            .await
            .expect("sweep");
        assert_eq!(report, SweepReport { scanned: 4, referenced: 1, kept_recent: 1, removed: 2, removed_bytes: 200 });
        let left: Vec<Digest> = store.list().await.expect("list").into_iter().map(|i| i.digest).collect();
        let mut want = vec![digests[0], digests[3]];
        want.sort();
        assert_eq!(left, want);
    }

    #[tokio::test]
    async fn references_are_read_after_listing() {
        let dir = TempDir::new("gc-order");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let data = vec![9u8; 10];
        let d = sha256(&data);
        store.put(&d, data).await.expect("put");
        // A push that finished between the listing and the reading of
        // references: its artifact is seen, so the chunk stays.
        let far = SystemTime::now() + Duration::from_secs(3600);
        let report =
            sweep(&store, far, Duration::ZERO, || async { Ok([d].into_iter().collect()) }).await.expect("sweep");
        assert_eq!(report.removed, 0);
        assert!(store.has(&d).await.expect("has").is_some());
        let report = sweep(&store, far, Duration::ZERO, || async { Ok(HashSet::new()) }).await.expect("sweep");
        assert_eq!(report.removed, 1);
    }
}
