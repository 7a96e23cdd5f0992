//! What each memcached server says about itself — `stats` — for tools that diagnose a
//! deployment ([`MemcachedStore::server_stats`]).

use std::collections::BTreeMap;

use flagcache_core::Result;

use crate::MemcachedStore;

impl MemcachedStore {
    /// `stats` on every server of the ring, in the order they were given: each
    /// server's address and its statistics by memcached's names (`get_hits`,
    /// `get_misses`, `cas_badval`, `evictions`, `bytes`, `limit_maxbytes`, …), as the
    /// server wrote them.
    ///
    /// ```no_run
    /// # async fn f() -> flagcache::Result<()> {
    /// let store = flagcache::memcached::MemcachedStore::builder()
    ///     .servers(["127.0.0.1:11211", "127.0.0.1:11212"])
    ///     .build()
    ///     .await?;
    /// for (server, stats) in store.server_stats().await? {
    ///     println!("{server}: {:?} CAS writes lost", stats.get("cas_badval"));
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Error::Backend` or `Error::Timeout` when a server cannot be asked.
    pub async fn server_stats(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let mut all = Vec::new();
        for (i, pool) in self.meta().pools().iter().enumerate() {
            all.push((pool.url().to_string(), self.meta().stats(i).await?));
        }
        Ok(all)
    }
}
