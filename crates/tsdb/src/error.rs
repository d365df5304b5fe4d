//! Errors of the store: what callers may see from `open`, `append`,
//! queries and maintenance, and what decoders report about bytes read from
//! disk.

use std::path::PathBuf;

/// Why bytes read from disk (a chunk, a block, a WAL record) are not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the structure does.
    #[error("truncated")]
    Truncated,
    /// A checksum does not match the bytes it covers.
    #[error("checksum mismatch")]
    Checksum,
    /// A field holds a value the format does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// An error of the time-series store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the store could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("write block", "open WAL segment", …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The point is older than the series' out-of-order window allows.
    #[error("out of order: series {series} at {ts} ms is older than {oldest_allowed} ms")]
    OutOfOrder {
        /// The series, as `metric{k="v",…}`.
        series: String,
        /// The rejected timestamp.
        ts: i64,
        /// The oldest timestamp the series accepts now.
        oldest_allowed: i64,
    },
    /// The point is at or before the retention watermark: its time range was
    /// deleted or rolled up.
    #[error("too old: {ts} ms is at or before the retention watermark {watermark} ms")]
    TooOld {
        /// The rejected timestamp.
        ts: i64,
        /// Points at or before this time are no longer kept raw.
        watermark: i64,
    },
    /// A new series would take the store past its memory cap (even after
    /// flushing the head); existing series keep accepting points.
    #[error("memory cap reached ({used} of {cap} bytes): new series {series} rejected")]
    MemoryCap {
        /// The rejected series.
        series: String,
        /// Bytes in use.
        used: usize,
        /// The configured cap.
        cap: usize,
    },
    /// The store already holds the maximum number of series.
    #[error("series limit reached ({limit}): new series {series} rejected")]
    SeriesLimit {
        /// The rejected series.
        series: String,
        /// The configured cardinality cap.
        limit: usize,
    },
    /// A series key is not valid (empty metric name or tag name).
    #[error("invalid series: {0}")]
    InvalidSeries(String),
    /// A `SeriesRef` that this store did not hand out.
    #[error("unknown series reference {0}")]
    UnknownSeries(u32),
    /// A query is not valid (bad regex, zero step, empty range).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
