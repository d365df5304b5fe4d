//! A minimal HTTPS/1.1 client for the agent's few plain requests (fetch
//! the CA, join, renew), over rustls with a caller-chosen configuration.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// Time allowed for one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Host and port of an `https://host:port` URL.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url}: only https:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| format!("{url}: bad IPv6 address"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "443"),
        }
    };
    let port = port.parse().map_err(|_| format!("{url}: bad port"))?;
    if host.is_empty() {
        return Err(format!("{url}: missing host"));
    }
    Ok((host, port))
}

/// Opens a TLS connection to the URL's host.
pub async fn connect_tls(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let (host, port) = host_port(url)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot reach cloud at {url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS with {url}: {}", chain(&e)))
}

/// Sends one request; returns status and body.
pub async fn request(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes), String> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let (host, port) = host_port(url)?;
        let stream = connect_tls(url, tls).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {}", chain(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{port}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request {path}: {}", chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("read {path}: {}", chain(&e)))?.to_bytes();
        Ok((status, body))
    })
    .await
    .map_err(|_| format!("request {path} to {url} timed out"))?
}

/// The `message` of an API error body, or the raw text.
pub fn error_message(status: u16, body: &[u8]) -> String {
    serde_json::from_slice::<yunbian_api::ApiErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()))
}

/// An error with its sources (`connection error: received fatal alert:
/// CertificateExpired`): hyper's own message hides the TLS alert the caller
/// must act on.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(host_port("https://127.0.0.1:7443"), Ok(("127.0.0.1".into(), 7443)));
        assert_eq!(host_port("https://[::1]:7443/x"), Ok(("::1".into(), 7443)));
        assert_eq!(host_port("https://cloud"), Ok(("cloud".into(), 443)));
        assert!(host_port("http://x:1").is_err());
        assert!(host_port("https://:1").is_err());
    }
}
