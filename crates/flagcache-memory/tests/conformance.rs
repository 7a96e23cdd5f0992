//! `MemoryStore` and `MemoryInvalidator` against the core conformance suite — directly
//! and through every wrapper (`Box<dyn _>`, `Arc<dyn _>`, `&_`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use flagcache_core::bytes::Bytes;
use flagcache_core::conformance::{self, RawAccess};
use flagcache_core::{async_trait, FlagKey, FlagStore, Invalidation, Invalidator, Result};
use flagcache_memory::{MemoryInvalidator, MemoryStore};

struct Raw(MemoryStore);

#[async_trait]
impl RawAccess for Raw {
    async fn write_raw(&self, key: &FlagKey, bytes: Bytes, ttl: Duration) -> Result<()> {
        self.0.write_raw(key, bytes, ttl)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    let store = MemoryStore::new();
    conformance::run_store_suite(Arc::new(store.clone()), &Raw(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_through_box_dyn() {
    let store = MemoryStore::new();
    let boxed: Box<dyn FlagStore> = Box::new(store.clone());
    // Box<dyn FlagStore> is itself a FlagStore; wrap it once more to run the suite.
    conformance::run_store_suite(Arc::new(boxed), &Raw(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_through_arc_dyn() {
    let store = MemoryStore::new();
    let arc: Arc<dyn FlagStore> = Arc::new(store.clone());
    conformance::run_store_suite(Arc::new(arc), &Raw(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_through_a_reference() {
    let store = MemoryStore::new();
    let by_ref: &dyn FlagStore = &store;
    conformance::round_trip(&by_ref).await;
    conformance::version_guard(&by_ref).await;
    conformance::get_checked_hit_stale_miss(&by_ref).await;
    conformance::corrupt_bytes_are_a_miss_not_a_panic(&by_ref, &Raw(store.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_layout_store_passes_the_suite() {
    let store = MemoryStore::builder()
        .codec(flagcache_core::JsonCodec::new())
        .build();
    let raw = Raw(store.clone());
    conformance::run_store_suite(Arc::new(store), &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_too_large_is_refused_not_dropped() {
    let store = MemoryStore::builder().max_value_size(64 * 1024).build();
    conformance::large_values(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_every_subscriber() {
    let a = MemoryInvalidator::new();
    let (b, c) = (a.peer(), a.peer());
    conformance::invalidation_reaches_every_subscriber(&a, &[&a, &b, &c]).await;
    // Through trait objects too.
    let boxed: Box<dyn Invalidator> = Box::new(b.clone());
    let arc: Arc<dyn Invalidator> = Arc::new(c.clone());
    conformance::invalidation_reaches_every_subscriber(&a, &[&boxed, &arc]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagged_subscriber_gets_resync() {
    let a = MemoryInvalidator::builder().capacity(8).build();
    let b = a.peer();
    let flood = async {
        // Overflow the 8-event buffer while the subscriber is not reading.
        for i in 0..20 {
            let key = FlagKey::new(format!("flood{i}")).unwrap();
            a.publish(&Invalidation::key(key)).await.unwrap();
        }
    };
    conformance::resync_after_gap(&b, &a, flood).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_coalescer_passes_the_coalescer_properties() {
    use flagcache_core::{Coalescer, LocalCoalescer};
    // One process, several callers: they share one coalescer.
    let local: Arc<dyn Coalescer> = Arc::new(LocalCoalescer::new());
    let callers = vec![local.clone(); 8];
    conformance::one_load_per_burst(&callers, Arc::new(MemoryStore::new())).await;
    conformance::abandoned_lease_frees_the_key(local.clone(), local.clone(), local).await;
}
