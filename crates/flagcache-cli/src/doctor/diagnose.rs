//! The diagnosis: two samples of a server taken an interval apart, and what the
//! invalidation channel showed in between, turned into findings — a stampede, CAS
//! contention, evictions or memory pressure, a broken backplane, a flushed script
//! cache — each with the figures that prove it and an action. Pure: no I/O.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::sample::Sample;

/// Where each finding starts. The defaults are far from what a healthy flag cache
/// shows (flags are read from L1, written a few times a minute) and close enough to
/// catch the failure modes runbooks describe.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Misses per second at and above which misses are a stampede…
    pub stampede_misses_per_sec: f64,
    /// …plus this many per live replica where replicas poll an invalidation log in
    /// the server (memcached: a read every 100 ms by default, which misses while no
    /// event was ever published)…
    pub poll_misses_per_node: f64,
    /// …when at least this share of the interval's reads missed.
    pub stampede_miss_ratio: f64,
    /// memcached: the share of CAS writes lost to another writer that is contention
    /// (the usual runbook rule: above 5 % of writes)…
    pub cas_badval_ratio: f64,
    /// …when at least this many were lost in the interval.
    pub cas_badval_min: u64,
    /// Redis: versioned writes (script calls) per second that are writers competing.
    pub script_calls_per_sec: f64,
    /// Memory in use over the limit at and above which memory is under pressure.
    pub memory_fill: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            stampede_misses_per_sec: 200.0,
            poll_misses_per_node: 20.0,
            stampede_miss_ratio: 0.5,
            cas_badval_ratio: 0.05,
            cas_badval_min: 10,
            script_calls_per_sec: 200.0,
            memory_fill: 0.9,
        }
    }
}

/// The interval's rates, per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rates {
    pub hits_per_sec: f64,
    pub misses_per_sec: f64,
    pub gets_per_sec: f64,
    pub evictions_per_sec: f64,
    /// The share of the interval's reads that missed; `None` without reads.
    pub miss_ratio: Option<f64>,
    pub cas_hits_per_sec: Option<f64>,
    pub cas_badval_per_sec: Option<f64>,
    pub script_calls_per_sec: Option<f64>,
    pub sets_per_sec: Option<f64>,
}

/// One finding: its kind, what was measured, and what to do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// `stampede`, `cas_contention`, `evictions`, `memory_pressure`,
    /// `broken_backplane` or `script_cache_flush`.
    pub kind: &'static str,
    /// The measured figures, in a sentence.
    pub summary: String,
    /// The same figures by name.
    pub figures: Map<String, Value>,
    /// The suggested action.
    pub action: &'static str,
}

const STAMPEDE: &str = "Fill each key once: build caches with Backend::cache_builder, which \
    sets the cross-process coalescer (RedisLock on Redis, MemcachedRecache on memcached), \
    instead of FlagCache::builder without .coalescer(..); serve the stale value while one \
    reader revalidates (stale_for, xfetch); cache absent keys (negative_ttl).";
const CAS_MEMCACHED: &str = "Write each flag from one writer (the source of truth's change \
    feed) with versioned writes, and let readers fill a miss through the coalescer \
    (MemcachedRecache) instead of each writing it; or move the write path to Redis, whose \
    version check runs in one script without retries.";
const CAS_REDIS: &str = "Write each flag from one writer with versioned writes, and fill a \
    miss through the coalescer (RedisLock) so that one reader per key writes it.";
const EVICTIONS: &str = "Give the cache memory: raise maxmemory (Redis) or -m (memcached), \
    or keep flags on an instance of their own; on a Redis shared with other data, a \
    volatile-* policy with TTLs on the other keys spares the flags. Each evicted flag is a \
    miss and a reload from the source.";
const MEMORY: &str = "Evictions come next: raise maxmemory (Redis) or -m (memcached), or \
    find what fills the instance (flags are small) and move it elsewhere.";
const SUBSCRIBERS: &str = "Find the replicas whose subscription died (flagcache watch lists \
    the live nodes; their logs say the invalidation subscription was lost) and restart \
    them; check the network and the ACL between them and the server, and \
    client-output-buffer-limit pubsub, which disconnects slow subscribers.";
const RESYNCS: &str = "Events were lost and every replica flushed its L1: find why — a \
    subscriber reconnecting (client-output-buffer-limit pubsub, timeouts), the memcached \
    invalidation log evicted or flushed. flagcache watch shows resyncs as they happen.";
const SCRIPTS: &str = "Find who flushes the script cache (SCRIPT FLUSH, a restart, a \
    failover to a replica): each flush costs every connection a NOSCRIPT error and a \
    reload at its next write. Deny SCRIPT FLUSH to application users with an ACL \
    (-script|flush).";

/// `x` rounded to `places` decimals (figures read better, JSON stays short).
fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// A ratio of two counts; `None` when the whole is 0.
fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn delta(a: u64, b: u64) -> u64 {
    b.saturating_sub(a)
}

fn delta_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(delta(a?, b?))
}

/// The rates between `a` and `b`, taken `secs` seconds apart.
pub fn rates(a: &Sample, b: &Sample, secs: f64) -> Rates {
    let secs = secs.max(1e-3);
    let per = |n: u64| round(n as f64 / secs, 1);
    let (hits, misses) = (delta(a.hits, b.hits), delta(a.misses, b.misses));
    Rates {
        hits_per_sec: per(hits),
        misses_per_sec: per(misses),
        gets_per_sec: per(delta(a.gets, b.gets)),
        evictions_per_sec: per(delta(a.evictions, b.evictions)),
        miss_ratio: ratio(misses, hits + misses).map(|r| round(r, 3)),
        cas_hits_per_sec: delta_opt(a.cas_hits, b.cas_hits).map(per),
        cas_badval_per_sec: delta_opt(a.cas_badval, b.cas_badval).map(per),
        script_calls_per_sec: delta_opt(a.script_calls, b.script_calls).map(per),
        sets_per_sec: delta_opt(a.sets, b.sets).map(per),
    }
}

fn figures(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The findings between `a` and `b`, taken `secs` seconds apart, with `resyncs`
/// resyncs seen on the invalidation channel in between. Empty when healthy.
pub fn diagnose(a: &Sample, b: &Sample, secs: f64, resyncs: u64, t: &Thresholds) -> Vec<Finding> {
    let r = rates(a, b, secs);
    let mut found = Vec::new();
    let secs = round(secs, 1);

    let miss_ratio = ratio(
        delta(a.misses, b.misses),
        delta(a.hits, b.hits) + delta(a.misses, b.misses),
    )
    .unwrap_or(0.0);
    let polling = if b.polled_log {
        t.poll_misses_per_node * a.live_nodes.max(b.live_nodes) as f64
    } else {
        0.0
    };
    let stampede_at = t.stampede_misses_per_sec + polling;
    if r.misses_per_sec >= stampede_at && miss_ratio >= t.stampede_miss_ratio {
        let before = ratio(a.misses, a.hits + a.misses).map_or(0.0, |x| round(x, 3));
        found.push(Finding {
            kind: "stampede",
            summary: format!(
                "{} misses/s against {} hits/s: {:.0}% of reads miss (over the server's \
                 life before: {:.0}%){}",
                r.misses_per_sec,
                r.hits_per_sec,
                miss_ratio * 100.0,
                before * 100.0,
                r.sets_per_sec.map_or_else(String::new, |s| format!(
                    "; {s} SET/s (a coalescer takes one lock per fill)"
                )),
            ),
            figures: figures(json!({
                "misses_per_sec": r.misses_per_sec,
                "hits_per_sec": r.hits_per_sec,
                "gets_per_sec": r.gets_per_sec,
                "miss_ratio": round(miss_ratio, 3),
                "miss_ratio_before": before,
                "sets_per_sec": r.sets_per_sec,
                "threshold_misses_per_sec": stampede_at,
            })),
            action: STAMPEDE,
        });
    }

    if let (Some(badval), Some(hits)) = (
        delta_opt(a.cas_badval, b.cas_badval),
        delta_opt(a.cas_hits, b.cas_hits),
    ) {
        let share = ratio(badval, badval + hits).unwrap_or(0.0);
        if badval >= t.cas_badval_min && share >= t.cas_badval_ratio {
            found.push(Finding {
                kind: "cas_contention",
                summary: format!(
                    "{badval} of {} CAS writes in {secs}s lost to another writer ({:.0}%, \
                     {} cas_badval/s): writers race on the same keys",
                    badval + hits,
                    share * 100.0,
                    r.cas_badval_per_sec.unwrap_or(0.0),
                ),
                figures: figures(json!({
                    "cas_badval": badval,
                    "cas_hits": hits,
                    "cas_badval_ratio": round(share, 3),
                    "cas_badval_per_sec": r.cas_badval_per_sec,
                })),
                action: CAS_MEMCACHED,
            });
        }
    }
    if let Some(calls) = r.script_calls_per_sec {
        if calls >= t.script_calls_per_sec {
            let failed = delta_opt(a.script_failed, b.script_failed).unwrap_or(0);
            found.push(Finding {
                kind: "cas_contention",
                summary: format!(
                    "{calls} versioned writes (EVALSHA/EVAL) per second, {failed} failed in \
                     {secs}s: writers compete for the keys (flags change a few times a \
                     minute)"
                ),
                figures: figures(json!({
                    "script_calls_per_sec": calls,
                    "script_failed": failed,
                })),
                action: CAS_REDIS,
            });
        }
    }

    let evicted = delta(a.evictions, b.evictions);
    let fill = ratio(b.used_memory, b.max_memory);
    let memory = json!({
        "used_memory": b.used_memory,
        "max_memory": b.max_memory,
        "memory_fill": fill.map(|f| round(f, 3)),
    });
    let of_max = fill.map_or_else(
        || format!("{} bytes in use, no limit", b.used_memory),
        |f| {
            format!(
                "{} of {} bytes in use ({:.0}%)",
                b.used_memory,
                b.max_memory,
                f * 100.0
            )
        },
    );
    if evicted > 0 {
        let mut figs = figures(memory);
        figs.insert("evictions".into(), evicted.into());
        figs.insert("evictions_per_sec".into(), r.evictions_per_sec.into());
        found.push(Finding {
            kind: "evictions",
            summary: format!(
                "{evicted} keys evicted in {secs}s ({}/s); {of_max}",
                r.evictions_per_sec
            ),
            figures: figs,
            action: EVICTIONS,
        });
    } else if fill.is_some_and(|f| f >= t.memory_fill) {
        found.push(Finding {
            kind: "memory_pressure",
            summary: format!("{of_max}, no eviction yet"),
            figures: figures(memory),
            action: MEMORY,
        });
    }

    // A replica reconnecting between the samples is not a broken backplane: the
    // higher count of the two is compared with the fewer nodes.
    let subscribers = a.subscribers.max(b.subscribers);
    let nodes = a.subscribed_nodes.min(b.subscribed_nodes);
    if let Some(subs) = subscribers {
        if subs < nodes as u64 {
            found.push(Finding {
                kind: "broken_backplane",
                summary: format!(
                    "{subs} connections subscribe to the invalidation channel but {nodes} \
                     live replicas have an invalidator: {} hear no invalidations and serve \
                     stale flags until their L1 entries expire",
                    nodes as u64 - subs
                ),
                figures: figures(json!({
                    "subscribers": subs,
                    "subscribed_nodes": nodes,
                    "live_nodes": b.live_nodes,
                    "missing": nodes as u64 - subs,
                })),
                action: SUBSCRIBERS,
            });
        }
    }
    if resyncs > 0 {
        found.push(Finding {
            kind: "broken_backplane",
            summary: format!(
                "{resyncs} resyncs in {secs}s on the invalidation channel: events were lost \
                 (a heartbeat showed a sequence gap, a subscription reconnected, or the log \
                 was reset)"
            ),
            figures: figures(json!({"resyncs": resyncs})),
            action: RESYNCS,
        });
    }

    let dropped = match (a.cached_scripts, b.cached_scripts) {
        (Some(x), Some(y)) if y < x => Some((x, y)),
        _ => None,
    };
    let noscript = delta_opt(a.noscript_errors, b.noscript_errors).unwrap_or(0);
    let flushes = delta_opt(a.script_flushes, b.script_flushes).unwrap_or(0);
    if dropped.is_some() || noscript > 0 || flushes > 0 {
        found.push(Finding {
            kind: "script_cache_flush",
            summary: format!(
                "{}{noscript} NOSCRIPT errors and {flushes} SCRIPT FLUSH calls in {secs}s",
                dropped.map_or_else(String::new, |(x, y)| format!(
                    "the script cache went from {x} to {y} scripts; "
                )),
            ),
            figures: figures(json!({
                "cached_scripts_before": a.cached_scripts,
                "cached_scripts_after": b.cached_scripts,
                "noscript_errors": noscript,
                "script_flushes": flushes,
            })),
            action: SCRIPTS,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis() -> Sample {
        Sample {
            servers: 1,
            hits: 1000,
            misses: 10,
            gets: 1010,
            script_calls: Some(50),
            script_failed: Some(0),
            sets: Some(5),
            noscript_errors: Some(0),
            script_flushes: Some(0),
            cached_scripts: Some(4),
            subscribers: Some(3),
            live_nodes: 3,
            subscribed_nodes: 3,
            max_memory: 1000,
            used_memory: 100,
            ..Sample::default()
        }
    }

    fn memcached() -> Sample {
        Sample {
            servers: 2,
            hits: 500,
            misses: 5,
            cas_hits: Some(100),
            cas_badval: Some(1),
            cas_misses: Some(0),
            max_memory: 1000,
            used_memory: 10,
            ..Sample::default()
        }
    }

    fn kinds(a: &Sample, b: &Sample, resyncs: u64) -> Vec<&'static str> {
        diagnose(a, b, 1.0, resyncs, &Thresholds::default())
            .iter()
            .map(|f| f.kind)
            .collect()
    }

    #[test]
    fn a_quiet_server_is_healthy() {
        let a = redis();
        let mut b = a.clone();
        b.hits += 400;
        b.misses += 20;
        b.script_calls = Some(60);
        assert!(kinds(&a, &b, 0).is_empty());
        assert!(kinds(&memcached(), &memcached(), 0).is_empty());
    }

    #[test]
    fn many_misses_and_few_hits_are_a_stampede() {
        let a = redis();
        let mut b = a.clone();
        b.misses += 2000;
        b.hits += 10;
        let found = diagnose(&a, &b, 2.0, 0, &Thresholds::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "stampede");
        assert_eq!(found[0].figures["misses_per_sec"], 1000.0);
        assert_eq!(found[0].figures["miss_ratio"], 0.995);
        assert!(
            found[0].summary.contains("1000 misses/s"),
            "{}",
            found[0].summary
        );
    }

    #[test]
    fn misses_below_the_rate_or_the_ratio_are_not() {
        let a = redis();
        let mut few = a.clone();
        few.misses += 199; // 199/s, all reads missing
        assert!(kinds(&a, &few, 0).is_empty());
        let mut mostly_hits = a.clone();
        mostly_hits.misses += 1000;
        mostly_hits.hits += 1001; // under half miss
        assert!(kinds(&a, &mostly_hits, 0).is_empty());
        let mut at = a.clone();
        at.misses += 200;
        at.hits += 200;
        assert_eq!(kinds(&a, &at, 0), ["stampede"]);
    }

    #[test]
    fn a_polled_log_raises_the_bar_by_its_pollers() {
        let mut a = memcached();
        a.polled_log = true;
        a.live_nodes = 10;
        let mut b = a.clone();
        b.misses += 399; // 10 idle pollers: 200 + 10 × 20 misses/s expected at most
        assert!(kinds(&a, &b, 0).is_empty());
        b.misses += 1;
        assert_eq!(kinds(&a, &b, 0), ["stampede"]);
    }

    #[test]
    fn lost_cas_writes_are_contention() {
        let a = memcached();
        let mut b = a.clone();
        b.cas_badval = Some(1 + 300);
        b.cas_hits = Some(100 + 50);
        let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, "cas_contention");
        assert_eq!(found[0].figures["cas_badval"], 300);
        assert_eq!(found[0].figures["cas_badval_ratio"], 0.857);
    }

    #[test]
    fn few_or_rare_lost_cas_writes_are_not() {
        let a = memcached();
        let mut few = a.clone();
        few.cas_badval = Some(1 + 9); // all lost, but 9
        assert!(kinds(&a, &few, 0).is_empty());
        let mut rare = a.clone();
        rare.cas_badval = Some(1 + 10);
        rare.cas_hits = Some(100 + 200); // under 5 %
        assert!(kinds(&a, &rare, 0).is_empty());
        let mut at = a.clone();
        at.cas_badval = Some(1 + 10);
        at.cas_hits = Some(100 + 190); // 10 of 200: 5 %
        assert_eq!(kinds(&a, &at, 0), ["cas_contention"]);
    }

    #[test]
    fn a_redis_write_storm_is_contention() {
        let a = redis();
        let mut b = a.clone();
        b.script_calls = Some(50 + 199);
        assert!(kinds(&a, &b, 0).is_empty());
        b.script_calls = Some(50 + 200);
        assert_eq!(kinds(&a, &b, 0), ["cas_contention"]);
    }

    #[test]
    fn evictions_and_memory_pressure() {
        let a = memcached();
        let mut b = a.clone();
        b.evictions += 1;
        let found = diagnose(&a, &b, 1.0, 0, &Thresholds::default());
        assert_eq!(found[0].kind, "evictions");
        assert_eq!(found[0].figures["evictions"], 1);
        let mut full = a.clone();
        full.used_memory = full.max_memory * 9 / 10;
        assert_eq!(kinds(&a, &full, 0), ["memory_pressure"]);
        full.used_memory -= 1;
        assert!(kinds(&a, &full, 0).is_empty());
        // No limit: no pressure.
        let mut unlimited = redis();
        unlimited.max_memory = 0;
        unlimited.used_memory = u64::MAX / 2;
        assert!(kinds(&unlimited, &unlimited, 0).is_empty());
    }

    #[test]
    fn fewer_subscribers_than_live_nodes_is_a_broken_backplane() {
        let a = redis();
        let mut b = a.clone();
        b.subscribers = Some(2);
        // One sample with all of them: a reconnection, not a finding.
        assert!(kinds(&a, &b, 0).is_empty());
        let mut a2 = a.clone();
        a2.subscribers = Some(2);
        let found = diagnose(&a2, &b, 1.0, 0, &Thresholds::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "broken_backplane");
        assert_eq!(found[0].figures["missing"], 1);
        // More subscribers than nodes (a watcher, replicas without presence): fine.
        let mut more = a.clone();
        more.subscribers = Some(9);
        assert!(kinds(&more, &more, 0).is_empty());
    }

    #[test]
    fn resyncs_are_a_broken_backplane() {
        let found = diagnose(&memcached(), &memcached(), 1.0, 2, &Thresholds::default());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].kind, &found[0].figures["resyncs"]),
            ("broken_backplane", &json!(2))
        );
    }

    #[test]
    fn a_script_cache_flush() {
        let a = redis();
        let mut dropped = a.clone();
        dropped.cached_scripts = Some(0);
        assert_eq!(kinds(&a, &dropped, 0), ["script_cache_flush"]);
        let mut noscript = a.clone();
        noscript.noscript_errors = Some(3);
        let found = diagnose(&a, &noscript, 1.0, 0, &Thresholds::default());
        assert_eq!(found[0].kind, "script_cache_flush");
        assert_eq!(found[0].figures["noscript_errors"], 3);
        let mut grown = a.clone();
        grown.cached_scripts = Some(9);
        assert!(kinds(&a, &grown, 0).is_empty());
    }

    #[test]
    fn a_restarted_server_counts_from_zero_without_a_finding() {
        let a = redis();
        let restarted = Sample {
            cached_scripts: Some(4),
            ..redis()
        };
        let mut b = restarted;
        b.hits = 0;
        b.misses = 0;
        assert!(kinds(&a, &b, 0).is_empty());
    }
}
