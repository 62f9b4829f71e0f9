//! Requests in flight: which requester waits for which responders.
//!
//! A request is remembered from the moment it is routed until every responder it went to has
//! replied, disconnected, or its timeout has passed (a sweeper forgets expired ones). The table is
//! bounded per requester (`Config::max_requests`): a requester over the limit gets an immediate
//! `TooManyRequests` reply.
//!
//! Requests cross protocols: a native requester is answered with a REPLY frame; a NATS requester
//! (a PUB with a reply subject, answered by a native responder) is answered by a message routed
//! to its reply subject. A native request that NATS subscribers serve goes, as NATS does it, to
//! every matching subscriber, and the first reply wins.

use std::collections::hash_map::Entry;

use crate::FastMap;
use std::time::Duration;

use busbar_core::{ByteString, ErrorCode, Frame, Message, Reply};
use bytes::Bytes;
use tokio::time::Instant;

use crate::session::Outbox;

/// Where the answer to a request goes.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    /// A native requester: REPLY frames into its outbox.
    Conn(Outbox),
    /// A NATS requester: a message routed to this reply subject.
    Subject(ByteString),
}

/// A request to remember.
#[derive(Debug)]
pub(crate) struct NewRequest {
    pub(crate) reply_to: ReplyTo,
    /// The request's topic (replies are judged on it).
    pub(crate) topic: ByteString,
    /// The connections asked, once per CALL.
    pub(crate) responders: Responders,
    pub(crate) timeout: Duration,
    /// The first reply answers it (NATS-style fan-out to several subscribers); otherwise every
    /// responder asked answers (one, or all for scatter-gather).
    pub(crate) first_wins: bool,
}

#[derive(Debug)]
struct Pending {
    reply_to: ReplyTo,
    topic: ByteString,
    /// Responders that have not answered yet.
    responders: Responders,
    deadline: Instant,
    first_wins: bool,
}

/// Connections asked to answer a request: usually one, on the stack.
pub(crate) type Responders = smallvec::SmallVec<[u32; 4]>;

/// What became of a reply.
#[derive(Debug)]
pub(crate) enum Replied {
    /// No such request waits for this responder (late, or forged).
    Unknown,
    /// Queued for the native requester.
    Delivered,
    /// For a NATS requester: route this message (to its reply subject) to that requester's
    /// subscriptions, once the lock is released.
    Route { requester: u32, message: Message },
}

/// Why a request could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooMany;

#[derive(Debug, Default)]
pub(crate) struct Requests {
    pending: FastMap<(u32, u64), Pending>,
    per_requester: FastMap<u32, usize>,
    /// The broker's `max_frame_size` (0: not checked): a reply given the request's topic in
    /// place of the one it named may grow past it.
    max_frame: usize,
    /// CALLs from other brokers handed to this broker's responders, by (responder, requester,
    /// request id), until their timeout, with how many (a client answers through each of its
    /// subscriptions that matched): a REPLY to another broker's client goes over the route only
    /// when it answers one of them. Otherwise any client could push REPLY frames (with no
    /// publish rights) onto a route until it closed as a slow consumer.
    owed: FastMap<(u32, u32, u64), (Instant, u32)>,
    /// Per connection, the requests in flight it has yet to answer (one per CALL it holds), and
    /// the entries of `owed` it is in (either side): with `per_requester`, a connection gone
    /// that is in none of them (most are publishers and subscribers) is forgotten without a pass
    /// over the whole table, under the lock every request takes.
    asked: FastMap<u32, usize>,
    owes: FastMap<u32, usize>,
}

/// Most CALLs from other brokers awaiting a reply here at once (as many as requests in flight
/// may be); past it, a CALL is refused (TooManyRequests).
pub(crate) const MAX_OWED: usize = MAX_PENDING;

/// Most requests in flight on a broker, all requesters together (each is also held to
/// `max_requests`): the table, and the pass over it when a connection in it goes, stay bounded
/// however many connections there are.
pub(crate) const MAX_PENDING: usize = 1 << 18;

/// The header that carries a native error reply's code to a NATS requester.
pub(crate) const ERROR_HEADER: &str = "Busbar-Error";

/// A REPLY for the requester carrying an error.
pub(crate) fn error_reply(id: u64, code: ErrorCode, remaining: u32, topic: ByteString, text: &str) -> Frame {
    Frame::Reply(refusal(id, code, remaining, topic, text))
}

/// The REPLY of [`error_reply`] itself, for a caller that settles it as a responder's answer.
pub(crate) fn refusal(id: u64, code: ErrorCode, remaining: u32, topic: ByteString, text: &str) -> Reply {
    let message = Message::new(topic, Bytes::copy_from_slice(text.as_bytes()));
    Reply { id, error: Some(code), remaining, message }
}

/// The refusal for a CALL its responder's outbox did not take: the responder is being closed
/// (as a slow consumer, or gone), or, under the Drop policy, kept with a full queue.
pub(crate) fn undelivered_status(outbox: &Outbox) -> (ErrorCode, &'static str) {
    if outbox.control().is_killed() {
        (ErrorCode::ResponderLost, "the responder disconnected before it replied")
    } else {
        (ErrorCode::TooManyRequests, "the responder's outbound queue is full")
    }
}

/// Answers request `(requester, id)` for `responder`, whose `outbox` did not take its CALL
/// ([`Requests::undelivered`]), and settles what that gives.
pub(crate) fn refuse_undelivered(
    shared: &crate::server::Shared,
    (requester, id): (u32, u64),
    responder: u32,
    outbox: &Outbox,
    topic: &ByteString,
) {
    let (code, text) = undelivered_status(outbox);
    let reply = refusal(id, code, 0, topic.clone(), text);
    let replied = shared.requests().undelivered(requester, responder, reply);
    if let Some(replied) = replied {
        settle(replied, shared);
    }
}

/// Finishes a reply outside the requests lock: counts an unknown one as late, and routes one for a
/// NATS requester to its reply subject.
pub(crate) fn settle(replied: Replied, shared: &crate::server::Shared) {
    match replied {
        Replied::Unknown => shared.stats.late_replies.inc(),
        Replied::Delivered => {}
        Replied::Route { requester, message } => {
            // Only to the requester: its reply subject is its own inbox, and nobody else's
            // publish rights are in play.
            let delivered = shared.router().route(&std::sync::Arc::new(message), Some(requester));
            shared.stats.deliveries.add(delivered as u64);
        }
    }
}

impl Requests {
    /// An empty table for a broker whose frames are at most `max_frame` bytes.
    pub(crate) fn new(max_frame: usize) -> Self {
        Self { max_frame, ..Self::default() }
    }

    /// Registers request `id` of `requester`.
    pub(crate) fn insert(
        &mut self,
        requester: u32,
        id: u64,
        request: NewRequest,
        limit: usize,
    ) -> Result<(), TooMany> {
        // Requests past their timeout still count until the sweep (once a second) forgets them:
        // purging here would scan every client's requests, under the lock all requests share,
        // for each REQUEST of a requester that keeps knocking at its limit.
        if self.per_requester.get(&requester).copied().unwrap_or(0) >= limit
            || self.pending.len() >= MAX_PENDING
        {
            return Err(TooMany);
        }
        let NewRequest { reply_to, topic, responders, timeout, first_wins } = request;
        // A copy: the decoded topic shares the whole buffer its frame was read into, and a
        // request may wait long (a payload of a megabyte would stay with a 20-byte topic).
        let topic = ByteString::from(&*topic);
        let deadline = Instant::now() + timeout;
        for &r in &responders {
            count(&mut self.asked, r);
        }
        let pending = Pending { reply_to, topic, responders, deadline, first_wins };
        match self.pending.insert((requester, id), pending) {
            None => count(&mut self.per_requester, requester),
            // The same id again: the one it replaces asks nobody any more.
            Some(old) => old.responders.iter().for_each(|&r| uncount(&mut self.asked, r)),
        }
        Ok(())
    }

    fn forget(&mut self, key: (u32, u64)) {
        if let Some(p) = self.pending.remove(&key) {
            uncount_request(&mut self.per_requester, &mut self.asked, key.0, &p.responders);
        }
    }

    /// A reply from `responder` to request `id` of `requester`: forwards it, or says it is
    /// unknown (late, or forged: only a responder asked may answer).
    /// The REPLY's topic is replaced by the request's (the responder does not choose it), and
    /// `may_reply(topic)` decides whether this responder may answer on it; if not, the requester
    /// gets PermissionDenied instead.
    pub(crate) fn reply(
        &mut self,
        requester: u32,
        responder: u32,
        mut reply: Reply,
        spare: Option<Box<Frame>>,
        may_reply: impl FnOnce(&str) -> bool,
    ) -> Replied {
        let key = (requester, reply.id);
        let Some(p) = self.pending.get_mut(&key) else { return Replied::Unknown };
        let Some(i) = p.responders.iter().position(|&r| r == responder) else { return Replied::Unknown };
        let allowed = may_reply(&p.topic);
        p.responders.swap_remove(i);
        uncount(&mut self.asked, responder);
        if p.first_wins && !allowed {
            // Another subscriber may still answer: this refusal does not end the request.
            if p.responders.is_empty() {
                self.forget(key);
            }
            return Replied::Unknown;
        }
        if p.first_wins {
            p.responders.drain(..).for_each(|r| uncount(&mut self.asked, r));
        }
        if !allowed {
            reply.error = Some(ErrorCode::PermissionDenied);
            reply.message.payload = "the responder may not reply on this topic".into();
            reply.message.headers = Default::default();
        }
        reply.remaining = p.responders.len() as u32;
        reply.message.source = responder;
        let outcome = match &p.reply_to {
            ReplyTo::Conn(outbox) => {
                reply.message.topic = p.topic.clone();
                reply.message.destination = requester;
                // `frame_size` counts 12 bytes of fixed fields; a REPLY has 6.
                if self.max_frame > 0 && reply.message.frame_size() - 6 > self.max_frame {
                    // Its writer could not send it, and the request would wait out its timeout.
                    reply.error = Some(ErrorCode::FrameTooLarge);
                    reply.message.payload =
                        "the reply, with the request's topic, is larger than max_frame_size".into();
                    reply.message.headers = Default::default();
                    reply.message.envelope = None;
                }
                // In the box the REPLY came in, when the caller has it. Past a queue full of
                // messages (drop policy): the requester is owed it.
                outbox.push_answer(crate::session::Outbound::boxed(spare, Frame::Reply(reply)));
                Replied::Delivered
            }
            ReplyTo::Subject(subject) => {
                let mut message = reply.message;
                message.topic = subject.clone();
                message.destination = 0;
                if let Some(code) = reply.error {
                    message.headers.insert(ERROR_HEADER, code.as_u16().to_string());
                }
                Replied::Route { requester, message }
            }
        };
        if p.responders.is_empty() {
            self.forget(key);
        }
        outcome
    }

    /// The CALL of request `reply.id` of `requester` could not be queued for `responder`:
    /// `reply` (its refusal) answers for it. A first-wins request goes on while another
    /// responder may still answer, and nothing is done when the request or this responder's
    /// part in it is already over (its cleanup came first): `None` then, or what to settle.
    pub(crate) fn undelivered(&mut self, requester: u32, responder: u32, reply: Reply) -> Option<Replied> {
        self.refused(requester, responder, reply, |_| true)
    }

    /// [`Requests::undelivered`] for a refusal another broker sent for its responder (gone, its
    /// queue full, or not allowed to reply), judged by `may_reply` on the request's topic.
    pub(crate) fn refused(
        &mut self,
        requester: u32,
        responder: u32,
        reply: Reply,
        may_reply: impl FnOnce(&str) -> bool,
    ) -> Option<Replied> {
        let key = (requester, reply.id);
        let p = self.pending.get_mut(&key)?;
        let i = p.responders.iter().position(|&r| r == responder)?;
        if p.first_wins && p.responders.len() > 1 {
            p.responders.swap_remove(i);
            uncount(&mut self.asked, responder);
            return None;
        }
        Some(self.reply(requester, responder, reply, None, may_reply))
    }

    /// A connection is gone: forget its own requests, and fail the ones it was to answer.
    pub(crate) fn remove_connection(&mut self, conn: u32) {
        self.remove_connections(vec![conn]);
    }

    /// Remembers that local `responder` was handed CALL `id` of `requester` (a client of
    /// another broker), for `timeout`; false when [`MAX_OWED`] are remembered already.
    pub(crate) fn owe(&mut self, responder: u32, requester: u32, id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let full = self.owed.len() >= MAX_OWED;
        match self.owed.entry((responder, requester, id)) {
            Entry::Occupied(mut e) => {
                let (until, calls) = e.get_mut();
                *until = (*until).max(deadline);
                *calls += 1;
            }
            Entry::Vacant(e) => {
                if full {
                    return false;
                }
                e.insert((deadline, 1));
                count(&mut self.owes, responder);
                count(&mut self.owes, requester);
            }
        }
        true
    }

    /// True (once per CALL handed) when `responder` owes `requester` an answer to request `id`:
    /// its REPLY may go over the route.
    pub(crate) fn settle_owed(&mut self, responder: u32, requester: u32, id: u64) -> bool {
        let Entry::Occupied(mut e) = self.owed.entry((responder, requester, id)) else { return false };
        let (_, calls) = e.get_mut();
        *calls -= 1;
        if *calls == 0 {
            e.remove();
            uncount_owed(&mut self.owes, responder, requester);
        }
        true
    }

    /// [`Requests::remove_connection`] for many connections (the clients of a broker whose route
    /// went down) in one pass over the requests in flight, not one pass each.
    pub(crate) fn remove_connections(&mut self, mut gone: Vec<u32>) {
        let Self { pending, per_requester, owed, asked, owes, .. } = self;
        // Those in no request and owed nothing: nothing to walk for.
        gone.retain(|c| per_requester.contains_key(c) || asked.contains_key(c) || owes.contains_key(c));
        if gone.is_empty() {
            return;
        }
        gone.sort_unstable();
        let is_gone = |conn: &u32| gone.binary_search(conn).is_ok();
        if gone.iter().any(|c| owes.contains_key(c)) {
            // Owed by a responder gone, or to a requester gone (another broker's client: its
            // broker forgot the request).
            owed.retain(|&(responder, requester, _), _| {
                let keep = !is_gone(&responder) && !is_gone(&requester);
                if !keep {
                    uncount_owed(owes, responder, requester);
                }
                keep
            });
        }
        if !gone.iter().any(|c| per_requester.contains_key(c) || asked.contains_key(c)) {
            return;
        }
        // One pass, in place: no copy of the keys (the table may be large).
        pending.retain(|&(requester, id), p| {
            let keep = if is_gone(&requester) {
                false
            } else if !p.responders.iter().any(is_gone) {
                true
            } else {
                // Once per CALL owed (a connection may answer through several subscriptions).
                while let Some(i) = p.responders.iter().position(is_gone) {
                    let r = p.responders.swap_remove(i);
                    uncount(asked, r);
                    // First-wins requests fail only when nobody is left to answer; a NATS
                    // requester has no way to hear of a lost responder and times out by itself.
                    if (p.first_wins && !p.responders.is_empty()) || matches!(p.reply_to, ReplyTo::Subject(_))
                    {
                        continue;
                    }
                    let remaining = p.responders.len() as u32;
                    let text = "the responder disconnected before it replied";
                    let reply = error_reply(id, ErrorCode::ResponderLost, remaining, p.topic.clone(), text);
                    if let ReplyTo::Conn(outbox) = &p.reply_to {
                        outbox.push_answer(crate::session::Outbound::frame(reply));
                    }
                }
                !p.responders.is_empty()
            };
            if !keep {
                uncount_request(per_requester, asked, requester, &p.responders);
            }
            keep
        });
    }

    /// Forgets requests whose timeout has passed; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let Self { pending, per_requester, owed, asked, owes, .. } = self;
        owed.retain(|&(responder, requester, _), (deadline, _)| {
            let keep = *deadline > now;
            if !keep {
                uncount_owed(owes, responder, requester);
            }
            keep
        });
        let before = pending.len();
        pending.retain(|&(requester, _), p| {
            let keep = p.deadline > now;
            if !keep {
                uncount_request(per_requester, asked, requester, &p.responders);
            }
            keep
        });
        before - pending.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// One more for `conn` in one of the per-connection counts.
fn count(counts: &mut FastMap<u32, usize>, conn: u32) {
    *counts.entry(conn).or_default() += 1;
}

/// A request of `requester` leaves the table, still owed by `responders`.
fn uncount_request(
    per_requester: &mut FastMap<u32, usize>,
    asked: &mut FastMap<u32, usize>,
    requester: u32,
    responders: &[u32],
) {
    uncount(per_requester, requester);
    responders.iter().for_each(|&r| uncount(asked, r));
}

/// An entry of `owed` leaves the table.
fn uncount_owed(owes: &mut FastMap<u32, usize>, responder: u32, requester: u32) {
    uncount(owes, responder);
    uncount(owes, requester);
}

/// One fewer for `conn` (a count that reaches zero leaves the map).
fn uncount(counts: &mut FastMap<u32, usize>, conn: u32) {
    if let Entry::Occupied(mut e) = counts.entry(conn) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_per_requester_and_expiring() {
        let mut r = Requests::default();
        let t = Duration::from_secs(1);
        r.insert(1, 1, native(vec![2], t), 2).unwrap();
        r.insert(1, 2, native(vec![2], t), 2).unwrap();
        assert_eq!(r.insert(1, 3, native(vec![2], t), 2), Err(TooMany));
        // Another requester has its own budget.
        r.insert(9, 1, native(vec![2], t * 10), 2).unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Expired requests count until the sweep forgets them; then there is room again.
        assert_eq!(r.insert(1, 3, native(vec![2], t), 2), Err(TooMany));
        assert_eq!(r.expire(Instant::now()), 2);
        r.insert(1, 3, native(vec![2], t), 2).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.expire(Instant::now() + t), 1);
        assert_eq!(r.len(), 1);
        // However many requesters, the broker's table is bounded.
        let mut r = Requests::default();
        for requester in 0..MAX_PENDING as u32 {
            r.insert(requester, 1, native(vec![2], t), 2).unwrap();
        }
        assert_eq!(r.insert(u32::MAX, 1, native(vec![2], t), 2), Err(TooMany));
    }

    impl Requests {
        /// Asserts that the per-connection counts are what the tables hold.
        fn check_counts(&self) {
            let (mut per_requester, mut asked, mut owes) =
                <(FastMap<u32, usize>, FastMap<_, _>, FastMap<_, _>)>::default();
            for (&(requester, _), p) in &self.pending {
                count(&mut per_requester, requester);
                p.responders.iter().for_each(|&r| count(&mut asked, r));
            }
            for &(responder, requester, _) in self.owed.keys() {
                count(&mut owes, responder);
                count(&mut owes, requester);
            }
            assert_eq!(per_requester, self.per_requester, "per requester");
            assert_eq!(asked, self.asked, "asked");
            assert_eq!(owes, self.owes, "owes");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert { requester: u32, id: u64, responders: Vec<u32>, first_wins: bool, subject: bool, short: bool },
        Reply { requester: u32, id: u64, responder: u32, allowed: bool },
        Refused { requester: u32, id: u64, responder: u32, allowed: bool },
        Owe { responder: u32, requester: u32, id: u64, short: bool },
        SettleOwed { responder: u32, requester: u32, id: u64 },
        Gone(Vec<u32>),
        Expire,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Few connections and ids, so that operations meet the same requests.
        let conn = || 0u32..6;
        let id = || 0u64..4;
        prop_oneof![
            4 => (conn(), id(), proptest::collection::vec(conn(), 0..4), any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(requester, id, responders, first_wins, subject, short)| Op::Insert {
                    requester, id, responders, first_wins, subject, short
                }),
            4 => (conn(), id(), conn(), any::<bool>())
                .prop_map(|(requester, id, responder, allowed)| Op::Reply { requester, id, responder, allowed }),
            2 => (conn(), id(), conn(), any::<bool>())
                .prop_map(|(requester, id, responder, allowed)| Op::Refused { requester, id, responder, allowed }),
            2 => (conn(), conn(), id(), any::<bool>())
                .prop_map(|(responder, requester, id, short)| Op::Owe { responder, requester, id, short }),
            2 => (conn(), conn(), id()).prop_map(|(responder, requester, id)| Op::SettleOwed { responder, requester, id }),
            2 => proptest::collection::vec(conn(), 1..3).prop_map(Op::Gone),
            1 => Just(Op::Expire),
        ]
    }

    proptest::proptest! {
        /// Whatever happens to requests, the per-connection counts that let a disconnect skip
        /// the table stay exact; and a connection they say is in nothing is in nothing.
        #[test]
        fn the_per_connection_counts_follow_the_tables(ops in proptest::collection::vec(op(), 1..60)) {
            let mut r = Requests::default();
            let long = Duration::from_secs(3600);
            for op in ops {
                match op {
                    Op::Insert { requester, id, responders, first_wins, subject, short } => {
                        let reply_to = if subject {
                            ReplyTo::Subject("_INBOX.x".into())
                        } else {
                            ReplyTo::Conn(Outbox::detached())
                        };
                        let responders = responders.into();
                        // A short one expires at the next sweep.
                        let timeout = if short { Duration::ZERO } else { long };
                        let ask = NewRequest { reply_to, topic: "a".into(), responders, timeout, first_wins };
                        let _ = r.insert(requester, id, ask, 3);
                    }
                    Op::Reply { requester, id, responder, allowed } => {
                        let _ = r.reply(requester, responder, reply(id), None, |_| allowed);
                    }
                    Op::Refused { requester, id, responder, allowed } => {
                        let _ = r.refused(requester, responder, reply(id), |_| allowed);
                    }
                    Op::Owe { responder, requester, id, short } => {
                        let _ = r.owe(responder, requester, id, if short { Duration::ZERO } else { long });
                    }
                    Op::SettleOwed { responder, requester, id } => {
                        let _ = r.settle_owed(responder, requester, id);
                    }
                    Op::Gone(gone) => {
                        let skipped: Vec<u32> = gone
                            .iter()
                            .copied()
                            .filter(|c| !r.per_requester.contains_key(c) && !r.asked.contains_key(c) && !r.owes.contains_key(c))
                            .collect();
                        r.remove_connections(gone.clone());
                        // Every connection gone is out of every table, skipped or not.
                        for c in gone {
                            proptest::prop_assert!(r.pending.iter().all(|(&(q, _), p)| q != c && !p.responders.contains(&c)));
                            proptest::prop_assert!(r.owed.keys().all(|&(a, q, _)| a != c && q != c), "{skipped:?}");
                        }
                    }
                    Op::Expire => {
                        r.expire(Instant::now() + Duration::from_millis(1));
                    }
                }
                r.check_counts();
            }
        }
    }

    fn native(responders: Vec<u32>, timeout: Duration) -> NewRequest {
        let reply_to = ReplyTo::Conn(Outbox::detached());
        NewRequest { reply_to, topic: "a".into(), responders: responders.into(), timeout, first_wins: false }
    }

    fn reply(id: u64) -> Reply {
        Reply { id, error: None, remaining: 0, message: Message::new("a", "") }
    }

    #[test]
    fn a_reply_grown_past_the_frame_limit_by_the_requests_topic_is_refused_instead() {
        let mut r = Requests::new(400);
        let (tx, mut rx) = crate::queue::queue();
        let long_topic: ByteString = "t".repeat(200).into();
        let ask = NewRequest {
            reply_to: ReplyTo::Conn(Outbox::new(tx)),
            topic: long_topic.clone(),
            responders: vec![2].into(),
            timeout: Duration::from_secs(5),
            first_wins: false,
        };
        r.insert(1, 7, ask, 10).unwrap();
        // Named its own short topic: fit as sent, not once given the request's.
        let reply = Reply { id: 7, error: None, remaining: 0, message: Message::new("x", vec![0u8; 190]) };
        assert!(reply.message.frame_size() <= 400);
        assert!(matches!(r.reply(1, 2, reply, None, |_| true), Replied::Delivered));
        let Some(crate::session::Outbound::Frame(frame)) = rx.try_recv() else { panic!("a reply") };
        let Frame::Reply(reply) = *frame else { panic!("a REPLY") };
        assert_eq!((reply.id, reply.error), (7, Some(ErrorCode::FrameTooLarge)));
        assert_eq!(reply.message.topic, long_topic);
        assert!(reply.message.frame_size() <= 400);
    }

    #[tokio::test]
    async fn calls_owed_to_other_brokers_are_counted_and_forgotten_with_either_end() {
        let mut r = Requests::default();
        let t = Duration::from_secs(5);
        // Client 2 got request 7 of remote client 9 through two of its subscriptions.
        assert!(r.owe(2, 9, 7, t) && r.owe(2, 9, 7, t));
        assert!(r.settle_owed(2, 9, 7) && r.settle_owed(2, 9, 7));
        assert!(!r.settle_owed(2, 9, 7), "two CALLs, two replies");
        assert!(!r.settle_owed(3, 9, 8), "never handed");
        // Forgotten when the responder goes, or the requester (its broker said so).
        assert!(r.owe(2, 9, 1, t) && r.owe(4, 10, 1, t));
        r.remove_connections(vec![2, 10]);
        assert!(!r.settle_owed(2, 9, 1) && !r.settle_owed(4, 10, 1));
        // And at their timeout.
        assert!(r.owe(5, 9, 1, t));
        r.expire(Instant::now() + t * 2);
        assert!(!r.settle_owed(5, 9, 1));
    }

    #[test]
    fn replies_only_from_the_responders_asked() {
        let mut r = Requests::default();
        r.insert(1, 7, native(vec![2, 3], Duration::from_secs(5)), 10).unwrap();
        assert!(matches!(r.reply(1, 4, reply(7), None, |_| true), Replied::Unknown), "4 was not asked");
        assert!(matches!(r.reply(1, 2, reply(7), None, |_| true), Replied::Delivered));
        assert!(matches!(r.reply(1, 2, reply(7), None, |_| true), Replied::Unknown), "2 already answered");
        r.remove_connection(3);
        assert_eq!(r.len(), 0, "3 disconnected: nothing left to wait for");
    }

    #[test]
    fn a_disconnect_forgets_its_requests_and_fails_what_it_owed() {
        let mut r = Requests::default();
        let t = Duration::from_secs(5);
        let (tx, mut rx) = crate::queue::queue();
        let requester = Outbox::new(tx);
        let ask = |responders: Vec<u32>| NewRequest {
            reply_to: ReplyTo::Conn(requester.clone()),
            topic: "a".into(),
            responders: responders.into(),
            timeout: t,
            first_wins: false,
        };
        r.insert(1, 1, ask(vec![2, 3]), 2).unwrap(); // scatter-gather to 2 and 3
        r.insert(1, 2, ask(vec![3]), 2).unwrap();
        r.insert(9, 1, native(vec![2], t), 2).unwrap();
        assert_eq!(r.insert(1, 3, ask(vec![2]), 2), Err(TooMany));
        r.remove_connections(vec![9, 3]);
        // 1's first request still waits for 2, its second is over; 9's is forgotten.
        assert_eq!(r.len(), 1);
        r.insert(1, 3, ask(vec![2]), 2).expect("room again: the count went down with it");
        let mut lost = Vec::new();
        while let Some(crate::session::Outbound::Frame(frame)) = rx.try_recv() {
            if let Frame::Reply(reply) = *frame {
                lost.push((reply.id, reply.error, reply.remaining));
            }
        }
        lost.sort_unstable_by_key(|(id, _, _)| *id);
        let gone = Some(ErrorCode::ResponderLost);
        assert_eq!(lost, [(1, gone, 1), (2, gone, 0)]);
    }

    #[test]
    fn an_undelivered_call_ends_a_first_wins_request_only_when_nobody_else_was_asked() {
        let mut r = Requests::default();
        let t = Duration::from_secs(5);
        let first_wins = |responders: Vec<u32>| NewRequest { first_wins: true, ..native(responders, t) };
        let refusal = |id| super::refusal(id, ErrorCode::TooManyRequests, 0, "a".into(), "full");
        r.insert(1, 7, first_wins(vec![2, 3]), 10).unwrap();
        assert!(r.undelivered(1, 2, refusal(7)).is_none(), "3 may still answer");
        assert!(r.undelivered(1, 2, refusal(7)).is_none(), "2 is no longer asked");
        assert_eq!(r.len(), 1);
        assert!(matches!(r.reply(1, 3, reply(7), None, |_| true), Replied::Delivered));
        assert_eq!(r.len(), 0);
        // Alone, its refusal is the answer; once the request is over, nothing (not a late reply).
        r.insert(1, 8, first_wins(vec![2]), 10).unwrap();
        assert!(matches!(r.undelivered(1, 2, refusal(8)), Some(Replied::Delivered)));
        assert!(r.undelivered(1, 2, refusal(8)).is_none());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn nats_requests_are_answered_on_their_reply_subject_and_first_reply_wins() {
        let mut r = Requests::default();
        let reply_to = ReplyTo::Subject("_INBOX.x".into());
        let t = Duration::from_secs(5);
        r.insert(
            1,
            7,
            NewRequest {
                reply_to,
                topic: "a".into(),
                responders: smallvec::smallvec![2, 3],
                timeout: t,
                first_wins: true,
            },
            10,
        )
        .unwrap();
        r.remove_connection(3);
        assert_eq!(r.len(), 1, "2 may still answer");
        let mut failed = reply(7);
        failed.error = Some(ErrorCode::NoResponders);
        let Replied::Route { requester: 1, message: m } = r.reply(1, 2, failed, None, |_| true) else {
            panic!("not routed to the requester")
        };
        assert_eq!(&*m.topic, "_INBOX.x");
        assert_eq!(m.headers.get(ERROR_HEADER), Some("400"));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_refused_first_reply_does_not_end_a_first_wins_request() {
        let mut r = Requests::default();
        let t = Duration::from_secs(5);
        let request = NewRequest { first_wins: true, ..native(vec![2, 3], t) };
        r.insert(1, 7, request, 10).unwrap();
        assert!(
            matches!(r.reply(1, 2, reply(7), None, |_| false), Replied::Unknown),
            "refused, not delivered"
        );
        assert_eq!(r.len(), 1, "3 may still answer");
        assert!(matches!(r.reply(1, 3, reply(7), None, |_| true), Replied::Delivered));
        assert_eq!(r.len(), 0);
    }
}
