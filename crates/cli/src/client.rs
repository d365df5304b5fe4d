//! HTTPS client of the cloud REST API (`docs/api.md`).
//!
//! One TLS connection per request: tokio-rustls with the ring provider,
//! trusting only the cluster CA from [`ClientConfig`], and a hyper HTTP/1.1
//! client connection on top. Every request carries
//! `Authorization: Bearer <admin token>`.
//!
//! Failures come back as [`ClientError`]: transport problems as
//! `cannot reach cloud at <server>: <reason>`, error statuses as the
//! `message` of the server's `{code, message, details}` body, so that
//! `app hello not found` reaches the user verbatim.
//!
//! Streaming endpoints (watch, logs) return a [`ByteStream`] of body chunks
//! as they arrive; [`WatchStream`] splits one into newline-delimited
//! [`WatchEvent`]s.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use yunbian_api::{ApiErrorBody, Kind, WatchEvent};

use crate::config::{ClientConfig, ConfigError};

/// Time allowed for TCP connect plus TLS and HTTP handshakes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a whole non-streaming request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest non-streaming response body read into memory.
const MAX_BODY: usize = 256 << 20;
/// Largest single line accepted from a watch stream.
const MAX_LINE: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// TCP, TLS or HTTP failed before a response arrived (refused, timed
    /// out, certificate not signed by the cluster CA, connection lost).
    #[error("cannot reach cloud at {server}: {reason}")]
    Unreachable {
        /// The configured server URL.
        server: String,
        /// The transport error.
        reason: String,
    },
    /// The server answered with a non-2xx status.
    #[error("{message}")]
    Api {
        /// HTTP status code.
        status: u16,
        /// The human message to show (details joined when several).
        message: String,
        /// The `details` of the error body.
        details: Vec<String>,
    },
    /// The server answered 2xx with something that is not what the API
    /// promises (not JSON, missing fields).
    #[error("unexpected response from {server}: {reason}")]
    Protocol {
        /// The configured server URL.
        server: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The request could not be built from the given input.
    #[error("{0}")]
    Request(String),
}

impl ClientError {
    /// The HTTP status of an [`ClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is a 404 from the server.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Builds the error for a non-2xx answer from its status and body.
    ///
    /// The body should be `{code, message, details}`. When `details` has
    /// several entries and `message` only repeats the first, all of them are
    /// shown, joined by `; `.
    pub fn from_response(status: u16, body: &[u8]) -> ClientError {
        if let Ok(err) = serde_json::from_slice::<ApiErrorBody>(body) {
            let message = if err.details.len() > 1 && err.details.first() == Some(&err.message) {
                err.details.join("; ")
            } else if err.message.trim().is_empty() {
                status_line(status)
            } else {
                err.message.clone()
            };
            return ClientError::Api { status, message, details: err.details };
        }
        let text = String::from_utf8_lossy(body);
        let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        let message = if first.is_empty() {
            status_line(status)
        } else {
            let short: String = first.chars().take(200).collect();
            format!("{}: {short}", status_line(status))
        };
        ClientError::Api { status, message, details: Vec::new() }
    }
}

fn status_line(status: u16) -> String {
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("error");
    format!("server answered {status} {reason}")
}

/// Filters of a list or watch request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// `k=v,k2=v2`: only objects carrying all these labels.
    pub label_selector: Option<String>,
    /// Instances only: those placed on this node.
    pub node: Option<String>,
    /// Instances only: those of this app.
    pub app: Option<String>,
}

impl ListOptions {
    fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = self.label_selector.as_deref().filter(|s| !s.is_empty()) {
            q.push(("labelSelector", s.to_string()));
        }
        if let Some(n) = self.node.as_deref().filter(|s| !s.is_empty()) {
            q.push(("node", n.to_string()));
        }
        if let Some(a) = self.app.as_deref().filter(|s| !s.is_empty()) {
            q.push(("app", a.to_string()));
        }
        q
    }
}

/// The answer of a list request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectList {
    /// The objects, in server order.
    pub items: Vec<Value>,
    /// Store revision the list was taken at; watch from here.
    pub resource_version: u64,
}

/// An HTTPS client of one cloud, authenticated as admin.
#[derive(Clone)]
pub struct Client {
    server: String,
    host: String,
    port: u16,
    host_header: HeaderValue,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    authorization: HeaderValue,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.server).finish_non_exhaustive()
    }
}

/// Aborts the connection task when the request or stream is done.
struct ConnectionGuard(JoinHandle<()>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    /// Builds a client from a configuration. Nothing is sent yet.
    pub fn new(config: ClientConfig) -> Result<Client, ConfigError> {
        config.check()?;
        let addr = config.server_addr()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in config.ca_certificates()? {
            roots.add(cert).map_err(|e| ConfigError::Field { field: "ca", reason: e.to_string() })?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Field { field: "ca", reason: format!("TLS setup: {e}") })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(addr.host.clone())
            .map_err(|e| ConfigError::Field { field: "server", reason: format!("bad host name: {e}") })?;
        let host_header = HeaderValue::from_str(&addr.authority)
            .map_err(|e| ConfigError::Field { field: "server", reason: e.to_string() })?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", config.token.trim()))
            .map_err(|e| ConfigError::Field { field: "token", reason: e.to_string() })?;
        authorization.set_sensitive(true);
        Ok(Client {
            server: config.server.trim().trim_end_matches('/').to_string(),
            host: addr.host,
            port: addr.port,
            host_header,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            authorization,
        })
    }

    /// The configured server URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    // ------------------------------------------------------------ raw requests

    /// `GET path`, JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.request(Method::GET, path, None).await?.1)
    }

    /// `POST path` with a JSON body, JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self.request(Method::POST, path, Some(body)).await?.1)
    }

    /// `PUT path` with a JSON body, JSON answer.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self.request(Method::PUT, path, Some(body)).await?.1)
    }

    /// `DELETE path`, JSON answer (the deleted object's last state).
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.request(Method::DELETE, path, None).await?.1)
    }

    /// Any method with an optional JSON body; answers the 2xx status and
    /// the JSON body (`null` when empty).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let body = match body {
            Some(v) => Some(serde_json::to_vec(v).map_err(|e| ClientError::Request(e.to_string()))?),
            None => None,
        };
        let exchange = async {
            let (response, _conn) = self.send(method, path, body.map(|b| (b, "application/json"))).await?;
            let status = response.status();
            let bytes = self.read_body(response.into_body()).await?;
            if !status.is_success() {
                return Err(ClientError::from_response(status.as_u16(), &bytes));
            }
            let value = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("body is not JSON: {e}")))?
            };
            Ok((status, value))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
    }

    /// Any method with raw bytes (`application/octet-stream`) both ways:
    /// the status, whatever it is, and the body. Only a failure to talk to
    /// the server is an error; the caller judges the status (artifact
    /// chunks: `HEAD` answers 404 for "not there yet").
    pub async fn request_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let is_head = method == Method::HEAD;
        let exchange = async {
            let (response, _conn) = self.send(method, path, body.map(|b| (b, "application/octet-stream"))).await?;
            let status = response.status();
            let bytes = if is_head { Vec::new() } else { self.read_body(response.into_body()).await? };
            Ok((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
    }

    /// `GET path` whose body is consumed as it arrives (watch, logs). A
    /// non-2xx answer is read whole and returned as [`ClientError::Api`].
    pub async fn get_stream(&self, path: &str) -> Result<ByteStream, ClientError> {
        let (response, conn) = self.send(Method::GET, path, None).await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = tokio::time::timeout(REQUEST_TIMEOUT, self.read_body(response.into_body()))
                .await
                .map_err(|_| self.unreachable("error body not received in time"))??;
            return Err(ClientError::from_response(status.as_u16(), &bytes));
        }
        Ok(ByteStream { body: response.into_body(), server: self.server.clone(), _conn: conn })
    }

    // ------------------------------------------------------------ typed helpers

    /// All objects of a kind.
    pub async fn list(&self, kind: Kind) -> Result<Vec<Value>, ClientError> {
        Ok(self.list_with(kind, &ListOptions::default()).await?.items)
    }

    /// Objects of a kind matching `options`, with the list's revision.
    pub async fn list_with(&self, kind: Kind, options: &ListOptions) -> Result<ObjectList, ClientError> {
        let path = with_query(&format!("/v1/{}", kind.plural()), &options.query_pairs());
        let v = self.get(&path).await?;
        let items = match v.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(self.protocol(format!("GET {path}: `items` is not a list"))),
        };
        let resource_version = v.get("resourceVersion").map(revision).unwrap_or(0);
        Ok(ObjectList { items, resource_version })
    }

    /// One object.
    pub async fn get_object(&self, kind: Kind, name: &str) -> Result<Value, ClientError> {
        self.get(&object_path(kind, name)).await
    }

    /// Creates or replaces an object (`PUT /v1/{plural}/{name}`); answers
    /// whether it was created (201) rather than updated (200).
    pub async fn apply(&self, object: &Value) -> Result<bool, ClientError> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::Request("kind: is required".into()))?;
        let kind: Kind = kind.parse().map_err(|e| ClientError::Request(format!("kind: {e}")))?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ClientError::Request("metadata.name: is required".into()))?;
        let (status, _) = self.request(Method::PUT, &object_path(kind, name), Some(object)).await?;
        Ok(status == StatusCode::CREATED)
    }

    /// Replaces an object's intent (`PUT /v1/{plural}/{name}`) and answers
    /// it as stored. A `metadata.resourceVersion` in `object` makes the
    /// write conditional: a 409 answers that the object changed since.
    pub async fn put_object(&self, kind: Kind, name: &str, object: &Value) -> Result<Value, ClientError> {
        self.put(&object_path(kind, name), object).await
    }

    /// Deletes an object; answers its last state.
    pub async fn delete_object(&self, kind: Kind, name: &str) -> Result<Value, ClientError> {
        self.delete(&object_path(kind, name)).await
    }

    /// Watches a kind from `resource_version` (or from the current state,
    /// with ADDED events for every object, when `None`).
    pub async fn watch(
        &self,
        kind: Kind,
        options: &ListOptions,
        resource_version: Option<u64>,
    ) -> Result<WatchStream, ClientError> {
        let mut q = vec![("watch", "true".to_string())];
        if let Some(rv) = resource_version {
            q.push(("resourceVersion", rv.to_string()));
        }
        q.extend(options.query_pairs());
        let path = with_query(&format!("/v1/{}", kind.plural()), &q);
        Ok(WatchStream::new(self.get_stream(&path).await?))
    }

    /// Creates a join token valid for `ttl_seconds` (0 = never expires) and
    /// answers the token string, which the server shows only this once.
    pub async fn create_token(&self, ttl_seconds: u64, description: &str) -> Result<String, ClientError> {
        let mut body = json!({ "ttlSeconds": ttl_seconds });
        if !description.is_empty() {
            body["description"] = Value::String(description.to_string());
        }
        let v = self.post("/v1/tokens", &body).await?;
        v.get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| self.protocol("POST /v1/tokens: no `token` in the answer"))
    }

    /// Revokes a join token; answers the updated Token.
    pub async fn revoke_token(&self, name: &str) -> Result<Value, ClientError> {
        self.post(&format!("{}/revoke", object_path(Kind::Token, name)), &json!({})).await
    }

    /// Streams the output of an App's instances or of one instance.
    /// `kind` must be [`Kind::App`] or [`Kind::AppInstance`]; `node` only
    /// applies to apps.
    pub async fn logs(
        &self,
        kind: Kind,
        name: &str,
        tail: Option<u64>,
        follow: bool,
        node: Option<&str>,
    ) -> Result<ByteStream, ClientError> {
        if !matches!(kind, Kind::App | Kind::AppInstance) {
            return Err(ClientError::Request(format!("logs are kept for apps and instances, not {}s", kind.noun())));
        }
        let mut q = Vec::new();
        if let Some(t) = tail {
            q.push(("tail", t.to_string()));
        }
        if follow {
            q.push(("follow", "true".to_string()));
        }
        if let Some(n) = node.filter(|n| !n.is_empty()) {
            q.push(("node", n.to_string()));
        }
        self.get_stream(&with_query(&format!("{}/log", object_path(kind, name)), &q)).await
    }

    // ------------------------------------------------------------ transport

    fn unreachable(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Unreachable { server: self.server.clone(), reason: reason.into() }
    }

    fn protocol(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Protocol { server: self.server.clone(), reason: reason.into() }
    }

    async fn connect(&self) -> Result<(SendRequest<Full<Bytes>>, ConnectionGuard), ClientError> {
        let tcp =
            TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| self.unreachable(error_chain(&e)))?;
        // Latency matters more than throughput for small API calls.
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            let untrusted = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            let mut reason = error_chain(&e);
            if untrusted {
                reason
                    .push_str(" (the server's certificate does not match the `ca` and `server` of the client config)");
            }
            self.unreachable(reason)
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(error_chain(&e)))?;
        let task = tokio::spawn(async move {
            // Errors surface on the request or body side.
            let _ = conn.await;
        });
        Ok((sender, ConnectionGuard(task)))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<(Response<Incoming>, ConnectionGuard), ClientError> {
        let (mut sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| self.unreachable(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())))??;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host_header.clone())
            .header(header::AUTHORIZATION, self.authorization.clone())
            .header(header::USER_AGENT, concat!("yunbian-cli/", env!("CARGO_PKG_VERSION")))
            .header(header::ACCEPT, "application/json");
        let body = match body {
            Some((bytes, content_type)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Request(format!("bad request {path:?}: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| self.unreachable(error_chain(&e)))?;
        Ok((response, conn))
    }

    async fn read_body(&self, mut body: Incoming) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(format!("reading answer: {}", error_chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > MAX_BODY {
                    return Err(self.protocol(format!("answer larger than {} MiB", MAX_BODY >> 20)));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }
}

/// A response body read chunk by chunk, as the server sends it.
///
/// The connection stays open while this lives and is closed when it is
/// dropped.
pub struct ByteStream {
    body: Incoming,
    server: String,
    _conn: ConnectionGuard,
}

impl std::fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStream").field("server", &self.server).finish_non_exhaustive()
    }
}

impl ByteStream {
    /// The next non-empty chunk; `None` when the server ended the body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        self.next().await
    }
}

impl Stream for ByteStream {
    type Item = Result<Bytes, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let this = &mut *self;
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => {
                    return Poll::Ready(Some(Err(ClientError::Unreachable {
                        server: this.server.clone(),
                        reason: format!("connection lost: {}", error_chain(&e)),
                    })))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
            }
        }
    }
}

/// Splits bytes into `\n`-terminated lines, keeping partial lines until
/// their end arrives.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, without its `\n` (or `\r\n`).
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.buf.drain(..=end).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    /// What remains after the last `\n` (at end of stream).
    pub fn take_rest(&mut self) -> Option<Vec<u8>> {
        if self.buf.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.buf))
        }
    }

    /// Bytes held that do not yet form a line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// A watch response: one [`WatchEvent`] per line.
#[derive(Debug)]
pub struct WatchStream {
    bytes: ByteStream,
    lines: LineBuffer,
    ended: bool,
}

impl WatchStream {
    /// Decodes the lines of a watch response.
    pub fn new(bytes: ByteStream) -> WatchStream {
        WatchStream { bytes, lines: LineBuffer::default(), ended: false }
    }

    /// The next event; `None` when the server closed the stream. An error
    /// object sent in the stream (e.g. a 410) comes back as
    /// [`ClientError::Api`].
    pub async fn next_event(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        loop {
            let line = match self.lines.next_line() {
                Some(line) => line,
                None if self.ended => self.lines.take_rest()?,
                None => {
                    if self.lines.pending() > MAX_LINE {
                        return Some(Err(self.malformed(format!("line longer than {} MiB", MAX_LINE >> 20))));
                    }
                    match self.bytes.next_chunk().await {
                        Some(Ok(chunk)) => self.lines.push(&chunk),
                        Some(Err(e)) => return Some(Err(e)),
                        None => self.ended = true,
                    }
                    continue;
                }
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(decode_event(&line).map_err(|reason| match reason {
                Decoded::Api(e) => e,
                Decoded::Malformed(r) => self.malformed(r),
            }));
        }
    }

    fn malformed(&self, reason: String) -> ClientError {
        ClientError::Protocol { server: self.bytes.server.clone(), reason: format!("bad watch event: {reason}") }
    }
}

enum Decoded {
    Api(ClientError),
    Malformed(String),
}

fn decode_event(line: &[u8]) -> Result<WatchEvent, Decoded> {
    match serde_json::from_slice::<WatchEvent>(line) {
        Ok(ev) => Ok(ev),
        Err(e) => match serde_json::from_slice::<ApiErrorBody>(line) {
            Ok(body) => Err(Decoded::Api(ClientError::from_response(body.code, line))),
            Err(_) => Err(Decoded::Malformed(e.to_string())),
        },
    }
}

/// A revision sent as a number or a decimal string.
fn revision(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// `/v1/{plural}/{name}` with the name percent-encoded.
pub fn object_path(kind: Kind, name: &str) -> String {
    format!("/v1/{}/{}", kind.plural(), encode(name, false))
}

/// `path?k=v&...` with values percent-encoded (keeping `=` and `,`, which
/// selectors use).
pub fn with_query(path: &str, pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return path.to_string();
    }
    let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", encode(v, true))).collect();
    format!("{path}?{}", q.join("&"))
}

fn encode(s: &str, query_value: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (query_value && matches!(b, b'=' | b',' | b'/' | b':'));
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error and its sources as one line, without repeating text that an
/// outer error already included.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_message() {
        let e = ClientError::from_response(404, br#"{"code":404,"message":"app hello not found"}"#);
        assert_eq!(e.to_string(), "app hello not found");
        assert!(e.is_not_found());
        let e = ClientError::from_response(
            422,
            br#"{"code":422,"message":"spec.replicas: must be >= 0","details":["spec.replicas: must be >= 0","metadata.name: is required"]}"#,
        );
        assert_eq!(e.to_string(), "spec.replicas: must be >= 0; metadata.name: is required");
        let e = ClientError::from_response(502, b"<html>\nBad gateway\n</html>");
        assert_eq!(e.to_string(), "server answered 502 Bad Gateway: <html>");
        let e = ClientError::from_response(500, b"");
        assert_eq!(e.to_string(), "server answered 500 Internal Server Error");
    }

    #[test]
    fn lines_split_across_chunks() {
        let mut lb = LineBuffer::default();
        lb.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(lb.next_line().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(lb.next_line(), None);
        lb.push(b":2}\r\n\n{\"c\":3}");
        assert_eq!(lb.next_line().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(lb.next_line().as_deref(), Some(&b""[..]));
        assert_eq!(lb.next_line(), None);
        assert_eq!(lb.take_rest().as_deref(), Some(&b"{\"c\":3}"[..]));
        assert_eq!(lb.take_rest(), None);
    }

    #[test]
    fn event_decoding() {
        let ev = decode_event(br#"{"type":"ADDED","object":{"metadata":{"name":"a"}}}"#).ok().expect("event");
        assert_eq!(ev.kind, yunbian_api::WatchEventType::Added);
        match decode_event(br#"{"code":410,"message":"too old"}"#) {
            Err(Decoded::Api(e)) => assert_eq!(e.status(), Some(410)),
            _ => panic!("410 not recognised"),
        }
        assert!(matches!(decode_event(b"nonsense"), Err(Decoded::Malformed(_))));
    }

    #[test]
    fn paths_and_queries() {
        assert_eq!(object_path(Kind::App, "hello"), "/v1/apps/hello");
        assert_eq!(object_path(Kind::AppInstance, "a b/c"), "/v1/instances/a%20b%2Fc");
        assert_eq!(
            with_query("/v1/apps", &[("watch", "true".into()), ("labelSelector", "site=a,tier=web&x".into())]),
            "/v1/apps?watch=true&labelSelector=site=a,tier=web%26x"
        );
        assert_eq!(with_query("/v1/apps", &[]), "/v1/apps");
        assert_eq!(revision(&json!("42")), 42);
        assert_eq!(revision(&json!(7)), 7);
    }
}
