//! `stats` on every server of the ring, against real memcached servers: one map per
//! server, in the order given, each with the figures a diagnosis reads; a server that
//! is down is reported as such while the others answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache_core::{FlagKey, FlagStore};
use flagcache_memcached::MemcachedStore;

mod common;
use common::start_servers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_of_every_server() {
    let servers = start_servers(2);
    let store = MemcachedStore::builder()
        .servers(servers.iter().map(|s| s.url()))
        .build()
        .await
        .unwrap();
    for i in 0..20 {
        store
            .get(&FlagKey::new(format!("absent-{i}")).unwrap())
            .await
            .unwrap();
    }
    let stats = store.server_stats().await;
    assert_eq!(stats.len(), 2);
    let mut misses = 0;
    for ((address, figures), server) in stats.iter().zip(&servers) {
        assert!(address.contains(&server.port().to_string()), "{address}");
        let figures = figures.as_ref().unwrap();
        for figure in ["get_hits", "cas_badval", "evictions", "limit_maxbytes"] {
            assert!(
                figures.contains_key(figure),
                "{figure} missing: {figures:?}"
            );
        }
        misses += figures["get_misses"].parse::<u64>().unwrap();
    }
    assert!(misses >= 20, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_fails_alone() {
    let mut servers = start_servers(2);
    let store = MemcachedStore::builder()
        .servers(servers.iter().map(|s| s.url()))
        .timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    servers[1].stop();
    let stats = store.server_stats().await;
    assert_eq!(stats.len(), 2);
    assert!(
        stats[0].1.as_ref().unwrap().contains_key("get_hits"),
        "{stats:?}"
    );
    assert!(
        stats[1].0.contains(&servers[1].port().to_string()),
        "{stats:?}"
    );
    assert!(stats[1].1.is_err(), "{stats:?}");
}
