//! The diagnosis: two samples of a server taken an interval apart, and what the
//! invalidation channel showed in between, turned into findings — a stampede, CAS
//! contention, evictions or memory pressure, missing subscribers or resyncs (a broken
//! backplane), a flushed script cache, an unreachable server — each with the figures
//! that prove it and an action. Pure: no I/O.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::sample::Sample;

/// Where each finding starts. The defaults are far from what a healthy flag cache
/// shows (flags are read from L1, written a few times a minute) and close enough to
/// catch the failure modes runbooks describe.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Fills per second at and above which misses are a stampede: the bar in misses
    /// per second is this times the misses one fill costs on the backend
    /// ([`Sample::misses_per_fill`]: 5 on Redis, so 1000 misses/s; 1 on memcached)…
    pub stampede_fills_per_sec: f64,
    /// …plus this many per live replica where replicas poll an invalidation log in
    /// the server (memcached: a read every 100 ms by default, which misses while no
    /// event was ever published)…
    pub poll_misses_per_node: f64,
    /// …when at least this share of the interval's reads missed (misses outnumber hits
    /// nine to one: a cache that also serves from L2 is not stampeding).
    pub stampede_miss_ratio: f64,
    /// memcached: the share of CAS writes lost to another writer that is contention
    /// (the usual runbook rule: above 5 % of writes)…
    pub cas_badval_ratio: f64,
    /// …when at least this many were lost in the interval. (Redis has no such
    /// counter: its version check runs in one script, which never retries, so its
    /// write volume is a figure, not a finding.)
    pub cas_badval_min: u64,
    /// Memory in use over the limit at and above which memory is under pressure.
    pub memory_fill: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            stampede_fills_per_sec: 200.0,
            poll_misses_per_node: 20.0,
            stampede_miss_ratio: 0.9,
            cas_badval_ratio: 0.05,
            cas_badval_min: 10,
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
    /// `missing_subscribers`, `resyncs`, `script_cache_flush` or `server_down`; each
    /// kind has one shape of `figures`.
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
const SERVER_DOWN: &str = "Bring the servers back or take them out of the ring: their keys \
    miss, and every read of them goes to the source, until they answer. The other \
    findings' figures cover only the servers that answered.";

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
        miss_ratio: ratio(misses, hits.saturating_add(misses)).map(|r| round(r, 3)),
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
        delta(a.hits, b.hits).saturating_add(delta(a.misses, b.misses)),
    )
    .unwrap_or(0.0);
    let polling = if b.polled_log {
        t.poll_misses_per_node * a.live_nodes.max(b.live_nodes) as f64
    } else {
        0.0
    };
    let per_fill = b.misses_per_fill.max(1);
    let stampede_at = t.stampede_fills_per_sec * per_fill as f64 + polling;
    if r.misses_per_sec >= stampede_at && miss_ratio >= t.stampede_miss_ratio {
        let before = ratio(a.misses, a.hits.saturating_add(a.misses)).map_or(0.0, |x| round(x, 3));
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
                "misses_per_fill": per_fill,
            })),
            action: STAMPEDE,
        });
    }

    if let (Some(badval), Some(hits)) = (
        delta_opt(a.cas_badval, b.cas_badval),
        delta_opt(a.cas_hits, b.cas_hits),
    ) {
        let writes = badval.saturating_add(hits);
        let share = ratio(badval, writes).unwrap_or(0.0);
        if badval >= t.cas_badval_min && share >= t.cas_badval_ratio {
            found.push(Finding {
                kind: "cas_contention",
                summary: format!(
                    "{badval} of {} CAS writes in {secs}s lost to another writer ({:.0}%, \
                     {} cas_badval/s): writers race on the same keys",
                    writes,
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
                kind: "missing_subscribers",
                summary: format!(
                    "{subs} connections subscribe to the invalidation channel but {nodes} \
                     live replicas hear events over it: {} hear no invalidations and serve \
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
            kind: "resyncs",
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

    let mut down: Vec<&String> = a.unreachable.iter().chain(&b.unreachable).collect();
    down.sort();
    down.dedup();
    if !down.is_empty() {
        let servers = a.servers.max(b.servers);
        found.push(Finding {
            kind: "server_down",
            summary: format!(
                "{} of {servers} servers did not answer: {}",
                down.len(),
                down.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            figures: figures(json!({
                "unreachable": down,
                "servers": servers,
            })),
            action: SERVER_DOWN,
        });
    }
    found
}

#[cfg(test)]
#[path = "diagnose_tests.rs"]
mod tests;
