//! The edge time-series store: a small LSM-style store for numeric series,
//! built to run inside the edge agent on scarce memory. No network, no
//! async runtime: a synchronous API the agent calls from a blocking task.
//!
//! # Data model
//!
//! A series is a metric name plus a sorted set of tags ([`SeriesKey`]);
//! points are `(i64 milliseconds, f64)`. Integers and decimals (21.3) are
//! stored as scaled integers by the chunk codec (`codec`), so they cost
//! far less than arbitrary floats; booleans are 0.0/1.0.
//!
//! # Life of a point
//!
//! ```text
//! append ──▶ WAL record (fsync policy) ──▶ head: one streaming chunk per
//!   series (+ a small out-of-order buffer)
//!     │ flush: head spans `block_duration_ms`, memory pressure, WAL size, or `flush()`
//!     ▼
//!   raw block (level 0) ── compaction: runs of small blocks ──▶ raw block (level n+1)
//!     │ retention: age / total bytes raise the raw watermark; the points
//!     ▼ at or before it are rolled up, then whole blocks are deleted
//!   r1m + r1h rollup blocks (min/max/sum/count/last per bucket), own retention
//! ```
//!
//! # Out-of-order policy
//!
//! A point is accepted when its timestamp is newer than the raw watermark
//! (else [`Error::TooOld`]) and newer than the series' newest timestamp
//! minus `out_of_order_window_ms` (else [`Error::OutOfOrder`]). A point at
//! an existing timestamp replaces the older write (last write wins, in the
//! head, across blocks and through compaction).
//!
//! # Files
//!
//! ```text
//! <dir>/wal/<segment>.wal        write-ahead log (`wal`)
//! <dir>/blocks/<kind>-<seq>-<level>.blk   sealed blocks (`block`)
//! <dir>/meta                     retention watermarks ("YTSM", 3 × i64, crc32)
//! <dir>/quarantine/              blocks that failed their checksum
//! ```
//!
//! Crash safety: blocks and `meta` are written to a temporary name, fsynced
//! and renamed; the WAL is replayed on open and a torn tail is truncated;
//! see `store` for the order of steps in flush, compaction and retention.

#![forbid(unsafe_code)]

pub mod agg;
pub mod batch;
pub mod block;
pub mod codec;
mod error;
mod fsutil;
pub mod fuzzing;
pub mod series;
mod store;
pub mod wal;

pub use agg::Aggregation;
pub use error::{DecodeError, Error};
pub use series::{Selector, SeriesKey, TagMatcher};
pub use store::{BatchResult, Options, SeriesPoints, SeriesRef, Stats, Store};
pub use wal::FsyncPolicy;
