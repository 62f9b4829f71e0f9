//! A request received by a responder, and the reply it owes.

use std::sync::Arc;

use busbar_core::frame::{MessageView, encode_reply_view};
use busbar_core::{ByteString, Envelope, ErrorCode, Headers, IdGenerator, Reply};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::message::Message;

/// A request or command to answer. Reply with [`Request::reply`] (or [`Request::fail`]); a
/// request dropped without a reply is answered with an error for you, so the requester never
/// waits for its timeout because a handler forgot.
#[derive(Debug)]
pub struct Request {
    id: u64,
    message: Message,
    reply_to: ReplyTo,
    ids: Arc<dyn IdGenerator>,
    answered: bool,
}

/// Where a reply goes.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    /// Over the network: encoded into the connection task's queue, like a publish, within the
    /// broker's frame size limit.
    Remote { commands: crate::commands::CommandTx, max_frame_size: usize },
    /// In process, straight to the waiting requester.
    One(Option<oneshot::Sender<Reply>>),
    /// In process, to a scatter-gather collector.
    All(mpsc::Sender<Reply>),
}

impl ReplyTo {
    /// Sends the reply made of `fields`, `error` and `payload`. Over the network it is encoded
    /// straight into the connection task's queue; a reply too large for the broker fails, and
    /// the requester gets a `HandlerError` saying so at once rather than waiting for its timeout.
    async fn send(
        &mut self,
        fields: &ReplyFields<'_>,
        error: Option<ErrorCode>,
        payload: Bytes,
    ) -> Result<()> {
        match self {
            ReplyTo::Remote { commands, max_frame_size } => {
                let max = *max_frame_size;
                let (size, encode) = fields.encoder(error, &payload, max);
                let sent = commands.publish(size, max, encode).await;
                if let Err(Error::Frame(e)) = &sent {
                    let text = format!("the reply could not be sent: {e}");
                    let (size, encode) = fields.encoder(Some(ErrorCode::HandlerError), text.as_bytes(), max);
                    let _ = commands.publish(size, max, encode).await;
                }
                sent
            }
            // A requester that is gone (timed out, or has all the answers it wanted) is no error
            // of the responder's, as over the network, where the broker drops such a reply.
            ReplyTo::All(tx) => {
                let _ = tx.send(fields.reply(error, payload)).await;
                Ok(())
            }
            ReplyTo::One(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(fields.reply(error, payload));
                }
                Ok(())
            }
        }
    }

    /// [`ReplyTo::send`] without waiting (from `Drop`, or a refusal by the connection task):
    /// over the network it may use the queue's reserve ([`CommandTx::try_publish`]); only when
    /// that is full too does the requester time out instead.
    ///
    /// [`CommandTx::try_publish`]: crate::commands::CommandTx::try_publish
    fn send_now(&mut self, fields: &ReplyFields<'_>, error: Option<ErrorCode>, payload: Bytes) {
        let _ = match self {
            ReplyTo::Remote { commands, max_frame_size } => {
                let (size, encode) = fields.encoder(error, &payload, *max_frame_size);
                commands.try_publish(size, *max_frame_size, encode).is_ok()
            }
            ReplyTo::All(tx) => tx.try_send(fields.reply(error, payload)).is_ok(),
            ReplyTo::One(tx) => tx.take().is_some_and(|tx| tx.send(fields.reply(error, payload)).is_ok()),
        };
    }
}

/// What a REPLY needs besides its status and payload, taken from the request it answers.
struct ReplyFields<'a> {
    id: u64,
    topic: &'a ByteString,
    destination: u32,
    envelope: Envelope,
}

impl ReplyFields<'_> {
    /// The frame's size and encoder, for the connection task's queue.
    fn encoder<'b>(
        &'b self,
        error: Option<ErrorCode>,
        payload: &'b [u8],
        max: usize,
    ) -> (usize, impl Fn(&mut bytes::BytesMut) -> Result<()> + 'b) {
        static NO_HEADERS: Headers = Headers::new();
        let view = MessageView {
            source: 0,
            destination: self.destination,
            key: None,
            envelope: Some(self.envelope),
            topic: self.topic,
            headers: &NO_HEADERS,
            payload,
        };
        let id = self.id;
        (view.frame_len() + 6, move |run: &mut bytes::BytesMut| {
            Ok(encode_reply_view(run, id, error, 0, view, max)?)
        })
    }
}

impl Request {
    /// Marks it answered without sending anything (it was never delivered).
    pub(crate) fn disarm(&mut self) {
        self.answered = true;
    }

    pub(crate) fn new(id: u64, message: Message, reply_to: ReplyTo, ids: Arc<dyn IdGenerator>) -> Self {
        Self { id, message, reply_to, ids, answered: false }
    }

    /// The request as a message: topic, payload, headers, envelope, and `source()`, the
    /// requester's service id.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The request's topic.
    pub fn topic(&self) -> &str {
        self.message.topic()
    }

    /// The request's payload.
    pub fn payload(&self) -> &Bytes {
        self.message.payload()
    }

    /// Decodes a JSON payload.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        self.message.json()
    }

    /// Answers with `payload`.
    pub async fn reply(self, payload: impl Into<Bytes>) -> Result<()> {
        self.answer(None, payload.into()).await
    }

    /// Answers with `value` as JSON.
    pub async fn reply_json<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.reply(bytes).await
    }

    /// Answers with an error: the requester's call fails with [`Error::Handler`] and this text.
    pub async fn fail(self, reason: impl std::fmt::Display) -> Result<()> {
        self.answer(Some(ErrorCode::HandlerError), reason.to_string().into()).await
    }

    /// Answers at once with an error the handler never saw (the request could not be handed
    /// to it), without waiting: best effort, like the reply of a dropped request.
    pub(crate) fn refuse(mut self, code: ErrorCode, text: &str) {
        self.answered = true;
        let fields = reply_fields(self.id, &self.message, self.ids.as_ref());
        self.reply_to.send_now(&fields, Some(code), Bytes::copy_from_slice(text.as_bytes()));
    }

    async fn answer(mut self, error: Option<ErrorCode>, payload: Bytes) -> Result<()> {
        self.answered = true;
        let fields = reply_fields(self.id, &self.message, self.ids.as_ref());
        self.reply_to.send(&fields, error, payload).await
    }
}

/// The fields of the reply to request `id`, which came as `request`: back to its sender, on its
/// topic, in its transaction, with a new id and the time now.
fn reply_fields<'a>(id: u64, request: &'a Message, ids: &dyn IdGenerator) -> ReplyFields<'a> {
    let request = &request.inner;
    let now = busbar_core::id::now_ns();
    let envelope_id = ids.next_id_at(now);
    let tx = request.envelope.map_or(envelope_id, |e| e.tx);
    ReplyFields {
        id,
        topic: &request.topic,
        destination: request.source,
        envelope: Envelope { id: envelope_id, tx, timestamp_ns: now },
    }
}

impl ReplyFields<'_> {
    /// The reply itself, for a requester in the same process.
    fn reply(&self, error: Option<ErrorCode>, payload: Bytes) -> Reply {
        let mut message = busbar_core::Message::new(self.topic.clone(), payload);
        message.destination = self.destination;
        message.envelope = Some(self.envelope);
        Reply { id: self.id, error, remaining: 0, message }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered {
            let fields = reply_fields(self.id, &self.message, self.ids.as_ref());
            let text = Bytes::from_static(b"request dropped without a reply");
            self.reply_to.send_now(&fields, Some(ErrorCode::HandlerError), text);
        }
    }
}

/// The text of the error a request gets when its responder's buffer is full.
pub(crate) const RESPONDER_FULL: &str = "the responder's request buffer is full";

/// `timeout` from now; a timeout too long to add to the clock (`Duration::MAX`, say) means one
/// that never comes (30 years, as tokio's own "far future").
pub(crate) fn deadline_in(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365 * 30))
}

/// A reply as the requester sees it: the message, or the error its status names.
pub(crate) fn reply_result(reply: Reply) -> Result<Message> {
    let text = || String::from_utf8_lossy(&reply.message.payload).into_owned();
    match reply.error {
        None => Ok(Message { sid: 0, inner: reply.message }),
        Some(ErrorCode::NoResponders) => Err(Error::NoResponders { topic: reply.message.topic.to_string() }),
        Some(ErrorCode::HandlerError) => Err(Error::Handler(text())),
        Some(code) => Err(Error::Server { code, message: text() }),
    }
}
