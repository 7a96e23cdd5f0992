//! Version fences: a fill or load that began before an invalidation, or an L2 entry
//! older than the version announced or stamped, is never installed or served as fresh.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flagcache::layer::FaultControl;
use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    store::{async_trait, Checked, FlagStore, Invalidation, Invalidator},
    CacheStatus, FlagCache, FlagKey, Lookup, Result, Version, VersionSource,
};
use flagcache_testkit::CountingSource;
use tokio::task::JoinHandle;

use common::*;

/// Cache `b`, which never loads, reads through `faults` over `mem` (so the test can
/// hold its L2 reads after they fetched) and hears invalidations on `bus`.
struct HeldReads {
    mem: MemoryStore,
    faults: FaultControl,
    bus: MemoryInvalidator,
    b: FlagCache<Config>,
}

impl HeldReads {
    /// Puts `old` (v1) under `k` and starts B's read of it, held after it fetched; then
    /// a foreign publisher writes `new` (v2) and publishes an invalidation that names no
    /// version, and B applies it. Returns B's read, still held.
    async fn read_overtaken_by_a_foreign_write(
        &self,
        k: &FlagKey,
    ) -> JoinHandle<Result<Lookup<Config>>> {
        put(&self.mem, k, "old", 1).await;
        self.faults.hold_reads();
        let read = spawn_lookup(&self.b, k);
        until("B's read is in flight", || self.faults.held() == 1).await;
        put(&self.mem, k, "new", 2).await;
        self.bus
            .publish(&Invalidation::key(k.clone()))
            .await
            .unwrap();
        until("B applied the invalidation", || {
            self.b.stats().invalidations == 1
        })
        .await;
        read
    }
}

async fn held_reads() -> HeldReads {
    let mem = MemoryStore::new();
    let (b_store, faults) = faulty(&mem);
    let bus = MemoryInvalidator::new();
    let b = FlagCache::<Config>::builder(b_store, never_loads)
        .l2_timeout(Duration::from_secs(10))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    HeldReads {
        mem,
        faults,
        bus,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_started_before_an_invalidation_cannot_install_its_old_value() {
    // B reads through a store whose reads we can pause after they fetched.
    let HeldReads {
        mem,
        faults,
        bus,
        b,
    } = held_reads().await;
    let a = FlagCache::<Config>::builder(mem.clone(), never_loads)
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    put(&mem, &k, "old", 1).await;

    // 1. B's L2 read fetches v1 … and is paused before it returns.
    faults.hold_reads();
    let slow = spawn_lookup(&b, &k);
    until("B's read is in flight", || faults.held() == 1).await;
    // 2. A writes v2; B receives the invalidation.
    a.set(&k, "new".to_string(), Version::new(2)).await.unwrap();
    until("B applied the invalidation", || {
        b.stats().invalidations == 1
    })
    .await;
    // 3. B's read resumes with v1, older than the version the event announced: B reads
    //    L2 again rather than serve or install it.
    faults.release_reads();
    let l = slow.await.unwrap().unwrap();
    assert_eq!((value(&l), l.version), ("new", Some(Version::new(2))));
    let next = b.lookup(&k).await.unwrap();
    assert_eq!((value(&next), next.status), ("new", CacheStatus::HitL1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_fill_is_fenced_out_even_when_the_event_names_no_version() {
    // A foreign publisher (no version in its events) updates L2 and publishes while B's
    // read of the old value is in flight.
    let held = held_reads().await;
    let HeldReads { faults, b, .. } = &held;
    let k = key("k");
    let slow = held.read_overtaken_by_a_foreign_write(&k).await;
    faults.release_reads();
    let l = slow.await.unwrap().unwrap();
    assert_eq!(
        value(&l),
        "old",
        "the read that began before the write answers with what it read"
    );
    // … but its value was refused by the fence: B's next read is not an L1 hit on v1.
    assert_eq!(b.stats().fenced_fills, 1);
    let next = b.lookup(&k).await.unwrap();
    assert_eq!((value(&next), next.status), ("new", CacheStatus::HitL2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_arriving_after_an_invalidation_does_not_join_the_old_fill() {
    let held = held_reads().await;
    let HeldReads { faults, b, .. } = &held;
    let k = key("k");
    let early = held.read_overtaken_by_a_foreign_write(&k).await;
    let late = spawn_lookup(b, &k);
    until("the late caller started its own read", || {
        faults.held() == 2
    })
    .await;
    faults.release_reads();
    assert_eq!(value(&early.await.unwrap().unwrap()), "old");
    assert_eq!(value(&late.await.unwrap().unwrap()), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unversioned_invalidation_fences_out_even_a_fill_at_an_announced_version() {
    // A versioned event (v7) first, then a plain invalidate: a fill that read v7 before
    // the plain invalidate must not install it.
    let HeldReads {
        mem,
        faults,
        bus,
        b,
    } = held_reads().await;
    let k = key("k");
    put(&mem, &k, "v7", 7).await;
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(7)))
        .await
        .unwrap();
    until("v7 announced", || b.stats().invalidations == 1).await;
    faults.hold_reads();
    let slow = spawn_lookup(&b, &k);
    until("read in flight", || faults.held() == 1).await;
    bus.publish(&Invalidation::key(k.clone())).await.unwrap();
    until("plain invalidation applied", || {
        b.stats().invalidations == 2
    })
    .await;
    faults.release_reads();
    assert_eq!(value(&slow.await.unwrap().unwrap()), "v7");
    assert_eq!(b.stats().fenced_fills, 1, "the late v7 fill was installed");
    assert_eq!(b.lookup(&k).await.unwrap().status, CacheStatus::HitL2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l2_entry_older_than_an_announced_version_is_a_miss() {
    // A foreign publisher announces v2 without having written L2 yet.
    let mem = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let src = CountingSource::new(2);
    let b = FlagCache::builder(mem.clone(), src.clone())
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    put(&mem, &k, "k@1", 1).await;
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(2)))
        .await
        .unwrap();
    until("applied", || b.stats().invalidations == 1).await;
    let l = b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_began_before_invalidate_neither_installs_nor_writes_back() {
    let src = CountingSource::new(1);
    src.hold();
    let store = MemoryStore::new();
    let cache = FlagCache::builder(store.clone(), src.clone())
        .build()
        .await
        .unwrap();
    let k = key("k");
    let slow = spawn_lookup(&cache, &k);
    until("the load is in flight", || src.calls() == 1).await;
    cache.invalidate(&k).await.unwrap();
    src.release();
    assert_eq!(value(&slow.await.unwrap().unwrap()), "k@1");
    assert_eq!(cache.stats().fenced_fills, 1);
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "the pre-invalidation load was written back to L2"
    );
    src.set_version(2);
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

struct Meta(Arc<AtomicU64>);

#[async_trait]
impl VersionSource for Meta {
    async fn current_version(&self, _: &FlagKey) -> Result<Option<Version>> {
        Ok(Some(Version::new(self.0.load(Ordering::SeqCst))))
    }
}

#[tokio::test]
async fn version_stamped_reads_treat_any_mismatch_as_a_miss() {
    let mem = MemoryStore::new();
    let k = key("k");
    put(&mem, &k, "k@5", 5).await;
    let meta = Arc::new(AtomicU64::new(5));
    let src = CountingSource::new(5);
    let cache = FlagCache::builder(mem.clone(), src.clone())
        .fresh_for(Duration::ZERO)
        .stale_for(Duration::ZERO)
        .version_source(Meta(meta.clone()))
        .build()
        .await
        .unwrap();
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL2);
    // The meta version says 4 (a rollback): L2's *newer* v5 is a miss too.
    meta.store(4, Ordering::SeqCst);
    assert_eq!(
        mem.get_checked(&k, Version::new(4)).await.unwrap(),
        Checked::Stale {
            current: Version::new(5)
        }
    );
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::Miss);
    meta.store(6, Ordering::SeqCst);
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::Miss);
    assert_eq!(src.calls(), 2);
}
