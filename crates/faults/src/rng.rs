//! A tiny SplitMix64 generator: fast, seedable, good enough for choosing
//! which segment to lose or which byte to scribble. Not for cryptography.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator that replays the same sequence for the same `seed`.
    pub(crate) fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded from the clock, the process id and a counter, so
    /// two generators created in the same nanosecond still differ.
    pub(crate) fn from_entropy() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut mixer = Self(nanos ^ (u64::from(std::process::id()) << 32));
        Self(mixer.next_u64() ^ count.wrapping_mul(GOLDEN_GAMMA))
    }

    /// An independent generator derived from this one.
    pub(crate) fn fork(&mut self) -> Self {
        Self(self.next_u64())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, max]`.
    pub(crate) fn duration_up_to(&mut self, max: Duration) -> Duration {
        let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if max_nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % max_nanos.saturating_add(1))
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::seeded(7), Rng::seeded(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn floats_and_durations_stay_in_range() {
        let mut rng = Rng::from_entropy();
        for _ in 0..10_000 {
            let f = rng.next_f64();
            assert!((0.0..1.0).contains(&f));
            assert!(rng.duration_up_to(Duration::from_millis(3)) <= Duration::from_millis(3));
        }
        assert_eq!(rng.duration_up_to(Duration::ZERO), Duration::ZERO);
    }
}
