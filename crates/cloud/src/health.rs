//! Distributed health: whether a node the cloud no longer hears is still
//! seen by its group peers (SuperEdge edge-health style), which peers each
//! node probes, and what replicas share about it in their presence records
//! (docs/design/018-latency-and-peer-health.md).
//!
//! [`verdict`] is pure: the peer reports about a node, the time the cloud
//! stopped hearing it and `now` in, a [`Verdict`] out. [`Liveness`] holds
//! what the hub's node lifecycle loop last concluded, per node, for the
//! App controller running in the same leader process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use yunbian_api::NodePhase;

/// Peers of one group a node probes at most (the next ones after it in the
/// group's sorted member ring).
pub const GROUP_PEERS_MAX: usize = 32;

/// Nodes outside its groups a node probes, a sample rotating every round.
pub const SAMPLE_PEERS: usize = 4;

/// Targets handed to one node at most, whatever its groups.
pub const TARGETS_MAX: usize = 64;

/// What the peers of a silent node say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// More than half of the counted peers reached it after the cloud
    /// stopped hearing it: only its cloud link is down.
    SeenByMajority,
    /// Counted peers exist, but at most half of them reach it.
    NotSeen,
    /// No peer report counts (no group peers, none Ready, none fresh).
    NoPeers,
}

/// One peer's latest report about a node.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReport {
    /// The reporting peer.
    pub reporter: String,
    /// The reporter's own phase: only Ready reporters count.
    pub reporter_phase: NodePhase,
    /// When the cloud received the report.
    pub received: Instant,
    /// Seconds since the reporter's last successful probe of the node, as
    /// of the report (absent: never reached it).
    pub last_seen_secs: Option<u64>,
}

/// The timing of the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerdictRule {
    /// A report older than this does not count.
    pub fresh_for: Duration,
    /// A peer sees the node only if its last success is within this of now
    /// (a few probe periods).
    pub seen_within: Duration,
    /// ... and at least this long after the node went silent: alive when
    /// it should have sent its next heartbeat (so a node that died just
    /// after its last heartbeat is never "seen").
    pub alive_after: Duration,
}

impl VerdictRule {
    /// The rule for probe period `probe` and heartbeat period `heartbeat`:
    /// reports count for 3 heartbeats (peers report with every heartbeat),
    /// successes for 3 probe periods, and only from one heartbeat (plus
    /// 500 ms of the agent's timer slack) after the silence began.
    pub fn new(probe: Duration, heartbeat: Duration) -> VerdictRule {
        VerdictRule {
            fresh_for: heartbeat * 3,
            seen_within: probe * 3,
            alive_after: heartbeat + Duration::from_millis(500),
        }
    }
}

/// The verdict on a node silent since `silent_since`, from its peers'
/// `reports`, at `now`.
///
/// A report counts if its reporter is Ready and it was received within
/// `rule.fresh_for`. A counted peer sees the node if its last success —
/// taken at its earliest, `received - (last_seen_secs + 1) s`, as the
/// seconds are whole — is `rule.alive_after` or more after `silent_since`
/// (the node was alive when its next heartbeat was due) and within
/// `rule.seen_within` of `now`.
/// Majority: more than half of the counted peers.
pub fn verdict(reports: &[PeerReport], silent_since: Instant, now: Instant, rule: &VerdictRule) -> Verdict {
    let mut counted = 0usize;
    let mut seen = 0usize;
    for r in reports {
        if r.reporter_phase != NodePhase::Ready || now.saturating_duration_since(r.received) > rule.fresh_for {
            continue;
        }
        counted += 1;
        let Some(secs) = r.last_seen_secs else { continue };
        let Some(success) = r.received.checked_sub(Duration::from_secs(secs.saturating_add(1))) else { continue };
        if success >= silent_since + rule.alive_after && now.saturating_duration_since(success) <= rule.seen_within {
            seen += 1;
        }
    }
    match counted {
        0 => Verdict::NoPeers,
        n if seen * 2 > n => Verdict::SeenByMajority,
        _ => Verdict::NotSeen,
    }
}

/// The phase reason of a node only its peers reach.
pub fn cloud_unreachable_reason(silent_for: Duration, seen: usize, counted: usize) -> String {
    format!("no heartbeat for {}s, but {seen} of {counted} group peers reach it", silent_for.as_secs())
}

/// How many of `reports` count and how many of those see the node (the
/// numbers behind [`verdict`], for the reason text).
pub fn tally(reports: &[PeerReport], silent_since: Instant, now: Instant, rule: &VerdictRule) -> (usize, usize) {
    let counted: Vec<&PeerReport> = reports
        .iter()
        .filter(|r| r.reporter_phase == NodePhase::Ready && now.saturating_duration_since(r.received) <= rule.fresh_for)
        .collect();
    let seen = counted
        .iter()
        .filter(|r| verdict(std::slice::from_ref(*r), silent_since, now, rule) == Verdict::SeenByMajority)
        .count();
    (seen, counted.len())
}

// ------------------------------------------------------------ phases

/// What one lifecycle pass knows about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    /// How long no replica has heard it (`None`: heard).
    pub silent_for: Option<Duration>,
    /// `(seen, counted)` when its peers' verdict is [`Verdict::SeenByMajority`].
    pub seen_by_peers: Option<(usize, usize)>,
    /// Served by a replica with a heartbeat within the grace (or its last
    /// written heartbeat is).
    pub within_grace: bool,
    /// The loop has run for a grace period (a new leader gives every node
    /// one to reconnect).
    pub settled: bool,
}

/// The phase a pass wants for a node, and why; `None`: leave it as it is.
/// Heard → Ready; seen by a majority of its peers after 2 silent heartbeat
/// periods → CloudUnreachable; otherwise Ready within the grace and
/// NotReady (`not_ready`'s reason) after it.
pub fn judge(f: &NodeFacts, heartbeat: Duration, not_ready: impl FnOnce() -> String) -> Option<(NodePhase, String)> {
    let silent = f.silent_for.filter(|d| *d >= heartbeat * 2);
    match (silent, f.seen_by_peers) {
        (Some(d), Some((seen, counted))) => {
            return Some((NodePhase::CloudUnreachable, cloud_unreachable_reason(d, seen, counted)))
        }
        // Silent and not seen, within the grace: the grace decides.
        (Some(_), None) if f.within_grace => return None,
        _ => {}
    }
    if f.within_grace {
        Some((NodePhase::Ready, String::new()))
    } else if f.settled {
        Some((NodePhase::NotReady, not_ready()))
    } else {
        None
    }
}

/// Whether a node in `have` (with `have_reason`) needs a status write to be
/// `want` (with `reason`). The silence in a CloudUnreachable reason grows
/// every pass: only a change of the peer counts is worth a write.
pub fn needs_write(have: NodePhase, have_reason: &str, want: NodePhase, reason: &str) -> bool {
    let gist = |r: &str| r.split_once(", but ").map_or(r, |(_, p)| p).to_string();
    have != want
        || match want {
            NodePhase::NotReady => have_reason != reason,
            NodePhase::CloudUnreachable => gist(have_reason) != gist(reason),
            _ => false,
        }
}

// ------------------------------------------------------------ liveness

#[derive(Debug, Default)]
struct LivenessState {
    silent_since: HashMap<String, Instant>,
    verdicts: HashMap<String, Verdict>,
}

/// Per node: since when the cloud has not heard it, and what its peers
/// say. Written by the leader's node lifecycle loop; read by the App
/// controller (`hub.liveness()`) to decide when a node is lost.
#[derive(Debug, Default)]
pub struct Liveness {
    state: Mutex<LivenessState>,
}

impl Liveness {
    fn state(&self) -> std::sync::MutexGuard<'_, LivenessState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `node` has not been heard by any replica (none while it is
    /// heard, or before the lifecycle loop judged it).
    pub fn silent_for(&self, node: &str) -> Option<Duration> {
        self.state().silent_since.get(node).map(|t| t.elapsed())
    }

    /// What its peers say about `node` (`NoPeers` while it is heard).
    pub fn verdict(&self, node: &str) -> Verdict {
        self.state().verdicts.get(node).copied().unwrap_or(Verdict::NoPeers)
    }

    /// Whether any node is silent now.
    pub fn any_silent(&self) -> bool {
        !self.state().silent_since.is_empty()
    }

    /// Replaces the state with one lifecycle pass's conclusions.
    pub(crate) fn set(&self, silent_since: HashMap<String, Instant>, verdicts: HashMap<String, Verdict>) {
        let mut s = self.state();
        s.silent_since = silent_since;
        s.verdicts = verdicts;
    }
}

// ------------------------------------------------------------ targets

fn hash_of(parts: &[&str], round: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    round.hash(&mut h);
    h.finish()
}

/// Which nodes `me` probes in `round`: in each of its groups (member lists
/// sorted), the next [`GROUP_PEERS_MAX`] members after it in ring order —
/// the whole group when it is small, so every member is probed by as many
/// peers as it probes — then [`SAMPLE_PEERS`] of the other nodes of `all`
/// from a position that changes with `round`; [`TARGETS_MAX`] in all.
pub fn probe_targets(me: &str, groups: &[&[String]], all: &[String], round: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    taken.insert(me);
    for members in groups {
        let Some(at) = members.iter().position(|m| m == me) else { continue };
        let n = members.len();
        for k in 1..n.min(GROUP_PEERS_MAX + 1) {
            let m = &members[(at + k) % n];
            if out.len() < TARGETS_MAX && taken.insert(m.as_str()) {
                out.push(m.clone());
            }
        }
    }
    // The sample: walk `all` from a position of (me, round), skipping
    // what is taken; O(sample + taken), not O(all).
    if !all.is_empty() {
        let start = (hash_of(&[me], round) % all.len() as u64) as usize;
        let mut sampled = 0;
        for k in 0..all.len() {
            if sampled == SAMPLE_PEERS || out.len() >= TARGETS_MAX {
                break;
            }
            let n = &all[(start + k) % all.len()];
            if taken.insert(n.as_str()) {
                out.push(n.clone());
                sampled += 1;
            }
        }
    }
    out
}

// ------------------------------------------------------------ presence

/// What a replica publishes as its presence record: the nodes it serves
/// with a recent heartbeat (what the lifecycle loop calls Ready), where
/// they serve peers, and what they report about nodes no replica hears.
/// Older replicas published a bare list of node names; that still reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceRecord {
    /// Which hub wrote it (a lifecycle loop skips its own hub's record).
    #[serde(default)]
    pub hub: String,
    /// Served nodes with a heartbeat within the grace period.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Peer server addresses of served nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peer_addrs: BTreeMap<String, String>,
    /// Per silent node: what served nodes reported about it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peer_views: BTreeMap<String, Vec<RemoteReport>>,
}

/// A report about a silent node, as a presence record carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteReport {
    /// The reporting node (served, so Ready).
    pub reporter: String,
    /// Age of the report when the record was written, milliseconds.
    pub age_ms: u64,
    /// Seconds since the reporter last reached the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_secs: Option<u64>,
}

impl PresenceRecord {
    /// Reads a record: this format, or an older replica's list of names.
    /// Garbage reads as an empty record.
    pub fn parse(data: &[u8]) -> PresenceRecord {
        if let Ok(names) = serde_json::from_slice::<Vec<String>>(data) {
            return PresenceRecord { nodes: names, ..Default::default() };
        }
        serde_json::from_slice(data).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rule() -> VerdictRule {
        VerdictRule::new(2 * S, S)
    }

    #[test]
    fn verdict_table() {
        let base = Instant::now();
        // The node went silent at base + 10 s; judged at base + 16 s.
        let silent = base + 10 * S;
        let now = base + 16 * S;
        let r = |reporter: &str, phase: NodePhase, received_secs: u64, seen: Option<u64>| PeerReport {
            reporter: reporter.into(),
            reporter_phase: phase,
            received: base + Duration::from_secs(received_secs),
            last_seen_secs: seen,
        };
        use NodePhase::*;
        use Verdict::*;
        let cases: Vec<(&str, Vec<PeerReport>, Verdict)> = vec![
            ("no reports", vec![], NoPeers),
            (
                "only reporters that are not Ready",
                vec![r("a", NotReady, 15, Some(0)), r("b", Unknown, 15, Some(0))],
                NoPeers,
            ),
            ("only stale reports", vec![r("a", Ready, 12, Some(0))], NoPeers),
            (
                "every fresh Ready peer sees it",
                vec![r("a", Ready, 15, Some(1)), r("b", Ready, 16, Some(0))],
                SeenByMajority,
            ),
            (
                "3 of 4 see it",
                vec![
                    r("a", Ready, 15, Some(0)),
                    r("b", Ready, 15, Some(1)),
                    r("c", Ready, 16, Some(2)),
                    r("d", Ready, 16, None),
                ],
                SeenByMajority,
            ),
            ("half is no majority", vec![r("a", Ready, 15, Some(0)), r("b", Ready, 15, None)], NotSeen),
            ("never reached", vec![r("a", Ready, 15, None)], NotSeen),
            // Last success at 15 - 5 - 1 = 9 s, before it went silent: it
            // may have died right after its last heartbeat.
            ("reached only before it went silent", vec![r("a", Ready, 15, Some(5))], NotSeen),
            // Success at 16 - 0 - 1 = 15 s: after it went silent.
            ("reached after it went silent", vec![r("a", Ready, 16, Some(0))], SeenByMajority),
            // Success at 14 - 2 - 1 = 11 s: before its next heartbeat was
            // due (10 s + 1 s + 0.5 s): it may have died since.
            ("reached before its next heartbeat was due", vec![r("a", Ready, 14, Some(2))], NotSeen),
            (
                "a stale and a NotReady reporter do not dilute the majority",
                vec![r("a", Ready, 16, Some(0)), r("b", Ready, 11, None), r("c", NotReady, 16, None)],
                SeenByMajority,
            ),
        ];
        for (what, reports, want) in cases {
            assert_eq!(verdict(&reports, silent, now, &rule()), want, "{what}");
        }
    }

    #[test]
    fn a_success_too_long_ago_does_not_count() {
        let base = Instant::now();
        let report = PeerReport {
            reporter: "a".into(),
            reporter_phase: NodePhase::Ready,
            received: base + 20 * S,
            last_seen_secs: Some(7),
        };
        // Success at 12 s; silent since 10 s; now 20 s: 8 s ago > 6 s.
        assert_eq!(verdict(std::slice::from_ref(&report), base + 10 * S, base + 20 * S, &rule()), Verdict::NotSeen);
        let r = VerdictRule { seen_within: 10 * S, ..rule() };
        assert_eq!(verdict(&[report], base + 10 * S, base + 20 * S, &r), Verdict::SeenByMajority);
    }

    #[test]
    fn tally_counts_what_the_verdict_counts() {
        let base = Instant::now();
        let r = |phase, seen| PeerReport {
            reporter: "x".into(),
            reporter_phase: phase,
            received: base + 16 * S,
            last_seen_secs: seen,
        };
        let reports = vec![
            r(NodePhase::Ready, Some(0)),
            r(NodePhase::Ready, None),
            r(NodePhase::NotReady, Some(0)),
            r(NodePhase::Ready, Some(0)),
        ];
        assert_eq!(tally(&reports, base + 10 * S, base + 16 * S, &rule()), (2, 3));
        assert_eq!(cloud_unreachable_reason(12 * S, 3, 4), "no heartbeat for 12s, but 3 of 4 group peers reach it");
    }

    #[test]
    fn phase_table() {
        let hb = S;
        let f = |silent: Option<u64>, seen: Option<(usize, usize)>, within_grace: bool, settled: bool| NodeFacts {
            silent_for: silent.map(Duration::from_secs),
            seen_by_peers: seen,
            within_grace,
            settled,
        };
        let lost = || "no heartbeat within the grace period".to_string();
        use NodePhase::*;
        type Case = (&'static str, NodeFacts, Option<(NodePhase, &'static str)>);
        let cases: Vec<Case> = vec![
            ("heard", f(None, None, true, true), Some((Ready, ""))),
            ("silent for one period only", f(Some(1), Some((2, 2)), true, true), Some((Ready, ""))),
            (
                "silent, seen by its peers",
                f(Some(3), Some((2, 3)), true, true),
                Some((CloudUnreachable, "no heartbeat for 3s, but 2 of 3 group peers reach it")),
            ),
            (
                "seen after the grace too",
                f(Some(30), Some((1, 1)), false, true),
                Some((CloudUnreachable, "no heartbeat for 30s, but 1 of 1 group peers reach it")),
            ),
            ("silent, not seen, within the grace", f(Some(3), None, true, true), None),
            (
                "silent, not seen, past the grace",
                f(Some(9), None, false, true),
                Some((NotReady, "no heartbeat within the grace period")),
            ),
            ("a new leader waits a grace", f(Some(9), None, false, false), None),
        ];
        for (what, facts, want) in cases {
            let got = judge(&facts, hb, lost);
            assert_eq!(got.as_ref().map(|(p, r)| (*p, r.as_str())), want, "{what}");
        }
    }

    #[test]
    fn only_changes_are_written() {
        use NodePhase::*;
        assert!(!needs_write(Ready, "", Ready, ""));
        assert!(needs_write(Ready, "", CloudUnreachable, "no heartbeat for 3s, but 2 of 3 group peers reach it"));
        let was = "no heartbeat for 3s, but 2 of 3 group peers reach it";
        assert!(!needs_write(
            CloudUnreachable,
            was,
            CloudUnreachable,
            "no heartbeat for 9s, but 2 of 3 group peers reach it"
        ));
        assert!(needs_write(
            CloudUnreachable,
            was,
            CloudUnreachable,
            "no heartbeat for 9s, but 3 of 3 group peers reach it"
        ));
        assert!(needs_write(NotReady, "a", NotReady, "b"));
        assert!(!needs_write(NotReady, "a", NotReady, "a"));
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i:03}")).collect()
    }

    #[test]
    fn small_groups_are_a_full_mesh_plus_a_sample() {
        let all = names(20);
        let group: Vec<String> = all[..4].to_vec();
        let t = probe_targets("n001", &[&group], &all, 7);
        assert_eq!(&t[..3], &["n002", "n003", "n000"]);
        assert_eq!(t.len(), 3 + SAMPLE_PEERS);
        assert!(t[3..].iter().all(|n| !group.contains(n)), "{t:?}");
        // The sample rotates with the round, the mesh does not.
        let other = (0..50).map(|r| probe_targets("n001", &[&group], &all, r)).find(|o| o[3..] != t[3..]);
        assert!(other.is_some_and(|o| o[..3] == t[..3]));
    }

    #[test]
    fn targets_are_bounded_whatever_the_groups() {
        let all = names(300);
        let g1: Vec<String> = all[..200].to_vec();
        // n150 and n200…n299: after n150 in ring order come n200…n231.
        let g2: Vec<String> = std::iter::once(all[150].clone()).chain(all[200..].iter().cloned()).collect();
        let t = probe_targets("n150", &[&g1, &g2], &all, 1);
        assert!(t.len() <= TARGETS_MAX);
        assert_eq!(t.len(), TARGETS_MAX);
        let unique: BTreeSet<&String> = t.iter().collect();
        assert_eq!(unique.len(), t.len());
        assert!(!t.contains(&"n150".to_string()));
        // In a large group each member is probed by GROUP_PEERS_MAX others.
        let probed_by = g1.iter().filter(|m| probe_targets(m, &[&g1], &[], 0).contains(&"n050".to_string())).count();
        assert_eq!(probed_by, GROUP_PEERS_MAX);
        // A node in no group probes only the sample; alone, nobody.
        assert_eq!(probe_targets("n000", &[], &all, 3).len(), SAMPLE_PEERS);
        assert!(probe_targets("n000", &[], &all[..1], 3).is_empty());
    }

    #[test]
    fn presence_records_of_older_replicas_still_read() {
        let old = PresenceRecord::parse(br#"["a","b"]"#);
        assert_eq!(old.nodes, vec!["a", "b"]);
        let mut rec = PresenceRecord { hub: "h1".into(), nodes: vec!["a".into()], ..Default::default() };
        rec.peer_addrs.insert("a".into(), "10.0.0.1:7444".into());
        rec.peer_views
            .insert("c".into(), vec![RemoteReport { reporter: "a".into(), age_ms: 300, last_seen_secs: Some(1) }]);
        let bytes = serde_json::to_vec(&rec).expect("encode");
        assert_eq!(PresenceRecord::parse(&bytes), rec);
        assert_eq!(PresenceRecord::parse(b"\xff garbage"), PresenceRecord::default());
    }
}
