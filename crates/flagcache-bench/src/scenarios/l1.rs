//! The L1 hit: `FlagCache::get` (awaited) and `FlagCache::get_cached` (sync) of a warm
//! key, against a bare `quick_cache` get of the same kind of entry; 1,000 keys in
//! random order on 1 thread and on 2 threads at once, best of 5 rounds.
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
/// kind of entry, 1,000 keys in random order, on 1 and on 2 threads, best of 5 rounds.
/// (The criterion bench
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
    let cache = &cache;
    let (keys, order, quick) = (&keys, &order, &quick);
    let mut section = Section::default();
    for threads in [1, 2] {
        // Each thread performs `per_round` reads; the figure is wall time per read of
        // one thread, so contention shows up as a higher figure.
        let mut best = [f64::MAX; 3];
        for _ in 0..rounds {
            let bare = |first: usize| {
                for i in 0..per_round {
                    let k = &keys[order[(first + i) % order.len()]];
                    std::hint::black_box(quick.get(k).ok_or("a quick_cache read missed")?);
                }
                Ok(())
            };
            // Awaited inside async code, as an application calls it; every hit is
            // ready, so the loop's future is polled once and no runtime is measured.
            let get = |first: usize| {
                async {
                    for i in 0..per_round {
                        let k = &keys[order[(first + i) % order.len()]];
                        match cache.get(k).await {
                            Ok(Some(value)) => std::hint::black_box(value),
                            _ => return Err("an L1 read did not hit"),
                        };
                    }
                    Ok(())
                }
                .now_or_never()
                .ok_or("an L1 hit waited for something")?
            };
            let get_cached = |first: usize| {
                for i in 0..per_round {
                    let k = &keys[order[(first + i) % order.len()]];
                    match cache.get_cached(k) {
                        Some(Some(value)) => std::hint::black_box(value),
                        _ => return Err("an L1 read did not hit"),
                    };
                }
                Ok(())
            };
            let contenders: [&(dyn Fn(usize) -> Result<(), &'static str> + Sync); 3] =
                [&bare, &get, &get_cached];
            for (slot, op) in best.iter_mut().zip(contenders) {
                let wall = on_threads(threads, op)?;
                *slot = slot.min(wall.as_nanos() as f64 / per_round as f64);
            }
        }
        let scenario = format!(
            "L1 hit, {threads} thread{}, best of {rounds}",
            if threads == 1 { "" } else { "s" }
        );
        for (name, ns) in [
            ("bare quick_cache get", best[0]),
            ("FlagCache::get, L1 hit", best[1]),
            ("FlagCache::get_cached (sync), L1 hit", best[2]),
        ] {
            let mut s = Samples::default();
            s.push(Duration::from_nanos(ns as u64));
            section.rows.push(Row::new(&scenario, name, s.summary()));
        }
        for (what, ns, bound) in [("get", best[1], 1.3), ("get_cached", best[2], 1.2)] {
            section.checks.push(Check::at_most(
                &format!(
                    "L1 hit ({what}) ÷ bare quick_cache get, {threads} thread{}",
                    if threads == 1 { "" } else { "s" }
                ),
                ns / best[0],
                bound,
                "×",
            ));
        }
    }
    Ok(section)
}

/// Runs `op` on `threads` threads at once (each from its own place in the access
/// order); the wall time until the last one ends.
fn on_threads(
    threads: usize,
    op: &(dyn Fn(usize) -> Result<(), &'static str> + Sync),
) -> Res<Duration> {
    let t = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..threads).map(|i| s.spawn(move || op(i * 997))).collect();
        runs.into_iter()
            .try_for_each(|run| run.join().map_err(|_| "a reader panicked")?)
    })?;
    Ok(t.elapsed())
}
