//! Reading an OCI image layout: `oci-layout`, `index.json` and
//! `blobs/sha256/<hex>`, as written by `docker save` (OCI format), skopeo,
//! buildah or `yunbian_runtime::oci::testing`.
//!
//! [`ImageLayout::open`] follows `index.json` to one image manifest (through
//! at most one nested index, picking `linux/<host arch>` where several
//! platforms are offered), then to its config, and checks every blob it
//! reaches — index, manifest, config and each layer — against its
//! descriptor's size and sha256 before returning. Both OCI and Docker
//! (schema 2) media types are accepted. JSON blobs larger than 4 MiB are
//! refused before being read.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::digest::{Digest, HashingReader};
use super::OciError;

/// Largest JSON blob (index, manifest, config) read into memory.
const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];

/// A content descriptor: what a blob is, its digest and its size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type (`application/vnd.oci.image.layer.v1.tar+gzip`, …).
    #[serde(default)]
    pub media_type: String,
    /// sha256 of the blob's bytes.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Platform of a manifest listed in an index.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An image platform (`linux/amd64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// GOARCH-style architecture (`amd64`, `arm64`, `arm`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v7`, `v8`), if given.
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/<architecture of this build>` (GOARCH names: `x86_64` is
    /// `amd64`, `aarch64` is `arm64`).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform { architecture: architecture.to_string(), os: "linux".to_string(), variant: None }
    }

    fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || other.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What the image says about how to run it (the `config` section of the
/// image config blob).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd` (arguments to the entrypoint, or the command without one).
    pub cmd: Vec<String>,
    /// `Env`, as name/value pairs in image order (entries without `=` are dropped).
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` as written (`1000`, `1000:1000`, `app`, `app:staff`), if set.
    /// Names are resolved from the rootfs' `/etc/passwd` and `/etc/group`
    /// when the bundle is prepared.
    pub user: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson {
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    schema_version: u32,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfigJson>,
    rootfs: RootfsJson,
}

#[derive(Deserialize, Default)]
struct RunConfigJson {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootfsJson {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayoutJson {
    image_layout_version: String,
}

/// An OCI image layout directory whose manifest, config and layers were all
/// checked against their digests when it was opened.
#[derive(Debug, Clone)]
pub struct ImageLayout {
    dir: PathBuf,
    manifest: Descriptor,
    platform: Platform,
    config: ImageConfig,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
}

impl ImageLayout {
    /// Opens the layout in `dir` for this host's platform.
    pub fn open(dir: &Path) -> Result<ImageLayout, OciError> {
        Self::open_for(dir, &Platform::host())
    }

    /// Opens the layout in `dir`, choosing `platform` from multi-platform
    /// indexes.
    pub fn open_for(dir: &Path, platform: &Platform) -> Result<ImageLayout, OciError> {
        let layout_err = |path: &Path, message: String| OciError::Layout { path: path.to_path_buf(), message };
        let marker = dir.join("oci-layout");
        let bytes = read_small_file(&marker)?;
        let v: OciLayoutJson = serde_json::from_slice(&bytes).map_err(|e| layout_err(&marker, e.to_string()))?;
        if !v.image_layout_version.starts_with("1.") {
            return Err(layout_err(&marker, format!("unsupported imageLayoutVersion {:?}", v.image_layout_version)));
        }
        let index_path = dir.join("index.json");
        let bytes = read_small_file(&index_path)?;
        let index: IndexJson = serde_json::from_slice(&bytes).map_err(|e| layout_err(&index_path, e.to_string()))?;
        if index.schema_version != 2 {
            return Err(layout_err(&index_path, format!("unsupported schemaVersion {}", index.schema_version)));
        }
        let mut image = ImageLayout {
            dir: dir.to_path_buf(),
            manifest: Descriptor { media_type: String::new(), digest: Digest::of(b""), size: 0, platform: None },
            platform: platform.clone(),
            config: ImageConfig::default(),
            layers: Vec::new(),
            diff_ids: Vec::new(),
        };
        image.manifest = image.select_manifest(&index.manifests, platform, 0)?;
        image.load_manifest()?;
        Ok(image)
    }

    /// Picks the manifest for `platform` among `candidates`, descending into
    /// nested indexes (one level).
    fn select_manifest(
        &self,
        candidates: &[Descriptor],
        platform: &Platform,
        depth: usize,
    ) -> Result<Descriptor, OciError> {
        let usable: Vec<&Descriptor> = candidates
            .iter()
            .filter(|d| d.media_type.is_empty() || MANIFEST_TYPES.contains(&d.media_type.as_str()) || is_index(d))
            .collect();
        let chosen = match usable.as_slice() {
            [] => {
                return Err(OciError::Layout {
                    path: self.dir.join("index.json"),
                    message: "lists no image manifest".to_string(),
                })
            }
            [only] if only.platform.as_ref().is_none_or(|p| p.matches(platform)) => *only,
            many => match many.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.matches(platform))) {
                Some(d) => *d,
                None => {
                    return Err(OciError::NoPlatform {
                        wanted: platform.to_string(),
                        found: many
                            .iter()
                            .map(|d| d.platform.as_ref().map_or("(no platform)".to_string(), Platform::to_string))
                            .collect(),
                    })
                }
            },
        };
        if !is_index(chosen) {
            return Ok(chosen.clone());
        }
        if depth > 0 {
            return Err(OciError::Unsupported(format!(
                "index {} nests indexes more than one level deep",
                chosen.digest
            )));
        }
        let bytes = self.read_json_blob(chosen)?;
        let nested: IndexJson = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Layout { path: self.blob_path(&chosen.digest), message: e.to_string() })?;
        self.select_manifest(&nested.manifests, platform, depth + 1)
    }

    fn load_manifest(&mut self) -> Result<(), OciError> {
        let bytes = self.read_json_blob(&self.manifest)?;
        let manifest_path = self.blob_path(&self.manifest.digest);
        let m: ManifestJson = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Layout { path: manifest_path.clone(), message: format!("manifest: {e}") })?;
        if m.schema_version != 2 {
            return Err(OciError::Layout {
                path: manifest_path,
                message: format!("manifest: unsupported schemaVersion {}", m.schema_version),
            });
        }
        let bytes = self.read_json_blob(&m.config)?;
        let config_path = self.blob_path(&m.config.digest);
        let c: ConfigJson = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Layout { path: config_path.clone(), message: format!("image config: {e}") })?;
        if !c.os.is_empty() && c.os != self.platform.os {
            return Err(OciError::NoPlatform {
                wanted: self.platform.to_string(),
                found: vec![format!("{}/{}", c.os, c.architecture)],
            });
        }
        if !c.architecture.is_empty() && c.architecture != self.platform.architecture {
            return Err(OciError::NoPlatform {
                wanted: self.platform.to_string(),
                found: vec![format!("{}/{}", c.os, c.architecture)],
            });
        }
        if c.rootfs.kind != "layers" {
            return Err(OciError::Layout {
                path: config_path,
                message: format!("image config: rootfs type {:?} is not \"layers\"", c.rootfs.kind),
            });
        }
        if c.rootfs.diff_ids.len() != m.layers.len() {
            return Err(OciError::Layout {
                path: config_path,
                message: format!(
                    "image config lists {} diff_ids for {} layers",
                    c.rootfs.diff_ids.len(),
                    m.layers.len()
                ),
            });
        }
        for layer in &m.layers {
            check_layer_media_type(layer)?;
            self.verify_blob(layer)?;
        }
        let run = c.config.unwrap_or_default();
        self.config = ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run
                .env
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .filter(|(k, _)| !k.is_empty())
                .collect(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
        };
        self.layers = m.layers;
        self.diff_ids = c.rootfs.diff_ids;
        Ok(())
    }

    /// How the image says to run it.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The layers, base first.
    pub fn layers(&self) -> &[Descriptor] {
        &self.layers
    }

    /// sha256 of each layer's uncompressed tar, in [`ImageLayout::layers`] order.
    pub fn diff_ids(&self) -> &[Digest] {
        &self.diff_ids
    }

    /// The digest of the chosen image manifest: the image's identity.
    pub fn digest(&self) -> Digest {
        self.manifest.digest
    }

    /// The platform the manifest was chosen for.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Opens a blob, refusing anything but a regular file (a symlink could
    /// point outside the layout).
    pub(crate) fn open_blob(&self, d: &Descriptor) -> Result<fs::File, OciError> {
        let path = self.blob_path(&d.digest);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return Err(OciError::Layout { path, message: "blob is not a regular file".to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::Layout { path, message: format!("blob {} is missing", d.digest) })
            }
            Err(e) => return Err(OciError::io(format!("inspect {}", path.display()), e)),
        }
        fs::File::open(&path).map_err(|e| OciError::io(format!("open {}", path.display()), e))
    }

    /// Streams a blob through sha256 and checks digest and size.
    pub(crate) fn verify_blob(&self, d: &Descriptor) -> Result<(), OciError> {
        let file = self.open_blob(d)?;
        let (mut reader, tap) = HashingReader::new(file);
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| OciError::io(format!("read blob {}", self.blob_path(&d.digest).display()), e))?;
        check_tap(d, tap.finish())
    }

    /// Reads a small JSON blob, checking size and digest.
    fn read_json_blob(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        if d.size > MAX_JSON_BYTES {
            return Err(OciError::Unsupported(format!(
                "blob {} ({}) is {} bytes; JSON blobs are limited to {MAX_JSON_BYTES}",
                d.digest, d.media_type, d.size
            )));
        }
        let file = self.open_blob(d)?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| OciError::io(format!("read blob {}", self.blob_path(&d.digest).display()), e))?;
        check_tap(d, (Digest::of(&bytes), bytes.len() as u64))?;
        Ok(bytes)
    }
}

/// Compares what was read with the descriptor.
pub(crate) fn check_tap(d: &Descriptor, (actual, size): (Digest, u64)) -> Result<(), OciError> {
    if size != d.size {
        return Err(OciError::BlobMismatch {
            digest: d.digest,
            message: format!("descriptor says {} bytes, blob has {size}", d.size),
        });
    }
    if actual != d.digest {
        return Err(OciError::BlobMismatch { digest: d.digest, message: format!("content hashes to {actual}") });
    }
    Ok(())
}

fn is_index(d: &Descriptor) -> bool {
    INDEX_TYPES.contains(&d.media_type.as_str())
}

/// Accepts tar and tar+gzip layers (OCI, Docker, non-distributable).
fn check_layer_media_type(d: &Descriptor) -> Result<(), OciError> {
    let t = d.media_type.as_str();
    if t.ends_with("+zstd") || t.ends_with(".zstd") {
        return Err(OciError::Unsupported(format!(
            "layer {} is zstd-compressed ({t}); only tar and tar+gzip are",
            d.digest
        )));
    }
    let known = t.starts_with("application/vnd.oci.image.layer.")
        || t.starts_with("application/vnd.docker.image.rootfs.")
        || t.is_empty();
    if !known || !(t.contains("tar") || t.is_empty()) {
        return Err(OciError::Unsupported(format!("layer {} has media type {t:?}, not a tar layer", d.digest)));
    }
    Ok(())
}

fn read_small_file(path: &Path) -> Result<Vec<u8>, OciError> {
    let file = fs::File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            OciError::Layout { path: path.to_path_buf(), message: "missing (not an OCI image layout?)".to_string() }
        } else {
            OciError::io(format!("open {}", path.display()), e)
        }
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| OciError::io(format!("read {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(OciError::Layout {
            path: path.to_path_buf(),
            message: format!("larger than {MAX_JSON_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(arch: &str, variant: Option<&str>) -> Platform {
        Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(String::from) }
    }

    #[test]
    fn platform_matching() {
        assert!(p("arm64", None).matches(&p("arm64", Some("v8"))));
        assert!(p("arm", Some("v7")).matches(&p("arm", Some("v7"))));
        assert!(!p("arm", Some("v7")).matches(&p("arm", Some("v6"))));
        assert!(!p("amd64", None).matches(&p("arm64", None)));
        assert_eq!(p("arm", Some("v7")).to_string(), "linux/arm/v7");
    }

    #[test]
    fn layer_media_types() {
        let d = |t: &str| Descriptor { media_type: t.into(), digest: Digest::of(b""), size: 0, platform: None };
        assert!(check_layer_media_type(&d("application/vnd.oci.image.layer.v1.tar+gzip")).is_ok());
        assert!(check_layer_media_type(&d("application/vnd.oci.image.layer.v1.tar")).is_ok());
        assert!(check_layer_media_type(&d("application/vnd.docker.image.rootfs.diff.tar.gzip")).is_ok());
        assert!(check_layer_media_type(&d("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")).is_ok());
        assert!(matches!(
            check_layer_media_type(&d("application/vnd.oci.image.layer.v1.tar+zstd")),
            Err(OciError::Unsupported(_))
        ));
        assert!(check_layer_media_type(&d("application/wasm")).is_err());
    }
}
