//! A connection's outbound queue: [`busbar_core::queue`], unbounded (the connection's `Control`
//! counters bound it by items and bytes), with [`Deferred`] for the wake-ups a read loop holds
//! while it routes a batch.

pub(crate) use busbar_core::queue::{Deferred, Receiver, Sender};

/// A new outbound queue.
pub(crate) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    busbar_core::queue::queue(busbar_core::queue::UNBOUNDED)
}
