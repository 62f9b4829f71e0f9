//! A connection's outbound queue: many senders (the router, on any reader's task), one receiver
//! (the connection's write task).
//!
//! A locked `VecDeque` rather than tokio's channel: a send is one uncontended lock and a push,
//! and the receiver is woken only when the queue goes from empty to not empty. The receiver takes
//! everything queued at once (one lock per batch, not per item). tokio's unbounded channel pays a
//! semaphore update, a slot reservation and a wake for every item on the sending side, and a
//! permit release on the receiving side; in the broker's pubsub profile that was the largest
//! cost after copying. The bound is not here: it is the connection's `Control` counters.
//!
//! A reader that routes a batch of frames can also hold the wake-ups back until the batch is
//! done ([`Deferred`]): each writer then wakes once per batch and finds it all queued, instead
//! of waking at the first message and writing the batch in small pieces.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::task::AtomicWaker;

/// Capacity past which a drained buffer is freed rather than kept for the next batch.
const SHRINK_ABOVE: usize = 4096;

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    waker: AtomicWaker,
    senders: AtomicUsize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    /// The receiver is gone: sends fail.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new queue.
pub(crate) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), closed: false }),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
    });
    (Sender { shared: shared.clone() }, Receiver { shared, taken: VecDeque::new() })
}

/// The sending side; clone it for more senders.
#[derive(Debug)]
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: the receiver sees the end once it has taken what is queued.
            self.shared.waker.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item`; gives it back when the receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(item);
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        drop(state);
        // The receiver takes everything when it wakes: items added meanwhile need no wake of
        // their own.
        if was_empty {
            wake(&self.shared.waker);
        }
        Ok(())
    }
}

thread_local! {
    /// Wake-ups held back on this thread, while a [`Deferred::hold`] runs.
    static HELD: RefCell<Option<Vec<Waker>>> = const { RefCell::new(None) };
}

/// Wakes the receiver now, or later when a [`Deferred::hold`] is running on this thread.
fn wake(waker: &AtomicWaker) {
    let held = HELD.with_borrow_mut(|held| match held {
        Some(list) => {
            // Taken out: the receiver registers again when it next waits.
            if let Some(w) = waker.take() {
                list.push(w);
            }
            true
        }
        None => false,
    });
    if !held {
        waker.wake();
    }
}

/// Wake-ups a reader holds back while it routes a batch; [`Deferred::wake_all`] must run before
/// the reader waits for anything (one of the wakers may be of the task it waits for).
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    wakers: Vec<Waker>,
}

impl Deferred {
    /// Runs `f` (synchronous, so it cannot move to another thread halfway) with the wake-ups of
    /// the queues it sends to added to this list instead of done.
    pub(crate) fn hold<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let list = std::mem::take(&mut self.wakers);
        let outer = HELD.with_borrow_mut(|held| held.replace(list));
        // Restored even if `f` panics, so that the thread's later sends still wake.
        struct Restore<'a> {
            deferred: &'a mut Deferred,
            outer: Option<Option<Vec<Waker>>>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let outer = self.outer.take().flatten();
                let list = HELD.with_borrow_mut(|held| std::mem::replace(held, outer));
                self.deferred.wakers = list.unwrap_or_default();
            }
        }
        let _restore = Restore { deferred: self, outer: Some(outer) };
        f()
    }

    /// Does the held wake-ups.
    pub(crate) fn wake_all(&mut self) {
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        self.wake_all();
    }
}

/// The receiving side. Dropping it makes every later send fail (and drops what is queued).
#[derive(Debug)]
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Taken from the shared queue, not yet handed out.
    taken: VecDeque<T>,
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock.
        drop(items);
    }
}

impl<T> Receiver<T> {
    /// Moves everything queued to `taken`; false when there was nothing.
    fn take(&mut self) -> bool {
        let mut state = self.shared.lock();
        if state.items.is_empty() {
            return false;
        }
        // Swapped, so that both buffers keep their capacity; one grown by a burst (a slow
        // consumer that caught up) is let go.
        if self.taken.capacity() > SHRINK_ABOVE {
            self.taken = VecDeque::new();
        }
        std::mem::swap(&mut state.items, &mut self.taken);
        true
    }

    /// The next item without waiting, if there is one.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        if let Some(item) = self.taken.pop_front() {
            return Some(item);
        }
        if self.take() { self.taken.pop_front() } else { None }
    }

    /// The next item; `None` once every sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        self.shared.waker.register(cx.waker());
        // Again after registering: a send in between found the queue empty and woke the old
        // waker, or finds it empty now and wakes this one.
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            // The last sender may have queued just before it went.
            return Poll::Ready(self.try_recv());
        }
        Poll::Pending
    }

    /// The next item; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_order_and_ends_with_the_last_sender() {
        let (tx, mut rx) = queue();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        tx.send(3).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), None);
        drop(tx);
        tx2.send(4).unwrap();
        drop(tx2);
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(rx.recv().await, None);
    }

    /// Counts its wake-ups.
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn held_wake_ups_happen_once_per_queue_at_wake_all() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = queue();
        assert!(rx.poll_recv(&mut cx).is_pending());
        let mut deferred = Deferred::default();
        deferred.hold(|| {
            tx.send(1).unwrap();
            tx.send(2).unwrap();
        });
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "held");
        // Outside `hold`, sends wake at once again (here: nothing to wake, the waker is held).
        tx.send(3).unwrap();
        deferred.wake_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(1))));
        assert_eq!((rx.try_recv(), rx.try_recv(), rx.try_recv()), (Some(2), Some(3), None));
        // Waiting again: a send outside `hold` wakes at once.
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(4).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        // A dropped list still wakes.
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(4))));
        assert!(rx.poll_recv(&mut cx).is_pending());
        let mut deferred = Deferred::default();
        deferred.hold(|| tx.send(5).unwrap());
        drop(deferred);
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn sends_fail_once_the_receiver_is_gone() {
        let (tx, rx) = queue();
        tx.send(1).unwrap();
        drop(rx);
        assert_eq!(tx.send(2), Err(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_a_waiting_receiver_and_loses_nothing() {
        const N: u64 = 20_000;
        let (tx, mut rx) = queue();
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for i in 0..N {
                        tx.send((s, i)).unwrap();
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u64; 4];
        while let Some((s, i)) = rx.recv().await {
            // In order per sender.
            assert_eq!(next[s as usize], i);
            next[s as usize] += 1;
        }
        for s in senders {
            s.await.unwrap();
        }
        assert_eq!(next, [N; 4]);
    }
}
