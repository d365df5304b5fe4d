//! Artifact blobs, below the API: what the cloud stores for `yunbian
//! artifact push` and what edges will pull.
//!
//! - [`Digest`]: a sha256, written as 64 lower-case hex digits.
//! - [`chunking`]: a blob is cut into fixed chunks of [`CHUNK_SIZE`] bytes
//!   (the last one shorter); a [`BlobManifest`] is the ordered list of chunk
//!   digests and sizes plus the whole blob's sha256 and size. Files are read
//!   one chunk at a time (bounded memory), and reassembled with every chunk
//!   and the whole blob checked. [`BlobManifest::from_entries`] turns an
//!   Artifact blob's chunk list (untrusted: from the cloud, a peer or an
//!   export file) into a checked manifest.
//! - [`store`]: the [`ChunkStore`] trait (has/touch/put/get/delete/list) and
//!   [`FsChunkStore`], chunks as files under `<cloud data dir>/blobs/`
//!   written atomically. The trait is shaped so that an S3-compatible object
//!   store (one object per chunk, key = digest) can take its place.
//! - [`gc`]: the sweep that removes chunks no artifact references and that
//!   nobody touched within a grace period.
//! - [`signing`]: ed25519 publisher keys (ring), key ids, sign and verify.
//! - [`export`]: the export file for air-gapped sites, read with every
//!   chunk checked.
//! - [`fuzzing`]: the checks the fuzz targets `chunk_manifest` and
//!   `artifact_export` run, shared with the corpus replay test.
//!
//! Architecture invariant: no network I/O here. Disk I/O only in
//! [`FsChunkStore`] and the file helpers of [`chunking`]; every chunk read
//! from disk is checked against its digest before it is handed out.

#![forbid(unsafe_code)]

pub mod chunking;
pub mod digest;
pub mod export;
pub mod fuzzing;
pub mod gc;
pub mod rate;
pub mod signing;
pub mod store;

pub use chunking::{BlobManifest, ChunkReader, ChunkRef, LayoutError, ManifestError};
pub use digest::{sha256, Digest, DigestParseError};
pub use store::{ChunkInfo, ChunkStore, FsChunkStore, PutOutcome};

/// The fixed chunk size: 4 MiB. Every chunk of a blob but the last has
/// exactly this size; the last has 1..=CHUNK_SIZE bytes (an empty blob has
/// no chunks).
pub const CHUNK_SIZE: usize = 4 << 20;

/// Failures of the chunk store, chunking and signing.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`write chunk`, `read`).
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bytes did not hash to the digest they were sent or stored under.
    #[error("digest mismatch: expected sha256 {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the bytes should have.
        expected: Digest,
        /// The digest they have.
        actual: Digest,
    },
    /// A chunk larger than [`CHUNK_SIZE`].
    #[error("chunk of {size} bytes exceeds the chunk size of {CHUNK_SIZE} bytes")]
    ChunkTooLarge {
        /// Its size.
        size: usize,
    },
    /// A chunk a blob needs is not in the store.
    #[error("chunk {0} is not in the store")]
    MissingChunk(Digest),
    /// A blob manifest contradicts itself (sizes, chunk layout).
    #[error("inconsistent blob manifest: {0}")]
    Manifest(String),
    /// A key file or a signature could not be used.
    #[error("{0}")]
    Signature(String),
    /// A blocking task of the store panicked or was cancelled.
    #[error("chunk store task failed: {0}")]
    Task(String),
}

impl ArtifactError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
        let path = path.display().to_string();
        move |source| ArtifactError::Io { op, path, source }
    }
}

/// Result of this crate.
pub type Result<T, E = ArtifactError> = std::result::Result<T, E>;
