//! The L1 hit path, side by side with the bare cache crates it could be built on.
//!
//! ```text
//! cargo bench --bench l1_hit
//! ```
//!
//! 1,000 warm keys read in a random order (the same order for every contender), on 1
//! thread and on 2 threads at once:
//! - `quick_cache`: a bare `quick_cache::sync::Cache::get` of the same kind of entry (an
//!   `Arc` value and its version) — the crate `FlagCache` uses for L1;
//! - `moka`: the same with `moka::sync::Cache`, the other candidate;
//! - `flagcache`: `FlagCache::get` of a hot key — freshness check, resync epoch check,
//!   counters included, awaited inside async code as an application does. An L1 hit
//!   never waits, so the loop's future is polled once and no runtime is measured;
//! - `flagcache_get_cached`: `FlagCache::get_cached`, the same read without a future
//!   (for synchronous code).
//!
//! With 2 threads, each thread performs every iteration and the figure is the wall time
//! per iteration: contention (a shared counter, a lock) shows up as a higher figure.

#![allow(clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::Context;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use flagcache::memory::MemoryStore;
use flagcache::{FlagCache, FlagKey, Version};

const KEYS: usize = 1_000;
const ORDER: usize = 4_096;

#[derive(Clone)]
struct Slot {
    value: Arc<String>,
    version: u64,
}

/// A contender: `iters` reads from a first index into the access order.
type Op<'a> = &'a (dyn Fn(usize, u64) + Sync);

/// Runs `op` on each of `threads` threads at once, each call given its thread's first
/// index into the access order and the iteration count; the wall time.
fn run_threads(threads: usize, iters: u64, op: Op<'_>) -> Duration {
    let start = Instant::now();
    if threads == 1 {
        op(0, iters);
        return start.elapsed();
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || op(t * 997, iters));
        }
    });
    start.elapsed()
}

/// `op` `iters` times, walking the access order from `first`.
fn each(first: usize, iters: u64, mut op: impl FnMut(usize)) {
    let mut i = first;
    for _ in 0..iters {
        i = (i + 1) % ORDER;
        op(i);
    }
}

/// Polls `fut` once; the bench's futures never wait, so once is enough.
fn poll_once(fut: impl Future<Output = ()>) {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let ready = std::pin::pin!(fut).poll(&mut cx).is_ready();
    assert!(ready, "an L1 hit completes without awaiting");
}

fn bench(c: &mut Criterion) {
    let keys: Vec<FlagKey> = (0..KEYS)
        .map(|i| FlagKey::new(format!("flag.key.{i}")).expect("valid key"))
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let order: Vec<usize> = (0..ORDER).map(|_| rng.usize(..KEYS)).collect();

    let quick = quick_cache::sync::Cache::<FlagKey, Slot>::new(10_000);
    let moka = moka::sync::Cache::<FlagKey, Slot>::new(10_000);
    for k in &keys {
        // One value per key, as in `FlagCache`'s L1.
        let slot = Slot {
            value: Arc::new("x".repeat(100)),
            version: 1,
        };
        quick.insert(k.clone(), slot.clone());
        moka.insert(k.clone(), slot);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = rt.block_on(async {
        let loader = |_: FlagKey| async { Ok(Some(("x".repeat(100), Version::new(1)))) };
        let cache = FlagCache::<String>::builder(MemoryStore::new(), loader)
            .fresh_for(Duration::from_secs(3600))
            .l1_capacity(10_000)
            .build()
            .await
            .expect("cache");
        for k in &keys {
            cache.get(k).await.expect("warm");
        }
        cache
    });
    let _guard = rt.enter();

    let quick_get = |first: usize, iters: u64| {
        each(first, iters, |i| {
            let s = quick.get(&keys[order[i]]).expect("present");
            black_box((s.version, s.value));
        });
    };
    let moka_get = |first: usize, iters: u64| {
        each(first, iters, |i| {
            let s = moka.get(&keys[order[i]]).expect("present");
            black_box((s.version, s.value));
        });
    };
    // As an application calls it: awaited inside async code.
    let flag_get = |first: usize, iters: u64| {
        poll_once(async {
            let mut i = first;
            for _ in 0..iters {
                i = (i + 1) % ORDER;
                let v = cache.get(&keys[order[i]]).await.expect("no error");
                black_box(v);
            }
        });
    };
    let flag_get_cached = |first: usize, iters: u64| {
        each(first, iters, |i| {
            let v = cache
                .get_cached(&keys[order[i]])
                .expect("an L1 hit")
                .expect("a value");
            black_box(v);
        });
    };
    let contenders: [(&str, Op<'_>); 4] = [
        ("quick_cache", &quick_get),
        ("moka", &moka_get),
        ("flagcache", &flag_get),
        ("flagcache_get_cached", &flag_get_cached),
    ];
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("l1_hit/{threads}_thread"));
        for (name, op) in contenders {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| run_threads(threads, iters, op));
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
