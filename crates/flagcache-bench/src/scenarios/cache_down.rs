//! Cache down: 4 replicas × 16 tasks evaluate 50 flags while their Redis is killed a
//! third of the way through (the control plane goes down with it); against a raw
//! `redis-rs` GET per evaluation with the same 50 ms limit, its Redis killed the same
//! way.
//!
//! The figures cover the evaluations after the kill: failed ones (none allowed for
//! `FlagCache`, which answers from fail-safe), how many were fail-safe answers, how
//! many paid a timeout before the circuit breaker opened, and their latency.

use std::time::{Duration, Instant};

use flagcache_core::{CacheStatus, FlagCache, StaleReason};
use flagcache_testkit::RedisServer;

use super::replicas::redis_pair;
use super::{err, redis_conn, seeded_keys, Check, Plan, Res, Row, Section};
use crate::source::Source;
use crate::stats::Samples;

/// Cache down: Redis is killed a third of the way through (and the control plane
/// goes down with it); `FlagCache` keeps answering from fail-safe, against a raw GET
/// per evaluation. Uses its own Redis.
pub async fn cache_down(plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 4;
    const TASKS: usize = 16;
    const FLAGS: usize = 50;
    let l2_timeout = Duration::from_millis(50);
    let run_for = plan.secs(6.0, 1.5);
    let scenario = format!("cache down, {REPLICAS}×{TASKS} tasks, Redis killed at ⅓");
    let mut server = tokio::task::block_in_place(RedisServer::start).map_err(err)?;
    let url = server.url();
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(2));
    let keys = seeded_keys(&source, "down", FLAGS, 300)?;
    let mut caches = Vec::new();
    for i in 0..REPLICAS {
        let (store, inv) = redis_pair(&url, "bench-down", "bench-down").await?;
        let cache = FlagCache::<String>::builder(store, source.loader())
            .name(format!("down-{i}"))
            .invalidator(inv)
            .fresh_for(Duration::from_millis(200))
            .max_staleness(Duration::from_secs(600))
            .l2_timeout(l2_timeout)
            .loader_timeout(l2_timeout)
            .circuit_breaker(3, Duration::from_secs(1))
            .build()
            .await
            .map_err(err)?;
        cache.warm(&keys).await;
        caches.push(cache);
    }
    let start = Instant::now();
    let kill_at = start + run_for / 3;
    let deadline = start + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|t| {
            let (cache, keys) = (caches[t % REPLICAS].clone(), keys.clone());
            tokio::spawn(async move {
                let mut after = Samples::default();
                let mut fail_safe = Samples::default();
                let (mut errors, mut timeouts) = (0u64, 0u64);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let got = cache.lookup(&keys[rng.usize(..FLAGS)]).await;
                    let took = t.elapsed();
                    if t >= kill_at {
                        after.push(took);
                        if took >= l2_timeout {
                            timeouts += 1;
                        }
                        match got {
                            Ok(l) if l.status == CacheStatus::Stale(StaleReason::FailSafe) => {
                                fail_safe.push(took)
                            }
                            Ok(_) => {}
                            Err(_) => errors += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (after, fail_safe, errors, timeouts)
            })
        })
        .collect();
    tokio::time::sleep_until(kill_at.into()).await;
    server.stop();
    source.go_down();
    let (mut after, mut fail_safe, mut errors, mut timeouts) =
        (Samples::default(), Samples::default(), 0, 0);
    for h in handles {
        let (a, f, e, t) = h.await.map_err(err)?;
        after.extend(a);
        fail_safe.extend(f);
        errors += e;
        timeouts += t;
    }
    let served = after.len();
    let fail_safe_count = fail_safe.len();
    let fs = fail_safe.summary();
    section.checks.push(
        Check::at_most(
            "cache down: failed evaluations",
            errors as f64,
            0.0,
            "reads",
        )
        .correctness(),
    );
    section.rows.push(
        Row::new(&scenario, "FlagCache, fail-safe answers", fs)
            .count("evaluations after kill", served as f64)
            .count("fail-safe", fail_safe_count as f64)
            .count("paid a timeout", timeouts as f64)
            .count("errors", errors as f64),
    );
    section.rows.push(
        Row::new(
            &scenario,
            "FlagCache, every evaluation after kill",
            after.summary(),
        )
        .count("evaluations after kill", served as f64),
    );
    drop(caches);

    // Baseline: a raw GET per evaluation, with the same 50 ms limit.
    tokio::task::block_in_place(|| server.restart()).map_err(err)?;
    let conn = redis_conn(&url).await?;
    let start = Instant::now();
    let kill_at = start + run_for / 3;
    let deadline = start + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|_| {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                let mut after = Samples::default();
                let (mut errors, mut timeouts) = (0u64, 0u64);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let name = format!("down.{}", rng.usize(..FLAGS));
                    let got = tokio::time::timeout(
                        l2_timeout,
                        redis::AsyncCommands::get::<_, Option<Vec<u8>>>(&mut conn, name),
                    )
                    .await;
                    let took = t.elapsed();
                    if t >= kill_at {
                        after.push(took);
                        match got {
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                timeouts += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (after, errors, timeouts)
            })
        })
        .collect();
    tokio::time::sleep_until(kill_at.into()).await;
    server.stop();
    let (mut after, mut errors, mut timeouts) = (Samples::default(), 0, 0);
    for h in handles {
        let (a, e, t) = h.await.map_err(err)?;
        after.extend(a);
        errors += e;
        timeouts += t;
    }
    let served = after.len();
    section.rows.insert(
        0,
        Row::new(&scenario, "raw redis-rs GET, 50 ms limit", after.summary())
            .count("evaluations after kill", served as f64)
            .count("paid a timeout", timeouts as f64)
            .count("errors", errors as f64),
    );
    Ok(section)
}
