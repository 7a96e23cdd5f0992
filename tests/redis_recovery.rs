//! Recovery after a real redis-server restart: the first `set` after the restart
//! reaches Redis without waiting for the read breaker's back-off, and its success
//! closes the breaker, so reads are served from L2 again at once.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::redis::RedisStore;
use flagcache::{store::FlagStoreExt, CacheStatus, FlagCache, PutOutcome, Version};
use flagcache_testkit::{CountingSource, RedisServer};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_set_after_a_restart_reaches_redis_and_reopens_reads() {
    let mut server = RedisServer::start().unwrap();
    let store = RedisStore::builder()
        .url(server.url())
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let cache = FlagCache::builder(store.clone(), CountingSource::new(1))
        .l2_timeout(Duration::from_millis(500))
        // A cap far beyond the test: only a write can close the breaker in time.
        .circuit_breaker(2, Duration::from_secs(60))
        .fail_safe_throttle(Duration::ZERO)
        .build()
        .await
        .unwrap();
    cache.get(&key("warm")).await.unwrap();

    server.stop();
    for i in 0..5 {
        cache.get(&key(&format!("cold{i}"))).await.unwrap();
    }
    assert!(cache.stats().breaker_open, "{:?}", cache.stats());

    server.restart().unwrap();
    let restarted = Instant::now();
    // The connection comes back by itself; until it does, a set fails (transient).
    let outcome = loop {
        match cache.set(&key("kill"), "off".into(), Version::new(2)).await {
            Ok(outcome) => break outcome,
            Err(e) => {
                // Tried against Redis every time, never refused by the read breaker.
                assert!(!e.to_string().contains("circuit breaker open"), "{e}");
                assert!(e.is_transient(), "{e}");
                assert!(
                    restarted.elapsed() < Duration::from_secs(10),
                    "no set succeeded after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(outcome, PutOutcome::Stored);
    assert_eq!(
        store.get_value::<Config>(&key("kill")).await.unwrap(),
        Some(("off".into(), Version::new(2)))
    );
    assert!(!cache.stats().breaker_open, "{:?}", cache.stats());

    // Reads are served from Redis again at once.
    store
        .put_value(
            &key("written-elsewhere"),
            &"v".to_string(),
            Version::new(5),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let l = cache.lookup(&key("written-elsewhere")).await.unwrap();
    assert_eq!((l.status, value(&l)), (CacheStatus::HitL2, "v"));
}
