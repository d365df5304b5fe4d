//! The artifact registry's chunk routes and checks (docs/design/012-artifacts.md).
//!
//! - `HEAD /v1/chunks/{sha256}`: 200 (with `x-chunk-size`) if the chunk is
//!   stored, 404 if not. A hit renews the chunk's time, so a push that found
//!   it present can rely on it through the garbage collector's grace period.
//! - `PUT /v1/chunks/{sha256}`: stores a chunk (≤ 4 MiB); the body must hash
//!   to the digest. 201 when stored, 200 when it was already there:
//!   idempotent, so an interrupted push simply resumes.
//! - `GET /v1/chunks/{sha256}`: the chunk's bytes, checked on read; a
//!   node's read is limited per site and paced by `crate::tracker`.
//! - `POST /v1/chunks/gc` (`{"graceSeconds": N}` optional): a sweep now.
//!
//! Artifact objects go through the generic CRUD routes; before one is
//! stored, [`check_chunks`] makes sure every chunk it references is
//! stored with the size it claims (and touches it). After an artifact is
//! deleted, and every [`GC_INTERVAL`], [`sweep`] removes chunks that no
//! artifact references and nobody used within the grace period.
//!
//! All routes take the admin token; `GET /v1/chunks/{sha256}` (like `GET
//! /v1/artifacts/{name}`) also takes a node's current client certificate
//! ([`ArtifactReader`]), so edges can pull. Nodes can read, never write.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use yunbian_api::{Artifact, FieldError, Kind, ManifestError};
use yunbian_artifacts::gc::SweepReport;
use yunbian_artifacts::{ArtifactError, ChunkStore, Digest, PutOutcome};
use yunbian_store::Store;

use crate::api::{Admin, ApiError, ApiState, ArtifactReader};

/// How often the periodic sweep runs.
pub const GC_INTERVAL: Duration = Duration::from_secs(600);

/// Default grace period: unreferenced chunks younger than this are kept.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// The chunk store and garbage-collection settings of one cloud.
pub struct ArtifactRegistry {
    /// Where chunks live.
    pub chunks: Arc<dyn ChunkStore>,
    /// Unreferenced chunks used within this period are kept.
    pub gc_grace: Duration,
}

type St = State<Arc<ApiState>>;

/// The chunk routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/chunks/gc", post(gc))
        .route("/v1/chunks/{digest}", get(get_chunk).head(head_chunk).put(put_chunk))
        .route("/v1/blobs/{digest}/artifact", get(artifact_of_blob))
}

/// The Artifact object carrying a blob, for App references by digest alone
/// (`artifact: {digest: …}`): the first by object name, so every node
/// resolves the same one.
async fn artifact_of_blob(State(s): St, _reader: ArtifactReader, Path(d): Path<String>) -> Result<Response, ApiError> {
    let d = digest(d.strip_prefix("sha256:").unwrap_or(&d))?;
    let hex = d.to_string();
    let (mut items, _) = s.store.list(Kind::Artifact).await?;
    items.sort_by(|a, b| a.name.cmp(&b.name));
    for o in items {
        let blobs = o.value.pointer("/spec/blobs").and_then(Value::as_object).cloned().unwrap_or_default();
        if blobs.values().any(|b| b.get("sha256").and_then(Value::as_str) == Some(hex.as_str())) {
            return Ok(Json(o.value.as_ref().clone()).into_response());
        }
    }
    Err(ApiError::new(StatusCode::NOT_FOUND, format!("no artifact has a blob with sha256 {hex}")))
}

fn digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|e: yunbian_artifacts::DigestParseError| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn store_error(e: ArtifactError) -> ApiError {
    let code = match &e {
        ArtifactError::DigestMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ArtifactError::ChunkTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ArtifactError::MissingChunk(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(code, e.to_string())
}

async fn head_chunk(State(s): St, _admin: Admin, Path(d): Path<String>) -> Result<Response, ApiError> {
    let d = digest(&d)?;
    let chunks = &s.artifacts.chunks;
    if !chunks.touch(&d).await.map_err(store_error)? {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    let size = chunks.has(&d).await.map_err(store_error)?.map_or(0, |i| i.size);
    Ok((StatusCode::OK, [("x-chunk-size", size.to_string())]).into_response())
}

async fn put_chunk(
    State(s): St,
    _admin: Admin,
    Path(d): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let d = digest(&d)?;
    let body = body?;
    let outcome = s.artifacts.chunks.put(&d, body.to_vec()).await.map_err(store_error)?;
    let code = match outcome {
        PutOutcome::Created => StatusCode::CREATED,
        PutOutcome::AlreadyPresent => StatusCode::OK,
    };
    Ok((code, Json(json!({ "digest": d.hex(), "size": body.len() }))).into_response())
}

async fn get_chunk(State(s): St, reader: ArtifactReader, Path(d): Path<String>) -> Result<Response, ApiError> {
    let d = digest(&d)?;
    // Node pulls: one copy per site, per-site concurrency (429 beyond) and
    // egress pacing.
    let permit = match s.tracker.admit_cloud_pull(&reader, &d) {
        Ok(p) => p,
        Err(busy) => return Ok(busy.into_response()),
    };
    match s.artifacts.chunks.get(&d).await {
        Ok(Some(bytes)) => Ok(crate::tracker::chunk_response(permit, bytes)),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, format!("chunk {d} not found"))),
        Err(ArtifactError::DigestMismatch { .. }) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored chunk {d} failed its digest check and was dropped; push the artifact again"),
        )),
        Err(e) => Err(store_error(e)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GcRequest {
    grace_seconds: Option<u64>,
}

async fn gc(State(s): St, _admin: Admin, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body?;
    let req: GcRequest = if body.iter().all(u8::is_ascii_whitespace) {
        GcRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("gc request: {e}")))?
    };
    let grace = req.grace_seconds.map_or(s.artifacts.gc_grace, Duration::from_secs);
    let r = sweep(&s.artifacts, &s.store, grace).await?;
    Ok(Json(report_json(&r)))
}

/// The JSON form of a sweep's report.
pub fn report_json(r: &SweepReport) -> Value {
    json!({
        "scanned": r.scanned,
        "referenced": r.referenced,
        "keptRecent": r.kept_recent,
        "removed": r.removed,
        "removedBytes": r.removed_bytes,
    })
}

/// Every chunk digest some stored Artifact references.
async fn referenced(store: &Arc<dyn Store>) -> Result<HashSet<Digest>, ApiError> {
    let (items, _) = store.list(Kind::Artifact).await?;
    let mut out = HashSet::new();
    for o in items {
        let blobs = o.value.pointer("/spec/blobs").and_then(Value::as_object).cloned().unwrap_or_default();
        for blob in blobs.values() {
            for c in blob.get("chunks").and_then(Value::as_array).into_iter().flatten() {
                // Fail closed: a reference we cannot read must not let its
                // chunk be collected.
                let text = c.get("digest").and_then(Value::as_str).unwrap_or_default();
                let d: Digest = text.parse().map_err(|e: yunbian_artifacts::DigestParseError| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("artifact {}: chunk digest {text:?}: {e}; not sweeping", o.name),
                    )
                })?;
                out.insert(d);
            }
        }
    }
    Ok(out)
}

/// One mark-and-sweep pass with `grace` (see `yunbian_artifacts::gc`).
pub async fn sweep(reg: &ArtifactRegistry, store: &Arc<dyn Store>, grace: Duration) -> Result<SweepReport, ApiError> {
    let mut refs_err = None;
    let result = yunbian_artifacts::gc::sweep(reg.chunks.as_ref(), SystemTime::now(), grace, || async {
        match referenced(store).await {
            Ok(r) => Ok(r),
            Err(e) => {
                refs_err = Some(e);
                Err(ArtifactError::Task("listing artifacts failed".into()))
            }
        }
    })
    .await;
    if let Some(e) = refs_err {
        return Err(e);
    }
    let r = result.map_err(store_error)?;
    if r.removed > 0 {
        tracing::info!(
            removed = r.removed,
            bytes = r.removed_bytes,
            kept_recent = r.kept_recent,
            "artifact chunks collected"
        );
    }
    Ok(r)
}

/// Runs [`sweep`] every [`GC_INTERVAL`], forever.
pub async fn run_gc(reg: Arc<ArtifactRegistry>, store: Arc<dyn Store>) {
    loop {
        tokio::time::sleep(GC_INTERVAL).await;
        if let Err(e) = sweep(&reg, &store, reg.gc_grace).await {
            tracing::warn!(error = ?e, "artifact chunk collection failed");
        }
    }
}

/// Checks that every chunk an Artifact references is stored with the size
/// it claims; touches each, so the grace period starts again. Errors carry
/// field paths (`spec.blobs[linux/amd64].chunks[3].digest: …`).
pub async fn check_chunks(reg: &ArtifactRegistry, v: &Value) -> Result<(), ApiError> {
    let a = Artifact::from_value(v.clone()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut errs = Vec::new();
    for (platform, blob) in &a.spec.blobs {
        for (i, c) in blob.chunks.iter().enumerate() {
            let path = format!("spec.blobs[{platform}].chunks[{i}]");
            let Ok(d) = c.digest.parse::<Digest>() else { continue };
            let present = reg.chunks.touch(&d).await.map_err(store_error)?;
            let info = if present { reg.chunks.has(&d).await.map_err(store_error)? } else { None };
            match info {
                None => errs.push(FieldError {
                    path: format!("{path}.digest"),
                    message: format!("chunk {d} has not been uploaded (PUT /v1/chunks/{d})"),
                }),
                Some(i) if i.size != c.size => errs.push(FieldError {
                    path: format!("{path}.size"),
                    message: format!("is {} but the stored chunk has {} bytes", c.size, i.size),
                }),
                Some(_) => {}
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ManifestError::Invalid(errs).into())
    }
}
