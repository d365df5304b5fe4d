//! A full tmpfs and damaged files.

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use yunbian_faults::{corrupt_file, garbage_file, truncate_file, TmpfsMount};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
        let path = std::env::temp_dir().join(format!("yunbian-faults-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn is_mounted(path: &std::path::Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let path = path.to_str().expect("utf-8 path");
    mountinfo.lines().any(|line| line.split(' ').nth(4) == Some(path))
}

#[test]
fn filled_tmpfs_fails_writes_with_enospc_until_unfilled() {
    let dir = TempDir::new("tmpfs");
    let mount_point = dir.0.join("data");
    let tmpfs = TmpfsMount::mount(&mount_point, 1 << 20).expect("mount tmpfs (needs root)");
    assert!(is_mounted(&mount_point));
    assert!(tmpfs.free_bytes().expect("statvfs") >= 1 << 20);

    let filler = tmpfs.fill(16 * 1024).expect("fill");
    assert!(filler.starts_with(&mount_point));
    assert!(tmpfs.free_bytes().expect("statvfs") <= 16 * 1024);

    let file = mount_point.join("state.db");
    let error = fs::write(&file, vec![7; 100 * 1024]).expect_err("disk is full");
    assert!(error.kind() == ErrorKind::StorageFull || error.raw_os_error() == Some(28), "{error:?}");

    tmpfs.unfill().expect("unfill");
    fs::write(&file, vec![7; 100 * 1024]).expect("write after unfill");
    assert_eq!(fs::read(&file).expect("read back").len(), 100 * 1024);

    drop(tmpfs);
    assert!(!is_mounted(&mount_point), "unmounted on drop");
}

#[test]
fn corrupt_changes_exactly_the_range() {
    let dir = TempDir::new("corrupt");
    let path = dir.0.join("block");
    let original: Vec<u8> = (0..1000_u32).map(|i| i as u8).collect();
    fs::write(&path, &original).expect("write");

    corrupt_file(&path, 100, 50, 7).expect("corrupt");
    let damaged = fs::read(&path).expect("read");
    assert_eq!(damaged.len(), original.len());
    assert_eq!(damaged[..100], original[..100]);
    assert_eq!(damaged[150..], original[150..]);
    assert!(damaged[100..150].iter().zip(&original[100..150]).all(|(a, b)| a != b));

    let past_end = corrupt_file(&path, 990, 20, 7).expect_err("range past the end");
    assert_eq!(past_end.kind(), ErrorKind::InvalidInput);
}

#[test]
fn truncate_and_garbage() {
    let dir = TempDir::new("truncate");
    let path = dir.0.join("log");
    fs::write(&path, vec![1; 4096]).expect("write");

    truncate_file(&path, 1000).expect("truncate");
    assert_eq!(fs::read(&path).expect("read"), vec![1; 1000]);

    garbage_file(&path, 2048).expect("garbage");
    let garbage = fs::read(&path).expect("read");
    assert_eq!(garbage.len(), 2048);
    assert_ne!(garbage, vec![1; 2048]);
}
