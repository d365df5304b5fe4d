//! The rule engine: runs a [`yunbian_api::RuleSpec`] on a stream of
//! [`Record`]s, sans-IO. [`CompiledRule::compile`] turns a spec into
//! something that can run (CEL expressions parsed and checked, with error
//! positions — what the cloud calls at apply time, see [`compile_errors`]);
//! [`RuleRunner`] is the state machine the edge agent drives: records and
//! processing time in, [`Output`]s (time-series points, MQTT publications,
//! cloud records, alerts) out. No clock, no I/O, no threads.
//!
//! ```text
//! source ──▶ push(record, now) ──▶ steps in order ──▶ sinks ──▶ Vec<Output>
//!                                  filter / map (CEL)
//!            tick(now) ──────────▶ window (per series, event time; closes on
//!                                  watermark, or on tick for quiet series)
//!                                  deadband / rename / tag
//! ```
//!
//! Module map: [`record`] (records and values), [`expr`] (CEL),
//! [`compile`] (spec → [`CompiledRule`]), [`window`] (window semantics: the
//! half-open convention, lateness, closing by processing time),
//! [`runner`] (steps, sinks, alert deduplication, errors, memory caps).

#![forbid(unsafe_code)]

pub mod compile;
pub mod expr;
pub mod record;
pub mod runner;
pub mod series;
pub mod window;

pub use compile::{compile_errors, CompileError, CompiledRule, Sink, Step, WindowShape};
pub use expr::{EvalError, ExprError, Expression};
pub use record::{Quality, Record, Value, ValueError};
pub use runner::{Output, RuleRunner, RuleStats, RunnerConfig};
pub use series::SeriesKey;
