//! Per-input checks shared by the fuzz targets `chunk_manifest` and
//! `artifact_export` (`fuzz/fuzz_targets/`) and the corpus replay test
//! (`tests/artifacts_fuzz_corpus.rs`).
//!
//! Both decoders run on an edge over untrusted bytes: an Artifact's chunk
//! lists come from the cloud or a peer, export files are carried to
//! air-gapped sites by hand. The `check_*` functions accept any bytes;
//! they return normally for every input the code handles correctly
//! (accepted or refused) and panic only when a property is violated: that
//! panic is the bug a fuzzer reports.

use std::collections::{BTreeMap, HashSet};

use yunbian_api::validate::Validate;
use yunbian_api::{ArtifactBlob, ArtifactSpec, BlobType, ChunkEntry};

use crate::chunking::{BlobManifest, LayoutError, ManifestError};
use crate::export::{write_chunk, write_header, ExportReader};
use crate::{sha256, CHUNK_SIZE};

/// What [`check_chunk_manifest`] made of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkListVerdict {
    /// The bytes are neither an Artifact blob nor an Artifact spec in JSON.
    NotJson,
    /// A chunk list was refused (the first refusal).
    Refused(ManifestError),
    /// Every chunk list was accepted; how many there were.
    Accepted(usize),
}

/// Decodes `data` as the JSON of an Artifact blob (`{"type", "size",
/// "sha256", "chunks": [{"digest", "size"}]}`), or else of an Artifact
/// spec (every blob of it is checked, as an edge's export import does), and
/// runs [`BlobManifest::from_entries`] on each chunk list.
///
/// Properties: an accepted manifest is the chunk list, digest for digest
/// and size for size, and satisfies the fixed chunking (restated here
/// independently); a refusal names what is really wrong with the input;
/// and the edge's check agrees with the API's validation of the same blob
/// (what the cloud accepts, edges accept, and the other way round).
pub fn check_chunk_manifest(data: &[u8]) -> ChunkListVerdict {
    let blobs: Vec<ArtifactBlob> = if let Ok(blob) = serde_json::from_slice::<ArtifactBlob>(data) {
        vec![blob]
    } else if let Ok(spec) = serde_json::from_slice::<ArtifactSpec>(data) {
        spec.blobs.into_values().collect()
    } else {
        return ChunkListVerdict::NotJson;
    };
    let mut first_refusal = None;
    for blob in &blobs {
        if let Err(e) = check_blob(blob) {
            first_refusal.get_or_insert(e);
        }
    }
    match first_refusal {
        Some(e) => ChunkListVerdict::Refused(e),
        None => ChunkListVerdict::Accepted(blobs.len()),
    }
}

/// The chunk-list check of one blob, with its properties.
fn check_blob(blob: &ArtifactBlob) -> Result<BlobManifest, ManifestError> {
    let entries = || blob.chunks.iter().map(|c| (c.digest.as_str(), c.size));
    let result = BlobManifest::from_entries(blob.size, &blob.sha256, entries());
    match &result {
        Ok(m) => {
            assert_eq!(m.size, blob.size, "manifest size");
            assert_eq!(m.sha256.hex(), blob.sha256, "manifest sha256 is the blob's, in its only spelling");
            assert_eq!(m.chunks.len(), blob.chunks.len(), "one chunk per entry");
            for (c, e) in m.chunks.iter().zip(&blob.chunks) {
                assert_eq!((c.digest.hex(), c.size), (e.digest.clone(), e.size), "chunk is its entry");
            }
            let full = CHUNK_SIZE as u64;
            assert_eq!(m.chunks.len() as u64, m.size.div_ceil(full), "chunk count of {} bytes", m.size);
            for (i, c) in m.chunks.iter().enumerate() {
                let last = i + 1 == m.chunks.len();
                assert!(c.size >= 1 && c.size <= full, "chunk {i} of {} bytes accepted", c.size);
                assert!(last || c.size == full, "short chunk {i} ({} bytes) accepted before the last", c.size);
            }
            assert!(m.check_layout().is_ok(), "accepted manifest fails check_layout");
            let own: Vec<(String, u64)> = m.chunks.iter().map(|c| (c.digest.hex(), c.size)).collect();
            let again = BlobManifest::from_entries(m.size, &m.sha256.hex(), own.iter().map(|(d, s)| (d.as_str(), *s)));
            assert_eq!(again.as_ref(), Ok(m), "a manifest's own entries parse back to it");
        }
        Err(e) => explain_refusal(blob, e),
    }
    let validation = chunk_list_validation_errors(blob);
    assert_eq!(
        result.is_ok(),
        validation.is_empty(),
        "edge check ({result:?}) and API validation ({validation:?}) disagree on {blob:?}"
    );
    result
}

/// Panics unless `e` is true of `blob`.
fn explain_refusal(blob: &ArtifactBlob, e: &ManifestError) {
    assert!(!e.to_string().is_empty(), "empty error message");
    match e {
        ManifestError::BlobDigest(_) => {
            assert!(blob.sha256.parse::<crate::Digest>().is_err(), "blob sha256 refused: {e}");
        }
        ManifestError::ChunkDigest { index, .. } => {
            let c = blob.chunks.get(*index).unwrap_or_else(|| panic!("{e}: no such chunk"));
            assert!(c.digest.parse::<crate::Digest>().is_err(), "chunk digest refused: {e}");
            assert!(
                blob.chunks[..*index].iter().all(|c| c.digest.parse::<crate::Digest>().is_ok()),
                "{e}: not the first"
            );
        }
        ManifestError::Layout(LayoutError::ChunkSize { index, size }) => {
            let c = blob.chunks.get(*index).unwrap_or_else(|| panic!("{e}: no such chunk"));
            assert_eq!(c.size, *size, "{e}");
            assert!(*size == 0 || *size > CHUNK_SIZE as u64, "{e}: a fine size");
        }
        ManifestError::Layout(LayoutError::ShortChunk { index, size }) => {
            let c = blob.chunks.get(*index).unwrap_or_else(|| panic!("{e}: no such chunk"));
            assert_eq!(c.size, *size, "{e}");
            assert!(index + 1 < blob.chunks.len() && *size < CHUNK_SIZE as u64, "{e}: not short or the last");
        }
        ManifestError::Layout(LayoutError::SizeMismatch { total, size }) => {
            assert_eq!(*size, blob.size, "{e}");
            assert_eq!(Some(*total), blob.chunks.iter().try_fold(0u64, |t, c| t.checked_add(c.size)), "{e}");
            assert_ne!(total, size, "{e}");
        }
    }
}

/// What the API's validation says about `blob`'s size, sha256 and chunks
/// (its type, platform and signatures left out).
fn chunk_list_validation_errors(blob: &ArtifactBlob) -> Vec<String> {
    let blob = ArtifactBlob { kind: BlobType::Executable, signatures: Vec::new(), ..blob.clone() };
    let spec = ArtifactSpec {
        name: "fuzz".into(),
        version: "1".into(),
        blobs: BTreeMap::from([("linux/amd64".to_string(), blob)]),
    };
    spec.errors().into_iter().map(|e| e.to_string()).collect()
}

/// Runs the export reader over `data` as an edge's offline import does,
/// then over a well-formed export file built from `data` and damaged as
/// `data` says (see [`check_export_built`]).
///
/// Returns what the reader made of the raw bytes: the number of chunks it
/// read, or why it refused the file.
pub fn check_export(data: &[u8]) -> Result<usize, String> {
    let raw = read_export(data);
    check_export_built(data);
    raw
}

/// Reads an export file the way `yunbian edge import` does: the header is
/// an Artifact spec, every blob's chunk list passes
/// [`BlobManifest::from_entries`], then every listed chunk is read.
///
/// Properties: every chunk handed out hashes to its digest, is one the
/// header lists and comes once; the reader ends only when all listed
/// chunks came, and its count of chunks still to come is right throughout.
fn read_export(data: &[u8]) -> Result<usize, String> {
    let (mut reader, header) = ExportReader::open(data)?;
    let spec: ArtifactSpec = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    for (platform, blob) in &spec.blobs {
        BlobManifest::from_entries(blob.size, &blob.sha256, blob.chunks.iter().map(|c| (c.digest.as_str(), c.size)))
            .map_err(|e| format!("{platform}: {e}"))?;
    }
    let listed: HashSet<String> = spec.blobs.values().flat_map(|b| b.chunks.iter().map(|c| c.digest.clone())).collect();
    reader.expect_chunks(listed.iter().cloned());
    assert_eq!(reader.remaining(), listed.len(), "chunks to come before the first");
    let mut seen = HashSet::new();
    while let Some((digest, bytes)) = reader.next_chunk()? {
        assert!(bytes.len() <= CHUNK_SIZE, "chunk of {} bytes handed out", bytes.len());
        assert_eq!(sha256(&bytes).hex(), digest, "chunk handed out under another digest");
        assert!(listed.contains(&digest), "chunk {digest} handed out but not listed");
        assert!(seen.insert(digest.clone()), "chunk {digest} handed out twice");
        assert_eq!(reader.remaining(), listed.len() - seen.len(), "chunks still to come");
    }
    assert_eq!(seen, listed, "the reader ended before every listed chunk came");
    Ok(seen.len())
}

/// Builds a valid export file from `data`, damages it as `data` says, and
/// checks that the reader returns exactly the chunks written when the file
/// is intact and refuses it when it is not.
///
/// Layout of `data`: byte 0 picks the number of blobs (1–3, one chunk
/// each); byte 1 the damage (`% 3`: none, truncation, a bit flip) and the
/// bit (`>> 2 & 7`); bytes 2–3 the position (u16 LE, modulo the file's
/// length); the rest is cut into the chunks. Equal chunks are written once,
/// as `yunbian artifact export` does.
pub fn check_export_built(data: &[u8]) {
    let (Some(&blobs_byte), Some(&damage), Some(pos)) = (data.first(), data.get(1), data.get(2..4)) else {
        return;
    };
    let payload = &data[4..];
    let blobs = 1 + usize::from(blobs_byte % 3);
    let piece = payload.len().div_ceil(blobs).max(1);
    let chunks: Vec<&[u8]> = payload.chunks(piece).collect();
    if chunks.iter().any(|c| c.len() > CHUNK_SIZE) {
        return;
    }
    let platforms = ["linux/amd64", "linux/arm64", "wasi/wasm32"];
    let mut spec = ArtifactSpec { name: "fuzz".into(), version: "1".into(), blobs: BTreeMap::new() };
    for (i, platform) in platforms.iter().enumerate().take(blobs) {
        let bytes = chunks.get(i).copied().unwrap_or_default();
        let entries = if bytes.is_empty() {
            Vec::new()
        } else {
            vec![ChunkEntry { digest: sha256(bytes).hex(), size: bytes.len() as u64 }]
        };
        let kind = if *platform == "wasi/wasm32" { BlobType::Wasm } else { BlobType::Executable };
        let blob = ArtifactBlob {
            kind,
            size: bytes.len() as u64,
            sha256: sha256(bytes).hex(),
            chunks: entries,
            signatures: Vec::new(),
        };
        spec.blobs.insert(platform.to_string(), blob);
    }
    let header = serde_json::to_vec(&spec).expect("an ArtifactSpec serializes");
    let mut file = Vec::new();
    write_header(&mut file, &header).expect("writing to a Vec");
    let mut written = HashSet::new();
    for bytes in chunks.iter().take(blobs).filter(|c| !c.is_empty()) {
        let digest = sha256(bytes).hex();
        if written.insert(digest.clone()) {
            write_chunk(&mut file, &digest, bytes).expect("writing to a Vec");
        }
    }
    let at = usize::from(u16::from_le_bytes([pos[0], pos[1]])) % file.len();
    match damage % 3 {
        0 => {
            let read = read_export(&file);
            assert_eq!(read, Ok(written.len()), "an intact export file of {} chunks", written.len());
        }
        1 => {
            let read = read_export(&file[..at]);
            assert!(read.is_err(), "export file cut at {at} of {} accepted: {read:?}", file.len());
        }
        _ => {
            file[at] ^= 1 << ((damage >> 2) & 7);
            let read = read_export(&file);
            assert!(read.is_err(), "export file with a bit flipped at {at} accepted: {read:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_json(size: u64, sha: &str, chunks: &[(&str, u64)]) -> String {
        let chunks: Vec<String> = chunks.iter().map(|(d, s)| format!(r#"{{"digest":"{d}","size":{s}}}"#)).collect();
        format!(r#"{{"type":"executable","size":{size},"sha256":"{sha}","chunks":[{}]}}"#, chunks.join(","))
    }

    #[test]
    fn chunk_lists_accepted_and_refused() {
        let d = sha256(b"x").hex();
        let full = CHUNK_SIZE as u64;
        assert_eq!(check_chunk_manifest(blob_json(0, &d, &[]).as_bytes()), ChunkListVerdict::Accepted(1));
        assert_eq!(
            check_chunk_manifest(blob_json(full + 1, &d, &[(&d, full), (&d, 1)]).as_bytes()),
            ChunkListVerdict::Accepted(1)
        );
        let refused = |json: String| match check_chunk_manifest(json.as_bytes()) {
            ChunkListVerdict::Refused(e) => e.to_string(),
            v => panic!("{json}: {v:?}"),
        };
        assert!(refused(blob_json(1, &d.to_uppercase(), &[(&d, 1)])).starts_with("blob sha256: "));
        assert!(refused(blob_json(1, &d, &[("00", 1)])).starts_with("chunks[0].digest: "));
        assert_eq!(refused(blob_json(0, &d, &[(&d, 0)])), "inconsistent blob manifest: chunk 0 has size 0");
        assert!(refused(blob_json(2, &d, &[(&d, 1), (&d, 1)])).contains("every chunk but the last must have"));
        assert_eq!(
            refused(blob_json(2, &d, &[(&d, 1)])),
            "inconsistent blob manifest: chunks add up to 1 bytes, blob size is 2"
        );
        assert_eq!(check_chunk_manifest(b"[]"), ChunkListVerdict::NotJson);
    }

    #[test]
    fn built_export_files() {
        for blobs in 0..3u8 {
            for damage in [0u8, 1, 2, 6, 30] {
                for pos in [0u16, 5, 70, 200, 65535] {
                    let mut data = vec![blobs, damage];
                    data.extend_from_slice(&pos.to_le_bytes());
                    data.extend_from_slice(b"some chunk bytes, cut in pieces");
                    check_export(&data).expect_err("not an export file");
                }
            }
        }
    }
}
