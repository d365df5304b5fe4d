//! The edge outbox stays bounded through an outage of any length, keeps the
//! newest status of every instance, and the cloud accepts what survives.

use std::collections::BTreeMap;

use yunbian_api::AppInstanceStatus;
use yunbian_sync::{CloudAction, CloudSession, EdgeAction, EdgeSession, NodeView, Report, SessionConfig, Up};

fn status(instance: &str, restarts: u32) -> Report {
    Report::InstanceStatus {
        instance: instance.to_string(),
        status: AppInstanceStatus { restart_count: restarts, ..Default::default() },
    }
}

/// Applies persistence actions to a model of the edge's disk.
fn persist(disk: &mut BTreeMap<u64, Report>, actions: &[EdgeAction]) {
    for a in actions {
        match a {
            EdgeAction::PersistReport { seq, report } => {
                disk.insert(*seq, report.clone());
            }
            EdgeAction::TrimOutbox { upto } => disk.retain(|s, _| s > upto),
            _ => {}
        }
    }
}

#[test]
fn a_long_outage_keeps_the_outbox_bounded_and_the_newest_status_of_each_instance() {
    let cfg = SessionConfig { max_outbox: 50, ..Default::default() };
    let mut edge = EdgeSession::new(cfg, 0, Vec::new(), 1);
    let mut disk = BTreeMap::new();
    // Ten instances crash-looping for a long time while offline, and one
    // that reported once at the very beginning.
    persist(&mut disk, &edge.report(status("quiet", 0), 0));
    for round in 1..=1_000u32 {
        for i in 0..10 {
            persist(&mut disk, &edge.report(status(&format!("loop-{i}"), round), u64::from(round)));
        }
    }
    assert!(edge.outbox_len() <= 50, "outbox grew to {}", edge.outbox_len());
    assert_eq!(disk.len(), edge.outbox_len(), "persisted outbox matches the session's");
    assert!(edge.dropped() > 9_000);

    // Sequences are contiguous (the cloud only accepts them in order), and
    // each instance's reports are in the order they were made.
    let seqs: Vec<u64> = disk.keys().copied().collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gaps in {seqs:?}");
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for r in disk.values() {
        let Report::InstanceStatus { instance, status } = r else { panic!("only instance statuses were reported") };
        let prev = last.insert(instance.clone(), status.restart_count);
        assert!(prev.is_none_or(|p| p < status.restart_count), "{instance} out of order");
    }
    assert_eq!(last.get("quiet"), Some(&0), "the only status of a quiet instance survives");
    for i in 0..10 {
        assert_eq!(last.get(&format!("loop-{i}")), Some(&1_000), "newest status of loop-{i} survives");
    }

    // On reconnect the cloud accepts all of it, in order.
    let mut cloud = CloudSession::new(cfg);
    let view = NodeView::new(0, 16);
    let mut accepted = Vec::new();
    let mut pending: std::collections::VecDeque<Up> = edge
        .on_connected(10_000)
        .into_iter()
        .filter_map(|a| if let EdgeAction::Send(up) = a { Some(up) } else { None })
        .collect();
    for _ in 0..100 {
        let Some(up) = pending.pop_front() else { break };
        for a in cloud.on_up(up, &view, 10_000) {
            match a {
                CloudAction::PersistReports(items) => accepted.extend(items.into_iter().map(|(s, _)| s)),
                CloudAction::Send(down) => {
                    let acts = edge.on_down(down, 10_000);
                    persist(&mut disk, &acts);
                    pending.extend(acts.into_iter().filter_map(|a| {
                        if let EdgeAction::Send(up) = a {
                            Some(up)
                        } else {
                            None
                        }
                    }));
                }
                _ => {}
            }
        }
    }
    assert_eq!(accepted, seqs, "the cloud accepted every surviving report in order");
    assert_eq!(edge.outbox_len(), 0);
}

#[test]
fn trimming_while_connected_announces_the_new_front() {
    let cfg = SessionConfig { max_outbox: 4, max_batch: 256, ..Default::default() };
    let mut edge = EdgeSession::new(cfg, 0, Vec::new(), 1);
    let _ = edge.on_connected(0);
    for r in 0..4 {
        let _ = edge.report(status("a", r), 1);
    }
    let acts = edge.report(status("a", 4), 2);
    assert!(acts.iter().any(|a| matches!(a, EdgeAction::TrimOutbox { upto: 1 })));
    assert!(
        acts.iter().any(|a| matches!(a, EdgeAction::Send(Up::Hello { outbox_first: 2, .. }))),
        "a connected edge re-announces its outbox start: {acts:?}"
    );
}
