//! Model-based test: random operation sequences against `RedbStore` and a
//! plain `BTreeMap` model, including error variants, reopening, watches and
//! compaction.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{obj, with_rv, TempDir};
use proptest::prelude::*;
use serde_json::Value;
use tokio::sync::mpsc::error::TryRecvError;
use yunbian_api::Kind;
use yunbian_store::redb_store::StoreOptions;
use yunbian_store::{EventType, RedbStore, Store, StoreError, StoreEvent, StoredObject, Watch};

const KINDS: [Kind; 3] = [Kind::Node, Kind::App, Kind::Token];
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The `expected` revision an update or delete passes.
#[derive(Debug, Clone)]
enum Expect {
    /// `None`.
    Any,
    /// The object's current revision per the model (0 when absent).
    Current,
    /// A fixed, probably wrong, revision.
    Exact(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Create(Kind, &'static str, i64),
    Update(Kind, &'static str, i64, Expect),
    Delete(Kind, &'static str, Expect),
    Get(Kind, &'static str),
    List(Kind),
    Reopen,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(KINDS.to_vec())
}

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(NAMES.to_vec())
}

fn expect() -> impl Strategy<Value = Expect> {
    prop_oneof![Just(Expect::Any), Just(Expect::Current), (0u64..12).prop_map(Expect::Exact)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (kind(), name(), 0i64..100).prop_map(|(k, n, v)| Op::Create(k, n, v)),
        3 => (kind(), name(), 0i64..100, expect()).prop_map(|(k, n, v, e)| Op::Update(k, n, v, e)),
        2 => (kind(), name(), expect()).prop_map(|(k, n, e)| Op::Delete(k, n, e)),
        1 => (kind(), name()).prop_map(|(k, n)| Op::Get(k, n)),
        1 => kind().prop_map(Op::List),
        1 => Just(Op::Reopen),
    ]
}

/// What the store should contain and have emitted.
#[derive(Default)]
struct Model {
    objects: BTreeMap<(Kind, String), StoredObject>,
    revision: u64,
    events: Vec<StoreEvent>,
}

impl Model {
    fn current(&self, kind: Kind, name: &str) -> Option<&StoredObject> {
        self.objects.get(&(kind, name.to_string()))
    }

    fn resolve(&self, kind: Kind, name: &str, e: &Expect) -> Option<u64> {
        match e {
            Expect::Any => None,
            Expect::Current => Some(self.current(kind, name).map_or(0, |o| o.revision)),
            Expect::Exact(rv) => Some(*rv),
        }
    }

    fn check(&self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError> {
        let cur = self.current(kind, name).ok_or_else(|| StoreError::NotFound { kind, name: name.to_string() })?;
        match expected {
            Some(rv) if rv != cur.revision => {
                Err(StoreError::Conflict { kind, name: name.to_string(), expected: rv, current: cur.revision })
            }
            _ => Ok(cur.clone()),
        }
    }

    fn put(&mut self, event: EventType, kind: Kind, name: &str, value: Value) -> StoredObject {
        self.revision += 1;
        let o = StoredObject {
            kind,
            name: name.to_string(),
            revision: self.revision,
            value: Arc::new(with_rv(value, self.revision)),
        };
        self.objects.insert((kind, name.to_string()), o.clone());
        self.events.push(StoreEvent { revision: self.revision, event, object: o.clone() });
        o
    }

    fn create(&mut self, kind: Kind, name: &str, value: Value) -> Result<StoredObject, StoreError> {
        if self.current(kind, name).is_some() {
            return Err(StoreError::AlreadyExists { kind, name: name.to_string() });
        }
        Ok(self.put(EventType::Added, kind, name, value))
    }

    fn update(
        &mut self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<StoredObject, StoreError> {
        self.check(kind, name, expected)?;
        Ok(self.put(EventType::Modified, kind, name, value))
    }

    fn delete(&mut self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError> {
        let last = self.check(kind, name, expected)?;
        self.revision += 1;
        self.objects.remove(&(kind, name.to_string()));
        self.events.push(StoreEvent { revision: self.revision, event: EventType::Deleted, object: last.clone() });
        Ok(last)
    }

    fn list(&self, kind: Kind) -> Vec<StoredObject> {
        self.objects.iter().filter(|((k, _), _)| *k == kind).map(|(_, o)| o.clone()).collect()
    }
}

/// Everything queued on `w` right now, and whether it has ended.
fn drain(w: &mut Watch) -> (Vec<StoreEvent>, bool) {
    let mut got = Vec::new();
    loop {
        match w.try_recv() {
            Ok(Ok(e)) => got.push(e),
            Ok(Err(e)) => panic!("watch error {e}"),
            Err(TryRecvError::Empty) => return (got, false),
            Err(TryRecvError::Disconnected) => return (got, true),
        }
    }
}

fn events_after(model: &Model, from: u64, kind: Option<Kind>) -> Vec<StoreEvent> {
    model.events.iter().filter(|e| e.revision > from && kind.is_none_or(|k| k == e.object.kind)).cloned().collect()
}

async fn run(ops: Vec<Op>, history: u64) -> Result<(), TestCaseError> {
    let dir = TempDir::new("model");
    let opts = StoreOptions { history, watch_buffer: 10_000 };
    let open = || RedbStore::open(&dir.db(), opts).expect("open store");
    let mut store = open();
    let mut model = Model::default();
    // A live watch per open store: (watch, revision it started from).
    let mut live = (store.watch(None, 0).await.expect("watch"), 0u64);

    for op in ops {
        match op {
            Op::Create(k, n, v) => {
                let got = store.create(k, n, obj(n, v)).await;
                prop_assert_eq!(got, model.create(k, n, obj(n, v)));
            }
            Op::Update(k, n, v, e) => {
                let expected = model.resolve(k, n, &e);
                let got = store.update(k, n, obj(n, v), expected).await;
                prop_assert_eq!(got, model.update(k, n, obj(n, v), expected));
            }
            Op::Delete(k, n, e) => {
                let expected = model.resolve(k, n, &e);
                let got = store.delete(k, n, expected).await;
                prop_assert_eq!(got, model.delete(k, n, expected));
            }
            Op::Get(k, n) => {
                let want = model.current(k, n).cloned().ok_or(StoreError::NotFound { kind: k, name: n.to_string() });
                prop_assert_eq!(store.get(k, n).await, want);
            }
            Op::List(k) => {
                prop_assert_eq!(store.list(k).await.expect("list"), (model.list(k), model.revision));
            }
            Op::Reopen => {
                drop(store);
                let (got, ended) = drain(&mut live.0);
                prop_assert!(ended, "watch not ended by drop");
                prop_assert_eq!(got, events_after(&model, live.1, None));
                store = open();
                live = (store.watch(None, model.revision).await.expect("watch"), model.revision);
            }
        }
        prop_assert_eq!(store.revision(), model.revision);
        prop_assert_eq!(store.compacted_revision(), model.revision.saturating_sub(history));
    }

    // The live watch saw exactly the successful writes since it started.
    let (got, ended) = drain(&mut live.0);
    prop_assert!(!ended);
    prop_assert_eq!(got, events_after(&model, live.1, None));

    // Replays from the compaction point, for all kinds and each kind.
    let compacted = store.compacted_revision();
    for kind in [None, Some(Kind::Node), Some(Kind::App), Some(Kind::Token)] {
        let mut w = store.watch(kind, compacted).await.expect("watch from the compaction point");
        let (got, _) = drain(&mut w);
        prop_assert_eq!(got, events_after(&model, compacted, kind));
    }
    if compacted > 0 {
        prop_assert_eq!(
            store.watch(None, compacted - 1).await.err(),
            Some(StoreError::Compacted { requested: compacted - 1, oldest: compacted })
        );
    }

    // And everything survives a final reopen.
    drop(store);
    let store = open();
    prop_assert_eq!(store.revision(), model.revision);
    for kind in Kind::ALL {
        prop_assert_eq!(store.list(kind).await.expect("list"), (model.list(kind), model.revision));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..30), history in prop_oneof![Just(3u64), Just(100_000u64)]) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops, history))?;
    }
}
