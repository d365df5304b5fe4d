//! The data query routes over real HTTP on loopback: an edge-style
//! `Mutex<Store>` answering raw, stepped, series and latest queries with
//! fixed timestamps (`until` given, so no wall clock is involved), the
//! 400s of bad queries, the 503 of a missing store and the point cap.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yunbian_dataapi::{
    router, Aggregation, DataQuery, QueryError, RangeQuery, Selector, SeriesKey, SeriesPoints, Unavailable, MAX_POINTS,
};
use yunbian_tsdb::{Options, Store};

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("yunbian-dataapi-{name}-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A store with `temperature{device="boiler-1"}` at T0 + 0, 10, …, 50 s
/// (values 20..25) and `temperature{device="boiler-2"}` at T0 (value 7).
fn filled_store(dir: &std::path::Path) -> Store {
    let mut s = Store::open(dir, Options::default()).expect("open store");
    let b1 = SeriesKey::new("temperature", [("device", "boiler-1")]).expect("key");
    let b2 = SeriesKey::new("temperature", [("device", "boiler-2")]).expect("key");
    for i in 0..6 {
        s.append(&b1, T0 + i * 10_000, 20.0 + i as f64).expect("append");
    }
    s.append(&b2, T0, 7.0).expect("append");
    s
}

/// Serves `router(db, prefix)` on an ephemeral loopback port.
async fn serve(db: Arc<dyn DataQuery>, prefix: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app: axum::Router = router(db, prefix);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// `GET path` over a fresh connection: status and JSON body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8(buf).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: body {body:?} is not JSON: {e}"));
    (status, json)
}

fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") }).collect()
}

#[tokio::test]
async fn queries_over_http() {
    let dir = temp_dir("http");
    let db: Arc<Mutex<Store>> = Arc::new(Mutex::new(filled_store(&dir)));
    let addr = serve(db, "/v1").await;
    let until = T0 + 50_000;
    let q = enc(r#"temperature{device="boiler-1"}"#);

    // Raw: (until - since, until].
    let (code, body) = get(addr, &format!("/v1/query?q={q}&since=30s&until={until}")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"series": [{"metric": "temperature", "tags": {"device": "boiler-1"},
            "points": [[T0 + 30_000, 23.0], [T0 + 40_000, 24.0], [T0 + 50_000, 25.0]]}]})
    );

    // RFC 3339 `until` (T0 + 40 s).
    let (code, body) = get(addr, &format!("/v1/query?q={q}&since=11s&until=2023-11-14T22:14:00Z")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["series"][0]["points"], json!([[T0 + 30_000, 23.0], [T0 + 40_000, 24.0]]));

    // Stepped: until = T0 + 59.999 s makes the range [T0, T0 + 60 s): three
    // 20 s steps of two points each, stamped with their starts.
    let (code, body) = get(addr, &format!("/v1/query?q={q}&since=60s&until={}&step=20s&agg=max", T0 + 59_999)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["series"][0]["points"], json!([[T0, 21.0], [T0 + 20_000, 23.0], [T0 + 40_000, 25.0]]));
    let (_, body) = get(addr, &format!("/v1/query?q={q}&since=60s&until={}&step=20s&agg=count", T0 + 59_999)).await;
    assert_eq!(body["series"][0]["points"], json!([[T0, 2.0], [T0 + 20_000, 2.0], [T0 + 40_000, 2.0]]));
    // Steps start at the range's start: [T0 - 9.999 s, T0 + 50.001 s).
    let (_, body) = get(addr, &format!("/v1/query?q={q}&since=60s&until={until}&step=30s&agg=sum")).await;
    assert_eq!(
        body["series"][0]["points"],
        json!([[T0 - 9_999, 20.0 + 21.0 + 22.0], [T0 + 20_001, 23.0 + 24.0 + 25.0]])
    );

    // Every series of the metric, sorted; a regex matcher.
    let (_, body) = get(addr, &format!("/v1/series?match={}", enc("temperature"))).await;
    assert_eq!(
        body,
        json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1"}},
            {"metric": "temperature", "tags": {"device": "boiler-2"}},
        ]})
    );
    let (_, body) = get(addr, &format!("/v1/series?match={}", enc(r#"{device=~".*-2"}"#))).await;
    assert_eq!(body["series"].as_array().map(Vec::len), Some(1), "{body}");

    let (code, body) = get(addr, &format!("/v1/latest?q={}", enc("temperature"))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1"}, "ts": T0 + 50_000, "value": 25.0},
            {"metric": "temperature", "tags": {"device": "boiler-2"}, "ts": T0, "value": 7.0},
        ]})
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_queries_are_400_with_a_message() {
    let dir = temp_dir("bad");
    let db: Arc<Mutex<Store>> = Arc::new(Mutex::new(filled_store(&dir)));
    let addr = serve(db, "/v1").await;
    let q = enc("temperature");
    for (path, needle) in [
        (format!("/v1/query?q={}", enc("temperature{device=")), "selector"),
        ("/v1/query".to_string(), "missing field `q`"),
        ("/v1/series".to_string(), "missing field `match`"),
        (format!("/v1/query?q={q}&since=2d"), "24h"),
        (format!("/v1/query?q={q}&since=30d&step=1s"), "steps"),
        (format!("/v1/query?q={q}&step=1m&agg=median"), "median"),
        (format!("/v1/query?q={q}&since=soon"), "since"),
        (format!("/v1/query?q={q}&until=yesterday"), "until"),
        (format!("/v1/latest?q={}", enc(r#"{device=~"("}"#)), "regex"),
    ] {
        let (code, body) = get(addr, &path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert_eq!(body["code"], 400, "{path}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{path}: {message:?} should mention {needle:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_store_is_503_with_its_reason() {
    let db: Arc<dyn DataQuery> = Arc::new(Unavailable::new("the data store could not be opened: disk on fire"));
    let addr = serve(db, "/v1/data").await;
    for path in ["/v1/data/query?q=x", "/v1/data/series?match=x", "/v1/data/latest?q=x"] {
        let (code, body) = get(addr, path).await;
        assert_eq!(code, 503, "{path}: {body}");
        assert_eq!(body, json!({"code": 503, "message": "the data store could not be opened: disk on fire"}));
    }
    // A bad query is still a 400: the request is checked first.
    let (code, _) = get(addr, "/v1/data/query?q=%7B").await;
    assert_eq!(code, 400);
}

/// A store that answers one series of `MAX_POINTS + 1` points to any
/// select, to check the cap without writing a million points.
struct Huge;

impl DataQuery for Huge {
    fn select(&self, _: &Selector, start: i64, _: i64) -> Result<Vec<SeriesPoints>, QueryError> {
        let key = SeriesKey::metric("m").map_err(|e| QueryError::Store(e.to_string()))?;
        Ok(vec![SeriesPoints { key, points: (0..=MAX_POINTS as i64).map(|i| (start + i, 1.0)).collect() }])
    }
    fn select_step(
        &self,
        s: &Selector,
        start: i64,
        end: i64,
        _: i64,
        _: Aggregation,
    ) -> Result<Vec<SeriesPoints>, QueryError> {
        self.select(s, start, end)
    }
    fn series(&self, _: &Selector) -> Result<Vec<SeriesKey>, QueryError> {
        Ok(Vec::new())
    }
    fn latest(&self, _: &Selector) -> Result<Vec<(SeriesKey, i64, f64)>, QueryError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn answers_past_the_point_cap_are_refused() {
    let addr = serve(Arc::new(Huge), "/v1").await;
    let (code, body) = get(addr, "/v1/query?q=m").await;
    assert_eq!(code, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("add a step"), "{body}");
    let (code, body) = get(addr, "/v1/query?q=m&step=1m").await;
    assert_eq!(code, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("larger step"), "{body}");
}

#[test]
fn range_arithmetic() {
    let rq = RangeQuery::parse("m", Some("10s"), Some("1000000"), None, None, 0).expect("valid");
    assert_eq!((rq.start, rq.end, rq.step), (1_000_001 - 10_000, 1_000_001, None));
    // Without `until`, now is the end; without `since`, one hour.
    let rq = RangeQuery::parse("m", None, None, Some("1m"), Some("last"), 5_000_000).expect("valid");
    assert_eq!((rq.start, rq.end, rq.step), (5_000_001 - 3_600_000, 5_000_001, Some((60_000, Aggregation::Last))));
    // The caps: exactly 24 h raw is allowed, 100,000 steps too.
    assert!(RangeQuery::parse("m", Some("24h"), None, None, None, 0).is_ok());
    assert!(RangeQuery::parse("m", Some("24h1ms"), None, None, None, 0).is_err());
    assert!(RangeQuery::parse("m", Some("100000s"), None, Some("1s"), None, 0).is_ok());
    assert!(RangeQuery::parse("m", Some("100001s"), None, Some("1s"), None, 0).is_err());
    assert!(RangeQuery::parse("m", None, None, Some("0"), None, 0).is_err());
    // Extremes do not overflow.
    assert!(RangeQuery::parse("m", Some("1h"), Some(&i64::MAX.to_string()), None, None, 0).is_ok());
    assert!(RangeQuery::parse("m", Some("1h"), Some(&i64::MIN.to_string()), None, None, 0).is_ok());
}
