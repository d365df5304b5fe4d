//! Preparing an OCI runtime bundle (`rootfs/` and `config.json`) for one
//! container from an image and the instance's request.
//!
//! On disk (the bundle directory is made mode 0700):
//!
//! ```text
//! <bundle>/rootfs/             the container's writable root (a full copy of the layers)
//! <bundle>/config.json         the runtime spec (see `spec`)
//! <bundle>/yunbian-bundle.json {"version":1,"image":"sha256:…","request":"sha256:…"}
//! ```
//!
//! The stamp is written last, after a `syncfs`, so a bundle with a stamp is
//! complete. A bundle whose stamp names the same image digest and request
//! hash is reused as it is — the container's writes to its rootfs survive
//! restarts, like `docker restart`; anything else is rebuilt from scratch.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::image::ImageLayout;
use super::layer::{chown_quiet, remove_any, sync_dir, LayerCache};
use super::spec::{self, HostFacts};
use super::{validate_container_id, OciError};

/// Bumped whenever the bundle layout or the spec generator changes, so that
/// existing bundles are rebuilt.
const GENERATION: u32 = 1;

const STAMP: &str = "yunbian-bundle.json";

/// What the spec generator needs from the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleRequest {
    /// Container id (the instance name): `[A-Za-z0-9][A-Za-z0-9_.-]*`, at
    /// most 128 characters.
    pub id: String,
    /// Replaces the image's `Cmd` when not empty.
    pub args: Vec<String>,
    /// Replaces the image's `Entrypoint` (and drops its `Cmd`) when not empty.
    pub command: Vec<String>,
    /// Variables set over the image's `Env`.
    pub env: Vec<(String, String)>,
    /// Replaces the image's `WorkingDir` (absolute).
    pub working_dir: Option<String>,
    /// Memory limit in bytes (0: none).
    pub memory_bytes: u64,
    /// CPU limit in millicores (0: none).
    pub cpu_millis: u64,
    /// Per-instance host directory mounted read-write at `/data` (created
    /// if missing, then owned by the container's user).
    pub volume: PathBuf,
    /// Share the host's network namespace (default). Without it the
    /// container has only a loopback interface.
    pub host_network: bool,
}

impl BundleRequest {
    /// A request with the image's defaults, host networking and no limits.
    pub fn new(id: impl Into<String>, volume: PathBuf) -> BundleRequest {
        BundleRequest {
            id: id.into(),
            args: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            memory_bytes: 0,
            cpu_millis: 0,
            volume,
            host_network: true,
        }
    }

    fn validate(&self) -> Result<(), OciError> {
        validate_container_id(&self.id)?;
        if !self.volume.is_absolute() {
            return Err(OciError::Invalid(format!(
                "instance {}: volume {} is not absolute",
                self.id,
                self.volume.display()
            )));
        }
        if let Some((k, _)) = self.env.iter().find(|(k, _)| k.is_empty() || k.contains('=') || k.contains('\0')) {
            return Err(OciError::Invalid(format!("instance {}: invalid environment variable name {k:?}", self.id)));
        }
        Ok(())
    }

    /// sha256 over the request, the host facts in the spec and the
    /// generator version.
    fn hash(&self, host: &HostFacts) -> Digest {
        let json = serde_json::to_vec(&(GENERATION, self, &host.hostname, host.cgroup_namespace)).unwrap_or_default();
        Digest::of(&json)
    }
}

/// What [`prepare_bundle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedBundle {
    /// `<bundle>/rootfs`.
    pub rootfs: PathBuf,
    /// `<bundle>/config.json`.
    pub config: PathBuf,
    /// The bundle was already prepared for this image and request, and
    /// nothing was changed.
    pub reused: bool,
    /// How many layers had to be unpacked into the cache (0: all cached).
    pub layers_unpacked: usize,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    version: u32,
    image: Digest,
    request: Digest,
}

/// Creates (or reuses) the bundle in `bundle_dir`. See the module docs.
/// The container must not be running from this bundle while it is rebuilt.
/// Blocking, and as slow as copying the image: call it on a blocking thread.
pub fn prepare_bundle(
    image: &ImageLayout,
    cache: &LayerCache,
    req: &BundleRequest,
    bundle_dir: &Path,
) -> Result<PreparedBundle, OciError> {
    req.validate()?;
    let io_at = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |e| OciError::io(context, e)
    };
    let rootfs = bundle_dir.join("rootfs");
    let config = bundle_dir.join("config.json");
    let stamp_path = bundle_dir.join(STAMP);
    let host = HostFacts::read();
    let want = Stamp { version: GENERATION, image: image.digest(), request: req.hash(&host) };
    let current: Option<Stamp> = fs::read(&stamp_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if current.as_ref() == Some(&want) && rootfs.is_dir() && config.is_file() {
        return Ok(PreparedBundle { rootfs, config, reused: true, layers_unpacked: 0 });
    }

    fs::create_dir_all(bundle_dir).map_err(io_at("create", bundle_dir))?;
    fs::set_permissions(bundle_dir, fs::Permissions::from_mode(0o700)).map_err(io_at("chmod", bundle_dir))?;
    let mut layer_dirs = Vec::with_capacity(image.layers().len());
    let mut layers_unpacked = 0;
    for i in 0..image.layers().len() {
        let layer = cache.ensure(image, i)?;
        layers_unpacked += usize::from(layer.unpacked);
        layer_dirs.push(layer.path);
    }

    for p in [&stamp_path, &config, &rootfs] {
        remove_any(p).map_err(io_at("remove", p))?;
    }
    let partial = bundle_dir.join("rootfs.partial");
    remove_any(&partial).map_err(io_at("remove", &partial))?;
    fs::create_dir(&partial).map_err(io_at("create", &partial))?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(0o755)).map_err(io_at("chmod", &partial))?;
    super::rootfs::assemble(&layer_dirs, &partial).map_err(io_at("assemble rootfs in", &partial))?;
    fs::rename(&partial, &rootfs).map_err(io_at("rename", &partial))?;

    let run_as = spec::resolve_user(&rootfs, image.config().user.as_deref())?;
    let spec = spec::generate(image.config(), req, &run_as, &host)?;
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| OciError::io("encode config.json", e.into()))?;
    write_atomically(&config, &json).map_err(io_at("write", &config))?;

    if !req.volume.exists() {
        fs::create_dir_all(&req.volume).map_err(io_at("create volume", &req.volume))?;
        chown_quiet(&req.volume, run_as.uid.into(), run_as.gid.into()).map_err(io_at("chown volume", &req.volume))?;
    }

    let dir = fs::File::open(bundle_dir).map_err(io_at("open", bundle_dir))?;
    rustix::fs::syncfs(&dir).map_err(|e| OciError::io(format!("sync {}", bundle_dir.display()), e.into()))?;
    let stamp = serde_json::to_vec(&want).map_err(|e| OciError::io("encode bundle stamp", e.into()))?;
    write_atomically(&stamp_path, &stamp).map_err(io_at("write", &stamp_path))?;
    tracing::info!(
        container = %req.id,
        image = %image.digest(),
        bundle = %bundle_dir.display(),
        layers_unpacked,
        "bundle prepared"
    );
    Ok(PreparedBundle { rootfs, config, reused: false, layers_unpacked })
}

/// Temp file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}
