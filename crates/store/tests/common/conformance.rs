//! Behaviour every [`Store`] backend shares, one feature per test body.
//!
//! Each body takes a fresh, empty store (an etcd one may share its etcd with
//! other tests, under its own prefix). They assume only what the trait
//! promises: revisions grow, but need not be contiguous nor start at 1.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use yunbian_api::Kind;
use yunbian_store::{EventType, Store, StoreError, StoreEvent, Watch};

use super::{obj, with_rv};

/// A store for one test, and whatever must live as long as it.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Kept alive with the store (a temp dir, a server).
    pub guard: Box<dyn std::any::Any + Send>,
}

/// Defines one `#[tokio::test]` per shared body, each opening its store
/// with `$open(test_name, watch_buffer) -> Option<Opened>` (`None`: the
/// test was skipped).
#[allow(unused_macros)]
macro_rules! conformance_tests {
    ($open:path) => {
        conformance_tests!(@one $open, crud_and_conflicts, 10_000);
        conformance_tests!(@one $open, revisions_are_global_across_kinds, 10_000);
        conformance_tests!(@one $open, metadata_is_created_and_values_must_be_objects, 10_000);
        conformance_tests!(@one $open, watch_replays_then_goes_live, 10_000);
        conformance_tests!(@one $open, watch_from_the_future_skips_older_events, 10_000);
        conformance_tests!(@one $open, list_revision_resumes_a_watch, 10_000);
        conformance_tests!(@one $open, slow_watcher_is_ended_with_compacted, 4);
        conformance_tests!(@one $open, concurrent_creates_get_unique_revisions, 10_000);
        conformance_tests!(@one $open, racing_writes_are_decided_one_by_one, 10_000);
        conformance_tests!(@one $open, names_may_contain_slashes_and_kinds_do_not_mix, 10_000);
    };
    (@one $open:path, $name:ident, $buffer:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(opened) = $open(stringify!($name), $buffer).await else { return };
            common::conformance::$name(opened.store.clone()).await;
            drop(opened);
        }
    };
}

/// Next item of a watch, failing the test after 10 s.
pub async fn next(w: &mut Watch) -> Option<Result<StoreEvent, StoreError>> {
    tokio::time::timeout(Duration::from_secs(10), w.recv()).await.expect("watch timed out")
}

/// Next event of a watch.
pub async fn next_ok(w: &mut Watch) -> StoreEvent {
    next(w).await.expect("watch ended").expect("watch error")
}

/// Asserts nothing more arrives for a while.
pub async fn assert_idle(w: &mut Watch) {
    let r = tokio::time::timeout(Duration::from_millis(150), w.recv()).await;
    assert!(r.is_err(), "unexpected watch item: {r:?}");
}

/// `(revision, type, kind, name)` of an event, for compact assertions.
pub fn brief(e: &StoreEvent) -> (u64, EventType, Kind, String) {
    (e.revision, e.event, e.object.kind, e.object.name.clone())
}

pub async fn crud_and_conflicts(store: Arc<dyn Store>) {
    let r0 = store.revision();
    let a = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    assert_eq!((a.kind, a.name.as_str()), (Kind::App, "a"));
    assert!(a.revision > r0);
    assert_eq!(*a.value, with_rv(obj("a", 1), a.revision));
    assert_eq!(store.get(Kind::App, "a").await.expect("get"), a);
    assert!(store.revision() >= a.revision);

    assert_eq!(
        store.create(Kind::App, "a", obj("a", 9)).await,
        Err(StoreError::AlreadyExists { kind: Kind::App, name: "a".into() })
    );
    assert_eq!(store.get(Kind::App, "a").await.expect("get"), a, "a failed create changes nothing");

    let a2 = store.update(Kind::App, "a", obj("a", 2), None).await.expect("update");
    assert!(a2.revision > a.revision);
    let a3 = store.update(Kind::App, "a", obj("a", 3), Some(a2.revision)).await.expect("update rv");
    assert!(a3.revision > a2.revision);
    assert_eq!(*a3.value, with_rv(obj("a", 3), a3.revision));
    assert_eq!(
        store.update(Kind::App, "a", obj("a", 4), Some(a2.revision)).await,
        Err(StoreError::Conflict { kind: Kind::App, name: "a".into(), expected: a2.revision, current: a3.revision })
    );
    assert_eq!(
        store.delete(Kind::App, "a", Some(a.revision)).await,
        Err(StoreError::Conflict { kind: Kind::App, name: "a".into(), expected: a.revision, current: a3.revision })
    );
    assert_eq!(store.get(Kind::App, "a").await.expect("get"), a3);

    let not_found = Err(StoreError::NotFound { kind: Kind::App, name: "zz".into() });
    assert_eq!(store.update(Kind::App, "zz", obj("zz", 1), None).await, not_found);
    assert_eq!(store.update(Kind::App, "zz", obj("zz", 1), Some(a3.revision)).await, not_found);
    assert_eq!(store.update(Kind::App, "zz", obj("zz", 1), Some(0)).await, not_found);
    assert_eq!(store.delete(Kind::App, "zz", None).await, not_found);
    assert_eq!(store.delete(Kind::App, "zz", Some(0)).await, not_found);
    assert_eq!(store.get(Kind::App, "zz").await, not_found);

    let mut last = a3.revision;
    for name in ["c", "b", "d"] {
        last = store.create(Kind::App, name, obj(name, 0)).await.expect("create").revision;
    }
    let (list, rev) = store.list(Kind::App).await.expect("list");
    assert!(rev >= last);
    assert_eq!(list.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
    assert_eq!(list[0], a3);

    let gone = store.delete(Kind::App, "a", Some(a3.revision)).await.expect("delete");
    assert_eq!(gone, a3, "delete returns the last state");
    assert!(store.revision() > last);
    assert_eq!(store.get(Kind::App, "a").await, Err(StoreError::NotFound { kind: Kind::App, name: "a".into() }));
    // The name can be used again.
    let again = store.create(Kind::App, "a", obj("a", 5)).await.expect("recreate");
    assert!(again.revision > last);
    assert_eq!(store.delete(Kind::App, "a", None).await.expect("delete"), again);
    assert!(store.revision() > again.revision);
}

pub async fn revisions_are_global_across_kinds(store: Arc<dyn Store>) {
    let n = store.create(Kind::Node, "x", obj("x", 0)).await.expect("create");
    let a = store.create(Kind::App, "x", obj("x", 0)).await.expect("same name, other kind");
    let t = store.create(Kind::Token, "y", obj("y", 0)).await.expect("create");
    assert!(n.revision < a.revision && a.revision < t.revision);
    let (apps, rev) = store.list(Kind::App).await.expect("list");
    assert_eq!(apps, vec![a.clone()]);
    assert!(rev >= t.revision, "a list is as recent as every write before it");
    let (groups, rev) = store.list(Kind::NodeGroup).await.expect("list");
    assert!(groups.is_empty());
    assert!(rev >= t.revision);
    let d = store.delete(Kind::Node, "x", None).await.expect("delete");
    assert_eq!(d, n);
    assert_eq!(store.get(Kind::App, "x").await.expect("other kinds untouched"), a);
    assert!(store.revision() > t.revision);
}

pub async fn metadata_is_created_and_values_must_be_objects(store: Arc<dyn Store>) {
    let o = store.create(Kind::Node, "bare", json!({"spec": 1})).await.expect("create");
    assert_eq!(*o.value, json!({"spec": 1, "metadata": {"resourceVersion": o.revision}}));
    let o = store.update(Kind::Node, "bare", json!({"metadata": null}), None).await.expect("update");
    assert_eq!(*o.value, json!({"metadata": {"resourceVersion": o.revision}}));
    assert_eq!(store.get(Kind::Node, "bare").await.expect("get"), o);
    // resourceVersion sent by the caller is overwritten.
    let o = store.update(Kind::Node, "bare", with_rv(obj("bare", 0), 77), None).await.expect("update");
    assert_eq!(*o.value, with_rv(obj("bare", 0), o.revision));
    assert_eq!(store.get(Kind::Node, "bare").await.expect("get"), o);

    assert!(matches!(store.create(Kind::Node, "s", json!("str")).await, Err(StoreError::Backend(_))));
    assert!(matches!(store.create(Kind::Node, "m", json!({"metadata": 5})).await, Err(StoreError::Backend(_))));
    assert!(matches!(store.update(Kind::Node, "bare", json!([1]), None).await, Err(StoreError::Backend(_))));
    assert!(store.get(Kind::Node, "s").await.is_err());
    assert_eq!(store.get(Kind::Node, "bare").await.expect("get"), o);
}

pub async fn watch_replays_then_goes_live(store: Arc<dyn Store>) {
    let base = store.revision();
    let a1 = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    let n1 = store.create(Kind::Node, "n", obj("n", 1)).await.expect("create");
    let a2 = store.update(Kind::App, "a", obj("a", 2), None).await.expect("update");

    let mut all = store.watch(None, a1.revision).await.expect("watch");
    let mut apps = store.watch(Some(Kind::App), base).await.expect("watch");
    let mut nodes_live = store.watch(Some(Kind::Node), a2.revision).await.expect("watch");

    let e = next_ok(&mut all).await;
    assert_eq!(brief(&e), (n1.revision, EventType::Added, Kind::Node, "n".into()));
    assert_eq!(e.object, n1);
    let e = next_ok(&mut all).await;
    assert_eq!(brief(&e), (a2.revision, EventType::Modified, Kind::App, "a".into()));
    assert_eq!(*e.object.value, with_rv(obj("a", 2), a2.revision));
    assert_idle(&mut all).await;

    let e = next_ok(&mut apps).await;
    assert_eq!((e.revision, e.event, &e.object), (a1.revision, EventType::Added, &a1));
    let e = next_ok(&mut apps).await;
    assert_eq!((e.revision, e.event), (a2.revision, EventType::Modified));
    assert_idle(&mut apps).await;
    assert_idle(&mut nodes_live).await;

    let dn = store.delete(Kind::Node, "n", None).await.expect("delete");
    let da = store.delete(Kind::App, "a", Some(a2.revision)).await.expect("delete");

    let e = next_ok(&mut all).await;
    assert_eq!((e.event, e.object.kind, e.object.revision), (EventType::Deleted, Kind::Node, n1.revision));
    assert_eq!(e.object, dn, "a delete event carries the last state");
    let node_deleted = e.revision;
    assert!(node_deleted > a2.revision);
    let e = next_ok(&mut all).await;
    assert_eq!((e.event, e.object.kind, e.object.revision), (EventType::Deleted, Kind::App, a2.revision));
    assert_eq!(e.object, da);
    let app_deleted = e.revision;
    assert!(app_deleted > node_deleted);
    let e = next_ok(&mut apps).await;
    assert_eq!((e.revision, e.event), (app_deleted, EventType::Deleted));
    let e = next_ok(&mut nodes_live).await;
    assert_eq!((e.revision, e.event), (node_deleted, EventType::Deleted));
    assert_idle(&mut apps).await;
    assert_idle(&mut nodes_live).await;
    assert!(store.revision() >= app_deleted);
}

pub async fn watch_from_the_future_skips_older_events(store: Arc<dyn Store>) {
    let from = store.revision() + 2;
    let mut w = store.watch(None, from).await.expect("watch");
    let mut revisions = Vec::new();
    for name in ["a", "b", "c"] {
        revisions.push(store.create(Kind::App, name, obj(name, 0)).await.expect("create").revision);
    }
    let want: Vec<u64> = revisions.into_iter().filter(|r| *r > from).collect();
    assert!(!want.is_empty());
    for rev in want {
        assert_eq!(next_ok(&mut w).await.revision, rev);
    }
    assert_idle(&mut w).await;
}

pub async fn list_revision_resumes_a_watch(store: Arc<dyn Store>) {
    store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    store.create(Kind::App, "b", obj("b", 1)).await.expect("create");
    let (list, rev) = store.list(Kind::App).await.expect("list");
    assert_eq!(list.len(), 2);
    let c = store.create(Kind::App, "c", obj("c", 1)).await.expect("create");
    let b = store.update(Kind::App, "b", obj("b", 2), None).await.expect("update");
    // Resuming from the list's revision gives exactly the later changes.
    let mut w = store.watch(Some(Kind::App), rev).await.expect("watch");
    let e = next_ok(&mut w).await;
    assert_eq!((e.event, &e.object), (EventType::Added, &c));
    let e = next_ok(&mut w).await;
    assert_eq!((e.event, &e.object), (EventType::Modified, &b));
    assert_idle(&mut w).await;
}

pub async fn slow_watcher_is_ended_with_compacted(store: Arc<dyn Store>) {
    // The store was opened with a watch buffer of 4.
    let base = store.revision();
    let mut slow = store.watch(None, base).await.expect("watch");
    let mut other_kind = store.watch(Some(Kind::Node), base).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(store.create(Kind::App, &format!("a{i}"), obj("a", i)).await.expect("create").revision);
    }
    for rev in &revisions[..4] {
        assert_eq!(next_ok(&mut slow).await.revision, *rev);
    }
    match next(&mut slow).await {
        Some(Err(StoreError::Compacted { requested, .. })) => assert_eq!(requested, revisions[3]),
        other => panic!("expected the watcher to be ended with Compacted, got {other:?}"),
    }
    assert_eq!(next(&mut slow).await, None);

    // Watchers of other kinds are unaffected; writes went on.
    assert!(store.revision() >= revisions[9]);
    let n = store.create(Kind::Node, "n", obj("n", 0)).await.expect("create");
    assert_eq!(next_ok(&mut other_kind).await.revision, n.revision);

    // A replay larger than the buffer is delivered whole.
    let mut replay = store.watch(None, base).await.expect("watch");
    for rev in revisions.iter().chain([&n.revision]) {
        assert_eq!(next_ok(&mut replay).await.revision, *rev);
    }
    let m = store.create(Kind::Node, "m", obj("m", 0)).await.expect("create");
    assert_eq!(next_ok(&mut replay).await.revision, m.revision);
}

pub async fn concurrent_creates_get_unique_revisions(store: Arc<dyn Store>) {
    const TASKS: usize = 8;
    const EACH: i64 = 100;
    let base = store.revision();
    let mut w = store.watch(None, base).await.expect("watch");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..EACH {
                let name = format!("t{t}-{i:03}");
                let o = store.create(Kind::AppInstance, &name, obj(&name, i)).await.expect("create");
                revs.push(o.revision);
            }
            // One task's writes take increasing revisions.
            assert!(revs.windows(2).all(|p| p[0] < p[1]));
            revs
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.extend(t.await.expect("task"));
    }
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), TASKS * EACH as usize, "every write has its own revision");
    assert!(revs[0] > base);
    let (list, rev) = store.list(Kind::AppInstance).await.expect("list");
    assert_eq!(list.len(), revs.len());
    assert!(rev >= *revs.last().expect("revisions"));
    for o in &list {
        assert_eq!(o.value["metadata"]["resourceVersion"], json!(o.revision));
    }
    // The watch saw every write once, in revision order.
    for rev in &revs {
        assert_eq!(next_ok(&mut w).await.revision, *rev);
    }
}

pub async fn racing_writes_are_decided_one_by_one(store: Arc<dyn Store>) {
    let base = store.create(Kind::App, "x", obj("x", 0)).await.expect("create");

    // Many creates of one name: exactly one wins.
    let mut creates = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        creates.push(tokio::spawn(async move { store.create(Kind::App, "y", obj("y", i)).await }));
    }
    let mut won = 0;
    for c in creates {
        match c.await.expect("task") {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e, StoreError::AlreadyExists { kind: Kind::App, name: "y".into() }),
        }
    }
    assert_eq!(won, 1);

    // Many updates based on the same revision: exactly one wins.
    let mut updates = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        updates.push(tokio::spawn(async move { store.update(Kind::App, "x", obj("x", i), Some(base.revision)).await }));
    }
    let mut winner = None;
    for u in updates {
        match u.await.expect("task") {
            Ok(o) => {
                assert!(winner.is_none(), "two updates won");
                winner = Some(o.revision);
            }
            Err(StoreError::Conflict { expected, current, .. }) => {
                assert_eq!(expected, base.revision);
                assert!(current > base.revision);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let winner = winner.expect("one update won");
    assert_eq!(store.get(Kind::App, "x").await.expect("get").revision, winner);
}

pub async fn names_may_contain_slashes_and_kinds_do_not_mix(store: Arc<dyn Store>) {
    // `App` is a prefix of `AppInstance`: neither may see the other's objects.
    let app = store.create(Kind::App, "web", obj("web", 1)).await.expect("create");
    let inst = store.create(Kind::AppInstance, "web/0", obj("web/0", 1)).await.expect("create");
    let nested = store.create(Kind::App, "a/b/c", obj("a/b/c", 1)).await.expect("create");
    assert_eq!(store.list(Kind::App).await.expect("list").0, vec![nested.clone(), app.clone()]);
    assert_eq!(store.list(Kind::AppInstance).await.expect("list").0, vec![inst.clone()]);
    assert_eq!(store.get(Kind::AppInstance, "web/0").await.expect("get"), inst);
    assert_eq!(store.get(Kind::App, "a/b/c").await.expect("get"), nested);
    assert!(store.get(Kind::App, "a/b").await.is_err());
    let mut w = store.watch(Some(Kind::App), app.revision - 1).await.expect("watch");
    let e = next_ok(&mut w).await;
    assert_eq!(e.object, app);
    let e = next_ok(&mut w).await;
    assert_eq!(e.object, nested, "the instance in between is not an App");
    assert_idle(&mut w).await;
}
