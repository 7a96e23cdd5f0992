//! Freshness: stale-while-revalidate, early (XFetch) refresh, and a refresh started by a
//! synchronous reader.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::{CacheStatus, StaleReason};
use flagcache_testkit::CountingSource;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::from_secs(30))
        .l2_ttl(Duration::from_millis(50))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    let k = key("swr");
    assert_eq!(value(&cache.lookup(&k).await.unwrap()), "swr@1");
    tokio::time::sleep(Duration::from_millis(120)).await; // past fresh; L2 expired too
    src.set_version(2);
    src.hold();
    for _ in 0..50 {
        let t = Instant::now();
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::Revalidating));
        assert_eq!(value(&l), "swr@1");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "a stale read waited"
        );
    }
    until("the refresh reached the loader", || src.calls() == 2).await;
    src.release();
    let mut fresh = None;
    for _ in 0..1000 {
        let l = cache.lookup(&k).await.unwrap();
        if l.status == CacheStatus::HitL1 {
            fresh = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fresh = fresh.expect("the refreshed value never became fresh");
    assert_eq!(value(&fresh), "swr@2");
    assert_eq!(src.calls(), 2, "exactly one background refresh");
    assert!(cache.stats().stale_revalidating >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refreshes_before_expiry_when_enabled() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .fresh_for(Duration::from_secs(60))
        .l2_ttl(Duration::from_millis(1))
        .ttl_jitter(0.0)
        .xfetch(1e12) // so eager that every hit refreshes
        .build()
        .await
        .unwrap();
    let k = key("early");
    cache.get(&k).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    src.set_version(2);
    for _ in 0..1000 {
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(
            l.status,
            CacheStatus::HitL1,
            "never expired: all reads are fresh hits"
        );
        if value(&l) == "early@2" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("XFetch never refreshed early");
}

#[tokio::test]
async fn xfetch_is_off_by_default() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .l2_ttl(Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    for _ in 0..200 {
        cache.get(&key("k")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(src.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_reader_outside_the_runtime_still_starts_the_refresh() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .fresh_for(Duration::from_millis(20))
        .stale_for(Duration::from_secs(30))
        .l2_ttl(Duration::from_millis(25))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    let k = key("a");
    cache.get(&k).await.unwrap();
    // Past freshness in L1, gone from L2: the refresh has to load.
    tokio::time::sleep(Duration::from_millis(80)).await;
    // A plain thread, no runtime: served stale, and the refresh runs on the cache's.
    let (c, k2) = (cache.clone(), k.clone());
    let served = std::thread::spawn(move || c.get_cached(&k2))
        .join()
        .unwrap();
    assert!(served.flatten().is_some());
    for _ in 0..200 {
        if src.calls() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(src.calls(), 2, "the background refresh never started");
}
