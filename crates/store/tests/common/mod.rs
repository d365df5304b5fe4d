//! Helpers shared by the store tests.
#![allow(dead_code)]

#[macro_use]
pub mod conformance;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty, uniquely named directory.
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("yunbian-store-{label}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The store file inside it.
    pub fn db(&self) -> PathBuf {
        self.0.join("store.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small object value.
pub fn obj(name: &str, v: i64) -> Value {
    json!({"apiVersion": "yunbian.io/v1", "metadata": {"name": name}, "spec": {"v": v}})
}

/// `value` with `metadata.resourceVersion` set, as the store stores it.
pub fn with_rv(mut value: Value, rv: u64) -> Value {
    value["metadata"]["resourceVersion"] = json!(rv);
    value
}
