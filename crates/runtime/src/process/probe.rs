//! Liveness probes: TCP connect, HTTP/1.0 GET (hand-written request, 2xx and
//! 3xx are healthy) and exec (exit 0 is healthy), all against the local
//! host.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yunbian_api::Probe;

/// Where exec probes run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExecContext {
    /// Working directory.
    pub cwd: PathBuf,
    /// Environment added to the agent's.
    pub env: Vec<(String, String)>,
}

/// Probes every `periodSeconds` after `initialDelaySeconds`, and returns the
/// last failure's description once `failureThreshold` probes in a row have
/// failed. A probe with no action never fails.
pub(crate) async fn watch(probe: &Probe, ctx: &ExecContext) -> String {
    if probe.tcp.is_none() && probe.http.is_none() && probe.exec.is_none() {
        return std::future::pending().await;
    }
    let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let threshold = probe.failure_threshold.max(1);
    tokio::time::sleep(Duration::from_secs(u64::from(probe.initial_delay_seconds))).await;
    let mut failures = 0;
    loop {
        let result = match tokio::time::timeout(timeout, check(probe, ctx)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
        };
        match result {
            Ok(()) => failures = 0,
            Err(why) => {
                failures += 1;
                tracing::debug!(failures, threshold, "liveness probe failed: {why}");
                if failures >= threshold {
                    return format!("liveness probe failed {failures} times in a row: {why}");
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// One probe, without timeout.
pub(crate) async fn check(probe: &Probe, ctx: &ExecContext) -> Result<(), String> {
    if let Some(tcp) = &probe.tcp {
        TcpStream::connect(local(tcp.port)).await.map_err(|e| format!("tcp connect to port {}: {e}", tcp.port))?;
        return Ok(());
    }
    if let Some(http) = &probe.http {
        return http_get(http.port, &http.path).await;
    }
    if let Some(exec) = &probe.exec {
        return run_exec(&exec.command, ctx).await;
    }
    Ok(())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let mut s = TcpStream::connect(local(port)).await.map_err(|e| format!("http connect to port {port}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: yunbian-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| format!("http write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("http read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    match status_code(&buf) {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("http GET {path} on port {port}: status {code}")),
        None => Err(format!("http GET {path} on port {port}: no HTTP status line")),
    }
}

/// The status code of an HTTP response's first line (`HTTP/1.x NNN …`).
fn status_code(resp: &[u8]) -> Option<u16> {
    let line_end = resp.iter().position(|&b| b == b'\n').unwrap_or(resp.len());
    let line = std::str::from_utf8(resp.get(..line_end)?).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

async fn run_exec(command: &[String], ctx: &ExecContext) -> Result<(), String> {
    let Some((prog, args)) = command.split_first() else {
        return Err("exec probe has an empty command".into());
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(ctx.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Dropped on timeout: killed, then reaped by tokio.
        .kill_on_drop(true);
    if ctx.cwd.is_dir() {
        cmd.current_dir(&ctx.cwd);
    }
    let status = cmd.status().await.map_err(|e| format!("exec {prog:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("exec {prog:?}: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use yunbian_api::{ExecProbe, HttpProbe, TcpProbe};

    #[test]
    fn parses_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 302 Found\r\nLocation: /"), Some(302));
        assert_eq!(status_code(b"HTTP/1.0 500"), Some(500));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
        assert_eq!(status_code(b"HTTP/1.1 20x OK"), None);
    }

    async fn serve_once(listener: TcpListener, response: &'static [u8]) {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(response).await;
        }
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_3xx_and_rejects_others() {
        for (resp, ok) in [
            (&b"HTTP/1.0 200 OK\r\n\r\nhi"[..], true),
            (&b"HTTP/1.1 301 Moved\r\n\r\n"[..], true),
            (&b"HTTP/1.1 503 Unavailable\r\n\r\n"[..], false),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = l.local_addr().expect("addr").port();
            let server = tokio::spawn(serve_once(l, resp));
            let probe = Probe { http: Some(HttpProbe { port, path: "/healthz".into() }), ..Default::default() };
            assert_eq!(check(&probe, &ExecContext::default()).await.is_ok(), ok);
            server.await.expect("server");
        }
    }

    #[tokio::test]
    async fn tcp_and_exec_probes() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let probe = Probe { tcp: Some(TcpProbe { port }), ..Default::default() };
        assert!(check(&probe, &ExecContext::default()).await.is_ok());
        drop(l);
        assert!(check(&probe, &ExecContext::default()).await.is_err());

        let ok = Probe { exec: Some(ExecProbe { command: vec!["true".into()] }), ..Default::default() };
        assert!(check(&ok, &ExecContext::default()).await.is_ok());
        let bad = Probe { exec: Some(ExecProbe { command: vec!["false".into()] }), ..Default::default() };
        assert!(check(&bad, &ExecContext::default()).await.is_err());
        let empty = Probe { exec: Some(ExecProbe { command: vec![] }), ..Default::default() };
        assert!(check(&empty, &ExecContext::default()).await.is_err());
    }

    #[tokio::test]
    async fn watch_returns_after_threshold() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let probe = Probe {
            tcp: Some(TcpProbe { port }),
            period_seconds: 1,
            timeout_seconds: 1,
            initial_delay_seconds: 0,
            failure_threshold: 2,
            ..Default::default()
        };
        let why = tokio::time::timeout(Duration::from_secs(20), watch(&probe, &ExecContext::default()))
            .await
            .expect("watch should give up");
        assert!(why.contains("2 times"), "{why}");
    }
}
