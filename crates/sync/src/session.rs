//! The sync protocol's two state machines, without I/O and without a clock:
//! [`CloudSession`] (one per connected node, in the cloud's hub) and
//! [`EdgeSession`] (one per agent). Events and `now` (milliseconds of any
//! monotonic clock) go in, [`CloudAction`]s / [`EdgeAction`]s come out. The
//! driver executes the actions **in order** and must stop (drop the
//! connection) if a persisting action fails, so that an acknowledgement is
//! never sent for something that was not persisted.
//!
//! ## Downstream: desired view
//! The cloud sends `Snapshot` or `Delta{base, revision}` messages. The edge
//! applies a delta only when `base == applied` (go-back-N: anything out of
//! order is dropped and re-acked with the edge's current revision), persists
//! it, then acks. A delta with `revision <= applied` is a duplicate and is
//! re-acked. The cloud retransmits from the edge's last acked revision when
//! nothing advanced for `retransmit_ms`. On (re)connect the edge's `Hello`
//! carries its applied revision; the cloud answers with the deltas since then
//! if its log still has them, else with a snapshot (objects absent from it
//! are removed at the edge). A snapshot older than what the edge applied is
//! ignored unless it is a `reset` (the cloud's revisions went backwards,
//! e.g. a restored backup).
//!
//! ## Upstream: reports
//! The edge appends each report to a persisted outbox under a fresh sequence
//! number (never reused, also across restarts), then sends it. The cloud
//! accepts reports only in sequence order starting at the `outbox_first`
//! announced in `Hello`, persists them, and acks cumulatively; the edge drops
//! acked entries. Unacked entries are resent after `retransmit_ms`. The
//! cloud's store additionally refuses a status whose sequence is not newer
//! than the one it holds, so a report resent across a cloud restart is not
//! applied twice.

use std::collections::BTreeMap;

use crate::view::NodeView;
use crate::wire::{Change, DesiredObject, Down, Report, Up, PROTOCOL_VERSION};

/// Tunables shared by both sides.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Resend unacknowledged data after this long without progress.
    pub retransmit_ms: u64,
    /// Most reports per `Reports` message.
    pub max_batch: usize,
    /// Most reports the edge keeps unacknowledged (see [`EdgeSession::report`]).
    pub max_outbox: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { retransmit_ms: 2_000, max_batch: 256, max_outbox: 10_000 }
    }
}

// ------------------------------------------------------------------ cloud

/// What the cloud's driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudAction {
    /// Send a message to the edge.
    Send(Down),
    /// Durably store these reports (in order); only then continue.
    PersistReports(Vec<(u64, Report)>),
    /// The edge has applied the view up to this revision.
    Synced(u64),
    /// Close the connection (protocol violation).
    Close(String),
}

/// Cloud side of one connection.
#[derive(Debug)]
pub struct CloudSession {
    cfg: SessionConfig,
    open: bool,
    edge_acked: u64,
    sent_upto: u64,
    last_send: u64,
    report_acked: Option<u64>,
}

impl CloudSession {
    /// A session waiting for `Hello`.
    pub fn new(cfg: SessionConfig) -> Self {
        CloudSession { cfg, open: false, edge_acked: 0, sent_upto: 0, last_send: 0, report_acked: None }
    }

    /// Revision the edge last acknowledged.
    pub fn edge_acked(&self) -> u64 {
        self.edge_acked
    }

    /// Whether `Hello` was received.
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn send_from(&mut self, from: u64, view: &NodeView, now: u64, out: &mut Vec<CloudAction>) {
        // An edge that has applied nothing (new, or its store was rebuilt)
        // gets the whole view at once: replaying the log would show it
        // partial views, and it could stop workloads a later delta brings
        // back.
        let deltas = if from == 0 { None } else { view.deltas_since(from) };
        match deltas {
            Some(ds) => {
                for d in ds {
                    out.push(CloudAction::Send(Down::Delta { base: d.base, revision: d.revision, changes: d.changes }));
                }
            }
            None => out.push(CloudAction::Send(Down::Snapshot {
                revision: view.revision(),
                objects: view.objects(),
                reset: from > view.revision(),
            })),
        }
        self.sent_upto = view.revision();
        self.last_send = now;
    }

    /// Handles a protocol message. `Heartbeat` and log messages are not
    /// protocol state: the driver handles them and this returns nothing.
    pub fn on_up(&mut self, msg: Up, view: &NodeView, now: u64) -> Vec<CloudAction> {
        let mut out = Vec::new();
        match msg {
            Up::Hello { version, applied, outbox_first } => {
                if version != PROTOCOL_VERSION {
                    let reason = format!("protocol version {version} not supported (cloud speaks {PROTOCOL_VERSION})");
                    out.push(CloudAction::Send(Down::Refused { reason: reason.clone() }));
                    out.push(CloudAction::Close(reason));
                    return out;
                }
                // Within one connection the edge's outbox start and applied
                // revision only grow: a duplicated, late Hello must not move
                // them back (that would wait forever for trimmed reports).
                let first_acked = outbox_first.min(u64::MAX - 1).checked_sub(1);
                self.report_acked = self.report_acked.max(first_acked);
                if applied > view.revision() {
                    // The cloud's history went backwards; make the edge reset.
                    self.edge_acked = 0;
                } else if !self.open || applied > self.edge_acked {
                    self.edge_acked = applied;
                    out.push(CloudAction::Synced(applied));
                }
                self.open = true;
                let from = if applied > view.revision() { applied } else { self.edge_acked.max(applied) };
                self.send_from(from, view, now, &mut out);
            }
            // Before Hello nothing can be interpreted; the edge resends Hello.
            _ if !self.open => {}
            Up::Ack { revision } => {
                if revision > self.edge_acked && revision <= view.revision() {
                    self.edge_acked = revision;
                    self.last_send = now;
                    out.push(CloudAction::Synced(revision));
                }
            }
            Up::Reports { items } => {
                let mut accepted = Vec::new();
                let mut expected = self.report_acked.map_or(0, |a| a.saturating_add(1));
                for (seq, report) in items {
                    if seq < expected {
                        continue;
                    }
                    if seq != expected {
                        break;
                    }
                    accepted.push((seq, report));
                    expected = expected.saturating_add(1);
                }
                if let Some(&(last, _)) = accepted.last() {
                    self.report_acked = Some(last);
                    out.push(CloudAction::PersistReports(accepted));
                }
                if let Some(upto) = self.report_acked {
                    out.push(CloudAction::Send(Down::ReportAck { upto }));
                }
            }
            Up::Heartbeat { .. } | Up::LogData { .. } | Up::LogEnd { .. } | Up::Data { .. } => {}
        }
        out
    }

    /// The node's view changed: send what is new.
    pub fn on_view_changed(&mut self, view: &NodeView, now: u64) -> Vec<CloudAction> {
        let mut out = Vec::new();
        if self.open && self.sent_upto < view.revision() {
            let (from, previous_send) = (self.sent_upto, self.last_send);
            let was_idle = self.edge_acked >= self.sent_upto;
            self.send_from(from, view, now, &mut out);
            if !was_idle {
                // Older data is still in flight: keep its retransmit clock,
                // so a steady stream of changes cannot postpone recovery.
                self.last_send = previous_send;
            }
        }
        out
    }

    /// Timer: retransmit when the edge is behind and nothing moved.
    pub fn on_tick(&mut self, view: &NodeView, now: u64) -> Vec<CloudAction> {
        let mut out = Vec::new();
        if self.open
            && self.edge_acked < view.revision()
            && now.saturating_sub(self.last_send) >= self.cfg.retransmit_ms
        {
            self.send_from(self.edge_acked, view, now, &mut out);
        }
        out
    }
}

// ------------------------------------------------------------------- edge

/// What the edge's driver must do.
// Actions live only until the driver executes them, a few at a time: the
// heartbeat inside `Send` is large, and boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum EdgeAction {
    /// Send a message to the cloud.
    Send(Up),
    /// Replace the whole desired view and set the applied revision, durably.
    ApplySnapshot {
        /// New applied revision.
        revision: u64,
        /// The complete view.
        objects: Vec<DesiredObject>,
    },
    /// Apply changes and set the applied revision, durably and atomically.
    ApplyDelta {
        /// New applied revision.
        revision: u64,
        /// Changes, in order.
        changes: Vec<Change>,
    },
    /// Durably append a report to the outbox.
    PersistReport {
        /// Its sequence number.
        seq: u64,
        /// The report.
        report: Report,
    },
    /// Durably drop outbox entries with `seq <= upto`.
    TrimOutbox {
        /// Cumulative.
        upto: u64,
    },
}

/// Edge side: lives as long as the agent process; survives reconnects.
#[derive(Debug)]
pub struct EdgeSession {
    cfg: SessionConfig,
    applied: u64,
    outbox: BTreeMap<u64, Report>,
    next_seq: u64,
    connected: bool,
    /// Whether anything arrived since the last `Hello` was sent.
    heard: bool,
    last_hello: u64,
    last_report_send: u64,
    dropped: u64,
}

impl EdgeSession {
    /// Restores the session from the agent's store: the applied revision,
    /// the unacknowledged outbox, and the next free sequence number.
    pub fn new(cfg: SessionConfig, applied: u64, outbox: Vec<(u64, Report)>, next_seq: u64) -> Self {
        let outbox: BTreeMap<u64, Report> = outbox.into_iter().collect();
        let next_seq = next_seq.max(outbox.keys().next_back().map_or(1, |s| s + 1)).max(1);
        EdgeSession {
            cfg,
            applied,
            outbox,
            next_seq,
            connected: false,
            heard: false,
            last_hello: 0,
            last_report_send: 0,
            dropped: 0,
        }
    }

    /// Reports dropped because the outbox was full and a newer report of
    /// the same instance superseded them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Applied desired-view revision.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Unacknowledged reports.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Next sequence number to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn send_outbox(&mut self, now: u64, out: &mut Vec<EdgeAction>) {
        if self.outbox.is_empty() {
            return;
        }
        let items: Vec<(u64, Report)> =
            self.outbox.iter().take(self.cfg.max_batch).map(|(s, r)| (*s, r.clone())).collect();
        out.push(EdgeAction::Send(Up::Reports { items }));
        self.last_report_send = now;
    }

    /// A connection was established.
    pub fn on_connected(&mut self, now: u64) -> Vec<EdgeAction> {
        self.connected = true;
        self.hello(now)
    }

    fn hello(&mut self, now: u64) -> Vec<EdgeAction> {
        self.heard = false;
        self.last_hello = now;
        let outbox_first = self.outbox.keys().next().copied().unwrap_or(self.next_seq);
        let mut out =
            vec![EdgeAction::Send(Up::Hello { version: PROTOCOL_VERSION, applied: self.applied, outbox_first })];
        self.send_outbox(now, &mut out);
        out
    }

    /// The connection is gone.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// Handles a protocol message. Log requests are the driver's business.
    pub fn on_down(&mut self, msg: Down, now: u64) -> Vec<EdgeAction> {
        let mut out = Vec::new();
        self.heard = true;
        match msg {
            Down::Snapshot { revision, objects, reset } => {
                if revision >= self.applied || reset {
                    self.applied = revision;
                    out.push(EdgeAction::ApplySnapshot { revision, objects });
                }
                out.push(EdgeAction::Send(Up::Ack { revision: self.applied }));
            }
            Down::Delta { base, revision, changes } => {
                if base == self.applied && revision > self.applied {
                    self.applied = revision;
                    out.push(EdgeAction::ApplyDelta { revision, changes });
                }
                out.push(EdgeAction::Send(Up::Ack { revision: self.applied }));
            }
            Down::ReportAck { upto } => {
                let before = self.outbox.len();
                self.outbox = self.outbox.split_off(&(upto.saturating_add(1)));
                if self.outbox.len() != before {
                    out.push(EdgeAction::TrimOutbox { upto });
                    self.last_report_send = now;
                    // More waiting beyond the batch we sent? Send on.
                    self.send_outbox(now, &mut out);
                }
            }
            Down::LogRequest { .. } | Down::LogCancel { .. } | Down::Refused { .. } | Down::DataAck { .. } => {}
        }
        out
    }

    /// Queues a report: persist, then send when connected.
    ///
    /// The outbox is bounded by `max_outbox`; past it, it is trimmed to
    /// 90 % of the bound, oldest entries first. Each oldest entry goes: dropped if a later report of the same instance or device supersedes it
    /// (a status is a level, only the newest matters), otherwise moved to
    /// the back under a new sequence number. So the newest status of every
    /// instance survives any outage, reports of one instance stay in order,
    /// and sequence numbers stay contiguous from the front (the cloud
    /// accepts reports only in sequence). A connected session announces the
    /// new front with a fresh `Hello`.
    pub fn report(&mut self, report: Report, now: u64) -> Vec<EdgeAction> {
        let mut out = self.append(report.clone());
        let seq = self.next_seq - 1;
        let mut trimmed = None;
        // Each pass either drops an entry or rotates one that no later entry
        // supersedes; after `len` passes without a drop every entry is the
        // only one of its instance and nothing more can be saved.
        let max = self.cfg.max_outbox.max(1);
        // Once over the bound, trim to 90 % of it: a connected edge then
        // re-announces its front once per tenth of the bound, not once per
        // report.
        let target = if self.outbox.len() > max { max - max / 10 } else { max };
        let mut budget = self.outbox.len();
        while self.outbox.len() > target && budget > 0 {
            budget -= 1;
            let Some((first, oldest)) = self.outbox.pop_first() else { break };
            trimmed = Some(first);
            let key = oldest.key();
            let superseded = self.outbox.values().any(|r| r.key() == key);
            if superseded {
                self.dropped += 1;
            } else {
                out.extend(self.append(oldest));
            }
        }
        if let Some(upto) = trimmed {
            out.push(EdgeAction::TrimOutbox { upto });
            if self.connected {
                out.extend(self.hello(now));
            }
            return out;
        }
        if self.connected {
            if self.outbox.len() == 1 {
                self.last_report_send = now;
            }
            if self.outbox.len() <= self.cfg.max_batch {
                out.push(EdgeAction::Send(Up::Reports { items: vec![(seq, report)] }));
            }
        }
        out
    }

    fn append(&mut self, report: Report) -> Vec<EdgeAction> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.insert(seq, report.clone());
        vec![EdgeAction::PersistReport { seq, report }]
    }

    /// Timer: resend unacknowledged reports.
    pub fn on_tick(&mut self, now: u64) -> Vec<EdgeAction> {
        if self.connected && !self.heard && now.saturating_sub(self.last_hello) >= self.cfg.retransmit_ms {
            return self.hello(now);
        }
        let mut out = Vec::new();
        if self.connected
            && !self.outbox.is_empty()
            && now.saturating_sub(self.last_report_send) >= self.cfg.retransmit_ms
        {
            self.send_outbox(now, &mut out);
        }
        out
    }
}
