//! File helpers: atomic replace (write a temporary name, fsync, rename,
//! fsync the directory) and directory sync.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::Error;

/// Syncs a directory so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("sync directory", dir))
}

/// Writes `bytes` to `path` atomically: a reader (or a crash) sees the old
/// file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("sync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}
