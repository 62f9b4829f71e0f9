//! The queue the broker and the client use wherever messages pass from task to task: many
//! senders, one receiver, optionally bounded. (A synchronisation primitive, not I/O: it wakes
//! tasks through their `Waker`s and runs on any executor.)
//!
//! A locked `VecDeque`. A send is one uncontended lock and a push, and wakes the receiver only
//! when the queue goes from empty to not empty; the receiver takes everything queued in one lock
//! and hands it out from its own buffer. tokio's channels pay a slot reservation, a semaphore
//! update and a wake for every item, and a permit release per receive; in the broker's and the
//! client's profiles those were the largest costs after copying.
//!
//! - **Bound.** With a capacity, the count includes what the receiver has taken and not handed
//!   out yet, so at most `capacity` items are ever buffered. What it hands out is released at each
//!   take and in steps of a quarter of the capacity (at most 64 items): until then, up to that many
//!   items already handed out still count, so a full queue may refuse an item a little early.
//!   [`UNBOUNDED`] skips the count (the broker bounds its queues by items and bytes itself).
//! - **Held wake-ups.** A reader that routes a batch of messages can hold the wake-ups back until
//!   the batch is done ([`Deferred`]): each receiver then wakes once per batch and finds it all
//!   queued, instead of waking at the first item and taking the batch in small pieces.
//! - **Memory.** A drained buffer grown past 4 096 slots by a burst is freed once the burst is
//!   over (the next take is less than an eighth of it), not kept.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::task::AtomicWaker;

/// The capacity of a queue without a bound of its own.
pub const UNBOUNDED: usize = usize::MAX;

/// Capacity past which a drained buffer is freed rather than kept for the next batch.
const SHRINK_ABOVE: usize = 4096;

/// Most items handed out after which their room is given back without waiting for the next take.
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
    /// Items queued or taken by the receiver and not handed out yet (bounded queues only).
    len: usize,
    /// The receiver is gone: sends fail.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics under this lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new queue of at most `capacity` items (at least 1), or [`UNBOUNDED`].
pub fn queue<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let capacity = capacity.max(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), len: 0, closed: false }),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        capacity,
    });
    let release_every = if capacity == UNBOUNDED { 0 } else { (capacity / 4).clamp(1, RELEASE_EVERY) };
    let receiver = Receiver { shared: shared.clone(), taken: VecDeque::new(), handed: 0, release_every };
    (Sender { shared }, receiver)
}

/// Why an item was not queued; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// The sending side; clone it for more senders.
#[derive(Debug)]
pub struct Sender<T> {
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
    /// Queues `item` unless the queue is full or its receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(item));
        }
        if self.shared.capacity != UNBOUNDED {
            if state.len >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            state.len += 1;
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

    /// True once the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
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

/// Wake-ups a reader holds back while it routes a batch. [`Deferred::wake_all`] must run before
/// the reader waits for anything (one of the wakers may be of the task it waits for); dropping
/// the list wakes what it holds.
#[derive(Debug, Default)]
pub struct Deferred {
    wakers: Vec<Waker>,
}

impl Deferred {
    /// Runs `f` (synchronous, so it cannot move to another thread halfway) with the wake-ups of
    /// the queues it sends to added to this list instead of done.
    pub fn hold<R>(&mut self, f: impl FnOnce() -> R) -> R {
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
    pub fn wake_all(&mut self) {
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
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Taken from the queue, not handed out yet.
    taken: VecDeque<T>,
    /// Handed out since their room was last given back (bounded queues).
    handed: usize,
    /// Items handed out per release of their room; 0 when unbounded.
    release_every: usize,
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        // Outside the lock: dropping an item may drop a reply handle or another queue's sender.
        drop(items);
    }
}

impl<T> Receiver<T> {
    /// Moves everything queued to `taken` (which is empty), giving back the room of what was
    /// handed out; false when there was nothing.
    fn take(&mut self) -> bool {
        let mut state = self.shared.lock();
        state.len -= std::mem::take(&mut self.handed);
        if state.items.is_empty() {
            return false;
        }
        // Swapped, so that both buffers keep their capacity. One grown by a burst is let go once
        // the burst is over (this take is small beside it); while it lasts, the buffers are
        // kept, rather than grown again, copying, for every take.
        if self.taken.capacity() > SHRINK_ABOVE && state.items.len() < self.taken.capacity() / 8 {
            self.taken = VecDeque::new();
        }
        std::mem::swap(&mut state.items, &mut self.taken);
        true
    }

    /// The next item without waiting, if there is one.
    pub fn try_recv(&mut self) -> Option<T> {
        if self.taken.is_empty() && !self.take() {
            return None;
        }
        let item = self.taken.pop_front();
        if item.is_some() && self.release_every > 0 {
            self.handed += 1;
            // Room back in steps (a lock per step, not per item).
            if self.handed >= self.release_every {
                let mut state = self.shared.lock();
                state.len -= std::mem::take(&mut self.handed);
            }
        }
        item
    }

    /// The next item; `None` once every sender is gone and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
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

    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its wake-ups.
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    #[test]
    fn in_order_and_ends_with_the_last_sender() {
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = queue(UNBOUNDED);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        tx.try_send(3).unwrap();
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(2)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(3)));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        tx2.try_send(4).unwrap();
        assert_eq!(woken(&count), 1, "woken by the send into an empty queue");
        drop(tx2);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(4)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_burst_keeps_its_buffers_until_it_is_over() {
        let (tx, mut rx) = queue(UNBOUNDED);
        let fill = |n: usize| (0..n).for_each(|i| tx.try_send(i).unwrap());
        let drain = |rx: &mut Receiver<usize>| while rx.try_recv().is_some() {};
        fill(10_000);
        drain(&mut rx);
        // A second burst: the first one's buffer goes back to the senders, not away.
        fill(10_000);
        assert_eq!(rx.try_recv(), Some(0));
        assert!(rx.shared.lock().items.capacity() >= 10_000, "kept while the burst lasts");
        drain(&mut rx);
        // The burst is over: both big buffers go, one per take.
        fill(10);
        drain(&mut rx);
        assert!(rx.shared.lock().items.capacity() < SHRINK_ABOVE);
        fill(10);
        drain(&mut rx);
        assert!(rx.shared.lock().items.capacity() < SHRINK_ABOVE);
        assert!(rx.taken.capacity() < SHRINK_ABOVE);
    }

    #[test]
    fn sends_fail_once_the_receiver_is_gone() {
        let (tx, rx) = queue(UNBOUNDED);
        tx.try_send(1).unwrap();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
    }

    #[test]
    fn bounded_and_released_by_the_receiver() {
        let (tx, mut rx) = queue(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.try_recv(), Some(1));
        // A bound of 2 releases each item as it is handed out.
        tx.try_send(3).unwrap();
        assert_eq!((rx.try_recv(), rx.try_recv(), rx.try_recv()), (Some(2), Some(3), None));
        tx.try_send(4).unwrap();
        tx.try_send(5).unwrap();
        assert_eq!(tx.try_send(6), Err(TrySendError::Full(6)));
        // A bound of one still buffers one while the consumer works on the last.
        let (tx1, mut rx1) = queue(1);
        tx1.try_send(1).unwrap();
        assert_eq!(rx1.try_recv(), Some(1));
        tx1.try_send(2).unwrap();
        assert_eq!(rx1.try_recv(), Some(2));
    }

    #[test]
    fn a_slow_consumer_frees_room_as_it_goes() {
        let (tx, mut rx) = queue(RELEASE_EVERY * 4);
        for i in 0..RELEASE_EVERY * 4 {
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

    #[test]
    fn held_wake_ups_happen_once_per_queue_at_wake_all() {
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = queue(UNBOUNDED);
        assert!(rx.poll_recv(&mut cx).is_pending());
        let mut deferred = Deferred::default();
        deferred.hold(|| {
            tx.try_send(1).unwrap();
            tx.try_send(2).unwrap();
        });
        assert_eq!(woken(&count), 0, "held");
        deferred.wake_all();
        assert_eq!(woken(&count), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!((rx.try_recv(), rx.try_recv()), (Some(2), None));
        // Waiting again: a send outside `hold` wakes at once.
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.try_send(3).unwrap();
        assert_eq!(woken(&count), 2);
        // A dropped list still wakes.
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(3)));
        assert!(rx.poll_recv(&mut cx).is_pending());
        let mut deferred = Deferred::default();
        deferred.hold(|| tx.try_send(4).unwrap());
        drop(deferred);
        assert_eq!(woken(&count), 3);
    }

    #[test]
    fn many_senders_on_threads_lose_nothing_and_keep_their_order() {
        const N: u64 = 20_000;
        let (tx, mut rx) = queue(UNBOUNDED);
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        tx.try_send((s, i)).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        // A receiver that parks its thread between polls.
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut next = [0u64; 4];
        loop {
            match rx.poll_recv(&mut cx) {
                Poll::Ready(Some((s, i))) => {
                    assert_eq!(next[s as usize], i, "in order per sender");
                    next[s as usize] += 1;
                }
                Poll::Ready(None) => break,
                Poll::Pending => std::thread::park(),
            }
        }
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(next, [N; 4]);
    }
}
