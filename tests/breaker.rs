//! The circuit breaker: a dead or hanging L2 costs a bounded number of calls, not one
//! per read.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use flagcache::layer::Op;
use flagcache::memory::MemoryStore;
use flagcache::{store::FlagStoreExt, FlagCache, Version};
use flagcache_testkit::CountingSource;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_bounds_what_a_dead_cache_costs() {
    let mem = MemoryStore::new();
    let (store, faults) = faulty(&mem);
    faults.fail_all(true);
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(store, src.clone())
        .circuit_breaker(3, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // 50 cold keys: each read would cost an L2 read and an L2 write.
    let t = Instant::now();
    for i in 0..50 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    // Three calls opened the breaker; then one probe read after 100 ms, 200 ms, 300 ms…
    let probes_due = 1 + t.elapsed().as_millis() / 100;
    let l2_calls = u128::from(faults.calls(Op::Read) + faults.calls(Op::Put));
    assert!(
        l2_calls <= 3 + probes_due,
        "{l2_calls} L2 calls, {probes_due} probes due"
    );
    let st = cache.stats();
    assert!(st.breaker_open && st.breaker_opened == 1, "{st:?}");
    assert_eq!(
        st.loads, 50,
        "reads were served by the loader: slower, not broken"
    );
    // After the wait, one probe; L2 is back, so the breaker closes.
    tokio::time::sleep(Duration::from_millis(350)).await;
    faults.fail_all(false);
    let reads = faults.calls(Op::Read);
    cache.get(&key("after")).await.unwrap();
    assert_eq!(faults.calls(Op::Read), reads + 1, "one probe read");
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
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(store, src.clone())
        .l2_timeout(Duration::from_millis(20))
        .circuit_breaker(2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..100 {
        cache.get(&key(&format!("k{i}"))).await.unwrap();
    }
    // Two timeouts (20 ms each) opened the breaker; then only the probes (after 100,
    // 200, 400, 800 ms…: a handful within the run) paid one each.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let st = cache.stats();
    assert!((2..=2 + 5).contains(&st.l2_timeouts), "{st:?}");
    // Each of the 99 later reads skipped its L2 read (unless it was a probe) and its
    // write-back.
    assert_eq!(st.l2_skipped + (st.l2_timeouts - 2), 99 * 2, "{st:?}");
}
