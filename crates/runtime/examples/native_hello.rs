//! `native_hello`: the native counterpart of the wasm sample app
//! (`examples/apps/wasm-hello`), for `examples/wasm_start.rs`.
//!
//! The sample itself cannot be built for the host: it talks to
//! `wasi:sockets` through the `wasip2` bindings. This program does what it
//! does with std only, the same way (one thread, one connection at a time,
//! `connection: close`), so a native instance and a wasm instance of "the
//! same app" can be compared: an HTTP/1.1 service on `$HOST:$PORT` (default
//! `0.0.0.0:8080`) answering every GET with `{"node":"$NODE_NAME",
//! "requests":N}`, the count kept in `requests` in the working directory
//! (the wasm sample's `/data/requests`, which is the same directory: the
//! instance's work directory).
//!
//! It uses nothing from the crate it lives in, so the executable is std
//! alone (a few hundred KB), as a small native service would be.
//!
//! ```sh
//! HOST=127.0.0.1 PORT=8080 NODE_NAME=edge-1 target/release/examples/native_hello
//! ```

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};

/// Where the request count is kept (relative to the working directory).
const COUNT_FILE: &str = "requests";
/// The longest request head read; anything longer is answered 431.
const MAX_HEAD: usize = 8 * 1024;

fn main() {
    let node = std::env::var("NODE_NAME").unwrap_or_else(|_| "unknown".to_owned());
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".to_owned());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_owned());
    let (Ok(host), Ok(port)) = (host.parse::<Ipv4Addr>(), port.parse::<u16>()) else {
        eprintln!("native_hello: HOST must be an IPv4 address and PORT a port number");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind((host, port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("native_hello: listen on {host}:{port}: {e}");
            std::process::exit(1);
        }
    };
    let mut served = read_count();
    println!("native_hello: node {node}, listening on {host}:{port}, {served} requests served so far");
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("native_hello: accept: {e}");
                continue;
            }
        };
        let status = match read_head(&mut stream) {
            Some(head) if head.starts_with(b"GET ") => {
                served += 1;
                write_count(served);
                let body = format!("{{\"node\":\"{}\",\"requests\":{served}}}\n", json_escape(&node));
                respond(&mut stream, "200 OK", &body);
                "200"
            }
            Some(_) => {
                respond(&mut stream, "405 Method Not Allowed", "{\"error\":\"only GET\"}\n");
                "405"
            }
            None => {
                respond(&mut stream, "431 Request Header Fields Too Large", "{\"error\":\"bad request head\"}\n");
                "431"
            }
        };
        println!("native_hello: request -> {status}, {served} served");
        let _ = std::io::stdout().flush();
    }
}

/// Reads up to the end of the request head; `None` if the peer closed
/// early or the head is longer than `MAX_HEAD`.
fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Writes a complete response; the connection closes when `stream` drops.
fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

fn read_count() -> u64 {
    std::fs::read_to_string(COUNT_FILE).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Best effort, as in the wasm sample.
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
