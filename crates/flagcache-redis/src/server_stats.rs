//! What the Redis server says about itself — `INFO` and the number of subscribers of a
//! channel — for tools that diagnose a deployment ([`RedisStore::server_info`],
//! [`RedisStore::channel_subscribers`]).

use flagcache_core::{Error, Result};

use crate::RedisStore;

impl RedisStore {
    /// `INFO all`: every section (stats, commandstats, errorstats, keyspace, clients,
    /// memory, …) as the server wrote it, `name:value` lines under `# Section`
    /// headers. Through Sentinel, the primary's.
    ///
    /// ```no_run
    /// # async fn f() -> flagcache::Result<()> {
    /// let store = flagcache::redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let info = store.server_info().await?;
    /// let misses = info.lines().find_map(|l| l.strip_prefix("keyspace_misses:"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Error::InvalidArgument` on a Redis Cluster connection (each node describes only
    /// itself: ask each node by its `redis://` URL); `Error::Backend` or
    /// `Error::Timeout` when Redis cannot be asked.
    pub async fn server_info(&self) -> Result<String> {
        self.one_node("INFO")?;
        self.connection()
            .query("info", redis::cmd("INFO").arg("all"))
            .await
    }

    /// How many connections are subscribed to `channel` (`PUBSUB NUMSUB`): on the
    /// invalidation channel, one per listening replica. Through Sentinel, the
    /// primary's count.
    ///
    /// ```no_run
    /// # async fn f() -> flagcache::Result<()> {
    /// use flagcache::redis::{RedisInvalidator, RedisStore};
    ///
    /// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let bus = RedisInvalidator::connect("redis://127.0.0.1:6379").await?;
    /// let listening = store.channel_subscribers(bus.channel()).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As for [`server_info`](RedisStore::server_info).
    pub async fn channel_subscribers(&self, channel: &str) -> Result<u64> {
        self.one_node("PUBSUB NUMSUB")?;
        let reply: (String, u64) = self
            .connection()
            .query(
                "pubsub numsub",
                redis::cmd("PUBSUB").arg("NUMSUB").arg(channel),
            )
            .await?;
        Ok(reply.1)
    }

    fn one_node(&self, command: &str) -> Result<()> {
        if self.connection().is_cluster() {
            return Err(Error::InvalidArgument(
                format!(
                    "{command} describes one node of a Redis Cluster: connect to each node \
                     by its redis:// URL"
                )
                .into(),
            ));
        }
        Ok(())
    }
}
