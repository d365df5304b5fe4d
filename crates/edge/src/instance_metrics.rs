//! Apps report their own metrics to the agent over the local HTTP API
//! (served next to the device API, `127.0.0.1:7790` by default), for
//! autoscaling on a custom metric (docs/design/020-autoscaling.md):
//!
//! `POST /v1/instances/{instance}/metrics` with a JSON object of numbers,
//! `{"queue_depth": 17, "rps": 230.5}`. Names are `[A-Za-z0-9_.:-]{1,64}`,
//! values finite numbers, at most 32 metrics in a body of at most 16 KiB.
//! The latest value of each metric becomes `status.usage.metrics` of the
//! instance at the runtime's next sample; a metric not reported for 60 s is
//! dropped. An app finds the API and its own name in its environment:
//! `$YUNBIAN_DEVICE_API/v1/instances/$INSTANCE_NAME/metrics`.
//!
//! Answers: `200 {"instance", "accepted"}`; `404` for an instance the node's
//! runtime does not know; `400` for a body that is not such an object;
//! `413` for a body over the limit. Errors are the local API's JSON
//! `{code, message, details}`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use yunbian_api::ApiErrorBody;
use yunbian_runtime::{AppMetrics, MetricsError, MetricsReport};

/// Answer to an accepted report.
#[derive(Debug, Serialize)]
struct Accepted {
    instance: String,
    accepted: usize,
}

/// The route, recording into `metrics` (the handle the runtime reads).
pub fn router(metrics: AppMetrics) -> Router {
    Router::new().route("/v1/instances/{instance}/metrics", post(report)).with_state(metrics)
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(ApiErrorBody { code: code.as_u16(), message, details: Vec::new() })).into_response()
}

async fn report(
    State(metrics): State<AppMetrics>,
    Path(instance): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return error(r.status(), format!("cannot read the request body: {r}")),
    };
    if !metrics.is_tracked(&instance) {
        return error(StatusCode::NOT_FOUND, MetricsError::UnknownInstance(instance).to_string());
    }
    let parsed = MetricsReport::parse(&body);
    match parsed.and_then(|r| metrics.record(&instance, &r, Instant::now()).map(|()| r.len())) {
        Ok(accepted) => Json(Accepted { instance, accepted }).into_response(),
        Err(e) => {
            let code = match e {
                MetricsError::UnknownInstance(_) => StatusCode::NOT_FOUND,
                MetricsError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            error(code, e.to_string())
        }
    }
}
