//! A request received by a responder, and the reply it owes.

use std::sync::Arc;

use busbar_core::{Envelope, ErrorCode, IdGenerator, Reply};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::client::Command;
use crate::error::{Error, Result};
use crate::message::Message;

/// A request or command to answer. Reply with [`Request::reply`] (or [`Request::fail`]); a
/// request dropped without a reply is answered with an error for you, so the requester never
/// waits for its timeout because a handler forgot.
#[derive(Debug)]
pub struct Request {
    pub(crate) id: u64,
    pub(crate) message: Message,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) ids: Arc<dyn IdGenerator>,
    pub(crate) answered: bool,
}

impl Request {
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
        self.commands.send(Command::Reply(reply)).await.map_err(|_| Error::Closed)
    }

    /// Answers with `value` as JSON.
    pub async fn reply_json<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.reply(bytes).await
    }

    /// Answers with an error: the requester's call fails with [`Error::Handler`] and this text.
    pub async fn fail(mut self, reason: impl std::fmt::Display) -> Result<()> {
        let reply = self.build(Some(ErrorCode::HandlerError), reason.to_string().into());
        self.commands.send(Command::Reply(reply)).await.map_err(|_| Error::Closed)
    }

    fn build(&mut self, error: Option<ErrorCode>, payload: Bytes) -> Reply {
        self.answered = true;
        let request = &self.message.inner;
        let mut message = busbar_core::Message::new(request.topic.clone(), payload);
        message.destination = request.source;
        let id = self.ids.next_id();
        let tx = request.envelope.map_or(id, |e| e.tx);
        message.envelope = Some(Envelope { id, tx, timestamp_ns: busbar_core::id::now_ns() });
        Reply { id: self.id, error, remaining: 0, message }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered {
            let reply = self.build(Some(ErrorCode::HandlerError), "request dropped without a reply".into());
            // Best effort: when the queue is full the requester times out instead.
            let _ = self.commands.try_send(Command::Reply(reply));
        }
    }
}
