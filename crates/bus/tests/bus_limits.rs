//! Limits: every one bounds memory, is counted in the stats, and never
//! blocks anyone else. A subscriber that stops reading does not slow the
//! publisher or other subscribers; its queue is bounded and drops counted.

mod support;

use bytes::Bytes;
use support::*;
use yunbian_bus::codec::{reason, Packet, Protocol, Subscribe, SubscriptionOptions};
use yunbian_bus::{DropReason, Limits, Properties, QoS};

fn subscribe(filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: filters.iter().map(|f| (f.to_string(), SubscriptionOptions::qos(QoS::AtLeastOnce))).collect(),
    })
}

#[tokio::test]
async fn slow_subscriber_never_blocks_others() {
    let limits = Limits { max_queued_messages: 100, ..Limits::default() };
    let broker = start_with(vec![plain_listener()], limits).await;
    let addr = broker.local_addrs()[0];
    // A client that subscribes and then never reads its socket.
    let (mut stuck, _) = RawClient::connect(addr, connect_packet("stuck", Protocol::V311, true)).await;
    stuck.send(&subscribe(&["flood"])).await;
    assert!(matches!(stuck.recv().await, Some(Packet::SubAck(_))));
    let mut fast = broker.subscribe("flood", 60_000).expect("subscribe");
    let payload = Bytes::from(vec![7u8; 1024]);
    for _ in 0..20_000 {
        broker.publish("flood", payload.clone(), QoS::AtMostOnce, false).expect("publish");
    }
    for _ in 0..5_000 {
        broker.publish("flood", payload.clone(), QoS::AtLeastOnce, false).expect("publish");
    }
    let mut n = 0;
    while fast.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 25_000, "the fast subscriber got everything");
    let st = broker.stats();
    assert!(st.dropped(DropReason::QueueFullQoS0) > 0, "{st:?}");
    assert!(st.dropped(DropReason::QueueFull) > 0, "QoS 1 past the bound is dropped, counted: {st:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn connection_subscription_retained_and_session_limits() {
    let limits = Limits {
        max_connections: 2,
        max_subscriptions_per_client: 2,
        max_retained_messages: 2,
        max_retained_bytes: 1024,
        max_sessions: 2,
        ..Limits::default()
    };
    let broker = start_with(vec![plain_listener()], limits).await;
    let addr = broker.local_addrs()[0];

    // Subscriptions: the third filter is refused with 0x97.
    let (mut a, _) = RawClient::connect(addr, connect_packet("a", Protocol::V5, true)).await;
    a.send(&subscribe(&["s/1", "s/2", "s/3"])).await;
    match a.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.codes, vec![1, 1, reason::QUOTA_EXCEEDED]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(broker.stats().dropped(DropReason::MaxSubscriptions), 1);

    // Connections: the third is closed at once.
    let (_b, _) = RawClient::connect(addr, connect_packet("b", Protocol::V5, true)).await;
    let mut third = RawClient::tcp(addr, Protocol::V5).await;
    assert!(third.closed_by_broker().await);
    assert_eq!(broker.stats().dropped(DropReason::MaxConnections), 1);

    // Retained: count and bytes.
    for (t, size) in [("r/1", 10), ("r/2", 10), ("r/3", 10), ("r/1", 2000)] {
        broker.publish(t, Bytes::from(vec![1u8; size]), QoS::AtMostOnce, true).expect("publish");
    }
    let st = broker.stats();
    assert_eq!((st.retained_messages, st.dropped(DropReason::RetainedLimit)), (2, 2), "{st:?}");
    broker.publish("r/1", Bytes::from(vec![1u8; 20]), QoS::AtMostOnce, true).expect("replace within bound");
    assert_eq!(broker.stats().retained_messages, 2);
    broker.shutdown().await;

    // Sessions: past the bound the offline one disconnected longest ago goes.
    let limits = Limits { max_sessions: 2, max_session_expiry: 3600, ..Limits::default() };
    let broker = start_with(vec![plain_listener()], limits).await;
    let addr = broker.local_addrs()[0];
    for id in ["p1", "p2"] {
        let (c, _) = RawClient::connect(addr, connect_packet(id, Protocol::V311, false)).await;
        drop(c);
        wait_until("offline", || broker.stats().connections == 0).await;
    }
    let (_c, _) = RawClient::connect(addr, connect_packet("p3", Protocol::V311, false)).await;
    assert_eq!(broker.stats().dropped(DropReason::SessionEvicted), 1);
    let (_c, ack) = RawClient::connect(addr, connect_packet("p2", Protocol::V311, false)).await;
    assert!(ack.session_present, "the newer offline session was kept");
    broker.shutdown().await;
}
