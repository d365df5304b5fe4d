//! Joining nodes: the happy path and every way a join token can be wrong.

mod harness;

use harness::{eventually, s, u, Cluster, Out, WAIT};

#[test]
fn joined_node_becomes_ready_with_node_info() {
    let mut c = Cluster::start("join-ok");
    let node = c.join("edge-1");
    assert_eq!(s(&node, "/status/phase"), "Ready");
    assert_eq!(s(&node, "/metadata/labels/site"), "a", "{node}");
    assert_eq!(s(&node, "/status/info/os"), std::env::consts::OS, "{node}");
    assert!(u(&node, "/status/info/cpus").is_some_and(|n| n > 0), "cpus: {node}");
    assert!(u(&node, "/status/info/memoryBytes").is_some_and(|n| n > 0), "memory: {node}");
    assert!(!s(&node, "/status/certificateExpiry").is_empty(), "{node}");
    // The table shows it too.
    let table = c.cli(&["get", "nodes"]);
    let row = table.ok().lines().find(|l| l.starts_with("edge-1 ")).unwrap_or_else(|| panic!("{table:?}"));
    assert!(row.contains("Ready"), "{row}");
    // The token counted the join.
    let tokens = c.list("tokens");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(u(&tokens[0], "/status/joins"), Some(1), "{}", tokens[0]);
    assert!(c.cloud_log().contains("node joined"), "cloud log: {}", c.cloud_log());
    c.assert_edge_running("edge-1");
}

/// `edge join` failed with exactly one `error:` line containing `why`.
#[track_caller]
fn assert_refused(o: &Out, why: &str) {
    assert_ne!(o.code, 0, "join should fail: {o:?}");
    assert_ne!(o.code, -1, "join did not exit by itself: {o:?}");
    let errors = o.error_lines();
    assert_eq!(errors.len(), 1, "expected exactly one error line: {o:?}");
    assert!(errors[0].contains(why), "error line should say {why:?}: {o:?}");
}

/// Only the given nodes exist.
#[track_caller]
fn assert_nodes(c: &Cluster, want: &[&str]) {
    let mut names: Vec<String> = c.nodes().iter().map(|n| s(n, "/metadata/name").to_string()).collect();
    names.sort();
    assert_eq!(names, want, "nodes");
}

/// Waits until the cloud has logged `n` rejected joins, the last one
/// mentioning `why`.
#[track_caller]
fn assert_rejections(c: &Cluster, n: usize, why: &str) {
    eventually(WAIT, &format!("{n} `join rejected` lines in the cloud log"), || {
        let log = c.cloud_log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("join rejected")).collect();
        match lines.last() {
            Some(last) if lines.len() == n && last.contains(why) => Ok(()),
            _ => Err(format!("{lines:?}")),
        }
    });
}

#[test]
fn bad_tokens_are_refused() {
    let mut c = Cluster::start("join-bad");
    let good = c.token("1h");
    // YB1.<cahash>.<id>.<secret>
    let parts: Vec<&str> = good.split('.').collect();
    assert_eq!(parts.len(), 4, "{good}");
    let (ca_hash, id, secret) = (parts[1], parts[2], parts[3]);

    // Garbage: refused before anything is sent.
    let o = c.join_expect_exit("n-garbage", "garbage");
    assert_refused(&o, "malformed join token");
    assert_nodes(&c, &[]);

    // A CA hash that is not this cloud's: refused by the node itself.
    let other_ca = format!("YB1.{}.{id}.{secret}", "0".repeat(ca_hash.len()));
    let o = c.join_expect_exit("n-otherca", &other_ca);
    assert_refused(&o, "does not match the join token");
    assert_nodes(&c, &[]);

    // Well-formed, wrong secret.
    let flipped: String = secret.chars().map(|ch| if ch == '0' { '1' } else { '0' }).collect();
    let o = c.join_expect_exit("n-secret", &format!("YB1.{ca_hash}.{id}.{flipped}"));
    assert_refused(&o, "invalid secret");
    assert_rejections(&c, 1, "invalid secret");
    assert_nodes(&c, &[]);

    // Well-formed, unknown token id.
    let o = c.join_expect_exit("n-unknown", &format!("YB1.{ca_hash}.ffffff.{secret}"));
    assert_refused(&o, "join refused");
    assert_rejections(&c, 2, "join rejected");
    assert_nodes(&c, &[]);

    // Revoked.
    c.cli(&["token", "revoke", id]).ok();
    let o = c.join_expect_exit("n-revoked", &good);
    assert_refused(&o, "revoked");
    assert_rejections(&c, 3, "revoked");
    assert_nodes(&c, &[]);

    // Expired.
    let short = c.token("1s");
    std::thread::sleep(std::time::Duration::from_secs(2)); // let it expire
    let o = c.join_expect_exit("n-expired", &short);
    assert_refused(&o, "expired");
    assert_rejections(&c, 4, "expired");
    assert_nodes(&c, &[]);

    // None of the refused joins left an identity behind.
    for e in std::fs::read_dir(&c.dir).expect("test dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("refused-") {
            assert!(!e.path().join("node.yaml").exists(), "{} holds an identity", e.path().display());
            assert!(!e.path().join("node.crt").exists(), "{} holds a certificate", e.path().display());
        }
    }

    // A name already taken.
    c.join("edge-1");
    let fresh = c.token("1h");
    let o = c.join_expect_exit("edge-1", &fresh);
    assert_refused(&o, "already taken");
    assert_rejections(&c, 5, "already taken");
    assert_nodes(&c, &["edge-1"]);
    // The original is unaffected.
    c.wait_node_ready("edge-1");
    c.assert_edge_running("edge-1");
}

#[test]
fn join_arguments_are_checked_locally() {
    let mut c = Cluster::start("join-local");
    let token = c.token("1h");
    // A name that is not a DNS label.
    let o = c.join_expect_exit("Bad_Name", &token);
    assert_refused(&o, "node name");
    // A data directory that already holds a joined node.
    c.join("edge-1");
    let dir = c.edge("edge-1").dir.clone();
    let url = c.url.clone();
    let o = harness::yunbian(&[
        "edge",
        "join",
        "--cloud",
        &url,
        "--token",
        &token,
        "--name",
        "edge-2",
        "--data-dir",
        &dir.to_string_lossy(),
        "--no-run",
    ]);
    assert_refused(&o, "already holds a joined node");
    assert_nodes(&c, &["edge-1"]);
    // A cloud that is not there.
    let port = harness::free_port();
    let nowhere = format!("https://127.0.0.1:{port}");
    let o = harness::yunbian(&[
        "edge",
        "join",
        "--cloud",
        &nowhere,
        "--token",
        &token,
        "--name",
        "edge-3",
        "--data-dir",
        &c.dir.join("nowhere").to_string_lossy(),
    ]);
    assert_refused(&o, "cannot reach cloud at");
    assert!(!c.dir.join("nowhere").join("node.yaml").exists());
    // None of these reached the cloud as a join attempt.
    assert!(!c.cloud_log().contains("join rejected"), "{}", c.cloud_log());
}

/// Kills a process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node deleted by the admin and joined again by another machine under
/// the same name: the old machine's certificate (still valid, same CN) no
/// longer gets in; the new machine does.
#[test]
fn old_certificate_is_refused_after_the_name_joins_again() {
    let mut c = Cluster::start("join-rejoin");
    c.join("edge-1");
    let old_fp = s(&c.node("edge-1").expect("node"), "/status/certificateFingerprint").to_string();
    assert_eq!(old_fp.len(), 64, "the join pinned the certificate");

    let o = c.cli(&["delete", "node", "edge-1"]);
    assert_eq!(o.code, 0, "{o:?}");
    // The old agent keeps running and retrying with its old certificate.
    let token = c.token("1h");
    let dir = c.dir.join("second-machine");
    let log = std::fs::File::create(c.dir.join("second-machine.log")).expect("log");
    let child = std::process::Command::new(harness::BIN)
        .args(["edge", "join", "--cloud", &c.url, "--token", &token, "--name", "edge-1", "--data-dir"])
        .arg(&dir)
        .args(harness::EDGE_RUN_ARGS)
        .env("YUNBIAN_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn second machine");
    let _second = KillOnDrop(child);
    let node = c.wait_node_ready("edge-1");
    let new_fp = s(&node, "/status/certificateFingerprint").to_string();
    assert_ne!(new_fp, old_fp);
    eventually(WAIT, "the old certificate refused by the hub", || {
        let log = c.cloud_log();
        if log.contains("no longer valid for node edge-1") {
            Ok(())
        } else {
            Err("no refusal logged yet".into())
        }
    });
    // The name still belongs to the second machine.
    let node = c.node("edge-1").expect("node");
    assert_eq!(s(&node, "/status/certificateFingerprint"), new_fp);
    assert_eq!(s(&node, "/status/phase"), "Ready");
}
