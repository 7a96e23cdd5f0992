//! The L1 hit counter reaches the `metrics` facade in steps: a hit writes only its
//! thread's stripe, and the hits go to the exported counter on every tick of the
//! clock thread and on `stats()`. Threads hitting at once are all counted, none
//! twice. Its own test binary, because a `metrics` recorder is
//! process-global.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use flagcache::memory::MemoryStore;
use flagcache::{FlagCache, FlagKey, Version};
use futures_util::FutureExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// The L1 hits counted since the last snapshot (a snapshot takes the counters' values
/// and resets them).
fn hits_since(snap: &Snapshotter) -> u64 {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            let k = key.key();
            k.name() == "flagcache_requests_total"
                && k.labels()
                    .any(|l| l.key() == "status" && l.value() == "hit_l1")
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

#[test]
fn concurrent_l1_hits_reach_the_counter_each_once() {
    const THREADS: u64 = 4;
    const HITS: u64 = 5_000;
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<FlagKey> = (0..10)
        .map(|i| FlagKey::new(format!("flag.{i}")).unwrap())
        .collect();
    let cache = rt.block_on(async {
        let loader = |k: FlagKey| async move { Ok(Some((k.to_string(), Version::new(1)))) };
        let cache = FlagCache::<String>::builder(MemoryStore::new(), loader)
            .fresh_for(Duration::from_secs(3600))
            .build()
            .await
            .unwrap();
        cache.warm(&keys).await;
        cache
    });
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, keys) = (&cache, &keys);
            s.spawn(move || {
                for i in 0..HITS {
                    let key = &keys[((t + i) % 10) as usize];
                    // Half through the awaited read, half through the synchronous one.
                    let value = if i % 2 == 0 {
                        cache.get(key).now_or_never().unwrap().unwrap()
                    } else {
                        cache.get_cached(key).unwrap()
                    };
                    assert!(value.is_some());
                }
            });
        }
    });

    // The clock thread publishes the hits within a tick: the counter reaches every
    // hit with no call to `stats()` (2 s at most, on a loaded machine).
    let mut published = 0;
    for _ in 0..200 {
        published += hits_since(&snap);
        if published >= THREADS * HITS {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(published, THREADS * HITS);
    // `stats()` agrees, and nothing is published twice.
    assert_eq!(cache.stats().hits_l1, THREADS * HITS);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(hits_since(&snap), 0);
}
