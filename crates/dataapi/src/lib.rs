//! Queries of time-series data over HTTP, shared by the edge agent (its own
//! store, on the node's local API under `/v1`) and the cloud (the data the
//! edges ship, on the authenticated REST API under `/v1/data`).
//!
//! - `GET {prefix}/query?q=SELECTOR&since=1h[&until=RFC3339|unix-ms][&step=1m&agg=avg]`
//!   → `{"series": [{"metric", "tags", "points": [[ts, value], …]}]}`; with
//!   `step`, one point per step aggregated with `agg` (avg, min, max, sum,
//!   count, last), stamped with the step's start;
//! - `GET {prefix}/series?match=SELECTOR` → `{"series": [{"metric", "tags"}]}`;
//! - `GET {prefix}/latest?q=SELECTOR` → `{"series": [{"metric", "tags", "ts", "value"}]}`.
//!
//! The range is `(until − since, until]` (milliseconds; `until` defaults
//! to now, `since` to 1h). Selectors: `metric{tag="v", tag!="v", tag=~"re",
//! tag!~"re"}` ([`Selector::parse`]). Caps: a raw query covers at most
//! [`MAX_RAW_RANGE_MS`]; a stepped query has at most [`MAX_STEPS`] steps;
//! no answer holds more than [`MAX_POINTS`] points (past them the error
//! says to add a step or narrow the query).
//!
//! Errors are JSON `{code, message}`: 400 for a query that is not valid,
//! 503 when there is no store to ask ([`Unavailable`]), 500 when the store
//! fails while reading.
//!
//! What a store must answer is the [`DataQuery`] trait: synchronous and
//! blocking (the routes call it from blocking threads). It is implemented
//! here for the edge's `Mutex<yunbian_tsdb::Store>`, and by the cloud's
//! data store.
//!
//! Architecture invariant: this crate owns no data and opens no store; it
//! only translates HTTP requests into [`DataQuery`] calls and answers into
//! JSON.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use yunbian_api::ApiErrorBody;
pub use yunbian_tsdb::{Aggregation, Selector, SeriesKey, SeriesPoints};

/// Most points a raw (unstepped) query returns.
pub const MAX_POINTS: usize = 1_000_000;
/// Most steps of a stepped query (per series).
pub const MAX_STEPS: i64 = 100_000;
/// Longest range of a raw query.
pub const MAX_RAW_RANGE_MS: i64 = 86_400_000;
/// Range of a query without `since`.
pub const DEFAULT_SINCE: &str = "1h";

/// Why a store could not answer a query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The query is not valid (a bad regex, an empty range, a zero step).
    #[error("{0}")]
    Invalid(String),
    /// There is no store to ask (it failed to open); the reason says why.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed while reading.
    #[error("data store: {0}")]
    Store(String),
}

impl QueryError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
            QueryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<yunbian_tsdb::Error> for QueryError {
    fn from(e: yunbian_tsdb::Error) -> Self {
        match e {
            yunbian_tsdb::Error::InvalidQuery(_) | yunbian_tsdb::Error::InvalidSeries(_) => {
                QueryError::Invalid(e.to_string())
            }
            other => QueryError::Store(other.to_string()),
        }
    }
}

/// What a time-series store answers. Calls block (disk reads): call them
/// from blocking threads. Ranges are `[start, end)` in Unix milliseconds.
pub trait DataQuery: Send + Sync + 'static {
    /// Raw points of the matching series; series without points in the
    /// range are left out.
    fn select(&self, sel: &Selector, start: i64, end: i64) -> Result<Vec<SeriesPoints>, QueryError>;

    /// One point per step `[start + i·step, start + (i+1)·step)` that holds
    /// data, aggregated with `agg` and stamped with the step's start.
    fn select_step(
        &self,
        sel: &Selector,
        start: i64,
        end: i64,
        step_ms: i64,
        agg: Aggregation,
    ) -> Result<Vec<SeriesPoints>, QueryError>;

    /// The matching series, sorted.
    fn series(&self, sel: &Selector) -> Result<Vec<SeriesKey>, QueryError>;

    /// The newest point of every matching series that has one.
    fn latest(&self, sel: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, QueryError>;
}

/// The edge's store, shared behind a mutex with its writer.
impl DataQuery for Mutex<yunbian_tsdb::Store> {
    fn select(&self, sel: &Selector, start: i64, end: i64) -> Result<Vec<SeriesPoints>, QueryError> {
        Ok(lock(self).select(sel, start, end)?)
    }

    fn select_step(
        &self,
        sel: &Selector,
        start: i64,
        end: i64,
        step_ms: i64,
        agg: Aggregation,
    ) -> Result<Vec<SeriesPoints>, QueryError> {
        Ok(lock(self).select_step(sel, start, end, step_ms, agg)?)
    }

    fn series(&self, sel: &Selector) -> Result<Vec<SeriesKey>, QueryError> {
        Ok(lock(self).series(sel))
    }

    fn latest(&self, sel: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, QueryError> {
        Ok(lock(self).latest(sel)?)
    }
}

/// A poisoned lock still guards a usable store: the engine keeps its state
/// consistent at every step a panic could interrupt (it rolls back a failed
/// WAL write), so readers go on.
fn lock(m: &Mutex<yunbian_tsdb::Store>) -> std::sync::MutexGuard<'_, yunbian_tsdb::Store> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where there is no store (it failed to open): every query answers
/// [`QueryError::Unavailable`] with the reason, so the API says why
/// instead of the process going down.
#[derive(Debug, Clone)]
pub struct Unavailable {
    reason: String,
}

impl Unavailable {
    /// Answers every query with `reason` (e.g. "the data store could not
    /// be opened: …").
    pub fn new(reason: impl Into<String>) -> Self {
        Unavailable { reason: reason.into() }
    }
}

impl DataQuery for Unavailable {
    fn select(&self, _: &Selector, _: i64, _: i64) -> Result<Vec<SeriesPoints>, QueryError> {
        Err(QueryError::Unavailable(self.reason.clone()))
    }

    fn select_step(
        &self,
        _: &Selector,
        _: i64,
        _: i64,
        _: i64,
        _: Aggregation,
    ) -> Result<Vec<SeriesPoints>, QueryError> {
        Err(QueryError::Unavailable(self.reason.clone()))
    }

    fn series(&self, _: &Selector) -> Result<Vec<SeriesKey>, QueryError> {
        Err(QueryError::Unavailable(self.reason.clone()))
    }

    fn latest(&self, _: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, QueryError> {
        Err(QueryError::Unavailable(self.reason.clone()))
    }
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

/// Parses a point in time: Unix milliseconds or RFC 3339 (whole seconds).
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    yunbian_api::time::parse_rfc3339_signed(s)
        .and_then(|secs| secs.checked_mul(1000))
        .ok_or_else(|| format!("{s:?} is neither RFC 3339 nor Unix milliseconds"))
}

/// A validated `/query` request: the selector, the range and the step.
#[derive(Debug, Clone)]
pub struct RangeQuery {
    /// Which series.
    pub selector: Selector,
    /// Start of the range (inclusive), Unix ms.
    pub start: i64,
    /// End of the range (exclusive), Unix ms.
    pub end: i64,
    /// Step and aggregation, or `None` for raw points.
    pub step: Option<(i64, Aggregation)>,
}

impl RangeQuery {
    /// Checks the parameters of `/query` against the caps, with `now_ms`
    /// standing for a missing `until`.
    pub fn parse(
        q: &str,
        since: Option<&str>,
        until: Option<&str>,
        step: Option<&str>,
        agg: Option<&str>,
        now_ms: i64,
    ) -> Result<RangeQuery, String> {
        let selector = Selector::parse(q).map_err(|e| e.to_string())?;
        let end =
            until.map(parse_time).transpose().map_err(|e| format!("until: {e}"))?.unwrap_or(now_ms).saturating_add(1);
        let since = yunbian_api::time::parse_duration_ms(since.unwrap_or(DEFAULT_SINCE))
            .map_err(|e| format!("since: {e}"))
            .and_then(|ms| i64::try_from(ms).map_err(|_| "since: too long".to_string()))?;
        let step = step
            .map(yunbian_api::time::parse_duration_ms)
            .transpose()
            .map_err(|e| format!("step: {e}"))?
            .map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
        let agg = parse_agg(agg.unwrap_or("avg"))?;
        let start = end.saturating_sub(since.max(1));
        match step {
            Some(step) => {
                if step <= 0 || (end - start) / step > MAX_STEPS {
                    return Err(format!("more than {MAX_STEPS} steps: use a larger step or a shorter range"));
                }
                Ok(RangeQuery { selector, start, end, step: Some((step, agg)) })
            }
            None if since > MAX_RAW_RANGE_MS => {
                Err("a raw query covers at most 24h: add a step for longer ranges".into())
            }
            None => Ok(RangeQuery { selector, start, end, step: None }),
        }
    }
}

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

type Db = Arc<dyn DataQuery>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ApiErrorBody { code: status.as_u16(), message: message.into(), details: Vec::new() };
    (status, Json(body)).into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn query_error(e: QueryError) -> Response {
    error(e.status(), e.to_string())
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn tags_json(k: &SeriesKey) -> serde_json::Value {
    let m: BTreeMap<&str, &str> = k.tags().iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    json!(m)
}

/// Runs `f` on a blocking thread; a panic of `f` is a 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueryError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(query_error(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("query task: {e}"))),
    }
}

async fn query(State(db): State<Db>, params: Result<Query<QueryParams>, QueryRejection>) -> Response {
    let p = match params {
        Ok(Query(p)) => p,
        Err(e) => return bad(e.body_text()),
    };
    let rq = match RangeQuery::parse(
        &p.q,
        p.since.as_deref(),
        p.until.as_deref(),
        p.step.as_deref(),
        p.agg.as_deref(),
        unix_ms(),
    ) {
        Ok(rq) => rq,
        Err(e) => return bad(e),
    };
    let raw = rq.step.is_none();
    let series = match blocking(move || match rq.step {
        Some((step, agg)) => db.select_step(&rq.selector, rq.start, rq.end, step, agg),
        None => db.select(&rq.selector, rq.start, rq.end),
    })
    .await
    {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let total: usize = series.iter().map(|s| s.points.len()).sum();
    if total > MAX_POINTS {
        let hint = if raw { "add a step" } else { "use a larger step, a shorter range or a narrower selector" };
        return bad(format!("{total} points exceed the {MAX_POINTS}-point limit of a query; {hint}"));
    }
    let out: Vec<serde_json::Value> =
        series.iter().map(|s| json!({"metric": s.key.name(), "tags": tags_json(&s.key), "points": s.points})).collect();
    Json(json!({"series": out})).into_response()
}

async fn series(State(db): State<Db>, params: Result<Query<SeriesParams>, QueryRejection>) -> Response {
    let p = match params {
        Ok(Query(p)) => p,
        Err(e) => return bad(e.body_text()),
    };
    let sel = match Selector::parse(&p.matcher) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let keys = match blocking(move || db.series(&sel)).await {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let out: Vec<serde_json::Value> = keys.iter().map(|k| json!({"metric": k.name(), "tags": tags_json(k)})).collect();
    Json(json!({"series": out})).into_response()
}

async fn latest(State(db): State<Db>, params: Result<Query<LatestParams>, QueryRejection>) -> Response {
    let p = match params {
        Ok(Query(p)) => p,
        Err(e) => return bad(e.body_text()),
    };
    let sel = match Selector::parse(&p.q) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let rows = match blocking(move || db.latest(&sel)).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let out: Vec<serde_json::Value> =
        rows.iter().map(|(k, ts, v)| json!({"metric": k.name(), "tags": tags_json(k), "ts": ts, "value": v})).collect();
    Json(json!({"series": out})).into_response()
}

/// The routes `{prefix}/query`, `{prefix}/series` and `{prefix}/latest`
/// over `db` (the edge mounts them at `/v1`, the cloud at `/v1/data`
/// behind its admin token). `prefix` starts with `/` and does not end with
/// one.
pub fn router<S>(db: Arc<dyn DataQuery>, prefix: &str) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route(&format!("{prefix}/query"), get(query))
        .route(&format!("{prefix}/series"), get(series))
        .route(&format!("{prefix}/latest"), get(latest))
        .with_state(db)
}
