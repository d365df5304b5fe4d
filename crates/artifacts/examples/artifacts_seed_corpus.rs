//! Writes the seed corpora of the `chunk_manifest` and `artifact_export`
//! fuzz targets: `cargo run -p yunbian-artifacts --example
//! artifacts_seed_corpus`.
//!
//! Names tell the replay test (`tests/artifacts_fuzz_corpus.rs`) what to
//! expect: `ok_*` are accepted, `bad_*` refused (chunk lists: by the check,
//! not by JSON decoding), anything else only must not break a property.
//! `built_*` export seeds steer `check_export_built` (header bytes, then
//! chunk bytes), and are not export files themselves.

use std::collections::BTreeMap;
use std::path::Path;

use yunbian_api::{ArtifactBlob, ArtifactSpec, BlobSignature, BlobType, ChunkEntry};
use yunbian_artifacts::export::{write_chunk, write_header};
use yunbian_artifacts::{sha256, BlobManifest, CHUNK_SIZE};

/// The blob entry of `bytes` (real digests, real chunking).
fn blob(kind: BlobType, bytes: &[u8]) -> ArtifactBlob {
    let m = BlobManifest::of_bytes(bytes);
    ArtifactBlob {
        kind,
        size: m.size,
        sha256: m.sha256.hex(),
        chunks: m.chunks.iter().map(|c| ChunkEntry { digest: c.digest.hex(), size: c.size }).collect(),
        signatures: Vec::new(),
    }
}

fn spec(blobs: &[(&str, ArtifactBlob)]) -> ArtifactSpec {
    ArtifactSpec {
        name: "hello".into(),
        version: "1.0.0".into(),
        blobs: blobs.iter().map(|(p, b)| (p.to_string(), b.clone())).collect::<BTreeMap<_, _>>(),
    }
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("serializes")
}

/// An export file: header, then each distinct chunk once, in blob order.
fn export(spec: &ArtifactSpec, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    write_header(&mut out, &serde_json::to_vec(spec).expect("serializes")).expect("write");
    let mut written = std::collections::HashSet::new();
    for c in chunks {
        let d = sha256(c).hex();
        if written.insert(d.clone()) {
            write_chunk(&mut out, &d, c).expect("write");
        }
    }
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };

    // chunk_manifest: Artifact blobs and specs in JSON.
    let cm = |name: &str, bytes: &[u8]| write("chunk_manifest", name, bytes);
    let full = CHUNK_SIZE as u64;
    let one = blob(BlobType::Executable, b"#!/bin/sh\necho hello\n");
    let d = one.chunks[0].digest.clone();
    let two = ArtifactBlob {
        size: full + 7,
        chunks: vec![ChunkEntry { digest: d.clone(), size: full }, ChunkEntry { digest: d.clone(), size: 7 }],
        ..one.clone()
    };
    cm("ok_one_chunk.json", &json(&one));
    cm("ok_two_chunks.json", &json(&two));
    cm("ok_empty_blob.json", &json(&blob(BlobType::Executable, b"")));
    cm(
        "ok_one_full_chunk.json",
        &json(&ArtifactBlob { size: full, chunks: vec![two.chunks[0].clone()], ..one.clone() }),
    );
    let mut signed = blob(BlobType::Wasm, b"\0asm\x0d\0\x01\0");
    signed.signatures = vec![BlobSignature { key_id: "0123456789abcdef".into(), signature: "ab".repeat(64) }];
    let three = spec(&[
        ("linux/amd64", one.clone()),
        ("linux/arm64", blob(BlobType::Bundle, &[0x1f, 0x8b, 8, 0])),
        ("wasi/wasm32", signed),
    ]);
    cm("ok_spec_three_platforms.json", &json(&three));
    cm("bad_blob_sha256_upper_case.json", &json(&ArtifactBlob { sha256: one.sha256.to_uppercase(), ..one.clone() }));
    cm(
        "bad_blob_sha256_prefixed.json",
        &json(&ArtifactBlob { sha256: format!("sha256:{}", one.sha256), ..one.clone() }),
    );
    let mut short_digest = one.clone();
    short_digest.chunks[0].digest.pop();
    cm("bad_chunk_digest_63_digits.json", &json(&short_digest));
    let mut zero = blob(BlobType::Executable, b"");
    zero.chunks = vec![ChunkEntry { digest: d.clone(), size: 0 }];
    cm("bad_chunk_of_zero_bytes.json", &json(&zero));
    let over =
        ArtifactBlob { size: full + 1, chunks: vec![ChunkEntry { digest: d.clone(), size: full + 1 }], ..one.clone() };
    cm("bad_chunk_over_4_mib.json", &json(&over));
    let mut swapped = two.clone();
    swapped.chunks.swap(0, 1);
    cm("bad_short_chunk_before_the_last.json", &json(&swapped));
    cm("bad_size_mismatch.json", &json(&ArtifactBlob { size: one.size + 1, ..one.clone() }));
    cm("bad_size_u64_max.json", &json(&ArtifactBlob { size: u64::MAX, ..one.clone() }));
    cm("bad_chunks_missing.json", &json(&ArtifactBlob { chunks: Vec::new(), ..one.clone() }));
    let mut one_bad = three.clone();
    one_bad.blobs.get_mut("linux/arm64").expect("arm64").size += 1;
    cm("bad_spec_one_blob_inconsistent.json", &json(&one_bad));
    let text = String::from_utf8(json(&one)).expect("utf-8");
    cm("notjson_unknown_field.json", text.replacen("\"size\"", "\"length\"", 1).as_bytes());
    cm("notjson_negative_size.json", text.replacen("\"size\": ", "\"size\": -", 1).as_bytes());

    // artifact_export: export files.
    let ex = |name: &str, bytes: &[u8]| write("artifact_export", name, bytes);
    let (a, b): (&[u8], &[u8]) = (b"#!/bin/sh\necho hello\n", b"\0asm\x0d\0\x01\0");
    let single = spec(&[("linux/amd64", blob(BlobType::Executable, a))]);
    let good = export(&single, &[a]);
    ex("ok_one_blob.ybax", &good);
    let shared = spec(&[
        ("linux/amd64", blob(BlobType::Executable, a)),
        ("linux/arm64", blob(BlobType::Executable, a)),
        ("wasi/wasm32", blob(BlobType::Wasm, b)),
    ]);
    ex("ok_three_platforms_sharing_a_chunk.ybax", &export(&shared, &[a, a, b]));
    ex("ok_empty_blob.ybax", &export(&spec(&[("linux/amd64", blob(BlobType::Executable, b""))]), &[]));
    ex("bad_truncated_in_the_chunk.ybax", &good[..good.len() - 3]);
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x20;
    ex("bad_chunk_bit_flip.ybax", &flipped);
    ex("bad_unlisted_chunk.ybax", &export(&single, &[b]));
    ex("bad_wrong_magic.ybax", &[b"YBAX2\n", &good[6..]].concat());
    let mut huge = good.clone();
    huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
    ex("bad_header_length_4_gib.ybax", &huge);
    // Announces the largest header allowed and ends: refused without
    // allocating what it claims (the first libFuzzer run's slow input).
    ex("bad_truncated_16_mib_header.ybax", &[&good[..6], &(16u32 << 20).to_le_bytes(), b"{}"].concat());
    let mut not_spec = Vec::new();
    write_header(&mut not_spec, br#"{"name":"hello","version":"1.0.0","blobs":{},"extra":1}"#).expect("write");
    ex("bad_header_not_a_spec.ybax", &not_spec);
    let mut inconsistent = single.clone();
    inconsistent.blobs.get_mut("linux/amd64").expect("amd64").size += 1;
    ex("bad_header_chunk_list_inconsistent.ybax", &export(&inconsistent, &[a]));
    // check_export_built: [blobs, damage, position (u16 LE), chunk bytes...]
    ex("built_three_blobs_intact", &[[2u8, 0, 0, 0].as_slice(), b"one two three"].concat());
    ex("built_one_blob_truncated", &[[0u8, 1, 100, 0].as_slice(), b"a chunk"].concat());
    ex("built_two_blobs_bit_flip", &[[1u8, 2 | (5 << 2), 40, 1].as_slice(), b"same,same"].concat());
    println!("wrote seeds under {}", root.display());
}
