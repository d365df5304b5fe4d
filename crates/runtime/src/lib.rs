//! Workload runtimes of the edge agent.
//!
//! The [`Runtime`] trait is the boundary between the agent (which knows what
//! should run, from its local desired-state store) and the thing that runs
//! it. A runtime owns its own on-disk records under the directory it is given,
//! so that after an agent restart or crash it can re-adopt what is still
//! running instead of starting it again.
//!
//! Invariants:
//! - `ensure` is idempotent: calling it again with the same template hash for
//!   a running instance changes nothing (no restart, same pid).
//! - Every change of an instance's observed state is sent on the status
//!   channel given at construction, as a full [`AppInstanceStatus`]. That
//!   includes `usage` (CPU, memory, app-reported metrics), re-sent only
//!   when it changed noticeably and at most once per sampling interval.
//! - Workloads never depend on the agent being alive: their output goes to
//!   files, not pipes, and they live in their own session and process group.

use std::path::PathBuf;

use tokio::sync::mpsc;
use yunbian_api::{AppInstance, AppInstanceStatus};

pub mod app_metrics;
mod clock;
pub mod fake;
pub mod oci;
pub mod process;
pub mod termination;
mod usage;

pub use app_metrics::{AppMetrics, MetricsError, MetricsReport};
pub use fake::{AppLoad, FakeRuntime, SyntheticLoad};
pub use process::{ProcessRuntime, ProcessRuntimeOptions};

/// A status change of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// Instance name.
    pub instance: String,
    /// Its full observed state.
    pub status: AppInstanceStatus,
}

/// How resource limits are enforced on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsSupport {
    /// Whether memory/cpu limits are enforced by the kernel.
    pub enforced: bool,
    /// Human explanation (`cgroup v1 memory+cpu under /sys/fs/cgroup/...`).
    pub note: String,
}

/// Errors of runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec cannot be run by this runtime.
    #[error("instance {instance}: {message}")]
    Invalid {
        /// Instance name.
        instance: String,
        /// What is wrong.
        message: String,
    },
    /// No such instance.
    #[error("instance {0} is not known to this runtime")]
    NotFound(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Options for reading an instance's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Only the last N lines (all retained lines when `None`).
    pub tail: Option<usize>,
    /// Keep streaming new output until the receiver is dropped.
    pub follow: bool,
}

/// A workload runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name (`process`, `fake`).
    fn name(&self) -> &'static str;

    /// Re-adopts instances that survived an agent restart. Returns the names
    /// of instances the runtime knows (running or not). Call once, first.
    async fn recover(&self) -> Result<Vec<String>, RuntimeError>;

    /// Makes the instance run as specified. Starts it if unknown; replaces it
    /// if its `spec.templateHash` changed; otherwise does nothing.
    async fn ensure(&self, instance: &AppInstance) -> Result<(), RuntimeError>;

    /// Stops the instance (SIGTERM to its process group, SIGKILL after a
    /// grace period) and forgets it, deleting its records and logs.
    async fn remove(&self, instance: &str) -> Result<(), RuntimeError>;

    /// Current status of every known instance.
    async fn statuses(&self) -> Vec<StatusUpdate>;

    /// Streams the instance's combined stdout/stderr as chunks of bytes.
    /// Returns when the log is exhausted (or, with `follow`, when the
    /// receiver is dropped or the instance is removed).
    async fn logs(&self, instance: &str, opts: LogOptions, out: mpsc::Sender<Vec<u8>>) -> Result<(), RuntimeError>;

    /// How limits are enforced here.
    fn limits_support(&self) -> LimitsSupport;

    /// Path of the instance's current log file, if it has one.
    fn log_path(&self, instance: &str) -> Option<PathBuf>;
}
