//! Latency measurement and peer health with real agents
//! (docs/design/018-latency-and-peer-health.md). Three nodes in one
//! NodeGroup probe each other through their mTLS peer servers:
//!
//! - a delay injected in front of one node's peer server shows in the
//!   latency matrix for every peer's probes of that node, and only there;
//! - a delay injected on a node's cloud link shows as its RTT in
//!   `get nodes -o wide`, and `top nodes` shows it too;
//! - a node that loses only its cloud link, while its group peers still
//!   reach it, becomes CloudUnreachable (never NotReady: no recorded
//!   failure) and Ready again when the link heals; a killed node becomes
//!   NotReady, with the failure recorded.

mod harness;

use std::time::Duration;

use harness::{eventually, s, Cluster, EdgeSetup};
use serde_json::Value;
use yunbian_faults::LinkConditions;

const GROUP: &str = "apiVersion: yunbian.io/v1\nkind: NodeGroup\nmetadata: {name: site-a}\n\
                     spec: {selector: {site: a}, site: a, region: east, zone: east-1}\n";

/// Long enough for the agents to get their targets and the averages to
/// settle, on a loaded machine.
const SETTLE: Duration = Duration::from_secs(90);

fn delay(ms: u64) -> LinkConditions {
    LinkConditions { delay: Duration::from_millis(ms), ..LinkConditions::PERFECT }
}

/// `get latency -o json`.
fn matrix(c: &Cluster, args: &[&str]) -> Result<Value, String> {
    let mut a = vec!["get", "latency", "-o", "json"];
    a.extend_from_slice(args);
    let out = c.cli(&a);
    if !out.success() {
        return Err(out.stderr.clone());
    }
    serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))
}

fn rtt(m: &Value, from: &str, to: &str) -> Option<f64> {
    m.pointer(&format!("/nodes/{from}/{to}/rttMs")).and_then(Value::as_f64)
}

/// The value of `column` in `node`'s row of a table printed by the CLI.
fn cell(table: &str, node: &str, column: &str) -> Option<String> {
    let mut lines = table.lines();
    let at = lines.next()?.split_whitespace().position(|h| h == column)?;
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&node))?
        .get(at)
        .map(|c| c.to_string())
}

fn millis(cell: &str) -> Option<f64> {
    cell.strip_suffix("ms")?.parse().ok()
}

#[test]
fn a_delay_in_front_of_one_node_shows_in_the_matrix_for_its_pairs() {
    let mut c = Cluster::start("latency-matrix");
    c.apply(GROUP);
    c.join("n1");
    c.join("n2");
    c.join_with("n3", EdgeSetup::new().via_peer_link());
    // 150 ms each way in front of n3's peer server: ~300 ms round trips.
    c.peer_link("n3").set_conditions(delay(150));
    let m = eventually(SETTLE, "the matrix to show n3 behind its delay", || {
        let m = matrix(&c, &[])?;
        let slow = [rtt(&m, "n1", "n3"), rtt(&m, "n2", "n3")];
        let fast = [rtt(&m, "n1", "n2"), rtt(&m, "n2", "n1")];
        match (slow, fast) {
            ([Some(a), Some(b)], [Some(x), Some(y)]) if a > 250.0 && b > 250.0 && x < 100.0 && y < 100.0 => Ok(m),
            _ => Err(m.to_string()),
        }
    });
    // The proxy is in front of n3's server only: n3's own probes of the
    // others do not pass it (the matrix is directional).
    eventually(SETTLE, "n3's own probes, without the delay", || {
        let m = matrix(&c, &[])?;
        rtt(&m, "n3", "n1").filter(|r| *r < 100.0).ok_or(m.to_string())
    });
    assert!(m.pointer("/cloud/n1/rttMs").is_some(), "every node reports its cloud path: {m}");
    // Filtered to one node: its row and its column only.
    let only = matrix(&c, &["--node", "n1"]).expect("get latency --node n1");
    assert!(only.pointer("/nodes/n2/n3").is_none(), "{only}");
    assert!(rtt(&only, "n2", "n1").is_some() && rtt(&only, "n1", "n3").is_some(), "{only}");
    // The table.
    let out = c.cli(&["get", "latency"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.starts_with("FROM"), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l.starts_with("n1") && l.contains("cloud")), "{}", out.stdout);
    // The group's members and capacity.
    let groups = c.cli(&["get", "nodegroups"]);
    assert_eq!(cell(&groups.stdout, "site-a", "NODES").as_deref(), Some("3/3"), "{}", groups.stdout);
    assert_eq!(cell(&groups.stdout, "site-a", "REGION").as_deref(), Some("east"), "{}", groups.stdout);
}

#[test]
fn a_delay_on_the_cloud_link_shows_as_the_node_rtt() {
    let mut c = Cluster::start("latency-cloud");
    c.join_with("n1", EdgeSetup::new().via_link());
    c.join("n2");
    c.link("n1").set_conditions(delay(100));
    let wide = eventually(SETTLE, "get nodes -o wide to show n1's delayed RTT", || {
        let out = c.cli(&["get", "nodes", "-o", "wide"]);
        let n1 = cell(&out.stdout, "n1", "RTT").and_then(|r| millis(&r));
        let n2 = cell(&out.stdout, "n2", "RTT").and_then(|r| millis(&r));
        match (n1, n2) {
            (Some(a), Some(b)) if a > 150.0 && b < 100.0 => Ok(out.stdout),
            _ => Err(out.stdout),
        }
    });
    let top = c.cli(&["top", "nodes"]);
    assert!(top.success(), "{}", top.stderr);
    assert!(top.stdout.starts_with("NAME"), "{}", top.stdout);
    let top_rtt = cell(&top.stdout, "n1", "RTT").and_then(|r| millis(&r));
    assert!(top_rtt.is_some_and(|r| r > 100.0), "{}\n{wide}", top.stdout);
    assert_eq!(cell(&top.stdout, "n2", "INSTANCES").as_deref(), Some("0"), "{}", top.stdout);
}

#[test]
fn a_node_its_peers_reach_is_cloud_unreachable_and_a_dead_one_not_ready() {
    // Peers must see n3 alive after its next heartbeat was due, then say
    // so in a heartbeat (docs/design/018): about 6.5 s at worst with 2 s
    // probes and 1 s heartbeats and ticks, so a 15 s grace leaves a loaded
    // machine room before n3 would be NotReady instead.
    let mut c = Cluster::builder("latency-health").grace("15s").start();
    c.apply(GROUP);
    c.join("n1");
    c.join("n2");
    c.join_with("n3", EdgeSetup::new().via_link());
    // The peers probe n3 before its cloud link goes.
    eventually(SETTLE, "n1 and n2 to reach n3", || {
        let m = matrix(&c, &[])?;
        match (rtt(&m, "n1", "n3"), rtt(&m, "n2", "n3")) {
            (Some(_), Some(_)) => Ok(()),
            _ => Err(m.to_string()),
        }
    });
    let ready = c.node("n3").expect("n3");
    assert!(!s(&ready, "/status/readySince").is_empty(), "{ready}");
    c.link("n3").cut();
    let n3 = c.wait_node_phase("n3", "CloudUnreachable");
    let reason = s(&n3, "/status/reason");
    assert!(reason.contains("of 2 group peers reach it"), "{reason}");
    // It never went through NotReady.
    assert!(n3.pointer("/status/recentFailures").is_none(), "{n3}");
    c.link("n3").heal().expect("heal");
    let n3 = c.wait_node_phase("n3", "Ready");
    assert!(n3.pointer("/status/recentFailures").is_none(), "{n3}");
    // A dead node: its peers stop reaching it too.
    c.kill_edge("n3");
    let n3 = c.wait_node_phase("n3", "NotReady");
    let failures = n3.pointer("/status/recentFailures").and_then(Value::as_array).map_or(0, Vec::len);
    assert_eq!(failures, 1, "{n3}");
}
