//! A request received by a responder, and the reply it owes.

use std::sync::Arc;

use busbar_core::{Envelope, ErrorCode, IdGenerator, Reply};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::connection::Command;
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
    /// Over the network, through the connection task.
    Remote(crate::commands::CommandTx),
    /// In process, straight to the waiting requester.
    One(Option<oneshot::Sender<Reply>>),
    /// In process, to a scatter-gather collector.
    All(mpsc::Sender<Reply>),
}

impl ReplyTo {
    async fn send(&mut self, reply: Reply) -> Result<()> {
        match self {
            ReplyTo::Remote(commands) => commands.send(Command::Reply(Box::new(reply))).await,
            ReplyTo::All(tx) => tx.send(reply).await.map_err(|_| Error::Closed),
            ReplyTo::One(tx) => tx.take().ok_or(Error::Closed)?.send(reply).map_err(|_| Error::Closed),
        }
    }

    fn send_now(&mut self, reply: Reply) {
        let _ = match self {
            ReplyTo::Remote(commands) => commands.try_send(Command::Reply(Box::new(reply))).is_ok(),
            ReplyTo::All(tx) => tx.try_send(reply).is_ok(),
            ReplyTo::One(tx) => tx.take().is_some_and(|tx| tx.send(reply).is_ok()),
        };
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
    pub async fn reply(mut self, payload: impl Into<Bytes>) -> Result<()> {
        let reply = self.build(None, payload.into());
        self.reply_to.send(reply).await
    }

    /// Answers with `value` as JSON.
    pub async fn reply_json<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.reply(bytes).await
    }

    /// Answers with an error: the requester's call fails with [`Error::Handler`] and this text.
    pub async fn fail(mut self, reason: impl std::fmt::Display) -> Result<()> {
        let reply = self.build(Some(ErrorCode::HandlerError), reason.to_string().into());
        self.reply_to.send(reply).await
    }

    fn build(&mut self, error: Option<ErrorCode>, payload: Bytes) -> Reply {
        self.answered = true;
        let request = &self.message.inner;
        let mut message = busbar_core::Message::new(request.topic.clone(), payload);
        message.destination = request.source;
        let now = busbar_core::id::now_ns();
        let id = self.ids.next_id_at(now);
        let tx = request.envelope.map_or(id, |e| e.tx);
        message.envelope = Some(Envelope { id, tx, timestamp_ns: now });
        Reply { id: self.id, error, remaining: 0, message }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered {
            let reply = self.build(Some(ErrorCode::HandlerError), "request dropped without a reply".into());
            // Best effort: when the queue is full the requester times out instead.
            self.reply_to.send_now(reply);
        }
    }
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
