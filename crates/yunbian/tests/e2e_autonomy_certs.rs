//! A node certificate expires while the node's link is cut. Within the
//! cloud's renewal grace the node renews it by itself when the link heals;
//! past the grace both the agent's log and `yunbian describe node` say what
//! to run, and running exactly that brings the node back with its
//! workloads untouched.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{eventually, pid_alive, run, s, u, unix_now, App, Cluster, EdgeSetup, WAIT};

const RECONNECT_WAIT: Duration = Duration::from_secs(150);
/// Renewal is due at 80 % (24 s): the link is cut well before, even when
/// two of these tests start clusters at once on a loaded machine.
const TTL: &str = "30s";

fn sleeper(name: &str) -> App {
    App::new(name).command(&["/bin/sleep", "1000000"])
}

/// `status.certificateExpiry` of a node as Unix seconds.
fn expiry(node: &serde_json::Value) -> u64 {
    yunbian_api::time::parse_rfc3339(s(node, "/status/certificateExpiry"))
        .unwrap_or_else(|| panic!("no certificate expiry: {node}"))
}

/// Joins edge-1 through a link with an app on it, then cuts the link
/// before the certificate's renewal is due. Returns the node as joined, the
/// workload's pid and node.crt as joined.
fn join_and_cut(c: &mut Cluster) -> (serde_json::Value, u32, String) {
    // Applied first, so it runs as soon as the node is Ready.
    c.apply(&sleeper("keep").yaml());
    let node = c.join_with("edge-1", EdgeSetup::new().via_link());
    let pid = u(&c.wait_running("keep", 1)[0], "/status/pid").expect("pid") as u32;
    c.link("edge-1").cut();
    let crt = std::fs::read_to_string(c.edge("edge-1").dir.join("node.crt")).expect("node.crt");
    let now = c.node("edge-1").expect("node");
    assert_eq!(
        s(&now, "/status/certificateExpiry"),
        s(&node, "/status/certificateExpiry"),
        "renewed before the cut: this machine was too slow for a {TTL} certificate"
    );
    (node, pid, crt)
}

#[test]
fn certificate_that_expired_during_an_outage_is_renewed_on_heal() {
    let mut c = Cluster::builder("certs-grace").node_cert_ttl(TTL).start();
    let (node, pid, crt0) = join_and_cut(&mut c);
    let agent = c.edge_pid("edge-1");
    let not_after = expiry(&node);

    // The cloud sees the node go, then the certificate expire.
    let reason = eventually(Duration::from_secs(90), "the cloud to see the certificate expire", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        let reason = s(&n, "/status/reason").to_string();
        if s(&n, "/status/phase") == "NotReady" && reason.contains("certificate expired at") {
            Ok(reason)
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    assert!(reason.contains("renews it when it reconnects"), "{reason}");
    assert!(unix_now() >= not_after, "expired by the cloud's word but not by the clock");
    std::thread::sleep(Duration::from_secs(2));
    assert!(pid_alive(pid), "the workload stopped with the certificate");

    c.link("edge-1").heal().expect("heal");
    let renewed = eventually(RECONNECT_WAIT, "edge-1 Ready again with a new certificate", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" && expiry(&n) > not_after {
            Ok(n)
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    assert!(s(&renewed, "/status/reason").is_empty(), "{renewed}");
    let crt1 = std::fs::read_to_string(c.edge("edge-1").dir.join("node.crt")).expect("node.crt");
    assert_ne!(crt1, crt0, "node.crt was not replaced");
    let log = c.edge_log("edge-1");
    assert!(log.contains("certificate renewed"), "{log}");
    assert!(!log.contains("yunbian edge join"), "the agent asked for a manual re-join:\n{log}");
    assert!(!c.cloud_log().contains("joined again"), "the node joined again");
    // Nothing manual happened, nothing was restarted.
    c.assert_edge_running("edge-1");
    assert_eq!(c.edge_pid("edge-1"), agent);
    let now = c.wait_running("keep", 1).remove(0);
    assert_eq!(u(&now, "/status/pid"), Some(u64::from(pid)));
    c.apply(&sleeper("after").yaml());
    c.wait_running("after", 1);
}

/// Joins and cuts as [`join_and_cut`] with a 5 s renewal grace, waits
/// until the cloud says the certificate expired longer ago than that, and
/// heals the link. Returns the workload's instance and pid, and the
/// certificate's expiry.
fn expire_past_grace(c: &mut Cluster) -> (serde_json::Value, u32, u64) {
    let (node, pid, _) = join_and_cut(c);
    let keep = c.instances_of("keep").expect("instances").remove(0);
    let not_after = expiry(&node);
    eventually(Duration::from_secs(90), "the cloud to say the certificate expired past the grace", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        let reason = s(&n, "/status/reason");
        if s(&n, "/status/phase") == "NotReady" && reason.contains("longer ago than the renewal grace") {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    assert!(unix_now() >= not_after + 5);
    c.link("edge-1").heal().expect("heal");
    (keep, pid, not_after)
}

#[test]
fn certificate_expired_past_the_grace_says_how_to_rejoin_and_that_works() {
    let mut c = Cluster::builder("certs-past-grace").node_cert_ttl(TTL).node_cert_grace("5s").start();
    let (keep, pid, not_after) = expire_past_grace(&mut c);

    // The cloud: NotReady, with the command to run, in `describe node`.
    let cmd = format!("yunbian edge join --cloud {} --name edge-1 --token <TOKEN> --force", c.url);
    let n = c.node("edge-1").expect("node");
    let reason = s(&n, "/status/reason");
    println!("[certs] reason past the grace: {reason}");
    assert!(reason.contains(&cmd), "{reason}");
    assert!(reason.contains("yunbian token create"), "{reason}");
    let described = c.cli(&["describe", "node", "edge-1"]);
    assert!(described.ok().contains(&cmd), "{described:?}");

    // The agent, back in touch with the cloud, is refused and keeps the
    // workload running; the node stays NotReady.
    eventually(RECONNECT_WAIT, "the agent to be refused for its expired certificate", || {
        let log = c.edge_log("edge-1");
        if log.contains("CertificateExpired") {
            Ok(())
        } else {
            Err(log)
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(pid_alive(pid), "the workload stopped with the certificate");
    c.assert_edge_running("edge-1");
    assert_eq!(s(&c.node("edge-1").expect("node"), "/status/phase"), "NotReady");

    // Do what it says, on the node (with its data directory: not the
    // default one here). This runs the cloud's version of the command; see
    // `agent_past_the_grace_logs_the_rejoin_command` for the agent's.
    c.kill_edge("edge-1");
    let token = c.token("1h");
    let argv: Vec<String> =
        cmd.split_whitespace().skip(1).map(|w| if w == "<TOKEN>" { token.clone() } else { w.to_string() }).collect();
    c.spawn_edge_argv("edge-1", &argv);
    let back = eventually(WAIT, "edge-1 Ready after the re-join", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" && expiry(&n) > not_after {
            Ok(n)
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    assert!(s(&back, "/status/reason").is_empty(), "{back}");
    assert_eq!(c.nodes().len(), 1, "a second node appeared");
    assert!(c.cloud_log().contains("joined again"), "{}", c.cloud_log());
    // The workloads were never touched.
    let now = c.wait_running("keep", 1).remove(0);
    assert_eq!(s(&now, "/metadata/name"), s(&keep, "/metadata/name"));
    assert_eq!(u(&now, "/status/pid"), Some(u64::from(pid)), "{now}");
    assert_eq!(u(&now, "/status/restartCount"), u(&keep, "/status/restartCount"), "{now}");
    c.apply(&sleeper("after").yaml());
    c.wait_running("after", 1);
}

/// The agent's own words past the grace: its log names the re-join
/// command with the URL it uses (its link), and running that brings the node
/// back through the link.
#[test]
fn agent_past_the_grace_logs_the_rejoin_command() {
    let mut c = Cluster::builder("certs-agent-hint").node_cert_ttl(TTL).node_cert_grace("5s").start();
    let (keep, pid, not_after) = expire_past_grace(&mut c);
    let proxy_url = format!("https://{}", c.link("edge-1").addr());
    let edge_dir = c.edge("edge-1").dir.display().to_string();
    let want =
        format!("yunbian edge join --cloud {proxy_url} --name edge-1 --token <TOKEN> --force --data-dir {edge_dir}");
    let hint = eventually(RECONNECT_WAIT, "the agent to log the re-join command", || {
        let log = c.edge_log("edge-1");
        let line = log.lines().find(|l| l.contains("ERROR") && l.contains("yunbian edge join"));
        match line {
            Some(l) => {
                let start = l.find("yunbian edge join").expect("found");
                Ok(l[start..].split('`').next().unwrap_or_default().to_string())
            }
            None => Err(log),
        }
    });
    assert_eq!(hint, want);

    // Running it brings the node back through its link, workloads untouched.
    c.kill_edge("edge-1");
    let token = c.token("1h");
    // The harness adds the data directory itself (the hint names the same one).
    let hint = hint.replace(&format!(" --data-dir {edge_dir}"), "");
    let argv: Vec<String> =
        hint.split_whitespace().skip(1).map(|w| if w == "<TOKEN>" { token.clone() } else { w.to_string() }).collect();
    c.spawn_edge_argv("edge-1", &argv);
    eventually(WAIT, "edge-1 Ready after the re-join", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        if s(&n, "/status/phase") == "Ready" && expiry(&n) > not_after {
            Ok(())
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    let now = c.wait_running("keep", 1).remove(0);
    assert_eq!(s(&now, "/metadata/name"), s(&keep, "/metadata/name"));
    assert_eq!(u(&now, "/status/pid"), Some(u64::from(pid)), "{now}");
}

#[test]
fn past_grace_reason_states_the_grace() {
    let mut c = Cluster::builder("certs-grace-text").node_cert_ttl(TTL).node_cert_grace("5s").start();
    expire_past_grace(&mut c);
    let n = c.node("edge-1").expect("node");
    let reason = s(&n, "/status/reason");
    assert!(!reason.contains("(0d)"), "{reason}");
}

/// `POST /v1/renew` as edge-1 with the certificate and key in `pair_dir`
/// (`node.crt`, `node.key`), for a fresh key made by openssl (written to
/// `pair_dir/new.key`); returns the HTTP status and body.
fn renew_with_curl(c: &Cluster, pair_dir: &Path) -> (String, String) {
    let csr = pair_dir.join("new.csr");
    let mut openssl = Command::new("openssl");
    openssl
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=edge-1", "-keyout"])
        .arg(pair_dir.join("new.key"))
        .arg("-out")
        .arg(&csr);
    let out = run(openssl, Duration::from_secs(30));
    assert!(out.success(), "openssl: {out:?}");
    let body = serde_json::json!({ "csr": std::fs::read_to_string(&csr).expect("csr") }).to_string();
    let mut curl = Command::new("curl");
    // `-q` first: no ~/.curlrc; and no proxy, as the agent uses none.
    curl.args(["-q", "-sS", "--noproxy", "*", "--max-time", "20", "-w", "\n%{http_code}", "--cacert"])
        .arg(c.edge("edge-1").dir.join("ca.crt"))
        .arg("--cert")
        .arg(pair_dir.join("node.crt"))
        .arg("--key")
        .arg(pair_dir.join("node.key"))
        .args(["-H", "content-type: application/json", "--data-binary", &body])
        .arg(format!("{}/v1/renew", c.url.trim_end_matches('/')));
    let out = run(curl, Duration::from_secs(30));
    assert!(out.success(), "curl: {out:?}");
    let (body, code) = out.stdout.rsplit_once('\n').expect("status line");
    (code.to_string(), body.to_string())
}

/// `dir` holding `crt` and the key file `key` as `node.crt`/`node.key`.
fn pair(dir: &Path, crt: &str, key: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("pair dir");
    std::fs::write(dir.join("node.crt"), crt).expect("write node.crt");
    std::fs::copy(key, dir.join("node.key")).expect("copy node.key");
    dir.to_path_buf()
}

/// A renewal the cloud answered but whose answer never reached the node (a
/// cut link, an agent killed mid-request): the cloud has pinned a
/// certificate the node does not hold. The node's old certificate still
/// renews (and nothing else), so the agent, refused by the hub, renews
/// again by itself and comes back Ready with its workloads untouched; then
/// neither the lost certificate nor the old one is good for anything.
#[test]
fn a_renewal_whose_answer_was_lost_is_renewed_again() {
    if !harness::have_tool("curl") || !harness::have_tool("openssl") {
        return;
    }
    let mut c = Cluster::builder("certs-lost-answer").start();
    c.apply(&sleeper("keep").yaml());
    let node = c.join_with("edge-1", EdgeSetup::new());
    let keep = c.wait_running("keep", 1).remove(0);
    let pid = u(&keep, "/status/pid").expect("pid");
    let pinned = s(&node, "/status/certificateFingerprint").to_string();
    assert!(!pinned.is_empty(), "{node}");

    // The agent is down while "its" renewal happens; the answer is dropped.
    c.kill_edge("edge-1");
    let edge = c.edge("edge-1").dir.clone();
    let scratch = c.dir.join("lost-answer");
    let crt0 = std::fs::read_to_string(edge.join("node.crt")).expect("node.crt");
    let old = pair(&scratch.join("old"), &crt0, &edge.join("node.key"));
    let (code, body) = renew_with_curl(&c, &old);
    assert_eq!(code, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("renew answer");
    let lost_crt = answer["certificate"].as_str().expect("certificate").to_string();
    let lost = pair(&scratch.join("lost"), &lost_crt, &old.join("new.key"));
    let n = c.node("edge-1").expect("node");
    assert_ne!(s(&n, "/status/certificateFingerprint"), pinned, "the cloud did not pin the new certificate: {n}");
    assert_eq!(s(&n, "/status/previousCertificateFingerprint"), pinned, "{n}");

    // The agent, with its old certificate, is refused by the hub, renews
    // with the old one and is back.
    c.start_edge("edge-1");
    let back = eventually(WAIT, "edge-1 Ready with a certificate renewed again", || {
        let n = c.node("edge-1").ok_or("node gone")?;
        let fp = s(&n, "/status/certificateFingerprint");
        let previous = n["status"]["previousCertificateFingerprint"].as_str().unwrap_or_default();
        if s(&n, "/status/phase") == "Ready" && fp != pinned && previous.is_empty() {
            Ok(n)
        } else {
            Err(format!("{}", n["status"]))
        }
    });
    let crt1 = std::fs::read_to_string(edge.join("node.crt")).expect("node.crt");
    assert_ne!(crt1, crt0, "the agent did not renew");
    assert_ne!(crt1, lost_crt, "the agent cannot hold the lost certificate");
    let log = c.edge_log("edge-1");
    assert!(log.contains("no longer valid"), "{log}");
    assert!(s(&back, "/status/reason").is_empty(), "{back}");
    let now = c.wait_running("keep", 1).remove(0);
    assert_eq!(u(&now, "/status/pid"), Some(pid), "{now}");

    // Neither the lost certificate nor the old one renews any more.
    for dir in [&lost, &old] {
        let (code, body) = renew_with_curl(&c, dir);
        assert_eq!(code, "403", "{}: {body}", dir.display());
        assert!(body.contains("no longer valid"), "{}: {body}", dir.display());
    }
    assert_eq!(
        s(&c.node("edge-1").expect("node"), "/status/certificateFingerprint"),
        s(&back, "/status/certificateFingerprint")
    );
}
