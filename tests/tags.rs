//! Tags that do what they say: `invalidate_tag` drops only the tagged keys from every
//! replica's L1; L2 entries carrying the tag written before it are served by nobody —
//! not by a replica that was down and comes back, nor after a load that began before
//! it (the lease rule) — while other entries keep being served from L2. On the memory
//! store, a real redis-server and a real memcached.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::{FlagStore, Invalidator},
    CacheStatus, FlagCache, FlagCacheBuilder, FlagKey, Version,
};
use flagcache_testkit::CountingSource;

use common::*;

/// A key's tag: what its name has before the first dot (`red.1` is tagged `red`).
fn colour(key: &FlagKey, _value: &Config) -> Vec<String> {
    vec![key
        .as_str()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string()]
}

fn tagged(store: &Arc<dyn FlagStore>, src: &CountingSource) -> FlagCacheBuilder<Config> {
    FlagCache::builder(store.clone(), src.clone()).tags(colour)
}

/// Keys unique to one run, so that runs sharing a server never meet.
fn keys() -> (FlagKey, FlagKey) {
    let run = fastrand::u32(..);
    (key(&format!("red.{run}")), key(&format!("blue.{run}")))
}

/// Two subscribed replicas read a red and a blue key; A invalidates the tag red. B
/// serves the red key's new version and keeps the blue one in L1.
async fn only_the_tag_leaves_l1(
    store: Arc<dyn FlagStore>,
    a_bus: Arc<dyn Invalidator>,
    b_bus: Arc<dyn Invalidator>,
) {
    let (red, blue) = keys();
    let src = CountingSource::new(1);
    let a = tagged(&store, &src)
        .invalidator(a_bus)
        .build()
        .await
        .unwrap();
    let b = tagged(&store, &src)
        .invalidator(b_bus)
        .build()
        .await
        .unwrap();
    for r in [&a, &b] {
        for k in [&red, &blue] {
            r.lookup(k).await.unwrap();
        }
    }
    src.set_version(2);
    a.invalidate_tag("red").await.unwrap();
    let t = Instant::now();
    loop {
        let l = b.lookup(&red).await.unwrap();
        if l.version == Some(Version::new(2)) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "B never dropped the red key: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for r in [&a, &b] {
        let l = r.lookup(&blue).await.unwrap();
        assert_eq!(
            (l.version, l.status),
            (Some(Version::new(1)), CacheStatus::HitL1),
            "a key of another tag left L1"
        );
    }
    assert_eq!(a.lookup(&red).await.unwrap().version, Some(Version::new(2)));
}

/// A replica that heard nothing (it was down: no subscription) reads L2 after the tag
/// was invalidated: the red entry is not served, the blue one is.
async fn l2_entries_of_the_tag_are_not_served(store: Arc<dyn FlagStore>) {
    let (red, blue) = keys();
    let src = CountingSource::new(1);
    let a = tagged(&store, &src).build().await.unwrap();
    for k in [&red, &blue] {
        a.lookup(k).await.unwrap();
    }
    src.set_version(2);
    a.invalidate_tag("red").await.unwrap();
    let back = tagged(&store, &src).build().await.unwrap();
    let l = back.lookup(&red).await.unwrap();
    assert_eq!(
        (l.version, l.status),
        (Some(Version::new(2)), CacheStatus::Miss),
        "an L2 entry older than its tag's invalidation was served"
    );
    let l = back.lookup(&blue).await.unwrap();
    assert_eq!(
        (l.version, l.status),
        (Some(Version::new(1)), CacheStatus::HitL2)
    );
}

/// A load that began before the tag invalidation, on a replica that hears nothing,
/// writes its value to L2 after it: nobody serves that value.
async fn a_load_racing_the_tag_is_not_served(store: Arc<dyn FlagStore>) {
    let (red, _) = keys();
    let slow = CountingSource::new(1);
    let fresh = CountingSource::new(2);
    let a = tagged(&store, &slow).build().await.unwrap();
    let b = tagged(&store, &fresh).build().await.unwrap();
    slow.hold();
    let read = spawn_lookup(&a, &red);
    until("A's load to begin", || slow.calls() == 1).await;
    b.invalidate_tag("red").await.unwrap();
    slow.release();
    assert_eq!(read.await.unwrap().unwrap().version, Some(Version::new(1)));
    let c = tagged(&store, &fresh).build().await.unwrap();
    let l = c.lookup(&red).await.unwrap();
    assert_eq!(
        l.version,
        Some(Version::new(2)),
        "a load begun before the tag invalidation was served from L2"
    );
}

async fn l2_properties(store: Arc<dyn FlagStore>) {
    l2_entries_of_the_tag_are_not_served(store.clone()).await;
    a_load_racing_the_tag_is_not_served(store).await;
}

/// The tag index forgets the keys L1 evicted: 3,000 tagged keys read by 8 tasks at
/// once through an L1 of 32 leave it near its floor of 1,024 pairs, not 3,000 — and
/// no key L1 still holds was forgotten with them: the tag drops every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_index_forgets_what_l1_evicted() {
    let store: Arc<dyn FlagStore> = Arc::new(MemoryStore::new());
    let src = CountingSource::new(1);
    let cache = tagged(&store, &src).l1_capacity(32).build().await.unwrap();
    let run = fastrand::u32(..);
    let keys: Vec<FlagKey> = (0..3000).map(|i| key(&format!("red.{run}.{i}"))).collect();
    let readers: Vec<_> = keys
        .chunks(375)
        .map(|chunk| {
            let (cache, chunk) = (cache.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for k in &chunk {
                    cache.get(k).await.unwrap();
                }
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let st = cache.stats();
    assert!(
        st.tagged_keys <= 1025,
        "{} (tag, key) pairs for an L1 of {} entries",
        st.tagged_keys,
        st.l1_entries
    );
    let held = keys
        .iter()
        .filter(|k| cache.get_cached(k).is_some())
        .count();
    assert!(held > 0, "L1 holds some of the keys");
    cache.invalidate_tag("red").await.unwrap();
    let kept: Vec<_> = keys
        .iter()
        .filter(|k| cache.get_cached(k).is_some())
        .collect();
    assert!(
        kept.is_empty(),
        "the tag left {} of {held} keys in L1",
        kept.len()
    );
    let last = keys.last().unwrap();
    assert_eq!(cache.lookup(last).await.unwrap().status, CacheStatus::Miss);
    assert_eq!(cache.stats().tagged_keys, 1, "the reloaded key alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_tags() {
    let store: Arc<dyn FlagStore> = Arc::new(MemoryStore::new());
    let bus = MemoryInvalidator::new();
    only_the_tag_leaves_l1(store.clone(), Arc::new(bus.peer()), Arc::new(bus.peer())).await;
    l2_properties(store).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tags() {
    use flagcache::redis::{RedisInvalidator, RedisStore};
    let server = flagcache_testkit::RedisServer::start().unwrap();
    let store: Arc<dyn FlagStore> = Arc::new(RedisStore::connect(&server.url()).await.unwrap());
    let a = RedisInvalidator::connect(&server.url()).await.unwrap();
    let b = RedisInvalidator::connect(&server.url()).await.unwrap();
    only_the_tag_leaves_l1(store.clone(), Arc::new(a), Arc::new(b)).await;
    l2_properties(store).await;
}

#[cfg(feature = "memcached")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_tags() {
    use flagcache::memcached::MemcachedStore;
    let server = flagcache_testkit::MemcachedServer::start().unwrap();
    let store: Arc<dyn FlagStore> = Arc::new(
        MemcachedStore::builder()
            .server(server.url())
            .build()
            .await
            .unwrap(),
    );
    l2_properties(store).await;
}
