//! Messages as the application sees them.

use busbar_core::{ByteString, Envelope, Headers, IdGenerator, TopicMemo};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::context::current_transaction;
use crate::error::{Error, Result};

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) sid: u64,
    pub(crate) inner: busbar_core::Message,
}

impl Message {
    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }
    /// The raw payload (a cheap, reference-counted view of the received bytes).
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }
    /// The payload as text, when it is UTF-8.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.inner.payload).ok()
    }
    /// Application headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.headers
    }
    /// Service id of the publisher, assigned by the broker.
    pub fn source(&self) -> u32 {
        self.inner.source
    }
    /// The balance key it was published with.
    pub fn key(&self) -> Option<u64> {
        self.inner.key
    }
    /// Envelope metadata, when the publisher sent it (busbar clients always do).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.inner.envelope.as_ref()
    }
    /// The message id (0 when the publisher sent no envelope).
    pub fn id(&self) -> u128 {
        self.inner.envelope.map_or(0, |e| e.id)
    }
    /// The transaction id (0 when the publisher sent no envelope).
    pub fn transaction(&self) -> u128 {
        self.inner.envelope.map_or(0, |e| e.tx)
    }
    /// When the event occurred, nanoseconds since the Unix epoch (0 when unknown).
    pub fn timestamp_ns(&self) -> u64 {
        self.inner.envelope.map_or(0, |e| e.timestamp_ns)
    }
    /// Where the publisher waits for an answer, when it sent one: the reply subject of a NATS
    /// client's request. Publishing there answers it.
    pub fn reply_to(&self) -> Option<&str> {
        self.inner.headers.get(":reply")
    }
    /// Id of the subscription it arrived on; 0 in a synchronous in-process handler
    /// ([`crate::local::Bus::on`]), which is handed the one message every such handler shares
    /// (no copy per handler) and knows its own subscription from registering it.
    pub fn subscription_id(&self) -> u64 {
        self.sid
    }
    /// Decodes a JSON payload.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.inner.payload).map_err(|e| Error::Codec(e.to_string()))
    }
    /// Decodes a MessagePack payload.
    pub fn msgpack<T: DeserializeOwned>(&self) -> Result<T> {
        rmp_serde::from_slice(&self.inner.payload).map_err(|e| Error::Codec(e.to_string()))
    }
    /// The payload, without a reference count taken and dropped as `payload().clone()` does.
    pub fn into_payload(self) -> Bytes {
        self.inner.payload
    }
    /// The wire-level message.
    pub fn into_inner(self) -> busbar_core::Message {
        self.inner
    }
}

/// A message to publish with more than topic and payload: headers, a balance key, an envelope.
#[derive(Debug, Clone)]
pub struct Outgoing(pub(crate) busbar_core::Message, pub(crate) Option<u128>);

impl Outgoing {
    /// A message to `topic` with `payload`.
    pub fn new(topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Self {
        Self(busbar_core::Message::new(topic, payload), None)
    }
    /// Adds a header.
    pub fn header(mut self, key: impl Into<ByteString>, value: impl Into<ByteString>) -> Self {
        self.0.headers.insert(key, value);
        self
    }
    /// Sets the balance key (used by groups with the hash policy).
    pub fn key(mut self, key: u64) -> Self {
        self.0.key = Some(key);
        self
    }
    /// Sets the envelope metadata yourself (normally the client fills it in).
    pub fn envelope(mut self, envelope: Envelope) -> Self {
        self.0.envelope = Some(envelope);
        self
    }
    /// Sends it to one service only, by the id the broker assigned it (direct addressing).
    pub fn to(mut self, service_id: u32) -> Self {
        self.0.destination = service_id;
        self
    }
    /// Sends it to one service only, by the name it registered at connect.
    pub fn to_service(mut self, name: &str) -> Self {
        self.0.headers.insert(TO_HEADER, name);
        self
    }
    /// Puts it in transaction `tx` (by default: the transaction of the message being handled, or a
    /// new one).
    pub fn transaction(mut self, tx: u128) -> Self {
        self.1 = Some(tx);
        self
    }
    /// Puts it in the transaction of `cause`.
    pub fn caused_by(self, cause: &Message) -> Self {
        let tx = cause.transaction();
        if tx == 0 { self } else { self.transaction(tx) }
    }
}

impl Outgoing {
    /// Checks the topic and fills in the envelope: a new id, the transaction (explicit, else the
    /// one being handled on this task, else a new one), the time. Refuses a message whose frame
    /// would exceed `max_frame_size`, so the caller gets a clear error instead of a closed
    /// connection.
    pub(crate) fn prepare(
        self,
        ids: &dyn IdGenerator,
        max_frame_size: usize,
    ) -> Result<busbar_core::Message> {
        let Outgoing(mut message, tx) = self;
        check_topic(&message.topic)?;
        if message.envelope.is_none() {
            message.envelope = Some(new_envelope(ids, tx));
        }
        let size = message.frame_size();
        if size > max_frame_size {
            return Err(busbar_core::FrameError::TooLarge { size, max: max_frame_size }.into());
        }
        Ok(message)
    }
}

/// Checks a topic to publish to, naming it in the error. A thread's last valid topic is
/// remembered: a run of publishes to one topic is checked once (the check was 5 % of a
/// publisher's instructions).
pub(crate) fn check_topic(topic: &str) -> Result<()> {
    thread_local! {
        static LAST: std::cell::RefCell<TopicMemo> = const { std::cell::RefCell::new(TopicMemo::new()) };
    }
    LAST.with_borrow_mut(|memo| memo.validate(topic))
        .map_err(|source| Error::InvalidTopic { topic: topic.to_string(), source })
}

/// The envelope of a message sent now: a new id, the transaction (`tx`, else the one being handled
/// on this task, else a new one), the time.
pub(crate) fn new_envelope(ids: &dyn IdGenerator, tx: Option<u128>) -> Envelope {
    // One clock read for the id's time and the envelope's.
    let now = busbar_core::id::now_ns();
    let id = ids.next_id_at(now);
    let tx = tx.or_else(current_transaction).unwrap_or(id);
    Envelope { id, tx, timestamp_ns: now }
}

/// Serialises a typed payload as JSON.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))
}

/// The reserved header naming the service a message is addressed to.
pub(crate) const TO_HEADER: &str = ":to";
