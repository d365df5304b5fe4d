//! `yunbian bench rollout`: the time to roll a new revision of one App out
//! to every instance, across NodeGroups, against a running cloud (with
//! `yunbian sim --groups N` for simulated nodes; see
//! `scripts/bench-rollout.sh`).
//!
//! It creates NodeGroups `g0`…`g{N-1}` (selecting the simulator's `group`
//! label), applies an App with `perGroup` instances in every group, waits
//! until all of them run, then changes the template (a memory limit) and
//! measures until the rollout is Complete and every instance runs the new
//! revision.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use yunbian_api::Kind;

const NAME: &str = "bench-rollout";

/// Arguments of `bench rollout`.
#[derive(Debug, Args)]
pub struct RolloutBench {
    /// NodeGroups (the simulator's `--groups`).
    #[arg(long, default_value_t = 10)]
    groups: usize,
    /// Instances per group.
    #[arg(long, default_value_t = 100)]
    per_group: u64,
    /// What the budgets count: instance, node or group.
    #[arg(long, default_value = "instance")]
    by: String,
    /// `maxUnavailable` (a count or a percentage).
    #[arg(long, default_value = "10%")]
    max_unavailable: String,
    /// `maxSurge` (a count or a percentage).
    #[arg(long, default_value = "10%")]
    max_surge: String,
    /// Give up after this long.
    #[arg(long, default_value = "900s", value_parser = crate::parse_duration)]
    timeout: Duration,
}

fn count_or_percent(s: &str) -> Value {
    s.parse::<i64>().map_or_else(|_| json!(s), |n| json!(n))
}

fn app(a: &RolloutBench, memory: &str) -> Value {
    let groups: Vec<String> = (0..a.groups).map(|i| format!("g{i}")).collect();
    json!({
        "apiVersion": "yunbian.io/v1", "kind": "App", "metadata": {"name": NAME},
        "spec": {
            "runtime": "fake",
            "resources": {"limits": {"memory": memory}},
            "placement": {"groups": groups, "perGroup": {"replicas": a.per_group}},
            "rollout": {
                "by": a.by,
                "maxUnavailable": count_or_percent(&a.max_unavailable),
                "maxSurge": count_or_percent(&a.max_surge),
            },
        }
    })
}

/// Instances of the App: (total, Running at `revision`).
async fn progress(client: &yunbian_cli::Client, revision: u64) -> Result<(usize, usize)> {
    let opts = yunbian_cli::ListOptions { app: Some(NAME.into()), ..Default::default() };
    let items = client.list_with(Kind::AppInstance, &opts).await?.items;
    let done = items
        .iter()
        .filter(|i| i.pointer("/spec/revision").and_then(Value::as_u64) == Some(revision))
        .filter(|i| i.pointer("/status/phase").and_then(Value::as_str) == Some("Running"))
        .count();
    Ok((items.len(), done))
}

async fn wait_all(client: &yunbian_cli::Client, a: &RolloutBench, revision: u64, t0: Instant) -> Result<Duration> {
    let want = a.groups * a.per_group as usize;
    loop {
        let (total, done) = progress(client, revision).await?;
        let app = client.get_object(Kind::App, NAME).await?;
        let phase = app.pointer("/status/rollout/phase").and_then(Value::as_str).unwrap_or("Complete");
        if total == want && done == want && phase == "Complete" {
            return Ok(t0.elapsed());
        }
        if phase == "RolledBack" || phase == "Failed" {
            bail!("rollout {phase}: {}", app["status"]["rollout"]);
        }
        if t0.elapsed() > a.timeout {
            bail!(
                "timed out: {done} of {want} instances Running revision {revision} ({total} in all, rollout {phase})"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the benchmark.
pub async fn run(client: &yunbian_cli::Client, a: RolloutBench) -> Result<()> {
    if client.get_object(Kind::App, NAME).await.is_ok() {
        client.delete_object(Kind::App, NAME).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for i in 0..a.groups {
        let g = json!({"apiVersion": "yunbian.io/v1", "kind": "NodeGroup", "metadata": {"name": format!("g{i}")},
                       "spec": {"selector": {"group": format!("g{i}")}, "site": format!("site-{i}")}});
        client.apply(&g).await.with_context(|| format!("create NodeGroup g{i}"))?;
    }
    let want = a.groups * a.per_group as usize;
    let t0 = Instant::now();
    client.apply(&app(&a, "64Mi")).await.context("apply revision 1")?;
    let first = wait_all(client, &a, 1, t0).await?;
    println!("revision 1: {want} instances in {} groups Running after {:.1} s", a.groups, first.as_secs_f64());

    let t0 = Instant::now();
    client.apply(&app(&a, "65Mi")).await.context("apply revision 2")?;
    let took = wait_all(client, &a, 2, t0).await?;
    println!(
        "rollout of revision 2 (by {}, maxUnavailable {}, maxSurge {}): {want} instances in {} groups updated in {:.1} s ({:.0} instances/s)",
        a.by,
        a.max_unavailable,
        a.max_surge,
        a.groups,
        took.as_secs_f64(),
        want as f64 / took.as_secs_f64()
    );
    client.delete_object(Kind::App, NAME).await?;
    Ok(())
}
