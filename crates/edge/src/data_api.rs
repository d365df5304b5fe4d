//! Queries of the edge time-series store over the agent's local HTTP API
//! (served next to the device API), for apps on the node: the routes of
//! `yunbian-dataapi` mounted at `/v1` — `/v1/query`, `/v1/series`,
//! `/v1/latest` — over the store the rules write. Parameters, JSON, caps
//! and errors are that crate's, the same as the cloud's `/v1/data/…`.

use std::sync::{Arc, Mutex};

use axum::Router;
use yunbian_tsdb::Store;

pub use yunbian_dataapi::{parse_agg, MAX_POINTS, MAX_RAW_RANGE_MS, MAX_STEPS};

/// The routes, over the agent's store.
pub fn router(db: Arc<Mutex<Store>>) -> Router {
    yunbian_dataapi::router(db, "/v1")
}
