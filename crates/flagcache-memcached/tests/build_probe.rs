//! What `MemcachedStoreBuilder::build` learns from probing its servers: it probes them
//! all at once, builds over the ones that answer, takes the item limit from those, and
//! fails only when none answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::bytes::Bytes;
use flagcache_core::{Entry, FlagStore, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

mod common;
use common::{keys, pause, start_servers, TTL};

/// Building a store probes its servers at once: two that hang cost one timeout in
/// all, not one each — and the store still builds over the one that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_probes_every_server_at_once() {
    let servers = start_servers(3);
    let _resume1 = pause(&servers[1]);
    let _resume2 = pause(&servers[2]);
    let started = std::time::Instant::now();
    let store = MemcachedStore::builder()
        .servers(servers.iter().map(MemcachedServer::url))
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let took = started.elapsed();
    // One after the other, the two hung servers would take 2 s or more.
    assert!(took < Duration::from_millis(1800), "build took {took:?}");
    assert!(store.item_size_limit() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_starts_with_a_server_of_its_ring_down() {
    let up = MemcachedServer::start().unwrap();
    let mut down = MemcachedServer::builder()
        .item_size_limit("2m")
        .start()
        .unwrap();
    down.stop();
    let store = MemcachedStore::builder()
        .servers([up.url(), down.url()])
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The limit comes from the server that answered (memcached's default, 1 MiB).
    assert_eq!(store.item_size_limit(), (1 << 20) - 512);
    let keys = keys("k", 40);
    let entry = Entry::new(Version::new(1), Bytes::from_static(b"v"));
    let mut stored = 0;
    for k in &keys {
        if store.put(k, &entry, TTL).await.is_ok() {
            stored += 1;
        }
    }
    assert!(
        stored > 5 && stored < keys.len(),
        "stored {stored} of {}",
        keys.len()
    );
    // Back: its keys work without rebuilding the store.
    down.restart().unwrap();
    for k in &keys {
        store.put(k, &entry, TTL).await.unwrap();
    }
    // With no server reachable at all, building fails.
    down.stop();
    let err = MemcachedStore::builder()
        .server(down.url())
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}
