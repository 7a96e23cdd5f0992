//! Cache down: 4 replicas × 16 tasks evaluate 50 flags while their Redis is killed a
//! third of the way through (the control plane goes down with it); against a raw
//! `redis-rs` GET per evaluation with the same 50 ms limit, its Redis killed the same
//! way.
//!
//! The figures cover the evaluations after the kill: failed ones (none allowed for
//! `FlagCache`, which answers from fail-safe), how many were fail-safe answers, how
//! many paid a timeout before the circuit breaker opened, and their latency.

use std::time::{Duration, Instant};

use flagcache_core::{CacheStatus, FlagCache, FlagKey, Lookup, StaleReason};
use flagcache_testkit::RedisServer;
use tokio::time::error::Elapsed;

use super::paced::{self, Pace, Reader};
use super::replicas::redis_pair;
use super::{err, redis_conn, seeded_keys, Check, Plan, Res, Row, Section};
use crate::source::Source;
use crate::stats::{Samples, Summary};

const REPLICAS: usize = 4;
/// Reading tasks per replica.
const TASKS: usize = 16;
const FLAGS: usize = 50;
/// `FlagCache`'s limit on an L2 read and on a load, and the baseline's on a GET.
const L2_TIMEOUT: Duration = Duration::from_millis(50);

/// What the tasks of one contender saw after the kill.
#[derive(Debug, Default)]
struct AfterKill {
    /// Every evaluation's latency.
    evaluations: Samples,
    /// The latency of the evaluations answered from fail-safe.
    fail_safe: Samples,
    errors: u64,
    /// Evaluations that waited for the 50 ms limit.
    timeouts: u64,
}

impl AfterKill {
    fn add(&mut self, other: AfterKill) {
        self.evaluations.extend(other.evaluations);
        self.fail_safe.extend(other.fail_safe);
        self.errors += other.errors;
        self.timeouts += other.timeouts;
    }

    /// A row of `latency`, with these counts.
    fn row(&self, scenario: &str, contender: &str, latency: Summary) -> Row {
        Row::new(scenario, contender, latency)
            .count("evaluations after kill", self.evaluations.len() as f64)
            .count("paid a timeout", self.timeouts as f64)
            .count("errors", self.errors as f64)
    }
}

/// A task evaluating one flag after another through `client`, and what it saw after
/// the kill.
struct Task<C> {
    client: C,
    rng: fastrand::Rng,
    kill_at: Instant,
    seen: AfterKill,
}

/// A replica, and the flags its tasks evaluate.
struct Replica {
    cache: FlagCache<String>,
    keys: Vec<FlagKey>,
}

impl Reader for Task<Replica> {
    type Answer = flagcache_core::Result<Lookup<String>>;

    async fn read(&mut self) -> Self::Answer {
        let Replica { cache, keys } = &self.client;
        cache.lookup(&keys[self.rng.usize(..FLAGS)]).await
    }

    fn record(&mut self, at: Instant, took: Duration, answer: Self::Answer) -> Res<()> {
        if at >= self.kill_at {
            let seen = &mut self.seen;
            seen.evaluations.push(took);
            if took >= L2_TIMEOUT {
                seen.timeouts += 1;
            }
            match answer {
                Ok(l) if l.status == CacheStatus::Stale(StaleReason::FailSafe) => {
                    seen.fail_safe.push(took)
                }
                Ok(_) => {}
                Err(_) => seen.errors += 1,
            }
        }
        Ok(())
    }
}

/// The baseline's task: a raw GET per evaluation, with the same limit.
impl Reader for Task<redis::aio::MultiplexedConnection> {
    type Answer = Result<redis::RedisResult<Option<Vec<u8>>>, Elapsed>;

    async fn read(&mut self) -> Self::Answer {
        let name = format!("down.{}", self.rng.usize(..FLAGS));
        tokio::time::timeout(
            L2_TIMEOUT,
            redis::AsyncCommands::get(&mut self.client, name),
        )
        .await
    }

    fn record(&mut self, at: Instant, took: Duration, answer: Self::Answer) -> Res<()> {
        if at >= self.kill_at {
            let seen = &mut self.seen;
            seen.evaluations.push(took);
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => seen.errors += 1,
                Err(_) => {
                    seen.errors += 1;
                    seen.timeouts += 1;
                }
            }
        }
        Ok(())
    }
}

/// One task per client, each evaluating a flag every 1 ms for `run_for`, with `kill`
/// called a third of the way through; what the tasks saw after it.
async fn phase<C>(
    clients: impl IntoIterator<Item = C>,
    run_for: Duration,
    kill: impl FnOnce(),
) -> Res<AfterKill>
where
    Task<C>: Reader,
{
    let start = Instant::now();
    let kill_at = start + run_for / 3;
    let tasks = clients.into_iter().map(|client| Task {
        client,
        rng: fastrand::Rng::new(),
        kill_at,
        seen: AfterKill::default(),
    });
    let pace = Pace {
        reads: 1,
        pause: Duration::from_millis(1),
        until: start + run_for,
    };
    let running = paced::spawn(tasks, pace);
    tokio::time::sleep_until(kill_at.into()).await;
    kill();
    let mut seen = AfterKill::default();
    for task in running.join().await? {
        seen.add(task.seen);
    }
    Ok(seen)
}

/// Cache down: Redis is killed a third of the way through (and the control plane
/// goes down with it); `FlagCache` keeps answering from fail-safe, against a raw GET
/// per evaluation. Uses its own Redis.
pub async fn cache_down(plan: Plan) -> Res<Section> {
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
            .l2_timeout(L2_TIMEOUT)
            .loader_timeout(L2_TIMEOUT)
            .circuit_breaker(3, Duration::from_secs(1))
            .build()
            .await
            .map_err(err)?;
        cache.warm(&keys).await;
        caches.push(cache);
    }
    let replicas = (0..REPLICAS * TASKS).map(|t| Replica {
        cache: caches[t % REPLICAS].clone(),
        keys: keys.clone(),
    });
    let mut seen = phase(replicas, run_for, || {
        server.stop();
        source.go_down();
    })
    .await?;
    let fail_safe = std::mem::take(&mut seen.fail_safe);
    section.checks.push(
        Check::at_most(
            "cache down: failed evaluations",
            seen.errors as f64,
            0.0,
            "reads",
        )
        .correctness(),
    );
    let fail_safe_count = fail_safe.len() as f64;
    section.rows.push(
        seen.row(
            &scenario,
            "FlagCache, fail-safe answers",
            fail_safe.summary(),
        )
        .count("fail-safe", fail_safe_count),
    );
    let served = seen.evaluations.len() as f64;
    section.rows.push(
        Row::new(
            &scenario,
            "FlagCache, every evaluation after kill",
            seen.evaluations.summary(),
        )
        .count("evaluations after kill", served),
    );
    drop(caches);

    // Baseline: a raw GET per evaluation, with the same 50 ms limit.
    tokio::task::block_in_place(|| server.restart()).map_err(err)?;
    let conn = redis_conn(&url).await?;
    let conns = (0..REPLICAS * TASKS).map(|_| conn.clone());
    let seen = phase(conns, run_for, || server.stop()).await?;
    let latency = seen.evaluations.clone().summary();
    section.rows.insert(
        0,
        seen.row(&scenario, "raw redis-rs GET, 50 ms limit", latency),
    );
    Ok(section)
}
