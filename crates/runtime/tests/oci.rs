//! The `oci` runtime's image and bundle side against real crun and a real
//! busybox image: layouts and their digests, the layer cache, rootfs
//! assembly (whiteouts, modes, links), refusal of hostile layers, and
//! containers run through the shim — output, environment, arguments, exit
//! status, the `/data` volume, SIGTERM, and enforced memory limits.
//!
//! The shim runs as its own process, as in production: this test binary
//! re-executed into the `shim_child` test, which calls `run_shim` and exits
//! with its result. crun and busybox-static must be installed (`.ci/run`
//! installs them); without them these tests fail, saying so.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use yunbian_runtime::oci::testing::{self, LayerBuilder};
use yunbian_runtime::oci::{
    detect_crun, prepare_bundle, run_shim, BundleRequest, ImageLayout, LayerCache, OciError, Platform, ShimCgroups,
    ShimOptions,
};

// ---------------------------------------------------------------------------
// Harness

/// The shim process: does nothing in a normal test run; re-executed with
/// `YUNBIAN_OCI_TEST_SHIM_*` set, it is the shim.
#[test]
fn shim_child() {
    let Ok(bundle) = std::env::var("YUNBIAN_OCI_TEST_SHIM_BUNDLE") else { return };
    let var = |k: &str| std::env::var(k).expect("shim child variable");
    let mut opts = ShimOptions::new(bundle, var("YUNBIAN_OCI_TEST_SHIM_ID"));
    opts.state_root = PathBuf::from(var("YUNBIAN_OCI_TEST_SHIM_STATE"));
    opts.stop_grace = Duration::from_millis(var("YUNBIAN_OCI_TEST_SHIM_GRACE_MS").parse().expect("grace"));
    if var("YUNBIAN_OCI_TEST_SHIM_CGROUPS") == "cgroupfs" {
        opts.cgroups = ShimCgroups::Cgroupfs;
    }
    match run_shim(&opts) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("shim error: {e}");
            std::process::exit(125)
        }
    }
}

fn require_tools() -> String {
    assert!(
        Path::new(testing::BUSYBOX).is_file(),
        "{} is missing: install busybox-static (apt-get install busybox-static; .ci/run installs it)",
        testing::BUSYBOX
    );
    match detect_crun(None) {
        Ok(found) => found,
        Err(why) => panic!("crun is needed by the oci tests and is not usable: {why}. Install it (apt-get install crun; .ci/run installs it)"),
    }
}

/// A scratch directory under the target dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "oci-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An image, a cache and a bundle directory in one scratch dir.
struct Fixture {
    scratch: Scratch,
    image: ImageLayout,
    cache: LayerCache,
}

impl Fixture {
    fn busybox(name: &str, cmd: &[&str]) -> Fixture {
        Self::with_config(name, json!({ "Env": ["PATH=/bin", "IMAGE_VAR=from-image"], "Cmd": cmd, "WorkingDir": "/" }))
    }

    fn with_config(name: &str, run_config: Value) -> Fixture {
        let scratch = Scratch::new(name);
        testing::build_busybox_layout_with(&scratch.path("image"), run_config).expect("build busybox layout");
        let image = ImageLayout::open(&scratch.path("image")).expect("open image");
        let cache = LayerCache::open(&scratch.path("cache")).expect("open cache");
        Fixture { scratch, image, cache }
    }

    /// A request for container `id` with its volume in the scratch dir.
    fn request(&self, id: &str) -> BundleRequest {
        BundleRequest::new(format!("{id}-{}", std::process::id()), self.scratch.path(&format!("volumes/{id}")))
    }

    fn prepare(&self, req: &BundleRequest) -> PathBuf {
        let bundle = self.scratch.path(&format!("bundles/{}", req.id));
        prepare_bundle(&self.image, &self.cache, req, &bundle).expect("prepare bundle");
        bundle
    }

    fn state_root(&self) -> PathBuf {
        self.scratch.path("crun-state")
    }

    fn shim(&self, bundle: &Path, id: &str) -> ShimRun {
        ShimRun::spawn(self, bundle, id, ShimCgroups::Inherit, Duration::from_secs(3), None)
    }

    /// Containers crun still knows in our state root.
    fn crun_containers(&self) -> Vec<String> {
        match fs::read_dir(self.state_root()) {
            Ok(rd) => {
                rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into()).collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A shim process.
struct ShimRun {
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

struct ShimExit {
    code: i32,
    stdout: String,
    stderr: String,
}

impl ShimRun {
    fn spawn(
        fx: &Fixture,
        bundle: &Path,
        id: &str,
        cgroups: ShimCgroups,
        grace: Duration,
        cgroup_dir: Option<&Path>,
    ) -> ShimRun {
        let exe = std::env::current_exe().expect("test binary");
        let stdout = fx.scratch.path(&format!("{id}.stdout"));
        let stderr = fx.scratch.path(&format!("{id}.stderr"));
        let mut cmd = match cgroup_dir {
            // Join the cgroup first, as the process runtime does for its workloads.
            Some(dir) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(dir).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["shim_child", "--exact", "--nocapture", "--quiet", "--test-threads=1"])
            .env("YUNBIAN_OCI_TEST_SHIM_BUNDLE", bundle)
            .env("YUNBIAN_OCI_TEST_SHIM_ID", id)
            .env("YUNBIAN_OCI_TEST_SHIM_STATE", fx.state_root())
            .env("YUNBIAN_OCI_TEST_SHIM_GRACE_MS", grace.as_millis().to_string())
            .env("YUNBIAN_OCI_TEST_SHIM_CGROUPS", if cgroups == ShimCgroups::Cgroupfs { "cgroupfs" } else { "inherit" })
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            // Its own process group, as under the process runtime, which
            // signals the whole group.
            .process_group(0);
        ShimRun { child: cmd.spawn().expect("spawn shim"), stdout, stderr }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Waits (at most 60 s) for the shim to exit.
    fn wait(mut self) -> ShimExit {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait shim") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "shim did not exit within 60 s; stderr: {}",
                    fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ShimExit {
            code: status.code().unwrap_or(-1),
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

fn run(fx: &Fixture, req: &BundleRequest) -> ShimExit {
    let bundle = fx.prepare(req);
    let exit = fx.shim(&bundle, &req.id).wait();
    assert!(!exit.stderr.contains("shim error"), "shim failed: {}", exit.stderr);
    assert!(fx.crun_containers().is_empty(), "containers left behind: {:?}", fx.crun_containers());
    exit
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

// ---------------------------------------------------------------------------
// Image layouts

#[test]
fn crun_and_busybox_are_installed() {
    let found = require_tools();
    assert!(found.starts_with("crun version"), "{found}");
    let missing = detect_crun(Some(Path::new("/nonexistent/crun"))).expect_err("no crun there");
    assert!(missing.contains("install crun"), "{missing}");
}

#[test]
fn image_layout_opens_with_its_config_and_layers() {
    require_tools();
    let fx = Fixture::busybox("open", &["echo", "hi"]);
    let c = fx.image.config();
    assert_eq!(c.cmd, ["echo", "hi"]);
    assert!(c.entrypoint.is_empty());
    assert_eq!(c.env, [("PATH".to_string(), "/bin".to_string()), ("IMAGE_VAR".to_string(), "from-image".to_string())]);
    assert_eq!(c.working_dir.as_deref(), Some("/"));
    assert_eq!(fx.image.layers().len(), 2);
    assert_eq!(fx.image.layers()[0].media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(fx.image.layers()[1].media_type, "application/vnd.oci.image.layer.v1.tar");
    let index: Value =
        serde_json::from_slice(&fs::read(fx.scratch.path("image/index.json")).expect("index")).expect("json");
    assert_eq!(index["manifests"][0]["digest"], fx.image.digest().to_string());
}

#[test]
fn corrupt_or_missing_blobs_are_refused() {
    require_tools();
    let fx = Fixture::busybox("corrupt", &["true"]);
    let layer = fx.image.layers()[0].clone();
    let blob = fx.image.blob_path(&layer.digest);
    let good = fs::read(&blob).expect("blob");

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    fs::write(&blob, &bad).expect("corrupt");
    let err = ImageLayout::open(&fx.scratch.path("image")).expect_err("corrupt layer accepted");
    assert!(matches!(&err, OciError::BlobMismatch { digest, .. } if *digest == layer.digest), "{err}");
    let text = err.to_string();
    assert!(text.contains(&layer.digest.to_string()) && text.contains("hashes to"), "{text}");

    fs::write(&blob, &good[..good.len() - 1]).expect("truncate");
    let err = ImageLayout::open(&fx.scratch.path("image")).expect_err("truncated layer accepted");
    assert!(err.to_string().contains(&format!("descriptor says {} bytes", good.len())), "{err}");

    fs::remove_file(&blob).expect("remove");
    let err = ImageLayout::open(&fx.scratch.path("image")).expect_err("missing layer accepted");
    assert!(err.to_string().contains("is missing"), "{err}");

    // A blob corrupted after the image was opened is still caught when unpacking.
    let mut bad = good.clone();
    bad[mid] ^= 0xff;
    fs::write(&blob, &bad).expect("corrupt");
    let err = fx.cache.ensure(&fx.image, 0).expect_err("corrupt layer unpacked");
    assert!(matches!(err, OciError::BlobMismatch { .. }), "{err}");
    assert!(!fx.cache.layer_dir(&layer.digest).exists());
}

#[test]
fn multi_platform_index_picks_this_hosts_platform() {
    require_tools();
    let scratch = Scratch::new("multiarch");
    let dir = scratch.path("image");
    let host = testing::host_architecture();
    let other = if host == "riscv64" { "amd64" } else { "riscv64" };
    let layers = testing::busybox_layers().expect("layers");
    let foreign = testing::add_image(&dir, &layers, json!({ "Cmd": ["foreign"] }), other).expect("image");
    let native = testing::add_image(&dir, &layers, json!({ "Cmd": ["native"] }), &host).expect("image");
    testing::write_index(&dir, &[foreign, native]).expect("index");
    let image = ImageLayout::open(&dir).expect("open");
    assert_eq!(image.config().cmd, ["native"]);
    assert_eq!(image.platform().architecture, host);

    let mips = Platform { architecture: "mips64le".into(), os: "linux".into(), variant: None };
    let err = ImageLayout::open_for(&dir, &mips).expect_err("no mips image");
    let text = err.to_string();
    assert!(text.contains("linux/mips64le") && text.contains(&format!("linux/{other}")), "{text}");
}

#[test]
fn layout_tarball_unpacks_to_the_same_image() {
    require_tools();
    let scratch = Scratch::new("tarball");
    testing::build_busybox_layout(&scratch.path("image"), &["true"]).expect("layout");
    testing::write_layout_tarball(&scratch.path("image"), &scratch.path("image.tar.gz")).expect("tarball");
    let file = fs::File::open(scratch.path("image.tar.gz")).expect("open tarball");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut names = Vec::new();
    fs::create_dir_all(scratch.path("unpacked")).expect("mkdir");
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        names.push(entry.path().expect("path").display().to_string());
        assert!(entry.unpack_in(scratch.path("unpacked")).expect("unpack"));
    }
    assert!(names.contains(&"oci-layout".to_string()) && names.contains(&"index.json".to_string()), "{names:?}");
    let a = ImageLayout::open(&scratch.path("image")).expect("open original");
    let b = ImageLayout::open(&scratch.path("unpacked")).expect("open unpacked");
    assert_eq!(a.digest(), b.digest());
}

// ---------------------------------------------------------------------------
// Layers and rootfs

/// An image whose only layer is `layer`, opened (digests are right: the
/// refusal must come from unpacking).
fn hostile_image(scratch: &Scratch, layer: LayerBuilder) -> ImageLayout {
    let dir = scratch.path("image");
    let desc = testing::add_image(
        &dir,
        &[layer.gzip().expect("layer")],
        json!({ "Cmd": ["true"] }),
        &testing::host_architecture(),
    )
    .expect("image");
    testing::write_index(&dir, &[desc]).expect("index");
    ImageLayout::open(&dir).expect("open")
}

#[test]
fn layers_escaping_their_root_are_refused() {
    require_tools();
    let scratch = Scratch::new("escape");
    let outside = scratch.path("outside");
    fs::create_dir_all(&outside).expect("outside dir");
    let outside_s = outside.to_str().expect("utf-8");
    let cache = LayerCache::open(&scratch.path("cache")).expect("cache");

    let cases: Vec<(&str, LayerBuilder)> = vec![
        ("dot-dot path", {
            let mut l = LayerBuilder::new();
            l.raw(b"../../../outside/escaped.txt", tar::EntryType::Regular, b"", b"pwned").expect("entry");
            l
        }),
        ("write through a symlink", {
            let mut l = LayerBuilder::new();
            l.symlink("evil", outside_s).expect("entry");
            l.file("evil/escaped.txt", 0o644, b"pwned").expect("entry");
            l
        }),
        ("hard link out", {
            let mut l = LayerBuilder::new();
            l.raw(b"link", tar::EntryType::Link, b"../../../outside/target.txt", b"").expect("entry");
            l
        }),
        ("hard link through a symlink", {
            let mut l = LayerBuilder::new();
            l.symlink("evil", outside_s).expect("entry");
            l.hardlink("link", "evil/target.txt").expect("entry");
            l
        }),
    ];
    fs::write(outside.join("target.txt"), "host file").expect("target");
    for (what, layer) in cases {
        let case = Scratch::new("escape-case");
        let image = hostile_image(&case, layer);
        let err = cache.ensure(&image, 0).expect_err(what);
        assert!(matches!(err, OciError::UnsafeLayerEntry { .. }), "{what}: {err}");
        assert!(err.to_string().contains("refusing the layer"), "{what}: {err}");
        assert!(!cache.layer_dir(&image.layers()[0].digest).exists(), "{what}: layer cached");
        let bundle = case.path("bundle");
        let err = prepare_bundle(&image, &cache, &BundleRequest::new("x", case.path("vol")), &bundle).expect_err(what);
        assert!(matches!(err, OciError::UnsafeLayerEntry { .. }), "{what}: {err}");
    }
    let left: Vec<_> = fs::read_dir(&outside).expect("outside").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("target.txt")], "something was written outside");
    assert_eq!(fs::read_to_string(outside.join("target.txt")).expect("target"), "host file");
    assert_eq!(fs::read_dir(scratch.path("cache/tmp")).expect("tmp").count(), 0, "staging left behind");
}

#[test]
fn rootfs_applies_whiteouts_and_keeps_modes_owners_and_links() {
    require_tools();
    let fx = Fixture::busybox("rootfs", &["true"]);
    let bundle = fx.prepare(&fx.request("rootfs"));
    let root = bundle.join("rootfs");
    assert!(!root.join("etc/doomed.txt").exists(), "whiteout not applied");
    let mut old: Vec<_> =
        fs::read_dir(root.join("opt/old")).expect("opt/old").flatten().map(|e| e.file_name()).collect();
    old.sort();
    assert_eq!(old, [std::ffi::OsString::from("new.txt")], "opaque directory not applied");
    assert_eq!(fs::read_to_string(root.join("etc/shared.txt")).expect("shared"), "top\n");
    assert_eq!(fs::read_to_string(root.join("etc/motd")).expect("motd"), "from layer two\n");
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).expect(p);
    assert_eq!(meta("bin/suid-marker").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("bin/busybox").permissions().mode() & 0o7777, 0o755);
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("root").permissions().mode() & 0o7777, 0o700);
    assert_eq!((meta("home/app").uid(), meta("home/app").gid()), (1000, 1000));
    assert_eq!(meta("usr/share/one.txt").ino(), meta("usr/share/two.txt").ino(), "hard link lost");
    assert_eq!(meta("usr/share/one.txt").mtime(), 1_700_000_000);
    assert_eq!(fs::read_link(root.join("bin/sh")).expect("symlink"), Path::new("busybox"));
    // The rootfs is a copy: writing to it leaves the cache alone.
    let layer0 = fx.cache.layer_dir(&fx.image.layers()[0].digest);
    assert_ne!(meta("bin/busybox").ino(), fs::metadata(layer0.join("bin/busybox")).expect("cached").ino());
    fn no_whiteouts(dir: &Path) {
        for e in fs::read_dir(dir).expect("dir").flatten() {
            assert!(!e.file_name().to_string_lossy().starts_with(".wh."), "{} in rootfs", e.path().display());
            if e.file_type().expect("type").is_dir() {
                no_whiteouts(&e.path());
            }
        }
    }
    no_whiteouts(&root);
    let config: Value = serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["process"]["args"], json!(["true"]));
    assert_eq!(config["root"]["path"], "rootfs");
    assert_eq!(config["process"]["noNewPrivileges"], true);
}

#[test]
fn layer_cache_is_shared_and_bundles_are_reused() {
    require_tools();
    let fx = Fixture::busybox("cache", &["true"]);
    let a = fx.request("a");
    let bundle_a = fx.scratch.path("bundles/a");
    let first = prepare_bundle(&fx.image, &fx.cache, &a, &bundle_a).expect("prepare a");
    assert_eq!((first.reused, first.layers_unpacked), (false, 2));
    let layer0 = fx.cache.layer_dir(&fx.image.layers()[0].digest);
    let ino = fs::metadata(&layer0).expect("layer").ino();

    let again = prepare_bundle(&fx.image, &fx.cache, &a, &bundle_a).expect("prepare a again");
    assert_eq!((again.reused, again.layers_unpacked), (true, 0));

    let b = fx.request("b");
    let second = prepare_bundle(&fx.image, &fx.cache, &b, &fx.scratch.path("bundles/b")).expect("prepare b");
    assert_eq!((second.reused, second.layers_unpacked), (false, 0), "second bundle unpacked again");
    assert_eq!(fs::metadata(&layer0).expect("layer").ino(), ino);

    // A reopened cache (agent restart) still has the layers, and removes
    // the unpacks of dead processes, not those of live ones.
    let mut gone = Command::new("true").spawn().expect("spawn");
    let dead_pid = gone.id();
    gone.wait().expect("wait");
    let tmp = fx.scratch.path("cache/tmp");
    fs::create_dir_all(tmp.join(format!("abc.{dead_pid}.0/bin"))).expect("stale unpack");
    fs::create_dir_all(tmp.join(format!("def.{}.0", std::process::id()))).expect("live unpack");
    let reopened = LayerCache::open(&fx.scratch.path("cache")).expect("reopen");
    assert!(!tmp.join(format!("abc.{dead_pid}.0")).exists(), "stale unpack kept");
    assert!(tmp.join(format!("def.{}.0", std::process::id())).exists(), "a live process's unpack was removed");
    let mut changed = a.clone();
    changed.env.push(("NEW".into(), "1".into()));
    let rebuilt = prepare_bundle(&fx.image, &reopened, &changed, &bundle_a).expect("prepare changed");
    assert_eq!((rebuilt.reused, rebuilt.layers_unpacked), (false, 0));
    let config: Value = serde_json::from_slice(&fs::read(bundle_a.join("config.json")).expect("config")).expect("json");
    assert!(config["process"]["env"].as_array().expect("env").iter().any(|e| e == "NEW=1"));
}

// ---------------------------------------------------------------------------
// Containers

#[test]
fn container_output_env_args_and_exit_status() {
    require_tools();
    let fx = Fixture::busybox("run", &["true"]);
    let mut req = fx.request("run");
    req.command = sh(r#"echo "hello from $IMAGE_VAR and $GREETING"; echo "args: $*"; echo "to stderr" >&2;
        test ! -e /etc/doomed.txt && echo whiteout-ok; cat /etc/shared.txt; echo "cwd $(pwd) host $(hostname)";
        grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; [ -s /proc/kcore ] || echo kcore-masked;
        (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null || echo proc-sys-read-only; echo "pid $$"; exit 7"#);
    req.command.push("sh".into());
    req.args = vec!["a".into(), "b c".into()];
    req.env = vec![("GREETING".into(), "world".into())];
    req.working_dir = Some("/tmp".into());
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 7, "stdout: {}\nstderr: {}", exit.stdout, exit.stderr);
    assert!(exit.stdout.contains("hello from from-image and world"), "{}", exit.stdout);
    assert!(exit.stdout.contains("args: a b c"), "{}", exit.stdout);
    assert!(exit.stdout.contains("whiteout-ok\ntop\n"), "{}", exit.stdout);
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert!(exit.stdout.contains(&format!("cwd /tmp host {}", hostname.trim())), "{}", exit.stdout);
    assert!(exit.stderr.contains("to stderr"), "{}", exit.stderr);
    // Docker's default capabilities without CAP_NET_RAW (host networking).
    assert!(exit.stdout.contains("CapEff:\t00000000a80405fb"), "{}", exit.stdout);
    assert!(exit.stdout.contains("NoNewPrivs:\t1"), "{}", exit.stdout);
    assert!(exit.stdout.contains("kcore-masked\nproc-sys-read-only\npid 1\n"), "{}", exit.stdout);

    // The image's own Cmd, and a clean exit.
    let fx = Fixture::busybox("run-cmd", &["sh", "-c", "echo image-cmd; exit 0"]);
    let exit = run(&fx, &fx.request("cmd"));
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(exit.stdout.contains("image-cmd"), "{}", exit.stdout);
}

#[test]
fn host_network_and_resolver_files_or_loopback_only() {
    require_tools();
    let fx = Fixture::busybox("net", &["true"]);
    let mut req = fx.request("hostnet");
    req.command = sh("ls /sys/class/net; echo ---; cat /etc/hosts");
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    let host_ifaces: Vec<String> = fs::read_dir("/sys/class/net")
        .expect("host interfaces")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into())
        .collect();
    assert!(host_ifaces.iter().all(|i| exit.stdout.contains(i.as_str())), "{host_ifaces:?} vs {}", exit.stdout);
    let hosts = fs::read_to_string("/etc/hosts").expect("host /etc/hosts");
    assert!(exit.stdout.ends_with(&format!("---\n{hosts}")), "{}", exit.stdout);

    let mut req = fx.request("isolated");
    req.host_network = false;
    req.command = sh("ls /sys/class/net; hostname");
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(exit.stdout.ends_with(&format!("lo\n{}\n", req.id)), "{}", exit.stdout);
}

#[test]
fn data_volume_is_writable_and_persists() {
    require_tools();
    let fx = Fixture::busybox("volume", &["true"]);
    let mut req = fx.request("vol");
    req.command = sh("echo run >> /data/runs.txt && wc -l < /data/runs.txt");
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(exit.stdout.contains('2'), "{}", exit.stdout);
    assert_eq!(fs::read_to_string(req.volume.join("runs.txt")).expect("volume file on the host"), "run\nrun\n");
}

#[test]
fn image_user_names_resolve_from_the_rootfs() {
    require_tools();
    let fx = Fixture::with_config(
        "user",
        json!({ "User": "app", "Cmd": ["sh", "-c", "echo \"ids $(id -u):$(id -g) home $HOME\"; touch /data/mine"] }),
    );
    let req = fx.request("user");
    let exit = run(&fx, &req);
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(exit.stdout.contains("ids 1000:1000 home /home/app"), "{}", exit.stdout);
    assert_eq!(fs::metadata(req.volume.join("mine")).expect("file written by the user").uid(), 1000);

    let fx = Fixture::with_config("user-group", json!({ "User": "nobody:staff", "Cmd": ["true"] }));
    let bundle = fx.prepare(&fx.request("ug"));
    let config: Value = serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["process"]["user"], json!({ "uid": 65534, "gid": 50 }));

    let fx = Fixture::with_config("user-missing", json!({ "User": "ghost", "Cmd": ["true"] }));
    let req = fx.request("ghost");
    let err = prepare_bundle(&fx.image, &fx.cache, &req, &fx.scratch.path("b")).expect_err("unknown user");
    assert!(matches!(err, OciError::User { .. }), "{err}");
    assert!(err.to_string().contains("no user \"ghost\""), "{err}");
}

/// Waits until crun reports the container running; returns its init pid.
fn wait_running(fx: &Fixture, id: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out =
            Command::new("crun").arg("--root").arg(fx.state_root()).args(["state", id]).output().expect("crun state");
        if out.status.success() {
            let state: Value = serde_json::from_slice(&out.stdout).expect("state json");
            if state["status"] == "running" {
                return i32::try_from(state["pid"].as_i64().expect("pid")).expect("pid");
            }
        }
        assert!(Instant::now() < deadline, "container {id} never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_to_the_shim_stops_and_deletes_the_container() {
    require_tools();
    let fx = Fixture::busybox("sigterm", &["true"]);
    let term = rustix::process::Signal::TERM;
    let pid_of = |p: i32| rustix::process::Pid::from_raw(p).expect("pid");

    // pid 1 without a TERM handler ignores it: killed after the grace.
    let mut req = fx.request("stubborn");
    req.command = vec!["sleep".into(), "1000".into()];
    let bundle = fx.prepare(&req);
    let shim = ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Inherit, Duration::from_millis(500), None);
    let init = wait_running(&fx, &req.id);
    rustix::process::kill_process_group(pid_of(shim.pid()), term).expect("SIGTERM the shim's group");
    let exit = shim.wait();
    assert_eq!(exit.code, 137, "{}", exit.stderr);
    assert!(fx.crun_containers().is_empty(), "left behind: {:?}", fx.crun_containers());
    assert!(!Path::new(&format!("/proc/{init}")).exists(), "container init {init} still alive");
    let list = Command::new("crun").arg("--root").arg(fx.state_root()).arg("list").output().expect("crun list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&req.id),
        "crun list: {}",
        String::from_utf8_lossy(&list.stdout)
    );

    // A TERM handler gets the signal (once: the container is not in the
    // shim's process group) and chooses the status.
    let mut req = fx.request("graceful");
    req.command = sh("trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done");
    let bundle = fx.prepare(&req);
    let shim = ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Inherit, Duration::from_secs(20), None);
    wait_running(&fx, &req.id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(&shim.stdout).unwrap_or_default().contains("ready") {
        assert!(Instant::now() < deadline, "container never printed ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    rustix::process::kill_process_group(pid_of(shim.pid()), term).expect("SIGTERM the shim's group");
    let exit = shim.wait();
    assert_eq!(exit.code, 3, "{}\n{}", exit.stdout, exit.stderr);
    assert_eq!(exit.stdout.matches("got TERM").count(), 1, "{}", exit.stdout);
    assert!(fx.crun_containers().is_empty());
}

#[test]
fn leftover_container_of_a_killed_shim_is_replaced() {
    require_tools();
    let fx = Fixture::busybox("leftover", &["true"]);
    let mut req = fx.request("leftover");
    req.command = sh("echo started; sleep 1000");
    let bundle = fx.prepare(&req);
    let mut shim = ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Inherit, Duration::from_secs(3), None);
    let old_init = wait_running(&fx, &req.id);
    shim.child.kill().expect("SIGKILL the shim");
    let _ = shim.child.wait();
    assert!(Path::new(&format!("/proc/{old_init}")).exists(), "the container should outlive a SIGKILLed shim");

    req.command = sh("echo second run; exit 4");
    let bundle = fx.prepare(&req);
    let exit = fx.shim(&bundle, &req.id).wait();
    assert_eq!(exit.code, 4, "{}", exit.stderr);
    assert!(exit.stdout.contains("second run"), "{}", exit.stdout);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{old_init}")).exists() {
        assert!(Instant::now() < deadline, "the old container ({old_init}) still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fx.crun_containers().is_empty());
}

const HOG: &str = "echo start; exec dd if=/dev/zero of=/dev/null bs=64M count=1";

#[test]
fn memory_limit_is_enforced_by_crun_cgroups() {
    require_tools();
    let fx = Fixture::busybox("oom-crun", &["true"]);
    // Control: without a limit the allocation succeeds.
    let mut req = fx.request("nolimit");
    req.command = sh(HOG);
    let bundle = fx.prepare(&req);
    let exit = ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Cgroupfs, Duration::from_secs(3), None).wait();
    assert_eq!(exit.code, 0, "{}", exit.stderr);

    let mut req = fx.request("limited");
    req.command = sh(HOG);
    req.memory_bytes = 32 << 20;
    let bundle = fx.prepare(&req);
    let exit = ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Cgroupfs, Duration::from_secs(3), None).wait();
    assert_eq!(exit.code, 137, "expected an OOM kill (128+9)\nstdout: {}\nstderr: {}", exit.stdout, exit.stderr);
    assert!(exit.stdout.contains("start"));
    assert!(fx.crun_containers().is_empty());
    for ctl in ["memory", "cpu", "pids"] {
        let dir = Path::new("/sys/fs/cgroup").join(ctl).join("yunbian-oci").join(&req.id);
        assert!(!dir.exists(), "crun left its cgroup {}", dir.display());
    }
}

/// A memory cgroup made for one test, like the process runtime's instance cgroups.
struct TestCgroup {
    dir: PathBuf,
    v2: bool,
}

impl TestCgroup {
    fn create(name: &str, limit: u64) -> TestCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let name = format!("yunbian-oci-test-{name}-{}", std::process::id());
        let (dir, v2) = if root.join("cgroup.controllers").is_file() {
            (root.join(&name), true)
        } else if root.join("memory/memory.limit_in_bytes").is_file() {
            (root.join("memory").join(&name), false)
        } else {
            panic!(
                "memory limits cannot be enforced on this host: no cgroup v2 hierarchy and no v1 memory controller under {}",
                root.display()
            );
        };
        if v2 {
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create cgroup {} (root is needed): {e}", dir.display()));
        if v2 {
            fs::write(dir.join("memory.max"), limit.to_string()).expect("memory.max");
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        } else {
            fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).expect("memory.limit_in_bytes");
            let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        TestCgroup { dir, v2 }
    }

    fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 { ("memory.events", "oom_kill") } else { ("memory.oom_control", "oom_kill") };
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn memory_limit_of_the_shims_cgroup_applies_to_the_container() {
    require_tools();
    let fx = Fixture::busybox("oom-inherit", &["true"]);
    let cgroup = TestCgroup::create("inherit", 48 << 20);
    let mut req = fx.request("inherit");
    req.command = sh(HOG);
    let bundle = fx.prepare(&req);
    let exit =
        ShimRun::spawn(&fx, &bundle, &req.id, ShimCgroups::Inherit, Duration::from_secs(3), Some(&cgroup.dir)).wait();
    assert_eq!(exit.code, 137, "expected an OOM kill (128+9)\nstdout: {}\nstderr: {}", exit.stdout, exit.stderr);
    assert!(cgroup.oom_kills() >= 1, "the cgroup recorded no OOM kill");
    assert!(fx.crun_containers().is_empty());
}

#[test]
fn shim_errors_are_clear() {
    require_tools();
    let scratch = Scratch::new("shim-errors");
    let mut opts = ShimOptions::new(scratch.path("no-bundle"), "x");
    opts.state_root = scratch.path("state");
    let err = run_shim(&opts).expect_err("no bundle");
    assert!(err.to_string().contains("no config.json"), "{err}");
    let opts = ShimOptions::new(scratch.path("b"), "../escape");
    assert!(matches!(run_shim(&opts), Err(OciError::Invalid(_))));

    // crun's own complaint reaches the error: a command missing from the image.
    let fx = Fixture::busybox("shim-errors-crun", &["true"]);
    let mut req = fx.request("nocmd");
    req.command = vec!["/no/such/program".into()];
    let bundle = fx.prepare(&req);
    let exit = fx.shim(&bundle, &req.id).wait();
    assert_ne!(exit.code, 0);
    assert!(exit.stderr.contains("shim error: crun create"), "{}", exit.stderr);
    assert!(exit.stderr.contains("/no/such/program"), "{}", exit.stderr);
    assert!(fx.crun_containers().is_empty(), "left behind: {:?}", fx.crun_containers());
}
