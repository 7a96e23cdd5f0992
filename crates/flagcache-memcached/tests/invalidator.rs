//! The app-layer invalidation log against a real memcached.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flagcache_core::conformance;
use flagcache_core::{
    now_ms, FlagKey, Invalidation, Invalidator, ResyncReason, Signal, Subscription, Target,
};
use flagcache_memcached::{MemcachedInvalidator, MemcachedStore};
use flagcache_testkit::MemcachedServer;

async fn log_on(server: &MemcachedServer) -> MemcachedInvalidator {
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(20))
        .build()
}

/// Publishes `n` events for `k` and receives them on `sub`.
async fn publish_and_receive(
    publisher: &MemcachedInvalidator,
    sub: &mut Subscription,
    k: &FlagKey,
    n: usize,
) {
    for _ in 0..n {
        publisher
            .publish(&Invalidation::key(k.clone()))
            .await
            .unwrap();
    }
    for _ in 0..n {
        assert!(matches!(sub.recv().await, Some(Signal::Invalidated(_))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_three_subscribers_in_order() {
    let server = MemcachedServer::start().unwrap();
    let a = log_on(&server).await;
    let (b, c) = (a.peer(), a.peer());
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_events_are_each_delivered_once() {
    let server = MemcachedServer::start().unwrap();
    let publisher = log_on(&server).await;
    let subscriber = publisher.peer();
    let mut sub = subscriber.subscribe().await.unwrap();
    let mut lags = Vec::new();
    let mut seen = HashSet::new();
    // Published while the subscriber reads, a few milliseconds apart, so that what is
    // measured is propagation, not a queue of already-delivered events.
    let publishing = tokio::spawn(async move {
        for i in 0..200 {
            let key = FlagKey::new(format!("k{i}")).unwrap();
            publisher.publish(&Invalidation::key(key)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 200 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await {
            Ok(Some(Signal::Invalidated(ev))) => {
                lags.push(now_ms().saturating_sub(ev.sent_at_ms));
                assert!(seen.insert(ev.seq), "event {} delivered twice", ev.seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    publishing.await.unwrap();
    assert_eq!(seen.len(), 200);
    assert_eq!(seen, (1..=200).collect::<HashSet<u64>>());
    lags.sort_unstable();
    eprintln!(
        "memcached log propagation (poll 20 ms): p50 {} ms, p99 {} ms, max {} ms",
        lags[lags.len() / 2],
        lags[lags.len() * 99 / 100],
        lags[lags.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_yields_resync() {
    let mut server = MemcachedServer::start().unwrap();
    let publisher = log_on(&server).await;
    let subscriber = publisher.peer();
    let mut sub = subscriber.subscribe().await.unwrap();
    let k = FlagKey::new("k").unwrap();
    publish_and_receive(&publisher, &mut sub, &k, 3).await;
    server.restart().unwrap();
    // The log restarts at 1: the subscriber must say Resync before the new event.
    let marker = FlagKey::new("after-restart").unwrap();
    let mut resynced = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let _ = publisher.publish(&Invalidation::key(marker.clone())).await;
        match tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
            Ok(Some(Signal::Resync(_))) => resynced = true,
            Ok(Some(Signal::Invalidated(ev))) if ev.target == Target::Key(marker.clone()) => {
                assert!(resynced, "an event after the restart arrived before Resync");
                return;
            }
            _ => {}
        }
    }
    panic!("no event after the restart (resynced: {resynced})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_left_behind_by_more_than_the_ring_resyncs() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let slow = MemcachedInvalidator::builder(&store)
        .ring_size(8)
        .poll_interval(Duration::from_millis(400))
        .build();
    let publisher = slow.peer();
    let flood = async {
        // 20 events within one poll of the subscriber: the ring of 8 is overwritten.
        for i in 0..20 {
            let key = FlagKey::new(format!("flood{i}")).unwrap();
            publisher.publish(&Invalidation::key(key)).await.unwrap();
        }
    };
    conformance::resync_after_gap(&slow, &publisher, flood).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_never_arrives_is_a_resync_after_the_grace() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let inv = MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(20))
        .grace(Duration::from_millis(200))
        .build();
    let mut sub = inv.subscribe().await.unwrap();
    // A publisher took number 1 and died before writing its slot.
    assert_eq!(
        server.request("ma flags!inv:seq N0 J1 v\r\n").unwrap(),
        "VA 1\r\n1"
    );
    match tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
    {
        Some(Signal::Resync(ResyncReason::LogReset)) => {}
        other => panic!("{other:?}"),
    }
    // And the log goes on after it.
    inv.publish(&Invalidation::all()).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap(),
        Some(Signal::Invalidated(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_flag_caches_over_memcached_see_each_others_writes() {
    use flagcache_core::{FlagCache, Version};
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let log = MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(20))
        .build();
    let loader = |k: FlagKey| async move { Ok(Some((format!("{k}@1"), Version::new(1)))) };
    let a = FlagCache::<String>::builder(store.clone(), loader)
        .invalidator(log.peer())
        .build()
        .await
        .unwrap();
    let b = FlagCache::<String>::builder(store.clone(), loader)
        .invalidator(log.peer())
        .build()
        .await
        .unwrap();
    let k = FlagKey::new("kill-switch").unwrap();
    assert_eq!(
        b.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("kill-switch@1")
    );
    a.set(&k, "OFF".into(), Version::new(2)).await.unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if b.get(&k).await.unwrap().as_deref().map(String::as_str) == Some("OFF") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("replica B kept serving the old value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_noticed_even_when_the_counter_climbs_back_past_the_subscriber() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let subscriber = MemcachedInvalidator::builder(&store)
        .poll_interval(Duration::from_millis(300))
        .build();
    let publisher = subscriber.peer();
    let mut sub = subscriber.subscribe().await.unwrap();
    let k = FlagKey::new("k").unwrap();
    publish_and_receive(&publisher, &mut sub, &k, 3).await;
    // The whole log is flushed — no connection drops, so no connection error gives it
    // away — then publishers take the counter back past 3 before the next poll.
    assert_eq!(server.request("flush_all\r\n").unwrap(), "OK");
    for _ in 0..5 {
        publisher
            .publish(&Invalidation::key(k.clone()))
            .await
            .unwrap();
    }
    match tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
    {
        Some(Signal::Resync(ResyncReason::LogReset)) => {}
        other => panic!("an event of the new log arrived with no Resync first: {other:?}"),
    }
}
