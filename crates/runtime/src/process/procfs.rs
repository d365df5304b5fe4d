//! Reading `/proc`: a process's state and start time, which together with
//! its pid identify it across pid reuse, and the boot id, which tells a
//! reboot apart from an agent restart.
//!
//! Nothing here panics on odd content: unparsable data reads as "no such
//! process".

use std::fs;

/// The fields of `/proc/<pid>/stat` the runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z`, …
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
    /// Field 6: session id (a workload leads its own session).
    pub session: u32,
    /// Fields 14–17: user and system time of the process and of its
    /// waited-for children, in clock ticks. Summed over a process tree this
    /// only grows, as a reaped child's time moves to its parent.
    pub cpu_ticks: u64,
}

impl ProcStat {
    /// Whether the process is still running (not a zombie or dead).
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the content of `/proc/<pid>/stat`. The command name (field 2) is
/// in parentheses and may itself contain spaces and parentheses, so fields
/// are counted from the last `)`.
pub(crate) fn parse_stat(content: &str) -> Option<ProcStat> {
    let close = content.rfind(')')?;
    let mut state = None;
    let (mut session, mut cpu_ticks, mut start_time) = (None, 0u64, None);
    // Field 3 (the state) is the first after the name.
    for (i, field) in content.get(close + 1..)?.split_whitespace().enumerate() {
        match i + 3 {
            3 => state = field.chars().next(),
            6 => session = Some(field.parse().ok()?),
            14..=17 => cpu_ticks = cpu_ticks.saturating_add(field.parse::<i64>().ok()?.max(0).unsigned_abs()),
            22 => {
                start_time = Some(field.parse().ok()?);
                break;
            }
            _ => {}
        }
    }
    Some(ProcStat { state: state?, start_time: start_time?, session: session?, cpu_ticks })
}

/// Resident pages of a process: the second field of `/proc/<pid>/statm`.
pub(crate) fn parse_statm_resident(content: &str) -> Option<u64> {
    content.split_whitespace().nth(1)?.parse().ok()
}

/// Reads `/proc/<pid>/stat`, `None` when the process does not exist.
pub(crate) fn read_stat(pid: u32) -> Option<ProcStat> {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat(&s))
}

/// Whether `pid` is a live process that started at `start_time`.
pub(crate) fn is_same_live(pid: u32, start_time: u64) -> bool {
    read_stat(pid).is_some_and(|s| s.start_time == start_time && s.is_live())
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty if unknown.
pub(crate) fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Live processes whose working directory is `dir` or below it (an
/// instance's unrecorded process is found by where it runs).
pub(crate) fn pids_with_cwd_under(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
                && read_stat(*pid).is_some_and(|s| s.is_live())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', start_time: 987_654, session: 1234, cpu_ticks: 3 }));
        let children = "9 (w) R 1 9 9 0 -1 0 0 0 0 0 7 5 11 13 20 0 1 0 42";
        assert_eq!(parse_stat(children).map(|s| s.cpu_ticks), Some(36));
        assert_eq!(parse_stat("9 (w) R 1 9 9 0 -1 0 0 0 0 0 x 5 11 13 20 0 1 0 42"), None);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("1 (x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 notanumber"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = read_stat(std::process::id()).expect("own stat");
        assert!(me.is_live());
        assert!(is_same_live(std::process::id(), me.start_time));
        assert!(!is_same_live(std::process::id(), me.start_time + 1));
        assert!(!boot_id().is_empty());
    }

    #[test]
    fn parses_statm() {
        assert_eq!(parse_statm_resident("2000 517 300 10 0 400 0\n"), Some(517));
        assert_eq!(parse_statm_resident("2000"), None);
        assert_eq!(parse_statm_resident("a b"), None);
        let own = fs::read_to_string("/proc/self/statm").expect("own statm");
        assert!(parse_statm_resident(&own).is_some_and(|p| p > 0));
    }
}
