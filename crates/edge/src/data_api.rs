//! Queries of the edge time-series store over the agent's local HTTP API
//! (served next to the device API), for apps on the node:
//!
//! - `GET /v1/query?q=SELECTOR&since=1h[&until=RFC3339|unix-ms][&step=1m&agg=avg]`
//!   → `{"series": [{"metric", "tags", "points": [[ts, value], …]}]}`; with
//!   `step`, one point per step aggregated with `agg` (avg, min, max, sum,
//!   count, last);
//! - `GET /v1/series?match=SELECTOR` → `{"series": [{"metric", "tags"}]}`;
//! - `GET /v1/latest?q=SELECTOR` → `{"series": [{"metric", "tags", "ts", "value"}]}`.
//!
//! Selectors: `metric{tag="v", tag!="v", tag=~"re", tag!~"re"}`. Errors are
//! JSON `{code, message}` with status 400. A raw query is capped at
//! [`MAX_POINTS`]; past it the answer says to use a step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use yunbian_tsdb::{Aggregation, Selector, SeriesKey, Store};

/// Most points a raw (unstepped) query returns.
pub const MAX_POINTS: usize = 1_000_000;
/// Most steps of a stepped query (per series).
pub const MAX_STEPS: i64 = 100_000;
/// Longest range of a raw query.
pub const MAX_RAW_RANGE_MS: i64 = 86_400_000;

type Tsdb = Arc<Mutex<Store>>;

#[derive(Debug, Deserialize)]
struct QueryParams {
    q: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    step: Option<String>,
    #[serde(default)]
    agg: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SeriesParams {
    #[serde(rename = "match")]
    matcher: String,
}

#[derive(Debug, Deserialize)]
struct LatestParams {
    q: String,
}

fn bad(message: impl Into<String>) -> Response {
    let body = json!({"code": 400, "message": message.into()});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn tags_json(k: &SeriesKey) -> serde_json::Value {
    let m: BTreeMap<&str, &str> = k.tags().iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    json!(m)
}

/// A time: RFC 3339 or Unix milliseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    yunbian_api::time::parse_rfc3339_signed(s)
        .map(|secs| secs * 1000)
        .ok_or_else(|| format!("{s:?} is neither RFC 3339 nor Unix milliseconds"))
}

/// Parses `avg|min|max|sum|count|last`.
pub fn parse_agg(s: &str) -> Result<Aggregation, String> {
    Ok(match s {
        "avg" => Aggregation::Avg,
        "min" => Aggregation::Min,
        "max" => Aggregation::Max,
        "sum" => Aggregation::Sum,
        "count" => Aggregation::Count,
        "last" => Aggregation::Last,
        other => return Err(format!("unknown aggregation {other:?} (avg, min, max, sum, count, last)")),
    })
}

async fn query(State(db): State<Tsdb>, Query(p): Query<QueryParams>) -> Response {
    let sel = match Selector::parse(&p.q) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let end = match p.until.as_deref().map(parse_time).transpose() {
        Ok(t) => t.unwrap_or_else(unix_ms) + 1,
        Err(e) => return bad(format!("until: {e}")),
    };
    let since = match yunbian_api::time::parse_duration_ms(p.since.as_deref().unwrap_or("1h")) {
        Ok(ms) => ms as i64,
        Err(e) => return bad(format!("since: {e}")),
    };
    let step = match p.step.as_deref().map(yunbian_api::time::parse_duration_ms).transpose() {
        Ok(s) => s.map(|ms| ms as i64),
        Err(e) => return bad(format!("step: {e}")),
    };
    let agg = match parse_agg(p.agg.as_deref().unwrap_or("avg")) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let start = end - since.max(1);
    if let Some(step) = step {
        if step <= 0 || (end - start) / step > MAX_STEPS {
            return bad(format!("more than {MAX_STEPS} steps: use a larger step or a shorter range"));
        }
    } else if since > MAX_RAW_RANGE_MS {
        return bad("a raw query covers at most 24h: add a step for longer ranges");
    }
    let result = tokio::task::spawn_blocking(move || {
        let mut store = db.lock().unwrap_or_else(|e| e.into_inner());
        match step {
            Some(step) => store.select_step(&sel, start, end, step, agg),
            None => store.select(&sel, start, end),
        }
    })
    .await;
    let series = match result {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return bad(e.to_string()),
        Err(e) => return bad(format!("query task: {e}")),
    };
    let total: usize = series.iter().map(|s| s.points.len()).sum();
    if total > MAX_POINTS {
        return bad(format!("{total} points exceed the {MAX_POINTS}-point limit of a raw query; add a step"));
    }
    let out: Vec<serde_json::Value> =
        series.iter().map(|s| json!({"metric": s.key.name(), "tags": tags_json(&s.key), "points": s.points})).collect();
    Json(json!({"series": out})).into_response()
}

async fn series(State(db): State<Tsdb>, Query(p): Query<SeriesParams>) -> Response {
    let sel = match Selector::parse(&p.matcher) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let keys =
        match tokio::task::spawn_blocking(move || db.lock().unwrap_or_else(|e| e.into_inner()).series(&sel)).await {
            Ok(k) => k,
            Err(e) => return bad(format!("query task: {e}")),
        };
    let out: Vec<serde_json::Value> = keys.iter().map(|k| json!({"metric": k.name(), "tags": tags_json(k)})).collect();
    Json(json!({"series": out})).into_response()
}

async fn latest(State(db): State<Tsdb>, Query(p): Query<LatestParams>) -> Response {
    let sel = match Selector::parse(&p.q) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let result = tokio::task::spawn_blocking(move || db.lock().unwrap_or_else(|e| e.into_inner()).latest(&sel)).await;
    match result {
        Ok(Ok(rows)) => {
            let out: Vec<serde_json::Value> = rows
                .iter()
                .map(|(k, ts, v)| json!({"metric": k.name(), "tags": tags_json(k), "ts": ts, "value": v}))
                .collect();
            Json(json!({"series": out})).into_response()
        }
        Ok(Err(e)) => bad(e.to_string()),
        Err(e) => bad(format!("query task: {e}")),
    }
}

/// The routes, over the agent's store.
pub fn router(db: Tsdb) -> Router {
    Router::new()
        .route("/v1/query", get(query))
        .route("/v1/series", get(series))
        .route("/v1/latest", get(latest))
        .with_state(db)
}
