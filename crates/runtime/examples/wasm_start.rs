//! Start time and memory of `runtime: wasm` instances against native
//! processes, through the launch path the edge agent uses.
//!
//! The agent turns a `runtime: wasm` instance into a process instance whose
//! command is `yunbian shim wasm --module <blob> --dir . --cache-dir
//! <data dir>/wasm-cache --inherit-network --env … --` (the edge crate's
//! `Launcher::wasm_command`) and hands it to [`Runtime::ensure`] of its
//! [`ProcessRuntime`], as it does for every workload. This program builds
//! the same command line (without resource limits, like an App that sets
//! none) and calls the same `ensure` on a `ProcessRuntime` with the agent's
//! default options (cgroups when usable), so what it times is what a node
//! does once the module is on its disk. Pulling the artifact is not
//! included.
//!
//! **Start** is measured from the call to `ensure` until the instance's
//! HTTP endpoint has answered a `GET /` with `200` (the whole response
//! read). The endpoint is polled every 0.5 ms from the moment `ensure`
//! returns (connection refused until the guest listens). Also reported:
//! `ensure` returning, i.e. the process spawned and its status `Running`;
//! and, from `/proc/PID/task/*/schedstat` right after the first answer,
//! the CPU time the instance had used and how long it had waited for a
//! CPU, so that a start on a busy machine can be told apart from a slow
//! one.
//!
//! Three kinds of instance, one of each per round (each round in another
//! order):
//! - `wasm-cold`: the sample app (`examples/apps/wasm-hello/wasm-hello.wasm`,
//!   a WASI 0.2 component) with an empty compiled-code cache directory, so
//!   the shim compiles it with Cranelift and writes the cache entry;
//! - `wasm-cached`: the same with the node's cache already holding the
//!   compiled module (warmed by one untimed start);
//! - `native`: `native_hello` (this crate's example), the same HTTP service
//!   written with std for the host, as a plain process instance.
//!
//! **Trivial start and exit** (no process runtime, `std::process::Command`
//! spawn until wait returns): `/bin/true`; `yunbian --version` (what
//! exec'ing the 33 MB executable costs); `yunbian shim wasm` of a 36-byte
//! core module whose `_start` returns at once, with an empty cache, with
//! the cache warm, and with no cache directory.
//!
//! **Memory**: K instances of a kind started together (concurrent `ensure`
//! calls), then, once all answered and after a settling pause, for each
//! instance its process and every process of its session (the shim has no
//! children; the sum covers it if it ever has): `Rss`, `Pss`, `Pss_Anon`,
//! `Pss_File` from `/proc/PID/smaps_rollup`, `VmHWM` and the thread count
//! from `/proc/PID/status`. For the first instance of each round,
//! `/proc/PID/smaps` is summed by kind of mapping: the executable's file
//! pages (shared by every process running it) and its private pages
//! (relocated data), shared libraries, the brk heap, Wasmtime's compiled
//! code, linear memories, and other anonymous memory (malloc arenas, thread
//! stacks); see [`smaps_breakdown`].
//!
//! ```sh
//! scripts/bench-wasm.sh      # builds everything and runs this with the defaults
//! target/release/examples/wasm_start --shim target/release/yunbian \
//!     --module examples/apps/wasm-hello/wasm-hello.wasm \
//!     --native target/release/examples/native_hello [--reps 15] [--counts 1,10,50] \
//!     [--phases trivial,start,memory] [--settle-ms 2000] [--no-cgroups] [--dir DIR]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use yunbian_api::{AppInstance, AppInstanceSpec, InstancePhase, ProcessSpec, WorkloadTemplate};
use yunbian_runtime::{ProcessRuntime, ProcessRuntimeOptions, Runtime};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

/// The node name the instances are told.
const NODE: &str = "bench-node";
/// How long an instance (or K of them) may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a starting instance's endpoint is tried.
const POLL: Duration = Duration::from_micros(500);

/// A WebAssembly core module exporting a `_start` that returns at once
/// (type section `() -> ()`, one function, exported as `_start`, body
/// `end`): a preview 1 command that does nothing.
const TRIVIAL_MODULE: [u8; 36] = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: one type, () -> ()
    0x03, 0x02, 0x01, 0x00, // function section: one function of type 0
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export "_start" = func 0
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code section: one body, no locals, `end`
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    WasmCold,
    WasmCached,
    Native,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::WasmCold, Kind::WasmCached, Kind::Native];

    fn tag(self) -> &'static str {
        match self {
            Kind::WasmCold => "wasm-cold",
            Kind::WasmCached => "wasm-cached",
            Kind::Native => "native",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::WasmCold => "wasm, not compiled yet (empty cache)",
            Kind::WasmCached => "wasm, compiled module in the cache",
            Kind::Native => "native process (`native_hello`)",
        }
    }
}

struct Args {
    shim: PathBuf,
    module: PathBuf,
    native: PathBuf,
    reps: usize,
    counts: Vec<usize>,
    phases: Vec<String>,
    settle: Duration,
    cgroups: bool,
    dir: Option<PathBuf>,
}

fn usage(why: &str) -> ! {
    eprintln!("wasm_start: {why}");
    eprintln!(
        "usage: wasm_start --shim YUNBIAN --module WASM --native NATIVE_HELLO [--reps N] [--counts 1,10,50] \
         [--phases trivial,start,memory] [--settle-ms MS] [--no-cgroups] [--dir DIR]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        shim: PathBuf::new(),
        module: PathBuf::new(),
        native: PathBuf::new(),
        reps: 15,
        counts: vec![1, 10, 50],
        phases: vec!["trivial".into(), "start".into(), "memory".into()],
        settle: Duration::from_secs(2),
        cgroups: true,
        dir: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--no-cgroups" {
            a.cgroups = false;
            continue;
        }
        let value = argv.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = |s: &str| s.parse::<usize>().unwrap_or_else(|_| usage(&format!("{s} is not a number")));
        match flag.as_str() {
            "--shim" => a.shim = absolute(&value),
            "--module" => a.module = absolute(&value),
            "--native" => a.native = absolute(&value),
            "--reps" => a.reps = number(&value).max(1),
            "--counts" => a.counts = value.split(',').map(number).filter(|&k| k > 0).collect(),
            "--phases" => a.phases = value.split(',').map(str::to_owned).collect(),
            "--settle-ms" => a.settle = Duration::from_millis(number(&value) as u64),
            "--dir" => a.dir = Some(absolute(&value)),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    for (what, p) in [("--shim", &a.shim), ("--module", &a.module), ("--native", &a.native)] {
        if !p.is_file() {
            usage(&format!("{what} {} is not a file", p.display()));
        }
    }
    a
}

fn absolute(p: &str) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p))
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if let Err(e) = run(args).await {
        eprintln!("wasm_start: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("yunbian-wasm-start-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Status updates are read from `statuses()`; drain the channel.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let opts = ProcessRuntimeOptions { cgroups: args.cgroups, ..Default::default() };
    let rt = ProcessRuntime::with_options(dir.join("instances"), NODE.into(), tx, opts)?;
    print_machine(&args, &dir, &rt.limits_support().note);

    let mut bench = Bench { args, dir, rt, seq: 0, started: Vec::new() };
    let result = bench.phases().await;
    // Whatever happened, no instance outlives the benchmark (workloads
    // survive their runtime by design, so they must be removed).
    bench.remove_all().await;
    result
}

fn print_machine(args: &Args, dir: &Path, limits: &str) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("# wasm_start");
    println!("cores: {cores}, load average: {}", load_average());
    println!("kernel: {}", read_trimmed("/proc/sys/kernel/osrelease"));
    println!("shim: {} ({} bytes)", args.shim.display(), size(&args.shim));
    println!("module: {} ({} bytes)", args.module.display(), size(&args.module));
    println!("native: {} ({} bytes)", args.native.display(), size(&args.native));
    println!("work dir: {}", dir.display());
    println!("process runtime limits: {limits}");
    println!("repetitions: {}, instance counts: {:?}", args.reps, args.counts);
    println!();
}

fn read_trimmed(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn load_average() -> String {
    read_trimmed("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

struct Bench {
    args: Args,
    dir: PathBuf,
    rt: Arc<ProcessRuntime>,
    /// Makes instance names and cold cache directories unique.
    seq: usize,
    /// Instances that may still run (removed at the end in any case).
    started: Vec<String>,
}

/// One instance to start: its name, the port it listens on, what it is.
struct Planned {
    name: String,
    port: u16,
    instance: AppInstance,
}

impl Bench {
    async fn phases(&mut self) -> Result<()> {
        let phases = self.args.phases.clone();
        if phases.iter().any(|p| p == "trivial") {
            self.trivial()?;
        }
        if phases.iter().any(|p| p == "start") {
            self.start_times().await?;
        }
        if phases.iter().any(|p| p == "memory") {
            self.memory().await?;
        }
        println!("load average at the end: {}", load_average());
        Ok(())
    }

    fn next_seq(&mut self) -> usize {
        self.seq += 1;
        self.seq
    }

    fn warm_cache(&self) -> PathBuf {
        self.dir.join("cache").join("warm")
    }

    fn fresh_cache(&mut self) -> PathBuf {
        let n = self.next_seq();
        self.dir.join("cache").join(format!("cold-{n}"))
    }

    // ---- trivial start and exit -------------------------------------------

    fn trivial(&mut self) -> Result<()> {
        println!("## Trivial program: spawn until exit (no process runtime)");
        let module = self.dir.join("trivial.wasm");
        std::fs::write(&module, TRIVIAL_MODULE)?;
        let data = self.dir.join("trivial-data");
        let shim = self.args.shim.display().to_string();
        let wasm = |cache: Option<&Path>| {
            let mut c =
                vec![shim.clone(), "shim".into(), "wasm".into(), "--module".into(), module.display().to_string()];
            c.extend(["--dir".into(), data.display().to_string()]);
            if let Some(cache) = cache {
                c.extend(["--cache-dir".into(), cache.display().to_string()]);
            }
            c.push("--".into());
            c
        };
        let warm = self.dir.join("cache").join("trivial-warm");
        exit_time(&wasm(Some(&warm)))?; // fills the warm cache
        exit_time(&["/bin/true".to_owned()])?;
        let rows = [
            "native: /bin/true",
            "yunbian --version (exec of the shim executable)",
            "wasm: trivial module, empty cache",
            "wasm: trivial module, cached",
            "wasm: trivial module, no --cache-dir",
        ];
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
        for _ in 0..self.args.reps {
            let cold = self.fresh_cache();
            let commands = [
                vec!["/bin/true".to_owned()],
                vec![shim.clone(), "--version".into()],
                wasm(Some(&cold)),
                wasm(Some(&warm)),
                wasm(None),
            ];
            for (i, c) in commands.iter().enumerate() {
                times[i].push(exit_time(c)?);
            }
        }
        println!("| program | runs | spawn → exit, median | min – max |");
        println!("|---|---|---|---|");
        for (row, t) in rows.iter().zip(&times) {
            let s = Stats::of(t);
            println!("| {row} | {} | {} | {} – {} |", t.len(), ms(s.median), ms(s.min), ms(s.max));
        }
        println!();
        Ok(())
    }

    // ---- start until the first answer -------------------------------------

    fn plan(&mut self, kind: Kind, cache: Option<&Path>, port: u16) -> Planned {
        let n = self.next_seq();
        let name = format!("{}-{n}-{}", kind.tag(), std::process::id());
        let mut env = BTreeMap::new();
        env.insert("HOST".to_owned(), "127.0.0.1".to_owned());
        env.insert("PORT".to_owned(), port.to_string());
        let spec = match kind {
            Kind::Native => {
                ProcessSpec { command: vec![self.args.native.display().to_string()], env, ..Default::default() }
            }
            Kind::WasmCold | Kind::WasmCached => {
                let cache = cache.map_or_else(|| self.warm_cache(), Path::to_path_buf);
                ProcessSpec { command: self.wasm_command(&name, &cache, &env), ..Default::default() }
            }
        };
        let template = WorkloadTemplate { process: Some(spec), ..Default::default() };
        let hash = template.hash();
        let instance = AppInstance::new(
            name.clone(),
            AppInstanceSpec {
                app: "bench".into(),
                node: NODE.into(),
                template,
                template_hash: hash,
                ..Default::default()
            },
        );
        Planned { name, port, instance }
    }

    /// The command `Launcher::wasm_command` (crates/edge) gives an instance
    /// without limits: the guest's environment is the instance's, then what
    /// the agent adds for every workload.
    fn wasm_command(&self, name: &str, cache: &Path, env: &BTreeMap<String, String>) -> Vec<String> {
        let mut cmd: Vec<String> = vec![
            self.args.shim.display().to_string(),
            "shim".into(),
            "wasm".into(),
            "--module".into(),
            self.args.module.display().to_string(),
        ];
        cmd.extend(["--dir".into(), ".".into(), "--cache-dir".into(), cache.display().to_string()]);
        cmd.push("--inherit-network".into());
        let agent = [("NODE_NAME", NODE), ("APP_NAME", "bench"), ("INSTANCE_NAME", name)];
        for (k, v) in env.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(agent) {
            cmd.extend(["--env".into(), format!("{k}={v}")]);
        }
        cmd.push("--".into());
        cmd
    }

    /// Starts one instance and times it (see [`StartTimes`]).
    async fn start_one(&mut self, p: &Planned) -> Result<StartTimes> {
        let t0 = Instant::now();
        self.started.push(p.name.clone());
        self.rt.ensure(&p.instance).await?;
        let spawned = t0.elapsed();
        let port = p.port;
        let answered = tokio::task::spawn_blocking(move || wait_answer(port, t0)).await?;
        let Some(answered) = answered else {
            return Err(format!("{} did not answer on port {port}: {}", p.name, self.log_tail(&p.name)).into());
        };
        let pid = self.rt.statuses().await.into_iter().find(|u| u.instance == p.name).and_then(|u| u.status.pid);
        let (cpu, waited) = pid.map(schedstat).unwrap_or_default();
        Ok(StartTimes { spawned, answered, cpu, waited })
    }

    async fn stop(&mut self, name: &str) -> Result<()> {
        self.rt.remove(name).await?;
        self.started.retain(|n| n != name);
        Ok(())
    }

    async fn start_times(&mut self) -> Result<()> {
        println!("## Start: `ProcessRuntime::ensure` until the first HTTP answer");
        // Untimed: fills the warm cache, brings both executables and the
        // module into the page cache.
        for kind in [Kind::WasmCached, Kind::Native] {
            let p = self.plan(kind, None, free_ports(1)?[0]);
            self.start_one(&p).await?;
            self.stop(&p.name).await?;
        }
        let warm_files = count_files(&self.warm_cache());
        let mut times: HashMap<Kind, Vec<StartTimes>> = HashMap::new();
        for rep in 0..self.args.reps {
            // Each round starts with another kind, so none always follows
            // the same other one (or the removal of the same other one).
            for j in 0..Kind::ALL.len() {
                let kind = Kind::ALL[(rep + j) % Kind::ALL.len()];
                let cache = match kind {
                    Kind::WasmCold => Some(self.fresh_cache()),
                    _ => None,
                };
                let p = self.plan(kind, cache.as_deref(), free_ports(1)?[0]);
                let t = self.start_one(&p).await?;
                println!(
                    "  round {rep}, {}: spawned {}, answered {}, CPU {}, waited for a CPU {}",
                    kind.tag(),
                    ms(t.spawned),
                    ms(t.answered),
                    ms(t.cpu),
                    ms(t.waited)
                );
                self.stop(&p.name).await?;
                times.entry(kind).or_default().push(t);
                if let Some(c) = cache {
                    if count_files(&c) == 0 {
                        println!("  warning: the cold start left no compiled module in {}", c.display());
                    }
                }
            }
        }
        if count_files(&self.warm_cache()) != warm_files {
            println!("  warning: the warm cache changed during the cached starts (recompiled?)");
        }
        println!();
        println!(
            "| instance | starts | ensure → spawned, median (min – max) | ensure → first HTTP answer, median | min – max \
             | its CPU time until then, median (min – max) | its wait for a CPU, median |"
        );
        println!("|---|---|---|---|---|---|---|");
        for kind in Kind::ALL {
            let t = &times[&kind];
            let col = |f: fn(&StartTimes) -> Duration| Stats::of(&t.iter().map(f).collect::<Vec<_>>());
            let (s, a, c, w) = (col(|t| t.spawned), col(|t| t.answered), col(|t| t.cpu), col(|t| t.waited));
            println!(
                "| {} | {} | {} ({} – {}) | **{}** | {} – {} | {} ({} – {}) | {} |",
                kind.label(),
                t.len(),
                ms(s.median),
                ms(s.min),
                ms(s.max),
                ms(a.median),
                ms(a.min),
                ms(a.max),
                ms(c.median),
                ms(c.min),
                ms(c.max),
                ms(w.median)
            );
        }
        println!();
        Ok(())
    }

    // ---- memory of K running instances ------------------------------------

    async fn memory(&mut self) -> Result<()> {
        println!("## Memory of K running instances (started together)");
        let mut rows = Vec::new();
        let mut breakdowns = Vec::new();
        for &k in &self.args.counts.clone() {
            for kind in Kind::ALL {
                let (row, breakdown) = self.memory_round(kind, k).await?;
                println!(
                    "  {} x{k}: all answered after {}, RSS median {} KiB, PSS median {} KiB",
                    kind.tag(),
                    ms(row.all_answered),
                    row.rss.median,
                    row.pss.median
                );
                rows.push(row);
                breakdowns.push((kind, k, breakdown));
            }
        }
        println!();
        println!("Per instance (its whole process tree), KiB; median over the K instances (min – max):");
        println!();
        println!(
            "| instance | K | all K answering | RSS | PSS | of which anon | of which file | peak RSS (VmHWM) | threads | PSS, all K |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} ({} – {}) | {} ({} – {}) | {} | {} | {} | {} | {} MiB |",
                r.kind.label(),
                r.k,
                ms(r.all_answered),
                r.rss.median,
                r.rss.min,
                r.rss.max,
                r.pss.median,
                r.pss.min,
                r.pss.max,
                r.pss_anon.median,
                r.pss_file.median,
                r.hwm.median,
                r.threads.median,
                r.pss_total / 1024
            );
        }
        println!();
        println!("By mapping, the first instance of each round (RSS / PSS, KiB):");
        println!();
        let categories = Category::ALL;
        let header: Vec<&str> = categories.iter().map(|c| c.label()).collect();
        println!("| instance | K | {} |", header.join(" | "));
        println!("|---|---|{}", "---|".repeat(categories.len()));
        for (kind, k, b) in &breakdowns {
            let cells: Vec<String> = categories
                .iter()
                .map(|c| {
                    let (rss, pss) = b.get(c).copied().unwrap_or((0, 0));
                    format!("{rss} / {pss}")
                })
                .collect();
            println!("| {} | {k} | {} |", kind.tag(), cells.join(" | "));
        }
        println!();
        Ok(())
    }

    async fn memory_round(&mut self, kind: Kind, k: usize) -> Result<(MemoryRow, BTreeMap<Category, (u64, u64)>)> {
        let cache = match kind {
            Kind::WasmCold => Some(self.fresh_cache()),
            _ => None,
        };
        let ports = free_ports(k)?;
        let planned: Vec<Planned> = ports.iter().map(|&port| self.plan(kind, cache.as_deref(), port)).collect();
        self.started.extend(planned.iter().map(|p| p.name.clone()));
        let t0 = Instant::now();
        let mut starts = JoinSet::new();
        for p in &planned {
            let rt = self.rt.clone();
            let instance = p.instance.clone();
            starts.spawn(async move { rt.ensure(&instance).await });
        }
        while let Some(r) = starts.join_next().await {
            r??;
        }
        let waiting = ports.clone();
        let answers = tokio::task::spawn_blocking(move || wait_all(&waiting, t0)).await?;
        let Some(all_answered) = answers else {
            let tails: Vec<String> = planned.iter().take(3).map(|p| self.log_tail(&p.name)).collect();
            return Err(format!("{k} {} instances did not all answer: {}", kind.tag(), tails.join(" / ")).into());
        };
        tokio::time::sleep(self.args.settle).await;

        let statuses: HashMap<String, (InstancePhase, Option<u32>, u32)> = self
            .rt
            .statuses()
            .await
            .into_iter()
            .map(|u| (u.instance, (u.status.phase, u.status.pid, u.status.restart_count)))
            .collect();
        let mut mems = Vec::new();
        let mut breakdown = BTreeMap::new();
        for (i, p) in planned.iter().enumerate() {
            let Some(&(phase, Some(pid), restarts)) = statuses.get(&p.name) else {
                return Err(format!("{} has no pid: {}", p.name, self.log_tail(&p.name)).into());
            };
            if phase != InstancePhase::Running || restarts > 0 {
                return Err(format!("{} is {phase:?} after {restarts} restarts", p.name).into());
            }
            mems.push(tree_memory(pid)?);
            if i == 0 {
                breakdown = smaps_breakdown(pid)?;
            }
        }

        let mut stops = JoinSet::new();
        for p in &planned {
            let rt = self.rt.clone();
            let name = p.name.clone();
            stops.spawn(async move { rt.remove(&name).await });
        }
        while let Some(r) = stops.join_next().await {
            r??;
        }
        let names: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
        self.started.retain(|n| !names.contains(&n.as_str()));

        let col = |f: fn(&Memory) -> u64| IntStats::of(&mems.iter().map(f).collect::<Vec<_>>());
        let row = MemoryRow {
            kind,
            k,
            all_answered,
            rss: col(|m| m.rss),
            pss: col(|m| m.pss),
            pss_anon: col(|m| m.pss_anon),
            pss_file: col(|m| m.pss_file),
            hwm: col(|m| m.hwm),
            threads: col(|m| m.threads),
            pss_total: mems.iter().map(|m| m.pss).sum(),
        };
        Ok((row, breakdown))
    }

    fn log_tail(&self, name: &str) -> String {
        let Some(path) = self.rt.log_path(name) else { return "no log".into() };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        format!("log {}: {tail}", path.display())
    }

    async fn remove_all(&mut self) {
        for name in std::mem::take(&mut self.started) {
            if let Err(e) = self.rt.remove(&name).await {
                eprintln!("wasm_start: remove {name}: {e}");
            }
        }
    }
}

// ---- measuring ----------------------------------------------------------

/// One start, all from the call to `ensure`.
#[derive(Debug, Clone, Copy)]
struct StartTimes {
    /// `ensure` returned: the process is spawned (exec done) and `Running`.
    spawned: Duration,
    /// The first complete `200` answer.
    answered: Duration,
    /// CPU time the instance's threads had used when it first answered
    /// (exec and everything after; not what the load on the machine adds).
    cpu: Duration,
    /// Time its threads had spent runnable but waiting for a CPU: what
    /// other work on the machine added to `answered`.
    waited: Duration,
}

/// (time on a CPU, time waiting for one) of the process's live threads,
/// from `/proc/PID/task/*/schedstat` (nanoseconds). Threads that already
/// ended are not counted; the shim's threads live as long as it does.
fn schedstat(pid: u32) -> (Duration, Duration) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Default::default() };
    let (mut cpu, mut waited) = (0u64, 0u64);
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0));
        cpu += fields.next().unwrap_or(0);
        waited += fields.next().unwrap_or(0);
    }
    (Duration::from_nanos(cpu), Duration::from_nanos(waited))
}

/// Spawn until exit of a command whose output is discarded; it must succeed.
fn exit_time(cmd: &[String]) -> Result<Duration> {
    let (prog, args) = cmd.split_first().ok_or("empty command")?;
    let t0 = Instant::now();
    let status =
        Command::new(prog).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    let d = t0.elapsed();
    if !status.success() {
        return Err(format!("{} exited with {status}", cmd.join(" ")).into());
    }
    Ok(d)
}

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<Vec<_>, _>>()?)
}

/// Whether `GET /` on the port gets a complete `200` response now.
fn answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut response = Vec::new();
    s.read_to_end(&mut response).is_ok() && response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"}\n")
}

/// Time from `t0` until the port answers, polling every [`POLL`].
fn wait_answer(port: u16, t0: Instant) -> Option<Duration> {
    while t0.elapsed() < ANSWER_TIMEOUT {
        if answers(port) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(POLL);
    }
    None
}

/// Time from `t0` until every port has answered once (swept in turn, 2 ms
/// between sweeps, so K pollers do not compete with K starting instances).
fn wait_all(ports: &[u16], t0: Instant) -> Option<Duration> {
    let mut pending: Vec<u16> = ports.to_vec();
    while t0.elapsed() < ANSWER_TIMEOUT {
        pending.retain(|&p| !answers(p));
        if pending.is_empty() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// Memory of one instance's process tree, KiB (threads: a count).
#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    rss: u64,
    pss: u64,
    pss_anon: u64,
    pss_file: u64,
    hwm: u64,
    threads: u64,
}

/// The processes of the session `leader` leads (the process runtime starts
/// every workload as a session leader), the leader first.
fn session(leader: u32) -> Vec<u32> {
    let mut out = vec![leader];
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == leader {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command's closing parenthesis: state ppid pgrp session …
        let sid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(3)?.parse::<u32>().ok());
        if sid == Some(leader) {
            out.push(pid);
        }
    }
    out
}

fn kib_fields(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn tree_memory(leader: u32) -> Result<Memory> {
    let mut m = Memory::default();
    for pid in session(leader) {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let r = kib_fields(&rollup);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let s = kib_fields(&status);
        let get = |h: &HashMap<&str, u64>, k: &str| h.get(k).copied().unwrap_or(0);
        m.rss += get(&r, "Rss");
        m.pss += get(&r, "Pss");
        m.pss_anon += get(&r, "Pss_Anon");
        m.pss_file += get(&r, "Pss_File");
        m.hwm += get(&s, "VmHWM");
        m.threads += get(&s, "Threads");
    }
    Ok(m)
}

/// What a mapping of a workload process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Category {
    Executable,
    ExecutablePrivate,
    OtherFiles,
    Heap,
    CompiledWasm,
    LinearMemory,
    OtherAnon,
    Other,
}

impl Category {
    const ALL: [Category; 8] = [
        Category::Executable,
        Category::ExecutablePrivate,
        Category::OtherFiles,
        Category::Heap,
        Category::CompiledWasm,
        Category::LinearMemory,
        Category::OtherAnon,
        Category::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Category::Executable => "executable, file pages",
            Category::ExecutablePrivate => "executable, private (relocated data)",
            Category::OtherFiles => "shared libraries (libc, libm, ld.so)",
            Category::Heap => "brk heap",
            Category::CompiledWasm => "compiled wasm (anon r-x, r--)",
            Category::LinearMemory => "wasm linear memories",
            Category::OtherAnon => "other anon (malloc arenas, thread stacks)",
            Category::Other => "main stack, vdso",
        }
    }
}

struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    path: String,
    rss: u64,
    pss: u64,
    /// Anonymous pages (in a private file mapping: pages written since, e.g.
    /// by relocation), never shared with another instance.
    anon: u64,
}

fn read_smaps(pid: u32) -> Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = words.next().unwrap_or_default().to_owned();
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                out.push(Mapping { start, end, perms, path, rss: 0, pss: 0, anon: 0 });
                continue;
            }
        }
        let value = || words.clone().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if let Some(m) = out.last_mut() {
            match first {
                "Rss:" => m.rss = value(),
                "Pss:" => m.pss = value(),
                "Anonymous:" => m.anon = value(),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// RSS and PSS (KiB) of the instance's leader process by kind of mapping.
///
/// Wasmtime maps a linear memory as a reservation of 4 GiB plus guard
/// pages (`---p`) whose accessible start is read-write, in two parts when
/// the module has data segments: a private mapping of a memfd holding the
/// initial image (`/memfd:wasm-memory-image`, copy-on-write), then
/// anonymous pages. Compiled code is an anonymous mapping made executable,
/// beside read-only anonymous pages (its tables and metadata).
fn smaps_breakdown(pid: u32) -> Result<BTreeMap<Category, (u64, u64)>> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?.display().to_string();
    let maps = read_smaps(pid)?;
    let mut out: BTreeMap<Category, (u64, u64)> = BTreeMap::new();
    let mut add = |c: Category, rss: u64, pss: u64| {
        let e = out.entry(c).or_default();
        e.0 += rss;
        e.1 += pss;
    };
    for (i, m) in maps.iter().enumerate() {
        let next = maps.get(i + 1);
        let reservation_follows = next
            .is_some_and(|n| n.start == m.end && n.path.is_empty() && n.perms == "---p" && n.end - n.start >= 1 << 30);
        if m.path == exe || m.path.strip_suffix(" (deleted)") == Some(exe.as_str()) {
            add(Category::Executable, m.rss - m.anon, m.pss.saturating_sub(m.anon));
            add(Category::ExecutablePrivate, m.anon, m.anon);
            continue;
        }
        let category = if m.path.starts_with("/memfd:wasm-memory-image") {
            Category::LinearMemory
        } else if m.path.starts_with('/') {
            Category::OtherFiles
        } else if m.path == "[heap]" {
            Category::Heap
        } else if !m.path.is_empty() {
            Category::Other
        } else if m.perms.starts_with("rw") && reservation_follows {
            Category::LinearMemory
        } else if m.perms.contains('x') || m.perms.starts_with("r--") {
            Category::CompiledWasm
        } else {
            Category::OtherAnon
        };
        add(category, m.rss, m.pss);
    }
    Ok(out)
}

// ---- statistics and formatting --------------------------------------------

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn of(samples: &[Duration]) -> Stats {
        let mut s = samples.to_vec();
        s.sort();
        let n = s.len();
        let median = match n {
            0 => Duration::ZERO,
            _ if n % 2 == 1 => s[n / 2],
            _ => (s[n / 2 - 1] + s[n / 2]) / 2,
        };
        Stats { median, min: s.first().copied().unwrap_or_default(), max: s.last().copied().unwrap_or_default() }
    }
}

struct IntStats {
    median: u64,
    min: u64,
    max: u64,
}

impl IntStats {
    fn of(samples: &[u64]) -> IntStats {
        let mut s = samples.to_vec();
        s.sort_unstable();
        let n = s.len();
        let median = match n {
            0 => 0,
            _ if n % 2 == 1 => s[n / 2],
            _ => (s[n / 2 - 1] + s[n / 2]) / 2,
        };
        IntStats { median, min: s.first().copied().unwrap_or(0), max: s.last().copied().unwrap_or(0) }
    }
}

struct MemoryRow {
    kind: Kind,
    k: usize,
    all_answered: Duration,
    rss: IntStats,
    pss: IntStats,
    pss_anon: IntStats,
    pss_file: IntStats,
    hwm: IntStats,
    threads: IntStats,
    pss_total: u64,
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 1000.0 {
        format!("{v:.1} ms")
    } else {
        format!("{:.2} s", v / 1000.0)
    }
}
