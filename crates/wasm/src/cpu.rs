//! The guest's CPU limit (`--cpu-millis`), sans-IO.
//!
//! Mechanism: Wasmtime's epoch interruption. A ticker thread advances the
//! engine's epoch every [`TICK`]; compiled guest code checks the epoch at
//! function entries and loop back-edges, and when it has passed the store's
//! deadline Wasmtime calls back into the shim. The callback reads the
//! process's CPU time and asks [`CpuThrottle`] whether the guest is over
//! its share; if so the guest's fiber yields to an async sleep for the
//! time that brings it back to `millis / 1000` of wall time, then resumes
//! where it was. A guest blocked in a host call (a socket accept, a sleep)
//! uses no CPU and is never paused for it.
//!
//! Accounting is a token bucket in CPU time: every observation adds
//! `wall elapsed × millis / 1000` of credit and takes away the CPU time
//! used; the credit is capped at [`BURST`] so an idle guest cannot bank
//! minutes of full speed; a negative credit is paid back by pausing for
//! `−credit × 1000 / millis`. The clock readings are inputs, so the policy
//! is tested with virtual time below.

use std::num::NonZeroU32;
use std::time::Duration;

/// How often the ticker advances the epoch: the granularity of the limit.
pub const TICK: Duration = Duration::from_millis(10);

/// The most CPU time an idle guest can bank for a later burst.
pub const BURST: Duration = Duration::from_millis(100);

/// Decides, from wall and CPU time since the guest started, when and how
/// long to pause it.
#[derive(Debug, Clone)]
pub struct CpuThrottle {
    millis: u64,
    /// Nanoseconds of CPU the guest may still use; negative: owed.
    credit: i128,
    last_wall: Duration,
    last_cpu: Duration,
}

impl CpuThrottle {
    /// A throttle for `millis` thousandths of a core, starting at zero wall
    /// and CPU time with a full burst.
    pub fn new(millis: NonZeroU32) -> Self {
        CpuThrottle {
            millis: u64::from(millis.get()),
            credit: BURST.as_nanos() as i128,
            last_wall: Duration::ZERO,
            last_cpu: Duration::ZERO,
        }
    }

    /// Takes the wall and CPU time since the start; returns how long to
    /// pause the guest, if it is over its share. Clocks going backwards
    /// count as no time passing.
    pub fn observe(&mut self, wall: Duration, cpu: Duration) -> Option<Duration> {
        let wall_delta = wall.saturating_sub(self.last_wall);
        let cpu_delta = cpu.saturating_sub(self.last_cpu);
        self.last_wall = self.last_wall.max(wall);
        self.last_cpu = self.last_cpu.max(cpu);
        let earned = wall_delta.as_nanos() as i128 * self.millis as i128 / 1000;
        self.credit = (self.credit + earned - cpu_delta.as_nanos() as i128).min(BURST.as_nanos() as i128);
        if self.credit >= 0 {
            return None;
        }
        let pause_nanos = (-self.credit) * 1000 / self.millis as i128;
        Some(Duration::from_nanos(u64::try_from(pause_nanos).unwrap_or(u64::MAX)))
    }
}

/// What the CPU limit did during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Times the guest reached an epoch deadline (was interrupted and
    /// resumed); 0 without `--cpu-millis`.
    pub interruptions: u64,
    /// Times it was paused for being over its share.
    pub pauses: u64,
    /// Total time paused.
    pub paused: Duration,
    /// CPU time the process used from the guest's start to its end.
    pub cpu: Duration,
    /// Wall time from the guest's start to its end.
    pub wall: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn millis(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("test limits are positive")
    }

    /// Drives a guest that is always busy: each tick it burns one tick of
    /// CPU, and pauses are served exactly. Returns CPU and wall time used.
    fn busy_guest(limit: u32, ticks: u32) -> (Duration, Duration) {
        let mut throttle = CpuThrottle::new(millis(limit));
        let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..ticks {
            wall += TICK;
            cpu += TICK;
            if let Some(pause) = throttle.observe(wall, cpu) {
                wall += pause;
            }
        }
        (cpu, wall)
    }

    #[test]
    fn a_busy_guest_gets_its_share_of_wall_time() {
        for limit in [100, 250, 500, 900] {
            let (cpu, wall) = busy_guest(limit, 2000);
            // The guest gets its share of the wall time plus the initial
            // burst (to rounding of a few nanoseconds a pause), no less.
            let share = wall.as_nanos() * u128::from(limit) / 1000;
            assert!(cpu.as_nanos() <= share + BURST.as_nanos() + 1000, "limit {limit}: cpu {cpu:?} wall {wall:?}");
            assert!(cpu.as_nanos() >= share, "limit {limit}: cpu {cpu:?} wall {wall:?}");
        }
    }

    #[test]
    fn a_whole_core_or_more_never_pauses_a_single_threaded_guest() {
        let mut throttle = CpuThrottle::new(millis(1000));
        for n in 1..1000u64 {
            assert_eq!(throttle.observe(TICK * n as u32, TICK * n as u32), None);
        }
    }

    #[test]
    fn the_first_burst_runs_unpaused_then_pays_back() {
        let mut throttle = CpuThrottle::new(millis(100));
        // 10 ms of CPU in 10 ms of wall: 9 ms over, within the 100 ms burst.
        assert_eq!(throttle.observe(ms(10), ms(10)), None);
        // Burst spent: at 120 ms of CPU in 120 ms of wall, the guest owes
        // 120 - 100 - 12 = 8 ms of CPU, paid by 80 ms of pause at 10 %.
        assert_eq!(throttle.observe(ms(120), ms(120)), Some(ms(80)));
        // After sleeping those 80 ms (no CPU) it is even again.
        assert_eq!(throttle.observe(ms(200), ms(120)), None);
    }

    #[test]
    fn idle_time_banks_at_most_the_burst() {
        let mut throttle = CpuThrottle::new(millis(500));
        // An hour blocked in accept().
        assert_eq!(throttle.observe(Duration::from_secs(3600), ms(1)), None);
        // Then 300 ms of CPU in 300 ms: 100 ms banked + 150 ms earned - 300 ms used.
        let pause = throttle.observe(Duration::from_secs(3600) + ms(300), ms(301));
        assert_eq!(pause, Some(ms(100)));
    }

    #[test]
    fn clocks_going_backwards_are_ignored() {
        let mut throttle = CpuThrottle::new(millis(500));
        assert_eq!(throttle.observe(ms(50), ms(10)), None);
        assert_eq!(throttle.observe(ms(40), ms(5)), None);
        assert_eq!(throttle.observe(ms(50), ms(10)), None);
    }
}
