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
        unavailable_runtimes: Default::default(),
        cpu_model: cpu_model(&read("/proc/cpuinfo")),
        devices: Vec::new(),
        boot_time: boot_time(&read("/proc/stat")),
    }
}

/// The CPU model from `/proc/cpuinfo`: its `model name` (x86, some ARM
/// kernels), else the board's `Model` or `Hardware` line (ARM boards),
/// else the core named from `CPU implementer` / `CPU part` (ARM servers,
/// which say nothing else), else empty.
fn cpu_model(cpuinfo: &str) -> String {
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .filter(|v| !v.is_empty())
    };
    if let Some(v) = field("model name").or_else(|| field("Model")).or_else(|| field("Hardware")) {
        return v;
    }
    match (field("CPU implementer"), field("CPU part")) {
        (Some(imp), Some(part)) => match arm_core(&imp, &part) {
            Some(core) => core.to_string(),
            None => format!("ARM implementer {imp} part {part}"),
        },
        (None, Some(part)) => format!("ARM part {part}"),
        _ => String::new(),
    }
}

/// Arm Ltd. cores by `CPU part` (implementer 0x41), the common ones.
fn arm_core(implementer: &str, part: &str) -> Option<&'static str> {
    if !implementer.eq_ignore_ascii_case("0x41") {
        return None;
    }
    let name = match part.to_ascii_lowercase().as_str() {
        "0xd03" => "ARM Cortex-A53",
        "0xd04" => "ARM Cortex-A35",
        "0xd05" => "ARM Cortex-A55",
        "0xd07" => "ARM Cortex-A57",
        "0xd08" => "ARM Cortex-A72",
        "0xd09" => "ARM Cortex-A73",
        "0xd0a" => "ARM Cortex-A75",
        "0xd0b" => "ARM Cortex-A76",
        "0xd0c" => "ARM Neoverse-N1",
        "0xd40" => "ARM Neoverse-V1",
        "0xd41" => "ARM Cortex-A78",
        "0xd49" => "ARM Neoverse-N2",
        "0xd4f" => "ARM Neoverse-V2",
        _ => return None,
    };
    Some(name)
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

#[cfg(test)]
mod tests {
    use super::*;

    const X86_CPUINFO: &str = "processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
stepping\t: 7
microcode\t: 0x5003604
cpu MHz\t\t: 2095.078
cache size\t: 28160 KB
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
";

    /// A Raspberry Pi 4 on a 64-bit kernel.
    const PI_CPUINFO: &str = "processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03111
Serial\t\t: 10000000e3f5a1b2
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
";

    /// An Ampere Altra / Graviton2 server: cores only.
    const NEOVERSE_CPUINFO: &str = "processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
";

    #[test]
    fn cpu_models_of_x86_and_arm_machines() {
        assert_eq!(cpu_model(X86_CPUINFO), "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz");
        assert_eq!(cpu_model(PI_CPUINFO), "Raspberry Pi 4 Model B Rev 1.1");
        assert_eq!(cpu_model(&PI_CPUINFO.replace("Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n", "")), "BCM2835");
        assert_eq!(cpu_model(NEOVERSE_CPUINFO), "ARM Neoverse-N1");
        assert_eq!(
            cpu_model(&NEOVERSE_CPUINFO.replace("0x41", "0x51")),
            "ARM implementer 0x51 part 0xd0c",
            "an unknown implementer is named by its numbers"
        );
        assert_eq!(cpu_model(""), "");
        assert_eq!(cpu_model("model name\t:\nnonsense without colon\n"), "");
    }

    #[test]
    fn boot_time_from_proc_stat() {
        let stat = "cpu  10132153 290696 3084719 46828483 16683 0 25195 0 0 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 0 0
intr 199292 0 0 0 0 0 0 0
ctxt 1990473
btime 1732170000
processes 2915
procs_running 1
procs_blocked 0
";
        assert_eq!(boot_time(stat), 1_732_170_000);
        assert_eq!(boot_time("cpu 1 2 3\nbtime notanumber\n"), 0);
        assert_eq!(boot_time(""), 0);
    }
}
