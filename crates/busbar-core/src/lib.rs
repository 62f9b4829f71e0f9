//! busbar's shared vocabulary: everything the broker, the client and the in-process bus agree on,
//! and nothing that does I/O.
//!
//! # Layout
//!
//! | module    | what it holds |
//! |-----------|---------------|
//! | [`topic`] | topic and pattern rules ([`validate_topic`], [`validate_pattern`]) and the reference matcher |
//! | [`trie`]  | [`SubscriptionTrie`]: topic → matching subscriptions, cost independent of non-matching ones |
//! | [`group`] | [`group::Balancer`]: which group member gets a message (random, round-robin, rendezvous hash) |
//! | [`heartbeat`] | [`heartbeat::Heartbeat`]: when to PING a quiet peer and when it is dead (both ends keep it) |
//! | [`id`]    | [`IdGenerator`] (pluggable), the default ULID-style generator, id text form |
//! | [`nats`]  | the NATS client protocol: a zero-allocation incremental parser and writers (for the planned NATS listener) |
//! | [`queue`] | the many-to-one queue between tasks (optionally bounded, taken in batches, wake-ups held while a batch is routed) |
//! | [`frame`] | the native wire protocol: [`Frame`] and its types, [`frame::check`], [`frame::decode`], [`Frame::encode`], and [`FrameCodec`] for `tokio_util::codec` |
//!
//! The byte layout is specified in `docs/PROTOCOL.md`, whose golden vectors are checked by this
//! crate's tests.
//!
//! ```
//! use busbar_core::{Frame, Message, frame};
//! use bytes::BytesMut;
//!
//! let mut buf = BytesMut::new();
//! Frame::Pub(Message::new("event.email.new", "hi")).encode(&mut buf, frame::DEFAULT_MAX_FRAME_SIZE)?;
//! let mut half = buf.split_to(10);
//! assert_eq!(frame::decode(&mut half, frame::DEFAULT_MAX_FRAME_SIZE)?, None); // incomplete: not an error
//! half.unsplit(buf);
//! let decoded = frame::decode(&mut half, frame::DEFAULT_MAX_FRAME_SIZE)?.unwrap();
//! assert_eq!(decoded.name(), "PUB");
//! # Ok::<(), busbar_core::FrameError>(())
//! ```

pub mod frame;
pub mod group;
pub mod heartbeat;
pub mod id;
pub mod nats;
pub mod queue;
pub mod topic;
pub mod trie;

pub use bytestring::ByteString;
pub use frame::{
    Call, CodecError, Envelope, ErrorCode, ErrorFrame, Frame, FrameCodec, FrameError, Group, GroupPolicy,
    Headers, Hello, Message, Reply, Request, Sub, SubKind, Welcome,
};
pub use id::{IdGenerator, SequentialGenerator, UlidGenerator};
pub use topic::{TopicError, TopicMemo, validate_pattern, validate_topic};
pub use trie::SubscriptionTrie;
