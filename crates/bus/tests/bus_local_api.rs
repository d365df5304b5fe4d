//! The in-process API the agent uses: publish and subscribe without a
//! socket, retained messages, bounded subscriptions with counted drops,
//! properties reaching socket clients, unsubscribe on drop, shutdown.

mod support;

use bytes::Bytes;
use support::*;
use yunbian_bus::codec::{Packet, Protocol, Subscribe, SubscriptionOptions};
use yunbian_bus::{BusError, DropReason, Properties, QoS};

#[tokio::test]
async fn publish_and_subscribe_in_process() {
    let (broker, _) = start_plain().await;
    let mut all = broker.subscribe("dev/+/temp", 16).expect("subscribe");
    let mut sys = broker.subscribe("#", 16).expect("subscribe");
    broker.publish("dev/a/temp", Bytes::from_static(b"21.5"), QoS::AtLeastOnce, false).expect("publish");
    broker.publish("$SYS/x", Bytes::from_static(b"hidden"), QoS::AtMostOnce, false).expect("publish");
    let m = all.recv().await.expect("message");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos, m.retain),
        ("dev/a/temp", &b"21.5"[..], QoS::AtLeastOnce, false)
    );
    assert_eq!(sys.recv().await.expect("message").topic, "dev/a/temp", "'#' does not match $SYS");
    assert!(sys.try_recv().is_none());
    assert!(matches!(broker.publish("a/+", Bytes::new(), QoS::AtMostOnce, false), Err(BusError::InvalidTopic(_))));
    assert!(matches!(broker.subscribe("a/#/b", 1), Err(BusError::InvalidFilter(_))));
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_messages_and_clearing() {
    let (broker, _) = start_plain().await;
    broker.publish("cfg/mode", Bytes::from_static(b"auto"), QoS::AtLeastOnce, true).expect("publish");
    broker.publish("cfg/mode", Bytes::from_static(b"manual"), QoS::AtLeastOnce, true).expect("publish");
    let mut s = broker.subscribe("cfg/#", 4).expect("subscribe");
    let m = s.recv().await.expect("retained");
    assert_eq!((&m.payload[..], m.retain), (&b"manual"[..], true));
    broker.publish("cfg/mode", Bytes::new(), QoS::AtMostOnce, true).expect("clear");
    assert_eq!(broker.stats().retained_messages, 0);
    let mut late = broker.subscribe("cfg/#", 4).expect("subscribe");
    assert!(late.try_recv().is_none(), "cleared retained message not delivered");
    broker.shutdown().await;
}

#[tokio::test]
async fn full_subscription_drops_and_counts() {
    let (broker, _) = start_plain().await;
    let mut s = broker.subscribe("burst", 4).expect("subscribe");
    for i in 0..10u8 {
        broker.publish("burst", Bytes::from(vec![i]), QoS::AtMostOnce, false).expect("publish never blocks");
    }
    let mut got = Vec::new();
    while let Some(m) = s.try_recv() {
        got.push(m.payload[0]);
    }
    assert_eq!(got, vec![0, 1, 2, 3], "oldest kept, newest dropped");
    assert_eq!(broker.stats().dropped(DropReason::LocalSubscriberFull), 6);
    let before = broker.stats().subscriptions;
    drop(s);
    assert_eq!(broker.stats().subscriptions, before - 1, "dropping unsubscribes");
    broker.shutdown().await;
}

#[tokio::test]
async fn properties_reach_socket_clients_and_back() {
    let (broker, addr) = start_plain().await;
    let (mut c, _) = RawClient::connect(addr, connect_packet("props", Protocol::V5, true)).await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties { subscription_identifiers: vec![9], ..Properties::default() },
        filters: vec![("agent/#".into(), SubscriptionOptions::qos(QoS::AtMostOnce))],
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let props = Properties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("node".into(), "n1".into())],
        message_expiry_interval: Some(60),
        ..Properties::default()
    };
    broker
        .publish_with_properties("agent/status", Bytes::from_static(b"up"), QoS::AtMostOnce, false, props)
        .expect("publish");
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
            assert_eq!(p.properties.user_properties, vec![("node".to_string(), "n1".to_string())]);
            assert_eq!(p.properties.subscription_identifiers, vec![9]);
            assert!(p.properties.message_expiry_interval.is_some_and(|e| e <= 60));
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // And from a socket client to the agent.
    let mut local = broker.subscribe("to-agent", 4).expect("subscribe");
    let mut p = yunbian_bus::codec::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "to-agent".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"cmd"),
    };
    p.properties.correlation_data = Some(Bytes::from_static(b"42"));
    c.send(&Packet::Publish(p)).await;
    let m = local.recv().await.expect("message");
    assert_eq!(m.properties.correlation_data.as_deref(), Some(&b"42"[..]));
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_subscriptions_and_refuses_publish() {
    let (broker, addr) = start_plain().await;
    let mut s = broker.subscribe("x", 4).expect("subscribe");
    let handle = broker.clone();
    let (mut c, _) = RawClient::connect(addr, connect_packet("bye", Protocol::V5, true)).await;
    broker.shutdown().await;
    assert_eq!(s.recv().await, None);
    assert!(matches!(handle.publish("x", Bytes::new(), QoS::AtMostOnce, false), Err(BusError::ShuttingDown)));
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, yunbian_bus::codec::reason::SERVER_SHUTTING_DOWN),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}
