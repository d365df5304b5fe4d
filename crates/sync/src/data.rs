//! Store-and-forward of data to the cloud, sans-IO: the edge's
//! [`DataOutbox`] (persisted, ordered, bounded, with an explicit drop
//! policy) and the cloud's [`DataInbox`] (deduplication by batch id).
//!
//! A batch is an opaque, encoded set of points with a node-unique id that
//! only grows, a priority (0–9) and a creation time. Protocol:
//! - the edge persists a batch before anything else ([`DataAction::Persist`]);
//! - when connected it sends batches in id order, at most `window` in
//!   flight and no more bytes per poll than the caller's bandwidth budget;
//! - the cloud stores a batch's points and the batch id in one transaction,
//!   then acknowledges it; the edge deletes acknowledged batches;
//! - after a reconnect every unacknowledged batch is sent again; the cloud
//!   recognises ids it already stored ([`DataInbox::accept`]) and only acks
//!   them, so a retry never duplicates points.
//!
//! - a batch in flight for longer than `resend_ms` is sent again (a send
//!   lost on a live connection must not wait for a reconnect).
//!
//! Limits: total bytes and age (TTL). Past them the outbox drops whole
//! batches — expired ones first, then the lowest priority, oldest first
//! among equals, in flight or not (a batch the cloud stored but did not
//! acknowledge yet is safe anyway) — and every drop is counted by reason
//! and returned as [`DataAction::Dropped`] so it can be reported.
//!
//! Ids: a driver whose persisted outbox was lost (a rebuilt local store)
//! must start ids above every id it ever used — e.g. at the current Unix
//! time in microseconds — or the cloud would take new batches for old ones.

use std::collections::{BTreeMap, BTreeSet};

/// A batch of data on its way to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBatch {
    /// Node-unique, increasing id.
    pub id: u64,
    /// 0–9; higher is kept longer.
    pub priority: u8,
    /// When it was made (Unix ms).
    pub created_ms: u64,
    /// Encoded points (opaque here).
    pub payload: Vec<u8>,
}

/// Why a batch was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// Older than the TTL.
    Expired,
    /// The outbox was over its byte limit.
    Full,
    /// The disk had no room: the batch could not be written, or an older,
    /// lower-priority batch was deleted to make room for a new one.
    Disk,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataAction {
    /// Write the batch durably (before it is ever sent).
    Persist(DataBatch),
    /// Send it (the driver reads the payload back from where it persisted it).
    Send {
        /// Batch id.
        id: u64,
    },
    /// Delete these persisted batches (acknowledged or dropped).
    Delete(Vec<u64>),
    /// A batch was dropped by policy (already included in a `Delete`).
    Dropped {
        /// Batch id.
        id: u64,
        /// Its priority.
        priority: u8,
        /// Why.
        reason: DropReason,
    },
}

/// Limits of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOutboxConfig {
    /// Most bytes of payload kept.
    pub max_bytes: u64,
    /// Batches older than this are dropped (0: never).
    pub ttl_ms: u64,
    /// Batches in flight (sent, not acknowledged).
    pub window: usize,
    /// A batch unacknowledged this long after its send is sent again.
    pub resend_ms: u64,
}

impl Default for DataOutboxConfig {
    fn default() -> Self {
        DataOutboxConfig { max_bytes: 256 << 20, ttl_ms: 7 * 86_400_000, window: 16, resend_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    priority: u8,
    created_ms: u64,
    size: u64,
}

/// Counters of an outbox (reported in node status and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Batches queued (including in flight).
    pub queued: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Creation time of the oldest queued batch (Unix ms; 0 when empty).
    pub oldest_ms: u64,
    /// Batches sent (including resends).
    pub sent: u64,
    /// Batches acknowledged.
    pub acked: u64,
    /// Dropped because they expired.
    pub dropped_expired: u64,
    /// Dropped because the outbox was full.
    pub dropped_full: u64,
    /// Dropped because the disk was full.
    pub dropped_disk: u64,
}

/// The edge side: batches not yet acknowledged by the cloud.
#[derive(Debug, Clone)]
pub struct DataOutbox {
    cfg: DataOutboxConfig,
    queue: BTreeMap<u64, Meta>,
    /// Id → when it was (last) sent.
    inflight: BTreeMap<u64, u64>,
    connected: bool,
    bytes: u64,
    next_id: u64,
    stats: DataStats,
}

impl DataOutbox {
    /// An outbox holding `restored` (id, priority, created, size) batches
    /// read back from disk; new ids start above `next_id` and above them.
    pub fn new(cfg: DataOutboxConfig, restored: impl IntoIterator<Item = (u64, u8, u64, u64)>, next_id: u64) -> Self {
        let mut o = DataOutbox {
            cfg,
            queue: BTreeMap::new(),
            inflight: BTreeMap::new(),
            connected: false,
            bytes: 0,
            next_id: next_id.max(1),
            stats: DataStats::default(),
        };
        for (id, priority, created_ms, size) in restored {
            o.queue.insert(id, Meta { priority, created_ms, size });
            o.bytes += size;
            o.next_id = o.next_id.max(id + 1);
        }
        o
    }

    /// The id the next batch gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The lowest id still queued (or the next id when empty): the cloud
    /// may forget every id below it ([`DataInbox::forget_below`]), since
    /// none will be sent again.
    pub fn first_id(&self) -> u64 {
        self.queue.keys().next().copied().unwrap_or(self.next_id)
    }

    /// Queues a new batch of `payload`; returns the actions (persist it, and
    /// drop what the limits require).
    pub fn enqueue(&mut self, priority: u8, payload: Vec<u8>, now_ms: u64) -> Vec<DataAction> {
        let size = payload.len() as u64;
        self.enqueue_sized(priority, payload, size, now_ms)
    }

    /// [`DataOutbox::enqueue`] of a batch that costs `size` bytes against
    /// the limit (what it takes on disk: headers, file-system blocks).
    pub fn enqueue_sized(&mut self, priority: u8, payload: Vec<u8>, size: u64, now_ms: u64) -> Vec<DataAction> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out =
            vec![DataAction::Persist(DataBatch { id, priority: priority.min(9), created_ms: now_ms, payload })];
        self.queue.insert(id, Meta { priority: priority.min(9), created_ms: now_ms, size });
        self.bytes += size;
        self.enforce(now_ms, &mut out);
        out
    }

    /// Drops expired batches, then the lowest priority (oldest first) until
    /// the bytes fit.
    fn enforce(&mut self, now_ms: u64, out: &mut Vec<DataAction>) {
        let mut dropped: Vec<(u64, u8, DropReason)> = Vec::new();
        if self.cfg.ttl_ms > 0 {
            // Oldest first: ids grow with creation time, so the scan stops
            // at the first batch still within its TTL (O(expired), not
            // O(queued), on every poll).
            let expired: Vec<u64> = self
                .queue
                .iter()
                .take_while(|(_, m)| now_ms.saturating_sub(m.created_ms) > self.cfg.ttl_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Some(m) = self.remove(id) {
                    dropped.push((id, m.priority, DropReason::Expired));
                }
            }
        }
        while self.bytes > self.cfg.max_bytes {
            let victim = self.queue.iter().min_by_key(|(id, m)| (m.priority, **id)).map(|(id, _)| *id);
            let Some(id) = victim else { break };
            if let Some(m) = self.remove(id) {
                dropped.push((id, m.priority, DropReason::Full));
            }
        }
        self.report_drops(dropped, out);
    }

    fn report_drops(&mut self, dropped: Vec<(u64, u8, DropReason)>, out: &mut Vec<DataAction>) {
        if dropped.is_empty() {
            return;
        }
        out.push(DataAction::Delete(dropped.iter().map(|(id, _, _)| *id).collect()));
        for (id, priority, reason) in dropped {
            match reason {
                DropReason::Expired => self.stats.dropped_expired += 1,
                DropReason::Full => self.stats.dropped_full += 1,
                DropReason::Disk => self.stats.dropped_disk += 1,
            }
            out.push(DataAction::Dropped { id, priority, reason });
        }
    }

    /// Batch `id` could not be persisted (its `Persist` failed): it is
    /// dropped for lack of disk. Returns the drop (and a `Delete` of
    /// whatever part of it was written).
    pub fn unpersisted(&mut self, id: u64) -> Vec<DataAction> {
        let mut out = Vec::new();
        if let Some(m) = self.remove(id) {
            self.report_drops(vec![(id, m.priority, DropReason::Disk)], &mut out);
        }
        out
    }

    /// Makes room on a full disk for batch `new_id`: drops the queued batch
    /// the policy gives up first (lowest priority, then oldest) among those
    /// of priority at most `new_id`'s, other than `new_id` itself. Empty
    /// when there is none (the new batch is then the one to drop).
    pub fn evict_for_disk(&mut self, new_id: u64) -> Vec<DataAction> {
        let mut out = Vec::new();
        let Some(limit) = self.queue.get(&new_id).map(|m| m.priority) else { return out };
        let victim = self
            .queue
            .iter()
            .filter(|(id, m)| **id != new_id && m.priority <= limit)
            .min_by_key(|(id, m)| (m.priority, **id))
            .map(|(id, _)| *id);
        if let Some(id) = victim {
            if let Some(m) = self.remove(id) {
                self.report_drops(vec![(id, m.priority, DropReason::Disk)], &mut out);
            }
        }
        out
    }

    /// A `Send` could not be handed to the connection (its queue was
    /// full): the batch is no longer in flight and goes with a later poll.
    pub fn unsend(&mut self, id: u64) {
        if self.inflight.remove(&id).is_some() {
            self.stats.sent = self.stats.sent.saturating_sub(1);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Meta> {
        let m = self.queue.remove(&id)?;
        self.bytes -= m.size;
        self.inflight.remove(&id);
        Some(m)
    }

    /// The connection is up: everything unacknowledged is sent again.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.inflight.clear();
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.inflight.clear();
    }

    /// The cloud stored these batches.
    pub fn on_ack(&mut self, ids: &[u64]) -> Vec<DataAction> {
        let mut done = Vec::new();
        for id in ids {
            if self.remove(*id).is_some() {
                self.stats.acked += 1;
                done.push(*id);
            }
        }
        if done.is_empty() {
            Vec::new()
        } else {
            vec![DataAction::Delete(done)]
        }
    }

    /// What to send now: batches in id order, within the window and a
    /// budget of `budget_bytes` (at least one batch when nothing is in
    /// flight, so a batch larger than the budget still goes). Also applies
    /// the TTL.
    pub fn poll(&mut self, now_ms: u64, budget_bytes: u64) -> Vec<DataAction> {
        let mut out = Vec::new();
        self.enforce(now_ms, &mut out);
        if !self.connected {
            return out;
        }
        let mut spent = 0u64;
        // Overdue batches first: sent again in place (they keep their slot).
        let overdue: Vec<(u64, u64)> = self
            .inflight
            .iter()
            .filter(|(_, sent)| now_ms.saturating_sub(**sent) >= self.cfg.resend_ms)
            .filter_map(|(id, _)| Some((*id, self.queue.get(id)?.size)))
            .collect();
        for (id, size) in overdue {
            if spent > 0 && spent + size > budget_bytes {
                return out;
            }
            spent += size;
            self.inflight.insert(id, now_ms);
            self.stats.sent += 1;
            out.push(DataAction::Send { id });
        }
        let room = self.cfg.window.max(1).saturating_sub(self.inflight.len());
        let candidates: Vec<(u64, u64)> = self
            .queue
            .iter()
            .filter(|(id, _)| !self.inflight.contains_key(id))
            .take(room)
            .map(|(id, m)| (*id, m.size))
            .collect();
        for (id, size) in candidates {
            if self.inflight.len() >= self.cfg.window.max(1) {
                break;
            }
            if spent + size > budget_bytes && spent > 0 {
                break;
            }
            spent += size;
            self.inflight.insert(id, now_ms);
            self.stats.sent += 1;
            out.push(DataAction::Send { id });
        }
        out
    }

    /// Applies the TTL only (no sends): for a driver with no bandwidth to
    /// spend now.
    pub fn expire(&mut self, now_ms: u64) -> Vec<DataAction> {
        let mut out = Vec::new();
        self.enforce(now_ms, &mut out);
        out
    }

    /// Counters and backlog.
    pub fn stats(&self) -> DataStats {
        DataStats {
            queued: self.queue.len() as u64,
            bytes: self.bytes,
            oldest_ms: self.queue.values().next().map_or(0, |m| m.created_ms),
            ..self.stats
        }
    }
}

/// The cloud side, per node: which batch ids are already stored.
///
/// Ids below `floor` are all stored or were dropped by the edge (never to
/// be sent again); `above` holds stored ids at or above it. The floor moves
/// up over contiguous stored ids and is persisted with the points, so a
/// restarted cloud still recognises old batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataInbox {
    floor: u64,
    above: BTreeSet<u64>,
}

impl Default for DataInbox {
    /// Nothing stored yet (edge ids start at 1).
    fn default() -> Self {
        DataInbox { floor: 1, above: BTreeSet::new() }
    }
}

impl DataInbox {
    /// An inbox that has stored every id below `floor` and the ids in `above`.
    pub fn new(floor: u64, above: impl IntoIterator<Item = u64>) -> Self {
        let mut i = DataInbox { floor, above: above.into_iter().filter(|id| *id >= floor).collect() };
        i.advance();
        i
    }

    /// Whether batch `id` is new (not stored yet). The caller stores its
    /// points and records it with [`DataInbox::stored`] before looking at
    /// another batch of the same node (one connection per node serves its
    /// batches in order), so an id is stored at most once.
    ///
    /// The set above the floor is bounded by what the edge sends between
    /// two connections' [`DataInbox::forget_below`] (its window and resends).
    pub fn accept(&self, id: u64) -> bool {
        id >= self.floor && !self.above.contains(&id)
    }

    /// Batch `id` is durably stored.
    pub fn stored(&mut self, id: u64) {
        if id >= self.floor {
            self.above.insert(id);
            self.advance();
        }
    }

    fn advance(&mut self) {
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// The edge will never send an id below `id` again (its
    /// [`DataOutbox::first_id`]): gaps below it are batches it dropped.
    pub fn forget_below(&mut self, id: u64) {
        if id > self.floor {
            self.floor = id;
            self.above = self.above.split_off(&id);
            self.advance();
        }
    }

    /// The persisted form: `(floor, ids above it)`.
    pub fn state(&self) -> (u64, Vec<u64>) {
        (self.floor, self.above.iter().copied().collect())
    }
}
