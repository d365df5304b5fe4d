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
    let mut fields = content.get(close + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now starts at field 4 (ppid); field 6 is 2 further, and
    // field 22 is 15 after that.
    let session = fields.nth(2)?.parse().ok()?;
    let start_time = fields.nth(15)?.parse().ok()?;
    Some(ProcStat { state, start_time, session })
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
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', start_time: 987_654, session: 1234 }));
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
}
