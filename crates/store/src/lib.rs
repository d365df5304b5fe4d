//! The cloud's state store: a revisioned key/value store of API objects with
//! optimistic concurrency and resumable watches.
//!
//! The [`Store`] trait is the boundary. Callers (the API server, controllers,
//! the hub) only ever see this trait, so an etcd backend can replace the
//! embedded one without changing them.
//!
//! Invariants every backend keeps:
//! - Revisions are global and strictly increasing; every successful write
//!   (create, update, delete) takes the next revision.
//! - The stored JSON's `metadata.resourceVersion` equals the revision of the
//!   write that produced it.
//! - `update`/`delete` with `expected = Some(rv)` fail with
//!   [`StoreError::Conflict`] unless the object's current revision is `rv`.
//! - `watch(kind, from)` yields, in revision order, every event with
//!   revision > `from`, then live events; if `from` is older than the
//!   compaction point it fails with [`StoreError::Compacted`] and the caller
//!   relists. A watcher that falls too far behind is ended with
//!   `Err(Compacted)` as its last item rather than being buffered forever.

use std::sync::Arc;

use serde_json::Value;
use yunbian_api::Kind;

pub mod redb_store;

pub use redb_store::{RedbStore, StoreOptions};

/// One stored object.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// Kind of the object.
    pub kind: Kind,
    /// Name (unique per kind).
    pub name: String,
    /// Revision of the last write to it.
    pub revision: u64,
    /// The full object, `metadata.resourceVersion` already set to `revision`.
    pub value: Arc<Value>,
}

/// What a watch event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted (the value is the last state).
    Deleted,
}

/// One change, as seen by watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEvent {
    /// Revision of the write.
    pub revision: u64,
    /// What happened.
    pub event: EventType,
    /// The object after the write (for deletes, before it).
    pub object: StoredObject,
}

/// Errors of every backend.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// No object of that kind and name.
    #[error("{} {name} not found", kind.noun())]
    NotFound {
        /// Kind asked for.
        kind: Kind,
        /// Name asked for.
        name: String,
    },
    /// Create of a name that exists.
    #[error("{} {name} already exists", kind.noun())]
    AlreadyExists {
        /// Kind.
        kind: Kind,
        /// Name.
        name: String,
    },
    /// Optimistic-concurrency failure: the object changed since `expected`.
    #[error("{} {name} was modified (resourceVersion {current}, expected {expected}); read it again and retry", kind.noun())]
    Conflict {
        /// Kind.
        kind: Kind,
        /// Name.
        name: String,
        /// Revision the caller based its write on.
        expected: u64,
        /// The object's actual revision.
        current: u64,
    },
    /// The requested revision was compacted away; list again.
    #[error("revision {requested} has been compacted (oldest available {oldest}); list again")]
    Compacted {
        /// Revision asked for.
        requested: u64,
        /// Oldest revision a watch can still resume from.
        oldest: u64,
    },
    /// The backend failed (disk, corruption, connection).
    #[error("store backend: {0}")]
    Backend(String),
}

/// A live watch: receive until `None` (store closed) or `Some(Err(_))`.
pub type Watch = tokio::sync::mpsc::Receiver<Result<StoreEvent, StoreError>>;

/// The state store boundary.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// One object.
    async fn get(&self, kind: Kind, name: &str) -> Result<StoredObject, StoreError>;
    /// All objects of a kind, sorted by name, and the store revision the
    /// list is consistent with (resume a watch from it).
    async fn list(&self, kind: Kind) -> Result<(Vec<StoredObject>, u64), StoreError>;
    /// Creates; fails if the name exists.
    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<StoredObject, StoreError>;
    /// Replaces; `expected` enforces optimistic concurrency.
    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<StoredObject, StoreError>;
    /// Deletes; returns the last state.
    async fn delete(&self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError>;
    /// Events of `kind` (or of every kind when `None`) after `from_revision`.
    async fn watch(&self, kind: Option<Kind>, from_revision: u64) -> Result<Watch, StoreError>;
    /// The latest revision.
    fn revision(&self) -> u64;
    /// The oldest revision a watch can resume from.
    fn compacted_revision(&self) -> u64;
}
