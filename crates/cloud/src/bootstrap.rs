//! First-start set-up of a cloud data directory and loading it afterwards.
//!
//! Layout of `--data-dir`:
//! - `ca.crt`, `ca.key` (0600): the cluster CA;
//! - `server.crt`, `server.key` (0600): the API/hub certificate, reissued
//!   when the requested SANs change;
//! - `admin.token.sha256`: hash of the admin token;
//! - `admin.yaml` (0600): server URL, CA and admin token for the CLI;
//! - `store.redb`: the embedded state store.
//!
//! Files are written to a temporary name and renamed, so a crash never
//! leaves a half-written credential.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use yunbian_pki::CertAuthority;

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

/// Creates (first start) or loads the cloud's credentials in `dir`.
pub fn init(dir: &Path, listen: &str, advertise: &str) -> Result<Credentials> {
    std::fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    let ca_crt = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let ca = if ca_crt.exists() {
        let c = std::fs::read_to_string(&ca_crt).context("read ca.crt")?;
        let k = std::fs::read_to_string(&ca_key).context("read ca.key")?;
        CertAuthority::load(&c, &k).context("load the cluster CA")?
    } else {
        let ca = CertAuthority::generate("yunbian-ca").context("generate the cluster CA")?;
        write_atomic(&ca_key, ca.key_pem().as_bytes(), 0o600)?;
        write_atomic(&ca_crt, ca.cert_pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created cluster CA");
        ca
    };

    let sans = sans_for(listen, advertise);
    let sans_file = dir.join("server.sans");
    let want = sans.join(",");
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

    let token_hash_file = dir.join("admin.token.sha256");
    let admin_config = dir.join("admin.yaml");
    let admin_token_hash = if token_hash_file.exists() && admin_config.exists() {
        std::fs::read_to_string(&token_hash_file).context("read admin token hash")?.trim().to_string()
    } else {
        let token = format!("yb-admin-{}", yunbian_pki::random_hex(24));
        let hash = yunbian_pki::sha256_hex(token.as_bytes());
        write_atomic(&token_hash_file, hash.as_bytes(), 0o600)?;
        write_admin_config(&admin_config, advertise, ca.cert_pem(), &token)?;
        hash
    };
    // Keep the advertised URL in admin.yaml current across restarts.
    if let Ok(text) = std::fs::read_to_string(&admin_config) {
        if let Ok(mut v) = serde_yaml::from_str::<serde_yaml::Value>(&text) {
            if v.get("server").and_then(|s| s.as_str()) != Some(advertise) {
                v["server"] = serde_yaml::Value::String(advertise.to_string());
                let text = serde_yaml::to_string(&v).context("encode admin.yaml")?;
                write_atomic(&admin_config, text.as_bytes(), 0o600)?;
            }
        }
    }
    Ok(Credentials { ca, server_cert, server_key, admin_token_hash, admin_config })
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
