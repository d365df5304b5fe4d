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

/// Windows in which [`BusyWatch`] judges the guest.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// Percent of its share a guest must use in a window to count as busy.
pub const BUSY_PERCENT: u128 = 90;

/// Tells when a guest has used (nearly) all of its CPU share in every
/// window for a while: an endless loop, or work that never waits on
/// anything (`--cpu-stop-after`). The share is the CPU limit, at most one
/// core (a guest runs on one thread). A guest blocked in a host call uses
/// no CPU, so a window it spends waiting ends the streak.
#[derive(Debug, Clone)]
pub struct BusyWatch {
    millis: u64,
    stop_after: Duration,
    window_wall: Duration,
    window_cpu: Duration,
    busy_since: Option<Duration>,
}

impl BusyWatch {
    /// A watch for a guest limited to `millis` thousandths of a core that
    /// is stopped after `stop_after` of busy windows.
    pub fn new(millis: NonZeroU32, stop_after: Duration) -> Self {
        BusyWatch {
            millis: u64::from(millis.get()).min(1000),
            stop_after,
            window_wall: Duration::ZERO,
            window_cpu: Duration::ZERO,
            busy_since: None,
        }
    }

    /// Takes the wall and CPU time since the start; `Some(busy_for)` once
    /// the guest has been busy for at least `stop_after`.
    pub fn observe(&mut self, wall: Duration, cpu: Duration) -> Option<Duration> {
        let span = wall.saturating_sub(self.window_wall);
        if span < BUSY_WINDOW {
            return None;
        }
        let used = cpu.saturating_sub(self.window_cpu).as_nanos();
        let share = span.as_nanos() * u128::from(self.millis) / 1000;
        if used * 100 >= share * BUSY_PERCENT {
            self.busy_since.get_or_insert(self.window_wall);
        } else {
            self.busy_since = None;
        }
        (self.window_wall, self.window_cpu) = (wall, cpu.max(self.window_cpu));
        let busy_for = wall.saturating_sub(self.busy_since?);
        (busy_for >= self.stop_after).then_some(busy_for)
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
    fn a_guest_busy_in_every_window_is_stopped_after_the_time_given() {
        // At 500m, a guest using its share (paused the rest) is busy.
        let mut watch = BusyWatch::new(millis(500), Duration::from_secs(5));
        let mut stopped = None;
        for n in 1..=20u64 {
            let (wall, cpu) = (Duration::from_millis(250 * n), Duration::from_millis(125 * n));
            if let Some(busy) = watch.observe(wall, cpu) {
                stopped = Some((wall, busy));
                break;
            }
        }
        assert_eq!(stopped, Some((Duration::from_secs(5), Duration::from_secs(5))));
        // Above a core, the share is one core: a guest on one full core is busy.
        let mut wide = BusyWatch::new(millis(4000), Duration::from_secs(2));
        assert_eq!(wide.observe(ms(1000), ms(1000)), None);
        assert_eq!(wide.observe(ms(2000), ms(1990)), Some(ms(2000)));
    }

    #[test]
    fn a_window_spent_waiting_ends_the_streak() {
        let mut watch = BusyWatch::new(millis(1000), Duration::from_secs(3));
        assert_eq!(watch.observe(ms(1000), ms(1000)), None);
        assert_eq!(watch.observe(ms(2000), ms(2000)), None);
        // A second mostly in accept(): 10 % of a core.
        assert_eq!(watch.observe(ms(3000), ms(2100)), None);
        assert_eq!(watch.observe(ms(4000), ms(3100)), None);
        assert_eq!(watch.observe(ms(5000), ms(4100)), None);
        // Busy again from 3 s: stopped at 6 s, not at 3 s.
        assert_eq!(watch.observe(ms(6000), ms(5100)), Some(ms(3000)));
        // Short observations only count once a window is full.
        let mut quick = BusyWatch::new(millis(1000), Duration::from_secs(1));
        assert_eq!(quick.observe(ms(10), ms(10)), None);
        assert_eq!(quick.observe(ms(999), ms(999)), None);
        assert_eq!(quick.observe(ms(1000), ms(1000)), Some(ms(1000)));
    }

    #[test]
    fn clocks_going_backwards_are_ignored() {
        let mut throttle = CpuThrottle::new(millis(500));
        assert_eq!(throttle.observe(ms(50), ms(10)), None);
        assert_eq!(throttle.observe(ms(40), ms(5)), None);
        assert_eq!(throttle.observe(ms(50), ms(10)), None);
    }
}
