//! Frames of the native wire protocol, and their byte layout.
//!
//! docs/PROTOCOL.md is the reference; this module is its implementation. Every frame is
//!
//! ```text
//! u32 length                     bytes after this field (big-endian, like every integer here)
//! u16 magic = 0x6562 ("eb")
//! u8  version = 1
//! u8  signal                     C E K V n n n n   (control, event, key present, envelope present, command)
//! u32 source id
//! u32 destination id
//! u64 correlation                subscription id, request id … (meaning depends on the command)
//! [u64 balance key]              only when K is set
//! body                           depends on the command
//! ```
//!
//! Decoding never panics and treats a partial frame as "need more bytes" ([`decode`] returns
//! `Ok(None)`), never as an error. A maximum frame size is always enforced, before the frame's
//! bytes have arrived.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use thiserror::Error;

/// The two magic bytes that open every frame header: `"eb"`.
pub const MAGIC: u16 = 0x6562;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Size of the fixed header after the length prefix, without the optional balance key.
pub const HEADER_LEN: usize = 20;
/// Default maximum frame size (the value of the length prefix): 1 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1024 * 1024;
/// Size of the optional envelope in data frames.
pub const ENVELOPE_LEN: usize = 40;

/// Signal byte bit: control frame (handshake, subscriptions, errors) rather than data.
pub const SIGNAL_CONTROL: u8 = 0x80;
/// Signal byte bit: an event, fanned out to subscribers (data frames only).
pub const SIGNAL_EVENT: u8 = 0x40;
/// Signal byte bit: a 64-bit balance key follows the fixed header.
pub const SIGNAL_KEY: u8 = 0x20;
/// Signal byte bit: a data frame carries the 40-byte envelope.
pub const SIGNAL_ENVELOPE: u8 = 0x10;

/// Why bytes could not be decoded into a frame, or a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced (or, when encoding, computed) size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The length prefix is smaller than the fixed header.
    #[error("frame of {size} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Announced size.
        size: usize,
    },
    /// The frame does not start with `"eb"`.
    #[error("bad magic 0x{0:04x}, expected 0x6562 (\"eb\")")]
    BadMagic(u16),
    /// A protocol version this implementation does not speak.
    #[error("unsupported protocol version {0}, this side speaks {VERSION}")]
    UnsupportedVersion(u8),
    /// The signal byte names no known command.
    #[error("unknown command in signal byte 0x{0:02x}")]
    UnknownCommand(u8),
    /// A flag that this command does not allow (balance key or envelope on a control frame).
    #[error("flags 0x{0:02x} are not allowed on this command")]
    BadFlags(u8),
    /// A field runs past the end of the frame.
    #[error("field `{0}` runs past the end of the frame")]
    Truncated(&'static str),
    /// Bytes left over after the last field of a frame that has no payload.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A text field is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// An enumerated field has an unknown value.
    #[error("field `{field}` has unknown value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// When encoding: a text field longer than its 16-bit length allows.
    #[error("field `{0}` is longer than 65535 bytes")]
    FieldTooLong(&'static str),
}

/// Error codes carried by [`Frame::Error`]. The numbering groups them: 1xx protocol, 2xx limits,
/// 3xx authentication and permissions, 4xx requests, 5xx server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 100: bytes that are not a valid frame. The connection is closed.
    MalformedFrame,
    /// 101: a frame larger than the announced maximum. The connection is closed.
    FrameTooLarge,
    /// 102: the peer speaks another protocol version. The connection is closed.
    UnsupportedVersion,
    /// 103: the first frame was not HELLO, or a second HELLO arrived. The connection is closed.
    HandshakeRequired,
    /// 104: a publish topic that breaks the topic rules. The connection stays open.
    InvalidTopic,
    /// 105: a subscription pattern that breaks the pattern rules. The connection stays open.
    InvalidPattern,
    /// 106: UNSUB of a subscription id that is not known. The connection stays open.
    UnknownSubscription,
    /// 107: SUB with a subscription id already in use. The connection stays open.
    DuplicateSubscription,
    /// 108: a frame the receiving side never accepts (a client sending MSG, say). Closed.
    UnexpectedFrame,
    /// 109: a REPLY that is malformed for its purpose (no requester named). Stays open.
    InvalidReply,
    /// 200: the connection did not read its messages fast enough. The connection is closed.
    SlowConsumer,
    /// 201: the broker is at its connection limit. The connection is closed.
    TooManyConnections,
    /// 202: the connection is at its subscription limit. The connection stays open.
    TooManySubscriptions,
    /// 203: no HELLO within the handshake timeout. The connection is closed.
    HandshakeTimeout,
    /// 204: the connection has too many requests in flight. The request fails.
    TooManyRequests,
    /// 205: no frame from the peer for heartbeat interval × (max missed + 1). The connection is closed.
    StaleConnection,
    /// 300: authentication failed. The connection is closed.
    AuthenticationFailed,
    /// 301: not allowed to publish or subscribe there. The connection stays open.
    PermissionDenied,
    /// 302: the broker accepts only TLS connections. The connection is closed.
    TlsRequired,
    /// 400: a request found nobody to answer it.
    NoResponders,
    /// 401: a request was not answered in time.
    Timeout,
    /// 402: the handler of a request or command failed.
    HandlerError,
    /// 403: the responder disconnected before it replied.
    ResponderLost,
    /// 500: the broker is shutting down; reconnect elsewhere. The connection is closed.
    ShuttingDown,
    /// 501: an internal broker error.
    Internal,
    /// A code this implementation does not know, kept as received.
    Other(u16),
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::MalformedFrame => 100,
            Self::FrameTooLarge => 101,
            Self::UnsupportedVersion => 102,
            Self::HandshakeRequired => 103,
            Self::InvalidTopic => 104,
            Self::InvalidPattern => 105,
            Self::UnknownSubscription => 106,
            Self::DuplicateSubscription => 107,
            Self::UnexpectedFrame => 108,
            Self::InvalidReply => 109,
            Self::SlowConsumer => 200,
            Self::TooManyConnections => 201,
            Self::TooManySubscriptions => 202,
            Self::HandshakeTimeout => 203,
            Self::TooManyRequests => 204,
            Self::StaleConnection => 205,
            Self::AuthenticationFailed => 300,
            Self::PermissionDenied => 301,
            Self::TlsRequired => 302,
            Self::NoResponders => 400,
            Self::Timeout => 401,
            Self::HandlerError => 402,
            Self::ResponderLost => 403,
            Self::ShuttingDown => 500,
            Self::Internal => 501,
            Self::Other(code) => code,
        }
    }

    /// The code for a number received on the wire.
    pub fn from_u16(code: u16) -> Self {
        match code {
            100 => Self::MalformedFrame,
            101 => Self::FrameTooLarge,
            102 => Self::UnsupportedVersion,
            103 => Self::HandshakeRequired,
            104 => Self::InvalidTopic,
            105 => Self::InvalidPattern,
            106 => Self::UnknownSubscription,
            107 => Self::DuplicateSubscription,
            108 => Self::UnexpectedFrame,
            109 => Self::InvalidReply,
            200 => Self::SlowConsumer,
            201 => Self::TooManyConnections,
            202 => Self::TooManySubscriptions,
            203 => Self::HandshakeTimeout,
            204 => Self::TooManyRequests,
            205 => Self::StaleConnection,
            300 => Self::AuthenticationFailed,
            301 => Self::PermissionDenied,
            302 => Self::TlsRequired,
            400 => Self::NoResponders,
            401 => Self::Timeout,
            402 => Self::HandlerError,
            403 => Self::ResponderLost,
            500 => Self::ShuttingDown,
            501 => Self::Internal,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(code) => write!(f, "{code}"),
            known => write!(f, "{} {:?}", known.as_u16(), known),
        }
    }
}

/// Ordered key/value text pairs: message headers, handshake properties.
///
/// One pointer wide, and no allocation while empty (most messages have no headers): every
/// message carries one, and messages are moved through several queues.
#[derive(Clone, Default)]
// The Box is the point: a thin pointer in every message, where a Vec would be three words.
#[allow(clippy::box_collection)]
pub struct Headers(Option<Box<Vec<(ByteString, ByteString)>>>);

impl Headers {
    /// No headers; does not allocate.
    pub const fn new() -> Self {
        Self(None)
    }
    fn from_vec(pairs: Vec<(ByteString, ByteString)>) -> Self {
        Self((!pairs.is_empty()).then(|| Box::new(pairs)))
    }
    fn pairs(&self) -> &[(ByteString, ByteString)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
    /// Appends a pair (keys may repeat).
    pub fn insert(&mut self, key: impl Into<ByteString>, value: impl Into<ByteString>) {
        self.0.get_or_insert_default().push((key.into(), value.into()));
    }
    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs().iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }
    /// All pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.pairs() == other.pairs()
    }
}

impl Eq for Headers {}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Headers").field(&self.pairs()).finish()
    }
}

impl<K: Into<ByteString>, V: Into<ByteString>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_vec(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// Envelope metadata of a data frame: message id, transaction id, occurred-at time.
///
/// Aligned to 8 bytes, not 16 (the alignment of `u128`), so that it takes 40 bytes in a
/// message rather than 64. Its fields are read by value (`e.id`), not borrowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(Rust, packed(8))]
pub struct Envelope {
    /// Unique, sortable message id.
    pub id: u128,
    /// Id of the transaction (the causal chain) this message belongs to.
    pub tx: u128,
    /// When the event occurred, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
}

/// How a group chooses the one member that receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupPolicy {
    /// 1: a member chosen at random.
    Random,
    /// 2: members in turn (of those matching the message's topic, the one chosen longest ago).
    RoundRobin,
    /// 3: consistent hashing of the message's balance key: a key stays with its member while
    /// the group's membership does not change. Messages without a key go round-robin. A member
    /// is its subscription: one that resubscribes (or reconnects) joins as a new member and wins
    /// its own share of keys, not necessarily the ones it had.
    Hash,
}

impl GroupPolicy {
    fn to_u8(self) -> u8 {
        match self {
            Self::Random => 1,
            Self::RoundRobin => 2,
            Self::Hash => 3,
        }
    }
}

/// Membership of a subscription in a load-balanced group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group name; subscriptions with the same name and pattern share the messages.
    pub name: ByteString,
    /// How a member is chosen.
    pub policy: GroupPolicy,
}

/// The message carried by PUB (client → broker) and MSG (broker → client) frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Service id of the sender (the broker fills it in for MSG).
    pub source: u32,
    /// Service id of the addressee, 0 for "whoever subscribes".
    pub destination: u32,
    /// Balance key, used by groups with the hash policy.
    pub key: Option<u64>,
    /// Optional envelope metadata.
    pub envelope: Option<Envelope>,
    /// The topic, a valid topic without wildcards.
    pub topic: ByteString,
    /// Application headers.
    pub headers: Headers,
    /// Opaque application bytes.
    pub payload: Bytes,
}

impl Message {
    /// A message with only topic and payload set.
    pub fn new(topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Self {
        Self {
            source: 0,
            destination: 0,
            key: None,
            envelope: None,
            topic: topic.into(),
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// A copy whose topic, headers and payload live in allocations of their own. A decoded
    /// message shares the whole buffer its frame was read into: one kept long (queued for a
    /// slow reader, say) keeps all of that buffer alive. Topic and payload share one allocation.
    pub fn detached(&self) -> Message {
        let mut both = BytesMut::with_capacity(self.topic.len() + self.payload.len());
        both.extend_from_slice(self.topic.as_bytes());
        both.extend_from_slice(&self.payload);
        let mut topic = both.freeze();
        let payload = topic.split_off(self.topic.len());
        let topic = ByteString::try_from(topic).expect("copied from a str");
        let headers = if self.headers.is_empty() {
            Headers::new()
        } else {
            let pairs =
                self.headers.iter().map(|(k, v)| (ByteString::from(k), ByteString::from(v))).collect();
            Headers::from_vec(pairs)
        };
        Message { topic, headers, payload, ..*self }
    }

    /// An upper bound of the size of any data frame carrying this message, as the length prefix
    /// counts it (the number to compare with a maximum frame size); exact but for the 0–12 bytes of
    /// command-specific fields.
    pub fn frame_size(&self) -> usize {
        // A PUB's length without its prefix, plus the largest fixed fields of a data frame
        // (CALL's 12 bytes; PUB and MSG have none).
        MessageView::from(self).frame_len() - LEN_PREFIX + 12
    }
}

/// First frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// Free-form client name, for logs and monitoring.
    pub name: ByteString,
    /// Extensible properties (service name, credentials … in later versions).
    pub properties: Headers,
}

/// The broker's answer to HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Welcome {
    /// The service id the broker assigned to this connection (sent in the destination field).
    pub service_id: u32,
    /// Largest frame the broker accepts (value of the length prefix).
    pub max_frame_size: u32,
    /// Interval at which the broker pings an idle connection, in milliseconds; 0 = never.
    pub heartbeat_ms: u32,
    /// Name of the broker.
    pub server_name: ByteString,
    /// Version of the broker software.
    pub server_version: ByteString,
    /// Extensible properties.
    pub properties: Headers,
}

/// What a subscription receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SubKind {
    /// 0: published events, as MSG frames.
    #[default]
    Events,
    /// 1: requests and commands, as CALL frames; this subscription answers them with REPLY.
    Requests,
}

/// Subscribe to a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sub {
    /// Subscription id chosen by the client, unique per connection (correlation field).
    pub sid: u64,
    /// The pattern.
    pub pattern: ByteString,
    /// Optional group membership.
    pub group: Option<Group>,
    /// Events or requests.
    pub kind: SubKind,
}

/// A request, client → broker: to one responder, or (scatter-gather) to all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request id chosen by the requester, unique among its requests in flight (correlation field).
    pub id: u64,
    /// True for scatter-gather: every responder gets it (signal E bit set).
    pub all: bool,
    /// How long the requester waits, in milliseconds; the broker forgets the request after that.
    pub timeout_ms: u32,
    /// The request; `destination` non-zero restricts responders to that service id.
    pub message: Message,
}

/// A request delivered to a responder, broker → client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The requester's request id (correlation field); echo it in the REPLY.
    pub id: u64,
    /// The responder subscription it matched.
    pub sid: u64,
    /// The requester's timeout, in milliseconds.
    pub timeout_ms: u32,
    /// The request; `source` is the requester's service id: the REPLY's destination.
    pub message: Message,
}

/// A reply, responder → broker → requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request id it answers (correlation field).
    pub id: u64,
    /// `None` for success; otherwise why the request failed (the payload then holds the text).
    pub error: Option<ErrorCode>,
    /// Broker → requester: how many more replies to expect for this request (scatter-gather).
    pub remaining: u32,
    /// The reply. Responder → broker: `destination` is the requester. Broker → requester: `source`
    /// is the responder.
    pub message: Message,
}

/// An error, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// The correlation of the frame that caused it (a subscription id, say), or 0.
    pub correlation: u64,
    /// Human-readable detail.
    pub message: ByteString,
}

/// Every frame of the native protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → broker, first frame.
    Hello(Hello),
    /// Broker → client, answer to HELLO.
    Welcome(Welcome),
    /// Either way: are you there? Also a barrier: PONG comes after every earlier frame was handled.
    Ping,
    /// Answer to PING.
    Pong,
    /// Client → broker: subscribe.
    Sub(Sub),
    /// Client → broker: unsubscribe the given subscription id.
    Unsub {
        /// The subscription id.
        sid: u64,
    },
    /// Either way: an error.
    Error(ErrorFrame),
    /// Client → broker: publish a message.
    Pub(Message),
    /// Broker → client: a message for subscription `sid`.
    Msg {
        /// The subscription it matched.
        sid: u64,
        /// The message.
        message: Message,
    },
    /// Client → broker: a request or command.
    Request(Request),
    /// Broker → responder: a request to answer.
    Call(Call),
    /// Either way: the answer to a request.
    Reply(Reply),
}

/// Command codes: the signal byte without the K and V flags.
mod cmd {
    use super::{SIGNAL_CONTROL as C, SIGNAL_EVENT as E};
    pub(super) const HELLO: u8 = C | 0x1;
    pub(super) const WELCOME: u8 = C | 0x2;
    pub(super) const PING: u8 = C | 0x3;
    pub(super) const PONG: u8 = C | 0x4;
    pub(super) const SUB: u8 = C | 0x5;
    pub(super) const UNSUB: u8 = C | 0x6;
    pub(super) const ERROR: u8 = C | 0x7;
    pub(super) const PUB: u8 = E | 0x1;
    pub(super) const MSG: u8 = E | 0x2;
    pub(super) const REQUEST: u8 = 0x3;
    pub(super) const REQUEST_ALL: u8 = E | 0x3;
    pub(super) const REPLY: u8 = 0x4;
    pub(super) const CALL: u8 = 0x5;
}

impl Frame {
    /// Short upper-case name of the command, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Welcome(_) => "WELCOME",
            Frame::Ping => "PING",
            Frame::Pong => "PONG",
            Frame::Sub(_) => "SUB",
            Frame::Unsub { .. } => "UNSUB",
            Frame::Error(_) => "ERROR",
            Frame::Pub(_) => "PUB",
            Frame::Msg { .. } => "MSG",
            Frame::Request(_) => "REQUEST",
            Frame::Call(_) => "CALL",
            Frame::Reply(_) => "REPLY",
        }
    }

    /// The message a data frame carries; `None` for control frames.
    pub fn message(&self) -> Option<&Message> {
        match self {
            Frame::Pub(m)
            | Frame::Msg { message: m, .. }
            | Frame::Request(Request { message: m, .. })
            | Frame::Call(Call { message: m, .. })
            | Frame::Reply(Reply { message: m, .. }) => Some(m),
            _ => None,
        }
    }

    /// Appends the encoded frame to `dst`. Fails, writing nothing, when a text field is too long
    /// for its length prefix or the frame would exceed `max_frame_size`.
    pub fn encode(&self, dst: &mut BytesMut, max_frame_size: usize) -> Result<(), FrameError> {
        finish(dst, max_frame_size, |dst| self.encode_body(dst))
    }

    /// Encodes into a fresh buffer with the default maximum frame size.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut buf = BytesMut::new();
        self.encode(&mut buf, u32::MAX as usize)?;
        Ok(buf.freeze())
    }

    fn encode_body(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            Frame::Hello(h) => {
                header(dst, cmd::HELLO, 0, 0, 0);
                put_str(dst, &h.name, "name")?;
                put_headers(dst, &h.properties, "properties")?;
            }
            Frame::Welcome(w) => {
                header(dst, cmd::WELCOME, 0, w.service_id, 0);
                dst.put_u32(w.max_frame_size);
                dst.put_u32(w.heartbeat_ms);
                put_str(dst, &w.server_name, "server_name")?;
                put_str(dst, &w.server_version, "server_version")?;
                put_headers(dst, &w.properties, "properties")?;
            }
            Frame::Ping => header(dst, cmd::PING, 0, 0, 0),
            Frame::Pong => header(dst, cmd::PONG, 0, 0, 0),
            Frame::Sub(s) => {
                header(dst, cmd::SUB, 0, 0, s.sid);
                put_str(dst, &s.pattern, "pattern")?;
                match &s.group {
                    None => {
                        put_str(dst, "", "group")?;
                        dst.put_u8(0);
                    }
                    Some(g) => {
                        put_str(dst, &g.name, "group")?;
                        dst.put_u8(g.policy.to_u8());
                    }
                }
                dst.put_u8(match s.kind {
                    SubKind::Events => 0,
                    SubKind::Requests => 1,
                });
            }
            Frame::Unsub { sid } => header(dst, cmd::UNSUB, 0, 0, *sid),
            Frame::Error(e) => {
                header(dst, cmd::ERROR, 0, 0, e.correlation);
                dst.put_u16(e.code.as_u16());
                put_str(dst, &e.message, "message")?;
            }
            Frame::Pub(m) => encode_message(dst, cmd::PUB, 0, m, |_| {})?,
            Frame::Msg { sid, message } => encode_message(dst, cmd::MSG, *sid, message, |_| {})?,
            Frame::Request(r) => {
                let command = if r.all { cmd::REQUEST_ALL } else { cmd::REQUEST };
                encode_message(dst, command, r.id, &r.message, |d| d.put_u32(r.timeout_ms))?
            }
            Frame::Call(c) => encode_message(dst, cmd::CALL, c.id, &c.message, |d| {
                d.put_u64(c.sid);
                d.put_u32(c.timeout_ms);
            })?,
            Frame::Reply(r) => encode_message(dst, cmd::REPLY, r.id, &r.message, |d| {
                d.put_u16(r.error.map_or(0, ErrorCode::as_u16));
                d.put_u32(r.remaining);
            })?,
        }
        Ok(())
    }
}

/// Appends a MSG frame for subscription `sid` to `dst` without building a [`Frame`], so that a
/// broker can encode one shared message for many subscribers.
pub fn encode_msg(
    dst: &mut BytesMut,
    sid: u64,
    message: &Message,
    max_frame_size: usize,
) -> Result<(), FrameError> {
    finish(dst, max_frame_size, |dst| encode_message(dst, cmd::MSG, sid, message, |_| {}))
}

/// Appends a PUB frame to `dst` without building a [`Frame`] (a client encodes where it publishes,
/// and hands the connection bytes).
pub fn encode_pub(dst: &mut BytesMut, message: &Message, max_frame_size: usize) -> Result<(), FrameError> {
    finish(dst, max_frame_size, |dst| encode_message(dst, cmd::PUB, 0, message, |_| {}))
}

/// The fields of a [`Message`], borrowed: what a sender that has them without a `Message` passes
/// to [`encode_pub_view`] (a client publishing to a `&str` topic need not copy it into a
/// `ByteString` first, only to encode it and drop it).
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    /// Service id of the sender.
    pub source: u32,
    /// Service id of the addressee, 0 for "whoever subscribes".
    pub destination: u32,
    /// Balance key.
    pub key: Option<u64>,
    /// Envelope metadata.
    pub envelope: Option<Envelope>,
    /// The topic (not checked here).
    pub topic: &'a str,
    /// Application headers.
    pub headers: &'a Headers,
    /// Application bytes.
    pub payload: &'a [u8],
}

impl MessageView<'_> {
    /// The length of its PUB or MSG frame, length prefix included.
    pub fn frame_len(&self) -> usize {
        LEN_PREFIX
            + HEADER_LEN
            + if self.key.is_some() { 8 } else { 0 }
            + if self.envelope.is_some() { ENVELOPE_LEN } else { 0 }
            + 2
            + self.topic.len()
            + 2
            + self.headers.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>()
            + self.payload.len()
    }
}

impl<'a> From<&'a Message> for MessageView<'a> {
    fn from(m: &'a Message) -> Self {
        Self {
            source: m.source,
            destination: m.destination,
            key: m.key,
            envelope: m.envelope,
            topic: &m.topic,
            headers: &m.headers,
            payload: &m.payload,
        }
    }
}

/// [`encode_pub`] from borrowed fields: the same bytes as for the `Message` they would make.
pub fn encode_pub_view(
    dst: &mut BytesMut,
    view: MessageView<'_>,
    max_frame_size: usize,
) -> Result<(), FrameError> {
    finish(dst, max_frame_size, |dst| encode_view(dst, cmd::PUB, 0, view, |_| {}))
}

/// A REQUEST (REQUEST_ALL when `all`) from borrowed fields: the same bytes as
/// [`Frame::Request`] around the `Message` they would make. Its length is
/// `view.frame_len() + 4`.
pub fn encode_request_view(
    dst: &mut BytesMut,
    id: u64,
    all: bool,
    timeout_ms: u32,
    view: MessageView<'_>,
    max_frame_size: usize,
) -> Result<(), FrameError> {
    let command = if all { cmd::REQUEST_ALL } else { cmd::REQUEST };
    finish(dst, max_frame_size, |dst| encode_view(dst, command, id, view, |d| d.put_u32(timeout_ms)))
}

/// A REPLY from borrowed fields: the same bytes as [`Frame::Reply`] around the `Message` they
/// would make. Its length is `view.frame_len() + 6`.
pub fn encode_reply_view(
    dst: &mut BytesMut,
    id: u64,
    error: Option<ErrorCode>,
    remaining: u32,
    view: MessageView<'_>,
    max_frame_size: usize,
) -> Result<(), FrameError> {
    finish(dst, max_frame_size, |dst| {
        encode_view(dst, cmd::REPLY, id, view, |d| {
            d.put_u16(error.map_or(0, ErrorCode::as_u16));
            d.put_u32(remaining);
        })
    })
}

/// True for an encoded REQUEST, REQUEST_ALL or REPLY (`frame` from its length prefix on): the
/// frames a client does not send again on a new connection (the request they belong to failed
/// with the old one).
pub fn is_request_or_reply(frame: &[u8]) -> bool {
    frame.get(LEN_PREFIX + 3).is_some_and(|&signal| {
        matches!(signal & !(SIGNAL_KEY | SIGNAL_ENVELOPE), cmd::REQUEST | cmd::REQUEST_ALL | cmd::REPLY)
    })
}

/// The id of an encoded REQUEST or REQUEST_ALL (`frame` from its length prefix on); `None` for
/// any other frame.
pub fn request_id(frame: &[u8]) -> Option<u64> {
    let signal = *frame.get(LEN_PREFIX + 3)?;
    if !matches!(signal & !(SIGNAL_KEY | SIGNAL_ENVELOPE), cmd::REQUEST | cmd::REQUEST_ALL) {
        return None;
    }
    Some(u64::from_be_bytes(frame.get(LEN_PREFIX + 12..LEN_PREFIX + 20)?.try_into().ok()?))
}

fn header(dst: &mut BytesMut, signal: u8, source: u32, destination: u32, corr: u64) {
    // Put together on the stack and appended at once: one capacity check, not seven.
    let mut h = [0u8; LEN_PREFIX + HEADER_LEN]; // the prefix is patched by `finish`
    h[4..6].copy_from_slice(&MAGIC.to_be_bytes());
    h[6] = VERSION;
    h[7] = signal;
    h[8..12].copy_from_slice(&source.to_be_bytes());
    h[12..16].copy_from_slice(&destination.to_be_bytes());
    h[16..24].copy_from_slice(&corr.to_be_bytes());
    dst.put_slice(&h);
}

/// Runs `body` (which writes a frame with a zero length prefix), then patches the prefix; on any
/// error, `dst` is left as it was.
fn finish(
    dst: &mut BytesMut,
    max_frame_size: usize,
    body: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let start = dst.len();
    let result = body(dst).and_then(|()| {
        let size = dst.len() - start - LEN_PREFIX;
        if size > max_frame_size {
            return Err(FrameError::TooLarge { size, max: max_frame_size });
        }
        dst[start..start + LEN_PREFIX].copy_from_slice(&(size as u32).to_be_bytes());
        Ok(())
    });
    if result.is_err() {
        dst.truncate(start);
    }
    result
}

/// Writes a data frame: header, [key], the command's fixed fields (`fixed`), [envelope], topic,
/// headers, payload.
fn encode_message(
    dst: &mut BytesMut,
    command: u8,
    corr: u64,
    m: &Message,
    fixed: impl FnOnce(&mut BytesMut),
) -> Result<(), FrameError> {
    encode_view(dst, command, corr, m.into(), fixed)
}

/// [`encode_message`] from borrowed fields.
#[inline]
fn encode_view(
    dst: &mut BytesMut,
    command: u8,
    corr: u64,
    m: MessageView<'_>,
    fixed: impl FnOnce(&mut BytesMut),
) -> Result<(), FrameError> {
    let mut signal = command;
    if m.key.is_some() {
        signal |= SIGNAL_KEY;
    }
    if m.envelope.is_some() {
        signal |= SIGNAL_ENVELOPE;
    }
    dst.reserve(HEADER_LEN + 8 + ENVELOPE_LEN + 4 + m.topic.len() + m.payload.len() + 4);
    header(dst, signal, m.source, m.destination, corr);
    if let Some(key) = m.key {
        dst.put_u64(key);
    }
    fixed(dst);
    if let Some(e) = m.envelope {
        let mut b = [0u8; ENVELOPE_LEN];
        b[..16].copy_from_slice(&e.id.to_be_bytes());
        b[16..32].copy_from_slice(&e.tx.to_be_bytes());
        b[32..].copy_from_slice(&e.timestamp_ns.to_be_bytes());
        dst.put_slice(&b);
    }
    put_str(dst, m.topic, "topic")?;
    put_headers(dst, m.headers, "headers")?;
    dst.put_slice(m.payload);
    Ok(())
}

fn put_str(dst: &mut BytesMut, s: &str, field: &'static str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::FieldTooLong(field))?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_headers(dst: &mut BytesMut, h: &Headers, field: &'static str) -> Result<(), FrameError> {
    let count = u16::try_from(h.len()).map_err(|_| FrameError::FieldTooLong(field))?;
    dst.put_u16(count);
    for (k, v) in h.iter() {
        put_str(dst, k, field)?;
        put_str(dst, v, field)?;
    }
    Ok(())
}

/// Looks at the start of `buf`: `Ok(Some(n))` when a whole frame of `n` bytes (prefix included) is
/// there, `Ok(None)` when more bytes are needed, an error when the bytes can never become a valid
/// frame. Magic, version and size are checked as soon as their bytes have arrived, so garbage is
/// refused without waiting for the length it claims.
pub fn check(buf: &[u8], max_frame_size: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() >= LEN_PREFIX {
        let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if size > max_frame_size {
            return Err(FrameError::TooLarge { size, max: max_frame_size });
        }
        if size < HEADER_LEN {
            return Err(FrameError::TooShort { size });
        }
    }
    if buf.len() >= LEN_PREFIX + 2 {
        let magic = u16::from_be_bytes([buf[4], buf[5]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
    }
    if buf.len() >= LEN_PREFIX + 3 && buf[6] != VERSION {
        return Err(FrameError::UnsupportedVersion(buf[6]));
    }
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let total = LEN_PREFIX + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Takes one whole frame off the front of `buf`. `Ok(None)` means "not yet: read more bytes";
/// `buf` is untouched then. After an error the stream cannot be resynchronised: close it.
pub fn decode(buf: &mut BytesMut, max_frame_size: usize) -> Result<Option<Frame>, FrameError> {
    match check(buf, max_frame_size)? {
        None => Ok(None),
        Some(total) => {
            let mut frame = buf.split_to(total).freeze();
            frame.advance(LEN_PREFIX);
            parse(frame).map(Some)
        }
    }
}

/// Where the source id starts in an encoded frame (counted from its length prefix).
const SOURCE_AT: usize = LEN_PREFIX + 4;

/// The source and destination ids in the header of the encoded frame at the start of `buf`, once
/// that much has arrived. Broker-to-broker routes use them on SUB and UNSUB (whose decoded form
/// has no ids) to name the client a subscription belongs to.
pub fn ids(buf: &[u8]) -> Option<(u32, u32)> {
    let at = buf.get(SOURCE_AT..SOURCE_AT + 8)?;
    Some((u32::from_be_bytes([at[0], at[1], at[2], at[3]]), u32::from_be_bytes([at[4], at[5], at[6], at[7]])))
}

/// Sets the source and destination ids in the header of the encoded frame at the start of
/// `frame` (see [`ids`]); does nothing to a buffer too short to hold a header.
pub fn set_ids(frame: &mut [u8], source: u32, destination: u32) {
    if let Some(at) = frame.get_mut(SOURCE_AT..SOURCE_AT + 8) {
        at[..4].copy_from_slice(&source.to_be_bytes());
        at[4..].copy_from_slice(&destination.to_be_bytes());
    }
}

/// Like [`decode`], for a reader that wants PUBs in a form of its own (a broker routes them in an
/// `Arc`): a PUB goes to `on_pub` as a bare [`Message`], without being moved through a
/// [`Frame`] first; any other frame goes to `on_other`.
pub fn decode_with<T>(
    buf: &mut BytesMut,
    max_frame_size: usize,
    on_pub: impl FnOnce(Message) -> T,
    on_other: impl FnOnce(Frame) -> T,
) -> Result<Option<T>, FrameError> {
    decode_data_with(buf, max_frame_size, cmd::PUB, None, |_, message| on_pub(message), on_other)
}

/// Like [`decode_with`], for a client: a MSG goes to `on_msg` with its subscription id. A MSG
/// whose topic has the bytes of the previous one's takes that one's [`ByteString`] from `last`
/// (a reference count) instead of checking the bytes for UTF-8 again.
pub fn decode_msg_with<T>(
    buf: &mut BytesMut,
    max_frame_size: usize,
    last: &mut LastTopic,
    on_msg: impl FnOnce(u64, Message) -> T,
    on_other: impl FnOnce(Frame) -> T,
) -> Result<Option<T>, FrameError> {
    decode_data_with(buf, max_frame_size, cmd::MSG, Some(last), on_msg, on_other)
}

/// The topic of the last MSG a reader decoded (see [`decode_msg_with`]). It keeps alive the
/// buffer that topic was read into: one for a client's connection, not one per connection of a
/// broker's thousands.
#[derive(Debug, Default, Clone)]
pub struct LastTopic(Option<ByteString>);

impl LastTopic {
    /// The topic field at the front of `b`, reusing the last one when the bytes are the same.
    fn get(&mut self, b: &mut Bytes) -> Result<ByteString, FrameError> {
        let len = get_u16(b, "topic")? as usize;
        need(b, len, "topic")?;
        if let Some(last) = &self.0
            && last.as_bytes() == &b[..len]
        {
            b.advance(len);
            return Ok(last.clone());
        }
        let topic = ByteString::try_from(b.split_to(len)).map_err(|_| FrameError::InvalidUtf8("topic"))?;
        self.0 = Some(topic.clone());
        Ok(topic)
    }
}

/// Decodes one frame; one of the data frames of `command` (PUB or MSG: no fixed fields) goes to
/// `on_data` with its correlation field, any other frame to `on_other`.
#[inline]
fn decode_data_with<T>(
    buf: &mut BytesMut,
    max_frame_size: usize,
    command: u8,
    last: Option<&mut LastTopic>,
    on_data: impl FnOnce(u64, Message) -> T,
    on_other: impl FnOnce(Frame) -> T,
) -> Result<Option<T>, FrameError> {
    let Some(total) = check(buf, max_frame_size)? else { return Ok(None) };
    let mut b = buf.split_to(total).freeze();
    b.advance(LEN_PREFIX);
    // Magic and version are checked (`check`); the signal byte comes right after them.
    let fast = b.len() >= HEADER_LEN && b[3] & !(SIGNAL_KEY | SIGNAL_ENVELOPE) == command;
    if !fast {
        return parse(b).map(|frame| Some(on_other(frame)));
    }
    let signal = b[3];
    b.advance(4);
    let source = b.get_u32();
    let destination = b.get_u32();
    let corr = b.get_u64();
    let flags = signal & (SIGNAL_KEY | SIGNAL_ENVELOPE);
    let key = if flags & SIGNAL_KEY != 0 { Some(get_u64(&mut b, "balance key")?) } else { None };
    message_body(b, flags, source, destination, key, last).map(|m| Some(on_data(corr, m)))
}

/// The rest of a data frame after its fixed fields: [envelope], topic, headers, payload.
#[inline]
fn message_body(
    mut b: Bytes,
    flags: u8,
    source: u32,
    destination: u32,
    key: Option<u64>,
    last: Option<&mut LastTopic>,
) -> Result<Message, FrameError> {
    let envelope = if flags & SIGNAL_ENVELOPE != 0 {
        need(&b, ENVELOPE_LEN, "envelope")?;
        Some(Envelope { id: b.get_u128(), tx: b.get_u128(), timestamp_ns: b.get_u64() })
    } else {
        None
    };
    let topic = match last {
        Some(last) => last.get(&mut b)?,
        None => get_str(&mut b, "topic")?,
    };
    let headers = get_headers(&mut b, "headers")?;
    Ok(Message { source, destination, key, envelope, topic, headers, payload: b })
}

/// Parses one frame from exactly its bytes after the length prefix.
pub fn parse(mut b: Bytes) -> Result<Frame, FrameError> {
    if b.len() < HEADER_LEN {
        return Err(FrameError::TooShort { size: b.len() });
    }
    let magic = b.get_u16();
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = b.get_u8();
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let signal = b.get_u8();
    let source = b.get_u32();
    let destination = b.get_u32();
    let corr = b.get_u64();
    let command = signal & !(SIGNAL_KEY | SIGNAL_ENVELOPE);
    let flags = signal & (SIGNAL_KEY | SIGNAL_ENVELOPE);
    let frame = match command {
        cmd::PUB | cmd::MSG | cmd::REQUEST | cmd::REQUEST_ALL | cmd::CALL | cmd::REPLY => {
            let key = if flags & SIGNAL_KEY != 0 { Some(get_u64(&mut b, "balance key")?) } else { None };
            // The fixed fields first, then the message, and the frame built once around it (a
            // frame with a placeholder message to fill in cost a move of the whole frame each
            // step: ten `memcpy` calls per CALL or REPLY).
            let body = |b| message_body(b, flags, source, destination, key, None);
            return Ok(match command {
                cmd::REQUEST | cmd::REQUEST_ALL => {
                    let timeout_ms = get_u32(&mut b, "timeout_ms")?;
                    let all = command == cmd::REQUEST_ALL;
                    Frame::Request(Request { id: corr, all, timeout_ms, message: body(b)? })
                }
                cmd::CALL => {
                    let sid = get_u64(&mut b, "sid")?;
                    let timeout_ms = get_u32(&mut b, "timeout_ms")?;
                    Frame::Call(Call { id: corr, sid, timeout_ms, message: body(b)? })
                }
                cmd::REPLY => {
                    let status = get_u16(&mut b, "status")?;
                    let remaining = get_u32(&mut b, "remaining")?;
                    let error = (status != 0).then(|| ErrorCode::from_u16(status));
                    Frame::Reply(Reply { id: corr, error, remaining, message: body(b)? })
                }
                cmd::PUB => Frame::Pub(body(b)?),
                _ => Frame::Msg { sid: corr, message: body(b)? },
            });
        }
        _ if flags != 0 && command & SIGNAL_CONTROL != 0 => return Err(FrameError::BadFlags(flags)),
        cmd::HELLO => {
            let name = get_str(&mut b, "name")?;
            let properties = get_headers(&mut b, "properties")?;
            Frame::Hello(Hello { name, properties })
        }
        cmd::WELCOME => {
            let max_frame_size = get_u32(&mut b, "max_frame_size")?;
            let heartbeat_ms = get_u32(&mut b, "heartbeat_ms")?;
            let server_name = get_str(&mut b, "server_name")?;
            let server_version = get_str(&mut b, "server_version")?;
            let properties = get_headers(&mut b, "properties")?;
            Frame::Welcome(Welcome {
                service_id: destination,
                max_frame_size,
                heartbeat_ms,
                server_name,
                server_version,
                properties,
            })
        }
        cmd::PING => Frame::Ping,
        cmd::PONG => Frame::Pong,
        cmd::SUB => {
            let pattern = get_str(&mut b, "pattern")?;
            let name = get_str(&mut b, "group")?;
            need(&b, 1, "policy")?;
            let policy = match b.get_u8() {
                0 => None,
                1 => Some(GroupPolicy::Random),
                2 => Some(GroupPolicy::RoundRobin),
                3 => Some(GroupPolicy::Hash),
                v => {
                    return Err(FrameError::InvalidValue { field: "policy", value: v.into() });
                }
            };
            let group = match (name.is_empty(), policy) {
                (true, None) => None,
                (false, Some(policy)) => Some(Group { name, policy }),
                (_, p) => {
                    let value = p.map_or(0, |p| p.to_u8()).into();
                    return Err(FrameError::InvalidValue { field: "policy", value });
                }
            };
            need(&b, 1, "kind")?;
            let kind = match b.get_u8() {
                0 => SubKind::Events,
                1 => SubKind::Requests,
                v => return Err(FrameError::InvalidValue { field: "kind", value: v.into() }),
            };
            Frame::Sub(Sub { sid: corr, pattern, group, kind })
        }
        cmd::UNSUB => Frame::Unsub { sid: corr },
        cmd::ERROR => {
            let code = ErrorCode::from_u16(get_u16(&mut b, "code")?);
            let message = get_str(&mut b, "message")?;
            Frame::Error(ErrorFrame { code, correlation: corr, message })
        }
        _ => return Err(FrameError::UnknownCommand(signal)),
    };
    if !b.is_empty() {
        return Err(FrameError::TrailingBytes(b.len()));
    }
    Ok(frame)
}

fn need(b: &Bytes, n: usize, field: &'static str) -> Result<(), FrameError> {
    if b.len() < n { Err(FrameError::Truncated(field)) } else { Ok(()) }
}

fn get_u16(b: &mut Bytes, field: &'static str) -> Result<u16, FrameError> {
    need(b, 2, field)?;
    Ok(b.get_u16())
}

fn get_u32(b: &mut Bytes, field: &'static str) -> Result<u32, FrameError> {
    need(b, 4, field)?;
    Ok(b.get_u32())
}

fn get_u64(b: &mut Bytes, field: &'static str) -> Result<u64, FrameError> {
    need(b, 8, field)?;
    Ok(b.get_u64())
}

fn get_str(b: &mut Bytes, field: &'static str) -> Result<ByteString, FrameError> {
    let len = get_u16(b, field)? as usize;
    need(b, len, field)?;
    ByteString::try_from(b.split_to(len)).map_err(|_| FrameError::InvalidUtf8(field))
}

fn get_headers(b: &mut Bytes, field: &'static str) -> Result<Headers, FrameError> {
    let count = get_u16(b, field)? as usize;
    if count == 0 {
        // Most messages: nothing to build (nor a Vec to drop).
        return Ok(Headers::new());
    }
    // Each pair takes at least 4 bytes: refuse absurd counts before allocating for them.
    need(b, count * 4, field)?;
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let k = get_str(b, field)?;
        let v = get_str(b, field)?;
        pairs.push((k, v));
    }
    Ok(Headers::from_vec(pairs))
}

/// A [`tokio_util::codec`] codec, so that I/O layers can use `FramedRead`/`FramedWrite`.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_size: usize,
}

impl FrameCodec {
    /// A codec that refuses frames larger than `max_frame_size` both ways.
    pub fn new(max_frame_size: usize) -> Self {
        Self { max_frame_size }
    }
    /// The limit in force.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
    /// Changes the limit (after the handshake announced the peer's).
    pub fn set_max_frame_size(&mut self, max: usize) {
        self.max_frame_size = max;
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

/// Error of [`FrameCodec`]: a protocol violation or an I/O error below it.
#[derive(Debug, Error)]
pub enum CodecError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(decode(src, self.max_frame_size)?)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame.encode(dst, self.max_frame_size)?)
    }
}
