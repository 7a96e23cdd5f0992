//! `FlagCache`: the read path, the write path, invalidation wiring, version fences,
//! fail-safe and the circuit breaker — on the memory backend, with faults injected by
//! `FaultyStore` around a real store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flagcache::layer::{FaultControl, FaultyStore, Op};
use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    async_trait, CacheStatus, Checked, Codec, Entry, Error, FlagCache, FlagKey, FlagStore,
    FlagStoreExt, Invalidation, Invalidator, PutOutcome, Result, StaleReason, Version,
    VersionSource,
};
use tokio::sync::Notify;

type Config = String;

fn key(s: &str) -> FlagKey {
    FlagKey::new(s).unwrap()
}

/// A loader whose calls are counted, whose answers can be gated, and whose version
/// and behaviour tests can change between calls.
#[derive(Clone, Default)]
struct Source {
    calls: Arc<AtomicUsize>,
    version: Arc<AtomicU64>,
    gate: Arc<Mutex<Option<Arc<Notify>>>>,
    mode: Arc<Mutex<Mode>>,
}

#[derive(Clone, Copy, Default, PartialEq)]
enum Mode {
    #[default]
    Ok,
    Fail,
    Hang,
    Panic,
    Absent,
}

impl Source {
    fn new(version: u64) -> Self {
        let s = Source::default();
        s.version.store(version, Ordering::SeqCst);
        s
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn set_version(&self, v: u64) {
        self.version.store(v, Ordering::SeqCst);
    }
    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
    /// Holds every load until the returned gate is notified.
    fn gate(&self) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        *self.gate.lock().unwrap() = Some(n.clone());
        n
    }
    fn loader(
        &self,
    ) -> impl Fn(
        FlagKey,
    ) -> futures_util::future::BoxFuture<'static, Result<Option<(Config, Version)>>>
           + Send
           + Sync
           + 'static {
        let s = self.clone();
        move |k: FlagKey| {
            let s = s.clone();
            Box::pin(async move {
                s.calls.fetch_add(1, Ordering::SeqCst);
                let gate = s.gate.lock().unwrap().clone();
                if let Some(g) = gate {
                    g.notified().await;
                }
                let mode = *s.mode.lock().unwrap();
                let v = s.version.load(Ordering::SeqCst);
                match mode {
                    Mode::Ok => Ok(Some((format!("{k}@{v}"), Version::new(v)))),
                    Mode::Absent => Ok(None),
                    Mode::Fail => Err(Error::loader(
                        &k,
                        std::io::Error::other("control plane down"),
                    )),
                    Mode::Hang => std::future::pending().await,
                    Mode::Panic => panic!("loader bug"),
                }
            })
        }
    }
}

fn faulty(store: &MemoryStore) -> (FaultyStore<MemoryStore>, FaultControl) {
    FaultyStore::new(store.clone())
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn value(l: &flagcache::Lookup<Config>) -> &str {
    l.value.as_deref().map(String::as_str).unwrap_or("<absent>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_of_1000_reads_costs_one_l2_read_and_one_load() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = Source::new(1);
    let gate = src.gate();
    let cache = FlagCache::builder(store, src.loader())
        .build()
        .await
        .unwrap();
    let k = key("cold");
    let reads: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.lookup(&k).await })
        })
        .collect();
    until("every read joined the one fill", || {
        cache.stats().coalesced_waits == 999
    })
    .await;
    gate.notify_one();
    for r in reads {
        let l = r.await.unwrap().unwrap();
        assert_eq!(value(&l), "cold@1");
        assert_eq!(l.status, CacheStatus::Miss);
    }
    assert_eq!(src.calls(), 1, "loader calls");
    assert_eq!(faults.calls(Op::Read), 1, "L2 reads");
    assert_eq!(faults.calls(Op::Put), 1, "L2 writes");
    assert_eq!(
        mem.get_value::<Config>(&k).await.unwrap(),
        Some(("cold@1".into(), Version::new(1)))
    );
    // Then L1 serves it, with no I/O.
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    assert_eq!(faults.calls(Op::Read), 1);
    let st = cache.stats();
    assert_eq!((st.misses, st.hits_l1, st.loads), (1000, 1, 1));
}

/// L1 hits are counted on per-thread stripes, leased without a locked add while one is
/// free and shared (atomically) past that: with more threads alive than stripes, and
/// threads exiting and new ones taking their stripes, no hit may be lost — in either of
/// two caches read from the same threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_l1_hit_is_counted_from_many_threads_at_once() {
    let src = Source::new(1);
    let (a, b) = (
        FlagCache::<Config>::builder(MemoryStore::new(), src.loader())
            .build()
            .await
            .unwrap(),
        FlagCache::<Config>::builder(MemoryStore::new(), src.loader())
            .build()
            .await
            .unwrap(),
    );
    let k = key("hot");
    a.get(&k).await.unwrap();
    b.get(&k).await.unwrap();
    const WAVES: u64 = 3;
    const THREADS: u64 = 40;
    const HITS: u64 = 50_000;
    for _ in 0..WAVES {
        // All of a wave's threads alive and counting at once.
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (a, b, k, start) = (&a, &b, &k, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..HITS {
                        let cache = if (i + t) % 2 == 0 { a } else { b };
                        assert!(cache.get_cached(k).is_some(), "a fresh L1 hit");
                    }
                });
            }
        });
    }
    let total = a.stats().hits_l1 + b.stats().hits_l1;
    assert_eq!(total, WAVES * THREADS * HITS);
    assert_eq!(a.stats().hits_l1, WAVES * THREADS * HITS / 2);
}

#[tokio::test]
async fn l2_hits_come_back_into_l1_and_never_call_the_loader() {
    let mem = MemoryStore::new();
    mem.put_value(
        &key("k"),
        &"from-l2".to_string(),
        Version::new(4),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let never = |_: FlagKey| async { unreachable!("the loader must not run on an L2 hit") };
    let cache = FlagCache::<Config>::builder(mem, never)
        .build()
        .await
        .unwrap();
    let first = cache.lookup(&key("k")).await.unwrap();
    assert_eq!(
        (value(&first), first.status, first.version),
        ("from-l2", CacheStatus::HitL2, Some(Version::new(4)))
    );
    let second = cache.lookup(&key("k")).await.unwrap();
    assert_eq!(second.status, CacheStatus::HitL1);
    // The same Arc: an L1 hit decodes nothing.
    assert!(Arc::ptr_eq(
        first.value.as_ref().unwrap(),
        second.value.as_ref().unwrap()
    ));
}

/// Records the TTL of every write.
struct TtlRecorder {
    inner: MemoryStore,
    ttls: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl FlagStore for TtlRecorder {
    fn capabilities(&self) -> flagcache::Capabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.ttls.lock().unwrap().push(ttl);
        self.inner.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.inner.delete(key).await
    }
}

#[tokio::test]
async fn every_write_carries_a_jittered_ttl() {
    let ttls = Arc::new(Mutex::new(Vec::new()));
    let store = TtlRecorder {
        inner: MemoryStore::new(),
        ttls: ttls.clone(),
    };
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .l2_ttl(Duration::from_secs(100))
        .build()
        .await
        .unwrap();
    for i in 0..300 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    let ttls = ttls.lock().unwrap().clone();
    assert_eq!(ttls.len(), 300);
    let secs: Vec<f64> = ttls.iter().map(Duration::as_secs_f64).collect();
    let (min, max) = secs
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    assert!(
        min >= 85.0 && max <= 115.0,
        "outside ±15 %: {min:.1}..{max:.1}"
    );
    assert!(
        min < 90.0 && max > 110.0,
        "not spread over the ±15 % band: {min:.1}..{max:.1}"
    );
    let distinct: std::collections::BTreeSet<u64> =
        ttls.iter().map(|d| d.as_millis() as u64).collect();
    assert!(
        distinct.len() > 250,
        "only {} distinct TTLs",
        distinct.len()
    );

    // Jitter 0 means exact TTLs.
    let exact = Arc::new(Mutex::new(Vec::new()));
    let store = TtlRecorder {
        inner: MemoryStore::new(),
        ttls: exact.clone(),
    };
    let cache = FlagCache::builder(store, src.loader())
        .l2_ttl(Duration::from_secs(100))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    cache.get(&key("x")).await.unwrap();
    assert_eq!(*exact.lock().unwrap(), vec![Duration::from_secs(100)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .fresh_for(Duration::from_millis(50))
        .stale_for(Duration::from_secs(30))
        .l2_ttl(Duration::from_millis(50))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    let k = key("swr");
    assert_eq!(value(&cache.lookup(&k).await.unwrap()), "swr@1");
    tokio::time::sleep(Duration::from_millis(120)).await; // past fresh; L2 expired too
    src.set_version(2);
    let gate = src.gate();
    for _ in 0..50 {
        let t = Instant::now();
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::Revalidating));
        assert_eq!(value(&l), "swr@1");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "a stale read waited"
        );
    }
    until("the refresh reached the loader", || src.calls() == 2).await;
    gate.notify_one();
    let mut fresh = None;
    for _ in 0..1000 {
        let l = cache.lookup(&k).await.unwrap();
        if l.status == CacheStatus::HitL1 {
            fresh = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fresh = fresh.expect("the refreshed value never became fresh");
    assert_eq!(value(&fresh), "swr@2");
    assert_eq!(src.calls(), 2, "exactly one background refresh");
    assert!(cache.stats().stale_revalidating >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refreshes_before_expiry_when_enabled() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .fresh_for(Duration::from_secs(60))
        .l2_ttl(Duration::from_millis(1))
        .ttl_jitter(0.0)
        .xfetch(1e12) // so eager that every hit refreshes
        .build()
        .await
        .unwrap();
    let k = key("early");
    cache.get(&k).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    src.set_version(2);
    for _ in 0..1000 {
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(
            l.status,
            CacheStatus::HitL1,
            "never expired: all reads are fresh hits"
        );
        if value(&l) == "early@2" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("XFetch never refreshed early");
}

#[tokio::test]
async fn xfetch_is_off_by_default() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .l2_ttl(Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    for _ in 0..200 {
        cache.get(&key("k")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(src.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_serves_the_last_known_value_when_l2_and_loader_fail() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .fresh_for(Duration::from_millis(20))
        .stale_for(Duration::ZERO)
        .max_staleness(Duration::from_secs(30))
        .fail_safe_throttle(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let k = key("k");
    cache.get(&k).await.unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    faults.fail_all(true);
    src.set_mode(Mode::Fail);
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    assert_eq!(value(&l), "k@1");
    // A key never seen before has no fallback: a typed error.
    let err = cache.get(&key("never-seen")).await.unwrap_err();
    assert!(matches!(err, Error::Loader { .. }), "{err}");
    let st = cache.stats();
    assert_eq!((st.stale_fail_safe, st.errors), (1, 1));
    // Within the throttle the fail-safe answer is reused: no retry per read.
    let attempts = src.calls();
    for _ in 0..100 {
        let l = cache.lookup(&k).await.unwrap();
        assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    }
    assert_eq!(
        src.calls(),
        attempts,
        "the loader was retried within the throttle"
    );
    // Recovery: everything back; once the throttle passes, fresh values again.
    faults.fail_all(false);
    src.set_mode(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@1", CacheStatus::HitL2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_ends_the_fail_safe_throttle() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .fresh_for(Duration::from_millis(20))
        .stale_for(Duration::ZERO)
        .fail_safe_throttle(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let k = key("k");
    cache.get(&k).await.unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    faults.fail_all(true);
    src.set_mode(Mode::Fail);
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!(l.status, CacheStatus::Stale(StaleReason::FailSafe));
    // The kill switch still lands: an invalidation drops the throttled entry.
    let _ = cache.invalidate(&k).await;
    assert!(
        cache.get(&k).await.is_err(),
        "the invalidated value was served"
    );
}

#[tokio::test]
async fn fail_safe_respects_max_staleness() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .fresh_for(Duration::from_millis(10))
        .stale_for(Duration::ZERO)
        .l2_ttl(Duration::from_millis(10))
        .max_staleness(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    src.set_mode(Mode::Fail);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(matches!(
        cache.get(&key("k")).await,
        Err(Error::Loader { .. })
    ));
}

#[tokio::test]
async fn a_hanging_loader_times_out() {
    let src = Source::new(1);
    src.set_mode(Mode::Hang);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .loader_timeout(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let t = Instant::now();
    let err = cache.get(&key("k")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                backend: "loader",
                ..
            }
        ),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(cache.stats().load_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let src = Source::new(1);
    src.set_mode(Mode::Fail);
    let gate = src.gate();
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .build()
        .await
        .unwrap();
    let k = key("k");
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (c, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { c.get(&k).await })
        })
        .collect();
    until("all joined", || cache.stats().coalesced_waits == 19).await;
    gate.notify_one();
    for r in reads {
        assert!(matches!(r.await.unwrap(), Err(Error::Loader { .. })));
    }
    assert_eq!(src.calls(), 1);
    *src.gate.lock().unwrap() = None;
    src.set_mode(Mode::Ok);
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("k@1")
    );
    assert_eq!(src.calls(), 2, "the error was not cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_is_an_error_and_the_cache_keeps_working() {
    let src = Source::new(1);
    src.set_mode(Mode::Panic);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .build()
        .await
        .unwrap();
    let err = cache.get(&key("k")).await.unwrap_err();
    assert!(err.to_string().contains("loader bug"), "{err}");
    src.set_mode(Mode::Ok);
    assert!(cache.get(&key("k")).await.unwrap().is_some());
    assert!(cache.get(&key("other")).await.unwrap().is_some());
}

#[tokio::test]
async fn corrupt_l2_bytes_are_counted_deleted_and_reloaded() {
    let mem = MemoryStore::new();
    let k = key("k");
    mem.write_raw(
        &k,
        flagcache::bytes::Bytes::from_static(b"\xf1\xa6garbage"),
        Duration::from_secs(60),
    )
    .unwrap();
    let src = Source::new(3);
    let cache = FlagCache::builder(mem.clone(), src.loader())
        .build()
        .await
        .unwrap();
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@3", CacheStatus::Miss));
    assert_eq!(cache.stats().corrupt, 1);
    assert_eq!(src.calls(), 1);
    // Deleted, then replaced by the loaded value.
    assert_eq!(
        mem.get_value::<Config>(&k).await.unwrap(),
        Some(("k@3".into(), Version::new(3)))
    );

    // A well-formed entry whose payload is not a `Config` is treated the same way.
    let k2 = key("wrong-type");
    mem.put_value(
        &k2,
        &vec![1u8, 2, 3],
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        cache.get(&k2).await.unwrap().as_deref().map(String::as_str),
        Some("wrong-type@3")
    );
    assert_eq!(cache.stats().corrupt, 2);
}

#[tokio::test]
async fn absent_flags_are_remembered_briefly() {
    let src = Source::new(1);
    src.set_mode(Mode::Absent);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .negative_ttl(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    assert_eq!(cache.get(&key("ghost")).await.unwrap(), None);
    let l = cache.lookup(&key("ghost")).await.unwrap();
    assert_eq!((l.value.is_none(), l.status), (true, CacheStatus::HitL1));
    assert_eq!(src.calls(), 1);
    tokio::time::sleep(Duration::from_millis(80)).await;
    src.set_mode(Mode::Ok);
    assert!(cache.get(&key("ghost")).await.unwrap().is_some());
    assert_eq!(cache.stats().loads_absent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_bounds_what_a_dead_cache_costs() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    faults.fail_all(true);
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .circuit_breaker(3, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // 50 cold keys: each read would cost an L2 read and an L2 write.
    for i in 0..50 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    let l2_calls = faults.calls(Op::Read) + faults.calls(Op::Put);
    assert_eq!(l2_calls, 3, "L2 was called after the breaker opened");
    let st = cache.stats();
    assert!(st.breaker_open && st.breaker_opened == 1, "{st:?}");
    assert_eq!(
        st.loads, 50,
        "reads were served by the loader: slower, not broken"
    );
    // After the back-off, one probe; L2 is back, so the breaker closes.
    tokio::time::sleep(Duration::from_millis(350)).await;
    faults.fail_all(false);
    cache.get(&key("after")).await.unwrap();
    assert_eq!(faults.calls(Op::Read), 2 + 1, "one probe read");
    assert!(!cache.stats().breaker_open);
    cache.get(&key("after2")).await.unwrap();
    assert_eq!(
        mem.get_value::<Config>(&key("after2"))
            .await
            .unwrap()
            .map(|v| v.1),
        Some(Version::new(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l2_that_hangs_costs_one_timeout_per_backoff_not_per_request() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    faults.set_latency(Duration::from_secs(5));
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .l2_timeout(Duration::from_millis(20))
        .circuit_breaker(2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..100 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    // Two timeouts (20 ms each) opened the breaker; 98 reads paid none.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let st = cache.stats();
    assert_eq!(st.l2_timeouts, 2);
    assert!(st.l2_skipped >= 98 * 2 - 1, "{st:?}");
}

struct Replicas {
    store: MemoryStore,
    src: Source,
    a: FlagCache<Config>,
    b: FlagCache<Config>,
    bus: MemoryInvalidator,
}

async fn replicas() -> Replicas {
    let store = MemoryStore::new();
    let src = Source::new(1);
    let bus = MemoryInvalidator::new();
    let a = FlagCache::builder(store.clone(), src.loader())
        .name("a")
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let b = FlagCache::builder(store.clone(), src.loader())
        .name("b")
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    Replicas {
        store,
        src,
        a,
        b,
        bus,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_on_one_replica_is_served_by_the_other_within_milliseconds() {
    let r = replicas().await;
    let k = key("kill-switch");
    assert_eq!(
        r.a.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("kill-switch@1")
    );
    assert_eq!(
        r.b.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("kill-switch@1")
    );
    assert_eq!(r.b.lookup(&k).await.unwrap().status, CacheStatus::HitL1);

    let t = Instant::now();
    let out =
        r.a.set(&k, "OFF".to_string(), Version::new(2))
            .await
            .unwrap();
    assert_eq!(out, PutOutcome::Stored);
    let mut seen = None;
    for _ in 0..1000 {
        let l = r.b.lookup(&k).await.unwrap();
        if value(&l) == "OFF" {
            seen = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let lag = seen.expect("replica B kept serving the old value");
    assert!(lag < Duration::from_millis(200), "propagation took {lag:?}");
    // B re-read from L2, not from the source.
    assert_eq!(r.src.calls(), 1);
    // A's own event, once applied, did not evict the value A just wrote.
    until("A received its own event", || r.a.stats().own_events == 1).await;
    let own = r.a.lookup(&k).await.unwrap();
    assert_eq!((value(&own), own.status), ("OFF", CacheStatus::HitL1));
    assert_eq!(r.b.stats().invalidations, 1);
    let _ = &r.bus;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_set_reports_it_and_leaves_l1_alone() {
    let r = replicas().await;
    let k = key("k");
    r.store
        .put_value(
            &k,
            &"v5".to_string(),
            Version::new(5),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        r.a.get(&k).await.unwrap().as_deref().map(String::as_str),
        Some("v5")
    );
    let out =
        r.a.set(&k, "stale".to_string(), Version::new(3))
            .await
            .unwrap();
    assert_eq!(
        out,
        PutOutcome::Superseded {
            current: Version::new(5)
        }
    );
    let l = r.a.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("v5", CacheStatus::HitL1));
    assert_eq!(
        r.store.get_value::<Config>(&k).await.unwrap().unwrap().0,
        "v5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_drops_the_key_everywhere() {
    let r = replicas().await;
    let k = key("k");
    r.a.get(&k).await.unwrap();
    r.b.get(&k).await.unwrap();
    r.src.set_version(2);
    r.a.invalidate(&k).await.unwrap();
    assert_eq!(r.store.get(&k).await.unwrap(), None, "L2 still holds it");
    until("B applied the invalidation", || {
        r.b.stats().invalidations == 1
    })
    .await;
    let l = r.b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_all_flushes_every_l1_and_keeps_l2() {
    let r = replicas().await;
    for i in 0..5 {
        r.b.get(&key(&format!("k{i}"))).await.unwrap();
    }
    assert_eq!(r.b.stats().l1_entries, 5);
    r.a.invalidate_all().await.unwrap();
    until("B flushed", || r.b.stats().l1_entries == 0).await;
    let l = r.b.lookup(&key("k0")).await.unwrap();
    assert_eq!(l.status, CacheStatus::HitL2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purging_event_from_a_foreign_publisher_deletes_l2_too() {
    let r = replicas().await;
    let k = key("k");
    r.b.get(&k).await.unwrap();
    r.bus
        .publish(&Invalidation::key(k.clone()).purging_shared())
        .await
        .unwrap();
    until("B deleted L2", || {
        futures_util::FutureExt::now_or_never(r.store.get(&k))
            .unwrap()
            .unwrap()
            .is_none()
    })
    .await;
}

// One thread: the 50 publishes (which never yield) all land before B's listener
// runs, so B lags for certain — with a second worker it could keep up.
#[tokio::test]
async fn resync_stops_l1_from_serving_as_fresh() {
    let store = MemoryStore::new();
    let src = Source::new(1);
    let bus = MemoryInvalidator::with_capacity(1);
    let b = FlagCache::builder(store.clone(), src.loader())
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    b.get(&k).await.unwrap();
    assert_eq!(b.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    // Overflow the bus faster than B reads it: B lags, and must resync.
    let publisher = bus.peer();
    for i in 0..50 {
        publisher
            .publish(&Invalidation::key(key(&format!("other{i}"))))
            .await
            .unwrap();
    }
    until("B resynced", || b.stats().resyncs >= 1).await;
    let l = b.lookup(&k).await.unwrap();
    assert_eq!(
        l.status,
        CacheStatus::HitL2,
        "an unverified L1 entry was served as fresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_started_before_an_invalidation_cannot_install_its_old_value() {
    // B reads through a store whose reads we can pause after they fetched.
    let mem = MemoryStore::new();
    let (b_store, faults) = faulty(&mem);
    let bus = MemoryInvalidator::new();
    let never = |_: FlagKey| async { unreachable!("no loader call expected") };
    let a = FlagCache::<Config>::builder(mem.clone(), never)
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let b = FlagCache::<Config>::builder(b_store, never)
        .l2_timeout(Duration::from_secs(10))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    mem.put_value(
        &k,
        &"old".to_string(),
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    // 1. B's L2 read fetches v1 … and is paused before it returns.
    faults.hold_reads();
    let slow = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move { b.lookup(&k).await })
    };
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
    let mem = MemoryStore::new();
    let (b_store, faults) = faulty(&mem);
    let bus = MemoryInvalidator::new();
    let never = |_: FlagKey| async { unreachable!("no loader call expected") };
    let b = FlagCache::<Config>::builder(b_store, never)
        .l2_timeout(Duration::from_secs(10))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    mem.put_value(
        &k,
        &"old".to_string(),
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    faults.hold_reads();
    let slow = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move { b.lookup(&k).await })
    };
    until("B's read is in flight", || faults.held() == 1).await;
    mem.put_value(
        &k,
        &"new".to_string(),
        Version::new(2),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    bus.publish(&Invalidation::key(k.clone())).await.unwrap();
    until("B applied the invalidation", || {
        b.stats().invalidations == 1
    })
    .await;
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
    let mem = MemoryStore::new();
    let (b_store, faults) = faulty(&mem);
    let bus = MemoryInvalidator::new();
    let never = |_: FlagKey| async { unreachable!() };
    let b = FlagCache::<Config>::builder(b_store, never)
        .l2_timeout(Duration::from_secs(10))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    mem.put_value(
        &k,
        &"old".to_string(),
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    faults.hold_reads();
    let early = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move { b.lookup(&k).await })
    };
    until("in flight", || faults.held() == 1).await;
    mem.put_value(
        &k,
        &"new".to_string(),
        Version::new(2),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    bus.publish(&Invalidation::key(k.clone())).await.unwrap();
    until("applied", || b.stats().invalidations == 1).await;
    let late = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move { b.lookup(&k).await })
    };
    until("the late caller started its own read", || {
        faults.held() == 2
    })
    .await;
    faults.release_reads();
    assert_eq!(value(&early.await.unwrap().unwrap()), "old");
    assert_eq!(value(&late.await.unwrap().unwrap()), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l2_entry_older_than_an_announced_version_is_a_miss() {
    // A foreign publisher announces v2 without having written L2 yet.
    let mem = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let src = Source::new(2);
    let b = FlagCache::builder(mem.clone(), src.loader())
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    mem.put_value(
        &k,
        &"k@1".to_string(),
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(2)))
        .await
        .unwrap();
    until("applied", || b.stats().invalidations == 1).await;
    let l = b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refetch_jitter_rewarms_an_invalidated_key_in_the_background() {
    let store = MemoryStore::new();
    let src = Source::new(1);
    let bus = MemoryInvalidator::new();
    let b = FlagCache::builder(store.clone(), src.loader())
        .invalidator(bus.peer())
        .refetch_jitter(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    let k = key("k");
    b.get(&k).await.unwrap();
    store
        .put_value(
            &k,
            &"k@2".to_string(),
            Version::new(2),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(2)))
        .await
        .unwrap();
    // The new version lands in L1 with no read asking for it.
    until("applied", || b.stats().invalidations == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // > the 30 ms jitter
                                                          // Without the background re-fetch this read would be an L2 hit.
    let l = b.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::HitL1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidation_task_ends_with_the_cache() {
    let bus = MemoryInvalidator::new();
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let clone = cache.clone();
    assert_eq!(bus.subscriber_count(), 1);
    drop(cache);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(bus.subscriber_count(), 1, "a clone is still alive");
    drop(clone);
    until("the task dropped its subscription", || {
        bus.subscriber_count() == 0
    })
    .await;
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
    mem.put_value(
        &k,
        &"k@5".to_string(),
        Version::new(5),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let meta = Arc::new(AtomicU64::new(5));
    let src = Source::new(5);
    let cache = FlagCache::builder(mem.clone(), src.loader())
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

#[tokio::test]
async fn warm_preloads_from_l2_in_one_read_then_from_the_loader() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let keys: Vec<FlagKey> = (0..10).map(|i| key(&format!("k{i}"))).collect();
    for k in &keys[..5] {
        mem.put_value(
            k,
            &format!("{k}@1"),
            Version::new(1),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .build()
        .await
        .unwrap();
    let report = cache.warm(&keys).await;
    assert_eq!(
        (report.from_l2, report.loaded, report.failed.len()),
        (5, 5, 0),
        "{report:?}"
    );
    assert_eq!(src.calls(), 5);
    for k in &keys {
        assert_eq!(cache.lookup(k).await.unwrap().status, CacheStatus::HitL1);
    }
    let again = cache.warm(&keys).await;
    assert_eq!(again.already_fresh, 10);
    assert_eq!(
        faults.calls(Op::Read),
        1 + 5,
        "one batched read, then one per L2 miss"
    );
}

#[tokio::test]
async fn the_evaluation_hook_sees_every_read() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .on_evaluation(move |ev| {
            log.lock()
                .unwrap()
                .push((ev.key.to_string(), ev.status, ev.version))
        })
        .build()
        .await
        .unwrap();
    cache.get(&key("a")).await.unwrap();
    cache.get(&key("a")).await.unwrap();
    src.set_mode(Mode::Fail);
    let _ = cache.get(&key("b")).await;
    // The synchronous read is an evaluation too; one L1 cannot answer is not.
    assert!(cache.get_cached(&key("a")).is_some());
    assert!(cache.get_cached(&key("never")).is_none());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (
                "a".to_string(),
                Some(CacheStatus::Miss),
                Some(Version::new(1))
            ),
            (
                "a".to_string(),
                Some(CacheStatus::HitL1),
                Some(Version::new(1))
            ),
            ("b".to_string(), None, None),
            (
                "a".to_string(),
                Some(CacheStatus::HitL1),
                Some(Version::new(1))
            ),
        ]
    );
}

#[tokio::test]
async fn get_cached_answers_from_l1_only() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .fresh_for(Duration::from_millis(30))
        .stale_for(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let (a, gone) = (key("a"), key("gone"));
    assert_eq!(cache.get_cached(&a), None, "nothing loaded yet");
    cache.get(&a).await.unwrap();
    assert_eq!(
        cache
            .get_cached(&a)
            .flatten()
            .as_deref()
            .map(String::as_str),
        Some("a@1")
    );
    // A flag the source lacks is an answer too: Some(None).
    src.set_mode(Mode::Absent);
    assert_eq!(cache.get(&gone).await.unwrap(), None);
    assert_eq!(cache.get_cached(&gone), Some(None));
    // Invalidated, or past its freshness: only `get` can answer.
    cache.invalidate(&a).await.unwrap();
    assert_eq!(cache.get_cached(&a), None);
    src.set_mode(Mode::Ok);
    cache.get(&a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(cache.get_cached(&a), None, "an expired entry was answered");
    assert_eq!(src.calls(), 3, "get_cached never loads");
}

#[tokio::test]
async fn stats_count_by_tier_and_compute_the_hit_rate() {
    let mem = MemoryStore::new();
    mem.put_value(
        &key("in-l2"),
        &"x".to_string(),
        Version::new(1),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let src = Source::new(1);
    let cache = FlagCache::builder(mem, src.loader()).build().await.unwrap();
    cache.get(&key("in-l2")).await.unwrap(); // L2 hit
    cache.get(&key("cold")).await.unwrap(); // miss
    for _ in 0..8 {
        cache.get(&key("cold")).await.unwrap(); // L1 hits
    }
    let st = cache.stats();
    assert_eq!((st.hits_l1, st.hits_l2, st.misses, st.loads), (8, 1, 1, 1));
    assert!((st.hit_rate() - 0.9).abs() < 1e-9, "{}", st.hit_rate());
    assert_eq!(st.l1_entries, 2);
}

#[tokio::test]
async fn with_l1_off_every_read_goes_to_l2() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    let src = Source::new(1);
    let cache = FlagCache::builder(store, src.loader())
        .l1(false)
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            cache.lookup(&key("k")).await.unwrap().status,
            CacheStatus::HitL2
        );
    }
    assert_eq!(faults.calls(Op::Read), 6);
    assert_eq!(src.calls(), 1);
}

#[tokio::test]
async fn bad_settings_are_refused_at_build() {
    let src = Source::new(1);
    for b in [
        FlagCache::builder(MemoryStore::new(), src.loader()).ttl_jitter(0.9),
        FlagCache::builder(MemoryStore::new(), src.loader()).l2_ttl(Duration::ZERO),
        FlagCache::builder(MemoryStore::new(), src.loader()).l2_timeout(Duration::ZERO),
        FlagCache::builder(MemoryStore::new(), src.loader()).l1_capacity(0),
        FlagCache::builder(MemoryStore::new(), src.loader()).xfetch(-1.0),
    ] {
        assert!(matches!(b.build().await, Err(Error::InvalidArgument(_))));
    }
}

#[tokio::test]
async fn a_json_layout_store_gets_json_values() {
    let mem = MemoryStore::builder()
        .codec(flagcache::JsonCodec::new())
        .build();
    let src = Source::new(7);
    let cache = FlagCache::builder(mem.clone(), src.loader())
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    assert!(matches!(mem.codec(), Codec::Json(_)));
    let entry = mem.get(&key("k")).await.unwrap().unwrap();
    assert_eq!(&entry.payload[..], br#""k@7""#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unversioned_invalidation_fences_out_even_a_fill_at_an_announced_version() {
    // A versioned event (v7) first, then a plain invalidate: a fill that read v7 before
    // the plain invalidate must not install it.
    let mem = MemoryStore::new();
    let (b_store, faults) = faulty(&mem);
    let bus = MemoryInvalidator::new();
    let never = |_: FlagKey| async { unreachable!("no loader call expected") };
    let b = FlagCache::<Config>::builder(b_store, never)
        .l2_timeout(Duration::from_secs(10))
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = key("k");
    mem.put_value(
        &k,
        &"v7".to_string(),
        Version::new(7),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    bus.publish(&Invalidation::key(k.clone()).with_version(Version::new(7)))
        .await
        .unwrap();
    until("v7 announced", || b.stats().invalidations == 1).await;
    faults.hold_reads();
    let slow = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move { b.lookup(&k).await })
    };
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
async fn a_load_that_began_before_invalidate_neither_installs_nor_writes_back() {
    let src = Source::new(1);
    let gate = src.gate();
    let store = MemoryStore::new();
    let cache = FlagCache::builder(store.clone(), src.loader())
        .build()
        .await
        .unwrap();
    let k = key("k");
    let slow = {
        let (c, k) = (cache.clone(), k.clone());
        tokio::spawn(async move { c.lookup(&k).await })
    };
    until("the load is in flight", || src.calls() == 1).await;
    cache.invalidate(&k).await.unwrap();
    gate.notify_one();
    assert_eq!(value(&slow.await.unwrap().unwrap()), "k@1");
    assert_eq!(cache.stats().fenced_fills, 1);
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "the pre-invalidation load was written back to L2"
    );
    *src.gate.lock().unwrap() = None;
    src.set_version(2);
    let l = cache.lookup(&k).await.unwrap();
    assert_eq!((value(&l), l.status), ("k@2", CacheStatus::Miss));
}

#[tokio::test]
async fn huge_durations_are_refused_not_a_panic() {
    let src = Source::new(1);
    let b = FlagCache::builder(MemoryStore::new(), src.loader()).fresh_for(Duration::MAX);
    assert!(matches!(b.build().await, Err(Error::InvalidArgument(_))));
}

/// An invalidator whose subscriptions the test can end, as a dropped connection would.
#[derive(Clone)]
struct Closable {
    bus: MemoryInvalidator,
    close: Arc<tokio::sync::watch::Sender<u64>>,
    subscribes: Arc<AtomicUsize>,
}

#[async_trait]
impl Invalidator for Closable {
    fn node_id(&self) -> flagcache::NodeId {
        self.bus.node_id()
    }
    async fn publish(&self, event: &Invalidation) -> Result<()> {
        self.bus.publish(event).await
    }
    async fn subscribe(&self) -> Result<flagcache::Subscription> {
        use futures_util::StreamExt;
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.close.subscribe();
        rx.borrow_and_update();
        let inner = self.bus.subscribe().await?;
        let closed = async move {
            let _ = rx.changed().await;
        };
        Ok(flagcache::Subscription::from_stream(
            inner.take_until(Box::pin(closed)),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_makes_l1_untrusted_until_resubscribed() {
    let bus = MemoryInvalidator::new();
    let inv = Closable {
        bus: bus.peer(),
        close: Arc::new(tokio::sync::watch::Sender::new(0)),
        subscribes: Arc::new(AtomicUsize::new(0)),
    };
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .invalidator(inv.clone())
        .build()
        .await
        .unwrap();
    let k = key("k");
    cache.get(&k).await.unwrap();
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    inv.close.send_modify(|n| *n += 1);
    until("resubscribed", || {
        inv.subscribes.load(Ordering::SeqCst) == 2
    })
    .await;
    until("resynced twice (closed, then reconnected)", || {
        cache.stats().resyncs == 2
    })
    .await;
    // Back in service: events are heard again.
    bus.publish(&Invalidation::key(k.clone())).await.unwrap();
    until("event applied after resubscribing", || {
        cache.stats().invalidations == 1
    })
    .await;
    assert_ne!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
    assert_eq!(cache.lookup(&k).await.unwrap().status, CacheStatus::HitL1);
}

#[tokio::test]
async fn a_get_polled_after_it_answered_is_an_error_not_a_panic() {
    use futures_util::FutureExt;
    use std::task::{Context, Poll};
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .build()
        .await
        .unwrap();
    let k = key("a");
    cache.get(&k).await.unwrap();
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut hit = cache.get(&k);
    assert!(matches!(hit.poll_unpin(&mut cx), Poll::Ready(Ok(Some(_)))));
    assert!(matches!(
        hit.poll_unpin(&mut cx),
        Poll::Ready(Err(Error::Closed(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_reader_outside_the_runtime_still_starts_the_refresh() {
    let src = Source::new(1);
    let cache = FlagCache::builder(MemoryStore::new(), src.loader())
        .fresh_for(Duration::from_millis(20))
        .stale_for(Duration::from_secs(30))
        .l2_ttl(Duration::from_millis(25))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    let k = key("a");
    cache.get(&k).await.unwrap();
    // Past freshness in L1, gone from L2: the refresh has to load.
    tokio::time::sleep(Duration::from_millis(80)).await;
    // A plain thread, no runtime: served stale, and the refresh runs on the cache's.
    let (c, k2) = (cache.clone(), k.clone());
    let served = std::thread::spawn(move || c.get_cached(&k2))
        .join()
        .unwrap();
    assert!(served.flatten().is_some());
    for _ in 0..200 {
        if src.calls() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(src.calls(), 2, "the background refresh never started");
}

/// Over a store that keeps no stale values (the default `mark_stale` deletes), a
/// refresh acts as an invalidation: every replica drops its copy and the next reads
/// load the source's current value, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_without_stale_support_reloads_everywhere() {
    let r = replicas().await;
    let k = key("rules");
    r.a.get(&k).await.unwrap();
    r.b.get(&k).await.unwrap();
    assert_eq!(r.src.calls(), 1);
    r.src.set_version(2);
    r.a.refresh(&k).await.unwrap();
    assert_eq!(
        r.store.get(&k).await.unwrap(),
        None,
        "L2 still holds the old entry"
    );
    for cache in [&r.a, &r.b] {
        let mut got = String::new();
        for _ in 0..200 {
            got = value(&cache.lookup(&k).await.unwrap()).to_string();
            if got == "rules@2" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(got, "rules@2");
    }
    assert_eq!(
        r.src.calls(),
        2,
        "both replicas share one reload through L2"
    );
}

/// A store whose reads form one batch group (as one Redis server's do), over the
/// memory store: what turns L2 read batching on.
struct SharedStore(FaultyStore<MemoryStore>);

#[async_trait]
impl FlagStore for SharedStore {
    fn capabilities(&self) -> flagcache::Capabilities {
        self.0.capabilities()
    }
    fn read_group(&self, _key: &FlagKey) -> Option<u64> {
        Some(0)
    }
    async fn get(&self, key: &FlagKey) -> Result<Option<Entry>> {
        self.0.get(key).await
    }
    async fn get_each(&self, keys: &[FlagKey]) -> Vec<Result<Option<Entry>>> {
        self.0.get_each(keys).await
    }
    async fn put(&self, key: &FlagKey, entry: &Entry, ttl: Duration) -> Result<PutOutcome> {
        self.0.put(key, entry, ttl).await
    }
    async fn delete(&self, key: &FlagKey) -> Result<()> {
        self.0.delete(key).await
    }
}

async fn shared_store_with(keys: &[FlagKey]) -> (SharedStore, FaultControl) {
    let mem = MemoryStore::new();
    for (i, k) in keys.iter().enumerate() {
        mem.put_value(
            k,
            &format!("l2:{i}"),
            Version::new(1),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let (faulty, faults) = faulty(&mem);
    (SharedStore(faulty), faults)
}

/// Concurrent misses beyond `l2_batch_after` in flight wait for one batched read
/// instead of one read each — and every key still gets its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_l2_reads_beyond_the_inline_limit_go_as_one_batch() {
    let keys: Vec<FlagKey> = (0..40).map(|i| key(&format!("batch.{i}"))).collect();
    let (store, faults) = shared_store_with(&keys).await;
    let src = Source::new(1);
    let cache = FlagCache::<Config>::builder(store, src.loader())
        .l2_batch_after(2)
        .l2_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    faults.hold_reads();
    let reads: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.lookup(&k).await })
        })
        .collect();
    until("two reads in flight", || faults.held() == 2).await;
    // Let every other read reach the queue.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(faults.calls(Op::Read), 2, "only the inline reads went out");
    faults.release_reads();
    for (i, r) in reads.into_iter().enumerate() {
        let l = r.await.unwrap().unwrap();
        assert_eq!(value(&l), format!("l2:{i}"), "key {i}");
        assert_eq!(l.status, CacheStatus::HitL2, "key {i}");
    }
    assert_eq!(src.calls(), 0, "no key fell through to the loader");
    let st = cache.stats();
    assert_eq!(st.l2_batched_reads, 38);
    assert_eq!(faults.calls(Op::Read), 2 + st.l2_batches);
    assert!(
        st.l2_batches < 5,
        "{} batches for 38 queued reads",
        st.l2_batches
    );
}

/// Queued reads whose callers gave up (their L2 timeout passed) do not wedge the
/// batcher: the callers fall back to the loader, and later reads go out on their own
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_queued_reads_do_not_wedge_the_batcher() {
    let keys: Vec<FlagKey> = (0..6).map(|i| key(&format!("wedge.{i}"))).collect();
    let (store, faults) = shared_store_with(&keys).await;
    let src = Source::new(1);
    let cache = FlagCache::<Config>::builder(store, src.loader())
        .l2_batch_after(1)
        .l2_timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    faults.hold_reads();
    let reads: Vec<_> = keys[..5]
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.lookup(&k).await })
        })
        .collect();
    let started = Instant::now();
    for r in reads {
        let l = r.await.unwrap().unwrap();
        assert_eq!(l.status, CacheStatus::Miss, "timed out in L2, loaded");
    }
    // Each read ran out of its own L2 timeout, queued or not, and was counted so.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        cache.stats().l2_timeouts,
        5,
        "every read counted as an L2 timeout"
    );
    assert_eq!(src.calls(), 5);
    // The held inline read may hand the queue on before every queued caller left;
    // what queued never goes out one by one.
    assert!(
        faults.calls(Op::Read) <= 2,
        "{} reads",
        faults.calls(Op::Read)
    );
    faults.release_reads();
    until("the held reads ended", || faults.held() == 0).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (before, batched) = (faults.calls(Op::Read), cache.stats().l2_batched_reads);
    let l = cache.lookup(&keys[5]).await.unwrap();
    assert_eq!((value(&l), l.status), ("l2:5", CacheStatus::HitL2));
    assert_eq!(
        faults.calls(Op::Read),
        before + 1,
        "a lone read goes out on its own"
    );
    assert_eq!(cache.stats().l2_batched_reads, batched, "and is not queued");
}
