//! The edge puller against a real in-process cloud over mTLS: a node that
//! joined pulls a multi-chunk tar.gz bundle with its node certificate,
//! unpacks it, and a node whose certificate is no longer pinned is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use yunbian_api::BlobType;
use yunbian_artifacts::{sha256, CHUNK_SIZE};
use yunbian_cli::artifact::{push, PushArgs};
use yunbian_cli::{Client, ClientConfig};
use yunbian_edge::artifacts::{ArtifactCache, CacheOptions, CloudSource, PullError, PullProgress};

struct TestDir(PathBuf);

impl TestDir {
    fn new() -> TestDir {
        let p = std::env::temp_dir().join(format!("yunbian-edge-artcloud-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test setup");
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes that do not compress: a tar.gz of them spans several chunks.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn bundle(payload: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(payload.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, "bin/payload", payload).expect("append");
    b.into_inner().expect("tar").finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_pulls_a_bundle_over_mtls() {
    let dir = TestDir::new();
    let cloud = yunbian_cloud::start(yunbian_cloud::CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0"))
        .await
        .expect("cloud");
    let admin = Client::new(ClientConfig::load(Some(&cloud.admin_config)).expect("config")).expect("client");
    let payload = noise(CHUNK_SIZE + CHUNK_SIZE / 2);
    let tgz = bundle(&payload);
    assert!(tgz.len() > CHUNK_SIZE, "two chunks at least");
    let file = dir.0.join("app.tar.gz");
    std::fs::write(&file, &tgz).expect("write");
    let pushed = push(
        &admin,
        &PushArgs {
            path: file,
            name: "app".into(),
            version: "2.1".into(),
            platform: Some("linux/amd64".into()),
            kind: Some(BlobType::Bundle),
        },
    )
    .await
    .expect("push");
    assert!(pushed.chunks >= 2);

    let token = admin.create_token(0, "").await.expect("token");
    let node_dir = dir.0.join("edge");
    let identity =
        yunbian_edge::join(&node_dir, &cloud.url, &token.parse().expect("token"), "edge-1", &BTreeMap::new(), false)
            .await
            .expect("join");
    let source = Arc::new(CloudSource::from_identity(&identity).expect("source"));
    let opts = CacheOptions { platform: Some("linux/amd64".into()), retry_delay: Duration::ZERO, ..Default::default() };
    let cache = ArtifactCache::open(&node_dir, source.clone(), opts.clone()).expect("open");
    let progress = PullProgress::default();
    let blob = cache.ensure_with("app", "2.1", &progress).await.expect("pulled over mTLS");
    assert_eq!(progress.percent(), 100);
    assert_eq!(blob.sha256, sha256(&tgz));
    assert_eq!(std::fs::read(&blob.path).expect("blob"), tgz);
    let unpacked = blob.unpacked.expect("unpacked");
    assert_eq!(std::fs::read(unpacked.join("bin/payload")).expect("payload"), payload);

    // Another node's certificate that is no longer pinned (the node was
    // removed) reads nothing, and says why.
    admin.delete_object(yunbian_api::Kind::Node, "edge-1").await.expect("remove node");
    let other = ArtifactCache::open(&dir.0.join("other"), source, opts).expect("open");
    let e = other.ensure("app", "2.1").await.expect_err("refused");
    assert!(matches!(e, PullError::Source { .. }), "{e}");
    assert!(e.to_string().contains("was removed"), "{e}");
}
