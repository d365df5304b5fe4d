//! The launcher and the artifact cache together, with a real process
//! runtime: the blob a running instance was launched from is never
//! collected, however small the cache's cap, while other artifacts are
//! pulled; once the instance is removed its blob is collected like any
//! other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use yunbian_api::{
    AppInstance, AppInstanceSpec, Artifact, ArtifactBlob, ArtifactRef, ArtifactSpec, BlobType, ChunkEntry, Object,
    ProcessSpec, RuntimeKind, WorkloadTemplate,
};
use yunbian_artifacts::{BlobManifest, Digest, CHUNK_SIZE};
use yunbian_edge::artifacts::{ArtifactCache, ArtifactSource, CacheOptions, SourceError};
use yunbian_edge::launcher::{Launcher, LauncherOptions};
use yunbian_runtime::{ProcessRuntime, ProcessRuntimeOptions, Runtime};

struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("yunbian-launcher-cache-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create the test dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Artifacts and their chunks in memory.
#[derive(Default)]
struct MemorySource {
    artifacts: Mutex<HashMap<String, Artifact>>,
    chunks: Mutex<HashMap<Digest, Vec<u8>>>,
}

#[async_trait::async_trait]
impl ArtifactSource for MemorySource {
    async fn artifact(&self, object: &str) -> Result<Artifact, SourceError> {
        self.artifacts.lock().expect("lock").get(object).cloned().ok_or(SourceError::NotFound)
    }

    async fn artifact_of_blob(&self, _blob: &Digest) -> Result<Artifact, SourceError> {
        Err(SourceError::NotFound)
    }

    async fn chunk(&self, d: &Digest) -> Result<Vec<u8>, SourceError> {
        self.chunks.lock().expect("lock").get(d).cloned().ok_or(SourceError::NotFound)
    }
}

impl MemorySource {
    /// Publishes `bytes` as the executable `name` 1.0 for linux/amd64.
    fn publish(&self, name: &str, bytes: &[u8]) -> Digest {
        let m = BlobManifest::of_bytes(bytes);
        for (c, data) in m.chunks.iter().zip(bytes.chunks(CHUNK_SIZE)) {
            self.chunks.lock().expect("lock").insert(c.digest, data.to_vec());
        }
        let blob = ArtifactBlob {
            kind: BlobType::Executable,
            size: m.size,
            sha256: m.sha256.hex(),
            chunks: m.chunks.iter().map(|c| ChunkEntry { digest: c.digest.hex(), size: c.size }).collect(),
            signatures: Vec::new(),
        };
        let spec = ArtifactSpec {
            name: name.into(),
            version: "1.0".into(),
            blobs: BTreeMap::from([("linux/amd64".to_string(), blob)]),
        };
        let object = format!("{name}--1-0");
        self.artifacts.lock().expect("lock").insert(object.clone(), Object::new(&object, spec));
        m.sha256
    }
}

/// A program that sleeps, padded to 2000 bytes (each artifact's own text,
/// so each has its own blob).
fn sleeper(name: &str) -> Vec<u8> {
    let mut s = format!("#!/bin/sh\n# {name}\nexec sleep 3600\n");
    while s.len() < 2000 {
        s.push_str("# padding\n");
    }
    s.truncate(2000);
    s.into_bytes()
}

/// An instance running artifact `artifact` 1.0 as its program.
fn instance(name: &str, artifact: &str) -> AppInstance {
    let template = WorkloadTemplate {
        runtime: RuntimeKind::Process,
        artifact: Some(ArtifactRef { name: artifact.into(), version: "1.0".into(), digest: String::new() }),
        process: Some(ProcessSpec::default()),
        ..Default::default()
    };
    AppInstance::new(
        name,
        AppInstanceSpec {
            app: artifact.into(),
            node: "n".into(),
            template,
            template_hash: format!("h-{name}"),
            ..Default::default()
        },
    )
}

/// What the reconciler hands the runtime once the instance's pull is done.
async fn prepared(launcher: &Arc<Launcher>, inst: &AppInstance) -> AppInstance {
    for _ in 0..1000 {
        if let Some(p) = launcher.prepare(inst, false) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never became ready to launch", inst.metadata.name);
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|st| st.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn a_running_instances_blob_outlives_collections_until_the_instance_is_removed() {
    let dir = TempDir::new("in-use");
    let src = Arc::new(MemorySource::default());
    let digest: HashMap<&str, Digest> =
        ["old", "tool", "other", "third"].into_iter().map(|n| (n, src.publish(n, &sleeper(n)))).collect();
    // Room for one blob and a half: every pull is followed by a collection
    // that must remove something.
    let opts = CacheOptions {
        limit: 3000,
        retry_delay: Duration::ZERO,
        platform: Some("linux/amd64".into()),
        ..Default::default()
    };
    let cache = Arc::new(ArtifactCache::open(&dir.0, src.clone(), opts).expect("open the cache"));
    let present = || {
        let mut v: Vec<&str> = ["old", "tool", "other", "third"]
            .into_iter()
            .filter(|n| cache.root().join("blobs").join(digest[n].hex()).exists())
            .collect();
        v.sort_unstable();
        v
    };
    // A blob from before, used by nothing: the oldest in the cache.
    cache.ensure("old", "1.0").await.expect("pull old");
    tokio::time::sleep(Duration::from_millis(20)).await;

    let (tx, _launcher_statuses) = mpsc::unbounded_channel();
    let launcher = Launcher::new(Some(cache.clone()), LauncherOptions::default(), tx);
    let (rtx, _runtime_statuses) = mpsc::unbounded_channel();
    let runtime = ProcessRuntime::with_options(
        dir.0.join("instances"),
        "n".into(),
        rtx,
        ProcessRuntimeOptions { cgroups: false, stop_grace: Duration::from_secs(1), ..Default::default() },
    )
    .expect("start the process runtime");

    // `tool` is pulled (collecting `old`) and runs from its blob.
    let tool = instance("tool-1", "tool");
    let run = prepared(&launcher, &tool).await;
    let blob = cache.root().join("blobs").join(digest["tool"].hex());
    assert_eq!(run.spec.template.process.as_ref().expect("process").command, [blob.display().to_string()]);
    runtime.ensure(&run).await.expect("start tool-1");
    let pid = runtime
        .statuses()
        .await
        .into_iter()
        .find(|s| s.instance == "tool-1")
        .and_then(|s| s.status.pid)
        .expect("tool-1 has a pid");
    assert!(pid_alive(pid));
    assert_eq!(present(), ["tool"], "old, unused, was collected when tool came in");
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Another artifact comes in over the cap: `tool` is now the least
    // recently used blob, but its instance runs, so it stays.
    let other = instance("other-1", "other");
    let other_run = prepared(&launcher, &other).await;
    runtime.ensure(&other_run).await.expect("start other-1");
    assert_eq!(present(), ["other", "tool"], "over the cap, yet the running instance's blob stays");
    assert!(cache.collect().await.expect("collect").is_empty(), "nothing of a running instance is collectable");
    assert!(pid_alive(pid), "tool-1 runs on");
    let desired = ["tool-1", "other-1"];
    launcher.retain(&desired.into_iter().collect::<HashSet<_>>());
    assert!(cache.collect().await.expect("collect").is_empty(), "desired instances keep their marks");

    // tool-1 is removed, as the reconciler does when it is no longer
    // desired: the next pull collects its blob, and other-1's stays.
    tokio::time::sleep(Duration::from_millis(20)).await;
    runtime.remove("tool-1").await.expect("remove tool-1");
    launcher.retain(&["other-1"].into_iter().collect::<HashSet<_>>());
    assert!(!pid_alive(pid), "tool-1 was stopped");
    let third = instance("third-1", "third");
    let third_run = prepared(&launcher, &third).await;
    assert_eq!(present(), ["other", "third"], "tool's blob went once its instance was gone");
    runtime.ensure(&third_run).await.expect("start third-1");

    for i in ["other-1", "third-1"] {
        runtime.remove(i).await.expect("remove");
    }
}
