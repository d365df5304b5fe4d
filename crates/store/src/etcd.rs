//! The etcd [`Store`] and [`Coordinator`] backend (cargo feature `etcd`):
//! several cloud replicas share one etcd cluster (v3 API, etcd 3.4 or later).
//!
//! # Key layout
//!
//! Every key lives under a prefix (default `/yunbian`, without a trailing
//! `/`), so one etcd can hold several clusters or test runs:
//!
//! | key                                | value                                         |
//! |------------------------------------|-----------------------------------------------|
//! | `{prefix}/objects/{Kind}/{name}`   | the object's JSON, `metadata.resourceVersion` left out |
//! | `{prefix}/system/{key}`            | bytes of [`Coordinator::get_or_init`], written once |
//! | `{prefix}/leader`                  | name of the leading replica, attached to its lease |
//! | `{prefix}/presence/{replica}`      | the replica's presence record, attached to its lease |
//!
//! `{Kind}` is [`Kind::as_str`] (`App`, `AppInstance`, …); the name may
//! contain `/` (everything after the kind's `/` is the name).
//!
//! # Revisions
//!
//! An object's revision is its key's `mod_revision`, and the store's
//! revision is etcd's: every returned object gets
//! `metadata.resourceVersion` (a JSON number) set to it on the way out.
//! etcd's revision also moves on for writes to other keys (leases, leader,
//! presence, other prefixes), so revisions are increasing but not
//! contiguous. [`Store::revision`] is the highest revision seen in any
//! response of this client; [`Store::compacted_revision`] is the highest
//! compaction revision etcd reported (0 until one was seen). etcd itself
//! decides compaction: run it with e.g.
//! `--auto-compaction-mode=revision --auto-compaction-retention=100000`.
//!
//! # Writes
//!
//! Each write is one etcd transaction whose compare encodes the
//! precondition: create requires `create_revision == 0`; update and delete
//! require the key to exist (`version > 0`) and, with `expected`,
//! `mod_revision == expected`. The failure branch reads the key, so the
//! error (`AlreadyExists`, `NotFound`, `Conflict` with the current
//! revision) is decided atomically too. A fenced write (the leader's store,
//! see below) also compares `create_revision({prefix}/leader) == term`, so a
//! deposed leader's write changes nothing and fails with
//! [`StoreError::Fenced`].
//!
//! # Watches
//!
//! A watch is an etcd watch on the kind's key prefix from `from + 1`, with
//! previous values (a delete reports the last state). A forwarding task
//! moves events into a bounded channel: events up to the revision at which
//! the watch was created (the replay) wait for room; live events are only
//! sent while more than one slot is free, otherwise the watcher is ended
//! with `Err(Compacted)` in the last slot, as with redb. If the connection
//! breaks (etcd down or restarted), the watch ends with `Err(Backend)`: the
//! caller relists, or watches again from the last revision it saw. Dropping
//! the store ends its watches with `None`.
//!
//! # Leadership and presence
//!
//! [`Coordinator::campaign`] grants a lease (TTL [`EtcdOptions::lease_ttl`]),
//! refreshes it every third of the TTL in a background task, and creates
//! `{prefix}/leader` with it if absent; otherwise it watches the key until it
//! is deleted and tries again. The term is the leader key's create revision.
//! Leadership is lost (the `lost` receiver flips) when a refresh reports the
//! lease gone, when no refresh succeeded for a whole TTL, or when the leader
//! key is deleted or re-created. Dropping the leader's store revokes the
//! lease, so another replica takes over at once.
//!
//! A presence record is put with a lease of its own, refreshed by a task per
//! replica; when the process dies the refreshes stop and etcd deletes the
//! record within the TTL. If the lease is lost while the process lives
//! (etcd unreachable for longer than the TTL), the task grants a new one and
//! puts the last record again.
//!
//! Every request is bounded by [`EtcdOptions::request_timeout`]: with etcd
//! unreachable, operations fail with [`StoreError::Backend`], never hang.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType as EtcdEventType, GetOptions, GetResponse,
    KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, ResponseHeader, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions, WatchResponse, WatchStream,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use yunbian_api::Kind;

use crate::redb_store::set_resource_version;
use crate::{Coordinator, EventType, Leadership, Store, StoreError, StoreEvent, StoredObject, Watch};

pub mod testing;

/// Prefix used when none is given.
pub const DEFAULT_PREFIX: &str = "/yunbian";
/// Objects read per request when listing (keeps responses far below
/// gRPC's message size limit).
const LIST_PAGE: i64 = 500;
/// Largest watch response accepted (etcd batches many events in one).
const MAX_WATCH_MESSAGE: usize = 64 << 20;
/// Upper bound of a watch channel's capacity.
const MAX_WATCH_CAPACITY: usize = 1 << 30;

/// Tuning of an [`EtcdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Longest wait for a TCP connection to an endpoint. Default 3 s.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to any request. Default 5 s.
    pub request_timeout: Duration,
    /// TTL of the leader and presence leases (whole seconds; etcd raises
    /// values below its minimum, about 2 s). Leadership moves on within
    /// about this long after the leader dies. Default 5 s.
    pub lease_ttl: Duration,
    /// Live events a watcher may have unread before it is ended with
    /// `Err(Compacted)`. Default 10 000 (values below 1 count as 1).
    pub watch_buffer: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            watch_buffer: 10_000,
        }
    }
}

/// The etcd backend: see the [module docs](self).
pub struct EtcdStore {
    conn: Conn,
    opts: EtcdOptions,
    /// Dropped with the store: ends its watches and presence tasks.
    shutdown: watch::Sender<()>,
    /// Presence task per replica published through this store.
    presence: tokio::sync::Mutex<HashMap<String, mpsc::Sender<PresenceRequest>>>,
    /// This store itself, wrapped by the leader's fenced store.
    me: Weak<EtcdStore>,
}

/// Keys of one prefix.
#[derive(Debug)]
struct Keys {
    /// Without a trailing `/`.
    prefix: String,
}

impl Keys {
    fn objects(&self) -> String {
        format!("{}/objects/", self.prefix)
    }

    fn kind(&self, kind: Kind) -> String {
        format!("{}/objects/{}/", self.prefix, kind.as_str())
    }

    fn object(&self, kind: Kind, name: &str) -> String {
        format!("{}/objects/{}/{}", self.prefix, kind.as_str(), name)
    }

    fn system(&self, key: &str) -> String {
        format!("{}/system/{key}", self.prefix)
    }

    fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    fn presences(&self) -> String {
        format!("{}/presence/", self.prefix)
    }

    fn presence(&self, replica: &str) -> String {
        format!("{}/presence/{replica}", self.prefix)
    }

    /// Kind and name of an object key; `None` for keys that are not (an
    /// unknown kind, e.g. written by a newer version).
    fn parse_object(&self, key: &[u8]) -> Option<(Kind, String)> {
        let rest = key.strip_prefix(self.objects().as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (kind, name) = rest.split_once('/')?;
        let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
        Some((kind, name.to_string()))
    }
}

/// The end of the key range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: to the end of the key space.
    vec![0]
}

fn revision_of(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn etcd_revision(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn etcd_error(what: &str, e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd {what}: {e}"))
}

fn is_compacted_error(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("required revision has been compacted"))
}

fn is_future_revision_error(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("required revision is a future revision"))
}

fn is_lease_not_found(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("requested lease not found"))
}

/// The JSON stored for `value`: checked like redb checks it, without
/// `metadata.resourceVersion` (the key's revision is the truth). Returns the
/// bytes and the value.
fn encode_value(mut value: Value) -> Result<(Vec<u8>, Value), StoreError> {
    set_resource_version(&mut value, 0)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| StoreError::Backend(format!("encode object: {e}")))?;
    Ok((bytes, value))
}

/// The object of an object key's `kv`.
fn decode_object(kind: Kind, name: String, kv: &KeyValue) -> Result<StoredObject, StoreError> {
    let revision = revision_of(kv.mod_revision());
    let mut value: Value = serde_json::from_slice(kv.value())
        .map_err(|e| StoreError::Backend(format!("etcd value of {} {name} is not JSON: {e}", kind.noun())))?;
    set_resource_version(&mut value, revision)?;
    Ok(StoredObject { kind, name, revision, value: Arc::new(value) })
}

/// The response of the `i`th operation of a transaction, if it was a read,
/// and its first key.
fn txn_kv(resp: &TxnResponse, i: usize) -> Option<KeyValue> {
    match resp.op_responses().into_iter().nth(i)? {
        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
        _ => None,
    }
}

/// The leader key and term that fenced writes compare against.
#[derive(Debug, Clone)]
struct Fence {
    leader_key: String,
    term: i64,
}

impl Fence {
    /// Adds the fence's compare, and a read of the leader key at the end of
    /// the failure branch.
    fn guard(&self, when: &mut Vec<Compare>, or_else: &mut Vec<TxnOp>) {
        when.push(Compare::create_revision(self.leader_key.clone(), CompareOp::Equal, self.term));
        or_else.push(TxnOp::get(self.leader_key.clone(), None));
    }

    /// After a failed transaction: `Err(Fenced)` if the fence is why.
    fn check(&self, resp: &TxnResponse, leader_op: usize) -> Result<(), StoreError> {
        let holder = txn_kv(resp, leader_op);
        match holder {
            Some(kv) if kv.create_revision() == self.term => Ok(()),
            Some(kv) => Err(StoreError::Fenced(format!(
                "leadership of term {} is over (term {} holds it)",
                self.term,
                kv.create_revision()
            ))),
            None => Err(StoreError::Fenced(format!("leadership of term {} is over (no leader)", self.term))),
        }
    }
}

/// A connection plus the revisions learnt from its responses; cheap to
/// clone into background tasks.
#[derive(Clone)]
struct Conn {
    client: Client,
    keys: Arc<Keys>,
    revision: Arc<AtomicU64>,
    compacted: Arc<AtomicU64>,
    timeout: Duration,
}

impl Conn {
    fn saw(&self, header: Option<&ResponseHeader>) {
        if let Some(h) = header {
            self.revision.fetch_max(revision_of(h.revision()), Ordering::AcqRel);
        }
    }

    fn saw_compaction(&self, revision: i64) -> u64 {
        let revision = revision_of(revision);
        self.compacted.fetch_max(revision, Ordering::AcqRel).max(revision)
    }

    /// Runs one request, bounded by the request timeout.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.call_within(self.timeout, what, request).await
    }

    /// Runs one request, bounded by `limit`.
    async fn call_within<T>(
        &self,
        limit: Duration,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(etcd_error(what, e)),
            Err(_) => Err(StoreError::Backend(format!("etcd {what}: no answer within {limit:?}"))),
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(what, kv.txn(txn)).await?;
        self.saw(resp.header());
        Ok(resp)
    }

    async fn range(&self, what: &str, key: impl Into<Vec<u8>>, opts: GetOptions) -> Result<GetResponse, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(what, kv.get(key, Some(opts))).await?;
        self.saw(resp.header());
        Ok(resp)
    }

    async fn get(&self, what: &str, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, StoreError> {
        let mut resp = self.range(what, key, GetOptions::new()).await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Opens a watch on `key` (a prefix if `prefix`) from `start` and reads
    /// its first response (normally the "created" one).
    async fn open_watch(
        &self,
        key: impl Into<Vec<u8>>,
        prefix: bool,
        start: i64,
    ) -> Result<(WatchStream, WatchResponse), StoreError> {
        let mut opts = WatchOptions::new().with_start_revision(start).with_prev_key();
        if prefix {
            opts = opts.with_prefix();
        }
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_WATCH_MESSAGE);
        let mut stream = self.call("watch", client.watch(key, Some(opts))).await?;
        let first = self
            .call("watch", stream.message())
            .await?
            .ok_or_else(|| StoreError::Backend("etcd watch: stream ended at once".to_string()))?;
        self.saw(first.header());
        Ok((stream, first))
    }

    async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        let resp = self.call("grant lease", lease.grant(secs, None)).await?;
        self.saw(resp.header());
        let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(1).max(1));
        Ok((resp.id(), granted))
    }

    async fn revoke(&self, lease: i64) {
        let mut client = self.client.lease_client();
        match self.call("revoke lease", client.revoke(lease)).await {
            Ok(_) => tracing::debug!(lease, "etcd lease revoked"),
            Err(e) => tracing::debug!(lease, error = %e, "revoke etcd lease; it expires by itself"),
        }
    }
}

/// What one refresh of a lease found.
enum Refresh {
    /// etcd extended the lease.
    Alive,
    /// The lease has expired or was revoked.
    Gone,
    /// etcd did not answer.
    Unreachable(StoreError),
}

/// Keeps one lease alive, one refresh at a time.
struct LeaseRefresher {
    conn: Conn,
    id: i64,
    ttl: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When the last successful refresh was sent (or the lease granted).
    last_ok: Instant,
}

impl LeaseRefresher {
    fn new(conn: Conn, id: i64, ttl: Duration) -> LeaseRefresher {
        LeaseRefresher { conn, id, ttl, stream: None, last_ok: Instant::now() }
    }

    /// The refresh period.
    fn period(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(200))
    }

    /// Whether the lease may have expired: no refresh succeeded for a TTL.
    fn overdue(&self) -> bool {
        self.last_ok.elapsed() >= self.ttl
    }

    /// Refreshes the lease once. Waits at most one refresh period (or the
    /// request timeout, if shorter), so that a lease etcd no longer hears
    /// from is noticed as [`LeaseRefresher::overdue`] soon after its TTL.
    async fn refresh(&mut self) -> Refresh {
        let sent = Instant::now();
        let limit = self.period().min(self.conn.timeout);
        if self.stream.is_none() {
            let mut lease = self.conn.client.lease_client();
            match self.conn.call_within(limit, "keep lease alive", lease.keep_alive(self.id)).await {
                Ok(s) => {
                    // Opening the stream already refreshed the lease.
                    self.stream = Some(s);
                    self.last_ok = sent;
                    return Refresh::Alive;
                }
                Err(e) if e.to_string().contains("lease not found") => return Refresh::Gone,
                Err(e) => return Refresh::Unreachable(e),
            }
        }
        let Some((keeper, stream)) = self.stream.as_mut() else {
            return Refresh::Unreachable(StoreError::Backend("no keep-alive stream".to_string()));
        };
        let exchange = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.conn.call_within(limit, "keep lease alive", exchange).await {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                self.conn.saw(resp.header());
                self.last_ok = sent;
                Refresh::Alive
            }
            Ok(Some(_)) => Refresh::Gone,
            Ok(None) => {
                self.stream = None;
                Refresh::Unreachable(StoreError::Backend("etcd ended the keep-alive stream".to_string()))
            }
            Err(e) => {
                self.stream = None;
                Refresh::Unreachable(e)
            }
        }
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`) and
    /// uses the keys under `prefix` (e.g. [`DEFAULT_PREFIX`]). Fails within
    /// about `opts.connect_timeout + opts.request_timeout` if etcd cannot be
    /// reached.
    pub async fn connect(endpoints: &[String], prefix: &str, opts: EtcdOptions) -> Result<Arc<EtcdStore>, StoreError> {
        let prefix = prefix.trim_end_matches('/').to_string();
        let connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(opts.request_timeout, opts.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = match tokio::time::timeout(
            opts.connect_timeout + opts.request_timeout,
            Client::connect(endpoints, Some(connect)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(etcd_error("connect", e)),
            Err(_) => return Err(StoreError::Backend(format!("etcd connect {endpoints:?}: timed out"))),
        };
        let conn = Conn {
            client,
            keys: Arc::new(Keys { prefix }),
            revision: Arc::new(AtomicU64::new(0)),
            compacted: Arc::new(AtomicU64::new(0)),
            timeout: opts.request_timeout,
        };
        // Checks that etcd answers, and learns the current revision.
        conn.range("connect", conn.keys.leader(), GetOptions::new().with_count_only()).await?;
        tracing::debug!(?endpoints, prefix = %conn.keys.prefix, revision = conn.revision.load(Ordering::Acquire), "etcd store connected");
        Ok(Arc::new_cyclic(|me| EtcdStore {
            conn,
            opts,
            shutdown: watch::channel(()).0,
            presence: tokio::sync::Mutex::new(HashMap::new()),
            me: me.clone(),
        }))
    }

    /// The key prefix (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.conn.keys.prefix
    }

    async fn create_fenced(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        fence: Option<&Fence>,
    ) -> Result<StoredObject, StoreError> {
        let key = self.conn.keys.object(kind, name);
        let (bytes, mut value) = encode_value(value)?;
        let mut when = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)];
        let mut or_else = vec![TxnOp::get(key.clone(), None)];
        if let Some(f) = fence {
            f.guard(&mut when, &mut or_else);
        }
        let txn = Txn::new().when(when).and_then(vec![TxnOp::put(key, bytes, None)]).or_else(or_else);
        let resp = self.conn.txn("create", txn).await?;
        if !resp.succeeded() {
            if let Some(f) = fence {
                f.check(&resp, 1)?;
            }
            return Err(StoreError::AlreadyExists { kind, name: name.to_string() });
        }
        let revision = revision_of(resp.header().map_or(0, ResponseHeader::revision));
        set_resource_version(&mut value, revision)?;
        Ok(StoredObject { kind, name: name.to_string(), revision, value: Arc::new(value) })
    }

    /// The compare of an update or delete, and the error when it failed.
    fn precondition(key: &str, expected: Option<u64>) -> Vec<Compare> {
        let mut when = vec![Compare::version(key, CompareOp::Greater, 0)];
        if let Some(rv) = expected {
            when.push(Compare::mod_revision(key, CompareOp::Equal, etcd_revision(rv)));
        }
        when
    }

    fn failed(kind: Kind, name: &str, expected: Option<u64>, resp: &TxnResponse, fence: Option<&Fence>) -> StoreError {
        if let Some(f) = fence {
            if let Err(e) = f.check(resp, 1) {
                return e;
            }
        }
        match (txn_kv(resp, 0), expected) {
            (None, _) => StoreError::NotFound { kind, name: name.to_string() },
            (Some(kv), Some(expected)) => {
                StoreError::Conflict { kind, name: name.to_string(), expected, current: revision_of(kv.mod_revision()) }
            }
            (Some(_), None) => StoreError::Backend(format!("etcd refused the write of {} {name}", kind.noun())),
        }
    }

    async fn update_fenced(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
        fence: Option<&Fence>,
    ) -> Result<StoredObject, StoreError> {
        let key = self.conn.keys.object(kind, name);
        let (bytes, mut value) = encode_value(value)?;
        let mut when = Self::precondition(&key, expected);
        let mut or_else = vec![TxnOp::get(key.clone(), None)];
        if let Some(f) = fence {
            f.guard(&mut when, &mut or_else);
        }
        let txn = Txn::new().when(when).and_then(vec![TxnOp::put(key, bytes, None)]).or_else(or_else);
        let resp = self.conn.txn("update", txn).await?;
        if !resp.succeeded() {
            return Err(Self::failed(kind, name, expected, &resp, fence));
        }
        let revision = revision_of(resp.header().map_or(0, ResponseHeader::revision));
        set_resource_version(&mut value, revision)?;
        Ok(StoredObject { kind, name: name.to_string(), revision, value: Arc::new(value) })
    }

    async fn delete_fenced(
        &self,
        kind: Kind,
        name: &str,
        expected: Option<u64>,
        fence: Option<&Fence>,
    ) -> Result<StoredObject, StoreError> {
        let key = self.conn.keys.object(kind, name);
        let mut when = Self::precondition(&key, expected);
        let mut or_else = vec![TxnOp::get(key.clone(), None)];
        if let Some(f) = fence {
            f.guard(&mut when, &mut or_else);
        }
        let delete = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        let txn = Txn::new().when(when).and_then(vec![delete]).or_else(or_else);
        let resp = self.conn.txn("delete", txn).await?;
        if !resp.succeeded() {
            return Err(Self::failed(kind, name, expected, &resp, fence));
        }
        let last = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Delete(mut d)) => d.take_prev_kvs().into_iter().next(),
            _ => None,
        };
        let last = last
            .ok_or_else(|| StoreError::Backend(format!("etcd delete of {} {name}: no previous value", kind.noun())))?;
        decode_object(kind, name.to_string(), &last)
    }

    /// Whether etcd has compacted revision `from` away (our semantics: a
    /// watch from `from` needs every event after it).
    async fn is_compacted(&self, from: u64) -> Result<bool, StoreError> {
        let opts = GetOptions::new().with_count_only().with_revision(etcd_revision(from.max(1)));
        match self.conn.range("watch", self.conn.keys.leader(), opts).await {
            Ok(_) => Ok(false),
            Err(e) if is_compacted_error(&e) => Ok(true),
            Err(e) if is_future_revision_error(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.conn.keys.prefix)
            .field("revision", &self.conn.revision.load(Ordering::Acquire))
            .field("compacted", &self.conn.compacted.load(Ordering::Acquire))
            .field("opts", &self.opts)
            .finish()
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<StoredObject, StoreError> {
        match self.conn.get("get", self.conn.keys.object(kind, name)).await? {
            Some(kv) => decode_object(kind, name.to_string(), &kv),
            None => Err(StoreError::NotFound { kind, name: name.to_string() }),
        }
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<StoredObject>, u64), StoreError> {
        let prefix = self.conn.keys.kind(kind);
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.clone().into_bytes();
        let mut revision = 0;
        let mut objects = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if revision > 0 {
                // Later pages read the snapshot of the first one.
                opts = opts.with_revision(revision);
            }
            let mut resp = self.conn.range("list", start.clone(), opts).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, ResponseHeader::revision);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else { break };
            for kv in &kvs {
                let name = kv.key().get(prefix.len()..).and_then(|n| std::str::from_utf8(n).ok()).ok_or_else(|| {
                    StoreError::Backend(format!("etcd key {:?} is not UTF-8", String::from_utf8_lossy(kv.key())))
                })?;
                objects.push(decode_object(kind, name.to_string(), kv)?);
            }
            if !more {
                break;
            }
            start = last;
            start.push(0);
        }
        Ok((objects, revision_of(revision)))
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<StoredObject, StoreError> {
        self.create_fenced(kind, name, value, None).await
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<StoredObject, StoreError> {
        self.update_fenced(kind, name, value, expected, None).await
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError> {
        self.delete_fenced(kind, name, expected, None).await
    }

    async fn watch(&self, kind: Option<Kind>, from_revision: u64) -> Result<Watch, StoreError> {
        let known = self.conn.compacted.load(Ordering::Acquire);
        if from_revision < known {
            return Err(StoreError::Compacted { requested: from_revision, oldest: known });
        }
        let key = match kind {
            Some(k) => self.conn.keys.kind(k),
            None => self.conn.keys.objects(),
        };
        if self.is_compacted(from_revision).await? {
            // A watch from the first missing revision makes etcd report its
            // compaction point (in a response of its own, after "created").
            let start = etcd_revision(from_revision.max(1));
            let (mut stream, mut resp) = self.conn.open_watch(key, true, start).await?;
            loop {
                if resp.compact_revision() > 0 {
                    let oldest = self.conn.saw_compaction(resp.compact_revision());
                    return Err(StoreError::Compacted { requested: from_revision, oldest });
                }
                resp = self
                    .conn
                    .call("watch", stream.message())
                    .await?
                    .ok_or_else(|| StoreError::Backend("etcd watch: stream ended".to_string()))?;
            }
        }
        let start = etcd_revision(from_revision.saturating_add(1));
        let (stream, first) = self.conn.open_watch(key, true, start).await?;
        if first.compact_revision() > 0 {
            // Compacted between the check and the watch.
            let oldest = self.conn.saw_compaction(first.compact_revision());
            return Err(StoreError::Compacted { requested: from_revision, oldest });
        }
        if first.canceled() {
            return Err(StoreError::Backend(format!("etcd refused the watch: {}", first.cancel_reason())));
        }
        let capacity = self.opts.watch_buffer.clamp(1, MAX_WATCH_CAPACITY).saturating_add(1);
        let (tx, rx) = mpsc::channel(capacity);
        let forward = Forward {
            conn: self.conn.clone(),
            tx,
            last: from_revision,
            replay_until: revision_of(first.header().map_or(0, ResponseHeader::revision)),
        };
        let shutdown = self.shutdown.subscribe();
        tokio::spawn(forward.run(stream, first, shutdown));
        Ok(rx)
    }

    fn revision(&self) -> u64 {
        self.conn.revision.load(Ordering::Acquire)
    }

    fn compacted_revision(&self) -> u64 {
        self.conn.compacted.load(Ordering::Acquire)
    }
}

/// Moves the events of one etcd watch into a [`Watch`] channel.
struct Forward {
    conn: Conn,
    tx: mpsc::Sender<Result<StoreEvent, StoreError>>,
    /// Revision of the last event sent (or the watch's start).
    last: u64,
    /// Events up to here were history when the watch was created: they wait
    /// for room in the channel instead of ending a slow watcher.
    replay_until: u64,
}

/// Why forwarding stopped.
enum Stop {
    /// The receiver or the store is gone.
    Quiet,
    /// End the watch with this error.
    With(StoreError),
}

impl Forward {
    async fn run(mut self, mut stream: WatchStream, first: WatchResponse, mut shutdown: watch::Receiver<()>) {
        let stop = match self.deliver(first).await {
            Err(stop) => stop,
            Ok(()) => loop {
                let msg = tokio::select! {
                    _ = shutdown.changed() => break Stop::Quiet,
                    _ = self.tx.closed() => break Stop::Quiet,
                    msg = stream.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break Stop::With(StoreError::Backend("etcd ended the watch".to_string())),
                    Err(e) => break Stop::With(etcd_error("watch broke", e)),
                };
                if let Err(stop) = self.deliver(resp).await {
                    break stop;
                }
            },
        };
        if let Stop::With(e) = stop {
            tracing::debug!(error = %e, last = self.last, "etcd watch ended");
            tokio::select! {
                _ = self.tx.send(Err(e)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn deliver(&mut self, resp: WatchResponse) -> Result<(), Stop> {
        self.conn.saw(resp.header());
        if resp.compact_revision() > 0 {
            let oldest = self.conn.saw_compaction(resp.compact_revision());
            return Err(Stop::With(StoreError::Compacted { requested: self.last, oldest }));
        }
        if resp.canceled() {
            return Err(Stop::With(StoreError::Backend(format!("etcd canceled the watch: {}", resp.cancel_reason()))));
        }
        for ev in resp.events() {
            let ev = match convert_event(&self.conn.keys, ev) {
                Ok(Some(ev)) => ev,
                Ok(None) => continue,
                Err(e) => return Err(Stop::With(e)),
            };
            if ev.revision <= self.last {
                continue;
            }
            let revision = ev.revision;
            if revision <= self.replay_until {
                self.tx.send(Ok(ev)).await.map_err(|_| Stop::Quiet)?;
            } else if self.tx.capacity() > 1 {
                self.tx.try_send(Ok(ev)).map_err(|_| Stop::Quiet)?;
            } else {
                tracing::warn!(revision, "etcd watcher fell behind; ending it");
                let oldest = self.conn.compacted.load(Ordering::Acquire);
                return Err(Stop::With(StoreError::Compacted { requested: self.last, oldest }));
            }
            self.last = revision;
        }
        Ok(())
    }
}

/// Our event for an etcd event on an object key; `None` for other keys.
fn convert_event(keys: &Keys, ev: &etcd_client::Event) -> Result<Option<StoreEvent>, StoreError> {
    let Some(kv) = ev.kv() else { return Ok(None) };
    let Some((kind, name)) = keys.parse_object(kv.key()) else { return Ok(None) };
    let revision = revision_of(kv.mod_revision());
    let (event, object) = match ev.event_type() {
        EtcdEventType::Put => {
            let event = if kv.create_revision() == kv.mod_revision() { EventType::Added } else { EventType::Modified };
            (event, decode_object(kind, name, kv)?)
        }
        EtcdEventType::Delete => {
            let prev = ev.prev_kv().ok_or_else(|| {
                StoreError::Backend(format!("etcd delete event of {} {name} without its last state", kind.noun()))
            })?;
            (EventType::Deleted, decode_object(kind, name, prev)?)
        }
    };
    Ok(Some(StoreEvent { revision, event, object }))
}

/// The leader's view of an [`EtcdStore`]: every write is fenced by the
/// leader key's create revision.
struct FencedStore {
    inner: Arc<EtcdStore>,
    fence: Fence,
    /// Dropped with this store: tells the leadership task to resign.
    _resign: oneshot::Sender<()>,
}

#[async_trait::async_trait]
impl Store for FencedStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<StoredObject, StoreError> {
        self.inner.get(kind, name).await
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<StoredObject>, u64), StoreError> {
        self.inner.list(kind).await
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<StoredObject, StoreError> {
        self.inner.create_fenced(kind, name, value, Some(&self.fence)).await
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<StoredObject, StoreError> {
        self.inner.update_fenced(kind, name, value, expected, Some(&self.fence)).await
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Option<u64>) -> Result<StoredObject, StoreError> {
        self.inner.delete_fenced(kind, name, expected, Some(&self.fence)).await
    }

    async fn watch(&self, kind: Option<Kind>, from_revision: u64) -> Result<Watch, StoreError> {
        self.inner.watch(kind, from_revision).await
    }

    fn revision(&self) -> u64 {
        self.inner.revision()
    }

    fn compacted_revision(&self) -> u64 {
        self.inner.compacted_revision()
    }
}

/// Keeps a leader's lease alive and watches the leader key until leadership
/// is lost or given up; then flips `lost` and revokes the lease.
struct LeaderTask {
    conn: Conn,
    lease: LeaseRefresher,
    term: i64,
    replica: String,
    lost: watch::Sender<bool>,
}

impl LeaderTask {
    async fn run(mut self, mut resign: oneshot::Receiver<()>) {
        let leader_key = self.conn.keys.leader();
        let mut tick = tokio::time::interval(self.lease.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        enum Wake {
            Resign,
            Tick,
            Watched(Result<Option<WatchResponse>, etcd_client::Error>),
        }
        let mut watch = self.open_watch(&leader_key).await;
        let reason = loop {
            let watched = async {
                match watch.as_mut() {
                    Some(w) => w.message().await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                _ = &mut resign => Wake::Resign,
                _ = tick.tick() => Wake::Tick,
                msg = watched => Wake::Watched(msg),
            };
            match wake {
                Wake::Resign => break "given up",
                Wake::Tick => {
                    match self.lease.refresh().await {
                        Refresh::Alive => {}
                        Refresh::Gone => break "lease expired",
                        Refresh::Unreachable(e) => {
                            tracing::warn!(replica = %self.replica, term = self.term, error = %e, "refresh leader lease");
                            if self.lease.overdue() {
                                break "lease not refreshed for a whole TTL";
                            }
                        }
                    }
                    if watch.is_none() {
                        watch = self.open_watch(&leader_key).await;
                    }
                }
                Wake::Watched(Ok(Some(resp))) => {
                    self.conn.saw(resp.header());
                    let replaced = resp.events().iter().any(|ev| {
                        ev.event_type() == EtcdEventType::Delete
                            || ev.kv().is_none_or(|kv| kv.create_revision() != self.term)
                    });
                    if replaced {
                        break "leader key deleted or replaced";
                    }
                    if resp.canceled() || resp.compact_revision() > 0 {
                        watch = None;
                    }
                }
                Wake::Watched(Ok(None) | Err(_)) => watch = None,
            }
        };
        tracing::info!(replica = %self.replica, term = self.term, reason, "leadership ended");
        self.lost.send_replace(true);
        self.conn.revoke(self.lease.id).await;
    }

    /// Watches the leader key from just after our term began; `None` if etcd
    /// cannot be reached (retried at the next tick). If that history is
    /// gone, checks the key directly.
    async fn open_watch(&self, leader_key: &str) -> Option<WatchStream> {
        match self.conn.open_watch(leader_key.to_string(), false, self.term + 1).await {
            Ok((stream, first)) if first.compact_revision() == 0 && !first.canceled() => Some(stream),
            Ok(_) => {
                // Compacted: what matters is whether our key is still there.
                match self.conn.get("leader", leader_key.to_string()).await {
                    Ok(Some(kv)) if kv.create_revision() == self.term => {
                        let start = kv.mod_revision() + 1;
                        match self.conn.open_watch(leader_key.to_string(), false, start).await {
                            Ok((stream, _)) => Some(stream),
                            Err(_) => None,
                        }
                    }
                    // Gone: the next lease refresh or watch tells.
                    _ => None,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "watch leader key");
                None
            }
        }
    }
}

/// A request to a replica's presence task: new data, and where to answer.
type PresenceRequest = (Vec<u8>, oneshot::Sender<Result<(), StoreError>>);

/// Keeps one replica's presence record published with a lease of its own.
struct PresenceTask {
    conn: Conn,
    key: String,
    ttl: Duration,
    /// The record, once the first request set it.
    data: Option<Vec<u8>>,
    lease: Option<LeaseRefresher>,
}

impl PresenceTask {
    async fn run(mut self, mut requests: mpsc::Receiver<PresenceRequest>, mut shutdown: watch::Receiver<()>) {
        let mut tick = tokio::time::interval((self.ttl / 3).max(Duration::from_millis(200)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // The store is gone: stop refreshing; etcd deletes the record
                // when the lease expires.
                _ = shutdown.changed() => return,
                req = requests.recv() => {
                    let Some((data, reply)) = req else { return };
                    self.data = Some(data);
                    let _ = reply.send(self.publish().await);
                }
                _ = tick.tick() => self.refresh().await,
            }
        }
    }

    /// Puts the record with the current lease, granting one if needed.
    async fn publish(&mut self) -> Result<(), StoreError> {
        let Some(data) = self.data.clone() else { return Ok(()) };
        for _ in 0..2 {
            let id = match &self.lease {
                Some(l) => l.id,
                None => {
                    let (id, ttl) = self.conn.grant(self.ttl).await?;
                    self.lease = Some(LeaseRefresher::new(self.conn.clone(), id, ttl));
                    id
                }
            };
            let mut kv = self.conn.client.kv_client();
            let put = kv.put(self.key.clone(), data.clone(), Some(PutOptions::new().with_lease(id)));
            match self.conn.call("put presence", put).await {
                Ok(resp) => {
                    self.conn.saw(resp.header());
                    return Ok(());
                }
                Err(e) if is_lease_not_found(&e) => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend("etcd put presence: the new lease vanished".to_string()))
    }

    async fn refresh(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            // A previous lease was lost: publish again.
            if let Err(e) = self.publish().await {
                tracing::debug!(key = %self.key, error = %e, "republish presence");
            }
            return;
        };
        match lease.refresh().await {
            Refresh::Alive => {}
            Refresh::Gone => {
                tracing::warn!(key = %self.key, "presence lease expired; publishing again");
                self.lease = None;
                if let Err(e) = self.publish().await {
                    tracing::debug!(key = %self.key, error = %e, "republish presence");
                }
            }
            Refresh::Unreachable(e) => {
                tracing::debug!(key = %self.key, error = %e, "refresh presence lease");
                if lease.overdue() {
                    self.lease = None;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Coordinator for EtcdStore {
    async fn get_or_init(&self, key: &str, init: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let key = self.conn.keys.system(key);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), init.clone(), None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = self.conn.txn("get_or_init", txn).await?;
        if resp.succeeded() {
            return Ok(init);
        }
        let kv = txn_kv(&resp, 0).ok_or_else(|| StoreError::Backend(format!("etcd get_or_init {key}: no value")))?;
        Ok(kv.value().to_vec())
    }

    async fn campaign(&self, replica: &str) -> Result<Leadership, StoreError> {
        let inner = self.me.upgrade().ok_or_else(|| StoreError::Backend("etcd store dropped".to_string()))?;
        let leader_key = self.conn.keys.leader();
        let (lease_id, ttl) = self.conn.grant(self.opts.lease_ttl).await?;
        let mut lease = LeaseRefresher::new(self.conn.clone(), lease_id, ttl);
        let outcome = self.wait_for_leadership(replica, &leader_key, &mut lease).await;
        let term = match outcome {
            Ok(term) => term,
            Err(e) => {
                self.conn.revoke(lease_id).await;
                return Err(e);
            }
        };
        tracing::info!(replica, term, "leading");
        let (lost_tx, lost) = watch::channel(false);
        let (resign_tx, resign) = oneshot::channel();
        let task = LeaderTask { conn: self.conn.clone(), lease, term, replica: replica.to_string(), lost: lost_tx };
        tokio::spawn(task.run(resign));
        let store = FencedStore { inner, fence: Fence { leader_key, term }, _resign: resign_tx };
        Ok(Leadership { store: Arc::new(store), lost, term: revision_of(term) })
    }

    async fn set_presence(&self, replica: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut tasks = self.presence.lock().await;
            let sender = match tasks.get(replica) {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(8);
                    let task = PresenceTask {
                        conn: self.conn.clone(),
                        key: self.conn.keys.presence(replica),
                        ttl: self.opts.lease_ttl,
                        data: None,
                        lease: None,
                    };
                    tokio::spawn(task.run(rx, self.shutdown.subscribe()));
                    tasks.insert(replica.to_string(), tx.clone());
                    tx
                }
            };
            sender.send((data, reply)).await.map_err(|_| StoreError::Backend("presence task stopped".to_string()))?;
        }
        answer.await.map_err(|_| StoreError::Backend("presence task stopped".to_string()))?
    }

    async fn presences(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.conn.keys.presences();
        let mut resp = self.conn.range("presences", prefix.clone(), GetOptions::new().with_prefix()).await?;
        let mut out = Vec::new();
        for kv in resp.take_kvs() {
            let Some(replica) = kv.key().get(prefix.len()..).and_then(|r| std::str::from_utf8(r).ok()) else {
                continue;
            };
            out.push((replica.to_string(), kv.value().to_vec()));
        }
        Ok(out)
    }
}

impl EtcdStore {
    /// Tries to create the leader key with `lease` until it succeeds;
    /// returns the term (the key's create revision).
    async fn wait_for_leadership(
        &self,
        replica: &str,
        leader_key: &str,
        lease: &mut LeaseRefresher,
    ) -> Result<i64, StoreError> {
        loop {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(leader_key, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(leader_key, replica, Some(PutOptions::new().with_lease(lease.id)))])
                .or_else(vec![TxnOp::get(leader_key, None)]);
            let resp = self.conn.txn("campaign", txn).await?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, ResponseHeader::revision));
            }
            let Some(holder) = txn_kv(&resp, 0) else { continue };
            tracing::debug!(
                replica,
                leader = %String::from_utf8_lossy(holder.value()),
                term = holder.create_revision(),
                "waiting for leadership"
            );
            let (mut stream, first) =
                self.conn.open_watch(leader_key.to_string(), false, holder.mod_revision() + 1).await?;
            let mut resp = Some(first);
            let mut tick = tokio::time::interval(lease.period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Until the key is deleted (or our history of it is gone).
            'wait: loop {
                if let Some(r) = resp.take() {
                    self.conn.saw(r.header());
                    if r.canceled()
                        || r.compact_revision() > 0
                        || r.events().iter().any(|e| e.event_type() == EtcdEventType::Delete)
                    {
                        break 'wait;
                    }
                }
                tokio::select! {
                    _ = tick.tick() => match lease.refresh().await {
                        Refresh::Alive => {}
                        Refresh::Gone => return Err(StoreError::Backend("etcd campaign: lease expired".to_string())),
                        Refresh::Unreachable(e) => return Err(e),
                    },
                    msg = stream.message() => match msg {
                        Ok(Some(r)) => resp = Some(r),
                        Ok(None) => return Err(StoreError::Backend("etcd campaign: watch ended".to_string())),
                        Err(e) => return Err(etcd_error("campaign watch", e)),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys { prefix: "/y".to_string() };
        assert_eq!(keys.object(Kind::AppInstance, "a/b"), "/y/objects/AppInstance/a/b");
        assert_eq!(keys.parse_object(b"/y/objects/AppInstance/a/b"), Some((Kind::AppInstance, "a/b".to_string())));
        assert_eq!(keys.parse_object(b"/y/objects/Pod/a"), None);
        assert_eq!(keys.parse_object(b"/y/leader"), None);
        assert_eq!(keys.parse_object(b"/y/objects/\xff/a"), None);
        // A kind's prefix does not cover a kind whose name extends it.
        assert!(!keys.object(Kind::AppInstance, "x").starts_with(&keys.kind(Kind::App)));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn stored_json_has_no_resource_version() {
        let (bytes, value) =
            encode_value(serde_json::json!({"metadata": {"name": "a", "resourceVersion": 7}})).expect("encode");
        assert_eq!(value, serde_json::json!({"metadata": {"name": "a"}}));
        assert_eq!(bytes, br#"{"metadata":{"name":"a"}}"#.to_vec());
        assert!(encode_value(serde_json::json!([1])).is_err());
        assert!(encode_value(serde_json::json!({"metadata": 1})).is_err());
    }
}
