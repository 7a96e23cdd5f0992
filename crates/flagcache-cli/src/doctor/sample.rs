//! One sample of a server's figures: read from Redis `INFO` (and `PUBSUB NUMSUB` on the
//! invalidation channel) or memcached `stats` on every server of the ring, with the
//! fleet presence beside it.

use std::collections::BTreeMap;

use flagcache::{store::now_ms, Backend};
use serde::Serialize;

use crate::report::Failure;

/// A server's figures at one moment, summed over the servers of a memcached ring.
/// Counters only grow (until a restart); gauges (memory, clients, keys, scripts) are
/// levels. A figure the backend does not have is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, in ms since the Unix epoch.
    pub at_ms: u64,
    /// How many servers were asked.
    pub servers: usize,
    /// The servers of a memcached ring that did not answer (their figures are not in
    /// the sums).
    pub unreachable: Vec<String>,
    /// Reads that found their key (Redis `keyspace_hits`, memcached `get_hits`).
    pub hits: u64,
    /// Reads that did not (Redis `keyspace_misses`, memcached `get_misses`).
    pub misses: u64,
    /// Read commands (Redis `GET` + `MGET` calls, memcached `cmd_get`).
    pub gets: u64,
    /// Keys evicted for memory (Redis `evicted_keys`, memcached `evictions`).
    pub evictions: u64,
    /// Memory in use (Redis `used_memory`, memcached `bytes`).
    pub used_memory: u64,
    /// The memory limit; 0 when there is none (Redis `maxmemory`, memcached
    /// `limit_maxbytes`).
    pub max_memory: u64,
    /// Connected clients (Redis `connected_clients`, memcached `curr_connections`).
    pub clients: u64,
    /// Keys held (Redis keyspace, memcached `curr_items`).
    pub keys: u64,
    /// memcached: CAS writes that won.
    pub cas_hits: Option<u64>,
    /// memcached: CAS writes that lost to another writer.
    pub cas_badval: Option<u64>,
    /// memcached: CAS writes whose key was gone.
    pub cas_misses: Option<u64>,
    /// Redis: `EVALSHA`/`EVAL` calls (every versioned write is one).
    pub script_calls: Option<u64>,
    /// Redis: script calls that failed or were rejected.
    pub script_failed: Option<u64>,
    /// Redis: `SET` calls (the coalescer takes its lock with one).
    pub sets: Option<u64>,
    /// Redis: `NOSCRIPT` errors (a script called by its digest after a flush).
    pub noscript_errors: Option<u64>,
    /// Redis: `SCRIPT FLUSH` calls.
    pub script_flushes: Option<u64>,
    /// Redis: scripts in the server's script cache.
    pub cached_scripts: Option<u64>,
    /// Redis: connections subscribed to the invalidation channel (not the doctor's own).
    pub subscribers: Option<u64>,
    /// Replicas that report their presence.
    pub live_nodes: usize,
    /// Of those, the ones whose invalidator subscribes to the pub/sub channel (see
    /// [`subscribes_to_channel`]).
    pub subscribed_nodes: usize,
    /// How many misses one fill of a key costs on this backend, at least (the
    /// stampede bar scales with it); 0 reads as 1.
    #[serde(skip)]
    pub misses_per_fill: u64,
    /// Whether replicas poll an invalidation log kept in the server (memcached): their
    /// polls are reads, and miss while no event was ever published.
    #[serde(skip)]
    pub polled_log: bool,
}

/// `INFO`'s `name:value` lines, section headers and blank lines skipped.
pub fn parse_info(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .collect()
}

/// One `name=value` field of a composite `INFO` value (`calls=5,usec=9,…`).
fn field(value: &str, name: &str) -> Option<u64> {
    value
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Keyspace misses one fill of an absent key costs on Redis: the entry read, the fence
/// read of the keys that missed, the fence `GET` in the lock script, and the fence and
/// entry `GET`s in the put script.
pub const REDIS_MISSES_PER_FILL: u64 = 5;

/// The figures of a Redis `INFO all` reply (without the subscribers and the fleet).
pub fn from_redis_info(text: &str) -> Sample {
    let info = parse_info(text);
    let num = |name: &str| info.get(name).and_then(|v| v.parse::<u64>().ok());
    let calls = |cmd: &str, f: &str| {
        info.get(format!("cmdstat_{cmd}").as_str())
            .and_then(|v| field(v, f))
            .unwrap_or(0)
    };
    const SCRIPTS: [&str; 4] = ["evalsha", "eval", "evalsha_ro", "eval_ro"];
    let script_failed = SCRIPTS
        .iter()
        .map(|c| calls(c, "failed_calls").saturating_add(calls(c, "rejected_calls")))
        .fold(0, u64::saturating_add);
    Sample {
        servers: 1,
        misses_per_fill: REDIS_MISSES_PER_FILL,
        hits: num("keyspace_hits").unwrap_or(0),
        misses: num("keyspace_misses").unwrap_or(0),
        gets: calls("get", "calls").saturating_add(calls("mget", "calls")),
        evictions: num("evicted_keys").unwrap_or(0),
        used_memory: num("used_memory").unwrap_or(0),
        max_memory: num("maxmemory").unwrap_or(0),
        clients: num("connected_clients").unwrap_or(0),
        keys: info
            .iter()
            .filter(|(k, _)| k.starts_with("db") && k[2..].chars().all(|c| c.is_ascii_digit()))
            .filter_map(|(_, v)| field(v, "keys"))
            .fold(0, u64::saturating_add),
        script_calls: Some(
            SCRIPTS
                .iter()
                .map(|c| calls(c, "calls"))
                .fold(0, u64::saturating_add),
        ),
        script_failed: Some(script_failed),
        sets: Some(calls("set", "calls")),
        noscript_errors: Some(
            info.get("errorstat_NOSCRIPT")
                .and_then(|v| field(v, "count"))
                .unwrap_or(0),
        ),
        script_flushes: Some(calls("script|flush", "calls")),
        cached_scripts: num("number_of_cached_scripts"),
        ..Sample::default()
    }
}

/// The figures of memcached `stats` on each server that answered, summed; the others
/// listed as unreachable.
pub fn from_memcached_stats(
    servers: &[(String, flagcache::Result<BTreeMap<String, String>>)],
) -> Sample {
    let mut s = Sample {
        polled_log: true,
        misses_per_fill: 1,
        cas_hits: Some(0),
        cas_badval: Some(0),
        cas_misses: Some(0),
        ..Sample::default()
    };
    for (server, stats) in servers {
        s.servers += 1;
        let Ok(stats) = stats else {
            s.unreachable.push(server.clone());
            continue;
        };
        let num = |name: &str| {
            stats
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        for (total, name) in [
            (&mut s.hits, "get_hits"),
            (&mut s.misses, "get_misses"),
            (&mut s.gets, "cmd_get"),
            (&mut s.evictions, "evictions"),
            (&mut s.used_memory, "bytes"),
            (&mut s.max_memory, "limit_maxbytes"),
            (&mut s.clients, "curr_connections"),
            (&mut s.keys, "curr_items"),
        ] {
            *total = total.saturating_add(num(name));
        }
        for (slot, name) in [
            (&mut s.cas_hits, "cas_hits"),
            (&mut s.cas_badval, "cas_badval"),
            (&mut s.cas_misses, "cas_misses"),
        ] {
            *slot = slot.map(|n| n.saturating_add(num(name)));
        }
    }
    s
}

/// A refusal to ask (a Redis Cluster) is a usage error; anything else, the server
/// could not be asked.
fn failed(e: flagcache::Error) -> Failure {
    match e {
        flagcache::Error::InvalidArgument(_) => Failure::usage(e.to_string()),
        e => Failure::connect(e),
    }
}

/// Takes one sample of `backend`'s server(s) and fleet presence. `own_subscriptions`
/// is how many subscriptions to the channel the doctor itself holds now (not counted).
///
/// # Errors
/// A usage failure for a backend without a server (`memory://`) or a Redis Cluster; a
/// backend failure when the server cannot be asked (memcached: when no server of the
/// ring answers).
pub async fn take(backend: &Backend, own_subscriptions: u64) -> Result<Sample, Failure> {
    let mut sample = if let Some(store) = backend.as_redis() {
        let info = store.server_info().await.map_err(failed)?;
        let mut sample = from_redis_info(&info);
        if let Some(channel) = backend.as_redis_invalidator().map(|i| i.channel()) {
            let n = store.channel_subscribers(channel).await.map_err(failed)?;
            sample.subscribers = Some(n.saturating_sub(own_subscriptions));
        }
        sample
    } else if let Some(store) = backend.as_memcached() {
        let stats = store.server_stats().await;
        let sample = from_memcached_stats(&stats);
        if sample.unreachable.len() == sample.servers {
            // No server answered: nothing to diagnose.
            if let Some((_, Err(e))) = stats.into_iter().find(|(_, s)| s.is_err()) {
                return Err(failed(e));
            }
        }
        sample
    } else {
        return Err(Failure::usage(format!(
            "doctor reads a server's statistics (redis://, memcached://); {} has no server",
            backend.url()
        )));
    };
    // Presence is optional: a fleet that cannot be read has no live nodes to count.
    let nodes = backend.fleet().nodes().await.unwrap_or_default();
    sample.live_nodes = nodes.len();
    sample.subscribed_nodes = nodes.iter().filter(|n| subscribes_to_channel(n)).count();
    sample.at_ms = now_ms();
    Ok(sample)
}

/// Whether `node`'s invalidator holds a subscription to the invalidation channel, which
/// `PUBSUB NUMSUB` counts: pub/sub (alone or beside client tracking), and invalidators
/// of replicas too old to report how they hear events. Client tracking alone, a polled
/// log and custom invalidators do not subscribe to it.
pub fn subscribes_to_channel(node: &flagcache::fleet::NodeReport) -> bool {
    node.subscribed
        && node
            .transport
            .as_deref()
            .map_or(true, |t| t.split('+').any(|part| part == "pubsub"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Stats\r\nkeyspace_hits:10\r\nkeyspace_misses:4\r\nevicted_keys:2\r\n\
        # Memory\r\nused_memory:1000\r\nmaxmemory:4000\r\nnumber_of_cached_scripts:3\r\n\
        # Clients\r\nconnected_clients:7\r\n\
        # Commandstats\r\ncmdstat_get:calls=20,usec=5,usec_per_call=0.25,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_mget:calls=2,usec=1\r\n\
        cmdstat_evalsha:calls=9,usec=90,rejected_calls=1,failed_calls=2\r\n\
        cmdstat_script|flush:calls=1,usec=3\r\ncmdstat_set:calls=5,usec=3\r\n\
        # Errorstats\r\nerrorstat_NOSCRIPT:count=2\r\n\
        # Keyspace\r\ndb0:keys=12,expires=10,avg_ttl=0\r\ndb3:keys=1,expires=0,avg_ttl=0\r\n";

    #[test]
    fn only_pub_sub_transports_subscribe_to_the_channel() {
        let node = |subscribed: bool, transport: Option<&str>| {
            let mut n = flagcache::fleet::NodeReport::new(flagcache::NodeId(1), "replica");
            n.subscribed = subscribed;
            n.transport = transport.map(str::to_string);
            n
        };
        for (subscribed, transport, expected) in [
            (true, Some("pubsub"), true),
            (true, Some("tracking+pubsub"), true),
            (true, Some("tracking"), false),
            (true, Some("log"), false),
            (true, Some("other"), false),
            // A replica of a version that did not report its transport.
            (true, None, true),
            (false, None, false),
        ] {
            assert_eq!(
                subscribes_to_channel(&node(subscribed, transport)),
                expected,
                "{subscribed} {transport:?}"
            );
        }
    }

    #[test]
    fn redis_info_gives_the_figures() {
        let s = from_redis_info(INFO);
        assert_eq!((s.hits, s.misses, s.gets, s.evictions), (10, 4, 22, 2));
        assert_eq!(
            (s.used_memory, s.max_memory, s.clients, s.keys),
            (1000, 4000, 7, 13)
        );
        assert_eq!((s.script_calls, s.script_failed), (Some(9), Some(3)));
        assert_eq!((s.noscript_errors, s.script_flushes), (Some(2), Some(1)));
        assert_eq!((s.cached_scripts, s.sets), (Some(3), Some(5)));
        assert_eq!(s.cas_badval, None);
    }

    #[test]
    fn an_old_redis_lacks_the_newer_figures() {
        let s = from_redis_info("keyspace_hits:1\nkeyspace_misses:x\n");
        assert_eq!((s.hits, s.misses, s.cached_scripts), (1, 0, None));
        assert_eq!(s.noscript_errors, Some(0));
    }

    #[test]
    fn memcached_stats_sum_over_the_ring() {
        let server = |hits: &str, badval: &str| {
            BTreeMap::from([
                ("get_hits".to_string(), hits.to_string()),
                ("cas_badval".to_string(), badval.to_string()),
                ("limit_maxbytes".to_string(), "100".to_string()),
            ])
        };
        let ring = [
            ("a:1".to_string(), Ok(server("3", "1"))),
            ("b:2".to_string(), Ok(server("4", "5"))),
        ];
        let s = from_memcached_stats(&ring);
        assert_eq!((s.servers, s.hits, s.max_memory), (2, 7, 200));
        assert_eq!((s.cas_badval, s.cas_hits), (Some(6), Some(0)));
        assert_eq!(s.script_calls, None);
        assert!(s.unreachable.is_empty());
    }

    #[test]
    fn an_unreachable_server_is_named_and_left_out_of_the_sums() {
        let stats = BTreeMap::from([("get_hits".to_string(), "3".to_string())]);
        let ring = [
            ("a:1".to_string(), Ok(stats)),
            (
                "b:2".to_string(),
                Err(flagcache::Error::Closed("memcached")),
            ),
        ];
        let s = from_memcached_stats(&ring);
        assert_eq!((s.servers, s.hits), (2, 3));
        assert_eq!(s.unreachable, ["b:2"]);
    }

    #[test]
    fn counters_at_the_limit_saturate_instead_of_overflowing() {
        let max = u64::MAX.to_string();
        let info = format!(
            "cmdstat_get:calls={max}\ncmdstat_mget:calls=1\n\
             cmdstat_evalsha:calls={max},failed_calls={max},rejected_calls=1\n\
             cmdstat_eval:calls=1\ndb0:keys={max}\ndb1:keys=1\n"
        );
        let s = from_redis_info(&info);
        assert_eq!((s.gets, s.keys), (u64::MAX, u64::MAX));
        assert_eq!(
            (s.script_calls, s.script_failed),
            (Some(u64::MAX), Some(u64::MAX))
        );
        let server = BTreeMap::from([
            ("get_hits".to_string(), max.clone()),
            ("bytes".to_string(), max.clone()),
            ("cas_badval".to_string(), max.clone()),
        ]);
        let ring = [
            ("a:1".to_string(), Ok(server.clone())),
            ("b:2".to_string(), Ok(server)),
        ];
        let s = from_memcached_stats(&ring);
        assert_eq!((s.hits, s.used_memory), (u64::MAX, u64::MAX));
        assert_eq!(s.cas_badval, Some(u64::MAX));
    }
}
