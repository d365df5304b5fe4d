//! Global placement end to end, through the `yunbian` binary with a real
//! cloud and several real agents on this machine: per-group deployment with
//! overrides, `everyNode` with a node joining later, the cost policy, cloud
//! fallback and the return to the edge, and failover of a node that dies
//! (measured) next to one that only lost the cloud.

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::{eventually, pid_alive, proc_env, s, summary, u, Cluster, EdgeSetup};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn group(name: &str, site: &str, extra: Value) -> String {
    let mut spec = json!({"selector": {"site": site}, "site": site});
    if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    json!({"apiVersion": "yunbian.io/v1", "kind": "NodeGroup", "metadata": {"name": name}, "spec": spec}).to_string()
}

/// An App whose process sleeps and reports `SITE`; `spec` is merged in.
fn app(name: &str, spec: Value) -> String {
    let mut base = json!({
        "replicas": 1,
        "runtime": "process",
        "process": {"command": ["/bin/sh", "-c", "while true; do sleep 1; done"], "env": {"SITE": "default"}},
        "restartPolicy": "Always",
    });
    if let (Some(o), Some(e)) = (base.as_object_mut(), spec.as_object()) {
        o.extend(e.clone());
    }
    json!({"apiVersion": "yunbian.io/v1", "kind": "App", "metadata": {"name": name}, "spec": base}).to_string()
}

/// Running instances of `app` (live pid): node → env `SITE` of each.
fn running_sites(c: &Cluster, app: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let items = c.instances_of(app)?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in &items {
        let Some(pid) = u(i, "/status/pid").filter(|p| s(i, "/status/phase") == "Running" && pid_alive(*p as u32))
        else {
            return Err(format!("not all Running: {}", summary(&items)));
        };
        let site = proc_env(pid as u32, "SITE").unwrap_or_default();
        out.entry(s(i, "/spec/node").to_string()).or_default().push(site);
    }
    Ok(out)
}

fn nodes_of(c: &Cluster, app: &str) -> Vec<String> {
    let mut v: Vec<String> =
        c.instances_of(app).unwrap_or_default().iter().map(|i| s(i, "/spec/node").to_string()).collect();
    v.sort();
    v
}

#[test]
fn per_group_overrides_and_every_node_with_a_late_join() {
    let mut c = Cluster::start("placement-groups");
    for (n, site) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        c.join_with(n, EdgeSetup::new().labels(&format!("site={site}")));
    }
    c.apply(&group("ga", "a", json!({"region": "east", "zone": "east-1"})));
    c.apply(&group("gb", "b", json!({"region": "west", "zone": "west-1"})));

    // One instance per site; site b runs two, with its own environment.
    c.apply(&app(
        "pg",
        json!({"placement": {
            "groups": ["ga", "gb"],
            "perGroup": {"replicas": 1},
            "overrides": [{"group": "gb", "replicas": 2, "env": {"SITE": "b"}}],
        }}),
    ));
    let sites = eventually(WAIT, "pg: 1 instance in ga, 2 in gb with the override", || {
        let m = running_sites(&c, "pg")?;
        let in_a: Vec<&String> = m.iter().filter(|(n, _)| n.starts_with('a')).flat_map(|(_, v)| v).collect();
        let in_b: Vec<&String> = m.iter().filter(|(n, _)| n.starts_with('b')).flat_map(|(_, v)| v).collect();
        if in_a == ["default"] && in_b == ["b", "b"] {
            Ok(m)
        } else {
            Err(format!("{m:?}"))
        }
    });
    println!("[placement] per group: {sites:?}");
    // Every instance is explained.
    let a = c.app("pg").expect("app");
    let placements = a.pointer("/status/placements").and_then(Value::as_array).cloned().unwrap_or_default();
    assert_eq!(placements.len(), 3, "{a}");
    assert!(placements.iter().all(|p| !s(p, "/reason").is_empty() && !s(p, "/group").is_empty()), "{a}");
    let describe = c.cli(&["describe", "app", "pg"]);
    assert!(describe.ok().contains("gb"), "{}", describe.ok());

    // everyNode over group ga: both members, then a member that joins later.
    c.apply(&app("agent-a", json!({"placement": {"groups": ["ga"], "mode": "everyNode"}})));
    eventually(WAIT, "agent-a on a1 and a2", || {
        let m = running_sites(&c, "agent-a")?;
        (m.keys().cloned().collect::<Vec<_>>() == ["a1", "a2"]).then_some(()).ok_or(format!("{m:?}"))
    });
    c.join_with("a3", EdgeSetup::new().labels("site=a"));
    eventually(WAIT, "agent-a also on a3", || {
        let m = running_sites(&c, "agent-a")?;
        (m.keys().cloned().collect::<Vec<_>>() == ["a1", "a2", "a3"]).then_some(()).ok_or(format!("{m:?}"))
    });
    // Nothing moved for the group app meanwhile (a stable cluster does not churn).
    let after = running_sites(&c, "pg").expect("pg still running");
    assert_eq!(after, sites, "pg moved although nothing it depends on changed");

    // NodeGroups report members and capacity.
    let g = eventually(WAIT, "group ga to list a1, a2 and a3", || {
        let g = c.get("nodegroup", "ga").ok_or("no group")?;
        let members: Vec<&str> = g
            .pointer("/status/members")
            .and_then(Value::as_array)
            .map_or(vec![], |m| m.iter().filter_map(Value::as_str).collect());
        (members == ["a1", "a2", "a3"]).then_some(g.clone()).ok_or(format!("{g}"))
    });
    assert!(u(&g, "/status/requested/cpuMillis").is_some(), "{g}");
    assert!(u(&g, "/status/allocatable/cpuMillis").is_some_and(|c| c > 0), "{g}");
}

#[test]
fn cost_policy_prefers_the_cheap_group_and_explains_rejections() {
    let mut c = Cluster::start("placement-cost");
    for (n, site) in [("c1", "cheap"), ("c2", "cheap"), ("d1", "dear"), ("d2", "dear")] {
        c.join_with(n, EdgeSetup::new().labels(&format!("site={site}")));
    }
    c.apply(&group("cheap", "cheap", json!({"costPerCpuHour": 0.01})));
    c.apply(&group("dear", "dear", json!({"costPerCpuHour": 0.10})));
    c.apply(&app(
        "batch",
        json!({"replicas": 2, "resources": {"requests": {"cpu": "100m"}}, "placement": {"policy": "cost"}}),
    ));
    eventually(WAIT, "batch on the cheap nodes", || {
        let m = running_sites(&c, "batch")?;
        let nodes: Vec<&String> = m.keys().collect();
        (m.values().map(Vec::len).sum::<usize>() == 2 && nodes.iter().all(|n| n.starts_with('c')))
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
    let a = c.app("batch").expect("app");
    let reasons: Vec<&str> = a
        .pointer("/status/placements")
        .and_then(Value::as_array)
        .map_or(vec![], |v| v.iter().map(|p| s(p, "/reason")).collect());
    assert!(reasons.iter().all(|r| r.contains("cheap")), "{reasons:?}");

    // An App that fits nowhere says why, node by node.
    c.apply(&app("huge", json!({"resources": {"requests": {"memory": "10000Gi"}}})));
    let a = eventually(WAIT, "huge to report why it is unplaced", || {
        let a = c.app("huge").ok_or("no app")?;
        let rej = a.pointer("/status/rejections").and_then(Value::as_array).cloned().unwrap_or_default();
        (rej.len() == 4).then_some(a.clone()).ok_or(format!("{a}"))
    });
    let rej = a.pointer("/status/rejections").and_then(Value::as_array).cloned().unwrap_or_default();
    assert!(rej.iter().all(|r| s(r, "/reason").starts_with("insufficient memory (requests 9.8Ti, free ")), "{a}");
    assert!(s(&a, "/status/message").contains("0/4 nodes available"), "{a}");
    let describe = c.cli(&["describe", "app", "huge"]);
    assert!(describe.ok().contains("insufficient memory"), "{}", describe.ok());
}

#[test]
fn fallback_to_the_cloud_tier_and_back_without_dropping_below_the_available_replicas() {
    let mut c = Cluster::builder("placement-fallback").heartbeat("1s").grace("3s").start();
    c.join_with("e1", EdgeSetup::new().labels("site=edge").heartbeat("1s"));
    c.join_with("k1", EdgeSetup::new().labels("site=cloud").heartbeat("1s"));
    c.apply(&group("edge", "edge", json!({})));
    c.apply(&group("cloud", "cloud", json!({"tier": "cloud"})));
    c.apply(&app("svc", json!({"placement": {"fallback": "cloud"}, "onNodeLost": {"after": "3s"}})));
    eventually(WAIT, "svc on the edge node", || {
        let n = nodes_of(&c, "svc");
        (n == ["e1"] && running_sites(&c, "svc").is_ok()).then_some(()).ok_or(format!("{n:?}"))
    });

    // The edge node dies: the instance goes to the cloud tier.
    c.reboot_edge("e1");
    eventually(WAIT, "svc to fall back to k1", || {
        let m = running_sites(&c, "svc")?;
        (m.keys().cloned().collect::<Vec<_>>() == ["k1"]).then_some(()).ok_or(format!("{m:?}"))
    });
    let a = c.app("svc").expect("app");
    let reason = a.pointer("/status/placements/0/reason").and_then(Value::as_str).unwrap_or_default().to_string();
    assert!(reason.contains("fallback"), "{a}");

    // The edge returns: a new instance starts there first, then the cloud one goes.
    c.start_edge("e1");
    let mut low = Vec::new();
    eventually(WAIT, "svc back on e1 only", || {
        let items = c.instances_of("svc")?;
        let running = items
            .iter()
            .filter(|i| s(i, "/status/phase") == "Running" && u(i, "/status/pid").is_some_and(|p| pid_alive(p as u32)))
            .count();
        if running == 0 {
            low.push(summary(&items));
        }
        let n = nodes_of(&c, "svc");
        (n == ["e1"] && running == 1).then_some(()).ok_or(summary(&items))
    });
    assert!(low.is_empty(), "no instance was Running at some point during the move back: {low:?}");
}

#[test]
fn a_dead_node_fails_over_within_the_target_and_a_cloud_only_loss_does_not() {
    let mut c = Cluster::start("placement-failover");
    for n in ["f1", "f2", "f3"] {
        c.join_with(n, EdgeSetup::new().labels("site=f").via_link());
    }
    c.apply(&group("gf", "f", json!({})));
    c.apply(&app(
        "critical",
        json!({"replicas": 1, "placement": {"groups": ["gf"]}, "onNodeLost": {"action": "reschedule", "after": "10s"}}),
    ));
    let first = eventually(WAIT, "critical Running", || {
        let m = running_sites(&c, "critical")?;
        m.keys().next().cloned().ok_or("none".to_string())
    });

    // Only the cloud link of the node is cut: its peers still see it, so
    // it is CloudUnreachable and the instance stays.
    c.link(&first).cut();
    c.wait_node_phase(&first, "CloudUnreachable");
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(nodes_of(&c, "critical"), vec![first.clone()], "moved although the peers still reach {first}");
    c.link(&first).heal().expect("heal");
    c.wait_node_ready(&first);

    // Real death: the node and its workloads. Measure the time until the
    // replacement is Running elsewhere.
    let t0 = Instant::now();
    c.reboot_edge(&first);
    let to = eventually(WAIT, "critical Running on another node", || {
        let m = running_sites(&c, "critical")?;
        match m.keys().collect::<Vec<_>>().as_slice() {
            [n] if **n != first => Ok((*n).clone()),
            _ => Err(format!("{m:?}")),
        }
    });
    let took = t0.elapsed();
    println!(
        "[failover] {first} died; replacement Running on {to} after {} ms (onNodeLost.after 10s)",
        took.as_millis()
    );

    // Fencing: when the dead node comes back, it runs nothing of the App.
    c.start_edge(&first);
    c.wait_node_ready(&first);
    eventually(WAIT, "one instance, not on the returned node", || {
        let n = nodes_of(&c, "critical");
        (n == [to.clone()]).then_some(()).ok_or(format!("{n:?}"))
    });
}

#[test]
fn latency_policy_chooses_the_near_group_and_rejects_the_far_one() {
    let mut c = Cluster::start("placement-latency");
    // Clients at site c; two candidate sites, the far one behind 150 ms.
    c.join_with("cl1", EdgeSetup::new().labels("site=c"));
    c.join_with("near1", EdgeSetup::new().labels("site=n"));
    c.join_with("far1", EdgeSetup::new().labels("site=f").via_peer_link());
    c.peer_link("far1").set_conditions(yunbian_faults::LinkConditions {
        delay: Duration::from_millis(150),
        ..yunbian_faults::LinkConditions::PERFECT
    });
    c.apply(&group("clients", "c", json!({})));
    c.apply(&group("near", "n", json!({})));
    c.apply(&group("far", "f", json!({})));
    // Wait until the client site has measured both candidates.
    eventually(WAIT, "RTTs from cl1 to near1 and far1", || {
        let out = c.cli(&["get", "latency", "-o", "json"]);
        let m: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))?;
        let rtt = |to: &str| m.pointer(&format!("/nodes/cl1/{to}/rttMs")).and_then(Value::as_f64);
        match (rtt("near1"), rtt("far1")) {
            (Some(n), Some(f)) if f > 100.0 && n < 100.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    c.apply(&app(
        "frontend",
        json!({"placement": {"groups": ["near", "far"], "policy": "latency", "latency": {"fromGroup": "clients", "maxLatencyMs": 100}}}),
    ));
    eventually(WAIT, "frontend on near1", || {
        let m = running_sites(&c, "frontend")?;
        (m.keys().cloned().collect::<Vec<_>>() == ["near1"]).then_some(()).ok_or(format!("{m:?}"))
    });
    let a = c.app("frontend").expect("app");
    let reason = a.pointer("/status/placements/0/reason").and_then(Value::as_str).unwrap_or_default();
    assert!(reason.contains("RTT") && reason.contains("clients"), "{a}");
    // Two replicas: the far group is over maxLatencyMs, so both go near (and the rejection says why).
    c.apply(&app(
        "frontend",
        json!({"replicas": 2, "placement": {"groups": ["near", "far"], "policy": "latency", "latency": {"fromGroup": "clients", "maxLatencyMs": 100}}}),
    ));
    let a = eventually(WAIT, "frontend x2 on near1, far1 rejected for its RTT", || {
        let m = running_sites(&c, "frontend")?;
        let a = c.app("frontend").ok_or("no app")?;
        let rejected = a.pointer("/status/rejections").and_then(Value::as_array).cloned().unwrap_or_default();
        let far = rejected.iter().find(|r| s(r, "/node") == "far1").map(|r| s(r, "/reason").to_string());
        (m.keys().cloned().collect::<Vec<_>>() == ["near1"]
            && m.values().map(Vec::len).sum::<usize>() == 2
            && far.is_some())
        .then_some(a.clone())
        .ok_or(format!("{m:?} {far:?}"))
    });
    println!("[latency] {}", a["status"]["rejections"]);
}
