//! Cross-process stampede protection with memcached's own recache flags.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flagcache_core::{Coalescer, Entry, Fetch, FlagKey, FlagStore, Result};

use crate::MemcachedStore;

/// A [`Coalescer`] for `FlagCacheBuilder::cross_process` built on the meta protocol's
/// recache flags, with no lock keys of its own: on a miss, `mg <key> N<ttl>` vivifies an
/// empty placeholder and gives exactly one client in the fleet the win flag `W`; it
/// loads and stores the value. The others see `Z` and poll for the winner's value; if
/// none appears within the placeholder's TTL they load by themselves.
#[derive(Clone)]
pub struct MemcachedRecache {
    store: MemcachedStore,
    ttl: Duration,
    poll: Duration,
}

impl fmt::Debug for MemcachedRecache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcachedRecache")
            .field("ttl", &self.ttl)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl MemcachedRecache {
    /// Recache over `store`'s entries: placeholders live 10 s (longer than a load),
    /// losers poll every 20 ms.
    pub fn new(store: &MemcachedStore) -> Self {
        MemcachedRecache {
            store: store.clone(),
            ttl: Duration::from_secs(10),
            poll: Duration::from_millis(20),
        }
    }

    /// How long a placeholder lives, and so how long losers wait (whole seconds).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// How often losers look for the winner's value (jittered ±50 %).
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }
}

#[async_trait]
impl Coalescer for MemcachedRecache {
    async fn coalesce(&self, key: &FlagKey, fetch: Fetch) -> Result<Option<Entry>> {
        let ttl_secs = self.ttl.as_secs().max(1);
        let read = match self.store.recache_read(key, ttl_secs).await {
            Ok(Some(v)) => v,
            Ok(None) => return fetch.await,
            Err(e) => {
                tracing::warn!(%key, error = %e, "recache read failed; loading unguarded");
                return fetch.await;
            }
        };
        let data = read.data.unwrap_or_default();
        if !data.is_empty() && read.is_stale != Some(true) {
            // Filled since our miss: take it (unreadable bytes go to the loader).
            if let Ok(entry) = self.store.codec().decode_entry(Bytes::from(data)) {
                return Ok(Some(entry));
            }
        }
        if read.is_recache_winner != Some(false) {
            // We won (or the server gave no verdict): fill it.
            return fetch.await;
        }
        let deadline = Instant::now() + self.ttl;
        while Instant::now() < deadline {
            tokio::time::sleep(self.poll.mul_f64(0.5 + fastrand::f64())).await;
            if let Ok(Some(entry)) = self.store.get(key).await {
                return Ok(Some(entry));
            }
        }
        tracing::warn!(%key, "the recache winner never filled the key; loading");
        fetch.await
    }
}
