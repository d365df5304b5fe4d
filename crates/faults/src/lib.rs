//! Fault injection for end-to-end tests, benches and the demo.
//!
//! Three kinds of faults, each in its own module, each documented with the
//! model it implements:
//!
//! - [`link`]: a TCP proxy between edge agents and the cloud that can cut,
//!   reset and refuse connections and add delay, jitter, a bandwidth limit
//!   and segment loss ([`LinkProxy`]); [`bandwidth`]: capacity shared by
//!   every connection of one or several proxies, e.g. a node's access link
//!   ([`Bandwidth`], [`SharedLink`]).
//! - [`disk`]: a size-limited tmpfs that can be filled to provoke `ENOSPC`
//!   ([`TmpfsMount`]), and file corruption, truncation and garbage.
//! - [`process`]: `SIGKILL` for a process, a process group, a session, a
//!   process tree, or every process matching a predicate.
//!
//! Every fault injected is logged with `tracing` at info level under the
//! target `faults`, so a soak log records what was done and when.
//!
//! [`ports::free_port`] picks loopback ports for test servers outside the
//! kernel's ephemeral range.
//!
//! This crate is test support: it is never linked into the agent or the
//! cloud. It uses no `unsafe` code.

#![warn(missing_docs)]

pub mod bandwidth;
pub mod disk;
pub mod link;
pub mod ports;
pub mod process;
mod rng;

pub use bandwidth::{Bandwidth, SharedLink};
pub use disk::{corrupt_file, garbage_file, truncate_file, TmpfsMount};
pub use link::{Direction, LinkConditions, LinkProxy, LinkStats};
pub use process::{is_alive, kill_group, kill_matching, kill_process, kill_session, ProcInfo};
