//! The write path: jittered TTLs, a superseded set, and the store's value layout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flagcache::memory::MemoryStore;
use flagcache::{
    codec::Codec,
    store::{async_trait, Entry, FlagStore, FlagStoreExt},
    CacheStatus, FlagCache, FlagKey, PutOutcome, Result, Version,
};
use flagcache_testkit::CountingSource;

use common::*;

/// Records the TTL of every write.
struct TtlRecorder {
    inner: MemoryStore,
    ttls: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl FlagStore for TtlRecorder {
    fn capabilities(&self) -> flagcache::store::Capabilities {
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
    let src = CountingSource::new(1);
    let cache = FlagCache::builder(store, src.clone())
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
    let cache = FlagCache::builder(store, src.clone())
        .l2_ttl(Duration::from_secs(100))
        .ttl_jitter(0.0)
        .build()
        .await
        .unwrap();
    cache.get(&key("x")).await.unwrap();
    assert_eq!(*exact.lock().unwrap(), vec![Duration::from_secs(100)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_set_reports_it_and_leaves_l1_alone() {
    let r = replicas().await;
    let k = key("k");
    put(&r.store, &k, "v5", 5).await;
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

#[tokio::test]
async fn a_json_layout_store_gets_json_values() {
    let mem = MemoryStore::builder()
        .codec(flagcache::codec::JsonCodec::new())
        .build();
    let src = CountingSource::new(7);
    let cache = FlagCache::builder(mem.clone(), src.clone())
        .build()
        .await
        .unwrap();
    cache.get(&key("k")).await.unwrap();
    assert!(matches!(mem.codec(), Codec::Json(_)));
    let entry = mem.get(&key("k")).await.unwrap().unwrap();
    assert_eq!(&entry.payload[..], br#""k@7""#);
}
