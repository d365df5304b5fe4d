//! Test images, for this crate's tests and other crates' end-to-end tests:
//! a tiny OCI image layout built from the host's static busybox
//! (Debian's `busybox-static`), and builders for odd or hostile layers.
//!
//! [`build_busybox_layout`] writes an image of two layers:
//! 1. (tar+gzip) `/bin/busybox` with applet symlinks ([`APPLETS`]),
//!    `/etc/passwd` (root, nobody 65534, app 1000) and `/etc/group`,
//!    `/etc/doomed.txt`, `/opt/old/{a,b}.txt`, `/etc/shared.txt` ("base"),
//!    `/bin/suid-marker` (mode 04755), `/usr/share/one.txt` hard-linked as
//!    `/usr/share/two.txt`, `/tmp` (01777), `/home/app` (owned by 1000);
//! 2. (plain tar) a whiteout of `/etc/doomed.txt`, an opaque `/opt/old/`
//!    holding only `new.txt`, `/etc/shared.txt` ("top"), `/etc/motd`.
//!
//! Its config has `Env` `PATH=/bin` and `IMAGE_VAR=from-image` and the
//! given `Cmd`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use flate2::write::GzEncoder;
use serde_json::{json, Value};

use super::digest::Digest;
use super::image::Platform;

/// The static busybox the test images are made of.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked to busybox in `/bin`.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "test", "env", "id", "dd", "true", "false", "mkdir", "rm", "wc", "head",
    "printf", "pwd", "touch", "grep", "stat", "readlink", "hostname", "kill", "trap", "seq",
];

/// A layer blob ready to be written into a layout.
#[derive(Debug, Clone)]
pub struct TestLayer {
    /// The blob (tar or tar+gzip).
    pub bytes: Vec<u8>,
    /// Its media type.
    pub media_type: String,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
}

/// Builds one layer's tar.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder { tar: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<&mut Self> {
        self.dir_owned(path, mode, 0, 0)
    }

    /// A directory with an owner.
    pub fn dir_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> io::Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.tar.append_data(&mut h, path, io::empty())?;
        Ok(self)
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Regular, mode, 0, 0, data.len() as u64);
        self.tar.append_data(&mut h, path, data)?;
        Ok(self)
    }

    /// A symlink (any target, as images have).
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(&mut self, path: &str, target: &str) -> io::Result<&mut Self> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    /// An entry whose name and link name are written as given, unchecked
    /// (`../escape`, `/abs`): for hostile layers.
    pub fn raw(&mut self, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> io::Result<&mut Self> {
        let mut h = Self::header(kind, 0o644, 0, 0, data.len() as u64);
        {
            let old = h.as_old_mut();
            if name.len() > old.name.len() || link.len() > old.linkname.len() {
                return Err(io::Error::other("raw tar name too long"));
            }
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.tar.append(&h, data)?;
        Ok(self)
    }

    fn finish_tar(self) -> io::Result<Vec<u8>> {
        self.tar.into_inner()
    }

    /// The layer as `tar+gzip`.
    pub fn gzip(self) -> io::Result<TestLayer> {
        let tar = self.finish_tar()?;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        Ok(TestLayer {
            bytes: gz.finish()?,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::of(&tar).to_string(),
        })
    }

    /// The layer as a plain `tar`.
    pub fn plain(self) -> io::Result<TestLayer> {
        let tar = self.finish_tar()?;
        Ok(TestLayer {
            diff_id: Digest::of(&tar).to_string(),
            bytes: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        })
    }
}

/// Writes `bytes` as a blob of the layout in `dir`; returns its descriptor.
pub fn write_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> io::Result<Value> {
    let d = Digest::of(bytes);
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(blobs.join(d.hex()), bytes)?;
    Ok(json!({ "mediaType": media_type, "digest": d.to_string(), "size": bytes.len() }))
}

/// Writes the layers, a config (with `run_config` as its `config`
/// section) and a manifest into `dir`; returns the manifest's descriptor,
/// with its platform, for [`write_index`].
pub fn add_image(dir: &Path, layers: &[TestLayer], run_config: Value, architecture: &str) -> io::Result<Value> {
    let mut layer_descs = Vec::new();
    for l in layers {
        layer_descs.push(write_blob(dir, &l.media_type, &l.bytes)?);
    }
    let config = json!({
        "architecture": architecture,
        "os": "linux",
        "config": run_config,
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
        "history": [],
    });
    let config_desc = write_blob(dir, "application/vnd.oci.image.config.v1+json", &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let mut desc = write_blob(dir, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&manifest)?)?;
    desc["platform"] = json!({ "architecture": architecture, "os": "linux" });
    Ok(desc)
}

/// Writes `index.json` listing `manifests`, and `oci-layout`.
pub fn write_index(dir: &Path, manifests: &[Value]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)
}

/// This host's architecture as images name it (`amd64`, `arm64`).
pub fn host_architecture() -> String {
    Platform::host().architecture
}

/// The two busybox layers described in the module docs.
pub fn busybox_layers() -> io::Result<Vec<TestLayer>> {
    let busybox = fs::read(BUSYBOX).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("read {BUSYBOX}: {e} (install busybox-static: apt-get install busybox-static)"),
        )
    })?;
    if has_elf_interpreter(&busybox) {
        return Err(io::Error::other(format!(
            "{BUSYBOX} is dynamically linked and cannot run alone in an image (install busybox-static: apt-get install busybox-static)"
        )));
    }
    let mut base = LayerBuilder::new();
    base.dir("bin", 0o755)?.file("bin/busybox", 0o755, &busybox)?;
    for applet in APPLETS {
        base.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    base.file("bin/suid-marker", 0o4755, b"#!/bin/sh\n")?
        .dir("etc", 0o755)?
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )?
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\napp:x:1000:\nstaff:x:50:\n")?
        .file("etc/doomed.txt", 0o644, b"deleted by a whiteout in layer 2\n")?
        .file("etc/shared.txt", 0o644, b"base\n")?
        .dir("opt", 0o755)?
        .dir("opt/old", 0o755)?
        .file("opt/old/a.txt", 0o644, b"a\n")?
        .file("opt/old/b.txt", 0o644, b"b\n")?
        .dir("usr", 0o755)?
        .dir("usr/share", 0o755)?
        .file("usr/share/one.txt", 0o644, b"linked\n")?
        .hardlink("usr/share/two.txt", "usr/share/one.txt")?
        .dir("tmp", 0o1777)?
        .dir("root", 0o700)?
        .dir("home", 0o755)?
        .dir_owned("home/app", 0o755, 1000, 1000)?;
    let mut top = LayerBuilder::new();
    top.file("etc/.wh.doomed.txt", 0o644, b"")?
        .file("etc/shared.txt", 0o644, b"top\n")?
        .file("etc/motd", 0o644, b"from layer two\n")?
        .dir("opt/old", 0o755)?
        .file("opt/old/.wh..wh..opq", 0o644, b"")?
        .file("opt/old/new.txt", 0o644, b"new\n")?;
    Ok(vec![base.gzip()?, top.plain()?])
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program
/// header (is dynamically linked). Other files answer false.
fn has_elf_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else { return false };
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(3))
}

/// The busybox image (see the module docs) with `Cmd` = `cmd`, written as
/// an OCI layout in `dir`.
pub fn build_busybox_layout(dir: &Path, cmd: &[&str]) -> io::Result<()> {
    build_busybox_layout_with(
        dir,
        json!({ "Env": ["PATH=/bin", "IMAGE_VAR=from-image"], "Cmd": cmd, "WorkingDir": "/" }),
    )
}

/// The busybox image with the given `config` section (`Env`, `Cmd`,
/// `Entrypoint`, `User`, `WorkingDir`).
pub fn build_busybox_layout_with(dir: &Path, run_config: Value) -> io::Result<()> {
    let desc = add_image(dir, &busybox_layers()?, run_config, &host_architecture())?;
    write_index(dir, &[desc])
}

/// Writes the layout in `layout` as a tar.gz at `out` (`oci-layout`,
/// `index.json`, `blobs/…` at the top), the form `yunbian artifact push`
/// uploads.
pub fn write_layout_tarball(layout: &Path, out: &Path) -> io::Result<()> {
    let file = fs::File::create(out)?;
    let mut tar = tar::Builder::new(GzEncoder::new(file, flate2::Compression::fast()));
    tar.mode(tar::HeaderMode::Deterministic);
    append_tree(&mut tar, layout, Path::new(""))?;
    tar.into_inner()?.finish()?.sync_all()
}

fn append_tree<W: Write>(tar: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel_path = rel.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            tar.append_dir(&rel_path, e.path())?;
            append_tree(tar, root, &rel_path)?;
        } else if ft.is_file() {
            tar.append_path_with_name(e.path(), &rel_path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic_executables() {
        let sh = fs::read("/bin/sh").expect("read /bin/sh");
        assert!(has_elf_interpreter(&sh), "Debian's /bin/sh is dynamically linked");
        if let Ok(busybox) = fs::read(BUSYBOX) {
            assert!(!has_elf_interpreter(&busybox), "busybox-static is static");
        }
        assert!(!has_elf_interpreter(b"#!/bin/sh\n"));
    }
}
