//! Alerts from edge rules become Event objects: one per rule, node and
//! series, Firing while the condition holds and Resolved after, with a
//! count of episodes — deduplicated, so a condition that holds for an hour
//! is one event, not one per reading.
//!
//! Reports arrive in order per node, but the edge's outbox keeps only the
//! latest report of an alert: an episode that started and ended while the
//! node was offline arrives as a single resolve that carries the episode's
//! start (`since_ms`), and is still counted.

use std::sync::Arc;

use yunbian_api::{Event, EventSpec, EventState, EventStatus, Kind, Severity};
use yunbian_store::{Store, StoreError};

use crate::objects::{self, update_status};

/// One alert report, as the hub received it.
#[derive(Debug, Clone)]
pub struct AlertReport {
    /// Rule name.
    pub rule: String,
    /// `metric{tags}`.
    pub series: String,
    /// Started (true) or stopped holding.
    pub firing: bool,
    /// Severity.
    pub severity: Severity,
    /// Message.
    pub message: String,
    /// Value that changed the state.
    pub value: serde_json::Value,
    /// Episode start, Unix ms.
    pub since_ms: i64,
    /// Observation time, Unix ms.
    pub at_ms: i64,
    /// The report's sequence number in the node's outbox (older ones are
    /// ignored).
    pub seq: u64,
}

/// The Event's name: `<rule>.<node>.<8 hex digits of the series>`.
pub fn event_name(rule: &str, node: &str, series: &str) -> String {
    // FNV-1a: stable across releases (unlike std's hasher).
    let mut h: u32 = 0x811c_9dc5;
    for b in series.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{rule}.{node}.{h:08x}")
}

fn rfc3339_ms(ms: i64) -> String {
    yunbian_api::time::format_rfc3339(u64::try_from(ms / 1000).unwrap_or(0))
}

/// Applies a report to an event's status; false when it changes nothing
/// (a repeated report of the current state).
///
/// A Firing report while the event fires continues the episode (the rule
/// restarted and saw the condition hold again): not counted. A Resolved
/// report while it fires ends the episode. A Resolved report while it is
/// resolved, for another episode, is an episode that started and ended
/// while the node was offline (its Firing report was superseded): counted.
pub fn apply_alert(st: &mut EventStatus, r: &AlertReport, new: bool) -> bool {
    if r.firing {
        if !new && st.state == EventState::Firing {
            return false;
        }
        st.count += 1;
        st.state = EventState::Firing;
        st.resolved_timestamp.clear();
        st.since_ms = r.since_ms;
        st.firing_since = rfc3339_ms(r.since_ms);
    } else {
        if !new && st.state == EventState::Resolved && st.since_ms == r.since_ms {
            return false;
        }
        if new || st.state == EventState::Resolved {
            st.count += 1;
            st.since_ms = r.since_ms;
            st.firing_since = rfc3339_ms(r.since_ms);
        }
        st.state = EventState::Resolved;
        st.resolved_timestamp = rfc3339_ms(r.at_ms);
    }
    if st.first_timestamp.is_empty() {
        st.first_timestamp = st.firing_since.clone();
    }
    st.message = r.message.clone();
    st.value = r.value.clone();
    true
}

/// How long a resolved Event is kept after it resolved.
pub const RESOLVED_TTL_SECS: u64 = 7 * 86_400;

/// Housekeeping of Events: a firing Event whose rule was deleted is
/// resolved (its edge will never report on it again), and Events resolved
/// more than `ttl_secs` before `now` (Unix seconds) are deleted. Returns
/// how many were deleted.
pub async fn expire_resolved(store: &Arc<dyn Store>, now: u64, ttl_secs: u64) -> Result<usize, StoreError> {
    let (events, _) = store.list(Kind::Event).await?;
    let (rules, _) = store.list(Kind::Rule).await?;
    let rules: std::collections::HashSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let mut n = 0;
    for o in &events {
        let rule = o.value.pointer("/spec/rule").and_then(|v| v.as_str()).unwrap_or_default();
        let firing = o.value.pointer("/status/state").and_then(|v| v.as_str()) == Some("Firing");
        if firing && !rules.contains(rule) {
            update_status::<EventSpec>(store, &o.name, |ev| {
                if ev.status.state != EventState::Firing {
                    return false;
                }
                ev.status.state = EventState::Resolved;
                ev.status.resolved_timestamp = yunbian_api::time::format_rfc3339(now);
                ev.status.message = format!("resolved: rule {rule} was deleted");
                true
            })
            .await
            .or_else(|e| if matches!(e, StoreError::NotFound { .. }) { Ok(false) } else { Err(e) })?;
        }
    }
    for o in events {
        let resolved = o.value.pointer("/status/resolvedTimestamp").and_then(|v| v.as_str()).unwrap_or_default();
        let firing = o.value.pointer("/status/state").and_then(|v| v.as_str()) == Some("Firing");
        let Some(at) = yunbian_api::time::parse_rfc3339(resolved) else { continue };
        if firing || now.saturating_sub(at) <= ttl_secs {
            continue;
        }
        match store.delete(Kind::Event, &o.name, Some(o.revision)).await {
            Ok(_) => n += 1,
            // Changed (fired again) or deleted meanwhile: leave it.
            Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Records an alert report of `node` in its Event object.
pub async fn record_alert(store: &Arc<dyn Store>, node: &str, r: &AlertReport) -> Result<(), StoreError> {
    let name = event_name(&r.rule, node, &r.series);
    loop {
        match store.get(Kind::Event, &name).await {
            Err(StoreError::NotFound { .. }) => {
                let spec = EventSpec {
                    rule: r.rule.clone(),
                    node: node.to_string(),
                    series: r.series.clone(),
                    severity: r.severity,
                };
                let mut ev = Event::new(&name, spec);
                ev.metadata.labels.insert("yunbian.io/rule".into(), r.rule.clone());
                ev.metadata.labels.insert("yunbian.io/node".into(), node.to_string());
                apply_alert(&mut ev.status, r, true);
                ev.status.observed_seq = r.seq;
                let mut v = ev.to_value();
                objects::stamp_new(&mut v);
                match store.create(Kind::Event, &name, v).await {
                    Ok(_) => return Ok(()),
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
            Ok(_) => {
                update_status::<EventSpec>(store, &name, |ev| {
                    if ev.status.observed_seq >= r.seq && r.seq > 0 {
                        return false; // an older report (an earlier connection's)
                    }
                    ev.status.observed_seq = r.seq;
                    let sev = ev.spec.severity != r.severity;
                    ev.spec.severity = r.severity;
                    apply_alert(&mut ev.status, r, false) || sev
                })
                .await?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(firing: bool, since_ms: i64, at_ms: i64) -> AlertReport {
        AlertReport {
            rule: "hot".into(),
            series: r#"temp{device="b1"}"#.into(),
            firing,
            severity: Severity::Critical,
            message: format!("at {at_ms}"),
            value: serde_json::json!(91.5),
            since_ms,
            at_ms,
            seq: 0,
        }
    }

    #[test]
    fn one_event_per_episode_repeats_change_nothing() {
        let mut st = EventStatus::default();
        assert!(apply_alert(&mut st, &report(true, 1_000_000, 1_000_000), true));
        assert_eq!((st.state, st.count), (EventState::Firing, 1));
        assert!(!apply_alert(&mut st, &report(true, 1_000_000, 1_000_000), false), "a resent report");
        assert!(apply_alert(&mut st, &report(false, 1_000_000, 1_060_000), false));
        assert_eq!((st.state, st.count), (EventState::Resolved, 1));
        assert!(!st.resolved_timestamp.is_empty());
        assert!(!apply_alert(&mut st, &report(false, 1_000_000, 1_060_000), false));
        // A second episode.
        assert!(apply_alert(&mut st, &report(true, 2_000_000, 2_000_000), false));
        assert_eq!((st.state, st.count), (EventState::Firing, 2));
        assert!(st.resolved_timestamp.is_empty());
        assert_eq!(st.first_timestamp, rfc3339_ms(1_000_000));
    }

    #[test]
    fn an_episode_seen_only_as_its_resolve_is_counted() {
        let mut st = EventStatus::default();
        apply_alert(&mut st, &report(true, 1_000_000, 1_000_000), true);
        apply_alert(&mut st, &report(false, 1_000_000, 1_100_000), false);
        // Fired and resolved while offline: only the resolve arrives.
        assert!(apply_alert(&mut st, &report(false, 3_000_000, 3_100_000), false));
        assert_eq!((st.state, st.count), (EventState::Resolved, 2));
        assert_eq!(st.firing_since, rfc3339_ms(3_000_000));
    }

    #[test]
    fn a_rule_restarted_while_firing_continues_the_episode() {
        let mut st = EventStatus::default();
        apply_alert(&mut st, &report(true, 1_000_000, 1_000_000), true);
        // The agent restarted; the condition still holds: a new since.
        assert!(!apply_alert(&mut st, &report(true, 1_500_000, 1_500_000), false));
        assert!(apply_alert(&mut st, &report(false, 1_500_000, 1_600_000), false));
        assert_eq!((st.state, st.count), (EventState::Resolved, 1));
        assert_eq!(st.firing_since, rfc3339_ms(1_000_000), "the episode's start is kept");
    }

    #[tokio::test]
    async fn resolved_events_expire_firing_ones_stay() {
        let dir = std::env::temp_dir().join(format!("yunbian-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let store: Arc<dyn Store> =
            yunbian_store::RedbStore::open(&dir.join("s.redb"), Default::default()).expect("store");
        let day = 86_400_000i64;
        // Resolved 10 days ago, resolved 1 day ago, firing for 30 days.
        let now_ms = 100 * day;
        let mut a = report(true, now_ms - 11 * day, now_ms - 11 * day);
        a.series = "a".into();
        record_alert(&store, "n", &a).await.expect("a fires");
        record_alert(&store, "n", &AlertReport { firing: false, at_ms: now_ms - 10 * day, ..a.clone() })
            .await
            .expect("a resolves");
        let mut b = report(true, now_ms - 2 * day, now_ms - 2 * day);
        b.series = "b".into();
        record_alert(&store, "n", &b).await.expect("b fires");
        record_alert(&store, "n", &AlertReport { firing: false, at_ms: now_ms - day, ..b.clone() })
            .await
            .expect("b resolves");
        let mut c = report(true, now_ms - 30 * day, now_ms - 30 * day);
        c.series = "c".into();
        record_alert(&store, "n", &c).await.expect("c fires");
        // Rule "hot" exists; an event of a deleted rule is resolved.
        let rule = serde_json::json!({"apiVersion": "yunbian.io/v1", "kind": "Rule", "metadata": {"name": "hot"},
            "spec": {"source": {"mqtt": {"topic": "t"}}, "sinks": [{"tsdb": {}}]}});
        store.create(Kind::Rule, "hot", rule).await.expect("rule");
        let mut gone = report(true, now_ms - day, now_ms - day);
        gone.rule = "gone".into();
        record_alert(&store, "n", &gone).await.expect("gone fires");
        let n = expire_resolved(&store, (now_ms / 1000) as u64, RESOLVED_TTL_SECS).await.expect("expire");
        assert_eq!(n, 1);
        let g = store.get(Kind::Event, &event_name("gone", "n", &gone.series)).await.expect("kept, resolved");
        assert_eq!(g.value.pointer("/status/state").and_then(|v| v.as_str()), Some("Resolved"));
        store.delete(Kind::Event, &g.name, None).await.expect("clean");
        let (left, _) = store.list(Kind::Event).await.expect("list");
        let mut names: Vec<String> = left.iter().map(|o| o.name.clone()).collect();
        names.sort();
        let mut want = vec![event_name("hot", "n", "b"), event_name("hot", "n", "c")];
        want.sort();
        assert_eq!(names, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_are_stable_and_differ_by_series() {
        let a = event_name("hot", "edge-1", r#"temp{device="b1"}"#);
        assert_eq!(a, event_name("hot", "edge-1", r#"temp{device="b1"}"#));
        assert_ne!(a, event_name("hot", "edge-1", r#"temp{device="b2"}"#));
        assert!(a.starts_with("hot.edge-1."));
    }
}
