//! The NATS client protocol on a second listener: NATS clients in any language publish, subscribe
//! and request on the same router as native clients.
//!
//! ```text
//!  socket ─► INFO ─► [TLS] ─► read loop: busbar_core::nats::parse ─► Router / Requests
//!                                 ▲ auto-unsubscribe (max_msgs reached)     │ push
//!                                 │                                         ▼
//!                            NatsEncoder (in the write task) ◄── Outbox (the same as native)
//! ```
//!
//! How the two protocols meet:
//! - Subjects are topics; SUB is an event subscription; a queue group is a busbar group (it adopts
//!   the policy of a group of that name that exists, else random, as NATS does).
//! - A reply subject travels in the envelope as the `:reply` header; NATS headers are envelope
//!   headers, and the envelope's id, transaction id and time are shown as `Busbar-Id`,
//!   `Busbar-Tx` and `Busbar-Time` headers (and read back from them).
//! - A PUB with a reply subject is also a request to native responders on that subject: their
//!   REPLY is routed to the reply subject.
//! - A native request that no native responder serves goes to the matching NATS subscriptions as
//!   a MSG whose reply subject is `_BUSBAR.R.<requester>.<request id>`; a PUB there is the REPLY.
//!   Only a connection the request was sent to can answer it.
//! - No responders: a client that asked for it (`headers` and `no_responders` in CONNECT) gets an
//!   `HMSG` with status `NATS/1.0 503` on its reply subject when nobody took the request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use busbar_core::id::{format_id, parse_id};
use busbar_core::nats::{self as proto, ClientOp, Limits};
use busbar_core::{
    ByteString, Call, Envelope, ErrorCode, ErrorFrame, Frame, GroupPolicy, Headers, Message, Reply, SubKind,
    validate_pattern, validate_topic,
};
use bytes::{Buf, Bytes, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::FastMap;
use crate::auth::Permissions;
use crate::requests::{NewRequest, ReplyTo};
use crate::server::{ConnMeta, Shared};
use crate::session::{self, Control, Encoder, Outbound, Outbox, ReadHalf, WriteHalf, error, shown};

/// Header of the envelope that carries a NATS reply subject.
pub(crate) const REPLY_HEADER: &str = ":reply";
/// Header of the envelope that carries a NATS status code (503: no responders).
const STATUS_HEADER: &str = ":status";
/// Reply subjects of native requests sent to NATS subscribers: `_BUSBAR.R.<requester>.<id>`,
/// and `_BUSBAR.R.<requester>.<id>.<topic>` when the requester is another broker's client (the
/// topic is what this broker checks the responder's permission on, and what the requester's
/// broker checks against the request's own).
const REPLY_PREFIX: &str = "_BUSBAR.R.";
/// Subjects reserved for the broker: clients may not use them as reply subjects.
const RESERVED: &str = "_BUSBAR.";
const ID_HEADER: &str = "Busbar-Id";
const TX_HEADER: &str = "Busbar-Tx";
const TIME_HEADER: &str = "Busbar-Time";
/// How long a NATS request waits for a native responder (NATS requests carry no timeout; the
/// client gives up by itself, this only bounds the broker's table).
const NATS_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Sids the client named with something other than a number get ids from here up.
const NAMED_SIDS: u64 = 1 << 63;
/// The NATS server's default control line limit.
const MAX_CONTROL_LINE: usize = 4096;

/// What a NATS session queues for its writer besides messages.
#[derive(Debug)]
pub(crate) enum NatsOut {
    /// Bytes written as they are: `+OK`, `-ERR`, `PING`, `PONG`.
    Raw(&'static [u8]),
    /// An `-ERR` that does not close the connection.
    Err(String),
    /// The client reads headers (HMSG): from its CONNECT.
    Headers(bool),
    /// The client named subscription `sid` with this text (a sid that is not a number).
    Name { sid: u64, name: Arc<str> },
    /// Deliver at most `max` messages in total on `sid`, then unsubscribe it.
    Limit { sid: u64, max: u64 },
    /// `sid` is unsubscribed and nothing more is queued for it: forget what is kept for it.
    Forget(u64),
}

impl NatsOut {
    pub(crate) fn size(&self) -> usize {
        match self {
            NatsOut::Raw(b) => b.len(),
            NatsOut::Err(text) => 16 + text.len(),
            _ => 32,
        }
    }
}

/// The largest payload a NATS client may send: what still fits a native frame with the longest
/// subject and reply subject a control line can hold.
pub(crate) fn max_payload(max_frame_size: usize) -> usize {
    max_frame_size.saturating_sub(2 * MAX_CONTROL_LINE + 256).max(1)
}

/// The options of CONNECT this server uses (others are accepted and ignored).
#[derive(Debug, Deserialize)]
#[serde(default)]
struct ConnectOptions {
    verbose: bool,
    echo: bool,
    headers: bool,
    no_responders: bool,
    name: Option<String>,
    lang: Option<String>,
    user: Option<String>,
    pass: Option<String>,
    auth_token: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            // nats-server's defaults: a bare `CONNECT {}` is verbose (and pedantic, which
            // this server always is) and echoes.
            verbose: true,
            echo: true,
            headers: false,
            no_responders: false,
            name: None,
            lang: None,
            user: None,
            pass: None,
            auth_token: None,
        }
    }
}

/// An accepted NATS connection: INFO, TLS when the listener has it, then the session.
pub(crate) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    id: u32,
    shared: Arc<Shared>,
    tls: Option<(tokio_rustls::TlsAcceptor, bool)>,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    // Opening and session boxed apart: the task's future stays small, and the session does not
    // carry room for the TLS handshake all its life.
    let opened = Box::pin(open(stream, peer, id, &shared, tls, deadline)).await;
    if let Some((rd, wr, identity)) = opened {
        Box::pin(run(rd, wr, peer, id, identity, deadline, shared)).await;
    }
}

/// INFO, then TLS when the listener has it: the connection's halves and the client
/// certificate's name, or None when it ends here.
async fn open(
    mut stream: TcpStream,
    peer: SocketAddr,
    id: u32,
    shared: &Shared,
    tls: Option<(tokio_rustls::TlsAcceptor, bool)>,
    deadline: tokio::time::Instant,
) -> Option<(ReadHalf, WriteHalf, Option<String>)> {
    let mut info = Vec::new();
    proto::write::info(&mut info, &info_json(shared, id, peer, tls.as_ref().map(|t| t.1)));
    if tokio::time::timeout_at(deadline, stream.write_all(&info)).await.is_err() {
        return None;
    }
    let Some((acceptor, required)) = tls else {
        let (rd, wr) = stream.into_split();
        return Some((Box::new(rd), Box::new(wr), None));
    };
    // A NATS client upgrades after INFO; its first byte tells whether it does.
    session::open_tls(stream, shared, acceptor, required, deadline, true).await
}

fn info_json(shared: &Shared, id: u32, peer: SocketAddr, tls_required: Option<bool>) -> String {
    let addr = shared.config.nats_listen.unwrap_or(shared.config.listen);
    serde_json::json!({
        "server_id": shared.server_id,
        "server_name": shared.config.server_name,
        "version": env!("CARGO_PKG_VERSION"),
        "proto": 1,
        "go": "busbar",
        "host": addr.ip().to_string(),
        "port": addr.port(),
        "headers": true,
        "max_payload": max_payload(shared.config.max_frame_size),
        "client_id": id,
        "client_ip": peer.ip().to_string(),
        "auth_required": shared.config.auth.required(),
        "tls_required": tls_required.unwrap_or(false),
        "tls_available": tls_required.is_some(),
        "connect_urls": shared.cluster.as_ref().map(|c| c.connect_urls(true)).unwrap_or_default(),
    })
    .to_string()
}

async fn run(
    mut rd: ReadHalf,
    wr: WriteHalf,
    peer: SocketAddr,
    id: u32,
    tls_identity: Option<String>,
    deadline: tokio::time::Instant,
    shared: Arc<Shared>,
) {
    let (tx, rx) = crate::queue::queue();
    let control = Arc::new(Control::new(&shared.config, shared.stats.clone(), session::Link::Nats));
    let outbox = Outbox::with_control(tx, control.clone());
    // One message per subscription that reaches its max_msgs, at most: bounded by the
    // subscription limit.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let encoder = NatsEncoder {
        headers: false,
        names: FastMap::default(),
        subs: FastMap::default(),
        done: done_tx,
        block: BytesMut::new(),
        node: shared.cluster.as_ref().map(|c| c.node()),
    };
    let writer = tokio::spawn(session::write_loop(wr, rx, control.clone(), usize::MAX, encoder));
    let limits =
        Limits { max_control_line: MAX_CONTROL_LINE, max_payload: max_payload(shared.config.max_frame_size) };
    let mut conn = Conn {
        id,
        peer,
        shared: &shared,
        outbox: outbox.clone(),
        options: ConnectOptions::default(),
        perms: None,
        tls_identity,
        deadline,
        named: FastMap::default(),
        next_named: NAMED_SIDS,
        next_request: 0,
    };

    let mut heartbeat = session::Heartbeat::new(&shared.config);
    let mut buf = BytesMut::with_capacity(4096);
    let stopping = shared.shutdown.cancelled();
    tokio::pin!(stopping);
    'session: loop {
        let mut at = 0;
        loop {
            match proto::parse(&buf[at..], &limits) {
                Ok(Some((op, used))) => {
                    at += used;
                    heartbeat.heard();
                    if let Err(fatal) = conn.apply(op).await {
                        control.fail(fatal);
                        break 'session;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "malformed NATS operation, closing connection");
                    let code = match e {
                        proto::NatsError::PayloadTooLarge => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::MalformedFrame,
                    };
                    control.fail(error(code, 0, e.to_string()));
                    break 'session;
                }
            }
        }
        buf.advance(at);
        buf.reserve(4096);
        let handshaking = conn.perms.is_none();
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) => break,
                // Any bytes are a sign of life, as at nats-server: a large payload trickling in
                // slowly is not a stale connection.
                Ok(_) => heartbeat.heard(),
                Err(e) => {
                    debug!(error = %e, "read failed");
                    break;
                }
            },
            Some(done) = done_rx.recv() => match done {
                Done::Limit(sid) => conn.unsubscribe_now(sid).await,
                Done::Undelivered { requester, id, topic } => conn.refuse_call(requester, id, topic),
            },
            () = heartbeat.tick(), if !heartbeat.off() => {
                if let Err(idle) = heartbeat.check(&outbox) {
                    warn!(?idle, "no operation within the heartbeat limit, closing connection");
                    control.fail(error(ErrorCode::StaleConnection, 0, "Stale Connection"));
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline), if handshaking && shared.config.auth.required() => {
                control.fail(error(ErrorCode::HandshakeTimeout, 0, "Authentication Timeout"));
                break;
            }
            () = control.killed() => break,
            () = &mut stopping => {
                outbox.close_now(error(ErrorCode::ShuttingDown, 0, "server shutting down"));
                break;
            }
        }
    }
    let registered = conn.perms.is_some();
    drop(conn);
    session::finish(&shared, id, registered, outbox, writer).await;
    debug!(%peer, "NATS connection closed");
}

/// One NATS connection's state in its read loop.
struct Conn<'a> {
    id: u32,
    peer: SocketAddr,
    shared: &'a Shared,
    outbox: Outbox,
    options: ConnectOptions,
    /// Set once the client is admitted (CONNECT, or any operation when no authentication is
    /// required).
    perms: Option<Arc<Permissions>>,
    tls_identity: Option<String>,
    deadline: tokio::time::Instant,
    /// Sids the client named with text, and the ids they stand for.
    named: FastMap<Box<str>, u64>,
    next_named: u64,
    next_request: u64,
}

impl Conn<'_> {
    /// Applies one operation; `Err` closes the connection with that error.
    async fn apply(&mut self, op: ClientOp<'_>) -> Result<(), ErrorFrame> {
        if let ClientOp::Connect(json) = op {
            return self.connect(json).await;
        }
        if self.perms.is_none() {
            if self.shared.config.auth.required() {
                return Err(error(ErrorCode::AuthenticationFailed, 0, "Authorization Violation"));
            }
            self.admit(Arc::new(self.shared.config.auth.default_permissions.clone()));
        }
        match op {
            ClientOp::Connect(_) => {}
            ClientOp::Ping => {
                self.raw(b"PONG\r\n").await;
            }
            ClientOp::Pong => {}
            ClientOp::Pub { subject, reply, payload } => self.publish(subject, reply, None, payload).await?,
            ClientOp::Hpub { subject, reply, headers, payload } => {
                self.publish(subject, reply, Some(headers), payload).await?;
            }
            ClientOp::Sub { subject, queue, sid } => self.subscribe(subject, queue, sid).await?,
            ClientOp::Unsub { sid, max } => self.unsubscribe(sid, max).await,
        }
        Ok(())
    }

    async fn raw(&self, bytes: &'static [u8]) {
        self.outbox.send(Outbound::Nats(NatsOut::Raw(bytes))).await;
    }

    async fn ok(&self) {
        if self.options.verbose {
            self.raw(b"+OK\r\n").await;
        }
    }

    /// An error that keeps the connection open.
    async fn err(&self, text: String) {
        self.outbox.send(Outbound::Nats(NatsOut::Err(text))).await;
    }

    /// A permission violation: answered, and fatal only when so configured.
    async fn denied(&self, text: String) -> Result<(), ErrorFrame> {
        self.shared.stats.permission_denied.inc();
        if self.shared.config.auth.disconnect_on_violation {
            return Err(error(ErrorCode::PermissionDenied, 0, text));
        }
        self.err(text).await;
        Ok(())
    }

    async fn connect(&mut self, json: &str) -> Result<(), ErrorFrame> {
        let options: ConnectOptions = serde_json::from_str(json.trim())
            .map_err(|e| error(ErrorCode::MalformedFrame, 0, format!("Invalid CONNECT: {e}")))?;
        if self.perms.is_none() {
            let mut properties = Headers::new();
            let fields =
                [("user", &options.user), ("password", &options.pass), ("token", &options.auth_token)];
            for (key, value) in fields {
                if let Some(value) = value {
                    properties.insert(key, value.as_str());
                }
            }
            let identity = self.tls_identity.take();
            let Some(perms) = session::authenticate(self.shared, properties, identity, self.deadline).await
            else {
                self.shared.stats.auth_failures.inc();
                warn!(client = options.name.as_deref().unwrap_or(""), "NATS authentication failed");
                return Err(error(ErrorCode::AuthenticationFailed, 0, "Authorization Violation"));
            };
            self.options = options;
            self.admit(Arc::new(perms));
        } else {
            // A second CONNECT changes options, not who the client is.
            self.options = options;
        }
        self.outbox.control().no_echo.store(!self.options.echo, Ordering::Relaxed);
        self.outbox.send(Outbound::Nats(NatsOut::Headers(self.options.headers))).await;
        self.ok().await;
        Ok(())
    }

    fn admit(&mut self, perms: Arc<Permissions>) {
        let name = self.options.name.clone().unwrap_or_default();
        tracing::Span::current().record("name", name.as_str());
        info!(lang = self.options.lang.as_deref(), "NATS client connected");
        let meta = ConnMeta {
            name,
            protocol: "nats",
            service: None,
            addr: self.peer,
            since: std::time::SystemTime::now(),
            control: self.outbox.control().clone(),
        };
        self.shared.conns().insert(self.id, meta);
        self.shared.router_mut().add_connection(self.id, None, self.outbox.clone());
        self.perms = Some(perms);
    }

    fn perms(&self) -> &Permissions {
        self.perms.as_deref().expect("admitted before any operation is applied")
    }

    async fn publish(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), ErrorFrame> {
        let mut message = Message::new(subject, Bytes::copy_from_slice(payload));
        if let Some(block) = headers {
            let Some(block) = proto::headers::parse(block) else {
                return Err(error(ErrorCode::MalformedFrame, 0, "Invalid Headers"));
            };
            message.headers = read_headers(&block.pairs, &mut message.envelope);
        }
        message.source = self.id;
        session::count_in(&self.outbox, &message);
        if let Some(rest) = subject.strip_prefix(REPLY_PREFIX) {
            self.reply(rest, message);
            self.ok().await;
            return Ok(());
        }
        let bad_reply = |r: &str| validate_topic(r).is_err() || r.starts_with(RESERVED);
        if validate_topic(subject).is_err() || reply.is_some_and(bad_reply) {
            self.err("Invalid Publish Subject".into()).await;
            return Ok(());
        }
        if !self.perms().publish.permits_topic(subject) {
            return self.denied(format!("Permissions Violation for Publish to {:?}", shown(subject))).await;
        }
        if let Some(reply) = reply {
            message.headers.insert(REPLY_HEADER, reply);
        }
        // Before the message is routed, as the NATS server does: a verbose client subscribed to
        // its own subject sees +OK, then MSG.
        self.ok().await;
        let message = Arc::new(message);
        let shared = self.shared;
        let mut taken = shared.router().route(&message, None);
        shared.stats.deliveries.add(taken as u64);
        if let Some(reply) = reply {
            taken += self.request_native(&message, reply);
            if taken == 0 {
                shared.stats.no_responders.inc();
                if self.options.no_responders && self.options.headers {
                    // To this client only, on its own subscription to the reply subject.
                    let mut status = Message::new(reply, Bytes::new());
                    status.headers.insert(STATUS_HEADER, "503");
                    shared.router().route(&Arc::new(status), Some(self.id));
                }
            }
        }
        Ok(())
    }

    /// A PUB with a reply subject, sent as a request to the native responders on its subject;
    /// returns how many it went to.
    fn request_native(&mut self, message: &Arc<Message>, reply: &str) -> usize {
        let shared = self.shared;
        self.next_request += 1;
        let id = self.next_request;
        let targets = {
            let router = shared.router();
            let targets = router.select_responders(&message.topic, message.key, None, false);
            if targets.is_empty() {
                return 0;
            }
            let request = NewRequest {
                reply_to: ReplyTo::Subject(reply.into()),
                topic: message.topic.clone(),
                responders: targets.iter().map(|t| t.conn).collect(),
                timeout: NATS_REQUEST_TIMEOUT,
                first_wins: false,
            };
            if shared.requests().insert(self.id, id, request, shared.config.max_requests).is_err() {
                debug!("too many NATS requests in flight; not sent to native responders");
                return 0;
            }
            targets
        };
        shared.stats.requests.inc();
        let timeout_ms = NATS_REQUEST_TIMEOUT.as_millis() as u32;
        for t in &targets {
            let mut inner = Message::clone(message);
            inner.headers = without_internal(&message.headers);
            if t.outbox.is_route() {
                // The responder's broker finds it by the destination id.
                inner.destination = t.conn;
            }
            let call = Call { id, sid: t.sid, timeout_ms, message: inner };
            if !t.outbox.deliver_frame(Frame::Call(call)) {
                // Answered for the responder (with a Busbar-Error header), not left to time out.
                crate::requests::refuse_undelivered(shared, (self.id, id), t.conn, &t.outbox, &message.topic);
            }
        }
        targets.len()
    }

    /// A PUB to `_BUSBAR.R.<requester>.<id>[.<topic>]`: the reply to a native request.
    fn reply(&self, rest: &str, mut message: Message) {
        let parsed = rest.split_once('.').and_then(|(r, rest)| {
            let (id, topic) = rest.split_once('.').map_or((rest, None), |(i, t)| (i, Some(t)));
            Some((r.parse::<u32>().ok()?, id.parse::<u64>().ok()?, topic))
        });
        let Some((requester, id, topic)) = parsed else {
            self.shared.stats.late_replies.inc();
            return;
        };
        let perms = self.perms();
        let may_reply = |topic: &str| {
            let ok = perms.allow_responses || perms.publish.permits_topic(topic);
            if !ok {
                self.shared.stats.permission_denied.inc();
            }
            ok
        };
        if crate::cluster::is_remote(self.shared, requester) {
            // The request is kept by the requester's broker, which accepts the reply only from
            // a responder it asked and only when the topic named is the request's.
            let Some(topic) = topic.filter(|t| validate_topic(t).is_ok()) else {
                self.shared.stats.late_replies.inc();
                return;
            };
            message.topic = topic.into();
            message.destination = requester;
            let reply = Reply { id, error: None, remaining: 0, message };
            crate::cluster::reply_to_peer(self.shared, self.id, reply, Some(perms));
            return;
        }
        let reply = Reply { id, error: None, remaining: 0, message };
        let replied = self.shared.requests().reply(requester, self.id, reply, None, may_reply);
        crate::requests::settle(replied, self.shared);
    }

    async fn subscribe(
        &mut self,
        subject: &str,
        queue: Option<&str>,
        sid_text: &str,
    ) -> Result<(), ErrorFrame> {
        if validate_pattern(subject).is_err() {
            self.err("Invalid Subject".into()).await;
            return Ok(());
        }
        // Queue names are busbar group names, which follow the topic rules.
        if queue.is_some_and(|q| validate_topic(q).is_err()) {
            self.err("Invalid Queue Name".into()).await;
            return Ok(());
        }
        let perms = self.perms();
        if !perms.subscribe.permits_pattern(subject) || queue.is_some_and(|q| !perms.groups.permits_topic(q))
        {
            // nats-server's texts: clients match the subject and queue to flag the subscription.
            let text = match queue {
                Some(q) => format!(
                    "Permissions Violation for Subscription to {:?} using queue {:?}",
                    shown(subject),
                    shown(q)
                ),
                None => format!("Permissions Violation for Subscription to {:?}", shown(subject)),
            };
            return self.denied(text).await;
        }
        let mut named = false;
        let sid = match numeric_sid(sid_text) {
            Some(n) => n,
            None => match self.named.get(sid_text) {
                Some(&sid) => sid,
                None => {
                    // Named before any message for it can be queued; taken back if refused.
                    let sid = self.next_named;
                    self.next_named += 1;
                    self.named.insert(sid_text.into(), sid);
                    self.outbox.send(Outbound::Nats(NatsOut::Name { sid, name: sid_text.into() })).await;
                    named = true;
                    sid
                }
            },
        };
        let shared = self.shared;
        let result = {
            let mut router = shared.router_mut();
            let group =
                queue.map(|q| (ByteString::from(q), router.group_policy(q).unwrap_or(GroupPolicy::Random)));
            let limit = shared.config.max_subscriptions;
            router.subscribe(self.id, sid, subject.into(), group, SubKind::Events, self.outbox.clone(), limit)
        };
        if result.is_err() && named {
            self.named.remove(sid_text);
            self.outbox.send(Outbound::Nats(NatsOut::Forget(sid))).await;
        }
        match result {
            Ok(()) => self.ok().await,
            Err(crate::router::SubError::Limit) => self.err("Maximum Subscriptions Exceeded".into()).await,
            // nats-server takes a SUB with a sid in use without a word (clients close on an
            // -ERR they do not know): the first subscription stays.
            Err(e) => debug!(sid = sid_text, ?e, "SUB not taken"),
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, sid_text: &str, max: Option<u64>) {
        let sid = numeric_sid(sid_text).or_else(|| self.named.get(sid_text).copied());
        // Unknown sids are ignored, as nats-server does (and nothing is kept for them).
        if let Some(sid) = sid.filter(|&sid| self.shared.router().has_subscription(self.id, sid)) {
            match max {
                // The writer counts deliveries and tells the read loop when to unsubscribe.
                Some(max) if max > 0 => {
                    self.outbox.send(Outbound::Nats(NatsOut::Limit { sid, max })).await;
                }
                _ => self.unsubscribe_now(sid).await,
            }
        }
        self.ok().await;
    }

    /// Answers request `id` of `requester` for this client, whose subscription reached its
    /// `max_msgs` before the CALL could be written: ResponderLost, here or over the route to
    /// the requester's broker.
    fn refuse_call(&self, requester: u32, id: u64, topic: ByteString) {
        let text = "the responder unsubscribed before it replied";
        let mut reply = crate::requests::refusal(id, ErrorCode::ResponderLost, 0, topic, text);
        if crate::cluster::is_remote(self.shared, requester) {
            reply.message.destination = requester;
            crate::cluster::reply_to_peer(self.shared, self.id, reply, None);
        } else if let Some(replied) = self.shared.requests().undelivered(requester, self.id, reply) {
            crate::requests::settle(replied, self.shared);
        }
    }

    async fn unsubscribe_now(&mut self, sid: u64) {
        if self.shared.router_mut().unsubscribe(self.id, sid) {
            // Queued after the router stopped delivering to `sid`: nothing for it follows.
            self.outbox.send(Outbound::Nats(NatsOut::Forget(sid))).await;
        }
        if sid >= NAMED_SIDS {
            self.named.retain(|_, &mut s| s != sid);
        }
    }
}

/// A sid written as a plain decimal number (no sign, no leading zero) below [`NAMED_SIDS`]: the
/// number itself. Any other text is a named sid, so that `01` and `1` stay two subscriptions.
fn numeric_sid(text: &str) -> Option<u64> {
    let plain = text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    if !plain {
        return None;
    }
    text.parse::<u64>().ok().filter(|&n| n < NAMED_SIDS)
}

/// Envelope headers from NATS header pairs: `Busbar-*` fill the envelope, the rest are kept.
fn read_headers(pairs: &[(&str, &str)], envelope: &mut Option<Envelope>) -> Headers {
    let mut headers = Headers::new();
    for &(name, value) in pairs {
        if name.eq_ignore_ascii_case(ID_HEADER)
            && let Some(id) = parse_id(value)
        {
            slot(envelope).id = id;
        } else if name.eq_ignore_ascii_case(TX_HEADER)
            && let Some(tx) = parse_id(value)
        {
            slot(envelope).tx = tx;
        } else if name.eq_ignore_ascii_case(TIME_HEADER)
            && let Ok(ns) = value.parse()
        {
            slot(envelope).timestamp_ns = ns;
        } else if !name.starts_with(':') {
            headers.insert(name, value);
        }
    }
    headers
}

fn slot(envelope: &mut Option<Envelope>) -> &mut Envelope {
    envelope.get_or_insert(Envelope { id: 0, tx: 0, timestamp_ns: 0 })
}

/// Headers without the broker's internal ones (`:reply`, `:status`).
fn without_internal(headers: &Headers) -> Headers {
    headers.iter().filter(|(k, _)| *k != REPLY_HEADER && *k != STATUS_HEADER).collect()
}

/// What the writer keeps per subscription: deliveries, and the auto-unsubscribe limit.
#[derive(Debug, Default)]
struct SidState {
    delivered: u64,
    max: Option<u64>,
    /// The limit is reached: later messages are not written.
    closed: bool,
}

/// What the write task tells the read loop.
#[derive(Debug)]
enum Done {
    /// Subscription `sid` reached its `max_msgs`: unsubscribe it.
    Limit(u64),
    /// A CALL came for a subscription past its limit and was not written: its requester is
    /// told at once, not left to its timeout.
    Undelivered { requester: u32, id: u64, topic: ByteString },
}

/// Encodes outbound items as NATS protocol, in the write task.
#[derive(Debug)]
pub(crate) struct NatsEncoder {
    headers: bool,
    names: FastMap<u64, Arc<str>>,
    subs: FastMap<u64, SidState>,
    /// Subscriptions whose limit was reached, for the read loop to unsubscribe, and CALLs not
    /// written for that reason. Bounded: one per subscription, plus what the outbox held.
    done: mpsc::UnboundedSender<Done>,
    /// Scratch space for a header block.
    block: BytesMut,
    /// This broker's node id, in a cluster: a CALL from another node's client gets the long
    /// form of reply subject.
    node: Option<u8>,
}

impl NatsEncoder {
    /// Counts a delivery on `sid`; false when its limit was already reached.
    fn count(&mut self, sid: u64) -> bool {
        let state = self.subs.entry(sid).or_default();
        if state.closed {
            return false;
        }
        state.delivered += 1;
        if state.max.is_some_and(|max| state.delivered >= max) {
            state.closed = true;
            let _ = self.done.send(Done::Limit(sid));
        }
        true
    }

    fn message(&mut self, buf: &mut BytesMut, sid: u64, msg: &Message, reply: Option<&str>) {
        let mut digits = [0u8; 20];
        let sid_text: &str = match self.names.get(&sid) {
            Some(name) => name,
            None => number(&mut digits, sid),
        };
        // A reply subject from a publisher must be a valid subject (it is written raw into the
        // protocol line) and not one of the broker's own (those are only handed out with CALLs).
        let reply = reply.or_else(|| {
            msg.headers.get(REPLY_HEADER).filter(|r| validate_topic(r).is_ok() && !r.starts_with(RESERVED))
        });
        // Only the broker (source 0) sets a status.
        let status =
            msg.headers.get(STATUS_HEADER).filter(|_| msg.source == 0).and_then(|s| s.parse::<u16>().ok());
        let shown = |(k, _): &(&str, &str)| !k.starts_with(':');
        let has_headers = status.is_some() || msg.envelope.is_some() || msg.headers.iter().any(|p| shown(&p));
        if !(self.headers && has_headers) {
            proto::write::msg(buf, &msg.topic, sid_text, reply, &msg.payload);
            return;
        }
        self.block.clear();
        let envelope = msg.envelope.map(|e| (format_id(e.id), format_id(e.tx), e.timestamp_ns.to_string()));
        let extra = envelope.iter().flat_map(|(id, tx, ts)| {
            [(ID_HEADER, id.as_str()), (TX_HEADER, tx.as_str()), (TIME_HEADER, ts.as_str())]
        });
        let status = status.map(|code| (code, if code == 503 { "" } else { "Status" }));
        proto::headers::write(&mut self.block, status, msg.headers.iter().filter(shown).chain(extra));
        proto::write::hmsg(buf, &msg.topic, sid_text, reply, &self.block, &msg.payload);
    }
}

/// `n` in decimal, in `digits`.
fn number(digits: &mut [u8; 20], n: u64) -> &str {
    let mut out = &mut digits[..];
    proto::write::put_number(&mut out, n);
    let len = 20 - out.len();
    std::str::from_utf8(&digits[..len]).unwrap_or("0")
}

impl Encoder for NatsEncoder {
    fn encode(&mut self, buf: &mut BytesMut, out: Outbound, _max: usize) -> bool {
        match out {
            Outbound::Msg { sid, msg } => {
                if self.count(sid) {
                    self.message(buf, sid, &msg, None);
                }
            }
            Outbound::Frame(frame) => match *frame {
                Frame::Call(call) => {
                    let (requester, id) = (call.message.source, call.id);
                    if !self.count(call.sid) {
                        let topic = call.message.topic;
                        let _ = self.done.send(Done::Undelivered { requester, id, topic });
                    } else {
                        let reply = match self.node {
                            Some(own) if crate::router::node_of(requester) != own => {
                                format!("{REPLY_PREFIX}{requester}.{id}.{}", call.message.topic)
                            }
                            _ => format!("{REPLY_PREFIX}{requester}.{id}"),
                        };
                        self.message(buf, call.sid, &call.message, Some(&reply));
                    }
                }
                Frame::Ping => buf.extend_from_slice(b"PING\r\n"),
                Frame::Pong => buf.extend_from_slice(b"PONG\r\n"),
                Frame::Error(e) => proto::write::err(buf, &e.message),
                other => debug!(frame = other.name(), "no NATS form; not sent"),
            },
            Outbound::Close(e) => {
                if let Some(text) = closing_text(&e) {
                    proto::write::err(buf, text);
                }
                return true;
            }
            Outbound::Nats(NatsOut::Raw(bytes)) => buf.extend_from_slice(bytes),
            Outbound::Nats(NatsOut::Err(text)) => proto::write::err(buf, &text),
            Outbound::Nats(NatsOut::Headers(on)) => self.headers = on,
            Outbound::Nats(NatsOut::Name { sid, name }) => {
                self.names.insert(sid, name);
            }
            Outbound::Nats(NatsOut::Limit { sid, max }) => {
                let state = self.subs.entry(sid).or_default();
                state.max = Some(max);
                if state.delivered >= max && !state.closed {
                    state.closed = true;
                    let _ = self.done.send(Done::Limit(sid));
                }
            }
            Outbound::Route(_) => {}
            Outbound::Nats(NatsOut::Forget(sid)) => {
                self.names.remove(&sid);
                self.subs.remove(&sid);
            }
        }
        false
    }
}

/// The standard NATS text of an error that closes the connection; None for a shutdown, which
/// NATS servers do not announce with -ERR.
pub(crate) fn closing_text(e: &ErrorFrame) -> Option<&str> {
    Some(match e.code {
        // Closed without a word, as nats-server does: official clients (nats.go, nats.py) take
        // an -ERR they do not know, 'Slow Consumer' among them, as final and stop reconnecting.
        ErrorCode::ShuttingDown | ErrorCode::SlowConsumer => return None,
        ErrorCode::StaleConnection => "Stale Connection",
        ErrorCode::AuthenticationFailed => "Authorization Violation",
        ErrorCode::HandshakeTimeout => "Authentication Timeout",
        ErrorCode::TlsRequired => "Secure Connection - TLS Required",
        ErrorCode::TooManyConnections => "maximum connections exceeded",
        ErrorCode::FrameTooLarge => "Maximum Payload Violation",
        _ => &e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> (NatsEncoder, mpsc::UnboundedReceiver<Done>) {
        let (done, rx) = mpsc::unbounded_channel();
        (
            NatsEncoder {
                headers: true,
                names: FastMap::default(),
                subs: FastMap::default(),
                done,
                block: BytesMut::new(),
                node: None,
            },
            rx,
        )
    }

    fn msg(sid: u64, message: Message) -> Outbound {
        Outbound::Msg { sid, msg: Arc::new(message) }
    }

    #[test]
    fn messages_become_msg_or_hmsg() {
        let (mut enc, _) = encoder();
        let mut buf = BytesMut::new();
        let mut m = Message::new("a.b", "hi");
        m.headers.insert(REPLY_HEADER, "_INBOX.1");
        enc.encode(&mut buf, msg(5, m), 0);
        assert_eq!(&buf[..], b"MSG a.b 5 _INBOX.1 2\r\nhi\r\n");
        buf.clear();
        let mut m = Message::new("a", "x");
        m.headers.insert("K", "v");
        m.envelope = Some(Envelope { id: 1, tx: 2, timestamp_ns: 3 });
        enc.encode(&mut buf, msg(5, m), 0);
        let text = String::from_utf8(buf.to_vec()).unwrap();
        assert!(text.starts_with("HMSG a 5 "), "{text}");
        assert!(text.contains("K: v\r\nBusbar-Id: ") && text.contains("Busbar-Time: 3\r\n"), "{text}");
        // Without headers support the same message is a MSG.
        enc.encode(&mut buf, Outbound::Nats(NatsOut::Headers(false)), 0);
        buf.clear();
        let mut m = Message::new("a", "x");
        m.headers.insert("K", "v");
        enc.encode(&mut buf, msg(5, m), 0);
        assert_eq!(&buf[..], b"MSG a 5 1\r\nx\r\n");
    }

    #[test]
    fn envelope_headers_round_trip() {
        let mut envelope = None;
        let id = format_id(42);
        let pairs = [
            (ID_HEADER, id.as_str()),
            ("busbar-tx", id.as_str()),
            (TIME_HEADER, "9"),
            ("A", "b"),
            (":x", "y"),
        ];
        let headers = read_headers(&pairs, &mut envelope);
        assert_eq!(envelope, Some(Envelope { id: 42, tx: 42, timestamp_ns: 9 }));
        assert_eq!(headers.iter().collect::<Vec<_>>(), vec![("A", "b")]);
    }

    #[test]
    fn max_msgs_stops_delivery_and_asks_to_unsubscribe() {
        let (mut enc, mut done) = encoder();
        let mut buf = BytesMut::new();
        enc.encode(&mut buf, msg(1, Message::new("a", "1")), 0);
        enc.encode(&mut buf, Outbound::Nats(NatsOut::Limit { sid: 1, max: 3 }), 0);
        enc.encode(&mut buf, Outbound::Nats(NatsOut::Name { sid: NAMED_SIDS, name: "abc".into() }), 0);
        for _ in 0..4 {
            enc.encode(&mut buf, msg(1, Message::new("a", "1")), 0);
            enc.encode(&mut buf, msg(NAMED_SIDS, Message::new("b", "2")), 0);
        }
        let text = String::from_utf8(buf.to_vec()).unwrap();
        assert_eq!(text.matches("MSG a 1 1").count(), 3, "{text}");
        assert_eq!(text.matches("MSG b abc 1").count(), 4, "{text}");
        assert!(matches!(done.try_recv(), Ok(Done::Limit(1))));
        assert!(done.try_recv().is_err());
        enc.encode(&mut buf, Outbound::Nats(NatsOut::Forget(1)), 0);
        assert!(!enc.subs.contains_key(&1));
    }

    #[test]
    fn closing_errors_use_the_standard_texts() {
        let (mut enc, _) = encoder();
        let mut buf = BytesMut::new();
        assert!(enc.encode(&mut buf, Outbound::Close(error(ErrorCode::StaleConnection, 0, "x")), 0));
        assert!(enc.encode(&mut buf, Outbound::Close(error(ErrorCode::SlowConsumer, 0, "x")), 0));
        assert!(enc.encode(&mut buf, Outbound::Close(error(ErrorCode::ShuttingDown, 0, "x")), 0));
        assert_eq!(&buf[..], b"-ERR 'Stale Connection'\r\n", "closed without a word after the first");
        assert_eq!(max_payload(1 << 20), (1 << 20) - 8448);
    }
}
