//! The rollout storm: 8 replicas × 64 tasks evaluating 200 flags (L1 over Redis) in
//! requests of 10 evaluations every 10 ms, while a publisher flips one flag every
//! 100 ms; against a raw `redis-rs` GET per evaluation at the same pace.
//!
//! The figures: `FlagCache`'s evaluation latency (p99 under 1 ms), its evaluations per
//! second, and stale reads — a read of an older version than the latest flip, counted
//! within 10 ms of the flip (allowed) and later (not allowed).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{FlagCache, FlagKey, Lookup, Version};

use super::paced::{self, Pace, Reader};
use super::replicas::{redis_pair, replica};
use super::{err, payload, redis_conn, seeded_keys, Check, Plan, Res, Row, Section, Servers};
use crate::source::Source;
use crate::stats::Samples;

const REPLICAS: usize = 8;
/// Reading tasks per replica.
const TASKS: usize = 64;
const FLAGS: usize = 200;
/// How long after a flip a read of the older version is allowed.
const BOUND: Duration = Duration::from_millis(10);

/// One request: 10 evaluations, then the next request in 10 ms.
fn request_pace(until: Instant) -> Pace {
    Pace {
        reads: 10,
        pause: Duration::from_millis(10),
        until,
    }
}

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

/// A task evaluating flags on one replica, and what it saw.
struct CacheReader {
    cache: FlagCache<String>,
    keys: Vec<FlagKey>,
    flips: Arc<Flips>,
    rng: fastrand::Rng,
    /// The latest flip of the flag being read, as the read starts: its version, and
    /// when its `set` returned.
    pending: (u64, u64),
    samples: Samples,
    stale_within: u64,
    stale_past: u64,
    errors: u64,
}

impl Reader for CacheReader {
    type Answer = flagcache_core::Result<Lookup<String>>;

    fn read(&mut self) -> impl Future<Output = Self::Answer> + Send + '_ {
        let i = self.rng.usize(..FLAGS);
        self.pending = (
            self.flips.version[i].load(Ordering::Acquire),
            self.flips.done_at_us[i].load(Ordering::Acquire),
        );
        self.cache.lookup(&self.keys[i])
    }

    fn record(&mut self, _: Instant, took: Duration, answer: Self::Answer) -> Res<()> {
        self.samples.push(took);
        let (latest, done) = self.pending;
        match answer {
            Ok(l) => {
                let v = l.version.map_or(0, |v| v.get());
                if v < latest {
                    let late = self.flips.now_us().saturating_sub(done);
                    if late > BOUND.as_micros() as u64 {
                        self.stale_past += 1;
                    } else {
                        self.stale_within += 1;
                    }
                }
            }
            Err(_) => self.errors += 1,
        }
        Ok(())
    }
}

/// A task of the baseline: a raw GET per evaluation.
struct RawReader {
    conn: redis::aio::MultiplexedConnection,
    names: Arc<Vec<String>>,
    rng: fastrand::Rng,
    samples: Samples,
}

impl Reader for RawReader {
    type Answer = redis::RedisResult<Option<Vec<u8>>>;

    async fn read(&mut self) -> Self::Answer {
        let name = &self.names[self.rng.usize(..FLAGS)];
        redis::AsyncCommands::get(&mut self.conn, name).await
    }

    fn record(&mut self, _: Instant, took: Duration, answer: Self::Answer) -> Res<()> {
        answer.map_err(err)?;
        self.samples.push(took);
        Ok(())
    }
}

/// Rollout storm: 8 replicas × 64 tasks evaluating 200 flags (L1 + Redis) while a
/// publisher flips one flag every 100 ms; against a raw GET per evaluation.
pub async fn rollout_storm(servers: &mut Servers, plan: Plan) -> Res<Section> {
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
    let deadline = Instant::now() + run_for;
    let readers = (0..REPLICAS * TASKS).map(|r| CacheReader {
        cache: caches[r % REPLICAS].clone(),
        keys: keys.clone(),
        flips: flips.clone(),
        rng: fastrand::Rng::new(),
        pending: (0, 0),
        samples: Samples::with_capacity(10_000),
        stale_within: 0,
        stale_past: 0,
        errors: 0,
    });
    let running = paced::spawn(readers, request_pace(deadline));
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
    let (mut samples, mut within, mut past, mut errors) = (Samples::default(), 0, 0, 0);
    for r in running.join().await? {
        samples.extend(r.samples);
        within += r.stale_within;
        past += r.stale_past;
        errors += r.errors;
    }
    let evaluations = samples.len();
    let summary = samples.summary();
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
            .count("stale ≤ bound", within as f64)
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
    let readers = (0..REPLICAS * TASKS).map(|_| RawReader {
        conn: conn.clone(),
        names: names.clone(),
        rng: fastrand::Rng::new(),
        samples: Samples::with_capacity(5_000),
    });
    let running = paced::spawn(readers, request_pace(Instant::now() + run_for));
    let mut samples = Samples::default();
    for r in running.join().await? {
        samples.extend(r.samples);
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
