//! Cutting a blob into fixed chunks and putting it back together.
//!
//! A blob of `size` bytes is the concatenation of `ceil(size / CHUNK_SIZE)`
//! chunks; every chunk but the last holds exactly [`CHUNK_SIZE`] bytes. Its
//! [`BlobManifest`] lists the chunks in order with their sha256 and size,
//! plus the sha256 and size of the whole blob. Fixed (not content-defined)
//! chunking keeps the manifest a pure function of the bytes, so a resumed
//! push computes the same chunks as the interrupted one.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, DigestParseError};
use crate::store::ChunkStore;
use crate::{sha256, ArtifactError, Result, CHUNK_SIZE};

/// One chunk of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// sha256 of the chunk's bytes.
    pub digest: Digest,
    /// Its length.
    pub size: u64,
}

/// What a blob is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobManifest {
    /// Length of the whole blob.
    pub size: u64,
    /// sha256 of the whole blob.
    pub sha256: Digest,
    /// The chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// Why a chunk list (an Artifact blob's `size`, `sha256` and `chunks`, as
/// received from the cloud, a peer or an export file) is not a
/// [`BlobManifest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The whole blob's sha256 is not a digest.
    #[error("blob sha256: {0}")]
    BlobDigest(DigestParseError),
    /// A chunk's digest is not a digest.
    #[error("chunks[{index}].digest: {source}")]
    ChunkDigest {
        /// Position of the chunk in the list.
        index: usize,
        /// What is wrong with it.
        source: DigestParseError,
    },
    /// The digests parse but the sizes do not fit together.
    #[error("inconsistent blob manifest: {0}")]
    Layout(LayoutError),
}

/// How a chunk list's sizes contradict the fixed chunking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A chunk is empty or larger than [`CHUNK_SIZE`].
    #[error("chunk {index} has size {size}")]
    ChunkSize {
        /// Position of the chunk.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// A chunk other than the last is shorter than [`CHUNK_SIZE`].
    #[error("chunk {index} has {size} bytes; every chunk but the last must have {CHUNK_SIZE}")]
    ShortChunk {
        /// Position of the chunk.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// The chunk sizes do not add up to the blob's size.
    #[error("chunks add up to {total} bytes, blob size is {size}")]
    SizeMismatch {
        /// Sum of the chunk sizes.
        total: u64,
        /// The blob's size.
        size: u64,
    },
}

impl BlobManifest {
    /// The manifest of bytes held in memory (tests, small blobs).
    pub fn of_bytes(bytes: &[u8]) -> BlobManifest {
        let chunks = bytes.chunks(CHUNK_SIZE).map(|c| ChunkRef { digest: sha256(c), size: c.len() as u64 }).collect();
        BlobManifest { size: bytes.len() as u64, sha256: sha256(bytes), chunks }
    }

    /// Parses a chunk list as it arrives in an Artifact blob (`size`, the
    /// blob's `sha256` and `(digest, size)` per chunk, digests as 64
    /// lower-case hex digits) and checks its layout
    /// ([`check_layout`](Self::check_layout)). Edges call this on every
    /// Artifact object and export header before fetching or storing a
    /// chunk of it.
    pub fn from_entries<'a>(
        size: u64,
        sha256: &str,
        chunks: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<BlobManifest, ManifestError> {
        let sha256 = sha256.parse::<Digest>().map_err(ManifestError::BlobDigest)?;
        let chunks = chunks
            .into_iter()
            .enumerate()
            .map(|(index, (digest, size))| {
                let digest = digest.parse().map_err(|source| ManifestError::ChunkDigest { index, source })?;
                Ok(ChunkRef { digest, size })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        let m = BlobManifest { size, sha256, chunks };
        m.layout().map_err(ManifestError::Layout)?;
        Ok(m)
    }

    /// Checks the layout: sizes add up, every chunk but the last is full,
    /// none is empty or too large.
    pub fn check_layout(&self) -> Result<()> {
        self.layout().map_err(|e| ArtifactError::Manifest(e.to_string()))
    }

    fn layout(&self) -> Result<(), LayoutError> {
        let mut total = 0u64;
        let n = self.chunks.len();
        for (index, c) in self.chunks.iter().enumerate() {
            if c.size == 0 || c.size > CHUNK_SIZE as u64 {
                return Err(LayoutError::ChunkSize { index, size: c.size });
            }
            if index + 1 < n && c.size != CHUNK_SIZE as u64 {
                return Err(LayoutError::ShortChunk { index, size: c.size });
            }
            total += c.size;
        }
        if total != self.size {
            return Err(LayoutError::SizeMismatch { total, size: self.size });
        }
        Ok(())
    }
}

/// Reads a file one chunk at a time: at most one chunk in memory.
pub struct ChunkReader {
    file: File,
    path: PathBuf,
    whole: ring::digest::Context,
    size: u64,
    chunks: Vec<ChunkRef>,
    done: bool,
}

impl ChunkReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<ChunkReader> {
        let file = File::open(path).map_err(ArtifactError::io("open", path))?;
        Ok(ChunkReader {
            file,
            path: path.to_path_buf(),
            whole: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            chunks: Vec::new(),
            done: false,
        })
    }

    /// The next chunk and its bytes; `None` at the end of the file.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkRef, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(CHUNK_SIZE);
        (&mut self.file)
            .take(CHUNK_SIZE as u64)
            .read_to_end(&mut buf)
            .map_err(ArtifactError::io("read", &self.path))?;
        if buf.len() < CHUNK_SIZE {
            self.done = true;
        }
        if buf.is_empty() {
            return Ok(None);
        }
        self.whole.update(&buf);
        self.size += buf.len() as u64;
        let c = ChunkRef { digest: sha256(&buf), size: buf.len() as u64 };
        self.chunks.push(c);
        Ok(Some((c, buf)))
    }

    /// Reads what is left and returns the manifest of the whole file.
    pub fn finish(mut self) -> Result<BlobManifest> {
        while self.next_chunk()?.is_some() {}
        Ok(BlobManifest { size: self.size, sha256: Digest::from_ring(self.whole.finish()), chunks: self.chunks })
    }
}

/// The manifest of a file, read with bounded memory.
pub fn split_file(path: &Path) -> Result<BlobManifest> {
    ChunkReader::open(path)?.finish()
}

/// Writes the blob of `manifest` to `out` from the chunks in `store`: each
/// chunk is checked as it is read (by the store), the whole blob against
/// `manifest.sha256` and `manifest.size`. The file appears under `out` only
/// when complete and correct (temporary name, fsync, rename).
pub async fn reassemble(store: &dyn ChunkStore, manifest: &BlobManifest, out: &Path) -> Result<()> {
    manifest.check_layout()?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let result = async {
        let mut file = File::create(&tmp).map_err(ArtifactError::io("create", &tmp))?;
        let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        for c in &manifest.chunks {
            let bytes = store.get(&c.digest).await?.ok_or(ArtifactError::MissingChunk(c.digest))?;
            if bytes.len() as u64 != c.size {
                return Err(ArtifactError::Manifest(format!(
                    "chunk {} has {} bytes, the manifest says {}",
                    c.digest,
                    bytes.len(),
                    c.size
                )));
            }
            whole.update(&bytes);
            size += c.size;
            file.write_all(&bytes).map_err(ArtifactError::io("write", &tmp))?;
        }
        let actual = Digest::from_ring(whole.finish());
        if actual != manifest.sha256 || size != manifest.size {
            return Err(ArtifactError::DigestMismatch { expected: manifest.sha256, actual });
        }
        file.sync_all().map_err(ArtifactError::io("sync", &tmp))?;
        std::fs::rename(&tmp, out).map_err(ArtifactError::io("rename", out))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::TempDir;
    use crate::FsChunkStore;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn file_split_matches_in_memory_manifest() {
        let dir = TempDir::new("split");
        for len in [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 17] {
            let bytes = pattern(len);
            let p = dir.0.join(format!("f{len}"));
            std::fs::write(&p, &bytes).expect("write");
            let m = split_file(&p).expect("split");
            assert_eq!(m, BlobManifest::of_bytes(&bytes), "len {len}");
            assert_eq!(m.chunks.len(), len.div_ceil(CHUNK_SIZE));
            m.check_layout().expect("layout");
        }
    }

    #[test]
    fn layout_errors() {
        let mut m = BlobManifest::of_bytes(&pattern(CHUNK_SIZE + 5));
        m.size += 1;
        assert!(m.check_layout().is_err());
        let mut m = BlobManifest::of_bytes(&pattern(CHUNK_SIZE + 5));
        m.chunks.swap(0, 1);
        assert!(m.check_layout().is_err(), "a short chunk before the last");
    }

    #[test]
    fn chunk_lists_parse_into_checked_manifests() {
        let bytes = pattern(CHUNK_SIZE + 5);
        let m = BlobManifest::of_bytes(&bytes);
        let hex: Vec<(String, u64)> = m.chunks.iter().map(|c| (c.digest.hex(), c.size)).collect();
        fn entries(h: &[(String, u64)]) -> Vec<(&str, u64)> {
            h.iter().map(|(d, s)| (d.as_str(), *s)).collect()
        }
        assert_eq!(BlobManifest::from_entries(m.size, &m.sha256.hex(), entries(&hex)), Ok(m.clone()));

        let err = |size: u64, sha: &str, h: &[(String, u64)]| {
            BlobManifest::from_entries(size, sha, entries(h)).expect_err("refused").to_string()
        };
        let sha = m.sha256.hex();
        assert_eq!(err(m.size, "abc", &hex), "blob sha256: \"abc\" is not a sha256 digest (64 lower-case hex digits)");
        let mut bad = hex.clone();
        bad[1].0 = bad[1].0.to_uppercase();
        assert!(err(m.size, &sha, &bad).starts_with("chunks[1].digest: \""), "{}", err(m.size, &sha, &bad));
        let mut bad = hex.clone();
        bad[1].1 = 0;
        assert_eq!(err(m.size, &sha, &bad), "inconsistent blob manifest: chunk 1 has size 0");
        let mut bad = hex.clone();
        bad.swap(0, 1);
        assert_eq!(
            err(m.size, &sha, &bad),
            format!("inconsistent blob manifest: chunk 0 has 5 bytes; every chunk but the last must have {CHUNK_SIZE}")
        );
        assert_eq!(
            err(m.size + 1, &sha, &hex),
            format!("inconsistent blob manifest: chunks add up to {} bytes, blob size is {}", m.size, m.size + 1)
        );
        // The same wording as check_layout, which reassembly uses.
        let mut inconsistent = m.clone();
        inconsistent.size += 1;
        assert_eq!(err(m.size + 1, &sha, &hex), inconsistent.check_layout().expect_err("refused").to_string());
    }

    #[tokio::test]
    async fn reassemble_round_trip_and_corruption() {
        let dir = TempDir::new("reassemble");
        let store = FsChunkStore::open(dir.0.join("blobs")).expect("open");
        let bytes = pattern(2 * CHUNK_SIZE + 1000);
        let src = dir.0.join("src");
        std::fs::write(&src, &bytes).expect("write");
        let mut reader = ChunkReader::open(&src).expect("open");
        while let Some((c, data)) = reader.next_chunk().expect("read") {
            store.put(&c.digest, data).await.expect("put");
        }
        let m = reader.finish().expect("manifest");
        let out = dir.0.join("out");
        reassemble(&store, &m, &out).await.expect("reassemble");
        assert_eq!(std::fs::read(&out).expect("read"), bytes);

        // A wrong whole-blob digest: no output file is left behind.
        let out2 = dir.0.join("out2");
        let mut wrong = m.clone();
        wrong.sha256 = sha256(b"other");
        assert!(matches!(reassemble(&store, &wrong, &out2).await, Err(ArtifactError::DigestMismatch { .. })));
        assert!(!out2.exists());
        assert!(!dir.0.join("out2.partial").exists());

        // A missing chunk.
        store.delete(&m.chunks[1].digest, None).await.expect("delete");
        assert!(matches!(reassemble(&store, &m, &out2).await, Err(ArtifactError::MissingChunk(_))));
        assert!(!out2.exists());
    }
}
