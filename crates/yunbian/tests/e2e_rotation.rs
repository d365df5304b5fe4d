//! Node certificates are renewed before they expire, and the node keeps
//! working with the new one.

mod harness;

use std::time::Duration;

use harness::{eventually, s, App, Cluster};

#[test]
fn node_certificate_is_renewed() {
    let mut c = Cluster::builder("rotation").node_cert_ttl("20s").start();
    let node = c.join("edge-1");
    let expiry0 = s(&node, "/status/certificateExpiry").to_string();
    assert!(!expiry0.is_empty(), "{node}");
    let crt = c.edge("edge-1").dir.join("node.crt");
    let pem0 = std::fs::read_to_string(&crt).expect("node.crt after join");

    // Renewal is due at 80% of 20 s.
    eventually(Duration::from_secs(60), "the cloud to renew edge-1's certificate", || {
        let log = c.cloud_log();
        if log.lines().any(|l| l.contains("node certificate renewed") && l.contains("edge-1")) {
            Ok(())
        } else {
            Err(format!("cloud log:\n{log}"))
        }
    });

    // The agent stores the new certificate and reconnects with it.
    eventually(Duration::from_secs(60), "a new node.crt on disk", || {
        let pem = std::fs::read_to_string(&crt).map_err(|e| e.to_string())?;
        if pem != pem0 && pem.contains("BEGIN CERTIFICATE") {
            Ok(())
        } else {
            Err("node.crt unchanged".into())
        }
    });
    eventually(Duration::from_secs(60), "edge-1 to reconnect after the renewal", || {
        let log = c.cloud_log();
        let lines: Vec<&str> = log.lines().collect();
        let renewal = lines.iter().position(|l| l.contains("node certificate renewed")).ok_or("no renewal")?;
        if lines[renewal..].iter().any(|l| l.contains("edge connected") && l.contains("edge-1")) {
            Ok(())
        } else {
            Err(format!("cloud log:\n{log}"))
        }
    });
    let node = eventually(Duration::from_secs(60), "edge-1 Ready with the new certificate", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" && s(&n, "/status/certificateExpiry") > expiry0.as_str() {
            Ok(n)
        } else {
            Err(format!("expiry before {expiry0}; now {}", n["status"]))
        }
    });
    assert_eq!(s(&node, "/status/phase"), "Ready");
    let edge_log = c.edge_log("edge-1");
    assert!(edge_log.contains("certificate renewed"), "{edge_log}");
    assert!(!edge_log.contains("certificate renewal failed"), "{edge_log}");
    c.assert_edge_running("edge-1");

    // The renewed certificate on disk is what a restarted agent uses.
    c.kill_edge("edge-1");
    c.wait_node_phase("edge-1", "NotReady");
    let connects = |c: &Cluster| c.cloud_log().lines().filter(|l| l.contains("edge connected")).count();
    let before = connects(&c);
    c.start_edge("edge-1");
    eventually(Duration::from_secs(60), "the restarted agent to connect with the renewed certificate", || {
        if connects(&c) > before {
            Ok(())
        } else {
            Err(c.edge_log_current("edge-1"))
        }
    });
    c.wait_node_ready("edge-1");

    // Work still flows over the session that uses the new certificate.
    c.apply(&App::new("after-rotation").replicas(1).yaml());
    c.wait_running("after-rotation", 1);
    c.delete_app("after-rotation");
}
