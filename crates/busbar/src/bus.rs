//! [`EventBus`]: one API over the network client and the in-process bus, and [`AnyBus`], which
//! picks one of them from configuration.

use std::future::Future;
use std::time::Duration;

use busbar_core::ByteString;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::{Client, ClientOptions, Pattern};
use crate::error::{Error, Result};
use crate::local::{Bus, BusOptions};
use crate::message::{Message, Outgoing, to_json};
use crate::subscription::{HandlerTask, Requests, Subscription, spawn_handler, spawn_responder};

/// Events, commands and queries, the same whether the bus is a broker across the network
/// ([`Client`]) or in this process ([`Bus`]). Write application code against this trait (or
/// [`AnyBus`]) and choose the transport by configuration.
///
/// Six methods are what a transport provides; the rest are built on them.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes a message (headers, key, destination, transaction …).
    fn publish_message(&self, message: Outgoing) -> impl Future<Output = Result<()>> + Send;

    /// Subscribes to events matching a pattern: a stream of messages. Unsubscribes when dropped.
    fn subscribe(
        &self,
        pattern: impl Into<Pattern> + Send,
    ) -> impl Future<Output = Result<Subscription>> + Send;

    /// Serves requests and commands matching a pattern: a stream of [`crate::Request`]s.
    fn requests(&self, pattern: impl Into<Pattern> + Send) -> impl Future<Output = Result<Requests>> + Send;

    /// Sends a request to one responder and waits for the reply.
    fn request_message(
        &self,
        message: Outgoing,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message>> + Send;

    /// Sends a request to every responder; collects their answers until all have answered,
    /// `expected` have (at least one: `Some(0)` waits for one, as `Some(1)` does), or `timeout`
    /// passes.
    fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Result<Message>>>> + Send;

    /// Waits until everything sent before has been handled by the bus.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Publishes `payload` to `topic`.
    fn publish(
        &self,
        topic: impl Into<ByteString> + Send,
        payload: impl Into<Bytes> + Send,
    ) -> impl Future<Output = Result<()>> + Send {
        self.publish_message(Outgoing::new(topic, payload))
    }

    /// Publishes `value` as JSON.
    fn publish_json<T: Serialize + ?Sized + Sync>(
        &self,
        topic: impl Into<ByteString> + Send,
        value: &T,
    ) -> impl Future<Output = Result<()>> + Send {
        let message = to_json(value).map(|bytes| Outgoing::new(topic, bytes));
        async move { self.publish_message(message?).await }
    }

    /// Publishes `value` as MessagePack.
    fn publish_msgpack<T: Serialize + ?Sized + Sync>(
        &self,
        topic: impl Into<ByteString> + Send,
        value: &T,
    ) -> impl Future<Output = Result<()>> + Send {
        let bytes = rmp_serde::to_vec_named(value).map_err(|e| Error::Codec(e.to_string()));
        let message = bytes.map(|bytes| Outgoing::new(topic, bytes));
        async move { self.publish_message(message?).await }
    }

    /// Subscribes and runs `handler` on every message in a task of its own, in the message's
    /// transaction (what it publishes inherits the transaction id). A panicking handler is
    /// reported and the next message handled. Unsubscribes when the handle is stopped or dropped.
    fn subscribe_with<F, Fut>(
        &self,
        pattern: impl Into<Pattern> + Send,
        handler: F,
    ) -> impl Future<Output = Result<HandlerTask>> + Send
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        async move { Ok(spawn_handler(self.subscribe(pattern).await?, handler)) }
    }

    /// Answers requests with `handler`: `Ok(bytes)` replies, `Err(e)` (or a panic) sends an
    /// error reply. Runs in the request's transaction.
    fn respond<F, Fut, R, E>(
        &self,
        pattern: impl Into<Pattern> + Send,
        handler: F,
    ) -> impl Future<Output = Result<HandlerTask>> + Send
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: Into<Bytes> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        async move { Ok(spawn_responder(self.requests(pattern).await?, handler)) }
    }

    /// Handles commands: `Ok(())` acknowledges, `Err(e)` fails the sender's
    /// [`EventBus::send_command`] with `e`'s text. In a group, each command reaches one handler.
    fn handle_commands<F, Fut, E>(
        &self,
        pattern: impl Into<Pattern> + Send,
        mut handler: F,
    ) -> impl Future<Output = Result<HandlerTask>> + Send
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.respond(pattern, move |m| {
            let run = handler(m);
            async move { run.await.map(|()| Bytes::new()) }
        })
    }

    /// Sends `payload` as a request to one responder and waits for its reply. Fails at once with
    /// [`Error::NoResponders`] when nobody serves the topic, with [`Error::Timeout`] after
    /// `timeout`, with [`Error::Handler`] when the handler failed.
    fn request(
        &self,
        topic: impl Into<ByteString> + Send,
        payload: impl Into<Bytes> + Send,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message>> + Send {
        self.request_message(Outgoing::new(topic, payload), timeout)
    }

    /// A typed query: `query` goes as JSON, the JSON reply is decoded.
    fn query<Q: Serialize + ?Sized + Sync, R: DeserializeOwned>(
        &self,
        topic: impl Into<ByteString> + Send,
        query: &Q,
        timeout: Duration,
    ) -> impl Future<Output = Result<R>> + Send {
        let message = to_json(query).map(|bytes| Outgoing::new(topic, bytes));
        async move { self.request_message(message?, timeout).await?.json() }
    }

    /// Sends a command (as JSON) to exactly one handler; `Ok(())` once the handler accepted it.
    fn send_command<C: Serialize + ?Sized + Sync>(
        &self,
        topic: impl Into<ByteString> + Send,
        command: &C,
        timeout: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        let message = to_json(command).map(|bytes| Outgoing::new(topic, bytes));
        async move { self.request_message(message?, timeout).await.map(drop) }
    }

    /// Scatter-gather: `payload` to every responder of `topic`; see
    /// [`EventBus::request_all_message`].
    fn request_all(
        &self,
        topic: impl Into<ByteString> + Send,
        payload: impl Into<Bytes> + Send,
        timeout: Duration,
        expected: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Result<Message>>>> + Send {
        self.request_all_message(Outgoing::new(topic, payload), timeout, expected)
    }
}

impl EventBus for Client {
    fn publish_message(&self, message: Outgoing) -> impl Future<Output = Result<()>> + Send {
        Client::publish_message(self, message)
    }
    fn subscribe(
        &self,
        pattern: impl Into<Pattern> + Send,
    ) -> impl Future<Output = Result<Subscription>> + Send {
        Client::subscribe(self, pattern)
    }
    fn requests(&self, pattern: impl Into<Pattern> + Send) -> impl Future<Output = Result<Requests>> + Send {
        Client::requests(self, pattern)
    }
    fn request_message(
        &self,
        message: Outgoing,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message>> + Send {
        Client::request_message(self, message, timeout)
    }
    fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Result<Message>>>> + Send {
        Client::request_all_message(self, message, timeout, expected)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        Client::flush(self)
    }
}

impl EventBus for Bus {
    // Lazy like the client's: nothing happens until the future is polled (a publish future
    // dropped unpolled publishes nothing, on either transport).
    async fn publish_message(&self, message: Outgoing) -> Result<()> {
        Bus::publish_message(self, message).map(drop)
    }
    async fn subscribe(&self, pattern: impl Into<Pattern> + Send) -> Result<Subscription> {
        Bus::subscribe(self, pattern)
    }
    async fn requests(&self, pattern: impl Into<Pattern> + Send) -> Result<Requests> {
        Bus::requests(self, pattern)
    }
    fn request_message(
        &self,
        message: Outgoing,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message>> + Send {
        Bus::request_message(self, message, timeout)
    }
    fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Result<Message>>>> + Send {
        Bus::request_all_message(self, message, timeout, expected)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Which bus an application uses, chosen at run time.
#[derive(Debug, Clone)]
// Built once at start-up: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum BusConfig {
    /// In this process, no network.
    Local(BusOptions),
    /// Through a broker.
    Remote(ClientOptions),
}

/// An [`EventBus`] that is either in-process or remote, decided by [`BusConfig`].
#[derive(Debug, Clone)]
pub enum AnyBus {
    /// The in-process bus.
    Local(Bus),
    /// The network client.
    Remote(Client),
}

impl AnyBus {
    /// Builds the bus `config` names (connecting, for a remote one).
    pub async fn new(config: BusConfig) -> Result<Self> {
        Ok(match config {
            BusConfig::Local(options) => AnyBus::Local(Bus::with_options(options)),
            BusConfig::Remote(options) => AnyBus::Remote(Client::connect_with(options).await?),
        })
    }
}

macro_rules! delegate {
    ($self:ident, $bus:ident => $call:expr) => {
        async move {
            match $self {
                AnyBus::Local($bus) => $call.await,
                AnyBus::Remote($bus) => $call.await,
            }
        }
    };
}

// The delegating futures are spelled out so that the `+ Send` the trait promises is checked here.
#[allow(clippy::manual_async_fn)]
impl EventBus for AnyBus {
    fn publish_message(&self, message: Outgoing) -> impl Future<Output = Result<()>> + Send {
        delegate!(self, b => EventBus::publish_message(b, message))
    }
    fn subscribe(
        &self,
        pattern: impl Into<Pattern> + Send,
    ) -> impl Future<Output = Result<Subscription>> + Send {
        let pattern = pattern.into();
        delegate!(self, b => EventBus::subscribe(b, pattern))
    }
    fn requests(&self, pattern: impl Into<Pattern> + Send) -> impl Future<Output = Result<Requests>> + Send {
        let pattern = pattern.into();
        delegate!(self, b => EventBus::requests(b, pattern))
    }
    fn request_message(
        &self,
        message: Outgoing,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message>> + Send {
        delegate!(self, b => EventBus::request_message(b, message, timeout))
    }
    fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> impl Future<Output = Result<Vec<Result<Message>>>> + Send {
        delegate!(self, b => EventBus::request_all_message(b, message, timeout, expected))
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        delegate!(self, b => EventBus::flush(b))
    }
}
