//! `yunbian shim`: workload processes that the edge agent starts through its
//! process runtime for instances that are not native executables.
//!
//! `yunbian shim wasm` runs one WebAssembly component or module
//! (`runtime: wasm`); the logic is in the `yunbian-wasm` crate, behind the
//! `wasm` cargo feature (on by default). The command line is the contract
//! with the agent, which builds it:
//!
//! ```text
//! yunbian shim wasm --module <PATH.wasm> --dir <HOST_DIR> [--env KEY=VALUE]...
//!     [--memory-bytes N] [--cpu-millis N] [--cpu-stop-after DURATION]
//!     [--cache-dir DIR] [--inherit-network] -- [ARGS...]
//! ```
//!
//! The process exits with the guest's exit code, 134 after a trap, the
//! memory limit or `--cpu-stop-after` (the reason on stderr, and in
//! `$YUNBIAN_TERMINATION_LOG` for the instance's status:
//! `yunbian_runtime::termination`), 1 if the guest could not be started.

use std::num::NonZeroU32;
use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum ShimCommand {
    /// Run a WASI component (preview 2) or core module (preview 1).
    Wasm(WasmArgs),
    /// Run an OCI image layout with crun (see `shim_oci`).
    Oci(crate::shim_oci::OciArgs),
}

#[derive(Debug, Args)]
pub struct WasmArgs {
    /// The component or core module (told apart by its header).
    #[arg(long, value_name = "PATH.wasm")]
    module: PathBuf,
    /// Host directory the guest sees read-write as /data, its working
    /// directory (created if missing).
    #[arg(long, value_name = "HOST_DIR")]
    dir: PathBuf,
    /// A variable of the guest's environment, which holds only these.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Cap on the guest's linear memories and tables together, in bytes.
    #[arg(long, value_name = "N")]
    memory_bytes: Option<u64>,
    /// CPU limit in millicores (1000 = one core).
    #[arg(long, value_name = "N")]
    cpu_millis: Option<NonZeroU32>,
    /// Stop the guest (exit 134, CPULimitExceeded) once it has used its
    /// whole CPU share, without a break, for this long (30s, 2m).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    cpu_stop_after: Option<std::time::Duration>,
    /// Directory of compiled code kept across restarts.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Let the guest open TCP/UDP sockets and look up names; without it
    /// it has no network.
    #[arg(long)]
    inherit_network: bool,
    /// The guest's arguments; its argv[0] is the module's file name.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Runs the shim; returns the process's exit code.
pub fn run(cmd: ShimCommand) -> i32 {
    match cmd {
        ShimCommand::Wasm(args) => run_wasm(args),
        ShimCommand::Oci(args) => crate::shim_oci::run(args),
    }
}

#[cfg(feature = "wasm")]
fn run_wasm(args: WasmArgs) -> i32 {
    let opts = yunbian_wasm::ShimOptions {
        module: args.module,
        dir: args.dir,
        env: args.env,
        args: args.args,
        memory_bytes: args.memory_bytes,
        cpu_millis: args.cpu_millis,
        cpu_stop_after: args.cpu_stop_after,
        cache_dir: args.cache_dir,
        inherit_network: args.inherit_network,
    };
    match yunbian_wasm::run_with_report(opts) {
        Ok(report) => {
            if let Some((reason, message)) = report.outcome.explain() {
                eprintln!("error: {message}");
                let t = yunbian_runtime::termination::Termination { reason: reason.into(), message };
                yunbian_runtime::termination::write_from_env(&t);
            }
            report.outcome.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

#[cfg(not(feature = "wasm"))]
fn run_wasm(_args: WasmArgs) -> i32 {
    eprintln!("error: this build has no wasm runtime; rebuild with --features wasm");
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        shim: ShimCommand,
    }

    #[test]
    fn the_agents_command_line_parses() {
        let cli = Cli::try_parse_from([
            "shim",
            "wasm",
            "--module",
            "/apps/hello.wasm",
            "--dir",
            "/var/lib/yunbian/data/hello",
            "--env",
            "YUNBIAN_NODE=edge-1",
            "--env",
            "EQ=a=b",
            "--memory-bytes",
            "67108864",
            "--cpu-millis",
            "250",
            "--cpu-stop-after",
            "30s",
            "--cache-dir",
            "/var/cache/yunbian/wasm",
            "--inherit-network",
            "--",
            "--port",
            "8080",
        ])
        .expect("parses");
        let ShimCommand::Wasm(a) = cli.shim else { panic!("a wasm command") };
        assert_eq!(a.module, PathBuf::from("/apps/hello.wasm"));
        assert_eq!(a.dir, PathBuf::from("/var/lib/yunbian/data/hello"));
        assert_eq!(a.env, [("YUNBIAN_NODE".to_owned(), "edge-1".to_owned()), ("EQ".to_owned(), "a=b".to_owned())]);
        assert_eq!(a.memory_bytes, Some(64 << 20));
        assert_eq!(a.cpu_millis, NonZeroU32::new(250));
        assert_eq!(a.cpu_stop_after, Some(std::time::Duration::from_secs(30)));
        assert_eq!(a.cache_dir, Some(PathBuf::from("/var/cache/yunbian/wasm")));
        assert!(a.inherit_network);
        assert_eq!(a.args, ["--port", "8080"]);
    }

    #[test]
    fn the_minimal_command_line_has_no_limits_and_no_network() {
        let cli = Cli::try_parse_from(["shim", "wasm", "--module", "m.wasm", "--dir", "d"]).expect("parses");
        let ShimCommand::Wasm(a) = cli.shim else { panic!("a wasm command") };
        assert!(a.env.is_empty() && a.args.is_empty() && !a.inherit_network);
        assert_eq!((a.memory_bytes, a.cpu_millis, a.cache_dir), (None, None, None));
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["shim", "wasm", "--dir", "d"][..],
            &["shim", "wasm", "--module", "m.wasm", "--dir", "d", "--env", "NOEQUALS"],
            &["shim", "wasm", "--module", "m.wasm", "--dir", "d", "--env", "=v"],
            &["shim", "wasm", "--module", "m.wasm", "--dir", "d", "--cpu-millis", "0"],
            &["shim", "wasm", "--module", "m.wasm", "--dir", "d", "--memory-bytes", "64Mi"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
