//! What a cache reports about its reads: stats by tier, L1 hits counted from many
//! threads, and the evaluation hook.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use flagcache::memory::MemoryStore;
use flagcache::{CacheStatus, FlagCache, Version};
use flagcache_testkit::{Answer, CountingSource};

use common::*;

/// L1 hits are counted on per-thread stripes, leased without a locked add while one is
/// free and shared (atomically) past that: with more threads alive than stripes, and
/// threads exiting and new ones taking their stripes, no hit may be lost — in either of
/// two caches read from the same threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_l1_hit_is_counted_from_many_threads_at_once() {
    let src = CountingSource::new(1);
    let (a, b) = (
        memory_cache(&src).build().await.unwrap(),
        memory_cache(&src).build().await.unwrap(),
    );
    let k = key("hot");
    a.get(&k).await.unwrap();
    b.get(&k).await.unwrap();
    const WAVES: u64 = 3;
    const THREADS: u64 = 40;
    const HITS: u64 = 50_000;
    for _ in 0..WAVES {
        // All of a wave's threads alive and counting at once.
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (a, b, k, start) = (&a, &b, &k, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..HITS {
                        let cache = if (i + t) % 2 == 0 { a } else { b };
                        assert!(cache.get_cached(k).is_some(), "a fresh L1 hit");
                    }
                });
            }
        });
    }
    let total = a.stats().hits_l1 + b.stats().hits_l1;
    assert_eq!(total, WAVES * THREADS * HITS);
    assert_eq!(a.stats().hits_l1, WAVES * THREADS * HITS / 2);
}

#[tokio::test]
async fn stats_count_by_tier_and_compute_the_hit_rate() {
    let mem = MemoryStore::new();
    put(&mem, &key("in-l2"), "x", 1).await;
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(mem, src.clone()).build().await.unwrap();
    cache.get(&key("in-l2")).await.unwrap(); // L2 hit
    cache.get(&key("cold")).await.unwrap(); // miss
    for _ in 0..8 {
        cache.get(&key("cold")).await.unwrap(); // L1 hits
    }
    let st = cache.stats();
    assert_eq!((st.hits_l1, st.hits_l2, st.misses, st.loads), (8, 1, 1, 1));
    assert!((st.hit_rate() - 0.9).abs() < 1e-9, "{}", st.hit_rate());
    assert_eq!(st.l1_entries, 2);
}

#[tokio::test]
async fn the_evaluation_hook_sees_every_read() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .on_evaluation(move |ev| {
            log.lock()
                .unwrap()
                .push((ev.key.to_string(), ev.status, ev.version))
        })
        .build()
        .await
        .unwrap();
    cache.get(&key("a")).await.unwrap();
    cache.get(&key("a")).await.unwrap();
    src.set_answer(Answer::Error);
    let _ = cache.get(&key("b")).await;
    // The synchronous read is an evaluation too; one L1 cannot answer is not.
    assert!(cache.get_cached(&key("a")).is_some());
    assert!(cache.get_cached(&key("never")).is_none());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (
                "a".to_string(),
                Some(CacheStatus::Miss),
                Some(Version::new(1))
            ),
            (
                "a".to_string(),
                Some(CacheStatus::HitL1),
                Some(Version::new(1))
            ),
            ("b".to_string(), None, None),
            (
                "a".to_string(),
                Some(CacheStatus::HitL1),
                Some(Version::new(1))
            ),
        ]
    );
}
