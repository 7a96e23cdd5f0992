//! L2 read batching: concurrent misses beyond the inline limit go out in a few
//! batches, without waiting for the reads in flight, and callers that gave up do not
//! wedge the batcher.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::layer::{FaultControl, FaultyStore, Op};
use flagcache::memory::MemoryStore;
use flagcache::{
    store::{async_trait, Entry, FlagStore, FlagStoreExt},
    CacheStatus, FlagCache, FlagKey, PutOutcome, Result, Version,
};
use flagcache_testkit::CountingSource;

use common::*;

/// A store whose reads form one batch group (as one Redis server's do), over the
/// memory store: what turns L2 read batching on.
struct SharedStore(FaultyStore<MemoryStore>);

#[async_trait]
impl FlagStore for SharedStore {
    fn capabilities(&self) -> flagcache::store::Capabilities {
        self.0.capabilities()
    }
    fn read_group(&self, _key: &FlagKey) -> Option<u64> {
        Some(0)
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.0.get(key).await
    }
    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        self.0.get_each(keys).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.0.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.0.delete(key).await
    }
}

async fn shared_store_with(keys: &[FlagKey]) -> (SharedStore, FaultControl) {
    let mem = MemoryStore::new();
    for (i, k) in keys.iter().enumerate() {
        mem.put_value(
            k,
            &format!("l2:{i}"),
            Version::new(1),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let (faulty, faults) = faulty(&mem);
    (SharedStore(faulty), faults)
}

/// Concurrent misses beyond `l2_batch_after` in flight go out as a few batched reads
/// instead of one read each, without waiting for the reads in flight — and every key
/// still gets its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_l2_reads_beyond_the_inline_limit_go_as_one_batch() {
    let keys: Vec<FlagKey> = (0..40).map(|i| key(&format!("batch.{i}"))).collect();
    let (store, faults) = shared_store_with(&keys).await;
    let src = CountingSource::new(1);
    let cache = FlagCache::<Config>::builder(store, src.clone())
        .l2_batch_after(2)
        .l2_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    faults.hold_reads();
    let reads = {
        let cache = cache.clone();
        flagcache_testkit::spawn_from_a_task(keys.clone(), move |k| {
            let cache = cache.clone();
            async move { cache.lookup(&k).await }
        })
        .await
    };
    // Every queued read goes out while the two inline reads are still held.
    until("every queued read batched", || {
        cache.stats().l2_batched_reads == 38
    })
    .await;
    let st = cache.stats();
    until("the batches reach the store", || {
        faults.held() == 2 + st.l2_batches as usize
    })
    .await;
    assert_eq!(faults.calls(Op::Read), 2 + st.l2_batches);
    faults.release_reads();
    for (i, r) in reads.into_iter().enumerate() {
        let l = r.await.unwrap().unwrap();
        assert_eq!(value(&l), format!("l2:{i}"), "key {i}");
        assert_eq!(l.status, CacheStatus::HitL2, "key {i}");
    }
    assert_eq!(src.calls(), 0, "no key fell through to the loader");
    let st = cache.stats();
    assert_eq!(st.l2_batched_reads, 38);
    assert_eq!(faults.calls(Op::Read), 2 + st.l2_batches);
    // How the 38 spread over batches depends on how the spawned reads are scheduled;
    // one read per batch would be 38.
    assert!(
        st.l2_batches <= 10,
        "{} batches for 38 queued reads",
        st.l2_batches
    );
}

/// Queued reads whose callers gave up (their L2 timeout passed) do not wedge the
/// batcher: the callers fall back to the loader, and later reads go out on their own
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_queued_reads_do_not_wedge_the_batcher() {
    let keys: Vec<FlagKey> = (0..6).map(|i| key(&format!("wedge.{i}"))).collect();
    let (store, faults) = shared_store_with(&keys).await;
    let src = CountingSource::new(1);
    let cache = FlagCache::<Config>::builder(store, src.clone())
        .l2_batch_after(1)
        .l2_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    faults.hold_reads();
    let reads: Vec<_> = keys[..5].iter().map(|k| spawn_lookup(&cache, k)).collect();
    let started = Instant::now();
    for r in reads {
        let l = r.await.unwrap().unwrap();
        assert_eq!(l.status, CacheStatus::Miss, "timed out in L2, loaded");
    }
    // Each read ran out of its own L2 timeout, queued or not, and was counted so.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        cache.stats().l2_timeouts,
        5,
        "every read counted as an L2 timeout"
    );
    assert_eq!(src.calls(), 5);
    // 1 inline read and the batches of the 4 queued ones (how many batches depends on
    // how the spawned readers were scheduled).
    assert_eq!(faults.calls(Op::Read), 1 + cache.stats().l2_batches);
    faults.release_reads();
    until("the held reads ended", || faults.held() == 0).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (before, batched) = (faults.calls(Op::Read), cache.stats().l2_batched_reads);
    let l = cache.lookup(&keys[5]).await.unwrap();
    assert_eq!((value(&l), l.status), ("l2:5", CacheStatus::HitL2));
    assert_eq!(
        faults.calls(Op::Read),
        before + 1,
        "a lone read goes out on its own"
    );
    assert_eq!(cache.stats().l2_batched_reads, batched, "and is not queued");
}
