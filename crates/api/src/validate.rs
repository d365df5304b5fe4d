//! Validation: every error, each with the path of the field it is about.

use std::fmt;

use crate::kinds::*;
use crate::meta::ObjectMeta;
use crate::quantity::{parse_cpu_millis, parse_memory_bytes};

/// One problem with one field (`spec.replicas: must be >= 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, `spec.process.command`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects field errors while walking an object.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
}

/// Types that can check themselves.
pub trait Validate {
    /// Appends every problem found, with field paths under `path`.
    fn validate(&self, path: &str, errs: &mut Errors);

    /// All problems of a whole object (path root is empty).
    fn errors(&self) -> Vec<FieldError> {
        let mut e = Errors::default();
        self.validate("", &mut e);
        e.0
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Names are DNS labels: 1–63 of `a-z0-9-`, starting and ending alphanumeric.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !name.chars().all(ok_char) {
        return Err(format!("{name:?} must consist of lower-case letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must start and end with a letter or digit"));
    }
    Ok(())
}

fn check_label_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 253 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn check_label_value(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_labels(path: &str, labels: &std::collections::BTreeMap<String, String>, errs: &mut Errors) {
    for (k, v) in labels {
        if !check_label_key(k) {
            errs.add(format!("{path}[{k}]"), "invalid label key");
        }
        if !check_label_value(v) {
            errs.add(format!("{path}[{k}]"), format!("invalid label value {v:?}"));
        }
    }
}

impl Validate for ObjectMeta {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Err(m) = check_name(&self.name) {
            errs.add(join(path, "name"), m);
        }
        check_labels(&join(path, "labels"), &self.labels, errs);
    }
}

impl<S: Validate + KindOf> Validate for Object<S, S::Status> {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.api_version != crate::API_VERSION {
            errs.add(join(path, "apiVersion"), format!("must be {}", crate::API_VERSION));
        }
        if self.kind != S::KIND.as_str() {
            errs.add(join(path, "kind"), format!("must be {}", S::KIND.as_str()));
        }
        self.metadata.validate(&join(path, "metadata"), errs);
        self.spec.validate(&join(path, "spec"), errs);
    }
}

impl Validate for NodeSpec {
    fn validate(&self, _path: &str, _errs: &mut Errors) {}
}

impl Validate for NodeGroupSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        check_labels(&join(path, "selector"), &self.selector, errs);
    }
}

impl Validate for TokenSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.secret_hash.len() != 64 || !self.secret_hash.chars().all(|c| c.is_ascii_hexdigit()) {
            errs.add(join(path, "secretHash"), "must be 64 hex digits");
        }
    }
}

impl Validate for ResourceList {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Some(c) = &self.cpu {
            if let Err(m) = parse_cpu_millis(c) {
                errs.add(join(path, "cpu"), m);
            }
        }
        if let Some(m) = &self.memory {
            if let Err(msg) = parse_memory_bytes(m) {
                errs.add(join(path, "memory"), msg);
            }
        }
    }
}

impl Validate for Resources {
    fn validate(&self, path: &str, errs: &mut Errors) {
        self.requests.validate(&join(path, "requests"), errs);
        self.limits.validate(&join(path, "limits"), errs);
        let (rc, lc) = (self.requests.cpu_millis(), self.limits.cpu_millis());
        if self.limits.cpu.is_some() && rc > lc {
            errs.add(join(path, "requests.cpu"), "must be <= limits.cpu");
        }
        let (rm, lm) = (self.requests.memory_bytes(), self.limits.memory_bytes());
        if self.limits.memory.is_some() && rm > lm {
            errs.add(join(path, "requests.memory"), "must be <= limits.memory");
        }
        if self.limits.memory.is_some() && lm < 1 << 20 {
            errs.add(join(path, "limits.memory"), "must be at least 1Mi");
        }
        if self.limits.cpu.is_some() && lc < 10 {
            errs.add(join(path, "limits.cpu"), "must be at least 10m");
        }
    }
}

impl Validate for Probe {
    fn validate(&self, path: &str, errs: &mut Errors) {
        let n = self.tcp.is_some() as u8 + self.http.is_some() as u8 + self.exec.is_some() as u8;
        if n != 1 {
            errs.add(path, "exactly one of tcp, http, exec must be set");
        }
        if let Some(t) = &self.tcp {
            if t.port == 0 {
                errs.add(join(path, "tcp.port"), "must be 1-65535");
            }
        }
        if let Some(h) = &self.http {
            if h.port == 0 {
                errs.add(join(path, "http.port"), "must be 1-65535");
            }
            if !h.path.starts_with('/') {
                errs.add(join(path, "http.path"), "must start with '/'");
            }
        }
        if let Some(e) = &self.exec {
            if e.command.is_empty() {
                errs.add(join(path, "exec.command"), "must not be empty");
            }
        }
        if self.period_seconds == 0 {
            errs.add(join(path, "periodSeconds"), "must be >= 1");
        }
        if self.timeout_seconds == 0 {
            errs.add(join(path, "timeoutSeconds"), "must be >= 1");
        }
        if self.failure_threshold == 0 {
            errs.add(join(path, "failureThreshold"), "must be >= 1");
        }
    }
}

impl Validate for WorkloadTemplate {
    fn validate(&self, path: &str, errs: &mut Errors) {
        match (self.runtime, &self.process) {
            (RuntimeKind::Process, None) => errs.add(join(path, "process"), "is required when runtime is process"),
            (RuntimeKind::Process, Some(p)) => {
                if p.command.is_empty() {
                    errs.add(join(path, "process.command"), "must not be empty");
                } else if p.command[0].is_empty() {
                    errs.add(join(path, "process.command[0]"), "must not be empty");
                }
                for k in p.env.keys() {
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        errs.add(join(path, &format!("process.env[{k}]")), "invalid variable name");
                    }
                }
                if !p.working_dir.is_empty() && !p.working_dir.starts_with('/') {
                    errs.add(join(path, "process.workingDir"), "must be an absolute path");
                }
            }
            (RuntimeKind::Fake, _) => {}
        }
        self.resources.validate(&join(path, "resources"), errs);
        if let Some(l) = &self.health.liveness {
            l.validate(&join(path, "health.liveness"), errs);
        }
    }
}

impl Validate for AppSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if self.replicas < 0 {
            errs.add(join(path, "replicas"), "must be >= 0");
        } else if self.replicas > 100_000 {
            errs.add(join(path, "replicas"), "must be <= 100000");
        }
        self.template().validate(path, errs);
        check_labels(&join(path, "placement.nodeSelector"), &self.placement.node_selector, errs);
    }
}

impl Validate for AppInstanceSpec {
    fn validate(&self, path: &str, errs: &mut Errors) {
        if let Err(m) = check_name(&self.app) {
            errs.add(join(path, "app"), m);
        }
        if let Err(m) = check_name(&self.node) {
            errs.add(join(path, "node"), m);
        }
        self.template.validate(&join(path, "template"), errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("edge-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Edge").is_err());
        assert!(check_name("-a").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn app_errors_carry_paths() {
        let mut app = App::new("x", AppSpec { replicas: -1, ..Default::default() });
        app.spec.resources.limits.memory = Some("lots".into());
        let errs: Vec<String> = app.errors().iter().map(|e| e.to_string()).collect();
        assert!(errs.contains(&"spec.replicas: must be >= 0".to_string()), "{errs:?}");
        assert!(errs.contains(&"spec.process: is required when runtime is process".to_string()), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("spec.resources.limits.memory:")), "{errs:?}");
    }
}
