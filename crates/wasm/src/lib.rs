//! The wasm shim: runs one WebAssembly workload as an ordinary process.
//!
//! The edge agent runs a `runtime: wasm` instance under its process runtime
//! (logs, restarts, cgroups, re-adoption) as `yunbian shim wasm …`; that
//! command parses its flags into [`ShimOptions`] and calls [`run`], which
//! returns the exit code of the process. One process runs one guest, so
//! everything here lives as long as the guest and nothing is shared.
//!
//! What a run does:
//! 1. read the file and tell a component (WASI preview 2) from a core
//!    module (preview 1) by its header ([`binary`]);
//! 2. compile it with Cranelift, through Wasmtime's on-disk cache when a
//!    cache directory is given, so a restart does not recompile;
//! 3. build the guest's WASI context: `--dir` preopened read-write as
//!    `/data` and made the initial working directory, the given environment
//!    and arguments (argv\[0\] is the module's file name), stdout and stderr
//!    inherited, stdin closed, sockets only with `--inherit-network`;
//! 4. run it on a Tokio runtime with the memory budget ([`memory`]) and the
//!    CPU limit ([`cpu`]) attached to its store;
//! 5. map the end to an exit code: the guest's own (`wasi:cli/exit`,
//!    `proc_exit`), 0 when it returns, 1 when a component's `run` returns
//!    an error, [`TRAP_EXIT_CODE`] after a trap, with the reason on stderr.
//!
//! Errors before the guest runs (unreadable or invalid binary, missing
//! imports, unusable directories) are [`ShimError`]s: the caller prints them
//! and exits 1. The design is in docs/design/013-wasm-runtime.md.

#![forbid(unsafe_code)]

pub mod binary;
pub mod cpu;
pub mod memory;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Cache, CacheConfig, Config, Engine, Module, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use binary::BinaryKind;
pub use cpu::CpuStats;
pub use memory::BudgetExceeded;

/// Exit code after a trap: 128 + SIGABRT, what a native program that aborts
/// reports through a shell, and what the `wasmtime` CLI uses.
pub const TRAP_EXIT_CODE: i32 = 134;

/// Where `--dir` appears inside the guest.
pub const GUEST_DATA_DIR: &str = "/data";

/// Everything `yunbian shim wasm` is told (see the design note for the
/// command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimOptions {
    /// The component or core module to run.
    pub module: PathBuf,
    /// Host directory preopened read-write as `/data` (created if missing).
    pub dir: PathBuf,
    /// The guest's whole environment, in order.
    pub env: Vec<(String, String)>,
    /// The guest's arguments after argv\[0\] (the module's file name).
    pub args: Vec<String>,
    /// Cap on the bytes of all linear memories and tables.
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a core.
    pub cpu_millis: Option<NonZeroU32>,
    /// Stop the guest once it has used (nearly) all of its CPU share —
    /// `cpu_millis`, else one core — in every second for this long: an
    /// endless loop ([`cpu::BusyWatch`]). `None`: never.
    pub cpu_stop_after: Option<Duration>,
    /// Wasmtime's compiled-code cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Let the guest open TCP and UDP sockets to any address and resolve
    /// names; without it every socket address is refused.
    pub inherit_network: bool,
}

impl ShimOptions {
    /// Options for `module` with `dir` as `/data` and nothing else.
    pub fn new(module: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        ShimOptions {
            module: module.into(),
            dir: dir.into(),
            env: Vec::new(),
            args: Vec::new(),
            memory_bytes: None,
            cpu_millis: None,
            cpu_stop_after: None,
            cache_dir: None,
            inherit_network: false,
        }
    }
}

/// Why the shim could not run the guest.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The module file could not be read.
    #[error("read {path}: {source}")]
    ReadModule { path: PathBuf, source: std::io::Error },
    /// The file is not a WebAssembly binary the shim knows.
    #[error("{path}: {source}")]
    NotWasm { path: PathBuf, source: binary::HeaderError },
    /// Wasmtime refused the binary (invalid, or a feature not enabled).
    #[error("compile {path} ({kind}): {message}")]
    Compile { path: PathBuf, kind: BinaryKind, message: String },
    /// The data directory could not be created or opened.
    #[error("open the data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    /// The compiled-code cache could not be set up.
    #[error("set up the compiled-code cache in {path}: {message}")]
    Cache { path: PathBuf, message: String },
    /// The engine or the async runtime could not start.
    #[error("start the wasm engine: {0}")]
    Engine(String),
    /// The guest could not be instantiated: an import this shim does not
    /// provide (wasi:http, …), or no command entry point.
    #[error("instantiate {path}: {message}")]
    Instantiate { path: PathBuf, message: String },
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It returned or exited with this code.
    Exited(i32),
    /// It went over `--memory-bytes`.
    MemoryLimit(BudgetExceeded),
    /// It used its whole CPU share without a break for `--cpu-stop-after`.
    CpuLimit {
        /// The share it was judged against, in thousandths of a core.
        millis: u32,
        /// How long it had been busy.
        busy_for: Duration,
    },
    /// It trapped (unreachable, out-of-bounds access, stack overflow, …) or
    /// a host call failed fatally; the text is Wasmtime's, with the guest's
    /// backtrace when there is one.
    Trapped(String),
}

impl Outcome {
    /// The process exit code for this outcome. Codes outside 0..=255 (a
    /// preview 1 `proc_exit` can pass any u32) become 1, so that no failure
    /// reads as success after truncation.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(code) if (0..=255).contains(code) => *code,
            Outcome::Exited(_) => 1,
            Outcome::MemoryLimit(_) | Outcome::CpuLimit { .. } | Outcome::Trapped(_) => TRAP_EXIT_CODE,
        }
    }

    /// Why the guest failed, as a reason word and a sentence (`None` for an
    /// exit, which the exit code explains).
    pub fn explain(&self) -> Option<(&'static str, String)> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::MemoryLimit(refused) => Some(("MemoryLimitExceeded", format!("the guest was stopped: {refused}"))),
            Outcome::CpuLimit { millis, busy_for } => Some((
                "CPULimitExceeded",
                format!(
                    "the guest was stopped: it used its whole CPU share ({millis}m) without a break for {:.1} s \
                     (--cpu-stop-after); an endless loop?",
                    busy_for.as_secs_f64()
                ),
            )),
            Outcome::Trapped(reason) => Some(("Trapped", format!("the guest trapped: {reason}"))),
        }
    }
}

/// What a run did, for callers that look beyond the exit code (tests).
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The kind of binary that ran.
    pub kind: BinaryKind,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether the compiled code came from `--cache-dir` (false without one).
    pub from_cache: bool,
    /// Bytes of memory and tables the guest held at the end.
    pub memory_used: u64,
    /// What the CPU limit did.
    pub cpu: CpuStats,
}

/// Runs the guest to its end and returns the process exit code. A trap or
/// a memory-limit stop is explained on stderr first.
pub fn run(opts: ShimOptions) -> anyhow::Result<i32> {
    let report = run_with_report(opts)?;
    if let Some((_, why)) = report.outcome.explain() {
        eprintln!("error: {why}");
    }
    Ok(report.outcome.exit_code())
}

/// Runs the guest to its end and reports how it went; prints nothing.
pub fn run_with_report(opts: ShimOptions) -> Result<RunReport, ShimError> {
    let bytes =
        std::fs::read(&opts.module).map_err(|source| ShimError::ReadModule { path: opts.module.clone(), source })?;
    let kind = binary::detect(&bytes).map_err(|source| ShimError::NotWasm { path: opts.module.clone(), source })?;

    let mut config = Config::new();
    config.wasm_component_model(kind == BinaryKind::Component);
    // The CPU share a guest is throttled to and judged against.
    let watched = opts.cpu_millis.or(opts.cpu_stop_after.and(NonZeroU32::new(1000)));
    config.epoch_interruption(watched.is_some());
    let cache = match &opts.cache_dir {
        Some(dir) => {
            let cache = open_cache(dir)?;
            config.cache(Some(cache.clone()));
            Some(cache)
        }
        None => None,
    };
    let engine = Engine::new(&config).map_err(|e| ShimError::Engine(error_text(e)))?;

    let compile_error = |e| ShimError::Compile { path: opts.module.clone(), kind, message: error_text(e) };
    // Shims starting the same module at once compile it once: the others
    // wait here and then load what the first one stored.
    // Without the lock (a read-only or full cache directory) each shim
    // just compiles on its own, as Wasmtime's cache itself degrades.
    let _compiling = match &opts.cache_dir {
        Some(dir) => compile_lock(dir, &bytes)
            .inspect_err(|e| eprintln!("yunbian shim: compiling without the compile lock: {e}"))
            .ok(),
        None => None,
    };
    let hits_before = cache.as_ref().map_or(0, Cache::cache_hits);
    let program = match kind {
        BinaryKind::Component => Program::Component(Component::from_binary(&engine, &bytes).map_err(compile_error)?),
        BinaryKind::CoreModule => Program::Module(Module::from_binary(&engine, &bytes).map_err(compile_error)?),
    };
    let from_cache = cache.as_ref().is_some_and(|c| c.cache_hits() > hits_before);
    drop(_compiling);
    drop(bytes);

    if opts.dir.exists() && !opts.dir.is_dir() {
        return Err(ShimError::DataDir { path: opts.dir.clone(), message: "not a directory".into() });
    }
    std::fs::create_dir_all(&opts.dir)
        .map_err(|e| ShimError::DataDir { path: opts.dir.clone(), message: e.to_string() })?;
    let mut wasi = wasi_context(&opts, kind)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| ShimError::Engine(format!("start the async runtime: {e}")))?;
    let _ticker = match watched {
        Some(_) => {
            Some(EpochTicker::start(&engine).map_err(|e| ShimError::Engine(format!("start the epoch ticker: {e}")))?)
        }
        None => None,
    };
    let guard = Guard {
        memory: memory::MemoryBudget::new(opts.memory_bytes),
        cpu: watched.map(|millis| CpuGovernor::new(millis, opts.cpu_millis.is_some(), opts.cpu_stop_after)),
    };
    let (outcome, guard) = match program {
        Program::Component(component) => {
            let host = Host { wasi: P2Wasi { ctx: wasi.build(), table: ResourceTable::new() }, guard };
            runtime.block_on(run_component(&engine, &component, host, &opts.module))?
        }
        Program::Module(module) => {
            let host = Host { wasi: wasi.build_p1(), guard };
            runtime.block_on(run_module(&engine, &module, host, &opts.module))?
        }
    };
    Ok(RunReport {
        kind,
        outcome,
        from_cache,
        memory_used: guard.memory.used(),
        cpu: guard.cpu.map(CpuGovernor::finish).unwrap_or_default(),
    })
}

enum Program {
    Component(Component),
    Module(Module),
}

/// The store's data: the guest's WASI state and the limits that watch it.
struct Host<W> {
    wasi: W,
    guard: Guard,
}

struct Guard {
    memory: memory::MemoryBudget,
    cpu: Option<CpuGovernor>,
}

struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Host<P2Wasi> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi.ctx, table: &mut self.wasi.table }
    }
}

fn wasi_context(opts: &ShimOptions, kind: BinaryKind) -> Result<WasiCtxBuilder, ShimError> {
    let mut wasi = WasiCtxBuilder::new();
    let argv0 = opts.module.file_name().map_or_else(|| opts.module.to_string_lossy(), |n| n.to_string_lossy());
    wasi.arg(argv0);
    wasi.args(&opts.args);
    wasi.envs(&opts.env);
    wasi.inherit_stdout().inherit_stderr();
    let data_dir_error = |e: wasmtime::Error| ShimError::DataDir { path: opts.dir.clone(), message: error_text(e) };
    wasi.preopened_dir(&opts.dir, GUEST_DATA_DIR, FsPerms::ReadWrite).map_err(data_dir_error)?;
    wasi.initial_cwd(GUEST_DATA_DIR);
    if kind == BinaryKind::CoreModule {
        // Preview 1 has no initial working directory: libcs resolve relative
        // paths against a preopen named ".", so the same directory is
        // preopened a second time under that name.
        wasi.preopened_dir(&opts.dir, ".", FsPerms::ReadWrite).map_err(data_dir_error)?;
    }
    if opts.inherit_network {
        wasi.inherit_network().allow_ip_name_lookup(true).allow_tcp(true).allow_udp(true);
    } else {
        wasi.allow_ip_name_lookup(false).allow_tcp(false).allow_udp(false);
    }
    Ok(wasi)
}

async fn run_component(
    engine: &Engine,
    component: &Component,
    host: Host<P2Wasi>,
    path: &Path,
) -> Result<(Outcome, Guard), ShimError> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| ShimError::Engine(format!("link WASI: {}", error_text(e))))?;
    let mut store = new_store(engine, host);
    let command = match Command::instantiate_async(&mut store, component, &linker).await {
        Ok(command) => command,
        Err(e) => return Ok((instantiate_failure(e, &mut store, path)?, store.into_data().guard)),
    };
    let outcome = match command.wasi_cli_run().call_run(&mut store).await {
        Ok(Ok(())) => Outcome::Exited(0),
        Ok(Err(())) => Outcome::Exited(1),
        Err(e) => guest_failure(e, &store),
    };
    Ok((outcome, store.into_data().guard))
}

async fn run_module(
    engine: &Engine,
    module: &Module,
    host: Host<WasiP1Ctx>,
    path: &Path,
) -> Result<(Outcome, Guard), ShimError> {
    let mut linker = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |host: &mut Host<WasiP1Ctx>| &mut host.wasi)
        .map_err(|e| ShimError::Engine(format!("link WASI: {}", error_text(e))))?;
    let mut store = new_store(engine, host);
    let instance = match linker.instantiate_async(&mut store, module).await {
        Ok(instance) => instance,
        Err(e) => return Ok((instantiate_failure(e, &mut store, path)?, store.into_data().guard)),
    };
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(|e| ShimError::Instantiate {
        path: path.to_owned(),
        message: format!("no WASI command entry point `_start` (a reactor or library module?): {}", error_text(e)),
    })?;
    let outcome = match start.call_async(&mut store, ()).await {
        Ok(()) => Outcome::Exited(0),
        Err(e) => guest_failure(e, &store),
    };
    Ok((outcome, store.into_data().guard))
}

fn new_store<W: Send + 'static>(engine: &Engine, host: Host<W>) -> Store<Host<W>> {
    let mut store = Store::new(engine, host);
    store.limiter(|host| &mut host.guard.memory);
    if store.data().guard.cpu.is_some() {
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let pause = match ctx.data_mut().guard.cpu.as_mut() {
                Some(cpu) => cpu.on_deadline()?,
                None => None,
            };
            Ok(match pause {
                Some(pause) => UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(pause))),
                None => UpdateDeadline::Continue(1),
            })
        });
    }
    store
}

/// Instantiation failed: the guest's own doing (a start function exiting
/// or trapping, memory over budget) is an outcome, a link error is not.
fn instantiate_failure<W>(e: wasmtime::Error, store: &mut Store<Host<W>>, path: &Path) -> Result<Outcome, ShimError> {
    if e.downcast_ref::<I32Exit>().is_some()
        || e.downcast_ref::<wasmtime::Trap>().is_some()
        || store.data().guard.memory.exceeded().is_some()
        || store.data().guard.cpu.as_ref().is_some_and(|c| c.stopped.is_some())
    {
        return Ok(guest_failure(e, store));
    }
    Err(ShimError::Instantiate { path: path.to_owned(), message: error_text(e) })
}

/// The guest stopped with an error: an exit, the memory budget, or a trap.
fn guest_failure<W>(e: wasmtime::Error, store: &Store<Host<W>>) -> Outcome {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Outcome::Exited(exit.0);
    }
    if let Some(refused) = store.data().guard.memory.exceeded() {
        return Outcome::MemoryLimit(refused.clone());
    }
    if let Some(stop) = store.data().guard.cpu.as_ref().and_then(|c| c.stopped) {
        return Outcome::CpuLimit { millis: stop.0, busy_for: stop.1 };
    }
    Outcome::Trapped(format!("{e:?}"))
}

/// One line with the causes: `outer: inner: root`.
fn error_text(e: wasmtime::Error) -> String {
    format!("{e:#}")
}

fn open_cache(dir: &Path) -> Result<Cache, ShimError> {
    let cache_error = |message: String| ShimError::Cache { path: dir.to_owned(), message };
    // Wasmtime wants an absolute directory; it creates it.
    let absolute = std::path::absolute(dir).map_err(|e| cache_error(e.to_string()))?;
    let mut config = CacheConfig::new();
    config.with_directory(absolute);
    Cache::new(config).map_err(|e| cache_error(error_text(e)))
}

/// An exclusive lock on `<cache dir>/compiling-<hash of the binary>.lock`,
/// held while the binary is compiled or loaded. Wasmtime's cache stores a
/// compiled module once its compilation is done, so without it every shim
/// started before the first one finished would compile again (a node
/// starting ten replicas cold would spend ten compilations of CPU). Released
/// when dropped, and by the kernel if the shim dies.
fn compile_lock(dir: &Path, binary: &[u8]) -> Result<std::fs::File, ShimError> {
    use std::hash::{Hash, Hasher};
    let lock_error =
        |e: std::io::Error| ShimError::Cache { path: dir.to_owned(), message: format!("compile lock: {e}") };
    std::fs::create_dir_all(dir).map_err(lock_error)?;
    // Only shims of the same build share a cache directory (Wasmtime keys
    // its entries by its own version too), so a fixed-key hash is stable
    // across them.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    binary.hash(&mut h);
    let path = dir.join(format!("compiling-{:016x}.lock", h.finish()));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(lock_error)?;
    file.lock().map_err(lock_error)?;
    Ok(file)
}

/// Applies the CPU limit at each epoch deadline, with the process's clocks.
struct CpuGovernor {
    /// `None` without `--cpu-millis` (only watched for `--cpu-stop-after`).
    throttle: Option<cpu::CpuThrottle>,
    busy: Option<cpu::BusyWatch>,
    millis: u32,
    /// Set when the busy watch stopped the guest: (share, busy for).
    stopped: Option<(u32, Duration)>,
    started: Instant,
    cpu_at_start: Duration,
    stats: CpuStats,
}

/// The error that ends a guest stopped by `--cpu-stop-after`.
#[derive(Debug, thiserror::Error)]
#[error("stopped by --cpu-stop-after")]
struct CpuStop;

impl CpuGovernor {
    fn new(millis: NonZeroU32, throttle: bool, stop_after: Option<Duration>) -> Self {
        CpuGovernor {
            throttle: throttle.then(|| cpu::CpuThrottle::new(millis)),
            busy: stop_after.map(|after| cpu::BusyWatch::new(millis, after)),
            millis: millis.get().min(1000),
            stopped: None,
            started: Instant::now(),
            cpu_at_start: process_cpu_time(),
            stats: CpuStats::default(),
        }
    }

    fn finish(self) -> CpuStats {
        let cpu = process_cpu_time().saturating_sub(self.cpu_at_start);
        CpuStats { cpu, wall: self.started.elapsed(), ..self.stats }
    }

    /// The pause the guest owes, or the error that stops it.
    fn on_deadline(&mut self) -> wasmtime::Result<Option<Duration>> {
        self.stats.interruptions += 1;
        let cpu = process_cpu_time().saturating_sub(self.cpu_at_start);
        let wall = self.started.elapsed();
        if let Some(busy_for) = self.busy.as_mut().and_then(|b| b.observe(wall, cpu)) {
            self.stopped = Some((self.millis, busy_for));
            return Err(CpuStop.into());
        }
        let Some(pause) = self.throttle.as_mut().and_then(|t| t.observe(wall, cpu)) else { return Ok(None) };
        self.stats.pauses += 1;
        self.stats.paused += pause;
        Ok(Some(pause))
    }
}

/// CPU time of the whole shim process (guest, WASI host calls, ticker):
/// what a cgroup would charge.
fn process_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
}

/// Advances the engine's epoch every [`cpu::TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (engine, flag) = (engine.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(cpu::TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
