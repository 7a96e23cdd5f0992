//! Propagation: the time from a `set` on one replica until each of 8 other replicas
//! serves the new version, over Redis pub/sub and over the memcached invalidation log
//! (polled every 100 ms).
//!
//! The figures: the p99 of that time (bounds: 5 ms for pub/sub; the poll interval
//! + 20 ms for the log), and flips a replica never saw within 5 s (none allowed).

use std::time::{Duration, Instant};

use flagcache_core::{FlagCache, FlagKey, Version};
use flagcache_memcached::{MemcachedInvalidator, MemcachedStore};

use super::replicas::{redis_pair, replica};
use super::{err, fresh_key, payload, Check, Plan, Res, Row, Section, Servers};
use crate::source::Source;
use crate::stats::Samples;

/// Time from `set` on one replica until each of 8 others serves the new version.
async fn propagation(
    writer: &FlagCache<String>,
    readers: &[FlagCache<String>],
    flips: usize,
) -> Res<(Samples, usize)> {
    let k = fresh_key("propagation")?;
    writer
        .set(&k, payload(100), Version::new(1))
        .await
        .map_err(err)?;
    for r in readers {
        r.get(&k).await.map_err(err)?;
    }
    let key = &k;
    flip_and_wait(readers, key, flips, |flip| async move {
        writer
            .set(key, payload(100), Version::new(flip))
            .await
            .map(|_| ())
            .map_err(err)
    })
    .await
}

/// Writes versions 2, 3, … of `k` (`flips` of them) with `write`, and after each waits
/// until every reader serves it: the time from the start of each write until each
/// reader serves it, and how many times a reader never did.
pub(super) async fn flip_and_wait<W, F>(
    readers: &[FlagCache<String>],
    k: &FlagKey,
    flips: usize,
    mut write: W,
) -> Res<(Samples, usize)>
where
    W: FnMut(u64) -> F,
    F: std::future::Future<Output = Res<()>>,
{
    let mut samples = Samples::with_capacity(flips * readers.len());
    let mut missed = 0;
    for flip in 2..flips as u64 + 2 {
        let t0 = Instant::now();
        write(flip).await?;
        for took in until_seen(readers, k, flip, t0).await {
            match took {
                Some(d) => samples.push(d),
                None => missed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((samples, missed))
}

/// How long after `t0` each reader first serves version `flip` (or newer) of `k`;
/// `None` for a reader that did not within 5 s.
async fn until_seen(
    readers: &[FlagCache<String>],
    k: &FlagKey,
    flip: u64,
    t0: Instant,
) -> Vec<Option<Duration>> {
    let waits = readers.iter().map(|r| async move {
        loop {
            if let Ok(l) = r.lookup(k).await {
                if l.version.is_some_and(|v| v.get() >= flip) {
                    return Some(t0.elapsed());
                }
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return None;
            }
            // Spin for the first 2 ms (most flips land sooner), then poll every
            // 0.5 ms: eight spinning readers would take both cores from the very
            // server that delivers the event, and measure that.
            if t0.elapsed() < Duration::from_millis(2) {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    });
    futures_util::future::join_all(waits).await
}

/// Runs [`propagation`] over `caches` (the first writes) and reports it under
/// `contender`, with its p99 bound.
async fn propagation_section(
    section: &mut Section,
    caches: &[FlagCache<String>],
    flips: usize,
    contender: &str,
    bound_us: f64,
) -> Res<()> {
    let (samples, missed) = propagation(&caches[0], &caches[1..], flips).await?;
    record(
        section,
        "propagation",
        (samples, missed),
        (flips, caches.len() - 1),
        contender,
        bound_us,
    );
    Ok(())
}

/// Adds one contender's propagation figures to `section`: the row (`scenario`, with
/// the counts of flips and readers), its p99 against `bound_us`, and flips never seen
/// (none allowed).
pub(super) fn record(
    section: &mut Section,
    scenario: &str,
    (samples, missed): (Samples, usize),
    (flips, readers): (usize, usize),
    contender: &str,
    bound_us: f64,
) {
    let summary = samples.summary();
    section.checks.push(Check::at_most(
        &format!("{scenario}, {contender}: p99"),
        summary.p99_us,
        bound_us,
        "µs",
    ));
    section.checks.push(
        Check::at_most(
            &format!("{scenario}, {contender}: flips never seen"),
            missed as f64,
            0.0,
            "reads",
        )
        .correctness(),
    );
    section.rows.push(
        Row::new(
            &format!("{scenario}, {flips} flips to {readers} replicas"),
            contender,
            summary,
        )
        .count("never seen", missed as f64),
    );
}

/// Propagation over Redis pub/sub and over the memcached log.
pub async fn propagation_both(servers: &mut Servers, plan: Plan) -> Res<Section> {
    const READERS: usize = 8;
    let flips = plan.n(500, 10);
    let mut section = Section::default();
    let source = Source::new(Duration::from_millis(1));

    let url = servers.redis_url()?;
    let channel = format!("bench-propagation-{:x}", fastrand::u32(..));
    let mut caches = Vec::new();
    for i in 0..=READERS {
        let (store, inv) = redis_pair(&url, "bench-prop", &channel).await?;
        caches.push(replica(format!("prop-redis-{i}"), &source, store, inv).await?);
    }
    propagation_section(&mut section, &caches, flips, "Redis pub/sub", 5_000.0).await?;
    drop(caches);

    let url = servers.memcached_url()?;
    let poll = Duration::from_millis(100);
    let ns = format!("bench-prop-{:x}", fastrand::u32(..));
    let mut caches = Vec::new();
    for i in 0..=READERS {
        let store = MemcachedStore::builder()
            .server(&url)
            .namespace(&ns)
            .build()
            .await
            .map_err(err)?;
        let inv = MemcachedInvalidator::builder(&store)
            .poll_interval(poll)
            .build();
        caches.push(replica(format!("prop-memcached-{i}"), &source, store, inv).await?);
    }
    let bound = (poll + Duration::from_millis(20)).as_secs_f64() * 1e6;
    propagation_section(
        &mut section,
        &caches,
        flips,
        "Memcached log, 100 ms poll",
        bound,
    )
    .await?;
    Ok(section)
}
