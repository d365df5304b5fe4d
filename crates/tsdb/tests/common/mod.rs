//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use yunbian_tsdb::{FsyncPolicy, Options, SeriesKey};

/// A fresh, empty directory under the system temp dir (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "yunbian-tsdb-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options without automatic retention and with fsync off (tests crash
/// processes, not machines).
pub fn test_options() -> Options {
    Options {
        fsync: FsyncPolicy::Never,
        raw_retention_ms: None,
        max_raw_bytes: None,
        rollup_1m_retention_ms: None,
        rollup_1h_retention_ms: None,
        ..Options::default()
    }
}

pub fn key(metric: &str, tags: &[(&str, &str)]) -> SeriesKey {
    SeriesKey::new(metric, tags.iter().map(|(k, v)| (k.to_string(), v.to_string()))).expect("valid key")
}
