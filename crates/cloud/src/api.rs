//! The HTTPS REST API: CRUD and watch for every kind, tokens, join and
//! certificate renewal, the hub upgrade, logs, metrics, and queries of the
//! data edges ship (`/v1/data/{query,series,latest}`, the routes of
//! `yunbian-dataapi`).
//!
//! Authentication happens here, per route: the admin bearer token for the
//! management API, the verified client certificate (put into the request by
//! `server.rs` as [`Peer`]) for nodes, the join token for joining. Every
//! error is `{code, message, details}` JSON (docs/api.md).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use yunbian_api::{ApiErrorBody, AppInstanceSpec, Kind, ManifestError, NodeSpec, Object, Resource, TokenSpec};
use yunbian_pki::CertAuthority;
use yunbian_store::{EventType, Store, StoreError, StoredObject};

use crate::hub::{Hub, HubError};
use crate::metrics::Metrics;
use crate::objects::{self, apply, decode, unix_now, Applied};

/// Largest request body.
pub const MAX_BODY: usize = 4 << 20;

/// Who is on the other end of the TLS connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// Node name from a verified client certificate.
    pub node: Option<String>,
    /// Expiry of that certificate (Unix seconds).
    pub cert_expiry: u64,
    /// SHA-256 of that certificate.
    pub cert_fingerprint: String,
    /// Remote socket address.
    pub address: String,
}

/// Shared state of every handler.
pub struct ApiState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The hub.
    pub hub: Arc<Hub>,
    /// The CA.
    pub ca: CertAuthority,
    /// CA fingerprint (hex SHA-256 of its DER).
    pub ca_fingerprint: String,
    /// SHA-256 of the admin token.
    pub admin_token_hash: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Duration,
    /// Where `/v1/data/…` queries are answered: the cloud data store, or
    /// [`yunbian_dataapi::Unavailable`] (503) when it could not be opened.
    pub data: Arc<dyn yunbian_dataapi::DataQuery>,
    /// The artifact chunk store (`/v1/chunks/…`, artifact checks and GC).
    pub artifacts: Arc<crate::artifacts::ArtifactRegistry>,
    /// The P2P tracker and cloud pull limits (`/v1/p2p/…`, per replica).
    pub tracker: Arc<crate::tracker::Tracker>,
}

type St = State<Arc<ApiState>>;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    message: String,
    details: Vec<String>,
}

impl ApiError {
    pub(crate) fn new(code: StatusCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: Vec::new() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ApiErrorBody { code: self.code.as_u16(), message: self.message, details: self.details };
        (self.code, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Compacted { .. } => StatusCode::GONE,
            StoreError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            StoreError::Fenced(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<ManifestError> for ApiError {
    fn from(e: ManifestError) -> Self {
        let code = match e {
            ManifestError::Syntax(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError { code, message: e.to_string(), details: e.details() }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let code = r.status();
        let message = if code == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body exceeds {MAX_BODY} bytes")
        } else {
            r.body_text()
        };
        ApiError::new(code, message)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    let data = yunbian_dataapi::router(state.data.clone(), "/v1/data")
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin_only));
    Router::new()
        .merge(data)
        .merge(crate::artifacts::routes())
        .merge(crate::latency::routes())
        .merge(crate::rollout_routes::routes())
        .merge(crate::tracker::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/ca", get(ca))
        .route("/v1/join", post(join))
        .route("/v1/renew", post(renew))
        .route("/v1/hub", get(hub))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{name}/revoke", post(revoke_token))
        .route("/v1/instances/{name}/log", get(instance_log))
        .route("/v1/apps/{name}/log", get(app_log))
        .route("/v1/{plural}", get(list).post(create))
        .route("/v1/{plural}/{name}", get(get_one).put(put).delete(delete))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn count_requests(State(s): St, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let resp = next.run(req).await;
    s.metrics.request(&method, resp.status().as_u16());
    resp
}

fn require_admin(s: &ApiState, headers: &HeaderMap, peer: &Peer) -> ApiResult<()> {
    let token = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if yunbian_pki::secure_eq(&yunbian_pki::sha256_hex(t.as_bytes()), &s.admin_token_hash) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token")),
        None if peer.node.is_some() => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "node certificates may not use the management API"))
        }
        None => Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication required: send a bearer token")),
    }
}

/// The admin token check as a layer, for routes built elsewhere (the data
/// queries).
async fn admin_only(State(s): St, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    match require_admin(&s, req.headers(), &peer) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Extractor proving the request carries the admin token.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<ApiState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, s: &Arc<ApiState>) -> ApiResult<Self> {
        let peer = parts.extensions.get::<Peer>().cloned().unwrap_or_default();
        require_admin(s, &parts.headers, &peer).map(|()| Admin)
    }
}

/// Extractor for the read-only artifact routes (`GET /v1/artifacts/{name}`,
/// `GET /v1/chunks/{sha256}`): the admin token, or a node's current client
/// certificate (not expired, and the one pinned on its Node, the hub's
/// check), so edges can pull what they run.
pub enum ArtifactReader {
    /// The admin token.
    Admin,
    /// A node, by name.
    Node(String),
}

impl axum::extract::FromRequestParts<Arc<ApiState>> for ArtifactReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, s: &Arc<ApiState>) -> ApiResult<Self> {
        let peer = parts.extensions.get::<Peer>().cloned().unwrap_or_default();
        let node = match (&peer.node, parts.headers.contains_key("authorization")) {
            (Some(node), false) => node.clone(),
            _ => return require_admin(s, &parts.headers, &peer).map(|()| ArtifactReader::Admin),
        };
        if peer.cert_expiry <= unix_now() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "node certificate expired at {}; renew it (POST /v1/renew)",
                    yunbian_api::time::format_rfc3339(peer.cert_expiry)
                ),
            ));
        }
        check_pinned(s, &node, &peer, Pin::Current).await?;
        Ok(ArtifactReader::Node(node))
    }
}

fn kind_of(plural: &str) -> ApiResult<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| k.plural() == plural)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown resource type {plural:?}")))
}

fn parse_body(body: &[u8]) -> ApiResult<Value> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "body is not UTF-8"))?;
    serde_yaml::from_str(text)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("body is not JSON or YAML: {e}")))
}

async fn metrics(State(s): St, _admin: Admin) -> ApiResult<Response> {
    s.hub.refresh_gauges();
    Ok(([("content-type", "text/plain; version=0.0.4")], s.metrics.render()).into_response())
}

async fn ca(State(s): St) -> Response {
    ([("content-type", "application/x-pem-file")], s.ca.cert_pem().to_string()).into_response()
}

// ------------------------------------------------------------------ CRUD

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    watch: Option<String>,
    resource_version: Option<u64>,
    label_selector: Option<String>,
    node: Option<String>,
    app: Option<String>,
}

struct Filter {
    labels: Vec<(String, String)>,
    node: Option<String>,
    app: Option<String>,
}

impl Filter {
    fn new(q: &ListQuery) -> ApiResult<Self> {
        let mut labels = Vec::new();
        for part in q.label_selector.as_deref().unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("labelSelector: {part:?} is not k=v")))?;
            labels.push((k.to_string(), v.to_string()));
        }
        Ok(Filter { labels, node: q.node.clone(), app: q.app.clone() })
    }

    fn matches(&self, v: &Value) -> bool {
        let label_ok = self.labels.iter().all(|(k, want)| {
            v.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str) == Some(want)
        });
        let field_ok = |f: &Option<String>, ptr: &str| {
            f.as_ref().is_none_or(|want| v.pointer(ptr).and_then(Value::as_str) == Some(want.as_str()))
        };
        label_ok && field_ok(&self.node, "/spec/node") && field_ok(&self.app, "/spec/app")
    }
}

async fn list(
    State(s): St,
    _admin: Admin,
    Path(plural): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    list_kind(s, kind_of(&plural)?, q).await
}

async fn list_tokens(State(s): St, _admin: Admin, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    list_kind(s, Kind::Token, q).await
}

async fn list_kind(s: Arc<ApiState>, kind: Kind, q: ListQuery) -> ApiResult<Response> {
    let filter = Filter::new(&q)?;
    if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") {
        return watch(s, kind, filter, q.resource_version).await;
    }
    let (items, rev) = s.store.list(kind).await?;
    let items: Vec<Value> = items.iter().map(|o| (*o.value).clone()).filter(|v| filter.matches(v)).collect();
    Ok(Json(json!({ "items": items, "resourceVersion": rev })).into_response())
}

fn event_line(kind: EventType, o: &StoredObject) -> Bytes {
    let t = match kind {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    };
    let mut line = serde_json::to_vec(&json!({ "type": t, "object": &*o.value })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn watch(s: Arc<ApiState>, kind: Kind, filter: Filter, from: Option<u64>) -> ApiResult<Response> {
    let mut initial = Vec::new();
    let from = match from {
        Some(rv) => rv,
        None => {
            let (items, rev) = s.store.list(kind).await?;
            for o in items.iter().filter(|o| filter.matches(&o.value)) {
                initial.push(event_line(EventType::Added, o));
            }
            rev
        }
    };
    let w = s.store.watch(Some(kind), from).await?;
    let live = futures_util::stream::unfold((w, filter), |(mut w, filter)| async move {
        loop {
            match w.recv().await {
                Some(Ok(ev)) if filter.matches(&ev.object.value) => {
                    return Some((Ok::<Bytes, std::io::Error>(event_line(ev.event, &ev.object)), (w, filter)));
                }
                Some(Ok(_)) => continue,
                // The watcher fell behind or the store closed: end the stream;
                // the client relists.
                Some(Err(_)) | None => return None,
            }
        }
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(initial.into_iter().map(Ok)), live);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn get_one(
    State(s): St,
    reader: ArtifactReader,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&plural)?;
    if matches!(reader, ArtifactReader::Node(_)) && kind != Kind::Artifact {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "node certificates may not use the management API"));
    }
    Ok(Json((*s.store.get(kind, &name).await?.value).clone()))
}

/// Checks a body against the path and the kind's rules; returns the JSON to store.
fn admit(kind: Kind, name: Option<&str>, body: Value) -> ApiResult<(String, Value)> {
    let resource = Resource::from_value(body)?;
    if resource.kind() != kind {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body is a {} but the path is for {}", resource.kind(), kind.plural()),
        ));
    }
    if let Some(n) = name {
        if resource.name() != n {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("metadata.name {:?} does not match the path ({n:?})", resource.name()),
            ));
        }
    }
    Ok((resource.name().to_string(), resource.to_value()))
}

/// Checks what only other objects reveal: a Device against its model, and a
/// DeviceModel change against the devices that use it.
async fn check_references(store: &Arc<dyn Store>, kind: Kind, v: &Value) -> ApiResult<()> {
    use yunbian_api::{check_device_against_model, Device, DeviceModel, FieldError};
    let errs: Vec<FieldError> = match kind {
        Kind::Device => {
            let d = Device::from_value(v.clone()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            match store.get(Kind::DeviceModel, &d.spec.model).await {
                Ok(m) => {
                    let m = DeviceModel::from_value((*m.value).clone())
                        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                    check_device_against_model(&d.spec, &m.spec)
                }
                Err(yunbian_store::StoreError::NotFound { .. }) => vec![FieldError {
                    path: "spec.model".into(),
                    message: format!("devicemodel {:?} not found (apply the model first)", d.spec.model),
                }],
                Err(e) => return Err(e.into()),
            }
        }
        Kind::DeviceModel => {
            let m = DeviceModel::from_value(v.clone())
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            let (devices, _) = store.list(Kind::Device).await?;
            let mut errs = Vec::new();
            for o in devices {
                let Ok(d) = Device::from_value((*o.value).clone()) else { continue };
                if d.spec.model != m.metadata.name {
                    continue;
                }
                for e in check_device_against_model(&d.spec, &m.spec) {
                    errs.push(FieldError {
                        path: format!("device {}: {}", d.metadata.name, e.path),
                        message: e.message,
                    });
                }
            }
            errs
        }
        Kind::Rule => {
            let r = yunbian_api::Rule::from_value(v.clone())
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            // CEL expressions, with their positions (`spec.steps[0].filter: 1:9: …`).
            yunbian_rules::compile_errors(&r.spec)
                .into_iter()
                .map(|line| match line.split_once(": ") {
                    Some((path, message)) => FieldError { path: path.to_string(), message: message.to_string() },
                    None => FieldError { path: "spec".into(), message: line },
                })
                .collect()
        }
        _ => Vec::new(),
    };
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ManifestError::Invalid(errs).into())
    }
}

async fn create(
    State(s): St,
    _admin: Admin,
    Path(plural): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    refuse_user_writes(kind, true)?;
    let (name, mut v) = admit(kind, None, parse_body(&body?)?)?;
    check_references(&s.store, kind, &v).await?;
    if kind == Kind::Artifact {
        crate::artifacts::check_chunks(&s.artifacts, &v).await?;
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    objects::stamp_new(&mut v);
    let o = s.store.create(kind, &name, v).await?;
    tracing::info!(kind = %kind, name = %name, "created");
    Ok((StatusCode::CREATED, Json((*o.value).clone())).into_response())
}

fn refuse_user_writes(kind: Kind, creating: bool) -> ApiResult<()> {
    let msg = match kind {
        Kind::Token => "tokens are created with POST /v1/tokens (yunbian token create)",
        Kind::AppInstance => "instances are managed by their App; change the App instead",
        Kind::Node if creating => "nodes are created by joining (yunbian edge join)",
        _ => return Ok(()),
    };
    Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg))
}

async fn put(
    State(s): St,
    _admin: Admin,
    Path((plural, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    let exists = s.store.get(kind, &name).await.is_ok();
    refuse_user_writes(kind, !exists)?;
    let (name, v) = admit(kind, Some(&name), parse_body(&body?)?)?;
    check_references(&s.store, kind, &v).await?;
    if kind == Kind::Artifact {
        crate::artifacts::check_chunks(&s.artifacts, &v).await?;
    }
    let (outcome, o) = apply(&s.store, kind, &name, v).await?;
    let code = match outcome {
        Applied::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    if outcome != Applied::Unchanged {
        tracing::info!(kind = %kind, name = %name, outcome = ?outcome, "applied");
    }
    Ok((code, [("x-yunbian-apply", format!("{outcome:?}").to_lowercase())], Json((*o.value).clone())).into_response())
}

async fn delete(State(s): St, _admin: Admin, Path((plural, name)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let kind = kind_of(&plural)?;
    if kind == Kind::DeviceModel {
        let (devices, _) = s.store.list(Kind::Device).await?;
        let users: Vec<&str> = devices
            .iter()
            .filter(|d| d.value.pointer("/spec/model").and_then(|m| m.as_str()) == Some(name.as_str()))
            .map(|d| d.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("devicemodel {name} is used by device(s) {}; delete or change them first", users.join(", ")),
            ));
        }
    }
    let o = s.store.delete(kind, &name, None).await?;
    tracing::info!(kind = %kind, name = %name, "deleted");
    if kind == Kind::Artifact {
        // Collect the chunks only this artifact used (those past the grace
        // period; the periodic sweep gets the rest later).
        let (reg, store) = (s.artifacts.clone(), s.store.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::artifacts::sweep(&reg, &store, reg.gc_grace).await {
                tracing::warn!(error = ?e, "artifact chunk collection failed");
            }
        });
    }
    Ok(Json((*o.value).clone()))
}

// ---------------------------------------------------------------- tokens

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    ttl_seconds: Option<u64>,
    #[serde(default)]
    description: String,
}

async fn create_token(State(s): St, _admin: Admin, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body?;
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("token request: {e}")))?
    };
    let ttl = req.ttl_seconds.unwrap_or(24 * 3600);
    let id = yunbian_pki::random_hex(3);
    let secret = yunbian_pki::random_hex(16);
    let spec = TokenSpec {
        secret_hash: yunbian_pki::sha256_hex(secret.as_bytes()),
        expires: if ttl == 0 { String::new() } else { yunbian_api::time::format_rfc3339(unix_now() + ttl) },
        revoked: false,
        description: req.description,
    };
    let mut v = Object::new(&id, spec).to_value();
    objects::stamp_new(&mut v);
    let o = s.store.create(Kind::Token, &id, v).await?;
    let token = format!("YB1.{}.{id}.{secret}", s.ca_fingerprint);
    tracing::info!(token = %id, "join token created");
    Ok((StatusCode::CREATED, Json(json!({ "token": token, "object": &*o.value }))).into_response())
}

async fn revoke_token(State(s): St, _admin: Admin, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    objects::update_status::<TokenSpec>(&s.store, &name, |t| {
        let changed = !t.spec.revoked;
        t.spec.revoked = true;
        changed
    })
    .await?;
    tracing::info!(token = %name, "join token revoked");
    Ok(Json((*s.store.get(Kind::Token, &name).await?.value).clone()))
}

// ------------------------------------------------------------------- join

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    token: String,
    name: String,
    csr: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

async fn check_token(s: &ApiState, token: &str) -> Result<String, String> {
    let parts: Vec<&str> = token.trim().split('.').collect();
    let [prefix, fp, id, secret] = parts.as_slice() else {
        return Err("malformed join token".into());
    };
    if *prefix != "YB1" {
        return Err("malformed join token".into());
    }
    if !yunbian_pki::secure_eq(fp, &s.ca_fingerprint) {
        return Err("join token belongs to another cluster (CA fingerprint mismatch)".into());
    }
    let o = match s.store.get(Kind::Token, id).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Err(format!("unknown join token {id}")),
        Err(e) => return Err(e.to_string()),
    };
    let t = decode::<TokenSpec>(&o).map_err(|e| e.to_string())?;
    if !yunbian_pki::secure_eq(&yunbian_pki::sha256_hex(secret.as_bytes()), &t.spec.secret_hash) {
        return Err(format!("invalid secret for join token {id}"));
    }
    if t.spec.revoked {
        return Err(format!("join token {id} has been revoked"));
    }
    if !t.spec.expires.is_empty() {
        let exp = yunbian_api::time::parse_rfc3339(&t.spec.expires).unwrap_or(0);
        if exp <= unix_now() {
            return Err(format!("join token {id} expired at {}", t.spec.expires));
        }
    }
    Ok(id.to_string())
}

async fn join(
    State(s): St,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: JoinRequest = serde_json::from_slice(&body?)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("join request: {e}")))?;
    let reject = |code: StatusCode, msg: String| {
        tracing::warn!(node = %req.name, from = %peer.address, reason = %msg, "join rejected");
        ApiError::new(code, msg)
    };
    let token_id = check_token(&s, &req.token).await.map_err(|m| reject(StatusCode::UNAUTHORIZED, m))?;
    if let Err(m) = yunbian_api::validate::check_name(&req.name) {
        return Err(reject(StatusCode::UNPROCESSABLE_ENTITY, format!("node name: {m}")));
    }
    let mut node = Object::new(&req.name, NodeSpec::default());
    node.metadata.labels = req.labels.clone();
    if let Some(e) = Resource::Node(node.clone()).errors().first() {
        return Err(reject(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()));
    }
    if let Ok(existing) = s.store.get(Kind::Node, &req.name).await {
        // A node whose certificate expired may join again under its name
        // (with a fresh token): that is how a site offline for longer than
        // the renewal grace comes back, keeping its objects and workloads.
        let expiry = existing.value.pointer("/status/certificateExpiry").and_then(|e| e.as_str()).unwrap_or_default();
        let expired = yunbian_api::time::parse_rfc3339(expiry).is_some_and(|t| t <= unix_now());
        if !expired {
            return Err(reject(StatusCode::CONFLICT, format!("node name {} is already taken", req.name)));
        }
        let cert =
            s.ca.sign_node_csr(&req.csr, &req.name, s.node_cert_ttl)
                .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("certificate request: {e}")))?;
        let (fp, exp) = cert_pin(&cert)?;
        objects::update_status::<NodeSpec>(&s.store, &req.name, |n| {
            n.status.certificate_fingerprint = fp.clone();
            n.status.certificate_expiry = exp.clone();
            // A join replaces every earlier certificate.
            n.status.previous_certificate_fingerprint.clear();
            true
        })
        .await?;
        count_join(&s.store, &token_id).await;
        tracing::info!(node = %req.name, token = %token_id, from = %peer.address, "node with an expired certificate joined again");
        return Ok(Json(json!({ "certificate": cert, "ca": s.ca.cert_pem() })).into_response());
    }
    let cert =
        s.ca.sign_node_csr(&req.csr, &req.name, s.node_cert_ttl)
            .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("certificate request: {e}")))?;
    (node.status.certificate_fingerprint, node.status.certificate_expiry) = cert_pin(&cert)?;
    let mut v = node.to_value();
    objects::stamp_new(&mut v);
    match s.store.create(Kind::Node, &req.name, v).await {
        Ok(_) => {}
        Err(StoreError::AlreadyExists { .. }) => {
            return Err(reject(StatusCode::CONFLICT, format!("node name {} is already taken", req.name)))
        }
        Err(e) => return Err(e.into()),
    }
    count_join(&s.store, &token_id).await;
    tracing::info!(node = %req.name, token = %token_id, from = %peer.address, "node joined");
    Ok(Json(json!({ "certificate": cert, "ca": s.ca.cert_pem() })).into_response())
}

/// Counts a join on the token, best effort: one attempt, no retry on a
/// conflicting concurrent join (a mass enrollment must not turn one Token
/// object into a write hotspot).
async fn count_join(store: &Arc<dyn Store>, token_id: &str) {
    let Ok(cur) = store.get(Kind::Token, token_id).await else { return };
    let Ok(mut t) = decode::<TokenSpec>(&cur) else { return };
    t.status.joins += 1;
    let _ = store.update(Kind::Token, token_id, t.to_value(), Some(cur.revision)).await;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    csr: String,
}

/// The fingerprint to pin and the expiry (RFC 3339) of an issued certificate.
fn cert_pin(pem: &str) -> ApiResult<(String, String)> {
    let internal = |e: yunbian_pki::PkiError| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let der = yunbian_pki::pem_to_der(pem).map_err(internal)?;
    let (_, not_after) = yunbian_pki::cert_validity(der.as_ref()).map_err(internal)?;
    Ok((yunbian_pki::fingerprint(der.as_ref()), yunbian_api::time::format_rfc3339(not_after)))
}

/// Which certificates of a node [`check_pinned`] accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// Only the pinned one.
    Current,
    /// Also the one it renewed, until the pinned one is first used: a
    /// renewal whose answer was lost (a cut link, a killed agent) leaves
    /// the node holding only the old certificate, and it must be able to
    /// renew again. Only `/v1/renew` accepts it.
    OrPrevious,
}

/// The node exists and `peer` presents the certificate pinned on it (or,
/// with [`Pin::OrPrevious`], the one before). Returns the pinned
/// fingerprint it saw.
async fn check_pinned(s: &ApiState, node: &str, peer: &Peer, pin: Pin) -> ApiResult<String> {
    let o = s
        .store
        .get(Kind::Node, node)
        .await
        .map_err(|_| ApiError::new(StatusCode::FORBIDDEN, format!("node {node} was removed; join again")))?;
    let field = |name: &str| o.value.pointer(&format!("/status/{name}")).and_then(|v| v.as_str()).unwrap_or_default();
    let (pinned, previous) = (field("certificateFingerprint"), field("previousCertificateFingerprint"));
    if yunbian_pki::secure_eq(pinned, &peer.cert_fingerprint) {
        if !previous.is_empty() {
            // The renewed certificate reached the node: the one before it
            // is done.
            let fp = peer.cert_fingerprint.clone();
            let _ = objects::update_status::<NodeSpec>(&s.store, node, |n| {
                let used =
                    n.status.certificate_fingerprint == fp && !n.status.previous_certificate_fingerprint.is_empty();
                if used {
                    n.status.previous_certificate_fingerprint.clear();
                }
                used
            })
            .await;
        }
        return Ok(pinned.to_string());
    }
    if pin == Pin::OrPrevious && !previous.is_empty() && yunbian_pki::secure_eq(previous, &peer.cert_fingerprint) {
        return Ok(pinned.to_string());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("this certificate is no longer valid for node {node} (renewed, or the node joined again)"),
    ))
}

fn require_node(peer: &Peer) -> ApiResult<String> {
    peer.node.clone().ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "a node client certificate is required"))
}

async fn renew(
    State(s): St,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let node = require_node(&peer)?;
    let seen = check_pinned(&s, &node, &peer, Pin::OrPrevious).await?;
    let req: RenewRequest = serde_json::from_slice(&body?)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("renew request: {e}")))?;
    let cert =
        s.ca.sign_node_csr(&req.csr, &node, s.node_cert_ttl)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("certificate request: {e}")))?;
    // Pin the new certificate before handing it out; the old one keeps
    // working on the connection it is on, and for nothing else.
    let (fp, exp) = cert_pin(&cert)?;
    // Only if the pin is still the one checked: of two renewals racing (a
    // client retry while the first is in flight), the second to write
    // would otherwise pin a certificate whose answer went nowhere.
    let mut raced = false;
    objects::update_status::<NodeSpec>(&s.store, &node, |n| {
        if n.status.certificate_fingerprint != seen {
            raced = true;
            return false;
        }
        n.status.certificate_fingerprint = fp.clone();
        n.status.certificate_expiry = exp.clone();
        // The certificate that asked stays good for renewing until the new
        // one is used (see `Pin::OrPrevious`).
        n.status.previous_certificate_fingerprint = peer.cert_fingerprint.clone();
        true
    })
    .await?;
    if raced {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("node {node} renewed its certificate meanwhile; renew again with the current one"),
        ));
    }
    tracing::info!(node = %node, "node certificate renewed");
    Ok(Json(json!({ "certificate": cert })).into_response())
}

async fn hub(State(s): St, Extension(peer): Extension<Peer>, ws: WebSocketUpgrade) -> ApiResult<Response> {
    use std::sync::atomic::Ordering;
    let node = require_node(&peer).inspect_err(|_| {
        s.metrics.hub_rejected.fetch_add(1, Ordering::Relaxed);
    })?;
    if !s.hub.is_ready() {
        // Edges retry with back-off; serving before the views are built
        // would hand them an empty desired state.
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cloud is starting; retry"));
    }
    if peer.cert_expiry <= unix_now() {
        // The handshake lets a recently expired certificate through for
        // renewal only.
        s.metrics.hub_rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "node certificate expired at {}; renew it (POST /v1/renew)",
                yunbian_api::time::format_rfc3339(peer.cert_expiry)
            ),
        ));
    }
    if let Err(e) = check_pinned(&s, &node, &peer, Pin::Current).await {
        s.metrics.hub_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %node, from = %peer.address, error = %e.message, "hub: connection refused");
        return Err(e);
    }
    let hub = s.hub.clone();
    // tungstenite's default 128 KiB read and write buffers per connection
    // dominate memory at 10k+ nodes; sync traffic is small messages.
    Ok(ws
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(yunbian_sync::wire::MAX_FRAME * 2)
        .max_message_size(yunbian_sync::wire::MAX_FRAME)
        .on_upgrade(move |socket| hub.serve(node, peer.address, peer.cert_expiry, socket)))
}

// ------------------------------------------------------------------- logs

#[derive(Debug, Deserialize, Default)]
struct LogQuery {
    tail: Option<u64>,
    follow: Option<String>,
    node: Option<String>,
}

fn log_response(rxs: Vec<(Option<String>, tokio::sync::mpsc::Receiver<String>)>) -> Response {
    /// A prefixed line longer than this is cut, so a workload writing no
    /// newlines cannot grow the buffer without bound.
    const MAX_LINE: usize = 64 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    for (prefix, mut r) in rxs {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut partial = String::new();
            loop {
                let chunk = tokio::select! {
                    c = r.recv() => c,
                    // The client went away: stop now, even if the instance
                    // is quiet; dropping `r` lets the hub cancel the stream.
                    _ = tx.closed() => return,
                };
                let out = match (&prefix, chunk) {
                    (None, Some(chunk)) => chunk,
                    (None, None) => return,
                    (Some(p), chunk) => {
                        let end = chunk.is_none();
                        partial.push_str(chunk.as_deref().unwrap_or_default());
                        let mut out = String::new();
                        while let Some(i) = partial.find('\n') {
                            let line: String = partial.drain(..=i).collect();
                            out.push_str(&format!("[{p}] {line}"));
                        }
                        if (end && !partial.is_empty()) || partial.len() > MAX_LINE {
                            out.push_str(&format!("[{p}] {}\n", std::mem::take(&mut partial)));
                        }
                        if end {
                            let _ = tx.send(Bytes::from(out)).await;
                            return;
                        }
                        out
                    }
                };
                if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    });
    ([("content-type", "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response()
}

fn hub_err(e: HubError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

async fn instance_log(
    State(s): St,
    _admin: Admin,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let inst = decode::<AppInstanceSpec>(&s.store.get(Kind::AppInstance, &name).await?)?;
    let follow = q.follow.as_deref().is_some_and(|f| f == "true" || f == "1");
    let rx = s.hub.open_log(&inst.spec.node, &name, q.tail, follow).map_err(hub_err)?;
    Ok(log_response(vec![(None, rx)]))
}

async fn app_log(
    State(s): St,
    _admin: Admin,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    s.store.get(Kind::App, &name).await?;
    let (insts, _) = s.store.list(Kind::AppInstance).await?;
    let follow = q.follow.as_deref().is_some_and(|f| f == "true" || f == "1");
    let mut rxs = Vec::new();
    let mut down = Vec::new();
    for o in &insts {
        let Ok(i) = decode::<AppInstanceSpec>(o) else { continue };
        if i.spec.app != name || q.node.as_ref().is_some_and(|n| *n != i.spec.node) {
            continue;
        }
        match s.hub.open_log(&i.spec.node, &o.name, q.tail, follow) {
            Ok(rx) => rxs.push((Some(o.name.clone()), rx)),
            Err(e) => down.push(e.to_string()),
        }
    }
    if rxs.is_empty() {
        let msg = if down.is_empty() {
            format!("app {name} has no instances{}", q.node.map(|n| format!(" on node {n}")).unwrap_or_default())
        } else {
            down.join("; ")
        };
        return Err(ApiError::new(
            if down.is_empty() { StatusCode::NOT_FOUND } else { StatusCode::SERVICE_UNAVAILABLE },
            msg,
        ));
    }
    Ok(log_response(rxs))
}
