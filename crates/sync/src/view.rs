//! A node's desired view as the cloud keeps it: the objects addressed to the
//! node, the revision of the last change, and a bounded log of recent deltas
//! from which a reconnecting edge can be caught up without a snapshot.
//!
//! Invariant: applying `deltas_since(r)` in order to the view an edge had at
//! revision `r` yields exactly `objects()` at `revision()`. When `r` is older
//! than the log (or unknown to it), `deltas_since` returns `None` and the
//! caller sends a snapshot.

use std::collections::{BTreeMap, VecDeque};

use yunbian_api::Kind;

use crate::wire::{Change, DesiredObject};

/// One logged delta.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedDelta {
    /// View revision before.
    pub base: u64,
    /// View revision after.
    pub revision: u64,
    /// Changes.
    pub changes: Vec<Change>,
}

/// The cloud's copy of one node's desired view.
#[derive(Debug, Clone)]
pub struct NodeView {
    objects: BTreeMap<(Kind, String), DesiredObject>,
    revision: u64,
    log: VecDeque<LoggedDelta>,
    /// Oldest revision from which `deltas_since` can answer.
    log_start: u64,
    max_log: usize,
}

impl NodeView {
    /// An empty view whose history starts at `revision` (the store revision
    /// the view was built from) and keeps at most `max_log` deltas.
    pub fn new(revision: u64, max_log: usize) -> Self {
        NodeView { objects: BTreeMap::new(), revision, log: VecDeque::new(), log_start: revision, max_log }
    }

    /// Seeds the view with an object without logging it (initial build from
    /// a store listing, before any edge has seen this view).
    pub fn seed(&mut self, object: DesiredObject) {
        self.objects.insert((object.kind, object.name.clone()), object);
    }

    /// Current view revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Objects of the view, ordered by kind and name.
    pub fn objects(&self) -> Vec<DesiredObject> {
        self.objects.values().cloned().collect()
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Applies changes made at store revision `revision` (> current).
    /// Changes that change nothing (removing an absent object) are dropped;
    /// returns the logged delta if anything changed.
    pub fn apply(&mut self, revision: u64, changes: Vec<Change>) -> Option<LoggedDelta> {
        if revision <= self.revision {
            return None;
        }
        let mut effective = Vec::with_capacity(changes.len());
        for c in changes {
            match &c {
                Change::Upsert { object } => {
                    self.objects.insert((object.kind, object.name.clone()), object.clone());
                    effective.push(c);
                }
                Change::Remove { kind, name } => {
                    if self.objects.remove(&(*kind, name.clone())).is_some() {
                        effective.push(c);
                    }
                }
            }
        }
        if effective.is_empty() {
            return None;
        }
        let d = LoggedDelta { base: self.revision, revision, changes: effective };
        self.revision = revision;
        self.log.push_back(d.clone());
        while self.log.len() > self.max_log {
            if let Some(old) = self.log.pop_front() {
                self.log_start = old.revision;
            }
        }
        Some(d)
    }

    /// Forgets the delta log (as after a restart); later resumes from older
    /// revisions get a snapshot.
    pub fn compact(&mut self) {
        self.log.clear();
        self.log_start = self.revision;
    }

    /// Deltas that bring an edge at `from` up to date; `Some(empty)` when it
    /// is current; `None` when only a snapshot can.
    ///
    /// Several logged deltas are merged into one, keeping only the last
    /// change of each object: an edge that was away while an object went
    /// through several states (a rollout's intermediate revisions, an
    /// instance created and removed again) applies the final state in one
    /// step and never runs what was already superseded.
    pub fn deltas_since(&self, from: u64) -> Option<Vec<LoggedDelta>> {
        if from == self.revision {
            return Some(Vec::new());
        }
        if from < self.log_start || from > self.revision {
            return None;
        }
        // The edge's revision must be a delta boundary we logged.
        let idx = self.log.iter().position(|d| d.base == from)?;
        let pending: Vec<&LoggedDelta> = self.log.iter().skip(idx).collect();
        if pending.len() == 1 {
            return Some(vec![pending[0].clone()]);
        }
        let mut last: BTreeMap<(Kind, String), (usize, Change)> = BTreeMap::new();
        let mut seq = 0usize;
        for d in &pending {
            for c in &d.changes {
                let key = match c {
                    Change::Upsert { object } => (object.kind, object.name.clone()),
                    Change::Remove { kind, name } => (*kind, name.clone()),
                };
                last.insert(key, (seq, c.clone()));
                seq += 1;
            }
        }
        let mut changes: Vec<(usize, Change)> = last.into_values().collect();
        changes.sort_by_key(|(i, _)| *i);
        Some(vec![LoggedDelta {
            base: from,
            revision: self.revision,
            changes: changes.into_iter().map(|(_, c)| c).collect(),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, revision: u64) -> DesiredObject {
        DesiredObject {
            kind: Kind::AppInstance,
            name: name.into(),
            revision,
            value: serde_json::json!({"metadata": {"name": name}, "rev": revision}),
        }
    }

    #[test]
    fn a_returning_edge_gets_only_the_final_state_of_each_object() {
        let mut v = NodeView::new(1, 64);
        v.apply(2, vec![Change::Upsert { object: obj("old", 2) }]);
        // A rollout while the edge is away: rev-2 instance replaced twice.
        v.apply(3, vec![Change::Remove { kind: Kind::AppInstance, name: "old".into() }]);
        v.apply(3 + 1, vec![Change::Upsert { object: obj("mid", 4) }]);
        v.apply(5, vec![Change::Remove { kind: Kind::AppInstance, name: "mid".into() }]);
        v.apply(6, vec![Change::Upsert { object: obj("new", 6) }]);
        let ds = v.deltas_since(2).expect("in the log");
        assert_eq!(ds.len(), 1);
        let d = &ds[0];
        assert_eq!((d.base, d.revision), (2, 6));
        let names: Vec<String> = d
            .changes
            .iter()
            .map(|c| match c {
                Change::Upsert { object } => format!("+{}", object.name),
                Change::Remove { name, .. } => format!("-{name}"),
            })
            .collect();
        // `mid` never existed for this edge: its removal is harmless, its
        // creation is gone.
        assert_eq!(names, ["-old", "-mid", "+new"]);
        // Applying the merged delta to the edge's view at 2 gives the view at 6.
        let mut edge = NodeView::new(1, 64);
        edge.apply(2, vec![Change::Upsert { object: obj("old", 2) }]);
        edge.apply(6, d.changes.clone());
        assert_eq!(edge.objects(), v.objects());
        // One delta behind: sent as logged.
        assert_eq!(v.deltas_since(5).expect("in the log").len(), 1);
        assert_eq!(v.deltas_since(6), Some(Vec::new()));
    }
}
