//! The transaction a handler runs in, so that messages it sends inherit the transaction id of the
//! message it handles without the application passing it along.
//!
//! Async handlers run inside a tokio task-local scope; synchronous in-process handlers, which run
//! inline in `emit`, use a plain thread-local cell (cheaper than a task-local scope on that hot
//! path). [`current_transaction`] looks at both.

use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static CURRENT_TX: u128;
}

thread_local! {
    static SYNC_TX: Cell<Option<u128>> = const { Cell::new(None) };
}

/// The transaction id of the message whose handler is running here, if any.
pub fn current_transaction() -> Option<u128> {
    SYNC_TX.with(Cell::get).or_else(|| CURRENT_TX.try_with(|tx| *tx).ok())
}

/// Runs `f` with `tx` as the current transaction (none: runs it as is).
pub(crate) async fn in_transaction<F: Future>(tx: Option<u128>, f: F) -> F::Output {
    match tx {
        Some(tx) => CURRENT_TX.scope(tx, f).await,
        None => f.await,
    }
}

/// Runs the synchronous `f` with `tx` as the current transaction; restores the previous one after,
/// also when `f` unwinds.
pub(crate) fn in_transaction_sync<R>(tx: Option<u128>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<u128>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SYNC_TX.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SYNC_TX.with(|c| c.replace(tx)));
    f()
}
