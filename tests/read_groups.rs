//! One circuit breaker per read group: a bad server trips its own keys' breaker, not
//! the whole store's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache::layer::{FaultyStore, Op};
use flagcache::memory::MemoryStore;
use flagcache::{
    store::{async_trait, Capabilities, Entry, FlagStore},
    CacheStatus, Error, FlagCache, FlagKey, PutOutcome, Result,
};
use flagcache_testkit::CountingSource;

use common::*;

#[derive(Debug)]
struct ServerDown;

impl std::fmt::Display for ServerDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused")
    }
}

impl std::error::Error for ServerDown {}

/// Two "servers" over one memory store, as a memcached ring splits keys: keys that
/// begin with `a` are group 1, the others group 2. Group 1 can be made to fail.
#[derive(Clone, Default)]
struct TwoServers {
    inner: MemoryStore,
    first_down: Arc<AtomicBool>,
}

impl TwoServers {
    fn group(key: &FlagKey) -> u64 {
        if key.as_str().starts_with('a') {
            1
        } else {
            2
        }
    }

    fn check(&self, key: &FlagKey, operation: &'static str) -> Result<()> {
        if Self::group(key) == 1 && self.first_down.load(Ordering::SeqCst) {
            return Err(Error::backend("two-servers", operation, true, ServerDown));
        }
        Ok(())
    }
}

#[async_trait]
impl FlagStore for TwoServers {
    fn name(&self) -> &'static str {
        "two-servers"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_group(&self, key: &FlagKey) -> Option<u64> {
        Some(Self::group(key))
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.check(key, "get")?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.check(key, "put")?;
        self.inner.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.check(key, "delete")?;
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_server_trips_only_its_own_groups_breaker() {
    let servers = TwoServers::default();
    let (store, faults) = FaultyStore::new(servers.clone());
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .circuit_breaker(2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    for k in ["a1", "a2", "a3", "b1", "b2", "b3"] {
        put(&servers.inner, &key(k), "from L2", 3).await;
    }
    servers.first_down.store(true, Ordering::SeqCst);
    // A read of group 1 fails, and so does its write-back: its breaker opens.
    let l = cache.lookup(&key("a1")).await.unwrap();
    assert_eq!(l.status, CacheStatus::Miss);
    let st = cache.stats();
    assert!(st.breaker_open && st.breaker_opened == 1, "{st:?}");

    // Group 2 is read as before.
    for k in ["b1", "b2", "b3"] {
        let l = cache.lookup(&key(k)).await.unwrap();
        assert_eq!(
            (l.status, value(&l)),
            (CacheStatus::HitL2, "from L2"),
            "{k}"
        );
    }
    // Group 1 is skipped (but for a probe read 100 ms after it opened, 300 ms…).
    let reads = faults.calls(Op::Read);
    let t = std::time::Instant::now();
    for i in 0..20 {
        let l = cache.lookup(&key(&format!("a-cold{i}"))).await.unwrap();
        assert_eq!(l.status, CacheStatus::Miss);
    }
    let probes_due = 1 + t.elapsed().as_millis() / 100;
    let group_1_reads = u128::from(faults.calls(Op::Read) - reads);
    assert!(
        group_1_reads <= probes_due,
        "{group_1_reads} reads of group 1"
    );
    let st = cache.stats();
    assert_eq!(st.breaker_opened, 1, "{st:?}");

    // Its server comes back: a write of one of its keys closes its breaker.
    servers.first_down.store(false, Ordering::SeqCst);
    cache.invalidate(&key("a3")).await.unwrap();
    assert!(!cache.stats().breaker_open);
}
