//! The client's error type.

use busbar_core::{ErrorCode, FrameError, TopicError};

/// Everything that can go wrong talking to a broker. More kinds may come: match with a
/// wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be set up (certificates, or the TLS handshake).
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker did not complete the handshake.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The broker answered with an ERROR frame.
    #[error("broker error {code}: {message}")]
    Server {
        /// Error code.
        code: ErrorCode,
        /// The broker's text.
        message: String,
    },
    /// A topic or pattern that breaks the rules; nothing was sent.
    #[error("invalid topic or pattern {topic:?}: {source}")]
    InvalidTopic {
        /// The topic or pattern.
        topic: String,
        /// Which rule it breaks.
        source: TopicError,
    },
    /// In-process bus: a publish from inside a synchronous handler, nested this deep (each
    /// delivered at once, on the same stack): a handler that publishes what it handles would
    /// otherwise overflow the stack.
    #[error("publishes nested {depth} deep inside synchronous handlers on {topic:?}")]
    NestedTooDeep {
        /// The nesting limit.
        depth: u32,
        /// The topic of the publish refused.
        topic: String,
    },
    /// In-process bus in strict mode: the topic was never registered.
    #[error("topic {topic:?} is not registered on this strict bus")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// A regular expression that does not compile.
    #[error("invalid regex {regex:?}: {reason}")]
    InvalidRegex {
        /// The expression.
        regex: String,
        /// The compiler's message.
        reason: String,
    },
    /// A frame that cannot be sent (too large for the broker's limit, say); nothing was sent.
    #[error("cannot encode frame: {0}")]
    Frame(#[from] FrameError),
    /// Serialising or deserialising a typed payload failed.
    #[error("payload codec: {0}")]
    Codec(String),
    /// Nobody serves the request's topic (answered at once by the broker, not after a timeout).
    #[error("no responders for {topic:?}")]
    NoResponders {
        /// The request's topic.
        topic: String,
    },
    /// The responder's handler failed; its text.
    #[error("handler failed: {0}")]
    Handler(String),
    /// The connection to the broker was lost while this was in flight, or is down now (the
    /// client may be reconnecting: retry later).
    #[error("connection to the broker lost")]
    ConnectionLost,
    /// Disconnected, and the buffer for publishes made meanwhile has no room for this one (it
    /// holds `capacity` messages, or `ClientOptions::offline_buffer_bytes`).
    #[error(
        "disconnected and the offline buffer (at most {capacity} messages, and its byte bound) has no room"
    )]
    BufferFull {
        /// The buffer's size.
        capacity: usize,
    },
    /// Scatter-gather: more answers arrived at once than the gather holds (`capacity`), faster
    /// than they were taken. The answers before were kept and the rest dropped; this error ends
    /// the list `request_all` returns, so that a short list is never taken for a whole one.
    #[error("more answers arrived at once than the gather holds ({capacity}): the rest were dropped")]
    GatherOverflow {
        /// Answers the gather holds before they are taken.
        capacity: usize,
    },
    /// The connection is closed (by `disconnect`, by the broker, or lost).
    #[error("connection closed")]
    Closed,
    /// The operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// An I/O error on an established connection.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The broker's error code, when the broker refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::NoResponders { .. } => Some(ErrorCode::NoResponders),
            Error::Handler(_) => Some(ErrorCode::HandlerError),
            _ => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
