//! Cluster PKI: the cloud's certificate authority, node certificates from
//! CSRs, the CA fingerprint carried in join tokens, and the rustls
//! configurations both sides use.
//!
//! Architecture invariant: a node's private key is generated on the node
//! ([`NodeKey::generate`]) and only its CSR ever leaves it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed, or a PEM input is malformed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A PEM/DER input could not be read.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// Writes a credential file atomically: to a temporary name with `mode`,
/// fsynced, then renamed over `path`, so a crash never leaves a
/// half-written key or certificate.
pub fn write_atomic(path: &std::path::Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The crypto provider used everywhere (ring: small, no C toolchain needs beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hex SHA-256 of a certificate's DER: the CA fingerprint in join tokens.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of any bytes (token secrets).
pub fn sha256_hex(bytes: &[u8]) -> String {
    fingerprint(bytes)
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut buf).expect("the OS random source is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time equality of two strings.
pub fn secure_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// First certificate of a PEM bundle, as DER.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Malformed { what: "certificate PEM", detail: e.to_string() })
}

/// Subject common name and expiry (Unix seconds) of a DER certificate.
pub fn cert_identity(der: &[u8]) -> Result<(String, u64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Malformed { what: "certificate", detail: e.to_string() })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or(PkiError::Malformed { what: "certificate", detail: "no common name".into() })?
        .to_string();
    let not_after = cert.validity().not_after.timestamp().max(0) as u64;
    Ok((cn, not_after))
}

/// Validity window (not before, not after) of a DER certificate, Unix seconds.
pub fn cert_validity(der: &[u8]) -> Result<(u64, u64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Malformed { what: "certificate", detail: e.to_string() })?;
    let v = cert.validity();
    Ok((v.not_before.timestamp().max(0) as u64, v.not_after.timestamp().max(0) as u64))
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, org);
    d
}

/// The cluster's certificate authority.
pub struct CertAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl CertAuthority {
    /// A new self-signed CA valid for ten years.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(name, "yunbian");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut p, Duration::from_secs(10 * 365 * 86_400));
        let cert = p.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(CertAuthority { cert, key, cert_pem })
    }

    /// Loads a CA written by [`CertAuthority::cert_pem`] / [`CertAuthority::key_pem`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        // rcgen signs with an issuer re-created from the CA's parameters and
        // key; the issuer name and key identifier match the stored CA.
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority { cert, key, cert_pem: cert_pem.to_string() })
    }

    /// The CA certificate (PEM) as distributed to clients.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM); keep it mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Fingerprint of the distributed CA certificate.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint(&pem_to_der(&self.cert_pem)?))
    }

    /// A server certificate for the given DNS names / IP addresses; returns
    /// (certificate PEM, key PEM).
    pub fn issue_server(&self, sans: &[String], valid_for: Duration) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("yunbian-cloud", "yunbian");
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut p, valid_for);
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a node's CSR. The subject is replaced: CN = `node`, so a node
    /// cannot ask for another identity.
    pub fn sign_node_csr(&self, csr_pem: &str, node: &str, valid_for: Duration) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params.distinguished_name = dn(node, "yunbian-nodes");
        csr.params.subject_alt_names = Vec::new();
        csr.params.is_ca = IsCa::NoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut csr.params, valid_for);
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }
}

/// How far `notBefore` is back-dated on every issued certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(86_400);

fn set_validity(p: &mut CertificateParams, valid_for: Duration) {
    let now = SystemTime::now();
    // Back-dated by a day: an edge whose clock is hours behind the cloud's
    // must still accept a certificate issued a minute ago. Rotation is timed
    // from when the node received its certificate, not from `notBefore`.
    p.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
    p.not_after = (now + valid_for).into();
}

/// A node's key pair, generated on the node.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        Ok(NodeKey { key: KeyPair::generate()? })
    }

    /// Loads a key written by [`NodeKey::pem`].
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        Ok(NodeKey { key: KeyPair::from_pem(pem)? })
    }

    /// The private key, PEM.
    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CSR for `node`, PEM.
    pub fn csr(&self, node: &str) -> Result<String, PkiError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(node, "yunbian-nodes");
        Ok(p.serialize_request(&self.key)?.pem()?)
    }
}

fn root_store(ca_pem: &str) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_to_der(ca_pem)?)?;
    Ok(roots)
}

fn key_der(key_pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| PkiError::Malformed { what: "private key PEM", detail: e.to_string() })
}

fn chain(cert_pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Malformed { what: "certificate PEM", detail: e.to_string() })
}

/// Server TLS: presents `cert_pem`, and verifies client certificates
/// against the CA when a client offers one (clients without one — the CLI
/// and joining nodes — authenticate by token instead).
///
/// A client certificate that expired less than `expired_grace` ago is still
/// accepted by the handshake (its chain and signature checked as of just
/// before its expiry), so a node that was offline while its certificate ran
/// out can renew it. The application must then refuse it for anything but
/// renewal: the peer's `notAfter` tells it apart.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    expired_grace: Duration,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_pem)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Malformed { what: "client verifier", detail: e.to_string() })?;
    let verifier = Arc::new(GraceVerifier { inner, grace: expired_grace });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(cert_pem)?, key_der(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// WebPKI client verification that tolerates recent expiry (see [`server_config`]).
#[derive(Debug)]
struct GraceVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    grace: Duration,
}

impl rustls::server::danger::ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) => {
                let expired = || rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
                let (_, not_after) = cert_validity(end_entity.as_ref()).map_err(|_| expired())?;
                if now.as_secs() >= not_after.saturating_add(self.grace.as_secs()) {
                    return Err(expired());
                }
                // Everything else (chain, signature, usage) as of its last valid second.
                let then = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(not_after - 1));
                self.inner.verify_client_cert(end_entity, intermediates, then)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client TLS trusting only `ca_pem`, optionally presenting a client certificate.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_pem)?);
    let mut cfg = match identity {
        Some((cert, key)) => b.with_client_auth_cert(chain(cert)?, key_der(key)?)?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_signed_with_forced_identity() {
        let ca = CertAuthority::generate("test-ca").expect("ca");
        let node = NodeKey::generate().expect("key");
        let csr = node.csr("someone-else").expect("csr");
        let pem = ca.sign_node_csr(&csr, "edge-1", Duration::from_secs(3600)).expect("sign");
        let (cn, exp) = cert_identity(&pem_to_der(&pem).expect("der")).expect("identity");
        assert_eq!(cn, "edge-1");
        assert!(exp > 0);
        // A reloaded CA still signs certificates that chain to the original.
        let ca2 = CertAuthority::load(ca.cert_pem(), &ca.key_pem()).expect("reload");
        assert_eq!(ca2.fingerprint().expect("fp"), ca.fingerprint().expect("fp"));
        assert!(ca.sign_node_csr("garbage", "x", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn expired_client_certificates_pass_only_within_the_grace() {
        use rustls::pki_types::UnixTime;
        use rustls::server::danger::ClientCertVerifier;
        let ca = CertAuthority::generate("test-ca").expect("ca");
        let node = NodeKey::generate().expect("key");
        let pem = ca.sign_node_csr(&node.csr("edge-1").expect("csr"), "edge-1", Duration::from_secs(60)).expect("sign");
        let der = pem_to_der(&pem).expect("der");
        let (_, not_after) = cert_validity(der.as_ref()).expect("validity");
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(ca.cert_pem()).expect("roots")),
            provider(),
        )
        .build()
        .expect("verifier");
        let v = GraceVerifier { inner, grace: Duration::from_secs(30 * 86_400) };
        let at = |t: u64| UnixTime::since_unix_epoch(Duration::from_secs(t));
        assert!(v.verify_client_cert(&der, &[], at(not_after - 10)).is_ok(), "valid");
        assert!(v.verify_client_cert(&der, &[], at(not_after + 86_400)).is_ok(), "a day past expiry, within grace");
        let err = v.verify_client_cert(&der, &[], at(not_after + 31 * 86_400)).expect_err("past grace");
        assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
        // Another CA's certificate is refused however recent.
        let other = CertAuthority::generate("other").expect("ca");
        let foreign =
            other.sign_node_csr(&node.csr("edge-1").expect("csr"), "edge-1", Duration::from_secs(60)).expect("sign");
        let foreign = pem_to_der(&foreign).expect("der");
        assert!(v.verify_client_cert(&foreign, &[], at(not_after + 10)).is_err());
    }
}
