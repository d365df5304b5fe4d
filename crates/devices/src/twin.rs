//! A device's twin as its node keeps it, and the rules for reporting it —
//! sans-IO: readings, failures, desired values and `now` go in; new readings
//! to publish, state changes and reports to send come out.
//!
//! Rules:
//! - A reading is *new* only when its timestamp advanced; the twin never
//!   presents a stale value as new (a failed read keeps the last value with
//!   quality `bad` and its old timestamp).
//! - A numeric value is *changed* when it moved by more than the property's
//!   deadband since the value last reported; other values when they differ;
//!   a quality change is always a change.
//! - Changed values are reported at most once per `reportCycle`. State
//!   changes (online/offline), new desired values and verified writes are
//!   reported at once, but never more than once per [`URGENT_REPORT_MS`].
//! - After [`OFFLINE_AFTER_FAILURES`] consecutive device-level failures the
//!   device is offline and every property's quality is bad.
//! - Desired values carry a version that only grows per property; a write is
//!   *observed* when the value read back equals it.

use std::collections::BTreeMap;

use yunbian_api::{DesiredTwin, DeviceState, DeviceStatus, Quality, Reported, Twin};

use crate::driver::{PropertyRead, Reading};

/// Consecutive failed collections before a device is offline.
pub const OFFLINE_AFTER_FAILURES: u32 = 3;
/// Smallest interval between two reports, even urgent ones.
pub const URGENT_REPORT_MS: u64 = 1_000;

#[derive(Debug, Clone, Default)]
struct PropertyTwin {
    reported: Option<Reported>,
    /// Value and quality last included in a report.
    sent: Option<(serde_json::Value, Quality)>,
    deadband: f64,
    desired: Option<DesiredTwin>,
    observed_desired: u64,
    /// Why the last read of this property failed.
    error: String,
    /// Why the last write failed (kept until a write succeeds, so a good
    /// read does not hide it).
    write_error: String,
}

/// What a collection produced for the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// New readings, to publish.
    pub readings: Vec<(String, Reading)>,
    /// The device state, when it changed.
    pub state_changed: Option<DeviceState>,
}

/// The twin of one device.
#[derive(Debug, Clone)]
pub struct TwinState {
    props: BTreeMap<String, PropertyTwin>,
    state: DeviceState,
    last_online_ms: u64,
    last_error: String,
    failures: u32,
    report_cycle_ms: u64,
    last_report_ms: Option<u64>,
    /// A value changed beyond its deadband since the last report.
    changed: bool,
    /// Something that is reported at once changed.
    urgent: bool,
    generation: u64,
    node: String,
}

fn format_ms(ms: u64) -> String {
    yunbian_api::time::format_rfc3339(ms / 1000)
}

fn moved(a: &serde_json::Value, b: &serde_json::Value, deadband: f64) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => {
            if deadband > 0.0 {
                (x - y).abs() > deadband
            } else {
                x != y
            }
        }
        _ => a != b,
    }
}

/// Whether a value read back verifies a written one (numbers within a
/// relative 1e-6, for float32 registers and scaled values).
pub fn write_verified(desired: &serde_json::Value, read: &serde_json::Value) -> bool {
    match (desired.as_f64(), read.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0),
        _ => desired == read,
    }
}

impl TwinState {
    /// A twin for properties `(name, deadband)`, reporting at most once per
    /// `report_cycle_ms`.
    pub fn new(node: &str, props: impl IntoIterator<Item = (String, f64)>, report_cycle_ms: u64) -> Self {
        TwinState {
            props: props.into_iter().map(|(n, d)| (n, PropertyTwin { deadband: d, ..Default::default() })).collect(),
            state: DeviceState::Unknown,
            last_online_ms: 0,
            last_error: String::new(),
            failures: 0,
            report_cycle_ms,
            last_report_ms: None,
            changed: false,
            urgent: true,
            generation: 0,
            node: node.to_string(),
        }
    }

    /// Keeps what is known of properties that still exist after a spec
    /// change; adds new ones; drops removed ones.
    pub fn reshape(&mut self, props: impl IntoIterator<Item = (String, f64)>, report_cycle_ms: u64, generation: u64) {
        let mut next = BTreeMap::new();
        for (name, deadband) in props {
            let mut p = self.props.remove(&name).unwrap_or_default();
            p.deadband = deadband;
            next.insert(name, p);
        }
        self.props = next;
        self.report_cycle_ms = report_cycle_ms;
        self.set_generation(generation);
    }

    /// The spec generation the node now runs (a change of desired values
    /// only does not reshape the twin).
    pub fn set_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.generation = generation;
            self.urgent = true;
        }
    }

    /// Makes the next [`TwinState::poll_report`] send the whole twin (a
    /// report was lost on the way to the agent).
    pub fn requeue(&mut self) {
        self.urgent = true;
        self.changed = true;
    }

    /// Current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Consecutive failed collections.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn set_state(&mut self, s: DeviceState) -> Option<DeviceState> {
        if self.state == s {
            return None;
        }
        self.state = s;
        self.urgent = true;
        Some(s)
    }

    /// A collection succeeded at the device level.
    pub fn on_read(&mut self, now_ms: u64, reads: Vec<PropertyRead>) -> Observed {
        self.failures = 0;
        self.last_online_ms = now_ms;
        if !self.last_error.is_empty() {
            self.last_error.clear();
            self.urgent = true;
        }
        let mut readings = Vec::new();
        for r in reads {
            let Some(p) = self.props.get_mut(&r.property) else { continue };
            match r.result {
                Ok(Some(reading)) => {
                    if !p.error.is_empty() {
                        p.error.clear();
                        self.urgent = true;
                    }
                    let newer = p.reported.as_ref().is_none_or(|old| reading.ts_ms > old.timestamp);
                    if !newer {
                        continue;
                    }
                    let is_change = match &p.sent {
                        None => true,
                        Some((v, q)) => *q != reading.quality || moved(v, &reading.value, p.deadband),
                    };
                    if is_change {
                        self.changed = true;
                    }
                    p.reported = Some(Reported {
                        value: reading.value.clone(),
                        timestamp: reading.ts_ms,
                        quality: reading.quality,
                    });
                    readings.push((r.property, reading));
                }
                Ok(None) => {}
                Err(e) => {
                    if p.error != e {
                        p.error = e;
                        self.urgent = true;
                    }
                    if let Some(rep) = &mut p.reported {
                        if rep.quality != Quality::Bad {
                            rep.quality = Quality::Bad;
                            self.changed = true;
                        }
                    }
                }
            }
        }
        let state_changed = self.set_state(DeviceState::Online);
        Observed { readings, state_changed }
    }

    /// A collection failed at the device level. Returns the new state when
    /// the device just went offline.
    pub fn on_failure(&mut self, error: String) -> Option<DeviceState> {
        self.failures = self.failures.saturating_add(1);
        if self.last_error != error {
            self.last_error = error;
            self.urgent = true;
        }
        if self.failures < OFFLINE_AFTER_FAILURES {
            return None;
        }
        for p in self.props.values_mut() {
            if let Some(rep) = &mut p.reported {
                if rep.quality != Quality::Bad {
                    rep.quality = Quality::Bad;
                    self.changed = true;
                }
            }
        }
        self.set_state(DeviceState::Offline)
    }

    /// The desired value of `property` is now `desired` (a new version).
    pub fn set_desired(&mut self, property: &str, desired: DesiredTwin) {
        if let Some(p) = self.props.get_mut(property) {
            if p.desired.as_ref() != Some(&desired) {
                p.desired = Some(desired);
                self.urgent = true;
            }
        }
    }

    /// Drops the desired value of `property` (no longer desired by anyone).
    pub fn clear_desired(&mut self, property: &str) {
        if let Some(p) = self.props.get_mut(property) {
            if p.desired.take().is_some() {
                self.urgent = true;
            }
        }
    }

    /// The desired value of `property`.
    pub fn desired(&self, property: &str) -> Option<&DesiredTwin> {
        self.props.get(property)?.desired.as_ref()
    }

    /// Desired values not yet observed: `(property, value, version)`.
    pub fn pending_writes(&self) -> Vec<(String, serde_json::Value, u64)> {
        self.props
            .iter()
            .filter_map(|(n, p)| {
                let d = p.desired.as_ref()?;
                (d.version > p.observed_desired).then(|| (n.clone(), d.value.clone(), d.version))
            })
            .collect()
    }

    /// A write of `version` to `property` was verified by read-back.
    pub fn on_write_observed(&mut self, property: &str, version: u64) {
        if let Some(p) = self.props.get_mut(property) {
            if version > p.observed_desired {
                p.observed_desired = version;
                p.write_error.clear();
                self.urgent = true;
            }
        }
    }

    /// A write to `property` failed.
    pub fn on_write_failed(&mut self, property: &str, error: String) {
        if let Some(p) = self.props.get_mut(property) {
            if p.write_error != error {
                p.write_error = error;
                self.urgent = true;
            }
        }
    }

    /// The status to report now, if one is due. `force` ignores the report
    /// cycle (the first report after a reconnect, say) but not the urgent
    /// minimum.
    pub fn poll_report(&mut self, now_ms: u64, to_cloud: bool) -> Option<DeviceStatus> {
        if !to_cloud && !self.urgent {
            return None;
        }
        let since = self.last_report_ms.map(|t| now_ms.saturating_sub(t));
        let due = (self.urgent && since.is_none_or(|s| s >= URGENT_REPORT_MS))
            || (self.changed && to_cloud && since.is_none_or(|s| s >= self.report_cycle_ms));
        if !due {
            return None;
        }
        self.last_report_ms = Some(now_ms);
        self.urgent = false;
        self.changed = false;
        for p in self.props.values_mut() {
            if let Some(r) = &p.reported {
                p.sent = Some((r.value.clone(), r.quality));
            }
        }
        Some(self.snapshot(to_cloud))
    }

    /// Milliseconds until a report may become due (for the caller's timer);
    /// `None` when nothing is pending.
    pub fn next_report_in(&self, now_ms: u64, to_cloud: bool) -> Option<u64> {
        let since = self.last_report_ms.map(|t| now_ms.saturating_sub(t));
        let wait = |cycle: u64| since.map_or(0, |s| cycle.saturating_sub(s));
        let mut next: Option<u64> = None;
        if self.urgent {
            next = Some(wait(URGENT_REPORT_MS));
        }
        if self.changed && to_cloud {
            let w = wait(self.report_cycle_ms);
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        next
    }

    /// The full twin as a status (values included only when `with_values`).
    pub fn snapshot(&self, with_values: bool) -> DeviceStatus {
        DeviceStatus {
            node: self.node.clone(),
            state: self.state,
            last_online_time: if self.last_online_ms > 0 { format_ms(self.last_online_ms) } else { String::new() },
            last_error: self.last_error.clone(),
            twins: self
                .props
                .iter()
                .map(|(n, p)| {
                    (
                        n.clone(),
                        Twin {
                            reported: if with_values { p.reported.clone() } else { None },
                            desired: p.desired.clone(),
                            observed_desired: p.observed_desired,
                            error: if p.write_error.is_empty() { p.error.clone() } else { p.write_error.clone() },
                        },
                    )
                })
                .collect(),
            observed_generation: self.generation,
            message: String::new(),
            observed_seq: 0,
            reported_by: String::new(),
        }
    }

    /// The local view (always with values): what the local HTTP API shows.
    pub fn local(&self) -> DeviceStatus {
        self.snapshot(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(p: &str, v: serde_json::Value, ts: u64) -> PropertyRead {
        PropertyRead { property: p.into(), result: Ok(Some(Reading { value: v, ts_ms: ts, quality: Quality::Good })) }
    }

    fn twin(deadband: f64) -> TwinState {
        TwinState::new("n1", [("t".to_string(), deadband), ("s".to_string(), 0.0)], 10_000)
    }

    #[test]
    fn deadband_and_report_cycle() {
        let mut t = twin(0.5);
        t.on_read(1_000, vec![read("t", json!(20.0), 1_000)]);
        let first = t.poll_report(1_000, true).expect("first report is urgent (online)");
        assert_eq!(first.state, DeviceState::Online);
        assert_eq!(first.twins["t"].reported.as_ref().map(|r| r.value.clone()), Some(json!(20.0)));
        // Within the deadband: not a change.
        t.on_read(2_000, vec![read("t", json!(20.4), 2_000)]);
        assert!(t.poll_report(20_000, true).is_none());
        // Beyond it: reported, but not before the report cycle.
        t.on_read(3_000, vec![read("t", json!(20.6), 3_000)]);
        assert!(t.poll_report(5_000, true).is_none());
        assert_eq!(t.next_report_in(5_000, true), Some(6_000));
        let r = t.poll_report(11_000, true).expect("due after the cycle");
        assert_eq!(r.twins["t"].reported.as_ref().map(|r| r.timestamp), Some(3_000));
        // Not reported to the cloud at all when reportToCloud is false.
        t.on_read(30_000, vec![read("t", json!(99.0), 30_000)]);
        assert!(t.poll_report(60_000, false).is_none());
    }

    #[test]
    fn stale_readings_are_not_new_and_failures_mark_bad_then_offline() {
        let mut t = twin(0.0);
        let o = t.on_read(1_000, vec![read("t", json!(1), 1_000)]);
        assert_eq!(o.readings.len(), 1);
        assert_eq!(o.state_changed, Some(DeviceState::Online));
        let o = t.on_read(2_000, vec![read("t", json!(2), 1_000)]);
        assert!(o.readings.is_empty(), "same timestamp is not new");
        t.poll_report(2_000, true);
        assert_eq!(t.on_failure("timeout".into()), None);
        assert_eq!(t.on_failure("timeout".into()), None);
        assert_eq!(t.on_failure("timeout".into()), Some(DeviceState::Offline));
        let r = t.poll_report(5_000, true).expect("offline is urgent");
        assert_eq!(r.state, DeviceState::Offline);
        assert_eq!(r.last_error, "timeout");
        let rep = r.twins["t"].reported.clone().expect("kept");
        assert_eq!((rep.value, rep.timestamp, rep.quality), (json!(1), 1_000, Quality::Bad));
        let o = t.on_read(9_000, vec![read("t", json!(1), 9_000)]);
        assert_eq!(o.state_changed, Some(DeviceState::Online));
        let r = t.poll_report(9_000, true).expect("online again");
        assert_eq!(r.twins["t"].reported.as_ref().map(|r| r.quality), Some(Quality::Good));
        assert!(r.last_error.is_empty());
    }

    #[test]
    fn property_errors_stay_on_the_property() {
        let mut t = twin(0.0);
        t.on_read(1_000, vec![read("t", json!(1), 1_000), read("s", json!(2), 1_000)]);
        t.poll_report(1_000, true);
        let bad = PropertyRead { property: "s".into(), result: Err("illegal data address".into()) };
        let o = t.on_read(2_000, vec![read("t", json!(1), 2_000), bad]);
        assert_eq!(o.state_changed, None);
        let r = t.poll_report(3_000, true).expect("error is urgent");
        assert_eq!(r.state, DeviceState::Online);
        assert_eq!(r.twins["s"].error, "illegal data address");
        assert_eq!(r.twins["s"].reported.as_ref().map(|r| r.quality), Some(Quality::Bad));
        assert!(r.twins["t"].error.is_empty());
    }

    #[test]
    fn desired_versions_and_verification() {
        let mut t = twin(0.0);
        t.set_desired("s", DesiredTwin { value: json!(5.0), version: 3, source: "cloud".into() });
        assert_eq!(t.pending_writes(), vec![("s".to_string(), json!(5.0), 3)]);
        t.on_write_observed("s", 3);
        assert!(t.pending_writes().is_empty());
        let r = t.poll_report(1_000, true).expect("urgent");
        assert_eq!(r.twins["s"].observed_desired, 3);
        assert!(write_verified(&json!(10.1), &json!(10.100000381469727)));
        assert!(!write_verified(&json!(10.1), &json!(10.2)));
        assert!(write_verified(&json!(true), &json!(true)));
    }
}
