//! Warming: preloading keys from L2 in one batched read, then from the loader.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use flagcache::layer::Op;
use flagcache::memory::MemoryStore;
use flagcache::{store::FlagStoreExt, CacheStatus, FlagCache, FlagKey, Version};
use flagcache_testkit::CountingSource;

use common::*;

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
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(store, src.clone())
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
