//! The artifact registry over real HTTPS on loopback: a whole cloud is
//! started in-process and driven with the CLI's client. Chunk uploads are
//! idempotent and checked, an Artifact is refused (422, with field paths)
//! until its chunks are stored with the sizes it claims, a push resumes
//! after an interruption by sending only the missing chunks, signatures
//! verify against the canonical statement, and deleting artifacts
//! collects exactly the chunks no other artifact uses.

use std::path::PathBuf;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use yunbian_api::{signing_statement, BlobType, Kind};
use yunbian_artifacts::{sha256, ChunkReader, CHUNK_SIZE};
use yunbian_cli::artifact::{export, import, push, sign, upload_chunk, ExportArgs, PushArgs, SignArgs};
use yunbian_cli::{Client, ClientConfig};
use yunbian_cloud::CloudOptions;

struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("yunbian-cloud-art-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn cloud(dir: &TestDir, grace: Duration) -> (yunbian_cloud::CloudHandle, Client) {
    let mut opts = CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0");
    opts.artifact_gc_grace = grace;
    let handle = yunbian_cloud::start(opts).await.expect("cloud starts");
    let config = ClientConfig::load(Some(&handle.admin_config)).expect("admin config");
    (handle, Client::new(config).expect("client"))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed as usize) % 251) as u8).collect()
}

async fn raw(client: &Client, method: Method, path: &str, body: Option<Vec<u8>>) -> (StatusCode, Vec<u8>) {
    client.request_bytes(method, path, body).await.expect("request")
}

fn details(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).expect("error body is JSON");
    format!("{} | {}", v["message"], v["details"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_routes_are_idempotent_and_checked() {
    let dir = TestDir::new("chunks");
    let (_cloud, client) = cloud(&dir, Duration::from_secs(3600)).await;
    let data = b"a chunk of an artifact".to_vec();
    let d = sha256(&data).hex();
    let path = format!("/v1/chunks/{d}");
    assert_eq!(raw(&client, Method::HEAD, &path, None).await.0, StatusCode::NOT_FOUND);
    let (code, body) = raw(&client, Method::PUT, &path, Some(b"other bytes".to_vec())).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{}", details(&body));
    assert!(details(&body).contains("digest mismatch"), "{}", details(&body));
    assert_eq!(raw(&client, Method::PUT, &path, Some(data.clone())).await.0, StatusCode::CREATED);
    assert_eq!(raw(&client, Method::PUT, &path, Some(data.clone())).await.0, StatusCode::OK, "idempotent");
    assert_eq!(raw(&client, Method::HEAD, &path, None).await.0, StatusCode::OK);
    let (code, bytes) = raw(&client, Method::GET, &path, None).await;
    assert_eq!((code, bytes), (StatusCode::OK, data));
    assert_eq!(raw(&client, Method::GET, "/v1/chunks/not-a-digest", None).await.0, StatusCode::BAD_REQUEST);
    let big = vec![0u8; CHUNK_SIZE + 1];
    let big_path = format!("/v1/chunks/{}", sha256(&big).hex());
    assert_eq!(raw(&client, Method::PUT, &big_path, Some(big)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let full = vec![1u8; CHUNK_SIZE];
    let full_path = format!("/v1/chunks/{}", sha256(&full).hex());
    assert_eq!(
        raw(&client, Method::PUT, &full_path, Some(full)).await.0,
        StatusCode::CREATED,
        "a full 4 MiB chunk fits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_needs_its_chunks() {
    let dir = TestDir::new("refs");
    let (_cloud, client) = cloud(&dir, Duration::from_secs(3600)).await;
    let data = pattern(1000, 1);
    let d = sha256(&data).hex();
    let artifact = |size: u64| {
        json!({
            "apiVersion": "yunbian.io/v1", "kind": "Artifact", "metadata": {"name": "tool--1-0"},
            "spec": {"name": "tool", "version": "1.0", "blobs": {"linux/amd64": {
                "type": "executable", "size": size, "sha256": d, "chunks": [{"digest": d, "size": size}]}}}
        })
    };
    let e = client.put_object(Kind::Artifact, "tool--1-0", &artifact(1000)).await.expect_err("chunk missing");
    assert_eq!(e.status(), Some(422));
    assert!(
        format!("{e:#}")
            .contains(&format!("spec.blobs[linux/amd64].chunks[0].digest: chunk {d} has not been uploaded")),
        "{e:#}"
    );
    upload_chunk(&client, &d, data).await.expect("upload");
    let e = client.put_object(Kind::Artifact, "tool--1-0", &artifact(999)).await.expect_err("wrong size");
    assert!(
        format!("{e:#}").contains("spec.blobs[linux/amd64].chunks[0].size: is 999 but the stored chunk has 1000 bytes"),
        "{e:#}"
    );
    client.put_object(Kind::Artifact, "tool--1-0", &artifact(1000)).await.expect("stored");
    let listed = client.list(Kind::Artifact).await.expect("list");
    assert_eq!(listed.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_resumes_signs_and_delete_collects() {
    let dir = TestDir::new("push");
    let (cloud, client) = cloud(&dir, Duration::ZERO).await;
    let file = dir.0.join("bundle.tar.gz");
    let bytes = pattern(2 * CHUNK_SIZE + 100, 7);
    std::fs::write(&file, &bytes).expect("write");
    let args = |version: &str| PushArgs {
        path: file.clone(),
        name: "bundle".into(),
        version: version.into(),
        platform: Some("linux/amd64".into()),
        kind: Some(BlobType::Bundle),
    };

    // An interrupted push: only the first chunk made it.
    let mut reader = ChunkReader::open(&file).expect("open");
    let (c0, b0) = reader.next_chunk().expect("read").expect("a chunk");
    upload_chunk(&client, &c0.digest.hex(), b0).await.expect("upload");
    let r = push(&client, &args("1.0")).await.expect("push resumes");
    assert_eq!((r.chunks, r.uploaded, r.size), (3, 2, bytes.len() as u64));
    assert_eq!(r.sha256, sha256(&bytes).hex());
    let again = push(&client, &args("1.0")).await.expect("push again");
    assert_eq!(again.uploaded, 0, "nothing to send twice");

    // A second platform joins the same name and version.
    let wasm = dir.0.join("m.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").expect("write");
    let w =
        push(&client, &PushArgs { path: wasm, platform: None, kind: None, ..args("1.0") }).await.expect("push wasm");
    assert_eq!((w.platform.as_str(), w.kind), ("wasi/wasm32", BlobType::Wasm));
    let obj = client.get_object(Kind::Artifact, "bundle--1-0").await.expect("get");
    let platforms: Vec<&String> = obj["spec"]["blobs"].as_object().expect("blobs").keys().collect();
    assert_eq!(platforms, ["linux/amd64", "wasi/wasm32"]);

    // Signing.
    let key = dir.0.join("publisher.key");
    let k = yunbian_cli::artifact::keygen(&key).expect("keygen");
    let (key_id, signed) =
        sign(&client, &SignArgs { name: "bundle".into(), version: "1.0".into(), key: key.clone(), platform: None })
            .await
            .expect("sign");
    assert_eq!((key_id.as_str(), signed.len()), (k.key_id().as_str(), 2));
    let obj = client.get_object(Kind::Artifact, "bundle--1-0").await.expect("get");
    let blob = &obj["spec"]["blobs"]["linux/amd64"];
    assert_eq!(blob["signatures"][0]["keyId"], json!(k.key_id()));
    let statement = signing_statement("bundle", "1.0", "linux/amd64", BlobType::Bundle, &r.sha256, r.size);
    let sig = blob["signatures"][0]["signature"].as_str().expect("signature");
    yunbian_artifacts::signing::verify_hex(&k.public_key_hex(), statement.as_bytes(), sig).expect("verifies");
    let moved = signing_statement("bundle", "1.0", "linux/arm64", BlobType::Bundle, &r.sha256, r.size);
    assert!(yunbian_artifacts::signing::verify_hex(&k.public_key_hex(), moved.as_bytes(), sig).is_err());
    let retyped = signing_statement("bundle", "1.0", "linux/amd64", BlobType::Executable, &r.sha256, r.size);
    assert!(yunbian_artifacts::signing::verify_hex(&k.public_key_hex(), retyped.as_bytes(), sig).is_err());
    // Pushing the same bytes keeps the signature.
    push(&client, &args("1.0")).await.expect("push again");
    let obj = client.get_object(Kind::Artifact, "bundle--1-0").await.expect("get");
    assert_eq!(obj["spec"]["blobs"]["linux/amd64"]["signatures"].as_array().map(Vec::len), Some(1));

    // Version 2.0 shares the bundle's chunks.
    assert_eq!(push(&client, &args("2.0")).await.expect("push 2.0").uploaded, 0);
    let blob_chunks = || async {
        let root = dir.0.join("cloud/blobs/sha256");
        let mut n = 0;
        for fan in std::fs::read_dir(&root).expect("fan-out").flatten() {
            n += std::fs::read_dir(fan.path()).expect("chunks").count();
        }
        n
    };
    assert_eq!(blob_chunks().await, 4, "3 bundle chunks + 1 wasm chunk");
    client.delete_object(Kind::Artifact, "bundle--1-0").await.expect("delete 1.0");
    wait_for(|| async { blob_chunks().await == 3 }, "the wasm chunk collected, the shared ones kept").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(blob_chunks().await, 3);
    client.delete_object(Kind::Artifact, "bundle--2-0").await.expect("delete 2.0");
    wait_for(|| async { blob_chunks().await == 0 }, "every chunk collected").await;

    // Explicit GC reports what it did.
    let r = client.post("/v1/chunks/gc", &json!({"graceSeconds": 0})).await.expect("gc");
    assert_eq!(r["removed"], json!(0));
    drop(cloud);
}

/// An air-gapped hop: export to a file, lose the artifact and its chunks,
/// import the file back; a damaged file is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_move_an_artifact_as_a_file() {
    let dir = TestDir::new("export");
    let (cloud, client) = cloud(&dir, Duration::ZERO).await;
    let file = dir.0.join("tool.tar.gz");
    let bytes = pattern(CHUNK_SIZE + 4_000, 3);
    std::fs::write(&file, &bytes).expect("write");
    let args = PushArgs {
        path: file.clone(),
        name: "tool".into(),
        version: "2.1".into(),
        platform: Some("linux/arm64".into()),
        kind: Some(BlobType::Bundle),
    };
    push(&client, &args).await.expect("push");
    let before = client.get_object(Kind::Artifact, "tool--2-1").await.expect("get");
    let out = dir.0.join("tool.ybax");
    let ex = ExportArgs { name: "tool".into(), version: "2.1".into(), platform: None, output: out.clone() };
    assert_eq!(export(&client, &ex).await.expect("export"), (2, bytes.len() as u64));

    client.delete_object(Kind::Artifact, "tool--2-1").await.expect("delete");
    let digests: Vec<String> = before["spec"]["blobs"]["linux/arm64"]["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c["digest"].as_str().expect("digest").to_string())
        .collect();
    wait_for(
        || async {
            let _ = client.post("/v1/chunks/gc", &json!({"graceSeconds": 0})).await;
            let mut gone = true;
            for d in &digests {
                gone &= raw(&client, Method::HEAD, &format!("/v1/chunks/{d}"), None).await.0 == StatusCode::NOT_FOUND;
            }
            gone
        },
        "the deleted artifact's chunks collected",
    )
    .await;

    // Damaged copies are refused before anything is applied.
    let good = std::fs::read(&out).expect("read export");
    let damaged = dir.0.join("damaged.ybax");
    let mut flipped = good.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x01;
    std::fs::write(&damaged, &flipped).expect("write");
    let e = import(&client, &damaged).await.expect_err("a flipped chunk byte");
    assert!(format!("{e:#}").contains("does not match its digest"), "{e:#}");
    std::fs::write(&damaged, &good[..good.len() - 100]).expect("write");
    let e = import(&client, &damaged).await.expect_err("truncated");
    assert!(format!("{e:#}").contains("truncated"), "{e:#}");
    assert!(client.get_object(Kind::Artifact, "tool--2-1").await.is_err(), "nothing applied");

    let r = import(&client, &out).await.expect("import");
    assert_eq!((r.chunks, r.platforms.clone()), (2, vec!["linux/arm64".to_string()]));
    let after = client.get_object(Kind::Artifact, "tool--2-1").await.expect("get");
    assert_eq!(after["spec"], before["spec"]);
    // Importing again uploads nothing.
    assert_eq!(import(&client, &out).await.expect("import again").uploaded, 0);
    drop(cloud);
}

async fn wait_for<F, Fut>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}
