//! `yunbian bench apply`: measures the time from applying an App until each
//! of its instances reports Running, as seen through the API's watch
//! stream. Used with `yunbian sim` for the scale figures in
//! docs/benchmarks.md. `yunbian bench scheduler`: placements per second of
//! the scheduler (`yunbian-placement`) alone, over a simulated cluster.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use yunbian_api::Kind;

/// `yunbian bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Apply an App and time every instance to Running.
    Apply(ApplyBench),
    /// Placements per second of the scheduler alone (no I/O), over a
    /// simulated cluster.
    Scheduler(SchedulerBench),
    /// Roll a new revision of one App out across NodeGroups and time it.
    Rollout(crate::bench_rollout::RolloutBench),
}

/// Arguments of `bench scheduler`.
#[derive(Debug, Args)]
pub struct SchedulerBench {
    /// Simulated nodes (in groups of 100; every 20th group is cloud tier).
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Instances to place, over Apps of 10 to 30 instances.
    #[arg(long, default_value_t = 10_000)]
    placements: usize,
    /// The Apps' policy: balanced, latency, cost, reliability or mixed (the
    /// four in turn). Some Apps also spread by zone or by node, keep their
    /// instances apart, need an arch, fall back to the cloud or place per
    /// group, whatever the policy.
    #[arg(long, default_value = "mixed")]
    policy: yunbian_placement::synthetic::Mix,
    /// Repetitions (the best one is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Schedules the synthetic workload of `yunbian_placement::synthetic` as
/// one controller pass: the cluster is built once, then every App is
/// placed in turn. Placements per second count the `schedule` calls only;
/// the cluster build is reported apart.
fn scheduler(a: SchedulerBench) {
    use yunbian_placement::synthetic::Workload;
    let w = Workload::new(a.nodes, a.placements, a.policy);
    let (mut best, mut build) = (Duration::MAX, Duration::MAX);
    let mut outcome = Default::default();
    for _ in 0..a.rounds.max(1) {
        let t = Instant::now();
        let mut cluster = w.cluster();
        build = build.min(t.elapsed());
        let t = Instant::now();
        outcome = w.schedule_all(&mut cluster);
        best = best.min(t.elapsed());
    }
    let yunbian_placement::synthetic::Outcome { placed, unplaced } = outcome;
    println!(
        "scheduler ({:?}): {placed} placements ({unplaced} unplaced, {} apps) over {} nodes in {:.1} ms: {:.0} placements/s; cluster build {:.1} ms",
        a.policy,
        w.apps.len(),
        a.nodes,
        best.as_secs_f64() * 1000.0,
        placed as f64 / best.as_secs_f64(),
        build.as_secs_f64() * 1000.0
    );
}

/// Arguments of `bench apply`.
#[derive(Debug, Args)]
pub struct ApplyBench {
    /// Instances (spread one per node when replicas ≤ nodes).
    #[arg(long, default_value_t = 1000)]
    replicas: u64,
    /// Node selector k=v,… (default: the simulator's label).
    #[arg(long, value_parser = crate::parse_labels, default_value = "sim=true")]
    selector: std::collections::BTreeMap<String, String>,
    /// Runtime of the App: `fake` for simulated nodes, `process` for real ones.
    #[arg(long, default_value = "fake")]
    runtime: String,
    /// Give up after this long.
    #[arg(long, default_value = "600s", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Keep the App afterwards.
    #[arg(long)]
    keep: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs a bench command.
pub async fn run(config: Option<std::path::PathBuf>, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Scheduler(a) => {
            scheduler(a);
            Ok(())
        }
        BenchCommand::Apply(a) => {
            let client = yunbian_cli::Client::new(yunbian_cli::ClientConfig::load(config.as_deref())?)?;
            apply(&client, a).await
        }
        BenchCommand::Rollout(a) => {
            let client = yunbian_cli::Client::new(yunbian_cli::ClientConfig::load(config.as_deref())?)?;
            crate::bench_rollout::run(&client, a).await
        }
    }
}

async fn apply(client: &yunbian_cli::Client, a: ApplyBench) -> Result<()> {
    const NAME: &str = "bench-apply";
    if client.get_object(Kind::App, NAME).await.is_ok() {
        client.delete_object(Kind::App, NAME).await?;
    }
    let opts = yunbian_cli::ListOptions { app: Some(NAME.into()), ..Default::default() };
    let t_clear = Instant::now();
    while !client.list_with(Kind::AppInstance, &opts).await?.items.is_empty() {
        if t_clear.elapsed() > a.timeout {
            bail!("instances of an earlier run did not go away");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rv = client.list_with(Kind::AppInstance, &opts).await?.resource_version;
    let mut watch = client.watch(Kind::AppInstance, &opts, Some(rv)).await?;
    let (mut last_rv, mut resumed) = (rv, 0u32);
    let mut spec = json!({ "replicas": a.replicas, "runtime": a.runtime, "placement": { "nodeSelector": a.selector } });
    if a.runtime == "process" {
        spec["process"] = json!({ "command": ["/bin/sh", "-c", "exec sleep 3600"] });
    }
    let app = json!({ "apiVersion": "yunbian.io/v1", "kind": "App", "metadata": { "name": NAME }, "spec": spec });
    let t0 = Instant::now();
    client.apply(&app).await.context("apply the bench app")?;
    let mut running: std::collections::HashMap<String, Duration> = std::collections::HashMap::new();
    let mut created: std::collections::HashMap<String, Duration> = std::collections::HashMap::new();
    while (running.len() as u64) < a.replicas {
        let left = a.timeout.checked_sub(t0.elapsed()).context("timed out")?;
        let ev = match tokio::time::timeout(left, watch.next_event()).await {
            Ok(Some(ev)) => ev?,
            Ok(None) => {
                // The cloud ends a watch that falls behind; resume from the
                // last revision seen, as any client does.
                watch = client.watch(Kind::AppInstance, &opts, Some(last_rv)).await.with_context(|| {
                    format!("resume the watch after {} of {} instances were Running", running.len(), a.replicas)
                })?;
                resumed += 1;
                continue;
            }
            Err(_) => bail!("timed out: {} of {} instances Running", running.len(), a.replicas),
        };
        if let Some(rv) = ev.object.pointer("/metadata/resourceVersion").and_then(Value::as_u64) {
            last_rv = last_rv.max(rv);
        }
        let name = ev.object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        created.entry(name.clone()).or_insert_with(|| t0.elapsed());
        if ev.object.pointer("/status/phase").and_then(Value::as_str) == Some("Running") {
            running.entry(name).or_insert_with(|| t0.elapsed());
        }
    }
    // Split the latency: the cloud creating and placing the instance, then
    // the edge round trip (delta down, runtime, status report up).
    let mut to_created: Vec<Duration> = created.values().copied().collect();
    let mut to_running: Vec<Duration> =
        running.iter().map(|(n, r)| r.saturating_sub(created.get(n).copied().unwrap_or_default())).collect();
    let mut lat: Vec<Duration> = running.into_values().collect();
    for v in [&mut lat, &mut to_created, &mut to_running] {
        v.sort();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (label, v) in
        [("apply -> Running", &lat), ("apply -> created", &to_created), ("created -> Running", &to_running)]
    {
        println!(
            "{label}: {} instances, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            v.len(),
            ms(percentile(v, 0.50)),
            ms(percentile(v, 0.99)),
            ms(percentile(v, 1.0)),
        );
    }
    if resumed > 0 {
        println!("(the watch fell behind and was resumed {resumed} time(s))");
    }
    if !a.keep {
        client.delete_object(Kind::App, NAME).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
