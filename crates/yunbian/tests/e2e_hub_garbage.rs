//! Hostile or broken clients on the cloud port do not disturb a connected
//! node or its workloads.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use harness::{eventually, pid_alive, pids, s, App, Cluster, WAIT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const STEADY: &str = "while true; do echo up; sleep 1; done";

/// A TLS connection to the cloud that trusts the cluster CA and presents
/// no client certificate.
fn tls_connect(c: &Cluster) -> Tls {
    tls_connect_as(c, None)
}

/// A TLS connection presenting `(cert PEM, key PEM)` if given.
fn tls_connect_as(c: &Cluster, client: Option<(&str, &str)>) -> Tls {
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.admin).expect("admin.yaml")).expect("admin.yaml is YAML");
    let ca = admin.get("ca").and_then(serde_yaml::Value::as_str).expect("ca in admin.yaml");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM");
            config.with_client_auth_cert(certs, key).expect("client auth")
        }
    };
    let name = ServerName::try_from("127.0.0.1").expect("server name").to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let sock = TcpStream::connect(("127.0.0.1", c.port())).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    sock.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
    rustls::StreamOwned::new(conn, sock)
}

/// The admin token from admin.yaml.
fn admin_token(c: &Cluster) -> String {
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.admin).expect("admin.yaml")).expect("YAML");
    admin.get("token").and_then(serde_yaml::Value::as_str).expect("token").to_string()
}

/// Reads until EOF or an error; the bytes read so far.
fn read_all(r: &mut impl Read) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Reads the server's plaintext until it closes, straight from the socket.
/// Unlike `Read for StreamOwned`, this does not first try to flush what we
/// still had to send: after the server answered early and hung up, that
/// flush fails and would hide the answer already received.
fn read_response(tls: &mut Tls) -> String {
    let mut buf = Vec::new();
    let mut plain = [0u8; 8192];
    loop {
        // Drain what is decrypted so far.
        loop {
            match tls.conn.reader().read(&mut plain) {
                Ok(0) => return String::from_utf8_lossy(&buf).into_owned(), // close_notify
                Ok(n) => buf.extend_from_slice(&plain[..n]),
                Err(_) => break, // WouldBlock: need more TLS data (or unclean EOF)
            }
        }
        match tls.conn.read_tls(&mut tls.sock) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if tls.conn.process_new_packets().is_err() {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `(status, body)` of a raw HTTP/1.1 response (body de-chunked if needed).
fn parse_response(raw: &str, what: &str) -> (u16, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what}: no HTTP response: {raw:?}"));
    let status =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{what}: {raw:?}"));
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    if !chunked {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

#[test]
fn garbage_does_not_disturb_a_connected_node() {
    let mut c = Cluster::start("hub-garbage");
    c.join("edge-1");
    c.apply(&App::new("steady").replicas(2).shell(STEADY).yaml());
    let before = c.wait_running("steady", 2);
    let before_pids = pids(&before);

    // (a) 4 KB of random bytes on a raw TCP connection.
    let mut junk = vec![0u8; 4096];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut junk)).expect("random bytes");
    {
        let mut sock = TcpStream::connect(("127.0.0.1", c.port())).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let _ = sock.write_all(&junk); // the server may hang up half way
        let _ = sock.shutdown(Shutdown::Write);
        let _ = read_all(&mut sock); // whatever it answers, it closes
    }

    // (a') The same garbage inside a proper TLS session.
    {
        let mut tls = tls_connect(&c);
        let _ = tls.write_all(&junk);
        let _ = tls.flush();
        let _ = read_all(&mut tls);
    }

    // (b) A websocket upgrade to the hub without a client certificate.
    {
        let mut tls = tls_connect(&c);
        let req = "GET /v1/hub HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        tls.write_all(req.as_bytes()).expect("send hub request");
        tls.flush().expect("flush");
        let mut raw = String::new();
        let mut chunk = [0u8; 4096];
        // Read the status line and headers (the server may keep the connection open).
        while !raw.contains("\r\n\r\n") {
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
        let status = raw.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(status, "401", "hub without a client certificate: {raw:?}");
    }

    // (c) A 5 MiB body with the admin token.
    {
        let token = admin_token(&c);
        let body = vec![b' '; 5 << 20];
        let mut tls = tls_connect(&c);
        let head = format!(
            "PUT /v1/apps/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).expect("send headers");
        // The server may answer and hang up before taking it all.
        let _ = tls.write_all(&body);
        let _ = tls.flush();
        let raw = read_response(&mut tls);
        let (status, body) = parse_response(&raw, "5 MiB PUT");
        assert_eq!(status, 413, "{raw:?}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
        assert_eq!(v["code"], 413, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // (c') 5 MiB again, chunked: no length to reject up front.
    {
        let mut tls = tls_connect(&c);
        let head = format!(
            "PUT /v1/apps/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            admin_token(&c)
        );
        tls.write_all(head.as_bytes()).expect("send headers");
        let chunk = vec![b' '; 64 << 10];
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        for _ in 0..80 {
            if tls.write_all(&framed).is_err() {
                break;
            }
        }
        let _ = tls.write_all(b"0\r\n\r\n");
        let _ = tls.flush();
        let raw = read_response(&mut tls);
        let (status, body) = parse_response(&raw, "chunked PUT");
        assert_eq!(status, 413, "{raw:?}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
        assert_eq!(v["code"], 413, "{v}");
    }
    assert!(c.app("x").is_none(), "the oversized body created an app");

    // (d) The node's own certificate is no admin credential.
    {
        let dir = c.edge("edge-1").dir.clone();
        let cert = std::fs::read_to_string(dir.join("node.crt")).expect("node.crt");
        let key = std::fs::read_to_string(dir.join("node.key")).expect("node.key");
        let mut tls = tls_connect_as(&c, Some((&cert, &key)));
        let req = "GET /v1/apps HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        tls.write_all(req.as_bytes()).expect("send");
        let raw = read_response(&mut tls);
        let (status, body) = parse_response(&raw, "admin API with a node certificate");
        assert_eq!(status, 403, "{raw:?}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
        assert_eq!(v["code"], 403, "{v}");
    }

    // Nothing else noticed.
    c.cli(&["get", "nodes"]).ok();
    c.wait_node_ready("edge-1");
    let after = c.wait_running("steady", 2);
    assert_eq!(pids(&after), before_pids, "instances were restarted: {after:?}");
    assert!(before_pids.iter().all(|p| pid_alive(*p)));
    assert_eq!(
        after.iter().map(|i| s(i, "/metadata/name")).collect::<Vec<_>>(),
        before.iter().map(|i| s(i, "/metadata/name")).collect::<Vec<_>>()
    );
    // The node's session still carries traffic both ways: logs from the
    // node, and new work to it.
    eventually(WAIT, "logs from the node", || {
        let o = c.cli(&["logs", "app/steady", "--tail", "1"]);
        if o.success() && o.stdout.contains("] up") {
            Ok(())
        } else {
            Err(format!("{o:?}"))
        }
    });
    c.apply(&App::new("steady").replicas(3).shell(STEADY).yaml());
    let three = c.wait_running("steady", 3);
    for p in &before_pids {
        assert!(pids(&three).contains(p), "pid {p} replaced: {three:?}");
    }
    // It was never dropped.
    let cloud = c.cloud_log();
    assert!(!cloud.lines().any(|l| l.contains("edge disconnected")), "the node's session dropped:\n{cloud}");
    let edge = c.edge_log("edge-1");
    assert!(!edge.contains("disconnected from cloud"), "the agent lost its session:\n{edge}");
    c.assert_edge_running("edge-1");

    c.delete_app("steady");
}

/// A node whose hub connection is open but which has not sent a single
/// heartbeat has told the cloud nothing: no node info, no capacity. It
/// must not be Ready (the scheduler would see a Ready node with zero
/// allocatable resources).
#[test]
fn node_is_not_ready_before_its_first_heartbeat() {
    let c = Cluster::start("hub-silent");
    // An identity that has never run an agent.
    let token = c.token("1h");
    let dir = c.dir.join("ghost");
    let url = c.url.clone();
    let o = harness::yunbian(&[
        "edge",
        "join",
        "--no-run",
        "--cloud",
        &url,
        "--token",
        &token,
        "--name",
        "ghost",
        "--data-dir",
        &dir.to_string_lossy(),
    ]);
    o.ok();
    let cert = std::fs::read_to_string(dir.join("node.crt")).expect("node.crt");
    let key = std::fs::read_to_string(dir.join("node.key")).expect("node.key");

    // Open the hub websocket with the node's certificate, then say nothing.
    let mut tls = tls_connect_as(&c, Some((&cert, &key)));
    let req = "GET /v1/hub HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tls.write_all(req.as_bytes()).expect("send hub request");
    tls.flush().expect("flush");
    let mut raw = String::new();
    let mut chunk = [0u8; 4096];
    while !raw.contains("\r\n\r\n") {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.push_str(&String::from_utf8_lossy(&chunk[..n])),
        }
    }
    assert_eq!(raw.split_whitespace().nth(1), Some("101"), "hub upgrade with a node certificate: {raw:?}");
    eventually(WAIT, "the cloud to log the connection", || {
        if c.cloud_log().lines().any(|l| l.contains("edge connected") && l.contains("ghost")) {
            Ok(())
        } else {
            Err(c.cloud_log())
        }
    });

    // Watch the node for a few lifecycle ticks (the cloud's heartbeat is
    // 1 s, its grace 4 s): it must never be Ready without node info. (An
    // observation window for something that must not happen: a loaded
    // machine can only make this pass wrongly, never fail wrongly.)
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let n = c.node("ghost").expect("node ghost");
        let ready = s(&n, "/status/phase") == "Ready";
        let cpus = n.pointer("/status/info/cpus").and_then(serde_json::Value::as_u64).unwrap_or(0);
        assert!(!(ready && cpus == 0), "Ready before any heartbeat, with no node info: {}", n["status"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(tls);
}
