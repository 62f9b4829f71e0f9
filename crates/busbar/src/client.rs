//! The network client: a cheap, cloneable [`Client`] handle in front of one task that owns the
//! socket.
//!
//! ```text
//!  Client (clone) ──┐  bounded mpsc of Command          ┌──► Subscription streams (bounded mpsc)
//!  Client (clone) ──┼──────────────────► connection task ┤
//!  Subscription ────┘  (unsubscribe on drop)             └──► socket (FramedRead / FramedWrite)
//! ```
//!
//! The connection task is the only code that touches the socket: it writes the frames that
//! commands ask for (batching whatever is queued before each flush), reads frames, and hands
//! messages to subscriptions.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use busbar_core::{
    ByteString, ErrorCode, Frame, FrameCodec, Group, GroupPolicy, Hello, Sub, Welcome, validate_pattern,
    validate_topic,
};
use bytes::Bytes;
use futures_core::Stream;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::message::{Message, Outgoing};

/// Whether the client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Dialling or handshaking.
    Connecting,
    /// Handshake done; frames flow.
    Connected,
    /// Closed, by `disconnect`, by the broker, or lost.
    Disconnected,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker address, `host:port`.
    pub addr: String,
    /// Client name, shown in the broker's logs and monitoring.
    pub name: String,
    /// Time allowed for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Messages buffered per subscription before new ones are dropped (and counted).
    pub subscription_capacity: usize,
    /// Commands buffered between the handles and the connection task.
    pub command_capacity: usize,
}

impl ClientOptions {
    /// Defaults for a broker at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            name: "busbar-client".into(),
            connect_timeout: Duration::from_secs(5),
            subscription_capacity: 65_536,
            command_capacity: 1024,
        }
    }

    /// Sets the client name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// What handles ask the connection task to do.
#[derive(Debug)]
enum Command {
    Publish(busbar_core::Message),
    Subscribe { sub: Sub, deliver: SubSink, done: oneshot::Sender<Result<()>> },
    Unsubscribe { sid: u64 },
    Flush { done: oneshot::Sender<Result<()>> },
    Close { done: oneshot::Sender<()> },
}

/// Where the connection task puts a subscription's messages.
#[derive(Debug)]
struct SubSink {
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

/// A handle to a connection. Clone it freely: all clones share the one connection.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    welcome: Arc<Welcome>,
    next_sid: Arc<AtomicU64>,
    subscription_capacity: usize,
}

impl Client {
    /// Connects to a broker at `addr` (`host:port`) with default options.
    pub async fn connect(addr: impl Into<String>) -> Result<Self> {
        Self::connect_with(ClientOptions::new(addr)).await
    }

    /// Connects with the given options: TCP connect, HELLO, WELCOME.
    pub async fn connect_with(options: ClientOptions) -> Result<Self> {
        let (status_tx, status) = watch::channel(Status::Connecting);
        let handshake = async {
            let stream = TcpStream::connect(&options.addr)
                .await
                .map_err(|source| Error::Connect { addr: options.addr.clone(), source })?;
            stream.set_nodelay(true)?;
            let (rd, wr) = stream.into_split();
            let mut reader = FramedRead::new(rd, FrameCodec::default());
            let mut writer = FramedWrite::new(wr, FrameCodec::default());
            let hello = Hello { name: options.name.clone().into(), properties: Default::default() };
            writer.send(Frame::Hello(hello)).await.map_err(codec_error)?;
            match reader.next().await {
                Some(Ok(Frame::Welcome(w))) => Ok((reader, writer, w)),
                Some(Ok(Frame::Error(e))) => {
                    Err(Error::Server { code: e.code, message: e.message.to_string() })
                }
                Some(Ok(other)) => Err(Error::Handshake(format!("expected WELCOME, got {}", other.name()))),
                Some(Err(e)) => Err(codec_error(e)),
                None => Err(Error::Handshake("connection closed during handshake".into())),
            }
        };
        let (mut reader, mut writer, welcome) =
            tokio::time::timeout(options.connect_timeout, handshake).await.map_err(|_| Error::Timeout)??;
        let max = welcome.max_frame_size as usize;
        reader.decoder_mut().set_max_frame_size(max);
        writer.encoder_mut().set_max_frame_size(max);
        debug!(service_id = welcome.service_id, server = %welcome.server_name, "connected");
        let (commands, rx) = mpsc::channel(options.command_capacity.max(1));
        status_tx.send_replace(Status::Connected);
        let task = ConnectionTask {
            reader,
            writer,
            commands: rx,
            status: status_tx,
            subs: HashMap::new(),
            pongs: VecDeque::new(),
        };
        tokio::spawn(task.run());
        Ok(Self {
            commands,
            status,
            welcome: Arc::new(welcome),
            next_sid: Arc::new(AtomicU64::new(1)),
            subscription_capacity: options.subscription_capacity.max(1),
        })
    }

    /// The connection status now.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// A receiver that sees every status change (`changed().await`).
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The service id the broker assigned to this connection.
    pub fn service_id(&self) -> u32 {
        self.welcome.service_id
    }

    /// The largest frame the broker accepts.
    pub fn max_frame_size(&self) -> usize {
        self.welcome.max_frame_size as usize
    }

    async fn command(&self, command: Command) -> Result<()> {
        self.commands.send(command).await.map_err(|_| Error::Closed)
    }

    /// Publishes `payload` to `topic`. Returns once the frame is queued for the socket; use
    /// [`Client::flush`] to wait until the broker has handled it.
    pub async fn publish(&self, topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Result<()> {
        self.publish_message(Outgoing::new(topic, payload)).await
    }

    /// Publishes a message with headers, balance key or envelope.
    pub async fn publish_message(&self, message: Outgoing) -> Result<()> {
        let message = message.0;
        validate_topic(&message.topic)
            .map_err(|source| Error::InvalidTopic { topic: message.topic.to_string(), source })?;
        // Refuse a frame the broker would refuse, here, with a clear error, instead of having
        // the broker close the connection.
        let size = message.frame_size();
        if size > self.max_frame_size() {
            return Err(busbar_core::FrameError::TooLarge { size, max: self.max_frame_size() }.into());
        }
        self.command(Command::Publish(message)).await
    }

    /// Publishes `value` serialised as JSON.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: impl Into<ByteString>,
        value: &T,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.publish(topic, bytes).await
    }

    /// Publishes `value` serialised as MessagePack.
    pub async fn publish_msgpack<T: Serialize + ?Sized>(
        &self,
        topic: impl Into<ByteString>,
        value: &T,
    ) -> Result<()> {
        let bytes = rmp_serde::to_vec_named(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.publish(topic, bytes).await
    }

    /// Subscribes to `pattern` (`*` and `>` wildcards allowed). Returns once the broker has
    /// confirmed the subscription, so messages published after this returns are received.
    pub async fn subscribe(&self, pattern: impl Into<ByteString>) -> Result<Subscription> {
        self.subscribe_inner(pattern.into(), None).await
    }

    /// Subscribes as a member of `group`: each message matching the group goes to one member,
    /// chosen by `policy`.
    pub async fn subscribe_group(
        &self,
        pattern: impl Into<ByteString>,
        group: impl Into<ByteString>,
        policy: GroupPolicy,
    ) -> Result<Subscription> {
        self.subscribe_inner(pattern.into(), Some(Group { name: group.into(), policy })).await
    }

    async fn subscribe_inner(&self, pattern: ByteString, group: Option<Group>) -> Result<Subscription> {
        validate_pattern(&pattern)
            .map_err(|source| Error::InvalidTopic { topic: pattern.to_string(), source })?;
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.subscription_capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let (done, confirmed) = oneshot::channel();
        let sub = Sub { sid, pattern: pattern.clone(), group };
        self.command(Command::Subscribe { sub, deliver: SubSink { tx, dropped: dropped.clone() }, done })
            .await?;
        confirmed.await.map_err(|_| Error::Closed)??;
        Ok(Subscription { sid, pattern, rx, dropped, commands: self.commands.clone(), active: true })
    }

    /// Subscribes and runs `handler` on every message in a task of its own. Dropping or
    /// [`HandlerTask::stop`]ping the returned handle unsubscribes.
    pub async fn subscribe_with<F, Fut>(
        &self,
        pattern: impl Into<ByteString>,
        mut handler: F,
    ) -> Result<HandlerTask>
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut sub = self.subscribe(pattern).await?;
        let sid = sub.sid;
        let task = tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                handler(message).await;
            }
        });
        Ok(HandlerTask { sid, task })
    }

    /// Waits until the broker has handled every frame this client sent before (a PING/PONG round
    /// trip).
    pub async fn flush(&self) -> Result<()> {
        let (done, flushed) = oneshot::channel();
        self.command(Command::Flush { done }).await?;
        flushed.await.map_err(|_| Error::Closed)?
    }

    /// Flushes what is queued and closes the connection, for this handle and all its clones.
    /// Subscriptions end.
    pub async fn disconnect(&self) -> Result<()> {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        Ok(())
    }
}

/// A stream of the messages matching one subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: u64,
    pattern: ByteString,
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    commands: mpsc::Sender<Command>,
    active: bool,
}

impl Subscription {
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
        self.rx.try_recv().ok()
    }

    /// How many messages were dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the subscription at the broker. Messages already buffered can still be read.
    pub async fn unsubscribe(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.active, false) {
            self.commands.send(Command::Unsubscribe { sid: self.sid }).await.map_err(|_| Error::Closed)?;
        }
        Ok(())
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
            // Best effort; if the queue is full, the connection task unsubscribes by itself the
            // next time a message for this subscription finds its receiver gone.
            let _ = self.commands.try_send(Command::Unsubscribe { sid: self.sid });
        }
    }
}

/// A handler started by [`Client::subscribe_with`].
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

    /// Stops the handler (after the message it is handling, if any) and unsubscribes.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for HandlerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn codec_error(e: busbar_core::CodecError) -> Error {
    match e {
        busbar_core::CodecError::Frame(e) => Error::Frame(e),
        busbar_core::CodecError::Io(e) => Error::Io(e),
    }
}

/// Something waiting for the next PONG.
#[derive(Debug)]
enum PongWaiter {
    Flush(oneshot::Sender<Result<()>>),
    Subscribe { sid: u64, done: oneshot::Sender<Result<()>>, error: Option<Error> },
}

/// The task that owns the socket.
struct ConnectionTask {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: FramedWrite<OwnedWriteHalf, FrameCodec>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    subs: HashMap<u64, SubSink>,
    pongs: VecDeque<PongWaiter>,
}

/// Most commands written in one batch before a flush.
const COMMAND_BATCH: usize = 256;

impl ConnectionTask {
    async fn run(mut self) {
        let reason = loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break None };
                    match self.batch(command).await {
                        Ok(true) => continue,
                        Ok(false) => break None,
                        Err(e) => break Some(e),
                    }
                }
                frame = self.reader.next() => match frame {
                    Some(Ok(frame)) => if let Err(e) = self.on_frame(frame).await { break Some(e) },
                    Some(Err(e)) => break Some(codec_error(e)),
                    None => break Some(Error::Closed),
                }
            }
        };
        if let Some(e) = &reason {
            warn!(error = %e, "connection lost");
        }
        self.status.send_replace(Status::Disconnected);
        for waiter in self.pongs.drain(..) {
            match waiter {
                PongWaiter::Flush(done) | PongWaiter::Subscribe { done, .. } => {
                    let _ = done.send(Err(Error::Closed));
                }
            }
        }
        // Dropping `subs` ends every subscription stream.
    }

    /// Writes `first` and whatever else is queued, then flushes once. Ok(false) means close.
    async fn batch(&mut self, first: Command) -> Result<bool> {
        let mut next = Some(first);
        let mut count = 0;
        while let Some(command) = next.take() {
            if !self.apply(command).await? {
                let _ = self.writer.close().await;
                return Ok(false);
            }
            count += 1;
            if count < COMMAND_BATCH {
                next = self.commands.try_recv().ok();
            }
        }
        self.writer.flush().await.map_err(codec_error)?;
        Ok(true)
    }

    /// Queues the frames for one command into the writer's buffer. Ok(false) means close.
    async fn apply(&mut self, command: Command) -> Result<bool> {
        match command {
            Command::Publish(message) => self.feed(Frame::Pub(message)).await?,
            Command::Subscribe { sub, deliver, done } => {
                let sid = sub.sid;
                self.subs.insert(sid, deliver);
                self.feed(Frame::Sub(sub)).await?;
                self.feed(Frame::Ping).await?;
                self.pongs.push_back(PongWaiter::Subscribe { sid, done, error: None });
            }
            Command::Unsubscribe { sid } => {
                if self.subs.remove(&sid).is_some() {
                    self.feed(Frame::Unsub { sid }).await?;
                }
            }
            Command::Flush { done } => {
                self.feed(Frame::Ping).await?;
                self.pongs.push_back(PongWaiter::Flush(done));
            }
            Command::Close { done } => {
                let _ = self.writer.flush().await;
                let _ = done.send(());
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Adds a frame to the write buffer; a frame that cannot be encoded is reported and skipped.
    async fn feed(&mut self, frame: Frame) -> Result<()> {
        match self.writer.feed(frame).await {
            Ok(()) => Ok(()),
            Err(busbar_core::CodecError::Frame(e)) => {
                warn!(error = %e, "frame not sent");
                Ok(())
            }
            Err(e) => Err(codec_error(e)),
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<()> {
        match frame {
            Frame::Msg { sid, message } => {
                let Some(sink) = self.subs.get(&sid) else { return Ok(()) };
                match sink.tx.try_send(Message { sid, inner: message }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let n = sink.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            warn!(sid, dropped = n, "subscription buffer full: dropping messages");
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // The Subscription was dropped without its UNSUB getting through.
                        self.subs.remove(&sid);
                        self.writer.send(Frame::Unsub { sid }).await.map_err(codec_error)?;
                    }
                }
            }
            Frame::Ping => self.writer.send(Frame::Pong).await.map_err(codec_error)?,
            Frame::Pong => match self.pongs.pop_front() {
                Some(PongWaiter::Flush(done)) => {
                    let _ = done.send(Ok(()));
                }
                Some(PongWaiter::Subscribe { done, error, sid }) => {
                    if error.is_some() {
                        self.subs.remove(&sid);
                    }
                    let _ = done.send(error.map_or(Ok(()), Err));
                }
                None => debug!("unexpected PONG"),
            },
            Frame::Error(e) => {
                let error = Error::Server { code: e.code, message: e.message.to_string() };
                // A refused subscription: fail the subscribe call that waits for it.
                let waiting = self.pongs.iter_mut().find_map(|w| match w {
                    PongWaiter::Subscribe { sid, error, .. }
                        if *sid == e.correlation && e.correlation != 0 =>
                    {
                        Some(error)
                    }
                    _ => None,
                });
                match waiting {
                    Some(slot) => *slot = Some(error),
                    None if is_fatal(e.code) => return Err(error),
                    None => warn!(code = %e.code, message = %e.message, "broker reported an error"),
                }
            }
            other => debug!(frame = other.name(), "ignoring unexpected frame"),
        }
        Ok(())
    }
}

/// Errors after which the broker closes the connection.
fn is_fatal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::MalformedFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::UnsupportedVersion
            | ErrorCode::HandshakeRequired
            | ErrorCode::UnexpectedFrame
            | ErrorCode::SlowConsumer
            | ErrorCode::TooManyConnections
            | ErrorCode::HandshakeTimeout
            | ErrorCode::AuthenticationFailed
            | ErrorCode::ShuttingDown
    )
}
