//! Aggregation: the per-bucket state shared by step queries and rollups
//! (min, max, sum, count, last), and the functions a query asks for.

/// What a step query computes per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// Mean of the points.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Sum of the values.
    Sum,
    /// Number of points.
    Count,
    /// Value of the newest point.
    Last,
}

/// Aggregate of the points of one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggState {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sum of the values.
    pub sum: f64,
    /// Number of points.
    pub count: f64,
    /// Value of the newest point.
    pub last: f64,
    /// Timestamp of the newest point (not stored in rollups: their bucket
    /// start stands for it).
    pub last_t: i64,
}

impl AggState {
    /// The state of a single point.
    pub fn point(t: i64, v: f64) -> Self {
        AggState { min: v, max: v, sum: v, count: 1.0, last: v, last_t: t }
    }

    /// Adds a point.
    pub fn add(&mut self, t: i64, v: f64) {
        self.merge(&AggState::point(t, v));
    }

    /// Merges another state; `last` goes to the newer one (ties: `other`).
    pub fn merge(&mut self, o: &AggState) {
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        self.count += o.count;
        if o.last_t >= self.last_t {
            self.last = o.last;
            self.last_t = o.last_t;
        }
    }

    /// The value of `agg`.
    pub fn value(&self, agg: Aggregation) -> f64 {
        match agg {
            Aggregation::Avg => self.sum / self.count,
            Aggregation::Min => self.min,
            Aggregation::Max => self.max,
            Aggregation::Sum => self.sum,
            Aggregation::Count => self.count,
            Aggregation::Last => self.last,
        }
    }
}
