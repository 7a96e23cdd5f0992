//! `stats` on every server of the ring, against real memcached servers: one map per
//! server, in the order given, each with the figures a diagnosis reads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    let stats = store.server_stats().await.unwrap();
    assert_eq!(stats.len(), 2);
    let mut misses = 0;
    for ((address, figures), server) in stats.iter().zip(&servers) {
        assert!(address.contains(&server.port().to_string()), "{address}");
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
