//! The CLI's HTTPS client against a small in-process HTTPS server (hyper over
//! tokio-rustls, certificates from rcgen): it trusts only the configured
//! CA, sends the admin bearer token, maps `{code, message, details}` error
//! bodies to their message, and decodes streamed watch events and logs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use yunbian_api::{Kind, WatchEventType};
use yunbian_cli::{Client, ClientCommand, ClientConfig, ClientError, ListOptions};

const TOKEN: &str = "yb-admin-test-token";

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
struct Pki {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, name);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "cloud");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    Pki { ca_pem: ca.pem(), server_cert: cert.der().clone(), server_key: PrivatePkcs8KeyDer::from(key.serialize_der()) }
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

struct TestServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestServer {
    async fn start(pki: &Pki) -> TestServer {
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![pki.server_cert.clone()], PrivateKeyDer::Pkcs8(pki.server_key.clone_key()))
            .expect("server TLS config");
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        TestServer { addr, seen }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn config(&self, ca_pem: &str, token: &str) -> ClientConfig {
        ClientConfig { server: self.url(), ca_pem: ca_pem.to_string(), token: token.to_string() }
    }

    fn client(&self, ca_pem: &str) -> Client {
        Client::new(self.config(ca_pem, TOKEN)).expect("client")
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str, details: &[&str]) -> Response<Body> {
    json_response(status, json!({"code": status.as_u16(), "message": message, "details": details}))
}

/// A body sent as several separate chunks.
fn chunked(chunks: &[&'static str]) -> Response<Body> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
    Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
}

fn app(name: &str) -> Value {
    json!({
        "apiVersion": "yunbian.io/v1", "kind": "App",
        "metadata": {"name": name, "resourceVersion": 5, "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"replicas": 2, "runtime": "fake"},
        "status": {"readyReplicas": 2}
    })
}

async fn handle(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    seen.lock().expect("seen lock").push(Seen {
        method: method.clone(),
        uri: uri.clone(),
        authorization: authorization.clone(),
        body: body.clone(),
    });
    if authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return Ok(error(StatusCode::UNAUTHORIZED, "missing or wrong admin token", &[]));
    }
    let r = match (&method, uri.as_str()) {
        (&Method::GET, "/v1/apps") => {
            json_response(StatusCode::OK, json!({"items": [app("b"), app("a")], "resourceVersion": 7}))
        }
        (&Method::GET, "/v1/apps/hello") => error(StatusCode::NOT_FOUND, "app hello not found", &[]),
        (&Method::GET, "/v1/apps/world") => json_response(StatusCode::OK, app("world")),
        (&Method::PUT, "/v1/apps/a") => json_response(StatusCode::CREATED, app("a")),
        (&Method::PUT, "/v1/apps/b") => json_response(StatusCode::OK, app("b")),
        (&Method::PUT, "/v1/apps/bad") => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "spec.replicas: must be >= 0",
            &["spec.replicas: must be >= 0", "spec.process: is required when runtime is process"],
        ),
        (&Method::POST, "/v1/tokens") => json_response(
            StatusCode::CREATED,
            json!({"token": "YB1.abc.tok1.secret", "object": {"metadata": {"name": "tok1"}}}),
        ),
        (&Method::GET, "/v1/apps?watch=true&resourceVersion=7") => chunked(&[
            "{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\"c\",\"resourceVersion\":8}}}\n{\"type\":\"MOD",
            "IFIED\",\"object\":{\"metadata\":{\"name\":\"a\",\"resourceVersion\":9}}}\n\n",
            "{\"type\":\"DELETED\",\"object\":{\"metadata\":{\"name\":\"b\",\"resourceVersion\":10}}}",
        ]),
        (&Method::GET, "/v1/apps?watch=true&resourceVersion=1") => {
            error(StatusCode::GONE, "resourceVersion 1 was compacted: list again", &[])
        }
        (&Method::GET, "/v1/instances/hello-x/log?tail=2&follow=true") => {
            chunked(&["[hello-x] line 1\n", "[hello-x] line 2\n"])
        }
        _ => error(StatusCode::NOT_FOUND, "no such route", &[]),
    };
    Ok(r)
}

#[tokio::test]
async fn trusts_the_configured_ca_and_sends_the_token() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);
    let items = client.list(Kind::App).await.expect("list");
    assert_eq!(items.len(), 2);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(seen[0].uri, "/v1/apps");
    assert_eq!(seen[0].authorization.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let ours = pki("cluster CA");
    let theirs = pki("impostor CA");
    let server = TestServer::start(&theirs).await;
    let e = server.client(&ours.ca_pem).list(Kind::App).await.expect_err("must not trust");
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("cannot reach cloud at {}: ", server.url())), "{msg}");
    assert!(msg.contains("certificate"), "{msg}");
    assert!(server.seen().is_empty(), "the token must not be sent to an untrusted server");
}

#[tokio::test]
async fn a_refused_connection_names_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let pki = pki("cluster CA");
    let config = ClientConfig { server: format!("https://127.0.0.1:{port}"), ca_pem: pki.ca_pem, token: TOKEN.into() };
    let e = Client::new(config).expect("client").list(Kind::App).await.expect_err("refused");
    assert!(e.to_string().starts_with(&format!("cannot reach cloud at https://127.0.0.1:{port}: ")), "{e}");
}

#[tokio::test]
async fn error_bodies_become_their_message() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);

    let e = client.get_object(Kind::App, "hello").await.expect_err("404");
    assert_eq!(e.to_string(), "app hello not found");
    assert_eq!(e.status(), Some(404));

    let e = client.apply(&app("bad")).await.expect_err("422");
    assert_eq!(e.to_string(), "spec.replicas: must be >= 0; spec.process: is required when runtime is process");

    let wrong = Client::new(server.config(&pki.ca_pem, "yb-admin-wrong")).expect("client");
    let e = wrong.list(Kind::App).await.expect_err("401");
    assert_eq!((e.status(), e.to_string().as_str()), (Some(401), "missing or wrong admin token"));
}

#[tokio::test]
async fn typed_helpers() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);

    let world = client.get_object(Kind::App, "world").await.expect("get");
    assert_eq!(world["metadata"]["name"], "world");
    assert!(client.apply(&app("a")).await.expect("apply a"), "201 means created");
    assert!(!client.apply(&app("b")).await.expect("apply b"), "200 means configured");
    let put = server.seen().into_iter().find(|s| s.uri == "/v1/apps/a").expect("PUT seen");
    assert_eq!(put.method, Method::PUT);
    let sent: Value = serde_json::from_slice(&put.body).expect("JSON body");
    assert_eq!(sent["spec"]["replicas"], 2);

    let token = client.create_token(3600, "site a").await.expect("token");
    assert_eq!(token, "YB1.abc.tok1.secret");
    let post = server.seen().into_iter().find(|s| s.uri == "/v1/tokens").expect("POST seen");
    let sent: Value = serde_json::from_slice(&post.body).expect("JSON body");
    assert_eq!(sent, json!({"ttlSeconds": 3600, "description": "site a"}));

    let list = client.list_with(Kind::App, &ListOptions::default()).await.expect("list");
    assert_eq!(list.resource_version, 7);
}

#[tokio::test]
async fn watch_events_split_across_chunks() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);
    let mut stream = client.watch(Kind::App, &ListOptions::default(), Some(7)).await.expect("watch");
    let mut got = Vec::new();
    while let Some(ev) = stream.next_event().await {
        let ev = ev.expect("event");
        got.push((ev.kind, ev.object["metadata"]["name"].as_str().unwrap_or_default().to_string()));
    }
    assert_eq!(
        got,
        [
            (WatchEventType::Added, "c".to_string()),
            (WatchEventType::Modified, "a".to_string()),
            (WatchEventType::Deleted, "b".to_string()),
        ]
    );
    let e = client.watch(Kind::App, &ListOptions::default(), Some(1)).await.expect_err("410");
    assert_eq!(e.status(), Some(410));
}

#[tokio::test]
async fn logs_arrive_as_chunks() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);
    let mut stream = client.logs(Kind::AppInstance, "hello-x", Some(2), true, None).await.expect("logs");
    let mut text = Vec::new();
    while let Some(chunk) = stream.next_chunk().await {
        text.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(String::from_utf8_lossy(&text), "[hello-x] line 1\n[hello-x] line 2\n");
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ClientCommand,
}

fn command(args: &[&str]) -> ClientCommand {
    Cli::try_parse_from(std::iter::once("yunbian").chain(args.iter().copied())).expect("valid command").cmd
}

fn write_admin_yaml(server: &TestServer, pki: &Pki) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("yunbian-cli-test-{}-{}", std::process::id(), server.addr.port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("admin.yaml");
    let config = server.config(&pki.ca_pem, TOKEN);
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write admin.yaml");
    path
}

#[tokio::test]
async fn run_uses_admin_yaml_and_reports_server_messages() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let path = write_admin_yaml(&server, &pki);
    let loaded = ClientConfig::load(Some(&path)).expect("load admin.yaml");
    assert_eq!(loaded, server.config(&pki.ca_pem, TOKEN));

    yunbian_cli::run(Some(path.clone()), command(&["get", "apps"])).await.expect("get apps");
    let e = yunbian_cli::run(Some(path.clone()), command(&["get", "app", "hello"])).await.expect_err("missing");
    assert_eq!(format!("{e:#}"), "app hello not found");
    let e = yunbian_cli::run(Some(path.clone()), command(&["delete", "app", "nope"])).await.expect_err("no route");
    assert_eq!(format!("{e:#}"), "no such route");

    let missing = path.with_file_name("absent.yaml");
    let e = yunbian_cli::run(Some(missing), command(&["get", "apps"])).await.expect_err("no config");
    assert!(format!("{e:#}").starts_with("cannot read client config "), "{e:#}");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}
