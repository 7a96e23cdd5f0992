//! Faults of a real redis-server: a restart, a flushed script cache, a dead server
//! with garbage entries under flag keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{invalidator_with_heartbeat, key, next, on_both_flavors, store_with_timeouts};
use flagcache_core::{
    CacheStatus, Checked, Entry, FlagCache, FlagStore, FlagStoreExt, Invalidation, Invalidator,
    PutOutcome, Signal, StaleReason, Target, Version,
};
use flagcache_redis::RedisStore;
use flagcache_testkit::{Answer, CountingSource, Flavor, RedisServer};

async fn a_restart_fails_calls_fast_then_recovers_and_subscribers_resync_first(flavor: Flavor) {
    let mut server = RedisServer::start_with(flavor).unwrap();
    let store = store_with_timeouts(&server.url(), Duration::from_millis(300)).await;
    let publisher = invalidator_with_heartbeat(&server.url(), Duration::from_millis(100)).await;
    let subscriber = publisher.peer();
    let mut sub = subscriber.subscribe().await.unwrap();
    let k = key("k");
    store
        .put_value(&k, &1u32, Version::new(1), Duration::from_secs(60))
        .await
        .unwrap();

    server.stop();
    let t = Instant::now();
    let err = store.get(&k).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "failing took {:?}",
        t.elapsed()
    );

    server.restart().unwrap();
    // The store reconnects by itself (the restarted server is empty).
    let mut recovered = false;
    for _ in 0..100 {
        if let Ok(None) = store.get(&k).await {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the store did not recover after the restart");
    assert_eq!(
        store
            .put_value(&k, &2u32, Version::new(2), Duration::from_secs(60))
            .await
            .unwrap(),
        PutOutcome::Stored
    );

    // The subscriber says Resync before any event published after the restart.
    let marker = key("after-restart");
    let mut resynced = false;
    for _ in 0..200 {
        let _ = publisher.publish(&Invalidation::key(marker.clone())).await;
        match next(&mut sub).await {
            Signal::Resync(_) => resynced = true,
            Signal::Invalidated(ev) if ev.target == Target::Key(marker.clone()) => {
                assert!(resynced, "an event after the restart arrived before Resync");
                return;
            }
            _ => {}
        }
    }
    panic!("no event after the restart");
}

async fn scripts_are_reloaded_after_script_flush(flavor: Flavor) {
    let server = RedisServer::start_with(flavor).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let k = key("k");
    for v in 1..=20u64 {
        if v % 5 == 0 {
            assert_eq!(server.command(&["SCRIPT", "FLUSH"]).unwrap(), "OK");
        }
        let out = store
            .put(
                &k,
                &Entry::new(Version::new(v), vec![v as u8]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(out, PutOutcome::Stored);
        assert!(matches!(
            store.get_checked(&k, Version::new(v)).await.unwrap(),
            Checked::Hit(_)
        ));
    }
}

async fn flag_cache_over_redis_survives_a_dead_server_and_garbage_entries(flavor: Flavor) {
    let mut server = RedisServer::start_with(flavor).unwrap();
    let store = store_with_timeouts(&server.url(), Duration::from_millis(200)).await;
    let source = CountingSource::new(1);
    let cache = FlagCache::<String>::builder(store.clone(), source.clone())
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::ZERO)
        .l2_timeout(Duration::from_millis(300))
        .circuit_breaker(3, Duration::from_millis(500))
        // Every read retries, so the breaker is what bounds the dead server's cost.
        .fail_safe_throttle(Duration::ZERO)
        .build()
        .await
        .unwrap();

    // Garbage under a flag key, written by another client: counted, a miss, reloaded.
    server
        .command(&["SET", "flags:{garbage}", "not an envelope"])
        .unwrap();
    let l = cache.lookup(&key("garbage")).await.unwrap();
    assert_eq!(l.status, CacheStatus::Miss);
    assert_eq!(cache.stats().corrupt, 1);
    let got: Option<(String, Version)> = store.get_value(&key("garbage")).await.unwrap();
    assert_eq!(got, Some(("garbage@1".into(), Version::new(1))));

    // Redis dies and the source fails too: the last known value is served.
    cache.get(&key("k")).await.unwrap();
    server.stop();
    source.set_answer(Answer::Error);
    tokio::time::sleep(Duration::from_millis(80)).await;
    for _ in 0..20 {
        let l = cache.lookup(&key("k")).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    }
    assert!(cache.stats().breaker_open, "{:?}", cache.stats());

    // Everything comes back, without restarting anything in the app.
    server.restart().unwrap();
    source.set_answer(Answer::Value);
    let mut refilled = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = cache.lookup(&key("k")).await;
        if let Ok(Some(v)) = store.get_value::<String>(&key("k")).await {
            refilled = Some(v);
            break;
        }
    }
    assert_eq!(
        refilled,
        Some(("k@1".into(), Version::new(1))),
        "L2 never refilled: {:?}",
        cache.stats()
    );
    assert!(!cache.stats().breaker_open);
    let l = cache.lookup(&key("k")).await.unwrap();
    assert!(!matches!(l.status, CacheStatus::Stale(_)), "{l:?}");
}

on_both_flavors!(
    a_restart_fails_calls_fast_then_recovers_and_subscribers_resync_first,
    scripts_are_reloaded_after_script_flush,
    flag_cache_over_redis_survives_a_dead_server_and_garbage_entries,
);
