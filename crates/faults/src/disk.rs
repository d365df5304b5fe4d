//! Disk faults: a full disk, and files damaged behind a program's back.
//!
//! - [`TmpfsMount`] mounts a tmpfs of a fixed size (needs root or
//!   `CAP_SYS_ADMIN`) so a test can point a data directory at it and fill it:
//!   [`TmpfsMount::fill`] writes a filler file until about `leave_free` bytes
//!   remain, after which writes fail with `ENOSPC`
//!   ([`io::ErrorKind::StorageFull`]); [`TmpfsMount::unfill`] frees the space
//!   again. The mount is lazily unmounted (`umount -l`) on drop, so open
//!   files do not keep it busy.
//! - [`corrupt_file`] flips bytes in a range (each byte is guaranteed to
//!   change), [`truncate_file`] cuts a file short as a crash during a write
//!   might, and [`garbage_file`] replaces a whole file with random bytes.
//!
//! Each fault is logged at info level under the target `faults`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{info, warn};

use crate::rng::Rng;

/// Name of the filler file [`TmpfsMount::fill`] writes at the mount's root.
pub const FILLER_NAME: &str = ".yunbian-faults-filler";

/// A size-limited tmpfs mounted for the lifetime of this value.
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
    size_bytes: u64,
    mounted: bool,
}

impl TmpfsMount {
    /// Creates `path` (and its parents) and mounts a tmpfs of `size_bytes`
    /// there (rounded up to whole pages by the kernel).
    pub fn mount(path: &Path, size_bytes: u64) -> io::Result<Self> {
        if size_bytes == 0 {
            // tmpfs reads size=0 as "unlimited".
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "tmpfs size must be greater than 0"));
        }
        fs::create_dir_all(path)?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("run mount: {e}")))?;
        if !output.status.success() {
            let kind = if rustix::process::geteuid().is_root() {
                io::ErrorKind::Other
            } else {
                io::ErrorKind::PermissionDenied
            };
            return Err(io::Error::new(
                kind,
                format!(
                    "mount tmpfs at {} ({}): {} (mounting needs root or CAP_SYS_ADMIN)",
                    path.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ));
        }
        info!(target: "faults", fault = "tmpfs", path = %path.display(), size_bytes, "tmpfs mounted");
        Ok(Self { path: path.to_path_buf(), size_bytes, mounted: true })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size asked for at mount time.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes an unprivileged writer can still use.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let stat = rustix::fs::statvfs(&self.path)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Writes (or extends) the filler file until about `leave_free` bytes
    /// remain free, and returns its path. Stops early without error if the
    /// file system fills up first.
    pub fn fill(&self, leave_free: u64) -> io::Result<PathBuf> {
        let filler = self.path.join(FILLER_NAME);
        let mut remaining = self.free_bytes()?.saturating_sub(leave_free);
        info!(target: "faults", fault = "disk_full", path = %self.path.display(), bytes = remaining, leave_free, "filling tmpfs");
        let mut file = OpenOptions::new().create(true).append(true).open(&filler)?;
        let chunk = vec![0xA5; 64 * 1024];
        while remaining > 0 {
            let len = usize::try_from(remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
            match file.write_all(&chunk[..len]) {
                Ok(()) => remaining -= len as u64,
                Err(e) if e.kind() == io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e),
            }
        }
        Ok(filler)
    }

    /// Removes the filler file, if any.
    pub fn unfill(&self) -> io::Result<()> {
        info!(target: "faults", fault = "disk_full", path = %self.path.display(), "tmpfs filler removed");
        match fs::remove_file(self.path.join(FILLER_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unmounts now and reports failure, instead of on drop.
    pub fn unmount(mut self) -> io::Result<()> {
        self.mounted = false;
        umount(&self.path)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(error) = umount(&self.path) {
                warn!(target: "faults", path = %self.path.display(), %error, "cannot unmount tmpfs");
            }
        }
    }
}

fn umount(path: &Path) -> io::Result<()> {
    let output = Command::new("umount").arg("-l").arg(path).output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "umount -l {} ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    info!(target: "faults", path = %path.display(), "tmpfs unmounted");
    Ok(())
}

/// Overwrites `len` bytes at `offset` with garbage drawn from `seed`; every
/// byte in the range changes. The range must lie inside the file.
pub fn corrupt_file(path: &Path, offset: u64, len: usize, seed: u64) -> io::Result<()> {
    info!(target: "faults", fault = "corrupt", path = %path.display(), offset, len, seed, "corrupting file");
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let file_len = file.metadata()?.len();
    if offset.saturating_add(len as u64) > file_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("corrupt {}: range {offset}+{len} ends past the file's {file_len} bytes", path.display()),
        ));
    }
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, offset)?;
    let mut noise = vec![0; len];
    Rng::seeded(seed).fill(&mut noise);
    for (byte, noise) in bytes.iter_mut().zip(noise) {
        // `| 1` makes the mask non-zero, so the byte always changes.
        *byte ^= noise | 1;
    }
    file.write_all_at(&bytes, offset)?;
    file.sync_data()
}

/// Sets the file's length to `len`: cuts it short, or extends it with zeros.
pub fn truncate_file(path: &Path, len: u64) -> io::Result<()> {
    info!(target: "faults", fault = "truncate", path = %path.display(), len, "truncating file");
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_data()
}

/// Replaces the file's content with `len` random bytes (creating it if
/// needed).
pub fn garbage_file(path: &Path, len: usize) -> io::Result<()> {
    info!(target: "faults", fault = "garbage", path = %path.display(), len, "replacing file with garbage");
    let mut garbage = vec![0; len];
    Rng::from_entropy().fill(&mut garbage);
    let mut file = File::create(path)?;
    file.write_all(&garbage)?;
    file.sync_data()
}
