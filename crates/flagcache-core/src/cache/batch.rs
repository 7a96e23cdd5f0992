//! Gathers the L2 reads of concurrent misses into batched reads.
//!
//! Reads are grouped by [`FlagStore::read_group`] (one group per server: keys that
//! one server answers in one round trip, and that fail together when it is down);
//! stores without groups are never batched. Within a group, up to `inline` reads go
//! to the store at once, each on its own as the caller asks: at low concurrency
//! nothing changes, not even a task hop. Reads beyond that wait in the group's queue,
//! and the first read in flight to finish hands the whole queue to one
//! [`FlagStore::get_each_for_fill`] call (`MGET`, pipelined meta gets) on a spawned task, which
//! keeps taking what queued meanwhile until the queue is empty. Under load, many
//! misses then cost one round trip and one command instead of one each, on the
//! client's CPU and the server's.
//!
//! Each key keeps its own answer (entry or miss with the key's fence, or an error), a key queued twice is read
//! once, and the caller's L2 timeout covers the time queued. No timer is involved: a
//! read never waits to fill a batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::{Error, FillRead, FlagKey, FlagStore, Result};

type Answer = Result<FillRead>;
type Queued = (FlagKey, oneshot::Sender<Answer>);
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub(crate) struct ReadBatcher {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn FlagStore>,
    /// Reads of one group that go to the store on their own before the next queue.
    inline: usize,
    /// The runtime the cache was built in, if any: where batches run when the caller
    /// is not on a multi-threaded runtime (see [`spawn_batches`]).
    runtime: Option<tokio::runtime::Handle>,
    groups: Mutex<Map<u64, Group>>,
    batches: AtomicU64,
    batched_keys: AtomicU64,
}

#[derive(Default)]
struct Group {
    in_flight: usize,
    queue: Vec<Queued>,
}

/// Why a queued read got no answer from its batch.
#[derive(Debug, thiserror::Error)]
#[error("the batched read ended without an answer (its runtime is gone)")]
struct Abandoned;

impl Shared {
    fn groups(&self) -> MutexGuard<'_, Map<u64, Group>> {
        // Nothing that can panic runs under the lock.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what queued in `group`; forgets the group when nothing is left of it.
    fn take_queue(&self, group: u64) -> Vec<Queued> {
        let mut groups = self.groups();
        let Some(g) = groups.get_mut(&group) else {
            return Vec::new();
        };
        let queued = std::mem::take(&mut g.queue);
        if g.in_flight == 0 && queued.is_empty() {
            groups.remove(&group);
        }
        queued
    }
}

/// An inline read in flight: on its end — answered, failed or dropped — it frees its
/// place and hands what queued meanwhile to a batch.
struct InFlight {
    shared: Arc<Shared>,
    group: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let queued = {
            let mut groups = self.shared.groups();
            let Some(g) = groups.get_mut(&self.group) else {
                return;
            };
            g.in_flight = g.in_flight.saturating_sub(1);
            let queued = std::mem::take(&mut g.queue);
            if g.in_flight == 0 && queued.is_empty() {
                groups.remove(&self.group);
            }
            queued
        };
        if !queued.is_empty() {
            spawn_batches(&self.shared, self.group, queued);
        }
    }
}

/// Runs `queued` as one batch on a spawned task, then whatever queued meanwhile,
/// until the queue is empty. Without a runtime to run on, the queued reads fail with
/// a transient error and their callers carry on as after any L2 failure.
fn spawn_batches(shared: &Arc<Shared>, group: u64, queued: Vec<Queued>) {
    // A multi-threaded runtime is always driven: the caller's, when it runs on one.
    // Otherwise the cache's own — a caller's one-thread runtime may stop being driven
    // the moment its `block_on` returns — and the caller's when the cache has none.
    let current = tokio::runtime::Handle::try_current().ok();
    let runtime = match (current, &shared.runtime) {
        (Some(c), _) if c.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => c,
        (_, Some(built)) => built.clone(),
        (Some(c), None) => c,
        (None, None) => return,
    };
    let shared = shared.clone();
    runtime.spawn(async move {
        let mut batch = queued;
        while !batch.is_empty() {
            run_batch(&shared, batch).await;
            batch = shared.take_queue(group);
        }
    });
}

/// One `get_each_for_fill` for the keys of `batch`, each key read once, each caller
/// answered.
async fn run_batch(shared: &Shared, mut batch: Vec<Queued>) {
    // Callers that gave up (timed out, dropped) are not read for.
    batch.retain(|(_, tx)| !tx.is_closed());
    let mut keys: Vec<FlagKey> = Vec::with_capacity(batch.len());
    let mut index: Map<&FlagKey, usize> = Map::default();
    let mut slots: Vec<usize> = Vec::with_capacity(batch.len());
    for (key, _) in &batch {
        let next = index.len();
        let slot = *index.entry(key).or_insert(next);
        if slot == keys.len() {
            keys.push(key.clone());
        }
        slots.push(slot);
    }
    drop(index);
    let answers = match &keys[..] {
        [] => return,
        [key] => vec![read_one(&*shared.store, key).await],
        _ => {
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared
                .batched_keys
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            shared.store.get_each_for_fill(&keys).await
        }
    };
    let mut uses = vec![0usize; keys.len()];
    for &s in &slots {
        uses[s] += 1;
    }
    let mut answers: Vec<Option<Answer>> = answers.into_iter().map(Some).collect();
    for ((_, tx), s) in batch.into_iter().zip(slots) {
        uses[s] -= 1;
        // The last caller of a key takes its answer; earlier ones get a copy.
        let answer = match answers.get_mut(s) {
            Some(a) if uses[s] == 0 => a.take(),
            Some(a) => a.clone(),
            None => None,
        };
        // A store that answered fewer slots than keys: that caller fails, rather
        // than get another key's answer.
        let answer = answer.unwrap_or_else(|| Err(abandoned(&*shared.store)));
        let _ = tx.send(answer);
    }
}

/// One key's fill read, on its own.
pub(crate) async fn read_one(store: &dyn FlagStore, key: &FlagKey) -> Answer {
    let mut answers = store.get_each_for_fill(std::slice::from_ref(key)).await;
    match answers.pop() {
        Some(answer) if answers.is_empty() => answer,
        // A store that answered other than one slot for one key.
        _ => Err(abandoned(store)),
    }
}

fn abandoned(store: &dyn FlagStore) -> Error {
    Error::backend(store.name(), "get", true, Abandoned)
}

impl ReadBatcher {
    pub fn new(
        store: Arc<dyn FlagStore>,
        inline: usize,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Self {
        ReadBatcher {
            shared: Arc::new(Shared {
                store,
                inline: inline.max(1),
                runtime,
                groups: Mutex::default(),
                batches: AtomicU64::new(0),
                batched_keys: AtomicU64::new(0),
            }),
        }
    }

    /// Reads `key` — of read group `group`, as the store gave it — with its fence
    /// ([`FlagStore::get_each_for_fill`]): on its own while fewer than `inline` reads of its group
    /// are in flight (or when it has no group), else in the group's next batch.
    pub async fn get(&self, key: &FlagKey, group: Option<u64>) -> Answer {
        let store = &self.shared.store;
        let Some(group) = group else {
            return read_one(&**store, key).await;
        };
        let queued = {
            let mut groups = self.shared.groups();
            let g = groups.entry(group).or_default();
            if g.in_flight < self.shared.inline {
                g.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                g.queue.push((key.clone(), tx));
                Some(rx)
            }
        };
        match queued {
            None => {
                let _in_flight = InFlight {
                    shared: self.shared.clone(),
                    group,
                };
                read_one(&**store, key).await
            }
            Some(rx) => rx.await.unwrap_or_else(|_| Err(abandoned(&**store))),
        }
    }

    /// Batched reads issued so far, and the reads they answered.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.batches.load(Ordering::Relaxed),
            self.shared.batched_keys.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capabilities, Entry, PutOutcome, Version};
    use std::time::Duration;
    use tokio::sync::Notify;

    /// One read group; `get` waits for the gate; `get_each` records its keys.
    #[derive(Default)]
    struct Recording {
        gate: Notify,
        batches: Mutex<Vec<Vec<String>>>,
    }

    fn entry_for(key: &FlagKey) -> Entry {
        Entry {
            version: Version::new(key.as_str().len() as u64),
            stamp_ms: 0,
            payload: bytes::Bytes::copy_from_slice(key.as_str().as_bytes()),
        }
    }

    #[async_trait::async_trait]
    impl FlagStore for Recording {
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn read_group(&self, _key: &FlagKey) -> Option<u64> {
            Some(0)
        }
        async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
            self.gate.notified().await;
            Ok(Some(entry_for(key)))
        }
        async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
            if let [k] = keys {
                // A read on its own.
                return vec![self.get(k).await];
            }
            self.batches
                .lock()
                .unwrap()
                .push(keys.iter().map(|k| k.as_str().to_string()).collect());
            keys.iter().map(|k| Ok(Some(entry_for(k)))).collect()
        }
        async fn put(&self, _: &FlagKey, _: &Entry, _: Duration) -> Result<PutOutcome> {
            Ok(PutOutcome::Stored)
        }
        async fn delete(&self, _: &FlagKey) -> Result<()> {
            Ok(())
        }
    }

    fn key(s: &str) -> FlagKey {
        FlagKey::new(s).unwrap()
    }

    /// A key queued twice is read once, both callers get its entry, and every other
    /// caller gets its own key's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_queued_twice_is_read_once_and_answers_both() {
        let store = Arc::new(Recording::default());
        let batcher = Arc::new(ReadBatcher::new(store.clone(), 1, None));
        let read = |k: &str| {
            let (b, k) = (batcher.clone(), key(k));
            tokio::spawn(async move { b.get(&k, Some(0)).await })
        };
        let first = read("inline");
        // Queue behind the held inline read.
        while batcher.shared.groups().get(&0).map_or(0, |g| g.in_flight) == 0 {
            tokio::task::yield_now().await;
        }
        let queued = [read("twice"), read("other"), read("twice")];
        while batcher.shared.groups().get(&0).map_or(0, |g| g.queue.len()) < 3 {
            tokio::task::yield_now().await;
        }
        store.gate.notify_one();
        assert_eq!(
            first.await.unwrap().unwrap().entry,
            Some(entry_for(&key("inline")))
        );
        for (r, k) in queued.into_iter().zip(["twice", "other", "twice"]) {
            assert_eq!(
                r.await.unwrap().unwrap().entry,
                Some(entry_for(&key(k))),
                "{k}"
            );
        }
        // One batch, each key in it once; the queue's order is the order the spawned
        // readers ran in, which is not asserted.
        let mut batches = store.batches.lock().unwrap().clone();
        batches.iter_mut().for_each(|b| b.sort());
        assert_eq!(
            batches,
            vec![vec!["other".to_string(), "twice".to_string()]]
        );
        assert_eq!(batcher.counts(), (1, 3));
        assert!(
            batcher.shared.groups().is_empty(),
            "the idle group is forgotten"
        );
    }
}
