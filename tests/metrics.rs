//! `FlagCache` reports through the `metrics` facade: counters by tier, stale reasons,
//! invalidations, and histograms of latency and invalidation lag. Its own test binary,
//! because a `metrics` recorder is process-global.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use flagcache::memory::{MemoryInvalidator, MemoryStore};
use flagcache::{FlagCache, FlagKey, Version};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// One snapshot (taking it drains the recorder), as `name{labels}` → count per cache.
fn counters(snap: &Snapshotter) -> HashMap<String, HashMap<String, u64>> {
    let mut by_cache: HashMap<String, HashMap<String, u64>> = HashMap::new();
    for (key, _, _, value) in snap.snapshot().into_vec() {
        let k = key.key();
        let Some(cache) = k.labels().find(|l| l.key() == "cache") else {
            continue;
        };
        let out = by_cache.entry(cache.value().to_string()).or_default();
        let labels: Vec<String> = k
            .labels()
            .filter(|l| l.key() != "cache")
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", k.name(), labels.join(","));
        match value {
            DebugValue::Counter(n) => {
                out.insert(name, n);
            }
            DebugValue::Histogram(v) => {
                out.insert(name, v.len() as u64);
            }
            DebugValue::Gauge(_) => {}
        }
    }
    by_cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_reach_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().unwrap();

    let store = MemoryStore::new();
    let bus = MemoryInvalidator::new();
    let loader = |k: FlagKey| async move { Ok(Some((k.to_string(), Version::new(1)))) };
    let a = FlagCache::<String>::builder(store.clone(), loader)
        .name("a")
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let b = FlagCache::<String>::builder(store, loader)
        .name("b")
        .invalidator(bus.peer())
        .build()
        .await
        .unwrap();
    let k = FlagKey::new("k").unwrap();
    a.get(&k).await.unwrap(); // miss
    a.get(&k).await.unwrap(); // L1 hit
    b.get(&k).await.unwrap(); // L2 hit
    a.set(&k, "v2".into(), Version::new(2)).await.unwrap();
    for _ in 0..1000 {
        if b.stats().invalidations == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // The clock thread publishes L1 hits within a tick; `stats()` does at once.
    a.stats();
    let all = counters(&snap);
    let (ca, cb) = (&all["a"], &all["b"]);
    assert_eq!(ca["flagcache_requests_total{status=miss}"], 1, "{ca:#?}");
    assert_eq!(ca["flagcache_requests_total{status=hit_l1}"], 1);
    assert_eq!(ca["flagcache_loads_total{outcome=ok}"], 1);
    assert_eq!(cb["flagcache_requests_total{status=hit_l2}"], 1, "{cb:#?}");
    assert_eq!(cb["flagcache_invalidations_total{applied=yes}"], 1);
    assert_eq!(ca["flagcache_invalidations_total{applied=own_event}"], 1);
    assert_eq!(
        cb["flagcache_invalidation_lag_seconds{}"], 1,
        "one lag sample"
    );
    assert_eq!(
        ca["flagcache_l2_latency_seconds{}"], 3,
        "read, write of the load, write of the set"
    );
    assert_eq!(ca["flagcache_load_latency_seconds{}"], 1);
    // Counters agree with the cheap snapshot.
    assert_eq!(
        a.stats().hits_l1,
        ca["flagcache_requests_total{status=hit_l1}"]
    );
}
