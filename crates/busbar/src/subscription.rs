//! Subscription handles shared by the network client and the in-process bus: streams of
//! messages and of requests, handler tasks, and the way each unsubscribes.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use busbar_core::ByteString;
use bytes::Bytes;
use futures_core::Stream;
use futures_util::FutureExt;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::connection::Command;
use crate::context::in_transaction;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::request::Request;

/// How a subscription handle ends its subscription.
pub(crate) enum Unsubscriber {
    /// Through the connection task.
    Remote(crate::commands::CommandTx),
    /// Directly in the in-process bus.
    Local(Arc<dyn Fn(u64) + Send + Sync>),
}

impl std::fmt::Debug for Unsubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unsubscriber::Remote(_) => "Remote",
            Unsubscriber::Local(_) => "Local",
        })
    }
}

impl Unsubscriber {
    async fn unsubscribe(&self, sid: u64, active: &mut bool) -> Result<()> {
        if std::mem::replace(active, false) {
            match self {
                Unsubscriber::Remote(commands) => commands.send(Command::Unsubscribe { sid }).await?,
                Unsubscriber::Local(unsubscribe) => unsubscribe(sid),
            }
        }
        Ok(())
    }

    fn unsubscribe_now(&self, sid: u64) {
        match self {
            // Best effort; if the queue is full, the connection task unsubscribes by itself the
            // next time a message for this subscription finds its receiver gone.
            Unsubscriber::Remote(commands) => {
                let _ = commands.try_send(Command::Unsubscribe { sid });
            }
            Unsubscriber::Local(unsubscribe) => unsubscribe(sid),
        }
    }
}

/// A stream of the messages matching one subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: u64,
    pattern: ByteString,
    rx: crate::feed::FeedRx<Message>,
    dropped: Arc<AtomicU64>,
    unsub: Unsubscriber,
    active: bool,
    tracker: Option<TaskTracker>,
}

impl Subscription {
    /// Handler tasks started on it are tracked (so that `drain` can wait for them).
    pub(crate) fn tracked(mut self, tracker: TaskTracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    pub(crate) fn new(
        sid: u64,
        pattern: ByteString,
        rx: crate::feed::FeedRx<Message>,
        dropped: Arc<AtomicU64>,
        unsub: Unsubscriber,
    ) -> Self {
        Self { sid, pattern, rx, dropped, unsub, active: true, tracker: None }
    }

    /// The subscription id (unique within its connection).
    pub fn id(&self) -> u64 {
        self.sid
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The next message; `None` once the subscription or the connection has ended.
    pub async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is already buffered, without waiting.
    pub fn try_next(&mut self) -> Option<Message> {
        self.rx.try_recv()
    }

    /// How many messages were dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the subscription at the broker. Messages already buffered can still be read.
    pub async fn unsubscribe(&mut self) -> Result<()> {
        self.unsub.unsubscribe(self.sid, &mut self.active).await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            self.unsub.unsubscribe_now(self.sid);
        }
    }
}

/// A stream of requests to answer, from [`Client::requests`](crate::Client::requests). Dropping it unsubscribes.
#[derive(Debug)]
pub struct Requests {
    sid: u64,
    rx: crate::feed::FeedRx<Request>,
    dropped: Arc<AtomicU64>,
    unsub: Unsubscriber,
    active: bool,
    tracker: Option<TaskTracker>,
}

impl Requests {
    /// Handler tasks started on it are tracked (so that `drain` can wait for them).
    pub(crate) fn tracked(mut self, tracker: TaskTracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    pub(crate) fn new(
        sid: u64,
        rx: crate::feed::FeedRx<Request>,
        dropped: Arc<AtomicU64>,
        unsub: Unsubscriber,
    ) -> Self {
        Self { sid, rx, dropped, unsub, active: true, tracker: None }
    }

    /// The subscription id.
    pub fn id(&self) -> u64 {
        self.sid
    }

    /// The next request; `None` once the subscription or the connection has ended.
    pub async fn next(&mut self) -> Option<Request> {
        self.rx.recv().await
    }

    /// How many requests were refused because the buffer was full (their requesters got
    /// TooManyRequests at once).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops serving at the broker. Requests already buffered can still be answered.
    pub async fn unsubscribe(&mut self) -> Result<()> {
        self.unsub.unsubscribe(self.sid, &mut self.active).await
    }
}

impl Stream for Requests {
    type Item = Request;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        if self.active {
            self.unsub.unsubscribe_now(self.sid);
        }
    }
}

/// A handler started by [`EventBus::subscribe_with`](crate::EventBus::subscribe_with),
/// [`EventBus::respond`](crate::EventBus::respond) or
/// [`EventBus::handle_commands`](crate::EventBus::handle_commands).
#[derive(Debug)]
pub struct HandlerTask {
    sid: u64,
    task: tokio::task::JoinHandle<()>,
}

impl HandlerTask {
    /// The subscription id.
    pub fn id(&self) -> u64 {
        self.sid
    }

    /// Stops the handler at once and unsubscribes. A message being handled is abandoned at its
    /// next `.await` (a request being answered then gets the "dropped without a reply" error);
    /// to let handlers finish, use [`Client::drain`](crate::Client::drain) instead.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for HandlerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `handler` on every message of `sub` in a task of its own, each in its message's
/// transaction; a panicking handler is reported and the next message handled.
pub(crate) fn spawn_handler<F, Fut>(mut sub: Subscription, mut handler: F) -> HandlerTask
where
    F: FnMut(Message) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sid = sub.sid;
    let tracker = sub.tracker.clone();
    let task = spawn(tracker, async move {
        while let Some(message) = sub.next().await {
            let tx = message.envelope().map(|e| e.tx);
            let topic = message.topic().to_string();
            // The handler is called inside the caught future, in its transaction: a closure that
            // panics before it returns its future (parsing the payload, say) is caught too.
            let run = AssertUnwindSafe(in_transaction(tx, async { handler(message).await })).catch_unwind();
            if run.await.is_err() {
                error!(%topic, "subscription handler panicked; continuing with the next message");
            }
        }
    });
    HandlerTask { sid, task }
}

/// Answers every request of `requests` with `handler`: `Ok` replies, `Err` and panics send error
/// replies. Each runs in its request's transaction.
pub(crate) fn spawn_responder<F, Fut, R, E>(mut requests: Requests, mut handler: F) -> HandlerTask
where
    F: FnMut(Message) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    R: Into<Bytes> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let sid = requests.sid;
    let tracker = requests.tracker.clone();
    let task = spawn(tracker, async move {
        while let Some(request) = requests.next().await {
            let tx = request.message().envelope().map(|e| e.tx);
            let message = request.message().clone();
            let run = AssertUnwindSafe(in_transaction(tx, async { handler(message).await })).catch_unwind();
            let sent = match run.await {
                Ok(Ok(reply)) => request.reply(reply).await,
                Ok(Err(e)) => request.fail(e).await,
                Err(_) => {
                    error!(topic = request.topic(), "request handler panicked");
                    request.fail("the handler panicked").await
                }
            };
            match sent {
                Ok(()) => {}
                // The connection is closed for good: nothing more will come.
                Err(Error::Closed) => break,
                // One reply failed (too large for the broker, say; the requester was told):
                // the next request is served as usual.
                Err(e) => warn!(error = %e, "a reply could not be sent"),
            }
        }
    });
    HandlerTask { sid, task }
}

fn spawn<F>(tracker: Option<TaskTracker>, task: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match tracker {
        Some(tracker) => tracker.spawn(task),
        None => tokio::spawn(task),
    }
}
