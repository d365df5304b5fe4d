//! Autoscaling end to end: an App's instances report a custom metric to
//! their agent's local API (`POST $YUNBIAN_DEVICE_API/v1/instances/
//! $INSTANCE_NAME/metrics`), the agent puts it in the instances' status, and
//! the cloud's autoscaler scales the App up at once when the metric is over
//! its target and back down after the scale-down window.

mod harness;

use std::time::Duration;

use harness::{eventually, free_port, s, summary, u, Cluster, EdgeSetup};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn a_custom_metric_scales_the_app_up_and_back_down() {
    let mut c = Cluster::start("autoscale");
    let api = format!("127.0.0.1:{}", free_port());
    c.join_with("as-1", EdgeSetup::new().labels("site=s").device_api(&api));
    let level = c.write_file("queue-level", "30");
    // Each instance reports the level in the file every second.
    let script = format!(
        r#"import json, os, time, urllib.request
url = os.environ["YUNBIAN_DEVICE_API"] + "/v1/instances/" + os.environ["INSTANCE_NAME"] + "/metrics"
while True:
    try:
        v = float(open("{}").read().strip())
        req = urllib.request.Request(url, data=json.dumps({{"queue": v}}).encode(), method="POST",
                                     headers={{"content-type": "application/json"}})
        urllib.request.urlopen(req, timeout=5).read()
    except Exception as e:
        print("report failed:", e, flush=True)
    time.sleep(1)
"#,
        level.display()
    );
    let app = json!({
        "apiVersion": "yunbian.io/v1", "kind": "App", "metadata": {"name": "worker"},
        "spec": {
            "replicas": 1,
            "runtime": "process",
            "process": {"command": ["python3", "-c", script]},
            "autoscale": {"min": 1, "max": 3, "metric": "queue", "target": 10, "scaleDownWindow": "5s"},
        }
    });
    c.apply(&app.to_string());

    // 30 against a target of 10: three instances (the maximum).
    let a = eventually(WAIT, "worker to scale up to 3", || {
        let a = c.app("worker").ok_or("no app")?;
        let running = running(&c, "worker")?;
        (u(&a, "/status/autoscale/desiredReplicas") == Some(3) && running == 3)
            .then_some(a.clone())
            .ok_or(format!("{} running; {}", running, a["status"]["autoscale"]))
    });
    println!("[autoscale] up: {}", s(&a, "/status/autoscale/message"));
    assert!(!s(&a, "/status/autoscale/lastScale").is_empty(), "{a}");

    // The queue drains: back to one after the 5 s window.
    std::fs::write(&level, "2").expect("write level");
    let a = eventually(WAIT, "worker to scale down to 1", || {
        let a = c.app("worker").ok_or("no app")?;
        let running = running(&c, "worker")?;
        (u(&a, "/status/autoscale/desiredReplicas") == Some(1) && running == 1)
            .then_some(a.clone())
            .ok_or(format!("{} running; {}", running, a["status"]["autoscale"]))
    });
    println!("[autoscale] down: {}", s(&a, "/status/autoscale/message"));
    assert_eq!(u(&a, "/status/replicas"), Some(1), "{a}");
}

fn running(c: &Cluster, app: &str) -> Result<usize, String> {
    let items = c.instances_of(app)?;
    let n = items.iter().filter(|i| s(i, "/status/phase") == "Running").count();
    if items.len() != n {
        return Err(format!("not all Running: {}", summary(&items)));
    }
    Ok(n)
}
