//! Model-based test body shared by the backends: random operation sequences
//! against a store and a plain `BTreeMap` model, including error variants,
//! reopening, a live watch checked after every write, replays and (for
//! backends with a fixed history) compaction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;
use yunbian_api::Kind;
use yunbian_store::{EventType, Store, StoreError, StoreEvent, StoredObject, Watch};

use super::{obj, with_rv};

const KINDS: [Kind; 3] = [Kind::Node, Kind::App, Kind::Token];
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The `expected` revision an update or delete passes.
#[derive(Debug, Clone)]
pub enum Expect {
    /// `None`.
    Any,
    /// The object's current revision per the model (0 when absent).
    Current,
    /// The object's revision before its last write (0 when none).
    Stale,
    /// A fixed, probably wrong, revision.
    Exact(u64),
}

#[derive(Debug, Clone)]
pub enum Op {
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
    prop_oneof![Just(Expect::Any), Just(Expect::Current), Just(Expect::Stale), (0u64..12).prop_map(Expect::Exact)]
}

/// One random operation.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (kind(), name(), 0i64..100).prop_map(|(k, n, v)| Op::Create(k, n, v)),
        3 => (kind(), name(), 0i64..100, expect()).prop_map(|(k, n, v, e)| Op::Update(k, n, v, e)),
        2 => (kind(), name(), expect()).prop_map(|(k, n, e)| Op::Delete(k, n, e)),
        1 => (kind(), name()).prop_map(|(k, n)| Op::Get(k, n)),
        1 => kind().prop_map(Op::List),
        1 => Just(Op::Reopen),
    ]
}

/// What the backend promises beyond the trait.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    /// Every write takes exactly the next revision (redb).
    pub contiguous: bool,
    /// Events kept for watches (redb's `history`), checked exactly; `None`
    /// when the backend compacts on its own schedule (etcd).
    pub history: Option<u64>,
    /// How long a watch must stay quiet to count as idle: zero when events
    /// are queued before a write returns (redb), longer when they arrive
    /// over the network (etcd).
    pub idle: Duration,
}

/// What the store should contain and have emitted.
struct Model {
    objects: BTreeMap<(Kind, String), StoredObject>,
    /// Revision of the last successful write (the store's at open before).
    revision: u64,
    events: Vec<StoreEvent>,
    /// Revision each object had before its last write.
    previous: BTreeMap<(Kind, String), u64>,
}

impl Model {
    fn current(&self, kind: Kind, name: &str) -> Option<&StoredObject> {
        self.objects.get(&(kind, name.to_string()))
    }

    fn resolve(&self, kind: Kind, name: &str, e: &Expect) -> Option<u64> {
        match e {
            Expect::Any => None,
            Expect::Current => Some(self.current(kind, name).map_or(0, |o| o.revision)),
            Expect::Stale => Some(self.previous.get(&(kind, name.to_string())).copied().unwrap_or(0)),
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

    /// The outcome the model predicts for a write; `Ok` carries the object
    /// a successful create or update returns, given its revision.
    fn predict_put(
        &self,
        kind: Kind,
        name: &str,
        value: &Value,
        create: bool,
        expected: Option<u64>,
    ) -> Result<impl Fn(u64) -> StoredObject, StoreError> {
        if create {
            if self.current(kind, name).is_some() {
                return Err(StoreError::AlreadyExists { kind, name: name.to_string() });
            }
        } else {
            self.check(kind, name, expected)?;
        }
        let (name, value) = (name.to_string(), value.clone());
        Ok(move |revision| StoredObject {
            kind,
            name: name.clone(),
            revision,
            value: Arc::new(with_rv(value.clone(), revision)),
        })
    }

    fn record(&mut self, event: StoreEvent) {
        let key = (event.object.kind, event.object.name.clone());
        if let Some(old) = self.objects.get(&key) {
            self.previous.insert(key.clone(), old.revision);
        }
        match event.event {
            EventType::Deleted => {
                self.objects.remove(&key);
            }
            EventType::Added | EventType::Modified => {
                self.objects.insert(key, event.object.clone());
            }
        }
        self.revision = event.revision;
        self.events.push(event);
    }

    fn list(&self, kind: Kind) -> Vec<StoredObject> {
        self.objects.iter().filter(|((k, _), _)| *k == kind).map(|(_, o)| o.clone()).collect()
    }

    fn events_after(&self, from: u64, kind: Option<Kind>) -> Vec<StoreEvent> {
        self.events.iter().filter(|e| e.revision > from && kind.is_none_or(|k| k == e.object.kind)).cloned().collect()
    }
}

/// Next item of a watch within 10 s (`None`: ended).
async fn recv(w: &mut Watch) -> Result<Option<Result<StoreEvent, StoreError>>, TestCaseError> {
    tokio::time::timeout(Duration::from_secs(10), w.recv()).await.map_err(|_| TestCaseError::fail("watch timed out"))
}

/// The next event of the live watch: it must be the write just made.
async fn live_event(w: &mut Watch) -> Result<StoreEvent, TestCaseError> {
    match recv(w).await? {
        Some(Ok(e)) => Ok(e),
        other => Err(TestCaseError::fail(format!("live watch: expected an event, got {other:?}"))),
    }
}

/// Fails if `w` yields anything within `backend.idle`.
async fn assert_idle(w: &mut Watch, backend: Backend) -> Result<(), TestCaseError> {
    if let Ok(item) = tokio::time::timeout(backend.idle, w.recv()).await {
        return Err(TestCaseError::fail(format!("unexpected watch item: {item:?}")));
    }
    Ok(())
}

/// Checks a new revision against the last one.
fn check_revision(backend: Backend, last: u64, new: u64) -> Result<(), TestCaseError> {
    if backend.contiguous {
        prop_assert_eq!(new, last + 1, "contiguous revisions");
    } else {
        prop_assert!(new > last, "revision {} after {}", new, last);
    }
    Ok(())
}

/// Checks a revision the store reports (list, `revision()`) against the
/// model's latest.
fn check_current(backend: Backend, got: u64, model: u64) -> Result<(), TestCaseError> {
    if backend.contiguous {
        prop_assert_eq!(got, model);
    } else {
        prop_assert!(got >= model, "store revision {} behind {}", got, model);
    }
    Ok(())
}

/// A create or an update.
struct Put {
    kind: Kind,
    name: &'static str,
    value: Value,
    /// `None` for a create.
    update: Option<Option<u64>>,
}

impl Put {
    fn create(kind: Kind, name: &'static str, v: i64) -> Put {
        Put { kind, name, value: obj(name, v), update: None }
    }

    fn update(kind: Kind, name: &'static str, v: i64, expected: Option<u64>) -> Put {
        Put { kind, name, value: obj(name, v), update: Some(expected) }
    }
}

/// Runs one create or update against the store and the model.
async fn put(
    store: &dyn Store,
    model: &mut Model,
    live: &mut Watch,
    backend: Backend,
    put: Put,
) -> Result<(), TestCaseError> {
    let Put { kind, name, value, update } = put;
    let create = update.is_none();
    let expected = update.flatten();
    let predicted = model.predict_put(kind, name, &value, create, expected);
    let got = match update {
        None => store.create(kind, name, value).await,
        Some(expected) => store.update(kind, name, value, expected).await,
    };
    match (got, predicted) {
        (Ok(o), Ok(make)) => {
            check_revision(backend, model.revision, o.revision)?;
            prop_assert_eq!(&o, &make(o.revision));
            let event = if create { EventType::Added } else { EventType::Modified };
            let want = StoreEvent { revision: o.revision, event, object: o };
            prop_assert_eq!(&live_event(live).await?, &want);
            model.record(want);
        }
        (got, predicted) => prop_assert_eq!(got, predicted.map(|make| make(0))),
    }
    Ok(())
}

/// Runs `ops` against stores opened by `open` (every call opens the same
/// store again; the first finds it empty).
pub async fn run(ops: Vec<Op>, backend: Backend, open: impl AsyncFn() -> Arc<dyn Store>) -> Result<(), TestCaseError> {
    let mut store = open().await;
    let base = store.revision();
    let mut model = Model { objects: BTreeMap::new(), revision: base, events: Vec::new(), previous: BTreeMap::new() };
    // A live watch per open store.
    let mut live = store.watch(None, base).await.expect("watch");

    for op in ops {
        match op {
            Op::Create(k, n, v) => put(&*store, &mut model, &mut live, backend, Put::create(k, n, v)).await?,
            Op::Update(k, n, v, e) => {
                let expected = model.resolve(k, n, &e);
                put(&*store, &mut model, &mut live, backend, Put::update(k, n, v, expected)).await?;
            }
            Op::Delete(k, n, e) => {
                let expected = model.resolve(k, n, &e);
                let got = store.delete(k, n, expected).await;
                let predicted = model.check(k, n, expected);
                prop_assert_eq!(&got, &predicted);
                if let Ok(last) = got {
                    // The delete's own revision is only seen by watchers.
                    let ev = live_event(&mut live).await?;
                    check_revision(backend, model.revision, ev.revision)?;
                    let want = StoreEvent { revision: ev.revision, event: EventType::Deleted, object: last };
                    prop_assert_eq!(&ev, &want);
                    model.record(want);
                }
            }
            Op::Get(k, n) => {
                let want = model.current(k, n).cloned().ok_or(StoreError::NotFound { kind: k, name: n.to_string() });
                prop_assert_eq!(store.get(k, n).await, want);
            }
            Op::List(k) => {
                let (list, rev) = store.list(k).await.expect("list");
                prop_assert_eq!(list, model.list(k));
                check_current(backend, rev, model.revision)?;
            }
            Op::Reopen => {
                drop(store);
                prop_assert!(recv(&mut live).await?.is_none(), "watch not ended by drop");
                store = open().await;
                live = store.watch(None, model.revision).await.expect("watch");
            }
        }
        check_current(backend, store.revision(), model.revision)?;
        if let Some(history) = backend.history {
            prop_assert_eq!(store.compacted_revision(), model.revision.saturating_sub(history));
        }
    }

    // The live watch saw nothing but the successful writes.
    assert_idle(&mut live, backend).await?;

    // Replays from as far back as possible, for all kinds and each kind.
    let from = base.max(store.compacted_revision());
    for kind in [None, Some(Kind::Node), Some(Kind::App), Some(Kind::Token)] {
        let mut w = store.watch(kind, from).await.expect("watch from the compaction point");
        for want in model.events_after(from, kind) {
            match recv(&mut w).await? {
                Some(Ok(got)) => prop_assert_eq!(got, want),
                other => return Err(TestCaseError::fail(format!("replay: expected {want:?}, got {other:?}"))),
            }
        }
        assert_idle(&mut w, backend).await?;
    }
    if backend.history.is_some() {
        let compacted = store.compacted_revision();
        if compacted > 0 {
            prop_assert_eq!(
                store.watch(None, compacted - 1).await.err(),
                Some(StoreError::Compacted { requested: compacted - 1, oldest: compacted })
            );
        }
    }

    // And everything survives a final reopen.
    drop(store);
    let store = open().await;
    check_current(backend, store.revision(), model.revision)?;
    for kind in Kind::ALL {
        let (list, rev) = store.list(kind).await.expect("list");
        prop_assert_eq!(list, model.list(kind));
        check_current(backend, rev, model.revision)?;
    }
    Ok(())
}
