//! Kill switch under faults: 8 replicas share one backend; during each fault a flag is
//! flipped (a `set` with a new version) on one of them, and the figure is the time until
//! all 8 serve the new version — per flip, its p50 and max over the flips — and the
//! replicas that never did within 5 s.
//!
//! The faults, over Redis (`RedisStore` + `RedisInvalidator`, its own server):
//! - none (time from the `set`);
//! - Redis killed and started again on its port; the flip is issued as soon as the
//!   server answers again, and timed from then;
//! - Redis paused (SIGSTOP) for 3 s; the flip is issued right after SIGCONT, and timed
//!   from then;
//! - an unreadable entry planted at the key before the flip (a valid header claiming
//!   v1,000,000, its CRC broken); time from the `set`;
//! - an invalidation racing a slow load on an unsubscribed ninth replica (see
//!   [`racing_load`]); time from the load's end.
//!
//! Over a ring of 3 memcached servers (`MemcachedStore` + `MemcachedInvalidator`, 100 ms
//! poll), the third server down (the log lives on the first):
//! - a key on a live server, flipped while the third is down (time from the `set`);
//! - a key on the down server: a `set` tried during the 1 s outage is refused (counted),
//!   then the flip is issued when the server is back, and timed from then.
//!
//! While a fault lasts, every replica reads the key every 10 ms, so their breakers and
//! subscriptions meet the fault as a serving fleet's do. A failed `set` is retried every
//! 20 ms (counted). Targets per row: replicas that never served a flip, none; the max
//! time until all 8 serve it, at most 1 s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagcache_core::{Entry, FlagCache, FlagKey, FlagStore, Version};
use flagcache_memcached::{MemcachedInvalidator, MemcachedStore};
use flagcache_testkit::{MemcachedServer, RedisServer};

use super::replicas::{redis_pair, redis_store, replica};
use super::{err, fresh_key, payload, redis_conn, Check, Plan, Res, Row, Section};
use crate::source::Source;
use crate::stats::Samples;

const REPLICAS: usize = 8;
const SCENARIO: &str = "kill switch under faults, 8 replicas";
/// A replica that has not served a flip this long after its start never did.
const DEADLINE: Duration = Duration::from_secs(5);
/// The target: every replica serves the flip within this, after the fault clears.
const TARGET: Duration = Duration::from_secs(1);
/// How long the racing replica's load takes.
const SLOW_LOAD: Duration = Duration::from_millis(200);
/// The version the planted unreadable entry claims.
const CLAIM: Version = Version::new(1_000_000);

/// What the flips of one row measured.
#[derive(Debug, Default)]
struct Flips {
    /// Per flip, the time until the last replica served it.
    all_served: Samples,
    /// Flips issued.
    count: usize,
    /// Replicas that did not serve a flip within [`DEADLINE`], summed over flips.
    never: usize,
    /// `set` calls that failed: a flip's own are retried; one tried during an outage
    /// is not.
    failed_sets: u64,
}

/// What one flip measured.
#[derive(Debug)]
struct Flip {
    /// The time until the last replica served it, if every replica did.
    all_served: Option<Duration>,
    /// Replicas that did not serve it within [`DEADLINE`].
    never: usize,
    /// `set` calls that failed (and were retried).
    failed_sets: u64,
}

impl Flips {
    fn add(&mut self, flip: Flip) {
        self.count += 1;
        self.never += flip.never;
        self.failed_sets += flip.failed_sets;
        if let Some(d) = flip.all_served {
            self.all_served.push(d);
        }
    }
}

/// The flag the replicas read and one of them flips, and the source behind it.
struct Flag<'a> {
    caches: &'a [FlagCache<String>],
    source: &'a Source,
    key: FlagKey,
    version: u64,
}

impl<'a> Flag<'a> {
    /// A fresh key, set at version 1 and served by every replica.
    async fn new(caches: &'a [FlagCache<String>], source: &'a Source, prefix: &str) -> Res<Self> {
        Self::at(caches, source, fresh_key(prefix)?).await
    }

    /// `key`, set at version 1 and served by every replica.
    async fn at(caches: &'a [FlagCache<String>], source: &'a Source, key: FlagKey) -> Res<Self> {
        let mut flag = Flag {
            caches,
            source,
            key,
            version: 0,
        };
        flag.advance();
        flag.set_once().await.map_err(err)?;
        for c in caches {
            c.get(&flag.key).await.map_err(err)?;
        }
        Ok(flag)
    }

    /// Moves the source to the next version (the control plane changes first).
    fn advance(&mut self) {
        self.version += 1;
        self.source
            .set(&self.key, payload(100), Version::new(self.version));
    }

    /// One `set` of the current version on the writer (the first replica).
    async fn set_once(&self) -> flagcache_core::Result<()> {
        self.caches[0]
            .set(&self.key, payload(100), Version::new(self.version))
            .await
            .map(drop)
    }

    /// Flips to the next version, timed from `t0`: the `set` is retried every 20 ms
    /// until it succeeds or [`DEADLINE`] passes, then every replica is read (every
    /// 2 ms) until it serves the new version.
    async fn flip(&mut self, t0: Instant) -> Flip {
        self.advance();
        let mut failed_sets = 0;
        while self.set_once().await.is_err() {
            failed_sets += 1;
            if t0.elapsed() > DEADLINE {
                return Flip {
                    all_served: None,
                    never: self.caches.len(),
                    failed_sets,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_serve(self.caches, &self.key, self.version, t0, failed_sets).await
    }

    /// Every replica reading the key every 10 ms, until [`Traffic::stop`].
    fn traffic(&self) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = self
            .caches
            .iter()
            .map(|c| {
                let (c, k, stop) = (c.clone(), self.key.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = c.lookup(&k).await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Traffic { stop, tasks }
    }
}

/// Reads every replica (every 2 ms) until it serves `want` or newer, timed from `t0`.
async fn all_serve(
    caches: &[FlagCache<String>],
    key: &FlagKey,
    want: u64,
    t0: Instant,
    failed_sets: u64,
) -> Flip {
    let waits = caches.iter().map(|c| async move {
        loop {
            if let Ok(l) = c.lookup(key).await {
                if l.version.is_some_and(|v| v.get() >= want) {
                    return Some(t0.elapsed());
                }
            }
            if t0.elapsed() > DEADLINE {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let served: Vec<Option<Duration>> = futures_util::future::join_all(waits).await;
    let never = served.iter().filter(|s| s.is_none()).count();
    Flip {
        // The last replica's time, when none missed it.
        all_served: if never == 0 {
            served.into_iter().flatten().max()
        } else {
            None
        },
        never,
        failed_sets,
    }
}

/// An invalidation racing a slow load: per flip, a fresh key at v1 that no replica has
/// read; a ninth replica — subscribed to nothing, loading from a control-plane read
/// replica that answers v1 after [`SLOW_LOAD`] — misses it and starts its load; the
/// control plane moves to v2 and the writer `invalidate`s the key; the slow load
/// then ends and tries to write v1 into L2. Timed from the slow load's end: until all
/// 8 replicas serve v2. Without leases, L2 keeps v1 and no replica ever does.
async fn racing_load(
    caches: &[FlagCache<String>],
    source: &Source,
    slow: &FlagCache<String>,
    slow_source: &Source,
) -> Res<Flip> {
    let key = fresh_key("kill.race")?;
    slow_source.set(&key, payload(100), Version::new(1));
    source.set(&key, payload(100), Version::new(1));
    let calls = slow_source.calls();
    let read = {
        let (slow, key) = (slow.clone(), key.clone());
        tokio::spawn(async move { slow.lookup(&key).await })
    };
    let asked = Instant::now();
    while slow_source.calls() == calls {
        if asked.elapsed() > DEADLINE {
            return Err(err("the slow replica never loaded"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    source.set(&key, payload(100), Version::new(2));
    caches[0].invalidate(&key).await.map_err(err)?;
    let _ = read.await.map_err(err)?;
    Ok(all_serve(caches, &key, 2, Instant::now(), 0).await)
}

/// Reads running on every replica while a fault lasts.
struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Adds the row of `fault` and its two targets.
fn report(section: &mut Section, fault: &str, flips: Flips) {
    let summary = flips.all_served.summary();
    section.checks.push(
        Check::at_most(
            &format!("kill switch, {fault}: replicas that never served a flip"),
            flips.never as f64,
            0.0,
            "replicas",
        )
        .correctness(),
    );
    // With no flip served by all, the time is at least the deadline.
    let max_ms = if summary.count == 0 {
        DEADLINE.as_secs_f64() * 1_000.0
    } else {
        summary.max_us / 1_000.0
    };
    section.checks.push(Check::at_most(
        &format!("kill switch, {fault}: max time until all {REPLICAS} serve it"),
        max_ms,
        TARGET.as_secs_f64() * 1_000.0,
        "ms",
    ));
    section.rows.push(
        Row::new(SCENARIO, fault, summary)
            .count("flips", flips.count as f64)
            .count("never served", flips.never as f64)
            .count("failed sets", flips.failed_sets as f64),
    );
}

/// A valid entry at [`CLAIM`] with its CRC broken, at `key`, under `namespace`.
async fn plant_unreadable(url: &str, namespace: &str, key: &FlagKey) -> Res<()> {
    let store = redis_store(url, namespace).await?;
    let claim = Entry::new(CLAIM, store.codec().encode_value("claim").map_err(err)?);
    let mut bytes = store.codec().encode_entry(&claim).map_err(err)?.to_vec();
    // The header's CRC-32 sits at bytes 24..28.
    if let Some(b) = bytes.get_mut(24) {
        *b ^= 0xff;
    }
    let mut conn = redis_conn(url).await?;
    redis::cmd("SET")
        .arg(store.redis_key(key))
        .arg(bytes)
        .query_async::<()>(&mut conn)
        .await
        .map_err(err)
}

/// The Redis rows: no fault, an unreadable entry, a restart, a pause.
async fn over_redis(section: &mut Section, plan: Plan, source: &Arc<Source>) -> Res<()> {
    const NS: &str = "bench-kill";
    let mut server = tokio::task::block_in_place(RedisServer::start).map_err(err)?;
    let url = server.url();
    let channel = format!("bench-kill-{:x}", fastrand::u32(..));
    let mut caches = Vec::new();
    for i in 0..REPLICAS {
        let (store, inv) = redis_pair(&url, NS, &channel).await?;
        caches.push(replica(format!("kill-redis-{i}"), source, store, inv).await?);
    }

    let mut flips = Flips::default();
    let mut flag = Flag::new(&caches, source, "kill.none").await?;
    for _ in 0..plan.n(20, 3) {
        flips.add(flag.flip(Instant::now()).await);
    }
    report(section, "Redis, no fault", flips);

    let mut flips = Flips::default();
    let mut flag = Flag::new(&caches, source, "kill.unreadable").await?;
    for _ in 0..plan.n(10, 2) {
        plant_unreadable(&url, NS, &flag.key).await?;
        flips.add(flag.flip(Instant::now()).await);
    }
    report(section, "Redis, unreadable entry planted", flips);

    let slow_source = Source::new(SLOW_LOAD);
    let slow = FlagCache::<String>::builder(redis_store(&url, NS).await?, slow_source.loader())
        .name("kill-redis-slow")
        .build()
        .await
        .map_err(err)?;
    let mut flips = Flips::default();
    for _ in 0..plan.n(10, 2) {
        flips.add(racing_load(&caches, source, &slow, &slow_source).await?);
    }
    report(
        section,
        "Redis, invalidation racing a slow load (from the load's end)",
        flips,
    );

    let mut flips = Flips::default();
    let mut flag = Flag::new(&caches, source, "kill.restart").await?;
    for _ in 0..plan.n(5, 1) {
        let traffic = flag.traffic();
        server.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| server.restart()).map_err(err)?;
        let back = Instant::now();
        traffic.stop().await;
        flips.add(flag.flip(back).await);
    }
    report(section, "Redis restarted (from restart)", flips);

    let pause = plan.secs(3.0, 0.3);
    let mut flips = Flips::default();
    let mut flag = Flag::new(&caches, source, "kill.pause").await?;
    for _ in 0..plan.n(4, 1) {
        let traffic = flag.traffic();
        server.pause().map_err(err)?;
        tokio::time::sleep(pause).await;
        server.resume().map_err(err)?;
        let resumed = Instant::now();
        traffic.stop().await;
        flips.add(flag.flip(resumed).await);
    }
    report(
        section,
        &format!("Redis paused {} s (from SIGCONT)", pause.as_secs_f64()),
        flips,
    );
    Ok(())
}

/// The memcached rows: one server of three down, a key on a live server and a key on
/// the down one.
async fn over_memcached(section: &mut Section, plan: Plan, source: &Arc<Source>) -> Res<()> {
    const DOWN: usize = 2;
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(tokio::task::block_in_place(MemcachedServer::start).map_err(err)?);
    }
    let urls: Vec<String> = servers.iter().map(MemcachedServer::url).collect();
    let ns = format!("bench-kill-{:x}", fastrand::u32(..));
    let ring = || async {
        MemcachedStore::builder()
            .servers(urls.iter().cloned())
            .namespace(&ns)
            .build()
            .await
            .map_err(err)
    };
    let mut caches = Vec::new();
    for i in 0..REPLICAS {
        let store = ring().await?;
        let inv = MemcachedInvalidator::builder(&store)
            .poll_interval(Duration::from_millis(100))
            .build();
        caches.push(replica(format!("kill-memcached-{i}"), source, store, inv).await?);
    }
    // A key on a live server and one on the server that goes down.
    let router = ring().await?;
    let on = |down: bool| -> Res<FlagKey> {
        loop {
            let k = fresh_key("kill.memcached")?;
            if (router.read_group(&k) == Some(DOWN as u64)) == down {
                return Ok(k);
            }
        }
    };
    let mut live = Flag::at(&caches, source, on(false)?).await?;
    let mut down = Flag::at(&caches, source, on(true)?).await?;

    let mut flips = Flips::default();
    servers[DOWN].stop();
    for _ in 0..plan.n(5, 2) {
        let traffic = live.traffic();
        tokio::time::sleep(Duration::from_millis(200)).await;
        traffic.stop().await;
        flips.add(live.flip(Instant::now()).await);
    }
    report(
        section,
        "Memcached, 1 of 3 down: a live server's key",
        flips,
    );

    let outage = plan.secs(1.0, 0.3);
    let mut flips = Flips::default();
    for _ in 0..plan.n(3, 1) {
        let traffic = down.traffic();
        tokio::time::sleep(outage / 2).await;
        // A flip while the key's server is down: refused.
        down.advance();
        if down.set_once().await.is_err() {
            flips.failed_sets += 1;
        }
        tokio::time::sleep(outage / 2).await;
        tokio::task::block_in_place(|| servers[DOWN].restart()).map_err(err)?;
        let back = Instant::now();
        traffic.stop().await;
        flips.add(down.flip(back).await);
        servers[DOWN].stop();
    }
    report(
        section,
        &format!(
            "Memcached, 1 of 3 down {} s: its key (from restart)",
            outage.as_secs_f64()
        ),
        flips,
    );
    Ok(())
}

/// Kill switch under faults: every row over Redis, then over memcached. Starts its own servers (it kills and pauses them).
pub async fn kill_switch(plan: Plan) -> Res<Section> {
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(1));
    over_redis(&mut section, plan, &source).await?;
    over_memcached(&mut section, plan, &source).await?;
    Ok(section)
}
