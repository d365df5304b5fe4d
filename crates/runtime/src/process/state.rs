//! On-disk layout and records of instances.
//!
//! ```text
//! <dir>/<instance>/state.json     StateRecord (written atomically: tmp + rename)
//! <dir>/<instance>/stdout.log     combined stdout/stderr, O_APPEND
//! <dir>/<instance>/stdout.log.1   previous log after rotation
//! <dir>/<instance>/work/          default working directory
//! ```
//!
//! The record holds everything needed to re-adopt or restart the instance
//! after an agent restart: the spec, and the pid plus its `/proc` start time
//! (pid alone could have been reused) and the boot id.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use yunbian_api::{AppInstance, AppInstanceStatus};

/// Version of the [`StateRecord`] format.
pub(crate) const STATE_VERSION: u32 = 1;

/// Paths of one instance's files.
#[derive(Debug, Clone)]
pub(crate) struct InstancePaths {
    /// `<dir>/<instance>`.
    pub dir: PathBuf,
    /// `state.json`.
    pub state: PathBuf,
    /// `stdout.log`.
    pub log: PathBuf,
    /// `stdout.log.1`.
    pub log_old: PathBuf,
    /// `work/`.
    pub work: PathBuf,
    /// `termination.log`: why the workload stopped, in its own words
    /// (`$YUNBIAN_TERMINATION_LOG`, see [`super::termination`]).
    pub termination: PathBuf,
}

impl InstancePaths {
    /// The paths of instance `name` under `root`.
    pub fn new(root: &Path, name: &str) -> InstancePaths {
        let dir = root.join(name);
        InstancePaths {
            state: dir.join("state.json"),
            log: dir.join("stdout.log"),
            log_old: dir.join("stdout.log.1"),
            work: dir.join("work"),
            termination: dir.join("termination.log"),
            dir,
        }
    }
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StateRecord {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The instance as last ensured (spec included).
    pub instance: AppInstance,
    /// Template hash the current process was started from.
    pub template_hash: String,
    /// Pid of the current run, while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// `/proc/<pid>/stat` field 22 of that process.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Boot id when the process was started.
    #[serde(default)]
    pub boot_id: String,
    /// Unix seconds when the current run started.
    #[serde(default)]
    pub started_unix: i64,
    /// Last reported status (phase, reason, restart count, startedAt, …).
    pub status: AppInstanceStatus,
}

/// Writes `rec` to `paths.state` atomically.
pub(crate) fn save(paths: &InstancePaths, rec: &StateRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
    let tmp = paths.dir.join("state.json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
    }
    fs::rename(&tmp, &paths.state)
}

/// Reads a record; any problem (missing, corrupt, other version) is an error
/// message.
pub(crate) fn load(path: &Path) -> Result<StateRecord, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let rec: StateRecord = serde_json::from_slice(&bytes).map_err(|e| format!("corrupt {}: {e}", path.display()))?;
    if rec.version != STATE_VERSION {
        return Err(format!("{}: unsupported record version {}", path.display(), rec.version));
    }
    Ok(rec)
}

/// Whether `name` is usable as an instance directory and cgroup name.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1.a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
    }

    #[test]
    fn save_and_load_round_trip_and_reject_garbage() {
        let root = std::env::temp_dir().join(format!("yunbian-state-test-{}", std::process::id()));
        let paths = InstancePaths::new(&root, "i");
        fs::create_dir_all(&paths.dir).expect("mkdir");
        let rec = StateRecord {
            version: STATE_VERSION,
            instance: AppInstance::new("i", Default::default()),
            template_hash: "h".into(),
            pid: Some(42),
            start_time: Some(7),
            boot_id: "b".into(),
            started_unix: 1,
            status: AppInstanceStatus { restart_count: 3, ..Default::default() },
        };
        save(&paths, &rec).expect("save");
        assert_eq!(load(&paths.state).expect("load"), rec);
        fs::write(&paths.state, b"{not json").expect("write");
        assert!(load(&paths.state).is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
