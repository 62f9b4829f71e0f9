//! Requests in flight: which requester waits for which responders.
//!
//! A request is remembered from the moment it is routed until every responder it went to has
//! replied, disconnected, or its timeout has passed (a sweeper forgets expired ones). The table is
//! bounded per requester (`Config::max_requests`): a requester over the limit gets an immediate
//! `TooManyRequests` reply.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use busbar_core::{ByteString, ErrorCode, Frame, Message, Reply};
use bytes::Bytes;
use tokio::time::Instant;

use crate::session::Outbox;

#[derive(Debug)]
struct Pending {
    requester: Outbox,
    topic: ByteString,
    /// Responders that have not answered yet.
    responders: Vec<u32>,
    deadline: Instant,
}

/// Why a request could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooMany;

#[derive(Debug, Default)]
pub(crate) struct Requests {
    pending: HashMap<(u32, u64), Pending>,
    per_requester: HashMap<u32, usize>,
}

/// A REPLY for the requester carrying an error.
pub(crate) fn error_reply(id: u64, code: ErrorCode, remaining: u32, topic: ByteString, text: &str) -> Frame {
    let message = Message::new(topic, Bytes::copy_from_slice(text.as_bytes()));
    Frame::Reply(Reply { id, error: Some(code), remaining, message })
}

impl Requests {
    /// Registers request `id` of `requester`, routed to `responders`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert(
        &mut self,
        requester: u32,
        id: u64,
        outbox: Outbox,
        topic: ByteString,
        responders: Vec<u32>,
        timeout: Duration,
        limit: usize,
    ) -> Result<(), TooMany> {
        let now = Instant::now();
        if self.per_requester.get(&requester).copied().unwrap_or(0) >= limit {
            self.pending.retain(|(r, _), p| *r != requester || p.deadline > now);
            self.recount(requester);
            if self.per_requester.get(&requester).copied().unwrap_or(0) >= limit {
                return Err(TooMany);
            }
        }
        let pending = Pending { requester: outbox, topic, responders, deadline: now + timeout };
        if self.pending.insert((requester, id), pending).is_none() {
            *self.per_requester.entry(requester).or_default() += 1;
        }
        Ok(())
    }

    fn recount(&mut self, requester: u32) {
        let n = self.pending.keys().filter(|(r, _)| *r == requester).count();
        if n == 0 {
            self.per_requester.remove(&requester);
        } else {
            self.per_requester.insert(requester, n);
        }
    }

    fn forget(&mut self, key: (u32, u64)) {
        if self.pending.remove(&key).is_some()
            && let Entry::Occupied(mut e) = self.per_requester.entry(key.0)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// A reply from `responder` to request `id` of `requester`: forwards it and returns true, or
    /// returns false when no such request waits for this responder (late, or forged).
    /// The REPLY's topic is replaced by the request's (the responder does not choose it), and
    /// `may_reply(topic)` decides whether this responder may answer on it; if not, the requester
    /// gets PermissionDenied instead.
    pub(crate) fn reply(
        &mut self,
        requester: u32,
        responder: u32,
        mut reply: Reply,
        may_reply: impl FnOnce(&str) -> bool,
    ) -> bool {
        let key = (requester, reply.id);
        let Some(p) = self.pending.get_mut(&key) else { return false };
        let Some(i) = p.responders.iter().position(|&r| r == responder) else { return false };
        p.responders.swap_remove(i);
        reply.message.topic = p.topic.clone();
        if !may_reply(&p.topic) {
            reply.error = Some(ErrorCode::PermissionDenied);
            reply.message.payload = "the responder may not reply on this topic".into();
            reply.message.headers = Default::default();
        }
        reply.remaining = p.responders.len() as u32;
        reply.message.source = responder;
        reply.message.destination = requester;
        p.requester.deliver_frame(Frame::Reply(reply));
        if p.responders.is_empty() {
            self.forget(key);
        }
        true
    }

    /// A connection is gone: forget its own requests, and fail the ones it was to answer.
    pub(crate) fn remove_connection(&mut self, conn: u32) {
        let keys: Vec<(u32, u64)> = self.pending.keys().copied().collect();
        for key in keys {
            if key.0 == conn {
                self.forget(key);
                continue;
            }
            let Some(p) = self.pending.get_mut(&key) else { continue };
            if !p.responders.contains(&conn) {
                continue;
            }
            // Once per CALL it owed (a connection may answer through several subscriptions).
            while let Some(i) = p.responders.iter().position(|&r| r == conn) {
                p.responders.swap_remove(i);
                let remaining = p.responders.len() as u32;
                let text = "the responder disconnected before it replied";
                let reply = error_reply(key.1, ErrorCode::ResponderLost, remaining, p.topic.clone(), text);
                p.requester.deliver_frame(reply);
            }
            if p.responders.is_empty() {
                self.forget(key);
            }
        }
    }

    /// Forgets requests whose timeout has passed; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let before = self.pending.len();
        let expired: Vec<(u32, u64)> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| *k).collect();
        for key in expired {
            self.forget(key);
        }
        before - self.pending.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_per_requester_and_expiring() {
        let mut r = Requests::default();
        let t = Duration::from_secs(1);
        r.insert(1, 1, Outbox::detached(), "a".into(), vec![2], t, 2).unwrap();
        r.insert(1, 2, Outbox::detached(), "a".into(), vec![2], t, 2).unwrap();
        assert_eq!(r.insert(1, 3, Outbox::detached(), "a".into(), vec![2], t, 2), Err(TooMany));
        // Another requester has its own budget.
        r.insert(9, 1, Outbox::detached(), "a".into(), vec![2], t * 10, 2).unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Over the limit, expired requests are purged first, so there is room again.
        r.insert(1, 3, Outbox::detached(), "a".into(), vec![2], t, 2).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.expire(Instant::now() + t), 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn replies_only_from_the_responders_asked() {
        let mut r = Requests::default();
        r.insert(1, 7, Outbox::detached(), "a".into(), vec![2, 3], Duration::from_secs(5), 10).unwrap();
        let reply = || Reply { id: 7, error: None, remaining: 0, message: Message::new("a", "") };
        assert!(!r.reply(1, 4, reply(), |_| true), "4 was not asked");
        assert!(r.reply(1, 2, reply(), |_| true));
        assert!(!r.reply(1, 2, reply(), |_| true), "2 already answered");
        r.remove_connection(3);
        assert_eq!(r.len(), 0, "3 disconnected: nothing left to wait for");
    }
}
