//! The CLI's HTTPS client against a small in-process HTTPS server (hyper over
//! tokio-rustls, certificates from rcgen): it trusts only the configured
//! CA, sends the admin bearer token, maps `{code, message, details}` error
//! bodies to their message, and decodes streamed watch events and logs.
//! `device set` runs against a fake device endpoint with optimistic
//! concurrency: conflicting writers, give-up, local checks, `--wait`.

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
use yunbian_cli::{set_desired, Assignment, Client, ClientCommand, ClientConfig, ClientError, ListOptions};

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
    devices: Arc<Mutex<FakeDevices>>,
}

/// One Device and its model, served at `/v1/devices/boiler-1` and
/// `/v1/devicemodels/boiler` with the cloud's optimistic concurrency: a PUT
/// whose `metadata.resourceVersion` is not the current one gets a 409.
struct FakeDevices {
    device: Value,
    model: Value,
    /// How many GETs of the device are followed by another writer's change
    /// (it sets `spec.desired.mode` and bumps the revision).
    interfere: u32,
    /// Status the node reports: applied to the device by the watch stream
    /// after a write (`None`: the stream ends without events).
    reported_after_write: Option<Value>,
    /// Revision counter of the fake store.
    revision: u64,
}

impl FakeDevices {
    fn new() -> FakeDevices {
        FakeDevices {
            device: json!({
                "apiVersion": "yunbian.io/v1", "kind": "Device",
                "metadata": {"name": "boiler-1", "resourceVersion": 10, "generation": 1},
                "spec": {"model": "boiler", "node": "edge-1", "protocol": {"virtual": {}},
                         "properties": [{"name": "temp"}, {"name": "setpoint"}, {"name": "mode"}]},
                "status": {"state": "online"}
            }),
            model: json!({
                "apiVersion": "yunbian.io/v1", "kind": "DeviceModel", "metadata": {"name": "boiler", "resourceVersion": 3},
                "spec": {"properties": [
                    {"name": "temp", "type": "float"},
                    {"name": "setpoint", "type": "float", "accessMode": "ReadWrite", "maximum": 100},
                    {"name": "mode", "type": "string", "accessMode": "ReadWrite"}
                ]}
            }),
            interfere: 0,
            reported_after_write: None,
            revision: 10,
        }
    }

    /// Stores a new spec as the cloud does: next revision, next generation.
    fn store_spec(&mut self, spec: Value) {
        self.revision += 1;
        let generation = self.device["metadata"]["generation"].as_u64().unwrap_or(0) + 1;
        self.device["spec"] = spec;
        self.device["metadata"]["resourceVersion"] = json!(self.revision);
        self.device["metadata"]["generation"] = json!(generation);
    }

    fn handle(&mut self, method: &Method, uri: &str, body: &[u8]) -> Option<Response<Body>> {
        let r = match (method, uri) {
            (&Method::GET, "/v1/devicemodels/boiler") => json_response(StatusCode::OK, self.model.clone()),
            (&Method::GET, "/v1/devices/boiler-1") => {
                let answer = json_response(StatusCode::OK, self.device.clone());
                if self.interfere > 0 {
                    self.interfere -= 1;
                    let mut spec = self.device["spec"].clone();
                    spec["desired"]["mode"] = json!(format!("other-{}", self.revision));
                    self.store_spec(spec);
                }
                answer
            }
            (&Method::PUT, "/v1/devices/boiler-1") => {
                let Ok(sent) = serde_json::from_slice::<Value>(body) else {
                    return Some(error(StatusCode::BAD_REQUEST, "not JSON", &[]));
                };
                let expected = sent["metadata"]["resourceVersion"].as_u64();
                if expected != Some(self.revision) {
                    return Some(error(
                        StatusCode::CONFLICT,
                        &format!(
                            "device boiler-1 was modified: expected revision {expected:?}, current {}",
                            self.revision
                        ),
                        &[],
                    ));
                }
                self.store_spec(sent["spec"].clone());
                json_response(StatusCode::OK, self.device.clone())
            }
            (&Method::GET, u) if u.starts_with("/v1/devices?watch=true") => {
                let Some(status) = self.reported_after_write.take() else {
                    return Some(chunked(&[]));
                };
                // The node's status write is a new revision of the device.
                self.revision += 1;
                self.device["status"] = status;
                self.device["metadata"]["resourceVersion"] = json!(self.revision);
                let dev = self.device.clone();
                let other = json!({"type": "MODIFIED", "object": {"metadata": {"name": "pump-2", "resourceVersion": self.revision}}});
                let line = format!("{other}\n{}\n", json!({"type": "MODIFIED", "object": dev}));
                let leaked: &'static str = Box::leak(line.into_boxed_str());
                chunked(&[leaked])
            }
            (&Method::GET, u) if u.starts_with("/v1/devices") => {
                json_response(StatusCode::OK, json!({"items": [self.device.clone()], "resourceVersion": self.revision}))
            }
            _ => return None,
        };
        Some(r)
    }
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
        let devices = Arc::new(Mutex::new(FakeDevices::new()));
        let seen2 = seen.clone();
        let devices2 = devices.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                let devices = devices2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| handle(req, seen.clone(), devices.clone()));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        TestServer { addr, seen, devices }
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

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    devices: Arc<Mutex<FakeDevices>>,
) -> Result<Response<Body>, Infallible> {
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
    if let Some(r) = devices.lock().expect("devices lock").handle(&method, &uri, &body) {
        return Ok(r);
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

fn device_puts(server: &TestServer) -> Vec<Value> {
    server
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::PUT && s.uri == "/v1/devices/boiler-1")
        .map(|s| serde_json::from_slice(&s.body).expect("JSON body"))
        .collect()
}

#[tokio::test]
async fn device_set_rereads_and_reapplies_after_conflicts() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);
    // Another writer changes the device right after each of our first two reads.
    server.devices.lock().expect("lock").interfere = 2;
    let values = [Assignment::parse("setpoint=42").expect("valid")];
    let written = set_desired(&client, "boiler-1", &values).await.expect("written on the third try");
    assert_eq!(written.attempts, 3);
    // Our value is there, and so is the other writer's (we re-read, not overwrote).
    assert_eq!(written.device["spec"]["desired"], json!({"setpoint": 42, "mode": "other-11"}));
    let puts = device_puts(&server);
    let revisions: Vec<Option<u64>> = puts.iter().map(|p| p["metadata"]["resourceVersion"].as_u64()).collect();
    assert_eq!(revisions, [Some(10), Some(11), Some(12)], "every write carries the revision it read");
    assert!(puts.iter().all(|p| p.get("status").is_none()), "status is not sent");
}

#[tokio::test]
async fn device_set_gives_up_on_a_device_that_keeps_changing() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let client = server.client(&pki.ca_pem);
    server.devices.lock().expect("lock").interfere = 100;
    let values = [Assignment::parse("mode=boost").expect("valid")];
    let e = set_desired(&client, "boiler-1", &values).await.expect_err("never settles");
    assert_eq!(
        format!("{e:#}"),
        format!(
            "device boiler-1 kept changing while it was being written: gave up after {} conflicting writes",
            yunbian_cli::device::SET_ATTEMPTS
        )
    );
    assert_eq!(device_puts(&server).len(), yunbian_cli::device::SET_ATTEMPTS as usize);
}

#[tokio::test]
async fn device_set_sends_nothing_when_a_value_is_invalid() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let path = write_admin_yaml(&server, &pki);
    let e = yunbian_cli::run(Some(path.clone()), command(&["device", "set", "boiler-1", "mode=eco", "setpoint=101"]))
        .await
        .expect_err("above the maximum");
    assert_eq!(
        format!("{e:#}"),
        "device boiler-1: property \"setpoint\": 101 is above the maximum 100 (nothing was written)"
    );
    let e = yunbian_cli::run(Some(path.clone()), command(&["device", "set", "boiler-1", "temp=1"]))
        .await
        .expect_err("read-only");
    assert!(format!("{e:#}").contains("\"temp\" is ReadOnly"), "{e:#}");
    assert!(device_puts(&server).is_empty(), "nothing sent");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[tokio::test]
async fn device_set_waits_for_the_node() {
    let pki = pki("cluster CA");
    let server = TestServer::start(&pki).await;
    let path = write_admin_yaml(&server, &pki);
    // The write makes generation 2; the node reports it applied.
    server.devices.lock().expect("lock").reported_after_write = Some(json!({"state": "online", "twins": {
        "setpoint": {"desired": {"value": 42.0, "version": 2, "source": "cloud"}, "observedDesired": 2}
    }}));
    yunbian_cli::run(Some(path.clone()), command(&["device", "set", "boiler-1", "setpoint=42", "--wait=20s"]))
        .await
        .expect("applied");

    // The node fails the next write.
    server.devices.lock().expect("lock").reported_after_write = Some(json!({"state": "online", "twins": {
        "setpoint": {"desired": {"value": 50, "version": 3, "source": "cloud"}, "observedDesired": 2,
                     "error": "modbus exception 2 (illegal data address)"}
    }}));
    let e = yunbian_cli::run(Some(path.clone()), command(&["device", "set", "boiler-1", "setpoint=50", "--wait"]))
        .await
        .expect_err("write failed");
    assert_eq!(format!("{e:#}"), "setpoint: modbus exception 2 (illegal data address)");

    // The node says nothing: the wait ends with what is pending.
    let e = yunbian_cli::run(Some(path.clone()), command(&["device", "set", "boiler-1", "mode=eco", "--wait=1s"]))
        .await
        .expect_err("timed out");
    assert_eq!(format!("{e:#}"), "device boiler-1: not applied within 1s: mode not received by the node yet");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}
