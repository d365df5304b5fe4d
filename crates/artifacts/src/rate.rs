//! Pacing bytes: a token bucket with the time passed in (sans-IO), shared
//! by the cloud's chunk egress limit and the edge's peer upload and
//! download limits.

use std::time::{Duration, Instant};

/// A token bucket of bytes per second, with the time passed in: a caller
/// reserves bytes and waits the returned time before moving them. It holds
/// at most one second of tokens and may go into debt, so a reservation
/// larger than a second's worth is still granted, later.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64, now: Instant) -> TokenBucket {
        let rate = bytes_per_sec.max(1) as f64;
        TokenBucket { rate, burst: rate, tokens: rate, last: now }
    }

    /// Takes `n` bytes; returns how long to wait before moving them.
    pub fn reserve(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert_eq!(b.reserve(1000, t0), Duration::ZERO, "one second of burst");
        assert_eq!(b.reserve(500, t0), Duration::from_millis(500), "then debt at the rate");
        // Half a second later the debt is paid; a second later, full again (never more).
        assert_eq!(b.reserve(0, t0 + Duration::from_millis(500)), Duration::ZERO);
        assert_eq!(b.reserve(1000, t0 + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!(b.reserve(1, t0 + Duration::from_secs(10)), Duration::from_millis(1));
        // A clock that steps back is not credited.
        assert_eq!(b.reserve(0, t0), Duration::from_millis(1));
    }

    #[test]
    fn the_token_bucket_paces_with_an_injected_clock() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert_eq!(b.reserve(1000, t0), Duration::ZERO, "a second's worth at once");
        assert_eq!(b.reserve(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid: the next 1000 wait one second.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.reserve(1000, t1), Duration::from_secs(1));
        // Idle time refills at most one second's worth.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.reserve(1000, t2), Duration::ZERO);
        assert_eq!(b.reserve(1, t2), Duration::from_millis(1));
        // A chunk larger than the bucket is admitted, with its wait.
        let mut big = TokenBucket::new(1 << 20, t0);
        assert_eq!(big.reserve(4 << 20, t0), Duration::from_secs(3));
        // Sending 10 s worth in slices: the waits add up to 9 s (the first
        // second is the burst), whatever the slice size.
        let mut b = TokenBucket::new(64 << 10, t0);
        let mut now = t0;
        for _ in 0..10 * 4 {
            now += b.reserve(16 << 10, now);
        }
        assert_eq!(now - t0, Duration::from_secs(9));
    }
}
