//! What each memcached server says about itself — `stats` — for tools that diagnose a
//! deployment ([`MemcachedStore::server_stats`]).

use std::collections::BTreeMap;

use flagcache_core::Result;

use crate::MemcachedStore;

impl MemcachedStore {
    /// `stats` on every server of the ring at once, in the order they were given: each
    /// server's address and either its statistics by memcached's names (`get_hits`,
    /// `get_misses`, `cas_badval`, `evictions`, `bytes`, `limit_maxbytes`, …), as the
    /// server wrote them, or why it could not be asked. A server that is down costs
    /// one timeout, and the others still answer.
    ///
    /// ```no_run
    /// # async fn f() -> flagcache::Result<()> {
    /// let store = flagcache::memcached::MemcachedStore::builder()
    ///     .servers(["127.0.0.1:11211", "127.0.0.1:11212"])
    ///     .build()
    ///     .await?;
    /// for (server, stats) in store.server_stats().await {
    ///     match stats {
    ///         Ok(stats) => println!("{server}: {:?} CAS writes lost", stats.get("cas_badval")),
    ///         Err(e) => println!("{server}: unreachable ({e})"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Per server: `Error::Backend` or `Error::Timeout` when it cannot be asked.
    pub async fn server_stats(&self) -> Vec<(String, Result<BTreeMap<String, String>>)> {
        let asks = self
            .meta()
            .pools()
            .iter()
            .enumerate()
            .map(|(i, pool)| async move { (pool.url().to_string(), self.meta().stats(i).await) });
        futures_util::future::join_all(asks).await
    }
}
