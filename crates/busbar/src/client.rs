//! The network client: a cheap, cloneable [`Client`] handle in front of one task that owns the
//! socket.
//!
//! ```text
//!  Client (clone) ──┐  bounded mpsc of Command          ┌──► Subscription / Requests streams (bounded)
//!  Client (clone) ──┼──────────────────► connection task ┼──► pending requests (oneshot / bounded mpsc)
//!  Subscription ────┘  (unsubscribe on drop)             └──► socket (FramedRead / FramedWrite)
//! ```
//!
//! The connection task is the only code that touches the socket: it writes the frames that
//! commands ask for (batching whatever is queued before each flush), reads frames, and hands
//! messages, requests and replies to whoever waits for them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use busbar_core::{
    ByteString, ErrorCode, Frame, FrameCodec, Group, GroupPolicy, Hello, IdGenerator, Reply, Sub, SubKind,
    UlidGenerator, Welcome, validate_pattern,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::message::{Message, Outgoing};
use crate::request::{ReplyTo, Request, reply_result};
use crate::subscription::{Requests, Subscription, Unsubscriber};

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
    /// Service name to register, so that others can address this client by name.
    pub service: Option<String>,
    /// Time allowed for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Messages (or requests) buffered per subscription before new ones are dropped and counted.
    pub subscription_capacity: usize,
    /// Commands buffered between the handles and the connection task.
    pub command_capacity: usize,
    /// Makes message ids; the default is time-sortable and monotonic (ULID-style).
    pub id_generator: Arc<dyn IdGenerator>,
}

impl ClientOptions {
    /// Defaults for a broker at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            name: "busbar-client".into(),
            service: None,
            connect_timeout: Duration::from_secs(5),
            subscription_capacity: 65_536,
            command_capacity: 1024,
            id_generator: Arc::new(UlidGenerator::new()),
        }
    }

    /// Sets the client name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Registers a service name at connect, for direct addressing by name.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Uses another id generator.
    pub fn id_generator(mut self, ids: Arc<dyn IdGenerator>) -> Self {
        self.id_generator = ids;
        self
    }
}

/// What to subscribe to: a pattern, optionally as a member of a load-balanced group.
///
/// `&str` and `String` convert into it, so `client.subscribe("a.>")` works;
/// `Pattern::new("jobs.*").group("workers", GroupPolicy::RoundRobin)` joins a group.
#[derive(Debug, Clone)]
pub struct Pattern {
    pattern: ByteString,
    group: Option<Group>,
}

impl Pattern {
    /// A plain pattern.
    pub fn new(pattern: impl Into<ByteString>) -> Self {
        Self { pattern: pattern.into(), group: None }
    }

    /// Joins group `name`: each message (or request) goes to one member, chosen by `policy`.
    pub fn group(mut self, name: impl Into<ByteString>, policy: GroupPolicy) -> Self {
        self.group = Some(Group { name: name.into(), policy });
        self
    }

    pub(crate) fn pattern_str(&self) -> &str {
        &self.pattern
    }

    pub(crate) fn group_spec(&self) -> Option<&Group> {
        self.group.as_ref()
    }
}

impl From<&str> for Pattern {
    fn from(p: &str) -> Self {
        Self::new(p)
    }
}

impl From<String> for Pattern {
    fn from(p: String) -> Self {
        Self::new(p)
    }
}

impl From<ByteString> for Pattern {
    fn from(p: ByteString) -> Self {
        Self::new(p)
    }
}

/// What handles ask the connection task to do.
#[derive(Debug)]
pub(crate) enum Command {
    Publish(busbar_core::Message),
    Subscribe { sub: Sub, sink: Sink, done: oneshot::Sender<Result<()>> },
    Unsubscribe { sid: u64 },
    Request { request: busbar_core::Request, sink: ReplySink },
    CancelRequest { id: u64 },
    Reply(Reply),
    Flush { done: oneshot::Sender<Result<()>> },
    Close { done: oneshot::Sender<()> },
}

/// Where the connection task puts a subscription's messages or requests.
#[derive(Debug)]
pub(crate) enum Sink {
    Events { tx: mpsc::Sender<Message>, dropped: Arc<AtomicU64> },
    Requests { tx: mpsc::Sender<Request>, dropped: Arc<AtomicU64> },
}

/// Where the connection task puts the replies to one request.
#[derive(Debug)]
pub(crate) enum ReplySink {
    One(oneshot::Sender<Reply>),
    All(mpsc::Sender<Reply>),
}

/// Most replies a scatter-gather request buffers before further ones are dropped.
const GATHER_CAPACITY: usize = 1024;

/// A handle to a connection. Clone it freely: all clones share the one connection.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    welcome: Arc<Welcome>,
    next_id: Arc<AtomicU64>,
    subscription_capacity: usize,
    ids: Arc<dyn IdGenerator>,
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
            let mut hello = Hello { name: options.name.clone().into(), properties: Default::default() };
            if let Some(service) = &options.service {
                hello.properties.insert("service", service.clone());
            }
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
            handle: commands.downgrade(),
            ids: options.id_generator.clone(),
            status: status_tx,
            subs: HashMap::new(),
            requests: HashMap::new(),
            pongs: VecDeque::new(),
        };
        tokio::spawn(task.run());
        Ok(Self {
            commands,
            status,
            welcome: Arc::new(welcome),
            next_id: Arc::new(AtomicU64::new(1)),
            subscription_capacity: options.subscription_capacity.max(1),
            ids: options.id_generator,
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

    fn prepare(&self, message: Outgoing) -> Result<busbar_core::Message> {
        message.prepare(self.ids.as_ref(), self.max_frame_size())
    }

    /// Publishes `payload` to `topic`. Returns once the frame is queued for the socket; use
    /// [`Client::flush`] to wait until the broker has handled it.
    pub async fn publish(&self, topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Result<()> {
        self.publish_message(Outgoing::new(topic, payload)).await
    }

    /// Publishes a message with headers, balance key, destination or transaction.
    pub async fn publish_message(&self, message: Outgoing) -> Result<()> {
        let message = self.prepare(message)?;
        self.command(Command::Publish(message)).await
    }

    async fn subscribe_kind(&self, pattern: Pattern, kind: SubKind, sink: Sink) -> Result<u64> {
        let Pattern { pattern, group } = pattern;
        validate_pattern(&pattern)
            .map_err(|source| Error::InvalidTopic { topic: pattern.to_string(), source })?;
        let sid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, confirmed) = oneshot::channel();
        let sub = Sub { sid, pattern, group, kind };
        self.command(Command::Subscribe { sub, sink, done }).await?;
        confirmed.await.map_err(|_| Error::Closed)??;
        Ok(sid)
    }

    fn new_request(&self, message: Outgoing, timeout: Duration, all: bool) -> Result<busbar_core::Request> {
        let message = self.prepare(message)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        Ok(busbar_core::Request { id, all, timeout_ms, message })
    }

    /// Subscribes to events matching a pattern (`*` and `>` wildcards allowed; see [`Pattern`]
    /// for groups). Returns once the broker has confirmed the subscription, so messages published
    /// after this returns are received.
    pub async fn subscribe(&self, pattern: impl Into<Pattern>) -> Result<Subscription> {
        let pattern = pattern.into();
        let name = pattern.pattern.clone();
        let (tx, rx) = mpsc::channel(self.subscription_capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = Sink::Events { tx, dropped: dropped.clone() };
        let sid = self.subscribe_kind(pattern, SubKind::Events, sink).await?;
        Ok(Subscription::new(sid, name, rx, dropped, Unsubscriber::Remote(self.commands.clone())))
    }

    /// Subscribes as a member of `group`: each message matching the group goes to one member,
    /// chosen by `policy`.
    pub async fn subscribe_group(
        &self,
        pattern: impl Into<ByteString>,
        group: impl Into<ByteString>,
        policy: GroupPolicy,
    ) -> Result<Subscription> {
        self.subscribe(Pattern::new(pattern).group(group, policy)).await
    }

    /// Serves requests (queries and commands) matching a pattern: a stream of [`Request`]s, each
    /// to be answered with [`Request::reply`] or [`Request::fail`].
    pub async fn requests(&self, pattern: impl Into<Pattern>) -> Result<Requests> {
        let pattern = pattern.into();
        let (tx, rx) = mpsc::channel(self.subscription_capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = Sink::Requests { tx, dropped: dropped.clone() };
        let sid = self.subscribe_kind(pattern, SubKind::Requests, sink).await?;
        Ok(Requests::new(sid, rx, dropped, Unsubscriber::Remote(self.commands.clone())))
    }

    /// [`Client::request`] with headers, a balance key or a destination.
    pub async fn request_message(&self, message: Outgoing, timeout: Duration) -> Result<Message> {
        let request = self.new_request(message, timeout, false)?;
        let id = request.id;
        let (tx, rx) = oneshot::channel();
        self.command(Command::Request { request, sink: ReplySink::One(tx) }).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply_result(reply),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => {
                let _ = self.commands.try_send(Command::CancelRequest { id });
                Err(Error::Timeout)
            }
        }
    }

    /// Scatter-gather: sends the request to every responder and collects their answers until all
    /// have answered, `expected` answers have arrived, or `timeout` passes. Each answer is a
    /// reply or the error its responder returned. [`Error::NoResponders`] when nobody serves the
    /// topic.
    pub async fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> Result<Vec<Result<Message>>> {
        let request = self.new_request(message, timeout, true)?;
        let id = request.id;
        let (tx, mut rx) = mpsc::channel(GATHER_CAPACITY);
        self.command(Command::Request { request, sink: ReplySink::All(tx) }).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut answers = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => {
                    let last = reply.remaining == 0;
                    match reply_result(reply) {
                        Err(Error::NoResponders { topic }) if answers.is_empty() && last => {
                            return Err(Error::NoResponders { topic });
                        }
                        answer => answers.push(answer),
                    }
                    if last || expected.is_some_and(|n| answers.len() >= n) {
                        break;
                    }
                }
                Ok(None) if answers.is_empty() => return Err(Error::Closed),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = self.commands.try_send(Command::CancelRequest { id });
        Ok(answers)
    }

    /// Waits until the broker has handled every frame this client sent before (a PING/PONG round
    /// trip).
    pub async fn flush(&self) -> Result<()> {
        let (done, flushed) = oneshot::channel();
        self.command(Command::Flush { done }).await?;
        flushed.await.map_err(|_| Error::Closed)?
    }

    /// Flushes what is queued and closes the connection, for this handle and all its clones.
    /// Subscriptions end; requests in flight fail with [`Error::Closed`].
    pub async fn disconnect(&self) -> Result<()> {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        Ok(())
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
    /// For the requests handed to responders (weak, so that the task ends with the last handle).
    handle: mpsc::WeakSender<Command>,
    ids: Arc<dyn IdGenerator>,
    status: watch::Sender<Status>,
    subs: HashMap<u64, Sink>,
    requests: HashMap<u64, ReplySink>,
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
        // Dropping `subs` ends every subscription stream; dropping `requests` fails every request
        // in flight with `Error::Closed`.
    }

    /// Writes `first` and whatever else is queued, then flushes once. Ok(false) means close.
    async fn batch(&mut self, first: Command) -> Result<bool> {
        let mut next = Some(first);
        let mut count = 0;
        while let Some(command) = next.take() {
            if !self.apply(command).await? {
                let _ = SinkExt::<Frame>::close(&mut self.writer).await;
                return Ok(false);
            }
            count += 1;
            if count < COMMAND_BATCH {
                next = self.commands.try_recv().ok();
            }
        }
        SinkExt::<Frame>::flush(&mut self.writer).await.map_err(codec_error)?;
        Ok(true)
    }

    /// Queues the frames for one command into the writer's buffer. Ok(false) means close.
    async fn apply(&mut self, command: Command) -> Result<bool> {
        match command {
            Command::Publish(message) => self.feed(Frame::Pub(message)).await?,
            Command::Subscribe { sub, sink, done } => {
                let sid = sub.sid;
                self.subs.insert(sid, sink);
                self.feed(Frame::Sub(sub)).await?;
                self.feed(Frame::Ping).await?;
                self.pongs.push_back(PongWaiter::Subscribe { sid, done, error: None });
            }
            Command::Unsubscribe { sid } => {
                if self.subs.remove(&sid).is_some() {
                    self.feed(Frame::Unsub { sid }).await?;
                }
            }
            Command::Request { request, sink } => {
                self.requests.insert(request.id, sink);
                self.feed(Frame::Request(request)).await?;
            }
            Command::CancelRequest { id } => {
                self.requests.remove(&id);
            }
            Command::Reply(reply) => self.feed(Frame::Reply(reply)).await?,
            Command::Flush { done } => {
                self.feed(Frame::Ping).await?;
                self.pongs.push_back(PongWaiter::Flush(done));
            }
            Command::Close { done } => {
                let _ = SinkExt::<Frame>::flush(&mut self.writer).await;
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
                let Some(Sink::Events { tx, dropped }) = self.subs.get(&sid) else { return Ok(()) };
                let gone = offer(tx, dropped, sid, Message { sid, inner: message });
                if gone {
                    self.forget_subscription(sid).await?;
                }
            }
            Frame::Call(call) => {
                let Some(Sink::Requests { tx, dropped }) = self.subs.get(&call.sid) else { return Ok(()) };
                let Some(commands) = self.handle.upgrade() else { return Ok(()) };
                let message = Message { sid: call.sid, inner: call.message };
                let request = Request::new(call.id, message, ReplyTo::Remote(commands), self.ids.clone());
                if offer(tx, dropped, call.sid, request) {
                    self.forget_subscription(call.sid).await?;
                }
            }
            Frame::Reply(reply) => {
                let id = reply.id;
                match self.requests.get(&id) {
                    Some(ReplySink::One(_)) => {
                        if let Some(ReplySink::One(tx)) = self.requests.remove(&id) {
                            let _ = tx.send(reply);
                        }
                    }
                    Some(ReplySink::All(tx)) => {
                        let last = reply.remaining == 0;
                        match tx.try_send(reply) {
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                warn!(id, "gather buffer full: reply dropped")
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                self.requests.remove(&id);
                            }
                            Ok(()) if last => {
                                self.requests.remove(&id);
                            }
                            Ok(()) => {}
                        }
                    }
                    None => debug!(id, "reply to a request no longer waited for"),
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

    /// The subscription's receiver was dropped without its UNSUB getting through: send it now.
    async fn forget_subscription(&mut self, sid: u64) -> Result<()> {
        self.subs.remove(&sid);
        self.writer.send(Frame::Unsub { sid }).await.map_err(codec_error)
    }
}

/// Hands `item` to a subscription's buffer without waiting. A full buffer drops it and counts
/// (logged at each power of two). Returns true when the receiver is gone.
fn offer<T>(tx: &mpsc::Sender<T>, dropped: &AtomicU64, sid: u64, item: T) -> bool {
    match tx.try_send(item) {
        Ok(()) => false,
        Err(mpsc::error::TrySendError::Full(_)) => {
            let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(sid, dropped = n, "subscription buffer full: dropping");
            }
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => true,
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
