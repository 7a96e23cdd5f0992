//! Every L2 error is counted by kind — timeouts, transient and permanent failures,
//! refused requests — and the circuit breaker takes each kind for what it says of the
//! server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use flagcache::layer::{FaultControl, FaultyStore, Op};
use flagcache::memory::MemoryStore;
use flagcache::{Error, FlagCache, Version};
use flagcache_testkit::CountingSource;

use common::*;

async fn cache() -> (FlagCache<Config>, Misconfigured, FaultControl) {
    let store = Misconfigured::default();
    let (faulty, faults) = FaultyStore::new(store.clone());
    let cache = FlagCache::builder(faulty, CountingSource::new(1))
        .circuit_breaker(4, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    (cache, store, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_counted_opens_the_breaker_and_reaches_writers() {
    let (cache, store, faults) = cache().await;
    store.mode.store(NOAUTH, Ordering::SeqCst);
    // Each cold read: a failed L2 read, then a failed write-back.
    cache.get(&key("a")).await.unwrap();
    cache.get(&key("b")).await.unwrap();
    let st = cache.stats();
    assert_eq!(st.l2_permanent_errors, 4, "{st:?}");
    assert_eq!(st.l2_errors, 4, "{st:?}");
    assert_eq!((st.l2_transient_errors, st.l2_timeouts), (0, 0));
    assert!(st.breaker_open && st.breaker_opened == 1, "{st:?}");
    // Reads go to the loader without a round trip (but for a probe or two).
    let calls = || faults.calls(Op::Read) + faults.calls(Op::Put) + faults.calls(Op::Delete);
    let before = calls();
    let t = std::time::Instant::now();
    for i in 0..20 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    // At most one probe read 100 ms after it opened, 300 ms, 700 ms…
    let probes_due = 1 + t.elapsed().as_millis() / 100;
    let during = u128::from(calls() - before);
    assert!(during <= probes_due, "{during} L2 calls");
    // A write is tried and fails loudly, with the server's own words.
    let err = cache
        .set(&key("kill"), "off".into(), Version::new(2))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("NOAUTH"), "{err}");
    let st = cache.stats();
    assert_eq!(
        st.l2_permanent_errors,
        calls(),
        "every call counted: {st:?}"
    );
    assert!(st.breaker_open);
    // The operator fixes it: the next write closes the breaker.
    store.mode.store(WORKING, Ordering::SeqCst);
    cache
        .set(&key("kill"), "off".into(), Version::new(2))
        .await
        .unwrap();
    assert!(!cache.stats().breaker_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_and_timeouts_are_counted_apart() {
    let (cache, _store, faults) = cache().await;
    faults.fail_all(true);
    cache.get(&key("a")).await.unwrap();
    let st = cache.stats();
    assert_eq!((st.l2_transient_errors, st.l2_errors), (2, 2), "{st:?}");
    assert_eq!((st.l2_permanent_errors, st.l2_timeouts), (0, 0));

    let (store, faults) = faulty(&MemoryStore::new());
    faults.set_latency(Duration::from_secs(5));
    let cache = FlagCache::builder(store, CountingSource::new(1))
        .l2_timeout(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    cache.get(&key("a")).await.unwrap();
    let st = cache.stats();
    assert_eq!((st.l2_timeouts, st.l2_errors), (2, 2), "{st:?}");
    assert_eq!(st.l2_transient_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_counted_but_leaves_the_breaker_alone() {
    let (cache, store, _faults) = cache().await;
    store.mode.store(TOO_LARGE, Ordering::SeqCst);
    for i in 0..10 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    let err = cache
        .set(&key("big"), "x".repeat(100), Version::new(2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    let st = cache.stats();
    assert_eq!((st.l2_refused, st.l2_errors), (11, 11), "{st:?}");
    assert!(!st.breaker_open && st.breaker_opened == 0, "{st:?}");
}
