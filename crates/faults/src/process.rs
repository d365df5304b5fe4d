//! Process faults: `SIGKILL`, the crash nothing can catch.
//!
//! - [`kill_process`], [`kill_group`]: one process, one process group.
//! - [`kill_session`]: every process of a session (field 6 of
//!   `/proc/PID/stat`). Workloads run in their own sessions, so this is how a
//!   test kills one workload with everything it started.
//! - [`kill_with_descendants`]: a process, everything it started (by parent
//!   pid, transitively), and every process an extra predicate selects, with
//!   their descendants. An orphan is re-parented to PID 1 (or a subreaper)
//!   and can no longer be found by parent pid, so "an edge host reboots" is
//!   `kill_with_descendants(agent, |p| p.env("YUNBIAN_NODE") == Some("edge-1"))`
//!   or a similar mark that the agent's workloads carry.
//! - [`kill_matching`]: exactly the processes a predicate selects.
//!
//! The group kills freeze before they kill: they send `SIGSTOP` to every
//! target, list the processes again to catch children forked meanwhile, and
//! repeat until no new target appears; only then do they send `SIGKILL`. So
//! a process tree cannot escape by forking while it is being killed. The
//! calling process and PID 1 are never targets.
//!
//! [`is_alive`] treats zombies as dead: the process has stopped running and
//! only waits to be reaped, and in this sandbox PID 1 never reaps orphans.
//!
//! Each kill is logged at info level under the target `faults`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tracing::info;

const ESRCH: i32 = rustix::io::Errno::SRCH.raw_os_error();

/// Rounds of stop-and-rescan before the kill, enough for any tree that does
/// not fork faster than `/proc` can be read.
const FREEZE_ROUNDS: usize = 32;

/// One process, as `/proc` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// State letter from `/proc/PID/stat`: `R`, `S`, `D`, `T`, `Z`, ...
    pub state: char,
    /// Arguments, program first; empty for kernel threads.
    pub cmdline: Vec<String>,
    environ: Vec<(String, String)>,
}

impl ProcInfo {
    /// Reads `/proc/PID`; `None` if there is no such process.
    pub fn read(pid: i32) -> io::Result<Option<Self>> {
        let dir = format!("/proc/{pid}");
        let stat = match fs::read_to_string(format!("{dir}/stat")) {
            Ok(stat) => stat,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((state, ppid, pgid, sid)) = parse_stat(&stat) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {dir}/stat: {stat:?}")));
        };
        // Either can vanish or be unreadable (another user's process).
        let cmdline = fs::read(format!("{dir}/cmdline")).unwrap_or_default();
        let environ = fs::read(format!("{dir}/environ")).unwrap_or_default();
        Ok(Some(Self {
            pid,
            ppid,
            pgid,
            sid,
            state,
            cmdline: split_nul(&cmdline).collect(),
            environ: split_nul(&environ)
                .filter_map(|entry| {
                    let (key, value) = entry.split_once('=')?;
                    Some((key.to_owned(), value.to_owned()))
                })
                .collect(),
        }))
    }

    /// The value of `key` in the process's initial environment.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.environ.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether the process has exited (zombie or dead) and only awaits
    /// reaping.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn gone(e: &io::Error) -> bool {
    // ESRCH shows up when the process exits while its files are read.
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(ESRCH)
}

/// `(state, ppid, pgid, sid)` from `/proc/PID/stat`, whose second field (the
/// command name, in parentheses) may itself contain spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(char, i32, i32, i32)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    Some((state, ppid, pgid, sid))
}

fn split_nul(bytes: &[u8]) -> impl Iterator<Item = String> + '_ {
    bytes.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Every process in `/proc`, zombies included.
pub fn processes() -> io::Result<Vec<ProcInfo>> {
    let mut processes = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(info) = ProcInfo::read(pid)? {
            processes.push(info);
        }
    }
    Ok(processes)
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    matches!(ProcInfo::read(pid), Ok(Some(info)) if !info.is_dead())
}

/// Polls until none of `pids` is alive; `false` if `timeout` passes first.
pub fn wait_dead(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pids.iter().any(|&pid| is_alive(pid)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn pid(raw: i32) -> io::Result<Pid> {
    Pid::from_raw(raw)
        .filter(|_| raw > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid pid {raw}")))
}

fn signal(raw: i32, signal: Signal) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(raw)?, signal)?)
}

/// Sends `SIGKILL` to `pid`.
pub fn kill_process(pid: i32) -> io::Result<()> {
    info!(target: "faults", fault = "kill", pid, "killing process");
    signal(pid, Signal::KILL)
}

/// Sends `SIGKILL` to every process in the process group `pgid`.
pub fn kill_group(pgid: i32) -> io::Result<()> {
    info!(target: "faults", fault = "kill_group", pgid, "killing process group");
    Ok(rustix::process::kill_process_group(pid(pgid)?, Signal::KILL)?)
}

/// Kills every process of session `sid`; returns the pids killed.
pub fn kill_session(sid: i32) -> io::Result<Vec<i32>> {
    info!(target: "faults", fault = "kill_session", sid, "killing session");
    freeze_and_kill(|processes| processes.iter().filter(|p| p.sid == sid).map(|p| p.pid).collect())
}

/// Kills exactly the processes `pred` selects; returns the pids killed.
pub fn kill_matching(pred: impl Fn(&ProcInfo) -> bool) -> io::Result<Vec<i32>> {
    info!(target: "faults", fault = "kill_matching", "killing matching processes");
    freeze_and_kill(|processes| processes.iter().filter(|p| pred(p)).map(|p| p.pid).collect())
}

/// Kills `pid`, every process `also` selects, and all their descendants;
/// returns the pids killed. Pass `|_| false` for just the tree under `pid`.
pub fn kill_with_descendants(pid: i32, also: impl Fn(&ProcInfo) -> bool) -> io::Result<Vec<i32>> {
    info!(target: "faults", fault = "kill_tree", pid, "killing process tree");
    freeze_and_kill(|processes| {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for p in processes {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let mut targets = BTreeSet::new();
        let mut queue: Vec<i32> = processes.iter().filter(|p| p.pid == pid || also(p)).map(|p| p.pid).collect();
        while let Some(next) = queue.pop() {
            if targets.insert(next) {
                queue.extend(children.get(&next).into_iter().flatten());
            }
        }
        targets
    })
}

/// Stops every target `select` picks among the live processes, rescans until
/// no new target appears, then kills them all.
fn freeze_and_kill(select: impl Fn(&[ProcInfo]) -> BTreeSet<i32>) -> io::Result<Vec<i32>> {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let mut frozen = BTreeSet::new();
    for _ in 0..FREEZE_ROUNDS {
        let live: Vec<ProcInfo> = processes()?.into_iter().filter(|p| !p.is_dead()).collect();
        let new: Vec<i32> = select(&live).into_iter().filter(|&p| p != me && p != 1 && !frozen.contains(&p)).collect();
        if new.is_empty() {
            break;
        }
        for p in new {
            ignore_exited(signal(p, Signal::STOP))?;
            frozen.insert(p);
        }
    }
    for &p in &frozen {
        ignore_exited(signal(p, Signal::KILL))?;
    }
    info!(target: "faults", pids = ?frozen, "processes killed");
    Ok(frozen.into_iter().collect())
}

/// A process that exited between listing and signalling is not an error.
fn ignore_exited(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(ESRCH) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_name() {
        let stat = "42 (a (b) c) S 7 42 40 0 -1 4194560 120 0 0 0";
        assert_eq!(parse_stat(stat), Some(('S', 7, 42, 40)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = i32::try_from(std::process::id()).expect("pid fits in i32");
        let info = ProcInfo::read(me).expect("read /proc").expect("own process exists");
        assert_eq!(info.pid, me);
        assert!(is_alive(me));
        assert!(!info.cmdline.is_empty());
        assert_eq!(info.env("PATH").map(str::to_owned), std::env::var("PATH").ok());
    }
}
