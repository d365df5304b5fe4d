//! Resource limits through cgroups (v1 or v2), detected once at start-up.
//!
//! Layout: `<controller root>/<parent>/<instance>` where `parent` defaults to
//! `yunbian`. v1 uses the `memory` hierarchy (`memory.limit_in_bytes`, plus
//! `memory.memsw.limit_in_bytes` when present so swap cannot bypass the
//! limit) and, if available, the `cpu` hierarchy (`cpu.cfs_quota_us` over a
//! 100 ms `cpu.cfs_period_us`). v2 uses one directory with `memory.max`,
//! `memory.swap.max` and `cpu.max`.
//!
//! Detection order: a pure v2 mount (`<root>/cgroup.controllers`), then a v1
//! memory hierarchy (`<root>/memory`), then a hybrid v2 mount
//! (`<root>/unified`) that actually has the memory controller. If none is
//! usable (missing, read-only, not root), limits are reported as not
//! enforced, with the reason, and instances run without them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::LimitsSupport;

/// CFS period used for cpu quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The controller hierarchies in use.
#[derive(Debug, Clone)]
enum Layout {
    /// v1: `<memory root>/<parent>` and maybe `<cpu root>/<parent>`.
    V1 { memory: PathBuf, cpu: Option<PathBuf> },
    /// v2: `<unified root>/<parent>`, with `cpu` when that controller exists.
    V2 { parent: PathBuf, cpu: bool },
}

/// The detected cgroup support of this node.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    layout: Option<Layout>,
    support: LimitsSupport,
}

impl Cgroups {
    /// No cgroups (disabled by configuration or unavailable).
    pub fn disabled(note: impl Into<String>) -> Cgroups {
        Cgroups { layout: None, support: LimitsSupport { enforced: false, note: note.into() } }
    }

    /// Detects cgroups under `root` (normally `/sys/fs/cgroup`) and prepares
    /// `<root>/…/<parent>`.
    pub fn detect(root: &Path, parent: &str) -> Cgroups {
        if root.join("cgroup.controllers").is_file() {
            return match setup_v2(root, parent) {
                Ok(c) => c,
                Err(why) => Cgroups::disabled(format!("{why}; limits are not enforced")),
            };
        }
        let memory_root = root.join("memory");
        if memory_root.join("memory.limit_in_bytes").is_file() {
            return match setup_v1(root, &memory_root, parent) {
                Ok(c) => c,
                Err(why) => Cgroups::disabled(format!("{why}; limits are not enforced")),
            };
        }
        let unified = root.join("unified");
        if unified.join("cgroup.controllers").is_file() {
            return match setup_v2(&unified, parent) {
                Ok(c) => c,
                Err(why) => Cgroups::disabled(format!("{why}; limits are not enforced")),
            };
        }
        Cgroups::disabled(format!(
            "no cgroup v1 memory controller or cgroup v2 hierarchy found under {}; limits are not enforced",
            root.display()
        ))
    }

    /// How limits are enforced.
    pub fn support(&self) -> LimitsSupport {
        self.support.clone()
    }

    /// The cgroup of instance `name` (paths only; nothing is created).
    pub fn instance(&self, name: &str) -> Option<InstanceCgroup> {
        match self.layout.as_ref()? {
            Layout::V1 { memory, cpu } => {
                Some(InstanceCgroup { v2: false, memory: memory.join(name), cpu: cpu.as_ref().map(|c| c.join(name)) })
            }
            Layout::V2 { parent, cpu } => {
                Some(InstanceCgroup { v2: true, memory: parent.join(name), cpu: cpu.then(|| parent.join(name)) })
            }
        }
    }
}

/// Creates `dir` and checks that a child cgroup can be made in it (an
/// existing directory on a read-only mount passes `create_dir_all`).
fn check_writable(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
    let probe = dir.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&probe)
        .or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
        .map_err(|e| format!("cgroup {} is not writable: {e}", dir.display()))?;
    let _ = fs::remove_dir(&probe);
    Ok(())
}

fn setup_v1(root: &Path, memory_root: &Path, parent: &str) -> Result<Cgroups, String> {
    let memory = memory_root.join(parent);
    check_writable(&memory).map_err(|e| format!("cgroup v1: {e}"))?;
    let cpu_root = root.join("cpu");
    let (cpu, cpu_note) = if cpu_root.join("cpu.cfs_quota_us").is_file() {
        let dir = cpu_root.join(parent);
        match check_writable(&dir) {
            Ok(()) => (Some(dir.clone()), format!("cpu quota via {}", dir.display())),
            Err(e) => (None, format!("cpu quota not enforced ({e})")),
        }
    } else {
        (None, format!("cpu quota not enforced (no cpu controller at {})", cpu_root.display()))
    };
    let note = format!("cgroup v1: memory limits via {}, {cpu_note}", memory.display());
    Ok(Cgroups { layout: Some(Layout::V1 { memory, cpu }), support: LimitsSupport { enforced: true, note } })
}

fn setup_v2(unified: &Path, parent: &str) -> Result<Cgroups, String> {
    let controllers = fs::read_to_string(unified.join("cgroup.controllers"))
        .map_err(|e| format!("cgroup v2 at {}: {e}", unified.display()))?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if !has("memory") {
        return Err(format!("cgroup v2 at {} has no memory controller", unified.display()));
    }
    let cpu = has("cpu");
    let enable = if cpu { "+memory +cpu" } else { "+memory" };
    fs::write(unified.join("cgroup.subtree_control"), enable)
        .map_err(|e| format!("cgroup v2: cannot enable controllers in {}: {e}", unified.display()))?;
    let dir = unified.join(parent);
    check_writable(&dir).map_err(|e| format!("cgroup v2: {e}"))?;
    fs::write(dir.join("cgroup.subtree_control"), enable)
        .map_err(|e| format!("cgroup v2: cannot enable controllers in {}: {e}", dir.display()))?;
    let cpu_note = if cpu { "cpu quota via cpu.max" } else { "cpu quota not enforced (no cpu controller)" };
    let note = format!("cgroup v2: memory limits via {} (memory.max), {cpu_note}", dir.display());
    Ok(Cgroups { layout: Some(Layout::V2 { parent: dir, cpu }), support: LimitsSupport { enforced: true, note } })
}

/// The cgroup directories of one instance.
#[derive(Debug, Clone)]
pub(crate) struct InstanceCgroup {
    v2: bool,
    /// v1 memory cgroup, or the v2 cgroup.
    memory: PathBuf,
    /// v1 cpu cgroup, or (v2) the same directory as `memory` when cpu exists.
    cpu: Option<PathBuf>,
}

impl InstanceCgroup {
    /// Distinct directories (v2 has one).
    fn dirs(&self) -> Vec<&Path> {
        let mut v = vec![self.memory.as_path()];
        if let Some(c) = &self.cpu {
            if c != &self.memory {
                v.push(c.as_path());
            }
        }
        v
    }

    /// Creates the directories and writes the limits (0 = unlimited).
    pub fn setup(&self, memory_bytes: u64, cpu_millis: u64) -> Result<(), String> {
        for d in self.dirs() {
            fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let w = |dir: &Path, file: &str, value: &str| -> Result<(), String> {
            fs::write(dir.join(file), value)
                .map_err(|e| format!("cannot write {value:?} to {}: {e}", dir.join(file).display()))
        };
        if self.v2 {
            let mem = if memory_bytes > 0 { memory_bytes.to_string() } else { "max".into() };
            w(&self.memory, "memory.max", &mem)?;
            // No swap behind the limit's back; best effort (no swap accounting is fine).
            let _ = w(&self.memory, "memory.swap.max", if memory_bytes > 0 { "0" } else { "max" });
            if let Some(dir) = &self.cpu {
                let quota = if cpu_millis > 0 { cpu_quota_us(cpu_millis).to_string() } else { "max".into() };
                w(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            }
        } else {
            let mem = if memory_bytes > 0 { memory_bytes.to_string() } else { "-1".into() };
            let has_memsw = self.memory.join("memory.memsw.limit_in_bytes").is_file();
            // memsw must stay >= the memory limit: lift it, set the limit, then pin it.
            if has_memsw {
                let _ = w(&self.memory, "memory.memsw.limit_in_bytes", "-1");
            }
            w(&self.memory, "memory.limit_in_bytes", &mem)?;
            if has_memsw && memory_bytes > 0 {
                let _ = w(&self.memory, "memory.memsw.limit_in_bytes", &mem);
            }
            if let Some(dir) = &self.cpu {
                w(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                let quota = if cpu_millis > 0 { cpu_quota_us(cpu_millis).to_string() } else { "-1".into() };
                w(dir, "cpu.cfs_quota_us", &quota)?;
            }
        }
        Ok(())
    }

    /// `cgroup.procs` of every directory, opened for writing, for the child
    /// to join itself before exec. Directories that cannot be opened are
    /// skipped.
    pub fn procs_files(&self) -> Vec<fs::File> {
        self.dirs()
            .into_iter()
            .filter_map(|d| fs::OpenOptions::new().write(true).open(d.join("cgroup.procs")).ok())
            .collect()
    }

    /// Moves `pid` into every directory (a no-op when it already joined).
    pub fn add_pid(&self, pid: u32) -> Result<(), String> {
        for d in self.dirs() {
            let f = d.join("cgroup.procs");
            fs::write(&f, pid.to_string()).map_err(|e| format!("cannot add pid {pid} to {}: {e}", f.display()))?;
        }
        Ok(())
    }

    /// Pids in the memory cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.memory.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Counter of OOM kills in the cgroup (v1 falls back to `memory.failcnt`
    /// on kernels without `oom_kill` in `memory.oom_control`).
    pub fn oom_kills(&self) -> u64 {
        if self.v2 {
            let events = fs::read_to_string(self.memory.join("memory.events")).unwrap_or_default();
            return keyed_value(&events, "oom_kill").unwrap_or(0);
        }
        let ctl = fs::read_to_string(self.memory.join("memory.oom_control")).unwrap_or_default();
        keyed_value(&ctl, "oom_kill").unwrap_or_else(|| {
            fs::read_to_string(self.memory.join("memory.failcnt")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
        })
    }

    /// Where this cgroup accounts CPU time and memory (paths only).
    pub fn counters(&self) -> CgroupCounters {
        let cpu = if self.v2 {
            // `cpu.stat` with `usage_usec` is a core file of every v2 cgroup.
            Some(CpuCounter::StatUsec(self.memory.join("cpu.stat")))
        } else {
            // v1 accounts CPU time in the cpuacct controller, which is often
            // co-mounted with cpu (`cpu,cpuacct`); when it is not, there is
            // no counter and the processes' own times are summed instead.
            self.cpu.as_ref().map(|c| c.join("cpuacct.usage")).filter(|p| p.is_file()).map(CpuCounter::AcctNanos)
        };
        let (usage, inactive_file_key) = if self.v2 {
            ("memory.current", "inactive_file")
        } else {
            ("memory.usage_in_bytes", "total_inactive_file")
        };
        CgroupCounters {
            cpu,
            memory_usage: self.memory.join(usage),
            memory_stat: self.memory.join("memory.stat"),
            inactive_file_key,
            procs: self.memory.join("cgroup.procs"),
        }
    }

    /// Removes the directories. Fails (`EBUSY`) while processes remain.
    pub fn remove(&self) -> io::Result<()> {
        let mut result = Ok(());
        for d in self.dirs() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// Whether any directory still exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }
}

/// A cgroup's cumulative CPU time counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CpuCounter {
    /// v2 `cpu.stat`, key `usage_usec` (microseconds).
    StatUsec(PathBuf),
    /// v1 `cpuacct.usage` (nanoseconds).
    AcctNanos(PathBuf),
}

impl CpuCounter {
    /// The file to read.
    pub fn path(&self) -> &Path {
        match self {
            CpuCounter::StatUsec(p) | CpuCounter::AcctNanos(p) => p,
        }
    }

    /// Microseconds of CPU time in the content of [`path`](Self::path).
    pub fn parse_usec(&self, content: &str) -> Option<u64> {
        match self {
            CpuCounter::StatUsec(_) => keyed_value(content, "usage_usec"),
            CpuCounter::AcctNanos(_) => content.trim().parse::<u64>().ok().map(|ns| ns / 1000),
        }
    }
}

/// The files where a cgroup accounts an instance's CPU time and memory.
#[derive(Debug, Clone)]
pub(crate) struct CgroupCounters {
    /// Cumulative CPU time, when the hierarchy has a counter.
    pub cpu: Option<CpuCounter>,
    /// `memory.current` (v2) or `memory.usage_in_bytes` (v1).
    pub memory_usage: PathBuf,
    /// `memory.stat`, for the inactive file cache left out of usage.
    pub memory_stat: PathBuf,
    /// The key of the inactive file cache in `memory.stat`.
    pub inactive_file_key: &'static str,
    /// `cgroup.procs` of the memory cgroup.
    pub procs: PathBuf,
}

/// Memory in use: `usage` minus the inactive file cache (what the kernel
/// reclaims first; the kubelet's "working set").
pub(crate) fn working_set(usage: &str, stat: &str, inactive_file_key: &str) -> Option<u64> {
    let usage: u64 = usage.trim().parse().ok()?;
    Some(usage.saturating_sub(keyed_value(stat, inactive_file_key).unwrap_or(0)))
}

/// Quota in µs per [`CPU_PERIOD_US`] for `millis` millicores (kernel minimum 1000).
fn cpu_quota_us(millis: u64) -> u64 {
    (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)
}

/// Value of the `key N` line of a flat-keyed cgroup file.
fn keyed_value(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        if it.next()? != key {
            return None;
        }
        it.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keyed_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(keyed_value("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(keyed_value("oom_kill x\n", "oom_kill"), None);
    }

    #[test]
    fn parses_usage_counters() {
        let v2 = CpuCounter::StatUsec(PathBuf::from("cpu.stat"));
        assert_eq!(v2.parse_usec("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n"), Some(123_456));
        assert_eq!(v2.parse_usec("nr_periods 0\n"), None);
        let v1 = CpuCounter::AcctNanos(PathBuf::from("cpuacct.usage"));
        assert_eq!(v1.parse_usec("5000123456\n"), Some(5_000_123));
        assert_eq!(v1.parse_usec("garbage"), None);
        let stat = "cache 8192\ninactive_file 4096\ntotal_inactive_file 8192\n";
        assert_eq!(working_set("1048576\n", stat, "inactive_file"), Some(1_044_480));
        assert_eq!(working_set("1048576", stat, "total_inactive_file"), Some(1_040_384));
        assert_eq!(working_set("1000", "inactive_file 4096", "inactive_file"), Some(0));
        assert_eq!(working_set("1000", "", "inactive_file"), Some(1000));
        assert_eq!(working_set("max", stat, "inactive_file"), None);
    }

    #[test]
    fn cpu_quota() {
        assert_eq!(cpu_quota_us(1000), 100_000);
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }

    #[test]
    fn missing_hierarchy_is_not_enforced() {
        let root = std::env::temp_dir().join(format!("yunbian-cg-none-{}", std::process::id()));
        fs::create_dir_all(&root).expect("mkdir");
        let c = Cgroups::detect(&root, "yunbian");
        assert!(!c.support().enforced);
        assert!(c.support().note.contains("no cgroup"), "{}", c.support().note);
        assert!(c.instance("x").is_none());
        let _ = fs::remove_dir_all(&root);
    }
}
