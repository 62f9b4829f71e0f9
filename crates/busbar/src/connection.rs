//! The task that owns the client's socket: writes what commands ask for, reads frames, keeps the
//! connection alive with heartbeats, and reconnects when it is lost.
//!
//! ```text
//!            ┌──────────── connected ◄──────────────┐
//!   connect ─┤  session(): commands ⇄ frames, pings │ handshake ok: replay SUBs, flush buffer
//!            └─► lost ─► fail requests in flight ──► reconnecting: backoff + jitter, next server
//!                                                     (publishes buffered, bounded; subscribes queued)
//! ```
//!
//! The subscriptions (their SUB frames and sinks) live here, not in the socket: a new connection
//! gets them again and the application's streams go on as if nothing happened.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use busbar_core::{ErrorCode, Frame, FrameCodec, Hello, IdGenerator, Reply, Sub, Welcome};
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
type ReadHalf = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedWrite;
use tracing::{debug, info, warn};

use crate::client::{ClientOptions, Credentials, OfflinePolicy, Status};
use crate::commands::{CommandRx, WeakCommandTx};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::read_buffer::ReadBuffer;
use crate::request::{ReplyTo, Request};

/// What handles ask the connection task to do. Large parts are boxed: a command is moved into
/// and out of the channel, and publishes (the common case) are small.
#[derive(Debug)]
pub(crate) enum Command {
    /// PUB frames, one or more, encoded by the publishing tasks (see `commands.rs`).
    Publish(BytesMut),
    Subscribe {
        sub: Box<Sub>,
        sink: Sink,
        done: oneshot::Sender<Result<()>>,
    },
    Unsubscribe {
        sid: u64,
    },
    UnsubscribeAll {
        done: oneshot::Sender<()>,
    },
    /// Replies to request `id` go to `sink`. Queued before the run that holds the REQUEST frame
    /// (see `CommandTx::request`); REPLY frames travel in runs too.
    Expect {
        id: u64,
        sink: ReplySink,
    },
    CancelRequest {
        id: u64,
    },
    Flush {
        done: oneshot::Sender<Result<()>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Where the connection task puts a subscription's messages or requests.
#[derive(Debug)]
pub(crate) enum Sink {
    Events { tx: crate::feed::FeedTx<Message>, dropped: Arc<AtomicU64> },
    Requests { tx: crate::feed::FeedTx<Request>, dropped: Arc<AtomicU64> },
}

/// Where the connection task puts the replies to one request.
#[derive(Debug)]
pub(crate) enum ReplySink {
    One(oneshot::Sender<Reply>),
    /// A gather: its replies, and whether one was dropped for want of room (the gather ended).
    All(mpsc::Sender<Reply>, Arc<AtomicBool>),
}

impl ReplySink {
    /// The requester has stopped waiting.
    fn is_closed(&self) -> bool {
        match self {
            ReplySink::One(tx) => tx.is_closed(),
            ReplySink::All(tx, _) => tx.is_closed(),
        }
    }
}

/// Something waiting for the next PONG.
#[derive(Debug)]
enum PongWaiter {
    /// A heartbeat: nobody waits, but its PONG must not be taken for another's.
    Heartbeat,
    /// A flush, and the first error the broker reported (for a frame sent before it) meanwhile.
    Flush {
        done: oneshot::Sender<Result<()>>,
        error: Option<Error>,
    },
    Subscribe {
        sid: u64,
        done: oneshot::Sender<Result<()>>,
        error: Option<Error>,
    },
}

/// What the handles see of the offline buffer, kept by the connection task.
#[derive(Debug)]
pub(crate) struct OfflineState {
    /// Frames in it.
    pub(crate) len: AtomicUsize,
    /// Bytes a frame may have to fit (0 when it is full by count): under
    /// [`OfflinePolicy::Error`], a larger publish is refused.
    pub(crate) room: AtomicUsize,
    /// The client was closed (`disconnect`), not cut off: set before what was in flight is
    /// failed, so that it fails with `Closed` rather than `ConnectionLost`.
    pub(crate) closed: std::sync::atomic::AtomicBool,
}

impl OfflineState {
    /// An empty buffer of `bytes`.
    pub(crate) fn new(bytes: usize) -> Self {
        Self { len: AtomicUsize::new(0), room: AtomicUsize::new(bytes), closed: Default::default() }
    }
}

/// An established connection.
pub(crate) struct Conn {
    reader: Reader,
    writer: FramedWrite<WriteHalf, FrameCodec>,
}

/// The read half and the bytes read from it but not decoded yet. Not a `FramedRead`: the
/// connection task decodes straight from the buffer, so that a MSG goes from there to its
/// subscription's queue without being moved through a codec, a stream and this task's future
/// (a message is 150 bytes; each move is a `memcpy` call).
struct Reader {
    io: ReadHalf,
    buf: ReadBuffer,
    max_frame_size: usize,
    /// The last MSG's topic: the next one to the same topic skips the UTF-8 check.
    last_topic: busbar_core::frame::LastTopic,
}

impl Reader {
    /// Reads what the socket has (waiting for something); false at its end. Cancel safe.
    async fn fill(&mut self) -> std::io::Result<bool> {
        self.buf.make_room();
        Ok(self.io.read_buf(self.buf.bytes()).await? > 0)
    }

    /// The next frame, reading as needed; `None` at the end of the stream.
    async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(frame) = busbar_core::frame::decode(self.buf.bytes(), self.max_frame_size)? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// A decoded frame that needs the connection task's writer (the others are handled as they are
/// decoded).
#[derive(Debug)]
enum Pending {
    Frame(Frame),
    /// A MSG or CALL for a subscription whose receiver is gone: unsubscribe.
    Forget(u64),
}

fn codec_error(e: busbar_core::CodecError) -> Error {
    match e {
        busbar_core::CodecError::Frame(e) => Error::Frame(e),
        busbar_core::CodecError::Io(e) => Error::Io(e),
    }
}

/// TCP connect, HELLO, WELCOME, within the connect timeout.
pub(crate) async fn handshake(options: &ClientOptions, addr: &str) -> Result<(Conn, Welcome)> {
    let attempt = async {
        let (tls, hostport) = match addr.strip_prefix("busbars://") {
            Some(rest) => (true, rest),
            None => (options.tls.is_some(), addr.strip_prefix("busbar://").unwrap_or(addr)),
        };
        let stream = TcpStream::connect(hostport)
            .await
            .map_err(|source| Error::Connect { addr: addr.to_string(), source })?;
        stream.set_nodelay(true)?;
        let (rd, wr): (ReadHalf, WriteHalf) = if tls {
            let settings = options.tls.clone().unwrap_or_default();
            let connector = crate::tls::connector(&settings)?;
            let host = settings.server_name.clone().unwrap_or_else(|| {
                hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).trim_matches(['[', ']']).to_string()
            });
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| Error::Tls(format!("{host:?} is not a valid server name")))?;
            let stream = connector.connect(name, stream).await.map_err(|e| Error::Tls(e.to_string()))?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        } else {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        };
        let mut reader = Reader {
            io: rd,
            buf: ReadBuffer::default(),
            max_frame_size: FrameCodec::default().max_frame_size(),
            last_topic: Default::default(),
        };
        let mut writer = FramedWrite::new(wr, FrameCodec::default());
        let mut hello = Hello { name: options.name.clone().into(), properties: Default::default() };
        if let Some(service) = &options.service {
            hello.properties.insert("service", service.clone());
        }
        match &options.credentials {
            Some(Credentials::Token(token)) => hello.properties.insert("token", token.clone()),
            Some(Credentials::User { name, password }) => {
                hello.properties.insert("user", name.clone());
                hello.properties.insert("password", password.clone());
            }
            None => {}
        }
        writer.send(Frame::Hello(hello)).await.map_err(codec_error)?;
        match reader.next().await? {
            Some(Frame::Welcome(w)) => Ok((reader, writer, w)),
            Some(Frame::Error(e)) => Err(Error::Server { code: e.code, message: e.message.to_string() }),
            Some(other) => Err(Error::Handshake(format!("expected WELCOME, got {}", other.name()))),
            None => Err(Error::Handshake("connection closed during handshake".into())),
        }
    };
    let (mut reader, mut writer, welcome) =
        tokio::time::timeout(options.connect_timeout, attempt).await.map_err(|_| Error::Timeout)??;
    let max = welcome.max_frame_size as usize;
    reader.max_frame_size = max;
    writer.encoder_mut().set_max_frame_size(max);
    debug!(%addr, service_id = welcome.service_id, server = %welcome.server_name, "connected");
    Ok((Conn { reader, writer }, welcome))
}

/// How a session ended.
enum End {
    /// The application closed the client (or dropped every handle).
    Closed,
    /// The connection failed.
    Lost(Error),
}

pub(crate) struct ConnectionTask {
    pub(crate) options: ClientOptions,
    pub(crate) commands: CommandRx,
    /// For the requests handed to responders (weak, so that the task ends with the last handle).
    pub(crate) handle: WeakCommandTx,
    pub(crate) ids: Arc<dyn IdGenerator>,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) welcome: watch::Sender<Arc<Welcome>>,
    pub(crate) offline_state: Arc<OfflineState>,
    /// The current broker's `max_frame_size`, for the handles.
    pub(crate) max_frame: Arc<AtomicUsize>,
    /// Index of the server the current connection went to.
    pub(crate) server: usize,
    /// By subscription id (looked up per received message: foldhash, not SipHash; the ids are
    /// this client's own).
    pub(crate) subs: HashMap<u64, (Sub, Sink), foldhash::fast::RandomState>,
    /// The first error about a publish while no flush waited: the next flush, which covers
    /// that publish too, reports it. The broker's refusal; `ConnectionLost` when a connection was
    /// lost with publishes written since the last flush's PING (the kernel may have dropped
    /// them); `BufferFull` when the offline buffer dropped one.
    unreported: Option<Error>,
    /// Publishes were written since the last flush's PING.
    written: bool,
    pub(crate) requests: HashMap<u64, ReplySink, foldhash::fast::RandomState>,
    pongs: VecDeque<PongWaiter>,
    /// Flushes asked for while disconnected: sent, each a PING, once the next connection has
    /// taken the offline buffer (they cover what it holds).
    offline_flushes: Vec<oneshot::Sender<Result<()>>>,
    offline: VecDeque<Bytes>,
    /// Bytes of the frames in `offline`.
    offline_bytes: usize,
    /// Messages the offline buffer could not keep, since the client started.
    offline_drops: u64,
    /// Brokers of the cluster learned from WELCOME (`connect_urls`), tried after the configured
    /// ones when reconnecting.
    learned: Vec<String>,
    /// Commands taken from the channel but not sent when the connection failed.
    leftover: Vec<Command>,
    /// This broker's `max_frame_size` is smaller than the last one's: publishes encoded before
    /// its WELCOME (queued during the handshake) may be over it, so runs are checked.
    smaller_limit: bool,
}

/// Most broker addresses learned from a cluster.
const MAX_LEARNED: usize = 64;
/// Most flushes waiting for the next connection (one per caller waiting); past it, a flush
/// fails at once with `ConnectionLost`.
const MAX_OFFLINE_FLUSHES: usize = 1024;

impl ConnectionTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        options: ClientOptions,
        commands: CommandRx,
        handle: WeakCommandTx,
        status: watch::Sender<Status>,
        welcome: watch::Sender<Arc<Welcome>>,
        offline_state: Arc<OfflineState>,
        max_frame: Arc<AtomicUsize>,
        server: usize,
    ) -> Self {
        let ids = options.id_generator.clone();
        Self {
            options,
            commands,
            handle,
            ids,
            status,
            welcome,
            offline_state,
            max_frame,
            server,
            subs: HashMap::default(),
            unreported: None,
            written: false,
            requests: HashMap::default(),
            pongs: VecDeque::new(),
            offline_flushes: Vec::new(),
            offline: VecDeque::new(),
            offline_bytes: 0,
            offline_drops: 0,
            learned: Vec::new(),
            smaller_limit: false,
            leftover: Vec::new(),
        }
    }

    /// Remembers the cluster's other brokers that `welcome` names, to fail over to them.
    fn learn(&mut self, welcome: &Welcome) {
        let Some(urls) = welcome.properties.get("connect_urls") else { return };
        let tls = self.options.servers.first().is_some_and(|s| s.starts_with("busbars://"));
        // Merged, not replaced: a broker whose routes are not up yet knows only itself.
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let url = if tls { format!("busbars://{url}") } else { url.to_string() };
            if self.options.servers.contains(&url) || self.learned.contains(&url) {
                continue;
            }
            if self.learned.len() >= MAX_LEARNED {
                self.learned.remove(0);
            }
            debug!(%url, "cluster broker learned");
            self.learned.push(url);
        }
    }

    pub(crate) async fn run(mut self, first: Conn) {
        let welcome = self.welcome.borrow().clone();
        self.learn(&welcome);
        let mut conn = Some(first);
        loop {
            let current = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => break,
                },
            };
            self.status.send_replace(Status::Connected);
            match self.session(current).await {
                End::Closed => {
                    self.offline_state.closed.store(true, Ordering::Release);
                    break;
                }
                End::Lost(e) => {
                    warn!(error = %e, "connection lost");
                    if std::mem::take(&mut self.written) {
                        // Written into a connection now gone, never confirmed: perhaps lost.
                        self.unreported.get_or_insert(Error::ConnectionLost);
                    }
                    self.fail_in_flight(false);
                    if !self.options.reconnect.enabled {
                        break;
                    }
                    // In order, before anything the handles send meanwhile.
                    let leftover = std::mem::take(&mut self.leftover);
                    let mut closing = false;
                    for command in leftover {
                        if !self.offline_command(command) {
                            closing = true;
                            break;
                        }
                    }
                    if closing {
                        break;
                    }
                    self.status.send_replace(Status::Reconnecting);
                }
            }
        }
        self.status.send_replace(Status::Disconnected);
        // Over for good: a flush or subscribe waiting fails, and so does a request in flight
        // (`Closed` after `disconnect`, else `ConnectionLost`).
        self.fail_in_flight(true);
        // Dropping `subs` ends every subscription stream.
    }

    /// Requests in flight cannot be answered over a new connection: fail them now (dropping
    /// their sinks gives the requester `ConnectionLost`, or `Closed` after `disconnect`).
    /// Flushes fail too; subscriptions waiting for confirmation stay, and are sent again on the
    /// next connection, unless there is none (`for_good`).
    fn fail_in_flight(&mut self, for_good: bool) {
        let closed = self.offline_state.closed.load(Ordering::Acquire);
        let why = || if closed { Error::Closed } else { Error::ConnectionLost };
        self.requests.clear();
        // Flushes that waited for this connection, lost before they were sent on it.
        for done in std::mem::take(&mut self.offline_flushes) {
            let _ = done.send(Err(why()));
        }
        for waiter in std::mem::take(&mut self.pongs) {
            match waiter {
                PongWaiter::Heartbeat => {}
                PongWaiter::Flush { done, .. } => {
                    let _ = done.send(Err(why()));
                }
                // No next connection: the subscription will not be restored anywhere.
                PongWaiter::Subscribe { done, error, sid } if for_good => {
                    let _ = done.send(Err(error.unwrap_or_else(why)));
                    self.subs.remove(&sid);
                }
                PongWaiter::Subscribe { done, error, sid } => {
                    let refused = error.is_some();
                    // Refused by the broker, or given up by its caller: not to be sent again on
                    // the next connection.
                    if done.send(error.map_or(Ok(()), Err)).is_err() || refused {
                        self.subs.remove(&sid);
                    }
                }
            }
        }
    }

    /// Reconnects with exponential backoff and jitter, trying the servers in turn, while still
    /// taking commands (publishes are buffered). `None`: closed, or out of attempts.
    async fn reconnect(&mut self) -> Option<Conn> {
        let policy = self.options.reconnect.clone();
        let mut delay = policy.initial_delay;
        let mut attempt: u32 = 0;
        // Taken a whole batch at a time: a request's Expect and the run with its frame are
        // queued together, and must be handled together (one taken without the other would
        // fail the request here and send its frame on the next connection).
        let mut batch = Vec::new();
        loop {
            let wake = tokio::time::sleep(jitter(delay));
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    () = &mut wake => break,
                    n = self.commands.recv_all(&mut batch) => {
                        if !self.offline_batch(n, &mut batch) {
                            return None;
                        }
                    }
                }
            }
            attempt += 1;
            // The configured brokers, then the ones the cluster told of.
            let known = self.options.servers.len() + self.learned.len();
            self.server = (self.server + 1) % known.max(1);
            let addr = self
                .options
                .servers
                .iter()
                .chain(&self.learned)
                .nth(self.server)
                .cloned()
                .unwrap_or_default();
            // Commands are still taken while the attempt runs: one that hangs until its
            // connect_timeout must not hold every publish, reply and disconnect for that long.
            let options = self.options.clone();
            let attempt_done = handshake(&options, &addr);
            tokio::pin!(attempt_done);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut attempt_done => break outcome,
                    n = self.commands.recv_all(&mut batch) => {
                        if !self.offline_batch(n, &mut batch) {
                            return None;
                        }
                    }
                }
            };
            match outcome {
                Ok((conn, welcome)) => {
                    info!(%addr, attempt, service_id = welcome.service_id, "reconnected");
                    self.learn(&welcome);
                    let max = welcome.max_frame_size as usize;
                    self.smaller_limit = max < self.max_frame.swap(max, Ordering::Relaxed);
                    self.welcome.send_replace(Arc::new(welcome));
                    return Some(conn);
                }
                Err(e) => debug!(%addr, attempt, error = %e, "reconnect attempt failed"),
            }
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                warn!(attempt, "giving up reconnecting");
                return None;
            }
            delay = backoff(delay, policy.max_delay);
        }
    }

    /// Takes a batch of `n` commands while offline; false when it closes the client (a Close,
    /// or every handle gone).
    fn offline_batch(&mut self, n: usize, batch: &mut Vec<Command>) -> bool {
        if n == 0 {
            return false;
        }
        for command in batch.drain(..) {
            if !self.offline_command(command) {
                return false;
            }
        }
        true
    }

    /// Room in the offline buffer for a frame of `len` bytes, by policy: the oldest frames make
    /// way under DropOldest; under Error (whose handles refuse publishes once the buffer is full,
    /// so this is only for the ones that raced past that check) there is none.
    fn make_offline_room(&mut self, len: usize) -> bool {
        let (count, bytes) = (self.options.offline_buffer, self.options.offline_buffer_bytes);
        if len > bytes || count == 0 {
            return false;
        }
        while self.offline.len() >= count || self.offline_bytes + len > bytes {
            if self.options.offline_policy == OfflinePolicy::Error {
                return false;
            }
            let Some(oldest) = self.offline.pop_front() else { break };
            self.offline_bytes -= oldest.len();
            self.offline_dropped();
        }
        true
    }

    /// Tells the handles the offline buffer's length and room.
    fn offline_changed(&self) {
        let (count, bytes) = (self.options.offline_buffer, self.options.offline_buffer_bytes);
        let room = if self.offline.len() >= count { 0 } else { bytes.saturating_sub(self.offline_bytes) };
        self.offline_state.len.store(self.offline.len(), Ordering::Relaxed);
        self.offline_state.room.store(room, Ordering::Relaxed);
    }

    /// Counts messages the offline buffer could not keep (logged at each power of two).
    fn offline_dropped(&mut self) {
        self.unreported.get_or_insert(Error::BufferFull { capacity: self.options.offline_buffer });
        self.offline_drops += 1;
        if self.offline_drops.is_power_of_two() {
            warn!(dropped = self.offline_drops, policy = ?self.options.offline_policy, "offline buffer full: messages dropped");
        }
    }

    /// A command while disconnected. False: close.
    fn offline_command(&mut self, command: Command) -> bool {
        match command {
            Command::Publish(run) => {
                // Kept frame by frame: the bound and the drop policy count messages. Copied, so
                // that a small frame does not keep its run's whole buffer alive. Requests and
                // replies are not kept: their request fails with this connection (its requester
                // has `ConnectionLost`), and a responder must not run it again later.
                for frame in frames(run.freeze()) {
                    if busbar_core::frame::is_request_or_reply(&frame) {
                        continue;
                    }
                    if self.make_offline_room(frame.len()) {
                        self.offline_bytes += frame.len();
                        self.offline.push_back(Bytes::copy_from_slice(&frame));
                    } else {
                        self.offline_dropped();
                    }
                }
                self.offline_changed();
            }
            Command::Subscribe { sub, sink, done } => {
                // Sent when the connection is back, like every other subscription, unless its
                // subscribe call was given up meanwhile: nobody would read it.
                if done.send(Ok(())).is_ok() {
                    self.subs.insert(sub.sid, (*sub, sink));
                }
            }
            Command::Unsubscribe { sid } => {
                self.subs.remove(&sid);
            }
            Command::UnsubscribeAll { done } => {
                self.subs.clear();
                let _ = done.send(());
            }
            // Dropping the sink fails the request with `ConnectionLost` at once.
            Command::Expect { .. } => {}
            Command::CancelRequest { id } => {
                self.requests.remove(&id);
            }
            Command::Flush { done } => {
                // Answered once the next connection has sent what was published meanwhile.
                // Callers that gave up (a timeout around the flush) hold no place.
                self.offline_flushes.retain(|d| !d.is_closed());
                if self.offline_flushes.len() < MAX_OFFLINE_FLUSHES {
                    self.offline_flushes.push(done);
                } else {
                    let _ = done.send(Err(Error::ConnectionLost));
                }
            }
            Command::Close { done } => {
                // What waits (flushes, subscribes) fails with `Closed`, as after a disconnect
                // while connected.
                self.offline_state.closed.store(true, Ordering::Release);
                if !self.offline.is_empty() {
                    // No connection to send them on: said, not dropped in silence.
                    warn!(buffered = self.offline.len(), "closed while offline: buffered messages not sent");
                }
                let _ = done.send(());
                return false;
            }
        }
        true
    }

    /// Serves one connection until it ends.
    async fn session(&mut self, mut conn: Conn) -> End {
        if let Err(e) = self.resume(&mut conn).await {
            return End::Lost(e);
        }
        let beat = self.options.heartbeat_interval;
        let mut heartbeat = busbar_core::heartbeat::Heartbeat::new(beat, self.options.heartbeat_max_missed);
        let period = (beat / 4).max(Duration::from_millis(5));
        let mut tick = tokio::time::interval_at(crate::request::deadline_in(period), period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The clock is read once per tick, not per frame: a frame only sets `heard`.
        let mut last_seen = Instant::now();
        let mut heard = false;
        // Commands are taken all at once: one lock per batch rather than per command.
        let mut commands = Vec::new();
        loop {
            tokio::select! {
                received = self.commands.recv_all(&mut commands) => {
                    if received == 0 {
                        let _ = SinkExt::<Frame>::close(&mut conn.writer).await;
                        return End::Closed;
                    }
                    match self.batch(&mut conn, &mut commands).await {
                        Ok(true) => {}
                        Ok(false) => return End::Closed,
                        Err(e) => return End::Lost(e),
                    }
                }
                read = conn.reader.fill() => {
                    match read {
                        Ok(true) => heard = true,
                        Ok(false) => return End::Lost(Error::ConnectionLost),
                        Err(e) => return End::Lost(Error::Io(e)),
                    }
                    if let Err(e) = self.on_read(&mut conn).await {
                        return End::Lost(e);
                    }
                }
                _ = tick.tick(), if !beat.is_zero() => {
                    if std::mem::take(&mut heard) {
                        last_seen = Instant::now();
                        heartbeat.heard();
                    }
                    let idle = last_seen.elapsed();
                    match heartbeat.check(idle) {
                        busbar_core::heartbeat::Beat::Dead => {
                            warn!(?idle, "no frame from the broker within the heartbeat limit");
                            return End::Lost(Error::ConnectionLost);
                        }
                        busbar_core::heartbeat::Beat::Ping => {
                            self.pongs.push_back(PongWaiter::Heartbeat);
                            if let Err(e) = conn.writer.send(Frame::Ping).await {
                                return End::Lost(codec_error(e));
                            }
                        }
                        busbar_core::heartbeat::Beat::Quiet => {}
                    }
                    // Requests whose caller stopped waiting (dropped future, lost cancel).
                    self.requests.retain(|_, sink| !sink.is_closed());
                }
            }
        }
    }

    /// On a (new) connection: send every subscription, then what was published while offline.
    async fn resume(&mut self, conn: &mut Conn) -> Result<()> {
        for (sub, _) in self.subs.values() {
            feed(conn, Frame::Sub(sub.clone())).await?;
        }
        let buffered = self.offline.len();
        let max = conn.reader.max_frame_size;
        self.written |= buffered > 0;
        let written = write_offline(&mut conn.writer, &mut self.offline, &mut self.offline_bytes, max).await;
        self.offline_changed();
        let too_large = written?;
        if too_large > 0 {
            warn!(
                too_large,
                max_frame_size = max,
                "dropped messages published offline: over this broker's max_frame_size"
            );
        }
        if buffered > 0 || !self.subs.is_empty() {
            debug!(subscriptions = self.subs.len(), buffered, "restored subscriptions, flushed buffer");
        }
        // Flushes asked for while offline: their PONG comes once the broker has handled all the
        // above. The first reports what happened since the last flush (a loss, a drop). Each
        // waits in `pongs` before its PING is written, so that a failure fails it.
        for done in std::mem::take(&mut self.offline_flushes) {
            if done.is_closed() {
                continue;
            }
            self.written = false;
            self.pongs.push_back(PongWaiter::Flush { done, error: self.unreported.take() });
            feed(conn, Frame::Ping).await?;
        }
        SinkExt::<Frame>::flush(&mut conn.writer).await.map_err(codec_error)
    }

    /// Writes `first` and whatever else is queued, then flushes once. Ok(false) means close.
    async fn batch(&mut self, conn: &mut Conn, commands: &mut Vec<Command>) -> Result<bool> {
        let mut rest = commands.drain(..);
        while let Some(command) = rest.next() {
            match self.apply(conn, command).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = SinkExt::<Frame>::close(&mut conn.writer).await;
                    return Ok(false);
                }
                Err(e) => {
                    // The connection failed mid-batch: what was not sent yet waits for the next.
                    self.leftover.extend(rest);
                    return Err(e);
                }
            }
        }
        SinkExt::<Frame>::flush(&mut conn.writer).await.map_err(codec_error)?;
        Ok(true)
    }

    /// Writes a run of frames (PUB, REQUEST, REPLY) straight from its buffer (not copied into
    /// the writer's), after the frames the writer holds, which go first. When a write fails, the
    /// frames not wholly written go to `leftover`, the one cut short included: the PUBs among
    /// them are sent on the next connection, in order, and the requests fail with this one (see
    /// `offline_command`).
    async fn write_run(&mut self, conn: &mut Conn, mut run: BytesMut) -> Result<()> {
        if self.smaller_limit {
            let max = conn.reader.max_frame_size;
            let dropped;
            (run, dropped) = without_oversized(run, max);
            if !dropped.is_empty() {
                warn!(
                    dropped = dropped.len(),
                    max_frame_size = max,
                    "dropped messages over this broker's max_frame_size"
                );
            }
            // A request among them fails now rather than at its timeout.
            for id in dropped.iter().filter_map(|frame| busbar_core::frame::request_id(frame)) {
                let text = format!("request over this broker's max_frame_size ({max} bytes)");
                let message = busbar_core::Message::new("", text);
                let reply = Reply { id, error: Some(ErrorCode::FrameTooLarge), remaining: 0, message };
                deliver_reply(&mut self.requests, reply);
            }
        }
        if !conn.writer.write_buffer().is_empty()
            && let Err(e) = SinkExt::<Frame>::flush(&mut conn.writer).await
        {
            self.leftover.push(Command::Publish(run));
            return Err(codec_error(e));
        }
        self.written = true;
        let (at, failed) = write_counted(conn.writer.get_mut(), &run).await;
        if let Some(e) = failed {
            self.leftover.push(Command::Publish(run.split_off(frame_start(&run, at))));
            return Err(Error::Io(e));
        }
        self.commands.recycle(run);
        Ok(())
    }

    /// Queues the frames for one command into the writer's buffer. Ok(false) means close.
    async fn apply(&mut self, conn: &mut Conn, command: Command) -> Result<bool> {
        match command {
            Command::Publish(run) => self.write_run(conn, run).await?,
            Command::Subscribe { sub, sink, done } => {
                if done.is_closed() {
                    // The subscribe call was given up (a timeout around it): nobody would read
                    // this subscription, and a group member nobody reads loses its share.
                    return Ok(true);
                }
                let sid = sub.sid;
                // Stored and waited for before the frames are written: if the connection fails
                // in between, the subscription is confirmed and sent again on the next one, as
                // any other waiting for its PONG (not left behind a call that failed).
                self.subs.insert(sid, (*sub.clone(), sink));
                self.pongs.push_back(PongWaiter::Subscribe { sid, done, error: None });
                feed(conn, Frame::Sub(*sub)).await?;
                feed(conn, Frame::Ping).await?;
            }
            Command::Unsubscribe { sid } => {
                if self.subs.remove(&sid).is_some() {
                    feed(conn, Frame::Unsub { sid }).await?;
                }
            }
            Command::UnsubscribeAll { done } => {
                for sid in std::mem::take(&mut self.subs).into_keys() {
                    feed(conn, Frame::Unsub { sid }).await?;
                }
                let _ = done.send(());
            }
            Command::Expect { id, sink } => {
                if self.requests.len() >= 1024 && self.requests.len().is_power_of_two() {
                    // Also without heartbeats, forget requests whose caller stopped waiting.
                    self.requests.retain(|_, sink| !sink.is_closed());
                }
                self.requests.insert(id, sink);
            }
            Command::CancelRequest { id } => {
                self.requests.remove(&id);
            }
            Command::Flush { done } => {
                // Waiting before the PING is written: a connection that fails on it fails the
                // flush with ConnectionLost, not Closed.
                self.pongs.push_back(PongWaiter::Flush { done, error: self.unreported.take() });
                self.written = false;
                feed(conn, Frame::Ping).await?;
            }
            Command::Close { done } => {
                let _ = SinkExt::<Frame>::flush(&mut conn.writer).await;
                let _ = done.send(());
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Handles every whole frame in the read buffer. MSGs, CALLs and REPLYs are handed on from
    /// inside the decoder's callbacks (no `Frame` to move around for MSGs; no await for any of
    /// them); the rare frames that need the writer come back as [`Pending`].
    async fn on_read(&mut self, conn: &mut Conn) -> Result<()> {
        loop {
            let (subs, requests, handle, ids) = (&self.subs, &mut self.requests, &self.handle, &self.ids);
            let max = conn.reader.max_frame_size;
            let decoded = busbar_core::frame::decode_msg_with(
                conn.reader.buf.bytes(),
                conn.reader.max_frame_size,
                &mut conn.reader.last_topic,
                |sid, inner| match subs.get(&sid) {
                    Some((_, Sink::Events { tx, dropped })) => {
                        offer(tx, dropped, sid, Message { sid, inner }).then_some(Pending::Forget(sid))
                    }
                    _ => None,
                },
                |frame| match frame {
                    Frame::Call(call) => deliver_call(subs, handle, ids, max, call).map(Pending::Forget),
                    Frame::Reply(reply) => {
                        deliver_reply(requests, reply);
                        None
                    }
                    other => Some(Pending::Frame(other)),
                },
            )?;
            match decoded {
                None => return Ok(()),
                Some(None) => {}
                Some(Some(Pending::Forget(sid))) => self.forget_subscription(conn, sid).await?,
                Some(Some(Pending::Frame(frame))) => self.on_frame(conn, frame).await?,
            }
        }
    }

    /// A frame that needs the writer or waits on this task (MSGs, CALLs and REPLYs are handled in
    /// `on_read` as they are decoded).
    async fn on_frame(&mut self, conn: &mut Conn, frame: Frame) -> Result<()> {
        match frame {
            Frame::Ping => conn.writer.send(Frame::Pong).await.map_err(codec_error)?,
            Frame::Pong => match self.pongs.pop_front() {
                Some(PongWaiter::Heartbeat) | None => {}
                Some(PongWaiter::Flush { done, error }) => {
                    let _ = done.send(error.map_or(Ok(()), Err));
                }
                Some(PongWaiter::Subscribe { done, error, sid }) => {
                    let refused = error.is_some();
                    if refused {
                        self.subs.remove(&sid);
                    }
                    if done.send(error.map_or(Ok(()), Err)).is_err() && !refused {
                        // The subscribe call was given up while it waited: nobody will read it.
                        self.forget_subscription(conn, sid).await?;
                    }
                }
            },
            Frame::Error(e) => {
                let server_error = || Error::Server { code: e.code, message: e.message.to_string() };
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
                    Some(slot) => *slot = Some(server_error()),
                    None if is_fatal(e.code) => return Err(server_error()),
                    None if e.correlation != 0 => {
                        // About a subscription nobody waits for: one sent again after a
                        // reconnect and refused this time (its stream ends), or an UNSUB the
                        // broker did not know. The client's business, not a flush's.
                        warn!(code = %e.code, message = %e.message, sid = e.correlation, "subscription refused");
                        self.subs.remove(&e.correlation);
                    }
                    None => {
                        warn!(code = %e.code, message = %e.message, "broker reported an error");
                        // About a publish: reported by the flushes still waiting, which all cover
                        // it (the broker answers in order), or else by the next one. The first
                        // error is the one reported.
                        let mut reported = false;
                        for waiter in &mut self.pongs {
                            if let PongWaiter::Flush { error, .. } = waiter {
                                reported = true;
                                error.get_or_insert_with(server_error);
                            }
                        }
                        if !reported {
                            self.unreported.get_or_insert_with(server_error);
                        }
                    }
                }
            }
            other => debug!(frame = other.name(), "ignoring unexpected frame"),
        }
        Ok(())
    }

    /// The subscription's receiver was dropped without its UNSUB getting through: send it now.
    async fn forget_subscription(&mut self, conn: &mut Conn, sid: u64) -> Result<()> {
        self.subs.remove(&sid);
        conn.writer.send(Frame::Unsub { sid }).await.map_err(codec_error)
    }
}

/// Writes `buf` to the socket straight (no codec buffer between): how many bytes went, and the
/// error that stopped it short, so that the caller knows which frames were wholly written.
async fn write_counted(io: &mut WriteHalf, buf: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut at = 0;
    while at < buf.len() {
        match io.write(&buf[at..]).await {
            Ok(0) => return (at, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => at += n,
            Err(e) => return (at, Some(e)),
        }
    }
    (at, None)
}

/// Bytes of buffered frames written at once by [`write_offline`].
const OFFLINE_RUN: usize = 64 * 1024;

/// Writes the frames kept while offline, after what the writer's buffer holds (the restored
/// subscriptions). A frame is taken off `offline` only once wholly written: when the connection
/// fails again, what it did not take stays at the front, in order, for the next one (a frame cut
/// short is sent whole again; the broker dropped the half with the connection). Frames encoded
/// for an earlier broker with a larger `max_frame_size` are dropped alone: sent, the first would
/// close the connection and lose the ones after it. Returns how many were dropped so.
async fn write_offline(
    writer: &mut FramedWrite<WriteHalf, FrameCodec>,
    offline: &mut VecDeque<Bytes>,
    offline_bytes: &mut usize,
    max: usize,
) -> Result<usize> {
    SinkExt::<Frame>::flush(writer).await.map_err(codec_error)?;
    let mut too_large = 0;
    offline.retain(|frame| {
        let fits = !over_limit(frame, max);
        if !fits {
            too_large += 1;
            *offline_bytes -= frame.len();
        }
        fits
    });
    let mut run = BytesMut::new();
    while !offline.is_empty() {
        run.clear();
        let mut in_run = 0;
        for frame in offline.iter() {
            if in_run > 0 && run.len() + frame.len() > OFFLINE_RUN {
                break;
            }
            run.extend_from_slice(frame);
            in_run += 1;
        }
        let (at, failed) = write_counted(writer.get_mut(), &run).await;
        // Off the buffer: the frames wholly written.
        let mut done = 0;
        while in_run > 0
            && let Some(frame) = offline.front()
            && done + frame.len() <= at
        {
            done += frame.len();
            *offline_bytes -= frame.len();
            offline.pop_front();
            in_run -= 1;
        }
        if let Some(e) = failed {
            return Err(Error::Io(e));
        }
    }
    Ok(too_large)
}

/// Adds a frame to the write buffer; a frame that cannot be encoded is reported and skipped.
async fn feed(conn: &mut Conn, frame: Frame) -> Result<()> {
    match conn.writer.feed(frame).await {
        Ok(()) => Ok(()),
        Err(busbar_core::CodecError::Frame(e)) => {
            warn!(error = %e, "frame not sent");
            Ok(())
        }
        Err(e) => Err(codec_error(e)),
    }
}

/// `delay` scaled by a random factor in [0.5, 1.5), so that clients cut off together do not
/// all come back at the same instant (a delay too long to scale is kept as it is).
fn jitter(delay: Duration) -> Duration {
    let r = busbar_core::group::mix(busbar_core::id::now_ns()) % 1000;
    Duration::try_from_secs_f64(delay.as_secs_f64() * (0.5 + r as f64 / 1000.0)).unwrap_or(delay)
}

/// The shortest wait between reconnection attempts after the first: a zero `initial_delay` (or
/// `max_delay`) must not make a client hammer a broker that refuses it in a tight loop.
const MIN_RETRY: Duration = Duration::from_millis(10);

/// The wait after `delay`: doubled, at most `max`, at least [`MIN_RETRY`].
fn backoff(delay: Duration, max: Duration) -> Duration {
    delay.saturating_mul(2).min(max).max(MIN_RETRY)
}

/// Hands a CALL to its requests subscription; the subscription's id when its receiver is gone.
fn deliver_call(
    subs: &HashMap<u64, (Sub, Sink), foldhash::fast::RandomState>,
    handle: &WeakCommandTx,
    ids: &Arc<dyn IdGenerator>,
    max_frame_size: usize,
    call: busbar_core::Call,
) -> Option<u64> {
    let commands = handle.upgrade()?;
    let sid = call.sid;
    let message = Message { sid, inner: call.message };
    let request = Request::new(call.id, message, ReplyTo::Remote { commands, max_frame_size }, ids.clone());
    let no_responder = |request: Request| {
        let text = format!("no responders for {:?}", request.topic());
        request.refuse(ErrorCode::NoResponders, &text);
    };
    let Some((_, Sink::Requests { tx, dropped })) = subs.get(&sid) else {
        // Unsubscribed while the CALL was on its way: refused now, not left to its timeout.
        no_responder(request);
        return None;
    };
    // Refused with the errors the in-process bus gives, so the requester sees the same either way.
    match tx.try_send(request) {
        Ok(()) => None,
        Err(crate::feed::TrySendError::Full(request)) => {
            count_dropped(dropped, sid);
            request.refuse(ErrorCode::TooManyRequests, crate::request::RESPONDER_FULL);
            None
        }
        Err(crate::feed::TrySendError::Closed(request)) => {
            no_responder(request);
            Some(sid)
        }
    }
}

/// Hands a REPLY to the request waiting for it.
fn deliver_reply(requests: &mut HashMap<u64, ReplySink, foldhash::fast::RandomState>, reply: Reply) {
    let id = reply.id;
    match requests.get(&id) {
        Some(ReplySink::One(_)) => {
            if let Some(ReplySink::One(tx)) = requests.remove(&id) {
                let _ = tx.send(reply);
            }
        }
        Some(ReplySink::All(tx, overflow)) => {
            let last = reply.remaining == 0;
            match tx.try_send(reply) {
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Its requester is not keeping up with the answers: it gets those it has,
                    // now, rather than wait out its timeout for one that was dropped, and is told.
                    warn!(id, "gather buffer full: reply dropped, and the gather ended");
                    overflow.store(true, Ordering::Relaxed);
                    requests.remove(&id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    requests.remove(&id);
                }
                Ok(()) if last => {
                    requests.remove(&id);
                }
                Ok(()) => {}
            }
        }
        None => debug!(id, "reply to a request no longer waited for"),
    }
}

/// Hands `item` to a subscription's buffer without waiting. A full buffer drops it and counts
/// (logged at each power of two). Returns true when the receiver is gone.
fn offer<T>(tx: &crate::feed::FeedTx<T>, dropped: &AtomicU64, sid: u64, item: T) -> bool {
    match tx.try_send(item) {
        Ok(()) => false,
        Err(crate::feed::TrySendError::Full(_)) => {
            count_dropped(dropped, sid);
            false
        }
        Err(crate::feed::TrySendError::Closed(_)) => true,
    }
}

/// Counts one message or request dropped by a full buffer (logged at each power of two).
fn count_dropped(dropped: &AtomicU64, sid: u64) {
    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(sid, dropped = n, "subscription buffer full: dropping");
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
            | ErrorCode::StaleConnection
            | ErrorCode::AuthenticationFailed
            | ErrorCode::ShuttingDown
    )
}

/// Where the frame that holds byte `at` of `run` starts (`at` itself when a frame starts there;
/// the run's length when `at` is past its end).
fn frame_start(run: &[u8], at: usize) -> usize {
    let mut start = 0;
    while let Some(&[a, b, c, d]) = run.get(start..start + 4) {
        let next = start + 4 + u32::from_be_bytes([a, b, c, d]) as usize;
        if next > at {
            break;
        }
        start = next;
    }
    start.min(run.len())
}

/// The frames of a run of encoded frames (each starts with its length).
/// True when an encoded frame (length prefix included) is over a broker's `max_frame_size`: the
/// broker would close the connection on it.
fn over_limit(frame: &[u8], max: usize) -> bool {
    frame.len().saturating_sub(busbar_core::frame::LEN_PREFIX) > max
}

/// The frames of `run` whose size (after the length prefix) is at most `max`, and the ones that
/// were not. A run where all fit (the rule) comes back as it is, after a walk over its prefixes.
fn without_oversized(run: BytesMut, max: usize) -> (BytesMut, Vec<Bytes>) {
    let over = |frame: &[u8]| over_limit(frame, max);
    let mut at = 0;
    while let Some(prefix) = run.get(at..at + 4) {
        let len =
            (4 + u32::from_be_bytes(prefix.try_into().unwrap_or_default()) as usize).min(run.len() - at);
        if over(&run[at..at + len]) {
            let mut kept = BytesMut::with_capacity(run.len());
            let mut dropped = Vec::new();
            for frame in frames(run.freeze()) {
                if over(&frame) {
                    dropped.push(frame);
                } else {
                    kept.extend_from_slice(&frame);
                }
            }
            return (kept, dropped);
        }
        at += len;
    }
    (run, Vec::new())
}

fn frames(mut run: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        let prefix: [u8; 4] = run.get(..4)?.try_into().ok()?;
        let len = (4 + u32::from_be_bytes(prefix) as usize).min(run.len());
        Some(run.split_to(len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `room` bytes, then fails every write.
    struct Breaks {
        room: usize,
        taken: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl tokio::io::AsyncWrite for Breaks {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.room == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            // A little at a time, as a socket filling up would.
            let n = buf.len().min(self.room).min(1000);
            self.room -= n;
            self.taken.lock().unwrap().extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_buffered_offline_stay_buffered_until_wholly_written() {
        let frame = |i: u64| {
            let mut run = BytesMut::new();
            let message = busbar_core::Message::new("t", i.to_be_bytes().repeat(50));
            busbar_core::frame::encode_pub(&mut run, &message, 1 << 20).unwrap();
            run.freeze()
        };
        let len = frame(0).len();
        let mut offline: VecDeque<Bytes> = (0..400).map(frame).collect();
        let mut bytes = offline.iter().map(Bytes::len).sum::<usize>();
        // The connection breaks in the middle of frame 250, well past the first run.
        let room = 250 * len + len / 2;
        let taken = Arc::new(std::sync::Mutex::new(Vec::new()));
        let io: WriteHalf = Box::new(Breaks { room, taken: taken.clone() });
        let mut writer = FramedWrite::new(io, FrameCodec::new(1 << 20));
        let result = write_offline(&mut writer, &mut offline, &mut bytes, 1 << 20).await;
        assert!(matches!(result, Err(Error::Io(_))), "{result:?}");
        assert_eq!(taken.lock().unwrap().len(), room);
        assert_eq!(offline.len(), 150, "frame 250 (cut short) and after stay buffered");
        assert_eq!(offline.front(), Some(&frame(250)));
        assert_eq!(bytes, 150 * len);
        // The next connection takes them all, in order.
        let taken = Arc::new(std::sync::Mutex::new(Vec::new()));
        let io: WriteHalf = Box::new(Breaks { room: usize::MAX, taken: taken.clone() });
        let mut writer = FramedWrite::new(io, FrameCodec::new(1 << 20));
        assert_eq!(write_offline(&mut writer, &mut offline, &mut bytes, 1 << 20).await.unwrap(), 0);
        assert!(offline.is_empty() && bytes == 0);
        let expected: Vec<u8> = (250..400).flat_map(|i| frame(i).to_vec()).collect();
        assert_eq!(*taken.lock().unwrap(), expected);
    }

    #[tokio::test]
    async fn a_call_for_a_subscription_gone_is_refused_at_once() {
        let (tx, mut rx) = crate::commands::commands(16);
        let subs = HashMap::default();
        let ids: Arc<dyn IdGenerator> = Arc::new(busbar_core::UlidGenerator::new());
        let call = busbar_core::Call {
            id: 9,
            sid: 4,
            timeout_ms: 60_000,
            message: busbar_core::Message::new("t", "x"),
        };
        assert_eq!(deliver_call(&subs, &tx.downgrade(), &ids, 1 << 20, call), None);
        let Some(Command::Publish(mut run)) = rx.recv().await else { panic!("a REPLY queued") };
        match busbar_core::frame::decode(&mut run, 1 << 20).unwrap().expect("a whole frame") {
            Frame::Reply(r) => assert_eq!((r.id, r.error), (9, Some(ErrorCode::NoResponders))),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refusal_is_queued_when_publishes_have_filled_the_queue() {
        let (tx, mut rx) = crate::commands::commands(2);
        for _ in 0..2 {
            let message = busbar_core::Message::new("t", vec![0u8; 20_000]);
            let size = busbar_core::frame::MessageView::from(&message).frame_len();
            tx.publish(size, 1 << 20, |run| Ok(busbar_core::frame::encode_pub(run, &message, 1 << 20)?))
                .await
                .unwrap();
        }
        let full = tokio::time::timeout(Duration::from_millis(20), tx.publish(8, 1 << 20, |_| Ok(()))).await;
        assert!(full.is_err(), "the queue is full for publishes");
        let subs = HashMap::default();
        let ids: Arc<dyn IdGenerator> = Arc::new(busbar_core::UlidGenerator::new());
        for id in [1, 2] {
            let call = busbar_core::Call {
                id,
                sid: 4,
                timeout_ms: 60_000,
                message: busbar_core::Message::new("t", "x"),
            };
            assert_eq!(deliver_call(&subs, &tx.downgrade(), &ids, 1 << 20, call), None);
        }
        let mut refused = Vec::new();
        // Everything is queued by now: a missing refusal would leave recv waiting for ever.
        let mut queued = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), rx.recv_all(&mut queued)).await.expect("queued");
        for command in queued {
            let Command::Publish(mut run) = command else { panic!("runs of frames") };
            while let Some(frame) = busbar_core::frame::decode(&mut run, 1 << 20).unwrap() {
                if let Frame::Reply(r) = frame {
                    refused.push((r.id, r.error));
                }
            }
        }
        assert_eq!(refused, [(1, Some(ErrorCode::NoResponders)), (2, Some(ErrorCode::NoResponders))]);
    }

    #[test]
    fn a_gather_whose_buffer_fills_ends_with_what_it_has() {
        let mut requests = HashMap::default();
        let (tx, mut rx) = mpsc::channel(1);
        let overflow = Arc::new(AtomicBool::new(false));
        requests.insert(5, ReplySink::All(tx, overflow.clone()));
        let reply =
            |remaining| Reply { id: 5, error: None, remaining, message: busbar_core::Message::new("t", "x") };
        deliver_reply(&mut requests, reply(1));
        deliver_reply(&mut requests, reply(0)); // the buffer is full: dropped
        assert!(requests.is_empty(), "the gather ended");
        assert!(overflow.load(Ordering::Relaxed), "and says why");
        assert_eq!(rx.try_recv().unwrap().remaining, 1);
        assert!(matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)), "not left waiting");
    }

    #[test]
    fn backoff_doubles_within_bounds_and_never_spins() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(ms(20), ms(5000)), ms(40));
        assert_eq!(backoff(ms(4000), ms(5000)), ms(5000));
        assert_eq!(backoff(Duration::ZERO, ms(5000)), MIN_RETRY, "zero does not stay zero");
        assert_eq!(backoff(Duration::ZERO, Duration::ZERO), MIN_RETRY);
        assert_eq!(backoff(Duration::MAX, Duration::MAX), Duration::MAX, "no overflow");
        assert!(jitter(Duration::MAX) >= Duration::MAX / 3, "no panic, still long");
        let j = jitter(ms(100));
        assert!(j >= ms(50) && j < ms(150), "{j:?}");
    }

    #[test]
    fn a_run_loses_only_its_frames_over_a_smaller_limit() {
        let mut run = BytesMut::new();
        let mut sizes = Vec::new();
        for len in [10, 500, 20, 600, 30] {
            let start = run.len();
            let message = busbar_core::Message::new("t", vec![7u8; len]);
            busbar_core::frame::encode_pub(&mut run, &message, 1 << 20).unwrap();
            sizes.push(run.len() - start);
        }
        let (same, dropped) = without_oversized(run.clone(), 1 << 20);
        assert_eq!((&same[..], dropped.len()), (&run[..], 0), "all fit: unchanged");
        let (kept, dropped) = without_oversized(run.clone(), 200);
        assert_eq!(dropped.iter().map(|f| f.len()).collect::<Vec<_>>(), vec![sizes[1], sizes[3]]);
        let kept: Vec<usize> = frames(kept.freeze()).map(|f| f.len()).collect();
        assert_eq!(kept, vec![sizes[0], sizes[2], sizes[4]]);
        // At the limit exactly: kept (the broker refuses only what is over it).
        let (_, dropped) = without_oversized(run, sizes[1] - 4);
        assert_eq!(dropped.len(), 1);
    }

    #[test]
    fn a_run_cut_short_is_sent_again_from_the_frame_it_cut() {
        let mut run = BytesMut::new();
        for _ in 0..3 {
            let message = busbar_core::Message::new("t", vec![0u8; 100]);
            busbar_core::frame::encode_pub(&mut run, &message, 1 << 20).unwrap();
        }
        let one = run.len() / 3;
        assert_eq!(frame_start(&run, 0), 0, "nothing written: all of it");
        assert_eq!(frame_start(&run, 1), 0, "the first frame cut: from it");
        assert_eq!(frame_start(&run, one), one, "one frame written whole: from the next");
        assert_eq!(frame_start(&run, 2 * one + 1), 2 * one);
        assert_eq!(frame_start(&run, run.len() - 1), 2 * one);
        assert_eq!(frame_start(&run, run.len()), run.len(), "all written: nothing left");
        assert_eq!(frame_start(&[], 0), 0);
    }

    #[test]
    fn a_run_splits_into_its_frames() {
        let mut run = BytesMut::new();
        for topic in ["a", "b.c", "d"] {
            let message = busbar_core::Message::new(topic, vec![7u8; 3]);
            busbar_core::frame::encode_pub(&mut run, &message, 1 << 20).unwrap();
        }
        let frames: Vec<Bytes> = frames(run.freeze()).collect();
        assert_eq!(frames.len(), 3);
        for (frame, topic) in frames.iter().zip(["a", "b.c", "d"]) {
            let mut buf = BytesMut::from(&frame[..]);
            match busbar_core::frame::decode(&mut buf, 1 << 20) {
                Ok(Some(Frame::Pub(m))) => assert_eq!(&*m.topic, topic),
                other => panic!("unexpected {other:?}"),
            }
            assert!(buf.is_empty());
        }
    }
}
