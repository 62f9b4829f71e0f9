//! The router: which connection subscribes to what, and where a published message goes.
//!
//! One [`Router`] per broker, behind a `RwLock`: sessions route their publishes under the read lock
//! (many at once) and change subscriptions under the write lock. Delivery never waits: a message is
//! pushed into each subscriber's bounded outbox without waiting, and a full outbox marks that
//! subscriber a slow consumer instead of slowing the publisher.
//!
//! In a cluster the router also holds the subscriptions of other brokers' clients, learned over
//! routes and stored under those clients' (cluster-wide unique) ids with the route's outbox.
//! A message matching remote plain subscriptions goes once to each broker that has them (which
//! fans it out to its own clients); a group picks one member cluster-wide (a local one when it
//! has any, except under the hash policy, which picks the same member on every broker for a
//! message with a balance key; one without a key goes round-robin among all members) and sends
//! the message to exactly that member. Every change to a local subscription is announced to
//! every route while the write lock is held, so that a new route's snapshot and the
//! announcements that follow never miss or reorder a change.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::FastMap;
use std::sync::Arc;

use busbar_core::group::{Balancer, Turn};
use busbar_core::{ByteString, ErrorCode, Group, GroupPolicy, Message, Sub, SubKind, SubscriptionTrie};
use smallvec::SmallVec;

use crate::session::{Outbound, Outbox};

/// The sid of a message forwarded to another broker for all its matching plain subscriptions.
pub(crate) const FANOUT: u64 = u64::MAX;
/// The sid of a route UNSUB saying that a client is gone with all its subscriptions.
pub(crate) const GONE: u64 = u64::MAX;

/// The broker (cluster node) that assigned service id `conn`: its top byte.
pub(crate) fn node_of(conn: u32) -> u8 {
    (conn >> 24) as u8
}

/// What a route carries besides data frames: interest, and messages with a target.
#[derive(Debug)]
pub(crate) enum RouteOut {
    /// Client `conn` of this broker subscribed.
    Sub { conn: u32, sub: Box<Sub> },
    /// Client `conn` unsubscribed `sid` ([`GONE`]: disconnected).
    Unsub { conn: u32, sid: u64 },
    /// Client `conn` of this broker registered service `name` (direct addressing by name).
    Service { conn: u32, name: ByteString },
    /// Client `conn` of this broker speaks NATS: its plain subscriptions answer native requests
    /// (sent before its first subscription).
    Nats { conn: u32 },
    /// A message for subscription `sid` of client `target`, or with `sid` [`FANOUT`] for every
    /// matching plain subscription of the peer's clients (`target` then restricts it to one
    /// client when the message is directly addressed, 0 otherwise).
    Msg { target: u32, sid: u64, msg: Arc<Message> },
    /// A new route's snapshot of this broker's interest, queued as one item: it may hold more
    /// subscriptions than `max_pending` counts frames, and must not close the route it opens.
    Snapshot(Vec<RouteOut>),
}

impl RouteOut {
    pub(crate) fn size(&self) -> usize {
        match self {
            RouteOut::Sub { sub, .. } => {
                64 + sub.pattern.len() + sub.group.as_ref().map_or(0, |g| g.name.len())
            }
            RouteOut::Unsub { .. } => 32,
            RouteOut::Service { name, .. } => 48 + name.len(),
            RouteOut::Nats { .. } => 48,
            RouteOut::Msg { msg, .. } => msg.frame_size(),
            // Not counted: it is as large as this broker's interest (itself bounded by the
            // subscription limits), and counted it could exceed `max_pending_bytes` and close
            // every route it opens.
            RouteOut::Snapshot(_) => 0,
        }
    }
}

/// One subscription as stored in the trie: where to deliver, and under which id.
#[derive(Debug)]
pub(crate) struct SubRef {
    conn: u32,
    sid: u64,
    group: Option<Arc<GroupState>>,
    outbox: Outbox,
    /// Its round-robin place in its group (or among the responders in no group).
    turn: Turn,
}

impl PartialEq for SubRef {
    fn eq(&self, other: &Self) -> bool {
        self.conn == other.conn && self.sid == other.sid
    }
}

/// Shared state of one group name (all members, on any pattern, share it).
#[derive(Debug)]
pub(crate) struct GroupState {
    name: ByteString,
    policy: GroupPolicy,
    balancer: Balancer,
}

/// What a connection holds, for cleanup and monitoring.
#[derive(Debug)]
struct ConnSubs {
    subs: FastMap<u64, SubEntry>,
    service: Option<ByteString>,
    /// Where it is reached: its own outbox, or the route to its broker.
    outbox: Outbox,
    /// For a client of another broker: that broker's node id.
    remote: Option<u8>,
    /// A NATS client: a native request goes to its plain subscriptions when no native
    /// responder serves the topic.
    nats: bool,
}

#[derive(Debug)]
struct SubEntry {
    pattern: ByteString,
    group: Option<Arc<GroupState>>,
    kind: SubKind,
}

/// A subscription as monitoring shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SubView {
    pub(crate) conn: u32,
    pub(crate) sid: u64,
    pub(crate) pattern: String,
    pub(crate) group: Option<String>,
    pub(crate) kind: &'static str,
}

/// A responder picked for a request.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) conn: u32,
    pub(crate) sid: u64,
    pub(crate) outbox: Outbox,
}

/// The responders a request goes to: usually one, on the stack.
pub(crate) type Targets = SmallVec<[Target; 2]>;

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubError {
    Duplicate,
    Limit,
    PolicyMismatch,
    /// Not a valid pattern (from a peer broker; a client's is checked before).
    Invalid,
}

impl SubError {
    pub(crate) fn code(self) -> ErrorCode {
        match self {
            SubError::Duplicate => ErrorCode::DuplicateSubscription,
            SubError::Limit => ErrorCode::TooManySubscriptions,
            SubError::PolicyMismatch | SubError::Invalid => ErrorCode::InvalidPattern,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Router {
    /// Subscriptions to events (MSG).
    events: SubscriptionTrie<SubRef>,
    /// Subscriptions that answer requests (CALL).
    responders: SubscriptionTrie<SubRef>,
    conns: FastMap<u32, ConnSubs>,
    groups: FastMap<ByteString, (Arc<GroupState>, usize)>,
    /// Service name → connections registered under it, oldest first.
    services: FastMap<ByteString, Vec<u32>>,
    /// Round-robin position for responders that are in no group.
    ungrouped: Balancer,
    /// Routes to the other brokers of the cluster, by node id.
    routes: Vec<(u8, Outbox)>,
    /// Clients of each other broker known here (bounded per broker).
    remote_conns: FastMap<u8, usize>,
}

/// Most clients of one other broker whose subscriptions a broker keeps.
const MAX_REMOTE_CONNS: usize = 1 << 20;

impl Router {
    pub(crate) fn add_connection(&mut self, conn: u32, service: Option<ByteString>, outbox: Outbox) {
        if let Some(name) = &service {
            self.services.entry(name.clone()).or_default().push(conn);
            self.announce(RouteOut::Service { conn, name: name.clone() });
        }
        let nats = outbox.is_nats();
        self.conns.insert(conn, ConnSubs { subs: FastMap::default(), service, outbox, remote: None, nats });
    }

    /// Removes a connection and every subscription it held.
    pub(crate) fn remove_connection(&mut self, conn: u32) {
        let Some(entry) = self.conns.remove(&conn) else { return };
        match entry.remote {
            None => self.announce(RouteOut::Unsub { conn, sid: GONE }),
            Some(node) => {
                if let Entry::Occupied(mut e) = self.remote_conns.entry(node) {
                    *e.get_mut() -= 1;
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
            }
        }
        if let Some(name) = entry.service
            && let Entry::Occupied(mut e) = self.services.entry(name)
        {
            e.get_mut().retain(|&c| c != conn);
            if e.get().is_empty() {
                e.remove();
            }
        }
        for (sid, sub) in entry.subs {
            self.drop_sub(conn, sid, sub);
        }
    }

    /// The connection most recently registered under service `name`.
    /// The connection most recently registered under service `name`: on this broker when one is
    /// here, else on another broker of the cluster.
    pub(crate) fn resolve_service(&self, name: &str) -> Option<u32> {
        let conns = self.services.get(name)?;
        let local = |c: &&u32| self.conns.get(c).is_some_and(|e| e.remote.is_none());
        conns.iter().rev().find(local).or(conns.last()).copied()
    }

    /// The entry of client `conn` of broker `node`, made on first mention over the route
    /// `outbox`; None when that is not the current route to `node`, when `conn` is not that
    /// broker's client, or when it already has as many clients known as a broker may.
    fn remote_entry(&mut self, node: u8, conn: u32, outbox: &Outbox) -> Option<&mut ConnSubs> {
        if !self.is_current_route(node, outbox) {
            return None;
        }
        if !self.conns.contains_key(&conn) {
            let known = self.remote_conns.entry(node).or_default();
            if *known >= MAX_REMOTE_CONNS {
                return None;
            }
            *known += 1;
        }
        let entry = self.conns.entry(conn).or_insert_with(|| ConnSubs {
            subs: FastMap::default(),
            service: None,
            outbox: outbox.clone(),
            remote: Some(node),
            nats: false,
        });
        (entry.remote == Some(node)).then_some(entry)
    }

    /// Client `conn` of broker `node` registered service `name`, learned over the route `outbox`.
    pub(crate) fn register_remote_service(&mut self, node: u8, conn: u32, name: ByteString, outbox: &Outbox) {
        // Held to a client's rules.
        if busbar_core::validate_topic(&name).is_err() {
            return;
        }
        let Some(entry) = self.remote_entry(node, conn, outbox) else { return };
        if entry.service.is_some() {
            return;
        }
        entry.service = Some(name.clone());
        self.services.entry(name).or_default().push(conn);
    }

    /// Client `conn` of broker `node` is a NATS client, learned over the route `outbox`.
    pub(crate) fn register_remote_nats(&mut self, node: u8, conn: u32, outbox: &Outbox) {
        if let Some(entry) = self.remote_entry(node, conn, outbox) {
            entry.nats = true;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe(
        &mut self,
        conn: u32,
        sid: u64,
        pattern: ByteString,
        group: Option<(ByteString, GroupPolicy)>,
        kind: SubKind,
        outbox: Outbox,
        limit: usize,
    ) -> Result<(), SubError> {
        let Some(entry) = self.conns.get_mut(&conn) else { return Ok(()) };
        let local = entry.remote.is_none();
        // A NATS client's peers learn that it is one before its first subscription.
        let nats_first = entry.nats && entry.subs.is_empty();
        if entry.subs.contains_key(&sid) {
            return Err(SubError::Duplicate);
        }
        if entry.subs.len() >= limit {
            return Err(SubError::Limit);
        }
        // Copies: a decoded pattern or group name shares the whole buffer its frame was read
        // into, and a subscription may live as long as the broker.
        let pattern = ByteString::from(&*pattern);
        let group = match group {
            None => None,
            Some((name, policy)) => match self.groups.entry(ByteString::from(&*name)) {
                Entry::Occupied(mut e) => {
                    let (state, members) = e.get_mut();
                    if state.policy != policy {
                        return Err(SubError::PolicyMismatch);
                    }
                    *members += 1;
                    Some(state.clone())
                }
                Entry::Vacant(e) => {
                    let name = e.key().clone();
                    let state =
                        Arc::new(GroupState { name, policy, balancer: Balancer::with_seed(rand::random()) });
                    e.insert((state.clone(), 1));
                    Some(state)
                }
            },
        };
        let trie = match kind {
            SubKind::Events => &mut self.events,
            SubKind::Requests => &mut self.responders,
        };
        trie.insert(&pattern, SubRef { conn, sid, group: group.clone(), outbox, turn: Turn::default() });
        if local {
            if nats_first {
                self.announce(RouteOut::Nats { conn });
            }
            let group_frame = group.as_ref().map(|g| Group { name: g.name.clone(), policy: g.policy });
            let sub = Sub { sid, pattern: pattern.clone(), group: group_frame, kind };
            self.announce(RouteOut::Sub { conn, sub: Box::new(sub) });
        }
        let Some(entry) = self.conns.get_mut(&conn) else { return Ok(()) };
        entry.subs.insert(sid, SubEntry { pattern, group, kind });
        Ok(())
    }

    /// A subscription of client `conn` of broker `node`, learned over the route `outbox`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe_remote(
        &mut self,
        node: u8,
        conn: u32,
        sub: Sub,
        outbox: &Outbox,
        limit: usize,
    ) -> Result<(), SubError> {
        if !self.is_current_route(node, outbox) {
            // A route being replaced: its last frames must not touch the new one's state.
            return Err(SubError::Duplicate);
        }
        // Held to the rules a client's pattern is: the trie's removal recurses once per token,
        // and a pattern of thousands of tokens from a confused or hostile peer would overflow
        // the stack.
        let bad_group = sub.group.as_ref().is_some_and(|g| busbar_core::validate_topic(&g.name).is_err());
        if busbar_core::topic::validate_pattern(&sub.pattern).is_err() || bad_group {
            return Err(SubError::Invalid);
        }
        if self.remote_entry(node, conn, outbox).is_none() {
            // Too many clients of that broker known, or not a client of that broker (a confused
            // or hostile peer).
            return Err(SubError::Limit);
        }
        let group = sub.group.map(|g| (g.name, g.policy));
        self.subscribe(conn, sub.sid, sub.pattern, group, sub.kind, outbox.clone(), limit)
    }

    /// Sends `out` to every route (interest in a local subscription changed). Under the write
    /// lock, so that a route's snapshot and later announcements stay in order.
    fn announce(&self, out: RouteOut) {
        match self.routes.as_slice() {
            [] => {}
            [(_, only)] => {
                only.push(Outbound::Route(out));
            }
            routes => {
                for (_, route) in routes {
                    let copy = match &out {
                        RouteOut::Sub { conn, sub } => RouteOut::Sub { conn: *conn, sub: sub.clone() },
                        RouteOut::Unsub { conn, sid } => RouteOut::Unsub { conn: *conn, sid: *sid },
                        RouteOut::Service { conn, name } => {
                            RouteOut::Service { conn: *conn, name: name.clone() }
                        }
                        RouteOut::Nats { conn } => RouteOut::Nats { conn: *conn },
                        RouteOut::Msg { target, sid, msg } => {
                            RouteOut::Msg { target: *target, sid: *sid, msg: msg.clone() }
                        }
                        RouteOut::Snapshot(_) => unreachable!("a snapshot goes to its one route"),
                    };
                    route.push(Outbound::Route(copy));
                }
            }
        }
    }

    /// A route to broker `node` is up: remember it and send it every local subscription.
    pub(crate) fn add_route(&mut self, node: u8, outbox: Outbox) {
        let mut snapshot = Vec::new();
        // Service names in the order they were registered, so that the peer resolves a name
        // shared by several clients to the same latest one as this broker does.
        for (name, conns) in &self.services {
            for &conn in conns {
                if self.conns.get(&conn).is_some_and(|c| c.remote.is_none()) {
                    snapshot.push(RouteOut::Service { conn, name: name.clone() });
                }
            }
        }
        for (&conn, c) in self.conns.iter().filter(|(_, c)| c.remote.is_none()) {
            if c.nats && !c.subs.is_empty() {
                snapshot.push(RouteOut::Nats { conn });
            }
            for (&sid, s) in &c.subs {
                let group = s.group.as_ref().map(|g| Group { name: g.name.clone(), policy: g.policy });
                let sub = Sub { sid, pattern: s.pattern.clone(), group, kind: s.kind };
                snapshot.push(RouteOut::Sub { conn, sub: Box::new(sub) });
            }
        }
        if !snapshot.is_empty() {
            outbox.push(Outbound::Route(RouteOut::Snapshot(snapshot)));
        }
        self.routes.retain(|(n, _)| *n != node);
        self.routes.push((node, outbox));
    }

    /// The route to broker `node` is down: forget it and its clients' subscriptions. Returns
    /// those clients, whose requests in flight must fail.
    pub(crate) fn remove_route(&mut self, node: u8) -> Vec<u32> {
        self.routes.retain(|(n, _)| *n != node);
        let gone: Vec<u32> =
            self.conns.iter().filter(|(_, c)| c.remote == Some(node)).map(|(&conn, _)| conn).collect();
        for &conn in &gone {
            self.remove_connection(conn);
        }
        gone
    }

    /// The routes that are up: node id and outbox.
    pub(crate) fn route_outboxes(&self) -> impl Iterator<Item = (u8, &Outbox)> {
        self.routes.iter().map(|(n, o)| (*n, o))
    }

    /// True when `outbox` is the registered route to broker `node`.
    pub(crate) fn is_current_route(&self, node: u8, outbox: &Outbox) -> bool {
        self.route_to(node).is_some_and(|o| Arc::ptr_eq(o.control(), outbox.control()))
    }

    /// The route outbox to broker `node`.
    pub(crate) fn route_to(&self, node: u8) -> Option<&Outbox> {
        self.routes.iter().find(|(n, _)| *n == node).map(|(_, o)| o)
    }

    /// Remote clients known, and their subscriptions, per broker node.
    pub(crate) fn remote_counts(&self) -> HashMap<u8, (usize, usize)> {
        let mut out: HashMap<u8, (usize, usize)> = HashMap::new();
        for c in self.conns.values() {
            if let Some(node) = c.remote {
                let e = out.entry(node).or_default();
                e.0 += 1;
                e.1 += c.subs.len();
            }
        }
        out
    }

    /// True when connection `conn` holds subscription `sid`.
    pub(crate) fn has_subscription(&self, conn: u32, sid: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.subs.contains_key(&sid))
    }

    /// Removes one subscription; false when the connection had no such id.
    pub(crate) fn unsubscribe(&mut self, conn: u32, sid: u64) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else { return false };
        let Some(sub) = entry.subs.remove(&sid) else { return false };
        self.drop_sub(conn, sid, sub);
        true
    }

    fn drop_sub(&mut self, conn: u32, sid: u64, sub: SubEntry) {
        // A local client's unsubscribe (one being removed is gone from `conns`: GONE said it all).
        if self.conns.get(&conn).is_some_and(|c| c.remote.is_none()) {
            self.announce(RouteOut::Unsub { conn, sid });
        }
        // Only `conn` and `sid` take part in SubRef equality; the outbox is a placeholder.
        let probe = SubRef { conn, sid, group: None, outbox: Outbox::detached(), turn: Turn::default() };
        match sub.kind {
            SubKind::Events => self.events.remove(&sub.pattern, &probe),
            SubKind::Requests => self.responders.remove(&sub.pattern, &probe),
        };
        if let Some(g) = sub.group
            && let Entry::Occupied(mut e) = self.groups.entry(g.name.clone())
        {
            e.get_mut().1 -= 1;
            if e.get().1 == 0 {
                e.remove();
            }
        }
    }

    /// How many subscriptions each connection holds.
    pub(crate) fn subscription_counts(&self) -> HashMap<u32, usize> {
        self.conns.iter().map(|(&conn, c)| (conn, c.subs.len())).collect()
    }

    /// Every subscription, for monitoring: (connection, id, pattern, group, kind).
    pub(crate) fn subscriptions_limited(&self, limit: usize) -> Vec<SubView> {
        let mut out: Vec<SubView> = self
            .conns
            .iter()
            .flat_map(|(&conn, c)| {
                c.subs.iter().map(move |(&sid, s)| SubView {
                    conn,
                    sid,
                    pattern: s.pattern.to_string(),
                    group: s.group.as_ref().map(|g| g.name.to_string()),
                    kind: match s.kind {
                        SubKind::Events => "events",
                        SubKind::Requests => "requests",
                    },
                })
            })
            .take(limit)
            .collect();
        out.sort_by_key(|v| (v.conn, v.sid));
        out
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.events.len() + self.responders.len()
    }

    /// Delivers `msg` to every matching plain subscription and to one member of every matching
    /// group; with `only` set (direct addressing), to that connection's subscriptions only.
    /// A connection that asked not to see its own messages (NATS `echo: false`) is skipped.
    /// Remote subscriptions cost one copy per broker that has any, plus one per group member
    /// chosen there. Returns how many deliveries were queued.
    pub(crate) fn route(&self, msg: &Arc<Message>, only: Option<u32>) -> usize {
        let mut delivered = 0;
        // Brokers that already got the message for their plain subscriptions.
        let mut forwarded: SmallVec<[u8; 8]> = SmallVec::new();
        let own = |s: &SubRef| s.conn == msg.source && s.outbox.no_echo();
        self.recipients(
            &msg.topic,
            msg.key,
            only,
            |s| !own(s),
            |s, grouped| {
                let queued = if !s.outbox.is_route() {
                    s.outbox.deliver(s.sid, msg)
                } else if grouped {
                    let out = || {
                        let msg = s.outbox.share(msg);
                        Outbound::Route(RouteOut::Msg { target: s.conn, sid: s.sid, msg })
                    };
                    s.outbox.push_sized(msg.frame_size(), out)
                } else {
                    let node = node_of(s.conn);
                    if forwarded.contains(&node) {
                        return;
                    }
                    forwarded.push(node);
                    // Direct addressing (by id or by name) restricts the peer's fan-out to one client.
                    let target = only.unwrap_or(msg.destination);
                    let out =
                        || Outbound::Route(RouteOut::Msg { target, sid: FANOUT, msg: s.outbox.share(msg) });
                    s.outbox.push_sized(msg.frame_size(), out)
                };
                delivered += usize::from(queued);
            },
        );
        delivered
    }

    /// Delivers a message another broker forwarded: to subscription `sid` of client `target`, or
    /// with `sid` [`FANOUT`] to every matching plain subscription of this broker's clients (of
    /// client `target` only, when it is not 0). Never to groups (the sender chose the member)
    /// nor to other routes (one hop).
    pub(crate) fn route_from_peer(&self, msg: &Arc<Message>, target: u32, sid: u64) -> usize {
        // Held to a client's rules, as the peer's patterns are: matching walks the trie once per
        // token.
        if busbar_core::topic::validate_topic(&msg.topic).is_err() {
            return 0;
        }
        if sid != FANOUT {
            let Some(c) = self.conns.get(&target) else { return 0 };
            let subscribed = c.subs.get(&sid).is_some_and(|s| {
                s.kind == SubKind::Events && busbar_core::topic::matches(&s.pattern, &msg.topic)
            });
            if c.remote.is_some() || !subscribed {
                return 0;
            }
            return usize::from(c.outbox.deliver(sid, msg));
        }
        let only = (target != 0).then_some(target);
        let mut delivered = 0;
        let own = |s: &SubRef| s.conn == msg.source && s.outbox.no_echo();
        let keep = |s: &SubRef| s.group.is_none() && !s.outbox.is_route() && !own(s);
        self.recipients(&msg.topic, msg.key, only, keep, |s, _| {
            delivered += usize::from(s.outbox.deliver(s.sid, msg));
        });
        delivered
    }

    /// The local connection `conn` with a subscription `sid` that answers requests, for a CALL
    /// another broker forwarded: a requests subscription, or any subscription of a NATS client.
    pub(crate) fn local_responder(&self, conn: u32, sid: u64) -> Option<&Outbox> {
        let c = self.conns.get(&conn)?;
        let answers = |s: &SubEntry| s.kind == SubKind::Requests || c.nats;
        let ok = c.remote.is_none() && c.subs.get(&sid).is_some_and(answers);
        ok.then_some(&c.outbox)
    }

    /// The NATS subscriptions a native request goes to when no native responder serves its topic:
    /// as NATS does it, every matching subscription, one member per queue group; on this broker
    /// and on the others of the cluster.
    pub(crate) fn nats_responders(&self, topic: &str, key: Option<u64>, only: Option<u32>) -> Targets {
        let mut out = Targets::new();
        let remote_nats = |conn: u32| self.conns.get(&conn).is_some_and(|c| c.nats && c.remote.is_some());
        self.recipients(
            topic,
            key,
            only,
            |s| s.outbox.is_nats() || (s.outbox.is_route() && remote_nats(s.conn)),
            |s, _| {
                out.push(Target { conn: s.conn, sid: s.sid, outbox: s.outbox.clone() });
            },
        );
        out
    }

    /// The policy of group `name`, while it has members.
    pub(crate) fn group_policy(&self, name: &str) -> Option<GroupPolicy> {
        self.groups.get(name).map(|(g, _)| g.policy)
    }

    /// Calls `visit(subscription, grouped)` for each event subscription that gets a message on
    /// `topic`: every matching plain one, and one member of each matching group (chosen by the
    /// group's policy), among those that pass `keep` and belong to `only` when it is set.
    fn recipients(
        &self,
        topic: &str,
        key: Option<u64>,
        only: Option<u32>,
        keep: impl Fn(&SubRef) -> bool,
        mut visit: impl FnMut(&SubRef, bool),
    ) {
        // On the stack for the usual handful of group members: no allocation per message.
        let mut grouped: SmallVec<[&SubRef; 16]> = SmallVec::new();
        self.events.for_each_match(topic, |s| {
            if only.is_some_and(|c| c != s.conn) || !keep(s) {
                return;
            }
            if s.group.is_none() {
                visit(s, false);
            } else {
                grouped.push(s);
            }
        });
        if grouped.is_empty() {
            return;
        }
        // Stable order (by group, then member) so that round-robin and hashing are deterministic.
        // Members of one group share one GroupState, so its address identifies the group.
        let group_of = |s: &SubRef| s.group.as_ref().map_or(std::ptr::null(), Arc::as_ptr);
        grouped.sort_unstable_by_key(|s| (group_of(s), s.conn, s.sid));
        for members in grouped.chunk_by(|a, b| group_of(a) == group_of(b)) {
            let Some(state) = members[0].group.as_ref() else { continue };
            let local;
            let members = match prefer_local(members, state.policy) {
                Some(only_local) => {
                    local = only_local;
                    &local[..]
                }
                None => members,
            };
            let chosen = state.balancer.pick(
                state.policy,
                key,
                members.len(),
                |i| member_id(members[i]),
                |i| &members[i].turn,
            );
            visit(members[chosen], true);
        }
    }

    /// The responders a request goes to: every matching one for scatter-gather (`all`), else one,
    /// picked by the policy of the first grouped candidate, or round-robin when none is grouped
    /// (among this broker's own responders when it has any, except under the hash policy).
    /// `only` restricts candidates to one connection (direct addressing).
    pub(crate) fn select_responders(
        &self,
        topic: &str,
        key: Option<u64>,
        only: Option<u32>,
        all: bool,
    ) -> Targets {
        let mut candidates: SmallVec<[&SubRef; 16]> = SmallVec::new();
        self.responders.for_each_match(topic, |s| {
            if only.is_none_or(|c| c == s.conn) {
                candidates.push(s);
            }
        });
        if candidates.is_empty() {
            return Targets::new();
        }
        candidates.sort_unstable_by_key(|s| (s.conn, s.sid));
        candidates.dedup_by_key(|s| (s.conn, s.sid));
        let target = |s: &SubRef| Target { conn: s.conn, sid: s.sid, outbox: s.outbox.clone() };
        if all {
            return candidates.into_iter().map(target).collect();
        }
        let (balancer, policy) = match candidates.iter().find_map(|s| s.group.as_ref()) {
            Some(g) => (&g.balancer, g.policy),
            None => (&self.ungrouped, GroupPolicy::RoundRobin),
        };
        let local;
        let candidates = match prefer_local(&candidates, policy) {
            Some(only_local) => {
                local = only_local;
                &local[..]
            }
            None => &candidates[..],
        };
        let chosen = balancer.pick(
            policy,
            key,
            candidates.len(),
            |i| member_id(candidates[i]),
            |i| &candidates[i].turn,
        );
        smallvec::smallvec![target(candidates[chosen])]
    }
}

/// The members to choose among: this broker's own when it has any (cheaper, and on a broker that
/// dies only its own clients' share is lost), except under the hash policy, whose choice must be
/// the same on every broker and so is made among all.
/// `None`: choose among all of them (no copy on the common, single-broker path).
fn prefer_local<'a>(members: &[&'a SubRef], policy: GroupPolicy) -> Option<SmallVec<[&'a SubRef; 16]>> {
    let remote = |s: &&SubRef| s.outbox.is_route();
    if policy == GroupPolicy::Hash || !members.iter().any(remote) || members.iter().all(remote) {
        return None;
    }
    Some(members.iter().copied().filter(|s| !remote(s)).collect())
}

/// A stable identity of a member, for the hash policy.
fn member_id(s: &SubRef) -> u64 {
    (u64::from(s.conn) << 32) ^ s.sid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_unsubscribe_and_cleanup_keep_counts_right() {
        let mut r = Router::default();
        let ev = SubKind::Events;
        r.add_connection(1, Some("svc".into()), Outbox::detached());
        assert_eq!(r.resolve_service("svc"), Some(1));
        r.subscribe(1, 1, "a.>".into(), None, ev, Outbox::detached(), 10).unwrap();
        let g = Some(("g".into(), GroupPolicy::Random));
        r.subscribe(1, 2, "a.*".into(), g, SubKind::Requests, Outbox::detached(), 10).unwrap();
        assert_eq!(r.subscribe(1, 2, "b".into(), None, ev, Outbox::detached(), 10), Err(SubError::Duplicate));
        let h = Some(("g".into(), GroupPolicy::Hash));
        assert_eq!(
            r.subscribe(1, 3, "b".into(), h, ev, Outbox::detached(), 10),
            Err(SubError::PolicyMismatch)
        );
        assert_eq!(r.subscribe(1, 9, "c".into(), None, ev, Outbox::detached(), 2), Err(SubError::Limit));
        assert_eq!(r.select_responders("a.x", None, None, false).len(), 1);
        assert_eq!(r.select_responders("a.x", None, Some(2), false).len(), 0);
        assert_eq!(r.subscription_count(), 2);
        assert!(r.unsubscribe(1, 1));
        assert!(!r.unsubscribe(1, 1));
        assert_eq!(r.subscription_count(), 1);
        r.remove_connection(1);
        assert_eq!(r.subscription_count(), 0);
        assert!(r.groups.is_empty());
        assert_eq!(r.resolve_service("svc"), None);
    }

    #[test]
    fn a_peer_is_held_to_the_rules_of_a_clients_patterns_and_topics() {
        let mut r = Router::default();
        let route = Outbox::detached();
        r.add_route(2, route.clone());
        let conn = (2 << 24) | 5;
        // Tens of thousands of tokens: removing it (or the route going down) would recurse once
        // per token and overflow the stack.
        let deep = vec!["*"; 30_000].join(".");
        let sub =
            |sid, pattern: &str| Sub { sid, pattern: pattern.into(), group: None, kind: SubKind::Events };
        assert_eq!(r.subscribe_remote(2, conn, sub(1, &deep), &route, 10), Err(SubError::Invalid));
        assert_eq!(r.subscribe_remote(2, conn, sub(2, "a..b"), &route, 10), Err(SubError::Invalid));
        assert_eq!(r.subscription_count(), 0);
        r.subscribe_remote(2, conn, sub(3, "a.>"), &route, 10).unwrap();
        assert_eq!(r.subscription_count(), 1);
        assert_eq!(r.remove_route(2), vec![conn]);
        assert_eq!(r.subscription_count(), 0);
        // And a message from a peer on a topic no client could publish reaches nobody.
        let (tx, _rx) = crate::queue::queue();
        let client = Outbox::new(tx);
        r.add_connection(1, None, client.clone());
        r.subscribe(1, 1, ">".into(), None, SubKind::Events, client, 10).unwrap();
        let msg = |topic: &str| Arc::new(Message::new(topic.to_string(), "x"));
        assert_eq!(r.route_from_peer(&msg(&vec!["a"; 30_000].join(".")), 0, FANOUT), 0);
        assert_eq!(r.route_from_peer(&msg("a.b"), 0, FANOUT), 1);
    }

    #[test]
    fn a_new_route_learns_service_names_in_the_order_they_were_registered() {
        let mut r = Router::default();
        let order: Vec<u32> = vec![7, 3, 9, 1, 12, 5, 30, 2];
        for &conn in &order {
            r.add_connection(conn, Some("svc".into()), Outbox::detached());
        }
        assert_eq!(r.resolve_service("svc"), Some(2), "the latest");
        let (tx, mut rx) = crate::queue::queue();
        r.add_route(2, Outbox::new(tx));
        let Some(Outbound::Route(RouteOut::Snapshot(items))) = rx.try_recv() else { panic!("a snapshot") };
        let sent: Vec<u32> = items
            .iter()
            .filter_map(|i| match i {
                RouteOut::Service { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect();
        assert_eq!(sent, order, "the peer registers them in the same order, so resolves the same");
    }
}
