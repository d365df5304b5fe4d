//! `linkd`: the links of a benchmark's nodes, as proxies of the fault
//! harness with shared bandwidth (bench/p2p-links.sh).
//!
//! ```text
//! linkd --cloud 127.0.0.1:7443 --egress 200M --node-rate 100M \
//!       --node edge-1:41001 --node edge-2:41002 --node edge-3 [--stats FILE]
//! ```
//!
//! - one **cloud egress** proxy in front of `--cloud`, whose direction to
//!   the clients (the cloud's sends) is one [`Bandwidth`] of `--egress`
//!   shared by every connection;
//! - per `--node NAME[:P2P_PORT]`, a [`SharedLink`] of `--node-rate` each way
//!   (`--node-up`/`--node-down` to differ) and
//!   - a **cloud proxy** forwarding to the egress proxy: the agent's cloud
//!     URL; the node is its client (downlink: what the cloud sends);
//!   - with a port, a **peer proxy** forwarding to `127.0.0.1:P2P_PORT`
//!     (the agent's `--p2p-listen`): what the agent advertises
//!     (`--p2p-advertise`); the node is its upstream (uplink: what it
//!     serves to peers).
//!
//! Rates are bits per second with an optional `k`, `M` or `G` (×1000).
//! Prints `egress ADDR`, one `node NAME cloud ADDR peer ADDR|-` line per
//! node, then `ready`, and runs until SIGINT or SIGTERM. With `--stats`, it
//! rewrites FILE every second and on exit (atomically), one line each:
//!
//! ```text
//! egress BYTES_TO_CLOUD BYTES_FROM_CLOUD CONNECTIONS
//! node NAME UP_BYTES DOWN_BYTES FROM_CLOUD SERVED_TO_PEERS PEER_CONNECTIONS
//! ```
//!
//! `UP_BYTES`/`DOWN_BYTES` are what passed the node's link buckets;
//! `FROM_CLOUD` what its cloud proxy delivered to it; `SERVED_TO_PEERS`
//! what its peer proxy delivered to peers.
//!
//! What this does not model: a node's downloads *from peers* reach it
//! through the serving node's peer proxy, which only knows the serving
//! node, so they take from the server's uplink but not from the receiver's
//! downlink (all clients come from 127.0.0.1); no latency, no loss.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use yunbian_faults::{Bandwidth, Direction, LinkProxy, SharedLink};

struct Spec {
    cloud: SocketAddr,
    egress_bps: u64,
    up_bps: u64,
    down_bps: u64,
    nodes: Vec<(String, Option<u16>)>,
    stats: Option<PathBuf>,
}

struct Node {
    name: String,
    link: SharedLink,
    cloud: LinkProxy,
    peer: Option<LinkProxy>,
}

fn usage() -> String {
    "usage: linkd --cloud ADDR [--egress RATE] [--node-rate RATE | --node-up RATE --node-down RATE] \
     --node NAME[:P2P_PORT]... [--stats FILE]   (RATE: bits/s, e.g. 100M)"
        .to_string()
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, scale) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1_000),
        Some('M') => (&s[..s.len() - 1], 1_000_000),
        Some('G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let n: f64 = digits.parse().map_err(|_| format!("{s:?}: not a rate (bits/s, e.g. 100M)"))?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("{s:?}: the rate must be positive"));
    }
    Ok((n * scale as f64) as u64)
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Spec, String> {
    let mut args = args.peekable();
    let (mut cloud, mut stats, mut nodes) = (None, None, Vec::new());
    let (mut egress_bps, mut up_bps, mut down_bps) = (200_000_000, 100_000_000, 100_000_000);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cloud" => cloud = Some(value()?.parse().map_err(|e| format!("--cloud: {e}"))?),
            "--egress" => egress_bps = parse_rate(&value()?)?,
            "--node-rate" => {
                up_bps = parse_rate(&value()?)?;
                down_bps = up_bps;
            }
            "--node-up" => up_bps = parse_rate(&value()?)?,
            "--node-down" => down_bps = parse_rate(&value()?)?,
            "--stats" => stats = Some(PathBuf::from(value()?)),
            "--node" => {
                let v = value()?;
                let node = match v.split_once(':') {
                    Some((name, port)) => {
                        (name.to_string(), Some(port.parse().map_err(|e| format!("--node {v}: port: {e}"))?))
                    }
                    None => (v, None),
                };
                nodes.push(node);
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    let cloud = cloud.ok_or_else(usage)?;
    Ok(Spec { cloud, egress_bps, up_bps, down_bps, nodes, stats })
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn stats_text(egress: &LinkProxy, nodes: &[Node]) -> String {
    let e = egress.stats();
    let mut out = format!("egress {} {} {}\n", e.bytes_to_upstream, e.bytes_to_client, e.accepted);
    for node in nodes {
        let cloud = node.cloud.stats();
        let peer = node.peer.as_ref().map(LinkProxy::stats).unwrap_or_default();
        out += &format!(
            "node {} {} {} {} {} {}\n",
            node.name,
            node.link.up.bytes(),
            node.link.down.bytes(),
            cloud.bytes_to_client,
            peer.bytes_to_client,
            peer.accepted
        );
    }
    out
}

fn write_stats(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        eprintln!("linkd: write {}: {e}", path.display());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let spec = match parse_args(std::env::args().skip(1)) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let start = |listen: SocketAddr, upstream: SocketAddr| {
        LinkProxy::start_on(listen, upstream).unwrap_or_else(|e| {
            eprintln!("linkd: start a proxy on {listen} to {upstream}: {e}");
            std::process::exit(1);
        })
    };
    let egress = start(localhost(0), spec.cloud);
    egress.attach(Direction::ToClient, &Bandwidth::new(spec.egress_bps));
    println!("egress {}", egress.addr());
    let mut nodes = Vec::new();
    for (name, p2p_port) in spec.nodes {
        let link = SharedLink::new(spec.up_bps, spec.down_bps);
        let cloud = start(localhost(0), egress.addr());
        cloud.attach_client_link(&link);
        let peer = p2p_port.map(|port| {
            let peer = start(localhost(0), localhost(port));
            peer.attach_upstream_link(&link);
            peer
        });
        let peer_addr = peer.as_ref().map_or("-".to_string(), |p| p.addr().to_string());
        println!("node {name} cloud {} peer {peer_addr}", cloud.addr());
        nodes.push(Node { name, link, cloud, peer });
    }
    println!("ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap_or_else(|e| {
        eprintln!("linkd: install the SIGTERM handler: {e}");
        std::process::exit(1);
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        if let Some(path) = &spec.stats {
            write_stats(path, &stats_text(&egress, &nodes));
        }
    }
    if let Some(path) = &spec.stats {
        write_stats(path, &stats_text(&egress, &nodes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_nodes() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
        let args = ["--cloud", "127.0.0.1:7443", "--node-rate", "10M", "--node", "a:4000", "--node", "b"];
        let spec = parse_args(args.iter().map(|s| s.to_string())).expect("spec");
        assert_eq!(spec.nodes, [("a".to_string(), Some(4000)), ("b".to_string(), None)]);
        assert_eq!((spec.up_bps, spec.down_bps, spec.egress_bps), (10_000_000, 10_000_000, 200_000_000));
        assert!(parse_args(["--node".to_string()].into_iter()).is_err());
    }
}
