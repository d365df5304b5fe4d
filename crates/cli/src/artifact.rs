//! `yunbian artifact …`: push files to the cloud's artifact registry, list,
//! describe, delete and sign artifacts, make publisher keys, and run the
//! chunk garbage collector.
//!
//! A push reads the file one 4 MiB chunk at a time, asks the cloud whether
//! it has each chunk (`HEAD /v1/chunks/{sha256}`) and uploads only those it
//! lacks, so running the same push again after an interruption sends only
//! what is missing. The Artifact object is written last, with the new
//! platform's blob added to the blobs already there, under the object's
//! `resourceVersion`, or created with POST when new (a concurrent push of
//! another platform makes it retry, not lose a blob).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use yunbian_api::artifact::{check_artifact_name, check_version, PLATFORMS, WASM_PLATFORM};
use yunbian_api::{
    artifact_object_name, signing_statement, Artifact, ArtifactBlob, ArtifactSpec, BlobSignature, BlobType, ChunkEntry,
    Kind, Object,
};
use yunbian_artifacts::signing::PublisherKey;
use yunbian_artifacts::{sha256, ChunkReader};

use crate::client::{Client, ClientError};
use crate::commands::{OutputFormat, Session};

/// `artifact` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ArtifactCommand {
    /// Upload a file (executable, tar.gz bundle, .wasm module, OCI image layout tar) as one platform's blob.
    // `--version` is the artifact's version here, not the program's.
    #[command(disable_version_flag = true)]
    Push(PushArgs),
    /// List artifacts.
    #[command(alias = "ls")]
    List {
        /// Output format: wide, yaml or json.
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
    },
    /// Show an artifact's blobs, chunks and signatures.
    // `--version` is the artifact's version here, not the program's.
    #[command(disable_version_flag = true)]
    Describe(ArtifactRef),
    /// Delete an artifact; chunks no other artifact uses are collected.
    // `--version` is the artifact's version here, not the program's.
    #[command(disable_version_flag = true)]
    Delete(ArtifactRef),
    /// Make an ed25519 publisher key (PKCS#8 PEM) and print its key id.
    Keygen {
        /// Where to write the private key; the public key goes to KEY.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an artifact's blobs with a publisher key.
    // `--version` is the artifact's version here, not the program's.
    #[command(disable_version_flag = true)]
    Sign(SignArgs),
    /// Write an artifact (its blobs and every chunk) to one file, to carry
    /// to a registry that cannot reach this one.
    // `--version` is the artifact's version here, not the program's.
    #[command(disable_version_flag = true)]
    Export(ExportArgs),
    /// Load a file made by `artifact export` into this registry (only the
    /// chunks it lacks are uploaded; every chunk is checked).
    Import {
        /// The file.
        file: PathBuf,
    },
    /// Collect unreferenced chunks now.
    Gc {
        /// Keep unreferenced chunks used within this long (default: the cloud's, 1h); 0s collects all.
        #[arg(long, value_parser = crate::time::parse_duration)]
        grace: Option<u64>,
    },
}

/// Which artifact.
#[derive(Debug, Clone, Args)]
pub struct ArtifactRef {
    /// The artifact's name.
    pub name: String,
    /// Its version.
    #[arg(long)]
    pub version: String,
}

/// Arguments of `artifact export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The artifact's name.
    pub name: String,
    /// Its version.
    #[arg(long)]
    pub version: String,
    /// Only this platform's blob (default: all).
    #[arg(long)]
    pub platform: Option<String>,
    /// The file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

/// Arguments of `artifact push`.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// The file to upload.
    pub path: PathBuf,
    /// The artifact's name.
    #[arg(long)]
    pub name: String,
    /// Its version (letters, digits and '.').
    #[arg(long)]
    pub version: String,
    /// linux/amd64, linux/arm64 or wasi/wasm32 (default: from the file, else this machine's).
    #[arg(long)]
    pub platform: Option<String>,
    /// executable, bundle, wasm or oci (default: from the file's contents).
    #[arg(long = "type", value_parser = parse_blob_type)]
    pub kind: Option<BlobType>,
}

/// Arguments of `artifact sign`.
#[derive(Debug, Clone, Args)]
pub struct SignArgs {
    /// The artifact's name.
    pub name: String,
    /// Its version.
    #[arg(long)]
    pub version: String,
    /// The private key file (from `artifact keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Sign only this platform's blob (default: all).
    #[arg(long)]
    pub platform: Option<String>,
}

fn parse_blob_type(s: &str) -> Result<BlobType, String> {
    s.parse()
}

/// Runs one `artifact` subcommand.
pub(crate) async fn run(session: &Session, cmd: ArtifactCommand) -> Result<()> {
    match cmd {
        ArtifactCommand::Push(a) => {
            let client = session.client()?;
            let report = push(&client, &a).await?;
            println!(
                "artifact {} version {} ({}): {} {} bytes, {} chunks ({} uploaded, {} already there), sha256 {}",
                a.name,
                a.version,
                report.platform,
                report.kind,
                report.size,
                report.chunks,
                report.uploaded,
                report.chunks - report.uploaded,
                report.sha256
            );
            Ok(())
        }
        ArtifactCommand::List { output } => {
            let args =
                crate::commands::GetArgs { kind: Kind::Artifact, name: None, output, watch: false, selector: None };
            crate::commands::get(session, args).await
        }
        ArtifactCommand::Describe(r) => {
            let client = session.client()?;
            let obj = client.get_object(Kind::Artifact, &object_name(&r)?).await?;
            print!("{}", describe(&obj));
            Ok(())
        }
        ArtifactCommand::Delete(r) => {
            let client = session.client()?;
            client.delete_object(Kind::Artifact, &object_name(&r)?).await?;
            println!("artifact {} version {} deleted", r.name, r.version);
            Ok(())
        }
        ArtifactCommand::Keygen { out } => {
            let key = keygen(&out)?;
            println!(
                "key id {} (private key {}, public key {})",
                key.key_id(),
                out.display(),
                pub_path(&out).display()
            );
            // What a NodeGroup's `trust.keys[].publicKey` takes.
            println!("public key: {}", key.public_key_hex());
            Ok(())
        }
        ArtifactCommand::Sign(a) => {
            let client = session.client()?;
            let (key_id, platforms) = sign(&client, &a).await?;
            println!("signed {} version {} ({}) with key {key_id}", a.name, a.version, platforms.join(", "));
            Ok(())
        }
        ArtifactCommand::Export(a) => {
            let client = session.client()?;
            let (chunks, bytes) = export(&client, &a).await?;
            println!(
                "exported {} version {} to {}: {chunks} chunks, {bytes} bytes",
                a.name,
                a.version,
                a.output.display()
            );
            Ok(())
        }
        ArtifactCommand::Import { file } => {
            let client = session.client()?;
            let r = import(&client, &file).await?;
            println!(
                "imported {} version {} ({}): {} chunks ({} uploaded, {} already there)",
                r.name,
                r.version,
                r.platforms.join(", "),
                r.chunks,
                r.uploaded,
                r.chunks - r.uploaded
            );
            Ok(())
        }
        ArtifactCommand::Gc { grace } => {
            let client = session.client()?;
            let body = match grace {
                Some(secs) => json!({ "graceSeconds": secs }),
                None => json!({}),
            };
            let r = client.post("/v1/chunks/gc", &body).await?;
            println!(
                "removed {} chunks ({} bytes); {} referenced, {} kept as recently used",
                r["removed"], r["removedBytes"], r["referenced"], r["keptRecent"]
            );
            Ok(())
        }
    }
}

fn object_name(r: &ArtifactRef) -> Result<String> {
    check_artifact_name(&r.name).map_err(|m| anyhow!("name: {m}"))?;
    check_version(&r.version).map_err(|m| anyhow!("--version: {m}"))?;
    Ok(artifact_object_name(&r.name, &r.version))
}

// ---------------------------------------------------------------- type detection

/// What a file's first bytes (and, for a tar, its entries) say it is, and
/// the platform an ELF header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    /// The blob type.
    pub kind: BlobType,
    /// The platform, when the file says (ELF machine, wasm).
    pub platform: Option<&'static str>,
}

/// Detects the type of the file at `path`: ELF → executable, `\0asm` →
/// wasm, gzip → bundle, a tar archive with an `oci-layout` entry → oci.
pub fn detect(path: &Path) -> Result<Detected> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut head = Vec::with_capacity(512);
    (&mut f).take(512).read_to_end(&mut head).with_context(|| format!("read {}", path.display()))?;
    if head.starts_with(b"\x7fELF") {
        let machine = head.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
        let platform = match machine {
            Some(0x3e) => Some("linux/amd64"),
            Some(0xb7) => Some("linux/arm64"),
            _ => None,
        };
        return Ok(Detected { kind: BlobType::Executable, platform });
    }
    if head.starts_with(b"\0asm") {
        return Ok(Detected { kind: BlobType::Wasm, platform: Some(WASM_PLATFORM) });
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Detected { kind: BlobType::Bundle, platform: None });
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        if tar_has_entry(path, "oci-layout")? {
            return Ok(Detected { kind: BlobType::Oci, platform: None });
        }
        bail!(
            "{} is an uncompressed tar without an oci-layout entry: gzip it for a bundle, or give --type",
            path.display()
        );
    }
    bail!("cannot tell what {} is (not ELF, wasm, gzip or an OCI layout tar): give --type", path.display())
}

/// Whether a tar archive has an entry named `name` (or `./name`), reading
/// only the 512-byte headers.
fn tar_has_entry(path: &Path, name: &str) -> Result<bool> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut pos = 0u64;
    let mut header = [0u8; 512];
    while pos + 512 <= len {
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut header)?;
        if header.iter().all(|b| *b == 0) {
            return Ok(false);
        }
        let entry = String::from_utf8_lossy(&header[..100]).trim_end_matches('\0').to_string();
        if entry == name || entry.strip_prefix("./") == Some(name) {
            return Ok(true);
        }
        let size_field =
            String::from_utf8_lossy(&header[124..136]).trim_matches(|c: char| c == '\0' || c == ' ').to_string();
        let size = u64::from_str_radix(&size_field, 8).unwrap_or(0);
        pos += 512 + size.div_ceil(512) * 512;
    }
    Ok(false)
}

/// This machine's platform.
fn host_platform() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "linux/arm64",
        _ => "linux/amd64",
    }
}

// ---------------------------------------------------------------- push

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The platform the blob was stored for.
    pub platform: String,
    /// Its type.
    pub kind: BlobType,
    /// Its size.
    pub size: u64,
    /// Its sha256.
    pub sha256: String,
    /// How many chunks it has.
    pub chunks: usize,
    /// How many were uploaded (the others were already stored).
    pub uploaded: usize,
}

/// Pushes `a.path` (see the module docs).
pub async fn push(client: &Client, a: &PushArgs) -> Result<PushReport> {
    check_artifact_name(&a.name).map_err(|m| anyhow!("--name: {m}"))?;
    check_version(&a.version).map_err(|m| anyhow!("--version: {m}"))?;
    let object = artifact_object_name(&a.name, &a.version);
    if object.len() > 63 {
        bail!("--name and --version together make the object name {object:?}, over 63 characters: shorten one");
    }
    // The file's own header always speaks for its platform (an ELF's
    // machine), whatever --type says.
    let sniffed = detect(&a.path).ok();
    let is_elf = sniffed.as_ref().is_some_and(|d| d.kind == BlobType::Executable);
    let detected = match a.kind {
        Some(kind) => Detected {
            kind,
            platform: if kind == BlobType::Wasm {
                Some(WASM_PLATFORM)
            } else {
                sniffed.as_ref().filter(|_| is_elf).and_then(|d| d.platform)
            },
        },
        None => sniffed.map_or_else(|| detect(&a.path), Ok)?,
    };
    let platform = match (&a.platform, detected.platform) {
        (Some(p), Some(d)) if p != d => {
            bail!("--platform {p} does not match the file: its header says {d}")
        }
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p.to_string(),
        (None, None) if is_elf || detected.kind == BlobType::Executable => {
            bail!("{}: an executable for an unknown machine: give --platform", a.path.display())
        }
        (None, None) => host_platform().to_string(),
    };
    if !PLATFORMS.contains(&platform.as_str()) {
        bail!("--platform {platform:?}: expected one of {}", PLATFORMS.join(", "));
    }
    if (platform == WASM_PLATFORM) != (detected.kind == BlobType::Wasm) {
        bail!(
            "a {} blob cannot be pushed for {platform}: wasm modules, and only they, go under {WASM_PLATFORM}",
            detected.kind
        );
    }
    let mut reader = ChunkReader::open(&a.path).with_context(|| format!("read {}", a.path.display()))?;
    let mut uploaded = 0;
    while let Some((c, bytes)) = reader.next_chunk().with_context(|| format!("read {}", a.path.display()))? {
        if upload_chunk(client, &c.digest.hex(), bytes).await? {
            uploaded += 1;
        }
    }
    let manifest = reader.finish().with_context(|| format!("read {}", a.path.display()))?;
    let blob = ArtifactBlob {
        kind: detected.kind,
        size: manifest.size,
        sha256: manifest.sha256.hex(),
        chunks: manifest.chunks.iter().map(|c| ChunkEntry { digest: c.digest.hex(), size: c.size }).collect(),
        signatures: Vec::new(),
    };
    let report = PushReport {
        platform: platform.clone(),
        kind: detected.kind,
        size: blob.size,
        sha256: blob.sha256.clone(),
        chunks: blob.chunks.len(),
        uploaded,
    };
    update_artifact(client, &a.name, &a.version, |spec| {
        // Signatures stay only if the blob is the same bytes.
        let mut blob = blob.clone();
        if let Some(old) = spec.blobs.get(&platform) {
            if old.sha256 == blob.sha256 && old.kind == blob.kind {
                blob.signatures = old.signatures.clone();
            }
        }
        spec.blobs.insert(platform.clone(), blob);
        Ok(())
    })
    .await?;
    Ok(report)
}

/// Uploads one chunk unless the cloud has it; `true` if it was sent.
pub async fn upload_chunk(client: &Client, digest: &str, bytes: Vec<u8>) -> Result<bool> {
    let path = format!("/v1/chunks/{digest}");
    let (status, body) = client.request_bytes(Method::HEAD, &path, None).await?;
    match status {
        StatusCode::OK => return Ok(false),
        StatusCode::NOT_FOUND => {}
        s => return Err(ClientError::from_response(s.as_u16(), &body).into()),
    }
    let (status, body) = client.request_bytes(Method::PUT, &path, Some(bytes)).await?;
    if !status.is_success() {
        return Err(anyhow::Error::from(ClientError::from_response(status.as_u16(), &body)))
            .with_context(|| format!("upload chunk {digest}"));
    }
    Ok(true)
}

/// Reads the artifact (or starts a new one), lets `change` edit its spec,
/// and writes it back under the read `resourceVersion`; retries on a
/// conflict.
async fn update_artifact(
    client: &Client,
    name: &str,
    version: &str,
    mut change: impl FnMut(&mut ArtifactSpec) -> Result<()>,
) -> Result<Value> {
    let object = artifact_object_name(name, version);
    for _ in 0..5 {
        let (mut artifact, exists) = match client.get_object(Kind::Artifact, &object).await {
            Ok(v) => (Artifact::from_value(v).context("decode the stored artifact")?, true),
            Err(e) if e.is_not_found() => (
                Object::new(
                    &object,
                    ArtifactSpec { name: name.to_string(), version: version.to_string(), ..Default::default() },
                ),
                false,
            ),
            Err(e) => return Err(e.into()),
        };
        change(&mut artifact.spec)?;
        let mut v = artifact.to_value();
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        // A new artifact is created (409 if another push created it first:
        // read it again and add to it); an existing one is replaced under
        // the resourceVersion read (409 if it changed meanwhile).
        let written = if exists {
            client.put_object(Kind::Artifact, &object, &v).await
        } else {
            client.post(&format!("/v1/{}", Kind::Artifact.plural()), &v).await
        };
        match written {
            Err(e) if e.status() == Some(409) => continue,
            other => return Ok(other?),
        }
    }
    bail!("artifact {object} kept changing while it was being updated; try again")
}

// ---------------------------------------------------------------- keys and signing

fn pub_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Writes a new key to `out` (mode 0600, never over an existing file) and
/// its public key to `out.pub`.
pub fn keygen(out: &Path) -> Result<PublisherKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = PublisherKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {} (an existing key is never overwritten)", out.display()))?;
    f.write_all(key.to_pem().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", out.display()))?;
    let public = format!("ed25519 {} {}\n", key.public_key_hex(), key.key_id());
    std::fs::write(pub_path(out), public).with_context(|| format!("write {}", pub_path(out).display()))?;
    Ok(key)
}

/// Adds (or replaces) this key's signature on the artifact's blobs.
pub async fn sign(client: &Client, a: &SignArgs) -> Result<(String, Vec<String>)> {
    let pem = std::fs::read_to_string(&a.key).with_context(|| format!("read {}", a.key.display()))?;
    let key = PublisherKey::from_pem(&pem).with_context(|| format!("load {}", a.key.display()))?;
    let key_id = key.key_id();
    object_name(&ArtifactRef { name: a.name.clone(), version: a.version.clone() })?;
    let mut signed = Vec::new();
    update_artifact(client, &a.name, &a.version, |spec| {
        signed.clear();
        if spec.blobs.is_empty() {
            bail!("artifact {} version {} not found: push it first", a.name, a.version);
        }
        for (platform, blob) in spec.blobs.iter_mut() {
            if a.platform.as_ref().is_some_and(|p| p != platform) {
                continue;
            }
            let statement = signing_statement(&spec.name, &spec.version, platform, blob.kind, &blob.sha256, blob.size);
            blob.signatures.retain(|s| s.key_id != key_id);
            blob.signatures
                .push(BlobSignature { key_id: key_id.clone(), signature: key.sign_hex(statement.as_bytes()) });
            signed.push(platform.clone());
        }
        if signed.is_empty() {
            bail!("artifact {} version {} has no blob for {}", a.name, a.version, a.platform.as_deref().unwrap_or("?"));
        }
        Ok(())
    })
    .await?;
    Ok((key_id, signed))
}

// ---------------------------------------------------------------- describe

/// The text of `artifact describe`.
pub fn describe(obj: &Value) -> String {
    let mut out = String::new();
    let t = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    out.push_str(&format!(
        "Name:      {}\nVersion:   {}\nObject:    {}\nCreated:   {}\nBlobs:\n",
        t("/spec/name"),
        t("/spec/version"),
        t("/metadata/name"),
        t("/metadata/creationTimestamp")
    ));
    if let Some(blobs) = obj.pointer("/spec/blobs").and_then(Value::as_object) {
        for (platform, b) in blobs {
            let chunks = b.get("chunks").and_then(Value::as_array).map_or(0, Vec::len);
            out.push_str(&format!(
                "  {platform}:\n    Type:       {}\n    Size:       {} bytes\n    SHA256:     {}\n    Chunks:     {chunks}\n",
                b.get("type").and_then(Value::as_str).unwrap_or(""),
                b.get("size").and_then(Value::as_u64).unwrap_or(0),
                b.get("sha256").and_then(Value::as_str).unwrap_or(""),
            ));
            let sigs: Vec<&str> = b
                .get("signatures")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(|s| s.get("keyId").and_then(Value::as_str)).collect())
                .unwrap_or_default();
            out.push_str(&format!(
                "    Signed by:  {}\n",
                if sigs.is_empty() { "<unsigned>".to_string() } else { sigs.join(", ") }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("yunbian-cli-art-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn tar_with(entry: &str) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..entry.len()].copy_from_slice(entry.as_bytes());
        h[124..135].copy_from_slice(b"00000000005");
        h[257..262].copy_from_slice(b"ustar");
        let mut out = h.to_vec();
        let mut data = [0u8; 512];
        data[..5].copy_from_slice(b"hello");
        out.extend_from_slice(&data);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn detects_types() {
        let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
        elf.extend_from_slice(&0xb7u16.to_le_bytes());
        elf.resize(64, 0);
        let cases: Vec<(&str, Vec<u8>, BlobType, Option<&str>)> = vec![
            ("elf", elf, BlobType::Executable, Some("linux/arm64")),
            ("wasm", b"\0asm\x01\0\0\0".to_vec(), BlobType::Wasm, Some("wasi/wasm32")),
            ("gz", vec![0x1f, 0x8b, 8, 0, 0, 0], BlobType::Bundle, None),
            ("oci", tar_with("./oci-layout"), BlobType::Oci, None),
        ];
        for (name, bytes, kind, platform) in cases {
            let p = temp(name, &bytes);
            assert_eq!(detect(&p).expect(name), Detected { kind, platform }, "{name}");
            let _ = std::fs::remove_file(p);
        }
        for (name, bytes) in [("plain-tar", tar_with("hello.txt")), ("text", b"hello".to_vec())] {
            let p = temp(name, &bytes);
            assert!(detect(&p).is_err(), "{name}");
            let _ = std::fs::remove_file(p);
        }
    }

    /// Like the `yunbian` binary: a version flag propagated to subcommands.
    #[derive(clap::Parser)]
    #[command(version, propagate_version = true)]
    struct Cli {
        #[command(subcommand)]
        cmd: ArtifactCommand,
    }

    fn parse(args: &[&str]) -> Result<ArtifactCommand, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("artifact").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn parses_commands() {
        let Ok(ArtifactCommand::Push(p)) = parse(&[
            "push",
            "./app",
            "--name",
            "hello",
            "--version",
            "1.0",
            "--platform",
            "linux/arm64",
            "--type",
            "bundle",
        ]) else {
            panic!("push")
        };
        assert_eq!((p.name.as_str(), p.version.as_str(), p.platform.as_deref()), ("hello", "1.0", Some("linux/arm64")));
        assert_eq!(p.kind, Some(BlobType::Bundle));
        assert!(parse(&["push", "./app", "--name", "hello", "--version", "1", "--type", "zip"]).is_err());
        assert!(parse(&["push", "./app", "--version", "1"]).is_err(), "--name is required");
        assert!(matches!(parse(&["sign", "hello", "--version", "1", "--key", "k"]), Ok(ArtifactCommand::Sign(_))));
        assert!(matches!(parse(&["gc", "--grace", "0s"]), Ok(ArtifactCommand::Gc { grace: Some(0) })));
        assert!(matches!(parse(&["gc", "--grace", "2m"]), Ok(ArtifactCommand::Gc { grace: Some(120) })));
        assert!(matches!(parse(&["ls"]), Ok(ArtifactCommand::List { output: None })));
        assert!(matches!(parse(&["delete", "hello", "--version", "1.0"]), Ok(ArtifactCommand::Delete(_))));
        let r = ArtifactRef { name: "hello".into(), version: "1.0-rc1".into() };
        assert!(object_name(&r).is_err());
    }

    #[test]
    fn keygen_never_overwrites() {
        let p = std::env::temp_dir().join(format!("yunbian-cli-art-{}-key", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let k = keygen(&p).expect("keygen");
        let again = PublisherKey::from_pem(&std::fs::read_to_string(&p).expect("read")).expect("load");
        assert_eq!(again.key_id(), k.key_id());
        assert!(std::fs::read_to_string(pub_path(&p)).expect("pub").contains(&k.key_id()));
        assert!(keygen(&p).is_err());
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(pub_path(&p));
    }
}

// ---------------------------------------------------------------- export / import

/// Magic line of an export file.
/// The header of an export file.
#[derive(serde::Deserialize)]
pub struct ExportHeader {
    /// Artifact name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Blobs by platform, with chunk lists and signatures.
    pub blobs: std::collections::BTreeMap<String, ArtifactBlob>,
}

/// What `import` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Artifact name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Platforms imported.
    pub platforms: Vec<String>,
    /// Distinct chunks in the file.
    pub chunks: usize,
    /// Chunks the registry did not have.
    pub uploaded: usize,
}

/// Fetches one chunk and checks it against its digest.
async fn fetch_chunk(client: &Client, digest: &str) -> Result<Vec<u8>> {
    let (status, body) = client.request_bytes(Method::GET, &format!("/v1/chunks/{digest}"), None).await?;
    if !status.is_success() {
        return Err(anyhow::Error::from(ClientError::from_response(status.as_u16(), &body)))
            .with_context(|| format!("fetch chunk {digest}"));
    }
    if sha256(&body).hex() != digest {
        bail!("chunk {digest}: the bytes received do not match their digest");
    }
    Ok(body)
}

/// Writes an export file (format: `yunbian_artifacts::export`) under a
/// temporary name, renamed when complete. Returns (chunks, bytes).
pub async fn export(client: &Client, a: &ExportArgs) -> Result<(usize, u64)> {
    let object = object_name(&ArtifactRef { name: a.name.clone(), version: a.version.clone() })?;
    let artifact = Artifact::from_value(client.get_object(Kind::Artifact, &object).await?)
        .context("decode the stored artifact")?;
    let mut blobs = artifact.spec.blobs.clone();
    if let Some(p) = &a.platform {
        blobs.retain(|k, _| k == p);
        if blobs.is_empty() {
            bail!("{} version {} has no {p} blob", a.name, a.version);
        }
    }
    let header = serde_json::to_vec(&json!({"name": a.name, "version": a.version, "blobs": blobs}))?;
    let mut digests: Vec<String> = Vec::new();
    for blob in blobs.values() {
        for c in &blob.chunks {
            if !digests.contains(&c.digest) {
                digests.push(c.digest.clone());
            }
        }
    }
    let tmp = a.output.with_extension("partial");
    let write = async {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?);
        yunbian_artifacts::export::write_header(&mut f, &header)?;
        let mut bytes = 0u64;
        for d in &digests {
            let chunk = fetch_chunk(client, d).await?;
            yunbian_artifacts::export::write_chunk(&mut f, d, &chunk)?;
            bytes += chunk.len() as u64;
        }
        let f = f.into_inner().map_err(|e| anyhow!("write {}: {}", tmp.display(), e.error()))?;
        f.sync_all()?;
        anyhow::Ok(bytes)
    };
    match write.await {
        Ok(bytes) => {
            std::fs::rename(&tmp, &a.output).with_context(|| format!("rename to {}", a.output.display()))?;
            Ok((digests.len(), bytes))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Loads an export file: checks the header's hash, uploads each chunk the
/// registry lacks after checking it against its digest, checks that every
/// chunk the blobs list was in the file, then adds the blobs (signatures
/// included) to the artifact.
pub async fn import(client: &Client, file: &Path) -> Result<ImportReport> {
    let f = std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?);
    let bad = |what: String| anyhow!("{}: not a valid export file ({what})", file.display());
    let (mut reader, header) = yunbian_artifacts::export::ExportReader::open(f).map_err(bad)?;
    let h: ExportHeader = serde_json::from_slice(&header).map_err(|e| anyhow!("{}: header: {e}", file.display()))?;
    reader.expect_chunks(h.blobs.values().flat_map(|b| b.chunks.iter().map(|c| c.digest.clone())));
    let chunks = reader.remaining();
    let mut uploaded = 0;
    while let Some((digest, bytes)) = reader.next_chunk().map_err(bad)? {
        if upload_chunk(client, &digest, bytes).await? {
            uploaded += 1;
        }
    }
    let platforms: Vec<String> = h.blobs.keys().cloned().collect();
    update_artifact(client, &h.name, &h.version, |spec| {
        for (p, b) in &h.blobs {
            spec.blobs.insert(p.clone(), b.clone());
        }
        Ok(())
    })
    .await?;
    Ok(ImportReport { name: h.name, version: h.version, platforms, chunks, uploaded })
}
