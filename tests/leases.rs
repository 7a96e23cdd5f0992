//! Leases: an invalidation racing a load on another replica is not undone. Replica A
//! misses a key and its load reads the source at v7; the source moves to v8 and replica
//! B invalidates the key (or refreshes it, or sets v8). A never hears of it — it has no
//! subscription at all — and its load then finishes. A's read answers with what it
//! loaded, but L2 must not keep v7: every replica serves v8 next. Run on the memory
//! store, on a real redis-server and on a real memcached, with and without the
//! backend's cross-process coalescer (the lock path).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use flagcache::memory::MemoryStore;
use flagcache::{store::FlagStore, FlagCache, FlagCacheBuilder, Version};
use flagcache_testkit::CountingSource;

use common::*;

/// What replica B does while A's load is in flight.
#[derive(Debug, Clone, Copy)]
enum Race {
    Invalidate,
    Refresh,
    /// A versioned `set` of v8: the version guard, not a fence, refuses A's v7.
    Set,
}

/// Adds a backend's cross-process coalescer (its own client) to a replica's builder.
type WithCoalescer =
    Arc<dyn Fn(FlagCacheBuilder<Config>) -> FlagCacheBuilder<Config> + Send + Sync>;

async fn race(store: Arc<dyn FlagStore>, how: Race, coalescer: Option<WithCoalescer>) {
    let k = key(&format!("race.{how:?}.{:08x}", fastrand::u32(..)));
    let slow = CountingSource::new(7);
    let fresh = CountingSource::new(8);
    let replica = |src: &CountingSource| {
        let b = FlagCache::builder(store.clone(), src.clone());
        match &coalescer {
            Some(add) => add(b),
            None => b,
        }
    };
    // A: no invalidator, so it hears nothing B does.
    let a = replica(&slow).build().await.unwrap();
    let b = replica(&fresh).build().await.unwrap();

    slow.hold();
    let read = spawn_lookup(&a, &k);
    until("A's load to begin", || slow.calls() == 1).await;
    match how {
        Race::Invalidate => b.invalidate(&k).await.unwrap(),
        Race::Refresh => b.refresh(&k).await.unwrap(),
        Race::Set => {
            b.set(&k, format!("{k}@8"), Version::new(8)).await.unwrap();
        }
    }
    // The source has moved on: A's next load would read v8. Its load in flight
    // answers v7.
    slow.set_version(8);
    slow.release();
    let answered = read.await.unwrap().unwrap();
    assert_eq!(
        answered.version,
        Some(Version::new(7)),
        "{how:?}: A's own read"
    );

    let held = store.get(&k).await.unwrap().map(|e| e.version);
    match how {
        Race::Set => assert_eq!(held, Some(Version::new(8)), "{how:?}: the set was undone"),
        _ => assert_eq!(
            held, None,
            "{how:?}: A's load wrote v7 after the invalidation"
        ),
    }
    for (name, replica) in [("B", &b), ("A", &a)] {
        let t = std::time::Instant::now();
        let l = replica.lookup(&k).await.unwrap();
        // A coalescer that lost the right to refill (memcached's recache token) waits
        // out its 10 s placeholder: far beyond this bound.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{how:?}: replica {name} waited {:?}",
            t.elapsed()
        );
        assert_eq!(
            (l.version, value(&l)),
            (Some(Version::new(8)), format!("{k}@8").as_str()),
            "{how:?}: replica {name} serves an invalidated value"
        );
    }
}

async fn every_race(store: Arc<dyn FlagStore>, coalescer: Option<WithCoalescer>) {
    for how in [Race::Invalidate, Race::Refresh, Race::Set] {
        race(store.clone(), how, coalescer.clone()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_invalidation_racing_a_load_is_not_undone() {
    every_race(Arc::new(MemoryStore::new()), None).await;
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use flagcache::redis::{RedisLock, RedisStore};
    use flagcache_testkit::RedisServer;

    async fn store(server: &RedisServer) -> RedisStore {
        RedisStore::builder()
            .url(server.url())
            .build()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_an_invalidation_racing_a_load_is_not_undone() {
        let server = RedisServer::start().unwrap();
        every_race(Arc::new(store(&server).await), None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_an_invalidation_racing_the_lock_holders_load_is_not_undone() {
        let server = RedisServer::start().unwrap();
        let redis = store(&server).await;
        let locks = redis.clone();
        let with_lock: WithCoalescer = Arc::new(move |b| b.coalescer(RedisLock::new(&locks)));
        every_race(Arc::new(redis), Some(with_lock)).await;
    }
}

#[cfg(feature = "memcached")]
mod memcached {
    use super::*;
    use flagcache::memcached::{MemcachedRecache, MemcachedStore};
    use flagcache_testkit::MemcachedServer;

    async fn store(server: &MemcachedServer) -> MemcachedStore {
        MemcachedStore::builder()
            .server(server.url())
            .build()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memcached_an_invalidation_racing_a_load_is_not_undone() {
        let server = MemcachedServer::start().unwrap();
        every_race(Arc::new(store(&server).await), None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memcached_an_invalidation_racing_the_recache_winners_load_is_not_undone() {
        let server = MemcachedServer::start().unwrap();
        let mc = store(&server).await;
        let recache = mc.clone();
        let with_recache: WithCoalescer =
            Arc::new(move |b| b.coalescer(MemcachedRecache::new(&recache)));
        every_race(Arc::new(mc), Some(with_recache)).await;
    }
}
