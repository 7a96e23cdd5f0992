//! Fleet presence on Redis ([`RedisFleet`]): one key per node with a TTL, and a sorted
//! set that indexes them, all under one hash tag so a cluster keeps them in one slot.

use std::fmt;
use std::time::Duration;

use flagcache_core::fleet::{FleetRegistry, NodeReport};
use flagcache_core::{async_trait, FlagKey, NodeId, Result};
use redis::Script;

use crate::RedisStore;

/// Writes a node's record and indexes it: `SET record json PX ttl`, the node in the
/// index scored by its expiry on the server's clock, expired nodes dropped from the
/// index, and the index kept at least as long as its longest-lived record.
const RECORD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

/// A [`FleetRegistry`] on Redis, beside a [`RedisStore`]'s entries (same connection,
/// same namespace).
///
/// Keys, for the namespace `flags`: `{flags:fleet}:node:<node id>` (the report, JSON,
/// with the reporting period's TTL) and `{flags:fleet}:nodes` (a sorted set of node ids
/// scored by their record's expiry). A report is one script call; reading the fleet is
/// a `ZRANGE` and an `MGET`: O(N) both ways.
///
/// ```no_run
/// # async fn f() -> flagcache::Result<()> {
/// use flagcache::{FlagCache, FlagKey, Version};
/// use flagcache::redis::{RedisFleet, RedisInvalidator, RedisStore};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// # let loader = |_: FlagKey| async { Ok(Some((true, Version::new(1)))) };
/// let cache = FlagCache::<bool>::builder(store.clone(), loader)
///     .invalidator(RedisInvalidator::connect("redis://127.0.0.1:6379").await?)
///     .report_to_fleet(RedisFleet::new(&store))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisFleet {
    store: RedisStore,
    /// `{<namespace>:fleet}:`
    prefix: String,
    record: Script,
}

impl fmt::Debug for RedisFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFleet")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisFleet {
    /// The fleet registry of `store`'s namespace.
    pub fn new(store: &RedisStore) -> Self {
        // A flag's key is `<namespace>:{<flag>}`: the namespace is what precedes the tag.
        let probe = FlagKey::new("x")
            .map(|k| store.redis_key(&k))
            .unwrap_or_default();
        let namespace = probe
            .strip_suffix(":{x}")
            .filter(|ns| !ns.is_empty())
            .unwrap_or("flags");
        RedisFleet {
            store: store.clone(),
            prefix: format!("{{{namespace}:fleet}}:"),
            record: Script::new(RECORD),
        }
    }

    fn index(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    fn node_key(&self, node: NodeId) -> String {
        format!("{}node:{node}", self.prefix)
    }
}

#[async_trait]
impl FleetRegistry for RedisFleet {
    async fn record(&self, report: &NodeReport, ttl: Duration) -> Result<()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut inv = self.record.prepare_invoke();
        inv.key(self.index())
            .key(self.node_key(report.node))
            .arg(report.node.to_string())
            .arg(report.to_json()?)
            .arg(ms);
        self.store.connection().script("fleet record", inv).await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeReport>> {
        let mut range = redis::cmd("ZRANGE");
        range.arg(self.index()).arg(0).arg(-1);
        let ids: Vec<String> = self.store.connection().query("fleet nodes", &range).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut get = redis::cmd("MGET");
        for id in &ids {
            get.arg(format!("{}node:{id}", self.prefix));
        }
        let records: Vec<Option<Vec<u8>>> =
            self.store.connection().query("fleet nodes", &get).await?;
        // A record gone is a node whose TTL passed: its index entry goes at the next write.
        Ok(records
            .iter()
            .flatten()
            .filter_map(|r| NodeReport::from_json(r))
            .collect())
    }

    async fn remove(&self, node: NodeId) -> Result<()> {
        let mut del = redis::cmd("DEL");
        del.arg(self.node_key(node));
        let _: i64 = self.store.connection().query("fleet remove", &del).await?;
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.index()).arg(node.to_string());
        let _: i64 = self.store.connection().query("fleet remove", &zrem).await?;
        Ok(())
    }
}
