//! The built-in cloud data store (`TsdbDataStore`): batches are stored
//! once, also across a reopen (dedup rebuilt from the marker series), every
//! series carries the sending node's tag, ids below `first_id` are
//! forgotten, refused points are counted, retention runs, batch markers
//! stay out of queries unless named — and the data routes over real HTTP
//! on loopback answer from it. Time is an injected clock: nothing here
//! depends on the wall clock.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yunbian_cloud::data_store::{
    Clock, DataStore, Ingested, SeriesKey, SeriesPoints, TsdbDataOptions, TsdbDataStore, BATCH_MARKER_METRIC,
    DEDUP_LOOKBACK_MS,
};
use yunbian_dataapi::{Aggregation, DataQuery, Selector};

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("yunbian-cloud-data-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A clock the test moves.
#[derive(Clone)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn at(ms: i64) -> TestClock {
        TestClock(Arc::new(AtomicI64::new(ms)))
    }
    fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    fn clock(&self) -> Clock {
        let t = self.0.clone();
        Arc::new(move || t.load(Ordering::SeqCst))
    }
}

fn open(dir: &TestDir, clock: &TestClock) -> TsdbDataStore {
    open_with(dir, clock, TsdbDataOptions::default())
}

fn open_with(dir: &TestDir, clock: &TestClock, opts: TsdbDataOptions) -> TsdbDataStore {
    TsdbDataStore::open_with_clock(dir.path().join("tsdb"), opts, clock.clock()).expect("open the data store")
}

fn key(metric: &str, tags: &[(&str, &str)]) -> SeriesKey {
    SeriesKey::new(metric, tags.iter().copied()).expect("valid key")
}

fn points(metric: &str, tags: &[(&str, &str)], pts: &[(i64, f64)]) -> SeriesPoints {
    SeriesPoints { key: key(metric, tags), points: pts.to_vec() }
}

/// One series `temperature{device="boiler-1"}` with one point at `ts`.
fn one(ts: i64, v: f64) -> Vec<SeriesPoints> {
    vec![points("temperature", &[("device", "boiler-1")], &[(ts, v)])]
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).expect("valid selector")
}

/// Every raw point of `selector` in the last `DAY` before `T0 + 2 DAY`.
fn raw(db: &TsdbDataStore, selector: &str) -> Vec<(String, Vec<(i64, f64)>)> {
    db.select(&sel(selector), T0 - DAY, T0 + 2 * DAY)
        .expect("select")
        .into_iter()
        .map(|s| (s.key.to_string(), s.points))
        .collect()
}

fn stored(accepted: u64, rejected: u64) -> Ingested {
    Ingested::Stored { accepted, rejected }
}

#[test]
fn a_batch_is_stored_once() {
    let dir = TestDir::new("once");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    assert_eq!(db.ingest("edge-1", 1, 1, one(T0, 20.0)).expect("ingest"), stored(1, 0));
    // The resend of batch 1 (here with other content, to see it is not written).
    assert_eq!(db.ingest("edge-1", 1, 1, one(T0 + 1000, 99.0)).expect("ingest"), Ingested::Duplicate);
    assert_eq!(
        raw(&db, "temperature"),
        [(r#"temperature{device="boiler-1",node="edge-1"}"#.to_string(), vec![(T0, 20.0)])]
    );
    // The same id from another node is another batch.
    assert_eq!(db.ingest("edge-2", 1, 1, one(T0, 21.0)).expect("ingest"), stored(1, 0));
    assert_eq!(db.ingest("edge-1", 2, 1, one(T0 + 1000, 22.0)).expect("ingest"), stored(1, 0));
    assert_eq!(raw(&db, r#"temperature{node="edge-1"}"#)[0].1, [(T0, 20.0), (T0 + 1000, 22.0)]);
}

#[test]
fn dedup_survives_a_reopen() {
    let dir = TestDir::new("reopen");
    let clock = TestClock::at(T0);
    {
        let db = open(&dir, &clock);
        for id in [1, 2, 4] {
            assert_eq!(db.ingest("edge-1", id, 1, one(T0 + id as i64, id as f64)).expect("ingest"), stored(1, 0));
        }
        assert_eq!(db.ingest("edge-2", 7, 7, one(T0, 70.0)).expect("ingest"), stored(1, 0));
    }
    clock.set(T0 + DAY);
    let db = open(&dir, &clock);
    for id in [1, 2, 4] {
        assert_eq!(db.ingest("edge-1", id, 1, one(T0 + id as i64, -1.0)).expect("ingest"), Ingested::Duplicate, "{id}");
    }
    // Batch 3 was never stored (the edge had it in flight): it is new.
    assert_eq!(db.ingest("edge-1", 3, 1, one(T0 + 3, 3.0)).expect("ingest"), stored(1, 0));
    assert_eq!(db.ingest("edge-1", 3, 1, one(T0 + 3, -1.0)).expect("ingest"), Ingested::Duplicate);
    assert_eq!(db.ingest("edge-2", 7, 7, one(T0, -1.0)).expect("ingest"), Ingested::Duplicate);
    assert_eq!(
        raw(&db, r#"temperature{node="edge-1"}"#)[0].1,
        [(T0 + 1, 1.0), (T0 + 2, 2.0), (T0 + 3, 3.0), (T0 + 4, 4.0)]
    );
    // And once more, with markers written by two runs.
    drop(db);
    let db = open(&dir, &clock);
    assert_eq!(db.ingest("edge-1", 3, 1, one(T0 + 3, -1.0)).expect("ingest"), Ingested::Duplicate);
    assert_eq!(db.ingest("edge-1", 5, 5, one(T0 + 5, 5.0)).expect("ingest"), stored(1, 0));
}

#[test]
fn markers_are_read_back_for_the_lookback_window_only() {
    let dir = TestDir::new("lookback");
    let clock = TestClock::at(T0);
    drop_after(open(&dir, &clock), |db| {
        assert_eq!(db.ingest("edge-1", 1, 1, one(T0, 1.0)).expect("ingest"), stored(1, 0));
    });
    // Just inside the window: still known.
    clock.set(T0 + DEDUP_LOOKBACK_MS);
    drop_after(open(&dir, &clock), |db| {
        assert_eq!(db.ingest("edge-1", 1, 1, one(T0, -1.0)).expect("ingest"), Ingested::Duplicate);
    });
    // Past it (no edge keeps a batch that long): forgotten.
    clock.set(T0 + DEDUP_LOOKBACK_MS + 1);
    drop_after(open(&dir, &clock), |db| {
        assert!(matches!(db.ingest("edge-1", 1, 1, one(T0 + 1, 1.0)).expect("ingest"), Ingested::Stored { .. }));
    });
}

fn drop_after(db: TsdbDataStore, f: impl FnOnce(&TsdbDataStore)) {
    f(&db);
}

#[test]
fn every_series_carries_the_sending_node() {
    let dir = TestDir::new("node");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    let batch = vec![
        points("temperature", &[("device", "boiler-1"), ("node", "someone-else")], &[(T0, 1.0)]),
        points("pressure", &[], &[(T0, 2.0), (T0 + 1, 3.0)]),
    ];
    assert_eq!(db.ingest("edge-1", 1, 1, batch).expect("ingest"), stored(3, 0));
    let listed: Vec<String> =
        db.series(&sel(r#"{node=~".+"}"#)).expect("series").iter().map(|k| k.to_string()).collect();
    assert_eq!(listed, [r#"pressure{node="edge-1"}"#, r#"temperature{device="boiler-1",node="edge-1"}"#]);
    assert!(db.series(&sel(r#"{node="someone-else"}"#)).expect("series").is_empty());
}

#[test]
fn ids_below_first_id_are_forgotten() {
    let dir = TestDir::new("forget");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    assert_eq!(db.ingest("edge-1", 1, 1, one(T0 + 1, 1.0)).expect("ingest"), stored(1, 0));
    // Batches 2–4 were dropped by the edge (TTL, size): it now starts at 5.
    assert_eq!(db.ingest("edge-1", 5, 5, one(T0 + 5, 5.0)).expect("ingest"), stored(1, 0));
    // The edge never sends an id below 5 again; one that did would be taken
    // as known, not written.
    assert_eq!(db.ingest("edge-1", 3, 5, one(T0 + 3, 3.0)).expect("ingest"), Ingested::Duplicate);
    assert_eq!(raw(&db, "temperature")[0].1, [(T0 + 1, 1.0), (T0 + 5, 5.0)]);
    // Above the floor, gaps stay open: 7 before 6.
    assert_eq!(db.ingest("edge-1", 7, 5, one(T0 + 7, 7.0)).expect("ingest"), stored(1, 0));
    assert_eq!(db.ingest("edge-1", 6, 5, one(T0 + 6, 6.0)).expect("ingest"), stored(1, 0));
    assert_eq!(db.ingest("edge-1", 6, 6, one(T0 + 6, -1.0)).expect("ingest"), Ingested::Duplicate);
}

#[test]
fn refused_points_are_counted() {
    let dir = TestDir::new("refused");
    let clock = TestClock::at(T0);
    // Room for the marker series and two more.
    let db = open_with(&dir, &clock, TsdbDataOptions { max_series: 3, ..TsdbDataOptions::default() });
    let batch = vec![
        points("a", &[], &[(T0, 1.0), (T0 + 10, 2.0)]),
        points("b", &[], &[(T0, 1.0)]),
        // Over the series cap: 3 points refused.
        points("c", &[], &[(T0, 1.0), (T0 + 1, 1.0), (T0 + 2, 1.0)]),
        // The cloud's own metrics are not writable by edges.
        points(BATCH_MARKER_METRIC, &[], &[(T0, 1e9)]),
        points("__yunbian_other", &[], &[(T0, 1.0)]),
    ];
    assert_eq!(db.ingest("edge-1", 1, 1, batch).expect("ingest"), stored(3, 5));
    // Out of order: more than the 1 h window behind a's newest point.
    let late = vec![points("a", &[], &[(T0 + 10 - 3_600_001, 0.0), (T0 - 5, 0.5)])];
    assert_eq!(db.ingest("edge-1", 2, 1, late).expect("ingest"), stored(1, 1));
    assert_eq!(raw(&db, "a")[0].1, [(T0 - 5, 0.5), (T0, 1.0), (T0 + 10, 2.0)]);
    // A batch whose points are all refused is still recorded.
    let refused = vec![points("c", &[], &[(T0, 1.0)])];
    assert_eq!(db.ingest("edge-1", 3, 1, refused).expect("ingest"), stored(0, 1));
    assert_eq!(db.ingest("edge-1", 3, 1, Vec::new()).expect("ingest"), Ingested::Duplicate);
}

#[test]
fn retention_drops_old_points_and_refuses_them_afterwards() {
    let dir = TestDir::new("retention");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    assert_eq!(db.ingest("edge-1", 1, 1, one(T0, 1.0)).expect("ingest"), stored(1, 0));
    clock.set(T0 + 31 * DAY);
    db.apply_retention().expect("retention");
    let s = sel("temperature");
    assert!(db.select(&s, T0 - DAY, T0 + DAY).expect("select").is_empty(), "raw points past 30 days are gone");
    // Rolled up: a 1-hour step still sees the point.
    let stepped = db.select_step(&s, T0 - 3_600_000, T0 + 3_600_000, 3_600_000, Aggregation::Max).expect("step");
    assert_eq!(stepped.len(), 1);
    assert_eq!(stepped[0].points.iter().map(|p| p.1).collect::<Vec<_>>(), [1.0]);
    // A late batch with points that old: recorded, its points refused.
    assert_eq!(db.ingest("edge-1", 2, 1, one(T0 + 1, 2.0)).expect("ingest"), stored(0, 1));
    assert_eq!(db.ingest("edge-1", 3, 1, one(T0 + 31 * DAY, 3.0)).expect("ingest"), stored(1, 0));
}

#[test]
fn markers_are_hidden_unless_named() {
    let dir = TestDir::new("hidden");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    assert_eq!(db.ingest("edge-1", 41, 41, one(T0, 1.0)).expect("ingest"), stored(1, 0));
    clock.set(T0 + 5);
    assert_eq!(db.ingest("edge-1", 42, 41, one(T0 + 1, 2.0)).expect("ingest"), stored(1, 0));
    let names = |keys: Vec<SeriesKey>| keys.iter().map(|k| k.name().to_string()).collect::<Vec<_>>();
    for s in [r#"{node="edge-1"}"#, r#"{node=~".*"}"#, r#"{__name__=""}"#] {
        assert_eq!(names(db.series(&sel(s)).expect("series")), ["temperature"], "{s}");
        let q = db.select(&sel(s), T0 - 1, T0 + DAY).expect("select");
        assert_eq!(q.iter().map(|s| s.key.name()).collect::<Vec<_>>(), ["temperature"], "{s}");
        let q = db.select_step(&sel(s), T0 - 1, T0 + DAY, DAY, Aggregation::Count).expect("step");
        assert_eq!(q.len(), 1, "{s}");
        let l = db.latest(&sel(s)).expect("latest");
        assert_eq!(l.iter().map(|r| r.0.name()).collect::<Vec<_>>(), ["temperature"], "{s}");
    }
    // Named: the markers, one per stored batch, stamped with the ingest time.
    let m = format!(r#"{BATCH_MARKER_METRIC}{{node="edge-1"}}"#);
    assert_eq!(names(db.series(&sel(&m)).expect("series")), [BATCH_MARKER_METRIC]);
    assert_eq!(raw(&db, &m), [(m.clone(), vec![(T0, 41.0), (T0 + 5, 42.0)])]);
    assert_eq!(db.latest(&sel(&m)).expect("latest")[0].2, 42.0);
}

#[test]
fn marker_timestamps_increase_even_when_the_clock_does_not() {
    let dir = TestDir::new("clock");
    let clock = TestClock::at(T0);
    {
        let db = open(&dir, &clock);
        for id in 1..=3 {
            db.ingest("edge-1", id, 1, one(T0 + id as i64, 1.0)).expect("ingest");
        }
    }
    // The clock went back an hour and a half across a restart.
    clock.set(T0 - 5_400_000);
    let db = open(&dir, &clock);
    db.ingest("edge-1", 4, 1, one(T0 + 4, 1.0)).expect("ingest");
    let m = format!(r#"{BATCH_MARKER_METRIC}{{node="edge-1"}}"#);
    // Four markers at T0, T0+1, T0+2, T0+3: none overwrote another.
    assert_eq!(raw(&db, &m)[0].1, [(T0, 1.0), (T0 + 1, 2.0), (T0 + 2, 3.0), (T0 + 3, 4.0)]);
    drop(db);
    let db = open(&dir, &clock);
    for id in 1..=4 {
        assert_eq!(db.ingest("edge-1", id, 1, Vec::new()).expect("ingest"), Ingested::Duplicate, "{id}");
    }
}

#[test]
fn a_retention_shorter_than_the_lookback_is_refused() {
    let dir = TestDir::new("short");
    let opts = TsdbDataOptions { raw_retention_ms: DAY, ..TsdbDataOptions::default() };
    let e = TsdbDataStore::open(dir.path().join("tsdb"), opts).expect_err("too short");
    assert!(e.to_string().contains("batch markers"), "{e}");
}

// ------------------------------------------------------------------ HTTP

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8(buf).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {body:?}: {e}")))
}

fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") }).collect()
}

#[tokio::test]
async fn the_data_routes_answer_from_the_cloud_store() {
    let dir = TestDir::new("http");
    let clock = TestClock::at(T0 + 60_000);
    let db = Arc::new(open(&dir, &clock));
    let batch = vec![
        points("temperature", &[("device", "boiler-1")], &[(T0, 20.5), (T0 + 10_000, 21.5), (T0 + 20_000, 22.0)]),
        points("temperature", &[("device", "boiler-2")], &[(T0, 7.0)]),
    ];
    assert_eq!(db.ingest("edge-1", 1, 1, batch).expect("ingest"), stored(4, 0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app: axum::Router = yunbian_dataapi::router(db.clone(), "/v1/data");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let q = enc(r#"temperature{device="boiler-1"}"#);
    let until = T0 + 20_000;
    let (code, body) = get(addr, &format!("/v1/data/query?q={q}&since=1m&until={until}")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"series": [{"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"},
            "points": [[T0, 20.5], [T0 + 10_000, 21.5], [T0 + 20_000, 22.0]]}]})
    );
    let (code, body) = get(addr, &format!("/v1/data/query?q={q}&since=1m&until={until}&step=1m&agg=avg")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["series"][0]["points"], json!([[until + 1 - 60_000, 64.0 / 3.0]]));
    let (_, body) = get(addr, &format!("/v1/data/series?match={}", enc(r#"{node="edge-1"}"#))).await;
    assert_eq!(
        body,
        json!({"series": [
            {"metric": "temperature", "tags": {"device": "boiler-1", "node": "edge-1"}},
            {"metric": "temperature", "tags": {"device": "boiler-2", "node": "edge-1"}},
        ]})
    );
    let (_, body) = get(addr, &format!("/v1/data/latest?q={}", enc("temperature"))).await;
    assert_eq!(body["series"][0]["value"], json!(22.0), "{body}");
    assert_eq!(body["series"][1]["ts"], json!(T0), "{body}");
    // The markers are there for who asks by name.
    let (_, body) = get(addr, &format!("/v1/data/series?match={}", enc(BATCH_MARKER_METRIC))).await;
    assert_eq!(body["series"], json!([{"metric": BATCH_MARKER_METRIC, "tags": {"node": "edge-1"}}]));
}

#[test]
fn one_process_at_a_time() {
    let dir = TestDir::new("lock");
    let clock = TestClock::at(T0);
    let db = open(&dir, &clock);
    let e = TsdbDataStore::open(dir.path().join("tsdb"), TsdbDataOptions::default()).expect_err("locked");
    assert!(e.to_string().contains("another cloud process"), "{e}");
    drop(db);
    let _again = open(&dir, &clock);
}
