//! The TLS listener: accepts connections, completes the rustls handshake
//! (verifying a client certificate when one is offered), and serves HTTP/1.1
//! with upgrades (the hub's WebSocket) on each, with the peer's verified
//! identity attached to every request.
//!
//! A connection that fails the handshake — garbage bytes, a certificate from
//! another CA, a slow-loris that never finishes — is dropped on its own task
//! and harms nobody else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::Peer;

/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to send a request's headers (slow-loris protection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; beyond this new ones are closed at once
/// (above the 100k-node target, below typical descriptor limits of a
/// tuned host).
const MAX_CONNECTIONS: usize = 150_000;

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, limit = MAX_CONNECTIONS, "too many connections; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_conn(acceptor, tcp, addr, app).await {
                tracing::debug!(peer = %addr, error = %e, "connection ended");
            }
        });
    }
}

async fn serve_conn(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    app: Router,
) -> Result<(), String> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "tls handshake timed out".to_string())?
        .map_err(|e| format!("tls handshake: {e}"))?;
    let mut peer = Peer { address: addr.to_string(), ..Default::default() };
    if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        // rustls verified the chain against our CA; the CN is the node name.
        let (cn, expiry) = yunbian_pki::cert_identity(cert.as_ref()).map_err(|e| e.to_string())?;
        peer.node = Some(cn);
        peer.cert_expiry = expiry;
        peer.cert_fingerprint = yunbian_pki::fingerprint(cert.as_ref());
    }
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req)
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades()
        .await
        .map_err(|e| format!("http: {e}"))
}
