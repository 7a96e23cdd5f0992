//! Fail-safe: what a cache serves when L2 and the loader fail — the last known value
//! within the maximum staleness, throttled retries — and loaders that hang or panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::layer::FaultControl;
use flagcache::memory::MemoryStore;
use flagcache::{CacheStatus, Error, FlagCache, FlagCacheBuilder, FlagKey, Lookup, StaleReason};
use flagcache_testkit::{Answer, CountingSource};

use common::*;

/// A cache over a faulty memory store that loaded `k` (at v1), kept it past its
/// freshness, and then lost L2 and the loader both; `first` is its first read after
/// that, a fail-safe answer.
struct FailedAfterOneLoad {
    cache: FlagCache<Config>,
    faults: FaultControl,
    src: CountingSource,
    k: FlagKey,
    first: Lookup<Config>,
}

async fn failed_after_one_load(
    configure: impl FnOnce(FlagCacheBuilder<Config>) -> FlagCacheBuilder<Config>,
) -> FailedAfterOneLoad {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = CountingSource::new(1);
    let builder = FlagCache::builder(store, src.clone())
        .fresh_for(Duration::from_millis(20))
        .stale_for(Duration::ZERO);
    let cache = configure(builder).build().await.unwrap();
    let k = key("k");
    cache.get(&k).await.unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    faults.fail_all(true);
    src.set_answer(Answer::Error);
    let first = cache.lookup(&k).await.unwrap();
    assert_eq!(first.status, CacheStatus::Stale(StaleReason::FailSafe));
    FailedAfterOneLoad {
        cache,
        faults,
        src,
        k,
        first,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_serves_the_last_known_value_when_l2_and_loader_fail() {
    let FailedAfterOneLoad {
        cache,
        faults,
        src,
        k,
        first: l,
    } = failed_after_one_load(|b| {
        b.max_staleness(Duration::from_secs(30))
            .fail_safe_throttle(Duration::from_millis(200))
    })
    .await;
    assert_eq!(value(&l), "k@1");
    // A key never seen before has no fallback: a typed error.
    let err = cache.get(&key("never-seen")).await.unwrap_err();
    assert!(matches!(err, Error::Loader { .. }), "{err}");
    let st = cache.stats();
    assert_eq!((st.stale_fail_safe, st.errors), (1, 1));
    // Within the throttle the fail-safe answer is reused: no retry per read.
    let attempts = src.calls();
    for _ in 0..100 {
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    }
    assert_eq!(
        src.calls(),
        attempts,
        "the loader was retried within the throttle"
    );
    // Recovery: everything back; once the throttle passes, fresh values again.
    faults.fail_all(false);
    src.set_answer(Answer::Value);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@1", CacheStatus::HitL2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_ends_the_fail_safe_throttle() {
    let FailedAfterOneLoad { cache, k, .. } =
        failed_after_one_load(|b| b.fail_safe_throttle(Duration::from_secs(60))).await;
    // The kill switch still lands: an invalidation drops the throttled entry.
    let _ = cache.invalidate(&k).await;
    assert!(
        cache.get(&k).await.is_err(),
        "the invalidated value was served"
    );
}

#[tokio::test]
async fn fail_safe_respects_max_staleness() {
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .fresh_for(Duration::from_millis(10))
        .stale_for(Duration::ZERO)
        .l2_ttl(Duration::from_millis(10))
        .max_staleness(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    src.set_answer(Answer::Error);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(matches!(
        cache.get(&key("k")).await,
        Err(Error::Loader { .. })
    ));
}

#[tokio::test]
async fn a_hanging_loader_times_out() {
    let src = CountingSource::new(1);
    src.set_answer(Answer::Hang);
    let cache = memory_cache(&src)
        .loader_timeout(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let t = Instant::now();
    let err = cache.get(&key("k")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                backend: "loader",
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(cache.stats().load_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_is_an_error_and_the_cache_keeps_working() {
    let src = CountingSource::new(1);
    src.set_answer(Answer::Panic);
    let cache = memory_cache(&src).build().await.unwrap();
    let err = cache.get(&key("k")).await.unwrap_err();
    assert!(err.to_string().contains("loader bug"), "{err}");
    src.set_answer(Answer::Value);
    assert!(cache.get(&key("k")).await.unwrap().is_some());
    assert!(cache.get(&key("other")).await.unwrap().is_some());
}
