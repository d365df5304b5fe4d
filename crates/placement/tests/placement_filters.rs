//! One table per filter plugin: a node `n` (changed by the case) and a
//! placement (changed by the case); one instance to place. The verdict is
//! `Ok(())` when `n` was chosen, else the reason `n` was rejected.

mod support;

use support::*;
use yunbian_api::{AppAffinity, Fallback, LatencySpec, Placement, Tier, TopologyKey};
use yunbian_placement::{schedule, Cluster, Latency, NodeFacts, Request, Target};

type Verdict = Result<(), String>;
/// (case, change to the node, verdict).
type NodeCase = (&'static str, fn(&mut NodeFacts), Verdict);
/// (cpu millis, memory bytes, gpus).
type Amounts = (u64, u64, u64);

/// Places one instance of `web` and says what happened to node `n`.
fn verdict(c: &mut Cluster, req: &Request) -> Verdict {
    let d = schedule(c, req);
    if d.create.iter().any(|b| b.node == "n") {
        return Ok(());
    }
    match d.rejections.iter().find(|r| r.node == "n") {
        Some(r) => Err(r.reason.clone()),
        None => Err(format!("n neither chosen nor rejected: {d:?}")),
    }
}

fn one_node(n: NodeFacts, p: &Placement) -> Verdict {
    let mut c = cluster(vec![n], vec![]);
    verdict(&mut c, &request("web", p, 1))
}

#[test]
fn node_ready() {
    let cases: [NodeCase; 5] = [
        ("ready", |_| {}, Ok(())),
        (
            "not ready, with the node controller's reason",
            |n| {
                n.ready = false;
                n.not_ready_reason = "NotReady: no heartbeat within the grace period".into();
            },
            Err("not ready (NotReady: no heartbeat within the grace period)".into()),
        ),
        ("not ready, no reason", |n| n.ready = false, Err("not ready (NotReady)".into())),
        ("lost", |n| n.lost = true, Err("lost (its instances are moving)".into())),
        ("cordoned", |n| n.unschedulable = true, Err("cordoned (spec.unschedulable)".into())),
    ];
    for (name, change, want) in cases {
        let mut n = node("n");
        change(&mut n);
        assert_eq!(one_node(n, &Placement::default()), want, "{name}");
    }
}

#[test]
fn node_selector() {
    let sel =
        |k: &str, v: &str| Placement { node_selector: [(k.to_string(), v.to_string())].into(), ..Default::default() };
    let cases = [
        ("matches", sel("site", "a"), Ok(())),
        ("other value", sel("site", "b"), Err("node selector mismatch (site=a, wants site=b)".to_string())),
        ("no such label", sel("rack", "1"), Err("node selector mismatch (no label rack, wants rack=1)".to_string())),
        ("empty selector", Placement::default(), Ok(())),
    ];
    for (name, p, want) in cases {
        let mut n = node("n");
        n.labels.insert("site".into(), "a".into());
        assert_eq!(one_node(n, &p), want, "{name}");
    }
}

#[test]
fn groups() {
    let in_groups =
        |gs: &[&str]| Placement { groups: gs.iter().map(|g| g.to_string()).collect(), ..Default::default() };
    // (case, node's groups, placement.groups, target group, verdict)
    let cases: [(&str, &[&str], Placement, &str, Verdict); 5] = [
        ("member of the target group", &["a"], in_groups(&["a", "b"]), "a", Ok(())),
        ("member of another group", &["b"], in_groups(&["a", "b"]), "a", Err("not in group a".into())),
        ("member of one of placement.groups", &["b"], in_groups(&["a", "b"]), "", Ok(())),
        ("in no listed group", &["c"], in_groups(&["a", "b"]), "", Err("not in groups [a b]".into())),
        ("no groups asked", &[], Placement::default(), "", Ok(())),
    ];
    for (name, node_groups, p, target, want) in cases {
        let mut c = cluster(vec![node_in("n", node_groups)], vec![]);
        let mut req = request("web", &p, 1);
        req.targets = vec![Target { group: target.into(), count: 1 }];
        assert_eq!(verdict(&mut c, &req), want, "{name}");
    }
}

#[test]
fn runtime_offered() {
    // (case, runtimes the node offers, runtime asked for, verdict)
    let cases: [(&str, &[&str], &str, Verdict); 6] = [
        ("offered", &["process", "fake"], "process", Ok(())),
        ("not offered", &["process", "fake"], "wasm", Err("runtime wasm not offered (offers process, fake)".into())),
        ("any runtime", &["process", "fake"], "", Ok(())),
        ("oci offered (crun found)", &["process", "wasm", "oci"], "oci", Ok(())),
        // An agent without crun leaves oci out of its runtimes.
        (
            "oci not offered (crun missing)",
            &["process", "wasm"],
            "oci",
            Err("runtime oci not offered (offers process, wasm)".into()),
        ),
        ("wasm still offered without crun", &["process", "wasm"], "wasm", Ok(())),
    ];
    for (name, offers, runtime, want) in cases {
        let mut n = node("n");
        n.runtimes = offers.iter().map(|r| r.to_string()).collect();
        let mut c = cluster(vec![n], vec![]);
        let p = Placement::default();
        let mut req = request("web", &p, 1);
        req.runtime = runtime;
        assert_eq!(verdict(&mut c, &req), want, "{name}");
    }
}

#[test]
fn the_artifact_needs_a_blob_for_the_node_or_a_wasm_one() {
    let p = Placement::default();
    let owned = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut arm = node("n");
    arm.arch = "aarch64".into();
    let cases = [
        ("no artifact", node("n"), None, Ok(())),
        ("amd64 blob on x86_64", node("n"), owned(&["linux/amd64"]), Ok(())),
        ("wasm blob anywhere", arm.clone(), owned(&["wasi/wasm32"]), Ok(())),
        (
            "amd64 only on aarch64",
            arm.clone(),
            owned(&["linux/amd64"]),
            Err("the artifact has no blob for linux/arm64 (has linux/amd64)".to_string()),
        ),
        ("arm64 blob on aarch64", arm, owned(&["linux/amd64", "linux/arm64"]), Ok(())),
    ];
    for (name, n, platforms, want) in cases {
        let mut c = cluster(vec![n], vec![]);
        let mut req = request("web", &p, 1);
        req.platforms = platforms;
        assert_eq!(verdict(&mut c, &req), want, "{name}");
    }
}

#[test]
fn arch_and_os() {
    let req = |arch: &[&str], os: &[&str]| {
        let mut p = Placement::default();
        p.requirements.arch = arch.iter().map(|s| s.to_string()).collect();
        p.requirements.os = os.iter().map(|s| s.to_string()).collect();
        p
    };
    let cases = [
        ("any", req(&[], &[]), Ok(())),
        ("arch listed", req(&["aarch64", "x86_64"], &[]), Ok(())),
        (
            "arch not listed",
            req(&["aarch64"], &[]),
            Err("requirements.arch (node is \"x86_64\", wants aarch64)".to_string()),
        ),
        ("os listed", req(&[], &["linux"]), Ok(())),
        (
            "os not listed",
            req(&[], &["windows"]),
            Err("requirements.os (node is \"linux\", wants windows)".to_string()),
        ),
    ];
    for (name, p, want) in cases {
        assert_eq!(one_node(node("n"), &p), want, "{name}");
    }
}

#[test]
fn min_free_disk() {
    let cases = [
        ("enough", "10Gi", 20 * GI, Ok(())),
        ("exactly enough", "10Gi", 10 * GI, Ok(())),
        ("too little", "10Gi", 2 * GI, Err("insufficient disk (requirements.minFreeDisk 10Gi, free 2Gi)".to_string())),
    ];
    for (name, min, free, want) in cases {
        let mut p = Placement::default();
        p.requirements.min_free_disk = Some(min.into());
        let mut n = node("n");
        n.disk_free_bytes = free;
        assert_eq!(one_node(n, &p), want, "{name}");
    }
}

#[test]
fn cpu_memory_and_extended_resources() {
    let gpu = "yunbian.io/gpu".to_string();
    // (case, request, node's free resources, verdict)
    let cases: [(&str, Amounts, Amounts, Verdict); 6] = [
        ("fits", (500, 256 * MI, 0), (500, 256 * MI, 0), Ok(())),
        (
            "memory",
            (100, 256 * MI, 0),
            (4000, 120 * MI, 0),
            Err("insufficient memory (requests 256Mi, free 120Mi)".into()),
        ),
        ("cpu", (500, 64 * MI, 0), (200, 8 * GI, 0), Err("insufficient cpu (requests 500m, free 200m)".into())),
        ("gpu fits", (100, 64 * MI, 2), (4000, 8 * GI, 2), Ok(())),
        (
            "gpu short",
            (100, 64 * MI, 2),
            (4000, 8 * GI, 1),
            Err("insufficient yunbian.io/gpu (requests 2, free 1)".into()),
        ),
        (
            "no gpu on the node",
            (100, 64 * MI, 1),
            (4000, 8 * GI, 0),
            Err("insufficient yunbian.io/gpu (requests 1, free 0)".into()),
        ),
    ];
    for (name, (cpu, mem, gpus), (free_cpu, free_mem, free_gpus), want) in cases {
        let mut n = node("n");
        // Half of the node is requested already; the rest is free.
        n.allocatable = res(2 * free_cpu, 2 * free_mem);
        n.requested = res(free_cpu, free_mem);
        if free_gpus > 0 {
            n.allocatable.extended.insert(gpu.clone(), free_gpus + 1);
            n.requested.extended.insert(gpu.clone(), 1);
        }
        let mut c = cluster(vec![n], vec![]);
        let p = Placement::default();
        let mut req = request("web", &p, 1);
        req.resources = res(cpu, mem);
        if gpus > 0 {
            req.resources.extended.insert(gpu.clone(), gpus);
        }
        assert_eq!(verdict(&mut c, &req), want, "{name}");
    }
}

#[test]
fn max_latency() {
    let spec = |from_group: &str, from_node: &str| Placement {
        policy: yunbian_api::PlacementPolicy::Latency,
        latency: Some(LatencySpec {
            from_group: from_group.into(),
            from_node: from_node.into(),
            max_latency_ms: Some(50.0),
        }),
        ..Default::default()
    };
    // Node c is the client; clients is a group of c1, c2, c3.
    let mut l = Latency::new();
    l.insert("c", "n", 20.0);
    l.insert("c1", "n", 40.0);
    l.insert("n", "c2", 60.0);
    l.insert("c3", "n", 90.0);
    let cases: [(&str, Placement, &[&str], Verdict); 6] = [
        ("from a node, near", spec("", "c"), &[], Ok(())),
        ("from a node, unmeasured", spec("", "x"), &[], Err("no RTT measured from node x".into())),
        ("from the node itself", spec("", "n"), &[], Ok(())),
        // Median of 40, 60 (reverse direction) and 90.
        (
            "from a group: the median is above",
            spec("clients", ""),
            &[],
            Err("RTT above maxLatencyMs 50 (60.0 ms from clients)".into()),
        ),
        ("from a group the node is in", spec("clients", ""), &["clients"], Ok(())),
        ("from a group without measurements", spec("far", ""), &[], Err("no RTT measured from far".into())),
    ];
    for (name, p, groups, want) in cases {
        let mut c1 = node_in("c1", &["clients"]);
        c1.unschedulable = true;
        let mut c2 = node_in("c2", &["clients"]);
        c2.unschedulable = true;
        let mut c3 = node_in("c3", &["clients"]);
        c3.unschedulable = true;
        let far = {
            let mut f = node_in("f", &["far"]);
            f.unschedulable = true;
            f
        };
        let mut cn = node("c");
        cn.unschedulable = true;
        let mut c = Cluster::new(vec![node_in("n", groups), cn, c1, c2, c3, far], vec![], l.clone());
        assert_eq!(verdict(&mut c, &request("web", &p, 1)), want, "{name}");
    }
    let mut above = spec("", "c");
    above.latency.as_mut().expect("set").max_latency_ms = Some(10.0);
    let mut c = Cluster::new(vec![node("n"), node("c")], vec![], l);
    c.book("c", &res(4000, 0));
    assert_eq!(
        verdict(&mut c, &request("web", &above, 1)),
        Err("RTT above maxLatencyMs 10 (20.0 ms from node c)".into())
    );
}

fn terms(apps: &[(&str, TopologyKey)]) -> Vec<AppAffinity> {
    apps.iter().map(|(a, by)| AppAffinity { app: a.to_string(), by: *by }).collect()
}

#[test]
fn affinity() {
    // db runs on d (group g) and on m (group h); n is in group g.
    let cases: [(&str, Vec<AppAffinity>, Verdict); 5] = [
        ("by group: db in the same group", terms(&[("db", TopologyKey::Group)]), Ok(())),
        (
            "by node: db elsewhere",
            terms(&[("db", TopologyKey::Node)]),
            Err("affinity with db (none on this node)".into()),
        ),
        (
            "by group: db only in other groups",
            terms(&[("cache", TopologyKey::Group)]),
            Err("affinity with cache (none in its groups)".into()),
        ),
        (
            "the other app has no instances",
            terms(&[("ghost", TopologyKey::Node)]),
            Err("affinity with ghost (ghost has no instances anywhere)".into()),
        ),
        ("a self term does not block the first instance", terms(&[("web", TopologyKey::Node)]), Ok(())),
    ];
    for (name, affinity, want) in cases {
        let mut d = node_in("d", &["g"]);
        d.unschedulable = true;
        let mut m = node_in("m", &["h"]);
        m.unschedulable = true;
        let mut c = cluster(vec![node_in("n", &["g"]), d, m], vec![]);
        c.record_instance("db", "d");
        c.record_instance("cache", "m");
        let p = Placement { affinity, ..Default::default() };
        assert_eq!(verdict(&mut c, &request("web", &p, 1)), want, "{name}");
    }
    // Affinity by node is met on the node that runs db.
    let mut c = cluster(vec![node("a"), node("n")], vec![]);
    c.record_instance("db", "n");
    let p = Placement { affinity: terms(&[("db", TopologyKey::Node)]), ..Default::default() };
    let d = schedule(&mut c, &request("web", &p, 2));
    assert_eq!(created_nodes(&d), ["n", "n"]);
}

#[test]
fn anti_affinity() {
    let cases: [(&str, Vec<AppAffinity>, Verdict); 4] = [
        (
            "by node: db on this node",
            terms(&[("db", TopologyKey::Node)]),
            Err("anti-affinity with db (one runs on this node)".into()),
        ),
        (
            "by group: db in its group",
            terms(&[("db", TopologyKey::Group)]),
            Err("anti-affinity with db (one runs in its groups)".into()),
        ),
        ("by node: cache elsewhere", terms(&[("cache", TopologyKey::Node)]), Ok(())),
        ("an app with no instances", terms(&[("ghost", TopologyKey::Group)]), Ok(())),
    ];
    for (name, anti_affinity, want) in cases {
        let mut m = node_in("m", &["h"]);
        m.unschedulable = true;
        let mut c = cluster(vec![node_in("n", &["g"]), m], vec![]);
        c.record_instance("db", "n");
        c.record_instance("cache", "m");
        let p = Placement { anti_affinity, ..Default::default() };
        assert_eq!(verdict(&mut c, &request("web", &p, 1)), want, "{name}");
    }
    // An App listing itself keeps its own instances apart, by node and by group.
    for (by, want_placed) in [(TopologyKey::Node, 3), (TopologyKey::Group, 2)] {
        let mut c = cluster(vec![node_in("a", &["g"]), node_in("b", &["g"]), node_in("n", &["h"])], vec![]);
        let p = Placement { anti_affinity: terms(&[("web", by)]), ..Default::default() };
        let d = schedule(&mut c, &request("web", &p, 4));
        let mut nodes = created_nodes(&d);
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), want_placed, "{by:?}: {d:?}");
        assert_eq!(d.create.len(), want_placed, "{by:?}");
        assert_eq!(d.unplaced, 4 - want_placed as u32, "{by:?}");
        assert!(d.message.contains("anti-affinity with web"), "{}", d.message);
    }
}

#[test]
fn tier() {
    let edge = group("e", Tier::Edge);
    let cloud = group("c", Tier::Cloud);
    let fallback = Placement { fallback: Some(Fallback::Cloud), ..Default::default() };
    // (case, edge node's free memory, placement, target group, verdict for the cloud node n)
    let cases: [(&str, u64, Placement, &str, Verdict); 4] = [
        ("edge only", 8 * GI, Placement::default(), "", Err("tier cloud (edge only without fallback: cloud)".into())),
        (
            "edge has room",
            8 * GI,
            fallback.clone(),
            "",
            Err("tier cloud (only when no edge node fits: fallback: cloud)".into()),
        ),
        ("edge is full", 0, fallback.clone(), "", Ok(())),
        (
            "the target is a cloud group",
            8 * GI,
            Placement { groups: vec!["c".into()], ..Default::default() },
            "c",
            Ok(()),
        ),
    ];
    for (name, edge_free, p, target, want) in cases {
        let mut e = node_in("e1", &["e"]);
        e.requested.memory_bytes = e.allocatable.memory_bytes - edge_free;
        let mut c = cluster(vec![e, node_in("n", &["c"])], vec![edge.clone(), cloud.clone()]);
        let mut req = request("web", &p, 1);
        req.targets[0].group = target.into();
        assert_eq!(verdict(&mut c, &req), want, "{name}");
    }
    // The fallback placement says why.
    let mut e = node_in("e1", &["e"]);
    e.requested.memory_bytes = e.allocatable.memory_bytes;
    let mut c = cluster(vec![e, node_in("n", &["c"]), node("loose")], vec![edge, cloud]);
    c.book("loose", &res(0, 8 * GI));
    let d = schedule(&mut c, &request("web", &fallback, 1));
    assert_eq!(d.create.len(), 1);
    assert!(
        d.create[0].reason.starts_with("fallback: no edge node fits (2 insufficient memory); "),
        "{}",
        d.create[0].reason
    );
}
