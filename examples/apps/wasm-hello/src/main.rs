//! `wasm-hello`: the sample app of Yunbian's wasm runtime.
//!
//! An HTTP/1.1 service on `$HOST:$PORT` (default `0.0.0.0:8080`) that
//! answers every request with the node it runs on (`$NODE_NAME`, set by the agent as for every workload) and how
//! many requests it has served, as JSON. The count is kept in
//! `/data/requests` when the instance has a data directory, so it survives
//! restarts of the instance.
//!
//! It is a WASI 0.2 component: sockets come from `wasi:sockets` through the
//! `wasip2` bindings (the shim must be started with `--inherit-network`),
//! printing, the environment and files from Rust's std.

use std::io::Write;
use std::net::Ipv4Addr;

use wasip2::io::streams::{InputStream, OutputStream, StreamError};
use wasip2::sockets::instance_network::instance_network;
use wasip2::sockets::network::{ErrorCode, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
use wasip2::sockets::tcp::TcpSocket;
use wasip2::sockets::tcp_create_socket::create_tcp_socket;

/// Where the request count is kept (the instance's data directory).
const COUNT_FILE: &str = "/data/requests";
/// The longest request head read; anything longer is answered 431.
const MAX_HEAD: usize = 8 * 1024;

fn main() {
    run_constructors();
    let node = std::env::var("NODE_NAME").unwrap_or_else(|_| "unknown".to_owned());
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".to_owned());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_owned());
    let (Ok(host), Ok(port)) = (host.parse::<Ipv4Addr>(), port.parse::<u16>()) else {
        eprintln!("wasm-hello: HOST must be an IPv4 address and PORT a port number");
        std::process::exit(2);
    };
    let listener = match listen(host, port) {
        Ok(listener) => listener,
        Err(code) => {
            eprintln!("wasm-hello: listen on {host}:{port}: {code:?} (was the shim started with --inherit-network?)");
            std::process::exit(1);
        }
    };
    let mut served = read_count();
    println!("wasm-hello: node {node}, listening on {host}:{port}, {served} requests served so far");
    loop {
        let (socket, input, output) = match accept(&listener) {
            Ok(connection) => connection,
            Err(code) => {
                eprintln!("wasm-hello: accept: {code:?}");
                continue;
            }
        };
        let status = match read_head(&input) {
            Some(head) if head.starts_with(b"GET ") => {
                served += 1;
                write_count(served);
                let body = format!("{{\"node\":\"{}\",\"requests\":{served}}}\n", json_escape(&node));
                respond(&output, "200 OK", &body);
                "200"
            }
            Some(_) => {
                respond(&output, "405 Method Not Allowed", "{\"error\":\"only GET\"}\n");
                "405"
            }
            None => {
                respond(&output, "431 Request Header Fields Too Large", "{\"error\":\"bad request head\"}\n");
                "431"
            }
        };
        println!("wasm-hello: request -> {status}, {served} served");
        let _ = std::io::stdout().flush();
        // Streams are children of the socket: they go first.
        drop(input);
        drop(output);
        drop(socket);
    }
}

/// Runs the C constructors (wasi-libc finds its preopened directories in
/// one) when built for wasm32-wasip1 by `./build.sh debian`.
///
/// Debian bookworm's wasi-libc (2022) has a `_start` that leaves
/// constructors to the linker, and wasm-ld then wraps every export in a
/// function that runs them first, `cabi_realloc` included. In a component
/// the host calls `cabi_realloc` while lowering a result (the bytes of a
/// socket read), where calling back into WASI traps ("cannot leave
/// component instance"). Referencing `__wasm_call_ctors` here tells wasm-ld
/// that the program runs them itself, so it wraps nothing. wasm32-wasip2
/// builds run them in their own `_start`; this is not compiled there.
#[cfg(all(target_os = "wasi", target_env = "p1"))]
fn run_constructors() {
    extern "C" {
        fn __wasm_call_ctors();
    }
    // SAFETY: called once, first thing in main, before anything uses libc
    // state the constructors set up; nothing else calls it (no wrappers).
    unsafe { __wasm_call_ctors() }
}

#[cfg(not(all(target_os = "wasi", target_env = "p1")))]
fn run_constructors() {}

/// A listening TCP socket on `host:port`.
fn listen(host: Ipv4Addr, port: u16) -> Result<TcpSocket, ErrorCode> {
    let network = instance_network();
    let socket = create_tcp_socket(IpAddressFamily::Ipv4)?;
    let [a, b, c, d] = host.octets();
    let address = IpSocketAddress::Ipv4(Ipv4SocketAddress { port, address: (a, b, c, d) });
    socket.start_bind(&network, address)?;
    let ready = socket.subscribe();
    loop {
        match socket.finish_bind() {
            Err(ErrorCode::WouldBlock) => ready.block(),
            result => break result?,
        }
    }
    socket.start_listen()?;
    loop {
        match socket.finish_listen() {
            Err(ErrorCode::WouldBlock) => ready.block(),
            result => break result?,
        }
    }
    drop(ready);
    Ok(socket)
}

/// The next connection, waiting for one.
fn accept(listener: &TcpSocket) -> Result<(TcpSocket, InputStream, OutputStream), ErrorCode> {
    let ready = listener.subscribe();
    loop {
        match listener.accept() {
            Err(ErrorCode::WouldBlock) => ready.block(),
            result => return result,
        }
    }
}

/// Reads up to the end of the request head; `None` if the peer closed
/// early or the head is longer than `MAX_HEAD`.
fn read_head(input: &InputStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return None;
        }
        match input.blocking_read(4096) {
            Ok(bytes) => head.extend_from_slice(&bytes),
            Err(StreamError::Closed | StreamError::LastOperationFailed(_)) => return None,
        }
    }
    Some(head)
}

/// Writes a complete response and closes the connection.
fn respond(output: &OutputStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // `blocking_write_and_flush` takes at most 4096 bytes a call.
    for chunk in response.as_bytes().chunks(4096) {
        if output.blocking_write_and_flush(chunk).is_err() {
            return;
        }
    }
}

fn read_count() -> u64 {
    std::fs::read_to_string(COUNT_FILE).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Best effort: without a data directory the count lives only in memory.
fn write_count(count: u64) {
    let _ = std::fs::write(COUNT_FILE, format!("{count}\n"));
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}
