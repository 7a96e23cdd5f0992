//! `FlagCache::health()`: breakers per read group, the subscription, resyncs, L2's last
//! success and latency — from in-process records, for a readiness probe.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{FlagCache, Version};
use flagcache_testkit::CountingSource;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_breakers_the_subscription_and_l2() {
    let mem = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let (cache, faults) = faulty_replica(&mem, &bus).await;
    let other = FlagCache::builder(MemoryStore::new(), CountingSource::new(1))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();

    let h = cache.health();
    assert!(h.breakers.is_empty() && !h.l2_breaker_open(), "{h:?}");
    assert_eq!((h.l2_last_success_age, h.l2_latency_p99), (None, None));
    let sub = h.subscription.unwrap();
    assert!(sub.up && sub.last_signal_age.is_none() && sub.down_for.is_none());
    assert_eq!(h.resyncs, 0);

    cache.get(&key("a")).await.unwrap();
    other
        .set(&key("b"), "v".into(), Version::new(1))
        .await
        .unwrap();
    until("the event is heard", || {
        cache
            .health()
            .subscription
            .is_some_and(|s| s.last_signal_age.is_some())
    })
    .await;
    let h = cache.health();
    assert!(
        h.l2_last_success_age.unwrap() < Duration::from_secs(5),
        "{h:?}"
    );
    assert!(h.l2_latency_p99.unwrap() < Duration::from_secs(1), "{h:?}");

    faults.fail_all(true);
    cache.get(&key("cold")).await.unwrap();
    let h = cache.health();
    assert!(h.l2_breaker_open(), "{h:?}");
    assert_eq!(h.breakers.len(), 1, "{h:?}");
    assert_eq!(
        h.breakers[0].group, None,
        "the memory store has no read groups"
    );

    faults.fail_all(false);
    cache
        .set(&key("kill"), "off".into(), Version::new(2))
        .await
        .unwrap();
    let h = cache.health();
    assert!(h.breakers.is_empty() && !h.l2_breaker_open(), "{h:?}");
}
