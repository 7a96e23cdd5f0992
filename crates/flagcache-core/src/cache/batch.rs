//! Gathers the L2 reads of concurrent misses into batched reads.
//!
//! Up to `inline` reads go to the store at once, each on its own as the caller asks:
//! at low concurrency nothing changes, not even a task hop. Reads beyond that wait in
//! a queue, and the first read in flight to finish hands the whole queue to one
//! [`FlagStore::get_each`] call (`MGET`, pipelined meta gets) on a spawned task, which
//! keeps taking what queued meanwhile until the queue is empty. Under load, many
//! misses then cost one round trip and one command instead of one each, on the
//! client's CPU and the server's.
//!
//! Each key keeps its own answer (entry, miss or error), and the caller's L2 timeout
//! covers the time queued. No timer is involved: a read never waits to fill a batch.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::{Entry, Error, FlagKey, FlagStore, Result};

type Answer = Result<Option<Entry>>;
type Queued = (FlagKey, oneshot::Sender<Answer>);

pub(crate) struct ReadBatcher {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn FlagStore>,
    /// Reads that go to the store on their own before the next ones queue.
    inline: usize,
    state: Mutex<State>,
    /// Batched reads issued, and the keys they carried.
    batches: std::sync::atomic::AtomicU64,
    batched_keys: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: Vec<Queued>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An inline read in flight: on its end — answered, failed or dropped — it frees its
/// place and hands what queued meanwhile to a batch.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let queued = {
            let mut st = self.0.state();
            st.in_flight -= 1;
            std::mem::take(&mut st.queue)
        };
        if !queued.is_empty() {
            spawn_batches(&self.0, queued);
        }
    }
}

/// Runs `queued` as one batch on a spawned task, then whatever queued meanwhile,
/// until the queue is empty. Without a runtime to spawn on, the queued reads fail
/// (`Error::Closed`) and their callers carry on as after any L2 error.
fn spawn_batches(shared: &Arc<Shared>, queued: Vec<Queued>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = shared.clone();
    runtime.spawn(async move {
        let mut batch = queued;
        loop {
            // Callers that gave up (timed out, dropped) are not read for.
            batch.retain(|(_, tx)| !tx.is_closed());
            if !batch.is_empty() {
                let keys: Vec<FlagKey> = batch.iter().map(|(k, _)| k.clone()).collect();
                let answers = if let [key] = &keys[..] {
                    vec![shared.store.get(key).await]
                } else {
                    shared
                        .batches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    shared
                        .batched_keys
                        .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    shared.store.get_each(&keys).await
                };
                // A store answering fewer slots than keys leaves the rest unanswered:
                // their senders drop and those callers see an error, not a wrong value.
                for ((_, tx), answer) in batch.drain(..).zip(answers) {
                    let _ = tx.send(answer);
                }
            }
            batch = std::mem::take(&mut shared.state().queue);
            if batch.is_empty() {
                return;
            }
        }
    });
}

impl ReadBatcher {
    pub fn new(store: Arc<dyn FlagStore>, inline: usize) -> Self {
        ReadBatcher {
            shared: Arc::new(Shared {
                store,
                inline: inline.max(1),
                state: Mutex::default(),
                batches: Default::default(),
                batched_keys: Default::default(),
            }),
        }
    }

    /// Reads `key` as [`FlagStore::get`] does: on its own while fewer than `inline`
    /// reads are in flight, else in the next batch.
    pub async fn get(&self, key: &FlagKey) -> Answer {
        let queued = {
            let mut st = self.shared.state();
            if st.in_flight < self.shared.inline {
                st.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.queue.push((key.clone(), tx));
                Some(rx)
            }
        };
        match queued {
            None => {
                let _in_flight = InFlight(self.shared.clone());
                self.shared.store.get(key).await
            }
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(Error::Closed("batched L2 read"))),
        }
    }

    /// Batched reads issued so far, and the keys they carried.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.batches.load(Relaxed),
            self.shared.batched_keys.load(Relaxed),
        )
    }
}
