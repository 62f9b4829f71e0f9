//! The queue between the connection task (or the in-process bus) and a subscription's stream:
//! bounded, one consumer, many producers.
//!
//! A locked `VecDeque`: a send is one uncontended lock and a push, and wakes the consumer only
//! when the queue was empty; the consumer takes everything queued in one lock and hands it out
//! from its own buffer. The bound counts what the consumer has taken but not handed out yet, so
//! at most `capacity` items are ever buffered. What it hands out is released at each take and in
//! steps of a quarter of the capacity (at most 64 items), without a lock per item: until then,
//! up to that many items already handed out still count, so a full queue may refuse an item a
//! little early. (tokio's channels pay a slot reservation, a semaphore update and a wake per item,
//! and a permit release per receive.)

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::mpsc::error::TrySendError;

/// Capacity past which a drained buffer is freed rather than kept for the next batch.
const SHRINK_ABOVE: usize = 4096;

/// Most items handed out after which the consumer gives their room back without waiting for its
/// next take.
const RELEASE_EVERY: usize = 64;

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    waker: AtomicWaker,
    senders: AtomicUsize,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    /// Items queued or taken by the consumer and not handed out yet.
    len: usize,
    /// The consumer is gone.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics under this lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A queue of at most `capacity` items.
pub(crate) fn feed<T>(capacity: usize) -> (FeedTx<T>, FeedRx<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), len: 0, closed: false }),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        capacity: capacity.max(1),
    });
    let release_every = (capacity / 4).clamp(1, RELEASE_EVERY);
    (FeedTx { shared: shared.clone() }, FeedRx { shared, taken: VecDeque::new(), handed: 0, release_every })
}

/// The sending side.
#[derive(Debug)]
pub(crate) struct FeedTx<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for FeedTx<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for FeedTx<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.waker.wake();
        }
    }
}

impl<T> FeedTx<T> {
    /// Queues `item` unless the queue is full or its receiver is gone.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(item));
        }
        if state.len >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        state.len += 1;
        drop(state);
        // The consumer takes everything when it wakes: later items need no wake of their own.
        if was_empty {
            self.shared.waker.wake();
        }
        Ok(())
    }
}

/// The receiving side. Dropping it makes every later send fail.
#[derive(Debug)]
pub(crate) struct FeedRx<T> {
    shared: Arc<Shared<T>>,
    /// Taken from the queue, not handed out yet.
    taken: VecDeque<T>,
    /// Handed out since the last take (still counted in the shared length until the next one).
    handed: usize,
    /// Items handed out per release of their room.
    release_every: usize,
}

impl<T> Drop for FeedRx<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        // Outside the lock: dropping an item may drop a request's reply handle.
        drop(items);
    }
}

impl<T> FeedRx<T> {
    /// Moves everything queued to `taken`, releasing what was handed out; false when there was
    /// nothing.
    fn take(&mut self) -> bool {
        let mut state = self.shared.lock();
        state.len -= std::mem::take(&mut self.handed);
        if state.items.is_empty() {
            return false;
        }
        // Swapped, so that both buffers keep their capacity; one grown by a burst is let go.
        if self.taken.capacity() > SHRINK_ABOVE {
            self.taken = VecDeque::new();
        }
        std::mem::swap(&mut state.items, &mut self.taken);
        true
    }

    fn hand_out(&mut self) -> Option<T> {
        let item = self.taken.pop_front();
        if item.is_some() {
            self.handed += 1;
            // Room back in steps (a lock per step, not per item).
            if self.handed >= self.release_every {
                let mut state = self.shared.lock();
                state.len -= std::mem::take(&mut self.handed);
            }
        }
        item
    }

    pub(crate) fn try_recv(&mut self) -> Option<T> {
        if self.taken.is_empty() && !self.take() {
            return None;
        }
        self.hand_out()
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        self.shared.waker.register(cx.waker());
        // Again after registering: a send in between woke the old waker, or wakes this one.
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            // The last sender may have queued just before it went.
            return Poll::Ready(self.try_recv());
        }
        Poll::Pending
    }

    pub(crate) async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_and_released_by_the_receiver() {
        let (tx, mut rx) = feed(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(rx.recv().await, Some(1));
        // A bound of 2 releases each item as it is handed out.
        tx.try_send(3).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), None);
        tx.try_send(3).unwrap();
        tx.try_send(4).unwrap();
        assert!(matches!(tx.try_send(5), Err(TrySendError::Full(5))));
        assert_eq!((rx.try_recv(), rx.try_recv(), rx.try_recv()), (Some(3), Some(4), None));
        // A bound of one still buffers one while the consumer works on the last.
        let (tx1, mut rx1) = feed(1);
        tx1.try_send(1).unwrap();
        assert_eq!(rx1.try_recv(), Some(1));
        tx1.try_send(2).unwrap();
        assert_eq!(rx1.try_recv(), Some(2));
        drop(rx);
        assert!(matches!(tx.try_send(6), Err(TrySendError::Closed(6))));
    }

    #[test]
    fn a_slow_consumer_frees_room_as_it_goes() {
        let (tx, mut rx) = feed(RELEASE_EVERY * 2);
        for i in 0..RELEASE_EVERY * 2 {
            tx.try_send(i).unwrap();
        }
        assert!(tx.try_send(0).is_err());
        // All taken at the first receive; room comes back after RELEASE_EVERY handed out,
        // before the consumer takes again.
        for i in 0..RELEASE_EVERY {
            assert_eq!(rx.try_recv(), Some(i));
        }
        for i in 0..RELEASE_EVERY {
            tx.try_send(1000 + i).unwrap();
        }
        assert!(tx.try_send(0).is_err());
    }

    #[tokio::test]
    async fn ends_with_the_last_sender() {
        let (tx, mut rx) = feed(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        tx2.try_send(2).unwrap();
        drop(tx2);
        assert_eq!((rx.recv().await, rx.recv().await, rx.recv().await), (Some(1), Some(2), None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receiver_is_woken_and_nothing_is_lost() {
        const N: u32 = 20_000;
        let (tx, mut rx) = feed(N as usize);
        let sender = tokio::spawn(async move {
            for i in 0..N {
                tx.try_send(i).unwrap();
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut next = 0;
        while let Some(i) = rx.recv().await {
            assert_eq!(i, next);
            next += 1;
        }
        sender.await.unwrap();
        assert_eq!(next, N);
    }
}
