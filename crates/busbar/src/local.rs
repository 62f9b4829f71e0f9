//! The in-process bus: the same events, commands and queries as the network client, with no
//! network and no broker.
//!
//! ```
//! # fn main() -> busbar::Result<()> {
//! use busbar::local::Bus;
//! let bus = Bus::new();
//! let _h = bus.on("order.*", |m| println!("{} {:?}", m.topic(), m.payload_str()))?;
//! let _r = bus.on_regex(r"^order\.(created|paid)$", |m| -> Result<(), String> {
//!     if m.payload().is_empty() { Err("empty order".into()) } else { Ok(()) }
//! })?;
//! let delivery = bus.publish("order.created", "42")?;
//! assert_eq!(delivery.delivered, 2);
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! Subscriptions live in an immutable `Table` behind an [`ArcSwap`]: emitting loads the current
//! table without a lock and walks the same [`SubscriptionTrie`] the broker uses (plus the regex
//! handlers); subscribing copies the table, changes the copy and swaps it in. So a handler may
//! subscribe, unsubscribe or publish while it runs, and emitters never wait for each other.
//!
//! Synchronous handlers ([`Bus::on`]) run inside `emit`, on the emitter's thread: a pre-built
//! message delivered to one of them allocates nothing. Each runs under `catch_unwind`: one that
//! panics or returns an error is reported in the returned [`Delivery`] (and logged) and the
//! others still run. The handlers of one message run in no promised order; a handler that
//! publishes delivers that message at once (depth first), up to 64 publishes deep (beyond that the
//! publish fails with [`Error::NestedTooDeep`] rather than overflow the stack). Streams ([`Bus::subscribe`]) and async handlers
//! ([`crate::EventBus::subscribe_with`]) receive through a bounded buffer; a full buffer drops
//! and counts, never blocks the emitter.
//!
//! The whole bus is one service, as one network client is: its id is [`BusOptions::source`] and
//! its name [`BusOptions::service`]. A message addressed to another id or name
//! ([`Outgoing::to`], [`Outgoing::to_service`]) reaches no one, and such a request fails with
//! [`Error::NoResponders`], as it would over the network with no such service connected.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use busbar_core::group::{Balancer, Turn};
use busbar_core::{ByteString, GroupPolicy, IdGenerator, SubscriptionTrie, UlidGenerator, validate_pattern};
use bytes::Bytes;
use regex::Regex;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::client::Pattern;
use crate::context::in_transaction_sync;
use crate::error::{Error, Result};
use crate::message::{Message, Outgoing};
use crate::request::{ReplyTo, Request, reply_result};
use crate::subscription::{Requests, Subscription, Unsubscriber};

/// How the in-process bus behaves.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Makes message ids.
    pub id_generator: Arc<dyn IdGenerator>,
    /// When true, publishing, requesting or sending a command to a topic not registered with
    /// [`Bus::register_topics`] is an error ([`Error::UnknownTopic`]).
    pub strict: bool,
    /// Messages (or requests) buffered per stream subscription before new ones are dropped.
    pub subscription_capacity: usize,
    /// The source id stamped on messages published through this bus. It is also the bus's own
    /// service id: a message addressed to another id ([`Outgoing::to`]) reaches no one here.
    pub source: u32,
    /// The service name this bus answers to: a message addressed by name
    /// ([`Outgoing::to_service`]) to any other name reaches no one here.
    pub service: Option<ByteString>,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            id_generator: Arc::new(UlidGenerator::new()),
            strict: false,
            subscription_capacity: 65_536,
            source: 0,
            service: None,
        }
    }
}

impl BusOptions {
    /// Strict topic registration on or off.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Uses another id generator.
    pub fn id_generator(mut self, ids: Arc<dyn IdGenerator>) -> Self {
        self.id_generator = ids;
        self
    }

    /// Answers to `name` when a message is addressed by service name.
    pub fn service(mut self, name: impl Into<ByteString>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// Whether `message` is addressed to some other service than this bus (by id or by name),
    /// and so reaches no one here, as over the network it would reach only that service.
    /// An id, when there is one, decides alone, as at the broker.
    fn addressed_elsewhere(&self, message: &busbar_core::Message) -> bool {
        if message.destination != 0 {
            return message.destination != self.source;
        }
        message
            .headers
            .get(crate::message::TO_HEADER)
            .is_some_and(|name| self.service.as_deref() != Some(name))
    }
}

/// What happened to one published message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Handlers and streams it reached.
    pub delivered: usize,
    /// Handlers that failed or panicked, and streams whose buffer was full.
    pub failures: Vec<HandlerFailure>,
}

/// A handler that did not handle a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFailure {
    /// Its subscription id.
    pub subscription: u64,
    /// What went wrong: the handler's error text, the panic message, or "buffer full".
    pub error: String,
    /// True when the handler panicked.
    pub panicked: bool,
}

/// What a synchronous handler may return: `()` or `Result<(), E: Display>`.
pub trait HandlerOutcome {
    /// `Err(text)` when the handler failed.
    fn into_outcome(self) -> std::result::Result<(), String>;
}

impl HandlerOutcome for () {
    fn into_outcome(self) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> HandlerOutcome for std::result::Result<(), E> {
    fn into_outcome(self) -> std::result::Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

type SyncFn = dyn Fn(&Message) -> std::result::Result<(), String> + Send + Sync;

enum Sink {
    Sync(Box<SyncFn>),
    Stream { tx: crate::feed::FeedTx<Message>, dropped: Arc<AtomicU64> },
}

#[derive(Clone)]
struct GroupRef {
    name: ByteString,
    policy: GroupPolicy,
    balancer: Arc<Balancer>,
}

struct Handler {
    sid: u64,
    group: Option<GroupRef>,
    regex: Option<Regex>,
    sink: Sink,
    /// Its round-robin place in its group.
    turn: Turn,
}

struct Responder {
    sid: u64,
    group: Option<GroupRef>,
    tx: crate::feed::FeedTx<Request>,
    dropped: Arc<AtomicU64>,
    /// Its round-robin place in its group (or among the responders in no group).
    turn: Turn,
}

// The trie finds entries to remove by equality; a subscription id identifies one.
impl PartialEq for Handler {
    fn eq(&self, other: &Self) -> bool {
        self.sid == other.sid
    }
}

impl PartialEq for Responder {
    fn eq(&self, other: &Self) -> bool {
        self.sid == other.sid
    }
}

/// Where a subscription is stored, to remove it.
#[derive(Clone)]
enum Slot {
    /// A handler or stream on a pattern; true for a stream.
    Event(ByteString, bool),
    /// A handler or stream on a regular expression; true for a stream.
    Regex(bool),
    Responder(ByteString),
}

/// One immutable generation of the bus's subscriptions.
#[derive(Clone, Default)]
struct Table {
    events: SubscriptionTrie<Arc<Handler>>,
    regexes: Vec<Arc<Handler>>,
    responders: SubscriptionTrie<Arc<Responder>>,
    slots: HashMap<u64, (Slot, Option<ByteString>)>,
    groups: HashMap<ByteString, (GroupRef, usize)>,
    /// Shared between generations: a subscription change copies the table, and should not copy
    /// thousands of registered topics with it.
    topics: Arc<HashSet<Box<str>>>,
    /// Event subscriptions that are streams (queues), and that are synchronous handlers: with
    /// both, a message goes to the streams before any handler runs (see `deliver_all`).
    streams: usize,
    syncs: usize,
}

impl Table {
    fn group(&mut self, pattern: &Pattern) -> Result<Option<GroupRef>> {
        let Some(group) = pattern.group_spec() else { return Ok(None) };
        let (name, policy) = (group.name.clone(), group.policy);
        // As a broker holds them: group names follow the topic rules.
        busbar_core::validate_topic(&name)
            .map_err(|source| Error::InvalidTopic { topic: name.to_string(), source })?;
        let entry = self.groups.entry(name.clone()).or_insert_with(|| {
            let balancer = Arc::new(Balancer::with_seed(busbar_core::id::now_ns()));
            (GroupRef { name, policy, balancer }, 0)
        });
        if entry.0.policy != policy {
            return Err(Error::Server {
                code: busbar_core::ErrorCode::InvalidPattern,
                message: format!("group {:?} uses {:?}, not {policy:?}", &*entry.0.name, entry.0.policy),
            });
        }
        entry.1 += 1;
        Ok(Some(entry.0.clone()))
    }

    fn remove(&mut self, sid: u64) {
        let Some((slot, group)) = self.slots.remove(&sid) else { return };
        if let Slot::Event(_, stream) | Slot::Regex(stream) = slot {
            if stream {
                self.streams -= 1;
            } else {
                self.syncs -= 1;
            }
        }
        match slot {
            Slot::Event(pattern, _) => {
                let probe = Arc::new(Handler {
                    sid,
                    group: None,
                    regex: None,
                    sink: Sink::Sync(Box::new(|_| Ok(()))),
                    turn: Turn::default(),
                });
                self.events.remove(&pattern, &probe);
            }
            Slot::Regex(_) => self.regexes.retain(|h| h.sid != sid),
            Slot::Responder(pattern) => {
                let (tx, _) = crate::feed::feed(1);
                let probe = Arc::new(Responder {
                    sid,
                    group: None,
                    tx,
                    dropped: Arc::default(),
                    turn: Turn::default(),
                });
                self.responders.remove(&pattern, &probe);
            }
        }
        if let Some(name) = group
            && let Some(entry) = self.groups.get_mut(&name)
        {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.groups.remove(&name);
            }
        }
    }
}

struct Inner {
    table: ArcSwap<Table>,
    /// Serialises writers (copy, change, swap); readers never take it.
    writer: Mutex<()>,
    options: BusOptions,
    next_id: AtomicU64,
    ungrouped: Balancer,
}

/// The in-process bus. Clone it freely: clones share the subscriptions.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.inner.table.load();
        f.debug_struct("Bus")
            .field("subscriptions", &table.slots.len())
            .field("strict", &self.inner.options.strict)
            .finish()
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

/// A synchronous handler registered with [`Bus::on`] or [`Bus::on_regex`]; dropping it
/// unsubscribes (unless [`Registration::detach`]ed).
#[must_use = "dropping a Registration unsubscribes its handler"]
pub struct Registration {
    sid: u64,
    bus: Weak<Inner>,
    detached: bool,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("sid", &self.sid).finish()
    }
}

impl Registration {
    /// The subscription id.
    pub fn id(&self) -> u64 {
        self.sid
    }

    /// Keeps the handler for the bus's whole life.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.detached
            && let Some(inner) = self.bus.upgrade()
        {
            Bus { inner }.unsubscribe(self.sid);
        }
    }
}

impl Bus {
    /// A bus with default options.
    pub fn new() -> Self {
        Self::with_options(BusOptions::default())
    }

    /// A bus with `options`.
    pub fn with_options(options: BusOptions) -> Self {
        let inner = Inner {
            table: ArcSwap::from_pointee(Table::default()),
            writer: Mutex::new(()),
            options,
            next_id: AtomicU64::new(1),
            ungrouped: Balancer::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// A strict bus: publishing (or requesting) on a topic that was not registered is an error.
    pub fn strict() -> Self {
        Self::with_options(BusOptions::default().strict(true))
    }

    fn update<R>(&self, change: impl FnOnce(&mut Table) -> Result<R>) -> Result<R> {
        let writer = self.inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut table = Table::clone(&self.inner.table.load());
        let result = change(&mut table)?;
        let old = self.inner.table.swap(Arc::new(table));
        drop(writer);
        // Dropped after the lock is released: the last reference to a removed handler may own a
        // Registration of this bus, whose drop unsubscribes, which takes the lock again.
        drop(old);
        Ok(result)
    }

    fn next_sid(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn unsubscribe(&self, sid: u64) {
        let _ = self.update(|t| {
            t.remove(sid);
            Ok(())
        });
    }

    fn unsubscriber(&self) -> Unsubscriber {
        let weak = Arc::downgrade(&self.inner);
        Unsubscriber::Local(Arc::new(move |sid| {
            if let Some(inner) = weak.upgrade() {
                Bus { inner }.unsubscribe(sid);
            }
        }))
    }

    /// Registers topics that may be published to (only checked in strict mode).
    pub fn register_topics<I, S>(&self, topics: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let topics: Vec<Box<str>> = topics
            .into_iter()
            .map(|t| {
                let t = t.as_ref();
                crate::message::check_topic(t)?;
                Ok(t.into())
            })
            .collect::<Result<_>>()?;
        self.update(|table| {
            Arc::make_mut(&mut table.topics).extend(topics);
            Ok(())
        })
    }

    /// How many subscriptions (handlers, streams, responders) the bus holds.
    pub fn subscription_count(&self) -> usize {
        self.inner.table.load().slots.len()
    }

    fn add_event(&self, pattern: Pattern, regex: Option<Regex>, sink: Sink) -> Result<u64> {
        if regex.is_none() {
            let p = pattern.pattern_str();
            validate_pattern(p).map_err(|source| Error::InvalidTopic { topic: p.to_string(), source })?;
        }
        let sid = self.next_sid();
        // Taken only once the handler is stored; when it is refused, it is dropped below, after
        // the lock: it may own a Registration of this bus, whose drop takes the lock again.
        let mut sink = Some(sink);
        let added = self.update(|t| {
            let group = t.group(&pattern)?;
            let group_name = group.as_ref().map(|g| g.name.clone());
            let is_regex = regex.is_some();
            let sink = sink.take().expect("taken once");
            let stream = matches!(sink, Sink::Stream { .. });
            if stream {
                t.streams += 1;
            } else {
                t.syncs += 1;
            }
            let handler = Arc::new(Handler { sid, group, regex, sink, turn: Turn::default() });
            if is_regex {
                t.regexes.push(handler);
                t.slots.insert(sid, (Slot::Regex(stream), group_name));
            } else {
                t.events.insert(pattern.pattern_str(), handler);
                t.slots.insert(sid, (Slot::Event(pattern.pattern_str().into(), stream), group_name));
            }
            Ok(sid)
        });
        drop(sink);
        added
    }

    fn registration(&self, sid: u64) -> Registration {
        Registration { sid, bus: Arc::downgrade(&self.inner), detached: false }
    }

    /// Runs `handler` synchronously, inside `publish`/`emit`, for every message matching
    /// `pattern` (wildcards `*` and `>`; see [`Pattern`] for groups). It may return `()` or a
    /// `Result`; errors and panics are reported in the [`Delivery`], never stop other handlers.
    pub fn on<F, O>(&self, pattern: impl Into<Pattern>, handler: F) -> Result<Registration>
    where
        F: Fn(&Message) -> O + Send + Sync + 'static,
        O: HandlerOutcome,
    {
        let sink = Sink::Sync(Box::new(move |m| handler(m).into_outcome()));
        let sid = self.add_event(pattern.into(), None, sink)?;
        Ok(self.registration(sid))
    }

    /// Like [`Bus::on`], for topics matching a regular expression (compiled once; an invalid one
    /// is an error).
    pub fn on_regex<F, O>(&self, regex: &str, handler: F) -> Result<Registration>
    where
        F: Fn(&Message) -> O + Send + Sync + 'static,
        O: HandlerOutcome,
    {
        let regex = compile(regex)?;
        let sink = Sink::Sync(Box::new(move |m| handler(m).into_outcome()));
        let sid = self.add_event(Pattern::new(regex.as_str()), Some(regex), sink)?;
        Ok(self.registration(sid))
    }

    fn stream(&self, pattern: Pattern, regex: Option<Regex>) -> Result<Subscription> {
        let name = ByteString::from(pattern.pattern_str());
        let (tx, rx) = crate::feed::feed(self.inner.options.subscription_capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let sid = self.add_event(pattern, regex, Sink::Stream { tx, dropped: dropped.clone() })?;
        Ok(Subscription::new(sid, name, rx, dropped, self.unsubscriber()))
    }

    /// A stream of the messages matching `pattern`. Unsubscribes when dropped.
    pub fn subscribe(&self, pattern: impl Into<Pattern>) -> Result<Subscription> {
        self.stream(pattern.into(), None)
    }

    /// A stream of the messages whose topic matches a regular expression.
    pub fn subscribe_regex(&self, regex: &str) -> Result<Subscription> {
        let regex = compile(regex)?;
        self.stream(Pattern::new(regex.as_str()), Some(regex))
    }

    /// A stream of the requests and commands matching `pattern`, to answer.
    pub fn requests(&self, pattern: impl Into<Pattern>) -> Result<Requests> {
        let pattern = pattern.into();
        let p = pattern.pattern_str();
        validate_pattern(p).map_err(|source| Error::InvalidTopic { topic: p.to_string(), source })?;
        let (tx, rx) = crate::feed::feed(self.inner.options.subscription_capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let sid = self.next_sid();
        self.update(|t| {
            let group = t.group(&pattern)?;
            let group_name = group.as_ref().map(|g| g.name.clone());
            let responder =
                Arc::new(Responder { sid, group, tx, dropped: dropped.clone(), turn: Turn::default() });
            t.responders.insert(pattern.pattern_str(), responder);
            t.slots.insert(sid, (Slot::Responder(pattern.pattern_str().into()), group_name));
            Ok(())
        })?;
        Ok(Requests::new(sid, rx, dropped, self.unsubscriber()))
    }

    fn prepare(&self, message: Outgoing) -> Result<Message> {
        let mut inner = message.prepare(self.inner.options.id_generator.as_ref(), usize::MAX)?;
        inner.source = self.inner.options.source;
        Ok(Message { sid: 0, inner })
    }

    /// Publishes `payload` to `topic`, delivering to every matching handler before it returns.
    pub fn publish(&self, topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Result<Delivery> {
        self.publish_message(Outgoing::new(topic, payload))
    }

    /// Publishes a message with headers, key or transaction; its envelope is filled in.
    pub fn publish_message(&self, message: Outgoing) -> Result<Delivery> {
        let message = self.prepare(message)?;
        self.emit(&message)
    }

    /// Delivers an already built message (see [`Bus::message`]) to every matching handler and
    /// stream, and to one member of every matching group. Allocates nothing for plain synchronous
    /// handlers. Handler failures are in the returned [`Delivery`].
    pub fn emit(&self, message: &Message) -> Result<Delivery> {
        let table = self.inner.table.load();
        let topic = message.topic();
        if self.inner.options.strict && !table.topics.contains(topic) {
            return Err(Error::UnknownTopic { topic: topic.to_string() });
        }
        if self.inner.options.addressed_elsewhere(&message.inner) {
            return Ok(Delivery::default());
        }
        // A publish from a synchronous handler is delivered at once, on this stack: bounded.
        let depth = DEPTH.get();
        if depth >= MAX_DEPTH {
            return Err(Error::NestedTooDeep { depth: MAX_DEPTH, topic: topic.to_string() });
        }
        DEPTH.set(depth + 1);
        let _back = Restore(depth);
        // Handlers run in the message's transaction: set once for all of them.
        let tx = message.envelope().map(|e| e.tx);
        Ok(in_transaction_sync(tx, || deliver_all(&table, message)))
    }

    /// Builds a message with its envelope (for [`Bus::emit`], which can then deliver it any
    /// number of times without allocating).
    pub fn message(&self, topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Result<Message> {
        self.prepare(Outgoing::new(topic, payload))
    }

    fn responders_for(&self, message: &Message, all: bool) -> Result<Vec<Arc<Responder>>> {
        let table = self.inner.table.load();
        if self.inner.options.strict && !table.topics.contains(message.topic()) {
            return Err(Error::UnknownTopic { topic: message.topic().to_string() });
        }
        let mut candidates: Vec<&Arc<Responder>> = Vec::new();
        if !self.inner.options.addressed_elsewhere(&message.inner) {
            table.responders.for_each_match(message.topic(), |r| candidates.push(r));
        }
        if candidates.is_empty() {
            return Err(Error::NoResponders { topic: message.topic().to_string() });
        }
        candidates.sort_unstable_by_key(|r| r.sid);
        candidates.dedup_by_key(|r| r.sid);
        if all {
            return Ok(candidates.into_iter().cloned().collect());
        }
        let (balancer, policy) = match candidates.iter().find_map(|r| r.group.as_ref()) {
            Some(g) => (&*g.balancer, g.policy),
            None => (&self.inner.ungrouped, GroupPolicy::RoundRobin),
        };
        let chosen = balancer.pick(
            policy,
            message.key(),
            candidates.len(),
            |i| candidates[i].sid,
            |i| &candidates[i].turn,
        );
        Ok(vec![candidates[chosen].clone()])
    }

    fn hand_over(&self, responder: &Responder, message: &Message, reply_to: ReplyTo) -> Result<()> {
        let mut delivered = message.clone();
        delivered.sid = responder.sid;
        let request =
            Request::new(self.next_sid(), delivered, reply_to, self.inner.options.id_generator.clone());
        match responder.tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(crate::feed::TrySendError::Full(mut request)) => {
                request.disarm();
                responder.dropped.fetch_add(1, Ordering::Relaxed);
                Err(Error::Server {
                    code: busbar_core::ErrorCode::TooManyRequests,
                    message: crate::request::RESPONDER_FULL.into(),
                })
            }
            Err(crate::feed::TrySendError::Closed(mut request)) => {
                request.disarm();
                Err(Error::NoResponders { topic: message.topic().to_string() })
            }
        }
    }

    /// Sends a request to one responder and waits for its reply (see
    /// [`crate::EventBus::request`]).
    pub async fn request_message(&self, message: Outgoing, timeout: Duration) -> Result<Message> {
        let message = self.prepare(message)?;
        let responder = self.responders_for(&message, false)?.remove(0);
        let (tx, rx) = oneshot::channel();
        self.hand_over(&responder, &message, ReplyTo::One(Some(tx)))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply_result(reply),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Scatter-gather (see [`crate::EventBus::request_all_message`]).
    pub async fn request_all_message(
        &self,
        message: Outgoing,
        timeout: Duration,
        expected: Option<usize>,
    ) -> Result<Vec<Result<Message>>> {
        let message = self.prepare(message)?;
        let responders = self.responders_for(&message, true)?;
        let (tx, mut rx) = mpsc::channel(responders.len());
        // A responder that cannot take the request answers with its error, as over the network.
        let mut answers: Vec<Result<Message>> = Vec::new();
        for r in &responders {
            if let Err(e) = self.hand_over(r, &message, ReplyTo::All(tx.clone())) {
                answers.push(Err(e));
            }
        }
        drop(tx);
        // As the network client: the one responder gone is no one to answer, and no more than
        // `expected` answers are kept.
        if responders.len() == 1
            && let Some(Err(Error::NoResponders { topic })) = answers.first()
        {
            return Err(Error::NoResponders { topic: topic.clone() });
        }
        // At least one, as over the network, where the first answer is what ends the wait.
        let want = expected.map_or(responders.len(), |n| n.clamp(1, responders.len()));
        answers.truncate(want);
        let deadline = crate::request::deadline_in(timeout);
        while answers.len() < want {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => answers.push(reply_result(reply)),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(answers)
    }
}

/// Most publishes nested inside synchronous handlers on one thread (see [`Bus::emit`]).
const MAX_DEPTH: u32 = 64;

thread_local! {
    /// Publishes being delivered on this thread's stack, one inside another's handler.
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Puts [`DEPTH`] back when a delivery ends, handler panics included.
struct Restore(u32);

impl Drop for Restore {
    fn drop(&mut self) {
        DEPTH.set(self.0);
    }
}

/// Delivers to every matching plain handler, and to one member of every matching group.
fn deliver_all<'t>(table: &'t Table, message: &Message) -> Delivery {
    let topic = message.topic();
    let mut delivery = Delivery::default();
    let mut grouped: Vec<&'t Arc<Handler>> = Vec::new();
    let matches = |h: &&Arc<Handler>| h.regex.as_ref().is_some_and(|r| r.is_match(topic));
    if table.streams > 0 && table.syncs > 0 {
        // Streams first, then the handlers: a handler that publishes runs before its message
        // is in any stream otherwise, and a stream would see the effect before its cause.
        deliver_in_two_passes(table, message, &mut delivery);
        return delivery;
    }
    let mut visit = |h: &'t Arc<Handler>| match h.group {
        None => deliver(h, message, &mut delivery),
        Some(_) => grouped.push(h),
    };
    table.events.for_each_match(topic, &mut visit);
    table.regexes.iter().filter(matches).for_each(&mut visit);
    for h in choose_members(grouped, message) {
        deliver(h, message, &mut delivery);
    }
    delivery
}

/// [`deliver_all`] for a table with both streams and synchronous handlers: the streams (and a
/// group's chosen member when it is a stream) get the message before any handler runs.
fn deliver_in_two_passes<'t>(table: &'t Table, message: &Message, delivery: &mut Delivery) {
    let topic = message.topic();
    let is_stream = |h: &Handler| matches!(h.sink, Sink::Stream { .. });
    // Each regex is tried once: a handler is a stream or not.
    let matches = |h: &&Arc<Handler>| h.regex.as_ref().is_some_and(|r| r.is_match(topic));
    let mut grouped: Vec<&'t Arc<Handler>> = Vec::new();
    let mut first = |h: &'t Arc<Handler>| match h.group {
        None if is_stream(h) => deliver(h, message, delivery),
        None => {}
        Some(_) => grouped.push(h),
    };
    table.events.for_each_match(topic, &mut first);
    table.regexes.iter().filter(|h| is_stream(h)).filter(matches).for_each(&mut first);
    // Members chosen once, delivered in the pass of their kind.
    let chosen = choose_members(grouped, message);
    for h in chosen.iter().filter(|h| is_stream(h)) {
        deliver(h, message, delivery);
    }
    let mut second = |h: &Arc<Handler>| {
        if h.group.is_none() && !is_stream(h) {
            deliver(h, message, delivery);
        }
    };
    table.events.for_each_match(topic, &mut second);
    table.regexes.iter().filter(|h| !is_stream(h)).filter(matches).for_each(&mut second);
    for h in chosen.iter().filter(|h| !is_stream(h)) {
        deliver(h, message, delivery);
    }
}

/// One member of each group among `grouped`, chosen by the group's policy.
fn choose_members<'t>(mut grouped: Vec<&'t Arc<Handler>>, message: &Message) -> Vec<&'t Arc<Handler>> {
    let mut chosen = Vec::new();
    if grouped.is_empty() {
        return chosen;
    }
    let name = |h: &Arc<Handler>| h.group.as_ref().map(|g| g.name.clone());
    grouped.sort_unstable_by(|a, b| name(a).cmp(&name(b)).then(a.sid.cmp(&b.sid)));
    for members in grouped.chunk_by(|a, b| name(a) == name(b)) {
        let Some(g) = &members[0].group else { continue };
        let i =
            g.balancer.pick(g.policy, message.key(), members.len(), |i| members[i].sid, |i| &members[i].turn);
        chosen.push(members[i]);
    }
    chosen
}

fn compile(regex: &str) -> Result<Regex> {
    Regex::new(regex).map_err(|e| Error::InvalidRegex { regex: regex.to_string(), reason: e.to_string() })
}

/// Hands `message` to one handler, recording the outcome.
#[inline]
fn deliver(h: &Handler, message: &Message, delivery: &mut Delivery) {
    match &h.sink {
        Sink::Sync(f) => match catch_unwind(AssertUnwindSafe(|| f(message))) {
            Ok(Ok(())) => delivery.delivered += 1,
            Ok(Err(error)) => failed(h, message, delivery, error, false),
            Err(panic) => failed(h, message, delivery, panic_text(&*panic), true),
        },
        Sink::Stream { tx, dropped } => {
            let mut copy = message.clone();
            copy.sid = h.sid;
            match tx.try_send(copy) {
                Ok(()) => delivery.delivered += 1,
                Err(crate::feed::TrySendError::Full(_)) => {
                    // Logged at each power of two (as the client does): a stalled stream under a
                    // flood would otherwise log once per message.
                    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!(subscription = h.sid, dropped = n, "stream buffer full: messages dropped");
                    }
                    let error = "buffer full".into();
                    delivery.failures.push(HandlerFailure { subscription: h.sid, error, panicked: false });
                }
                // The stream is being dropped; its unsubscription is on its way.
                Err(crate::feed::TrySendError::Closed(_)) => {}
            }
        }
    }
}

#[cold]
fn failed(h: &Handler, message: &Message, delivery: &mut Delivery, error: String, panicked: bool) {
    warn!(subscription = h.sid, topic = message.topic(), %error, panicked, "handler failed");
    delivery.failures.push(HandlerFailure { subscription: h.sid, error, panicked });
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribing_does_not_copy_the_registered_topics() {
        let bus = Bus::strict();
        bus.register_topics((0..1000).map(|i| format!("t.{i}"))).unwrap();
        let before = bus.inner.table.load().topics.clone();
        let _h = bus.on("t.>", |_| ()).unwrap();
        let after = bus.inner.table.load().topics.clone();
        assert!(Arc::ptr_eq(&before, &after), "one set, shared by both generations");
        bus.register_topics(["t.new"]).unwrap();
        assert!(bus.inner.table.load().topics.contains("t.new"));
        assert!(!before.contains("t.new"), "an older generation is left as it was");
    }
}
