//! `yunbian sim`: many simulated edge nodes in one process. Each joins with
//! the token (real CSR, real certificate), connects over its own mTLS
//! WebSocket and speaks the real sync protocol; only the runtime is fake
//! (instances are "Running" at once) and the local store is in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use tokio::sync::Semaphore;

/// Arguments of `yunbian sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Cloud URL.
    #[arg(long)]
    cloud: String,
    /// Join token.
    #[arg(long)]
    token: String,
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Node name prefix; nodes are <prefix>00000, <prefix>00001, …
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Labels of every simulated node: k=v,k2=v2.
    #[arg(long, value_parser = crate::parse_labels, default_value = "sim=true")]
    labels: std::collections::BTreeMap<String, String>,
    /// Also label node i `group=g<i mod N>` (for NodeGroups; 0: no such label).
    #[arg(long, default_value_t = 0)]
    groups: usize,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Heartbeat interval of each node.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    heartbeat: Duration,
}

/// Runs the simulator until Ctrl-C.
pub async fn run(args: SimArgs) -> Result<()> {
    let token: yunbian_edge::JoinToken = args.token.parse()?;
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let t0 = Instant::now();
    let mut joins = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let permit = sem.clone().acquire_owned().await.context("semaphore")?;
        let name = format!("{}{i:05}", args.prefix);
        let (cloud, token, mut labels) = (args.cloud.clone(), token.clone(), args.labels.clone());
        if args.groups > 0 {
            labels.insert("group".into(), format!("g{}", i % args.groups));
        }
        let heartbeat = args.heartbeat;
        joins.push(tokio::spawn(async move {
            let _permit = permit;
            let dir = std::env::temp_dir();
            let id = yunbian_edge::enroll(&dir, &cloud, &token, &name, &labels)
                .await
                .with_context(|| format!("join {name}"))?;
            let mut cfg = yunbian_edge::AgentConfig::new(dir);
            cfg.heartbeat = heartbeat;
            cfg.real_node_info = false;
            yunbian_edge::start_simulated(id, cfg).await
        }));
    }
    let mut agents = Vec::with_capacity(args.nodes);
    for j in joins {
        agents.push(j.await.context("join task")??);
    }
    eprintln!("sim: {} nodes joined and started in {:.1}s", agents.len(), t0.elapsed().as_secs_f64());
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let connected = agents.iter().filter(|a| a.stats.connected.load(std::sync::atomic::Ordering::Relaxed)).count();
                let instances: u64 = agents.iter().map(|a| a.stats.instances.load(std::sync::atomic::Ordering::Relaxed)).sum();
                eprintln!("sim: {connected}/{} connected, {instances} instances, rss {} MiB", agents.len(), yunbian_telemetry::rss_bytes() >> 20);
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
