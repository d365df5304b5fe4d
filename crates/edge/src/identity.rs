//! The node's identity: joining with a token, the files it keeps, and
//! certificate rotation.
//!
//! Data directory layout:
//! - `node.yaml`: cloud URL(s, comma-separated: replicas of one cloud) and
//!   node name;
//! - `ca.crt`: the cluster CA, pinned at join by the fingerprint in the token;
//! - `node.key` (0600): the node's private key, generated here, never sent;
//! - `node.crt`: the node certificate (CN = node name).
//!
//! Every file is written to a temporary name and renamed into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use yunbian_pki::NodeKey;

use crate::http;

/// `node.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeConfig {
    /// Cloud URL, or several comma-separated (replicas of one cloud).
    pub cloud: String,
    /// Node name.
    pub name: String,
}

impl NodeConfig {
    /// The cloud URLs, in the order given.
    pub fn urls(&self) -> Vec<String> {
        cloud_urls(&self.cloud)
    }
}

/// Splits `URL[,URL…]` into URLs (blank entries ignored).
pub fn cloud_urls(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect()
}

/// Where a node certificate stands against the local clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    /// Valid until the given Unix time.
    Valid {
        /// `notAfter`.
        not_after: u64,
    },
    /// Expired, but less than the cloud's renewal grace ago: renewable.
    ExpiredWithinGrace {
        /// `notAfter`.
        not_after: u64,
    },
    /// Expired longer than the grace ago: only a new join helps.
    ExpiredPastGrace {
        /// `notAfter`.
        not_after: u64,
    },
}

/// Everything needed to connect with mTLS.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Data directory.
    pub dir: PathBuf,
    /// Cloud URL and name.
    pub config: NodeConfig,
    /// CA PEM.
    pub ca: String,
    /// Node certificate PEM.
    pub cert: String,
    /// Node key PEM.
    pub key: String,
    /// When this node received its current certificate (Unix seconds);
    /// rotation is timed from here, not from the certificate's back-dated
    /// `notBefore`.
    pub received_at: u64,
}

/// Seconds since the Unix epoch by the local clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes a file atomically with `mode` (see `yunbian_pki::write_atomic`).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    yunbian_pki::write_atomic(path, contents, mode).with_context(|| format!("write {}", path.display()))
}

/// Completes or discards a certificate rotation interrupted by a crash:
/// with `node.crt.new` present the new pair is complete and replaces the
/// old one; a lone `node.key.new` is an unfinished rotation and is dropped.
fn finish_rotation(dir: &Path) -> Result<()> {
    let (key_new, crt_new) = (dir.join("node.key.new"), dir.join("node.crt.new"));
    if crt_new.exists() {
        if key_new.exists() {
            std::fs::rename(&key_new, dir.join("node.key")).context("install the renewed key")?;
        }
        std::fs::rename(&crt_new, dir.join("node.crt")).context("install the renewed certificate")?;
    } else if key_new.exists() {
        std::fs::remove_file(&key_new).context("drop an unfinished key rotation")?;
    }
    Ok(())
}

impl Identity {
    /// Loads the identity written by [`join`], first completing or
    /// discarding a rotation a crash interrupted. Only the agent's owner of
    /// the identity may call it (at start): a rotation in progress looks
    /// interrupted.
    pub fn load(dir: &Path) -> Result<Identity> {
        finish_rotation(dir)?;
        Self::read(dir)
    }

    /// Reads the identity as it is on disk, touching nothing: for readers
    /// beside the agent (artifact pulls, the peer server) that follow
    /// renewals.
    pub fn read(dir: &Path) -> Result<Identity> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).with_context(|| {
                format!("read {} (has this node joined? run `yunbian edge join` first)", dir.join(f).display())
            })
        };
        let config: NodeConfig = serde_yaml::from_str(&read("node.yaml")?).context("parse node.yaml")?;
        let received_at = std::fs::metadata(dir.join("node.crt"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(unix_now, |d| d.as_secs());
        Ok(Identity {
            dir: dir.to_path_buf(),
            config,
            ca: read("ca.crt")?,
            cert: read("node.crt")?,
            key: read("node.key")?,
            received_at,
        })
    }

    /// Whether `dir` holds a joined node.
    pub fn exists(dir: &Path) -> bool {
        dir.join("node.yaml").exists() && dir.join("node.crt").exists()
    }

    /// mTLS client configuration.
    pub fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        yunbian_pki::client_config(&self.ca, Some((&self.cert, &self.key))).context("node TLS configuration")
    }

    /// When the certificate should be renewed: after `fraction` of the
    /// time between receiving it and its expiry (Unix seconds).
    pub fn renew_due(&self, fraction: f64) -> Result<u64> {
        let der = yunbian_pki::pem_to_der(&self.cert)?;
        let (_, not_after) = yunbian_pki::cert_validity(der.as_ref())?;
        let life = not_after.saturating_sub(self.received_at);
        Ok(self.received_at + (life as f64 * fraction) as u64)
    }

    /// The certificate's `notAfter` (Unix seconds).
    pub fn not_after(&self) -> Result<u64> {
        let der = yunbian_pki::pem_to_der(&self.cert)?;
        Ok(yunbian_pki::cert_validity(der.as_ref())?.1)
    }

    /// Where the certificate stands at `now` given the cloud's renewal grace.
    pub fn cert_state(&self, now: u64, grace: std::time::Duration) -> Result<CertState> {
        let not_after = self.not_after()?;
        Ok(if now < not_after {
            CertState::Valid { not_after }
        } else if now < not_after.saturating_add(grace.as_secs()) {
            CertState::ExpiredWithinGrace { not_after }
        } else {
            CertState::ExpiredPastGrace { not_after }
        })
    }

    /// Obtains a new certificate for a new key, authenticated by the current
    /// one (the cloud also accepts one that expired within its grace), and
    /// stores both. The old key is replaced only after the new certificate
    /// arrived. Tries each cloud URL in turn until one answers.
    pub async fn renew(&mut self) -> Result<()> {
        let key = NodeKey::generate()?;
        let csr = key.csr(&self.config.name)?;
        let body = serde_json::json!({ "csr": csr });
        let mut last = None;
        let mut certificate = None;
        for url in self.config.urls() {
            match request_certificate(&url, self.tls()?, "/v1/renew", &body, "renew certificate").await {
                Ok(c) => {
                    certificate = Some(c);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(certificate) = certificate else {
            return Err(last.unwrap_or_else(|| anyhow!("no cloud URL configured")));
        };
        // Both new files are written in full before either replaces the
        // old pair; `node.crt.new` existing marks a complete pair, which
        // `load` rolls forward after a crash between the two renames.
        write_atomic(&self.dir.join("node.key.new"), key.pem().as_bytes(), 0o600)?;
        write_atomic(&self.dir.join("node.crt.new"), certificate.as_bytes(), 0o644)?;
        finish_rotation(&self.dir)?;
        self.key = key.pem();
        self.cert = certificate;
        self.received_at = unix_now();
        Ok(())
    }
}

/// POSTs `body` to a certificate-issuing endpoint (`/v1/join`,
/// `/v1/renew`) and returns the certificate PEM; a refusal becomes
/// `"{what}: <the cloud's message>"`.
async fn request_certificate(
    cloud: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    body: &serde_json::Value,
    what: &str,
) -> Result<String> {
    let (status, resp) =
        http::request(cloud, tls, "POST", path, Some(serde_json::to_vec(body)?)).await.map_err(|e| anyhow!(e))?;
    if status != 200 {
        bail!("{what}: {}", http::error_message(status, &resp));
    }
    #[derive(Deserialize)]
    struct Issued {
        certificate: String,
    }
    let issued: Issued = serde_json::from_slice(&resp).with_context(|| format!("response of {path}"))?;
    Ok(issued.certificate)
}

/// Accepts any server certificate: used only to fetch `/v1/ca`, whose
/// answer is then checked against the fingerprint in the join token.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A parsed join token: `YB1.<ca fingerprint>.<id>.<secret>`.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinToken {
    /// Hex SHA-256 of the CA certificate.
    pub ca_fingerprint: String,
    /// The whole token as given.
    pub raw: String,
}

impl std::str::FromStr for JoinToken {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            ["YB1", fp, id, secret]
                if fp.len() == 64
                    && !id.is_empty()
                    && !secret.is_empty()
                    && fp.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Ok(JoinToken { ca_fingerprint: fp.to_ascii_lowercase(), raw: s.trim().to_string() })
            }
            _ => bail!("malformed join token (expected YB1.<ca-hash>.<id>.<secret>)"),
        }
    }
}

/// Joins the cluster and writes the identity into `dir`.
pub async fn join(
    dir: &Path,
    cloud: &str,
    token: &JoinToken,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
    force: bool,
) -> Result<Identity> {
    if Identity::exists(dir) && !force {
        bail!(
            "{} already holds a joined node; start it with `yunbian edge --data-dir {}`",
            dir.display(),
            dir.display()
        );
    }
    let id = enroll(dir, cloud, token, name, labels).await?;
    // Persist: key, CA, cert, and node.yaml last (it marks a complete join).
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    write_atomic(&dir.join("node.key"), id.key.as_bytes(), 0o600)?;
    write_atomic(&dir.join("ca.crt"), id.ca.as_bytes(), 0o644)?;
    write_atomic(&dir.join("node.crt"), id.cert.as_bytes(), 0o644)?;
    write_atomic(&dir.join("node.yaml"), serde_yaml::to_string(&id.config)?.as_bytes(), 0o644)?;
    Ok(id)
}

/// Records new cloud URL(s) in `node.yaml` (after adding cloud replicas).
pub fn set_cloud_urls(dir: &Path, urls: &str) -> Result<()> {
    let list = cloud_urls(urls);
    if list.is_empty() {
        bail!("--cloud-urls: no URL given");
    }
    for u in &list {
        http::host_port(u).map_err(|e| anyhow!("--cloud-urls: {e}"))?;
    }
    let path = dir.join("node.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {} (has this node joined?)", path.display()))?;
    let mut config: NodeConfig = serde_yaml::from_str(&text).context("parse node.yaml")?;
    config.cloud = list.join(",");
    write_atomic(&path, serde_yaml::to_string(&config)?.as_bytes(), 0o644)
}

/// Performs the join exchange and returns the identity without writing it
/// anywhere (simulated nodes keep it in memory).
pub async fn enroll(
    dir: &Path,
    cloud: &str,
    token: &JoinToken,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<Identity> {
    yunbian_api::validate::check_name(name).map_err(|m| anyhow!("node name: {m}"))?;
    let urls = cloud_urls(cloud);
    if urls.is_empty() {
        bail!("no cloud URL given");
    }
    for url in &urls {
        http::host_port(url).map_err(|e| anyhow!(e))?;
    }
    // Replicas of one cloud: the first that answers enrolls the node; a
    // refusal is final (every replica shares the tokens).
    let mut last = None;
    for url in &urls {
        match enroll_at(dir, url, token, name, labels).await {
            Ok(mut id) => {
                id.config.cloud = urls.join(",");
                return Ok(id);
            }
            Err(EnrollError::Unreachable(e)) => last = Some(e),
            Err(EnrollError::Refused(e)) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no cloud URL given")))
}

enum EnrollError {
    Unreachable(anyhow::Error),
    Refused(anyhow::Error),
}

async fn enroll_at(
    dir: &Path,
    cloud: &str,
    token: &JoinToken,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<Identity, EnrollError> {
    let refused = EnrollError::Refused;

    // 1. Fetch the CA over an unauthenticated TLS connection and pin it.
    let provider = yunbian_pki::provider();
    let insecure = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let (status, ca) = http::request(cloud, Arc::new(insecure), "GET", "/v1/ca", None)
        .await
        .map_err(|e| EnrollError::Unreachable(anyhow!(e)))?;
    if status != 200 {
        return Err(EnrollError::Unreachable(anyhow!("fetch cluster CA: {}", http::error_message(status, &ca))));
    }
    let ca = String::from_utf8(ca.to_vec()).map_err(|_| refused(anyhow!("cluster CA is not text")))?;
    let der = yunbian_pki::pem_to_der(&ca).map_err(|e| refused(anyhow!(e).context("cluster CA")))?;
    if yunbian_pki::fingerprint(der.as_ref()) != token.ca_fingerprint {
        return Err(refused(anyhow!(
            "the cloud at {cloud} presented a CA that does not match the join token; refusing to join"
        )));
    }

    // 2. Key and CSR, then join over a connection that trusts only that CA.
    let key = NodeKey::generate().map_err(|e| refused(e.into()))?;
    let csr = key.csr(name).map_err(|e| refused(e.into()))?;
    let body = serde_json::json!({ "token": token.raw, "name": name, "csr": csr, "labels": labels });
    let tls = yunbian_pki::client_config(&ca, None).map_err(|e| refused(e.into()))?;
    let certificate = request_certificate(cloud, tls, "/v1/join", &body, "join refused").await.map_err(refused)?;

    let config = NodeConfig { cloud: cloud.to_string(), name: name.to_string() };
    Ok(Identity { dir: dir.to_path_buf(), config, ca, cert: certificate, key: key.pem(), received_at: unix_now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("yb-identity-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn read(d: &Path, f: &str) -> String {
        std::fs::read_to_string(d.join(f)).unwrap_or_default()
    }

    #[test]
    fn interrupted_rotation_rolls_forward_when_the_pair_is_complete() {
        let d = dir("forward");
        for (f, v) in [("node.key", "old-key"), ("node.crt", "old-crt"), ("node.crt.new", "new-crt")] {
            std::fs::write(d.join(f), v).expect("write");
        }
        // The key was already renamed into place when the machine died.
        std::fs::write(d.join("node.key"), "new-key").expect("write");
        finish_rotation(&d).expect("finish");
        assert_eq!((read(&d, "node.key"), read(&d, "node.crt")), ("new-key".into(), "new-crt".into()));
        assert!(!d.join("node.crt.new").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unfinished_rotation_keeps_the_old_pair() {
        let d = dir("discard");
        for (f, v) in [("node.key", "old-key"), ("node.crt", "old-crt"), ("node.key.new", "new-key")] {
            std::fs::write(d.join(f), v).expect("write");
        }
        finish_rotation(&d).expect("finish");
        assert_eq!((read(&d, "node.key"), read(&d, "node.crt")), ("old-key".into(), "old-crt".into()));
        assert!(!d.join("node.key.new").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn tokens_are_parsed_strictly() {
        let fp = "a".repeat(64);
        assert!(format!("YB1.{fp}.abc123.secret").parse::<JoinToken>().is_ok());
        for bad in ["", "YB1", "YB2.x.y.z", &format!("YB1.{fp}..s"), &format!("YB1.{}.id.s", "g".repeat(64))] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }
}
