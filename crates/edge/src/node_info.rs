//! Facts about this machine and its live usage, read from /proc and statvfs.

use std::path::Path;

use yunbian_api::{NodeInfo, NodeUsage};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

fn meminfo(field: &str) -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// (total, used) bytes of the filesystem holding `dir`.
pub fn disk(dir: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let total = s.f_blocks * s.f_frsize;
            let free = s.f_bfree * s.f_frsize;
            (total, total.saturating_sub(free))
        }
        Err(_) => (0, 0),
    }
}

/// Why the filesystem holding `dir` is short of space, or `None`: less than
/// 100 MiB or 10 % of it available (whichever is less, so small volumes are
/// judged by proportion).
pub fn disk_pressure(dir: &Path) -> Option<String> {
    let s = rustix::fs::statvfs(dir).ok()?;
    let total = s.f_blocks * s.f_frsize;
    let avail = s.f_bavail * s.f_frsize;
    let floor = (100u64 << 20).min(total / 10);
    (total > 0 && avail < floor)
        .then(|| format!("{} free of {} on the data filesystem ({})", mib(avail), mib(total), dir.display()))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Static facts.
pub fn node_info(data_dir: &Path, runtimes: &[&str]) -> NodeInfo {
    NodeInfo {
        hostname: read("/proc/sys/kernel/hostname"),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel: read("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: meminfo("MemTotal"),
        disk_bytes: disk(data_dir).0,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        runtimes: runtimes.iter().map(|s| s.to_string()).collect(),
        cpu_model: cpu_model(&read("/proc/cpuinfo")),
        devices: Vec::new(),
        boot_time: boot_time(&read("/proc/stat")),
    }
}

/// The first `model name` of `/proc/cpuinfo` (x86), else its `Hardware` or
/// `CPU part` line (ARM), else empty.
fn cpu_model(cpuinfo: &str) -> String {
    for key in ["model name", "Hardware", "Model", "CPU part"] {
        let found = cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        });
        if let Some(v) = found.filter(|v| !v.is_empty()) {
            return v;
        }
    }
    String::new()
}

/// `btime` of `/proc/stat`: unix seconds the machine booted.
fn boot_time(stat: &str) -> u64 {
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Samples machine-wide CPU use between calls.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Option<(u64, u64)>, // (busy, total) jiffies
}

impl CpuSampler {
    /// Millicores used since the previous call (0 on the first).
    pub fn sample(&mut self, cpus: u32) -> u64 {
        let line = read("/proc/stat");
        let Some(first) = line.lines().next() else { return 0 };
        let v: Vec<u64> = first.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        if v.len() < 4 {
            return 0;
        }
        let total: u64 = v.iter().sum();
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        let busy = total - idle;
        let out = match self.last {
            Some((b0, t0)) if total > t0 => (busy.saturating_sub(b0)) * 1000 * u64::from(cpus) / (total - t0),
            _ => 0,
        };
        self.last = Some((busy, total));
        out
    }
}

/// Live usage.
pub fn node_usage(data_dir: &Path, cpu: &mut CpuSampler, cpus: u32, instances: u32) -> NodeUsage {
    NodeUsage {
        cpu_millis: cpu.sample(cpus),
        memory_bytes: meminfo("MemTotal").saturating_sub(meminfo("MemAvailable")),
        disk_used_bytes: disk(data_dir).1,
        instances,
        data_outbox: None,
    }
}
