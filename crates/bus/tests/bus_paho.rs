//! The broker driven by python paho-mqtt 2.x clients
//! (`tests/peers/paho_peer.py`): exactly-once QoS 2 counts, QoS 0/1 counts,
//! a persistent session receiving QoS 1 messages queued while it was
//! offline, will messages, and an MQTT 5 request/response with user
//! properties, correlation data and response topic.
//!
//! Missing python or paho: the test panics when `CI` is set, else prints
//! `SKIP:`.

mod support;

use serde_json::Value;
use support::*;

async fn paho(test: &str, port: u16, args: &[&str]) -> Option<Value> {
    let py = require_paho(test)?;
    let script = peers_dir().join("paho_peer.py");
    let port = port.to_string();
    let mut full = vec![script.to_str().expect("utf-8 path"), args[0], "--port", &port];
    full.extend(&args[1..]);
    let (ok, out, err) = run(&py, &full).await;
    assert!(ok, "paho {args:?} failed: {err}\n{out}");
    Some(serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("paho printed {out:?}: {e}")))
}

#[tokio::test]
async fn qos_counts_exactly_once_and_at_least_once() {
    let (broker, addr) = start_plain().await;
    for version in ["3", "5"] {
        for qos in ["0", "1", "2"] {
            let Some(v) =
                paho("qos_counts", addr.port(), &["qos-count", "--version", version, "--qos", qos, "--count", "200"])
                    .await
            else {
                return;
            };
            assert_eq!(v["unique"], 200, "v{version} qos {qos}: {v}");
            assert_eq!(v["in_order"], true, "v{version} qos {qos}: {v}");
            if qos == "2" {
                assert_eq!(v["received"], 200, "QoS 2 must deliver exactly once: {v}");
            }
            assert_eq!(v["qos"], serde_json::json!([qos.parse::<u8>().expect("qos")]), "{v}");
        }
    }
    assert_eq!(broker.stats().total_drops(), 0, "{:?}", broker.stats());
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_session_gets_queued_qos1_after_reconnect() {
    let (broker, addr) = start_plain().await;
    for version in ["3", "5"] {
        let Some(v) = paho("persistent_session", addr.port(), &["persistent", "--version", version]).await else {
            return;
        };
        assert_eq!(v["first_session_present"], false, "v{version}: {v}");
        assert_eq!(v["second_session_present"], true, "v{version}: {v}");
        assert_eq!(
            v["payloads"],
            serde_json::json!(["queued0", "queued1", "queued2", "queued3", "queued4"]),
            "v{version}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn will_published_on_abrupt_close_only() {
    let (broker, addr) = start_plain().await;
    for version in ["3", "5"] {
        let Some(v) = paho("will", addr.port(), &["will", "--version", version]).await else { return };
        assert_eq!(v["payload"], "gone", "v{version}: {v}");
        assert_eq!(v["count"], 1, "a clean DISCONNECT published its will: {v}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn v5_request_response_properties_round_trip() {
    let (broker, addr) = start_plain().await;
    let Some(v) = paho("v5_props", addr.port(), &["props"]).await else { return };
    let req = &v["request"];
    assert!(req["response_topic"].as_str().is_some_and(|t| t.starts_with("paho/resp/")), "{v}");
    assert_eq!(req["correlation"], "0001636f7272", "{v}");
    assert_eq!(
        req["user"],
        serde_json::json!([["k1", "v1"], ["k1", "v2"], ["unit", "°C"]]),
        "order and duplicates kept"
    );
    assert_eq!(req["content_type"], "application/json");
    assert_eq!(req["expiry_le_3600"], true);
    assert_eq!(v["response_payload"], "pong");
    assert_eq!(v["response_correlation"], "0001636f7272");
    broker.shutdown().await;
}
