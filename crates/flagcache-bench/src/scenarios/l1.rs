//! The L1 hit: `FlagCache::get` (awaited) and `FlagCache::get_cached` (sync) of a warm
//! key, against a bare `quick_cache` get of the same kind of entry; 1,000 keys in
//! random order on 1 thread, best of 5 rounds.
//!
//! The figures: nanoseconds per read, and each `FlagCache` read over the bare get
//! (bound: 1.5×).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{FlagCache, FlagKey};
use futures_util::FutureExt;

use super::{err, payload, seeded_keys, Check, Plan, Res, Row, Section};
use crate::source::Source;
use crate::stats::Samples;

/// L1 hit: `FlagCache::get` of a warm key against a bare `quick_cache` get of the same
/// kind of entry, 1,000 keys in random order, best of 5 rounds. (The criterion bench
/// `l1_hit` measures the same with more care; this puts the ratio in the same report.)
pub async fn l1_hit(plan: Plan) -> Res<Section> {
    const KEYS: usize = 1_000;
    let rounds = 5;
    let per_round = plan.n(2_000_000, 20_000);
    let source = Source::new(Duration::ZERO);
    let keys = seeded_keys(&source, "flag.key", KEYS, 100)?;
    let mut rng = fastrand::Rng::with_seed(7);
    let order: Vec<usize> = (0..4096).map(|_| rng.usize(..KEYS)).collect();
    let quick = quick_cache::sync::Cache::<FlagKey, (Arc<String>, u64)>::new(10_000);
    for k in &keys {
        quick.insert(k.clone(), (Arc::new(payload(100)), 1));
    }
    let cache = FlagCache::<String>::builder(flagcache_memory::MemoryStore::new(), source.loader())
        .fresh_for(Duration::from_secs(3600))
        .l1_capacity(10_000)
        .build()
        .await
        .map_err(err)?;
    cache.warm(&keys).await;
    let mut best = [f64::MAX, f64::MAX, f64::MAX];
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..per_round {
            match quick.get(&keys[order[i % order.len()]]) {
                Some(value) => {
                    std::hint::black_box(value);
                }
                None => return Err("a quick_cache read missed".into()),
            }
        }
        best[0] = best[0].min(t.elapsed().as_nanos() as f64 / per_round as f64);
        // Awaited inside async code, as an application calls it; every hit is ready,
        // so the loop's future is polled once and no runtime is measured.
        let t = Instant::now();
        let reads = async {
            for i in 0..per_round {
                match cache.get(&keys[order[i % order.len()]]).await {
                    Ok(Some(value)) => {
                        std::hint::black_box(value);
                    }
                    _ => return Err("an L1 read did not hit".to_string()),
                }
            }
            Ok(())
        };
        reads
            .now_or_never()
            .ok_or("an L1 hit waited for something")??;
        best[1] = best[1].min(t.elapsed().as_nanos() as f64 / per_round as f64);
        let t = Instant::now();
        for i in 0..per_round {
            match cache.get_cached(&keys[order[i % order.len()]]) {
                Some(Some(value)) => {
                    std::hint::black_box(value);
                }
                _ => return Err("an L1 read did not hit".into()),
            }
        }
        best[2] = best[2].min(t.elapsed().as_nanos() as f64 / per_round as f64);
    }
    let mut section = Section::default();
    for (name, ns) in [
        ("bare quick_cache get", best[0]),
        ("FlagCache::get, L1 hit", best[1]),
        ("FlagCache::get_cached (sync), L1 hit", best[2]),
    ] {
        let mut s = Samples::default();
        s.push(Duration::from_nanos(ns as u64));
        section
            .rows
            .push(Row::new("L1 hit, 1 thread, best of 5", name, s.summary()));
    }
    section.checks.push(Check::at_most(
        "L1 hit (get) ÷ bare quick_cache get",
        best[1] / best[0],
        1.5,
        "×",
    ));
    section.checks.push(Check::at_most(
        "L1 hit (get_cached) ÷ bare quick_cache get",
        best[2] / best[0],
        1.5,
        "×",
    ));
    Ok(section)
}
