//! Helpers shared by the cloud's integration tests.

use std::path::PathBuf;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    /// `yunbian-cloud-{name}-{pid}-{nanos}`.
    pub fn new(name: &str) -> TestDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("yunbian-cloud-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
