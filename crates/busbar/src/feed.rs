//! The queue between the connection task (or the in-process bus) and a subscription's stream:
//! [`busbar_core::queue`] with the subscription's capacity (taken in batches, no lock per item;
//! the bound and how room comes back are described there).

pub(crate) use busbar_core::queue::{Receiver as FeedRx, Sender as FeedTx, TrySendError};

/// A queue of at most `capacity` items.
pub(crate) fn feed<T>(capacity: usize) -> (FeedTx<T>, FeedRx<T>) {
    busbar_core::queue::queue(capacity)
}
