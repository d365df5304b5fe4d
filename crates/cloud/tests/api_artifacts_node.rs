//! Nodes read artifacts with their client certificate, over real HTTPS on
//! loopback: `GET /v1/artifacts/{name}` and `GET /v1/chunks/{sha256}` take
//! a node's current, pinned certificate; every other route (listing,
//! writing, other kinds, `HEAD`/`PUT` of chunks) stays admin-only; a
//! certificate replaced by a renewal, or of a removed node, reads nothing.

use std::path::PathBuf;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use yunbian_api::BlobType;
use yunbian_cli::artifact::{push, PushArgs};
use yunbian_cli::{Client, ClientConfig};
use yunbian_cloud::CloudOptions;
use yunbian_pki::NodeKey;

struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("yunbian-cloud-artnode-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node's mTLS configuration (or none: no client certificate).
struct NodeTls {
    tls: Arc<rustls::ClientConfig>,
}

/// Joins `name` with a fresh token; returns its TLS, CA and key.
async fn join(admin: &Client, name: &str) -> (NodeTls, String) {
    let token = admin.create_token(0, "").await.expect("token");
    let key = NodeKey::generate().expect("key");
    let v = admin
        .post("/v1/join", &json!({ "token": token, "name": name, "csr": key.csr(name).expect("csr") }))
        .await
        .expect("join");
    let (cert, ca) = (v["certificate"].as_str().expect("cert"), v["ca"].as_str().expect("ca"));
    let tls = yunbian_pki::client_config(ca, Some((cert, &key.pem()))).expect("tls");
    (NodeTls { tls }, ca.to_string())
}

async fn send(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let hostport = url.strip_prefix("https://").expect("https").trim_end_matches('/').to_string();
    let (host, _) = hostport.rsplit_once(':').expect("port");
    let tcp = tokio::net::TcpStream::connect(&hostport).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("server name");
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &hostport)
        .body(axum::body::Body::from(body))
        .expect("request");
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status();
    let body = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), usize::MAX).await.expect("body");
    (status, body.to_vec())
}

fn message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).map(|v| v["message"].to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_read_artifacts_and_chunks_and_nothing_else() {
    let dir = TestDir::new("read");
    let cloud = yunbian_cloud::start(CloudOptions::new(dir.0.join("cloud"), "127.0.0.1:0")).await.expect("cloud");
    let admin = Client::new(ClientConfig::load(Some(&cloud.admin_config)).expect("config")).expect("client");
    let file = dir.0.join("tool");
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).expect("write");
    let r = push(
        &admin,
        &PushArgs {
            path: file,
            name: "tool".into(),
            version: "1.0".into(),
            platform: Some("linux/amd64".into()),
            kind: Some(BlobType::Bundle),
        },
    )
    .await
    .expect("push");
    let chunk = format!("/v1/chunks/{}", r.sha256);

    let (node, ca) = join(&admin, "edge-1").await;
    let url = cloud.url.clone();
    let get = |tls: Arc<rustls::ClientConfig>, method: Method, path: String| {
        let url = url.clone();
        async move { send(&url, tls, method, &path, Vec::new()).await }
    };

    let (code, body) = get(node.tls.clone(), Method::GET, "/v1/artifacts/tool--1-0".into()).await;
    assert_eq!(code, StatusCode::OK, "{}", message(&body));
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["spec"]["blobs"]["linux/amd64"]["sha256"], r.sha256.as_str());
    let (code, body) = get(node.tls.clone(), Method::GET, chunk.clone()).await;
    assert_eq!((code, body), (StatusCode::OK, bytes.clone()), "the blob is one chunk");

    // Read-only, artifacts only.
    for (method, path) in [
        (Method::GET, "/v1/nodes/edge-1".to_string()),
        (Method::GET, "/v1/apps/x".to_string()),
        (Method::GET, "/v1/artifacts".to_string()),
        (Method::HEAD, chunk.clone()),
        (Method::PUT, chunk.clone()),
        (Method::DELETE, "/v1/artifacts/tool--1-0".to_string()),
        (Method::PUT, "/v1/artifacts/tool--1-0".to_string()),
        (Method::POST, "/v1/chunks/gc".to_string()),
    ] {
        let (code, _) = get(node.tls.clone(), method.clone(), path.clone()).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{method} {path}");
    }
    assert!(admin.get_object(yunbian_api::Kind::Artifact, "tool--1-0").await.is_ok(), "still there");

    // Without any credential: 401.
    let anonymous = yunbian_pki::client_config(&ca, None).expect("tls");
    let (code, _) = get(anonymous, Method::GET, chunk.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // Missing things are 404 for a node too.
    let (code, _) = get(node.tls.clone(), Method::GET, "/v1/artifacts/nothing--1-0".into()).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // A renewal pins a new certificate: the old one reads nothing more.
    let renew = |tls: Arc<rustls::ClientConfig>| {
        let url = cloud.url.clone();
        let ca = ca.clone();
        async move {
            let key = NodeKey::generate().expect("key");
            let csr = serde_json::to_vec(&json!({ "csr": key.csr("edge-1").expect("csr") })).expect("json");
            let (code, body) = send(&url, tls, Method::POST, "/v1/renew", csr).await;
            (code == StatusCode::OK).then(|| {
                let renewed: Value = serde_json::from_slice(&body).expect("json");
                yunbian_pki::client_config(&ca, Some((renewed["certificate"].as_str().expect("cert"), &key.pem())))
                    .expect("tls")
            })
        }
    };
    let lost = renew(node.tls.clone()).await.expect("renewal");
    let (code, body) = get(node.tls.clone(), Method::GET, chunk.clone()).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(message(&body).contains("no longer valid"), "{}", message(&body));
    // Its answer was lost (a cut link, a killed agent): the old certificate
    // renews again, and the certificate nobody received is done.
    let new_tls = renew(node.tls.clone()).await.expect("a second renewal with the old certificate");
    let (code, _) = get(lost.clone(), Method::GET, chunk.clone()).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "the lost certificate");
    assert!(renew(lost).await.is_none(), "the lost certificate renews nothing");
    // Once the new one is used, the old one renews nothing more.
    let (code, _) = get(new_tls.clone(), Method::GET, chunk.clone()).await;
    assert_eq!(code, StatusCode::OK);
    assert!(renew(node.tls.clone()).await.is_none(), "the old certificate renews after the new one was used");

    // A removed node reads nothing.
    admin.delete_object(yunbian_api::Kind::Node, "edge-1").await.expect("delete node");
    let (code, body) = get(new_tls, Method::GET, chunk.clone()).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(message(&body).contains("was removed"), "{}", message(&body));
}
