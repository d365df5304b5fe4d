//! Modbus polling benchmark: [`ModbusDriver`]s on a current-thread tokio
//! runtime (one core) against pymodbus TCP servers
//! (`tests/peers/modbus_server.py`, one python process serving several
//! ports; every device its own connection and task, as the supervisor runs
//! them).
//!
//! Modes:
//! - `throughput`: every device polls as fast as it can; reports property
//!   reads/s and requests/s (and both processes' CPU, to show which side is
//!   the bottleneck).
//! - `cycle`: every device polls once per `--period-ms`; reports the
//!   driver process's CPU% from `/proc/self/stat`.
//!
//! ```sh
//! cargo run --release -p yunbian-devices --example modbus_poll_bench -- throughput --devices 10 --props 20 --seconds 5
//! cargo run --release -p yunbian-devices --example modbus_poll_bench -- cycle --devices 100 --props 20 --seconds 20
//! ```
//! Options: `--devices N` (default 10), `--props M` (20), `--seconds S` (5),
//! `--period-ms P` (1000, cycle only), `--ports K` (server ports; default
//! min(N, 10), devices spread over them with distinct unit ids), `--layout
//! packed|sparse` (packed: adjacent registers, batched into one request;
//! sparse: a one-register gap between properties, so one request each).
//! `scripts/bench-modbus.sh` runs the standard set.

#[path = "../tests/common_modbus/mod.rs"]
mod common_modbus;

use std::time::{Duration, Instant};

use common_modbus::{config, prop, tcp, Prop, PyServer};
use yunbian_api::{ModbusDataType as Dt, PropertyType as Ty, RegisterType as Rt};
use yunbian_devices::driver::Driver;
use yunbian_devices::modbus::ModbusDriver;

struct Args {
    mode: String,
    devices: usize,
    props: usize,
    seconds: f64,
    period_ms: u64,
    ports: usize,
    sparse: bool,
}

fn parse_args() -> Args {
    let mut a =
        Args { mode: String::new(), devices: 10, props: 20, seconds: 5.0, period_ms: 1000, ports: 0, sparse: false };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: usize| argv.get(i + 1).cloned().unwrap_or_else(|| usage(&format!("{} needs a value", argv[i])));
    while i < argv.len() {
        let num = |s: String| s.parse::<f64>().unwrap_or_else(|_| usage(&format!("{s} is not a number")));
        match argv[i].as_str() {
            "throughput" | "cycle" => {
                a.mode = argv[i].clone();
                i += 1;
                continue;
            }
            "--devices" => a.devices = num(value(i)) as usize,
            "--props" => a.props = num(value(i)) as usize,
            "--seconds" => a.seconds = num(value(i)),
            "--period-ms" => a.period_ms = num(value(i)) as u64,
            "--ports" => a.ports = num(value(i)) as usize,
            "--layout" => a.sparse = value(i) == "sparse",
            other => usage(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    if a.mode.is_empty() {
        usage("no mode");
    }
    if a.ports == 0 {
        a.ports = a.devices.clamp(1, 10);
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!("error: {why}\nusage: modbus_poll_bench throughput|cycle [--devices N] [--props M] [--seconds S] [--period-ms P] [--ports K] [--layout packed|sparse]");
    std::process::exit(2)
}

/// `props` properties in holding registers 40..99 (zeros in the server's
/// datastore, so every float32 decodes): alternately uint16 and float32,
/// packed or with a one-register gap between them.
fn properties(props: usize, sparse: bool) -> Vec<Prop> {
    let mut out = Vec::new();
    let mut address = 40u16;
    for i in 0..props {
        let (dt, ty, size) = if i % 2 == 0 { (Dt::Uint16, Ty::Int, 1) } else { (Dt::Float32, Ty::Float, 2) };
        if address + size > 100 {
            usage(&format!("{props} properties do not fit holding registers 40..99 with this layout"));
        }
        out.push(prop(&format!("p{i}"), ty, Rt::Holding, address, dt));
        address += size + u16::from(sparse);
    }
    out
}

/// CPU seconds (user + system) of a process from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are the 12th and 13th after the name.
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / ticks
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What one device's task did.
#[derive(Default, Clone, Copy)]
struct Tally {
    polls: u64,
    properties: u64,
    requests: u64,
    errors: u64,
    max_poll_us: u128,
}

fn main() {
    let args = parse_args();
    if !common_modbus::peers_available("modbus_poll_bench", false) {
        std::process::exit(1);
    }
    let ports_arg = args.ports.to_string();
    let server = PyServer::tcp(&["--ports", &ports_arg, "--quiet"]);
    let props = properties(args.props, args.sparse);
    let ticks = clock_ticks();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let window = Duration::from_secs_f64(args.seconds);

    let server_pid = server.pid().to_string();
    let (tallies, measured) = rt.block_on(async {
        let mut drivers = Vec::new();
        for i in 0..args.devices {
            let port = server.ports[i % server.ports.len()];
            let unit = (i / server.ports.len() % 247 + 1) as u8;
            let cfg = config(&format!("dev{i}"), tcp(port, unit, "2s"), &props);
            let mut d = ModbusDriver::new(&cfg).expect("driver");
            d.connect().await.expect("connect");
            drivers.push(d);
        }
        let requests_per_poll = drivers[0].plan().requests.len();
        println!(
            "setup: {} devices over {} ports, {} properties each ({}: {} request(s) per poll), mode {}, {} s",
            args.devices,
            server.ports.len(),
            args.props,
            if args.sparse { "sparse" } else { "packed" },
            requests_per_poll,
            args.mode,
            args.seconds
        );
        // Warm up: one poll each.
        for d in &mut drivers {
            let reads = d.read(&[]).await.expect("first poll");
            if let Some(bad) = reads.iter().find(|r| r.result.is_err()) {
                eprintln!("note: {} fails on every poll: {:?}", bad.property, bad.result);
            }
        }
        let (cpu0, server_cpu0) = (cpu_seconds("self", ticks), cpu_seconds(&server_pid, ticks));
        let start = tokio::time::Instant::now();
        let end = start + window;
        let period = Duration::from_millis(args.period_ms);
        let cycle = args.mode == "cycle";
        let tasks: Vec<_> = drivers
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                tokio::spawn(async move {
                    let mut t = Tally::default();
                    // Spread the cycle's devices over the period.
                    let first = start + period.mul_f64(i as f64 / args.devices as f64);
                    let mut tick = tokio::time::interval_at(first, period);
                    let before = d.requests_sent();
                    loop {
                        if cycle {
                            tick.tick().await;
                        }
                        if tokio::time::Instant::now() >= end {
                            break;
                        }
                        let began = Instant::now();
                        match d.read(&[]).await {
                            Ok(reads) => {
                                t.properties += reads.iter().filter(|r| matches!(r.result, Ok(Some(_)))).count() as u64;
                                t.errors += reads.iter().filter(|r| r.result.is_err()).count() as u64;
                            }
                            Err(e) => {
                                t.errors += 1;
                                eprintln!("dev{i}: {e}");
                                let _ = d.connect().await;
                            }
                        }
                        t.max_poll_us = t.max_poll_us.max(began.elapsed().as_micros());
                        t.polls += 1;
                    }
                    t.requests = d.requests_sent() - before;
                    t
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("device task"));
        }
        let measured = Measured {
            secs: start.elapsed().as_secs_f64(),
            cpu: cpu_seconds("self", ticks) - cpu0,
            server_cpu: cpu_seconds(&server_pid, ticks) - server_cpu0,
        };
        (out, measured)
    });
    report(&args, &tallies, &measured);
}

/// The measurement window (after connecting and one warm-up poll).
struct Measured {
    secs: f64,
    cpu: f64,
    server_cpu: f64,
}

fn report(args: &Args, tallies: &[Tally], m: &Measured) {
    let secs = m.secs;
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let (polls, props, reqs, errors) =
        (sum(|t| t.polls), sum(|t| t.properties), sum(|t| t.requests), sum(|t| t.errors));
    let max_poll_ms = tallies.iter().map(|t| t.max_poll_us).max().unwrap_or(0) as f64 / 1000.0;
    println!(
        "result: {:.0} property reads/s, {:.0} requests/s, {:.0} polls/s, {} errors, slowest poll {:.1} ms",
        props as f64 / secs,
        reqs as f64 / secs,
        polls as f64 / secs,
        errors,
        max_poll_ms
    );
    println!(
        "cpu: driver process {:.1}% of one core (user+sys {:.2} s in {:.1} s, {:.1} µs per request), pymodbus server {:.1}%",
        100.0 * m.cpu / secs,
        m.cpu,
        secs,
        1e6 * m.cpu / (reqs.max(1) as f64),
        100.0 * m.server_cpu / secs
    );
    if args.mode == "cycle" {
        let expected = args.devices as f64 * args.seconds * 1000.0 / args.period_ms as f64;
        println!("cycle: {polls} polls of ~{expected:.0} scheduled");
    }
}
