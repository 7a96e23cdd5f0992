//! Invalidation across replicas: sets, invalidate, invalidate_all, purging events,
//! refresh, resync after a lag or a lost subscription, background re-fetch, and the
//! listener's lifetime.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::{async_trait, FlagStore, Invalidation, Invalidator},
    CacheStatus, FlagCache, PutOutcome, Result, Version,
};
use flagcache_testkit::CountingSource;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_on_one_replica_is_served_by_the_other_within_milliseconds() {
    let r = replicas().await;
    let k = key("kill-switch");
    assert_eq!(
        r.a.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("kill-switch@1")
    );
    assert_eq!(
        r.b.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("kill-switch@1")
    );
    assert_eq!(r.b.lookup(&k).await.unwrap().status, CacheStatus::HitL1);

    let t = Instant::now();
    let out =
        r.a.set(&k, "OFF".to_string(), Version::new(2))
            .await
            .unwrap();
    assert_eq!(out, PutOutcome::Stored);
    let mut seen = None;
    for _ in 0..1000 {
        let l = r.b.lookup(&k).await.unwrap();
        if value(&l) == "OFF" {
            seen = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let lag = seen.expect("replica B kept serving the old value");
    assert!(lag < Duration::from_millis(200), "propagation took {lag:?}");
    // B re-read from L2, not from the source.
    assert_eq!(r.src.calls(), 1);
    // A's own event, once applied, did not evict the value A just wrote.
    until("A received its own event", || r.a.stats().own_events == 1).await;
    let own = r.a.lookup(&k).await.unwrap();
    assert_eq!((value(&own), own.status), ("OFF", CacheStatus::HitL1));
    assert_eq!(r.b.stats().invalidations, 1);
    let _ = &r.bus;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_drops_the_key_everywhere() {
    let r = replicas().await;
    let k = key("k");
    r.a.get(&k).await.unwrap();
    r.b.get(&k).await.unwrap();
    r.src.set_version(2);
    r.a.invalidate(&k).await.unwrap();
    assert_eq!(r.store.get(&k).await.unwrap(), None, "L2 still holds it");
    until("B applied the invalidation", || {
        r.b.stats().invalidations == 1
    })
    .await;
    let l = r.b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_all_flushes_every_l1_and_keeps_l2() {
    let r = replicas().await;
    for i in 0..5 {
        r.b.get(&key(&format!("k{i}"))).await.unwrap();
    }
    assert_eq!(r.b.stats().l1_entries, 5);
    r.a.invalidate_all().await.unwrap();
    until("B flushed", || r.b.stats().l1_entries == 0).await;
    let l = r.b.lookup(&key("k0")).await.unwrap();
    assert_eq!(l.status, CacheStatus::HitL2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purging_event_from_a_foreign_publisher_deletes_l2_too() {
    let r = replicas().await;
    let k = key("k");
    r.b.get(&k).await.unwrap();
    r.bus
        .publish(&Invalidation::key(k.clone()).purging_shared())
        .await
        .unwrap();
    until("B deleted L2", || {
        futures_util::FutureExt::now_or_never(r.store.get(&k))
            .unwrap()
            .unwrap()
            .is_none()
    })
    .await;
}

/// Over a store that keeps no stale values (its `fence` with `keep_stale` drops the entry), a
/// refresh acts as an invalidation: every replica drops its copy and the next reads
/// load the source's current value, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_without_stale_support_reloads_everywhere() {
    let r = replicas().await;
    let k = key("rules");
    r.a.get(&k).await.unwrap();
    r.b.get(&k).await.unwrap();
    assert_eq!(r.src.calls(), 1);
    r.src.set_version(2);
    r.a.refresh(&k).await.unwrap();
    assert_eq!(
        r.store.get(&k).await.unwrap(),
        None,
        "L2 still holds the old entry"
    );
    for cache in [&r.a, &r.b] {
        let mut got = String::new();
        for _ in 0..200 {
            got = value(&cache.lookup(&k).await.unwrap()).to_string();
            if got == "rules@2" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(got, "rules@2");
    }
    assert_eq!(
        r.src.calls(),
        2,
        "both replicas share one reload through L2"
    );
}

// One thread: the 50 publishes (which never yield) all land before B's listener
// runs, so B lags for certain — with a second worker it could keep up.
#[tokio::test]
async fn resync_stops_l1_from_serving_as_fresh() {
    let store = MemoryStore::new();
    let src = CountingSource::new(1);
    let bus = MemoryInvalidator::builder().capacity(1).build();
    let b = FlagCache::builder(store.clone(), src.clone())
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    b.get(&k).await.unwrap();
    assert_eq!(b.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    // Overflow the bus faster than B reads it: B lags, and must resync.
    let publisher = bus.peer();
    for i in 0..50 {
        publisher
            .publish(&Invalidation::key(key(&format!("other{i}"))))
            .await
            .unwrap();
    }
    until("B resynced", || b.stats().resyncs >= 1).await;
    let l = b.lookup(&k).await.unwrap();
    assert_eq!(
        l.status,
        CacheStatus::HitL2,
        "an unverified L1 entry was served as fresh"
    );
}

/// An invalidator whose subscriptions the test can end, as a dropped connection would.
#[derive(Clone)]
struct Closable {
    bus: MemoryInvalidator,
    close: Arc<tokio::sync::watch::Sender<u64>>,
    subscribes: Arc<AtomicUsize>,
}

#[async_trait]
impl Invalidator for Closable {
    fn node_id(&self) -> flagcache::NodeId {
        self.bus.node_id()
    }
    async fn publish(&self, event: &Invalidation) -> Result<()> {
        self.bus.publish(event).await
    }
    async fn subscribe(&self) -> Result<flagcache::store::Subscription> {
        use futures_util::StreamExt;
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.close.subscribe();
        rx.borrow_and_update();
        let inner = self.bus.subscribe().await?;
        let closed = async move {
            let _ = rx.changed().await;
        };
        Ok(flagcache::store::Subscription::from_stream(
            inner.take_until(Box::pin(closed)),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_makes_l1_untrusted_until_resubscribed() {
    let bus = MemoryInvalidator::new();
    let inv = Closable {
        bus: bus.peer(),
        close: Arc::new(tokio::sync::watch::Sender::new(0)),
        subscribes: Arc::new(AtomicUsize::new(0)),
    };
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .invalidator(inv.clone())
        .build()
        .await
        .unwrap();
    let k = key("k");
    cache.get(&k).await.unwrap();
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    inv.close.send_modify(|n| *n += 1);
    until("resubscribed", || {
        inv.subscribes.load(Ordering::SeqCst) == 2
    })
    .await;
    until("resynced twice (closed, then reconnected)", || {
        cache.stats().resyncs == 2
    })
    .await;
    // Back in service: events are heard again.
    bus.publish(&Invalidation::key(k.clone())).await.unwrap();
    until("event applied after resubscribing", || {
        cache.stats().invalidations == 1
    })
    .await;
    assert_ne!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refetch_jitter_rewarms_an_invalidated_key_in_the_background() {
    let store = MemoryStore::new();
    let src = CountingSource::new(1);
    let bus = MemoryInvalidator::new();
    let b = FlagCache::builder(store.clone(), src.clone())
        .invalidator(bus.peer())
        .refetch_jitter(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    let k = key("k");
    b.get(&k).await.unwrap();
    put(&store, &k, "k@2", 2).await;
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(2)))
        .await
        .unwrap();
    // The new version lands in L1 with no read asking for it.
    until("applied", || b.stats().invalidations == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // > the 30 ms jitter
                                                          // Without the background re-fetch this read would be an L2 hit.
    let l = b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::HitL1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidation_task_ends_with_the_cache() {
    let bus = MemoryInvalidator::new();
    let src = CountingSource::new(1);
    let cache = memory_cache(&src)
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let clone = cache.clone();
    assert_eq!(bus.subscriber_count(), 1);
    drop(cache);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(bus.subscriber_count(), 1, "a clone is still alive");
    drop(clone);
    until("the task dropped its subscription", || {
        bus.subscriber_count() == 0
    })
    .await;
}
