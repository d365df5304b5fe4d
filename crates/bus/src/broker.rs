//! The broker's shared state: sessions, the subscription index, retained
//! messages, and routing. Used by every connection task and by the
//! in-process API.
//!
//! Locks are `std` mutexes held for short, non-async sections and always
//! taken in this order: `sessions` → a session's state → `router` →
//! `retained`. Routing takes the router's read lock only to collect the
//! matching subscribers, releases it, then locks each subscriber's session
//! in turn to queue the message: a publisher never waits on a slow
//! subscriber's socket, only on a short queue push.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::codec::{Properties, QoS, RetainHandling, SubscriptionOptions};
use crate::config::Limits;
use crate::router::{Entry, Router, Sink, SubscriberId};
use crate::session::{Delivery, Msg, Session, StoredSub};
use crate::stats::{BrokerStats, DropReason};
use crate::topic::{parse_subscription_filter, SubscriptionFilter};
use crate::Message;

/// Retained messages by topic, bounded in count and bytes.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    map: HashMap<String, Arc<Msg>>,
    bytes: usize,
}

fn retained_size(m: &Msg) -> usize {
    m.topic.len() + m.payload.len()
}

impl Retained {
    /// Stores, replaces or (empty payload) clears the retained message of
    /// the message's topic.
    fn set(&mut self, msg: &Arc<Msg>, limits: &Limits, stats: &BrokerStats) {
        let old = self.map.get(&msg.topic).map(|m| retained_size(m));
        if msg.payload.is_empty() {
            if let Some(size) = old {
                self.map.remove(&msg.topic);
                self.bytes -= size;
            }
            return;
        }
        let size = retained_size(msg);
        let bytes_after = self.bytes - old.unwrap_or(0) + size;
        let count_after = self.map.len() + usize::from(old.is_none());
        if bytes_after > limits.max_retained_bytes || count_after > limits.max_retained_messages {
            stats.drop(DropReason::RetainedLimit, &msg.topic);
            return;
        }
        self.map.insert(msg.topic.clone(), msg.clone());
        self.bytes = bytes_after;
    }

    /// Retained messages matching a plain filter; expired ones are removed.
    fn matching(&mut self, filter: &str, now: Instant) -> Vec<Arc<Msg>> {
        let mut expired = Vec::new();
        let mut out = Vec::new();
        for (topic, m) in &self.map {
            if crate::topic::filter_matches(filter, topic) {
                if m.remaining_expiry(now).is_err() {
                    expired.push(topic.clone());
                } else {
                    out.push(m.clone());
                }
            }
        }
        for t in expired {
            if let Some(m) = self.map.remove(&t) {
                self.bytes -= retained_size(&m);
            }
        }
        out
    }
}

/// State shared by the listeners, the connections and the API.
#[derive(Debug)]
pub(crate) struct Shared {
    pub limits: Limits,
    pub stats: BrokerStats,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    router: RwLock<Router>,
    retained: Mutex<Retained>,
    next_local_id: AtomicU64,
    next_generation: AtomicU64,
    pub shutdown: watch::Sender<bool>,
    /// Running tasks (listeners, connections, timers), for shutdown.
    tasks: AtomicUsize,
    tasks_done: Notify,
}

/// Held by every spawned task; shutdown waits until all are dropped.
pub(crate) struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.tasks_done.notify_waiters();
        }
    }
}

/// What [`Shared::open_session`] decided.
pub(crate) enum Opened {
    /// The session (`true`: it existed and was resumed) and its generation.
    Ok(Arc<Session>, bool, u64),
    /// Every session slot is taken by a connected client.
    Full,
}

impl Shared {
    pub fn new(limits: Limits) -> Arc<Shared> {
        Arc::new(Shared {
            limits,
            stats: BrokerStats::default(),
            sessions: Mutex::new(HashMap::new()),
            router: RwLock::new(Router::default()),
            retained: Mutex::new(Retained::default()),
            next_local_id: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
        })
    }

    pub fn task_guard(self: &Arc<Self>) -> TaskGuard {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        TaskGuard(self.clone())
    }

    /// Waits until every task holding a [`TaskGuard`] has ended.
    pub async fn tasks_ended(&self) {
        loop {
            let notified = self.tasks_done.notified();
            if self.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn router_read(&self) -> std::sync::RwLockReadGuard<'_, Router> {
        self.router.read().unwrap_or_else(|p| p.into_inner())
    }

    fn router_write(&self) -> std::sync::RwLockWriteGuard<'_, Router> {
        self.router.write().unwrap_or_else(|p| p.into_inner())
    }

    fn retained(&self) -> MutexGuard<'_, Retained> {
        self.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> crate::BrokerStatsSnapshot {
        let mut s = self.stats.snapshot();
        s.sessions = self.sessions().len() as u64;
        s.subscriptions = self.router_read().len() as u64;
        let r = self.retained();
        s.retained_messages = r.map.len() as u64;
        s.retained_bytes = r.bytes as u64;
        s
    }

    // ------------------------------------------------------------ routing

    /// Stores a retained message (if flagged) and delivers `msg` to every
    /// matching subscriber. Returns how many subscribers it was given to.
    pub fn route(&self, msg: Arc<Msg>) -> usize {
        StatsAdd::messages_in(&self.stats);
        if msg.retain {
            self.retained().set(&msg, &self.limits, &self.stats);
        }
        let mut targets = Vec::new();
        self.router_read().matches(&msg.topic, &mut targets);
        if targets.is_empty() {
            return 0;
        }
        // No-local, then one delivery per session (overlapping filters:
        // highest QoS, every subscription identifier).
        if let Some(p) = &msg.publisher {
            targets.retain(|e| !(e.options.no_local && matches!(&e.id, SubscriberId::Client(c) if c == p)));
        }
        if targets.len() > 1 {
            targets.sort_by_key(entry_key);
        }
        let mut delivered = 0;
        let mut i = 0;
        while i < targets.len() {
            let mut j = i + 1;
            while j < targets.len() && entry_key(&targets[j]) == entry_key(&targets[i]) {
                j += 1;
            }
            delivered += 1;
            let group = &targets[i..j];
            let granted = group.iter().map(|e| e.options.qos).max().unwrap_or(QoS::AtMostOnce);
            let rap = group.iter().any(|e| e.options.retain_as_published);
            let sub_ids: Vec<u32> = group.iter().filter_map(|e| e.sub_id).collect();
            let qos = granted.min(msg.qos);
            let retain = rap && msg.retain;
            self.deliver(&group[0].sink, Delivery { msg: msg.clone(), qos, retain, sub_ids });
            i = j;
        }
        delivered
    }

    fn deliver(&self, sink: &Sink, d: Delivery) {
        match sink {
            Sink::Session(s) => s.enqueue(d, self.limits.max_queued_messages, &self.stats),
            Sink::Local(tx) => {
                let mut properties = d.msg.properties.clone();
                match d.msg.remaining_expiry(Instant::now()) {
                    Ok(e) => properties.message_expiry_interval = e,
                    Err(()) => {
                        self.stats.drop(DropReason::Expired, "local");
                        return;
                    }
                }
                properties.subscription_identifiers = d.sub_ids;
                let m = Message {
                    topic: d.msg.topic.clone(),
                    payload: d.msg.payload.clone(),
                    qos: d.qos,
                    retain: d.retain,
                    properties,
                };
                match tx.try_send(m) {
                    Ok(()) => StatsAdd::messages_out(&self.stats, 1),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.stats.drop(DropReason::LocalSubscriberFull, &d.msg.topic)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
    }

    /// Publishes from inside the process.
    pub fn publish_local(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
    ) -> Result<(), crate::BusError> {
        if !crate::topic::valid_topic_name(topic) {
            return Err(crate::BusError::InvalidTopic(topic.to_owned()));
        }
        if *self.shutdown.borrow() {
            return Err(crate::BusError::ShuttingDown);
        }
        let msg = Msg {
            topic: topic.to_owned(),
            payload,
            qos,
            retain,
            properties,
            received: Instant::now(),
            publisher: None,
        };
        self.route(Arc::new(msg));
        Ok(())
    }

    // ------------------------------------------------------- subscriptions

    /// Adds a subscription of `session` and returns the SUBACK code and the
    /// retained messages to send. `None`: the per-client limit is reached.
    pub fn subscribe_session(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> Option<Vec<Delivery>> {
        let parsed = parse_subscription_filter(filter)?;
        let existed = {
            let mut st = session.lock();
            let existed = st.subscriptions.contains_key(filter);
            if !existed && st.subscriptions.len() >= self.limits.max_subscriptions_per_client {
                drop(st);
                self.stats.drop(DropReason::MaxSubscriptions, &session.client_id);
                return None;
            }
            st.subscriptions.insert(filter.to_owned(), StoredSub { options, sub_id });
            existed
        };
        let entry = Entry {
            id: SubscriberId::Client(session.client_id.clone()),
            sink: Sink::Session(session.clone()),
            options,
            sub_id,
        };
        self.router_write().insert(&parsed, entry);
        let send_retained = match options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        let SubscriptionFilter::Plain(plain) = parsed else { return Some(Vec::new()) };
        if !send_retained {
            return Some(Vec::new());
        }
        let msgs = self.retained().matching(plain, Instant::now());
        Some(
            msgs.into_iter()
                .map(|msg| Delivery {
                    qos: msg.qos.min(options.qos),
                    retain: true,
                    sub_ids: sub_id.into_iter().collect(),
                    msg,
                })
                .collect(),
        )
    }

    /// Removes a subscription of `session`; true if it existed.
    pub fn unsubscribe_session(&self, session: &Arc<Session>, filter: &str) -> bool {
        let had = session.lock().subscriptions.remove(filter).is_some();
        if let Some(parsed) = parse_subscription_filter(filter) {
            self.router_write().remove(&parsed, &SubscriberId::Client(session.client_id.clone()));
        }
        had
    }

    /// Adds an in-process subscription; returns its id and receiver.
    pub fn subscribe_local(
        &self,
        filter: &str,
        capacity: usize,
    ) -> Result<(u64, mpsc::Receiver<Message>), crate::BusError> {
        let parsed =
            parse_subscription_filter(filter).ok_or_else(|| crate::BusError::InvalidFilter(filter.to_owned()))?;
        if *self.shutdown.borrow() {
            return Err(crate::BusError::ShuttingDown);
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_local_id.fetch_add(1, Ordering::Relaxed);
        let options = SubscriptionOptions::qos(QoS::ExactlyOnce);
        self.router_write().insert(
            &parsed,
            Entry { id: SubscriberId::Local(id), sink: Sink::Local(tx.clone()), options, sub_id: None },
        );
        if let SubscriptionFilter::Plain(plain) = parsed {
            let sink = Sink::Local(tx);
            for msg in self.retained().matching(plain, Instant::now()) {
                self.deliver(&sink, Delivery { qos: msg.qos, retain: true, sub_ids: Vec::new(), msg });
            }
        }
        Ok((id, rx))
    }

    pub fn unsubscribe_local(&self, id: u64, filter: &str) {
        if let Some(parsed) = parse_subscription_filter(filter) {
            self.router_write().remove(&parsed, &SubscriberId::Local(id));
        }
    }

    /// Closes every in-process subscription (shutdown).
    pub fn clear_router(&self) {
        self.router_write().clear();
    }

    // ------------------------------------------------------------ sessions

    /// Finds or creates the session of `client_id` for a new connection,
    /// kicking a connection that still owns it (takeover).
    pub fn open_session(
        &self,
        client_id: &str,
        clean_start: bool,
        protocol: crate::codec::Protocol,
        kick: Arc<Notify>,
    ) -> Opened {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let mut sessions = self.sessions();
        let existing = sessions.get(client_id).cloned();
        if let Some(old) = &existing {
            let st = old.lock();
            if let Some(link) = &st.conn {
                link.kick.notify_one();
            }
        }
        let resumed = match existing {
            Some(old) if !clean_start && !old.lock().ended => Some(old),
            Some(old) => {
                sessions.remove(client_id);
                self.end_session(&old);
                None
            }
            None => None,
        };
        let (session, present) = match resumed {
            Some(s) => (s, true),
            None => {
                if sessions.len() >= self.limits.max_sessions && !self.evict_one(&mut sessions) {
                    return Opened::Full;
                }
                let s = Arc::new(Session::new(Arc::from(client_id), protocol));
                sessions.insert(s.client_id.clone(), s.clone());
                (s, false)
            }
        };
        {
            let mut st = session.lock();
            st.conn = Some(crate::session::ConnLink { generation, kick });
            st.generation = generation;
            st.protocol = protocol;
            st.disconnected_at = None;
        }
        session.online.store(true, Ordering::Relaxed);
        Opened::Ok(session, present, generation)
    }

    /// Discards the offline session disconnected longest ago.
    fn evict_one(&self, sessions: &mut HashMap<Arc<str>, Arc<Session>>) -> bool {
        let victim = sessions
            .values()
            .filter_map(|s| {
                let st = s.lock();
                if st.conn.is_none() {
                    st.disconnected_at.map(|t| (t, s.clone()))
                } else {
                    None
                }
            })
            .min_by_key(|(t, _)| *t);
        let Some((_, victim)) = victim else { return false };
        sessions.remove(&victim.client_id);
        self.end_session(&victim);
        self.stats.drop(DropReason::SessionEvicted, &victim.client_id);
        true
    }

    /// Marks a session removed and drops its subscriptions.
    fn end_session(&self, session: &Arc<Session>) {
        let filters: Vec<String> = {
            let mut st = session.lock();
            st.ended = true;
            st.queue.clear();
            st.inflight.clear();
            st.subscriptions.drain().map(|(f, _)| f).collect()
        };
        session.online.store(false, Ordering::Relaxed);
        let id = SubscriberId::Client(session.client_id.clone());
        let mut router = self.router_write();
        for f in filters {
            if let Some(parsed) = parse_subscription_filter(&f) {
                router.remove(&parsed, &id);
            }
        }
    }

    /// The connection of `generation` ended. Keeps the session for its
    /// expiry, or removes it now (expiry 0). Returns false if another
    /// connection had already taken the session over.
    pub fn close_session(&self, session: &Arc<Session>, generation: u64) -> bool {
        let mut sessions = self.sessions();
        let expiry = {
            let mut st = session.lock();
            if st.conn.as_ref().map(|c| c.generation) != Some(generation) {
                return false;
            }
            st.conn = None;
            st.disconnected_at = Some(Instant::now());
            // Messages queued but never sent: QoS 0 ones are not kept.
            let before = st.queue.len();
            st.queue.retain(|d| d.qos != QoS::AtMostOnce);
            st.queued_qos0 = 0;
            let dropped = before - st.queue.len();
            if dropped > 0 {
                self.stats.drop_n(DropReason::OfflineQoS0, dropped as u64, &session.client_id);
            }
            st.expiry
        };
        session.online.store(false, Ordering::Relaxed);
        if expiry == 0 {
            if sessions.get(&session.client_id).is_some_and(|s| Arc::ptr_eq(s, session)) {
                sessions.remove(&session.client_id);
            }
            drop(sessions);
            self.end_session(session);
        }
        true
    }

    /// Removes offline sessions whose expiry has passed.
    pub fn sweep_sessions(&self, now: Instant) {
        let mut sessions = self.sessions();
        let expired: Vec<Arc<Session>> = sessions
            .values()
            .filter(|s| {
                let st = s.lock();
                match (st.conn.is_none(), st.disconnected_at) {
                    (true, Some(t)) => {
                        st.expiry != u32::MAX && now.saturating_duration_since(t).as_secs() >= u64::from(st.expiry)
                    }
                    _ => false,
                }
            })
            .cloned()
            .collect();
        for s in &expired {
            sessions.remove(&s.client_id);
        }
        drop(sessions);
        for s in expired {
            self.end_session(&s);
        }
    }
}

/// Identifies a subscriber among the targets of one message.
fn entry_key(e: &Entry) -> (u8, usize) {
    match (&e.sink, &e.id) {
        (Sink::Session(s), _) => (0, Arc::as_ptr(s) as usize),
        (Sink::Local(_), SubscriberId::Local(n)) => (1, *n as usize),
        (Sink::Local(_), SubscriberId::Client(_)) => (2, 0),
    }
}

/// Counter helpers kept here so the hot path reads clearly.
pub(crate) struct StatsAdd;

impl StatsAdd {
    pub fn messages_in(s: &BrokerStats) {
        BrokerStats::add(&s.messages_in, 1);
    }
    pub fn messages_out(s: &BrokerStats, n: u64) {
        BrokerStats::add(&s.messages_out, n);
    }
}
