//! The cloud's state store: a revisioned key/value store of API objects with
//! optimistic concurrency and resumable watches.
//!
//! The [`Store`] trait is the boundary. Callers (the API server, controllers,
//! the hub) only ever see this trait, so an etcd backend can replace the
//! embedded one without changing them.
//!
//! Invariants every backend keeps:
//! - Revisions are global and strictly increasing; every successful write
//!   (create, update, delete) takes a revision greater than every revision
//!   seen before it. They need not be contiguous: etcd's revision also moves
//!   on for writes to keys that are not objects (leases, leader, presence)
//!   or that belong to another user of the same etcd.
//! - The stored JSON's `metadata.resourceVersion` equals the revision of the
//!   write that produced it.
//! - `update`/`delete` with `expected = Some(rv)` fail with
//!   [`StoreError::Conflict`] unless the object's current revision is `rv`.
//! - `watch(kind, from)` yields, in revision order, every event with
//!   revision > `from`, then live events; if `from` is older than the
//!   compaction point it fails with [`StoreError::Compacted`] and the caller
//!   relists. A watcher that falls too far behind is ended with
//!   `Err(Compacted)` as its last item rather than being buffered forever.
//!   A watch whose backend connection broke ends with `Err(Backend)`; the
//!   caller relists (or watches again from the last revision it saw).
//!
//! The [`Coordinator`] trait is what several cloud replicas on one store
//! share besides objects: cluster-wide secrets written once, one leader at a
//! time whose writes are fenced, and a presence record per live replica.
//! [`RedbStore`] implements it for a single replica; `etcd::EtcdStore`
//! (cargo feature `etcd`) for many.

use std::sync::Arc;

use serde_json::Value;
use yunbian_api::Kind;

#[cfg(feature = "etcd")]
pub mod etcd;
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
    /// A write by a replica that no longer holds leadership was refused;
    /// nothing was written. The replica must stop acting as the leader.
    #[error("not the leader: {0}")]
    Fenced(String),
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

/// What several cloud replicas on one store share besides objects.
#[async_trait::async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// The bytes stored under the cluster-wide `key` (e.g. `"ca.key"`,
    /// `"admin.token"`), storing `init` first if the key is absent. The first
    /// writer wins: every replica then reads the same bytes, whatever `init`
    /// it offered.
    async fn get_or_init(&self, key: &str, init: Vec<u8>) -> Result<Vec<u8>, StoreError>;
    /// Waits until `replica` is the leader. The returned [`Leadership`]'s
    /// `store` is a view of this store whose every write is fenced: once
    /// leadership is lost, writes through it fail with
    /// [`StoreError::Fenced`] and change nothing. Fails (with
    /// [`StoreError::Backend`]) when the backend cannot be reached; call it
    /// again.
    async fn campaign(&self, replica: &str) -> Result<Leadership, StoreError>;
    /// Publishes `data` as `replica`'s presence record, replacing its
    /// previous one. The record vanishes, within the lease TTL, once the
    /// replica dies (stops refreshing it).
    async fn set_presence(&self, replica: &str, data: Vec<u8>) -> Result<(), StoreError>;
    /// Presence records of the live replicas, `(replica, data)`, sorted by
    /// replica.
    async fn presences(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Leadership held by one replica, from [`Coordinator::campaign`].
///
/// Dropping every clone of `store` gives leadership up (the etcd backend
/// revokes its lease, so another replica takes over at once).
pub struct Leadership {
    /// The fenced view of the store: writes fail with
    /// [`StoreError::Fenced`] once leadership is lost.
    pub store: Arc<dyn Store>,
    /// Becomes `true` when leadership is lost (lease expired or revoked,
    /// leader key deleted or replaced). Never changes for a single-replica
    /// store.
    pub lost: tokio::sync::watch::Receiver<bool>,
    /// Identifies the term, for logs: with etcd, the revision at which the
    /// leader key was created (a greater term is a later leader); with redb,
    /// the store's revision when the campaign returned.
    pub term: u64,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("term", &self.term).field("lost", &*self.lost.borrow()).finish()
    }
}
