//! Garbage, truncated and malformed frames from raw TCP sockets: the
//! broker closes that connection (v5: DISCONNECT with a reason first),
//! counts it, stays up, and other clients are unaffected.

mod support;

use bytes::{BufMut, Bytes, BytesMut};
use support::*;
use yunbian_bus::codec::{reason, Packet, Protocol, Publish, QoS, Subscribe, SubscriptionOptions};
use yunbian_bus::{DropReason, Limits};

fn subscribe(filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Default::default(),
        filters: vec![(filter.into(), SubscriptionOptions::qos(QoS::AtLeastOnce))],
    })
}

fn publish(topic: &str, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from_static(payload),
    })
}

/// Bytes of a CONNECT for a raw stream.
fn connect_bytes(id: &str, version: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    yunbian_bus::codec::encode(&Packet::Connect(Box::new(connect_packet(id, version, true))), version, &mut out)
        .expect("encode");
    out.to_vec()
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let limits = Limits { max_packet_size: 4096, ..Limits::default() };
    let broker = start_with(vec![plain_listener()], limits).await;
    let addr = broker.local_addrs()[0];
    let (mut sub, _) = RawClient::connect(addr, connect_packet("healthy-sub", Protocol::V5, true)).await;
    sub.send(&subscribe("ok/#")).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));

    let v5 = connect_bytes("bad", Protocol::V5);
    let v3 = connect_bytes("bad3", Protocol::V311);
    let with = |prefix: &[u8], tail: &[u8]| [prefix, tail].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random garbage", b"\xde\xad\xbe\xef GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("PUBLISH before CONNECT", vec![0x30, 0x05, 0x00, 0x01, b'a', b'x', b'y']),
        ("bad protocol name", vec![0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'X', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00]),
        ("five-byte remaining length", vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        ("oversize packet", vec![0x10, 0xff, 0xff, 0x03]),
        (
            "connect reserved flag",
            vec![0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x3c, 0x00, 0x00],
        ),
        ("subscribe with wrong flags", with(&v5, &[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'])),
        ("publish QoS 3", with(&v3, &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01])),
        ("topic with wildcard", with(&v3, &[0x30, 0x04, 0x00, 0x02, b'a', b'#'])),
        ("invalid UTF-8 topic", with(&v3, &[0x30, 0x04, 0x00, 0x02, 0xc3, 0x28])),
        ("null in topic", with(&v3, &[0x30, 0x04, 0x00, 0x02, b'a', 0x00])),
        ("unknown v5 property", with(&v5, &[0x30, 0x06, 0x00, 0x01, b'a', 0x02, 0x7f, 0x00])),
        ("second CONNECT", with(&v5, &v5)),
        ("packet id 0", with(&v3, &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00])),
        ("empty SUBSCRIBE", with(&v3, &[0x82, 0x02, 0x00, 0x01])),
        ("PINGREQ with a body", with(&v3, &[0xc0, 0x01, 0x00])),
        ("AUTH in v3.1.1", with(&v3, &[0xf0, 0x00])),
    ];
    let before = broker.stats();
    for (name, bytes) in &cases {
        let version = if bytes.starts_with(&v3) { Protocol::V311 } else { Protocol::V5 };
        let mut c = RawClient::tcp(addr, version).await;
        c.send_raw(bytes).await.expect("send");
        // The CONNACK of the good prefix may come first.
        let mut closed = false;
        for _ in 0..3 {
            match c.recv().await {
                None => {
                    closed = true;
                    break;
                }
                Some(Packet::ConnAck(_)) | Some(Packet::Disconnect(_)) => {}
                Some(other) => panic!("{name}: unexpected {other:?}"),
            }
        }
        assert!(closed, "{name}: connection not closed");
    }
    // Truncated frames followed by EOF from the client.
    for cut in [1, 3, 7] {
        let mut c = RawClient::tcp(addr, Protocol::V5).await;
        c.send_raw(&v5[..cut]).await.expect("send");
        drop(c);
    }
    let after = broker.stats();
    let errors = after.dropped(DropReason::ProtocolError) - before.dropped(DropReason::ProtocolError);
    let too_large = after.dropped(DropReason::PacketTooLarge) - before.dropped(DropReason::PacketTooLarge);
    assert_eq!(errors + too_large, cases.len() as u64, "every bad frame counted: {after:?}");
    assert!(too_large >= 2, "oversize and five-byte-length frames: {after:?}");

    // The healthy subscriber still gets messages.
    let (mut publ, _) = RawClient::connect(addr, connect_packet("healthy-pub", Protocol::V311, true)).await;
    publ.send(&publish("ok/1", b"still here")).await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"still here"),
        other => panic!("healthy subscriber got {other:?}"),
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn v5_gets_a_reason_before_the_close() {
    let limits = Limits { max_packet_size: 1024, ..Limits::default() };
    let broker = start_with(vec![plain_listener()], limits).await;
    let addr = broker.local_addrs()[0];
    let (mut c, _) = RawClient::connect(addr, connect_packet("big", Protocol::V5, true)).await;
    let mut frame = BytesMut::new();
    frame.put_slice(&[0x30, 0x80, 0x10]); // 2048 bytes follow
    frame.put_slice(&[0u8; 64]);
    c.send_raw(&frame).await.expect("send");
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason::PACKET_TOO_LARGE),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(c.closed_by_broker().await);
    broker.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_1() {
    let (broker, addr) = start_plain().await;
    let mut c = RawClient::tcp(addr, Protocol::V311).await;
    // MQTT 3.1 ("MQIsdp", level 3).
    c.send_raw(&[0x10, 0x0e, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x00])
        .await
        .expect("send");
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, reason::V3_UNACCEPTABLE_PROTOCOL),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    assert!(c.closed_by_broker().await);
    broker.shutdown().await;
}
