//! Client configuration: the `admin.yaml` file written by `yunbian cloud`.
//!
//! ```yaml
//! server: https://127.0.0.1:7443
//! ca: |
//!   -----BEGIN CERTIFICATE-----
//!   ...
//! token: yb-admin-...
//! ```
//!
//! Looked up in this order: `--config FILE`, `$YUNBIAN_CONFIG`,
//! `./admin.yaml`.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// Environment variable naming the client config file.
pub const CONFIG_ENV: &str = "YUNBIAN_CONFIG";

/// File looked for in the current directory when nothing else is given.
pub const DEFAULT_CONFIG_FILE: &str = "admin.yaml";

/// Where and how to reach the cloud as an administrator.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Base URL of the cloud API, `https://HOST[:PORT]`.
    pub server: String,
    /// PEM of the cluster CA: the only certificate authority trusted.
    #[serde(rename = "ca")]
    pub ca_pem: String,
    /// Admin bearer token.
    pub token: String,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Why no usable client configuration could be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Neither `--config`, `$YUNBIAN_CONFIG` nor `./admin.yaml` exists.
    #[error("no client config: set YUNBIAN_CONFIG or pass --config (looked in ./admin.yaml)")]
    NotFound,
    /// The named file could not be read.
    #[error("cannot read client config {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The named file is not a valid configuration.
    #[error("invalid client config {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, starting with the field name.
        reason: String,
    },
    /// A field of an in-memory configuration is wrong.
    #[error("invalid client config: {field}: {reason}")]
    Field {
        /// `server`, `ca` or `token`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The parts of `server` a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port (443 when not given).
    pub port: u16,
    /// `host:port` as written in the `Host` header.
    pub authority: String,
}

impl ServerAddr {
    /// Parses `https://HOST[:PORT][/]`.
    pub fn parse(url: &str) -> Result<ServerAddr, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url:?} must be an https:// URL"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(format!("{url:?} must look like https://HOST[:PORT]"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '[' in IPv6 address"))?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(|| format!("{url:?}: bad port"))?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None => 443,
            Some(p) => p.parse::<u16>().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        };
        Ok(ServerAddr { host: host.to_string(), port, authority: authority.to_string() })
    }
}

impl ClientConfig {
    /// Loads and checks the configuration: `explicit` (from `--config`),
    /// else `$YUNBIAN_CONFIG`, else `./admin.yaml`.
    pub fn load(explicit: Option<&Path>) -> Result<ClientConfig, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self::load_from(explicit, env.as_deref())
    }

    /// [`ClientConfig::load`] with the environment passed in.
    pub fn load_from(explicit: Option<&Path>, env: Option<&Path>) -> Result<ClientConfig, ConfigError> {
        let path = match explicit.or(env) {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Err(ConfigError::NotFound);
                }
                p
            }
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::Read { path: shown.clone(), reason: e.to_string() })?;
        Self::from_yaml(&text).map_err(|e| ConfigError::Invalid {
            path: shown,
            reason: match e {
                ConfigError::Field { field, reason } => format!("{field}: {reason}"),
                other => other.to_string(),
            },
        })
    }

    /// Parses and checks the YAML text of an `admin.yaml`.
    pub fn from_yaml(text: &str) -> Result<ClientConfig, ConfigError> {
        let config: ClientConfig =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Field { field: "yaml", reason: e.to_string() })?;
        config.check()?;
        Ok(config)
    }

    /// Checks every field: an https URL, at least one PEM certificate, a
    /// non-empty token usable in a header.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.server_addr()?;
        self.ca_certificates()?;
        if self.token.trim().is_empty() {
            return Err(ConfigError::Field { field: "token", reason: "is empty".into() });
        }
        if !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Field { field: "token", reason: "must be printable ASCII without spaces".into() });
        }
        Ok(())
    }

    /// The parsed `server` URL.
    pub fn server_addr(&self) -> Result<ServerAddr, ConfigError> {
        ServerAddr::parse(self.server.trim()).map_err(|reason| ConfigError::Field { field: "server", reason })
    }

    /// The DER certificates of `ca`.
    pub fn ca_certificates(&self) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs = CertificateDer::pem_slice_iter(self.ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::Field { field: "ca", reason: format!("bad PEM: {e}") })?;
        if certs.is_empty() {
            return Err(ConfigError::Field { field: "ca", reason: "no PEM certificate found".into() });
        }
        Ok(certs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let a = ServerAddr::parse("https://127.0.0.1:7443").expect("valid");
        assert_eq!((a.host.as_str(), a.port, a.authority.as_str()), ("127.0.0.1", 7443, "127.0.0.1:7443"));
        let a = ServerAddr::parse("https://cloud.example/").expect("valid");
        assert_eq!((a.host.as_str(), a.port), ("cloud.example", 443));
        let a = ServerAddr::parse("https://[::1]:9000").expect("valid");
        assert_eq!((a.host.as_str(), a.port), ("::1", 9000));
        for bad in ["http://x", "https://", "https://x:port", "https://x/api", "https://[::1", "https://:1"] {
            assert!(ServerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_default_is_one_line() {
        // The explicit path wins over the environment and is reported as is.
        let e = ClientConfig::load_from(Some(Path::new("/nonexistent/admin.yaml")), None).expect_err("missing");
        assert!(e.to_string().starts_with("cannot read client config /nonexistent/admin.yaml: "), "{e}");
        assert_eq!(
            ConfigError::NotFound.to_string(),
            "no client config: set YUNBIAN_CONFIG or pass --config (looked in ./admin.yaml)"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let e = ClientConfig::from_yaml("server: http://x\nca: x\ntoken: t\n").expect_err("http");
        assert!(e.to_string().contains("server:"), "{e}");
        let e = ClientConfig::from_yaml("server: https://x\nca: x\ntoken: t\n").expect_err("no pem");
        assert!(e.to_string().contains("ca: no PEM certificate"), "{e}");
        let debug =
            format!("{:?}", ClientConfig { server: "https://x".into(), ca_pem: String::new(), token: "secret".into() });
        assert!(!debug.contains("secret"), "{debug}");
    }
}
