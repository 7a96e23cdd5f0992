//! Flag keys on the wire: keys too long for memcached are digested and stay distinct,
//! and flags named like the crate's internal keys do not collide with them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use flagcache_core::{Entry, FlagKey, FlagStore, FlagStoreExt, PutOutcome, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

mod common;
use common::{key, put, TTL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_too_long_for_memcached_are_digested_and_stay_distinct() {
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::builder()
        .server(server.url())
        .namespace("a-rather-long-namespace-for-this-service")
        .build()
        .await
        .unwrap();
    // 200 three-byte characters would be 600 bytes; 66 of them make 198 bytes, which
    // base64-encode past memcached's 250.
    let a = FlagKey::new("€".repeat(66)).unwrap();
    let b = FlagKey::new(format!("{}x", "€".repeat(65))).unwrap();
    let long_ascii = key(&"k".repeat(200));
    for (i, k) in [&a, &b, &long_ascii].into_iter().enumerate() {
        let out = put(&store, k, &Entry::new(Version::new(1), vec![i as u8])).await;
        assert_eq!(out, PutOutcome::Stored);
    }
    for (i, k) in [&a, &b, &long_ascii].into_iter().enumerate() {
        assert_eq!(store.get(k).await.unwrap().unwrap().payload[..], [i as u8]);
    }
    let many = store
        .get_many(&[a.clone(), b.clone(), long_ascii.clone()])
        .await
        .unwrap();
    assert!(many.iter().all(Option::is_some));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_named_like_internal_keys_do_not_collide_with_them() {
    use flagcache_core::{Invalidation, Invalidator};
    let server = MemcachedServer::start().unwrap();
    let store = MemcachedStore::connect(&server.url()).await.unwrap();
    let log = flagcache_memcached::MemcachedInvalidator::new(&store);
    for name in ["inv:seq", "inv:1", "chunk:0", "#0123"] {
        store
            .put_value(&key(name), &name.to_string(), Version::new(1), TTL)
            .await
            .unwrap();
    }
    log.publish(&Invalidation::all()).await.unwrap();
    log.publish(&Invalidation::all()).await.unwrap();
    for name in ["inv:seq", "inv:1", "chunk:0", "#0123"] {
        assert_eq!(
            store.get_value::<String>(&key(name)).await.unwrap(),
            Some((name.to_string(), Version::new(1)))
        );
    }
}
