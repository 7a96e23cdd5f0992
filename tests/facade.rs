//! The facade re-exports what a user needs, and each backend sits behind its feature.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{
    coalesce::LocalCoalescer,
    store::{FlagStore, FlagStoreExt, Invalidator},
    FlagKey, Loader, Version,
};
use flagcache_testkit::CountingSource;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_an_invalidator_and_a_coalescer_through_the_facade() {
    let store: Arc<dyn FlagStore> = Arc::new(MemoryStore::new());
    let bus: Arc<dyn Invalidator> = Arc::new(MemoryInvalidator::new());
    let coalescer = LocalCoalescer::<u64>::new();
    let key = FlagKey::new("facade").unwrap();

    let mut sub = bus.subscribe().await.unwrap();
    let source = CountingSource::answering(1, |_, _| 42u64).with_latency(Duration::from_millis(20));
    let reads = (0..64).map(|_| {
        let (store, key, source) = (store.clone(), key.clone(), source.clone());
        let coalescer = coalescer.clone();
        tokio::spawn(async move {
            coalescer
                .run(&key.clone(), move || async move {
                    let (value, version) = source.load(&key).await?.expect("a value");
                    store
                        .put_value(&key, &value, version, Duration::from_secs(5))
                        .await?;
                    Ok(value)
                })
                .await
        })
    });
    for r in futures_util::future::join_all(reads).await {
        assert_eq!(r.unwrap().unwrap(), 42);
    }
    assert_eq!(source.calls(), 1);
    assert_eq!(
        store.get_value::<u64>(&key).await.unwrap(),
        Some((42, Version::new(1)))
    );

    bus.publish(&flagcache::store::Invalidation::key(key.clone()))
        .await
        .unwrap();
    assert!(matches!(
        sub.recv().await,
        Some(flagcache::store::Signal::Invalidated(ev)) if ev.origin == bus.node_id()
    ));
}
