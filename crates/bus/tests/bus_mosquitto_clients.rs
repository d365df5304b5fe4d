//! The broker driven by Debian's `mosquitto_pub` / `mosquitto_sub`, over
//! MQTT 3.1.1 and MQTT 5: QoS 0/1/2, retained set/replace/clear, MQTT 5
//! properties forwarded to a v5 subscriber, wildcards and `$` topics.
//!
//! Missing clients: the test panics when `CI` is set, else prints `SKIP:`.

mod support;

use std::path::{Path, PathBuf};

use support::*;
use yunbian_bus::Broker;

struct Peers {
    publ: PathBuf,
    sub: PathBuf,
}

fn peers(test: &str) -> Option<Peers> {
    Some(Peers { publ: require_bin("mosquitto_pub", test)?, sub: require_bin("mosquitto_sub", test)? })
}

/// Starts `mosquitto_sub` with `args` and waits until the broker has one
/// more subscription.
async fn subscriber(broker: &Broker, sub: &Path, args: Vec<String>) -> tokio::task::JoinHandle<(bool, String, String)> {
    let before = broker.stats().subscriptions;
    let sub = sub.to_path_buf();
    let h = tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        run(&sub, &args).await
    });
    wait_until("mosquitto_sub subscribed", || broker.stats().subscriptions > before).await;
    h
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test]
async fn qos_0_1_2_over_v311_and_v5() {
    let Some(p) = peers("qos_0_1_2_over_v311_and_v5") else { return };
    let (broker, addr) = start_plain().await;
    let port = addr.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let topic = format!("test/{version}/q{qos}");
            let h = subscriber(
                &broker,
                &p.sub,
                s(&[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-q",
                    qos,
                    "-t",
                    &topic,
                    "-C",
                    "1",
                    "-W",
                    "15",
                    "-F",
                    "%t|%p|%q|%r",
                ]),
            )
            .await;
            let (ok, _, err) =
                run(&p.publ, &["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos, "-t", &topic, "-m", "hello"])
                    .await;
            assert!(ok, "mosquitto_pub {version} qos {qos} failed: {err}");
            let (ok, out, err) = h.await.expect("subscriber task");
            assert!(ok, "mosquitto_sub {version} qos {qos} failed: {err}");
            assert_eq!(out.trim(), format!("{topic}|hello|{qos}|0"), "{version} qos {qos}");
        }
    }
    let st = broker.stats();
    assert_eq!(st.messages_in, 6);
    assert_eq!(st.messages_out, 6);
    assert_eq!(st.total_drops(), 0, "{st:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_set_replace_and_clear() {
    let Some(p) = peers("retained_set_replace_and_clear") else { return };
    let (broker, addr) = start_plain().await;
    let port = addr.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", port.as_str(), "-t", "state/door"];
    for (version, payload) in [("mqttv311", "open"), ("mqttv5", "closed")] {
        let mut args = base.to_vec();
        args.extend(["-V", version, "-q", "1", "-r", "-m", payload]);
        let (ok, _, err) = run(&p.publ, &args).await;
        assert!(ok, "retained publish failed: {err}");
    }
    assert_eq!(broker.stats().retained_messages, 1, "replaced, not added");
    // A new subscriber (either version) gets the latest value, flagged retained.
    for version in ["mqttv311", "mqttv5"] {
        let mut args = base.to_vec();
        args.extend(["-V", version, "-C", "1", "-W", "15", "-F", "%t|%p|%r"]);
        let (ok, out, err) = run(&p.sub, &args).await;
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "state/door|closed|1", "{version}");
    }
    // Clear with an empty retained message.
    let mut args = base.to_vec();
    args.extend(["-r", "-n"]);
    let (ok, _, err) = run(&p.publ, &args).await;
    assert!(ok, "{err}");
    wait_until("retained cleared", || broker.stats().retained_messages == 0).await;
    // A new subscriber now sees the next live message first (no retained one).
    let mut sub_args: Vec<String> = s(&base);
    sub_args.extend(s(&["-C", "1", "-W", "15", "-F", "%p|%r"]));
    let h = subscriber(&broker, &p.sub, sub_args).await;
    let mut args = base.to_vec();
    args.extend(["-m", "live"]);
    assert!(run(&p.publ, &args).await.0);
    let (ok, out, err) = h.await.expect("sub");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "live|0");
    broker.shutdown().await;
}

#[tokio::test]
async fn v5_properties_reach_v5_subscribers_unchanged() {
    let Some(p) = peers("v5_properties_reach_v5_subscribers_unchanged") else { return };
    let (broker, addr) = start_plain().await;
    let port = addr.port().to_string();
    let h5 = subscriber(
        &broker,
        &p.sub,
        s(&[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "props/#",
            "-C",
            "1",
            "-W",
            "15",
            "-F",
            "%t|%p|%C|%P|%R|%D|%F|%S",
        ]),
    )
    .await;
    // The subscription identifier is set per subscriber.
    let hid = subscriber(
        &broker,
        &p.sub,
        s(&[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-t",
            "props/+",
            "-D",
            "SUBSCRIBE",
            "subscription-identifier",
            "42",
            "-C",
            "1",
            "-W",
            "15",
            "-F",
            "%S|%p",
        ]),
    )
    .await;
    let h3 = subscriber(
        &broker,
        &p.sub,
        s(&["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-t", "props/x", "-C", "1", "-W", "15", "-F", "%t|%p"]),
    )
    .await;
    let (ok, _, err) = run(
        &p.publ,
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "props/x",
            "-m",
            "payload",
            "-D",
            "PUBLISH",
            "user-property",
            "site",
            "a",
            "-D",
            "PUBLISH",
            "content-type",
            "text/plain",
            "-D",
            "PUBLISH",
            "response-topic",
            "reply/here",
            "-D",
            "PUBLISH",
            "correlation-data",
            "c0ffee",
            "-D",
            "PUBLISH",
            "payload-format-indicator",
            "1",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = h5.await.expect("v5 sub");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "props/x|payload|text/plain|site:a|reply/here|c0ffee|1|");
    let (ok, out, err) = hid.await.expect("sub id");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "42|payload");
    let (ok, out, err) = h3.await.expect("v3 sub");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "props/x|payload");
    broker.shutdown().await;
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    let Some(p) = peers("wildcards_and_dollar_topics") else { return };
    let (broker, addr) = start_plain().await;
    let port = addr.port().to_string();
    // '#' must not see $SYS/…, '+/+/temp' must see a/b/temp, '$SYS/#' sees $SYS/….
    let all =
        subscriber(&broker, &p.sub, s(&["-h", "127.0.0.1", "-p", &port, "-t", "#", "-C", "2", "-W", "15", "-F", "%t"]))
            .await;
    let plus = subscriber(
        &broker,
        &p.sub,
        s(&["-h", "127.0.0.1", "-p", &port, "-t", "+/+/temp", "-C", "1", "-W", "15", "-F", "%t"]),
    )
    .await;
    let sys = subscriber(
        &broker,
        &p.sub,
        s(&["-h", "127.0.0.1", "-p", &port, "-t", "$SYS/#", "-C", "1", "-W", "15", "-F", "%t"]),
    )
    .await;
    for t in ["$SYS/broker/x", "a/b/temp", "a/b/hum"] {
        assert!(run(&p.publ, &["-h", "127.0.0.1", "-p", &port, "-t", t, "-m", "1"]).await.0);
    }
    let (_, out, _) = all.await.expect("all");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["a/b/temp", "a/b/hum"]);
    assert_eq!(plus.await.expect("plus").1.trim(), "a/b/temp");
    assert_eq!(sys.await.expect("sys").1.trim(), "$SYS/broker/x");
    broker.shutdown().await;
}
