//! The local device API for apps on the node: plain HTTP/JSON on loopback
//! (the agent listens on `127.0.0.1:7790`) over a [`MapperHost`].
//!
//! Endpoints:
//! - `GET /v1/devices` — every device on this node: a JSON array of
//!   `{name, model, protocol, state}` ([`DeviceSummary`]);
//! - `GET /v1/devices/{name}` — `{name, model, protocol, status}` where
//!   `status` is the local twin ([`DeviceStatus`], always with values);
//! - `GET /v1/devices/{name}/properties/{prop}` — that property's [`Twin`]
//!   (`reported`, `desired`, `observedDesired`, `error`);
//! - `PUT /v1/devices/{name}/properties/{prop}/desired` — body: the JSON
//!   value itself or `{"value": …}`; a local desired write
//!   ([`MapperHost::set_local`]). `200 {"version": n}`. With `?wait=5s`
//!   (at most [`MAX_WAIT`]) the answer comes once the write is observed
//!   (`observedDesired ≥ n`), refused by the device, or the wait is over:
//!   `200 {"version", "outcome": "applied"|"failed"|"superseded"|"pending",
//!   "observedDesired", "error"}`.
//!
//! Errors are JSON `{code, message, details}` ([`ApiErrorBody`], as the
//! cloud's): 404 for an unknown device, property or path, 400 for a value
//! the model refuses (`ReadOnly` property, wrong type, out of range) or a
//! body that is not JSON, 413 past [`MAX_BODY`], 408 for a request that
//! takes longer than [`REQUEST_TIMEOUT`] (plus its `wait`).
//!
//! The HTTP plumbing here (the bounded accept loop, header and request
//! timeouts, body limit, JSON errors) is shared with the external mapper
//! interface in [`crate::external`]. Anything a client sends — random bytes,
//! a truncated request, a huge body — ends in a 4xx or a closed connection
//! and never affects other connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;
use yunbian_api::{ApiErrorBody, DeviceStatus, Twin};

use crate::host::{DeviceSummary, MapperHost, SetError};

/// Where the agent serves the local API by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7790";
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Time allowed for a request (headers and body read, answer computed),
/// on top of the `wait` it asks for.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send a request's headers (slow-loris protection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `wait` a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Connections served at once; beyond this new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How often a waiting `PUT …/desired?wait=` looks at the twin.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address or socket path could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// What was bound (`127.0.0.1:7790`, `/var/lib/yunbian/mapper.sock`).
        addr: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The socket file's mode could not be set.
    #[error("set the mode of {path}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// An HTTP error with a JSON body `{code, message, details}`.
#[derive(Debug, Clone)]
pub(crate) struct HttpError {
    pub(crate) code: StatusCode,
    pub(crate) message: String,
    pub(crate) details: Vec<String>,
}

impl HttpError {
    pub(crate) fn new(code: StatusCode, message: impl Into<String>) -> Self {
        HttpError { code, message: message.into(), details: Vec::new() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ApiErrorBody { code: self.code.as_u16(), message: self.message, details: self.details };
        (self.code, Json(body)).into_response()
    }
}

impl From<BytesRejection> for HttpError {
    fn from(r: BytesRejection) -> Self {
        let code = r.status();
        let message = if code == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body exceeds {MAX_BODY} bytes")
        } else {
            format!("cannot read the request body: {r}")
        };
        HttpError::new(code, message)
    }
}

pub(crate) type HttpResult<T> = Result<T, HttpError>;

/// Parses a request body as JSON into `T`, naming the field that is wrong.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> HttpResult<T> {
    if body.is_empty() {
        return Err(HttpError::bad_request("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::bad_request(format!("body is not valid JSON for this request: {e}")))
}

/// The `wait` query parameter as a duration, at most [`MAX_WAIT`]; none
/// when absent. An unparsable value is an error.
pub(crate) fn wait_param(query: &HashMap<String, String>, max: Duration) -> HttpResult<Option<Duration>> {
    let Some(w) = query.get("wait") else { return Ok(None) };
    let ms = yunbian_api::time::parse_duration_ms(w)
        .map_err(|e| HttpError::bad_request(format!("wait={w:?} is not a duration (`5s`, `500ms`): {e}")))?;
    Ok(Some(Duration::from_millis(ms).min(max)))
}

/// Bounds every request to [`REQUEST_TIMEOUT`] plus the `wait` it asks
/// for, and refuses a declared body past [`MAX_BODY`] before reading any of it.
pub(crate) async fn bound_request(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY} bytes"))
            .into_response();
    }
    let wait = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("wait=")))
        .and_then(|w| yunbian_api::time::parse_duration_ms(w).ok())
        .map_or(Duration::ZERO, |ms| Duration::from_millis(ms).min(MAX_WAIT));
    match tokio::time::timeout(REQUEST_TIMEOUT + wait, next.run(req)).await {
        Ok(r) => r,
        Err(_) => HttpError::new(StatusCode::REQUEST_TIMEOUT, "the request took too long").into_response(),
    }
}

/// Adds the common layers: body limit, request timeout, JSON 404/405.
pub(crate) fn finish_router(router: Router) -> Router {
    router
        .fallback(|| async { HttpError::not_found("no such API path") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(bound_request))
}

/// Serves one HTTP/1.1 connection with `app` until the peer closes it or
/// breaks the protocol.
pub(crate) async fn serve_connection<I>(io: I, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| app.clone().oneshot(req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(MAX_BODY.max(8192) * 2)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "local http connection ended");
    }
}

/// Accepts connections from `accept` and serves each on its own task, at
/// most [`MAX_CONNECTIONS`] at once.
pub(crate) async fn accept_loop<I, F, Fut>(mut accept: F, app: Router, what: &'static str)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<I>>,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let io = match accept().await {
            Ok(io) => io,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(server = what, error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(server = what, limit = MAX_CONNECTIONS, "too many connections; closing a new one");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(io, app).await;
        });
    }
}

// ---------------------------------------------------------------- the routes

/// One device as `GET /v1/devices/{name}` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    /// Name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Protocol name.
    pub protocol: String,
    /// The local twin.
    pub status: DeviceStatus,
}

/// The outcome of `PUT …/desired`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredAnswer {
    /// Version of the desired value.
    pub version: u64,
    /// With `wait`: `applied`, `failed`, `superseded` or `pending`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// With `wait`: the property's `observedDesired`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<u64>,
    /// With `wait`: the property's last error, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The router of the local device API.
pub fn router(host: MapperHost) -> Router {
    finish_router(routes(host))
}

fn routes(host: MapperHost) -> Router {
    Router::new()
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{name}", get(get_device))
        .route("/v1/devices/{name}/properties/{prop}", get(get_property))
        .route("/v1/devices/{name}/properties/{prop}/desired", put(put_desired))
        .with_state(host)
}

/// Serves the local API on `addr` (the agent uses [`DEFAULT_ADDR`]) until
/// the task is dropped.
pub async fn serve_tcp(host: MapperHost, addr: SocketAddr) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
    serve_tcp_listener(host, listener).await;
    Ok(())
}

/// Serves the local API on a bound listener until the task is dropped.
pub async fn serve_tcp_listener(host: MapperHost, listener: tokio::net::TcpListener) {
    serve_tcp_listener_with(host, listener, Router::new()).await
}

/// Like [`serve_tcp_listener`], with more routes of the agent's (the edge
/// time-series queries) under the same limits.
pub async fn serve_tcp_listener_with(host: MapperHost, listener: tokio::net::TcpListener, extra: Router) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "local device API listening");
    }
    let app = finish_router(routes(host).merge(extra));
    let listener = Arc::new(listener);
    accept_loop(
        move || {
            let l = listener.clone();
            async move {
                let (tcp, _) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
        },
        app,
        "local-api",
    )
    .await
}

fn no_device(name: &str) -> HttpError {
    HttpError::not_found(format!("device {name:?} is not attached to this node"))
}

async fn list_devices(State(host): State<MapperHost>) -> Json<Vec<DeviceSummary>> {
    Json(host.list())
}

async fn get_device(State(host): State<MapperHost>, Path(name): Path<String>) -> HttpResult<Json<DeviceView>> {
    let cfg = host.config(&name).ok_or_else(|| no_device(&name))?;
    let status = host.twin(&name).ok_or_else(|| no_device(&name))?;
    Ok(Json(DeviceView {
        name: name.clone(),
        model: cfg.device.spec.model.clone(),
        protocol: cfg.device.spec.protocol.name().to_string(),
        status,
    }))
}

fn property_twin(host: &MapperHost, name: &str, prop: &str) -> HttpResult<Twin> {
    let status = host.twin(name).ok_or_else(|| no_device(name))?;
    status
        .twins
        .get(prop)
        .cloned()
        .ok_or_else(|| HttpError::not_found(format!("device {name:?} has no property {prop:?}")))
}

async fn get_property(
    State(host): State<MapperHost>,
    Path((name, prop)): Path<(String, String)>,
) -> HttpResult<Json<Twin>> {
    property_twin(&host, &name, &prop).map(Json)
}

async fn put_desired(
    State(host): State<MapperHost>,
    Path((name, prop)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Json<DesiredAnswer>> {
    let body = body?;
    let wait = wait_param(&query, MAX_WAIT)?;
    let value = match parse_json::<serde_json::Value>(&body)? {
        serde_json::Value::Object(mut m) if m.contains_key("value") => m.remove("value").unwrap_or_default(),
        v => v,
    };
    let version = match host.set_local(&name, &prop, value) {
        Ok(v) => v,
        Err(SetError::NoDevice(_)) => return Err(no_device(&name)),
        Err(SetError::Invalid(e)) => return Err(HttpError::bad_request(e)),
    };
    tracing::info!(device = %name, property = %prop, version, "local desired value set");
    let Some(wait) = wait else {
        return Ok(Json(DesiredAnswer { version, outcome: None, observed_desired: None, error: None }));
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let twin = property_twin(&host, &name, &prop)?;
        let error = (!twin.error.is_empty()).then(|| twin.error.clone());
        let outcome = if twin.observed_desired >= version {
            Some("applied")
        } else if twin.desired.as_ref().is_some_and(|d| d.version > version) {
            Some("superseded")
        } else if twin.error.starts_with("write refused") {
            Some("failed")
        } else if tokio::time::Instant::now() >= deadline {
            Some("pending")
        } else {
            None
        };
        if let Some(outcome) = outcome {
            return Ok(Json(DesiredAnswer {
                version,
                outcome: Some(outcome),
                observed_desired: Some(twin.observed_desired),
                error,
            }));
        }
        tokio::time::sleep(WAIT_POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
    }
}
