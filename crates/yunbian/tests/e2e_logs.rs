//! `logs`: following an app's output live, and the tail of one instance.

mod harness;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{eventually, s, App, Cluster, Guard, WAIT};

/// Prints `n=<counter> <instance>` every 0.2 s.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"n=$i $INSTANCE_NAME\"; sleep 0.2; done";

/// `(counter, instance)` of a line `[...] n=<i> <instance>` or `n=<i> <instance>`.
fn parse(line: &str) -> Option<(u64, String)> {
    let rest = match line.strip_prefix('[') {
        Some(r) => r.split_once("] ")?.1,
        None => line,
    };
    let (n, inst) = rest.strip_prefix("n=")?.split_once(' ')?;
    Some((n.parse().ok()?, inst.to_string()))
}

#[test]
fn follow_shows_new_lines() {
    let mut c = Cluster::start("logs-follow");
    c.join("edge-1");
    c.apply(&App::new("counter").replicas(1).shell(COUNTER).yaml());
    let inst = c.wait_running("counter", 1).remove(0);
    let name = s(&inst, "/metadata/name").to_string();

    // Some history first, so a tail that is not honoured would show.
    let n0 = eventually(WAIT, "at least 6 lines of output", || {
        let o = c.cli(&["logs", "app/counter", "--tail", "1"]);
        match o.stdout.lines().last().and_then(parse) {
            Some((n, _)) if o.success() && n >= 6 => Ok(n),
            _ => Err(format!("{o:?}")),
        }
    });

    let mut cmd = c.cli_command(&["logs", "app/counter", "--follow", "--tail", "1"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = Guard(cmd.spawn().expect("spawn logs --follow"));
    let child = &mut guard.0;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // At most one line of history; everything past that arrived while
    // following. Wait for five, in order, without gaps.
    let mut got: Vec<String> = Vec::new();
    let t0 = Instant::now();
    while got.len() < 5 {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("logs --follow exited ({st}) after {got:?}");
        }
        if t0.elapsed() >= WAIT {
            panic!("gave up waiting for 5 followed lines after {WAIT:?}; got {got:?}");
        }
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            got.push(l);
        }
    }
    // Deleting the app ends the stream: the follower exits by itself.
    c.delete_app("counter");
    let exited = eventually(WAIT, "logs --follow to end after the app was deleted", || match child.try_wait() {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err("still following".into()),
        Err(e) => Err(e.to_string()),
    });
    drop(guard);
    let _ = reader.join();
    assert!(exited.success(), "logs --follow failed: {exited}");

    let parsed: Vec<(u64, String)> =
        got.iter().map(|l| parse(l).unwrap_or_else(|| panic!("unexpected line {l:?} in {got:?}"))).collect();
    assert!(got.iter().all(|l| l.starts_with(&format!("[{name}] "))), "app lines are prefixed: {got:?}");
    assert!(parsed.iter().all(|(_, i)| *i == name), "{got:?}");
    for w in parsed.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "lines out of order or missing: {got:?}");
    }
    // One line of history at most: the rest was written after we started.
    assert!(parsed[0].0 >= n0, "--tail 1 showed older lines (n0={n0}): {got:?}");
}

#[test]
fn instance_tail_is_bounded() {
    let mut c = Cluster::start("logs-tail");
    c.join("edge-1");
    c.apply(&App::new("counter").replicas(1).shell(COUNTER).yaml());
    let inst = c.wait_running("counter", 1).remove(0);
    let name = s(&inst, "/metadata/name").to_string();
    let target = format!("instance/{name}");

    // Wait until the instance has written more than three lines.
    eventually(WAIT, "at least 6 lines of output", || {
        let o = c.cli(&["logs", &target, "--tail", "1"]);
        let last = o.stdout.lines().last().and_then(parse);
        match last {
            Some((n, _)) if o.success() && n >= 6 => Ok(()),
            _ => Err(format!("{o:?}")),
        }
    });
    let o = c.cli(&["logs", &target, "--tail", "3"]);
    let lines: Vec<&str> = o.ok().lines().collect();
    assert!(!lines.is_empty() && lines.len() <= 3, "expected at most 3 lines: {o:?}");
    // With six or more written, the tail is exactly the last three, unprefixed.
    assert_eq!(lines.len(), 3, "{o:?}");
    let parsed: Vec<(u64, String)> =
        lines.iter().map(|l| parse(l).unwrap_or_else(|| panic!("unexpected line {l:?}: {o:?}"))).collect();
    assert!(lines.iter().all(|l| l.starts_with("n=")), "instance lines have no prefix: {o:?}");
    assert!(parsed.iter().all(|(n, i)| *i == name && *n >= 4), "{o:?}");
    for w in parsed.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "{o:?}");
    }

    // With the node offline there is nobody to ask: a clear error.
    c.kill_edge("edge-1");
    c.wait_node_phase("edge-1", "NotReady");
    let o = c.cli(&["logs", &target, "--tail", "3"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert_eq!(o.error_lines(), vec!["error: node edge-1 is not connected"], "{o:?}");
    c.start_edge("edge-1");
    c.wait_node_ready("edge-1");
    eventually(WAIT, "logs once the node is back", || {
        let o = c.cli(&["logs", &target, "--tail", "1"]);
        if o.success() && o.stdout.starts_with("n=") {
            Ok(())
        } else {
            Err(format!("{o:?}"))
        }
    });

    c.delete_app("counter");
}
