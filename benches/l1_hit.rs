//! The L1 hit path, side by side with the bare cache crates it could be built on.
//!
//! ```text
//! cargo bench --bench l1_hit
//! ```
//!
//! - `quick_cache_get`: a bare `quick_cache::sync::Cache::get` of the same kind of
//!   entry (the crate `FlagCache` uses for L1);
//! - `moka_get`: the same with `moka::sync::Cache`, the other candidate;
//! - `flagcache_get_l1_hit`: `FlagCache::get` of a hot key — freshness check, resync
//!   epoch check, counters included. An L1 hit never awaits, so the future is polled
//!   once (`now_or_never`) and no runtime overhead is measured.

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use flagcache::memory::MemoryStore;
use flagcache::{FlagCache, FlagKey, Version};
use futures_util::FutureExt;

const KEYS: usize = 200;

#[derive(Clone)]
struct Slot {
    value: Arc<String>,
    version: u64,
}

fn bench(c: &mut Criterion) {
    let keys: Vec<FlagKey> = (0..KEYS)
        .map(|i| FlagKey::new(format!("flag.key.{i}")).expect("valid key"))
        .collect();
    let slot = Slot {
        value: Arc::new("x".repeat(100)),
        version: 1,
    };

    let quick = quick_cache::sync::Cache::<FlagKey, Slot>::new(10_000);
    let moka = moka::sync::Cache::<FlagKey, Slot>::new(10_000);
    for k in &keys {
        quick.insert(k.clone(), slot.clone());
        moka.insert(k.clone(), slot.clone());
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = rt.block_on(async {
        let loader = |_: FlagKey| async { Ok(Some(("x".repeat(100), Version::new(1)))) };
        let cache = FlagCache::<String>::builder(MemoryStore::new(), loader)
            .fresh_for(Duration::from_secs(3600))
            .build()
            .await
            .expect("cache");
        for k in &keys {
            cache.get(k).await.expect("warm");
        }
        cache
    });
    let _guard = rt.enter();

    let mut i = 0;
    c.bench_function("quick_cache_get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let s = quick.get(&keys[i]).expect("present");
            black_box((s.version, s.value))
        })
    });
    c.bench_function("moka_get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let s = moka.get(&keys[i]).expect("present");
            black_box((s.version, s.value))
        })
    });
    c.bench_function("flagcache_get_l1_hit", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let v = cache
                .get(&keys[i])
                .now_or_never()
                .expect("an L1 hit completes without awaiting")
                .expect("no error");
            black_box(v)
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
