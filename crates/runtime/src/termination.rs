//! A workload's own account of why it stopped.
//!
//! Every process workload gets `$YUNBIAN_TERMINATION_LOG`, the path of a
//! file in its instance directory (`termination.log`), removed before each
//! start. A workload that knows why it is about to fail writes there: the
//! first line is a reason (one CamelCase word, such as `CPULimitExceeded`),
//! the rest a message for people. When the process then exits with a
//! failure, the instance's status shows that reason and message (with the
//! exit code) instead of a bare "exited with code N". The wasm shim uses
//! it for its limits; any app may.
//!
//! The path is the workload's to fill, so it is read with care: not
//! through a symlink (it could point at the node's key), only if it is a
//! regular file (a FIFO would block the read), and never more than
//! [`MAX_BYTES`].
//!
//! Only the first [`MAX_BYTES`] are read; a first line that is not a reason
//! makes the whole text the message, with the reason `Error`.

use std::io::Read;
use std::path::Path;

/// The environment variable naming the file.
pub const ENV: &str = "YUNBIAN_TERMINATION_LOG";

/// Bytes of the file that are read.
pub const MAX_BYTES: u64 = 4096;

/// What a workload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// One CamelCase word.
    pub reason: String,
    /// The rest, trimmed.
    pub message: String,
}

impl Termination {
    /// Parses the file's text; `None` when it is blank.
    pub fn parse(text: &str) -> Option<Termination> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
        let first = first.trim();
        let is_reason = (1..=64).contains(&first.len())
            && first.starts_with(|c: char| c.is_ascii_uppercase())
            && first.chars().all(|c| c.is_ascii_alphanumeric());
        Some(match (is_reason, rest.trim()) {
            (true, "") => Termination { reason: first.into(), message: first.into() },
            (true, rest) => Termination { reason: first.into(), message: one_line(rest) },
            (false, _) => Termination { reason: "Error".into(), message: one_line(text) },
        })
    }

    /// The text to write for this termination.
    pub fn render(&self) -> String {
        format!("{}\n{}\n", self.reason, self.message)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads and parses the file at `path` (missing, blank, a symlink or not a
/// regular file: `None`). Never blocks on a FIFO.
pub fn read(path: &Path) -> Option<Termination> {
    use std::os::unix::fs::OpenOptionsExt;
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    file.take(MAX_BYTES).read_to_end(&mut buf).ok()?;
    Termination::parse(&String::from_utf8_lossy(&buf))
}

/// Writes `t` to the file named by [`ENV`], if the variable is set; errors
/// are ignored (the exit code still tells that the workload failed).
pub fn write_from_env(t: &Termination) {
    if let Some(path) = std::env::var_os(ENV) {
        let _ = std::fs::write(path, t.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_line_then_the_message() {
        let t = Termination::parse("CPULimitExceeded\nthe guest used\n its whole limit\n").expect("some");
        assert_eq!((t.reason.as_str(), t.message.as_str()), ("CPULimitExceeded", "the guest used its whole limit"));
        assert_eq!(Termination::parse(&t.render()), Some(t));
    }

    #[test]
    fn free_text_is_the_message_of_an_error_and_blank_is_nothing() {
        let t = Termination::parse("disk full: /data\nretrying is pointless").expect("some");
        assert_eq!((t.reason.as_str(), t.message.as_str()), ("Error", "disk full: /data retrying is pointless"));
        let only = Termination::parse("Misconfigured").expect("some");
        assert_eq!((only.reason.as_str(), only.message.as_str()), ("Misconfigured", "Misconfigured"));
        assert_eq!(Termination::parse(" \n\t"), None);
        assert_eq!(Termination::parse("lower\nx").map(|t| t.reason), Some("Error".into()));
    }

    #[test]
    fn only_the_first_bytes_are_read() {
        let dir = std::env::temp_dir().join(format!("yunbian-termination-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("termination.log");
        std::fs::write(&path, format!("Big\n{}", "x".repeat(100_000))).expect("write");
        let t = read(&path).expect("read");
        assert_eq!(t.reason, "Big");
        assert!(t.message.len() < MAX_BYTES as usize, "{}", t.message.len());
        assert_eq!(read(&dir.join("missing")), None);
        // Not through a symlink, not a FIFO (which would block an open).
        let secret = dir.join("secret");
        std::fs::write(&secret, "Leaked\nnode key").expect("write");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&secret, &link).expect("symlink");
        assert_eq!(read(&link), None);
        let fifo = dir.join("fifo.log");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
        assert_eq!(read(&fifo), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
