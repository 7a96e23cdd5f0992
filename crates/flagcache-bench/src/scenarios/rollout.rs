//! The rollout storm: 8 replicas × 64 tasks evaluating 200 flags (L1 over Redis) in
//! requests of 10 evaluations every 10 ms, while a publisher flips one flag every
//! 100 ms; against a raw `redis-rs` GET per evaluation at the same pace.
//!
//! The figures: `FlagCache`'s evaluation latency (p99 under 1 ms), its evaluations per
//! second, and stale reads — a read of an older version than the latest flip, counted
//! within 10 ms of the flip (allowed) and later (not allowed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::Version;

use super::replicas::{redis_pair, replica};
use super::{err, payload, redis_conn, seeded_keys, Check, Plan, Res, Row, Section, Servers};
use crate::source::Source;
use crate::stats::Samples;

/// The latest flip of each flag, for the stale-read check: the version, and when its
/// `set` returned (µs since the run's start). The time is written before the version.
struct Flips {
    start: Instant,
    version: Vec<AtomicU64>,
    done_at_us: Vec<AtomicU64>,
}

impl Flips {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Rollout storm: 8 replicas × 64 tasks evaluating 200 flags (L1 + Redis) while a
/// publisher flips one flag every 100 ms; against a raw GET per evaluation.
pub async fn rollout_storm(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const REPLICAS: usize = 8;
    const TASKS: usize = 64;
    const FLAGS: usize = 200;
    const BOUND: Duration = Duration::from_millis(10);
    let url = servers.redis_url()?;
    let run_for = plan.secs(10.0, 1.0);
    let scenario = format!("rollout storm, {REPLICAS}×{TASKS} tasks, {FLAGS} flags");
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(2));
    let prefix = format!("rollout.{:x}", fastrand::u32(..));
    let keys = seeded_keys(&source, &prefix, FLAGS, 300)?;
    let channel = format!("bench-rollout-{prefix}");
    let mut caches = Vec::new();
    for i in 0..=REPLICAS {
        let (store, inv) = redis_pair(&url, "bench-rollout", &channel).await?;
        let cache = replica(format!("rollout-{i}"), &source, store, inv).await?;
        cache.warm(&keys).await;
        caches.push(cache);
    }
    let publisher = caches.pop().ok_or("no publisher")?;
    let loads_before = source.calls();
    let flips = Arc::new(Flips {
        start: Instant::now(),
        version: (0..FLAGS).map(|_| AtomicU64::new(1)).collect(),
        done_at_us: (0..FLAGS).map(|_| AtomicU64::new(0)).collect(),
    });
    let stale_within = Arc::new(AtomicU64::new(0));
    let stale_past = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run_for;
    let mut handles = Vec::new();
    for r in 0..REPLICAS * TASKS {
        let cache = caches[r % REPLICAS].clone();
        let (keys, flips) = (keys.clone(), flips.clone());
        let (within, past) = (stale_within.clone(), stale_past.clone());
        handles.push(tokio::spawn(async move {
            let mut s = Samples::with_capacity(10_000);
            let mut errors = 0u64;
            let mut rng = fastrand::Rng::new();
            while Instant::now() < deadline {
                // One request: 10 evaluations, then the next request in 10 ms.
                for _ in 0..10 {
                    let i = rng.usize(..FLAGS);
                    let latest = flips.version[i].load(Ordering::Acquire);
                    let done = flips.done_at_us[i].load(Ordering::Acquire);
                    let t = Instant::now();
                    let got = cache.lookup(&keys[i]).await;
                    s.push(t.elapsed());
                    match got {
                        Ok(l) => {
                            let v = l.version.map_or(0, |v| v.get());
                            if v < latest {
                                let late = flips.now_us().saturating_sub(done);
                                if late > BOUND.as_micros() as u64 {
                                    past.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    within.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (s, errors)
        }));
    }
    // The publisher: one flip every 100 ms.
    let mut flipped = 0u64;
    let mut version = 1u64;
    while Instant::now() + Duration::from_millis(100) < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        version += 1;
        let i = (version as usize) % FLAGS;
        let v = Version::new(version);
        source.set(&keys[i], payload(300), v);
        publisher
            .set(&keys[i], payload(300), v)
            .await
            .map_err(err)?;
        flips.done_at_us[i].store(flips.now_us(), Ordering::Release);
        flips.version[i].store(version, Ordering::Release);
        flipped += 1;
    }
    let mut samples = Samples::default();
    let mut errors = 0;
    for h in handles {
        let (s, e) = h.await.map_err(err)?;
        samples.extend(s);
        errors += e;
    }
    let evaluations = samples.len();
    let summary = samples.summary();
    let past = stale_past.load(Ordering::SeqCst);
    section.checks.push(Check::at_most(
        "rollout storm: p99 evaluation with L1",
        summary.p99_us,
        1_000.0,
        "µs",
    ));
    section.checks.push(Check::at_most(
        &format!(
            "rollout storm: stale reads later than {} ms after a flip",
            BOUND.as_millis()
        ),
        past as f64,
        0.0,
        "reads",
    ));
    section
        .checks
        .push(Check::at_most("rollout storm: errors", errors as f64, 0.0, "reads").correctness());
    section.rows.push(
        Row::new(&scenario, "FlagCache (L1 + Redis)", summary)
            .ops(evaluations as f64 / run_for.as_secs_f64())
            .count("evaluations", evaluations as f64)
            .count("flips", flipped as f64)
            .count("stale ≤ bound", stale_within.load(Ordering::SeqCst) as f64)
            .count("stale > bound", past as f64)
            .count("loader calls", (source.calls() - loads_before) as f64)
            .count("errors", errors as f64),
    );
    drop(caches);
    drop(publisher);

    // Baseline: a raw GET per evaluation, the same pacing, half the time.
    let conn = redis_conn(&url).await?;
    let names: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| k.as_str().to_string()).collect());
    {
        let mut c = conn.clone();
        for n in names.iter() {
            let _: () = redis::AsyncCommands::set(&mut c, n, payload(300))
                .await
                .map_err(err)?;
        }
    }
    let run_for = run_for / 2;
    let deadline = Instant::now() + run_for;
    let handles: Vec<_> = (0..REPLICAS * TASKS)
        .map(|_| {
            let (mut conn, names) = (conn.clone(), names.clone());
            tokio::spawn(async move {
                let mut s = Samples::with_capacity(5_000);
                let mut rng = fastrand::Rng::new();
                while Instant::now() < deadline {
                    for _ in 0..10 {
                        let t = Instant::now();
                        let _: Option<Vec<u8>> =
                            redis::AsyncCommands::get(&mut conn, &names[rng.usize(..FLAGS)])
                                .await
                                .map_err(err)?;
                        s.push(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, String>(s)
            })
        })
        .collect();
    let mut samples = Samples::default();
    for h in handles {
        samples.extend(h.await.map_err(err)??);
    }
    let evaluations = samples.len();
    section.rows.insert(
        0,
        Row::new(
            &scenario,
            "raw redis-rs GET per evaluation",
            samples.summary(),
        )
        .ops(evaluations as f64 / run_for.as_secs_f64())
        .count("evaluations", evaluations as f64),
    );
    Ok(section)
}
