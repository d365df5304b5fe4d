//! Shared observability helpers: process metrics from /proc, the text
//! exposition writer, and a plain-HTTP `/metrics` server for the agent.
//!
//! Naming scheme (docs/metrics.md): `yunbian_<component>_<what>[_<unit>]`,
//! counters end in `_total`; label values come from small fixed sets.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Appends one metric with its HELP and TYPE lines.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// CPU seconds (user + system) used by this process.
pub fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name, which may contain spaces.
    let Some((_, rest)) = s.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// `process_resident_memory_bytes` and `process_cpu_seconds_total`.
pub fn process_metrics(out: &mut String) {
    metric(out, "process_resident_memory_bytes", "gauge", "Resident memory.", rss_bytes());
    metric(out, "process_cpu_seconds_total", "counter", "CPU time used.", cpu_seconds());
}

/// Serves `GET /metrics` (any path, really) with `render()` over plain HTTP
/// until the task is dropped. Meant for loopback scraping.
pub async fn serve_metrics(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let body = render();
                async move {
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
