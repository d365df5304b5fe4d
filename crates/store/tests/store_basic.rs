//! Behaviour of `RedbStore`: the shared conformance suite
//! (`common/conformance.rs`, also run against etcd), then what only the
//! embedded backend does (contiguous revisions, files, history, reopening,
//! coordination of a single replica).

#[macro_use]
mod common;

use std::sync::Arc;

use common::conformance::{assert_idle, next, next_ok, Opened};
use common::{obj, with_rv, TempDir};
use serde_json::json;
use yunbian_api::Kind;
use yunbian_store::redb_store::StoreOptions;
use yunbian_store::{Coordinator, EventType, RedbStore, Store, StoreError};

fn open(dir: &TempDir) -> Arc<RedbStore> {
    RedbStore::open(&dir.db(), StoreOptions::default()).expect("open store")
}

fn open_with(dir: &TempDir, history: u64, watch_buffer: usize) -> Arc<RedbStore> {
    RedbStore::open(&dir.db(), StoreOptions { history, watch_buffer }).expect("open store")
}

async fn open_for_conformance(label: &str, watch_buffer: usize) -> Option<Opened> {
    let dir = TempDir::new(label);
    let store = open_with(&dir, 100_000, watch_buffer);
    Some(Opened { store, guard: Box::new(dir) })
}

conformance_tests!(open_for_conformance);

#[tokio::test]
async fn revisions_are_contiguous_and_failed_writes_take_none() {
    let dir = TempDir::new("crud");
    let store = open(&dir);
    assert_eq!(store.revision(), 0);
    assert_eq!(store.compacted_revision(), 0);

    let a = store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
    assert_eq!((a.kind, a.name.as_str(), a.revision), (Kind::App, "a", 1));
    assert_eq!(*a.value, with_rv(obj("a", 1), 1));
    assert_eq!(store.get(Kind::App, "a").await.expect("get"), a);

    assert_eq!(
        store.create(Kind::App, "a", obj("a", 9)).await,
        Err(StoreError::AlreadyExists { kind: Kind::App, name: "a".into() })
    );
    // A failed write takes no revision.
    assert_eq!(store.revision(), 1);

    let a2 = store.update(Kind::App, "a", obj("a", 2), None).await.expect("update");
    assert_eq!(a2.revision, 2);
    let a3 = store.update(Kind::App, "a", obj("a", 3), Some(2)).await.expect("update rv");
    assert_eq!(a3.revision, 3);
    assert_eq!(*a3.value, with_rv(obj("a", 3), 3));
    assert_eq!(
        store.update(Kind::App, "a", obj("a", 4), Some(2)).await,
        Err(StoreError::Conflict { kind: Kind::App, name: "a".into(), expected: 2, current: 3 })
    );
    assert_eq!(
        store.delete(Kind::App, "a", Some(1)).await,
        Err(StoreError::Conflict { kind: Kind::App, name: "a".into(), expected: 1, current: 3 })
    );
    assert_eq!(store.get(Kind::App, "a").await.expect("get"), a3);

    let not_found = Err(StoreError::NotFound { kind: Kind::App, name: "zz".into() });
    assert_eq!(store.update(Kind::App, "zz", obj("zz", 1), None).await, not_found);
    assert_eq!(store.update(Kind::App, "zz", obj("zz", 1), Some(3)).await, not_found);
    assert_eq!(store.delete(Kind::App, "zz", None).await, not_found);
    assert_eq!(store.get(Kind::App, "zz").await, not_found);

    for name in ["c", "b", "d"] {
        store.create(Kind::App, name, obj(name, 0)).await.expect("create");
    }
    let (list, rev) = store.list(Kind::App).await.expect("list");
    assert_eq!(rev, 6);
    assert_eq!(list.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);

    let gone = store.delete(Kind::App, "a", Some(3)).await.expect("delete");
    assert_eq!(gone, a3, "delete returns the last state");
    assert_eq!(store.revision(), 7);
    assert_eq!(store.get(Kind::App, "a").await, Err(StoreError::NotFound { kind: Kind::App, name: "a".into() }));
    // The name can be used again.
    let again = store.create(Kind::App, "a", obj("a", 5)).await.expect("recreate");
    assert_eq!(again.revision, 8);
    assert_eq!(store.delete(Kind::App, "a", None).await.expect("delete").revision, 8);
    assert_eq!(store.revision(), 9);
}

#[tokio::test]
async fn persists_across_reopen() {
    let dir = TempDir::new("persist");
    let before = {
        let store = open(&dir);
        store.create(Kind::App, "a", obj("a", 1)).await.expect("create");
        store.create(Kind::App, "b", obj("b", 1)).await.expect("create");
        store.create(Kind::Node, "n/with/slash", obj("n", 1)).await.expect("create");
        store.update(Kind::App, "a", obj("a", 2), Some(1)).await.expect("update");
        store.delete(Kind::App, "b", None).await.expect("delete");
        let mut all = Vec::new();
        for kind in Kind::ALL {
            all.push(store.list(kind).await.expect("list"));
        }
        assert_eq!(store.revision(), 5);
        all
    };
    let store = open(&dir);
    assert_eq!(store.revision(), 5);
    assert_eq!(store.compacted_revision(), 0);
    for (kind, listed) in Kind::ALL.into_iter().zip(before) {
        assert_eq!(store.list(kind).await.expect("list"), listed);
    }
    assert_eq!(store.get(Kind::App, "a").await.expect("get").revision, 4);
    assert_eq!(store.get(Kind::Node, "n/with/slash").await.expect("get").revision, 3);

    // The history came back too.
    let mut w = store.watch(None, 0).await.expect("watch");
    let got: Vec<(u64, EventType, Kind, String)> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let e = next_ok(&mut w).await;
            v.push((e.revision, e.event, e.object.kind, e.object.name));
        }
        v
    };
    assert_eq!(
        got,
        vec![
            (1, EventType::Added, Kind::App, "a".to_string()),
            (2, EventType::Added, Kind::App, "b".to_string()),
            (3, EventType::Added, Kind::Node, "n/with/slash".to_string()),
            (4, EventType::Modified, Kind::App, "a".to_string()),
            (5, EventType::Deleted, Kind::App, "b".to_string()),
        ]
    );
    // Writes continue from the stored revision.
    let c = store.create(Kind::App, "c", obj("c", 1)).await.expect("create");
    assert_eq!(c.revision, 6);
    assert_eq!(next_ok(&mut w).await.revision, 6);
}

#[tokio::test]
async fn compaction() {
    let dir = TempDir::new("compact");
    {
        let store = open_with(&dir, 5, 100);
        for i in 0..12 {
            store.create(Kind::App, &format!("a{i:02}"), obj("a", i)).await.expect("create");
        }
        assert_eq!(store.revision(), 12);
        assert_eq!(store.compacted_revision(), 7);
        assert_eq!(store.watch(None, 6).await.err(), Some(StoreError::Compacted { requested: 6, oldest: 7 }));
        assert_eq!(
            store.watch(Some(Kind::App), 0).await.err(),
            Some(StoreError::Compacted { requested: 0, oldest: 7 })
        );
        let mut w = store.watch(None, 7).await.expect("watch from the compaction point");
        for rev in 8..=12 {
            assert_eq!(next_ok(&mut w).await.revision, rev);
        }
        assert_idle(&mut w).await;
        // Objects are not affected by compaction.
        assert_eq!(store.list(Kind::App).await.expect("list").0.len(), 12);
    }
    {
        let store = open_with(&dir, 5, 100);
        assert_eq!((store.revision(), store.compacted_revision()), (12, 7));
        let mut w = store.watch(None, 9).await.expect("watch");
        for rev in 10..=12 {
            assert_eq!(next_ok(&mut w).await.revision, rev);
        }
    }
    {
        // A smaller history on reopen compacts at once.
        let store = open_with(&dir, 2, 100);
        assert_eq!((store.revision(), store.compacted_revision()), (12, 10));
        assert!(store.watch(None, 9).await.is_err());
        store.delete(Kind::App, "a00", None).await.expect("delete");
        assert_eq!(store.compacted_revision(), 11);
    }
    {
        // A larger one keeps what is there and grows.
        let store = open_with(&dir, 1000, 100);
        assert_eq!((store.revision(), store.compacted_revision()), (13, 11));
        store.delete(Kind::App, "a01", None).await.expect("delete");
        assert_eq!(store.compacted_revision(), 11);
        let mut w = store.watch(None, 11).await.expect("watch");
        for rev in 12..=14 {
            assert_eq!(next_ok(&mut w).await.revision, rev);
        }
    }
    {
        // No history at all: only live watches.
        let store = open_with(&dir, 0, 100);
        assert_eq!(store.compacted_revision(), 14);
        let mut w = store.watch(Some(Kind::App), 14).await.expect("watch");
        store.delete(Kind::App, "a02", None).await.expect("delete");
        assert_eq!(store.compacted_revision(), 15);
        assert_eq!(next_ok(&mut w).await.revision, 15);
    }
}

#[tokio::test]
async fn dropping_the_store_ends_watches_and_releases_the_file() {
    let dir = TempDir::new("drop");
    let store = open(&dir);
    let mut w = store.watch(None, 0).await.expect("watch");
    store.create(Kind::App, "a", obj("a", 0)).await.expect("create");
    // The file is locked while open.
    assert!(matches!(RedbStore::open(&dir.db(), StoreOptions::default()), Err(StoreError::Backend(_))));
    drop(store);
    assert_eq!(next_ok(&mut w).await.revision, 1);
    assert_eq!(next(&mut w).await, None);
    let store = open(&dir);
    assert_eq!(store.revision(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_take_contiguous_revisions() {
    let dir = TempDir::new("concurrent");
    let store = open(&dir);
    let mut w = store.watch(None, 0).await.expect("watch");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..200 {
                let name = format!("t{t}-{i:03}");
                let o = store.create(Kind::AppInstance, &name, obj(&name, i)).await.expect("create");
                revs.push(o.revision);
            }
            revs
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.extend(t.await.expect("task"));
    }
    revs.sort_unstable();
    assert_eq!(revs, (1..=1600).collect::<Vec<u64>>());
    let (list, rev) = store.list(Kind::AppInstance).await.expect("list");
    assert_eq!((list.len(), rev), (1600, 1600));
    for o in &list {
        assert_eq!(o.value["metadata"]["resourceVersion"], json!(o.revision));
    }
    for rev in 1..=1600 {
        assert_eq!(next_ok(&mut w).await.revision, rev);
    }
    drop(store);
    let store = open(&dir);
    assert_eq!(store.list(Kind::AppInstance).await.expect("list"), (list, 1600));
}

#[tokio::test]
async fn bad_files_are_backend_errors() {
    let dir = TempDir::new("corrupt");

    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5au8; 10_000]).expect("write");
    assert!(matches!(RedbStore::open(&garbage, StoreOptions::default()), Err(StoreError::Backend(_))));

    // Build a valid store, then damage single entries with redb directly.
    let cases: [(&str, Damage); 6] = [
        ("object not json", |txn| {
            let mut t = txn.open_table(OBJECTS).expect("table");
            t.insert("App/a", b"{not json".as_slice()).expect("insert");
        }),
        ("object without rv", |txn| {
            let mut t = txn.open_table(OBJECTS).expect("table");
            t.insert("App/a", br#"{"metadata":{}}"#.as_slice()).expect("insert");
        }),
        ("unknown kind", |txn| {
            let mut t = txn.open_table(OBJECTS).expect("table");
            t.insert("Pod/a", br#"{"metadata":{"resourceVersion":1}}"#.as_slice()).expect("insert");
        }),
        ("truncated event", |txn| {
            let mut t = txn.open_table(EVENTS).expect("table");
            t.insert(1, [1u8, 0, 3, b'A'].as_slice()).expect("insert");
        }),
        ("missing event", |txn| {
            let mut t = txn.open_table(EVENTS).expect("table");
            t.remove(1).expect("remove");
        }),
        ("future format", |txn| {
            let mut t = txn.open_table(META).expect("table");
            t.insert("format", 99).expect("insert");
        }),
    ];
    for (what, damage) in cases {
        let path = dir.path().join(format!("{}.redb", what.replace(' ', "-")));
        {
            let store = RedbStore::open(&path, StoreOptions::default()).expect("open");
            store.create(Kind::App, "a", obj("a", 0)).await.expect("create");
            store.create(Kind::App, "b", obj("b", 0)).await.expect("create");
        }
        {
            let db = redb::Database::create(&path).expect("redb open");
            let txn = db.begin_write().expect("begin");
            damage(&txn);
            txn.commit().expect("commit");
        }
        match RedbStore::open(&path, StoreOptions::default()) {
            Err(StoreError::Backend(msg)) => assert!(!msg.is_empty(), "{what}"),
            other => panic!("{what}: expected a backend error, got {other:?}"),
        }
    }
}

const OBJECTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// Damages one entry of a store file.
type Damage = fn(&redb::WriteTransaction);

#[tokio::test]
async fn single_replica_coordination() {
    let dir = TempDir::new("coord");
    {
        let store = open(&dir);
        assert_eq!(store.get_or_init("ca.key", b"first".to_vec()).await.expect("init"), b"first");
        assert_eq!(store.get_or_init("ca.key", b"second".to_vec()).await.expect("get"), b"first");
        assert_eq!(store.get_or_init("admin.token", Vec::new()).await.expect("init"), b"");
        assert_eq!(store.revision(), 0, "system values are not objects and take no revision");

        // The only replica leads at once, through the store itself.
        let leader = store.campaign("cloud-0").await.expect("campaign");
        assert!(!*leader.lost.borrow());
        let a = leader.store.create(Kind::App, "a", obj("a", 0)).await.expect("leader writes");
        assert_eq!(store.get(Kind::App, "a").await.expect("same store"), a);
        let again = store.campaign("cloud-0").await.expect("campaign again");
        assert!(!*again.lost.borrow());

        assert_eq!(store.presences().await.expect("presences"), vec![]);
        store.set_presence("cloud-1", b"b".to_vec()).await.expect("presence");
        store.set_presence("cloud-0", b"a".to_vec()).await.expect("presence");
        store.set_presence("cloud-0", b"a2".to_vec()).await.expect("presence");
        assert_eq!(
            store.presences().await.expect("presences"),
            vec![("cloud-0".to_string(), b"a2".to_vec()), ("cloud-1".to_string(), b"b".to_vec())]
        );
        // The leaders' stores are this store: drop them before reopening.
        drop((leader, again));
    }
    // System values survive a restart; presence does not.
    let store = open(&dir);
    assert_eq!(store.get_or_init("ca.key", b"third".to_vec()).await.expect("get"), b"first");
    assert_eq!(store.get_or_init("admin.token", b"x".to_vec()).await.expect("get"), b"");
    assert_eq!(store.presences().await.expect("presences"), vec![]);
    assert_eq!(store.revision(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_get_or_init_has_one_winner() {
    let dir = TempDir::new("init-race");
    let store = open(&dir);
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.get_or_init("k", vec![i]).await.expect("get_or_init") }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("task"));
    }
    seen.dedup();
    assert_eq!(seen.len(), 1, "every caller reads the first writer's bytes: {seen:?}");
}
