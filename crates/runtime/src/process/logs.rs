//! Instance log files: copytruncate rotation, tail and follow.
//!
//! Workloads write straight into `stdout.log` through an `O_APPEND` file
//! descriptor they keep even when the agent dies, so the file cannot be
//! renamed away under them. Rotation therefore copies it to `stdout.log.1`
//! (replacing the previous copy) and truncates it in place; thanks to
//! `O_APPEND` the writer continues at the new end. Lines written between the
//! copy and the truncation are lost, which is the accepted price of
//! copytruncate. Disk use per instance stays around twice the cap.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::time::Duration;

use tokio::sync::mpsc;

use super::state::InstancePaths;

/// Size of the chunks sent to log readers.
const CHUNK: usize = 64 * 1024;
/// How often `follow` looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Rotates the log if it is larger than `max_bytes`. Returns whether it did.
pub(crate) fn rotate_if_needed(paths: &InstancePaths, max_bytes: u64) -> io::Result<bool> {
    let len = match fs::metadata(&paths.log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    let tmp = paths.dir.join("stdout.log.1.tmp");
    fs::copy(&paths.log, &tmp)?;
    fs::rename(&tmp, &paths.log_old)?;
    fs::OpenOptions::new().write(true).open(&paths.log)?.set_len(0)?;
    Ok(true)
}

/// The retained log (`stdout.log.1` then `stdout.log`), or its last `tail`
/// lines, and the length of `stdout.log` that was read (where following
/// continues).
pub(crate) fn read_retained(paths: &InstancePaths, tail: Option<usize>) -> io::Result<(Vec<u8>, u64)> {
    let current = read_or_empty(&paths.log)?;
    let pos = current.len() as u64;
    if let Some(n) = tail {
        if let Some(start) = tail_start(&current, n) {
            return Ok((current[start..].to_vec(), pos));
        }
    }
    let mut all = read_or_empty(&paths.log_old)?;
    all.extend_from_slice(&current);
    let start = tail.and_then(|n| tail_start(&all, n)).unwrap_or(0);
    Ok((all.split_off(start), pos))
}

fn read_or_empty(path: &std::path::Path) -> io::Result<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Start offset of the last `n` lines of `data`, or `None` when `data` holds
/// fewer than `n` complete lines before its beginning (so earlier data may
/// be needed). A final line without newline counts as a line.
fn tail_start(data: &[u8], n: usize) -> Option<usize> {
    if n == 0 {
        return Some(data.len());
    }
    // Ignore a trailing newline: it ends the last line, it does not start one.
    let end = if data.last() == Some(&b'\n') { data.len() - 1 } else { data.len() };
    let mut seen = 0;
    for (i, &b) in data[..end].iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Sends `data` in chunks; `false` when the receiver is gone.
pub(crate) async fn send_chunks(out: &mpsc::Sender<Vec<u8>>, data: &[u8]) -> bool {
    for c in data.chunks(CHUNK) {
        if out.send(c.to_vec()).await.is_err() {
            return false;
        }
    }
    true
}

/// Streams output appended to `stdout.log` after offset `pos`, until the
/// receiver is dropped or `gone()` says the instance was removed. When the
/// file shrinks (rotated), the rest of what was being read is taken from
/// `stdout.log.1` and reading restarts at offset 0.
pub(crate) async fn follow(
    paths: &InstancePaths,
    mut pos: u64,
    out: &mpsc::Sender<Vec<u8>>,
    gone: impl Fn() -> bool,
) -> io::Result<()> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = out.closed() => return Ok(()),
        }
        if gone() {
            return Ok(());
        }
        let len = match fs::metadata(&paths.log) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if len < pos {
            if let Ok(rest) = read_from(&paths.log_old, pos, usize::MAX) {
                if !send_chunks(out, &rest).await {
                    return Ok(());
                }
            }
            pos = 0;
        }
        // Read in bounded steps so a fast writer cannot make us buffer a lot.
        loop {
            let data = read_from(&paths.log, pos, 1024 * 1024)?;
            if data.is_empty() {
                break;
            }
            pos += data.len() as u64;
            if !send_chunks(out, &data).await {
                return Ok(());
            }
        }
    }
}

/// Up to `limit` bytes of `path` from offset `pos` (empty past the end or if
/// missing).
fn read_from(path: &std::path::Path, pos: u64, limit: usize) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = Vec::new();
    f.take(u64::try_from(limit).unwrap_or(u64::MAX)).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_start_counts_lines() {
        let d = b"a\nb\nc\n";
        assert_eq!(tail_start(d, 1), Some(4));
        assert_eq!(tail_start(d, 2), Some(2));
        assert_eq!(tail_start(d, 3), None);
        assert_eq!(tail_start(d, 0), Some(6));
        let partial = b"a\nb\nc";
        assert_eq!(tail_start(partial, 1), Some(4));
        assert_eq!(tail_start(b"", 1), None);
    }

    #[test]
    fn rotation_and_retained_reads() {
        let root = std::env::temp_dir().join(format!("yunbian-logs-test-{}", std::process::id()));
        let paths = InstancePaths::new(&root, "i");
        fs::create_dir_all(&paths.dir).expect("mkdir");
        fs::write(&paths.log, b"1\n2\n3\n").expect("write");
        assert!(!rotate_if_needed(&paths, 100).expect("rotate"));
        assert!(rotate_if_needed(&paths, 4).expect("rotate"));
        assert_eq!(fs::read(&paths.log_old).expect("old"), b"1\n2\n3\n");
        assert_eq!(fs::metadata(&paths.log).expect("meta").len(), 0);
        fs::write(&paths.log, b"4\n5\n").expect("write");
        assert_eq!(read_retained(&paths, None).expect("read").0, b"1\n2\n3\n4\n5\n");
        assert_eq!(read_retained(&paths, Some(1)).expect("read").0, b"5\n");
        assert_eq!(read_retained(&paths, Some(3)).expect("read").0, b"3\n4\n5\n");
        assert_eq!(read_retained(&paths, Some(10)).expect("read"), (b"1\n2\n3\n4\n5\n".to_vec(), 4));
        let _ = fs::remove_dir_all(&root);
    }
}
