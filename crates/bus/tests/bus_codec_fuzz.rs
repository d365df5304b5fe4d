//! The MQTT decoder against hostile input: replays the `mqtt_decode` fuzz
//! corpus (`fuzz/corpus/mqtt_decode/`) through the same check the
//! libFuzzer target runs (`yunbian_bus::fuzzing::check_mqtt_stream`), feeds
//! it a deterministic stream of mutated and random inputs, and proptests
//! that random bytes never panic and that generated packets survive
//! encode → decode unchanged.
//!
//! Seed names say what they must do: `connect_*` decodes as a first packet,
//! `v311_*` / `v5_*` decode in that protocol, `bad_*` decodes nowhere.
//! `YUNBIAN_FUZZ_ITERS=<n>` changes the number of mutated inputs (20000).
//! `cargo test -p yunbian-bus --test bus_codec_fuzz -- --ignored` rewrites
//! the hand-made seeds.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;
use yunbian_bus::codec::{
    Ack, Auth, ConnAck, Connect, Disconnect, LastWill, Packet, Properties, Protocol, Publish, QoS, RetainHandling,
    SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use yunbian_bus::fuzzing::{check_mqtt_stream, check_round_trip};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/mqtt_decode")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, data)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_replays_with_expected_outcomes() {
    let files = corpus();
    assert!(files.len() >= 20, "corpus at {} is missing or nearly empty", corpus_dir().display());
    for (name, data) in &files {
        let got = check_mqtt_stream(data);
        if name.starts_with("connect_") {
            assert!(got.before_connect >= 1, "{name}: {got:?}");
        } else if name.starts_with("v311_") {
            assert!(got.v311 >= 1, "{name}: {got:?}");
        } else if name.starts_with("v5_") {
            assert!(got.v5 >= 1, "{name}: {got:?}");
        } else if name.starts_with("bad_") {
            assert_eq!((got.before_connect, got.v311, got.v5), (0, 0, 0), "{name}");
        }
    }
}

/// xorshift64*: a fixed, replayable stream of inputs.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn input(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        const DICT: &[&[u8]] = &[
            b"\x00\x04MQTT\x05",
            b"\x00\x04MQTT\x04",
            b"\xff\xff\xff\x7f",
            b"\x80\x80\x80\x80",
            b"\x26\x00\x01k\x00\x01v",
            b"\x0b\x00",
            b"\x23\x00\x00",
            b"\x21\x00\x00",
            b"\x00\x00",
            b"\xc3\x28",
            b"#",
            b"+",
            b"$share/g/",
        ];
        if self.below(8) == 0 {
            return (0..self.below(64)).map(|_| self.next() as u8).collect();
        }
        let mut data = seeds[self.below(seeds.len())].clone();
        for _ in 0..1 + self.below(4) {
            let len = data.len();
            match self.below(6) {
                0 if len > 0 => {
                    let i = self.below(len);
                    data[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    data[i] = self.next() as u8;
                }
                2 => data.truncate(self.below(len + 1)),
                3 => {
                    let tok = DICT[self.below(DICT.len())];
                    let at = self.below(len + 1);
                    data.splice(at..at, tok.iter().copied());
                }
                4 => {
                    let other = &seeds[self.below(seeds.len())];
                    let at = self.below(len + 1);
                    data.truncate(at);
                    data.extend_from_slice(&other[self.below(other.len() + 1)..]);
                }
                _ if len > 0 => {
                    let from = self.below(len);
                    let to = from + self.below(len - from + 1);
                    let chunk = data[from..to].to_vec();
                    data.extend_from_slice(&chunk);
                }
                _ => {}
            }
        }
        data
    }
}

#[test]
fn mutated_inputs_never_break_a_property() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    let iters = std::env::var("YUNBIAN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let mut m = Mutator(0x0005_eed0_fb05);
    let mut decoded = 0;
    for _ in 0..iters {
        let input = m.input(&seeds);
        let got = check_mqtt_stream(&input);
        decoded += got.before_connect + got.v311 + got.v5;
    }
    assert!(
        decoded > iters / 20,
        "mutations almost never decode ({decoded}): the seeds are not exercising the decoder"
    );
}

// ------------------------------------------------------------- proptest

fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/ $é]{1,24}".prop_filter("valid topic", |t| yunbian_bus::topic::valid_topic_name(t))
}

fn text() -> impl Strategy<Value = String> {
    "[ -~é°]{0,12}"
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn publish_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(text()),
        proptest::option::of(topic()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        proptest::collection::vec(1u32..268_435_455, 0..3),
        proptest::option::of(1u16..),
        proptest::collection::vec((text(), text()), 0..3),
    )
        .prop_map(|(pfi, exp, ct, rt, cd, ids, alias, user)| Properties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd.map(Bytes::from),
            subscription_identifiers: ids,
            topic_alias: alias,
            user_properties: user,
            ..Properties::default()
        })
}

fn reason_props() -> impl Strategy<Value = Properties> {
    (proptest::option::of(text()), proptest::collection::vec((text(), text()), 0..2))
        .prop_map(|(rs, user)| Properties { reason_string: rs, user_properties: user, ..Properties::default() })
}

fn v5_packet() -> impl Strategy<Value = Packet> {
    let publish = (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        1u16..,
        publish_props(),
        proptest::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(dup, qos, retain, topic, id, properties, payload)| {
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                topic,
                properties,
                payload: Bytes::from(payload),
            })
        });
    let ack = (0u8..7, 1u16.., any::<u8>(), reason_props()).prop_map(|(kind, id, reason, properties)| {
        let a = Ack { packet_id: id, reason, properties };
        match kind {
            0 => Packet::PubAck(a),
            1 => Packet::PubRec(a),
            2 => Packet::PubRel(a),
            3 => Packet::PubComp(a),
            4 => Packet::Disconnect(Disconnect { reason: a.reason, properties: a.properties }),
            5 => Packet::Auth(Auth { reason: a.reason, properties: a.properties }),
            _ => Packet::PingReq,
        }
    });
    let subscribe = (
        1u16..,
        proptest::option::of(1u32..268_435_455),
        proptest::collection::vec((topic(), qos(), any::<bool>(), any::<bool>(), 0u8..3), 1..4),
    )
        .prop_map(|(id, sub_id, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id: id,
                properties: Properties {
                    subscription_identifiers: sub_id.into_iter().collect(),
                    ..Properties::default()
                },
                filters: filters
                    .into_iter()
                    .map(|(f, qos, nl, rap, rh)| {
                        let retain_handling = match rh {
                            0 => RetainHandling::SendAtSubscribe,
                            1 => RetainHandling::SendIfNew,
                            _ => RetainHandling::DoNotSend,
                        };
                        (f, SubscriptionOptions { qos, no_local: nl, retain_as_published: rap, retain_handling })
                    })
                    .collect(),
            })
        });
    let acks = (
        1u16..,
        reason_props(),
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(topic(), 1..3),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(id, properties, codes, filters, sp, code)| match id % 4 {
            0 => Packet::SubAck(SubAck { packet_id: id, properties, codes }),
            1 => Packet::UnsubAck(UnsubAck { packet_id: id, properties, codes }),
            2 => Packet::Unsubscribe(Unsubscribe { packet_id: id, properties: Properties::default(), filters }),
            _ => Packet::ConnAck(ConnAck { session_present: sp, code, properties: Properties::default() }),
        });
    prop_oneof![publish, ack, subscribe, acks]
}

fn connect() -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<u16>(),
        text(),
        proptest::option::of((
            topic(),
            proptest::collection::vec(any::<u8>(), 0..8),
            qos(),
            any::<bool>(),
            proptest::option::of(any::<u32>()),
        )),
        proptest::option::of(text()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(v5, clean, ka, id, will, user, pass, expiry)| {
            let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
            let pass = if !v5 && user.is_none() { None } else { pass };
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start: clean,
                keep_alive: ka,
                properties: Properties { session_expiry_interval: expiry.filter(|_| v5), ..Properties::default() },
                client_id: id,
                will: will.map(|(topic, payload, qos, retain, delay)| LastWill {
                    topic,
                    payload: Bytes::from(payload),
                    qos,
                    retain,
                    properties: Properties { will_delay_interval: delay.filter(|_| v5), ..Properties::default() },
                }),
                username: user,
                password: pass.map(Bytes::from),
            }))
        })
}

/// A v5 packet's v3.1.1 equivalent (fields v3.1.1 cannot carry dropped).
fn as_v311(p: &Packet) -> Option<Packet> {
    let mut p = p.clone();
    match &mut p {
        Packet::Publish(x) => {
            x.properties = Properties::default();
            if x.topic.is_empty() {
                return None;
            }
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            a.reason = 0;
            a.properties = Properties::default();
        }
        Packet::Subscribe(s) => {
            s.properties = Properties::default();
            for (_, o) in &mut s.filters {
                *o = SubscriptionOptions::qos(o.qos);
            }
        }
        Packet::SubAck(s) => s.properties = Properties::default(),
        Packet::UnsubAck(u) => {
            u.properties = Properties::default();
            u.codes.clear();
        }
        Packet::Unsubscribe(u) => u.properties = Properties::default(),
        Packet::ConnAck(c) => c.properties = Properties::default(),
        Packet::Disconnect(d) => {
            d.reason = 0;
            d.properties = Properties::default();
        }
        Packet::Auth(_) => return None,
        _ => {}
    }
    Some(p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_mqtt_stream(&data);
    }

    #[test]
    fn v5_packets_round_trip(p in v5_packet()) {
        check_round_trip(&p, Some(Protocol::V5));
        if let Some(p3) = as_v311(&p) {
            check_round_trip(&p3, Some(Protocol::V311));
        }
    }

    #[test]
    fn connect_round_trips(p in connect()) {
        check_round_trip(&p, None);
    }
}
