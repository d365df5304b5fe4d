//! P2P distribution against a real in-process cloud (its tracker and chunk
//! routes) and real agents' peer servers, over mTLS on loopback with the
//! nodes' own certificates:
//!
//! - a node pulls a blob another node holds: every chunk from that peer,
//!   none from the cloud (counted by the cloud); announces follow the
//!   cache (a collected blob is withdrawn);
//! - a peer that flips a byte: detected, reported (the tracker shows it),
//!   the chunk fetched from another peer, the blob intact; with that peer
//!   gone too, from the cloud, and the unreachable peer reported;
//! - the cloud's per-site limit on concurrent pulls answers 429 with
//!   `Retry-After` beyond it, and a `PeerSource` waits and gets the chunk;
//! - the peer server's upload slots answer 503 beyond their number; it
//!   refuses clients of another CA, a client refuses a server whose
//!   certificate names another node, and a peer server never serves a
//!   chunk whose bytes are damaged on its disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use serde_json::Value;
use yunbian_api::BlobType;
use yunbian_artifacts::{sha256, Digest, CHUNK_SIZE};
use yunbian_cli::artifact::{push, PushArgs};
use yunbian_cli::{Client, ClientConfig};
use yunbian_edge::artifacts::{ArtifactCache, ArtifactSource, CacheOptions, CloudSource, SourceError};
use yunbian_edge::p2p::{
    self, Announcer, ChunkOrigin, LocalChunks, PeerFetchError, PeerOffer, PeerServerLimits, PeerSource,
    PeerSourceOptions, RateLimit,
};

struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("yunbian-edge-p2p-{tag}-{}", std::process::id()));
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

/// Bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed;
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

/// A cloud with one pushed bundle `app 1.0` of several chunks.
struct Cluster {
    dir: TestDir,
    cloud: yunbian_cloud::CloudHandle,
    admin: Client,
    blob: Vec<u8>,
    chunks: Vec<Digest>,
}

/// One agent's artifact side: cache, peer source, peer server, announcer.
struct Node {
    name: String,
    dir: PathBuf,
    cloud: Arc<CloudSource>,
    source: Arc<PeerSource>,
    cache: ArtifactCache,
    addr: std::net::SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
    announcer: Option<Announcer>,
}

impl Cluster {
    async fn start(tag: &str, p2p: yunbian_cloud::tracker::TrackerConfig) -> Cluster {
        let dir = TestDir::new(tag);
        let mut opts = yunbian_cloud::CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0");
        opts.p2p = p2p;
        let cloud = yunbian_cloud::start(opts).await.expect("cloud");
        let admin = Client::new(ClientConfig::load(Some(&cloud.admin_config)).expect("config")).expect("client");
        let blob = bundle(&noise(2 * CHUNK_SIZE + CHUNK_SIZE / 2, tag.len() as u64));
        let file = dir.0.join("app.tar.gz");
        std::fs::write(&file, &blob).expect("write");
        let args = PushArgs {
            path: file,
            name: "app".into(),
            version: "1.0".into(),
            platform: Some("linux/amd64".into()),
            kind: Some(BlobType::Bundle),
        };
        let pushed = push(&admin, &args).await.expect("push");
        let chunks: Vec<Digest> = blob.chunks(CHUNK_SIZE).map(sha256).collect();
        assert_eq!(pushed.chunks, chunks.len());
        assert_eq!(chunks.len(), 3);
        Cluster { dir, cloud, admin, blob, chunks }
    }

    /// Joins `name` and starts its peer server with `app` wrapping the
    /// real peer routes (identity for an honest peer).
    async fn node_with(
        &self,
        name: &str,
        limits: PeerServerLimits,
        opts: PeerSourceOptions,
        wrap: impl FnOnce(axum::Router) -> axum::Router,
    ) -> Node {
        let token = self.admin.create_token(0, "").await.expect("token");
        let dir = self.dir.0.join(name);
        let identity =
            yunbian_edge::join(&dir, &self.cloud.url, &token.parse().expect("token"), name, &BTreeMap::new(), false)
                .await
                .expect("join");
        let cloud = Arc::new(CloudSource::from_identity(&identity).expect("cloud source"));
        let source = Arc::new(PeerSource::from_data_dir(cloud.clone(), &dir, opts).expect("peer source"));
        let cache_opts =
            CacheOptions { platform: Some("linux/amd64".into()), retry_delay: Duration::ZERO, ..Default::default() };
        let cache = ArtifactCache::open(&dir, source.clone(), cache_opts).expect("cache");
        let app = wrap(p2p::peer_router(Arc::new(LocalChunks::new(&dir)), &limits));
        let (addr, server) = p2p::serve_peer_router(&dir, "127.0.0.1:0", app).await.expect("peer server");
        Node { name: name.into(), dir, cloud, source, cache, addr, server: Some(server), announcer: None }
    }

    async fn node(&self, name: &str) -> Node {
        self.node_with(name, PeerServerLimits::default(), PeerSourceOptions::default(), |r| r).await
    }

    async fn status(&self) -> Value {
        self.admin.get("/v1/p2p/status").await.expect("tracker status")
    }

    /// Waits until the tracker lists `node` with `chunks` chunks.
    async fn until_announced(&self, node: &str, chunks: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status().await;
            let n = s["nodes"].as_array().into_iter().flatten().find(|n| n["node"] == node);
            if n.is_some_and(|n| n["chunks"] == chunks) {
                return;
            }
            assert!(Instant::now() < deadline, "{node} never announced {chunks} chunks: {s:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Node {
    /// Starts announcing (long period: tests poke) at `site`.
    fn announce(&mut self, site: &str) {
        self.announce_every(site, Duration::from_secs(3600));
    }

    /// Starts announcing at `site` every `period`, as an agent does while it
    /// pulls.
    fn announce_every(&mut self, site: &str, period: Duration) {
        let a = p2p::spawn_announcer(self.cloud.clone(), &self.dir, self.addr.to_string(), site.into(), period);
        self.announcer = Some(a);
    }

    fn stop_serving(&mut self) {
        if let Some(t) = self.server.take() {
            t.abort();
        }
    }

    async fn pull(&self) -> yunbian_edge::artifacts::LocalBlob {
        self.cache.ensure("app", "1.0").await.unwrap_or_else(|e| panic!("{} pulls: {e}", self.name))
    }
}

fn cloud_chunks_served_to(status: &Value, node: &str) -> u64 {
    status["cloud"]["perNode"][node]["chunks"].as_u64().unwrap_or(0)
}

fn peers_of(origins: &[(Digest, ChunkOrigin)]) -> Vec<String> {
    origins
        .iter()
        .map(|(_, o)| match o {
            ChunkOrigin::Peer(p) => p.clone(),
            ChunkOrigin::Cloud => "cloud".into(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_pulls_every_chunk_from_a_peer_and_none_from_the_cloud() {
    let c = Cluster::start("peer", Default::default()).await;
    let mut a = c.node("edge-a").await;
    let mut b = c.node("edge-b").await;

    // A has no peer: everything comes from the cloud.
    let blob_a = a.pull().await;
    assert_eq!(peers_of(&a.source.origins()), ["cloud"; 3]);
    assert_eq!(std::fs::read(&blob_a.path).expect("blob"), c.blob);
    // Its chunk files are gone (assembled): it serves slices of the blob.
    assert_eq!(std::fs::read_dir(a.dir.join("artifacts/chunks")).expect("chunks dir").count(), 0);
    a.announce("plant");
    c.until_announced("edge-a", 3).await;

    let blob_b = b.pull().await;
    assert_eq!(std::fs::read(&blob_b.path).expect("blob"), c.blob, "B's blob is intact");
    assert_eq!(peers_of(&b.source.origins()), ["edge-a"; 3], "every chunk from A");
    let stats = b.source.stats();
    assert_eq!((stats.from_peers, stats.from_cloud, stats.corrupt_from_peers), (3, 0, 0));
    let s = c.status().await;
    assert_eq!(cloud_chunks_served_to(&s, "edge-b"), 0, "the cloud served B no chunk: {s:#}");
    assert_eq!(cloud_chunks_served_to(&s, "edge-a"), 3);
    assert_eq!(s["cloud"]["chunksServed"], 3);
    assert_eq!(s["reports"]["corrupt"], 0);
    // The node routes take a node certificate, not the admin token.
    let e = c.admin.get(&format!("/v1/p2p/peers/{}", c.chunks[0])).await.expect_err("admin refused");
    assert_eq!(e.status(), Some(403), "{e}");

    // B announces what it now holds; once its blob is gone (collected), the
    // next announce (a delta) withdraws it.
    b.announce("plant");
    c.until_announced("edge-b", 3).await;
    std::fs::remove_file(&blob_b.path).expect("collect");
    let announcer = b.announcer.as_ref().expect("announcer");
    let before = announcer.announced();
    announcer.poke();
    c.until_announced("edge-b", 0).await;
    assert!(announcer.announced() > before);
}

/// Flips the first byte of every chunk the peer sends.
async fn flip_first_byte(resp: Response) -> Response {
    if resp.status() != axum::http::StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let mut bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body").to_vec();
    if let Some(b) = bytes.first_mut() {
        *b ^= 0xff;
    }
    Response::from_parts(parts, Body::from(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peer_is_detected_reported_and_the_chunk_fetched_elsewhere() {
    let c = Cluster::start("corrupt", Default::default()).await;
    // A flips a byte of everything it serves; C is honest. B is on A's site,
    // so the tracker offers A first.
    let mut a = c
        .node_with("edge-a", PeerServerLimits::default(), PeerSourceOptions::default(), |r| {
            r.layer(axum::middleware::map_response(flip_first_byte))
        })
        .await;
    let mut cn = c.node("edge-c").await;
    let mut b = c.node("edge-b").await;
    a.pull().await;
    cn.pull().await;
    a.announce("plant");
    cn.announce("depot");
    b.announce("plant");
    c.until_announced("edge-a", 3).await;
    c.until_announced("edge-c", 3).await;
    c.until_announced("edge-b", 0).await;

    let blob = b.pull().await;
    assert_eq!(std::fs::read(&blob.path).expect("blob"), c.blob, "the blob is intact");
    assert_eq!(peers_of(&b.source.origins()), ["edge-c"; 3], "every chunk from the honest peer");
    let stats = b.source.stats();
    assert_eq!(stats.corrupt_from_peers, 3, "{stats:?}");
    assert_eq!(stats.reports_sent, 3);
    assert_eq!(stats.from_cloud, 0);
    let s = c.status().await;
    let node = |n: &str| s["nodes"].as_array().into_iter().flatten().find(|x| x["node"] == n).cloned();
    assert_eq!(node("edge-a").expect("edge-a")["reports"]["corrupt"], 3, "{s:#}");
    assert_eq!(node("edge-c").expect("edge-c")["reports"]["corrupt"], 0);
    let recent = s["reports"]["recent"].as_array().expect("recent reports");
    assert!(recent.iter().all(|r| r["peer"] == "edge-a" && r["reporter"] == "edge-b" && r["problem"] == "corrupt"));
    assert_eq!(cloud_chunks_served_to(&s, "edge-b"), 0);
    // A is no longer offered for those chunks.
    let offers: Value = serde_json::from_slice(
        &b.cloud.call("GET", &format!("/v1/p2p/peers/{}", c.chunks[0]), None).await.expect("peers").1,
    )
    .expect("json");
    let offered: Vec<PeerOffer> = serde_json::from_value(offers["peers"].clone()).expect("offers");
    assert_eq!(offered.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["edge-c"]);

    // With C gone as well, D on the same site gets the chunks from the
    // cloud, and reports C unreachable.
    cn.stop_serving();
    let d = c.node("edge-d").await;
    let blob = d.pull().await;
    assert_eq!(std::fs::read(&blob.path).expect("blob"), c.blob);
    assert_eq!(peers_of(&d.source.origins()), ["cloud"; 3]);
    let s = c.status().await;
    let c_reports = s["nodes"].as_array().into_iter().flatten().find(|x| x["node"] == "edge-c").expect("c")["reports"]
        ["unreachable"]
        .as_u64()
        .expect("count");
    // The first failure excludes C altogether, so it is reported once.
    assert_eq!(c_reports, 1, "{s:#}");
    assert_eq!(cloud_chunks_served_to(&s, "edge-d"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_pulling_together_get_about_one_copy_of_each_chunk_from_the_cloud() {
    // The cloud's defaults: 2 pulls at once per site, one copy per site.
    let c = Cluster::start("ten", Default::default()).await;
    let mut nodes = Vec::new();
    for i in 0..10 {
        let mut n = c.node(&format!("edge-{i}")).await;
        n.announce_every("plant", Duration::from_millis(500));
        nodes.push(n);
    }
    for n in &nodes {
        c.until_announced(&n.name, 0).await;
    }
    let blobs = futures_util::future::join_all(nodes.iter().map(Node::pull)).await;
    for (n, blob) in nodes.iter().zip(&blobs) {
        assert_eq!(std::fs::read(&blob.path).expect("read"), c.blob, "{} holds the artifact intact", n.name);
    }
    // Where every node's chunks came from, as the nodes saw it.
    let mut from_cloud: BTreeMap<Digest, usize> = BTreeMap::new();
    let mut from_peers = 0;
    for n in &nodes {
        for (d, origin) in n.source.origins() {
            match origin {
                ChunkOrigin::Cloud => *from_cloud.entry(d).or_default() += 1,
                ChunkOrigin::Peer(_) => from_peers += 1,
            }
        }
    }
    let s = c.status().await;
    let served = s["cloud"]["chunksServed"].as_u64().expect("chunksServed") as usize;
    assert_eq!(served, from_cloud.values().sum::<usize>(), "the cloud's count and the nodes' agree: {s:#}");
    assert_eq!(served + from_peers, 10 * c.chunks.len(), "every chunk fetched once per node");
    // About once: at most one copy plus one chunk in all (3 in every run
    // seen; one extra allows for a slow announce on a loaded machine),
    // against 30 chunk fetches without P2P.
    assert!(served <= c.chunks.len() + 1, "cloud served {served} chunks for {} : {s:#}", c.chunks.len());
    assert!(s["cloud"]["deferredToPeers"].as_u64().expect("deferred") >= 1, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_limits_concurrent_pulls_per_site_and_edges_wait() {
    // One pull at a time per site, 1 MiB/s: a 4 MiB chunk takes ~3 s.
    let cfg = yunbian_cloud::tracker::TrackerConfig {
        cloud_pulls_per_site: Some(1),
        egress_bytes_per_sec: Some(1 << 20),
        busy_retry_after: Duration::from_secs(1),
        ..Default::default()
    };
    let c = Cluster::start("limits", cfg).await;
    let opts = PeerSourceOptions::default();
    let mut b = c.node_with("edge-b", PeerServerLimits::default(), opts.clone(), |r| r).await;
    let mut e = c.node_with("edge-e", PeerServerLimits::default(), opts, |r| r).await;
    b.announce("plant");
    e.announce("plant");
    c.until_announced("edge-b", 0).await;
    c.until_announced("edge-e", 0).await;

    let first = c.chunks[0];
    let cloud = b.cloud.clone();
    let slow = tokio::spawn(async move { cloud.call("GET", &format!("/v1/chunks/{first}"), None).await });
    // Wait until the tracker counts it running for the site.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status().await["cloud"]["inFlight"]["plant"] != 1 {
        assert!(Instant::now() < deadline, "the first pull never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second pull on the same site is refused with Retry-After.
    let (status, body) = e.cloud.call("GET", &format!("/v1/chunks/{}", c.chunks[1]), None).await.expect("answer");
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let err: yunbian_api::ApiErrorBody = serde_json::from_slice(&body).expect("error body");
    assert_eq!(err.details, ["retryAfter=1"]);
    // A PeerSource (no peer has the chunk) says busy with the cloud's
    // Retry-After, and gets the chunk once the slot is free.
    match e.source.chunk(&c.chunks[1]).await {
        Err(SourceError::Busy(wait)) => assert_eq!(wait, Duration::from_secs(1)),
        other => panic!("expected busy, got {:?}", other.map(|b| b.len())),
    }
    assert!(e.source.stats().cloud_busy >= 1, "{:?}", e.source.stats());
    let (status, body) = slow.await.expect("task").expect("answer");
    assert_eq!((status, sha256(&body)), (200, first));
    let bytes = loop {
        match e.source.chunk(&c.chunks[1]).await {
            Ok(bytes) => break bytes,
            Err(SourceError::Busy(wait)) => tokio::time::sleep(wait).await,
            Err(other) => panic!("chunk after waiting: {other:?}"),
        }
    };
    assert_eq!(sha256(&bytes), c.chunks[1]);
    let s = c.status().await;
    assert!(s["cloud"]["refused"].as_u64().expect("refused") >= 2, "{s:#}");
    // Every slot is given back once the bodies are sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status().await["cloud"]["inFlight"] != serde_json::json!({}) {
        assert!(Instant::now() < deadline, "a slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_server_limits_uploads_and_never_serves_damaged_bytes() {
    let c = Cluster::start("upload", Default::default()).await;
    // One upload at a time at 1 MiB/s.
    let limits = PeerServerLimits { upload_bytes_per_sec: Some(1 << 20), max_uploads: 1 };
    let mut a = c.node_with("edge-a", limits, PeerSourceOptions::default(), |r| r).await;
    a.pull().await;
    let b = c.node("edge-b").await;
    let tls = p2p::peer_client_tls(
        &std::fs::read_to_string(b.dir.join("ca.crt")).expect("ca"),
        &std::fs::read_to_string(b.dir.join("node.crt")).expect("crt"),
        &std::fs::read_to_string(b.dir.join("node.key")).expect("key"),
    )
    .expect("tls");
    let peer = PeerOffer { node: "edge-a".into(), addr: a.addr.to_string(), site: "plant".into() };

    // Two chunks asked at once (each ~3 s to send): the only upload slot
    // goes to one of them, the other is refused with 503. Which one wins
    // is up to the scheduler of a loaded machine.
    let fetch = |d: Digest| {
        let (t, p) = (tls.clone(), peer.clone());
        tokio::spawn(
            async move { p2p::fetch_from_peer(t, &p, &d, &RateLimit::default(), Duration::from_secs(60)).await },
        )
    };
    let (r0, r1) = (fetch(c.chunks[0]), fetch(c.chunks[1]));
    let results = [(c.chunks[0], r0.await.expect("task")), (c.chunks[1], r1.await.expect("task"))];
    let sent: Vec<_> = results.iter().filter_map(|(d, r)| r.as_ref().ok().map(|b| (*d, sha256(b)))).collect();
    let refused: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| match r {
            Err(PeerFetchError::Busy(m)) => Some(m.clone()),
            _ => None,
        })
        .collect();
    let summary: Vec<String> = results
        .iter()
        .map(|(_, r)| r.as_ref().map_or_else(|e| format!("{e:?}"), |b| format!("{} bytes", b.len())))
        .collect();
    assert_eq!(sent.len(), 1, "exactly one sent: {summary:?}");
    assert_eq!(sent[0].0, sent[0].1, "the bytes of the chunk asked for");
    assert_eq!(refused.len(), 1, "the other refused: {summary:?}");
    assert!(refused[0].contains("being sent"), "{}", refused[0]);

    // A peer is refused with a certificate for another name.
    let wrong = PeerOffer { node: "edge-b".into(), ..peer.clone() };
    let e = p2p::fetch_from_peer(tls.clone(), &wrong, &c.chunks[0], &RateLimit::default(), Duration::from_secs(5))
        .await
        .expect_err("name mismatch");
    assert!(matches!(e, PeerFetchError::Failed(ref m) if m.contains("TLS")), "{e:?}");

    // A client certificate of another CA is refused by A's server.
    let other = yunbian_pki::CertAuthority::generate("other-cluster").expect("ca");
    let key = yunbian_pki::NodeKey::generate().expect("key");
    let cert =
        other.sign_node_csr(&key.csr("edge-b").expect("csr"), "edge-b", Duration::from_secs(3600)).expect("sign");
    let stranger = p2p::peer_client_tls(&std::fs::read_to_string(b.dir.join("ca.crt")).expect("ca"), &cert, &key.pem())
        .expect("tls");
    let e = p2p::fetch_from_peer(stranger, &peer, &c.chunks[0], &RateLimit::default(), Duration::from_secs(5))
        .await
        .expect_err("foreign client certificate");
    assert!(matches!(e, PeerFetchError::Failed(_)), "{e:?}");

    // Damage A's blob on disk: A does not serve the damaged chunk (404), and
    // still serves the intact ones.
    let blob = a.dir.join("artifacts/blobs").join(sha256(&c.blob).hex());
    let mut bytes = std::fs::read(&blob).expect("blob");
    bytes[CHUNK_SIZE + 7] ^= 1;
    std::fs::write(&blob, &bytes).expect("damage");
    let r =
        p2p::fetch_from_peer(tls.clone(), &peer, &c.chunks[1], &RateLimit::default(), Duration::from_secs(60)).await;
    assert_eq!(r, Err(PeerFetchError::NotFound));
    let ok = p2p::fetch_from_peer(tls, &peer, &c.chunks[2], &RateLimit::default(), Duration::from_secs(60))
        .await
        .expect("intact chunk");
    assert_eq!(sha256(&ok), c.chunks[2]);
    a.stop_serving();
}
