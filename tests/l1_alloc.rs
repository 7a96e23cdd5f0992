//! An L1 hit allocates nothing: a counting global allocator (dhat's testing mode)
//! watches 10,000 hits through `get` and 10,000 through `get_cached`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use flagcache::memory::MemoryStore;
use flagcache::{FlagCache, FlagKey, Version};
use futures_util::FutureExt;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn blocks() -> u64 {
    dhat::HeapStats::get().total_blocks
}

#[test]
fn an_l1_hit_allocates_nothing() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<FlagKey> = (0..100)
        .map(|i| FlagKey::new(format!("flag.{i}")).unwrap())
        .collect();
    let cache = rt.block_on(async {
        let loader =
            |key: FlagKey| async move { Ok(Some((format!("value of {key}"), Version::new(1)))) };
        let cache = FlagCache::<String>::builder(MemoryStore::new(), loader)
            .fresh_for(Duration::from_secs(3600))
            .build()
            .await
            .unwrap();
        for k in &keys {
            cache.get(k).await.unwrap();
        }
        cache
    });
    let _guard = rt.enter();

    // The counter counts: a miss (a fill, a decode) allocates.
    let before = blocks();
    let miss = FlagKey::new("flag.cold").unwrap();
    rt.block_on(cache.get(&miss)).unwrap();
    assert!(blocks() > before, "the allocator counts nothing");

    let before = blocks();
    let mut served = Vec::with_capacity(10_000);
    let after_reserve = blocks();
    for i in 0..10_000 {
        let value = cache
            .get(&keys[i % keys.len()])
            .now_or_never()
            .expect("an L1 hit never awaits")
            .unwrap()
            .unwrap();
        served.push(value);
    }
    for i in 0..10_000 {
        let value = cache
            .get_cached(&keys[i % keys.len()])
            .expect("an L1 hit")
            .unwrap();
        std::hint::black_box(value);
    }
    let allocated = blocks() - after_reserve;
    assert_eq!(after_reserve - before, 1, "only the result vector");
    assert_eq!(allocated, 0, "20,000 L1 hits allocated {allocated} blocks");
    assert!(served.iter().all(|v| v.starts_with("value of flag.")));
    // L1's two references (the hot slot and the whole entry) plus each one served:
    // hits share the value, they never copy it.
    assert_eq!(Arc::strong_count(&served[0]), 2 + 10_000 / keys.len());
}
