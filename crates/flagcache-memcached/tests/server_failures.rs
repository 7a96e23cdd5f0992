//! Servers that restart, die or hang under a running store: a restart fails no
//! operation on pooled connections, a dead server of a ring costs only its own keys,
//! a hung one delays only its own keys' batch, and a failure names the operation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::bytes::Bytes;
use flagcache_core::{CacheStatus, Entry, FlagCache, FlagStore, PutOutcome, StaleReason, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::{Answer, CountingSource, MemcachedServer};

mod common;
use common::{keys, pause, start_servers, TTL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_fails_no_operation_on_pooled_connections() {
    let mut server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .pool_size(4)
        .build()
        .await
        .unwrap();
    let keys = keys("restart.", 8);
    // Fill the pool: concurrent writes leave four idle connections behind.
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let writes = keys.iter().map(|k| store.put(k, &entry, TTL));
    for r in futures_util::future::join_all(writes).await {
        assert_eq!(r.unwrap(), PutOutcome::Stored);
    }
    // The server restarts (empty): every pooled connection is now dead.
    server.restart().unwrap();
    for k in &keys {
        assert_eq!(store.get(k).await.unwrap(), None, "{k}");
    }
    let stored = store
        .put(
            &keys[0],
            &Entry::new(Version::new(2), Bytes::from_static(b"w")),
            TTL,
        )
        .await
        .unwrap();
    assert_eq!(stored, PutOutcome::Stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_server_of_three_costs_only_its_keys() {
    let mut servers = start_servers(3);
    let urls: Vec<String> = servers.iter().map(MemcachedServer::url).collect();
    let store = MemcachedStore::builder()
        .servers(urls)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let source = CountingSource::new(1).with_latency(Duration::from_millis(1));
    let cache = FlagCache::<String>::builder(store.clone(), source.clone())
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::ZERO)
        .circuit_breaker(1_000, Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let keys = keys("k", 60);
    for k in &keys {
        cache.get(k).await.unwrap();
    }
    servers[1].stop();
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The other two servers keep answering; the dead one's keys miss.
    let mut alive = 0;
    let mut dead = 0;
    for k in &keys {
        match store.get(k).await {
            Ok(Some(_)) => alive += 1,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                dead += 1;
            }
            Ok(None) => panic!("{k} vanished from a live server"),
        }
    }
    assert!(alive > 20 && dead > 5, "alive {alive}, dead {dead}");
    // With the source down too, the cache answers every key: fresh from live servers,
    // fail-safe for the dead one's.
    source.set_answer(Answer::Error);
    for k in &keys {
        let l = cache.lookup(k).await.unwrap();
        assert!(
            matches!(
                l.status,
                CacheStatus::HitL2 | CacheStatus::Stale(StaleReason::FailSafe)
            ),
            "{k}: {:?}",
            l.status
        );
    }
    // Restarted (empty): reads recover without restarting anything.
    servers[1].restart().unwrap();
    source.set_answer(Answer::Value);
    let mut recovered = 0;
    for _ in 0..50 {
        recovered = 0;
        for k in &keys {
            if store.get(k).await.is_ok() {
                recovered += 1;
            }
        }
        if recovered == keys.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        recovered,
        keys.len(),
        "the restarted server never came back"
    );
}

/// Concurrent misses are batched per server: with one of two servers hung (it takes
/// requests and never answers), the keys on the other still come from L2 at once —
/// no batch mixes the two — and only the hung server's keys fall to the loader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_delays_only_its_own_keys_batches_stay_per_server() {
    let servers = start_servers(2);
    let (a, b) = (&servers[0], &servers[1]);
    let store = MemcachedStore::builder()
        .servers([a.url(), b.url()])
        .namespace("per-server")
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let keys = keys("spread.", 60);
    for (i, k) in keys.iter().enumerate() {
        flagcache_core::FlagStoreExt::put_value(
            &store,
            k,
            &format!("l2:{i}"),
            Version::new(1),
            TTL,
        )
        .await
        .unwrap();
    }
    let groups: Vec<u64> = keys.iter().map(|k| store.read_group(k).unwrap()).collect();
    assert!(
        groups.contains(&0) && groups.contains(&1),
        "keys on both servers"
    );
    let source = CountingSource::new(1);
    let cache = FlagCache::<String>::builder(store, source.clone())
        .l2_batch_after(1)
        .l2_timeout(Duration::from_millis(400))
        // Counts failures, not the hung server's keys: stays closed for this test.
        .circuit_breaker(1_000, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    // Server index 1 is b (the ring keeps the configured order).
    let _resume = pause(b);
    let started = std::time::Instant::now();
    let reads = {
        let cache = cache.clone();
        flagcache_testkit::spawn_from_a_task(keys.clone(), move |k| {
            let cache = cache.clone();
            async move {
                let l = cache.lookup(&k).await;
                (l, started.elapsed())
            }
        })
        .await
    };
    for ((r, i), group) in reads.into_iter().zip(0..).zip(&groups) {
        let (l, took) = r.await.unwrap();
        let l = l.unwrap();
        if *group == 0 {
            assert_eq!(l.status, CacheStatus::HitL2, "key {i} on the live server");
            assert_eq!(
                l.value.as_deref().map(String::as_str),
                Some(format!("l2:{i}").as_str())
            );
            assert!(
                took < Duration::from_millis(300),
                "key {i} on the live server took {took:?}"
            );
        } else {
            assert_eq!(
                l.status,
                CacheStatus::Miss,
                "key {i} on the hung server: loaded"
            );
        }
    }
    let on_b = groups.iter().filter(|g| **g == 1).count();
    assert_eq!(source.calls(), on_b, "only the hung server's keys loaded");
    let st = cache.stats();
    assert!(st.l2_batched_reads > st.l2_batches, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_named_a_put() {
    let mut server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    server.stop();
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let k = &keys("named.", 1)[0];
    let e = store.put(k, &entry, TTL).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("put"), "{text}");
    assert!(
        !text.contains("get"),
        "a write is reported as a read: {text}"
    );
}
