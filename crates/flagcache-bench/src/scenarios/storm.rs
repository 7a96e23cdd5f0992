//! The cold-key storm: 10,000 requests for one key absent from every cache, released
//! at once across 8 replicas, with a 20 ms loader.
//!
//! Contenders: naive cache-aside with the raw `redis-rs` client (every request GETs,
//! misses, loads and SETs), a floor (the same requests awaiting one 20 ms wait per
//! replica with no I/O: what waking the tasks costs on this machine), and `FlagCache`
//! with `RedisLock`. The figures: loader calls (1 for `FlagCache`), failed requests,
//! and `FlagCache`'s p99 against the loader latency plus 2 round trips, and over the
//! floor's p99.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{FlagCache, Version};
use flagcache_redis::RedisLock;

use super::gate::storm;
use super::replicas::redis_store;
use super::{err, fresh_key, payload, redis_conn, Check, Plan, Res, Row, Section, Servers};
use crate::source::Source;
use crate::stats::Samples;

/// The median round trip of a raw PING: the unit of the storm's bound.
async fn redis_rtt(url: &str) -> Res<Duration> {
    let mut conn = redis_conn(url).await?;
    let mut s = Samples::default();
    for _ in 0..200 {
        let t = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        s.push(t.elapsed());
    }
    Ok(Duration::from_secs_f64(s.summary().p50_us / 1e6))
}

/// Cold-key storm: 10,000 concurrent requests for one absent key across 8 replicas,
/// against naive cache-aside with the raw client.
pub async fn cold_storm(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 8;
    let url = servers.redis_url()?;
    let total = plan.n(10_000, 800);
    let scenario = format!("cold-key storm, {total} requests, {REPLICAS} replicas");
    let rtt = redis_rtt(&url).await?;
    let mut section = Section::default();

    // Baseline: every request GETs, misses, loads and SETs.
    let source = Source::new(Duration::from_millis(20));
    let k = fresh_key("storm.raw")?;
    source.set(&k, payload(200), Version::new(1));
    let loader = Arc::new(source.loader());
    let raw_url = url.clone();
    let (samples, failed, _) = storm(
        REPLICAS,
        total,
        move |_| {
            let url = raw_url.clone();
            Box::pin(async move { redis_conn(&url).await })
        },
        move |conn, _| {
            let (mut conn, k, loader) = (conn.clone(), k.clone(), loader.clone());
            Box::pin(async move {
                let name = k.as_str().to_string();
                let hit: Option<Vec<u8>> = redis::AsyncCommands::get(&mut conn, &name)
                    .await
                    .map_err(err)?;
                if hit.is_some() {
                    return Ok(true);
                }
                let Some((v, _)) = loader(k.clone()).await.map_err(err)? else {
                    return Ok(false);
                };
                let _: () = redis::AsyncCommands::set_ex(&mut conn, &name, v, 60)
                    .await
                    .map_err(err)?;
                Ok(true)
            })
        },
    )
    .await?;
    section.rows.push(
        Row::new(&scenario, "raw cache-aside (redis-rs)", samples.summary())
            .count("loader calls", source.calls() as f64)
            .count("failed", failed as f64),
    );

    // The floor: the same requests released through the same gate, each replica's
    // awaiting one shared 20 ms "load" with no I/O at all — what waking 10,000 tasks
    // costs here.
    let (floor, _, _) = storm(
        REPLICAS,
        total,
        |_| {
            // Per replica, as each replica process would wait for its own load.
            let (done, _) = tokio::sync::watch::channel(false);
            let loading = Arc::new(std::sync::atomic::AtomicBool::new(false));
            Box::pin(async move { Ok((Arc::new(done), loading)) })
        },
        move |(done, loading), _| {
            let (done, loading) = (done.clone(), loading.clone());
            Box::pin(async move {
                let mut rx = done.subscribe();
                if !loading.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    done.send_replace(true);
                }
                let _ = rx.wait_for(|d| *d).await;
                Ok(true)
            })
        },
    )
    .await?;
    let floor = floor.summary();
    let floor_p99 = floor.p99_us;
    section.rows.push(Row::new(
        &scenario,
        "floor: a 20 ms wait per replica, no I/O",
        floor,
    ));

    // FlagCache: per-process single flight + RedisLock across processes.
    let source = Source::new(Duration::from_millis(20));
    let k = fresh_key("storm.flagcache")?;
    source.set(&k, payload(200), Version::new(1));
    let loader = source.clone();
    let (samples, failed, opened) = storm(
        REPLICAS,
        total,
        move |r| {
            let (url, source) = (url.clone(), loader.clone());
            Box::pin(async move {
                let store = redis_store(&url, "bench-storm").await?;
                let lock = RedisLock::new(&store);
                FlagCache::<String>::builder(store, source.loader())
                    .name(format!("storm-{r}"))
                    .coalescer(lock)
                    .build()
                    .await
                    .map_err(err)
            })
        },
        move |cache, _| {
            let (cache, k) = (cache.clone(), k.clone());
            Box::pin(async move { Ok(cache.get(&k).await.map_err(err)?.is_some()) })
        },
    )
    .await?;
    let summary = samples.summary();
    let bound_us = (source.latency() + 2 * rtt).as_secs_f64() * 1e6;
    section.checks.push(
        Check::at_most(
            "cold-key storm: loader calls",
            source.calls() as f64,
            1.0,
            "calls",
        )
        .correctness(),
    );
    section.checks.push(
        Check::at_most(
            "cold-key storm: failed requests",
            failed as f64,
            0.0,
            "requests",
        )
        .correctness(),
    );
    section.checks.push(Check::at_most(
        "cold-key storm: p99 (bound: loader latency + 2 round trips)",
        summary.p99_us,
        bound_us,
        "µs",
    ));
    section.checks.push(Check::at_most(
        "cold-key storm: p99 over the floor's p99 (bound: 2 round trips)",
        summary.p99_us - floor_p99,
        2.0 * rtt.as_secs_f64() * 1e6,
        "µs",
    ));
    section.rows.push(
        Row::new(&scenario, "FlagCache + RedisLock", summary)
            .count("loader calls", source.calls() as f64)
            .count("failed", failed as f64)
            .count("loader ms", source.latency().as_secs_f64() * 1e3)
            .count(
                "load began ms after the gate",
                source.first_call().map_or(f64::NAN, |t| {
                    t.saturating_duration_since(opened).as_secs_f64() * 1e3
                }),
            )
            .count("rtt µs", rtt.as_secs_f64() * 1e6),
    );
    Ok(section)
}
