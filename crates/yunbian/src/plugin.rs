//! `yunbian plugin …`: the device plugins shipped with the agent
//! (docs/design/017-device-plugins.md). A plugin runs next to an edge agent
//! and registers what it finds at the agent's device-plugin socket: at
//! start, every `--interval` (the agent counts a plugin silent for 30 s as
//! gone) and so at the latest one interval after a device's health
//! changed. On SIGTERM or Ctrl-C it unregisters and exits.
//!
//! - `plugin nvidia`: NVIDIA GPUs as `nvidia-smi` lists them. Without
//!   `nvidia-smi`, or when it lists no GPU, it registers nothing and says so
//!   once.
//! - `plugin fake`: made-up devices (`--count`, `--unhealthy`), for tests
//!   and demos.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use yunbian_edge::device_plugins::{PluginClient, PluginDevice, Registration};

/// `yunbian plugin …`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// NVIDIA GPUs, as `nvidia-smi` lists them (`yunbian.io/gpu`,
    /// `NVIDIA_VISIBLE_DEVICES`).
    Nvidia(NvidiaArgs),
    /// Made-up devices, for tests and demos.
    Fake(FakeArgs),
}

/// What every plugin takes.
#[derive(Debug, Args, Clone)]
pub struct PluginArgs {
    /// The agent's device-plugin socket (`<data-dir>/device-plugins.sock`).
    #[arg(long, default_value = "yunbian-edge/device-plugins.sock")]
    socket: PathBuf,
    /// How often to register again.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    interval: Duration,
    /// The plugin's name at the agent.
    #[arg(long)]
    name: Option<String>,
    /// The extended resource its devices count towards.
    #[arg(long, default_value = "yunbian.io/gpu")]
    resource: String,
}

/// `yunbian plugin nvidia`.
#[derive(Debug, Args)]
pub struct NvidiaArgs {
    #[command(flatten)]
    common: PluginArgs,
    /// The `nvidia-smi` executable.
    #[arg(long, default_value = "nvidia-smi")]
    nvidia_smi: PathBuf,
    /// Which id the workload is given: the GPU's UUID (stable across
    /// reboots and driver reloads) or its index.
    #[arg(long, value_enum, default_value = "uuid")]
    id: GpuId,
}

/// How GPUs are named to workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuId {
    /// `GPU-8e6c…`.
    Uuid,
    /// `0`, `1`, … (nvidia-smi's order; may change when GPUs are added).
    Index,
}

/// `yunbian plugin fake`.
#[derive(Debug, Args)]
pub struct FakeArgs {
    #[command(flatten)]
    common: PluginArgs,
    /// Devices to register, ids `0` to `count-1`.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// How many of them (the lowest ids) are unhealthy.
    #[arg(long, default_value_t = 0)]
    unhealthy: u32,
    /// A file holding the number of unhealthy devices, read every round
    /// (overrides --unhealthy while it exists): health changes in tests.
    #[arg(long)]
    unhealthy_file: Option<PathBuf>,
    /// The workload variable naming the devices.
    #[arg(long, default_value = "FAKE_VISIBLE_DEVICES")]
    env: String,
    /// The model reported.
    #[arg(long, default_value = "Yunbian Fake Accelerator")]
    model: String,
    /// Memory reported per device.
    #[arg(long, default_value = "1Gi", value_parser = yunbian_api::quantity::parse_memory_bytes)]
    memory: u64,
}

/// Runs a plugin until SIGTERM or Ctrl-C.
pub async fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::Nvidia(a) => {
            let mut source = NvidiaSource { exe: a.nvidia_smi, id: a.id };
            let name = a.common.name.clone().unwrap_or_else(|| "nvidia".into());
            serve(&a.common, name, "NVIDIA_VISIBLE_DEVICES".into(), move || source.query()).await
        }
        PluginCommand::Fake(a) => {
            let name = a.common.name.clone().unwrap_or_else(|| "fake".into());
            let env = a.env.clone();
            serve(&a.common, name, env, move || {
                let unhealthy = a.unhealthy_file.as_deref().and_then(read_count).unwrap_or(a.unhealthy);
                let devices = fake_devices(a.count, unhealthy, &a.model, a.memory);
                async move { Ok(devices) }
            })
            .await
        }
    }
}

/// The number in `path`, if it holds one.
fn read_count(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Devices `0`..`count`, the first `unhealthy` of them unhealthy.
fn fake_devices(count: u32, unhealthy: u32, model: &str, memory: u64) -> Vec<PluginDevice> {
    (0..count)
        .map(|i| PluginDevice {
            id: i.to_string(),
            model: model.to_string(),
            memory_bytes: memory,
            healthy: i >= unhealthy,
        })
        .collect()
}

/// The registration loop: ask `discover` what is there, register it, wait.
/// `discover` failing, or finding nothing, registers nothing (said once
/// per distinct reason).
async fn serve<F, Fut>(args: &PluginArgs, name: String, env: String, mut discover: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<PluginDevice>, String>>,
{
    let client = PluginClient::new(&args.socket);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let mut quiet_reason: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut registered = false;
    tracing::info!(plugin = %name, socket = %args.socket.display(), resource = %args.resource, "device plugin starting");
    loop {
        let mut wait = args.interval;
        match discover().await {
            Ok(devices) if !devices.is_empty() => {
                quiet_reason = None;
                let reg =
                    Registration { name: name.clone(), resource: args.resource.clone(), env: env.clone(), devices };
                match client.register(&reg).await {
                    Ok(r) => {
                        if !registered || last_error.is_some() {
                            tracing::info!(plugin = %name, devices = r.devices, healthy = r.healthy, "registered with the agent");
                        }
                        registered = true;
                        last_error = None;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if last_error.as_deref() != Some(e.as_str()) {
                            tracing::warn!(plugin = %name, error = %e, "cannot register; retrying");
                        }
                        last_error = Some(e);
                        // The agent may be starting: try again soon.
                        wait = wait.min(Duration::from_secs(2));
                    }
                }
            }
            outcome => {
                let why = match outcome {
                    Ok(_) => "no devices found".to_string(),
                    Err(e) => e,
                };
                if quiet_reason.as_deref() != Some(why.as_str()) {
                    tracing::info!(plugin = %name, reason = %why, "registering nothing");
                }
                quiet_reason = Some(why);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    if registered {
        match client.unregister(&name).await {
            Ok(()) => tracing::info!(plugin = %name, "unregistered"),
            Err(e) => tracing::warn!(plugin = %name, error = %e, "unregister"),
        }
    }
    Ok(())
}

/// The `nvidia-smi` query: the fields [`parse_nvidia_smi`] reads.
pub const NVIDIA_QUERY: &str =
    "--query-gpu=index,uuid,name,memory.total,ecc.errors.uncorrected.volatile.total,retired_pages.pending";

/// Longest an `nvidia-smi` run may take (it can hang on a wedged driver).
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(20);

struct NvidiaSource {
    exe: PathBuf,
    id: GpuId,
}

impl NvidiaSource {
    fn query(&mut self) -> impl std::future::Future<Output = Result<Vec<PluginDevice>, String>> {
        let (exe, id) = (self.exe.clone(), self.id);
        async move {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args([NVIDIA_QUERY, "--format=csv,noheader,nounits"]).kill_on_drop(true);
            let out = match tokio::time::timeout(NVIDIA_SMI_TIMEOUT, cmd.output()).await {
                Err(_) => return Err(format!("{} did not answer in {}s", exe.display(), NVIDIA_SMI_TIMEOUT.as_secs())),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("{} is not installed (no NVIDIA driver)", exe.display()))
                }
                Ok(Err(e)) => return Err(format!("run {}: {e}", exe.display())),
                Ok(Ok(o)) => o,
            };
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                let text = String::from_utf8_lossy(&out.stderr);
                let first = text.lines().chain(stdout.lines()).find(|l| !l.trim().is_empty()).unwrap_or("no output");
                return Err(format!("{} failed ({}): {}", exe.display(), out.status, first.trim()));
            }
            let (devices, problems) = parse_nvidia_smi(&stdout, id);
            for p in problems {
                tracing::warn!(line = %p, "nvidia-smi line not understood; skipped");
            }
            Ok(devices)
        }
    }
}

/// The GPUs of `nvidia-smi --query-gpu=index,uuid,name,memory.total,
/// ecc.errors.uncorrected.volatile.total,retired_pages.pending
/// --format=csv,noheader,nounits` output, and the lines it could not read.
///
/// A GPU is unhealthy when it has uncorrected ECC errors since the driver
/// loaded, or pages waiting to be retired (both `[N/A]` / `[Not
/// Supported]` on GPUs without ECC, which count as fine). The name may
/// hold commas: it is whatever lies between the second field and the last
/// three.
pub fn parse_nvidia_smi(csv: &str, id: GpuId) -> (Vec<PluginDevice>, Vec<String>) {
    let (mut devices, mut problems) = (Vec::new(), Vec::new());
    for line in csv.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match parse_gpu_line(line, id) {
            Some(d) => devices.push(d),
            None => problems.push(line.to_string()),
        }
    }
    (devices, problems)
}

fn parse_gpu_line(line: &str, id: GpuId) -> Option<PluginDevice> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    if fields.len() < 6 {
        return None;
    }
    let n = fields.len();
    let (index, uuid) = (fields[0], fields[1]);
    let name = fields[2..n - 3].join(", ");
    let (memory, ecc, retired) = (fields[n - 3], fields[n - 2], fields[n - 1]);
    index.parse::<u32>().ok()?;
    if !uuid.starts_with("GPU-") && !uuid.starts_with("MIG-") {
        return None;
    }
    let memory_bytes = memory.parse::<u64>().map_or(0, |mib| mib << 20);
    let ecc_errors = ecc.parse::<u64>().unwrap_or(0);
    let retiring = retired.eq_ignore_ascii_case("yes");
    Some(PluginDevice {
        id: match id {
            GpuId::Uuid => uuid.to_string(),
            GpuId::Index => index.to_string(),
        },
        model: name,
        memory_bytes,
        healthy: ecc_errors == 0 && !retiring,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DGX-style A100 node; GPU 2 has an uncorrected ECC error, GPU 3
    /// pages waiting to be retired.
    const A100: &str = "\
0, GPU-8e6c4f4d-7e2b-1c51-9d1a-2f3c4e5d6a7b, NVIDIA A100-SXM4-40GB, 40960, 0, No
1, GPU-1b2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6, NVIDIA A100-SXM4-40GB, 40960, 0, No
2, GPU-0f1e2d3c-4b5a-6978-8a9b-acbdcedf0011, NVIDIA A100-SXM4-40GB, 40960, 2, No
3, GPU-99887766-5544-3322-1100-aabbccddeeff, NVIDIA A100-SXM4-40GB, 40960, 0, Yes
";

    /// Consumer and edge GPUs have no ECC: the fields say so.
    const GEFORCE: &str = "0, GPU-5a4b3c2d-1e0f-9a8b-7c6d-5e4f3a2b1c0d, NVIDIA GeForce RTX 3090, 24576, [N/A], [N/A]\n";
    const T4: &str =
        "0, GPU-d0c1b2a3-9485-7665-5443-3221100ffeed, Tesla T4, 15360, [Not Supported], [Not Supported]\r\n";

    #[test]
    fn nvidia_smi_output_becomes_devices_with_health() {
        let (d, problems) = parse_nvidia_smi(A100, GpuId::Uuid);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].id, "GPU-8e6c4f4d-7e2b-1c51-9d1a-2f3c4e5d6a7b");
        assert_eq!(d[0].model, "NVIDIA A100-SXM4-40GB");
        assert_eq!(d[0].memory_bytes, 40960 << 20);
        assert_eq!(d.iter().map(|d| d.healthy).collect::<Vec<_>>(), [true, true, false, false]);
        let (d, _) = parse_nvidia_smi(A100, GpuId::Index);
        assert_eq!(d.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["0", "1", "2", "3"]);
        let (d, _) = parse_nvidia_smi(&format!("{GEFORCE}{T4}"), GpuId::Index);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.healthy), "no ECC is no error");
        assert_eq!((d[1].model.as_str(), d[1].memory_bytes), ("Tesla T4", 15360 << 20));
    }

    #[test]
    fn odd_lines_are_reported_not_guessed() {
        let csv = "\
No devices were found
0, GPU-5a4b3c2d-1e0f-9a8b-7c6d-5e4f3a2b1c0d, Custom, Board, Name, 8192, 0, No
x, GPU-5a4b3c2d, T4, 15360, 0, No
1, not-a-uuid, T4, 15360, 0, No

";
        let (d, problems) = parse_nvidia_smi(csv, GpuId::Index);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].model, "Custom, Board, Name", "commas in the name are kept");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(parse_nvidia_smi("", GpuId::Uuid), (Vec::new(), Vec::new()));
    }

    #[test]
    fn fake_devices_lowest_ids_unhealthy() {
        let d = fake_devices(3, 1, "X", 1 << 30);
        assert_eq!(
            d.iter().map(|d| (d.id.as_str(), d.healthy)).collect::<Vec<_>>(),
            [("0", false), ("1", true), ("2", true)]
        );
    }
}
