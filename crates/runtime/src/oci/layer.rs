//! The layer cache: each layer unpacked once per digest, shared by every
//! bundle that uses it.
//!
//! On disk (the cache directory is made mode 0700: layers hold set-uid
//! files owned by the image's users):
//!
//! ```text
//! <cache>/layers/sha256/<hex>/   one complete unpacked layer (never modified)
//! <cache>/tmp/<hex>.<pid>.<n>/   unpacks in progress, by process <pid>
//! ```
//!
//! Several processes may share a cache (each `yunbian shim oci` opens it):
//! [`LayerCache::open`] removes only the unpacks of processes that are gone.
//!
//! A layer is unpacked into `tmp/<hex>.<pid>.<n>`, its compressed bytes and
//! its uncompressed tar are hashed on the way (they must match the
//! descriptor's digest and the config's `diff_id`), the file system is synced,
//! and the directory is renamed into place: a layer directory exists only
//! complete. Two unpacks of the same layer race harmlessly: the second
//! rename fails and its copy is deleted.
//!
//! Whiteout entries (`.wh.<name>`, `.wh..wh..opq`) are kept in the unpacked
//! layer as empty files; they are applied when a rootfs is assembled from
//! layers (see `rootfs`), since they delete from the layers *below*.
//!
//! Safety of unpacking an untrusted tar: a path with `..` refuses the whole
//! layer; leading `/` and `./` are dropped; an entry whose parent inside the
//! layer is a symlink (or a file) is refused, so nothing is ever written
//! through a symlink; files are created with `O_EXCL`; hard links must point
//! at an earlier entry of the same layer (same checks). Symlink targets are
//! stored as written (absolute targets are normal in images): they are only
//! ever resolved inside the container, never followed on the host. Owners,
//! modes (set-uid included) and file modification times are kept;
//! extended attributes (file capabilities, SELinux labels) are not, and
//! device nodes and fifos are skipped.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use flate2::bufread::GzDecoder;

use super::digest::{Digest, HashingReader};
use super::image::{check_tap, Descriptor, ImageLayout};
use super::OciError;

/// Prefix of whiteout entries.
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// Marks a directory whose lower-layer contents are hidden.
pub(crate) const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Unpacked layers, one directory per layer digest. See the module docs.
#[derive(Debug)]
pub struct LayerCache {
    root: PathBuf,
    seq: AtomicU64,
}

/// A layer present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    /// The unpacked layer directory.
    pub path: PathBuf,
    /// Whether this call unpacked it (false: it was already cached).
    pub unpacked: bool,
}

impl LayerCache {
    /// Opens (creating) the cache in `dir` and removes unpacks left in
    /// `tmp/` by processes that no longer exist.
    pub fn open(dir: &Path) -> Result<LayerCache, OciError> {
        let io_at = |what: &str, p: &Path| {
            let context = format!("{what} {}", p.display());
            move |e| OciError::io(context, e)
        };
        fs::create_dir_all(dir).map_err(io_at("create", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_at("chmod", dir))?;
        let layers = dir.join("layers").join("sha256");
        fs::create_dir_all(&layers).map_err(io_at("create", &layers))?;
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_at("create", &tmp))?;
        for entry in fs::read_dir(&tmp).map_err(io_at("list", &tmp))?.flatten() {
            let name = entry.file_name();
            let owner = name.to_str().and_then(|n| n.split('.').nth(1)).and_then(|p| p.parse::<u32>().ok());
            let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = remove_any(&entry.path());
            }
        }
        Ok(LayerCache { root: dir.to_path_buf(), seq: AtomicU64::new(0) })
    }

    /// Where the layer with (compressed) digest `d` is unpacked.
    pub fn layer_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("layers").join("sha256").join(d.hex())
    }

    /// Makes layer `index` of `image` present in the cache, unpacking it if
    /// needed, and returns its directory.
    pub fn ensure(&self, image: &ImageLayout, index: usize) -> Result<CachedLayer, OciError> {
        let (Some(layer), Some(diff_id)) = (image.layers().get(index), image.diff_ids().get(index)) else {
            return Err(OciError::Invalid(format!("image {} has no layer {index}", image.digest())));
        };
        let path = self.layer_dir(&layer.digest);
        if path.is_dir() {
            return Ok(CachedLayer { path, unpacked: false });
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let staging = self.root.join("tmp").join(format!("{}.{}.{n}", layer.digest.hex(), std::process::id()));
        let result = unpack_layer(image, layer, diff_id, &staging).and_then(|()| {
            let dir = fs::File::open(&staging).map_err(|e| OciError::io(format!("open {}", staging.display()), e))?;
            rustix::fs::syncfs(&dir).map_err(|e| OciError::io(format!("sync {}", staging.display()), e.into()))?;
            Ok(())
        });
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            // A corrupt blob usually shows first as a broken gzip or tar
            // stream: name the real cause.
            if !matches!(e, OciError::UnsafeLayerEntry { .. } | OciError::BlobMismatch { .. }) {
                image.verify_blob(layer)?;
            }
            return Err(e);
        }
        match fs::rename(&staging, &path) {
            Ok(()) => {
                sync_dir(path.parent().unwrap_or(&self.root));
                tracing::info!(layer = %layer.digest, dir = %path.display(), "layer unpacked");
                Ok(CachedLayer { path, unpacked: true })
            }
            // Someone else unpacked it first (the target is a non-empty directory).
            Err(_) if path.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(CachedLayer { path, unpacked: false })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(OciError::io(format!("rename {} to {}", staging.display(), path.display()), e))
            }
        }
    }
}

/// fsync of a directory, so a rename in it is durable. Best effort.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The decompressed stream of a layer.
enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(Box<GzDecoder<R>>),
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
        }
    }
}

impl<R: BufRead> Decoded<R> {
    fn into_inner(self) -> R {
        match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(r) => r.into_inner(),
        }
    }
}

/// Directory metadata applied after the layer's entries are written.
struct DirMeta {
    mode: u32,
    uid: u64,
    gid: u64,
}

fn unpack_layer(image: &ImageLayout, layer: &Descriptor, diff_id: &Digest, staging: &Path) -> Result<(), OciError> {
    let io_err = |what: &str| {
        let context = format!("unpack layer {}: {what}", layer.digest);
        move |e| OciError::io(context, e)
    };
    fs::create_dir_all(staging).map_err(io_err("create staging directory"))?;
    fs::set_permissions(staging, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod"))?;
    let file = image.open_blob(layer)?;
    let (compressed, compressed_tap) = HashingReader::new(file);
    let mut buffered = BufReader::with_capacity(64 * 1024, compressed);
    let head = buffered.fill_buf().map_err(io_err("read"))?;
    let decoded = if head.starts_with(&[0x1f, 0x8b]) {
        Decoded::Gzip(Box::new(GzDecoder::new(buffered)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(OciError::Unsupported(format!("layer {} is zstd-compressed", layer.digest)));
    } else {
        Decoded::Plain(buffered)
    };
    let (uncompressed, diff_tap) = HashingReader::new(decoded);
    let mut archive = tar::Archive::new(uncompressed);
    let mut dirs: BTreeMap<PathBuf, DirMeta> = BTreeMap::new();
    let entries = archive.entries().map_err(io_err("read tar"))?;
    for entry in entries {
        let entry = entry.map_err(io_err("read tar entry"))?;
        unpack_entry(layer, entry, staging, &mut dirs)?;
    }
    // Hash what tar did not need to read (end-of-archive blocks, padding),
    // then whatever follows the compressed stream.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(io_err("read"))?;
    let (uncompressed_digest, _) = diff_tap.finish();
    let mut raw = rest.into_inner().into_inner();
    io::copy(&mut raw, &mut io::sink()).map_err(io_err("read"))?;
    check_tap(layer, compressed_tap.finish())?;
    if uncompressed_digest != *diff_id {
        return Err(OciError::BlobMismatch {
            digest: layer.digest,
            message: format!("uncompressed layer hashes to {uncompressed_digest}, image config says {diff_id}"),
        });
    }
    // Deepest first, so a read-only parent never blocks a child's chmod.
    for (rel, meta) in dirs.iter().rev() {
        let p = staging.join(rel);
        set_owner_and_mode(&p, meta.uid, meta.gid, meta.mode).map_err(io_err("set directory metadata"))?;
    }
    Ok(())
}

/// Normalises a tar path: drops `/` and `.` components, refuses `..`.
/// `Ok(None)` is the layer root itself.
pub(crate) fn clean_entry_path(p: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("contains `..`"),
            Component::Prefix(_) => return Err("has a path prefix"),
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(if out.as_os_str().is_empty() { None } else { Some(out) })
}

/// Creates the missing parents of `rel` under `root`; refuses a parent that
/// exists as anything but a real directory (symlinks included).
fn ensure_parents(root: &Path, rel: &Path) -> Result<(), &'static str> {
    let Some(parent) = rel.parent() else { return Ok(()) };
    let mut at = root.to_path_buf();
    for c in parent.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => return Err("has a symlink among its parent directories"),
            Ok(_) => return Err("has a non-directory among its parent directories"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(|_| "cannot create a parent directory")?;
            }
            Err(_) => return Err("cannot inspect a parent directory"),
        }
    }
    Ok(())
}

/// Removes whatever is at `p` (not following symlinks).
pub(crate) fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// lchown (ignoring EPERM when not root) then chmod, in that order so that
/// set-uid bits survive. `p` must not be a symlink for the chmod.
pub(crate) fn set_owner_and_mode(p: &Path, uid: u64, gid: u64, mode: u32) -> io::Result<()> {
    chown_quiet(p, uid, gid)?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777))
}

/// lchown; an EPERM (unprivileged unpack, e.g. in tests) keeps our owner.
pub(crate) fn chown_quiet(p: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Ok(());
    };
    match std::os::unix::fs::lchown(p, Some(uid), Some(gid)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

fn unpack_entry<R: Read>(
    layer: &Descriptor,
    mut entry: tar::Entry<'_, R>,
    root: &Path,
    dirs: &mut BTreeMap<PathBuf, DirMeta>,
) -> Result<(), OciError> {
    let raw_path =
        entry.path().map_err(|e| OciError::io(format!("layer {}: entry path", layer.digest), e))?.into_owned();
    let unsafe_entry = |reason: &str| OciError::UnsafeLayerEntry {
        layer: layer.digest,
        entry: raw_path.display().to_string(),
        reason: reason.to_string(),
    };
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink()
    {
        return Ok(());
    }
    let rel = match clean_entry_path(&raw_path).map_err(unsafe_entry)? {
        Some(rel) => rel,
        None => return Ok(()), // the layer root (`./`): keep ours
    };
    ensure_parents(root, &rel).map_err(unsafe_entry)?;
    let target = root.join(&rel);
    let header = entry.header();
    let mode = header.mode().unwrap_or(0o644);
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    let mtime = header.mtime().unwrap_or(0);
    let io_err = |what: &str| {
        let context = format!("layer {}: {what} {}", layer.digest, rel.display());
        move |e| OciError::io(context, e)
    };
    let existing = fs::symlink_metadata(&target).ok();
    let is_whiteout = rel.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(WHITEOUT_PREFIX));
    if !(kind.is_dir() && existing.as_ref().is_some_and(|m| m.file_type().is_dir())) && existing.is_some() {
        remove_any(&target).map_err(io_err("replace"))?;
    }
    if is_whiteout {
        fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(io_err("create whiteout"))?;
        return Ok(());
    }
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(io_err("create"))?;
            io::copy(&mut entry, &mut f).map_err(io_err("write"))?;
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)).map_err(io_err("set mtime of"))?;
            drop(f);
            set_owner_and_mode(&target, uid, gid, mode).map_err(io_err("set metadata of"))?;
        }
        tar::EntryType::Directory => {
            if existing.is_none_or(|m| !m.file_type().is_dir()) {
                fs::create_dir(&target).map_err(io_err("create directory"))?;
            }
            dirs.insert(rel, DirMeta { mode, uid, gid });
        }
        tar::EntryType::Symlink => {
            let link = entry
                .link_name()
                .map_err(io_err("read link of"))?
                .ok_or_else(|| unsafe_entry("is a symlink without a target"))?;
            std::os::unix::fs::symlink(&link, &target).map_err(io_err("create symlink"))?;
            chown_quiet(&target, uid, gid).map_err(io_err("chown"))?;
        }
        tar::EntryType::Link => {
            let link = entry
                .link_name()
                .map_err(io_err("read link of"))?
                .ok_or_else(|| unsafe_entry("is a hard link without a target"))?;
            let link_rel = clean_entry_path(&link)
                .map_err(|why| unsafe_entry(&format!("links to {}, which {why}", link.display())))?
                .ok_or_else(|| unsafe_entry("is a hard link to the layer root"))?;
            ensure_parents(root, &link_rel)
                .map_err(|why| unsafe_entry(&format!("links to {}, which {why}", link.display())))?;
            let source = root.join(&link_rel);
            match fs::symlink_metadata(&source) {
                Ok(m) if !m.file_type().is_dir() => {}
                Ok(_) => return Err(unsafe_entry("is a hard link to a directory")),
                Err(_) => return Err(unsafe_entry("is a hard link to an entry not earlier in this layer")),
            }
            fs::hard_link(&source, &target).map_err(io_err("create hard link"))?;
        }
        other => {
            tracing::debug!(layer = %layer.digest, entry = %rel.display(), kind = ?other, "skipping special file");
        }
    }
    Ok(())
}

/// Identity of a file, to recreate hard links when copying a layer.
pub(crate) fn inode(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        let c = |s: &str| clean_entry_path(Path::new(s));
        assert_eq!(c("./bin/sh"), Ok(Some(PathBuf::from("bin/sh"))));
        assert_eq!(c("/etc/passwd"), Ok(Some(PathBuf::from("etc/passwd"))));
        assert_eq!(c("./"), Ok(None));
        assert_eq!(c("a/../../b"), Err("contains `..`"));
        assert_eq!(c("../x"), Err("contains `..`"));
    }
}
