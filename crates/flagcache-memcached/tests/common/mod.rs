//! Setup shared by this crate's integration tests: stores on test servers, keys,
//! values, and a fleet of replicas.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::time::Duration;

use flagcache_core::{Entry, FlagCache, FlagKey, FlagStore, PutOutcome};
use flagcache_memcached::{MemcachedInvalidator, MemcachedRecache, MemcachedStore};
use flagcache_testkit::MemcachedServer;

/// The TTL the tests write entries with.
pub const TTL: Duration = Duration::from_secs(60);

pub fn key(name: &str) -> FlagKey {
    FlagKey::new(name).unwrap()
}

/// `<prefix>0` … `<prefix><n - 1>`.
pub fn keys(prefix: &str, n: usize) -> Vec<FlagKey> {
    (0..n)
        .map(|i| FlagKey::new(format!("{prefix}{i}")).unwrap())
        .collect()
}

/// `n` random bytes.
pub fn noise(n: usize) -> Vec<u8> {
    (0..n).map(|_| fastrand::u8(..)).collect()
}

/// `store.put(key, entry, TTL)`, which must not fail.
pub async fn put(store: &MemcachedStore, key: &FlagKey, entry: &Entry) -> PutOutcome {
    store.put(key, entry, TTL).await.unwrap()
}

/// `n` servers, started.
pub fn start_servers(n: usize) -> Vec<MemcachedServer> {
    (0..n).map(|_| MemcachedServer::start().unwrap()).collect()
}

/// A store on `server` that writes items of at most `limit` bytes.
pub async fn store_with_item_limit(server: &MemcachedServer, limit: usize) -> MemcachedStore {
    MemcachedStore::builder()
        .server(server.url())
        .item_size_limit(limit)
        .build()
        .await
        .unwrap()
}

/// Resumes a paused server even when the test fails first.
pub struct Paused<'a>(pub &'a MemcachedServer);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

/// Pauses `server` until the guard is dropped.
pub fn pause(server: &MemcachedServer) -> Paused<'_> {
    server.pause().unwrap();
    Paused(server)
}

/// `n` replicas of one service on `server`, each with its own store, `load`, a
/// cross-process recache shaped by `recache` and, with `log_poll`, an invalidation log
/// polled that often.
pub async fn replicas(
    server: &MemcachedServer,
    n: usize,
    load: impl flagcache_core::Loader<String> + Clone,
    log_poll: Option<Duration>,
    recache: impl Fn(MemcachedRecache) -> MemcachedRecache,
) -> Vec<FlagCache<String>> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        let store = MemcachedStore::connect(&server.url()).await.unwrap();
        let mut builder = FlagCache::<String>::builder(store.clone(), load.clone());
        if let Some(every) = log_poll {
            builder = builder.invalidator(
                MemcachedInvalidator::builder(&store)
                    .poll_interval(every)
                    .build(),
            );
        }
        replicas.push(
            builder
                .coalescer(recache(MemcachedRecache::new(&store)))
                .build()
                .await
                .unwrap(),
        );
    }
    replicas
}
