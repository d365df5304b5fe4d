//! Assembling a container's root file system from cached layers.
//!
//! Each layer directory is applied in order onto the rootfs, the way
//! overlayfs would present them merged: a directory merges with the one
//! below; any other entry replaces what was there; `.wh.<name>` deletes
//! `<name>` from the layers below; a directory holding `.wh..wh..opq` first
//! loses everything the layers below put in it. Other `.wh..wh.` names (aufs
//! bookkeeping) are ignored.
//!
//! Files are *copied* (`copy_file_range`, which clones extents on
//! btrfs/xfs), never hard-linked to the cache: the container may write to
//! any file of its rootfs, and through a shared inode it would change the
//! cache and every other container. Hard links inside one layer stay hard
//! links in the rootfs. Nothing is followed on either side: entries are
//! inspected with `lstat`, files created with `O_EXCL`, and what is in the
//! way is removed first.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::layer::{chown_quiet, inode, remove_any, set_owner_and_mode, OPAQUE_WHITEOUT, WHITEOUT_PREFIX};

/// Applies `layers` (base first) onto `rootfs`, which must exist.
pub(crate) fn assemble(layers: &[PathBuf], rootfs: &Path) -> io::Result<()> {
    for layer in layers {
        let mut links = HashMap::new();
        apply_dir(layer, rootfs, &mut links)
            .map_err(|e| io::Error::new(e.kind(), format!("apply layer {}: {e}", layer.display())))?;
    }
    Ok(())
}

/// Applies the layer directory `src` onto the rootfs directory `dst`.
fn apply_dir(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(src)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    let is_whiteout = |n: &std::ffi::OsStr| n.to_str().is_some_and(|s| s.starts_with(WHITEOUT_PREFIX));
    if names.iter().any(|n| n == OPAQUE_WHITEOUT) {
        for e in fs::read_dir(dst)? {
            remove_any(&e?.path())?;
        }
    }
    for name in names.iter().filter(|n| is_whiteout(n)) {
        let Some(s) = name.to_str() else { continue };
        if s.starts_with(".wh..wh.") {
            continue;
        }
        let hidden = &s[WHITEOUT_PREFIX.len()..];
        if !hidden.is_empty() && hidden != "." && hidden != ".." && !hidden.contains('/') {
            remove_any(&dst.join(hidden))?;
        }
    }
    for name in names.iter().filter(|n| !is_whiteout(n)) {
        let from = src.join(name);
        let to = dst.join(name);
        let meta = fs::symlink_metadata(&from)?;
        let existing = fs::symlink_metadata(&to).ok();
        let ft = meta.file_type();
        if ft.is_dir() {
            if existing.as_ref().is_none_or(|m| !m.file_type().is_dir()) {
                if existing.is_some() {
                    remove_any(&to)?;
                }
                fs::create_dir(&to)?;
            }
            apply_dir(&from, &to, links)?;
            set_owner_and_mode(&to, meta.uid().into(), meta.gid().into(), meta.permissions().mode())?;
            continue;
        }
        if existing.is_some() {
            remove_any(&to)?;
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            chown_quiet(&to, meta.uid().into(), meta.gid().into())?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&inode(&meta)) {
                    if fs::hard_link(first, &to).is_ok() {
                        continue;
                    }
                }
                links.insert(inode(&meta), to.clone());
            }
            copy_file(&from, &to, &meta)?;
        }
        // Layers hold nothing else (special files are skipped when unpacking).
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let mut src = fs::File::open(from)?;
    let mut dst = fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    io::copy(&mut src, &mut dst)?;
    dst.set_modified(meta.modified()?)?;
    drop(dst);
    set_owner_and_mode(to, meta.uid().into(), meta.gid().into(), meta.permissions().mode())
}
