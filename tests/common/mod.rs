//! Fixtures the `FlagCache` tests share: keys and values, a cache over the memory store
//! and a counting source, a fault-injecting store, a misconfigured store, two replicas
//! on one bus, and waiting for a condition.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache::layer::{FaultControl, FaultyStore};
use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::{async_trait, Capabilities, Entry, FlagStore, FlagStoreExt},
    Error, FlagCache, FlagCacheBuilder, FlagKey, Lookup, PutOutcome, Result, Version,
};
use flagcache_testkit::CountingSource;
use tokio::task::JoinHandle;

pub type Config = String;

pub fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

/// The value a lookup answered, or `<absent>`.
pub fn value(l: &Lookup<Config>) -> &str {
    l.value.as_deref().map(String::as_str).unwrap_or("<absent>")
}

/// A cache over a fresh memory store, loading from `src`.
pub fn memory_cache(src: &CountingSource) -> FlagCacheBuilder<Config> {
    FlagCache::builder(MemoryStore::new(), src.clone())
}

/// A loader for caches that must never call one.
pub async fn never_loads(_: FlagKey) -> Result<Option<(Config, Version)>> {
    unreachable!("no loader call expected")
}

/// `store` behind a `FaultyStore`, and the handle that injects its faults.
pub fn faulty(store: &MemoryStore) -> (FaultyStore<MemoryStore>, FaultControl) {
    FaultyStore::new(store.clone())
}

/// A replica on `bus` over `mem` behind a `FaultyStore`, whose breaker opens after two
/// failures and, with its minute-long cap, lets no probe read through meanwhile.
pub async fn faulty_replica(
    mem: &MemoryStore,
    bus: &MemoryInvalidator,
) -> (FlagCache<Config>, FaultControl) {
    let (store, faults) = faulty(mem);
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .invalidator(bus.peer())
        .circuit_breaker(2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    (cache, faults)
}

/// Writes `value` at `version` under `k`, for a minute.
pub async fn put(store: &MemoryStore, k: &FlagKey, value: &str, version: u64) {
    store
        .put_value(
            k,
            &value.to_string(),
            Version::new(version),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
}

/// A lookup of `k` on its own task.
pub fn spawn_lookup(cache: &FlagCache<Config>, k: &FlagKey) -> JoinHandle<Result<Lookup<Config>>> {
    let (cache, k) = (cache.clone(), k.clone());
    tokio::spawn(async move { cache.lookup(&k).await })
}

/// Waits (up to about 5 s) until `cond` holds.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Two caches, `a` and `b`, over one memory store and one source, each hearing the
/// other's invalidations on `bus`.
pub struct Replicas {
    pub store: MemoryStore,
    pub src: CountingSource,
    pub a: FlagCache<Config>,
    pub b: FlagCache<Config>,
    pub bus: MemoryInvalidator,
}

pub async fn replicas() -> Replicas {
    let store = MemoryStore::new();
    let src = CountingSource::new(1);
    let bus = MemoryInvalidator::new();
    let replica = |name: &str| {
        FlagCache::builder(store.clone(), src.clone())
            .name(name)
            .invalidator(bus.peer())
            .build()
    };
    let a = replica("a").await.unwrap();
    let b = replica("b").await.unwrap();
    Replicas {
        store,
        src,
        a,
        b,
        bus,
    }
}

pub const WORKING: u8 = 0;
pub const NOAUTH: u8 = 1;
pub const TOO_LARGE: u8 = 2;

#[derive(Debug)]
struct NoAuth;

impl std::fmt::Display for NoAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NOAUTH Authentication required.")
    }
}

impl std::error::Error for NoAuth {}

/// A memory store that can answer every call as a server without the client's
/// password does (a permanent backend error), or refuse every write as too large.
#[derive(Clone, Default)]
pub struct Misconfigured {
    pub inner: MemoryStore,
    /// `WORKING`, `NOAUTH` or `TOO_LARGE`.
    pub mode: Arc<AtomicU8>,
}

impl Misconfigured {
    fn check(&self, operation: &'static str) -> Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            NOAUTH => Err(Error::backend("misconfigured", operation, false, NoAuth)),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl FlagStore for Misconfigured {
    fn name(&self) -> &'static str {
        "misconfigured"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.check("get")?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.check("put")?;
        if self.mode.load(Ordering::SeqCst) == TOO_LARGE {
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: entry.payload.len(),
                limit: 1,
                backend: "misconfigured",
            });
        }
        self.inner.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.check("delete")?;
        self.inner.delete(key).await
    }
}
