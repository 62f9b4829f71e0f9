//! The queue from the client's handles to its connection task.
//!
//! Like a bounded channel of [`Command`]s, with one difference that matters for speed: a publish
//! is encoded straight into the run of PUB frames at the tail of the queue, under the queue's
//! lock, instead of travelling as a command of its own. A publish therefore costs one
//! uncontended lock and the encoding, with no allocation, no per-message reference count and no
//! wake-up of the connection task unless the queue was empty; the task takes everything queued in
//! one lock and writes each run of frames straight from its buffer. A publish that does not fit
//! in the room left in the tail run starts a new run, so a buffer is never grown by copying.
//!
//! Order is kept: other commands queue behind the run they follow, so a `flush` after a publish
//! still covers it. The bound counts each publish as one command, as before.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::connection::Command;
use crate::error::{Error, Result};

/// Room a new run of frames starts with.
const RUN_CAPACITY: usize = 16 * 1024;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The connection task, waiting for commands.
    task: AtomicWaker,
    /// Handles waiting for room.
    room: Notify,
    /// Live senders; the queue ends for the task when the last one goes.
    senders: AtomicUsize,
    capacity: usize,
}

#[derive(Debug)]
struct State {
    items: VecDeque<Command>,
    /// Commands queued, each publish counted as one.
    len: usize,
    /// The connection task is gone: sends fail.
    closed: bool,
    /// Someone waits for room.
    waiting: bool,
    /// Runs' buffers given back by the task, for the next runs (at most [`SPARE_RUNS`]): a
    /// publisher ahead of the task has several runs queued, and each new one allocated afresh
    /// faulted in new pages as it was filled.
    spares: Vec<BytesMut>,
}

/// Most run buffers kept for reuse.
const SPARE_RUNS: usize = 4;

impl State {
    /// Keeps `run`, emptied, for a next run: up to [`SPARE_RUNS`], none larger than four runs'
    /// worth (one grown for a large frame is let go of).
    fn keep_spare(&mut self, mut run: BytesMut) {
        if run.capacity() <= 4 * RUN_CAPACITY && self.spares.len() < SPARE_RUNS {
            run.clear();
            self.spares.push(run);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics under this lock but an encoder on a broken invariant; what it leaves
        // is still a consistent queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new queue for at most `capacity` commands.
pub(crate) fn commands(capacity: usize) -> (CommandTx, CommandRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            len: 0,
            closed: false,
            waiting: false,
            spares: Vec::new(),
        }),
        task: AtomicWaker::new(),
        room: Notify::new(),
        senders: AtomicUsize::new(1),
        capacity: capacity.max(1),
    });
    (CommandTx { shared: shared.clone() }, CommandRx { shared, taken: VecDeque::new() })
}

/// The error of a full queue or one whose task is gone, with the command given back.
#[derive(Debug)]
pub(crate) enum TrySendError {
    Full(Command),
    Closed,
}

/// A handle's side. Cloning it counts one more sender.
#[derive(Debug)]
pub(crate) struct CommandTx {
    shared: Arc<Shared>,
}

impl Clone for CommandTx {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: self.shared.clone() }
    }
}

impl Drop for CommandTx {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.task.wake();
        }
    }
}

impl CommandTx {
    /// A handle that does not keep the connection task alive.
    pub(crate) fn downgrade(&self) -> WeakCommandTx {
        WeakCommandTx { shared: self.shared.clone() }
    }

    /// Queues `command` if there is room now.
    pub(crate) fn try_send(&self, command: Command) -> std::result::Result<(), TrySendError> {
        let state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed);
        }
        if state.len >= self.shared.capacity {
            return Err(TrySendError::Full(command));
        }
        self.push(state, command);
        Ok(())
    }

    /// Queues `command`, waiting for room.
    pub(crate) async fn send(&self, command: Command) -> Result<()> {
        // Without a `Notified` registered (a lock on the Notify's list, and another to leave it)
        // when there is room, the usual case.
        let command = match self.try_send(command) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed) => return Err(Error::Closed),
            Err(TrySendError::Full(command)) => command,
        };
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before looking, so that room made in between is not missed.
            room.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if state.closed {
                    return Err(Error::Closed);
                }
                if state.len < self.shared.capacity {
                    self.push(state, command);
                    return Ok(());
                }
                // Under the lock that found it full: the task's next take sees it.
                state.waiting = true;
            }
            room.await;
        }
    }

    /// Encodes a publish into the run of frames at the tail of the queue, waiting for room.
    /// `encode` appends one frame of `size` bytes (its exact length, prefix included), or leaves
    /// the buffer as it was and fails. A frame over `max` (the broker's `max_frame_size`) fails
    /// first, without taking the lock or room for it. (REQUEST and REPLY frames go the same way:
    /// see [`CommandTx::request`].)
    pub(crate) async fn publish(
        &self,
        size: usize,
        max: usize,
        encode: impl Fn(&mut BytesMut) -> Result<()> + Sync,
    ) -> Result<()> {
        fits(size, max)?;
        self.encode_after(None, size, &encode).await
    }

    /// Like [`CommandTx::publish`] for a REQUEST frame, with `expect` (the command that
    /// registers where its replies go) queued before the run the frame is in, so that the
    /// connection task knows the request before it writes it. Nothing is queued when `encode`
    /// fails. The two count as two commands against the bound, which is checked once (so the
    /// queue may hold one more than its capacity).
    pub(crate) async fn request(
        &self,
        expect: Command,
        size: usize,
        max: usize,
        encode: impl Fn(&mut BytesMut) -> Result<()> + Sync,
    ) -> Result<()> {
        fits(size, max)?;
        self.encode_after(Some(expect), size, &encode).await
    }

    /// [`CommandTx::publish`] without waiting, for the replies that cannot wait: a refusal
    /// made by the connection task itself, or the error reply of a request dropped unanswered.
    /// These may use a reserve as large again as the queue, beyond the room publishes have, so
    /// that an application publishing at full speed does not make its refusals vanish (and their
    /// requesters wait out their timeouts). Fails with `BufferFull` only when the reserve is
    /// used up too.
    pub(crate) fn try_publish(
        &self,
        size: usize,
        max: usize,
        encode: impl Fn(&mut BytesMut) -> Result<()>,
    ) -> Result<()> {
        fits(size, max)?;
        let state = self.shared.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        if state.len >= self.shared.capacity.saturating_mul(2) {
            return Err(Error::BufferFull { capacity: self.shared.capacity });
        }
        self.encode_into(state, None, size, &encode)
    }

    /// Encodes at once when there is room (the usual case); otherwise waits for it. The
    /// waiting half is boxed, so the future of every publish stays small: futures are moved
    /// (copied) as they are built and awaited, and a `Notified` in each would be copied with it.
    async fn encode_after(
        &self,
        first: Option<Command>,
        size: usize,
        encode: &(dyn Fn(&mut BytesMut) -> Result<()> + Sync),
    ) -> Result<()> {
        let first = {
            let state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            if state.len < self.shared.capacity {
                return self.encode_into(state, first, size, encode);
            }
            first
        };
        Box::pin(self.wait_and_encode(first, size, encode)).await
    }

    /// [`CommandTx::encode_after`] for a full queue (rare): waits like any other command.
    async fn wait_and_encode(
        &self,
        mut first: Option<Command>,
        size: usize,
        encode: &(dyn Fn(&mut BytesMut) -> Result<()> + Sync),
    ) -> Result<()> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before looking, so that room made in between is not missed.
            room.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if state.closed {
                    return Err(Error::Closed);
                }
                if state.len < self.shared.capacity {
                    return self.encode_into(state, first.take(), size, encode);
                }
                state.waiting = true;
            }
            room.await;
        }
    }

    fn encode_into(
        &self,
        mut state: MutexGuard<'_, State>,
        first: Option<Command>,
        size: usize,
        encode: impl Fn(&mut BytesMut) -> Result<()>,
    ) -> Result<()> {
        let was_empty = state.items.is_empty();
        // A run without room for the frame is left as it is (a new one starts) rather than grown,
        // copying.
        let tail = state.items.len();
        if let Some(Command::Publish(run)) = state.items.back_mut()
            && run.capacity() - run.len() >= size
        {
            encode(run)?;
            if let Some(first) = first {
                // Before the run, which the task has not taken yet: it reads `first` before it
                // writes any of the run's frames (moving it ahead of earlier publishes is
                // harmless).
                state.items.insert(tail - 1, first);
                state.len += 1;
            }
        } else {
            let spare = state.spares.pop().filter(|run| run.capacity() >= size);
            let mut run = spare.unwrap_or_else(|| BytesMut::with_capacity(size.max(RUN_CAPACITY)));
            if let Err(e) = encode(&mut run) {
                state.keep_spare(run);
                return Err(e);
            }
            if let Some(first) = first {
                state.items.push_back(first);
                state.len += 1;
            }
            state.items.push_back(Command::Publish(run));
        }
        state.len += 1;
        drop(state);
        if was_empty {
            self.shared.task.wake();
        }
        Ok(())
    }

    fn push(&self, mut state: MutexGuard<'_, State>, command: Command) {
        let was_empty = state.items.is_empty();
        state.items.push_back(command);
        state.len += 1;
        drop(state);
        // The task takes everything when it wakes: later commands need no wake of their own.
        if was_empty {
            self.shared.task.wake();
        }
    }
}

/// Refuses a frame of `size` bytes (prefix included) over `max`, with the error its encoding
/// would give.
fn fits(size: usize, max: usize) -> Result<()> {
    let size = size.saturating_sub(busbar_core::frame::LEN_PREFIX);
    if size > max {
        return Err(busbar_core::frame::FrameError::TooLarge { size, max }.into());
    }
    Ok(())
}

/// A handle that does not keep the connection task alive (the task's own, for the requests it
/// hands to responders).
#[derive(Debug, Clone)]
pub(crate) struct WeakCommandTx {
    shared: Arc<Shared>,
}

impl WeakCommandTx {
    /// A sender, unless every sender is gone.
    pub(crate) fn upgrade(&self) -> Option<CommandTx> {
        let mut n = self.shared.senders.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return None;
            }
            match self.shared.senders.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(CommandTx { shared: self.shared.clone() }),
                Err(now) => n = now,
            }
        }
    }
}

/// The connection task's side. Dropping it fails every later send.
#[derive(Debug)]
pub(crate) struct CommandRx {
    shared: Arc<Shared>,
    /// Taken from the queue, not yet handed out.
    taken: VecDeque<Command>,
}

impl Drop for CommandRx {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.len = 0;
            std::mem::take(&mut state.items)
        };
        // Outside the lock: dropping commands drops their reply channels.
        drop(items);
        self.shared.room.notify_waiters();
    }
}

impl CommandRx {
    /// Moves everything queued to `taken`; false when there was nothing.
    fn take(&mut self) -> bool {
        let mut state = self.shared.lock();
        if state.items.is_empty() {
            return false;
        }
        // Swapped, so that both buffers keep their capacity (`taken` is drained here); one grown
        // by a burst under a large bound is let go.
        if self.taken.capacity() > 4096 {
            self.taken = VecDeque::new();
        }
        std::mem::swap(&mut state.items, &mut self.taken);
        state.len = 0;
        let waiting = std::mem::take(&mut state.waiting);
        drop(state);
        if waiting {
            self.shared.room.notify_waiters();
        }
        true
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.taken.is_empty() || self.take() {
            return Poll::Ready(true);
        }
        self.shared.task.register(cx.waker());
        // Again after registering: a send in between woke the old waker, or wakes this one.
        if self.take() {
            return Poll::Ready(true);
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            // The last sender may have queued just before it went.
            return Poll::Ready(self.take());
        }
        Poll::Pending
    }

    /// The next command; `None` once every sender is gone and the queue is empty.
    #[cfg(test)]
    pub(crate) async fn recv(&mut self) -> Option<Command> {
        if poll_fn(|cx| self.poll_ready(cx)).await { self.taken.pop_front() } else { None }
    }

    /// Waits for commands and moves all that are queued (at least one) to `into`; 0 once every
    /// sender is gone and the queue is empty.
    pub(crate) async fn recv_all(&mut self, into: &mut Vec<Command>) -> usize {
        if !poll_fn(|cx| self.poll_ready(cx)).await {
            return 0;
        }
        let n = self.taken.len();
        into.extend(self.taken.drain(..));
        n
    }

    /// Gives a run's buffer back, emptied, for the next runs.
    pub(crate) fn recycle(&self, run: BytesMut) {
        self.shared.lock().keep_spare(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn publish_byte(tx: &CommandTx, b: u8) -> impl Future<Output = Result<()>> + '_ {
        tx.publish(1, usize::MAX, move |run| {
            run.put_u8(b);
            Ok(())
        })
    }

    #[tokio::test]
    async fn publishes_join_one_run_and_keep_their_order_with_commands() {
        let (tx, mut rx) = commands(16);
        publish_byte(&tx, 1).await.unwrap();
        publish_byte(&tx, 2).await.unwrap();
        tx.send(Command::Unsubscribe { sid: 7 }).await.unwrap();
        publish_byte(&tx, 3).await.unwrap();
        let mut got = Vec::new();
        assert_eq!(rx.recv_all(&mut got).await, 3);
        match &got[..] {
            [Command::Publish(a), Command::Unsubscribe { sid: 7 }, Command::Publish(b)] => {
                assert_eq!((&a[..], &b[..]), (&[1u8, 2][..], &[3u8][..]));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn request_byte(tx: &CommandTx, id: u64, b: u8) -> impl Future<Output = Result<()>> + '_ {
        let (sink, _) = tokio::sync::oneshot::channel();
        let expect = Command::Expect { id, sink: crate::connection::ReplySink::One(sink) };
        tx.request(expect, 1, usize::MAX, move |run| {
            run.put_u8(b);
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_request_is_expected_before_the_run_that_holds_its_frame() {
        let (tx, mut rx) = commands(16);
        request_byte(&tx, 1, 1).await.unwrap(); // starts a run after its Expect
        publish_byte(&tx, 2).await.unwrap();
        request_byte(&tx, 3, 3).await.unwrap(); // joins that run: its Expect goes before it
        tx.send(Command::Unsubscribe { sid: 7 }).await.unwrap();
        request_byte(&tx, 4, 4).await.unwrap(); // after a command: a new run
        let mut got = Vec::new();
        rx.recv_all(&mut got).await;
        match &got[..] {
            [
                Command::Expect { id: 1, .. },
                Command::Expect { id: 3, .. },
                Command::Publish(a),
                Command::Unsubscribe { sid: 7 },
                Command::Expect { id: 4, .. },
                Command::Publish(b),
            ] => assert_eq!((&a[..], &b[..]), (&[1u8, 2, 3][..], &[4u8][..])),
            other => panic!("unexpected {other:?}"),
        }
        // A frame over the limit is refused before anything is queued, its Expect included.
        let (sink, _) = tokio::sync::oneshot::channel();
        let expect = Command::Expect { id: 5, sink: crate::connection::ReplySink::One(sink) };
        let refused = tx.request(expect, 100, 10, |_| unreachable!("not encoded")).await;
        assert!(matches!(
            refused,
            Err(Error::Frame(busbar_core::FrameError::TooLarge { size: 96, max: 10 }))
        ));
        publish_byte(&tx, 9).await.unwrap();
        assert!(matches!(rx.recv().await, Some(Command::Publish(run)) if run[..] == [9]));
    }

    #[tokio::test]
    async fn runs_given_back_are_reused_up_to_a_bound() {
        let (tx, mut rx) = commands(64);
        // Frames of a whole run each: a run per publish.
        let publish_runs = |n| {
            let tx = &tx;
            async move {
                for _ in 0..n {
                    tx.publish(RUN_CAPACITY, usize::MAX, |run| {
                        run.put_bytes(0, RUN_CAPACITY);
                        Ok(())
                    })
                    .await
                    .unwrap();
                }
            }
        };
        let mut got = Vec::new();
        publish_runs(SPARE_RUNS + 2).await;
        rx.recv_all(&mut got).await;
        let mut given_back = Vec::new();
        for command in got.drain(..) {
            let Command::Publish(run) = command else { panic!("a run") };
            given_back.push(run.as_ptr());
            rx.recycle(run);
        }
        assert_eq!(tx.shared.lock().spares.len(), SPARE_RUNS, "kept up to the bound");
        publish_runs(SPARE_RUNS + 2).await;
        rx.recv_all(&mut got).await;
        // The next runs are those kept (the ones after are new: their addresses may be those of
        // the runs let go of, so they are not compared).
        for command in &got[..SPARE_RUNS] {
            let Command::Publish(run) = command else { panic!("a run") };
            assert!(given_back.contains(&run.as_ptr()), "a kept run reused");
        }
        assert!(tx.shared.lock().spares.is_empty());
    }

    #[tokio::test]
    async fn a_failed_encoding_leaves_nothing_behind() {
        let (tx, mut rx) = commands(16);
        let failed = tx.publish(1, usize::MAX, |_| Err(Error::Closed)).await;
        assert!(matches!(failed, Err(Error::Closed)));
        publish_byte(&tx, 9).await.unwrap();
        assert!(matches!(rx.recv().await, Some(Command::Publish(run)) if run[..] == [9]));
    }

    #[tokio::test]
    async fn bounded_and_waiting_for_room() {
        let (tx, mut rx) = commands(2);
        publish_byte(&tx, 1).await.unwrap();
        tx.try_send(Command::Unsubscribe { sid: 1 }).unwrap();
        assert!(matches!(tx.try_send(Command::Unsubscribe { sid: 2 }), Err(TrySendError::Full(_))));
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { publish_byte(&tx2, 2).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut got = Vec::new();
        assert_eq!(rx.recv_all(&mut got).await, 2);
        waiting.await.unwrap().unwrap();
        assert!(matches!(rx.recv().await, Some(Command::Publish(run)) if run[..] == [2]));
    }

    #[tokio::test]
    async fn ends_with_the_last_sender_and_fails_sends_without_a_task() {
        let (tx, mut rx) = commands(4);
        let weak = tx.downgrade();
        let tx2 = weak.upgrade().unwrap();
        drop(tx);
        publish_byte(&tx2, 1).await.unwrap();
        drop(tx2);
        assert!(weak.upgrade().is_none());
        assert!(matches!(rx.recv().await, Some(Command::Publish(_))));
        assert!(rx.recv().await.is_none());

        let (tx, rx) = commands(4);
        drop(rx);
        assert!(matches!(publish_byte(&tx, 1).await, Err(Error::Closed)));
        assert!(matches!(tx.send(Command::Unsubscribe { sid: 1 }).await, Err(Error::Closed)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_publishers_lose_nothing() {
        const N: u32 = 5_000;
        let (tx, mut rx) = commands(64);
        let publishers: Vec<_> = (0..4u8)
            .map(|p| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for i in 0..N {
                        tx.publish(5, usize::MAX, |run| {
                            run.put_u8(p);
                            run.put_u32(i);
                            Ok(())
                        })
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u32; 4];
        while let Some(command) = rx.recv().await {
            let Command::Publish(mut run) = command else { panic!("not a publish") };
            while !run.is_empty() {
                let p = run[0] as usize;
                let i = u32::from_be_bytes(run[1..5].try_into().unwrap());
                assert_eq!(next[p], i, "in order per publisher");
                next[p] += 1;
                let _ = run.split_to(5);
            }
        }
        for p in publishers {
            p.await.unwrap();
        }
        assert_eq!(next, [N; 4]);
    }
}
