//! `yunbian shim oci`: one `runtime: oci` instance. The agent's launcher
//! builds the command line; the shim prepares the container's bundle from
//! the pulled image layout (layers unpacked once per digest into a cache
//! shared by the node's instances) and runs it with crun in the
//! foreground, in the instance's own cgroup (see `yunbian_runtime::oci`).
//!
//! ```text
//! yunbian shim oci --layout <DIR> --oci-dir <DIR> --id <ID> --volume <DIR>
//!     [--bundle DIR] [--memory-bytes N] [--cpu-millis N] [--workdir PATH]
//!     [--entrypoint ARG]... [--env KEY=VALUE]... [--loopback-only] -- [ARGS...]
//! ```
//!
//! Exit codes: the container's status (128+signal when killed), 125 when
//! the container could not be prepared or started (reason on stderr).

use std::path::PathBuf;

use clap::Args;

/// Exit code when the container could not be prepared or started.
const CANNOT_RUN: i32 = 125;

#[derive(Debug, Args)]
pub struct OciArgs {
    /// The unpacked OCI image layout (index.json, blobs/).
    #[arg(long, value_name = "DIR")]
    layout: PathBuf,
    /// The node's oci directory: `layers/` (the layer cache), `bundles/`,
    /// `state/` (crun's).
    #[arg(long, value_name = "DIR")]
    oci_dir: PathBuf,
    /// Container id.
    #[arg(long)]
    id: String,
    /// Host directory mounted read-write at /data (relative: to the
    /// current directory, the instance's own).
    #[arg(long, value_name = "DIR")]
    volume: PathBuf,
    /// Where the container's bundle (rootfs copy, config.json) is made;
    /// default `<oci-dir>/bundles/<id>`. The agent puts it in the
    /// instance's directory, so it goes with the instance.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    memory_bytes: u64,
    /// CPU limit in millicores.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cpu_millis: u64,
    /// Working directory inside the container (replaces the image's).
    #[arg(long, value_name = "PATH")]
    workdir: Option<String>,
    /// Replaces the image's entrypoint (repeat for each word).
    #[arg(long = "entrypoint", value_name = "ARG", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// A variable set over the image's environment.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = crate::shim::parse_env)]
    env: Vec<(String, String)>,
    /// Give the container its own network namespace with only loopback
    /// (default: the host's network).
    #[arg(long)]
    loopback_only: bool,
    /// Replace the image's Cmd.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

/// Runs the container; returns the process's exit code.
pub fn run(a: OciArgs) -> i32 {
    match run_inner(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("yunbian shim oci: {e:#}");
            CANNOT_RUN
        }
    }
}

fn run_inner(a: OciArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    use yunbian_runtime::oci;
    let volume = std::path::absolute(&a.volume).context("resolve --volume")?;
    let image = oci::ImageLayout::open(&a.layout).context("open the image layout")?;
    let cache = oci::LayerCache::open(&a.oci_dir.join("layers")).context("open the layer cache")?;
    let mut req = oci::BundleRequest::new(a.id.clone(), volume);
    req.args = a.args;
    req.command = a.entrypoint;
    req.env = a.env;
    req.working_dir = a.workdir;
    req.memory_bytes = a.memory_bytes;
    req.cpu_millis = a.cpu_millis;
    req.host_network = !a.loopback_only;
    let bundle = match &a.bundle {
        Some(b) => std::path::absolute(b).context("resolve --bundle")?,
        None => a.oci_dir.join("bundles").join(&a.id),
    };
    let prepared = oci::prepare_bundle(&image, &cache, &req, &bundle).context("prepare the bundle")?;
    eprintln!(
        "yunbian shim oci: image {} ({} layers, {} unpacked now){}",
        image.digest().hex(),
        image.layers().len(),
        prepared.layers_unpacked,
        if prepared.reused { ", bundle reused" } else { "" }
    );
    let mut opts = oci::ShimOptions::new(&bundle, a.id);
    opts.state_root = a.oci_dir.join("state");
    Ok(oci::run_shim(&opts)?)
}
