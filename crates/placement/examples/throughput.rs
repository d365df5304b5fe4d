//! Placements per second of the scheduler alone, without building the
//! `yunbian` binary: `cargo run --release -p yunbian-placement --example
//! throughput -- [nodes] [placements] [balanced|latency|cost|reliability|mixed]`.

use std::time::Instant;

use yunbian_placement::synthetic::{Mix, Workload};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nodes: usize = args.first().map_or(Ok(10_000), |s| s.parse()).map_err(|e| format!("nodes: {e}"))?;
    let placements: usize = args.get(1).map_or(Ok(10_000), |s| s.parse()).map_err(|e| format!("placements: {e}"))?;
    let mix: Mix = args.get(2).map_or(Ok(Mix::Mixed), |s| s.parse())?;
    let w = Workload::new(nodes, placements, mix);
    let mut best = f64::MAX;
    let mut last = Default::default();
    for _ in 0..3 {
        let mut c = w.cluster();
        let t = Instant::now();
        last = w.schedule_all(&mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let _ = w.cluster();
    let build = t.elapsed().as_secs_f64();
    println!(
        "{mix:?}: {} placed ({} unplaced) in {} apps over {nodes} nodes: {:.1} ms, {:.0} placements/s (cluster build {:.1} ms)",
        last.placed,
        last.unplaced,
        w.apps.len(),
        best * 1000.0,
        last.placed as f64 / best,
        build * 1000.0
    );
    Ok(())
}
