//! Set-up of a cloud replica's credentials.
//!
//! Cluster-wide secrets live in the store (through
//! [`yunbian_store::Coordinator::get_or_init`]), so every replica on one
//! store shares them and the first replica to start creates them:
//! - `ca.crt`, `ca.key`: the cluster CA (a node joined through one replica
//!   is trusted by all);
//! - `admin.token`: the admin token.
//!
//! Each replica keeps in its own `--data-dir`:
//! - `server.crt`, `server.key` (0600): its API/hub certificate, issued by
//!   the shared CA for its own names, reissued when those names or the CA
//!   change;
//! - `ca.crt`: a copy of the CA certificate, for operators;
//! - `admin.yaml` (0600): server URL, CA and admin token for the CLI;
//! - `store.redb`: the embedded store, when that is the backend.
//!
//! A data directory from before secrets moved into the store (`ca.key`,
//! `admin.yaml` on disk) seeds them, so upgrading keeps the CA and token.
//! Files are written to a temporary name and renamed, so a crash never
//! leaves a half-written credential.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use yunbian_pki::CertAuthority;
use yunbian_store::Coordinator;

/// Credentials of a running cloud.
pub struct Credentials {
    /// The CA.
    pub ca: CertAuthority,
    /// Server certificate PEM.
    pub server_cert: String,
    /// Server key PEM.
    pub server_key: String,
    /// SHA-256 of the admin token.
    pub admin_token_hash: String,
    /// Path of admin.yaml.
    pub admin_config: PathBuf,
}

/// Writes a file atomically with `mode` (see `yunbian_pki::write_atomic`).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    yunbian_pki::write_atomic(path, contents, mode).with_context(|| format!("write {}", path.display()))
}

/// Host names and addresses the server certificate must cover.
pub fn sans_for(listen: &str, advertise: &str) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let host_of = |s: &str| -> Option<String> {
        let s = s.trim_start_matches("https://").trim_start_matches("wss://");
        let s = s.split('/').next()?;
        let host = if let Some(rest) = s.strip_prefix('[') {
            rest.split(']').next()?.to_string()
        } else {
            s.rsplit_once(':').map_or(s, |(h, _)| h).to_string()
        };
        (!host.is_empty() && host != "0.0.0.0" && host != "::").then_some(host)
    };
    for h in [host_of(listen), host_of(advertise)].into_iter().flatten() {
        if !sans.contains(&h) {
            sans.push(h);
        }
    }
    sans
}

/// Loads the cluster's credentials from the store (creating them on the
/// very first start) and this replica's server certificate from `dir`.
pub async fn init(dir: &Path, listen: &str, advertise: &str, coord: &dyn Coordinator) -> Result<Credentials> {
    std::fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    let read_local = |f: &str| std::fs::read_to_string(dir.join(f)).ok();

    // The CA: one PEM pair under one key, so two replicas starting at once
    // cannot end up with a certificate of one CA and the key of another.
    let offer = match (read_local("ca.crt"), read_local("ca.key")) {
        (Some(c), Some(k)) => format!("{c}\n{k}"),
        _ => {
            let ca = CertAuthority::generate("yunbian-ca").context("generate the cluster CA")?;
            format!("{}\n{}", ca.cert_pem(), ca.key_pem())
        }
    };
    let stored = coord.get_or_init("ca", offer.into_bytes()).await.context("read the cluster CA from the store")?;
    let stored = String::from_utf8(stored).context("stored CA is not text")?;
    let (ca_crt, ca_key) = split_pem_pair(&stored).context("stored CA")?;
    let ca = CertAuthority::load(&ca_crt, &ca_key).context("load the cluster CA")?;
    write_atomic(&dir.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644)?;
    let ca_fp = ca.fingerprint().context("CA fingerprint")?;

    // This replica's server certificate, for its own names.
    let sans = sans_for(listen, advertise);
    let sans_file = dir.join("server.sans");
    let want = format!("{ca_fp};{}", sans.join(","));
    let have = std::fs::read_to_string(&sans_file).unwrap_or_default();
    let (server_cert, server_key) = if have == want && dir.join("server.crt").exists() {
        (
            std::fs::read_to_string(dir.join("server.crt")).context("read server.crt")?,
            std::fs::read_to_string(dir.join("server.key")).context("read server.key")?,
        )
    } else {
        let (c, k) =
            ca.issue_server(&sans, Duration::from_secs(2 * 365 * 86_400)).context("issue server certificate")?;
        write_atomic(&dir.join("server.key"), k.as_bytes(), 0o600)?;
        write_atomic(&dir.join("server.crt"), c.as_bytes(), 0o644)?;
        write_atomic(&sans_file, want.as_bytes(), 0o644)?;
        (c, k)
    };

    // The admin token: the one in an existing admin.yaml seeds the store.
    let admin_config = dir.join("admin.yaml");
    let local_token = read_local("admin.yaml")
        .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_string))
        .filter(|t| !t.is_empty());
    let offer = local_token.unwrap_or_else(|| format!("yb-admin-{}", yunbian_pki::random_hex(24)));
    let token =
        coord.get_or_init("admin.token", offer.into_bytes()).await.context("read the admin token from the store")?;
    let token = String::from_utf8(token).context("stored admin token is not text")?;
    let admin_token_hash = yunbian_pki::sha256_hex(token.as_bytes());
    write_admin_config(&admin_config, advertise, ca.cert_pem(), &token)?;
    Ok(Credentials { ca, server_cert, server_key, admin_token_hash, admin_config })
}

/// Splits "CERT PEM\nKEY PEM" as stored under `ca`.
fn split_pem_pair(s: &str) -> Result<(String, String)> {
    let at = s.find("-----BEGIN").and_then(|first| s[first + 1..].find("-----BEGIN").map(|i| i + first + 1));
    let at = at.context("expected a certificate and a key")?;
    Ok((s[..at].trim().to_string() + "\n", s[at..].trim().to_string() + "\n"))
}

fn write_admin_config(path: &Path, server: &str, ca: &str, token: &str) -> Result<()> {
    #[derive(serde::Serialize)]
    struct AdminConfig<'a> {
        server: &'a str,
        ca: &'a str,
        token: &'a str,
    }
    let text = serde_yaml::to_string(&AdminConfig { server, ca, token }).context("encode admin.yaml")?;
    write_atomic(path, text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans() {
        let s = sans_for("0.0.0.0:7443", "https://cloud.example:7443");
        assert!(s.contains(&"cloud.example".to_string()));
        assert!(!s.contains(&"0.0.0.0".to_string()));
        let s = sans_for("[::1]:7443", "https://10.1.2.3:7443");
        assert!(s.contains(&"10.1.2.3".to_string()));
    }
}
