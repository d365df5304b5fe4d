//! MQTT 3.1.1 (protocol level 4) and MQTT 5 (level 5) packets: a sans-IO
//! encoder and decoder. No sockets, no clock.
//!
//! # Framing
//!
//! Every packet is a fixed header (one byte: type in the high nibble, flags
//! in the low nibble), a Remaining Length (a variable byte integer of one
//! to four bytes, minimal encoding, at most 268,435,455), then that many
//! bytes of variable header and payload. [`decode`] looks at a receive
//! buffer and returns `Ok(None)` until a whole packet is there, then splits
//! it off; the packet's size is checked against the caller's maximum as
//! soon as its header is readable, so an oversize packet is refused before
//! its body is buffered.
//!
//! Everything but CONNECT depends on the protocol level, which the CONNECT
//! fixes for the connection: before it the decoder accepts only a CONNECT
//! (`version = None`).
//!
//! # What the decoder enforces
//!
//! It never panics and never allocates more than the packet it was given.
//! It refuses: reserved flag values, QoS 3, DUP on QoS 0, a packet that
//! ends before its fields do or has bytes left after them, non-minimal or
//! over-long variable byte integers, invalid UTF-8 and U+0000 in strings,
//! topic names with wildcards (or empty, unless a v5 topic alias stands in),
//! malformed topic filters, packet identifier 0, empty SUBSCRIBE and
//! UNSUBSCRIBE, MQTT 5 properties that are unknown, not allowed in that
//! packet, repeated, or out of range. Each refusal is a [`DecodeError`]
//! that maps to an MQTT 5 reason code ([`DecodeError::reason_code`]).
//!
//! Encoding is the inverse; `encode(decode(x)) → decode` yields an equal
//! packet (checked by `tests/bus_codec_fuzz.rs` and the fuzz target).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::topic::{parse_subscription_filter, valid_topic_name};

/// The largest Remaining Length a variable byte integer can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0: at most once, no acknowledgement.
    AtMostOnce = 0,
    /// QoS 1: at least once, PUBLISH → PUBACK.
    AtLeastOnce = 1,
    /// QoS 2: exactly once, PUBLISH → PUBREC → PUBREL → PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value (0, 1, 2), `None` for anything else.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The protocol version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Protocol {
    /// The protocol level byte of a CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// MQTT 5 reason codes the broker sends (and the v3.1.1 CONNACK codes).
pub mod reason {
    /// Success / normal disconnection / granted QoS 0.
    pub const SUCCESS: u8 = 0x00;
    /// Granted QoS 1.
    pub const GRANTED_QOS1: u8 = 0x01;
    /// Granted QoS 2.
    pub const GRANTED_QOS2: u8 = 0x02;
    /// DISCONNECT: publish the will anyway.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// PUBACK/PUBREC: accepted, but nobody was subscribed.
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    /// UNSUBACK: there was no such subscription.
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// Unspecified error.
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation-specific error.
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    /// CONNACK: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// CONNACK: client identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// CONNACK: bad user name or password.
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    /// CONNACK: not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Bad authentication method (enhanced authentication is refused).
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over by a new connection with the same client id.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// SUBACK: topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// PUBCOMP/PUBREL: packet identifier not found.
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Shared subscriptions not supported (with no-local).
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    /// v3.1.1 CONNACK: unacceptable protocol version.
    pub const V3_UNACCEPTABLE_PROTOCOL: u8 = 1;
    /// v3.1.1 CONNACK: identifier rejected.
    pub const V3_IDENTIFIER_REJECTED: u8 = 2;
    /// v3.1.1 CONNACK: server unavailable.
    pub const V3_SERVER_UNAVAILABLE: u8 = 3;
    /// v3.1.1 CONNACK: bad user name or password.
    pub const V3_BAD_USERNAME_OR_PASSWORD: u8 = 4;
    /// v3.1.1 CONNACK: not authorized.
    pub const V3_NOT_AUTHORIZED: u8 = 5;
    /// v3.1.1 SUBACK: failure.
    pub const V3_SUBACK_FAILURE: u8 = 0x80;
}

/// MQTT 5 properties. One struct serves every packet; the decoder refuses
/// a property the packet does not allow, so a decoded packet only has the
/// fields its kind permits. `None`/empty means absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01 (PUBLISH, will): 0 unspecified bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// 0x02 (PUBLISH, will): lifetime of the message in seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03 (PUBLISH, will): MIME type of the payload.
    pub content_type: Option<String>,
    /// 0x08 (PUBLISH, will): topic for a response.
    pub response_topic: Option<String>,
    /// 0x09 (PUBLISH, will): correlation data for a response.
    pub correlation_data: Option<Bytes>,
    /// 0x0B (PUBLISH: any number; SUBSCRIBE: at most one), 1..=268,435,455.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11 (CONNECT, CONNACK, DISCONNECT): seconds a session outlives its connection.
    pub session_expiry_interval: Option<u32>,
    /// 0x12 (CONNACK): the client id the server chose.
    pub assigned_client_identifier: Option<String>,
    /// 0x13 (CONNACK): keep alive the server wants.
    pub server_keep_alive: Option<u16>,
    /// 0x15 (CONNECT, CONNACK, AUTH): enhanced authentication method.
    pub authentication_method: Option<String>,
    /// 0x16 (CONNECT, CONNACK, AUTH): enhanced authentication data.
    pub authentication_data: Option<Bytes>,
    /// 0x17 (CONNECT): 0 or 1.
    pub request_problem_information: Option<u8>,
    /// 0x18 (will): seconds to wait before publishing the will.
    pub will_delay_interval: Option<u32>,
    /// 0x19 (CONNECT): 0 or 1.
    pub request_response_information: Option<u8>,
    /// 0x1A (CONNACK).
    pub response_information: Option<String>,
    /// 0x1C (CONNACK, DISCONNECT).
    pub server_reference: Option<String>,
    /// 0x1F (acks, CONNACK, DISCONNECT, AUTH): human-readable reason.
    pub reason_string: Option<String>,
    /// 0x21 (CONNECT, CONNACK): QoS 1/2 publications in flight, 1..=65535.
    pub receive_maximum: Option<u16>,
    /// 0x22 (CONNECT, CONNACK): highest topic alias accepted.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23 (PUBLISH): topic alias, 1..=65535.
    pub topic_alias: Option<u16>,
    /// 0x24 (CONNACK): 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25 (CONNACK): 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26 (every packet with properties): name/value pairs, in order.
    pub user_properties: Vec<(String, String)>,
    /// 0x27 (CONNECT, CONNACK): largest packet accepted, 1..
    pub maximum_packet_size: Option<u32>,
    /// 0x28 (CONNACK): 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29 (CONNACK): 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A (CONNACK): 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// Where a property set appears, which decides the properties allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    /// CONNECT.
    Connect,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// The will properties inside a CONNECT.
    Will,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK.
    SubAck,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// UNSUBACK.
    UnsubAck,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

fn property_allowed(id: u8, ctx: PropertyContext) -> bool {
    use PropertyContext::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == ConnAck,
        0x15 | 0x16 => matches!(ctx, Connect | ConnAck | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, ConnAck | Disconnect),
        0x1F => matches!(ctx, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | ConnAck),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

/// A will message registered by CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Topic name (valid, no wildcards).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS to publish it with.
    pub qos: QoS,
    /// Whether to retain it.
    pub retain: bool,
    /// v5 will properties (will delay, message properties).
    pub properties: Properties,
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version requested.
    pub protocol: Protocol,
    /// Clean session (v3.1.1) / clean start (v5).
    pub clean_start: bool,
    /// Keep alive in seconds (0: none).
    pub keep_alive: u16,
    /// v5 properties.
    pub properties: Properties,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Will message.
    pub will: Option<LastWill>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a session.
    pub session_present: bool,
    /// Return code (v3.1.1) or reason code (v5).
    pub code: u8,
    /// v5 properties.
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Re-delivery of an earlier attempt.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name; empty only with a v5 topic alias.
    pub topic: String,
    /// Packet identifier: `Some` exactly when `qos` is 1 or 2.
    pub packet_id: Option<u16>,
    /// v5 properties.
    pub properties: Properties,
    /// Application payload.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Packet identifier acknowledged.
    pub packet_id: u16,
    /// v5 reason code (always 0 in v3.1.1).
    pub reason: u8,
    /// v5 properties.
    pub properties: Properties,
}

impl Ack {
    /// A successful acknowledgement of `packet_id`.
    pub fn new(packet_id: u16) -> Ack {
        Ack { packet_id, reason: reason::SUCCESS, properties: Properties::default() }
    }
}

/// Retain handling option of a v5 subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at subscribe time.
    #[default]
    SendAtSubscribe,
    /// 1: send them only if the subscription did not exist.
    SendIfNew,
    /// 2: do not send retained messages.
    DoNotSend,
}

/// Options of one filter in a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// v5: do not deliver this client's own publications.
    pub no_local: bool,
    /// v5: keep the RETAIN flag as published.
    pub retain_as_published: bool,
    /// v5: when to send retained messages.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with only a QoS (what v3.1.1 can say).
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// v5 properties (subscription identifier, user properties).
    pub properties: Properties,
    /// Filters (valid, at least one) with their options.
    pub filters: Vec<(String, SubscriptionOptions)>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// v5 properties.
    pub properties: Properties,
    /// One return/reason code per filter.
    pub codes: Vec<u8>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// v5 properties.
    pub properties: Properties,
    /// Filters (valid, at least one).
    pub filters: Vec<String>,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// v5 properties.
    pub properties: Properties,
    /// v5: one reason code per filter (empty in v3.1.1).
    pub codes: Vec<u8>,
}

/// DISCONNECT (v5 reason and properties; v3.1.1 has neither).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason code.
    pub reason: u8,
    /// Properties.
    pub properties: Properties,
}

/// AUTH (v5 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Reason code.
    pub reason: u8,
    /// Properties.
    pub properties: Properties,
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (1).
    Connect(Box<Connect>),
    /// CONNACK (2).
    ConnAck(ConnAck),
    /// PUBLISH (3).
    Publish(Publish),
    /// PUBACK (4).
    PubAck(Ack),
    /// PUBREC (5).
    PubRec(Ack),
    /// PUBREL (6).
    PubRel(Ack),
    /// PUBCOMP (7).
    PubComp(Ack),
    /// SUBSCRIBE (8).
    Subscribe(Subscribe),
    /// SUBACK (9).
    SubAck(SubAck),
    /// UNSUBSCRIBE (10).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (11).
    UnsubAck(UnsubAck),
    /// PINGREQ (12).
    PingReq,
    /// PINGRESP (13).
    PingResp,
    /// DISCONNECT (14).
    Disconnect(Disconnect),
    /// AUTH (15, v5 only).
    Auth(Auth),
}

/// Why bytes are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The Remaining Length is longer than four bytes or not minimal.
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// The packet is larger than the maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Size of the whole packet.
        size: usize,
        /// Largest size accepted.
        max: usize,
    },
    /// Packet type 0, or 15 (AUTH) outside MQTT 5.
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// The fixed header flags have a reserved value.
    #[error("invalid flags {flags:#x} for packet type {packet_type}")]
    InvalidFlags {
        /// Packet type.
        packet_type: u8,
        /// The low nibble received.
        flags: u8,
    },
    /// A field runs past the end of the packet.
    #[error("packet ends inside a field")]
    Truncated,
    /// Bytes remain after the last field.
    #[error("unexpected bytes after the last field")]
    TrailingBytes,
    /// A string is not valid UTF-8 or contains U+0000.
    #[error("string is not well-formed UTF-8")]
    InvalidString,
    /// The CONNECT protocol name is not `MQTT`.
    #[error("protocol name is not MQTT")]
    InvalidProtocolName,
    /// The CONNECT asks for a protocol level other than 4 or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A QoS of 3, or DUP set on QoS 0.
    #[error("invalid QoS")]
    InvalidQoS,
    /// A topic name is empty (without alias) or has wildcards.
    #[error("invalid topic name")]
    InvalidTopicName,
    /// A topic filter is malformed.
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// A packet identifier is 0.
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A SUBSCRIBE or UNSUBSCRIBE without filters.
    #[error("no topic filters")]
    NoFilters,
    /// An unknown MQTT 5 property identifier.
    #[error("unknown property {0:#x}")]
    UnknownProperty(u8),
    /// A property not allowed in this packet.
    #[error("property {id:#x} not allowed in {context:?}")]
    PropertyNotAllowed {
        /// Property identifier.
        id: u8,
        /// The packet it appeared in.
        context: PropertyContext,
    },
    /// A property that may appear once appeared twice.
    #[error("duplicate property {0:#x}")]
    DuplicateProperty(u8),
    /// A property value out of its range (e.g. receive maximum 0).
    #[error("invalid value for property {0:#x}")]
    InvalidPropertyValue(u8),
    /// The CONNECT flags or SUBSCRIBE options have reserved bits or
    /// inconsistent values.
    #[error("malformed flags: {0}")]
    MalformedFlags(&'static str),
    /// The first packet of a connection is not a CONNECT.
    #[error("first packet is not CONNECT")]
    ExpectedConnect,
}

impl DecodeError {
    /// The MQTT 5 reason code to close the connection with.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::InvalidTopicName => reason::TOPIC_NAME_INVALID,
            DecodeError::UnsupportedProtocolLevel(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::ExpectedConnect
            | DecodeError::DuplicateProperty(_)
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::InvalidPacketType(_) => reason::PROTOCOL_ERROR,
            _ => reason::MALFORMED_PACKET,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    #[error("field longer than 65535 bytes")]
    FieldTooLong,
    /// The packet would exceed the largest Remaining Length.
    #[error("packet too large to encode")]
    PacketTooLarge,
    /// A QoS 1/2 PUBLISH without a packet identifier (or QoS 0 with one).
    #[error("packet identifier inconsistent with QoS")]
    PacketIdMismatch,
}

// ---------------------------------------------------------------- decoding

/// Reads the Remaining Length at `buf[1..]`: `Ok(None)` if more bytes are
/// needed, else `(value, bytes used)`.
fn read_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::MalformedRemainingLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Splits the next whole packet off `buf` and decodes it.
///
/// `version` is the connection's protocol (`None` before its CONNECT: only
/// a CONNECT is accepted then). `max_packet_size` bounds the whole packet
/// (fixed header included). Returns `Ok(None)` when `buf` holds only part
/// of a packet (nothing is consumed). On error, the connection must be
/// closed: the buffer's contents are unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Protocol>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let Some((len, len_bytes)) = read_remaining_length(buf)? else { return Ok(None) };
    let size = 1 + len_bytes + len;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(1 + len_bytes);
    decode_body(first, frame, version).map(Some)
}

/// Decodes one packet from a byte slice holding exactly one packet (for
/// tests and fuzzing); `Ok(None)` if it is incomplete.
pub fn decode_slice(
    bytes: &[u8],
    version: Option<Protocol>,
    max_packet_size: usize,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let before = buf.len();
    Ok(decode(&mut buf, version, max_packet_size)?.map(|p| (p, before - buf.len())))
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }
    fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7f) as u32) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(DecodeError::MalformedRemainingLength);
                }
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedRemainingLength)
    }
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidString)?;
        if s.contains('\0') {
            return Err(DecodeError::InvalidString);
        }
        Ok(s.to_owned())
    }
    fn rest(&mut self) -> Bytes {
        self.buf.split_to(self.buf.len())
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
    fn properties(&mut self, ctx: PropertyContext) -> Result<Properties, DecodeError> {
        let len = self.varint()? as usize;
        self.need(len)?;
        let mut r = Reader { buf: self.buf.split_to(len) };
        let mut p = Properties::default();
        fn once<T>(slot: &mut Option<T>, id: u8, v: T) -> Result<(), DecodeError> {
            if slot.is_some() {
                return Err(DecodeError::DuplicateProperty(id));
            }
            *slot = Some(v);
            Ok(())
        }
        fn flag(id: u8, v: u8) -> Result<u8, DecodeError> {
            if v > 1 {
                Err(DecodeError::InvalidPropertyValue(id))
            } else {
                Ok(v)
            }
        }
        while !r.is_empty() {
            let id = r.u8()?;
            if !matches!(id, 0x01..=0x03 | 0x08 | 0x09 | 0x0B | 0x11..=0x13 | 0x15..=0x19 | 0x1A | 0x1C | 0x1F | 0x21..=0x2A)
            {
                return Err(DecodeError::UnknownProperty(id));
            }
            if !property_allowed(id, ctx) {
                return Err(DecodeError::PropertyNotAllowed { id, context: ctx });
            }
            match id {
                0x01 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.payload_format_indicator, id, v)?
                }
                0x02 => {
                    let v = r.u32()?;
                    once(&mut p.message_expiry_interval, id, v)?
                }
                0x03 => {
                    let v = r.string()?;
                    once(&mut p.content_type, id, v)?
                }
                0x08 => {
                    let v = r.string()?;
                    if !valid_topic_name(&v) {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    once(&mut p.response_topic, id, v)?
                }
                0x09 => {
                    let v = r.binary()?;
                    once(&mut p.correlation_data, id, v)?
                }
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    if ctx == PropertyContext::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::DuplicateProperty(id));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => {
                    let v = r.u32()?;
                    once(&mut p.session_expiry_interval, id, v)?
                }
                0x12 => {
                    let v = r.string()?;
                    once(&mut p.assigned_client_identifier, id, v)?
                }
                0x13 => {
                    let v = r.u16()?;
                    once(&mut p.server_keep_alive, id, v)?
                }
                0x15 => {
                    let v = r.string()?;
                    once(&mut p.authentication_method, id, v)?
                }
                0x16 => {
                    let v = r.binary()?;
                    once(&mut p.authentication_data, id, v)?
                }
                0x17 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.request_problem_information, id, v)?
                }
                0x18 => {
                    let v = r.u32()?;
                    once(&mut p.will_delay_interval, id, v)?
                }
                0x19 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.request_response_information, id, v)?
                }
                0x1A => {
                    let v = r.string()?;
                    once(&mut p.response_information, id, v)?
                }
                0x1C => {
                    let v = r.string()?;
                    once(&mut p.server_reference, id, v)?
                }
                0x1F => {
                    let v = r.string()?;
                    once(&mut p.reason_string, id, v)?
                }
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    once(&mut p.receive_maximum, id, v)?
                }
                0x22 => {
                    let v = r.u16()?;
                    once(&mut p.topic_alias_maximum, id, v)?
                }
                0x23 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    once(&mut p.topic_alias, id, v)?
                }
                0x24 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.maximum_qos, id, v)?
                }
                0x25 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.retain_available, id, v)?
                }
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(id));
                    }
                    once(&mut p.maximum_packet_size, id, v)?
                }
                0x28 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.wildcard_subscription_available, id, v)?
                }
                0x29 => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.subscription_identifier_available, id, v)?
                }
                0x2A => {
                    let v = flag(id, r.u8()?)?;
                    once(&mut p.shared_subscription_available, id, v)?
                }
                _ => return Err(DecodeError::UnknownProperty(id)),
            }
        }
        Ok(p)
    }
}

fn decode_body(first: u8, body: Bytes, version: Option<Protocol>) -> Result<Packet, DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    let mut r = Reader { buf: body };
    let check_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::InvalidFlags { packet_type, flags })
        }
    };
    if packet_type == 1 {
        check_flags(0)?;
        return decode_connect(&mut r).map(|c| Packet::Connect(Box::new(c)));
    }
    if packet_type == 0 {
        return Err(DecodeError::InvalidPacketType(0));
    }
    let Some(version) = version else { return Err(DecodeError::ExpectedConnect) };
    let v5 = version == Protocol::V5;
    let packet = match packet_type {
        2 => {
            check_flags(0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xfe != 0 {
                return Err(DecodeError::MalformedFlags("CONNACK reserved bits"));
            }
            let code = r.u8()?;
            let properties = if v5 { r.properties(PropertyContext::ConnAck)? } else { Properties::default() };
            Packet::ConnAck(ConnAck { session_present: ack_flags & 1 == 1, code, properties })
        }
        3 => {
            let dup = flags & 0x08 != 0;
            let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
            if dup && qos == QoS::AtMostOnce {
                return Err(DecodeError::InvalidQoS);
            }
            let retain = flags & 0x01 != 0;
            let topic = r.string()?;
            let packet_id = if qos == QoS::AtMostOnce { None } else { Some(r.packet_id()?) };
            let properties = if v5 { r.properties(PropertyContext::Publish)? } else { Properties::default() };
            let topic_ok = if topic.is_empty() { properties.topic_alias.is_some() } else { valid_topic_name(&topic) };
            if !topic_ok {
                return Err(DecodeError::InvalidTopicName);
            }
            Packet::Publish(Publish { dup, qos, retain, topic, packet_id, properties, payload: r.rest() })
        }
        4..=7 => {
            check_flags(if packet_type == 6 { 0b0010 } else { 0 })?;
            let packet_id = r.packet_id()?;
            let (reason, properties) = if v5 && !r.is_empty() {
                let reason = r.u8()?;
                let props = if r.is_empty() { Properties::default() } else { r.properties(PropertyContext::Ack)? };
                (reason, props)
            } else {
                (0, Properties::default())
            };
            let ack = Ack { packet_id, reason, properties };
            match packet_type {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                6 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        }
        8 => {
            check_flags(0b0010)?;
            let packet_id = r.packet_id()?;
            let properties = if v5 { r.properties(PropertyContext::Subscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                if parse_subscription_filter(&filter).is_none() {
                    return Err(DecodeError::InvalidTopicFilter);
                }
                let o = r.u8()?;
                let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::InvalidQoS)?;
                let options = if v5 {
                    if o & 0xc0 != 0 {
                        return Err(DecodeError::MalformedFlags("subscription options reserved bits"));
                    }
                    let retain_handling = match (o >> 4) & 0x03 {
                        0 => RetainHandling::SendAtSubscribe,
                        1 => RetainHandling::SendIfNew,
                        2 => RetainHandling::DoNotSend,
                        _ => return Err(DecodeError::MalformedFlags("retain handling 3")),
                    };
                    SubscriptionOptions {
                        qos,
                        no_local: o & 0x04 != 0,
                        retain_as_published: o & 0x08 != 0,
                        retain_handling,
                    }
                } else {
                    if o & 0xfc != 0 {
                        return Err(DecodeError::MalformedFlags("requested QoS reserved bits"));
                    }
                    SubscriptionOptions::qos(qos)
                };
                filters.push((filter, options));
            }
            if filters.is_empty() {
                return Err(DecodeError::NoFilters);
            }
            Packet::Subscribe(Subscribe { packet_id, properties, filters })
        }
        9 => {
            check_flags(0)?;
            let packet_id = r.packet_id()?;
            let properties = if v5 { r.properties(PropertyContext::SubAck)? } else { Properties::default() };
            let codes = r.rest().to_vec();
            Packet::SubAck(SubAck { packet_id, properties, codes })
        }
        10 => {
            check_flags(0b0010)?;
            let packet_id = r.packet_id()?;
            let properties = if v5 { r.properties(PropertyContext::Unsubscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                if parse_subscription_filter(&filter).is_none() {
                    return Err(DecodeError::InvalidTopicFilter);
                }
                filters.push(filter);
            }
            if filters.is_empty() {
                return Err(DecodeError::NoFilters);
            }
            Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
        }
        11 => {
            check_flags(0)?;
            let packet_id = r.packet_id()?;
            let (properties, codes) = if v5 {
                (r.properties(PropertyContext::UnsubAck)?, r.rest().to_vec())
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck { packet_id, properties, codes })
        }
        12 => {
            check_flags(0)?;
            Packet::PingReq
        }
        13 => {
            check_flags(0)?;
            Packet::PingResp
        }
        14 => {
            check_flags(0)?;
            let (reason, properties) = if v5 && !r.is_empty() {
                let reason = r.u8()?;
                let props =
                    if r.is_empty() { Properties::default() } else { r.properties(PropertyContext::Disconnect)? };
                (reason, props)
            } else {
                (0, Properties::default())
            };
            Packet::Disconnect(Disconnect { reason, properties })
        }
        15 if v5 => {
            check_flags(0)?;
            let (reason, properties) = if !r.is_empty() {
                let reason = r.u8()?;
                let props = if r.is_empty() { Properties::default() } else { r.properties(PropertyContext::Auth)? };
                (reason, props)
            } else {
                (0, Properties::default())
            };
            Packet::Auth(Auth { reason, properties })
        }
        t => return Err(DecodeError::InvalidPacketType(t)),
    };
    r.finish()?;
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    if &name[..] != b"MQTT" {
        // MQTT 3.1 says "MQIsdp" with level 3: answer "unacceptable version".
        if &name[..] == b"MQIsdp" {
            return Err(DecodeError::UnsupportedProtocolLevel(level));
        }
        return Err(DecodeError::InvalidProtocolName);
    }
    let protocol = match level {
        4 => Protocol::V311,
        5 => Protocol::V5,
        other => return Err(DecodeError::UnsupportedProtocolLevel(other)),
    };
    let v5 = protocol == Protocol::V5;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::MalformedFlags("CONNECT reserved bit"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::MalformedFlags("will QoS/retain without will"));
    }
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::MalformedFlags("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 { r.properties(PropertyContext::Connect)? } else { Properties::default() };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 { r.properties(PropertyContext::Will)? } else { Properties::default() };
        let topic = r.string()?;
        if !valid_topic_name(&topic) {
            return Err(DecodeError::InvalidTopicName);
        }
        let payload = r.binary()?;
        Some(LastWill { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };
    r.finish()?;
    Ok(Connect { protocol, clean_start, keep_alive, properties, client_id, will, username, password })
}

// ---------------------------------------------------------------- encoding

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

/// Bytes a variable byte integer takes.
pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) -> Result<(), EncodeError> {
    let n = u16::try_from(b.len()).map_err(|_| EncodeError::FieldTooLong)?;
    out.put_u16(n);
    out.put_slice(b);
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_binary(out, s.as_bytes())
}

fn encode_properties(p: &Properties, out: &mut BytesMut) -> Result<(), EncodeError> {
    let mut b = BytesMut::new();
    if let Some(v) = p.payload_format_indicator {
        b.put_u8(0x01);
        b.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        b.put_u8(0x02);
        b.put_u32(v);
    }
    if let Some(v) = &p.content_type {
        b.put_u8(0x03);
        put_str(&mut b, v)?;
    }
    if let Some(v) = &p.response_topic {
        b.put_u8(0x08);
        put_str(&mut b, v)?;
    }
    if let Some(v) = &p.correlation_data {
        b.put_u8(0x09);
        put_binary(&mut b, v)?;
    }
    for &v in &p.subscription_identifiers {
        b.put_u8(0x0B);
        put_varint(&mut b, v as usize);
    }
    if let Some(v) = p.session_expiry_interval {
        b.put_u8(0x11);
        b.put_u32(v);
    }
    if let Some(v) = &p.assigned_client_identifier {
        b.put_u8(0x12);
        put_str(&mut b, v)?;
    }
    if let Some(v) = p.server_keep_alive {
        b.put_u8(0x13);
        b.put_u16(v);
    }
    if let Some(v) = &p.authentication_method {
        b.put_u8(0x15);
        put_str(&mut b, v)?;
    }
    if let Some(v) = &p.authentication_data {
        b.put_u8(0x16);
        put_binary(&mut b, v)?;
    }
    if let Some(v) = p.request_problem_information {
        b.put_u8(0x17);
        b.put_u8(v);
    }
    if let Some(v) = p.will_delay_interval {
        b.put_u8(0x18);
        b.put_u32(v);
    }
    if let Some(v) = p.request_response_information {
        b.put_u8(0x19);
        b.put_u8(v);
    }
    if let Some(v) = &p.response_information {
        b.put_u8(0x1A);
        put_str(&mut b, v)?;
    }
    if let Some(v) = &p.server_reference {
        b.put_u8(0x1C);
        put_str(&mut b, v)?;
    }
    if let Some(v) = &p.reason_string {
        b.put_u8(0x1F);
        put_str(&mut b, v)?;
    }
    if let Some(v) = p.receive_maximum {
        b.put_u8(0x21);
        b.put_u16(v);
    }
    if let Some(v) = p.topic_alias_maximum {
        b.put_u8(0x22);
        b.put_u16(v);
    }
    if let Some(v) = p.topic_alias {
        b.put_u8(0x23);
        b.put_u16(v);
    }
    if let Some(v) = p.maximum_qos {
        b.put_u8(0x24);
        b.put_u8(v);
    }
    if let Some(v) = p.retain_available {
        b.put_u8(0x25);
        b.put_u8(v);
    }
    for (k, v) in &p.user_properties {
        b.put_u8(0x26);
        put_str(&mut b, k)?;
        put_str(&mut b, v)?;
    }
    if let Some(v) = p.maximum_packet_size {
        b.put_u8(0x27);
        b.put_u32(v);
    }
    if let Some(v) = p.wildcard_subscription_available {
        b.put_u8(0x28);
        b.put_u8(v);
    }
    if let Some(v) = p.subscription_identifier_available {
        b.put_u8(0x29);
        b.put_u8(v);
    }
    if let Some(v) = p.shared_subscription_available {
        b.put_u8(0x2A);
        b.put_u8(v);
    }
    if b.len() > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    put_varint(out, b.len());
    out.put_slice(&b);
    Ok(())
}

fn finish_packet(first: u8, body: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    if body.len() > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    out.reserve(1 + varint_len(body.len()) + body.len());
    out.put_u8(first);
    put_varint(out, body.len());
    out.put_slice(body);
    Ok(())
}

/// Encodes a PUBLISH straight into `out` (the hot path: the payload is
/// copied once). Returns the packet's size.
pub fn encode_publish(p: &Publish, version: Protocol, out: &mut BytesMut) -> Result<usize, EncodeError> {
    if (p.qos == QoS::AtMostOnce) != p.packet_id.is_none() {
        return Err(EncodeError::PacketIdMismatch);
    }
    let topic_len = u16::try_from(p.topic.len()).map_err(|_| EncodeError::FieldTooLong)?;
    let mut props = BytesMut::new();
    if version == Protocol::V5 {
        encode_properties(&p.properties, &mut props)?;
    }
    let remaining = 2 + p.topic.len() + if p.packet_id.is_some() { 2 } else { 0 } + props.len() + p.payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    let size = 1 + varint_len(remaining) + remaining;
    out.reserve(size);
    out.put_u8(0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain));
    put_varint(out, remaining);
    out.put_u16(topic_len);
    out.put_slice(p.topic.as_bytes());
    if let Some(id) = p.packet_id {
        out.put_u16(id);
    }
    out.put_slice(&props);
    out.put_slice(&p.payload);
    Ok(size)
}

fn encode_ack_like(
    first: u8,
    packet_id: Option<u16>,
    reason: u8,
    props: &Properties,
    version: Protocol,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut b = BytesMut::new();
    if let Some(id) = packet_id {
        b.put_u16(id);
    }
    if version == Protocol::V5 && (reason != 0 || !props.is_empty()) {
        b.put_u8(reason);
        if !props.is_empty() {
            encode_properties(props, &mut b)?;
        }
    }
    finish_packet(first, &b, out)
}

/// Encodes `packet` for a connection speaking `version` (a CONNECT uses
/// its own protocol) and appends it to `out`.
pub fn encode(packet: &Packet, version: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = version == Protocol::V5;
    let mut b = BytesMut::new();
    match packet {
        Packet::Connect(c) => {
            let v5 = c.protocol == Protocol::V5;
            put_str(&mut b, "MQTT")?;
            b.put_u8(c.protocol.level());
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            b.put_u8(flags);
            b.put_u16(c.keep_alive);
            if v5 {
                encode_properties(&c.properties, &mut b)?;
            }
            put_str(&mut b, &c.client_id)?;
            if let Some(w) = &c.will {
                if v5 {
                    encode_properties(&w.properties, &mut b)?;
                }
                put_str(&mut b, &w.topic)?;
                put_binary(&mut b, &w.payload)?;
            }
            if let Some(u) = &c.username {
                put_str(&mut b, u)?;
            }
            if let Some(p) = &c.password {
                put_binary(&mut b, p)?;
            }
            finish_packet(0x10, &b, out)
        }
        Packet::ConnAck(c) => {
            b.put_u8(u8::from(c.session_present));
            b.put_u8(c.code);
            if v5 {
                encode_properties(&c.properties, &mut b)?;
            }
            finish_packet(0x20, &b, out)
        }
        Packet::Publish(p) => encode_publish(p, version, out).map(|_| ()),
        Packet::PubAck(a) => encode_ack_like(0x40, Some(a.packet_id), a.reason, &a.properties, version, out),
        Packet::PubRec(a) => encode_ack_like(0x50, Some(a.packet_id), a.reason, &a.properties, version, out),
        Packet::PubRel(a) => encode_ack_like(0x62, Some(a.packet_id), a.reason, &a.properties, version, out),
        Packet::PubComp(a) => encode_ack_like(0x70, Some(a.packet_id), a.reason, &a.properties, version, out),
        Packet::Subscribe(s) => {
            b.put_u16(s.packet_id);
            if v5 {
                encode_properties(&s.properties, &mut b)?;
            }
            for (f, o) in &s.filters {
                put_str(&mut b, f)?;
                let mut opt = o.qos as u8;
                if v5 {
                    opt |= u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3;
                    opt |= (o.retain_handling as u8) << 4;
                }
                b.put_u8(opt);
            }
            finish_packet(0x82, &b, out)
        }
        Packet::SubAck(s) => {
            b.put_u16(s.packet_id);
            if v5 {
                encode_properties(&s.properties, &mut b)?;
            }
            b.put_slice(&s.codes);
            finish_packet(0x90, &b, out)
        }
        Packet::Unsubscribe(u) => {
            b.put_u16(u.packet_id);
            if v5 {
                encode_properties(&u.properties, &mut b)?;
            }
            for f in &u.filters {
                put_str(&mut b, f)?;
            }
            finish_packet(0xA2, &b, out)
        }
        Packet::UnsubAck(u) => {
            b.put_u16(u.packet_id);
            if v5 {
                encode_properties(&u.properties, &mut b)?;
                b.put_slice(&u.codes);
            }
            finish_packet(0xB0, &b, out)
        }
        Packet::PingReq => finish_packet(0xC0, &[], out),
        Packet::PingResp => finish_packet(0xD0, &[], out),
        Packet::Disconnect(d) => encode_ack_like(0xE0, None, d.reason, &d.properties, version, out),
        Packet::Auth(a) => encode_ack_like(0xF0, None, a.reason, &a.properties, version, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_rules() {
        // Five length bytes.
        let mut b = BytesMut::from(&[0xC0u8, 0x80, 0x80, 0x80, 0x80, 0x01][..]);
        assert_eq!(decode(&mut b, Some(Protocol::V5), usize::MAX), Err(DecodeError::MalformedRemainingLength));
        // Non-minimal zero.
        let mut b = BytesMut::from(&[0xC0u8, 0x80, 0x00][..]);
        assert_eq!(decode(&mut b, Some(Protocol::V5), usize::MAX), Err(DecodeError::MalformedRemainingLength));
        // Incomplete.
        let mut b = BytesMut::from(&[0x30u8, 0x80][..]);
        assert_eq!(decode(&mut b, Some(Protocol::V5), usize::MAX), Ok(None));
        // Too large before the body arrives.
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(decode(&mut b, Some(Protocol::V5), 1024), Err(DecodeError::PacketTooLarge { .. })));
    }

    #[test]
    fn ping_round_trip() {
        let mut out = BytesMut::new();
        encode(&Packet::PingReq, Protocol::V311, &mut out).expect("encode");
        assert_eq!(&out[..], &[0xC0, 0x00]);
        assert_eq!(decode(&mut out, Some(Protocol::V311), 10), Ok(Some(Packet::PingReq)));
    }
}
