//! The shim as a real process: what the guest prints reaches the process's
//! stdout and stderr, its exit code becomes the process's, SIGTERM stops
//! it, and the sample HTTP component serves on loopback.
//!
//! The process is this test binary started again with [`CHILD_ENV`] set:
//! its `child_process_entry` test then calls `yunbian_wasm::run` with the
//! options from that variable and exits with the code, as `yunbian shim
//! wasm` does (libtest's own "running 1 test" line precedes the guest's
//! output on stdout).

mod guests;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use yunbian_faults::ports::free_port;
use yunbian_wasm::ShimOptions;

/// Set in the child: its options, one `key value` per line.
const CHILD_ENV: &str = "YUNBIAN_WASM_TEST_SHIM";

/// In the child process (and only there), runs the shim and exits.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let code = match yunbian_wasm::run(decode(&spec)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn encode(opts: &ShimOptions) -> String {
    let mut lines = vec![format!("module {}", opts.module.display()), format!("dir {}", opts.dir.display())];
    lines.extend(opts.env.iter().map(|(k, v)| format!("env {k}={v}")));
    lines.extend(opts.args.iter().map(|a| format!("arg {a}")));
    lines.extend(opts.memory_bytes.map(|m| format!("memory {m}")));
    lines.extend(opts.cpu_millis.map(|c| format!("cpu {c}")));
    lines.extend(opts.cpu_stop_after.map(|d| format!("stop {}", d.as_millis())));
    lines.extend(opts.cache_dir.as_ref().map(|c| format!("cache {}", c.display())));
    if opts.inherit_network {
        lines.push("network".into());
    }
    lines.join("\n")
}

fn decode(spec: &str) -> ShimOptions {
    let mut opts = ShimOptions::new("", "");
    for line in spec.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "module" => opts.module = value.into(),
            "dir" => opts.dir = value.into(),
            "env" => {
                let (k, v) = value.split_once('=').expect("env lines are KEY=VALUE");
                opts.env.push((k.into(), v.into()));
            }
            "arg" => opts.args.push(value.into()),
            "memory" => opts.memory_bytes = Some(value.parse().expect("memory is a number")),
            "cpu" => opts.cpu_millis = Some(value.parse().expect("cpu is a positive number")),
            "stop" => opts.cpu_stop_after = Some(Duration::from_millis(value.parse().expect("stop is milliseconds"))),
            "cache" => opts.cache_dir = Some(value.into()),
            "network" => opts.inherit_network = true,
            other => panic!("unknown child option {other}"),
        }
    }
    opts
}

fn shim_command(opts: &ShimOptions) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary's path"));
    cmd.args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(CHILD_ENV, encode(opts))
        .stdin(Stdio::null());
    cmd
}

fn run_shim(opts: &ShimOptions) -> Output {
    shim_command(opts).output().expect("start the shim process")
}

/// A directory under the target's tmp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("shim-process-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a test directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn guest_prints_args_and_env_and_writes_into_data() {
    let tmp = TempDir::new("io");
    let module = guests::write(&tmp.0, "printer.wasm", guests::ARGS_ENV_FILE);
    let data = tmp.0.join("data");
    let mut opts = ShimOptions::new(module, &data);
    opts.args = vec!["first".into(), "second arg".into()];
    opts.env = vec![("YUNBIAN_NODE".into(), "edge-1".into()), ("EMPTY".into(), String::new())];
    let out = run_shim(&opts);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.ends_with("printer.wasm\nfirst\nsecond arg\nYUNBIAN_NODE=edge-1\nEMPTY=\n"),
        "argv[0] is the module's name, then the args, then exactly the given environment: {stdout:?}"
    );
    assert_eq!(std::fs::read_to_string(data.join("hello.txt")).ok().as_deref(), Some("written by the guest\n"));
}

#[test]
fn exit_code_and_trap_message_reach_the_process() {
    let tmp = TempDir::new("exit");
    let data = tmp.0.join("data");

    let exit7 = run_shim(&ShimOptions::new(guests::write(&tmp.0, "exit7.wasm", guests::EXIT_7), &data));
    assert_eq!(exit7.status.code(), Some(7));
    assert!(exit7.stderr.is_empty(), "{}", String::from_utf8_lossy(&exit7.stderr));

    // What the guest wrote is not lost when it exits mid-line.
    let partial =
        run_shim(&ShimOptions::new(guests::write(&tmp.0, "partial.wasm", guests::PARTIAL_LINE_EXIT_3), &data));
    assert_eq!(partial.status.code(), Some(3));
    assert!(partial.stdout.ends_with(b"no newline"), "{}", String::from_utf8_lossy(&partial.stdout));

    let trap = run_shim(&ShimOptions::new(guests::write(&tmp.0, "trap.wasm", guests::TRAP), &data));
    let stderr = String::from_utf8_lossy(&trap.stderr);
    assert_eq!(trap.status.code(), Some(134), "{stderr}");
    assert!(stderr.starts_with("error: the guest trapped: "), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");

    let mut grow = ShimOptions::new(guests::write(&tmp.0, "grow.wasm", guests::GROW_64_MIB), &data);
    grow.memory_bytes = Some(1 << 20);
    let out = run_shim(&grow);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(134), "{stderr}");
    assert!(stderr.contains("memory limit exceeded") && stderr.contains("1048576"), "{stderr}");

    std::fs::write(tmp.0.join("garbage.wasm"), b"MZ\x90\0 not wasm at all").expect("write garbage");
    let garbage = run_shim(&ShimOptions::new(tmp.0.join("garbage.wasm"), &data));
    let stderr = String::from_utf8_lossy(&garbage.stderr);
    assert_eq!(garbage.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("garbage.wasm: not a WebAssembly binary"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigterm_stops_a_spinning_guest() {
    let tmp = TempDir::new("sigterm");
    let module = guests::write(&tmp.0, "spin.wasm", guests::SPIN);
    for cpu_millis in [None, std::num::NonZeroU32::new(200)] {
        let mut opts = ShimOptions::new(&module, tmp.0.join("data"));
        opts.cpu_millis = cpu_millis;
        let mut child = shim_command(&opts).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("read the guest's stderr");
        assert_eq!(line, "stuck\n", "the guest runs");
        let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
        assert!(kill.success());
        let status = wait_bounded(&mut child);
        assert_eq!(status.signal(), Some(15), "cpu limit {cpu_millis:?}: killed by SIGTERM, got {status:?}");
    }
}

/// Waits for the child; kills it and fails if it is still running after a
/// minute (a bound so a broken shim cannot hang the suite, not a timing
/// assertion).
#[test]
fn an_endless_loop_at_its_cpu_limit_is_stopped_and_reported() {
    let tmp = TempDir::new("cpu-stop");
    let module = guests::write(&tmp.0, "spin.wasm", guests::SPIN);
    let mut opts = ShimOptions::new(&module, tmp.0.join("data"));
    opts.cpu_millis = std::num::NonZeroU32::new(200);
    opts.cpu_stop_after = Some(Duration::from_secs(2));
    let started = Instant::now();
    let mut child = shim_command(&opts).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let status = wait_bounded(&mut child);
    let mut text = String::new();
    stderr.read_to_string(&mut text).expect("read stderr");
    assert_eq!(status.code(), Some(yunbian_wasm::TRAP_EXIT_CODE), "{text}");
    assert!(text.starts_with("stuck\n"), "the guest ran: {text}");
    assert!(text.contains("whole CPU share (200m) without a break"), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(2), "not before the 2 s: {:?}", started.elapsed());
}

fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait for the shim") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the shim did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child when the test ends, passing or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sample_http_component_reports_its_node_and_counts_requests() {
    let tmp = TempDir::new("http");
    let data = tmp.0.join("data");
    let port = free_port();
    let mut opts = ShimOptions::new(guests::wasm_hello(), &data);
    opts.env = vec![
        ("NODE_NAME".into(), "edge-7".into()),
        ("HOST".into(), "127.0.0.1".into()),
        ("PORT".into(), port.to_string()),
    ];
    opts.inherit_network = true;
    opts.memory_bytes = Some(64 << 20);
    opts.cpu_millis = std::num::NonZeroU32::new(500);
    let mut child = shim_command(&opts).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let mut stderr = String::new();
            let _ = child.0.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
            panic!("the sample stopped before listening: {stderr}");
        };
        if line.contains("listening on") {
            assert!(line.contains("node edge-7"), "{line}");
            break;
        }
    }

    let first = http_get(port);
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.ends_with("\r\n\r\n{\"node\":\"edge-7\",\"requests\":1}\n"), "{first}");
    let second = http_get(port);
    assert!(second.ends_with("{\"node\":\"edge-7\",\"requests\":2}\n"), "{second}");
    assert_eq!(std::fs::read_to_string(data.join("requests")).ok().as_deref(), Some("2\n"), "count kept in /data");
}

#[test]
fn without_inherit_network_the_sample_cannot_listen() {
    let tmp = TempDir::new("nonet");
    let mut opts = ShimOptions::new(guests::wasm_hello(), tmp.0.join("data"));
    opts.env = vec![("HOST".into(), "127.0.0.1".into()), ("PORT".into(), free_port().to_string())];
    let mut child =
        KillOnDrop(shim_command(&opts).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start"));
    let status = wait_bounded(&mut child.0);
    let mut stderr = String::new();
    let _ = child.0.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("wasm-hello: listen on 127.0.0.1"), "{stderr}");
}

/// One GET over a new connection; the whole response (the sample closes).
fn http_get(port: u16) -> String {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to the sample");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("set a read timeout");
    stream.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    response
}
