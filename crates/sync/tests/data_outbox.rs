//! Store-and-forward, model-based: random enqueues (sizes, priorities),
//! polls with bandwidth budgets, lost sends and lost acks, disconnects,
//! edge crashes (the outbox rebuilt from what was persisted), cloud
//! restarts (the inbox rebuilt from its persisted state), and time passing
//! the TTL. Afterwards every batch was stored by the cloud exactly once, or
//! dropped by policy and counted, or is still queued — never lost, never
//! duplicated — and drops follow the policy.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use yunbian_sync::data::{DataAction, DataInbox, DataOutbox, DataOutboxConfig, DropReason};

#[derive(Debug, Clone)]
enum Op {
    Enqueue { priority: u8, size: usize },
    Poll { budget: u64, lose_sends: bool, lose_acks: bool },
    Connect,
    Disconnect,
    CrashEdge,
    RestartCloud,
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..10, 1usize..400).prop_map(|(priority, size)| Op::Enqueue { priority, size }),
        6 => (1u64..2000, any::<bool>(), any::<bool>()).prop_map(|(budget, lose_sends, lose_acks)| Op::Poll { budget, lose_sends, lose_acks }),
        2 => Just(Op::Connect),
        1 => Just(Op::Disconnect),
        1 => Just(Op::CrashEdge),
        1 => Just(Op::RestartCloud),
        1 => (1u64..5_000).prop_map(Op::Wait),
    ]
}

struct World {
    cfg: DataOutboxConfig,
    outbox: DataOutbox,
    /// What the edge persisted: id → (priority, created, payload).
    disk: BTreeMap<u64, (u8, u64, Vec<u8>)>,
    inbox: DataInbox,
    /// The cloud's durable inbox state (written with the points).
    inbox_disk: (u64, Vec<u64>),
    /// Points the cloud stored, by batch id (must be unique).
    stored: BTreeMap<u64, Vec<u8>>,
    made: BTreeMap<u64, (u8, Vec<u8>)>,
    created: BTreeMap<u64, u64>,
    dropped: BTreeMap<u64, DropReason>,
    now: u64,
    connected: bool,
}

impl World {
    fn apply(&mut self, actions: Vec<DataAction>, lose_sends: bool, lose_acks: bool) {
        let mut acks = Vec::new();
        for a in actions {
            match a {
                DataAction::Persist(b) => {
                    self.made.insert(b.id, (b.priority, b.payload.clone()));
                    self.created.insert(b.id, b.created_ms);
                    self.disk.insert(b.id, (b.priority, b.created_ms, b.payload));
                }
                DataAction::Delete(ids) => {
                    for id in ids {
                        self.disk.remove(&id);
                    }
                }
                DataAction::Dropped { id, priority, reason } => {
                    // A batch the cloud stored but whose ack was lost may
                    // still be dropped by the edge later: its points are safe.
                    assert_eq!(self.made[&id].0, priority, "dropped batch {id} has its priority");
                    match reason {
                        // The policy: lowest priority first, oldest first among equals.
                        DropReason::Full => {
                            let least = self.disk.iter().map(|(i, (p, _, _))| (*p, *i)).min();
                            assert!(
                                least.is_none_or(|l| (priority, id) < l),
                                "dropped {id} (p{priority}) while {least:?} stays"
                            );
                        }
                        DropReason::Disk => panic!("the model never fills the disk"),
                        DropReason::Expired => {
                            let created = self.created[&id];
                            assert!(
                                self.now.saturating_sub(created) > self.cfg.ttl_ms,
                                "batch {id} dropped before its TTL"
                            );
                        }
                    }
                    assert!(self.dropped.insert(id, reason).is_none(), "batch {id} dropped twice");
                }
                DataAction::Send { id } => {
                    let (_, _, payload) = self.disk.get(&id).expect("a sent batch is on disk").clone();
                    if lose_sends {
                        continue;
                    }
                    // The cloud: dedup, store points + id together, ack.
                    if self.inbox.accept(id) {
                        assert!(self.stored.insert(id, payload).is_none(), "batch {id} stored twice");
                        self.inbox.stored(id);
                        self.inbox_disk = self.inbox.state();
                    }
                    acks.push(id);
                }
            }
        }
        if !lose_acks && self.connected && !acks.is_empty() {
            let more = self.outbox.on_ack(&acks);
            self.apply(more, false, false);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn nothing_lost_nothing_duplicated(ops in proptest::collection::vec(op(), 1..300)) {
        let cfg = DataOutboxConfig { max_bytes: 3_000, ttl_ms: 20_000, window: 4, resend_ms: 200 };
        let mut w = World {
            cfg,
            outbox: DataOutbox::new(cfg, [], 1),
            disk: BTreeMap::new(),
            inbox: DataInbox::default(),
            inbox_disk: (0, Vec::new()),
            stored: BTreeMap::new(),
            made: BTreeMap::new(),
            created: BTreeMap::new(),
            dropped: BTreeMap::new(),
            now: 1_000,
            connected: false,
        };
        for op in ops {
            w.now += 10;
            match op {
                Op::Enqueue { priority, size } => {
                    let payload = format!("batch@{}:{}", w.now, "x".repeat(size)).into_bytes();
                    let a = w.outbox.enqueue(priority, payload, w.now);
                    w.apply(a, false, false);
                }
                Op::Poll { budget, lose_sends, lose_acks } => {
                    let a = w.outbox.poll(w.now, budget);
                    w.apply(a, lose_sends, lose_acks);
                }
                Op::Connect => {
                    w.connected = true;
                    w.outbox.on_connected();
                    w.inbox.forget_below(w.outbox.first_id());
                }
                Op::Disconnect => {
                    w.connected = false;
                    w.outbox.on_disconnected();
                }
                Op::CrashEdge => {
                    let restored: Vec<(u64, u8, u64, u64)> =
                        w.disk.iter().map(|(id, (p, c, b))| (*id, *p, *c, b.len() as u64)).collect();
                    let next = w.made.keys().last().map_or(1, |id| id + 1);
                    // The driver persists the next id with each batch; a crash
                    // before any batch still restarts above every made id.
                    w.outbox = DataOutbox::new(w.cfg, restored, next);
                    w.connected = false;
                }
                Op::RestartCloud => {
                    let (floor, above) = w.inbox_disk.clone();
                    w.inbox = DataInbox::new(floor, above);
                }
                Op::Wait(ms) => w.now += ms,
            }
            let s = w.outbox.stats();
            prop_assert_eq!(s.queued as usize, w.disk.len());
            prop_assert_eq!(s.bytes, w.disk.values().map(|(_, _, b)| b.len() as u64).sum::<u64>());
        }
        // Drain on the connection as it is (no reconnect: lost sends must
        // be resent by the timer), connecting first if down.
        if !w.connected {
            w.connected = true;
            w.outbox.on_connected();
            w.inbox.forget_below(w.outbox.first_id());
        }
        for _ in 0..10_000 {
            if w.disk.is_empty() {
                break;
            }
            w.now += 50;
            let a = w.outbox.poll(w.now, 1 << 20);
            w.apply(a, false, false);
        }
        prop_assert!(w.disk.is_empty(), "outbox drains");
        // Every batch: stored (exactly once: asserted as it happens) with
        // its payload, or dropped by policy.
        let ids: BTreeSet<u64> = w.made.keys().copied().collect();
        for id in &ids {
            let stored = w.stored.get(id);
            let dropped = w.dropped.contains_key(id);
            prop_assert!(stored.is_some() || dropped, "batch {} lost", id);
            if let Some(p) = stored {
                prop_assert_eq!(p, &w.made[id].1);
            }
        }
        let s = w.outbox.stats();
        let full = w.dropped.values().filter(|r| **r == DropReason::Full).count() as u64;
        let expired = w.dropped.len() as u64 - full;
        // Counters survive only within one outbox life; they never exceed the truth.
        prop_assert!(s.dropped_full <= full && s.dropped_expired <= expired);
    }
}

#[test]
fn full_outbox_drops_lowest_priority_oldest_first_even_in_flight() {
    let cfg = DataOutboxConfig { max_bytes: 300, ttl_ms: 0, window: 1, resend_ms: 1_000 };
    let mut o = DataOutbox::new(cfg, [], 1);
    o.on_connected();
    let _ = o.enqueue(1, vec![0; 100], 1); // id 1, low priority
    let sent = o.poll(1, 1_000);
    assert_eq!(sent, vec![DataAction::Send { id: 1 }]);
    let _ = o.enqueue(1, vec![0; 100], 2); // id 2, low
    let _ = o.enqueue(9, vec![0; 100], 3); // id 3, high
    let a = o.enqueue(5, vec![0; 100], 4); // id 4: over the limit
                                           // The oldest low-priority batch goes, even in flight: a high-priority
                                           // batch never makes way for it.
    assert!(a.contains(&DataAction::Dropped { id: 1, priority: 1, reason: DropReason::Full }), "{a:?}");
    // An ack of the dropped batch is harmless.
    assert!(o.on_ack(&[1]).is_empty());
    let s = o.stats();
    assert_eq!((s.queued, s.bytes, s.dropped_full), (3, 300, 1));
}

#[test]
fn expired_batches_are_dropped_and_counted() {
    let cfg = DataOutboxConfig { max_bytes: 1 << 20, ttl_ms: 1_000, window: 4, resend_ms: 1_000 };
    let mut o = DataOutbox::new(cfg, [], 1);
    let _ = o.enqueue(5, vec![1; 10], 0);
    let _ = o.enqueue(5, vec![1; 10], 900);
    let a = o.poll(1_500, 1_000);
    assert_eq!(a[1..], [DataAction::Dropped { id: 1, priority: 5, reason: DropReason::Expired }]);
    assert_eq!(o.stats().oldest_ms, 900);
}

#[test]
fn the_inbox_recognises_old_ids_after_a_restart_and_forgets_dropped_gaps() {
    let mut i = DataInbox::default();
    for id in [1, 2, 3, 5] {
        assert!(i.accept(id));
        i.stored(id);
    }
    assert!(!i.accept(2) && !i.accept(5) && i.accept(4));
    let (floor, above) = i.state();
    assert_eq!((floor, above.clone()), (4, vec![5]));
    let mut back = DataInbox::new(floor, above);
    assert!(!back.accept(3) && !back.accept(5));
    // The edge dropped 4 and will never send it: forgetting moves past 5 too.
    back.forget_below(5);
    assert_eq!(back.state(), (6, vec![]));
}

#[test]
fn a_send_lost_on_a_live_connection_is_resent_by_the_timer() {
    let cfg = DataOutboxConfig { max_bytes: 1 << 20, ttl_ms: 0, window: 2, resend_ms: 500 };
    let mut o = DataOutbox::new(cfg, [], 1);
    o.on_connected();
    let _ = o.enqueue(5, vec![1; 10], 0);
    assert_eq!(o.poll(0, 1_000), vec![DataAction::Send { id: 1 }]);
    assert!(o.poll(400, 1_000).is_empty(), "not yet overdue");
    assert_eq!(o.poll(500, 1_000), vec![DataAction::Send { id: 1 }], "resent without a reconnect");
}

#[test]
fn a_full_disk_drops_the_lowest_priority_oldest_batch_or_the_new_one() {
    let cfg = DataOutboxConfig { max_bytes: 1 << 20, ttl_ms: 0, window: 4, resend_ms: 1_000 };
    let mut o = DataOutbox::new(cfg, [], 1);
    let _ = o.enqueue(2, vec![0; 10], 1); // id 1
    let _ = o.enqueue(7, vec![0; 10], 2); // id 2
    let _ = o.enqueue(2, vec![0; 10], 3); // id 3
                                          // Batch 4 (p5) does not fit on disk: the oldest batch of the lowest
                                          // priority at most its own goes first.
    let _ = o.enqueue(5, vec![0; 10], 4);
    let a = o.evict_for_disk(4);
    assert_eq!(
        a,
        vec![DataAction::Delete(vec![1]), DataAction::Dropped { id: 1, priority: 2, reason: DropReason::Disk }]
    );
    let a = o.evict_for_disk(4);
    assert_eq!(a[1], DataAction::Dropped { id: 3, priority: 2, reason: DropReason::Disk });
    // Only a higher-priority batch is left: it is never given up for a lower one.
    assert!(o.evict_for_disk(4).is_empty());
    let a = o.unpersisted(4);
    assert_eq!(a[1], DataAction::Dropped { id: 4, priority: 5, reason: DropReason::Disk });
    let s = o.stats();
    assert_eq!((s.queued, s.bytes, s.dropped_disk, s.dropped_full), (1, 10, 3, 0));
}

#[test]
fn a_send_the_connection_could_not_take_goes_with_the_next_poll() {
    let cfg = DataOutboxConfig { max_bytes: 1 << 20, ttl_ms: 0, window: 4, resend_ms: 60_000 };
    let mut o = DataOutbox::new(cfg, [], 1);
    o.on_connected();
    let _ = o.enqueue(5, vec![0; 10], 1);
    assert_eq!(o.poll(1, 1_000), vec![DataAction::Send { id: 1 }]);
    assert!(o.poll(2, 1_000).is_empty(), "in flight");
    o.unsend(1);
    assert_eq!(o.poll(3, 1_000), vec![DataAction::Send { id: 1 }]);
    assert_eq!(o.stats().sent, 1);
}
