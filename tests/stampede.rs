//! One fill per key: concurrent misses of a key share one L2 read and one load, and
//! its outcome, an error included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use flagcache::layer::Op;
use flagcache::memory::MemoryStore;
use flagcache::{store::FlagStoreExt, CacheStatus, Error, FlagCache, Version};
use flagcache_testkit::{Answer, CountingSource};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_of_1000_reads_costs_one_l2_read_and_one_load() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = CountingSource::new(1);
    src.hold();
    let cache = FlagCache::builder(store, src.clone())
        .build()
        .await
        .unwrap();
    let k = key("cold");
    let reads: Vec<_> = (0..1000).map(|_| spawn_lookup(&cache, &k)).collect();
    until("every read joined the one fill", || {
        cache.stats().coalesced_waits == 999
    })
    .await;
    src.release();
    for r in reads {
        let l = r.await.unwrap().unwrap();
        assert_eq!(value(&l), "cold@1");
        assert_eq!(l.status, CacheStatus::Miss);
    }
    assert_eq!(src.calls(), 1, "loader calls");
    assert_eq!(faults.calls(Op::Read), 1, "L2 reads");
    assert_eq!(faults.calls(Op::Put), 1, "L2 writes");
    assert_eq!(
        mem.get_value::<Config>(&k).await.unwrap(),
        Some(("cold@1".into(), Version::new(1)))
    );
    // Then L1 serves it, with no I/O.
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    assert_eq!(faults.calls(Op::Read), 1);
    let st = cache.stats();
    assert_eq!((st.misses, st.hits_l1, st.loads), (1000, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let src = CountingSource::new(1);
    src.set_answer(Answer::Error);
    src.hold();
    let cache = memory_cache(&src).build().await.unwrap();
    let k = key("k");
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (c, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { c.get(&k).await })
        })
        .collect();
    until("all joined", || cache.stats().coalesced_waits == 19).await;
    src.release();
    for r in reads {
        assert!(matches!(r.await.unwrap(), Err(Error::Loader { .. })));
    }
    assert_eq!(src.calls(), 1);
    src.set_answer(Answer::Value);
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("k@1")
    );
    assert_eq!(src.calls(), 2, "the error was not cached");
}
