use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flagcache_core::{Coalescer, Entry, Fetch, FlagKey, FlagStore, Result};
use redis::{Script, Value};

use crate::{scripts, RedisStore};

/// Cross-process stampede protection: when many replicas miss the same key at once,
/// one takes `SET <namespace>:lock:{<key>} <random token> NX PX <ttl>` and loads from
/// the source; the others poll the lock and, once it is released, read the value from
/// L2. If it was released or expired without a value (its holder died, or the flag does
/// not exist), a waiter takes the lock over; a waiter that has waited twice the lock's
/// TTL loads by itself. The holder releases the lock with a
/// compare-and-delete script, so it never deletes a lock another process took over.
///
/// If Redis cannot be asked, the fetch runs unguarded: slower for the source, never
/// broken for the caller.
///
/// ```no_run
/// # async fn demo(store: flagcache_redis::RedisStore) -> flagcache_core::Result<()> {
/// use flagcache_core::{FlagCache, FlagKey, Version};
/// use flagcache_redis::RedisLock;
///
/// let loader = |_k: FlagKey| async { Ok(Some((true, Version::new(1)))) };
/// let cache = FlagCache::<bool>::builder(store.clone(), loader)
///     .cross_process(RedisLock::new(&store))
///     .build()
///     .await?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisLock {
    store: RedisStore,
    ttl: Duration,
    poll: Duration,
    release: std::sync::Arc<Script>,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("ttl", &self.ttl)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl RedisLock {
    /// A lock over `store`'s keys, with a 10 s TTL (above `FlagCache`'s default loader
    /// timeout plus an L2 write) and 20 ms polling.
    pub fn new(store: &RedisStore) -> Self {
        RedisLock {
            store: store.clone(),
            ttl: Duration::from_secs(10),
            poll: Duration::from_millis(20),
            release: std::sync::Arc::new(scripts::release()),
        }
    }

    /// How long a lock lives (and so how long waiters wait for a holder that died):
    /// longer than a load and its L2 write take. Default 10 s.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How often waiters look for the holder's value (jittered ±50 %). Default 20 ms.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    async fn acquire(&self, lock: &str, token: &str) -> Result<bool> {
        let ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = redis::cmd("SET");
        cmd.arg(lock).arg(token).arg("NX").arg("PX").arg(ms);
        let reply: Value = self.store.query("lock", &cmd).await?;
        Ok(matches!(reply, Value::Okay) || matches!(&reply, Value::SimpleString(s) if s == "OK"))
    }

    async fn held(&self, lock: &str) -> Result<bool> {
        let n: i64 = self
            .store
            .query("lock", redis::cmd("EXISTS").arg(lock))
            .await?;
        Ok(n > 0)
    }

    async fn release(&self, lock: &str, token: &str) {
        let mut inv = self.release.prepare_invoke();
        inv.key(lock).arg(token);
        if let Err(e) = self.store.script("unlock", inv).await {
            // It expires by itself.
            tracing::debug!(error = %e, "lock release failed");
        }
    }
}

#[async_trait]
impl Coalescer for RedisLock {
    async fn coalesce(&self, key: &FlagKey, fetch: Fetch) -> Result<Option<Entry>> {
        let lock = self.store.lock_key(key);
        let give_up = Instant::now() + self.ttl * 2;
        loop {
            let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            match self.acquire(&lock, &token).await {
                Ok(true) => {
                    let result = fetch.await;
                    self.release(&lock, &token).await;
                    return result;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%key, error = %e, "stampede lock unavailable; loading unguarded");
                    return fetch.await;
                }
            }
            // Someone else is loading. Wait until they release the lock, then read L2
            // once: what was there before (possibly the very value that missed, e.g. an
            // older version) must not be mistaken for theirs.
            loop {
                let pause = self.poll.mul_f64(0.5 + fastrand::f64());
                tokio::time::sleep(pause).await;
                if Instant::now() > give_up {
                    tracing::warn!(%key, "waited twice the lock's TTL; loading");
                    return fetch.await;
                }
                if self.held(&lock).await.unwrap_or(false) {
                    continue;
                }
                if let Ok(Some(entry)) = self.store.get(key).await {
                    return Ok(Some(entry));
                }
                break; // released or expired without a value: try to take it over
            }
        }
    }
}
