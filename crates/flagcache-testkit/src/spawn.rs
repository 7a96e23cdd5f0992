//! Spawning concurrent readers the way a server's requests arrive.

use std::future::Future;

use tokio::task::JoinHandle;

/// Spawns `read(item)` for each item, from a task of the current runtime rather than
/// from the caller, and returns their handles in the items' order.
///
/// Tasks woken by I/O are spawned from a runtime's workers, into their local queues,
/// where a batch gathered after one yield takes every read ready to run. Tasks
/// spawned from outside the workers (a test's own body on a multi-threaded runtime)
/// arrive one by one from the shared queue, and may each be read alone. Tests of
/// batching spawn their readers here so as to measure the first case.
///
/// # Panics
/// If the spawning task panics (it only spawns), or outside a Tokio runtime.
pub async fn spawn_from_a_task<I, F, Fut>(items: Vec<I>, read: F) -> Vec<JoinHandle<Fut::Output>>
where
    I: Send + 'static,
    F: Fn(I) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    #[allow(clippy::expect_used)]
    tokio::spawn(async move { items.into_iter().map(|i| tokio::spawn(read(i))).collect() })
        .await
        .expect("the spawning task only spawns")
}
