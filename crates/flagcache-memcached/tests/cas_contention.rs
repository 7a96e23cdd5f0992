//! Version-guarded writes under contention: many writers of one key race on its CAS
//! token, the highest version stays, and the lost races are retried and counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use flagcache_core::{Entry, FlagStore, PutOutcome, Version};
use flagcache_memcached::MemcachedStore;
use flagcache_testkit::MemcachedServer;

mod common;
use common::TTL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_writes_retry_on_cas_conflicts_and_count_them() {
    let server = MemcachedServer::start().unwrap();
    let store = Arc::new(MemcachedStore::connect(&server.url()).await.unwrap());
    let key = common::key("contended");
    // 64 writers, 4 rounds: the version guard holds and the conflicts are retried.
    for round in 0..4u64 {
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (1..=64u64)
            .map(|v| {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                let version = round * 100 + v;
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .put(&key, &Entry::new(Version::new(version), vec![1]), TTL)
                        .await
                })
            })
            .collect();
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            assert!(matches!(
                out,
                PutOutcome::Stored | PutOutcome::Superseded { .. }
            ));
        }
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().version,
            Version::new(round * 100 + 64)
        );
    }
    assert!(store.cas_retries() > 0, "no CAS conflict was ever retried");
}
