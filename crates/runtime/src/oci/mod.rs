//! The image and bundle side of the `oci` runtime: OCI image layouts in,
//! crun containers out.
//!
//! An `oci` instance runs as a *process* of the process runtime whose
//! command is the shim, `yunbian shim oci --bundle <DIR> --id <ID>`, so it
//! gets the process runtime's log files, restart policy, re-adoption and
//! cgroup limits. Before starting it, the agent turns the instance's image
//! into a bundle. The whole boundary:
//!
//! ```text
//! ImageLayout::open(dir)                     index.json → manifest (linux/<host arch>) → config,
//!                                            every blob checked against its sha256 and size
//!   .config() / .layers() / .digest()
//! LayerCache::open(dir)                      layers unpacked once per digest (layer.rs)
//! prepare_bundle(&image, &cache, &BundleRequest, bundle_dir) -> PreparedBundle
//!                                            rootfs/ + config.json, reused when unchanged (bundle.rs)
//! detect_crun(path) -> Result<String, String>   is crun usable here, and which
//! run_shim(&ShimOptions) -> Result<i32, _>   the shim body: run the container in the
//!                                            foreground, forward SIGTERM/SIGINT, return its
//!                                            exit status, delete it (shim.rs)
//! ```
//!
//! All of it is blocking file and process work: call it from a blocking
//! thread or from the shim process itself, never on an async worker.
//!
//! Files: the layer cache and bundles are described in `layer.rs` and
//! `bundle.rs`; the spec's defaults in `spec.rs`; why crun, why copies
//! instead of overlayfs, and how cgroups are handled on v1, v2 and hybrid
//! hosts in docs/design/014-oci-runtime.md.
//!
//! Invariants: a layer directory in the cache exists only complete and
//! matching its digest and diff_id; nothing from an image is ever written
//! outside the cache entry or bundle it belongs to, or read through a
//! symlink on the host; [`run_shim`] leaves no container behind when it
//! returns.

mod bundle;
mod digest;
mod image;
mod layer;
mod rootfs;
mod shim;
mod spec;
#[doc(hidden)]
pub mod testing;

use std::io;
use std::path::PathBuf;

pub use bundle::{prepare_bundle, BundleRequest, PreparedBundle};
pub use digest::Digest;
pub use image::{Descriptor, ImageConfig, ImageLayout, Platform};
pub use layer::{CachedLayer, LayerCache};
pub use shim::{detect_crun, run_shim, ShimCgroups, ShimOptions, DEFAULT_STATE_ROOT};

/// Errors of the `oci` runtime.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The image layout is malformed (a missing file, bad JSON, an
    /// unsupported version).
    #[error("OCI layout {path}: {message}")]
    Layout {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A blob's bytes do not match its descriptor (corrupt or tampered with).
    #[error("blob {digest} does not match its descriptor: {message}")]
    BlobMismatch {
        /// The digest the descriptor promises.
        digest: Digest,
        /// What differs.
        message: String,
    },
    /// The image has no manifest for this host's platform.
    #[error("the image has no manifest for {wanted} (it has: {})", found.join(", "))]
    NoPlatform {
        /// The platform looked for.
        wanted: String,
        /// The platforms offered.
        found: Vec<String>,
    },
    /// The image uses something not supported here (zstd layers, another
    /// digest algorithm, an unknown media type).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A layer entry that would write outside the layer or through a
    /// symlink; the whole layer is refused.
    #[error("layer {layer}: entry {entry:?} {reason}; refusing the layer")]
    UnsafeLayerEntry {
        /// The layer.
        layer: Digest,
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A request or option is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The image's `User` cannot be resolved.
    #[error("image user {user:?}: {message}")]
    User {
        /// The `User` as written in the image.
        user: String,
        /// Why it cannot be resolved.
        message: String,
    },
    /// crun is missing or one of its commands failed.
    #[error("{0}")]
    Crun(String),
}

impl OciError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> OciError {
        OciError::Io { context: context.into(), source }
    }
}

/// Container ids: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128 characters
/// (they name files in crun's state directory and cgroups).
pub(crate) fn validate_container_id(id: &str) -> Result<(), OciError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(OciError::Invalid(format!(
            "container id {id:?}: use letters, digits, `_`, `.` and `-`, starting with a letter or digit (at most 128)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(validate_container_id("web-1").is_ok());
        assert!(validate_container_id("a.b_c").is_ok());
        assert!(validate_container_id("").is_err());
        assert!(validate_container_id("../x").is_err());
        assert!(validate_container_id(".hidden").is_err());
        assert!(validate_container_id("a/b").is_err());
        assert!(validate_container_id(&"a".repeat(129)).is_err());
    }
}
