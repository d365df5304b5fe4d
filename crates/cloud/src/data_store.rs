//! Where the cloud keeps the data edges ship (store-and-forward batches):
//! the [`DataStore`] trait, so a deployment that outgrows one machine can
//! route data to an external time-series database, and the built-in
//! implementation on the same engine as the edge's store.
//!
//! Invariant: [`DataStore::ingest`] stores a batch's points and records its
//! id atomically, and answers [`Ingested::Duplicate`] for an id it stored
//! before — across restarts — so an edge's retry never duplicates points.

use yunbian_tsdb::SeriesPoints;

/// What [`DataStore::ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// The points are durably stored (some may have been rejected by the
    /// store's rules, e.g. too old or out of order; they are counted).
    Stored {
        /// Points stored.
        accepted: u64,
        /// Points refused.
        rejected: u64,
    },
    /// The batch was stored before; nothing was written.
    Duplicate,
}

/// Why a batch could not be stored (the edge keeps it and sends it again).
#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    /// The store failed (I/O, full disk, memory cap).
    #[error("data store: {0}")]
    Store(String),
    /// The batch's bytes are not a valid batch.
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// The cloud's data store. Calls block (disk I/O): call them from blocking
/// threads.
pub trait DataStore: Send + Sync + 'static {
    /// Stores batch `id` of `node` — its points with a `node` tag set to
    /// `node` (replacing any the edge set) — unless it was stored before.
    /// `first_id` is the edge's lowest unacknowledged id: ids below it are
    /// never sent again and their dedup records may be forgotten. Calls for
    /// one node are serialized by the caller.
    fn ingest(&self, node: &str, id: u64, first_id: u64, series: Vec<SeriesPoints>) -> Result<Ingested, DataStoreError>;
}
