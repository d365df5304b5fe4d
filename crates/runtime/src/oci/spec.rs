//! The OCI runtime spec (`config.json`, version 1.0) written for a bundle.
//!
//! Defaults, close to what Docker and runc's `spec` produce:
//! - process: image entrypoint/cmd overridden by the request (Docker's
//!   rules: a request `command` replaces the entrypoint *and* drops the
//!   image's cmd), image env overlaid by the request's, `PATH` and `HOME`
//!   filled in when missing, no terminal, `noNewPrivileges`, Docker's default
//!   capability set (minus `CAP_NET_RAW` with host networking, so a
//!   container cannot sniff or forge packets on the host's interfaces),
//!   rlimits inherited from the shim.
//! - root `rootfs`, writable (each bundle has its own copy).
//! - mounts: `/proc`, `/dev` (tmpfs), `/dev/pts`, `/dev/shm`, `/dev/mqueue`,
//!   `/sys` read-only, the instance volume at `/data` (read-write), and
//!   with host networking the host's `/etc/resolv.conf` and `/etc/hosts`
//!   read-only.
//! - namespaces: pid, mount, ipc, uts, cgroup (when the kernel has it), and
//!   network only without host networking (then the container has loopback
//!   only: there is no container networking yet).
//! - `linux.resources`: memory limit (swap limited to the same value, so no
//!   swap use), cpu quota over a 100 ms period, all devices denied but the
//!   runtime's defaults; `cgroupsPath` `/yunbian-oci/<id>` (used only when
//!   the shim lets crun manage cgroups).
//! - runc's masked and read-only paths under `/proc` and `/sys`.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use serde::Serialize;

use super::image::ImageConfig;
use super::{BundleRequest, OciError};

/// CFS period of cpu quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capabilities.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Spec {
    oci_version: &'static str,
    process: Process,
    root: Root,
    hostname: String,
    mounts: Vec<Mount>,
    linux: Linux,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    terminal: bool,
    user: User,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    capabilities: Capabilities,
    no_new_privileges: bool,
}

#[derive(Debug, Serialize)]
struct User {
    uid: u32,
    gid: u32,
}

#[derive(Debug, Serialize)]
struct Capabilities {
    bounding: Vec<String>,
    effective: Vec<String>,
    inheritable: Vec<String>,
    permitted: Vec<String>,
    ambient: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Root {
    path: &'static str,
    readonly: bool,
}

#[derive(Debug, Serialize)]
struct Mount {
    destination: String,
    #[serde(rename = "type")]
    kind: String,
    source: String,
    options: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Linux {
    cgroups_path: String,
    resources: Resources,
    namespaces: Vec<Namespace>,
    masked_paths: Vec<String>,
    readonly_paths: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Resources {
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<Cpu>,
    devices: Vec<DeviceRule>,
}

#[derive(Debug, Serialize)]
struct Memory {
    limit: i64,
    swap: i64,
}

#[derive(Debug, Serialize)]
struct Cpu {
    quota: i64,
    period: u64,
}

#[derive(Debug, Serialize)]
struct DeviceRule {
    allow: bool,
    access: &'static str,
}

#[derive(Debug, Serialize)]
struct Namespace {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The resolved identity the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Home directory from `/etc/passwd`, when the user is listed there.
    pub home: Option<String>,
}

/// Host facts the spec depends on (read by the caller, so spec generation
/// itself is pure).
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    pub hostname: String,
    pub cgroup_namespace: bool,
}

impl HostFacts {
    pub fn read() -> HostFacts {
        let hostname =
            fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
        HostFacts { hostname, cgroup_namespace: Path::new("/proc/self/ns/cgroup").exists() }
    }
}

/// The process arguments: Docker's entrypoint/cmd rules.
pub(crate) fn process_args(image: &ImageConfig, req: &BundleRequest) -> Result<Vec<String>, OciError> {
    let mut args = if req.command.is_empty() { image.entrypoint.clone() } else { req.command.clone() };
    if !req.args.is_empty() {
        args.extend(req.args.iter().cloned());
    } else if req.command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    }
    if args.is_empty() {
        return Err(OciError::Invalid(format!(
            "instance {}: the image has no Entrypoint or Cmd and the instance gives no command",
            req.id
        )));
    }
    Ok(args)
}

/// The environment: the image's, overlaid by the request's (same name:
/// replaced in place; new names appended), with `PATH` and `HOME` filled in.
pub(crate) fn process_env(image: &ImageConfig, req: &BundleRequest, run_as: &RunAs) -> Vec<String> {
    let mut env: Vec<(String, String)> = image.env.clone();
    for (k, v) in &req.env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        let home = run_as.home.clone().unwrap_or_else(|| if run_as.uid == 0 { "/root".into() } else { "/".into() });
        env.push(("HOME".to_string(), home));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Builds the spec. Pure: every host fact comes in `host`.
pub(crate) fn generate(
    image: &ImageConfig,
    req: &BundleRequest,
    run_as: &RunAs,
    host: &HostFacts,
) -> Result<Spec, OciError> {
    let args = process_args(image, req)?;
    let cwd = req.working_dir.clone().or_else(|| image.working_dir.clone()).unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(OciError::Invalid(format!("instance {}: working directory {cwd:?} is not absolute", req.id)));
    }
    let caps: Vec<String> =
        DEFAULT_CAPS.iter().filter(|c| !(req.host_network && **c == "CAP_NET_RAW")).map(|c| c.to_string()).collect();
    let m = |dest: &str, kind: &str, source: &str, opts: &[&str]| Mount {
        destination: dest.to_string(),
        kind: kind.to_string(),
        source: source.to_string(),
        options: opts.iter().map(|o| o.to_string()).collect(),
    };
    let mut mounts = vec![
        m("/proc", "proc", "proc", &[]),
        m("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        m("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        m("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        m("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        m("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
    ];
    let volume = req.volume.to_str().ok_or_else(|| {
        OciError::Invalid(format!("instance {}: volume path {} is not UTF-8", req.id, req.volume.display()))
    })?;
    mounts.push(m("/data", "bind", volume, &["rbind", "rw", "nosuid", "nodev"]));
    let mut namespaces = vec![
        Namespace { kind: "pid" },
        Namespace { kind: "mount" },
        Namespace { kind: "ipc" },
        Namespace { kind: "uts" },
    ];
    if host.cgroup_namespace {
        namespaces.push(Namespace { kind: "cgroup" });
    }
    if req.host_network {
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            if Path::new(f).exists() {
                mounts.push(m(f, "bind", f, &["rbind", "ro", "nosuid", "nodev", "noexec"]));
            }
        }
    } else {
        namespaces.push(Namespace { kind: "network" });
    }
    // With the host's network, keep its name (its /etc/hosts knows it).
    let hostname = if req.host_network && !host.hostname.is_empty() { host.hostname.clone() } else { req.id.clone() };
    let memory = (req.memory_bytes > 0).then(|| {
        let limit = i64::try_from(req.memory_bytes).unwrap_or(i64::MAX);
        Memory { limit, swap: limit }
    });
    let cpu = (req.cpu_millis > 0).then(|| Cpu {
        quota: i64::try_from((req.cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)).unwrap_or(i64::MAX),
        period: CPU_PERIOD_US,
    });
    Ok(Spec {
        oci_version: "1.0.2",
        process: Process {
            terminal: false,
            user: User { uid: run_as.uid, gid: run_as.gid },
            args,
            env: process_env(image, req, run_as),
            cwd,
            capabilities: Capabilities {
                bounding: caps.clone(),
                effective: caps.clone(),
                inheritable: Vec::new(),
                permitted: caps,
                ambient: Vec::new(),
            },
            no_new_privileges: true,
        },
        root: Root { path: "rootfs", readonly: false },
        hostname,
        mounts,
        linux: Linux {
            cgroups_path: format!("/yunbian-oci/{}", req.id),
            resources: Resources { memory, cpu, devices: vec![DeviceRule { allow: false, access: "rwm" }] },
            namespaces,
            masked_paths: MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
            readonly_paths: READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
        },
    })
}

/// Resolves the image's `User` (`uid`, `uid:gid`, `name`, `name:group`, …)
/// against the rootfs' `/etc/passwd` and `/etc/group`. Numeric ids need no
/// files; names do, and an unknown name is an error.
pub(crate) fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<RunAs, OciError> {
    let spec = user.unwrap_or("").trim();
    if spec.is_empty() {
        let home = passwd_entries(rootfs).ok().and_then(|p| p.into_iter().find(|e| e.uid == 0)).map(|e| e.home);
        return Ok(RunAs { uid: 0, gid: 0, home: home.or(Some("/root".into())) });
    }
    let err = |message: String| OciError::User { user: spec.to_string(), message };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = || passwd_entries(rootfs);
    let (uid, mut gid, home) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd().ok().and_then(|p| p.into_iter().find(|e| e.uid == uid));
            (uid, entry.as_ref().map_or(0, |e| e.gid), entry.map(|e| e.home))
        }
        Err(_) => {
            let entries = passwd().map_err(|e| err(format!("cannot resolve a user name: {e}")))?;
            let e = entries
                .into_iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| err(format!("no user {user_part:?} in the image's /etc/passwd")))?;
            (e.uid, e.gid, Some(e.home))
        }
    };
    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let text =
                    read_rootfs_file(rootfs, "group").map_err(|e| err(format!("cannot resolve a group name: {e}")))?;
                text.lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 3 && f[0] == g).then(|| f[2].parse::<u32>().ok()).flatten()
                    })
                    .next()
                    .ok_or_else(|| err(format!("no group {g:?} in the image's /etc/group")))?
            }
        };
    }
    Ok(RunAs { uid, gid, home })
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd_entries(rootfs: &Path) -> io::Result<Vec<PasswdEntry>> {
    let text = read_rootfs_file(rootfs, "passwd")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect())
}

/// Reads `<rootfs>/etc/<name>` without following symlinks (one pointing
/// outside the rootfs would read a host file). At most 1 MiB.
fn read_rootfs_file(rootfs: &Path, name: &str) -> io::Result<String> {
    let etc = rootfs.join("etc");
    let path = etc.join(name);
    for p in [&etc, &path] {
        let m = fs::symlink_metadata(p)?;
        if m.file_type().is_symlink() {
            return Err(io::Error::other(format!("/{} is a symlink", p.strip_prefix(rootfs).unwrap_or(p).display())));
        }
    }
    let mut text = String::new();
    fs::File::open(&path)?.take(1 << 20).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--default".into()],
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "image".into())],
            working_dir: Some("/app".into()),
            user: None,
        }
    }

    fn req() -> BundleRequest {
        BundleRequest::new("web-1", PathBuf::from("/var/lib/yunbian/volumes/web-1"))
    }

    #[test]
    fn docker_entrypoint_rules() {
        let i = image();
        assert_eq!(process_args(&i, &req()).expect("args"), ["/entry", "--default"]);
        let r = BundleRequest { args: vec!["x".into()], ..req() };
        assert_eq!(process_args(&i, &r).expect("args"), ["/entry", "x"]);
        let r = BundleRequest { command: vec!["/other".into()], ..req() };
        assert_eq!(process_args(&i, &r).expect("args"), ["/other"]);
        let r = BundleRequest { command: vec!["/other".into()], args: vec!["y".into()], ..req() };
        assert_eq!(process_args(&i, &r).expect("args"), ["/other", "y"]);
        let empty = ImageConfig::default();
        assert!(matches!(process_args(&empty, &req()), Err(OciError::Invalid(_))));
    }

    #[test]
    fn env_overlay() {
        let r = BundleRequest { env: vec![("A".into(), "req".into()), ("B".into(), "new".into())], ..req() };
        let run_as = RunAs { uid: 1000, gid: 1000, home: Some("/home/app".into()) };
        assert_eq!(process_env(&image(), &r, &run_as), ["PATH=/bin", "A=req", "B=new", "HOME=/home/app"]);
        let run_as = RunAs { uid: 0, gid: 0, home: None };
        let env = process_env(&ImageConfig::default(), &req(), &run_as);
        assert_eq!(env, [format!("PATH={DEFAULT_PATH}"), "HOME=/root".to_string()]);
    }

    #[test]
    fn resources_and_namespaces() {
        let host = HostFacts { hostname: "edge-7".into(), cgroup_namespace: false };
        let run_as = RunAs { uid: 0, gid: 0, home: None };
        let r = BundleRequest { memory_bytes: 64 << 20, cpu_millis: 250, ..req() };
        let spec = serde_json::to_value(generate(&image(), &r, &run_as, &host).expect("spec")).expect("json");
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 25_000);
        assert_eq!(spec["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(spec["hostname"], "edge-7");
        assert_eq!(spec["process"]["cwd"], "/app");
        let ns: Vec<&str> =
            spec["linux"]["namespaces"].as_array().expect("ns").iter().filter_map(|n| n["type"].as_str()).collect();
        assert_eq!(ns, ["pid", "mount", "ipc", "uts"]);
        assert!(!spec["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps")
            .iter()
            .any(|c| c == "CAP_NET_RAW"));

        let r = BundleRequest { host_network: false, ..req() };
        let spec = serde_json::to_value(generate(&image(), &r, &run_as, &host).expect("spec")).expect("json");
        assert!(spec["linux"]["resources"].get("memory").is_none());
        assert_eq!(spec["hostname"], "web-1");
        assert!(spec["linux"]["namespaces"].as_array().expect("ns").iter().any(|n| n["type"] == "network"));
        assert!(!spec["mounts"].as_array().expect("mounts").iter().any(|m| m["destination"] == "/etc/resolv.conf"));

        let r = BundleRequest { working_dir: Some("rel".into()), ..req() };
        assert!(generate(&image(), &r, &run_as, &host).is_err());
    }
}
