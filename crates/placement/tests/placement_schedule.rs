//! Whole decisions: which instances stay, move or are added, and what the
//! decision says about it.

mod support;

use support::*;
use yunbian_api::{Fallback, Placement, PlacementMode, Spread, Tier, TopologyKey};
use yunbian_placement::{schedule, Cluster, Decision, NodeFacts, Request, Target, MAX_REJECTIONS};

fn evicted(d: &Decision) -> Vec<(&str, &str)> {
    d.evict.iter().map(|(i, w)| (i.as_str(), w.as_str())).collect()
}

/// A cluster whose bookings include the instances `on` (one per entry).
fn booked(nodes: Vec<NodeFacts>, groups: Vec<yunbian_placement::GroupInfo>, on: &[&str]) -> Cluster {
    let mut c = cluster(nodes, groups);
    for n in on {
        c.book(n, &res(100, 64 * MI));
        c.record_instance("web", n);
    }
    c
}

#[test]
fn stable_input_changes_nothing() {
    let mut c = booked(vec![node("a"), node("b"), node("c")], vec![], &["a", "b"]);
    let p = Placement::default();
    let mut req = request("web", &p, 2);
    req.existing = vec![existing("web-1", "a", ""), existing("web-2", "b", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(d.keep, ["web-1", "web-2"]);
    assert!(d.evict.is_empty() && d.create.is_empty(), "{d:?}");
    assert_eq!(
        d.explanations[0],
        ("web-1".into(), "kept on a (still passes the filters): least loaded (cpu 2%, memory 0%)".into())
    );
    assert!(d.message.is_empty());
    assert!(d.rejections.is_empty(), "nothing was placed, nothing was rejected");
}

#[test]
fn instances_move_only_when_they_must() {
    let mut arm = node("e7");
    arm.arch = "aarch64".into();
    let mut lost = node("l");
    lost.lost = true;
    let mut down = node("d");
    down.ready = false;
    down.not_ready_reason = "NotReady: no heartbeat within the grace period".into();
    let mut cordoned = node("k");
    cordoned.unschedulable = true;
    let mut c = booked(vec![arm, lost, down, cordoned, node("z")], vec![], &["e7", "l", "d", "k"]);
    let mut p = Placement::default();
    p.requirements.arch = vec!["x86_64".into()];
    let mut req = request("web", &p, 5);
    req.existing = vec![
        existing("web-arm", "e7", ""),
        existing("web-lost", "l", ""),
        existing("web-down", "d", ""),
        existing("web-cordoned", "k", ""),
        existing("web-gone", "gone", ""),
    ];
    let d = schedule(&mut c, &req);
    assert_eq!(
        evicted(&d),
        [
            ("web-arm", "node e7 no longer matches requirements.arch (node is \"aarch64\", wants x86_64)"),
            ("web-gone", "node gone is gone"),
            ("web-lost", "node l is lost"),
        ]
    );
    assert_eq!(d.keep, ["web-cordoned", "web-down"], "not ready and cordoned nodes keep their instances");
    assert_eq!(
        d.explanations[1].1,
        "kept on d: not ready (NotReady: no heartbeat within the grace period) but not lost"
    );
    assert_eq!(created_nodes(&d), ["z", "z", "z"]);
    // The evicted instances' resources were given back.
    assert_eq!(c.node("e7").map(|n| n.requested.cpu_millis), Some(0));
    assert_eq!(c.node("l").map(|n| n.requested.cpu_millis), Some(0));
}

#[test]
fn surplus_goes_unready_first_then_crowded() {
    let mut down = node("d");
    down.ready = false;
    let mut c = booked(vec![node("a"), node("b"), down], vec![], &["a", "a", "b", "d"]);
    let p = Placement::default();
    let mut req = request("web", &p, 2);
    req.existing =
        vec![existing("w1", "a", ""), existing("w2", "a", ""), existing("w3", "b", ""), existing("w4", "d", "")];
    let d = schedule(&mut c, &req);
    let names: Vec<&str> = d.evict.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(names, ["w2", "w4"], "{d:?}");
    assert!(d.evict[1].1.contains("node d is not ready"), "{}", d.evict[1].1);
    assert_eq!(d.keep, ["w1", "w3"]);
    assert!(d.create.is_empty());
    // No target at all: everything is surplus.
    let mut req = request("web", &p, 0);
    req.targets.clear();
    req.existing = vec![existing("w1", "a", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(evicted(&d), [("w1", "surplus (1 for 0 wanted): the most crowded placement")]);
}

#[test]
fn per_group_targets() {
    let groups = vec![group("a", Tier::Edge), group("b", Tier::Edge)];
    let nodes = vec![node_in("a1", &["a"]), node_in("a2", &["a"]), node_in("b1", &["b"]), node("x")];
    let mut c = cluster(nodes, groups);
    let p = Placement { groups: vec!["a".into(), "b".into()], ..Default::default() };
    let mut req = request("web", &p, 0);
    req.targets = vec![Target { group: "a".into(), count: 2 }, Target { group: "b".into(), count: 2 }];
    let d = schedule(&mut c, &req);
    let placed: Vec<(&str, &str)> = d.create.iter().map(|b| (b.node.as_str(), b.group.as_str())).collect();
    assert_eq!(placed, [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b1", "b")]);
    // An instance of a group that is no longer a target moves.
    let mut req2 = request("web", &p, 0);
    req2.targets = vec![Target { group: "a".into(), count: 1 }];
    req2.existing = vec![existing("w-a", "a1", "a"), existing("w-b", "b1", "b")];
    let d = schedule(&mut cluster(vec![node_in("a1", &["a"]), node_in("b1", &["b"])], vec![]), &req2);
    assert_eq!(evicted(&d), [("w-b", "group b is no longer a target of the placement")]);
}

#[test]
fn without_per_group_the_bind_names_the_nodes_group() {
    let mut c = cluster(vec![node_in("a1", &["a", "z"]), node_in("c1", &["c"]), node("x")], vec![]);
    let p = Placement { groups: vec!["z".into(), "c".into()], ..Default::default() };
    let d = schedule(&mut c, &request("web", &p, 2));
    let placed: Vec<(&str, &str)> = d.create.iter().map(|b| (b.node.as_str(), b.group.as_str())).collect();
    assert_eq!(placed, [("a1", "z"), ("c1", "c")]);
    let d = schedule(&mut cluster(vec![node_in("a1", &["a"])], vec![]), &request("web", &Placement::default(), 1));
    assert_eq!(d.create[0].group, "", "no groups asked: no group");
}

#[test]
fn every_node() {
    let p = Placement { mode: PlacementMode::EveryNode, ..Default::default() };
    let mut small = node("s");
    small.allocatable = res(50, GI);
    let mut down = node("d");
    down.ready = false;
    let mut c = booked(vec![node("a"), node("b"), small.clone(), down.clone()], vec![], &["a"]);
    let mut req = request("web", &p, 0);
    req.targets = vec![];
    req.existing = vec![existing("w-a", "a", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(d.keep, ["w-a"]);
    assert_eq!(created_nodes(&d), ["b"]);
    assert_eq!(d.unplaced, 1);
    assert_eq!(d.message, "1 of 3 eligible nodes cannot run an instance: 1 insufficient cpu");
    // A node joins, one stops passing (selector), one gets a duplicate.
    let mut p2 = p.clone();
    p2.node_selector = [("role".to_string(), "edge".to_string())].into();
    let labelled = |n: &str| {
        let mut f = node(n);
        f.labels.insert("role".into(), "edge".into());
        f
    };
    let mut c = booked(vec![labelled("a"), node("b"), labelled("new")], vec![], &["a", "a", "b"]);
    let mut req = request("web", &p2, 0);
    req.existing = vec![existing("w-a", "a", ""), existing("w-a2", "a", ""), existing("w-b", "b", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(d.keep, ["w-a"]);
    assert_eq!(
        evicted(&d),
        [
            ("w-a2", "node a already runs another instance (everyNode runs one per node)"),
            ("w-b", "node b no longer matches node selector mismatch (no label role, wants role=edge)"),
        ]
    );
    assert_eq!(created_nodes(&d), ["new"]);
}

fn fallback_world(edge_free: bool) -> Cluster {
    let groups = vec![group("edge", Tier::Edge), group("cloud", Tier::Cloud)];
    let mut e1 = node_in("e1", &["edge"]);
    if !edge_free {
        e1.requested = res(4000, 0);
    }
    cluster(vec![e1, node_in("c1", &["cloud"]), node_in("c2", &["cloud"])], groups)
}

#[test]
fn fallback_to_cloud_and_back() {
    let p = Placement { fallback: Some(Fallback::Cloud), ..Default::default() };
    // The edge is full: both instances go to the cloud.
    let mut c = fallback_world(false);
    let d = schedule(&mut c, &request("web", &p, 2));
    assert_eq!(created_nodes(&d), ["c1", "c2"]);
    assert!(
        d.create[0].reason.starts_with("fallback: no edge node fits (1 insufficient cpu); least loaded"),
        "{}",
        d.create[0].reason
    );
    assert!(d.create.iter().all(|b| b.replaces.is_none()));

    // The edge recovers: make-before-break moves, the old ones stay for now.
    let mut c = fallback_world(true);
    for n in ["c1", "c2"] {
        c.book(n, &res(100, 64 * MI));
    }
    let mut req = request("web", &p, 2);
    req.existing = vec![existing("w1", "c1", ""), existing("w2", "c2", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(d.keep, ["w1", "w2"]);
    assert!(d.evict.is_empty());
    let moves: Vec<(&str, Option<&str>)> = d.create.iter().map(|b| (b.node.as_str(), b.replaces.as_deref())).collect();
    assert_eq!(moves, [("e1", Some("w1")), ("e1", Some("w2"))]);
    assert!(d.create[0].reason.starts_with("back to the edge, replacing w1 on c1: "), "{}", d.create[0].reason);
    assert_eq!(d.explanations[0].1, "kept on c1 until its replacement on e1 is Running");

    // Next pass: the replacements exist (not Running yet): no second move;
    // the cloud instances are the surplus.
    let mut c = fallback_world(true);
    for n in ["c1", "c2", "e1", "e1"] {
        c.book(n, &res(100, 64 * MI));
    }
    let mut req = request("web", &p, 2);
    req.existing =
        vec![existing("w1", "c1", ""), existing("w2", "c2", ""), existing("w3", "e1", ""), existing("w4", "e1", "")];
    let d = schedule(&mut c, &req);
    assert!(d.create.is_empty(), "{d:?}");
    let names: Vec<&str> = d.evict.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(names, ["w1", "w2"]);
    assert!(d.evict[0].1.contains("on cloud node c1; the edge has the rest"), "{}", d.evict[0].1);

    // The controller leaves the replaced instances out until their
    // replacements run: nothing more to do.
    let mut c = fallback_world(true);
    for n in ["c1", "c2", "e1", "e1"] {
        c.book(n, &res(100, 64 * MI));
    }
    let mut req = request("web", &p, 2);
    req.existing = vec![existing("w3", "e1", ""), existing("w4", "e1", "")];
    let d = schedule(&mut c, &req);
    assert!(d.create.is_empty() && d.evict.is_empty(), "{d:?}");

    // Only as many move as fit on the edge.
    let mut c = fallback_world(true);
    c.book("e1", &res(3850, 0));
    let mut req = request("web", &p, 2);
    req.existing = vec![existing("w1", "c1", ""), existing("w2", "c2", "")];
    let d = schedule(&mut c, &req);
    assert_eq!(d.create.len(), 1);
    assert_eq!(d.create[0].replaces.as_deref(), Some("w1"));
}

#[test]
fn unplaced_message_counts_reasons() {
    let groups = vec![group("a", Tier::Edge)];
    let full = |n: &str| {
        let mut f = node_in(n, &["a"]);
        f.requested = res(0, 8 * GI - 120 * MI);
        f
    };
    let nodes = vec![full("a1"), full("a2"), node_in("a3", &["a"]), node("x"), node("y")];
    let mut c = cluster(nodes, groups);
    c.book("a3", &res(3950, 0));
    let p = Placement { groups: vec!["a".into()], ..Default::default() };
    let mut req = request("web", &p, 1);
    req.resources = res(100, 256 * MI);
    let d = schedule(&mut c, &req);
    assert_eq!(d.unplaced, 1);
    assert_eq!(d.message, "0/5 nodes available: 2 insufficient memory, 1 insufficient cpu, 2 not in groups [a]");
    let rej: Vec<(&str, &str)> = d.rejections.iter().map(|r| (r.node.as_str(), r.reason.as_str())).collect();
    assert_eq!(
        rej,
        [
            ("a1", "insufficient memory (requests 256Mi, free 120Mi)"),
            ("a2", "insufficient memory (requests 256Mi, free 120Mi)"),
            ("a3", "insufficient cpu (requests 100m, free 50m)"),
            ("x", "not in groups [a]"),
            ("y", "not in groups [a]"),
        ]
    );
    // Per-group targets prefix their group.
    let mut req = request("web", &p, 0);
    req.targets = vec![Target { group: "a".into(), count: 5 }];
    let d = schedule(&mut cluster(vec![node_in("a1", &["a"]), node("x")], vec![]), &req);
    assert_eq!(d.unplaced, 0, "{d:?}");
    let d = schedule(&mut cluster(vec![node("x")], vec![]), &req);
    assert_eq!(d.message, "group a: 0/1 nodes available: 1 not in group a");
}

#[test]
fn rejections_are_capped_and_sorted() {
    let nodes: Vec<NodeFacts> = (0..120)
        .map(|i| {
            let mut n = node(&format!("n{i:03}"));
            n.ready = i % 2 == 0;
            n
        })
        .rev()
        .collect();
    let mut c = cluster(nodes, vec![]);
    let d = schedule(&mut c, &request("web", &Placement::default(), 1));
    assert_eq!(d.rejections.len(), MAX_REJECTIONS);
    assert_eq!(d.rejections[0].node, "n001");
    assert!(d.rejections.windows(2).all(|w| w[0].node < w[1].node));
    assert!(d.rejections.iter().all(|r| r.reason == "not ready (NotReady)"));
}

#[test]
fn unsatisfiable_spread_still_places_and_says_so() {
    let groups = vec![group_at("g1", "z1", "r", None), group_at("g2", "z2", "r", None)];
    let mut full = node_in("b", &["g2"]);
    full.requested = res(4000, 0);
    let mut c = cluster(vec![node_in("a", &["g1"]), full], groups);
    let p = Placement { spread: Some(Spread { by: TopologyKey::Zone, max_skew: 1 }), ..Default::default() };
    let d = schedule(&mut c, &request("web", &p, 3));
    assert_eq!(created_nodes(&d), ["a", "a", "a"]);
    assert!(d.message.starts_with("spread by zone cannot keep maxSkew 1"), "{}", d.message);
    assert!(!d.create[0].reason.contains("maxSkew"), "the first one keeps it: {}", d.create[0].reason);
    assert!(d.create[1].reason.ends_with("; spread by zone cannot keep maxSkew 1"), "{}", d.create[1].reason);
    // A node without a zone cannot be placed on when spreading by zone.
    let mut c = cluster(vec![node("nozone")], vec![]);
    let d = schedule(&mut c, &request("web", &p, 1));
    assert_eq!(d.rejections[0].reason, "no zone (spread by zone)");
}

#[test]
fn deterministic_whatever_the_input_order() {
    let mk = |rev: bool| {
        let mut nodes: Vec<NodeFacts> = (0..40)
            .map(|i| {
                let mut n = node_in(&format!("n{i:02}"), &[if i % 3 == 0 { "g0" } else { "g1" }]);
                n.requested = res((i * 97) % 3000, ((i * 31) % 7) * GI);
                n
            })
            .collect();
        if rev {
            nodes.reverse();
        }
        cluster(nodes, vec![group_at("g0", "z0", "r", Some(0.1)), group_at("g1", "z1", "r", Some(0.2))])
    };
    for policy in [
        yunbian_api::PlacementPolicy::Balanced,
        yunbian_api::PlacementPolicy::Cost,
        yunbian_api::PlacementPolicy::Reliability,
    ] {
        let p = Placement { policy, spread: Some(Spread { by: TopologyKey::Zone, max_skew: 2 }), ..Default::default() };
        let (mut a, mut b) = (mk(false), mk(true));
        let da = schedule(&mut a, &request("web", &p, 30));
        let db = schedule(&mut b, &request("web", &p, 30));
        assert_eq!(da, db, "{policy:?}");
        assert_eq!(da, schedule(&mut mk(false), &request("web", &p, 30)));
    }
}

#[test]
fn bad_input_never_panics() {
    let mut zero = node("z");
    zero.allocatable = res(0, 0);
    let mut c = cluster(vec![zero, node_in("a", &["g"])], vec![]);
    let p = Placement { groups: vec!["missing".into()], ..Default::default() };
    let mut req: Request = request("web", &p, 3);
    req.targets.push(Target { group: "missing".into(), count: u32::MAX });
    req.targets.push(Target { group: "".into(), count: 2 });
    req.existing = vec![existing("w", "nowhere", "g"), existing("w", "nowhere", "g"), existing("x", "a", "")];
    let d = schedule(&mut c, &req);
    assert!(d.unplaced > 0);
    let d = schedule(&mut cluster(vec![], vec![]), &request("web", &Placement::default(), 2));
    assert_eq!(d.unplaced, 2);
    assert_eq!(d.message, "0/0 nodes available: no nodes");
}
