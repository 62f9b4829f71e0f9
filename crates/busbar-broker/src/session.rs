//! One client connection: handshake, the read loop that applies the client's frames, and the write
//! task that owns the socket's write half.
//!
//! ```text
//!  socket read half ──► session loop ──► Router (subscribe / route)
//!                           │                    │ push (never waits)
//!                           ▼                    ▼
//!                       Outbox (channel bounded by item and byte counters) ──► write task ──► socket
//! ```
//!
//! The write task batches whatever is queued into one buffer per `write`, so many small frames cost
//! one system call. A [`Control`] shared by both sides carries "stop now, and send this error".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use busbar_core::frame::{self, FrameError};
use busbar_core::{
    ByteString, Call, CodecError, ErrorCode, ErrorFrame, Frame, FrameCodec, Message, Request, TopicMemo,
    Welcome, validate_pattern, validate_topic,
};
use bytes::BytesMut;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::Permissions;
use crate::config::SlowConsumerPolicy;
use crate::queue::Deferred;
use crate::requests::{NewRequest, ReplyTo};
use crate::server::{ConnMeta, Counters, Shared};

/// Read buffer room of a busy connection: one read takes many small frames.
const READ_BUFFER: usize = 32 * 1024;
/// Initial size of a connection's read buffer: enough for a handshake and a few subscriptions,
/// so that idle connections stay small; a connection that keeps sending gets `READ_BUFFER`.
const FIRST_READ_BUFFER: usize = 512;
/// Frames after which a connection counts as busy (its reads get `READ_BUFFER` of room).
const BUSY_AFTER: u32 = 64;
/// A connection whose queue has held at least [`DETACH_AFTER`] items for
/// [`DETACH_AFTER_BEHIND`] ms on end is given copies of messages rather than the read buffers they
/// arrived in ([`Outbox::share`]). What it keeps alive is then bounded by what its queue counts,
/// plus the buffers of what it was given before.
const DETACH_AFTER: usize = 256;
const DETACH_AFTER_BEHIND: u64 = 250;

/// Milliseconds since the first call in this process: a clock for coarse ages.
fn millis() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}
/// Room beyond a connection's bounds kept for the broker's answers to the client's own frames.
const ANSWER_SLACK_ITEMS: usize = 1024;
const ANSWER_SLACK_BYTES: usize = 256 * 1024;
/// Most frames routed before the writers they fed are woken (unless the client pauses first).
const DEFER_BATCH: u32 = 256;
/// Longest the session waits for room to queue an answer to the client (PONG, ERROR …).
const SEND_PATIENCE: Duration = Duration::from_secs(5);
/// Largest batch the write task builds before it writes.
const WRITE_BATCH: usize = 64 * 1024;
/// Time given to a connection being closed to take its last frames and the error frame.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// What the session and the router queue for the write task.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A published message for subscription `sid`.
    Msg { sid: u64, msg: Arc<Message> },
    /// Any other frame (boxed: frames are rare beside messages, and a small enum is cheap to
    /// move through the queue).
    Frame(Box<Frame>),
    /// Write this error after everything queued before it, then close.
    Close(ErrorFrame),
    /// NATS connections only: protocol lines and the writer's subscription bookkeeping.
    Nats(crate::nats::NatsOut),
    /// Routes only: interest, and messages with a target.
    Route(crate::router::RouteOut),
}

/// What is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Link {
    /// A native client.
    #[default]
    Client,
    /// A NATS client (it receives native requests as messages with a reply subject).
    Nats,
    /// Another broker of the cluster.
    Route,
}

impl Outbound {
    /// Any frame but a message.
    pub(crate) fn frame(frame: Frame) -> Self {
        Outbound::Frame(Box::new(frame))
    }

    /// [`Outbound::frame`] in `spare`, a box no longer needed, when there is one.
    pub(crate) fn boxed(spare: Option<Box<Frame>>, frame: Frame) -> Self {
        match spare {
            Some(mut b) => {
                *b = frame;
                Outbound::Frame(b)
            }
            None => Outbound::frame(frame),
        }
    }

    /// What it counts against the connection's byte budget.
    fn size(&self) -> usize {
        match self {
            Outbound::Msg { msg, .. } => msg.frame_size(),
            Outbound::Close(e) => 32 + e.message.len(),
            Outbound::Frame(f) => match &**f {
                Frame::Error(e) => 32 + e.message.len(),
                f => f.message().map_or(64, Message::frame_size),
            },
            Outbound::Nats(n) => n.size(),
            Outbound::Route(r) => r.size(),
        }
    }
}

/// "Stop this connection now", and the accounting of what is queued for it; shared by its
/// reader, writer and the router.
#[derive(Debug, Default)]
pub(crate) struct Control {
    kill: CancellationToken,
    /// Mirrors `kill` for the hot paths: an atomic load, where `is_cancelled` takes a lock.
    dead: std::sync::atomic::AtomicBool,
    reason: Mutex<Option<ErrorFrame>>,
    /// Bytes of frames queued and not yet encoded by the writer.
    pub(crate) pending_bytes: AtomicUsize,
    max_bytes: usize,
    /// Items queued and not yet encoded, and their bound (0: none).
    pending_frames: AtomicUsize,
    max_frames: usize,
    policy: SlowConsumerPolicy,
    /// Messages dropped for this connection under `SlowConsumerPolicy::Drop`.
    pub(crate) dropped: AtomicU64,
    /// Traffic of this connection, for monitoring.
    pub(crate) msgs_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) msgs_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Deliveries its publishes caused.
    pub(crate) deliveries: AtomicU64,
    counters: Option<Arc<Counters>>,
    link: Link,
    /// The client asked not to receive its own messages (NATS `echo: false`).
    pub(crate) no_echo: std::sync::atomic::AtomicBool,
    /// Routes only: the peer's `max_frame_size`, when it said (0: not known).
    pub(crate) peer_max_frame: usize,
    /// When the writer last left fewer than [`DETACH_AFTER`] items queued ([`millis`]).
    drained_at: AtomicU64,
    /// One more than the `drained_at` since which the queue has been found long behind
    /// ([`Outbox::share`]); 0 for none. A `drained_at` the writer has moved on from no longer
    /// matches, so a finding made late cannot outlive the writer catching up.
    behind_since: AtomicU64,
}

impl Control {
    pub(crate) fn new(config: &crate::Config, counters: Arc<Counters>, link: Link) -> Self {
        Self {
            max_bytes: config.max_pending_bytes,
            max_frames: config.max_pending,
            // A route that drops frames would lose interest changes for good: it is closed (and
            // redialled, with a full resync) instead, whatever the policy for clients.
            policy: if link == Link::Route { SlowConsumerPolicy::Disconnect } else { config.slow_consumer },
            counters: Some(counters),
            link,
            drained_at: AtomicU64::new(millis()),
            ..Self::default()
        }
    }

    /// The writer has left fewer than [`DETACH_AFTER`] items queued.
    fn caught_up(&self) {
        self.drained_at.store(millis(), Ordering::Relaxed);
    }

    /// True once at least [`DETACH_AFTER`] items have stayed queued for
    /// [`DETACH_AFTER_BEHIND`]. The clock is read once per 64 items queued meanwhile.
    fn long_behind(&self) -> bool {
        let pending = self.pending_frames.load(Ordering::Relaxed);
        if pending < DETACH_AFTER {
            return false;
        }
        let drained = self.drained_at.load(Ordering::Relaxed);
        if self.behind_since.load(Ordering::Relaxed) == drained + 1 {
            return true;
        }
        if pending.is_multiple_of(64) && millis().saturating_sub(drained) >= DETACH_AFTER_BEHIND {
            self.behind_since.store(drained + 1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// True once the connection is being closed.
    pub(crate) fn is_killed(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Stops the connection without a reason.
    fn stop(&self) {
        self.dead.store(true, Ordering::Release);
        self.kill.cancel();
    }

    /// True when one more item of `size` bytes would exceed a bound. `slack` lets the broker's
    /// answers to the client's own frames (PONG, errors) past the bound that messages stop at:
    /// otherwise, under the drop policy, messages would take every slot the writer frees and an
    /// answer would wait for good.
    fn full(&self, size: usize, slack: bool) -> bool {
        let (items, bytes) = if slack { (ANSWER_SLACK_ITEMS, ANSWER_SLACK_BYTES) } else { (0, 0) };
        (self.max_bytes > 0 && self.pending_bytes.load(Ordering::Relaxed) + size > self.max_bytes + bytes)
            || (self.max_frames > 0 && self.pending_frames.load(Ordering::Relaxed) >= self.max_frames + items)
    }

    fn add_pending(&self, size: usize) {
        self.pending_bytes.fetch_add(size, Ordering::Relaxed);
        self.pending_frames.fetch_add(1, Ordering::Relaxed);
    }

    fn sub_pending(&self, size: usize) {
        self.pending_bytes.fetch_sub(size, Ordering::Relaxed);
        self.pending_frames.fetch_sub(1, Ordering::Relaxed);
    }

    /// Completes when the connection is being closed.
    pub(crate) async fn killed(&self) {
        self.kill.cancelled().await;
    }

    /// Stops the connection, abandoning what is queued; `reason` is written if the socket takes it.
    /// True for the one call that stopped it (the others find it stopped already).
    pub(crate) fn fail(&self, reason: ErrorFrame) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        let first = !self.dead.swap(true, Ordering::AcqRel);
        if first {
            *slot = Some(reason);
        }
        drop(slot);
        self.stop();
        first
    }

    /// Closes the connection as a slow consumer, counted once however many publishers find it.
    fn slow_consumer(&self, why: &str) {
        if self.fail(error(ErrorCode::SlowConsumer, 0, format!("{why}: slow consumer"))) {
            warn!(why, "slow consumer: closing connection");
            if let Some(counters) = &self.counters {
                counters.slow_consumers.inc();
            }
        }
    }
}

/// What became of an item offered to a connection's queue.
#[derive(Debug, PartialEq, Eq)]
enum Queued {
    Yes,
    /// Over the connection's bounds.
    Full,
    /// The connection's writer is gone.
    Gone,
}

/// The sending side of a connection's outbound queue. The channel itself is unbounded (no
/// semaphore to pay per message); the bounds are the connection's `Control` counters of items
/// and bytes, checked before each push and released by the writer.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: Option<crate::queue::Sender<Outbound>>,
    control: Arc<Control>,
}

impl Outbox {
    /// An outbox into `tx`, with no bounds (for benches).
    pub(crate) fn new(tx: crate::queue::Sender<Outbound>) -> Self {
        Self { tx: Some(tx), control: Arc::default() }
    }

    /// An outbox that leads nowhere (used as a lookup key, and in unit tests).
    pub(crate) fn detached() -> Self {
        Self { tx: None, control: Arc::default() }
    }

    /// An outbox into `tx` with its connection's control.
    pub(crate) fn with_control(tx: crate::queue::Sender<Outbound>, control: Arc<Control>) -> Self {
        Self { tx: Some(tx), control }
    }

    /// The connection's control.
    pub(crate) fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// True for a NATS client connection.
    pub(crate) fn is_nats(&self) -> bool {
        self.control.link == Link::Nats
    }

    /// True for a route to another broker.
    pub(crate) fn is_route(&self) -> bool {
        self.control.link == Link::Route
    }

    /// True when the connection does not want its own messages back.
    pub(crate) fn no_echo(&self) -> bool {
        self.control.no_echo.load(Ordering::Relaxed)
    }

    /// Queues a message without waiting. A full queue makes the connection a slow consumer: it is
    /// closed with `SlowConsumer` rather than allowed to slow the publisher or grow without bound.
    pub(crate) fn deliver(&self, sid: u64, msg: &Arc<Message>) -> bool {
        // Made once the bound has taken it: a copy for a full queue would be thrown away.
        self.push_sized(msg.frame_size(), || Outbound::Msg { sid, msg: self.share(msg) })
    }

    /// The message to queue here: the routed one itself, or, for a connection long behind, a
    /// copy of its own. A decoded message shares the read buffer its frame came in (32 KiB for
    /// a busy publisher), and a reader that has stopped keeps what it was given: one small
    /// message to it among 16 KiB of others' traffic would keep a whole buffer alive per
    /// queued message, far beyond what `max_pending_bytes` counts. A connection that keeps up,
    /// or is behind only for a burst (its queue below [`DETACH_AFTER`] items at least once every
    /// [`DETACH_AFTER_BEHIND`] ms), is given the message itself: copying for every backlog
    /// halved the rate of a saturated subscriber.
    pub(crate) fn share(&self, msg: &Arc<Message>) -> Arc<Message> {
        if self.control.long_behind() { Arc::new(msg.detached()) } else { msg.clone() }
    }

    /// False for a message the other end cannot read: larger than a peer broker's
    /// `max_frame_size` (the route writer would skip it).
    pub(crate) fn can_carry(&self, message: &Message) -> bool {
        let limit = self.control.peer_max_frame;
        limit == 0 || message.frame_size() <= limit
    }

    /// Queues any frame without waiting, with the same slow-consumer rule as [`Outbox::deliver`].
    pub(crate) fn deliver_frame(&self, frame: Frame) -> bool {
        self.push(Outbound::frame(frame))
    }

    /// Queues anything without waiting, with the slow-consumer rule of [`Outbox::deliver`].
    pub(crate) fn push(&self, out: Outbound) -> bool {
        self.push_sized(out.size(), || out)
    }

    /// [`Outbox::push`] of the item `make` builds, of `size` (its [`Outbound::size`]), built
    /// only once the bound has room for it.
    pub(crate) fn push_sized(&self, size: usize, make: impl FnOnce() -> Outbound) -> bool {
        self.push_bounded(size, false, make)
    }

    /// Closes the connection once what is queued is written, with `reason` last (shutdown):
    /// without waiting, so that the broker's drain timeout bounds every connection's close.
    /// A queue too full to take it even past its bound is closed at once, `reason` still sent.
    pub(crate) fn close_now(&self, reason: ErrorFrame) {
        // Not through `push_answer`: a full queue here is a shutdown, not a slow consumer (nor
        // a dropped message).
        let close = Outbound::Close(reason.clone());
        if self.queue(close.size(), true, || close) != Queued::Yes {
            self.control.fail(reason);
        }
    }

    /// Queues, without waiting, an answer the client is owed (the reply to its request, an
    /// error about it): past the bound messages stop at, by the answer slack, so that under the
    /// drop policy a queue full of messages does not swallow it. Beyond that, the slow-consumer
    /// rule.
    pub(crate) fn push_answer(&self, out: Outbound) -> bool {
        self.push_bounded(out.size(), true, || out)
    }

    fn push_bounded(&self, size: usize, slack: bool, make: impl FnOnce() -> Outbound) -> bool {
        match self.queue(size, slack, make) {
            Queued::Yes => true,
            Queued::Full => {
                self.overflow("outbound queue over its bounds");
                false
            }
            Queued::Gone => false,
        }
    }

    /// Queues the item `make` builds, of `size`, when the bounds (past them by the answer slack
    /// when `slack`) have room: built only then.
    fn queue(&self, size: usize, slack: bool, make: impl FnOnce() -> Outbound) -> Queued {
        let Some(tx) = &self.tx else { return Queued::Gone };
        let c = &self.control;
        if c.full(size, slack) {
            return Queued::Full;
        }
        // Counted before it is queued, so that the writer never subtracts what was not added.
        c.add_pending(size);
        if tx.try_send(make()).is_err() {
            c.sub_pending(size);
            return Queued::Gone;
        }
        Queued::Yes
    }

    /// The connection does not keep up: close it or drop, by policy. Either way the broker's
    /// memory for it stays bounded and the publisher is not slowed.
    fn overflow(&self, why: &str) {
        let c = &self.control;
        match c.policy {
            SlowConsumerPolicy::Disconnect => c.slow_consumer(why),
            SlowConsumerPolicy::Drop => {
                let n = c.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(counters) = &c.counters {
                    counters.dropped.inc();
                }
                if n.is_power_of_two() {
                    warn!(why, dropped = n, "slow consumer: dropping messages");
                }
            }
        }
    }

    /// Queues a frame, waiting for room (the client's own replies: backpressure on its reads),
    /// but at most `SEND_PATIENCE`: a client that reads nothing for that long while the broker
    /// owes it an answer is a slow consumer, whatever the policy for messages.
    pub(crate) async fn send(&self, out: Outbound) -> bool {
        let Some(tx) = &self.tx else { return false };
        let c = &self.control;
        let size = out.size();
        if c.max_bytes > 0 && size > c.max_bytes {
            c.slow_consumer("outbound bytes over the limit");
            return false;
        }
        // Waiting for room is rare (a client that does not read): poll for it, bounded.
        let deadline = tokio::time::Instant::now() + SEND_PATIENCE;
        while c.full(size, true) {
            if c.is_killed() {
                return false;
            }
            if tokio::time::Instant::now() >= deadline {
                c.slow_consumer("not reading");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        c.add_pending(size);
        if tx.try_send(out).is_err() {
            c.sub_pending(size);
            return false;
        }
        true
    }
}

/// A peer-supplied text as it is quoted in an error: at most 100 characters, so that a client
/// cannot make the broker queue error frames many times the size of what it sent.
pub(crate) fn shown(text: &str) -> &str {
    match text.char_indices().nth(100) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

pub(crate) fn error(code: ErrorCode, correlation: u64, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame { code, correlation, message: message.into().into() }
}

fn frame_error_code(e: &FrameError) -> ErrorCode {
    match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::MalformedFrame,
    }
}

/// Serves one accepted connection until it closes, then removes everything it held.
/// Reading and writing halves of a connection, plain TCP or TLS.
pub(crate) type ReadHalf = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub(crate) type WriteHalf = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Writes `reason` (as a native ERROR frame or a NATS -ERR) to a connection that is not served,
/// within `grace`, and closes it.
pub(crate) async fn refuse(mut stream: TcpStream, reason: ErrorFrame, grace: Duration, nats: bool) {
    let mut buf = BytesMut::new();
    if nats {
        busbar_core::nats::write::err(&mut buf, crate::nats::closing_text(&reason).unwrap_or(""));
    } else if Frame::Error(reason).encode(&mut buf, usize::MAX).is_err() {
        buf.clear();
    }
    let _ = tokio::time::timeout(grace, stream.write_all(&buf)).await;
    let _ = stream.shutdown().await;
}

/// An accepted socket: TLS handshake first when the broker has TLS, then the session.
pub(crate) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    id: u32,
    shared: Arc<Shared>,
    tls: Option<(tokio_rustls::TlsAcceptor, bool)>,
) {
    // One deadline for the whole handshake: first byte, TLS, HELLO and authentication.
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    // Both paths boxed: a task's future is as large as its largest state, and an idle plain
    // connection should not carry room for a TLS handshake all its life.
    match tls {
        None => {
            let (rd, wr) = stream.into_split();
            Box::pin(run(Box::new(rd), Box::new(wr), peer, id, None, deadline, shared)).await;
        }
        Some((acceptor, required)) => {
            let opened = Box::pin(open_tls(stream, &shared, acceptor, required, deadline, false)).await;
            if let Some((rd, wr, identity)) = opened {
                Box::pin(run(rd, wr, peer, id, identity, deadline, shared)).await;
            }
        }
    }
}

/// The first byte decides: a TLS handshake, or (TLS optional) a plain connection, or a
/// refusal (a native ERROR, or for `nats` an -ERR). Returns the connection's halves and the
/// client certificate's name.
pub(crate) async fn open_tls(
    stream: TcpStream,
    shared: &Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    required: bool,
    deadline: tokio::time::Instant,
    nats: bool,
) -> Option<(ReadHalf, WriteHalf, Option<String>)> {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None,
    }
    if first[0] == 0x16 {
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let identity = crate::tls::peer_common_name(tls.get_ref().1);
                let (rd, wr) = tokio::io::split(tls);
                Some((Box::new(rd), Box::new(wr), identity))
            }
            Ok(Err(e)) => {
                shared.stats.auth_failures.inc();
                warn!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                None
            }
        }
    } else if required {
        // A plain client: tell it, in the clear, before closing.
        debug!("plain connection to a TLS-only listener");
        let text = if nats {
            "Secure Connection - TLS Required"
        } else {
            "this broker accepts only TLS connections (busbars://)"
        };
        refuse(stream, error(ErrorCode::TlsRequired, 0, text), CLOSE_GRACE, nats).await;
        None
    } else {
        let (rd, wr) = stream.into_split();
        Some((Box::new(rd), Box::new(wr), None))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    rd: ReadHalf,
    wr: WriteHalf,
    peer: SocketAddr,
    id: u32,
    tls_identity: Option<String>,
    deadline: tokio::time::Instant,
    shared: Arc<Shared>,
) {
    let max = shared.config.max_frame_size;
    let mut reader = FramedRead::with_capacity(rd, SessionCodec(FrameCodec::new(max)), FIRST_READ_BUFFER);
    let (tx, rx) = crate::queue::queue();
    let control = Arc::new(Control::new(&shared.config, shared.stats.clone(), Link::Client));
    let outbox = Outbox { tx: Some(tx), control: control.clone() };
    let writer = tokio::spawn(write_loop(wr, rx, control.clone(), max, Native));

    let registered = match handshake(&mut reader, &outbox, id, &shared, tls_identity, deadline).await {
        Some((name, service, permissions)) => {
            tracing::Span::current().record("name", name.as_str());
            info!(service = service.as_deref(), "client connected");
            let meta = ConnMeta {
                name,
                protocol: "native",
                service: service.as_deref().map(str::to_string),
                addr: peer,
                since: std::time::SystemTime::now(),
                control: control.clone(),
            };
            shared.conns().insert(id, meta);
            shared.router_mut().add_connection(id, service, outbox.clone());
            read_loop(&mut reader, &outbox, id, &shared, &permissions).await;
            true
        }
        None => false,
    };
    finish(&shared, id, registered, outbox, writer).await;
    debug!(%peer, "connection closed");
}

/// Ends a client connection (native or NATS): forgets its subscriptions and requests, lets its
/// writer flush what is queued (at most the drain timeout), then takes it out of the registry,
/// its traffic joining the broker's totals (one lock: neither counted twice nor missing).
pub(crate) async fn finish(
    shared: &Shared,
    id: u32,
    registered: bool,
    outbox: Outbox,
    writer: tokio::task::JoinHandle<()>,
) {
    if registered {
        shared.router_mut().remove_connection(id);
        shared.requests().remove_connection(id);
    }
    // The writer ends once every sender is gone or the connection was killed.
    drop(outbox);
    let abort = writer.abort_handle();
    if tokio::time::timeout(shared.config.drain_timeout, writer).await.is_err() {
        abort.abort();
    }
    if registered {
        shared.unregister(id);
    }
}

type Reader = FramedRead<ReadHalf, SessionCodec>;

/// What a session reads: a PUB already in the `Arc` it is routed in (a message is large; moved
/// once into place rather than through every layer between decoder and router), or any other
/// frame, boxed.
#[derive(Debug)]
enum Incoming {
    Pub(Arc<Message>),
    Other(Box<Frame>),
}

/// The native codec, yielding [`Incoming`].
#[derive(Debug)]
struct SessionCodec(FrameCodec);

impl tokio_util::codec::Decoder for SessionCodec {
    type Item = Incoming;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
        // A PUB straight into its Arc, without the moves of a `Frame`.
        let incoming = frame::decode_with(
            src,
            self.0.max_frame_size(),
            |message| Incoming::Pub(Arc::new(message)),
            |other| Incoming::Other(Box::new(other)),
        )?;
        Ok(incoming)
    }
}

/// The HELLO property that registers a service name for direct addressing.
pub(crate) const SERVICE_PROPERTY: &str = "service";
/// Route HELLO property: the client named by the source id speaks NATS (value `1`).
pub(crate) const NATS_CLIENT_PROPERTY: &str = "nats";
/// The reserved header that addresses a PUB or REQUEST to a service by name.
pub(crate) const TO_HEADER: &str = ":to";

/// Waits for HELLO and answers WELCOME. Returns the client's name and service name, or None when
/// the connection must close (the reason has been queued).
async fn handshake(
    reader: &mut Reader,
    outbox: &Outbox,
    id: u32,
    shared: &Shared,
    tls_identity: Option<String>,
    deadline: tokio::time::Instant,
) -> Option<(String, Option<ByteString>, Arc<Permissions>)> {
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, reader.next()) => r,
        () = shared.shutdown.cancelled() => {
            outbox.control.fail(error(ErrorCode::ShuttingDown, 0, "server shutting down"));
            return None;
        }
    };
    let hello = match first {
        Err(_elapsed) => {
            outbox.control.fail(error(
                ErrorCode::HandshakeTimeout,
                0,
                "no HELLO within the handshake timeout",
            ));
            return None;
        }
        Ok(None) | Ok(Some(Err(CodecError::Io(_)))) => return None,
        Ok(Some(Err(CodecError::Frame(e)))) => {
            debug!(error = %e, "malformed handshake");
            outbox.control.fail(error(frame_error_code(&e), 0, e.to_string()));
            return None;
        }
        Ok(Some(Ok(incoming))) => {
            let name = match incoming {
                Incoming::Other(frame) => match *frame {
                    Frame::Hello(hello) => Ok(hello),
                    other => Err(other.name()),
                },
                Incoming::Pub(_) => Err("PUB"),
            };
            match name {
                Ok(hello) => hello,
                Err(name) => {
                    let text = format!("expected HELLO, got {name}");
                    outbox.control.fail(error(ErrorCode::HandshakeRequired, 0, text));
                    return None;
                }
            }
        }
    };
    let welcome = Welcome {
        service_id: id,
        max_frame_size: u32::try_from(shared.config.max_frame_size).unwrap_or(u32::MAX),
        heartbeat_ms: u32::try_from(shared.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
        server_name: shared.config.server_name.clone().into(),
        server_version: env!("CARGO_PKG_VERSION").into(),
        properties: match &shared.cluster {
            // Where else this client can go when this broker is gone.
            Some(cluster) => [("connect_urls", cluster.connect_urls(false).join(","))].into_iter().collect(),
            None => Default::default(),
        },
    };
    let permissions = authenticate(shared, hello.properties.clone(), tls_identity, deadline).await;
    let Some(permissions) = permissions else {
        shared.stats.auth_failures.inc();
        warn!(client = %hello.name, "authentication failed");
        outbox.control.fail(error(ErrorCode::AuthenticationFailed, 0, "authentication failed"));
        return None;
    };
    let service = hello.properties.get(SERVICE_PROPERTY).filter(|s| !s.is_empty()).map(ByteString::from);
    if let Some(name) = &service
        && let Err(e) = validate_topic(name)
    {
        let text = format!("invalid service name {:?}: {e}", shown(name));
        outbox.control.fail(error(ErrorCode::InvalidTopic, 0, text));
        return None;
    }
    if let Some(name) = &service
        && !permissions.services.permits_topic(name)
    {
        let text = format!("may not register service {:?}", shown(name));
        outbox.control.fail(error(ErrorCode::PermissionDenied, 0, text));
        return None;
    }
    let ok = outbox.send(Outbound::frame(Frame::Welcome(welcome))).await;
    ok.then(|| (hello.name.to_string(), service, Arc::new(permissions)))
}

/// Checks credentials (`token`, or `user` and `password`) or the TLS identity; None: refused.
/// Argon2 is slow (and memory-hungry) on purpose: verify off the reactor threads, a few at a time,
/// within the handshake deadline, so that a crowd of strangers cannot exhaust the host.
pub(crate) async fn authenticate(
    shared: &Shared,
    properties: busbar_core::Headers,
    tls_identity: Option<String>,
    deadline: tokio::time::Instant,
) -> Option<Permissions> {
    let auth = shared.config.auth.clone();
    let slot =
        tokio::time::timeout_at(deadline, shared.auth_slots.clone().acquire_owned()).await.ok()?.ok()?;
    let check = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        auth.authenticate(&properties, tls_identity.as_deref())
    });
    tokio::time::timeout_at(deadline, check).await.ok()?.ok()?
}

/// The broker's side of heartbeats, for any kind of connection: the rule of
/// [`busbar_core::heartbeat`] (a PING after each quiet interval, dead after
/// `interval × (max_missed + 1)` of silence), on a tick. The clock is read once per tick, not per
/// frame: a frame only sets `heard`.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    rule: busbar_core::heartbeat::Heartbeat,
    tick: tokio::time::Interval,
    last_seen: tokio::time::Instant,
    heard: bool,
}

impl Heartbeat {
    pub(crate) fn new(config: &crate::Config) -> Self {
        let beat = config.heartbeat_interval;
        let rule = busbar_core::heartbeat::Heartbeat::new(beat, config.heartbeat_max_missed);
        // Checked four times an interval, so that a dead peer is found soon after the limit.
        let period = (beat / 4).max(Duration::from_millis(5));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = tokio::time::Instant::now();
        Self { rule, tick, last_seen: now, heard: false }
    }

    /// Heartbeats are off (interval zero).
    pub(crate) fn off(&self) -> bool {
        self.rule.interval().is_zero()
    }

    /// Something arrived from the peer.
    pub(crate) fn heard(&mut self) {
        self.heard = true;
    }

    /// The next check.
    pub(crate) async fn tick(&mut self) {
        self.tick.tick().await;
    }

    /// A check: pings a quiet peer through `outbox`; `Err(idle)` when it is to be closed.
    pub(crate) fn check(&mut self, outbox: &Outbox) -> Result<(), Duration> {
        if std::mem::take(&mut self.heard) {
            self.last_seen = tokio::time::Instant::now();
            self.rule.heard();
        }
        let idle = self.last_seen.elapsed();
        match self.rule.check(idle) {
            busbar_core::heartbeat::Beat::Dead => return Err(idle),
            busbar_core::heartbeat::Beat::Ping => {
                if !outbox.deliver_frame(Frame::Ping) {
                    self.rule.ping_not_sent();
                }
            }
            busbar_core::heartbeat::Beat::Quiet => {}
        }
        Ok(())
    }
}

async fn read_loop(reader: &mut Reader, outbox: &Outbox, id: u32, shared: &Shared, perms: &Permissions) {
    let mut heartbeat = Heartbeat::new(&shared.config);
    let beat = shared.config.heartbeat_interval;
    // Created once: a fresh `cancelled()` future per frame costs a registration each time.
    let killed = outbox.control.kill.cancelled();
    let stopping = shared.shutdown.cancelled();
    tokio::pin!(killed, stopping);
    // Frames since shutdown was last looked at (a lock, so not per frame).
    let mut unchecked = 0u32;
    let mut frames = 0u32;
    let bye = || error(ErrorCode::ShuttingDown, 0, "server shutting down");
    // The writers this batch of frames queued messages for: woken once the batch is routed.
    let mut deferred = Deferred::default();
    let mut batch = 0u32;
    // A run of PUBs (or requests) to one topic has it checked once (the check was 5 % of the
    // broker's instructions in pubsub).
    let mut last_topic = TopicMemo::new();
    loop {
        if frames >= BUSY_AFTER {
            // Large reads for a busy connection. (The decoder only asks for one more byte, and a
            // buffer whose frames are still referenced is replaced by one of its first size.)
            // Only once no whole frame is left, right before the socket is read: the bytes
            // still in the buffer move to the new one, and then they are one partial frame at
            // most, not a read's worth of frames (4 % of the broker's instructions in pubsub).
            let buf = reader.read_buffer_mut();
            if buf.capacity() - buf.len() < READ_BUFFER / 2
                && !matches!(frame::check(buf, usize::MAX), Ok(Some(_)))
            {
                buf.reserve(READ_BUFFER);
            }
        }
        // Frames already read are taken without a select; the other branches (each a poll
        // with a lock or a timer) wait until the client pauses; the kill flag and shutdown are
        // checked below instead, and heartbeats do not matter while frames arrive.
        let buffered = if batch < DEFER_BATCH { reader.next().now_or_never() } else { None };
        let next = if let Some(next) = buffered {
            batch += 1;
            next
        } else {
            // About to wait: the writers get what this batch queued for them.
            batch = 0;
            deferred.wake_all();
            tokio::select! {
                biased;
                next = reader.next() => next,
                () = heartbeat.tick(), if !heartbeat.off() => {
                    if let Err(idle) = heartbeat.check(outbox) {
                        warn!(?idle, "no frame within the heartbeat limit, closing connection");
                        let text = format!("nothing received for {idle:?} (heartbeat {beat:?})");
                        outbox.control.fail(error(ErrorCode::StaleConnection, 0, text));
                        return;
                    }
                    continue;
                }
                () = &mut killed => return,
                () = &mut stopping => {
                    outbox.close_now(bye());
                    return;
                }
            }
        };
        if outbox.control.is_killed() {
            return;
        }
        unchecked += 1;
        if unchecked >= 256 {
            unchecked = 0;
            if shared.shutdown.is_cancelled() {
                deferred.wake_all();
                outbox.close_now(bye());
                return;
            }
        }
        let incoming = match next {
            None => return,
            Some(Err(CodecError::Io(e))) => {
                debug!(error = %e, "read failed");
                return;
            }
            Some(Err(CodecError::Frame(e))) => {
                warn!(error = %e, "malformed frame, closing connection");
                outbox.control.fail(error(frame_error_code(&e), 0, e.to_string()));
                return;
            }
            Some(Ok(incoming)) => incoming,
        };
        heartbeat.heard();
        frames = frames.saturating_add(1);
        let applied = match incoming {
            Incoming::Pub(message) => {
                publish(message, outbox, id, shared, perms, &mut deferred, &mut last_topic).await
            }
            Incoming::Other(frame) => match &*frame {
                // Requests and replies, like PUBs, go out with the batch (request-reply traffic
                // comes in batches too, with many requests in flight). Each takes its box along:
                // the CALL or REPLY it becomes goes out in it, without an allocation.
                // (A refused one goes to `apply`, which answers it.)
                Frame::Request(request) if perms.publish.permits_topic(&request.message.topic) => {
                    request_in(frame, outbox, id, shared, &mut deferred, &mut last_topic).await;
                    Ok(())
                }
                Frame::Reply(reply) if is_local_reply(reply, shared) => {
                    deferred.hold(|| local_reply(frame, id, shared, perms));
                    Ok(())
                }
                _ => {
                    // Anything else may wait (for room in this client's own queue, say).
                    deferred.wake_all();
                    apply(*frame, outbox, id, shared, perms).await
                }
            },
        };
        if let Err(fatal) = applied {
            outbox.control.fail(fatal);
            return;
        }
    }
}

/// A PUB from the client: checked, then routed.
async fn publish(
    mut message: Arc<Message>,
    outbox: &Outbox,
    id: u32,
    shared: &Shared,
    perms: &Permissions,
    deferred: &mut Deferred,
    last_topic: &mut TopicMemo,
) -> Result<(), ErrorFrame> {
    if !perms.publish.permits_topic(&message.topic) {
        deferred.wake_all();
        shared.stats.permission_denied.inc();
        let e =
            error(ErrorCode::PermissionDenied, 0, format!("may not publish to {:?}", shown(&message.topic)));
        if shared.config.auth.disconnect_on_violation {
            return Err(e);
        }
        outbox.send(Outbound::frame(Frame::Error(e))).await;
        return Ok(());
    }
    count_in(outbox, &message);
    if let Err(e) = last_topic.validate(&message.topic) {
        deferred.wake_all();
        let text = format!("invalid topic {:?}: {e}", shown(&message.topic));
        outbox.send(Outbound::frame(Frame::Error(error(ErrorCode::InvalidTopic, 0, text)))).await;
        return Ok(());
    }
    match Arc::get_mut(&mut message) {
        Some(m) => m.source = id,
        // Not reached (the decoder's Arc is the only one); kept correct all the same.
        None => Arc::make_mut(&mut message).source = id,
    }
    let Some(only) = destination(&message, shared) else {
        debug!(topic = %message.topic, "direct message to an unknown service dropped");
        shared.stats.undeliverable.inc();
        return Ok(());
    };
    let delivered = deferred.hold(|| shared.router().route(&message, only));
    outbox.control.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
    Ok(())
}

/// Applies one frame from the client. `Err` carries an error that closes the connection;
/// non-fatal errors are queued as ERROR frames and the connection goes on.
async fn apply(
    frame: Frame,
    outbox: &Outbox,
    id: u32,
    shared: &Shared,
    perms: &Permissions,
) -> Result<(), ErrorFrame> {
    // A permission violation: answered, and fatal only when so configured.
    let denied = |correlation: u64, what: String| -> Result<Option<Outbound>, ErrorFrame> {
        shared.stats.permission_denied.inc();
        let e = error(ErrorCode::PermissionDenied, correlation, what);
        if shared.config.auth.disconnect_on_violation {
            Err(e)
        } else {
            Ok(Some(Outbound::frame(Frame::Error(e))))
        }
    };
    let refusal = match &frame {
        Frame::Sub(s) if !perms.subscribe.permits_pattern(&s.pattern) => {
            denied(s.sid, format!("may not subscribe to {:?}", shown(&s.pattern)))?
        }
        Frame::Sub(s) if s.group.as_ref().is_some_and(|g| !perms.groups.permits_topic(&g.name)) => {
            denied(s.sid, "may not join that group".to_string())?
        }
        Frame::Request(r) if !perms.publish.permits_topic(&r.message.topic) => {
            shared.stats.permission_denied.inc();
            if shared.config.auth.disconnect_on_violation {
                return Err(error(ErrorCode::PermissionDenied, r.id, "may not send requests there"));
            }
            let text = format!("may not send requests to {:?}", shown(&r.message.topic));
            let topic = r.message.topic.clone();
            Some(Outbound::frame(crate::requests::error_reply(
                r.id,
                ErrorCode::PermissionDenied,
                0,
                topic,
                &text,
            )))
        }
        _ => None,
    };
    if let Some(answer) = refusal {
        outbox.send(answer).await;
        return Ok(());
    }
    match frame {
        Frame::Pub(message) => {
            // (Not reached from the read loop, which routes PUBs itself; no batch to wait for.)
            let mut now = Deferred::default();
            let mut topic = TopicMemo::new();
            return publish(Arc::new(message), outbox, id, shared, perms, &mut now, &mut topic).await;
        }
        Frame::Request(request) => {
            let mut now = Deferred::default();
            request_in(Box::new(Frame::Request(request)), outbox, id, shared, &mut now, &mut TopicMemo::new())
                .await
        }
        Frame::Reply(reply) if is_local_reply(&reply, shared) => {
            local_reply(Box::new(Frame::Reply(reply)), id, shared, perms);
        }
        Frame::Reply(reply) => {
            let requester = reply.message.destination;
            if requester != 0 && crate::cluster::is_remote(shared, requester) {
                crate::cluster::reply_to_peer(shared, id, reply, Some(perms));
            } else {
                let e =
                    error(ErrorCode::InvalidReply, reply.id, "REPLY without the requester as destination");
                outbox.send(Outbound::frame(Frame::Error(e))).await;
            }
        }
        Frame::Sub(sub) => {
            let fail = |code, text: String| Outbound::frame(Frame::Error(error(code, sub.sid, text)));
            if sub.sid == crate::router::GONE {
                // Routes use this id to say "the client is gone" (and "every subscription").
                let text = format!("subscription id {} is reserved", sub.sid);
                outbox.send(fail(ErrorCode::DuplicateSubscription, text)).await;
                return Ok(());
            }
            if let Err(e) = validate_pattern(&sub.pattern) {
                outbox
                    .send(fail(
                        ErrorCode::InvalidPattern,
                        format!("invalid pattern {:?}: {e}", shown(&sub.pattern)),
                    ))
                    .await;
                return Ok(());
            }
            if let Some(g) = &sub.group
                && let Err(e) = validate_topic(&g.name)
            {
                let text = format!("invalid group name {:?}: {e}", shown(&g.name));
                outbox.send(fail(ErrorCode::InvalidPattern, text)).await;
                return Ok(());
            }
            let group = sub.group.map(|g| (g.name, g.policy));
            let limit = shared.config.max_subscriptions;
            let pattern = sub.pattern.clone();
            let result =
                shared.router_mut().subscribe(id, sub.sid, pattern, group, sub.kind, outbox.clone(), limit);
            if let Err(e) = result {
                let text = format!("subscription {} to {:?} refused: {e:?}", sub.sid, shown(&sub.pattern));
                outbox.send(fail(e.code(), text)).await;
            }
        }
        Frame::Unsub { sid } => {
            if !shared.router_mut().unsubscribe(id, sid) {
                let e = error(ErrorCode::UnknownSubscription, sid, format!("no subscription with id {sid}"));
                outbox.send(Outbound::frame(Frame::Error(e))).await;
            }
        }
        Frame::Ping => {
            outbox.send(Outbound::frame(Frame::Pong)).await;
        }
        Frame::Pong => {}
        Frame::Error(e) => debug!(code = %e.code, message = %e.message, "client reported an error"),
        Frame::Hello(_) => return Err(error(ErrorCode::HandshakeRequired, 0, "HELLO sent twice")),
        other @ (Frame::Welcome(_) | Frame::Msg { .. } | Frame::Call(_)) => {
            return Err(error(
                ErrorCode::UnexpectedFrame,
                0,
                format!("a client may not send {}", other.name()),
            ));
        }
    }
    Ok(())
}

/// Where a direct message goes: `Some(None)` for everyone, `Some(Some(conn))` for one connection,
/// `None` when it names a service that is not connected.
fn destination(message: &Message, shared: &Shared) -> Option<Option<u32>> {
    if message.destination != 0 {
        return Some(Some(message.destination));
    }
    match message.headers.get(TO_HEADER) {
        None => Some(None),
        Some(name) => shared.router().resolve_service(name).map(Some),
    }
}

/// Counts a message received from the client (per connection: the broker's totals are summed
/// from its connections, so that no counter shared by all cores is touched per message).
pub(crate) fn count_in(outbox: &Outbox, message: &Message) {
    let bytes = message.frame_size() as u64;
    outbox.control.msgs_in.fetch_add(1, Ordering::Relaxed);
    outbox.control.bytes_in.fetch_add(bytes, Ordering::Relaxed);
}

/// Routes a request to its responders, or answers at once when there are none.
/// A REPLY to a request of a client of this broker.
fn is_local_reply(reply: &busbar_core::Reply, shared: &Shared) -> bool {
    let requester = reply.message.destination;
    requester != 0 && !crate::cluster::is_remote(shared, requester)
}

/// Settles a request of a client of this broker with the REPLY in `frame` (see
/// [`is_local_reply`]); never waits.
fn local_reply(mut frame: Box<Frame>, id: u32, shared: &Shared, perms: &Permissions) {
    let Frame::Reply(reply) = std::mem::replace(&mut *frame, Frame::Ping) else {
        unreachable!("called with a REPLY")
    };
    // Judged on the request's own topic: the responder cannot pick another.
    let may_reply = |topic: &str| {
        let ok = perms.allow_responses || perms.publish.permits_topic(topic);
        if !ok {
            shared.stats.permission_denied.inc();
        }
        ok
    };
    let requester = reply.message.destination;
    let replied = shared.requests().reply(requester, id, reply, Some(frame), may_reply);
    crate::requests::settle(replied, shared);
}

/// A REQUEST from the client. Its CALLs are queued under `deferred` (woken with the batch); the
/// held wake-ups are done before any wait.
async fn request_in(
    mut frame: Box<Frame>,
    outbox: &Outbox,
    id: u32,
    shared: &Shared,
    deferred: &mut Deferred,
    last_topic: &mut TopicMemo,
) {
    let Frame::Request(request) = std::mem::replace(&mut *frame, Frame::Ping) else {
        unreachable!("called with a REQUEST")
    };
    count_in(outbox, &request.message);
    let Request { id: req_id, all, timeout_ms, mut message } = request;
    shared.stats.requests.inc();
    let fail = |code, text: &str, topic: ByteString| {
        Outbound::frame(crate::requests::error_reply(req_id, code, 0, topic, text))
    };
    if let Err(e) = last_topic.validate(&message.topic) {
        deferred.wake_all();
        let text = format!("invalid topic {:?}: {e}", shown(&message.topic));
        outbox.send(fail(ErrorCode::InvalidTopic, &text, message.topic.clone())).await;
        return;
    }
    // A CALL is 8 bytes longer than its REQUEST: one that fits only as a REQUEST could not be
    // written to any responder.
    let max = shared.config.max_frame_size;
    if message.frame_size() > max {
        deferred.wake_all();
        let text =
            format!("the request's CALL would be {} bytes, over the limit of {max}", message.frame_size());
        outbox.send(fail(ErrorCode::FrameTooLarge, &text, message.topic.clone())).await;
        return;
    }
    message.source = id;
    let only = destination(&message, shared);
    let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
    let limit = shared.config.max_requests;
    let topic = message.topic.clone();
    // The router stays read-locked until the request is registered (before the CALLs go out, so
    // that no reply can come first), so that a responder cannot disconnect in between unnoticed:
    // its cleanup takes the write lock, then fails what it owes.
    let (targets, registered) = {
        let router = shared.router();
        let (targets, first_wins) = match only {
            Some(only) => {
                let native = router.select_responders(&message.topic, message.key, only, all);
                if native.is_empty() {
                    // NATS services answer requests through plain subscriptions, all of which
                    // see the request; the first reply wins (unless all are wanted).
                    let nats = router.nats_responders(&message.topic, message.key, only);
                    let several = nats.len() > 1;
                    (nats, several && !all)
                } else {
                    (native, false)
                }
            }
            None => (crate::router::Targets::new(), false),
        };
        let registered = (!targets.is_empty()).then(|| {
            let request = NewRequest {
                reply_to: ReplyTo::Conn(outbox.clone()),
                topic: topic.clone(),
                responders: targets.iter().map(|t| t.conn).collect(),
                timeout,
                first_wins,
            };
            shared.requests().insert(id, req_id, request, limit)
        });
        (targets, registered)
    };
    if !matches!(registered, Some(Ok(()))) {
        deferred.wake_all();
    }
    match registered {
        None => {
            shared.stats.no_responders.inc();
            let text = format!("no responders for {:?}", shown(&message.topic));
            outbox.send(fail(ErrorCode::NoResponders, &text, topic)).await;
            return;
        }
        Some(Err(_)) => {
            let text = format!(
                "more than {limit} requests of this client, or {} on the broker, in flight",
                crate::requests::MAX_PENDING
            );
            outbox.send(fail(ErrorCode::TooManyRequests, &text, topic)).await;
            return;
        }
        Some(Ok(())) => {}
    }
    // A responder behind a route to a broker that cannot read the request answers at once with
    // FrameTooLarge, rather than never getting it and leaving the requester to its timeout.
    let (targets, unreachable): (crate::router::Targets, crate::router::Targets) =
        targets.into_iter().partition(|t| t.outbox.can_carry(&message));
    for t in &unreachable {
        let text = "the request is larger than the responder's broker accepts";
        let reply = crate::requests::refusal(req_id, ErrorCode::FrameTooLarge, 0, topic.clone(), text);
        // A first-wins request goes on while another responder may answer.
        if let Some(replied) = shared.requests().undelivered(id, t.conn, reply) {
            crate::requests::settle(replied, shared);
        }
    }
    deferred.hold(|| {
        // The REQUEST's box carries the first CALL; the last CALL takes the message itself.
        let mut spare = Some(frame);
        let mut message = Some(message);
        let n = targets.len();
        for (i, t) in targets.into_iter().enumerate() {
            let message = if i + 1 == n { message.take() } else { message.clone() };
            let mut call =
                Call { id: req_id, sid: t.sid, timeout_ms, message: message.expect("until the last") };
            if t.outbox.is_route() {
                // The responder's broker finds it by the destination id.
                call.message.destination = t.conn;
            }
            if !t.outbox.push(Outbound::boxed(spare.take(), Frame::Call(call))) {
                // Answered for the responder at once: one kept under the Drop policy would
                // never see the request, and its requester would wait out the timeout.
                debug!(responder = t.conn, "request not delivered");
                crate::requests::refuse_undelivered(shared, (id, req_id), t.conn, &t.outbox, &topic);
            }
        }
    });
}

/// Owns the write half: batches queued frames into one buffer per write.
pub(crate) async fn write_loop(
    mut wr: WriteHalf,
    mut rx: crate::queue::Receiver<Outbound>,
    control: Arc<Control>,
    max: usize,
    mut encoder: impl Encoder,
) {
    // Grows to what the connection needs (up to about WRITE_BATCH), so idle ones stay small.
    let mut buf = BytesMut::new();
    let mut written = 0;
    let killed = control.kill.cancelled();
    tokio::pin!(killed);
    'run: loop {
        // The queue first: the kill future (a lock to poll) only when there is nothing to write.
        let first = tokio::select! {
            biased;
            next = rx.recv() => next,
            () = &mut killed => break 'run,
        };
        if control.is_killed() {
            break 'run;
        }
        let Some(first) = first else { break 'run };
        let mut tally = Tally::default();
        let mut closing = encode(&mut buf, first, max, &mut tally, &mut encoder);
        while !closing && buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Some(next) => closing = encode(&mut buf, next, max, &mut tally, &mut encoder),
                None => break,
            }
        }
        tally.settle(&control);
        written = 0;
        while written < buf.len() {
            tokio::select! {
                biased;
                () = &mut killed => break 'run,
                r = wr.write(&buf[written..]) => match r {
                    Ok(0) | Err(_) => { control.stop(); return; }
                    Ok(n) => written += n,
                }
            }
        }
        buf.clear();
        written = 0;
        if closing {
            break;
        }
    }
    // Killed (or closing): finish the frame in flight so the stream stays parseable, add the
    // reason, and give the peer a short grace to take them.
    let reason = control.reason.lock().unwrap_or_else(PoisonError::into_inner).take();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        wr.write_all(&buf[written..]).await?;
        if let Some(reason) = reason {
            let mut tail = BytesMut::new();
            encoder.encode(&mut tail, Outbound::Close(reason), max);
            wr.write_all(&tail).await?;
        }
        wr.shutdown().await
    })
    .await;
    control.stop();
}

/// How a connection's protocol puts outbound items into bytes.
pub(crate) trait Encoder: Send + 'static {
    /// Appends `out` to `buf`; true when it was a closing error.
    fn encode(&mut self, buf: &mut BytesMut, out: Outbound, max: usize) -> bool;
}

/// The native "eb" protocol.
#[derive(Debug)]
pub(crate) struct Native;

impl Encoder for Native {
    fn encode(&mut self, buf: &mut BytesMut, out: Outbound, max: usize) -> bool {
        let (result, closing) = match out {
            Outbound::Msg { sid, msg } => (frame::encode_msg(buf, sid, &msg, max), false),
            Outbound::Frame(f) => (f.encode(buf, max), false),
            Outbound::Close(e) => (Frame::Error(e).encode(buf, max), true),
            Outbound::Nats(_) => (Ok(()), false),
            Outbound::Route(r) => (encode_route(buf, r, max), false),
        };
        if let Err(e) = result {
            // Only a frame that grew past the limit on the way can fail here; skip it, keep going.
            warn!(error = %e, "dropping an outbound frame that cannot be encoded");
        }
        closing
    }
}

/// Encodes what only routes carry: native frames whose header ids name the client concerned.
fn encode_route(buf: &mut BytesMut, out: crate::router::RouteOut, max: usize) -> Result<(), FrameError> {
    use crate::router::RouteOut;
    let start = buf.len();
    let (source, destination) = match out {
        RouteOut::Sub { conn, sub } => {
            Frame::Sub(*sub).encode(buf, max)?;
            (conn, 0)
        }
        RouteOut::Unsub { conn, sid } => {
            Frame::Unsub { sid }.encode(buf, max)?;
            (conn, 0)
        }
        RouteOut::Service { conn, name } => {
            // A HELLO on an established route: the client's service registration.
            let properties = [(SERVICE_PROPERTY, name)].into_iter().collect();
            Frame::Hello(busbar_core::Hello { name: "".into(), properties }).encode(buf, max)?;
            (conn, 0)
        }
        RouteOut::Nats { conn } => {
            let properties = [(NATS_CLIENT_PROPERTY, "1")].into_iter().collect();
            Frame::Hello(busbar_core::Hello { name: "".into(), properties }).encode(buf, max)?;
            (conn, 0)
        }
        RouteOut::Msg { target, sid, msg } => {
            frame::encode_msg(buf, sid, &msg, max)?;
            (msg.source, target)
        }
        RouteOut::Snapshot(items) => {
            for item in items {
                if let Err(e) = encode_route(buf, item, max) {
                    warn!(error = %e, "dropping a subscription the peer cannot read");
                }
            }
            return Ok(());
        }
    };
    frame::set_ids(&mut buf[start..], source, destination);
    Ok(())
}

/// What a batch of encoded items takes off the connection's budget and adds to its traffic:
/// settled once per batch, not per item (these counters are shared with the readers that
/// queue for this connection, so each update is a contended cache line).
#[derive(Debug, Default)]
struct Tally {
    items: usize,
    bytes: usize,
    msgs: u64,
    msg_bytes: u64,
}

impl Tally {
    fn settle(&mut self, control: &Control) {
        if self.items > 0 {
            control.pending_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
            let before = control.pending_frames.fetch_sub(self.items, Ordering::Relaxed);
            if before - self.items < DETACH_AFTER {
                control.caught_up();
            }
        }
        if self.msgs > 0 {
            control.msgs_out.fetch_add(self.msgs, Ordering::Relaxed);
            control.bytes_out.fetch_add(self.msg_bytes, Ordering::Relaxed);
        }
        *self = Tally::default();
    }
}

/// Encodes one outbound item and counts it in `tally`; true when it was a closing error.
fn encode(
    buf: &mut BytesMut,
    out: Outbound,
    max: usize,
    tally: &mut Tally,
    encoder: &mut impl Encoder,
) -> bool {
    let size = out.size();
    tally.items += 1;
    tally.bytes += size;
    if let Outbound::Msg { .. } | Outbound::Route(crate::router::RouteOut::Msg { .. }) = &out {
        // For a message, its budget size is its frame size.
        tally.msgs += 1;
        tally.msg_bytes += size as u64;
    }
    encoder.encode(buf, out, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_fit_past_a_queue_that_messages_filled() {
        let config =
            crate::Config { max_pending: 2, slow_consumer: SlowConsumerPolicy::Drop, ..Default::default() };
        let control = Arc::new(Control::new(&config, Arc::default(), Link::Client));
        let (tx, mut rx) = crate::queue::queue();
        let outbox = Outbox::with_control(tx, control.clone());
        let msg = Arc::new(Message::new("a", "x"));
        assert!(outbox.deliver(1, &msg) && outbox.deliver(1, &msg));
        assert!(!outbox.deliver(1, &msg), "messages stop at the bound");
        assert_eq!(control.dropped.load(Ordering::Relaxed), 1);
        // The client's own answer still goes in at once, under the drop policy as well.
        let sent =
            tokio::time::timeout(Duration::from_secs(1), outbox.send(Outbound::frame(Frame::Pong))).await;
        assert_eq!(sent, Ok(true));
        assert!(!control.is_killed());
        let mut n = 0;
        while rx.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn shutdown_never_waits_for_a_full_queue() {
        let config =
            crate::Config { max_pending: 1, slow_consumer: SlowConsumerPolicy::Drop, ..Default::default() };
        let control = Arc::new(Control::new(&config, Arc::default(), Link::Client));
        let (tx, mut rx) = crate::queue::queue();
        let outbox = Outbox::with_control(tx, control.clone());
        // Room: the close goes last in the queue, after what is there.
        let msg = Arc::new(Message::new("a", "x"));
        assert!(outbox.deliver(1, &msg));
        outbox.close_now(error(ErrorCode::ShuttingDown, 0, "bye"));
        assert!(!control.is_killed());
        assert!(matches!(rx.try_recv(), Some(Outbound::Msg { .. })));
        assert!(matches!(rx.try_recv(), Some(Outbound::Close(_))));
        // Full past the answer slack too: closed at once, the reason kept for the writer, and
        // under either policy neither a slow consumer nor a dropped message.
        for policy in [SlowConsumerPolicy::Drop, SlowConsumerPolicy::Disconnect] {
            let counters = Arc::new(crate::server::Counters::default());
            let config = crate::Config { max_pending: 1, slow_consumer: policy, ..Default::default() };
            let control = Arc::new(Control::new(&config, counters.clone(), Link::Client));
            let (tx, _rx) = crate::queue::queue();
            let outbox = Outbox::with_control(tx, control.clone());
            for _ in 0..=ANSWER_SLACK_ITEMS {
                control.add_pending(8);
            }
            outbox.close_now(error(ErrorCode::ShuttingDown, 0, "bye"));
            assert!(control.is_killed());
            let reason = control.reason.lock().unwrap().clone();
            assert_eq!(reason.map(|r| r.code), Some(ErrorCode::ShuttingDown), "{policy:?}");
            assert_eq!((counters.slow_consumers.get(), counters.dropped.get()), (0, 0), "{policy:?}");
        }
    }

    #[tokio::test]
    async fn a_slow_consumer_is_counted_once_however_it_is_found() {
        let counters = Arc::new(crate::server::Counters::default());
        let config = crate::Config { max_pending: 1, max_pending_bytes: 1024, ..Default::default() };
        let control = Arc::new(Control::new(&config, counters.clone(), Link::Client));
        let (tx, _rx) = crate::queue::queue();
        let outbox = Outbox::with_control(tx, control.clone());
        let msg = Arc::new(Message::new("a", "x"));
        assert!(outbox.deliver(1, &msg));
        // Found full by several publishers, then by an answer too large for its bound.
        assert!(!outbox.deliver(1, &msg) && !outbox.deliver(1, &msg));
        let huge = Frame::Error(error(ErrorCode::HandlerError, 0, "x".repeat(4096)));
        assert!(!outbox.send(Outbound::frame(huge)).await);
        assert!(control.is_killed());
        assert_eq!(counters.slow_consumers.get(), 1);
        // Closed by `send` first: counted there.
        let control = Arc::new(Control::new(&config, counters.clone(), Link::Client));
        let (tx, _rx) = crate::queue::queue();
        let outbox = Outbox::with_control(tx, control.clone());
        let huge = Frame::Error(error(ErrorCode::HandlerError, 0, "x".repeat(4096)));
        assert!(!outbox.send(Outbound::frame(huge)).await);
        assert!(outbox.deliver(1, &msg) && !outbox.deliver(1, &msg));
        assert_eq!(counters.slow_consumers.get(), 2);
    }
}
