//! The transaction a handler runs in, so that messages it sends inherit the transaction id of the
//! message it handles without the application passing it along.

use std::future::Future;

tokio::task_local! {
    static CURRENT_TX: u128;
}

/// The transaction id of the message whose handler is running on this task, if any.
pub fn current_transaction() -> Option<u128> {
    CURRENT_TX.try_with(|tx| *tx).ok()
}

/// Runs `f` with `tx` as the current transaction (none: runs it as is).
pub(crate) async fn in_transaction<F: Future>(tx: Option<u128>, f: F) -> F::Output {
    match tx {
        Some(tx) => CURRENT_TX.scope(tx, f).await,
        None => f.await,
    }
}

/// Runs the synchronous `f` with `tx` as the current transaction (none: runs it as is).
pub(crate) fn in_transaction_sync<R>(tx: Option<u128>, f: impl FnOnce() -> R) -> R {
    match tx {
        Some(tx) => CURRENT_TX.sync_scope(tx, f),
        None => f(),
    }
}
