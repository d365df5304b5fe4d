//! A TCP link between edge agents and the cloud whose faults a test controls.
//!
//! [`LinkProxy`] listens on a local address and forwards every accepted
//! connection to an upstream address (the cloud). Each direction of each
//! connection runs through a *pipe* that applies the link's current state.
//! Every control takes effect immediately, on existing connections too, and
//! is logged at info level under the target `faults`.
//!
//! # Faults
//!
//! - **Cut** ([`LinkProxy::cut`]): a blackhole. No FIN and no RST cross the
//!   link; every byte read in either direction is counted as discarded and
//!   thrown away, never buffered for later, and segments still in flight are
//!   discarded when they would have arrived. New connections complete the
//!   kernel handshake (the proxy's listener accepts them) but are not
//!   forwarded: the proxy reads and discards what the client sends and
//!   connects upstream only once the link heals. A FIN or an error on one
//!   side is held back until the link heals, as a real partition would.
//! - **Reset** ([`LinkProxy::reset`]): every current connection is closed with
//!   an RST on both sides (`SO_LINGER` 0, then close), so peers read
//!   `ECONNRESET`, not a clean end of stream. Connections accepted afterwards
//!   work.
//! - **Refuse** ([`LinkProxy::refuse`]): the listening socket is closed, so
//!   new connections get "connection refused" (the kernel answers the SYN with
//!   an RST); existing connections are untouched. Lifting it binds the same
//!   address again before the call returns. The port is free while refusing,
//!   so another process could in principle take it.
//! - **Conditions** ([`LinkProxy::set_conditions`]): see the model below.
//! - **Heal** ([`LinkProxy::heal`]): back to a perfect link. Connections that
//!   were cut carry traffic again; what was discarded is gone, which usually
//!   breaks the protocol above, as after a real partition. Shared bandwidth
//!   stays attached (it is the topology, not a fault; see below).
//!
//! Connections to an upstream that cannot be reached are reset, so the client
//! sees the failure as `ECONNRESET` on its first read.
//!
//! # Link model
//!
//! Conditions are applied per direction per connection, to the bytes the pipe
//! reads after the change; segments already in flight keep their arrival time.
//!
//! - Data is cut into segments: what one read returns (up to 16 KiB), or
//!   [`SEGMENT_SIZE`] bytes when a bandwidth limit or loss is set.
//! - **Bandwidth**: a token bucket one segment deep, i.e. segments leave at
//!   the configured rate (`bandwidth_bps`, bits per second, per direction).
//! - **Delay and jitter**: a segment arrives `delay` plus a uniform draw in
//!   `[0, jitter]` after it was sent, but never before the segment ahead of
//!   it: TCP never reorders what the application reads, so jitter shows up as
//!   bursts, not reordering. The round trip grows by about `2 × delay`.
//! - **Loss**: each transmission of a segment is lost with probability
//!   `loss`; a lost segment is sent again after a retransmission timeout
//!   (RTO) of `max(200 ms, 2 × 2 × delay)`, doubling for each consecutive loss
//!   of the same segment (capped at 120 s, Linux's maximum), and every later
//!   segment waits behind it (head-of-line blocking). This is how an
//!   application over TCP experiences loss: no bytes go missing, they arrive
//!   late and in bursts. Retransmissions do not consume bandwidth in the
//!   model and fast retransmit is not modelled. `loss` is clamped to
//!   `[0, 0.99]`; use [`LinkProxy::cut`] for a link that loses everything.
//!
//! The pipe keeps at most 64 segments in flight per direction, so a slow
//! reader pushes back on the sender as a full TCP window would.
//!
//! # Shared bandwidth
//!
//! `bandwidth_bps` is per connection. A capacity that all connections of a
//! proxy share, or that several proxies share (a node's access link, a
//! cloud's egress), is a [`Bandwidth`] token bucket attached to a direction
//! with [`LinkProxy::attach`], or a node's [`SharedLink`] with
//! [`LinkProxy::attach_client_link`] / [`LinkProxy::attach_upstream_link`].
//! Each segment first waits for its tokens in every bucket attached to its
//! direction (first come, first served, one segment per connection at a
//! time), then goes through the connection's conditions above. The model
//! and its guarantee (never more than the rate plus one bucket) are in the
//! [`bandwidth`] module. Attaching takes effect on open connections from
//! their next read; [`LinkProxy::detach_all`] removes them.
//!
//! # Randomness
//!
//! Jitter and loss draw from a SplitMix64 generator per connection, seeded
//! from the clock unless [`LinkProxy::set_seed`] fixes the seed.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bandwidth::{self, Bandwidth, SharedLink};
use crate::rng::Rng;

/// Largest segment the pipe forwards when a bandwidth limit or loss is set
/// (an Ethernet MSS).
pub const SEGMENT_SIZE: usize = 1460;
/// Largest segment otherwise: what one read returns.
const READ_CHUNK: usize = 16 * 1024;
/// Segments in flight per direction before the pipe stops reading.
const IN_FLIGHT_SEGMENTS: usize = 64;
const MIN_RTO: Duration = Duration::from_millis(200);
const MAX_RTO: Duration = Duration::from_secs(120);
const MAX_LOSS: f64 = 0.99;

/// How the link treats the bytes it forwards. The default is a perfect link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkConditions {
    /// One-way delay added to each direction.
    pub delay: Duration,
    /// Extra one-way delay drawn uniformly from `[0, jitter]` per segment,
    /// without reordering.
    pub jitter: Duration,
    /// Rate limit in bits per second, per direction per connection; `None`
    /// for no limit. `Some(0)` is treated as 1 bit/s. For a limit that
    /// connections share, see [`LinkProxy::attach`].
    pub bandwidth_bps: Option<u64>,
    /// Probability in `[0, 0.99]` that a transmission of a segment is lost
    /// and has to be retransmitted.
    pub loss: f64,
}

impl LinkConditions {
    /// A link that adds nothing.
    pub const PERFECT: Self = Self { delay: Duration::ZERO, jitter: Duration::ZERO, bandwidth_bps: None, loss: 0.0 };

    fn loss(&self) -> f64 {
        if self.loss.is_nan() {
            return 0.0;
        }
        self.loss.clamp(0.0, MAX_LOSS)
    }

    fn segment_size(&self, read: usize) -> usize {
        if self.bandwidth_bps.is_some() || self.loss() > 0.0 {
            SEGMENT_SIZE
        } else {
            read
        }
    }

    fn rto(&self) -> Duration {
        MIN_RTO.max(self.delay.saturating_mul(4)).min(MAX_RTO)
    }
}

/// One direction of a proxy's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the clients to the upstream.
    ToUpstream,
    /// From the upstream to the clients.
    ToClient,
}

/// Counters since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections not yet closed.
    pub open: u64,
    /// Bytes delivered from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered from the upstream to clients.
    pub bytes_to_client: u64,
    /// Bytes thrown away, in either direction, because the link was cut.
    pub bytes_discarded: u64,
}

/// A TCP proxy whose link faults a test controls; see the [module
/// docs](self) for each fault and the link model.
///
/// Clones share one proxy. When the last clone is dropped the listener is
/// closed and every connection task is aborted, which closes its sockets.
#[derive(Clone)]
pub struct LinkProxy {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("addr", &self.owner.shared.addr)
            .field("upstream", &*lock(&self.owner.shared.upstream))
            .finish_non_exhaustive()
    }
}

impl LinkProxy {
    /// Starts a proxy on `127.0.0.1` (a free port) forwarding to `upstream`.
    /// Must be called inside a Tokio runtime; the proxy's tasks run on it.
    ///
    /// The port is taken outside the kernel's ephemeral range
    /// ([`crate::ports::free_port`]): [`LinkProxy::refuse`] closes the
    /// listener and a heal binds the same port again, which an outgoing
    /// connection could otherwise have taken meanwhile.
    pub fn start(upstream: SocketAddr) -> io::Result<Self> {
        let mut last = None;
        for _ in 0..4 {
            let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::ports::free_port()));
            match Self::start_on(listen, upstream) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
    }

    /// Starts a proxy listening on `listen` forwarding to `upstream`.
    /// Must be called inside a Tokio runtime; the proxy's tasks run on it.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let runtime =
            Handle::try_current().map_err(|_| io::Error::other("LinkProxy must be started inside a Tokio runtime"))?;
        let listener = bind_listener(listen, &runtime)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            runtime: runtime.clone(),
            state: watch::Sender::new(LinkState::default()),
            upstream: Mutex::new(upstream),
            listener: Mutex::new(Some(listener)),
            listener_changed: Notify::new(),
            connections: Mutex::new(Registry::default()),
            seed: Mutex::new(None),
            counters: Counters::default(),
            attached: Mutex::new(Attached::default()),
        });
        let accept_task = runtime.spawn(accept_loop(Arc::clone(&shared)));
        info!(target: "faults", proxy = %addr, %upstream, "link proxy started");
        Ok(Self { owner: Arc::new(Owner { shared, accept_task: accept_task.abort_handle() }) })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.owner.shared.addr
    }

    /// Forwards connections accepted from now on to `upstream`, e.g. a cloud
    /// restarted on another port. Existing connections keep their upstream.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        info!(target: "faults", fault = "upstream", proxy = %self.addr(), %upstream, "link upstream changed");
        *lock(&self.owner.shared.upstream) = upstream;
    }

    /// Blackholes the link: bytes vanish in both directions, no FIN, no RST.
    pub fn cut(&self) {
        info!(target: "faults", fault = "cut", proxy = %self.addr(), "link cut");
        self.owner.shared.state.send_modify(|s| s.cut = true);
    }

    /// Closes every current connection with an RST on both sides.
    pub fn reset(&self) {
        let registry = lock(&self.owner.shared.connections);
        info!(
            target: "faults",
            fault = "reset",
            proxy = %self.addr(),
            connections = registry.entries.len(),
            "link connections reset"
        );
        for connection in registry.entries.values() {
            // `notify_one` keeps a permit if the task is not waiting yet.
            connection.reset.notify_one();
        }
    }

    /// Refuses (`true`) or accepts again (`false`) new connections; existing
    /// connections are untouched. Fails only if the listening address cannot
    /// be bound again.
    pub fn refuse(&self, refuse: bool) -> io::Result<()> {
        info!(target: "faults", fault = "refuse", proxy = %self.addr(), refuse, "link refuses new connections");
        self.owner.shared.set_listening(!refuse)
    }

    /// Sets delay, jitter, bandwidth and loss; see the [module docs](self).
    pub fn set_conditions(&self, conditions: LinkConditions) {
        info!(
            target: "faults",
            fault = "conditions",
            proxy = %self.addr(),
            delay_ms = conditions.delay.as_millis() as u64,
            jitter_ms = conditions.jitter.as_millis() as u64,
            bandwidth_bps = conditions.bandwidth_bps,
            loss = conditions.loss,
            "link conditions set"
        );
        self.owner.shared.state.send_modify(|s| s.conditions = conditions);
    }

    /// The conditions currently applied to new bytes.
    pub fn conditions(&self) -> LinkConditions {
        self.owner.shared.state.borrow().conditions
    }

    /// Back to a perfect link: conditions cleared, cut and refuse lifted.
    /// Fails only if the listening address cannot be bound again.
    pub fn heal(&self) -> io::Result<()> {
        info!(target: "faults", fault = "heal", proxy = %self.addr(), "link healed");
        self.owner.shared.state.send_replace(LinkState::default());
        self.owner.shared.set_listening(true)
    }

    /// Makes jitter and loss reproducible: connections accepted from now on
    /// draw from generators derived from `seed` and their order of arrival.
    pub fn set_seed(&self, seed: u64) {
        info!(target: "faults", proxy = %self.addr(), seed, "link seed set");
        *lock(&self.owner.shared.seed) = Some(seed);
    }

    /// Makes every connection's `direction` share `bandwidth` with whatever
    /// else it is attached to (other directions, other proxies); see
    /// [Shared bandwidth](self#shared-bandwidth). Attaching the same bucket
    /// to the same direction again does nothing.
    pub fn attach(&self, direction: Direction, bandwidth: &Bandwidth) {
        info!(
            target: "faults",
            fault = "shared bandwidth",
            proxy = %self.addr(),
            ?direction,
            rate_bps = bandwidth.rate_bps(),
            burst = bandwidth.burst(),
            "link bandwidth attached"
        );
        let mut attached = lock(&self.owner.shared.attached);
        let list = attached.get_mut(direction);
        if !list.contains(bandwidth) {
            *list = list.iter().cloned().chain([bandwidth.clone()]).collect();
        }
    }

    /// The node whose access link is `link` is this proxy's client (e.g. an
    /// agent connecting to the cloud): what it sends (`ToUpstream`) takes
    /// from `link.up`, what it receives (`ToClient`) from `link.down`.
    pub fn attach_client_link(&self, link: &SharedLink) {
        self.attach(Direction::ToUpstream, &link.up);
        self.attach(Direction::ToClient, &link.down);
    }

    /// The node whose access link is `link` is this proxy's upstream (e.g.
    /// an agent's peer server): what it sends (`ToClient`) takes from
    /// `link.up`, what it receives (`ToUpstream`) from `link.down`.
    pub fn attach_upstream_link(&self, link: &SharedLink) {
        self.attach(Direction::ToClient, &link.up);
        self.attach(Direction::ToUpstream, &link.down);
    }

    /// Detaches every shared bandwidth from both directions.
    pub fn detach_all(&self) {
        info!(target: "faults", fault = "shared bandwidth", proxy = %self.addr(), "link bandwidth detached");
        *lock(&self.owner.shared.attached) = Attached::default();
    }

    /// The buckets attached to `direction`, in the order attached.
    pub fn attached(&self, direction: Direction) -> Vec<Bandwidth> {
        lock(&self.owner.shared.attached).get(direction).to_vec()
    }

    /// Counters since the proxy started.
    pub fn stats(&self) -> LinkStats {
        let c = &self.owner.shared.counters;
        LinkStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            open: c.open.load(Ordering::Relaxed),
            bytes_to_upstream: c.to_upstream.load(Ordering::Relaxed),
            bytes_to_client: c.to_client.load(Ordering::Relaxed),
            bytes_discarded: c.discarded.load(Ordering::Relaxed),
        }
    }
}

/// Owned by the `LinkProxy` clones; stops everything when the last one goes.
struct Owner {
    shared: Arc<Shared>,
    accept_task: AbortHandle,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.accept_task.abort();
        drop(lock(&self.shared.listener).take());
        let connections = {
            let mut registry = lock(&self.shared.connections);
            registry.closed = true;
            std::mem::take(&mut registry.entries)
        };
        for connection in connections.into_values() {
            connection.task.abort();
        }
        info!(target: "faults", proxy = %self.shared.addr, "link proxy stopped");
    }
}

/// State shared by the handle and the proxy's tasks.
struct Shared {
    addr: SocketAddr,
    runtime: Handle,
    state: watch::Sender<LinkState>,
    upstream: Mutex<SocketAddr>,
    /// `None` while refusing.
    listener: Mutex<Option<TcpListener>>,
    listener_changed: Notify,
    connections: Mutex<Registry>,
    seed: Mutex<Option<u64>>,
    counters: Counters,
    attached: Mutex<Attached>,
}

/// The shared buckets of each direction; replaced, never changed in place,
/// so a pipe takes a cheap snapshot per read.
#[derive(Default)]
struct Attached {
    to_upstream: Arc<[Bandwidth]>,
    to_client: Arc<[Bandwidth]>,
}

impl Attached {
    fn get(&self, direction: Direction) -> &Arc<[Bandwidth]> {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }

    fn get_mut(&mut self, direction: Direction) -> &mut Arc<[Bandwidth]> {
        match direction {
            Direction::ToUpstream => &mut self.to_upstream,
            Direction::ToClient => &mut self.to_client,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct LinkState {
    conditions: LinkConditions,
    cut: bool,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    discarded: AtomicU64,
}

/// The live connections, so `reset` and drop can reach them.
#[derive(Default)]
struct Registry {
    /// Set when the proxy is dropped; no connection is registered after it.
    closed: bool,
    next_id: u64,
    entries: HashMap<u64, Connection>,
}

struct Connection {
    reset: Arc<Notify>,
    task: AbortHandle,
}

impl Shared {
    fn is_cut(&self) -> bool {
        self.state.borrow().cut
    }

    async fn until_not_cut(&self) {
        // The sender lives in `self`, so `wait_for` cannot fail.
        let _ = self.state.subscribe().wait_for(|s| !s.cut).await;
    }

    fn attached(&self, direction: Direction) -> Arc<[Bandwidth]> {
        Arc::clone(lock(&self.attached).get(direction))
    }

    fn discard(&self, bytes: usize) {
        self.counters.discarded.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn set_listening(&self, listening: bool) -> io::Result<()> {
        let mut slot = lock(&self.listener);
        match (listening, slot.is_some()) {
            (false, true) => drop(slot.take()),
            (true, false) => *slot = Some(bind_listener(self.addr, &self.runtime)?),
            _ => return Ok(()),
        }
        drop(slot);
        self.listener_changed.notify_waiters();
        Ok(())
    }

    fn spawn_connection(self: &Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let mut registry = lock(&self.connections);
        if registry.closed {
            return;
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let rng = match *lock(&self.seed) {
            Some(seed) => Rng::seeded(seed ^ id.wrapping_mul(0xA076_1D64_78BD_642F)),
            None => Rng::from_entropy(),
        };
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        let reset = Arc::new(Notify::new());
        // The guard is moved into the task, so it runs even if the task is
        // aborted before its first poll.
        let guard = ConnectionGuard { shared: Arc::clone(self), id };
        let task = tokio::spawn(serve(guard, client, peer, Arc::clone(&reset), rng));
        registry.entries.insert(id, Connection { reset, task: task.abort_handle() });
    }
}

/// Unregisters a connection when its task ends or is aborted.
struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.connections).entries.remove(&self.id);
        self.shared.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Binds synchronously, so a refused link accepts again as soon as `refuse`
/// or `heal` returns.
fn bind_listener(addr: SocketAddr, runtime: &Handle) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let _runtime = runtime.enter();
    TcpListener::from_std(listener)
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let changed = shared.listener_changed.notified();
        tokio::pin!(changed);
        // Registered before the slot is looked at, so no change is missed.
        changed.as_mut().enable();
        let accepted = tokio::select! {
            accepted = poll_fn(|cx| match lock(&shared.listener).as_ref() {
                Some(listener) => listener.poll_accept(cx),
                None => Poll::Pending,
            }) => accepted,
            () = &mut changed => continue,
        };
        match accepted {
            Ok((client, peer)) => shared.spawn_connection(client, peer),
            Err(error) => {
                // Typically EMFILE; back off rather than spin.
                warn!(target: "faults", proxy = %shared.addr, %error, "link proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How a connection ended.
enum End {
    /// Both directions reached end of stream.
    Closed,
    /// A socket failed; the failure is passed on as an RST.
    Failed(io::Error),
    /// `LinkProxy::reset` was called.
    Reset,
}

async fn serve(guard: ConnectionGuard, mut client: TcpStream, peer: SocketAddr, reset: Arc<Notify>, mut rng: Rng) {
    let shared = &*guard.shared;
    let _ = client.set_nodelay(true);

    // A connection that arrives during a cut is held until the link heals.
    if shared.is_cut() {
        tokio::select! {
            held = hold_while_cut(shared, &mut client) => match held {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => return abort(&[&client]),
            },
            () = reset.notified() => return abort(&[&client]),
        }
    }

    let upstream_addr = *lock(&shared.upstream);
    let mut upstream = tokio::select! {
        connected = TcpStream::connect(upstream_addr) => match connected {
            Ok(upstream) => upstream,
            Err(error) => {
                debug!(target: "faults", %peer, upstream = %upstream_addr, %error, "link proxy cannot reach upstream");
                return abort(&[&client]);
            }
        },
        () = reset.notified() => return abort(&[&client]),
    };
    let _ = upstream.set_nodelay(true);

    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let mut down_rng = rng.fork();
        let to_upstream = pipe(shared, Direction::ToUpstream, client_read, upstream_write, &mut rng);
        let to_client = pipe(shared, Direction::ToClient, upstream_read, client_write, &mut down_rng);
        tokio::select! {
            done = async { tokio::try_join!(to_upstream, to_client) } => match done {
                Ok(_) => End::Closed,
                Err(error) => End::Failed(error),
            },
            () = reset.notified() => End::Reset,
        }
    };
    match end {
        End::Closed => {}
        End::Reset => abort(&[&client, &upstream]),
        End::Failed(error) => {
            debug!(target: "faults", %peer, %error, "link connection failed; resetting both sides");
            // Even the RST waits for the link to heal.
            tokio::select! {
                () = shared.until_not_cut() => {}
                () = reset.notified() => {}
            }
            abort(&[&client, &upstream]);
        }
    }
}

/// Closes sockets with an RST when they are dropped.
fn abort(streams: &[&TcpStream]) {
    for stream in streams {
        let _ = stream.set_zero_linger();
    }
}

/// Reads and discards what the client sends until the link heals (`true`)
/// or the client closes (`false`).
async fn hold_while_cut(shared: &Shared, client: &mut TcpStream) -> io::Result<bool> {
    let mut state = shared.state.subscribe();
    let mut buf = vec![0; READ_CHUNK];
    loop {
        if !state.borrow_and_update().cut {
            return Ok(true);
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() {
                return Ok(false);
            },
            read = client.read(&mut buf) => match read? {
                0 => return Ok(false),
                n => shared.discard(n),
            },
        }
    }
}

/// A segment on its way, with the instant it arrives.
struct Segment {
    data: Vec<u8>,
    arrives: Instant,
}

/// One direction of one connection: a scheduler that reads and stamps each
/// segment with its arrival time, and a deliverer that writes it then.
async fn pipe<R, W>(shared: &Shared, direction: Direction, from: R, to: W, rng: &mut Rng) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let delivered = match direction {
        Direction::ToUpstream => &shared.counters.to_upstream,
        Direction::ToClient => &shared.counters.to_client,
    };
    let (tx, rx) = mpsc::channel(IN_FLIGHT_SEGMENTS);
    // Set when this side's read failed: the deliverer then ends without a
    // FIN, and the connection's end resets both sides.
    let read_failed = AtomicBool::new(false);
    let scheduled = async {
        let r = schedule(shared, direction, from, tx, rng).await;
        if r.is_err() {
            read_failed.store(true, Ordering::SeqCst);
        }
        r
    };
    let delivered = deliver(shared, delivered, rx, to, &read_failed);
    tokio::pin!(scheduled, delivered);
    // A read error on this side (a reset) still delivers what was read
    // before it, as a real network delivers the bytes sent before an RST
    // (a TLS alert ahead of the peer's reset, say): the scheduler's end
    // closes the queue, the deliverer drains it, then the error counts. A
    // write error on the far side ends the direction at once.
    let mut read_error = None;
    let mut reading = true;
    loop {
        tokio::select! {
            r = &mut scheduled, if reading => {
                reading = false;
                read_error = r.err();
            }
            r = &mut delivered => {
                r?;
                return read_error.map_or(Ok(()), Err);
            }
        }
    }
}

async fn schedule<R: AsyncRead + Unpin>(
    shared: &Shared,
    direction: Direction,
    mut from: R,
    tx: mpsc::Sender<Segment>,
    rng: &mut Rng,
) -> io::Result<()> {
    let mut buf = vec![0; READ_CHUNK];
    let mut timeline = Timeline::default();
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let state = *shared.state.borrow();
        if state.cut {
            shared.discard(n);
            continue;
        }
        let conditions = state.conditions;
        let buckets = shared.attached(direction);
        for chunk in buf[..n].chunks(conditions.segment_size(n)) {
            let mut sent = now;
            if !buckets.is_empty() {
                // Waiting here (not in the deliverer) keeps one segment per
                // connection reserved ahead, and stops reading meanwhile.
                sent = bandwidth::reserve(&buckets, Instant::now(), chunk.len());
                if sent > Instant::now() {
                    tokio::time::sleep_until(sent).await;
                }
            }
            let arrives = timeline.arrival(sent, chunk.len(), &conditions, rng);
            let segment = Segment { data: chunk.to_vec(), arrives };
            if tx.send(segment).await.is_err() {
                // The deliverer failed; `pipe` returns its error.
                return Ok(());
            }
        }
    }
}

async fn deliver<W: AsyncWrite + Unpin>(
    shared: &Shared,
    delivered: &AtomicU64,
    mut rx: mpsc::Receiver<Segment>,
    mut to: W,
    read_failed: &AtomicBool,
) -> io::Result<()> {
    while let Some(segment) = rx.recv().await {
        if segment.arrives > Instant::now() {
            tokio::time::sleep_until(segment.arrives).await;
        }
        if shared.is_cut() {
            shared.discard(segment.data.len());
            continue;
        }
        to.write_all(&segment.data).await?;
        delivered.fetch_add(segment.data.len() as u64, Ordering::Relaxed);
    }
    if read_failed.load(Ordering::SeqCst) {
        // A reset, not an end of stream: no FIN (the caller resets).
        return Ok(());
    }
    // End of stream: the FIN crosses the link once it is up.
    shared.until_not_cut().await;
    to.shutdown().await
}

/// The sending side of one direction: when the link is next free and when
/// the last segment arrives.
#[derive(Default)]
struct Timeline {
    link_free: Option<Instant>,
    last_arrival: Option<Instant>,
}

impl Timeline {
    fn arrival(&mut self, now: Instant, len: usize, conditions: &LinkConditions, rng: &mut Rng) -> Instant {
        let sent = match conditions.bandwidth_bps {
            Some(bps) => {
                let start = self.link_free.map_or(now, |free| free.max(now));
                let bits = len as u128 * 8;
                let nanos = bits * 1_000_000_000 / u128::from(bps.max(1));
                let done = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                self.link_free = Some(done);
                done
            }
            None => now,
        };
        let mut arrives = sent + conditions.delay + rng.duration_up_to(conditions.jitter);
        let loss = conditions.loss();
        let mut rto = conditions.rto();
        while loss > 0.0 && rng.next_f64() < loss {
            arrives += rto;
            rto = (rto * 2).min(MAX_RTO);
        }
        if let Some(last) = self.last_arrival {
            arrives = arrives.max(last);
        }
        self.last_arrival = Some(arrives);
        arrives
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn arrivals_never_reorder_under_jitter() {
        let conditions = LinkConditions { delay: ms(10), jitter: ms(50), ..LinkConditions::PERFECT };
        let (mut timeline, mut rng, now) = (Timeline::default(), Rng::seeded(1), Instant::now());
        let mut last = now;
        for _ in 0..1000 {
            let arrives = timeline.arrival(now, 100, &conditions, &mut rng);
            assert!(arrives >= last && arrives >= now + ms(10));
            last = arrives;
        }
    }

    #[test]
    fn bandwidth_paces_segments() {
        let conditions = LinkConditions {
            bandwidth_bps: Some(8_000), // 1000 bytes/s
            ..LinkConditions::PERFECT
        };
        let (mut timeline, mut rng, now) = (Timeline::default(), Rng::seeded(1), Instant::now());
        let first = timeline.arrival(now, 1000, &conditions, &mut rng);
        let second = timeline.arrival(now, 1000, &conditions, &mut rng);
        assert_eq!(first, now + ms(1000));
        assert_eq!(second, now + ms(2000));
    }

    #[test]
    fn loss_delays_by_whole_rtos_and_blocks_later_segments() {
        let conditions = LinkConditions { delay: ms(100), loss: 0.5, ..LinkConditions::PERFECT };
        assert_eq!(conditions.rto(), ms(400));
        let (mut timeline, mut rng, now) = (Timeline::default(), Rng::seeded(3), Instant::now());
        let mut last = now;
        let mut late = 0;
        for _ in 0..200 {
            let arrives = timeline.arrival(now, 100, &conditions, &mut rng);
            let extra = arrives - now - ms(100);
            // 0, 400, 400+800, ... ms, or held behind an earlier segment.
            assert!(arrives >= last);
            assert_eq!(extra.as_millis() % 400, 0, "extra {extra:?}");
            late += usize::from(extra > Duration::ZERO);
            last = arrives;
        }
        assert!(late > 0);
    }

    #[test]
    fn loss_is_clamped() {
        let mut conditions = LinkConditions { loss: 1.0, ..LinkConditions::PERFECT };
        assert_eq!(conditions.loss(), MAX_LOSS);
        conditions.loss = f64::NAN;
        assert_eq!(conditions.loss(), 0.0);
        assert_eq!(LinkConditions::default(), LinkConditions::PERFECT);
    }
}
