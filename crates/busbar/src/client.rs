//! The network client: a cheap, cloneable [`Client`] handle in front of one task that owns the
//! socket.
//!
//! ```text
//!  Client (clone) ──┐  bounded queue of Command         ┌──► Subscription / Requests streams (bounded)
//!  Client (clone) ──┼──────────────────► connection task ┼──► pending requests (oneshot / bounded mpsc)
//!  Subscription ────┘  (unsubscribe on drop)             └──► socket (own read buffer / FramedWrite)
//! ```
//!
//! The connection task is the only code that touches the socket: it writes the frames that
//! commands ask for (batching whatever is queued before each flush), reads frames, and hands
//! messages, requests and replies to whoever waits for them. Publishes are encoded by the
//! publishing task straight into the queue (see `commands.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use busbar_core::{
    ByteString, Group, GroupPolicy, IdGenerator, Sub, SubKind, UlidGenerator, Welcome, validate_pattern,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::commands::{CommandTx, TrySendError};
use crate::connection::{Command, ConnectionTask, ReplySink, Sink, handshake};
use crate::error::{Error, Result};
use crate::message::{Message, Outgoing};
use crate::request::reply_result;
use crate::subscription::{Requests, Subscription, Unsubscriber};

/// Whether the client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Dialling or handshaking, the first time.
    Connecting,
    /// Handshake done; frames flow.
    Connected,
    /// The connection was lost; trying to get it back (publishes are buffered meanwhile).
    Reconnecting,
    /// Closed for good: by `disconnect`, or lost with reconnecting off or given up.
    Disconnected,
}

/// What a client presents in its handshake. Sent as given: use TLS on untrusted networks.
#[derive(Clone)]
pub enum Credentials {
    /// A shared token.
    Token(String),
    /// A user name and password.
    User {
        /// The user name.
        name: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(***)"),
            Credentials::User { name, .. } => write!(f, "User({name:?}, ***)"),
        }
    }
}

/// How the client gets a lost connection back.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Reconnect at all.
    pub enabled: bool,
    /// Wait before the first attempt; doubles per failed attempt (at least 10 ms after the
    /// first), with ±50 % jitter.
    pub initial_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
    /// Give up after this many failed attempts (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

/// What `publish` does while disconnected and the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfflinePolicy {
    /// Refuse the publish with [`Error::BufferFull`].
    #[default]
    Error,
    /// Accept it and drop the oldest buffered message.
    DropOldest,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker addresses, `host:port`; the first is tried first, the others on reconnect in turn.
    pub servers: Vec<String>,
    /// Client name, shown in the broker's logs and monitoring.
    pub name: String,
    /// Service name to register, so that others can address this client by name.
    pub service: Option<String>,
    /// How to authenticate, when the broker asks for it.
    pub credentials: Option<Credentials>,
    /// TLS settings; TLS is also used for every `busbars://` server address.
    pub tls: Option<crate::tls::ClientTls>,
    /// Time allowed for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Messages (or requests) buffered per subscription before new ones are dropped and counted.
    pub subscription_capacity: usize,
    /// Commands buffered between the handles and the connection task.
    pub command_capacity: usize,
    /// Makes message ids; the default is time-sortable and monotonic (ULID-style).
    pub id_generator: Arc<dyn IdGenerator>,
    /// Reconnection after a lost connection.
    pub reconnect: Reconnect,
    /// Ping the broker after this long without a frame from it (and again after each further
    /// quiet interval); zero disables heartbeats.
    pub heartbeat_interval: Duration,
    /// Unanswered pings before the connection counts as lost (at least 1): lost after
    /// `heartbeat_interval × (heartbeat_max_missed + 1)` without a frame from the broker.
    pub heartbeat_max_missed: u32,
    /// Publishes buffered while disconnected, flushed on reconnect. One larger than the new
    /// broker's `max_frame_size` (after a failover to a broker with a smaller limit) is dropped
    /// with a warning; the others still go.
    pub offline_buffer: usize,
    /// Most bytes of frames in that buffer (a publish larger than this is never kept).
    pub offline_buffer_bytes: usize,
    /// What a publish does when that buffer is full (by count or by bytes).
    pub offline_policy: OfflinePolicy,
}

impl ClientOptions {
    /// Defaults for a broker at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            servers: vec![addr.into()],
            name: "busbar-client".into(),
            service: None,
            credentials: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            subscription_capacity: 65_536,
            command_capacity: 1024,
            id_generator: Arc::new(UlidGenerator::new()),
            reconnect: Reconnect::default(),
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_max_missed: 2,
            offline_buffer: 8192,
            offline_buffer_bytes: 8 * 1024 * 1024,
            offline_policy: OfflinePolicy::Error,
        }
    }

    /// Authenticates with a shared token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::Token(token.into()));
        self
    }

    /// Authenticates as a user with a password.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::User { name: name.into(), password: password.into() });
        self
    }

    /// Adds a broker address to try (on reconnect, in turn).
    pub fn server(mut self, addr: impl Into<String>) -> Self {
        self.servers.push(addr.into());
        self
    }

    /// Turns reconnection off: a lost connection ends the client.
    pub fn no_reconnect(mut self) -> Self {
        self.reconnect.enabled = false;
        self
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
    /// The name follows the topic rules (dot-separated tokens, no wildcards, at most 1 KiB);
    /// another is refused when subscribing ([`Error::InvalidTopic`]).
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

/// Most replies a scatter-gather request buffers before further ones are dropped.
const GATHER_CAPACITY: usize = 1024;

/// A handle to a connection. Clone it freely: all clones share the one connection.
#[derive(Debug, Clone)]
pub struct Client {
    commands: CommandTx,
    status: watch::Receiver<Status>,
    welcome: watch::Receiver<Arc<Welcome>>,
    next_id: Arc<AtomicU64>,
    subscription_capacity: usize,
    ids: Arc<dyn IdGenerator>,
    offline: Arc<crate::connection::OfflineState>,
    /// The current broker's `max_frame_size`, read per publish without the watch's lock.
    max_frame: Arc<AtomicUsize>,
    offline_buffer: usize,
    offline_policy: OfflinePolicy,
    handlers: TaskTracker,
}

impl Client {
    /// Connects to a broker at `addr` (`host:port`) with default options.
    pub async fn connect(addr: impl Into<String>) -> Result<Self> {
        Self::connect_with(ClientOptions::new(addr)).await
    }

    /// Connects with the given options: TCP connect, HELLO, WELCOME, to the first server that
    /// answers.
    pub async fn connect_with(options: ClientOptions) -> Result<Self> {
        let mut last = Error::Handshake("no server address given".into());
        let mut connected = None;
        for (i, addr) in options.servers.iter().enumerate() {
            match handshake(&options, addr).await {
                Ok(done) => {
                    connected = Some((i, done));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((server, (conn, welcome))) = connected else { return Err(last) };
        let (status_tx, status) = watch::channel(Status::Connected);
        let (welcome_tx, welcome) = watch::channel(Arc::new(welcome));
        let (commands, rx) = crate::commands::commands(options.command_capacity);
        let offline = Arc::new(crate::connection::OfflineState::new(options.offline_buffer_bytes));
        let max_frame = Arc::new(AtomicUsize::new(welcome.borrow().max_frame_size as usize));
        let client = Self {
            commands: commands.clone(),
            status,
            welcome,
            next_id: Arc::new(AtomicU64::new(1)),
            subscription_capacity: options.subscription_capacity.max(1),
            ids: options.id_generator.clone(),
            offline: offline.clone(),
            max_frame: max_frame.clone(),
            offline_buffer: options.offline_buffer,
            offline_policy: options.offline_policy,
            handlers: TaskTracker::new(),
        };
        let task = ConnectionTask::new(
            options,
            rx,
            commands.downgrade(),
            status_tx,
            welcome_tx,
            offline,
            max_frame,
            server,
        );
        tokio::spawn(task.run(conn));
        Ok(client)
    }

    /// The connection status now.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// A receiver that sees every status change (`changed().await`).
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The service id the broker assigned to this connection (a new one after a reconnect).
    pub fn service_id(&self) -> u32 {
        self.welcome.borrow().service_id
    }

    /// The largest frame the broker accepts.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    /// Publishes waiting in the offline buffer for the connection to come back.
    pub fn buffered(&self) -> usize {
        self.offline.len.load(Ordering::Relaxed)
    }

    async fn command(&self, command: Command) -> Result<()> {
        // Without the acquire future when there is room (the usual case): measurably cheaper
        // per publish. When full, wait for the connection task to take what is queued.
        match self.commands.try_send(command) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(command)) => self.commands.send(command).await,
            Err(TrySendError::Closed) => Err(Error::Closed),
        }
    }

    /// Publishes `payload` to `topic`. Returns once the frame is queued for the socket; use
    /// [`Client::flush`] to wait until the broker has handled it.
    ///
    /// Both are borrowed: they are copied into the frame at once (a `&str` topic is not copied
    /// into a `ByteString` first, as a [`Message`] would need).
    pub async fn publish(&self, topic: impl AsRef<str>, payload: impl AsRef<[u8]>) -> Result<()> {
        let (topic, payload) = (topic.as_ref(), payload.as_ref());
        crate::message::check_topic(topic)?;
        let headers = busbar_core::Headers::new();
        let view = busbar_core::frame::MessageView {
            source: 0,
            destination: 0,
            key: None,
            envelope: Some(crate::message::new_envelope(self.ids.as_ref(), None)),
            topic,
            headers: &headers,
            payload,
        };
        let max = self.max_frame_size();
        let size = view.frame_len();
        self.check_offline_room(size)?;
        self.commands.publish(size, max, |run| Ok(busbar_core::frame::encode_pub_view(run, view, max)?)).await
    }

    /// Publishes a message with headers, balance key, destination or transaction.
    pub async fn publish_message(&self, message: Outgoing) -> Result<()> {
        let max = self.max_frame_size();
        let message = message.prepare(self.ids.as_ref(), max)?;
        // Encoded straight into the connection task's queue.
        let size = busbar_core::frame::MessageView::from(&message).frame_len();
        self.check_offline_room(size)?;
        self.commands.publish(size, max, |run| Ok(busbar_core::frame::encode_pub(run, &message, max)?)).await
    }

    /// Refuses a publish of a `size`-byte frame while disconnected with no room for it in the
    /// offline buffer, under [`OfflinePolicy::Error`].
    fn check_offline_room(&self, size: usize) -> Result<()> {
        // The buffer's room first: one atomic load, where the status takes a lock.
        if self.offline_policy == OfflinePolicy::Error
            && size > self.offline.room.load(Ordering::Relaxed)
            && self.status() != Status::Connected
        {
            return Err(Error::BufferFull { capacity: self.offline_buffer });
        }
        Ok(())
    }

    async fn subscribe_kind(&self, pattern: Pattern, kind: SubKind, sink: Sink) -> Result<u64> {
        let Pattern { pattern, group } = pattern;
        validate_pattern(&pattern)
            .map_err(|source| Error::InvalidTopic { topic: pattern.to_string(), source })?;
        // A group name follows the topic rules (the broker refuses another, and would refuse it
        // again at every reconnect).
        if let Some(g) = &group {
            busbar_core::validate_topic(&g.name)
                .map_err(|source| Error::InvalidTopic { topic: g.name.to_string(), source })?;
        }
        let sid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, confirmed) = oneshot::channel();
        let sub = Sub { sid, pattern, group, kind };
        self.command(Command::Subscribe { sub: Box::new(sub), sink, done }).await?;
        confirmed.await.map_err(|_| Error::Closed)??;
        Ok(sid)
    }

    /// Sends a request: its replies go to `sink`. The REQUEST frame is encoded here into the
    /// connection task's queue, like a publish, after the command that registers `sink`.
    /// Returns the request's id.
    async fn send_request(
        &self,
        message: Outgoing,
        timeout: Duration,
        all: bool,
        sink: ReplySink,
    ) -> Result<u64> {
        let max = self.max_frame_size();
        let message = message.prepare(self.ids.as_ref(), max)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let view = busbar_core::frame::MessageView::from(&message);
        let encode = |run: &mut bytes::BytesMut| {
            Ok(busbar_core::frame::encode_request_view(run, id, all, timeout_ms, view, max)?)
        };
        self.commands.request(Command::Expect { id, sink }, view.frame_len() + 4, max, encode).await?;
        Ok(id)
    }

    /// Subscribes to events matching a pattern (`*` and `>` wildcards allowed; see [`Pattern`]
    /// for groups). Returns once the broker has confirmed the subscription, so messages published
    /// after this returns are received. While reconnecting it returns once the subscription is
    /// queued: it is sent, with every other, as soon as the connection is back.
    pub async fn subscribe(&self, pattern: impl Into<Pattern>) -> Result<Subscription> {
        let pattern = pattern.into();
        let name = pattern.pattern.clone();
        let (tx, rx) = crate::feed::feed(self.subscription_capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = Sink::Events { tx, dropped: dropped.clone() };
        let sid = self.subscribe_kind(pattern, SubKind::Events, sink).await?;
        let unsub = Unsubscriber::Remote(self.commands.clone());
        Ok(Subscription::new(sid, name, rx, dropped, unsub).tracked(self.handlers.clone()))
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

    /// Serves requests (queries and commands) matching a pattern: a stream of [`Request`](crate::Request)s,
    /// each to be answered with [`Request::reply`](crate::Request::reply) or
    /// [`Request::fail`](crate::Request::fail).
    pub async fn requests(&self, pattern: impl Into<Pattern>) -> Result<Requests> {
        let pattern = pattern.into();
        let (tx, rx) = crate::feed::feed(self.subscription_capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = Sink::Requests { tx, dropped: dropped.clone() };
        let sid = self.subscribe_kind(pattern, SubKind::Requests, sink).await?;
        let unsub = Unsubscriber::Remote(self.commands.clone());
        Ok(Requests::new(sid, rx, dropped, unsub).tracked(self.handlers.clone()))
    }

    /// [`EventBus::request`](crate::EventBus::request) with headers, a balance key or a
    /// destination.
    pub async fn request_message(&self, message: Outgoing, timeout: Duration) -> Result<Message> {
        let (tx, rx) = oneshot::channel();
        let id = self.send_request(message, timeout, false, ReplySink::One(tx)).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply_result(reply),
            // The connection task dropped the request: the connection is gone.
            Ok(Err(_)) => Err(self.lost_or_closed()),
            Err(_) => {
                let _ = self.commands.try_send(Command::CancelRequest { id });
                Err(Error::Timeout)
            }
        }
    }

    /// Scatter-gather: sends the request to every responder and collects their answers until all
    /// have answered, `expected` answers have arrived, or `timeout` passes. Each answer is a
    /// reply or the error its responder returned. [`Error::NoResponders`] when nobody serves the
    /// topic. At most 1 024 answers wait to be taken: a larger burst than that, arriving faster
    /// than this call takes them, ends the gather with the answers it has, followed by
    /// [`Error::GatherOverflow`]; a connection lost meanwhile, once some have come, ends it with
    /// the answers it has.
    pub async fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> Result<Vec<Result<Message>>> {
        let (tx, mut rx) = mpsc::channel(GATHER_CAPACITY);
        let overflow = Arc::new(AtomicBool::new(false));
        let id = self.send_request(message, timeout, true, ReplySink::All(tx, overflow.clone())).await?;
        let deadline = crate::request::deadline_in(timeout);
        let mut answers = Vec::new();
        let mut cut_short = false;
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
                // (A dropped answer comes after those that filled the buffer: never empty then.)
                Ok(None) if answers.is_empty() => return Err(self.lost_or_closed()),
                Ok(None) => {
                    // The connection task let go of it: connection lost, or answers dropped.
                    cut_short = overflow.load(Ordering::Relaxed);
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = self.commands.try_send(Command::CancelRequest { id });
        if cut_short {
            answers.push(Err(Error::GatherOverflow { capacity: GATHER_CAPACITY }));
        }
        Ok(answers)
    }

    /// Waits until the broker has handled every frame this client sent before (a PING/PONG round
    /// trip). Fails with the first error the broker reported about a publish since the last
    /// flush (one outside the user's permissions, say), which otherwise is only logged: the
    /// connection stays up either way. It also fails, once, when publishes since the last flush
    /// may have gone missing: with [`Error::ConnectionLost`] when some were written into a
    /// connection that was then lost, with [`Error::BufferFull`] when the offline buffer dropped
    /// one. The flush after that is clean. While the client is reconnecting it waits for the next
    /// connection: what was published meanwhile goes out first, from the offline buffer, and the
    /// flush answers once the broker has handled it. It fails with [`Error::ConnectionLost`] when
    /// that connection is lost as well or the client stops reconnecting, and with
    /// [`Error::Closed`] after [`Client::disconnect`]; wrap it in a timeout to bound the wait.
    pub async fn flush(&self) -> Result<()> {
        let (done, flushed) = oneshot::channel();
        self.command(Command::Flush { done }).await?;
        // Dropped unanswered: the connection task ended (closed, or out of reconnects).
        flushed.await.map_err(|_| self.lost_or_closed())?
    }

    /// Drains, then closes: unsubscribes everything, lets the handlers started with
    /// `subscribe_with`/`respond`/`handle_commands` finish the messages already delivered to
    /// them (for at most `timeout`), flushes (waiting at most `timeout` again, as a flush waits
    /// for a reconnect), and disconnects.
    pub async fn drain(&self, timeout: Duration) -> Result<()> {
        let (done, unsubscribed) = oneshot::channel();
        self.command(Command::UnsubscribeAll { done }).await?;
        let _ = unsubscribed.await;
        self.handlers.close();
        if tokio::time::timeout(timeout, self.handlers.wait()).await.is_err() {
            warn!("drain: handlers still busy after the timeout");
        }
        let _ = tokio::time::timeout(timeout, self.flush()).await;
        self.disconnect().await
    }

    /// Why the connection task dropped a request: `Closed` after `disconnect` (the task says so
    /// before it drops them), else `ConnectionLost`.
    fn lost_or_closed(&self) -> Error {
        if self.offline.closed.load(Ordering::Acquire) { Error::Closed } else { Error::ConnectionLost }
    }

    /// Flushes what is queued and closes the connection, for this handle and all its clones.
    /// Subscriptions end; requests in flight fail with [`Error::Closed`]. While the client is
    /// reconnecting there is nothing to flush to: what the offline buffer holds is dropped
    /// (logged with its count).
    pub async fn disconnect(&self) -> Result<()> {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        Ok(())
    }
}
