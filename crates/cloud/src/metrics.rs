//! Prometheus text exposition for the cloud.
//!
//! Naming scheme (see docs/metrics.md): `yunbian_<component>_<what>_<unit>`,
//! counters end in `_total`, durations are `_seconds` histograms. Label
//! values are bounded: HTTP methods are folded to GET/POST/PUT/DELETE/OTHER,
//! status codes are the few the API emits, controllers are a fixed set.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The cloud's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    reconcile: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Nodes with a live hub connection.
    pub connected_nodes: AtomicU64,
    /// Nodes whose edge has not acknowledged their latest desired view.
    pub sync_queue_depth: AtomicU64,
    /// Sync messages sent to edges.
    pub sync_messages_sent: AtomicU64,
    /// Reports received from edges and stored.
    pub reports_applied: AtomicU64,
    /// Hub connections refused (bad certificate, unknown node, garbage).
    pub hub_rejected: AtomicU64,
    /// 1 while this replica is the leader (runs the controllers).
    pub leader: AtomicU64,
    /// Latest store revision.
    pub store_revision: AtomicU64,
    /// Data batches stored.
    pub data_batches_stored: AtomicU64,
    /// Data batches received again after they were stored (acknowledged only).
    pub data_batches_duplicate: AtomicU64,
    /// Data batches that did not decode (acknowledged and dropped).
    pub data_batches_malformed: AtomicU64,
    /// Data batches the store failed to write (not acknowledged).
    pub data_store_errors: AtomicU64,
    /// Points stored.
    pub data_points_stored: AtomicU64,
    /// Points the store refused (too old, out of order, limits).
    pub data_points_rejected: AtomicU64,
}

fn fold_method(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        _ => "OTHER",
    }
}

impl Metrics {
    /// Counts one API request.
    pub fn request(&self, method: &str, code: u16) {
        let mut m = self.requests.lock().expect("metrics lock");
        *m.entry((fold_method(method), code)).or_default() += 1;
    }

    /// Records one reconcile pass of `controller`.
    pub fn reconcile(&self, controller: &'static str, took: Duration) {
        let mut m = self.reconcile.lock().expect("metrics lock");
        let h = m.entry(controller).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |out: &mut String, name: &str, help: &str, v: u64, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(out, "# HELP yunbian_api_requests_total API requests by method and status code.");
        let _ = writeln!(out, "# TYPE yunbian_api_requests_total counter");
        for ((method, code), v) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "yunbian_api_requests_total{{method=\"{method}\",code=\"{code}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP yunbian_controller_reconcile_duration_seconds Duration of one reconcile pass.");
        let _ = writeln!(out, "# TYPE yunbian_controller_reconcile_duration_seconds histogram");
        for (c, h) in self.reconcile.lock().expect("metrics lock").iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "yunbian_controller_reconcile_duration_seconds_bucket{{controller=\"{c}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "yunbian_controller_reconcile_duration_seconds_bucket{{controller=\"{c}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "yunbian_controller_reconcile_duration_seconds_sum{{controller=\"{c}\"}} {}", h.sum);
            let _ =
                writeln!(out, "yunbian_controller_reconcile_duration_seconds_count{{controller=\"{c}\"}} {}", h.count);
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut out,
            "yunbian_hub_connected_nodes",
            "Edge nodes with a live connection.",
            ld(&self.connected_nodes),
            "gauge",
        );
        g(
            &mut out,
            "yunbian_sync_queue_depth",
            "Nodes whose latest desired-state change is not yet acknowledged by the edge.",
            ld(&self.sync_queue_depth),
            "gauge",
        );
        g(
            &mut out,
            "yunbian_sync_messages_sent_total",
            "Sync messages sent to edges.",
            ld(&self.sync_messages_sent),
            "counter",
        );
        g(&mut out, "yunbian_sync_reports_applied_total", "Edge reports stored.", ld(&self.reports_applied), "counter");
        g(
            &mut out,
            "yunbian_cloud_leader",
            "1 while this replica leads (runs the controllers).",
            ld(&self.leader),
            "gauge",
        );
        g(
            &mut out,
            "yunbian_hub_rejected_connections_total",
            "Hub connections refused.",
            ld(&self.hub_rejected),
            "counter",
        );
        g(&mut out, "yunbian_store_revision", "Latest store revision.", ld(&self.store_revision), "gauge");
        for (name, help, v) in [
            ("yunbian_data_batches_stored_total", "Store-and-forward batches stored.", &self.data_batches_stored),
            (
                "yunbian_data_batches_duplicate_total",
                "Batches received again after they were stored (acknowledged, not stored twice).",
                &self.data_batches_duplicate,
            ),
            (
                "yunbian_data_batches_malformed_total",
                "Batches that did not decode (acknowledged and dropped).",
                &self.data_batches_malformed,
            ),
            ("yunbian_data_store_errors_total", "Batches the data store failed to write.", &self.data_store_errors),
            ("yunbian_data_points_stored_total", "Points stored.", &self.data_points_stored),
            ("yunbian_data_points_rejected_total", "Points the data store refused.", &self.data_points_rejected),
        ] {
            g(&mut out, name, help, ld(v), "counter");
        }
        yunbian_telemetry::process_metrics(&mut out);
        out
    }
}
