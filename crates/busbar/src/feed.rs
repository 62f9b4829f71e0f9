//! The queue between the connection task (or the in-process bus) and a subscription's stream:
//! bounded, one consumer, without a lock per item. tokio's bounded channel releases a permit
//! (a lock) on every receive; this is its unbounded channel with an item counter for the bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// A queue of at most `capacity` items.
pub(crate) fn feed<T>(capacity: usize) -> (FeedTx<T>, FeedRx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let len = Arc::new(AtomicUsize::new(0));
    (FeedTx { tx, len: len.clone(), capacity: capacity.max(1) }, FeedRx { rx, len })
}

/// The sending side.
#[derive(Debug, Clone)]
pub(crate) struct FeedTx<T> {
    tx: mpsc::UnboundedSender<T>,
    len: Arc<AtomicUsize>,
    capacity: usize,
}

impl<T> FeedTx<T> {
    /// Queues `item` unless the queue is full or its receiver is gone.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            return if self.tx.is_closed() {
                Err(TrySendError::Closed(item))
            } else {
                Err(TrySendError::Full(item))
            };
        }
        // Counted first, so that the receiver never takes away what was not added.
        self.len.fetch_add(1, Ordering::Relaxed);
        self.tx.send(item).map_err(|e| {
            self.len.fetch_sub(1, Ordering::Relaxed);
            TrySendError::Closed(e.0)
        })
    }
}

/// The receiving side.
#[derive(Debug)]
pub(crate) struct FeedRx<T> {
    rx: mpsc::UnboundedReceiver<T>,
    len: Arc<AtomicUsize>,
}

impl<T> FeedRx<T> {
    fn took(&self, item: Option<T>) -> Option<T> {
        if item.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        item
    }

    pub(crate) async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await;
        self.took(item)
    }

    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let item = self.rx.try_recv().ok();
        self.took(item)
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(item) => Poll::Ready(self.took(item)),
            Poll::Pending => Poll::Pending,
        }
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
        tx.try_send(3).unwrap();
        assert_eq!((rx.try_recv(), rx.try_recv(), rx.try_recv()), (Some(2), Some(3), None));
        drop(rx);
        assert!(matches!(tx.try_send(4), Err(TrySendError::Closed(4))));
    }
}
