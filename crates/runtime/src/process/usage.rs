//! Measuring what each running instance uses, for autoscaling.
//!
//! One background task samples every running instance once per
//! `usage_interval` (10 s by default) on a blocking thread:
//! - **CPU**: the instance cgroup's cumulative counter (v2 `cpu.stat`
//!   `usage_usec`, v1 `cpuacct.usage` when cpuacct is co-mounted with cpu);
//!   otherwise the sum of `utime+stime+cutime+cstime` (`/proc/<pid>/stat`)
//!   over the instance's processes — the cgroup's `cgroup.procs`, or,
//!   without a cgroup, every process of the workload's session (workloads
//!   lead their own session). Millicores are the counter's growth between
//!   two samples over the time between them, so the first usage of a run
//!   comes with its second sample.
//! - **Memory**: the cgroup's usage (`memory.current` /
//!   `memory.usage_in_bytes`) minus its inactive file cache; otherwise the
//!   summed resident set (`/proc/<pid>/statm`) of the same processes.
//! - **App metrics**: the live values the app reported through the local
//!   API ([`AppMetrics`](crate::AppMetrics)).
//!
//! The result becomes the instance's `status.usage` and is sent on the
//! runtime's status channel only when [`UsageGate`] says it changed
//! noticeably (at most once per interval). It is sent under the slot's
//! status lock, after checking the slot still shows the sampled run as
//! Running, so a usage report never overtakes or undoes a phase change.
//!
//! Cheap by design: one reusable read buffer, paths computed once per run,
//! a `/proc` scan only when some instance has no cgroup, and per-instance
//! state only for running instances.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use yunbian_api::{InstancePhase, InstanceUsage};

use super::cgroup::{working_set, CgroupCounters};
use super::procfs;
use super::{Shared, Slot};
use crate::usage::UsageGate;
use crate::StatusUpdate;

/// Samples usage until the runtime is dropped. `interval` zero: never.
pub(crate) async fn sample_usage(shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    let interval = shared.opts.usage_interval;
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sampler = Some(Sampler::new());
    loop {
        let at = tokio::select! {
            at = tick.tick() => at.into_std(),
            _ = shutdown.changed() => return,
        };
        let mut s = sampler.take().unwrap_or_else(Sampler::new);
        let sh = shared.clone();
        match tokio::task::spawn_blocking(move || {
            s.round(&sh, at);
            s
        })
        .await
        {
            Ok(s) => sampler = Some(s),
            // Starts over with fresh baselines next round.
            Err(e) => tracing::warn!("usage sampling failed: {e}"),
        }
    }
}

/// Where one run's figures come from.
enum Source {
    /// The instance's cgroup.
    Cgroup(CgroupCounters),
    /// The processes of the session led by the run's pid.
    Session,
}

/// Sampling state of one run of one instance.
struct Track {
    pid: u32,
    source: Source,
    /// Last cumulative CPU time (µs) and when it was read.
    prev_cpu: Option<(u64, Instant)>,
    gate: UsageGate,
}

/// One measurement: cumulative CPU µs, memory bytes (either may be unknown).
#[derive(Debug, Clone, Copy, Default)]
struct Raw {
    cpu_usec: Option<u64>,
    memory: Option<u64>,
}

/// Per-process sums over a set of processes.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSum {
    ticks: u64,
    resident_pages: u64,
    processes: u32,
}

/// The sampling task's state, moved to a blocking thread for each round.
pub(crate) struct Sampler {
    tracks: HashMap<String, Track>,
    /// Reused for every file read.
    buf: String,
    /// Reused for every `/proc` path.
    path: String,
    pids: Vec<u32>,
    ticks_per_sec: u64,
    page_size: u64,
}

impl Sampler {
    pub(crate) fn new() -> Sampler {
        Sampler {
            tracks: HashMap::new(),
            buf: String::with_capacity(4096),
            path: String::with_capacity(32),
            pids: Vec::new(),
            ticks_per_sec: rustix::param::clock_ticks_per_second().max(1),
            page_size: u64::try_from(rustix::param::page_size()).unwrap_or(4096),
        }
    }

    /// Samples every running instance and reports what changed noticeably.
    /// `at` is the tick's instant (ticks are at least one interval apart).
    fn round(&mut self, shared: &Shared, at: Instant) {
        let running: Vec<(String, Arc<Slot>, u32)> = shared
            .slots()
            .iter()
            .filter(|(_, s)| !s.removed.load(Ordering::SeqCst))
            .filter_map(|(name, s)| {
                let st = s.status();
                match (st.phase, st.pid) {
                    (InstancePhase::Running, Some(pid)) => Some((name.clone(), s.clone(), pid)),
                    _ => None,
                }
            })
            .collect();
        let live: HashSet<&str> = running.iter().map(|(n, _, _)| n.as_str()).collect();
        self.tracks.retain(|name, _| live.contains(name.as_str()));
        for (name, _, pid) in &running {
            if self.tracks.get(name).is_some_and(|t| t.pid == *pid) {
                continue;
            }
            // The cgroup counts the run only if the run joined it (an
            // instance whose limits could not be set runs outside it).
            let source = match shared.cgroups.instance(name) {
                Some(cg) if cg.pids().contains(pid) => Source::Cgroup(cg.counters()),
                _ => Source::Session,
            };
            self.tracks.insert(name.clone(), Track { pid: *pid, source, prev_cpu: None, gate: UsageGate::default() });
        }

        let sessions: HashSet<u32> =
            self.tracks.values().filter(|t| matches!(t.source, Source::Session)).map(|t| t.pid).collect();
        let by_session = if sessions.is_empty() { HashMap::new() } else { self.scan_sessions(&sessions) };

        let interval = shared.opts.usage_interval;
        for (name, slot, pid) in running {
            let Some(mut track) = self.tracks.remove(&name) else { continue };
            let raw = match &track.source {
                Source::Cgroup(c) => self.measure_cgroup(c),
                Source::Session => by_session.get(&pid).map(|s| self.raw_of(s)).unwrap_or_default(),
            };
            let read_at = Instant::now();
            let cpu_millis = match (raw.cpu_usec, track.prev_cpu) {
                (Some(now), Some((before, then))) if now >= before => {
                    let elapsed = read_at.saturating_duration_since(then).as_micros().max(1);
                    Some(u64::try_from(u128::from(now - before) * 1000 / elapsed).unwrap_or(u64::MAX))
                }
                _ => None,
            };
            track.prev_cpu = raw.cpu_usec.map(|c| (c, read_at));
            if let (Some(cpu_millis), Some(memory_bytes)) = (cpu_millis, raw.memory) {
                let usage =
                    InstanceUsage { cpu_millis, memory_bytes, metrics: shared.opts.app_metrics.current(&name, at) };
                if track.gate.offer(&usage, at, interval) {
                    publish(shared, &name, &slot, pid, usage);
                }
            }
            self.tracks.insert(name, track);
        }
    }

    fn raw_of(&self, s: &ProcSum) -> Raw {
        if s.processes == 0 {
            return Raw::default();
        }
        Raw {
            cpu_usec: Some(s.ticks.saturating_mul(1_000_000) / self.ticks_per_sec),
            memory: Some(s.resident_pages.saturating_mul(self.page_size)),
        }
    }

    /// CPU and memory from the cgroup's counters, falling back to its
    /// processes for what the hierarchy does not count.
    fn measure_cgroup(&mut self, c: &CgroupCounters) -> Raw {
        let mut raw = Raw::default();
        if let Some(counter) = &c.cpu {
            if read_into(counter.path(), &mut self.buf) {
                raw.cpu_usec = counter.parse_usec(&self.buf);
            }
        }
        if read_into(&c.memory_usage, &mut self.buf) {
            let usage = std::mem::take(&mut self.buf);
            if read_into(&c.memory_stat, &mut self.buf) {
                raw.memory = working_set(&usage, &self.buf, c.inactive_file_key);
            }
            self.buf = usage; // keep the larger allocation
            self.buf.clear();
        }
        if raw.cpu_usec.is_none() || raw.memory.is_none() {
            let mut pids = std::mem::take(&mut self.pids);
            pids.clear();
            if read_into(&c.procs, &mut self.buf) {
                pids.extend(self.buf.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            let mut sum = ProcSum::default();
            for pid in &pids {
                self.add_process(*pid, &mut sum);
            }
            self.pids = pids;
            let from_procs = self.raw_of(&sum);
            raw.cpu_usec = raw.cpu_usec.or(from_procs.cpu_usec);
            raw.memory = raw.memory.or(from_procs.memory);
        }
        raw
    }

    /// Adds one process's times and resident pages to `sum`.
    fn add_process(&mut self, pid: u32, sum: &mut ProcSum) -> Option<u32> {
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/stat");
        if !read_into(Path::new(&self.path), &mut self.buf) {
            return None;
        }
        let st = procfs::parse_stat(&self.buf).filter(|s| s.is_live())?;
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/statm");
        let pages = if read_into(Path::new(&self.path), &mut self.buf) {
            procfs::parse_statm_resident(&self.buf)
        } else {
            None
        };
        sum.ticks = sum.ticks.saturating_add(st.cpu_ticks);
        sum.resident_pages = sum.resident_pages.saturating_add(pages.unwrap_or(0));
        sum.processes += 1;
        Some(st.session)
    }

    /// One pass over `/proc`: the sums of the processes of each session in
    /// `sessions`.
    fn scan_sessions(&mut self, sessions: &HashSet<u32>) -> HashMap<u32, ProcSum> {
        let mut out: HashMap<u32, ProcSum> = HashMap::with_capacity(sessions.len());
        let Ok(dir) = fs::read_dir("/proc") else { return out };
        let me = std::process::id();
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if pid == me {
                continue;
            }
            // Read the stat once to learn the session; only members are summed.
            self.path.clear();
            let _ = write!(self.path, "/proc/{pid}/stat");
            if !read_into(Path::new(&self.path), &mut self.buf) {
                continue;
            }
            let Some(session) = procfs::parse_stat(&self.buf).map(|s| s.session) else { continue };
            if !sessions.contains(&session) {
                continue;
            }
            let mut sum = out.get(&session).copied().unwrap_or_default();
            if self.add_process(pid, &mut sum) == Some(session) {
                out.insert(session, sum);
            }
        }
        out
    }
}

/// Puts `usage` into the slot's status and sends it, if the slot still
/// shows run `pid` as Running. Holds the status lock while sending, as
/// the supervisor does, so reports keep their order.
fn publish(shared: &Shared, name: &str, slot: &Slot, pid: u32, usage: InstanceUsage) {
    let mut status = slot.status();
    if status.phase != InstancePhase::Running || status.pid != Some(pid) || slot.removed.load(Ordering::SeqCst) {
        return;
    }
    tracing::debug!(instance = name, cpu_millis = usage.cpu_millis, memory_bytes = usage.memory_bytes, "usage changed");
    status.usage = Some(usage);
    let _ = shared.updates.send(StatusUpdate { instance: name.to_string(), status: status.clone() });
}

/// Reads a whole (small) file into `buf`, replacing its content.
fn read_into(path: &Path, buf: &mut String) -> bool {
    buf.clear();
    fs::File::open(path).and_then(|mut f| f.read_to_string(buf)).is_ok()
}

/// How long the sampler waits between samples by default.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_own_session_from_proc() {
        let mut s = Sampler::new();
        let me = procfs::read_stat(std::process::id()).expect("own stat");
        let mut sum = ProcSum::default();
        assert_eq!(s.add_process(std::process::id(), &mut sum), Some(me.session));
        assert_eq!(sum.processes, 1);
        assert!(sum.resident_pages > 0);
        let raw = s.raw_of(&sum);
        assert!(raw.memory.is_some_and(|m| m > 0));
        assert!(raw.cpu_usec.is_some());
        assert_eq!(s.raw_of(&ProcSum::default()).memory, None, "no process: nothing measured");
        assert_eq!(s.add_process(u32::MAX, &mut sum), None);
    }
}
