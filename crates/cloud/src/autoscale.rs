//! The autoscaler: an App's replica count from the usage its instances
//! report (`status.usage`), as the Kubernetes HPA computes it, with
//! stabilisation windows so that it does not flap. Pure: the App
//! controller passes the instances, the last status and `now`.
//!
//! - Per running instance, the metric's value: `cpu` and `memory` as a
//!   percentage of the instance's request (of its limit when there is no
//!   request), a custom metric as the app reported it.
//! - `recommended = ceil(sampled instances × average / target)`, kept at the
//!   current count while the average is within 10 % of the target, and
//!   clamped to `[min, max]`.
//! - A higher recommendation applies after `scaleUpWindow` (default at
//!   once), a lower one after `scaleDownWindow` (default 60 s); the count
//!   applied is the lowest (up) or highest (down) recommendation seen over
//!   the window, and a recommendation back at the current count cancels.

use std::sync::Arc;

use yunbian_api::{AppInstanceSpec, Autoscale, AutoscaleStatus, InstancePhase, Object};

/// Within this relative distance of the target, nothing changes.
const TOLERANCE: f64 = 0.1;
const DEFAULT_DOWN_WINDOW_SECS: u64 = 60;

type Instance = Arc<Object<AppInstanceSpec, <AppInstanceSpec as yunbian_api::KindOf>::Status>>;

/// The metric's value for one instance, if it reports it.
fn sample(spec: &Autoscale, i: &Instance) -> Option<f64> {
    if i.status.phase != InstancePhase::Running {
        return None;
    }
    let u = i.status.usage.as_ref()?;
    let r = &i.spec.template.resources;
    let pct = |used: u64, req: u64, lim: u64| {
        let base = if req > 0 { req } else { lim };
        (base > 0).then(|| used as f64 * 100.0 / base as f64)
    };
    match spec.metric.as_str() {
        "cpu" => pct(u.cpu_millis, r.requests.cpu_millis(), r.limits.cpu_millis()),
        "memory" => pct(u.memory_bytes, r.requests.memory_bytes(), r.limits.memory_bytes()),
        m => u.metrics.get(m).copied().filter(|v| v.is_finite()),
    }
}

fn window_secs(w: &Option<String>, default: u64) -> u64 {
    w.as_deref().and_then(|w| yunbian_api::time::parse_duration_ms(w).ok()).map_or(default, |ms| ms / 1000)
}

/// Decides the replica count. `spec_replicas` is the App's `replicas`, the
/// starting point before the autoscaler has decided anything.
pub fn decide(
    spec: &Autoscale,
    last: Option<&AutoscaleStatus>,
    spec_replicas: i64,
    instances: &[&Instance],
    now: u64,
) -> AutoscaleStatus {
    let min = u32::try_from(spec.min.max(0)).unwrap_or(0);
    let max = u32::try_from(spec.max.max(1)).unwrap_or(u32::MAX).max(min);
    let clamp = |n: u32| n.clamp(min, max);
    let current = match last {
        Some(l) if l.desired_replicas > 0 || !l.last_scale.is_empty() => l.desired_replicas,
        _ => clamp(u32::try_from(spec_replicas.max(0)).unwrap_or(0)),
    };
    let current = clamp(current);
    let samples: Vec<f64> = instances.iter().filter_map(|i| sample(spec, i)).collect();
    let mut st = AutoscaleStatus {
        desired_replicas: current,
        current: None,
        last_scale: last.map(|l| l.last_scale.clone()).unwrap_or_default(),
        message: String::new(),
        pending_since: String::new(),
        pending_replicas: 0,
    };
    if samples.is_empty() {
        st.message = format!("no {} reported by running instances yet; holding {current}", spec.metric);
        return st;
    }
    let avg = samples.iter().sum::<f64>() / samples.len() as f64;
    st.current = Some((avg * 100.0).round() / 100.0);
    let ratio = avg / spec.target;
    let recommended = if (ratio - 1.0).abs() <= TOLERANCE {
        current
    } else {
        clamp((samples.len() as f64 * ratio).ceil().min(f64::from(u32::MAX)) as u32)
    };
    let unit = if matches!(spec.metric.as_str(), "cpu" | "memory") { "%" } else { "" };
    let seen =
        format!("{} {:.1}{unit} over {} instances (target {}{unit})", spec.metric, avg, samples.len(), spec.target);
    if recommended == current {
        st.message = format!("{seen}: {current} replicas");
        return st;
    }
    let up = recommended > current;
    let window = if up {
        window_secs(&spec.scale_up_window, 0)
    } else {
        window_secs(&spec.scale_down_window, DEFAULT_DOWN_WINDOW_SECS)
    };
    // Continue a pending change in the same direction, else start one.
    let (since, pending) = match last {
        Some(l)
            if !l.pending_since.is_empty() && (l.pending_replicas > current) == up && l.pending_replicas != current =>
        {
            let since = yunbian_api::time::parse_rfc3339(&l.pending_since).unwrap_or(now);
            let p = if up { l.pending_replicas.min(recommended) } else { l.pending_replicas.max(recommended) };
            (since, p)
        }
        _ => (now, recommended),
    };
    if now.saturating_sub(since) >= window {
        st.desired_replicas = pending;
        st.last_scale = yunbian_api::time::format_rfc3339(now);
        st.message = format!("{seen}: scaled {} from {current} to {pending}", if up { "up" } else { "down" });
    } else {
        st.pending_since = yunbian_api::time::format_rfc3339(since);
        st.pending_replicas = pending;
        st.message = format!(
            "{seen}: {pending} recommended since {} (scale-{} window {window}s)",
            st.pending_since,
            if up { "up" } else { "down" }
        );
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::{AppInstance, InstanceUsage, ResourceList};

    fn inst(cpu_req: &str, cpu_used: u64, metric: Option<f64>, phase: InstancePhase) -> Instance {
        let mut i = AppInstance::new("i", AppInstanceSpec::default());
        i.spec.template.resources.requests = ResourceList { cpu: Some(cpu_req.into()), memory: None };
        i.status.phase = phase;
        let mut u = InstanceUsage { cpu_millis: cpu_used, ..Default::default() };
        if let Some(m) = metric {
            u.metrics.insert("queue".into(), m);
        }
        i.status.usage = Some(u);
        Arc::new(i)
    }

    fn spec(metric: &str, target: f64) -> Autoscale {
        Autoscale { min: 1, max: 10, metric: metric.into(), target, ..Default::default() }
    }

    fn run(s: &Autoscale, last: Option<&AutoscaleStatus>, insts: &[Instance], now: u64) -> AutoscaleStatus {
        let refs: Vec<&Instance> = insts.iter().collect();
        decide(s, last, 2, &refs, now)
    }

    #[test]
    fn recommendations_follow_the_hpa_formula() {
        // (cpu used per instance of 100m requested, instances, target %) -> replicas
        let cases: &[(u64, usize, f64, u32)] = &[
            (50, 2, 50.0, 2),   // on target
            (54, 2, 50.0, 2),   // within tolerance
            (100, 2, 50.0, 4),  // twice the target: double
            (100, 4, 20.0, 10), // 20 wanted, clamped to max
            (10, 2, 50.0, 1),   // down, clamped to min (after the window)
        ];
        for &(used, n, target, want) in cases {
            let insts: Vec<Instance> = (0..n).map(|_| inst("100m", used, None, InstancePhase::Running)).collect();
            let s = spec("cpu", target);
            let first = run(&s, None, &insts, 1_000);
            // Downscales wait for the window: decide again after it.
            let st = run(&s, Some(&first), &insts, 1_000 + 61);
            assert_eq!(st.desired_replicas, want, "used {used} x{n} target {target}: {st:?}");
        }
    }

    #[test]
    fn custom_metrics_and_missing_samples() {
        let s = spec("queue", 10.0);
        let insts = vec![
            inst("100m", 0, Some(30.0), InstancePhase::Running),
            inst("100m", 0, Some(10.0), InstancePhase::Running),
        ];
        assert_eq!(run(&s, None, &insts, 0).desired_replicas, 4);
        // Pending or failed instances, or none reporting: hold.
        let quiet =
            vec![inst("100m", 0, None, InstancePhase::Running), inst("100m", 0, Some(99.0), InstancePhase::Pending)];
        let st = run(&s, None, &quiet, 0);
        assert_eq!(st.desired_replicas, 2);
        assert!(st.message.contains("no queue reported"), "{}", st.message);
    }

    #[test]
    fn scale_down_waits_for_the_window_and_a_spike_cancels_it() {
        let s = spec("cpu", 50.0);
        let low: Vec<Instance> = (0..4).map(|_| inst("100m", 10, None, InstancePhase::Running)).collect();
        let start = AutoscaleStatus { desired_replicas: 4, ..Default::default() };
        let a = run(&s, Some(&start), &low, 100);
        assert_eq!((a.desired_replicas, a.pending_replicas), (4, 1), "{a:?}");
        let b = run(&s, Some(&a), &low, 130);
        assert_eq!(b.desired_replicas, 4, "still inside the 60 s window");
        // Back on target: the pending downscale is dropped.
        let ok: Vec<Instance> = (0..4).map(|_| inst("100m", 50, None, InstancePhase::Running)).collect();
        let c = run(&s, Some(&b), &ok, 150);
        assert_eq!((c.desired_replicas, c.pending_replicas, c.pending_since.as_str()), (4, 0, ""));
        // Low again: the window starts over.
        let d = run(&s, Some(&c), &low, 160);
        let e = run(&s, Some(&d), &low, 200);
        assert_eq!(e.desired_replicas, 4);
        let f = run(&s, Some(&e), &low, 221);
        assert_eq!(f.desired_replicas, 1, "{f:?}");
    }

    #[test]
    fn scale_up_is_immediate_unless_a_window_is_set() {
        let hot: Vec<Instance> = (0..2).map(|_| inst("100m", 100, None, InstancePhase::Running)).collect();
        let s = spec("cpu", 50.0);
        assert_eq!(run(&s, None, &hot, 0).desired_replicas, 4);
        let s = Autoscale { scale_up_window: Some("30s".into()), ..spec("cpu", 50.0) };
        let a = run(&s, None, &hot, 0);
        assert_eq!((a.desired_replicas, a.pending_replicas), (2, 4));
        let b = run(&s, Some(&a), &hot, 31);
        assert_eq!(b.desired_replicas, 4);
    }
}
