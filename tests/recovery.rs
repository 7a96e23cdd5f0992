//! Recovery after an L2 outage: writes are not refused by the read breaker, and a
//! healed L2 is found again at once by a write.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::layer::Op;
use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::{FlagStore, FlagStoreExt, Invalidation, Invalidator},
    FlagCache, PutOutcome, Version,
};
use flagcache_testkit::CountingSource;

use common::*;

/// A cache over `mem` behind a `FaultyStore`, whose breaker opens after two failures
/// and (with its long cap) would not let a probe read through for many seconds.
async fn cache_with_open_breaker(
    mem: &MemoryStore,
) -> (FlagCache<Config>, flagcache::layer::FaultControl) {
    let (store, faults) = faulty(mem);
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .circuit_breaker(2, Duration::from_secs(60))
        .fail_safe_throttle(Duration::ZERO)
        .build()
        .await
        .unwrap();
    faults.fail_all(true);
    // One read fails, then its write-back fails: two failures open the breaker.
    cache.get(&key("cold")).await.unwrap();
    assert!(cache.stats().breaker_open, "{:?}", cache.stats());
    (cache, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_is_tried_while_the_breaker_is_open_and_its_success_closes_it() {
    let mem = MemoryStore::new();
    let (cache, faults) = cache_with_open_breaker(&mem).await;
    faults.fail_all(false);
    let t = Instant::now();
    let outcome = cache
        .set(&key("kill"), "off".into(), Version::new(2))
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::Stored);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        mem.get_value::<Config>(&key("kill")).await.unwrap(),
        Some(("off".into(), Version::new(2)))
    );
    let st = cache.stats();
    assert!(!st.breaker_open, "the write's success closed it: {st:?}");

    // Reads resume at once.
    let reads = faults.calls(Op::Read);
    put(&mem, &key("in-l2"), "from L2", 7).await;
    let l = cache.lookup(&key("in-l2")).await.unwrap();
    assert_eq!(value(&l), "from L2");
    assert_eq!(faults.calls(Op::Read), reads + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_refresh_reach_l2_while_the_breaker_is_open() {
    let mem = MemoryStore::new();
    put(&mem, &key("a"), "old", 1).await;
    put(&mem, &key("b"), "old", 1).await;
    let (cache, faults) = cache_with_open_breaker(&mem).await;
    faults.fail_all(false);
    cache.invalidate(&key("a")).await.unwrap();
    assert_eq!(mem.get(&key("a")).await.unwrap(), None);
    assert!(!cache.stats().breaker_open);

    // Open it again, then refresh.
    faults.fail_all(true);
    cache.get(&key("cold2")).await.unwrap();
    assert!(cache.stats().breaker_open);
    faults.fail_all(false);
    cache.refresh(&key("b")).await.unwrap();
    assert_eq!(mem.get(&key("b")).await.unwrap(), None);
    assert!(!cache.stats().breaker_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_dead_l2_fails_within_the_timeout_and_leaves_the_breaker_open() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .l2_timeout(Duration::from_millis(50))
        .circuit_breaker(2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    faults.set_latency(Duration::from_secs(10));
    cache.get(&key("cold")).await.unwrap();
    assert!(cache.stats().breaker_open);
    let t = Instant::now();
    let err = cache
        .set(&key("kill"), "off".into(), Version::new(2))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(faults.calls(Op::Put), 2, "the set was tried");
    assert!(
        cache.stats().breaker_open,
        "a failed write does not close it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_l2_is_found_by_a_probe_read_well_within_the_back_off_cap() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    // The default breaker: 5 failures, a 5 s cap.
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .fail_safe_throttle(Duration::ZERO)
        .build()
        .await
        .unwrap();
    faults.fail_all(true);
    for i in 0..3 {
        cache.get(&key(&format!("cold{i}"))).await.unwrap();
    }
    assert!(cache.stats().breaker_open, "{:?}", cache.stats());
    faults.fail_all(false);
    let t = Instant::now();
    // Reads of a key L1 does not hold: the loader answers until a probe finds L2.
    let mut n = 0;
    loop {
        n += 1;
        let k = key(&format!("probe{n}"));
        put(&mem, &k, "from L2", 7).await;
        if value(&cache.lookup(&k).await.unwrap()) == "from L2" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", cache.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!cache.stats().breaker_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_purge_reaches_l2_while_the_breaker_is_open() {
    let mem = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let (cache, faults) = faulty_replica(&mem, &bus).await;
    put(&mem, &key("purged"), "old", 1).await;
    faults.fail_all(true);
    cache.get(&key("cold")).await.unwrap();
    assert!(cache.stats().breaker_open);
    faults.fail_all(false);
    // A publisher that cannot delete from L2 itself asks the receivers to.
    bus.peer()
        .publish(&Invalidation::key(key("purged")).purging_shared())
        .await
        .unwrap();
    until("the purge closes the breaker", || {
        !cache.stats().breaker_open
    })
    .await;
    assert_eq!(faults.calls(Op::Delete), 1);
    assert_eq!(mem.get(&key("purged")).await.unwrap(), None);
}
