//! Artifacts: what apps will run — an executable, a tar.gz bundle, a
//! WebAssembly module or an OCI image layout — published under a name and
//! version, with one blob per platform.
//!
//! # Object name
//!
//! Object names are DNS labels, versions usually contain dots, so the
//! object of artifact `hello` version `1.2.0` is named `hello--1-2-0`
//! ([`artifact_object_name`]): the artifact name, `--`, the version with
//! `.` written `-`. The mapping is one-to-one because artifact names may not
//! contain `--` and versions may not contain `-` (`1.2.0.rc1`, not
//! `1.2.0-rc1`). `spec.name` and `spec.version` carry the real values and
//! must agree with `metadata.name`.
//!
//! # Blobs
//!
//! `spec.blobs` maps a platform (`linux/amd64`, `linux/arm64`,
//! `wasi/wasm32`) to a blob: its type, size, sha256, the fixed 4 MiB chunks
//! it is stored as ([`CHUNK_SIZE`]), and publisher signatures. A `wasm`
//! blob lives under `wasi/wasm32` and runs on every platform.
//!
//! # Signatures
//!
//! A signature is ed25519 over [`signing_statement`], a canonical text that
//! names the artifact, version, platform, blob type, digest and size, so a
//! signature cannot be moved to another blob, version or platform, nor the
//! blob be run as another type.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::kinds::{KindOf, Object};
use crate::meta::Kind;

/// A published artifact.
pub type Artifact = Object<ArtifactSpec, ArtifactStatus>;

/// The fixed chunk size: 4 MiB (the same as `yunbian_artifacts::CHUNK_SIZE`).
pub const CHUNK_SIZE: u64 = 4 << 20;

/// Intent: the artifact's name, version and blobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactSpec {
    /// The artifact's name (a DNS label without `--`).
    pub name: String,
    /// Its version: lower-case letters, digits and `.`.
    pub version: String,
    /// One blob per platform, by platform (`linux/amd64`).
    #[serde(default)]
    pub blobs: BTreeMap<String, ArtifactBlob>,
}

/// What a blob is.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlobType {
    /// A native executable (ELF).
    #[default]
    Executable,
    /// A gzip-compressed tar archive.
    Bundle,
    /// A WebAssembly module.
    Wasm,
    /// An OCI image layout, as a tar archive.
    Oci,
}

impl BlobType {
    /// The name used in manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobType::Executable => "executable",
            BlobType::Bundle => "bundle",
            BlobType::Wasm => "wasm",
            BlobType::Oci => "oci",
        }
    }
}

impl fmt::Display for BlobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BlobType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "executable" => Ok(BlobType::Executable),
            "bundle" => Ok(BlobType::Bundle),
            "wasm" => Ok(BlobType::Wasm),
            "oci" => Ok(BlobType::Oci),
            _ => Err(format!("unknown blob type {s:?} (known: executable, bundle, wasm, oci)")),
        }
    }
}

/// The platforms a blob can be for.
pub const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "wasi/wasm32"];

/// The platform of WebAssembly blobs, which run on every node.
pub const WASM_PLATFORM: &str = "wasi/wasm32";

/// One platform's blob.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactBlob {
    /// What the blob is.
    #[serde(rename = "type")]
    pub kind: BlobType,
    /// Length in bytes.
    pub size: u64,
    /// sha256 of the whole blob (64 hex digits).
    pub sha256: String,
    /// The chunks, in order.
    #[serde(default)]
    pub chunks: Vec<ChunkEntry>,
    /// Publisher signatures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<BlobSignature>,
}

/// One chunk of a blob.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChunkEntry {
    /// sha256 of the chunk (64 hex digits).
    pub digest: String,
    /// Its length.
    pub size: u64,
}

/// What an App runs: an artifact by name and version, optionally pinned to
/// a blob digest, or a blob by digest alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactRef {
    /// Artifact name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Artifact version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// sha256 of the blob (64 hex digits, `sha256:` prefix allowed). With
    /// a name and version it pins the blob: a node whose blob has another
    /// digest refuses it. Alone, it names the blob whatever artifact
    /// carries it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

impl ArtifactRef {
    /// The digest's 64 hex digits (without `sha256:`), if one is given.
    pub fn digest_hex(&self) -> Option<&str> {
        let d = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        (!d.is_empty()).then_some(d)
    }

    /// Errors of the reference, as (field, message), fields relative to it.
    pub fn errors(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (self.name.is_empty(), self.version.is_empty()) {
            (true, true) if self.digest.is_empty() => {
                out.push(("", "needs name and version, or digest".to_string()));
            }
            (true, true) => {}
            (false, true) => out.push(("version", "is required with name".to_string())),
            (true, false) => out.push(("name", "is required with version".to_string())),
            (false, false) => {
                if let Err(e) = check_artifact_name(&self.name) {
                    out.push(("name", e));
                }
                if let Err(e) = check_version(&self.version) {
                    out.push(("version", e));
                }
            }
        }
        if let Some(d) = self.digest_hex() {
            if !is_sha256_hex(d) {
                out.push(("digest", "must be a sha256 digest: 64 lower-case hex digits".to_string()));
            }
        }
        out
    }
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name.is_empty(), self.digest_hex()) {
            (false, None) => write!(f, "{} {}", self.name, self.version),
            (false, Some(d)) => write!(f, "{} {} (sha256:{})", self.name, self.version, d.get(..12).unwrap_or(d)),
            (true, Some(d)) => write!(f, "sha256:{d}"),
            (true, None) => f.write_str("(no artifact)"),
        }
    }
}

/// A publisher's signature of a blob.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlobSignature {
    /// Id of the publisher key: 16 hex digits of the sha256 of its public key.
    pub key_id: String,
    /// ed25519 signature of [`signing_statement`], 128 hex digits.
    pub signature: String,
}

/// Observed state: none. Edges pull and run artifacts, but how that goes
/// is reported per instance (AppInstance status: `Pulling`,
/// `SignatureRequired`, …), not on the Artifact.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactStatus {}

impl KindOf for ArtifactSpec {
    type Status = ArtifactStatus;
    const KIND: Kind = Kind::Artifact;
}

/// The object name of artifact `name` at `version` (`hello`, `1.2.0` →
/// `hello--1-2-0`).
pub fn artifact_object_name(name: &str, version: &str) -> String {
    format!("{name}--{}", version.replace('.', "-"))
}

/// The canonical text a publisher signs for one blob: everything an edge
/// acts on (the type decides whether it is executed, unpacked or run as a
/// module or image).
pub fn signing_statement(name: &str, version: &str, platform: &str, kind: BlobType, sha256: &str, size: u64) -> String {
    let kind = kind.as_str();
    format!(
        "yunbian-artifact-signature-v1\nname: {name}\nversion: {version}\nplatform: {platform}\ntype: {kind}\nsha256: {sha256}\nsize: {size}\n"
    )
}

/// Checks an artifact name: a DNS label without `--`.
pub fn check_artifact_name(name: &str) -> Result<(), String> {
    crate::validate::check_name(name)?;
    if name.contains("--") {
        return Err(format!("{name:?} must not contain \"--\""));
    }
    Ok(())
}

/// Checks a version: 1–40 of lower-case letters, digits and `.`, starting
/// and ending with a letter or digit, no `..`.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 40 {
        return Err("must have 1 to 40 characters".into());
    }
    if !v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "{v:?} must consist of lower-case letters, digits and '.' (write 1.0.0.rc1, not 1.0.0-rc1)"
        ));
    }
    if v.starts_with('.') || v.ends_with('.') || v.contains("..") {
        return Err(format!("{v:?} must start and end with a letter or digit and not contain \"..\""));
    }
    Ok(())
}

/// Whether `s` is 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `metadata.name` must be [`artifact_object_name`] of the spec's name and version.
pub fn object_name_errors(a: &Artifact) -> Vec<crate::validate::FieldError> {
    let want = artifact_object_name(&a.spec.name, &a.spec.version);
    if a.metadata.name == want || a.spec.name.is_empty() || a.spec.version.is_empty() {
        return Vec::new();
    }
    vec![crate::validate::FieldError {
        path: "metadata.name".into(),
        message: format!("must be {want:?} (spec.name, \"--\", spec.version with '.' written '-')"),
    }]
}

impl crate::validate::Validate for ArtifactSpec {
    fn validate(&self, path: &str, errs: &mut crate::validate::Errors) {
        validate_spec(self, path, errs)
    }
}

/// Structural checks of a spec; `path` is where the spec sits (`spec`).
fn validate_spec(spec: &ArtifactSpec, path: &str, errs: &mut crate::validate::Errors) {
    if let Err(m) = check_artifact_name(&spec.name) {
        errs.add(format!("{path}.name"), m);
    }
    if let Err(m) = check_version(&spec.version) {
        errs.add(format!("{path}.version"), m);
    } else if check_artifact_name(&spec.name).is_ok() {
        let object = artifact_object_name(&spec.name, &spec.version);
        if object.len() > 63 {
            errs.add(
                format!("{path}.version"),
                format!("with name {:?}, the object name {object:?} is over 63 characters", spec.name),
            );
        }
    }
    if spec.blobs.is_empty() {
        errs.add(format!("{path}.blobs"), "must have at least one platform");
    }
    for (platform, blob) in &spec.blobs {
        let bp = format!("{path}.blobs[{platform}]");
        if !PLATFORMS.contains(&platform.as_str()) {
            errs.add(&bp, format!("unknown platform (known: {})", PLATFORMS.join(", ")));
        }
        let wasm_platform = platform == WASM_PLATFORM;
        if wasm_platform != (blob.kind == BlobType::Wasm) {
            errs.add(
                format!("{bp}.type"),
                format!(
                    "a {} blob cannot be for platform {platform} (wasm blobs, and only they, go under {WASM_PLATFORM})",
                    blob.kind
                ),
            );
        }
        if !is_sha256_hex(&blob.sha256) {
            errs.add(format!("{bp}.sha256"), "must be 64 lower-case hex digits");
        }
        let n = blob.chunks.len();
        let mut total = 0u64;
        for (i, c) in blob.chunks.iter().enumerate() {
            let cp = format!("{bp}.chunks[{i}]");
            if !is_sha256_hex(&c.digest) {
                errs.add(format!("{cp}.digest"), "must be 64 lower-case hex digits");
            }
            if c.size == 0 || c.size > CHUNK_SIZE {
                errs.add(format!("{cp}.size"), format!("must be 1 to {CHUNK_SIZE}"));
            } else if i + 1 < n && c.size != CHUNK_SIZE {
                errs.add(format!("{cp}.size"), format!("must be {CHUNK_SIZE}: every chunk but the last is full"));
            }
            total = total.saturating_add(c.size);
        }
        if total != blob.size {
            errs.add(format!("{bp}.size"), format!("is {} but the chunks add up to {total}", blob.size));
        }
        for (i, s) in blob.signatures.iter().enumerate() {
            let sp = format!("{bp}.signatures[{i}]");
            if !is_hex(&s.key_id, 16) {
                errs.add(format!("{sp}.keyId"), "must be 16 lower-case hex digits");
            }
            if !is_hex(&s.signature, 128) {
                errs.add(format!("{sp}.signature"), "must be 128 lower-case hex digits (ed25519)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse_one, Resource};

    fn hex64(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn manifest(blob_extra: &str) -> String {
        format!(
            r#"
apiVersion: yunbian.io/v1
kind: Artifact
metadata: {{name: hello--1-2-0}}
spec:
  name: hello
  version: 1.2.0
  blobs:
    linux/amd64:
      type: executable
      size: 4194310
      sha256: {a}
      chunks:
        - {{digest: {b}, size: 4194304}}
        - {{digest: {c}, size: 6}}
{blob_extra}"#,
            a = hex64('a'),
            b = hex64('b'),
            c = hex64('c'),
        )
    }

    #[test]
    fn parses_a_valid_artifact() {
        let r = parse_one(&manifest("")).expect("valid");
        let Resource::Artifact(a) = r else { panic!("not an artifact") };
        assert_eq!(a.spec.blobs["linux/amd64"].chunks.len(), 2);
        assert_eq!(artifact_object_name("hello", "1.2.0"), "hello--1-2-0");
    }

    #[test]
    fn errors_carry_field_paths() {
        let text = manifest("").replace("size: 4194310", "size: 5").replace("type: executable", "type: wasm");
        let e = parse_one(&text).expect_err("invalid").to_string();
        assert!(e.contains("spec.blobs[linux/amd64].size: is 5 but the chunks add up to 4194310"), "{e}");
        assert!(e.contains("spec.blobs[linux/amd64].type:"), "{e}");
        let text = manifest("").replace("size: 4194304}", "size: 4000}");
        let e = parse_one(&text).expect_err("invalid").to_string();
        assert!(e.contains("spec.blobs[linux/amd64].chunks[0].size: must be 4194304"), "{e}");
        let text = manifest("      signatures: [{keyId: xyz, signature: abc}]");
        let e = parse_one(&text).expect_err("invalid").to_string();
        assert!(e.contains("spec.blobs[linux/amd64].signatures[0].keyId"), "{e}");
        let text = manifest("").replace("linux/amd64:", "windows/x86:");
        let e = parse_one(&text).expect_err("invalid").to_string();
        assert!(e.contains("spec.blobs[windows/x86]: unknown platform"), "{e}");
    }

    #[test]
    fn name_must_match_name_and_version() {
        let text = manifest("").replace("version: 1.2.0", "version: 1.3.0");
        let e = parse_one(&text).expect_err("invalid").to_string();
        assert!(e.contains("metadata.name: must be \"hello--1-3-0\""), "{e}");
        for bad in ["1.0-rc1", ".1", "1..2", "V1", ""] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        assert!(check_artifact_name("a--b").is_err());
    }

    #[test]
    fn statement_names_everything_signed() {
        let s = signing_statement("hello", "1.2.0", "linux/arm64", BlobType::Bundle, &hex64('a'), 7);
        for part in ["hello", "1.2.0", "linux/arm64", "type: bundle", &hex64('a'), "size: 7"] {
            assert!(s.contains(part), "{s}");
        }
    }
}
