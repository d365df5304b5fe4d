//! `EtcdStore` against a real etcd (`/usr/bin/etcd`): the shared
//! conformance suite and model test, then coordination (system values,
//! leadership with fencing, presence) and failures (etcd restarted,
//! unreachable, compacted).
//!
//! One etcd serves the whole test binary; each store gets its own key
//! prefix. Tests that stop or compact etcd start their own. Without etcd
//! installed the tests print `SKIPPED` and pass, except under CI.
#![cfg(feature = "etcd")]

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::conformance::{assert_idle, next_ok, Opened};
use common::model::{op, run, Backend};
use common::obj;
use proptest::test_runner::{Config, TestRunner};
use yunbian_api::Kind;
use yunbian_store::etcd::testing::{unique_prefix, EtcdServer};
use yunbian_store::etcd::{EtcdOptions, EtcdStore};
use yunbian_store::{Coordinator, Leadership, Store, StoreError};

/// Short leases and timeouts, so failures show quickly; the lease long
/// enough that keep-alives (every third of it) survive a loaded machine and
/// an etcd shared with the model test.
fn options() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        lease_ttl: Duration::from_secs(5),
        ..EtcdOptions::default()
    }
}

async fn connect(etcd: &EtcdServer, prefix: &str) -> Arc<EtcdStore> {
    EtcdStore::connect(&etcd.endpoints(), prefix, options()).await.expect("connect to etcd")
}

/// Waits (at most 20 s, a guard against hangs) for `f` to succeed.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still not the case after 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bounds a future that must not hang.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what} hangs"))
}

async fn open_for_conformance(label: &str, watch_buffer: usize) -> Option<Opened> {
    let etcd = EtcdServer::shared(label)?;
    let opts = EtcdOptions { watch_buffer, ..options() };
    let store = EtcdStore::connect(&etcd.endpoints(), &unique_prefix(label), opts).await.expect("connect to etcd");
    Some(Opened { store, guard: Box::new(()) })
}

conformance_tests!(open_for_conformance);

#[test]
fn store_matches_model() {
    let Some(etcd) = EtcdServer::shared("store_matches_model") else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let backend = Backend { contiguous: false, history: None, idle: Duration::from_millis(50) };
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    let result = runner.run(&proptest::collection::vec(op(), 1..25), |ops| {
        let prefix = unique_prefix("model");
        let endpoints = etcd.endpoints();
        let open = async || {
            let store: Arc<dyn Store> =
                EtcdStore::connect(&endpoints, &prefix, options()).await.expect("connect to etcd");
            store
        };
        rt.block_on(run(ops, backend, open))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_init_first_writer_wins_across_clients() {
    let Some(etcd) = EtcdServer::shared("get_or_init_first_writer_wins_across_clients") else { return };
    let prefix = unique_prefix("init");
    let (a, b) = (connect(etcd, &prefix).await, connect(etcd, &prefix).await);
    let (ra, rb) =
        tokio::join!(a.get_or_init("ca.key", b"from-a".to_vec()), b.get_or_init("ca.key", b"from-b".to_vec()));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert_eq!(ra, rb, "both replicas read the same bytes");
    assert!(ra == b"from-a" || ra == b"from-b");
    assert_eq!(b.get_or_init("ca.key", b"later".to_vec()).await.expect("again"), ra);
    // A reconnected client reads it too; other keys and prefixes are apart.
    let c = connect(etcd, &prefix).await;
    assert_eq!(c.get_or_init("ca.key", Vec::new()).await.expect("c"), ra);
    assert_eq!(c.get_or_init("admin.token", b"t".to_vec()).await.expect("c"), b"t");
    let other = connect(etcd, &unique_prefix("init-other")).await;
    assert_eq!(other.get_or_init("ca.key", b"other".to_vec()).await.expect("other"), b"other");
    // System values are not objects.
    for kind in Kind::ALL {
        assert!(a.list(kind).await.expect("list").0.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_deposed_leader_is_fenced() {
    let Some(etcd) = EtcdServer::shared("one_leader_and_a_deposed_leader_is_fenced") else { return };
    let prefix = unique_prefix("lead");
    let (a, b) = (connect(etcd, &prefix).await, connect(etcd, &prefix).await);

    let la = within("campaign of a", a.campaign("a")).await.expect("a leads");
    assert!(!*la.lost.borrow());
    let contender = b.clone();
    let mut b_campaign = tokio::spawn(async move { contender.campaign("b").await });
    la.store.create(Kind::App, "x", obj("x", 1)).await.expect("the leader writes");
    // Longer than the lease TTL: a's lease is kept alive, b keeps waiting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!b_campaign.is_finished(), "a second leader while the first lives");
    assert!(!*la.lost.borrow());
    la.store.update(Kind::App, "x", obj("x", 2), None).await.expect("still the leader");

    // a's lease ends as if a had stalled past its TTL.
    assert!(etcd.revoke_lease_of(&format!("{prefix}/leader")).await.expect("revoke"));
    let lb = within("campaign of b", &mut b_campaign).await.expect("task").expect("b leads");
    assert!(lb.term > la.term);
    let mut lost = la.lost.clone();
    within("a learning it lost", lost.wait_for(|lost| *lost)).await.expect("lost flips");

    // Every write of the deposed leader fails and changes nothing.
    let x = b.get(Kind::App, "x").await.expect("get");
    assert!(matches!(la.store.create(Kind::App, "y", obj("y", 1)).await, Err(StoreError::Fenced(_))));
    assert!(matches!(la.store.update(Kind::App, "x", obj("x", 9), None).await, Err(StoreError::Fenced(_))));
    assert!(matches!(
        la.store.update(Kind::App, "x", obj("x", 9), Some(x.revision - 1)).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(matches!(la.store.delete(Kind::App, "x", None).await, Err(StoreError::Fenced(_))));
    assert!(matches!(la.store.delete(Kind::App, "nope", None).await, Err(StoreError::Fenced(_))));
    assert_eq!(b.get(Kind::App, "x").await.expect("get"), x);
    assert!(b.get(Kind::App, "y").await.is_err());
    // Reads through it still work.
    assert_eq!(la.store.get(Kind::App, "x").await.expect("get"), x);

    // The new leader's fenced store writes, with the usual errors.
    let x2 = lb.store.update(Kind::App, "x", obj("x", 3), Some(x.revision)).await.expect("b writes");
    assert_eq!(
        lb.store.update(Kind::App, "x", obj("x", 4), Some(x.revision)).await,
        Err(StoreError::Conflict { kind: Kind::App, name: "x".into(), expected: x.revision, current: x2.revision })
    );
    assert_eq!(
        lb.store.create(Kind::App, "x", obj("x", 4)).await,
        Err(StoreError::AlreadyExists { kind: Kind::App, name: "x".into() })
    );
    assert_eq!(
        lb.store.delete(Kind::App, "nope", None).await,
        Err(StoreError::NotFound { kind: Kind::App, name: "nope".into() })
    );
    lb.store.delete(Kind::App, "x", Some(x2.revision)).await.expect("b deletes");

    // b gives leadership up by dropping its store; a, campaigning again,
    // takes over (dropping revokes b's lease: no TTL to wait for).
    let contender = a.clone();
    let a_again = tokio::spawn(async move { contender.campaign("a").await });
    let Leadership { store, lost: mut b_lost, term: b_term } = lb;
    drop(store);
    let la2 = within("campaign of a after b resigned", a_again).await.expect("task").expect("a leads again");
    assert!(la2.term > b_term);
    within("b learning it resigned", b_lost.wait_for(|lost| *lost)).await.expect("lost flips");
    la2.store.create(Kind::App, "z", obj("z", 1)).await.expect("a writes again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_vanishes_when_its_holder_is_gone() {
    let Some(etcd) = EtcdServer::shared("presence_vanishes_when_its_holder_is_gone") else { return };
    let prefix = unique_prefix("presence");
    let (a, b) = (connect(etcd, &prefix).await, connect(etcd, &prefix).await);
    assert_eq!(a.presences().await.expect("presences"), vec![]);
    a.set_presence("cloud-a", b"10.0.0.1".to_vec()).await.expect("presence a");
    b.set_presence("cloud-b", b"10.0.0.2".to_vec()).await.expect("presence b");
    a.set_presence("cloud-a", b"10.0.0.3".to_vec()).await.expect("replace a");
    assert_eq!(
        b.presences().await.expect("presences"),
        vec![("cloud-a".to_string(), b"10.0.0.3".to_vec()), ("cloud-b".to_string(), b"10.0.0.2".to_vec())]
    );

    // b's process "dies": its refreshes stop, and etcd expires the record.
    drop(b);
    let left = eventually("b's presence expired", || {
        let a = a.clone();
        async move {
            let p = a.presences().await.expect("presences");
            (p.len() == 1).then_some(p)
        }
    })
    .await;
    // a's record outlives the TTL: its lease is refreshed.
    assert_eq!(left, vec![("cloud-a".to_string(), b"10.0.0.3".to_vec())]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.presences().await.expect("presences"), left);
    // Presence records are not objects.
    assert!(a.list(Kind::Node).await.expect("list").0.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watch_outlives_the_request_timeout() {
    let Some(etcd) = EtcdServer::shared("idle_watch_outlives_the_request_timeout") else { return };
    let opts = EtcdOptions { request_timeout: Duration::from_secs(1), ..options() };
    let store = EtcdStore::connect(&etcd.endpoints(), &unique_prefix("idle"), opts).await.expect("connect");
    let mut w = store.watch(None, store.revision()).await.expect("watch");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let a = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    assert_eq!(next_ok(&mut w).await.object, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_ends_watches_with_an_error_and_the_store_recovers() {
    let Some(mut etcd) = EtcdServer::start_or_skip("etcd_restart_ends_watches_with_an_error_and_the_store_recovers")
    else {
        return;
    };
    let store = connect(&etcd, "/yunbian").await;
    let a = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    let mut w = store.watch(None, a.revision).await.expect("watch");
    let b = store.create(Kind::App, "b", obj("b", 1)).await.expect("create");
    assert_eq!(next_ok(&mut w).await.object, b);
    let mut last_seen = b.revision;

    etcd.stop();
    // The watch ends with an error instead of hanging, and requests fail
    // (bounded by the request timeout) instead of waiting for etcd.
    match within("the watch after etcd stopped", w.recv()).await {
        Some(Err(StoreError::Backend(msg))) => assert!(!msg.is_empty()),
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert_eq!(within("the watch after its error", w.recv()).await, None);
    assert!(matches!(within("get with etcd down", store.get(Kind::App, "a")).await, Err(StoreError::Backend(_))));
    assert!(matches!(
        within("create with etcd down", store.create(Kind::App, "c", obj("c", 1))).await,
        Err(StoreError::Backend(_))
    ));
    assert!(within("watch with etcd down", store.watch(None, last_seen)).await.is_err());

    etcd.restart().expect("restart etcd");
    // The same store reconnects by itself.
    let c = eventually("a write after the restart", || {
        let store = store.clone();
        async move {
            match store.create(Kind::App, "c", obj("c", 2)).await {
                Ok(c) => Some(c),
                // An attempt may have landed without its answer.
                Err(StoreError::AlreadyExists { .. }) => store.get(Kind::App, "c").await.ok(),
                Err(_) => None,
            }
        }
    })
    .await;
    assert_eq!(store.get(Kind::App, "a").await.expect("data survived"), a);
    // The watcher resumes from the last revision it saw and misses nothing.
    let mut w = store.watch(None, last_seen).await.expect("resume the watch");
    let e = next_ok(&mut w).await;
    assert_eq!(e.object, c);
    last_seen = e.revision;
    let d = store.update(Kind::App, "a", obj("a", 2), Some(a.revision)).await.expect("update");
    let e = next_ok(&mut w).await;
    assert!(e.revision > last_seen);
    assert_eq!(e.object, d);
    assert_idle(&mut w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_lost_when_etcd_is_gone_for_longer_than_the_ttl() {
    let Some(mut etcd) = EtcdServer::start_or_skip("leadership_is_lost_when_etcd_is_gone_for_longer_than_the_ttl")
    else {
        return;
    };
    let a = connect(&etcd, "/yunbian").await;
    let la = within("campaign", a.campaign("a")).await.expect("a leads");
    etcd.stop();
    let mut lost = la.lost.clone();
    within("noticing the lease could not be refreshed", lost.wait_for(|lost| *lost)).await.expect("lost flips");
    etcd.restart().expect("restart etcd");
    // Whatever etcd decided about the old lease, the deposed leader's
    // writes are refused once a new term exists or the old key is gone.
    let la2 = eventually("leading again", || {
        let a = a.clone();
        async move { a.campaign("a").await.ok() }
    })
    .await;
    assert!(la2.term > la.term);
    assert!(matches!(la.store.create(Kind::App, "old", obj("old", 1)).await, Err(StoreError::Fenced(_))));
    la2.store.create(Kind::App, "new", obj("new", 1)).await.expect("the new term writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_is_reported() {
    let Some(etcd) = EtcdServer::start_or_skip("compacted_history_is_reported") else { return };
    let store = connect(&etcd, "/yunbian").await;
    assert_eq!(store.compacted_revision(), 0);
    let a = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    let mut live = store.watch(None, a.revision).await.expect("watch");
    let b = store.create(Kind::App, "b", obj("b", 1)).await.expect("create");
    assert_eq!(next_ok(&mut live).await.object, b);

    let compacted = etcd.compact().await.expect("compact");
    assert!(compacted >= b.revision);
    assert_eq!(
        store.watch(None, a.revision).await.err(),
        Some(StoreError::Compacted { requested: a.revision, oldest: compacted })
    );
    assert_eq!(store.compacted_revision(), compacted);
    // Below the known compaction point the answer needs no request.
    assert_eq!(
        store.watch(Some(Kind::App), 0).await.err(),
        Some(StoreError::Compacted { requested: 0, oldest: compacted })
    );
    // From the compaction point, and for live watchers, nothing changed.
    let mut w = store.watch(Some(Kind::App), compacted).await.expect("watch from the compaction point");
    let c = store.create(Kind::App, "c", obj("c", 1)).await.expect("create");
    assert_eq!(next_ok(&mut w).await.object, c);
    assert_eq!(next_ok(&mut live).await.object, c);
    assert_eq!(store.list(Kind::App).await.expect("list").0.len(), 3);
}

#[tokio::test]
async fn unreachable_etcd_fails_in_bounded_time() {
    // Nothing listens on port 1.
    let opts = EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let endpoints = vec!["http://127.0.0.1:1".to_string()];
    let result = within("connect to nothing", EtcdStore::connect(&endpoints, "/yunbian", opts)).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
}
