//! Series identity: a metric plus its sorted tags, the key of every
//! per-series state (windows, deadband, alerts).

use std::collections::BTreeMap;

use crate::record::Record;

/// A series: metric name and tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// Metric name.
    pub metric: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

impl SeriesKey {
    /// The series of `record`.
    pub fn of(record: &Record) -> Self {
        SeriesKey { metric: record.metric.clone(), tags: record.tags.clone() }
    }
}
