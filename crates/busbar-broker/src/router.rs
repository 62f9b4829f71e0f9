//! The router: which connection subscribes to what, and where a published message goes.
//!
//! One [`Router`] per broker, behind a `RwLock`: sessions route their publishes under the read lock
//! (many at once) and change subscriptions under the write lock. Delivery never waits: a message is
//! handed to each subscriber's bounded outbox with `try_send`, and a full outbox marks that
//! subscriber a slow consumer instead of slowing the publisher.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use busbar_core::{ByteString, ErrorCode, GroupPolicy, Message, SubscriptionTrie};

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
    next: AtomicU64,
}

/// What a connection holds, for cleanup and monitoring.
#[derive(Debug)]
struct ConnSubs {
    subs: HashMap<u64, (ByteString, Option<Arc<GroupState>>)>,
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
    trie: SubscriptionTrie<SubRef>,
    conns: HashMap<u32, ConnSubs>,
    groups: HashMap<ByteString, (Arc<GroupState>, usize)>,
}

impl Router {
    pub(crate) fn add_connection(&mut self, conn: u32) {
        self.conns.insert(conn, ConnSubs { subs: HashMap::new() });
    }

    /// Removes a connection and every subscription it held.
    pub(crate) fn remove_connection(&mut self, conn: u32) {
        let Some(entry) = self.conns.remove(&conn) else { return };
        for (sid, (pattern, group)) in entry.subs {
            self.drop_sub(conn, sid, &pattern, group);
        }
    }

    pub(crate) fn subscribe(
        &mut self,
        conn: u32,
        sid: u64,
        pattern: ByteString,
        group: Option<(ByteString, GroupPolicy)>,
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
                    let state = Arc::new(GroupState { name, policy, next: AtomicU64::new(0) });
                    e.insert((state.clone(), 1));
                    Some(state)
                }
            },
        };
        entry.subs.insert(sid, (pattern.clone(), group.clone()));
        self.trie.insert(&pattern, SubRef { conn, sid, group, outbox });
        Ok(())
    }

    /// Removes one subscription; false when the connection had no such id.
    pub(crate) fn unsubscribe(&mut self, conn: u32, sid: u64) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else { return false };
        let Some((pattern, group)) = entry.subs.remove(&sid) else { return false };
        self.drop_sub(conn, sid, &pattern, group);
        true
    }

    fn drop_sub(&mut self, conn: u32, sid: u64, pattern: &str, group: Option<Arc<GroupState>>) {
        // Only `conn` and `sid` take part in SubRef equality; the outbox is a placeholder.
        let probe = SubRef { conn, sid, group: None, outbox: Outbox::detached() };
        self.trie.remove(pattern, &probe);
        if let Some(g) = group
            && let Entry::Occupied(mut e) = self.groups.entry(g.name.clone())
        {
            e.get_mut().1 -= 1;
            if e.get().1 == 0 {
                e.remove();
            }
        }
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.trie.len()
    }

    /// Delivers `msg` to every matching plain subscription and to one member of every matching
    /// group. Returns how many deliveries were queued.
    pub(crate) fn route(&self, msg: &Arc<Message>) -> usize {
        let mut delivered = 0;
        let mut grouped: Vec<&SubRef> = Vec::new();
        self.trie.for_each_match(&msg.topic, |s| {
            if s.group.is_none() {
                delivered += usize::from(s.outbox.deliver(s.sid, msg));
            } else {
                grouped.push(s);
            }
        });
        if grouped.is_empty() {
            return delivered;
        }
        // Stable order (by group, then member) so that round-robin and hashing are deterministic.
        grouped.sort_unstable_by(|a, b| {
            let (ga, gb) = (a.group.as_ref().map(|g| &g.name), b.group.as_ref().map(|g| &g.name));
            ga.cmp(&gb).then(a.conn.cmp(&b.conn)).then(a.sid.cmp(&b.sid))
        });
        for members in
            grouped.chunk_by(|a, b| a.group.as_ref().map(|g| &g.name) == b.group.as_ref().map(|g| &g.name))
        {
            let Some(state) = members[0].group.as_ref() else { continue };
            let chosen = match state.policy {
                GroupPolicy::Random => rand::random_range(0..members.len()),
                GroupPolicy::RoundRobin => {
                    (state.next.fetch_add(1, Ordering::Relaxed) % members.len() as u64) as usize
                }
                GroupPolicy::Hash => Self::rendezvous(msg.key.unwrap_or(0), members),
            };
            let m = members[chosen];
            delivered += usize::from(m.outbox.deliver(m.sid, msg));
        }
        delivered
    }

    /// Rendezvous (highest random weight) hashing: each member scores `hash(key, member)`, the
    /// highest wins. Adding a member moves only the keys it now wins, about 1/(n+1) of them.
    fn rendezvous(key: u64, members: &[&SubRef]) -> usize {
        let score = |m: &SubRef| mix(key ^ mix((u64::from(m.conn) << 32) ^ m.sid));
        (0..members.len()).max_by_key(|&i| score(members[i])).unwrap_or(0)
    }
}

/// splitmix64's finaliser: a fixed, well-spread 64-bit mix, the same on every broker and run.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_unsubscribe_and_cleanup_keep_counts_right() {
        let mut r = Router::default();
        r.add_connection(1);
        r.subscribe(1, 1, "a.>".into(), None, Outbox::detached(), 10).unwrap();
        r.subscribe(1, 2, "a.*".into(), Some(("g".into(), GroupPolicy::Random)), Outbox::detached(), 10)
            .unwrap();
        assert_eq!(r.subscribe(1, 2, "b".into(), None, Outbox::detached(), 10), Err(SubError::Duplicate));
        assert_eq!(
            r.subscribe(1, 3, "b".into(), Some(("g".into(), GroupPolicy::Hash)), Outbox::detached(), 10),
            Err(SubError::PolicyMismatch)
        );
        assert_eq!(r.subscribe(1, 9, "c".into(), None, Outbox::detached(), 2), Err(SubError::Limit));
        assert_eq!(r.subscription_count(), 2);
        assert!(r.unsubscribe(1, 1));
        assert!(!r.unsubscribe(1, 1));
        assert_eq!(r.subscription_count(), 1);
        r.remove_connection(1);
        assert_eq!(r.subscription_count(), 0);
        assert!(r.groups.is_empty());
    }
}
