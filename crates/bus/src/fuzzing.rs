//! Per-input check shared by the `mqtt_decode` fuzz target
//! (`fuzz/fuzz_targets/mqtt_decode.rs`) and the corpus replay test
//! (`tests/bus_codec_fuzz.rs`).
//!
//! [`check_mqtt_stream`] accepts any bytes. It returns normally for every
//! input the codec handles correctly (decoded or refused) and panics only
//! when a property is violated — that panic is the bug a fuzzer reports.

use bytes::BytesMut;

use crate::codec::{decode, encode, Packet, Protocol};

/// How an input fared under each protocol context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCheck {
    /// Packets decoded before CONNECT (only CONNECT can decode there).
    pub before_connect: usize,
    /// Packets decoded as MQTT 3.1.1.
    pub v311: usize,
    /// Packets decoded as MQTT 5.
    pub v5: usize,
}

/// Largest packet accepted by the check (bounds memory like the broker).
pub const FUZZ_MAX_PACKET: usize = 64 * 1024;

/// Decodes `data` as a stream of packets in the three contexts (before
/// CONNECT, v3.1.1, v5), each until it needs more bytes or fails. Every
/// decoded packet is encoded again and must decode to an equal packet with
/// nothing left over.
pub fn check_mqtt_stream(data: &[u8]) -> StreamCheck {
    StreamCheck {
        before_connect: check_in(data, None),
        v311: check_in(data, Some(Protocol::V311)),
        v5: check_in(data, Some(Protocol::V5)),
    }
}

fn check_in(data: &[u8], version: Option<Protocol>) -> usize {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Ok(Some(packet)) = decode(&mut buf, version, FUZZ_MAX_PACKET) {
        n += 1;
        check_round_trip(&packet, version);
    }
    n
}

/// Encodes `packet` and decodes it again: the result must be equal.
pub fn check_round_trip(packet: &Packet, version: Option<Protocol>) {
    let enc_version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version.unwrap_or(Protocol::V5),
    };
    let mut out = BytesMut::new();
    if let Err(e) = encode(packet, enc_version, &mut out) {
        panic!("decoded packet does not encode: {e}: {packet:?}");
    }
    let bytes = out.clone();
    match decode(&mut out, Some(enc_version), usize::MAX) {
        Ok(Some(again)) => {
            assert_eq!(&again, packet, "packet changed through encode/decode; bytes {:02x?}", &bytes[..]);
            assert!(out.is_empty(), "encoder wrote bytes the decoder did not consume: {:02x?}", &bytes[..]);
        }
        other => panic!("encoded packet does not decode: {other:?}; packet {packet:?}; bytes {:02x?}", &bytes[..]),
    }
}
