//! Link-wide bandwidth: token buckets shared by connections and proxies.
//!
//! [`LinkConditions::bandwidth_bps`](crate::LinkConditions) limits each
//! direction of each connection on its own, so ten connections through a
//! 10 Mbit/s proxy move 100 Mbit/s together. A real access link is shared:
//! every connection that crosses it takes from the same capacity. A
//! [`Bandwidth`] is that capacity, for one direction; a [`SharedLink`] is a
//! node's access link, one `Bandwidth` up and one down.
//!
//! A `Bandwidth` is attached to a direction of a [`LinkProxy`]
//! ([`LinkProxy::attach`]), and the same handle may be attached to several
//! proxies and directions: then all their connections share it. A node whose
//! cloud connections go through one proxy and whose peer server is reached
//! through another has one `SharedLink`, attached to both
//! ([`LinkProxy::attach_client_link`] on the first: the node is the client;
//! [`LinkProxy::attach_upstream_link`] on the second: the node is the
//! upstream), so what it uploads to peers and what it uploads to the cloud
//! share its uplink.
//!
//! # Model
//!
//! A strict token bucket per `Bandwidth`: it fills at `rate` (bits per
//! second, counted as bytes × 8) up to `burst` bytes, and starts full. A
//! proxy's pipe, for each segment it reads (up to 16 KiB, or
//! [`SEGMENT_SIZE`](crate::link::SEGMENT_SIZE) when the connection also has
//! per-connection conditions), *reserves* the segment's bytes on every
//! bucket attached to its direction: the segment may leave at the first
//! instant at which every one of them holds that many tokens (a segment
//! larger than `burst` needs a full bucket), and the tokens are taken at
//! that instant. The pipe then waits until that instant before it reads
//! again, so each connection has at most one segment reserved ahead: the
//! buckets are served in the order segments were reserved (first come,
//! first served, about one segment per connection in turn when all are
//! busy), and a connection that waits stops reading, so its sender is
//! slowed by TCP flow control as on a real bottleneck. The segment then
//! goes through the connection's own conditions (per-connection bandwidth,
//! delay, jitter, loss) as before.
//!
//! Guarantee: over any interval of length `d`, the bytes that leave a
//! bucket are at most `burst + rate × d / 8` — the rate plus one bucket —
//! however many connections and proxies share it. The bucket is the only
//! queue: there is no router buffer, no drop and no AQM, so a shared link
//! adds waiting time but never loss, and the waiting is spread over the
//! connections that share it.
//!
//! The default `burst` is 10 ms at the rate, and never less than 16 KiB (one
//! read), so a pipe woken a millisecond late by the timer does not lose
//! throughput. Bytes reserved by a connection that then dies, or by a cut
//! link, are spent all the same.
//!
//! [`LinkProxy`]: crate::LinkProxy
//! [`LinkProxy::attach`]: crate::LinkProxy::attach
//! [`LinkProxy::attach_client_link`]: crate::LinkProxy::attach_client_link
//! [`LinkProxy::attach_upstream_link`]: crate::LinkProxy::attach_upstream_link

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The smallest default bucket: one read of the pipe.
const MIN_DEFAULT_BURST: u64 = 16 * 1024;
/// The default bucket holds this long at the rate.
const DEFAULT_BURST_TIME: Duration = Duration::from_millis(10);

/// One direction's capacity, shared by every connection of every proxy
/// direction it is attached to; see the [module docs](self).
///
/// Clones are the same bucket.
#[derive(Clone)]
pub struct Bandwidth {
    bucket: Arc<Bucket>,
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bandwidth")
            .field("rate_bps", &self.bucket.rate_bps)
            .field("burst", &self.bucket.burst)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl PartialEq for Bandwidth {
    /// The same bucket (not merely the same rate).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bucket, &other.bucket)
    }
}

impl Eq for Bandwidth {}

impl Bandwidth {
    /// `rate_bps` bits per second (0 is treated as 1) with the default
    /// bucket: 10 ms at the rate, at least 16 KiB.
    pub fn new(rate_bps: u64) -> Self {
        let rate_bps = rate_bps.max(1);
        let ten_ms = rate_bps / 8 * DEFAULT_BURST_TIME.as_millis() as u64 / 1000;
        Self::with_burst(rate_bps, ten_ms.max(MIN_DEFAULT_BURST))
    }

    /// `rate_bps` bits per second with a bucket of `burst` bytes (both at
    /// least 1).
    pub fn with_burst(rate_bps: u64, burst: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            bucket: Arc::new(Bucket {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                rate_bps: rate_bps.max(1),
                burst: burst.max(1),
                full_at: Mutex::new(None),
                bytes: AtomicU64::new(0),
            }),
        }
    }

    /// The rate, bits per second.
    pub fn rate_bps(&self) -> u64 {
        self.bucket.rate_bps
    }

    /// The bucket's depth, bytes.
    pub fn burst(&self) -> u64 {
        self.bucket.burst
    }

    /// Bytes that have passed the bucket (reserved) since it was made.
    pub fn bytes(&self) -> u64 {
        self.bucket.bytes.load(Ordering::Relaxed)
    }

    /// Reserves `len` bytes: returns the first instant, not before `ready`,
    /// at which the bucket holds them (all of it if `len` exceeds the
    /// bucket), and takes them at that instant. The caller sends then.
    pub fn reserve(&self, ready: Instant, len: usize) -> Instant {
        reserve(std::slice::from_ref(self), ready, len)
    }
}

/// A node's access link: what it sends (`up`) and what it receives (`down`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLink {
    /// From the node to the network.
    pub up: Bandwidth,
    /// From the network to the node.
    pub down: Bandwidth,
}

impl SharedLink {
    /// A link with `up_bps` and `down_bps` bits per second, default buckets.
    pub fn new(up_bps: u64, down_bps: u64) -> Self {
        Self { up: Bandwidth::new(up_bps), down: Bandwidth::new(down_bps) }
    }

    /// The same rate both ways (two buckets: the directions do not share).
    pub fn symmetric(bps: u64) -> Self {
        Self::new(bps, bps)
    }
}

struct Bucket {
    /// Orders the locks when a segment reserves several buckets.
    id: u64,
    rate_bps: u64,
    burst: u64,
    /// When the bucket is full again if nothing more is reserved; `None`
    /// before the first reservation (full).
    full_at: Mutex<Option<Instant>>,
    bytes: AtomicU64,
}

impl Bucket {
    /// How long the bucket takes to gain `bytes` tokens.
    fn time_for(&self, bytes: u64) -> Duration {
        let nanos = u128::from(bytes) * 8 * 1_000_000_000 / u128::from(self.rate_bps);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The first instant, not before `ready`, at which the bucket holds
    /// `len` tokens (all of them if `len` exceeds the bucket).
    fn earliest(&self, full_at: Option<Instant>, ready: Instant, len: u64) -> Instant {
        let Some(full_at) = full_at else { return ready };
        // Tokens at t: burst − (full_at − t) × rate; enough once
        // full_at − t ≤ (burst − len) / rate.
        let slack = self.time_for(self.burst - len.min(self.burst));
        full_at.checked_sub(slack).map_or(ready, |t| t.max(ready))
    }

    /// Takes `len` tokens at `at` (never before `earliest` said).
    fn take(&self, full_at: &mut Option<Instant>, at: Instant, len: u64) {
        let from = full_at.map_or(at, |f| f.max(at));
        *full_at = Some(from + self.time_for(len));
        self.bytes.fetch_add(len, Ordering::Relaxed);
    }
}

/// Reserves `len` bytes on every bucket of `buckets` at once: returns the
/// first instant, not before `ready`, at which all of them hold the tokens,
/// and takes them at that instant. The caller sends the bytes then. A
/// bucket listed twice is charged twice.
pub(crate) fn reserve(buckets: &[Bandwidth], ready: Instant, len: usize) -> Instant {
    let mut charges: Vec<(&Bucket, u64)> = Vec::with_capacity(buckets.len());
    for bucket in buckets.iter().map(|b| &*b.bucket) {
        match charges.iter_mut().find(|(b, _)| std::ptr::eq(*b, bucket)) {
            Some((_, charge)) => *charge += len as u64,
            None => charges.push((bucket, len as u64)),
        }
    }
    // Locked in id order, so segments reserving overlapping sets of buckets
    // never deadlock.
    charges.sort_by_key(|(b, _)| b.id);
    let mut locked: Vec<_> = charges.into_iter().map(|(b, charge)| (b, charge, lock(&b.full_at))).collect();
    let at = locked.iter().fold(ready, |at, (b, charge, full_at)| at.max(b.earliest(**full_at, ready, *charge)));
    for (b, charge, full_at) in &mut locked {
        b.take(full_at, at, *charge);
    }
    at
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Bytes leaving in every window between two departures, against
    /// `burst + rate × window`.
    fn assert_within_rate(departures: &[(Instant, u64)], rate_bps: u64, burst: u64) {
        let mut sorted = departures.to_vec();
        sorted.sort_by_key(|d| d.0);
        for (i, &(start, _)) in sorted.iter().enumerate() {
            let mut bytes = 0;
            for &(at, len) in &sorted[i..] {
                bytes += len;
                let window = (at - start).as_nanos();
                let allowed = u128::from(burst) + window * u128::from(rate_bps) / 8 / 1_000_000_000;
                assert!(u128::from(bytes) <= allowed + 1, "{bytes} B in {window} ns (allowed {allowed})");
            }
        }
    }

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_paces() {
        // 8 Mbit/s = 1000 bytes per ms; bucket 4000 bytes.
        let bw = Bandwidth::with_burst(8_000_000, 4000);
        let t0 = Instant::now();
        let sent: Vec<Instant> = (0..8).map(|_| bw.reserve(t0, 1000)).collect();
        assert_eq!(&sent[..4], &[t0; 4]);
        assert_eq!(&sent[4..], &[t0 + ms(1), t0 + ms(2), t0 + ms(3), t0 + ms(4)]);
        assert_eq!(bw.bytes(), 8000);
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let bw = Bandwidth::with_burst(8_000_000, 2000);
        let t0 = Instant::now();
        assert_eq!(bw.reserve(t0, 2000), t0);
        // An hour idle refills 2000 bytes, not more.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bw.reserve(later, 2000), later);
        assert_eq!(bw.reserve(later, 1000), later + ms(1));
    }

    #[test]
    fn a_segment_larger_than_the_bucket_waits_for_a_full_bucket() {
        let bw = Bandwidth::with_burst(8_000_000, 1000);
        let t0 = Instant::now();
        assert_eq!(bw.reserve(t0, 1000), t0);
        assert_eq!(bw.reserve(t0, 3000), t0 + ms(1));
        // 3000 bytes taken at 1 ms: full again at 4 ms.
        assert_eq!(bw.reserve(t0, 1000), t0 + ms(4));
    }

    #[test]
    fn connections_sharing_a_bucket_never_exceed_rate_plus_burst() {
        // Three "connections" reserving in turn as fast as they are allowed,
        // each asking again when its last segment left (as a pipe does),
        // with segments of different sizes.
        let rate = 8_000_000;
        let bw = Bandwidth::new(rate);
        let t0 = Instant::now();
        let mut ready = [t0; 3];
        let sizes = [16 * 1024, 1460, 7000];
        let mut departures = Vec::new();
        for round in 0..300 {
            let c = round % 3;
            let at = bw.reserve(ready[c], sizes[c]);
            assert!(at >= ready[c]);
            departures.push((at, sizes[c] as u64));
            ready[c] = at;
        }
        assert_within_rate(&departures, rate, bw.burst());
        // And it is not slower than the rate either: all bytes minus one
        // bucket left within total / rate.
        let total: u64 = departures.iter().map(|d| d.1).sum();
        let last = departures.iter().map(|d| d.0).max().expect("departures");
        let expected = Duration::from_nanos((total - bw.burst()) * 8 * 1_000_000_000 / rate);
        assert!(last - t0 <= expected + ms(1), "{:?} for {total} B", last - t0);
    }

    #[test]
    fn a_segment_through_two_buckets_waits_for_the_slower() {
        let node = Bandwidth::with_burst(8_000_000, 1000); // 1000 B/ms
        let egress = Bandwidth::with_burst(16_000_000, 1000); // 2000 B/ms
        let t0 = Instant::now();
        let both = [node.clone(), egress.clone()];
        let sent: Vec<Instant> = (0..4).map(|_| reserve(&both, t0, 1000)).collect();
        assert_eq!(sent, [t0, t0 + ms(1), t0 + ms(2), t0 + ms(3)]);
        // The egress bucket was charged at the node's pace: another node's
        // segment waits only for the egress's own 0.5 ms per 1000 bytes.
        let other = Bandwidth::with_burst(8_000_000, 1000);
        assert_eq!(reserve(&[other, egress.clone()], t0 + ms(3), 1000), t0 + Duration::from_micros(3500));
        assert_eq!((node.bytes(), egress.bytes()), (4000, 5000));
    }

    #[test]
    fn a_bucket_listed_twice_is_charged_twice() {
        let bw = Bandwidth::with_burst(8_000_000, 1000);
        let t0 = Instant::now();
        assert_eq!(reserve(&[bw.clone(), bw.clone()], t0, 500), t0);
        assert_eq!(bw.bytes(), 1000);
        assert_eq!(bw.reserve(t0, 1000), t0 + ms(1));
    }

    #[test]
    fn default_bucket_is_ten_ms_and_at_least_one_read() {
        assert_eq!(Bandwidth::new(100_000_000).burst(), 125_000);
        assert_eq!(Bandwidth::new(8_000).burst(), 16 * 1024);
        assert_eq!(Bandwidth::new(0).rate_bps(), 1);
        let link = SharedLink::symmetric(1_000_000);
        assert_ne!(link.up, link.down);
        assert_eq!(link.up, link.up.clone());
    }
}
