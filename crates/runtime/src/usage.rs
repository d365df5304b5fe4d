//! When a new usage measurement of an instance is worth a status report.
//!
//! Every report travels runtime → agent → persisted outbox → cloud store,
//! so usage is re-reported only when it changed noticeably since the last
//! report, and never more often than once per sampling interval:
//! - CPU by at least 10 % of the last reported value, but never less than
//!   [`CPU_MIN_STEP`] and at most [`CPU_MAX_STEP`] millicores (so 2 → 4 m of
//!   an idle app is noise, and 2000 → 2020 m of a busy one is news);
//! - memory by at least 5 % of the last reported value and at least
//!   [`MEMORY_MIN_STEP`];
//! - any app-reported metric appeared, disappeared or changed value.
//!
//! Sans-IO: the caller passes `now`.

use std::time::{Duration, Instant};

use yunbian_api::InstanceUsage;

/// Smallest CPU change that counts, in millicores.
pub(crate) const CPU_MIN_STEP: u64 = 5;
/// A CPU change of this many millicores always counts.
pub(crate) const CPU_MAX_STEP: u64 = 20;
/// Smallest memory change that counts, in bytes.
pub(crate) const MEMORY_MIN_STEP: u64 = 1 << 20;

/// Whether `next` differs noticeably from the reported `prev`.
pub(crate) fn changed_noticeably(prev: &InstanceUsage, next: &InstanceUsage) -> bool {
    let cpu_step = (prev.cpu_millis / 10).clamp(CPU_MIN_STEP, CPU_MAX_STEP);
    if prev.cpu_millis.abs_diff(next.cpu_millis) >= cpu_step {
        return true;
    }
    let memory_step = (prev.memory_bytes / 20).max(MEMORY_MIN_STEP);
    if prev.memory_bytes.abs_diff(next.memory_bytes) >= memory_step {
        return true;
    }
    prev.metrics != next.metrics
}

/// The last usage reported for one run of an instance.
#[derive(Debug, Clone, Default)]
pub(crate) struct UsageGate {
    last: Option<(InstanceUsage, Instant)>,
}

impl UsageGate {
    /// Whether `usage`, measured at `now`, should be reported: the first
    /// one always; later ones when at least `min_interval` passed since the
    /// last report and the change is noticeable. A `true` answer records
    /// `usage` as reported.
    pub fn offer(&mut self, usage: &InstanceUsage, now: Instant, min_interval: Duration) -> bool {
        let report = match &self.last {
            None => true,
            Some((prev, at)) => now.saturating_duration_since(*at) >= min_interval && changed_noticeably(prev, usage),
        };
        if report {
            self.last = Some((usage.clone(), now));
        }
        report
    }

    /// The last reported usage.
    #[cfg(test)]
    pub fn last(&self) -> Option<&InstanceUsage> {
        self.last.as_ref().map(|(u, _)| u)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn usage(cpu: u64, mem: u64) -> InstanceUsage {
        InstanceUsage { cpu_millis: cpu, memory_bytes: mem, metrics: BTreeMap::new() }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn cpu_threshold_is_ten_percent_clamped() {
        let m = 100 * MIB;
        // Idle: a few millicores of jitter is not news.
        assert!(!changed_noticeably(&usage(2, m), &usage(6, m)));
        assert!(changed_noticeably(&usage(2, m), &usage(7, m)));
        // Mid range: 10 %.
        assert!(!changed_noticeably(&usage(150, m), &usage(164, m)));
        assert!(changed_noticeably(&usage(150, m), &usage(165, m)));
        assert!(changed_noticeably(&usage(150, m), &usage(135, m)));
        // Busy: 20 millicores always count.
        assert!(!changed_noticeably(&usage(2000, m), &usage(2019, m)));
        assert!(changed_noticeably(&usage(2000, m), &usage(2020, m)));
        assert!(changed_noticeably(&usage(2000, m), &usage(1980, m)));
    }

    #[test]
    fn memory_threshold_is_five_percent_and_a_mebibyte() {
        assert!(!changed_noticeably(&usage(10, 100 * MIB), &usage(10, 104 * MIB)));
        assert!(changed_noticeably(&usage(10, 100 * MIB), &usage(10, 105 * MIB)));
        assert!(changed_noticeably(&usage(10, 100 * MIB), &usage(10, 95 * MIB)));
        // Small processes: 1 MiB at least.
        assert!(!changed_noticeably(&usage(10, 4 * MIB), &usage(10, 4 * MIB + MIB - 1)));
        assert!(changed_noticeably(&usage(10, 4 * MIB), &usage(10, 5 * MIB)));
    }

    #[test]
    fn any_metric_change_counts() {
        let mut a = usage(10, MIB);
        a.metrics.insert("queue_depth".into(), 17.0);
        let mut b = a.clone();
        assert!(!changed_noticeably(&a, &b));
        b.metrics.insert("queue_depth".into(), 18.0);
        assert!(changed_noticeably(&a, &b));
        b.metrics.clear();
        assert!(changed_noticeably(&a, &b));
        assert!(changed_noticeably(&b, &a));
    }

    #[test]
    fn gate_reports_first_then_noticeable_changes_at_most_once_per_interval() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut g = UsageGate::default();
        assert!(g.offer(&usage(100, 50 * MIB), t0, every), "the first usage is reported");
        assert!(!g.offer(&usage(300, 50 * MIB), t0 + Duration::from_secs(5), every), "too soon");
        assert!(!g.offer(&usage(105, 50 * MIB), t0 + every, every), "not noticeable");
        assert_eq!(g.last(), Some(&usage(100, 50 * MIB)));
        assert!(g.offer(&usage(300, 50 * MIB), t0 + every, every));
        assert_eq!(g.last(), Some(&usage(300, 50 * MIB)));
        // Compared with the last report, so a slow drift is reported once it adds up.
        assert!(!g.offer(&usage(315, 50 * MIB), t0 + 2 * every, every));
        assert!(g.offer(&usage(330, 50 * MIB), t0 + 3 * every, every));
    }
}
