//! The few system calls std does not wrap, behind safe functions.
//!
//! Why `unsafe` is needed here (and only here): workloads must outlive the
//! agent and be killable as a whole tree, so each child is started in its own
//! session (`setsid(2)` between fork and exec, which std/tokio only allow
//! through the `unsafe` `pre_exec` hook) and is signalled as a process group
//! (`kill(2)`/`killpg(2)`, which std has no API for). The same `pre_exec`
//! hook also moves the child into its cgroups (a `write(2)` of `0` to
//! already-open `cgroup.procs` files) so that limits apply before `exec`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Makes `cmd`'s child a session (and process group) leader, and moves it
/// into the cgroups whose `cgroup.procs` files are given (opened for
/// writing). Joining is best effort: a failing write is ignored.
pub(crate) fn detach_and_join(cmd: &mut tokio::process::Command, cgroup_procs: Vec<File>) {
    let hook = move || -> io::Result<()> {
        // SAFETY: called in the forked child before exec, where only
        // async-signal-safe functions may be used. `setsid` and `write` are
        // async-signal-safe, nothing here allocates or takes locks (the
        // files were opened by the parent and are only borrowed), and
        // `io::Error::last_os_error` only reads errno.
        unsafe {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            for f in &cgroup_procs {
                let _ = libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1);
            }
        }
        Ok(())
    };
    // SAFETY: the hook above only performs async-signal-safe operations (see
    // the comment inside it), as `pre_exec` requires.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// A pid usable as a kill(2) target: never 0, 1 or negative (which would
/// address our own group, init, or every process).
fn target(pid: u32) -> io::Result<libc::pid_t> {
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 1 => Ok(p),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("refusing to signal pid {pid}"))),
    }
}

/// Sends `sig` to process `pid`.
pub(crate) fn kill(pid: u32, sig: i32) -> io::Result<()> {
    let p = target(pid)?;
    // SAFETY: kill(2) has no memory-safety preconditions; `p` is > 1.
    let rc = unsafe { libc::kill(p, sig) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends `sig` to every process of process group `pgid`.
pub(crate) fn killpg(pgid: u32, sig: i32) -> io::Result<()> {
    let p = target(pgid)?;
    // SAFETY: killpg(3) has no memory-safety preconditions; `p` is > 1.
    let rc = unsafe { libc::killpg(p, sig) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Name of a signal number (`SIGKILL`), or `signal N`.
pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_dangerous_targets() {
        assert!(kill(0, 0).is_err());
        assert!(kill(1, 0).is_err());
        assert!(killpg(u32::MAX, 0).is_err());
        assert!(kill(std::process::id(), 0).is_ok());
    }

    #[test]
    fn names_signals() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(200), "signal 200");
    }
}
