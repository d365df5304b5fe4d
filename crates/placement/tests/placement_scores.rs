//! One table per score plugin and policy: which node wins, and the reason
//! the placement gives.

mod support;

use support::*;
use yunbian_api::{AppAffinity, LatencySpec, Placement, PlacementPolicy, Spread, TopologyKey};
use yunbian_placement::{schedule, Cluster, Latency, NodeFacts};

fn policy(p: PlacementPolicy) -> Placement {
    let latency =
        (p == PlacementPolicy::Latency).then(|| LatencySpec { from_group: "clients".into(), ..Default::default() });
    Placement { policy: p, latency, ..Default::default() }
}

/// The first placement of one instance: (node, reason).
fn first(c: &mut Cluster, p: &Placement) -> (String, String) {
    let d = schedule(c, &request("web", p, 1));
    let b = d.create.first().unwrap_or_else(|| panic!("nothing placed: {d:?}"));
    (b.node.clone(), b.reason.clone())
}

#[test]
fn least_requested_balanced() {
    // (case, requested cpu/memory of a, b, c, winner, reason)
    let cases = [
        ("emptiest wins", [(2000, 4 * GI), (1000, 2 * GI), (3000, GI)], "b", "least loaded (cpu 25%, memory 25%)"),
        (
            "cpu and memory both count",
            [(400, 6 * GI), (2000, GI), (0, 8 * GI - 64 * MI)],
            "b",
            "least loaded (cpu 50%, memory 12%)",
        ),
        ("ties break by name", [(1000, GI), (1000, GI), (1000, GI)], "a", "least loaded (cpu 25%, memory 12%)"),
    ];
    for (name, used, winner, reason) in cases {
        let nodes: Vec<NodeFacts> = ["a", "b", "c"]
            .iter()
            .zip(used)
            .map(|(n, (cpu, mem))| {
                let mut f = node(n);
                f.requested = res(cpu, mem);
                f
            })
            .collect();
        let mut c = cluster(nodes, vec![]);
        assert_eq!(first(&mut c, &Placement::default()), (winner.to_string(), reason.to_string()), "{name}");
    }
}

#[test]
fn node_spread_is_the_default_preference() {
    // b is much busier, yet the second instance goes there before a gets two.
    let mut busy = node("b");
    busy.requested = res(3000, 6 * GI);
    for p in [PlacementPolicy::Balanced, PlacementPolicy::Reliability] {
        let mut c = cluster(vec![node("a"), busy.clone()], vec![]);
        let d = schedule(&mut c, &request("web", &Placement { policy: p, ..Default::default() }, 3));
        assert_eq!(created_nodes(&d), ["a", "b", "a"], "{p:?}");
    }
    // When b cannot fit more, a takes the rest: spreading is a preference.
    let mut full = node("b");
    full.requested = res(4000, 0);
    let mut c = cluster(vec![node("a"), full], vec![]);
    let d = schedule(&mut c, &request("web", &Placement::default(), 3));
    assert_eq!(created_nodes(&d), ["a", "a", "a"]);
}

fn latency_world(rtts: &[(&str, f64)]) -> Cluster {
    let mut l = Latency::new();
    let mut nodes = vec![];
    for (n, rtt) in rtts {
        l.insert("client", n, *rtt);
        nodes.push(node(n));
    }
    let mut client = node_in("client", &["clients"]);
    client.unschedulable = true;
    nodes.push(client);
    Cluster::new(nodes, vec![], l)
}

#[test]
fn lowest_latency() {
    let p = policy(PlacementPolicy::Latency);
    type Rtts = &'static [(&'static str, f64)];
    let cases: [(&str, Rtts, &str, &str); 3] = [
        ("nearest wins", &[("a", 12.0), ("b", 3.1), ("c", 40.0)], "b", "lowest RTT from clients (3.1 ms)"),
        ("unmeasured ranks last", &[("a", 80.0)], "a", "lowest RTT from clients (80.0 ms)"),
        ("ties break by name", &[("b", 5.0), ("a", 5.0)], "a", "lowest RTT from clients (5.0 ms)"),
    ];
    for (name, rtts, winner, reason) in cases {
        let mut c = latency_world(rtts);
        if name == "unmeasured ranks last" {
            // A node without a measurement is still usable, but last.
            let mut client = node_in("client", &["clients"]);
            client.unschedulable = true;
            let mut c2 = Cluster::new(vec![node("0-unmeasured"), node("a"), client], vec![], c.latency().clone());
            assert_eq!(first(&mut c2, &p), (winner.to_string(), reason.to_string()), "{name}");
            continue;
        }
        assert_eq!(first(&mut c, &p), (winner.to_string(), reason.to_string()), "{name}");
    }
    // Near nodes fill first; a farther node says why it was chosen.
    let mut c = latency_world(&[("a", 1.0), ("b", 9.0)]);
    c.book("a", &res(3900, 0));
    let d = schedule(&mut c, &request("web", &p, 2));
    assert_eq!(created_nodes(&d), ["a", "b"]);
    assert_eq!(d.create[1].reason, "low RTT from clients (9.0 ms; the nearest, 1.0 ms, are full or spread)");
}

#[test]
fn lowest_cost() {
    let p = policy(PlacementPolicy::Cost);
    // (case, costs of the groups of a, b, c, winner, reason)
    let cases: [(&str, [Option<f64>; 3], &str, &str); 3] = [
        ("cheapest group wins", [Some(0.05), Some(0.02), Some(0.09)], "b", "cheapest group gb (0.02/cpu-h)"),
        ("unknown cost ranks last", [None, Some(0.5), None], "b", "cheapest group gb (0.5/cpu-h)"),
        ("nothing known: by name", [None, None, None], "a", "no group cost known (ranked last)"),
    ];
    for (name, costs, winner, reason) in cases {
        let groups = ["ga", "gb", "gc"].iter().zip(costs).map(|(g, c)| group_at(g, "", "", c)).collect();
        let nodes = vec![node_in("a", &["ga"]), node_in("b", &["gb"]), node_in("c", &["gc"])];
        let mut c = cluster(nodes, groups);
        assert_eq!(first(&mut c, &p), (winner.to_string(), reason.to_string()), "{name}");
    }
    // A node in two groups costs what its cheaper group costs.
    let groups =
        vec![group_at("x", "", "", Some(0.3)), group_at("y", "", "", Some(0.01)), group_at("z", "", "", Some(0.1))];
    let mut c = cluster(vec![node_in("a", &["x", "y"]), node_in("b", &["z"])], groups);
    assert_eq!(first(&mut c, &p), ("a".to_string(), "cheapest group y (0.01/cpu-h)".to_string()));
}

#[test]
fn reliability() {
    let p = policy(PlacementPolicy::Reliability);
    // (case, (uptime, failures) of a, b, c, winner, reason)
    let cases = [
        ("longest uptime", [(3600, 0), (273_600, 0), (86_400, 0)], "b", "reliable (up 3d 4h, 0 failures in 24h)"),
        ("fewest failures", [(86_400, 2), (86_400, 1), (86_400, 3)], "b", "reliable (up 1d 0h, 1 failures in 24h)"),
        (
            "a week is enough",
            [(30 * 86_400, 0), (8 * 86_400, 0), (60, 5)],
            "a",
            "reliable (up 30d 0h, 0 failures in 24h)",
        ),
    ];
    for (name, facts, winner, reason) in cases {
        let nodes = ["a", "b", "c"]
            .iter()
            .zip(facts)
            .map(|(n, (up, fails))| {
                let mut f = node(n);
                f.uptime_secs = up;
                f.recent_failures = fails;
                f
            })
            .collect();
        let mut c = cluster(nodes, vec![]);
        assert_eq!(first(&mut c, &p), (winner.to_string(), reason.to_string()), "{name}");
    }
}

#[test]
fn affinity_preference() {
    // db runs twice on b and once on a: with affinity by group (both in g),
    // the node with more db instances is not preferred by group counting,
    // but by node it is.
    for (by, winner) in [(TopologyKey::Node, "b"), (TopologyKey::Group, "a")] {
        let mut c = cluster(vec![node_in("a", &["g"]), node_in("b", &["g"]), node_in("c", &["h"])], vec![]);
        c.record_instance("db", "a");
        c.record_instance("db", "b");
        c.record_instance("db", "b");
        let p = Placement { affinity: vec![AppAffinity { app: "db".into(), by }], ..Default::default() };
        assert_eq!(first(&mut c, &p).0, winner, "{by:?}");
    }
}

#[test]
fn hard_spread_by_zone() {
    // Zone z1 has three nodes, z2 one: with maxSkew 1 the instances
    // alternate zones even though z1 has more room.
    let groups = vec![group_at("g1", "z1", "r", None), group_at("g2", "z2", "r", None)];
    let nodes = vec![node_in("a", &["g1"]), node_in("b", &["g1"]), node_in("c", &["g1"]), node_in("d", &["g2"])];
    let p = Placement { spread: Some(Spread { by: TopologyKey::Zone, max_skew: 1 }), ..Default::default() };
    let mut c = cluster(nodes, groups);
    let d = schedule(&mut c, &request("web", &p, 4));
    assert_eq!(created_nodes(&d), ["a", "d", "b", "d"]);
    assert!(d.message.is_empty(), "{}", d.message);
}
