//! Edge data to the cloud, end to end: a paho-mqtt generator publishes
//! readings to the edge broker, a rule ships them through its `cloud` sink
//! (store-and-forward), and the cloud's store must end up with exactly the
//! generated points — count and checksum — although the link is cut and
//! reset, its acknowledgements lost and the agent SIGKILLed meanwhile; and
//! the cloud must have stored every batch once (its count of points stored
//! equals the edge's count of points acknowledged).

mod harness;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{eventually, free_port, unix_now, Cluster, EdgeSetup, Guard};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use yunbian_faults::{Bandwidth, Direction};

const RULE: &str = r#"apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: ship}
spec:
  source: {mqtt: {topic: "gen/+", jsonPath: v, timestampPath: ts, metric: gen}}
  sinks: [{cloud: {priority: 5}}]
"#;

/// The generator's value of reading `i`, in tenths (see peers/mqtt_generator.py).
fn tenths(i: u64) -> i64 {
    (i * 7919 % 1000) as i64
}

/// SplitMix64, seeded, so a failing schedule can be replayed with
/// `YUNBIAN_FAULT_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// Starts the paho generator: `n` readings at `rate`/s on `topic`, reading
/// i stamped `base + i * period` ms.
fn generator(port: u16, topic: &str, n: u64, rate: u64, base: i64, period: i64) -> Guard {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/mqtt_generator.py");
    let gen = Command::new("python3")
        .args([script, "127.0.0.1", &port.to_string(), topic, &n.to_string(), &rate.to_string()])
        .args([base.to_string(), period.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with paho-mqtt (installed by .ci/run)");
    Guard(gen)
}

/// The counts the generator prints last: `done N reconnects R sent S
/// connects C`, by word.
fn generator_counts(out: &str) -> BTreeMap<String, u64> {
    let line = out.lines().rev().find(|l| l.starts_with("done ")).unwrap_or_else(|| panic!("generator: {out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words.chunks(2).filter_map(|w| Some((w[0].to_string(), w.get(1)?.parse().ok()?))).collect()
}

/// Waits for the generator to finish; returns what it printed.
fn finish(mut gen: Guard) -> String {
    let stdout = gen.0.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    eventually(Duration::from_secs(180), "the generator to finish", || match gen.0.try_wait() {
        Ok(Some(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    reader.join().expect("reader")
}

/// Rule `name` reports running on edge-1.
fn wait_rule(c: &Cluster, name: &str) {
    eventually(Duration::from_secs(60), &format!("rule {name} running on edge-1"), || {
        let r = c.get("rules", name).ok_or("no rule")?;
        r["status"]["nodes"]["edge-1"].is_object().then_some(()).ok_or_else(|| format!("{r}"))
    });
}

/// The points of `gen{topic=…}` in the cloud, by timestamp.
fn cloud_points(c: &Cluster, topic: &str) -> Result<BTreeMap<i64, f64>, String> {
    metric_points(c, "gen", topic)
}

/// The points of `metric{topic=…}` in the cloud, by timestamp.
fn metric_points(c: &Cluster, metric: &str, topic: &str) -> Result<BTreeMap<i64, f64>, String> {
    let sel = format!("{metric}{{topic=\"{topic}\",node=\"edge-1\"}}");
    let o = c.cli(&["query", &sel, "--since", "3h", "-o", "json"]);
    if !o.success() {
        return Err(format!("query: {o:?}"));
    }
    let v: Value = serde_json::from_str(o.ok()).map_err(|e| format!("{e}: {}", o.ok()))?;
    let mut out = BTreeMap::new();
    for s in v["series"].as_array().cloned().unwrap_or_default() {
        for p in s["points"].as_array().cloned().unwrap_or_default() {
            let (Some(t), Some(x)) = (p[0].as_i64(), p[1].as_f64()) else { return Err(format!("bad point {p}")) };
            if out.insert(t, x).is_some() {
                return Err(format!("timestamp {t} twice in the answer"));
            }
        }
    }
    Ok(out)
}

/// Counter `name` in the cloud's `/metrics` (summed over label sets; 0 when
/// absent), read with the admin token of `admin.yaml` over TLS trusting
/// only the cluster CA.
fn cloud_metric(c: &Cluster, name: &str) -> Result<u64, String> {
    use std::io::{Read, Write};
    let text = std::fs::read_to_string(&c.admin).map_err(|e| format!("admin.yaml: {e}"))?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| format!("admin.yaml: {e}"))?;
    let field = |k: &str| v.get(k).and_then(serde_yaml::Value::as_str).unwrap_or_default().to_string();
    let (token, ca) = (field("token"), field("ca"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.map_err(|e| format!("CA PEM: {e}"))?).map_err(|e| format!("add CA: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerName::try_from("127.0.0.1").map_err(|e| format!("server name: {e}"))?.to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(config), server).map_err(|e| format!("TLS: {e}"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], c.port()));
    let sock =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("{addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // HTTP/1.0: the body ends with the connection, never chunked.
    write!(tls, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify: keep what came.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| format!("no header end: {raw}"))?;
    if !head.lines().next().unwrap_or_default().contains(" 200") {
        return Err(format!("GET /metrics: {head}"));
    }
    let mut total = 0u64;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if rest.starts_with(' ') || rest.starts_with('{') {
            let v = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).ok_or(format!("bad line {line}"))?;
            total += v as u64;
        }
    }
    Ok(total)
}

/// Polls `f` every 150 ms until it answers true or `timeout` passes;
/// whether it did.
fn within(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// The faults of the lossless test.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The link blackholed for a while, then healed.
    Cut,
    /// Every connection through the link reset (RST both ways).
    Reset,
    /// The agent SIGKILLed, restarted a moment later.
    Kill,
    /// What the cloud sends stalls (batches are stored, their acks never
    /// arrive), then the connection is reset: the edge must send those
    /// batches again, and the cloud must recognise them.
    AckLoss,
}

const FAULTS: [Fault; 4] = [Fault::Cut, Fault::Reset, Fault::Kill, Fault::AckLoss];

#[test]
fn data_reaches_the_cloud_exactly_once_across_link_cuts_and_agent_kills() {
    let seed = std::env::var("YUNBIAN_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(unix_now);
    eprintln!("fault schedule seed {seed} (replay with YUNBIAN_FAULT_SEED={seed})");
    let mut rng = Rng(seed);

    let mut c = Cluster::start("data-lossless");
    let port = free_port();
    let mqtt = format!("127.0.0.1:{port}");
    c.join_with("edge-1", EdgeSetup::new().via_link().mqtt(&mqtt));
    c.apply(RULE);
    // The rule runs (its status comes back) before the generator starts.
    wait_rule(&c, "ship");

    const N: u64 = 6_000;
    const RATE: u64 = 200;
    const PERIOD_MS: i64 = 10;
    let base = (unix_now() as i64 - 120) * 1000;
    let gen = generator(port, "gen/a", N, RATE, base, PERIOD_MS);

    // Faults while the generator runs (~30 s): one of each kind first, in a
    // random order, then random ones until 24 s have passed.
    let mut forced = FAULTS.to_vec();
    for i in (1..forced.len()).rev() {
        forced.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let start = Instant::now();
    let mut faults = Vec::new();
    // Batches the cloud stored while its acks were stalled: each must come
    // back from the edge and be answered as a duplicate.
    let mut unacked_stored = 0u64;
    let stored_batches = |c: &Cluster| cloud_metric(c, "yunbian_data_batches_stored_total").unwrap_or(0);
    loop {
        let fault = match forced.pop() {
            Some(f) => f,
            None if start.elapsed() < Duration::from_secs(24) => FAULTS[(rng.next() % FAULTS.len() as u64) as usize],
            None => break,
        };
        std::thread::sleep(rng.ms(1_500, 4_000));
        match fault {
            Fault::Cut => {
                let d = rng.ms(1_000, 5_000);
                faults.push(format!("cut {d:?}"));
                c.link("edge-1").cut();
                std::thread::sleep(d);
                c.link("edge-1").heal().expect("heal");
            }
            Fault::Reset => {
                faults.push("reset".into());
                c.link("edge-1").reset();
            }
            Fault::Kill => {
                let d = rng.ms(0, 2_000);
                faults.push(format!("kill, restart after {d:?}"));
                c.kill_edge("edge-1");
                std::thread::sleep(d);
                c.start_edge("edge-1");
            }
            Fault::AckLoss => {
                // Only meaningful on a connection that ships: wait for a
                // batch to be stored first.
                // (Up to 45 s: the agent may still be reconnecting after a
                // kill.)
                let s0 = stored_batches(&c);
                if !within(Duration::from_secs(45), || stored_batches(&c) > s0) {
                    faults.push("ack loss skipped (nothing shipped)".into());
                    continue;
                }
                // A 1 bit/s bucket already in debt: the cloud's next bytes
                // (acks, heartbeats) wait forever, its reads go on. Counted
                // from after the stall is in place, so that no batch whose
                // ack got through is counted.
                let stall = Bandwidth::with_burst(1, 1);
                stall.reserve(tokio::time::Instant::now(), 1 << 20);
                c.link("edge-1").attach(Direction::ToClient, &stall);
                let s1 = stored_batches(&c);
                let d = rng.ms(2_000, 4_000);
                std::thread::sleep(d);
                within(Duration::from_secs(10), || stored_batches(&c) > s1);
                let n = stored_batches(&c) - s1;
                unacked_stored += n;
                faults.push(format!("ack loss {d:?}, {n} batch(es) stored meanwhile"));
                c.link("edge-1").detach_all();
                c.link("edge-1").reset();
            }
        }
    }
    eprintln!("faults: {faults:?}");
    let out = finish(gen);
    assert!(out.contains(&format!("done {N}")), "generator: {out}");
    let counts = generator_counts(&out);
    // The kill made the generator reconnect and replay.
    assert!(counts["reconnects"] >= 1, "the generator never replayed: {out} (faults {faults:?})");
    assert!(unacked_stored >= 1, "no batch was stored with its ack lost (faults {faults:?})");

    // Exactly the generated points: every timestamp, every value, nothing else.
    let points = eventually(Duration::from_secs(120), "all points in the cloud", || {
        let p = cloud_points(&c, "gen/a")?;
        (p.len() as u64 == N).then_some(p.clone()).ok_or_else(|| {
            // Which readings are missing, as index ranges.
            let mut gaps: Vec<(i64, i64)> = Vec::new();
            for i in 0..N as i64 {
                if !p.contains_key(&(base + i * PERIOD_MS)) {
                    match gaps.last_mut() {
                        Some(g) if g.1 == i - 1 => g.1 = i,
                        _ => gaps.push((i, i)),
                    }
                }
            }
            format!("{} of {N} points; missing readings {gaps:?}", p.len())
        })
    });
    let mut sum = 0i64;
    for (i, (t, v)) in points.iter().enumerate() {
        assert_eq!(*t, base + i as i64 * PERIOD_MS, "point {i} (faults {faults:?})");
        let got = (v * 10.0).round() as i64;
        assert_eq!(got, tenths(i as u64), "value of point {i}");
        sum += got;
    }
    assert_eq!(sum, (0..N).map(tenths).sum::<i64>(), "checksum");
    // Nothing dropped by policy, the backlog drained, and the counters say so.
    eventually(Duration::from_secs(90), "edge-1's outbox drained", || {
        let n = c.node("edge-1").ok_or("no node")?;
        let d = &n["status"]["usage"]["dataOutbox"];
        let zero = |k: &str| d[k].as_u64().unwrap_or(0) == 0;
        // Acked counts re-sent readings too: at least every generated one.
        (zero("queuedBatches")
            && zero("droppedExpiredPoints")
            && zero("droppedFullPoints")
            && zero("droppedDiskPoints")
            && d["ackedPoints"].as_u64() >= Some(N))
        .then_some(())
        .ok_or_else(|| format!("{d}"))
    });
    // Every batch stored once: the cloud's count of points stored is the
    // edge's count of points acknowledged. Both count replayed readings
    // (new points at existing timestamps, in new batches), so they lie
    // between the generated readings and the readings published, plus the
    // one message paho re-sends per new connection.
    // The edge's counter can trail the cloud's: a SIGKILL after a batch was
    // stored but before the edge persisted its ack leaves a batch the cloud
    // counts and the edge never does (seen in CI: 61 points). Exactness is
    // the points themselves (above); here, no more stored than acked plus
    // what was published, and duplicates recognised by id (below).
    let (stored, acked) = eventually(Duration::from_secs(30), "the cloud stored what the edge saw acked", || {
        let n = c.node("edge-1").ok_or("no node")?;
        let acked = n["status"]["usage"]["dataOutbox"]["ackedPoints"].as_u64().ok_or(format!("{n}"))?;
        let stored = cloud_metric(&c, "yunbian_data_points_stored_total")?;
        (stored >= acked).then_some((stored, acked)).ok_or(format!("cloud stored {stored} points, edge acked {acked}"))
    });
    let bound = counts["sent"] + counts["connects"];
    assert!((N..=bound).contains(&stored), "stored {stored} points of {N} generated, {bound} at most sent: {out}");
    assert_eq!(cloud_metric(&c, "yunbian_data_points_rejected_total"), Ok(0), "points refused");
    assert_eq!(cloud_metric(&c, "yunbian_data_batches_malformed_total"), Ok(0), "malformed batches");
    // Batches sent again were recognised by id, not stored again: at least
    // those whose ack was lost on purpose.
    let dup = cloud_metric(&c, "yunbian_data_batches_duplicate_total").expect("cloud metrics");
    assert!(dup >= unacked_stored, "{dup} duplicate batches, {unacked_stored} stored with their ack lost");
    eprintln!(
        "stored {stored} points (acked {acked}) of {N} generated, {} sent; {dup} duplicate batches",
        counts["sent"]
    );
    let o = c.cli(&["describe", "node", "edge-1"]);
    assert!(o.success() && o.ok().contains("Data Outbox:"), "{o:?}");
}

/// The body of `GET path` on `addr` (plain HTTP).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn publish(port: u16, topic: &str, payload: &str) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload]);
    let o = harness::run(cmd, Duration::from_secs(20));
    assert!(o.success(), "mosquitto_pub: {o:?}");
}

/// An alert rule raises one Event per episode in the cloud, resolves it,
/// and counts the next episode on the same object; an episode that starts
/// and ends while the link is cut still arrives.
#[test]
fn alerts_become_deduplicated_events_in_the_cloud() {
    let mut c = Cluster::start("data-alerts");
    let port = free_port();
    c.join_with("edge-1", EdgeSetup::new().via_link().mqtt(&format!("127.0.0.1:{port}")));
    c.apply(
        r#"apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: hot}
spec:
  source: {mqtt: {topic: "boiler/+/temp", metric: temp}}
  sinks:
    - alert: {when: "value > 90.0", severity: critical, message: "{tags.topic} at {value} °C"}
"#,
    );
    wait_rule(&c, "hot");
    let event = |c: &Cluster, state: &str, count: u64| -> Result<Value, String> {
        let evs = c.try_list("events")?;
        let [e] = &evs[..] else { return Err(format!("{} events: {evs:?}", evs.len())) };
        (e["status"]["state"] == state && e["status"]["count"].as_u64() == Some(count))
            .then(|| e.clone())
            .ok_or_else(|| format!("{e}"))
    };
    for v in ["95.5", "96.5", "97.5"] {
        publish(port, "boiler/b1/temp", v);
    }
    let e = eventually(Duration::from_secs(60), "a firing event", || event(&c, "Firing", 1));
    assert_eq!(e["spec"]["severity"], "critical", "{e}");
    assert_eq!(e["spec"]["node"], "edge-1", "{e}");
    assert_eq!(e["status"]["message"], "boiler/b1/temp at 95.5 °C", "{e}");
    publish(port, "boiler/b1/temp", "20.5");
    eventually(Duration::from_secs(60), "resolved", || event(&c, "Resolved", 1));

    // A whole episode while the link is cut: only its resolve is kept, and counted.
    c.link("edge-1").cut();
    publish(port, "boiler/b1/temp", "99.5");
    publish(port, "boiler/b1/temp", "21.5");
    std::thread::sleep(Duration::from_secs(1));
    c.link("edge-1").heal().expect("heal");
    let e = eventually(Duration::from_secs(90), "the second episode", || event(&c, "Resolved", 2));
    assert_eq!(e["status"]["value"], 21.5, "{e}");
    let o = c.cli(&["get", "events"]);
    assert!(o.success() && o.ok().contains("critical") && o.ok().contains("hot"), "{o:?}");

    // The agent restarts while the alert fires; the condition clears after
    // the restart: the restored alert resolves (it is not left firing).
    publish(port, "boiler/b1/temp", "98.5");
    eventually(Duration::from_secs(60), "the third episode", || event(&c, "Firing", 3));
    c.kill_edge("edge-1");
    c.start_edge("edge-1");
    eventually(Duration::from_secs(60), "the broker back", || {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "boiler/b1/temp", "-m", "22.5"]);
        let o = harness::run(cmd, Duration::from_secs(10));
        o.success().then_some(()).ok_or_else(|| format!("{o:?}"))
    });
    let e = eventually(Duration::from_secs(60), "resolved after the restart", || event(&c, "Resolved", 3));
    assert_eq!(e["status"]["value"], 22.5, "{e}");
}

/// The outbox on a full disk: with the link cut, data piles up; the file
/// system fills; the drop policy gives up low-priority batches, oldest
/// first, to keep high-priority ones, counts every dropped point, and what
/// is left reaches the cloud intact once the disk and the link are back:
/// points in the cloud + points counted as dropped = points generated,
/// nothing quarantined as corrupt (which would also count as dropped), and
/// every point the cloud holds carries the value generated for it.
#[test]
fn a_full_disk_drops_low_priority_batches_first_and_counts_them() {
    let mut c = Cluster::start("data-full-disk");
    c.mount_tmpfs("edge-1", 48 << 20);
    let port = free_port();
    c.join_with("edge-1", EdgeSetup::new().via_link().mqtt(&format!("127.0.0.1:{port}")));
    for (name, metric, priority) in [("low", "gen_low", 1), ("high", "gen_high", 8)] {
        c.apply(&format!(
            "apiVersion: yunbian.io/v1\nkind: Rule\nmetadata: {{name: {name}}}\nspec:\n  source: {{mqtt: {{topic: \"gen/+\", jsonPath: v, timestampPath: ts, metric: {metric}}}}}\n  sinks: [{{cloud: {{priority: {priority}}}}}]\n"
        ));
    }
    wait_rule(&c, "low");
    wait_rule(&c, "high");
    c.link("edge-1").cut();
    const N: u64 = 1_500;
    let base = (unix_now() as i64 - 120) * 1000;
    let out = finish(generator(port, "gen/f", N, 300, base, 10));
    assert!(out.contains(&format!("done {N} reconnects 0")), "{out}");
    // Every batch of the first half is on disk before the disk fills.
    let outbox = c.edge("edge-1").dir.join("outbox");
    eventually(Duration::from_secs(30), "batches on disk", || {
        let n = std::fs::read_dir(&outbox).map_err(|e| e.to_string())?.count();
        (n >= 4).then_some(()).ok_or(format!("{n} files"))
    });
    std::thread::sleep(Duration::from_secs(2));
    c.tmpfs("edge-1").fill(0).expect("fill the tmpfs");
    let out = finish(generator(port, "gen/f", N, 300, base + N as i64 * 10, 10));
    assert!(out.contains("done"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    c.tmpfs("edge-1").unfill().expect("free the tmpfs");
    c.link("edge-1").heal().expect("heal");

    let outbox = eventually(Duration::from_secs(120), "the outbox drained", || {
        let n = c.node("edge-1").ok_or("no node")?;
        let d = n["status"]["usage"]["dataOutbox"].clone();
        (d["queuedBatches"].as_u64() == Some(0) && d["ackedPoints"].as_u64() > Some(0))
            .then_some(d.clone())
            .ok_or_else(|| format!("{d}"))
    });
    let dropped = outbox["droppedDiskPoints"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "the full disk dropped something: {outbox}");
    assert_eq!(outbox["droppedFullPoints"].as_u64().unwrap_or(0), 0, "{outbox}");
    let (high_points, low_points) = eventually(Duration::from_secs(60), "the cloud to hold what was kept", || {
        let high = metric_points(&c, "gen_high", "gen/f")?;
        let low = metric_points(&c, "gen_low", "gen/f")?;
        let (h, l) = (high.len() as u64, low.len() as u64);
        (h + l + dropped == 4 * N).then_some((high, low)).ok_or(format!("high {h} low {l} dropped {dropped}"))
    });
    let (high, low) = (high_points.len() as u64, low_points.len() as u64);
    // The low-priority stream paid for the full disk.
    assert_eq!(high, 2 * N, "high-priority points all kept (low {low}, dropped {dropped})");
    // No batch was corrupt: the drops are the policy's, not the disk's.
    let quarantine = c.edge("edge-1").dir.join("outbox").join("quarantine");
    let quarantined: Vec<_> =
        std::fs::read_dir(&quarantine).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(quarantined.is_empty(), "corrupt batches quarantined: {quarantined:?}");
    assert!(!c.edge_log("edge-1").contains("quarantined"), "the agent quarantined a batch");
    // Point j of the stream (two generator runs of N) is reading j % N.
    let expected = |j: u64| tenths(j % N);
    let mut sum = 0i64;
    for (j, (t, v)) in high_points.iter().enumerate() {
        assert_eq!(*t, base + j as i64 * 10, "high-priority point {j}");
        let got = (v * 10.0).round() as i64;
        assert_eq!(got, expected(j as u64), "value of high-priority point {j}");
        sum += got;
    }
    assert_eq!(sum, (0..2 * N).map(expected).sum::<i64>(), "checksum of the high-priority points");
    for (t, v) in &low_points {
        let j = (t - base) / 10;
        assert!((t - base) % 10 == 0 && (0..2 * N as i64).contains(&j), "low-priority point at {t} not generated");
        assert_eq!((v * 10.0).round() as i64, expected(j as u64), "value of low-priority point {j}");
    }
    // The cloud stored each kept batch once, what the edge saw acknowledged.
    eventually(Duration::from_secs(30), "the cloud's count of points stored", || {
        let stored = cloud_metric(&c, "yunbian_data_points_stored_total")?;
        let n = c.node("edge-1").ok_or("no node")?;
        let acked = n["status"]["usage"]["dataOutbox"]["ackedPoints"].as_u64().unwrap_or(0);
        (stored == high + low && acked == stored)
            .then_some(())
            .ok_or(format!("stored {stored}, acked {acked}, held {}", high + low))
    });
    // And the node says so, and so do the agent's metrics.
    let o = c.cli(&["describe", "node", "edge-1"]);
    assert!(o.ok().contains(&format!("{dropped} disk full")), "{o:?}");
    let log = c.edge_log_current("edge-1");
    let url = log
        .split("agent metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .unwrap_or_else(|| panic!("no metrics address in the agent log"))
        .to_string();
    let metrics = http_get(&url, "/metrics");
    assert!(metrics.contains(&format!("yunbian_edge_data_dropped_disk_points_total {dropped}")), "{metrics}");
    assert!(metrics.contains("yunbian_edge_data_queued_batches 0"), "{metrics}");
    assert!(metrics.contains("yunbian_edge_tsdb_memory_bytes "), "{metrics}");
}
