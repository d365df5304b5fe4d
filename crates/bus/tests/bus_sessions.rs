//! Protocol flows checked packet by packet with a raw client: client-id
//! takeover, QoS 2 duplicate suppression, resending unacknowledged QoS 1
//! on resume, assigned client ids, receive maximum, topic aliases, no-local,
//! retain-as-published, retain handling, session expiry, keep alive and
//! will delay (virtual time).

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;
use yunbian_bus::codec::{
    reason, Ack, LastWill, Packet, Properties, Protocol, Publish, QoS, RetainHandling, Subscribe, SubscriptionOptions,
};
use yunbian_bus::{DropReason, Limits};

fn sub(filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(filter.into(), options)],
    })
}

fn publish(topic: &str, payload: &str, qos: QoS, packet_id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

async fn expect_publish(c: &mut RawClient) -> Publish {
    match c.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

async fn subscribed(c: &mut RawClient, filter: &str, options: SubscriptionOptions) {
    c.send(&sub(filter, options)).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => assert!(a.codes[0] < 0x80, "SUBACK {a:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn same_client_id_takes_over() {
    let (broker, addr) = start_plain().await;
    let (mut old, _) = RawClient::connect(addr, connect_packet("dup", Protocol::V5, true)).await;
    let (mut new, ack) = RawClient::connect(addr, connect_packet("dup", Protocol::V5, false)).await;
    assert_eq!(ack.code, 0);
    match old.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason::SESSION_TAKEN_OVER),
        other => panic!("old connection: expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(old.closed_by_broker().await);
    new.send(&Packet::PingReq).await;
    assert_eq!(new.recv().await, Some(Packet::PingResp));
    broker.shutdown().await;
}

#[tokio::test]
async fn qos2_duplicate_is_not_delivered_twice() {
    let (broker, addr) = start_plain().await;
    let (mut s, _) = RawClient::connect(addr, connect_packet("q2-sub", Protocol::V311, true)).await;
    subscribed(&mut s, "q2/#", SubscriptionOptions::qos(QoS::ExactlyOnce)).await;
    let (mut p, _) = RawClient::connect(addr, connect_packet("q2-pub", Protocol::V311, true)).await;
    let mut msg = publish("q2/a", "once", QoS::ExactlyOnce, Some(7));
    p.send(&Packet::Publish(msg.clone())).await;
    assert_eq!(p.recv().await, Some(Packet::PubRec(Ack::new(7))));
    msg.dup = true;
    p.send(&Packet::Publish(msg)).await;
    assert_eq!(p.recv().await, Some(Packet::PubRec(Ack::new(7))), "duplicate acknowledged again");
    p.send(&Packet::PubRel(Ack::new(7))).await;
    assert_eq!(p.recv().await, Some(Packet::PubComp(Ack::new(7))));
    // The subscriber's side of the QoS 2 flow.
    let got = expect_publish(&mut s).await;
    assert_eq!(got.qos, QoS::ExactlyOnce);
    let id = got.packet_id.expect("packet id");
    s.send(&Packet::PubRec(Ack::new(id))).await;
    assert_eq!(s.recv().await, Some(Packet::PubRel(Ack::new(id))));
    s.send(&Packet::PubComp(Ack::new(id))).await;
    // A marker message proves nothing else (no duplicate) came before it.
    p.send(&Packet::Publish(publish("q2/a", "marker", QoS::AtMostOnce, None))).await;
    assert_eq!(&expect_publish(&mut s).await.payload[..], b"marker");
    assert_eq!(broker.stats().messages_in, 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_qos1_is_resent_on_resume() {
    let (broker, addr) = start_plain().await;
    let (mut s, _) = RawClient::connect(addr, connect_packet("resume", Protocol::V311, false)).await;
    subscribed(&mut s, "r/#", SubscriptionOptions::qos(QoS::AtLeastOnce)).await;
    broker.publish("r/1", Bytes::from_static(b"must arrive"), QoS::AtLeastOnce, false).expect("publish");
    let first = expect_publish(&mut s).await;
    assert!(!first.dup);
    drop(s); // no PUBACK
    wait_until("session offline", || broker.stats().connections == 0).await;
    broker.publish("r/2", Bytes::from_static(b"queued"), QoS::AtLeastOnce, false).expect("publish");
    let (mut s, ack) = RawClient::connect(addr, connect_packet("resume", Protocol::V311, false)).await;
    assert!(ack.session_present);
    let again = expect_publish(&mut s).await;
    assert!(again.dup, "resent with DUP");
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(&again.payload[..], b"must arrive");
    s.send(&Packet::PubAck(Ack::new(again.packet_id.expect("id")))).await;
    let queued = expect_publish(&mut s).await;
    assert_eq!(&queued.payload[..], b"queued");
    // Clean session: nothing kept.
    drop(s);
    wait_until("session offline", || broker.stats().connections == 0).await;
    let (_s, ack) = RawClient::connect(addr, connect_packet("resume", Protocol::V311, true)).await;
    assert!(!ack.session_present);
    broker.shutdown().await;
}

#[tokio::test]
async fn client_ids_assigned_or_refused() {
    let (broker, addr) = start_plain().await;
    let (_c, ack) = RawClient::connect(addr, connect_packet("", Protocol::V5, true)).await;
    assert_eq!(ack.code, 0);
    assert!(ack.properties.assigned_client_identifier.as_deref().is_some_and(|id| !id.is_empty()), "{ack:?}");
    let (_c, ack) = RawClient::connect(addr, connect_packet("", Protocol::V311, true)).await;
    assert_eq!(ack.code, 0, "empty id with clean session is allowed in 3.1.1");
    let (_c, ack) = RawClient::connect(addr, connect_packet("", Protocol::V311, false)).await;
    assert_eq!(ack.code, reason::V3_IDENTIFIER_REJECTED);
    broker.shutdown().await;
}

#[tokio::test]
async fn receive_maximum_limits_messages_in_flight() {
    let (broker, addr) = start_plain().await;
    let mut c = connect_packet("rm", Protocol::V5, true);
    c.properties.receive_maximum = Some(2);
    let (mut s, ack) = RawClient::connect(addr, c).await;
    assert_eq!(ack.properties.receive_maximum, Some(32));
    subscribed(&mut s, "rm", SubscriptionOptions::qos(QoS::AtLeastOnce)).await;
    for i in 0..5 {
        broker.publish("rm", Bytes::from(format!("{i}")), QoS::AtLeastOnce, false).expect("publish");
    }
    let a = expect_publish(&mut s).await;
    let b = expect_publish(&mut s).await;
    // The third only after an acknowledgement: a PING answer comes first.
    s.send(&Packet::PingReq).await;
    assert_eq!(s.recv().await, Some(Packet::PingResp));
    s.send(&Packet::PubAck(Ack::new(a.packet_id.expect("id")))).await;
    assert_eq!(&expect_publish(&mut s).await.payload[..], b"2");
    s.send(&Packet::PubAck(Ack::new(b.packet_id.expect("id")))).await;
    assert_eq!(&expect_publish(&mut s).await.payload[..], b"3");
    broker.shutdown().await;
}

#[tokio::test]
async fn topic_alias_no_local_and_retain_options() {
    let (broker, addr) = start_plain().await;
    let (mut c, ack) = RawClient::connect(addr, connect_packet("opts", Protocol::V5, true)).await;
    assert!(ack.properties.topic_alias_maximum.unwrap_or(0) > 0);
    // no-local: our own publication does not come back; a plain one does.
    let mut no_local = SubscriptionOptions::qos(QoS::AtMostOnce);
    no_local.no_local = true;
    subscribed(&mut c, "nl/x", no_local).await;
    let (mut other, _) = RawClient::connect(addr, connect_packet("opts-2", Protocol::V5, true)).await;
    subscribed(&mut other, "nl/x", SubscriptionOptions::qos(QoS::AtMostOnce)).await;
    // Topic alias: set with the topic, then used with an empty topic.
    let mut p = publish("nl/x", "first", QoS::AtMostOnce, None);
    p.properties.topic_alias = Some(3);
    c.send(&Packet::Publish(p)).await;
    let mut p = publish("", "by-alias", QoS::AtMostOnce, None);
    p.properties.topic_alias = Some(3);
    c.send(&Packet::Publish(p)).await;
    for want in ["first", "by-alias"] {
        let got = expect_publish(&mut other).await;
        assert_eq!((got.topic.as_str(), &got.payload[..]), ("nl/x", want.as_bytes()));
        assert_eq!(got.properties.topic_alias, None, "aliases are not forwarded");
    }
    other.send(&Packet::Publish(publish("nl/x", "from-other", QoS::AtMostOnce, None))).await;
    assert_eq!(&expect_publish(&mut c).await.payload[..], b"from-other", "own messages skipped");

    // Retained: retain-as-published keeps the flag on live messages,
    // retain handling 2 sends nothing at subscribe time.
    let mut r = publish("ret/x", "kept", QoS::AtMostOnce, None);
    r.retain = true;
    other.send(&Packet::Publish(r.clone())).await;
    wait_until("retained stored", || broker.stats().retained_messages == 1).await;
    let mut rap = SubscriptionOptions::qos(QoS::AtMostOnce);
    rap.retain_as_published = true;
    rap.retain_handling = RetainHandling::DoNotSend;
    subscribed(&mut c, "ret/#", rap).await;
    let mut plain = SubscriptionOptions::qos(QoS::AtMostOnce);
    plain.retain_handling = RetainHandling::SendIfNew;
    let (mut third, _) = RawClient::connect(addr, connect_packet("opts-3", Protocol::V5, true)).await;
    subscribed(&mut third, "ret/#", plain).await;
    let at_subscribe = expect_publish(&mut third).await;
    assert!(at_subscribe.retain, "retained message at subscribe is flagged");
    subscribed(&mut third, "ret/#", plain).await; // not new: nothing sent
    r.payload = Bytes::from_static(b"live");
    other.send(&Packet::Publish(r)).await;
    let got = expect_publish(&mut c).await;
    assert_eq!((&got.payload[..], got.retain), (&b"live"[..], true), "retain as published");
    let got = expect_publish(&mut third).await;
    assert_eq!((&got.payload[..], got.retain), (&b"live"[..], false), "retain flag cleared for live delivery");
    broker.shutdown().await;
}

#[tokio::test]
async fn v5_session_expiry_zero_and_nonzero() {
    let (broker, addr) = start_plain().await;
    let mut c = connect_packet("exp", Protocol::V5, false);
    let (s, _) = RawClient::connect(addr, c.clone()).await;
    drop(s);
    wait_until("gone", || broker.stats().sessions == 0).await;
    c.properties.session_expiry_interval = Some(600);
    let (s, ack) = RawClient::connect(addr, c.clone()).await;
    assert!(!ack.session_present, "expiry 0 kept nothing");
    drop(s);
    wait_until("offline", || broker.stats().connections == 0).await;
    let (_s, ack) = RawClient::connect(addr, c).await;
    assert!(ack.session_present);
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_and_delayed_will_in_virtual_time() {
    let broker = start_with(vec![plain_listener()], Limits::default()).await;
    let addr = broker.local_addrs()[0];
    let mut wills = broker.subscribe("will/#", 8).expect("subscribe");
    let mut c = connect_packet("sleepy", Protocol::V5, true);
    c.keep_alive = 10;
    c.properties.session_expiry_interval = Some(600);
    let will_props = Properties { will_delay_interval: Some(30), ..Properties::default() };
    c.will = Some(LastWill {
        topic: "will/sleepy".into(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: will_props,
    });
    let start = tokio::time::Instant::now();
    let (mut s, _) = RawClient::connect(addr, c).await;
    // Silent client: closed after 1.5 × keep alive, with reason 0x8D.
    match s.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let closed_at = start.elapsed();
    assert!(closed_at >= Duration::from_secs(15), "closed after {closed_at:?} of virtual time");
    assert_eq!(broker.stats().dropped(DropReason::KeepAliveTimeout), 1);
    let will = tokio::time::timeout(Duration::from_secs(120), wills.recv()).await.expect("will in time").expect("will");
    assert_eq!(&will.payload[..], b"offline");
    assert!(start.elapsed() >= closed_at + Duration::from_secs(30), "will delay honoured (virtual time)");
    broker.shutdown().await;
}
