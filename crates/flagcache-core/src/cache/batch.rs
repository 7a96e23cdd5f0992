//! Gathers the L2 reads of concurrent misses into batched reads.
//!
//! Reads are grouped by [`FlagStore::read_group`] (one group per server: keys that
//! one server answers in one round trip, and that fail together when it is down);
//! stores without groups are never batched. Within a group, up to `inline` reads go
//! to the store at once, each on its own as the caller asks: at low concurrency
//! nothing changes, not even a task hop. A read beyond that joins the group's queue;
//! the first to find no gatherer on its way spawns one. The gatherer yields once to
//! the scheduler — the reads ready to run meanwhile queue too — then sends the whole
//! queue as one [`FlagStore::get_each_for_fill`] call (`MGET`, pipelined meta gets).
//! Reads that queue while that batch is out form the next one, which does not wait
//! for it: several batches of a group may be in flight. Under load, many misses then
//! cost one round trip and one command instead of one each, on the client's CPU and
//! the server's.
//!
//! Gatherers run on the caller's runtime when it is multi-threaded, else on the
//! cache's own (see [`Shared::runtime`]). Callers on a one-thread runtime reading a
//! cache built in a multi-threaded one therefore gather on another thread, where an
//! idle worker runs the gatherer at once: their batches are small.
//!
//! A queued read waits for one yield, not for the reads in flight: an earlier design
//! sent the queue only when a read in flight finished, which added up to a round trip
//! to every queued read, and at 50 concurrent readers gathered 8 reads per batch
//! where this gathers about 30.
//!
//! Each key keeps its own answer (entry or miss with the key's fence, or an error), a
//! key queued twice is read once, and the caller's L2 timeout covers the time queued.
//! No timer is involved: a read never waits to fill a batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::{Error, FillRead, FlagKey, FlagStore, Result};

type Answer = Result<FillRead>;
type Queued = (FlagKey, oneshot::Sender<Answer>);
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How a read goes to the store.
enum Way {
    /// On its own, holding one of its group's inline places.
    Inline,
    /// On its own, with no place: there is no runtime to gather on.
    Alone,
    /// In the group's next batch, starting its gatherer on the runtime given.
    Queued(oneshot::Receiver<Answer>, Option<tokio::runtime::Handle>),
}

pub(crate) struct ReadBatcher {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn FlagStore>,
    /// Reads of one group that go to the store on their own before the next queue.
    inline: usize,
    /// The runtime the cache was built in, if any: where batches run when the caller
    /// is not on a multi-threaded runtime (see [`Shared::runtime`]).
    runtime: Option<tokio::runtime::Handle>,
    groups: Mutex<Map<u64, Group>>,
    batches: AtomicU64,
    batched_keys: AtomicU64,
}

#[derive(Default)]
struct Group {
    in_flight: usize,
    queue: Vec<Queued>,
    /// A gatherer is on its way to take the queue.
    gathering: bool,
}

impl Group {
    fn idle(&self) -> bool {
        self.in_flight == 0 && self.queue.is_empty() && !self.gathering
    }
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

    /// Takes what queued in `group`, ending its gathering; forgets the group when
    /// nothing is left of it.
    fn take_queue(&self, group: u64) -> Vec<Queued> {
        let mut groups = self.groups();
        let Some(g) = groups.get_mut(&group) else {
            return Vec::new();
        };
        g.gathering = false;
        let queued = std::mem::take(&mut g.queue);
        if g.idle() {
            groups.remove(&group);
        }
        queued
    }

    /// Where gatherers run: a multi-threaded runtime is always driven, so the
    /// caller's when it runs on one; otherwise the cache's own — a caller's
    /// one-thread runtime may stop being driven the moment its `block_on` returns —
    /// and the caller's when the cache has none.
    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        let current = tokio::runtime::Handle::try_current().ok();
        match (current, &self.runtime) {
            (Some(c), _) if c.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                Some(c)
            }
            (_, Some(built)) => Some(built.clone()),
            (current, None) => current,
        }
    }
}

/// An inline read in flight: on its end — answered, failed or dropped — it frees its
/// place.
struct InFlight {
    shared: Arc<Shared>,
    group: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut groups = self.shared.groups();
        let Some(g) = groups.get_mut(&self.group) else {
            return;
        };
        g.in_flight = g.in_flight.saturating_sub(1);
        if g.idle() {
            groups.remove(&self.group);
        }
    }
}

/// A gatherer that has not taken its group's queue yet: dropped unrun (its runtime
/// shut down), it takes the queue anyway, so that the queued reads fail rather than
/// wait for ever, and the next queued read starts a gatherer again.
struct Gatherer {
    shared: Arc<Shared>,
    group: u64,
    taken: bool,
}

impl Gatherer {
    fn take(&mut self) -> Vec<Queued> {
        self.taken = true;
        self.shared.take_queue(self.group)
    }
}

impl Drop for Gatherer {
    fn drop(&mut self) {
        if !self.taken {
            drop(self.take());
        }
    }
}

/// Gathers the reads of `group` that queue while the reads ready to run run — one
/// yield to the scheduler — and sends them as one batch. (Yielding again while the
/// queue grew made batches of 42 instead of 30 at 50 readers, but cost more CPU in
/// scheduling than the bigger batches saved: 0.56–0.76× the raw client's throughput
/// against 0.78–0.86×.)
fn spawn_gatherer(runtime: &tokio::runtime::Handle, shared: &Arc<Shared>, group: u64) {
    let mut gatherer = Gatherer {
        shared: shared.clone(),
        group,
        taken: false,
    };
    runtime.spawn(async move {
        tokio::task::yield_now().await;
        let batch = gatherer.take();
        run_batch(&gatherer.shared, batch).await;
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
    if keys.is_empty() {
        return;
    }
    shared.batches.fetch_add(1, Ordering::Relaxed);
    shared
        .batched_keys
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let answers = match &keys[..] {
        [key] => vec![read_one(&*shared.store, key).await],
        _ => shared.store.get_each_for_fill(&keys).await,
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
    store.get_for_fill(key).await
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

    /// Reads `key` — of read group `group`, as the store gave it — with its fence: on
    /// its own ([`FlagStore::get_for_fill`]) while fewer than `inline` reads of its
    /// group are in flight (or when it has no group), else in the group's next batch
    /// ([`FlagStore::get_each_for_fill`]).
    pub async fn get(&self, key: &FlagKey, group: Option<u64>) -> Answer {
        let store = &self.shared.store;
        let Some(group) = group else {
            return read_one(&**store, key).await;
        };
        let way = {
            let mut groups = self.shared.groups();
            let g = groups.entry(group).or_default();
            if g.in_flight < self.shared.inline {
                g.in_flight += 1;
                Way::Inline
            } else if g.gathering {
                let (tx, rx) = oneshot::channel();
                g.queue.push((key.clone(), tx));
                Way::Queued(rx, None)
            } else if let Some(runtime) = self.shared.runtime() {
                let (tx, rx) = oneshot::channel();
                g.queue.push((key.clone(), tx));
                g.gathering = true;
                Way::Queued(rx, Some(runtime))
            } else {
                // Nowhere to gather: the read goes on its own.
                Way::Alone
            }
        };
        match way {
            Way::Inline => {
                let _in_flight = InFlight {
                    shared: self.shared.clone(),
                    group,
                };
                read_one(&**store, key).await
            }
            Way::Alone => read_one(&**store, key).await,
            Way::Queued(rx, gather) => {
                if let Some(runtime) = gather {
                    spawn_gatherer(&runtime, &self.shared, group);
                }
                rx.await.unwrap_or_else(|_| Err(abandoned(&**store)))
            }
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

    /// Reads queued behind a read in flight go out together after one yield, without
    /// waiting for that read: a key queued twice is read once, both callers get its
    /// entry, and every other caller gets its own key's. One thread, so that the three
    /// reads queue in one poll, before the gatherer can run.
    #[tokio::test(flavor = "current_thread")]
    async fn queued_reads_go_out_as_one_batch_without_waiting_for_the_read_in_flight() {
        let store = Arc::new(Recording::default());
        let batcher = Arc::new(ReadBatcher::new(store.clone(), 1, None));
        let first = {
            let (b, k) = (batcher.clone(), key("inline"));
            tokio::spawn(async move { b.get(&k, Some(0)).await })
        };
        // The inline read is held at the store's gate.
        while batcher.shared.groups().get(&0).map_or(0, |g| g.in_flight) == 0 {
            tokio::task::yield_now().await;
        }
        let (twice, other, again) = (key("twice"), key("other"), key("twice"));
        let (a, b, c) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(
                batcher.get(&twice, Some(0)),
                batcher.get(&other, Some(0)),
                batcher.get(&again, Some(0)),
            )
        })
        .await
        .expect("the queued reads waited for the read in flight");
        for (r, k) in [(a, "twice"), (b, "other"), (c, "twice")] {
            assert_eq!(r.unwrap().entry, Some(entry_for(&key(k))), "{k}");
        }
        assert!(
            !first.is_finished(),
            "the batch did not wait for the inline read"
        );
        // One batch, each key in it once, in the order queued.
        assert_eq!(
            store.batches.lock().unwrap().clone(),
            vec![vec!["twice".to_string(), "other".to_string()]]
        );
        assert_eq!(batcher.counts(), (1, 3));
        store.gate.notify_one();
        assert_eq!(
            first.await.unwrap().unwrap().entry,
            Some(entry_for(&key("inline")))
        );
        assert!(
            batcher.shared.groups().is_empty(),
            "the idle group is forgotten"
        );
    }

    /// A gatherer dropped before it ran (its runtime shut down) fails the reads it
    /// would have sent, and leaves the group free to gather again.
    #[test]
    fn a_gatherer_dropped_unrun_fails_its_reads_and_frees_the_group() {
        let batcher = ReadBatcher::new(Arc::new(Recording::default()), 1, None);
        let (tx, mut rx) = oneshot::channel();
        batcher.shared.groups().insert(
            0,
            Group {
                in_flight: 1,
                queue: vec![(key("queued"), tx)],
                gathering: true,
            },
        );
        drop(Gatherer {
            shared: batcher.shared.clone(),
            group: 0,
            taken: false,
        });
        assert!(
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the queued read is told"
        );
        let groups = batcher.shared.groups();
        let g = groups.get(&0).expect("a read is still in flight");
        assert!(!g.gathering && g.queue.is_empty());
    }
}
