//! Listening sockets: bind, accept, enforce the connection limit, run the
//! TLS handshake (with optional client certificates), and hand each
//! connection to [`crate::connection::serve`] on its own task.
//!
//! A listener with a client CA verifies every client certificate against
//! it (rustls' WebPKI verifier; no certificate, no connection) and passes
//! the certificate's subject common name on as the user name.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::broker::Shared;
use crate::config::{ListenerConfig, TlsConfig};
use crate::connection::{serve, ConnParams};
use crate::stats::{BrokerStats, DropReason};
use crate::BusError;

/// Builds the rustls configuration of a TLS listener.
pub(crate) fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>, BusError> {
    let tls_err = |what: &str, e: &dyn std::fmt::Display| BusError::Tls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(t.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err("server certificate PEM", &e))?;
    if certs.is_empty() {
        return Err(BusError::Tls("server certificate PEM: no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(t.key_pem.as_bytes()).map_err(|e| tls_err("server key PEM", &e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", &e))?;
    let builder = match &t.client_ca_pem {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                let c = c.map_err(|e| tls_err("client CA PEM", &e))?;
                roots.add(c).map_err(|e| tls_err("client CA", &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err("client verifier", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder.with_single_cert(certs, key).map_err(|e| tls_err("server certificate", &e))?;
    Ok(Arc::new(cfg))
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

/// Decrements the open-connection gauge when a connection task ends.
struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds one listener and spawns its accept loop. Returns the bound address.
pub(crate) async fn start(shared: Arc<Shared>, cfg: ListenerConfig) -> Result<SocketAddr, BusError> {
    let acceptor = cfg.tls.as_ref().map(server_config).transpose()?.map(TlsAcceptor::from);
    let listener = TcpListener::bind(cfg.bind).await.map_err(|source| BusError::Bind { addr: cfg.bind, source })?;
    let addr = listener.local_addr().map_err(|source| BusError::Bind { addr: cfg.bind, source })?;
    let auth = Arc::new(cfg.auth);
    let guard = shared.task_guard();
    tracing::info!(%addr, tls = acceptor.is_some(), "mqtt: listening");
    let mut shutdown = shared.shutdown.subscribe();
    tokio::spawn(async move {
        let _guard = guard;
        if *shutdown.borrow_and_update() {
            return;
        }
        loop {
            let accepted = tokio::select! {
                _ = shutdown.changed() => return,
                r = listener.accept() => r,
            };
            let (sock, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, retry.
                    tracing::warn!(%addr, error = %e, "mqtt: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let open = shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            let counted = OpenConnection(shared.clone());
            if open as usize >= shared.limits.max_connections {
                drop(counted);
                shared.stats.drop(DropReason::MaxConnections, &peer.to_string());
                continue;
            }
            BrokerStats::add(&shared.stats.connections_total, 1);
            let _ = sock.set_nodelay(true);
            let shared = shared.clone();
            let acceptor = acceptor.clone();
            let auth = auth.clone();
            let guard = shared.task_guard();
            tokio::spawn(async move {
                let _guard = guard;
                let _counted = counted;
                match acceptor {
                    None => serve(shared, sock, ConnParams { peer, auth, cert_user: None }).await,
                    Some(acceptor) => {
                        let hs = tokio::time::timeout(shared.limits.connect_timeout, acceptor.accept(sock)).await;
                        let tls = match hs {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "mqtt: TLS handshake failed");
                                shared.stats.drop(DropReason::AuthFailed, &peer.to_string());
                                return;
                            }
                            Err(_) => return,
                        };
                        let cert_user = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|c| common_name(c));
                        serve(shared, tls, ConnParams { peer, auth, cert_user }).await
                    }
                }
            });
        }
    });
    Ok(addr)
}
