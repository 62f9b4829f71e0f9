//! The router: which connection subscribes to what, and where a published message goes.
//!
//! One [`Router`] per broker, behind a `RwLock`: sessions route their publishes under the read lock
//! (many at once) and change subscriptions under the write lock. Delivery never waits: a message is
//! handed to each subscriber's bounded outbox with `try_send`, and a full outbox marks that
//! subscriber a slow consumer instead of slowing the publisher.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use busbar_core::group::Balancer;
use busbar_core::{ByteString, ErrorCode, GroupPolicy, Message, SubKind, SubscriptionTrie};
use smallvec::SmallVec;

use crate::session::Outbox;

/// One subscription as stored in the trie: where to deliver, and under which id.
#[derive(Debug, Clone)]
pub(crate) struct SubRef {
    conn: u32,
    sid: u64,
    group: Option<Arc<GroupState>>,
    outbox: Outbox,
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
    subs: HashMap<u64, SubEntry>,
    service: Option<ByteString>,
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

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubError {
    Duplicate,
    Limit,
    PolicyMismatch,
}

impl SubError {
    pub(crate) fn code(self) -> ErrorCode {
        match self {
            SubError::Duplicate => ErrorCode::DuplicateSubscription,
            SubError::Limit => ErrorCode::TooManySubscriptions,
            SubError::PolicyMismatch => ErrorCode::InvalidPattern,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Router {
    /// Subscriptions to events (MSG).
    events: SubscriptionTrie<SubRef>,
    /// Subscriptions that answer requests (CALL).
    responders: SubscriptionTrie<SubRef>,
    conns: HashMap<u32, ConnSubs>,
    groups: HashMap<ByteString, (Arc<GroupState>, usize)>,
    /// Service name → connections registered under it, oldest first.
    services: HashMap<ByteString, Vec<u32>>,
    /// Round-robin position for responders that are in no group.
    ungrouped: Balancer,
}

impl Router {
    pub(crate) fn add_connection(&mut self, conn: u32, service: Option<ByteString>) {
        if let Some(name) = &service {
            self.services.entry(name.clone()).or_default().push(conn);
        }
        self.conns.insert(conn, ConnSubs { subs: HashMap::new(), service });
    }

    /// Removes a connection and every subscription it held.
    pub(crate) fn remove_connection(&mut self, conn: u32) {
        let Some(entry) = self.conns.remove(&conn) else { return };
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
    pub(crate) fn resolve_service(&self, name: &str) -> Option<u32> {
        self.services.get(name).and_then(|conns| conns.last().copied())
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
        if entry.subs.contains_key(&sid) {
            return Err(SubError::Duplicate);
        }
        if entry.subs.len() >= limit {
            return Err(SubError::Limit);
        }
        let group = match group {
            None => None,
            Some((name, policy)) => match self.groups.entry(name.clone()) {
                Entry::Occupied(mut e) => {
                    let (state, members) = e.get_mut();
                    if state.policy != policy {
                        return Err(SubError::PolicyMismatch);
                    }
                    *members += 1;
                    Some(state.clone())
                }
                Entry::Vacant(e) => {
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
        trie.insert(&pattern, SubRef { conn, sid, group: group.clone(), outbox });
        entry.subs.insert(sid, SubEntry { pattern, group, kind });
        Ok(())
    }

    /// Removes one subscription; false when the connection had no such id.
    pub(crate) fn unsubscribe(&mut self, conn: u32, sid: u64) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else { return false };
        let Some(sub) = entry.subs.remove(&sid) else { return false };
        self.drop_sub(conn, sid, sub);
        true
    }

    fn drop_sub(&mut self, conn: u32, sid: u64, sub: SubEntry) {
        // Only `conn` and `sid` take part in SubRef equality; the outbox is a placeholder.
        let probe = SubRef { conn, sid, group: None, outbox: Outbox::detached() };
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
    /// Returns how many deliveries were queued.
    pub(crate) fn route(&self, msg: &Arc<Message>, only: Option<u32>) -> usize {
        let mut delivered = 0;
        let own = |s: &SubRef| s.conn == msg.source && s.outbox.no_echo();
        self.recipients(
            &msg.topic,
            msg.key,
            only,
            |s| !own(s),
            |s| {
                delivered += usize::from(s.outbox.deliver(s.sid, msg));
            },
        );
        delivered
    }

    /// The NATS subscriptions a native request goes to when no native responder serves its topic:
    /// as NATS does it, every matching subscription, one member per queue group.
    pub(crate) fn nats_responders(&self, topic: &str, key: Option<u64>, only: Option<u32>) -> Vec<Target> {
        let mut out = Vec::new();
        self.recipients(
            topic,
            key,
            only,
            |s| s.outbox.is_nats(),
            |s| {
                out.push(Target { conn: s.conn, sid: s.sid, outbox: s.outbox.clone() });
            },
        );
        out
    }

    /// The policy of group `name`, while it has members.
    pub(crate) fn group_policy(&self, name: &str) -> Option<GroupPolicy> {
        self.groups.get(name).map(|(g, _)| g.policy)
    }

    /// Calls `visit` for each event subscription that gets a message on `topic`: every matching
    /// plain one, and one member of each matching group (chosen by the group's policy), among
    /// those that pass `keep` and belong to `only` when it is set.
    fn recipients(
        &self,
        topic: &str,
        key: Option<u64>,
        only: Option<u32>,
        keep: impl Fn(&SubRef) -> bool,
        mut visit: impl FnMut(&SubRef),
    ) {
        // On the stack for the usual handful of group members: no allocation per message.
        let mut grouped: SmallVec<[&SubRef; 16]> = SmallVec::new();
        self.events.for_each_match(topic, |s| {
            if only.is_some_and(|c| c != s.conn) || !keep(s) {
                return;
            }
            if s.group.is_none() {
                visit(s);
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
            let chosen = state.balancer.pick(state.policy, key, members.len(), |i| member_id(members[i]));
            visit(members[chosen]);
        }
    }

    /// The responders a request goes to: every matching one for scatter-gather (`all`), else one,
    /// picked by the policy of the first grouped candidate, or round-robin when none is grouped.
    /// `only` restricts candidates to one connection (direct addressing).
    pub(crate) fn select_responders(
        &self,
        topic: &str,
        key: Option<u64>,
        only: Option<u32>,
        all: bool,
    ) -> Vec<Target> {
        let mut candidates: Vec<&SubRef> = Vec::new();
        self.responders.for_each_match(topic, |s| {
            if only.is_none_or(|c| c == s.conn) {
                candidates.push(s);
            }
        });
        if candidates.is_empty() {
            return Vec::new();
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
        let chosen = balancer.pick(policy, key, candidates.len(), |i| member_id(candidates[i]));
        vec![target(candidates[chosen])]
    }
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
        r.add_connection(1, Some("svc".into()));
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
}
